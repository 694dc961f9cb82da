/* The RPC tunnel's data path in native code: plain loopback bytes on one side, AES-256-GCM
 * records on the other, two blocking threads, no Python (and no GIL) per message.
 *
 * Why: a generated token costs about ten ggml-rpc round trips per worker, and the Python
 * TLS pumps (tunnel.py) cost ~90 us per round trip on a GPU host: a third of a split's speed
 * at GPU token rates (docs/PERFORMANCE.md). The keys come from the mutually authenticated
 * TLS 1.3 channel the tunnel was opened on (tunnel.py derives them, one key and IV per
 * direction, fresh per connection); this file only moves and seals bytes.
 *
 * The record format is _records.h's. A record that fails authentication, or announces more
 * than RECORD_MAX bytes, ends the connection.
 *
 * relay.run(plain_fd, net_fd, tx_key, tx_iv, rx_key, rx_iv, pending) blocks (with the GIL
 * released) until either side ends, shuts both sockets down (it does not close them) and
 * returns "" for a clean end or the reason. `pending` is ciphertext already read from net_fd
 * (it came in with the channel's last TLS record).
 *
 * Measured on 2 x H200 (docs/PERFORMANCE.md): +56 us per RPC round trip over direct, where
 * the Python pumps add +109 us. That is about the cost of the two extra loopback TCP legs
 * each way (direct is 30 us for two); polling 100 us before sleeping gained nothing, so the
 * threads simply block.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#include "_records.h"

typedef struct {
    int src, dst;
    unsigned char key[KEY], iv[IVLEN];
    uint64_t seq;
    const unsigned char *pending;
    size_t npending;
    const char *error; /* a static string; NULL for a clean end */
} half_t;

/* a blocking recv; -1 with errno on error */
static ssize_t recv_some(int fd, unsigned char *buf, size_t cap) {
    for (;;) {
        ssize_t n = recv(fd, buf, cap, 0);
        if (n >= 0 || errno != EINTR)
            return n;
    }
}

/* then take whatever else is already queued: ggml-rpc writes a command as three pieces
 * (1 byte, 8 bytes, payload), and one record for all three is one wake-up of the far side */
static size_t drain(int fd, unsigned char *buf, size_t have, size_t cap) {
    while (have < cap) {
        ssize_t n = recv(fd, buf + have, cap - have, MSG_DONTWAIT);
        if (n <= 0)
            break; /* nothing queued, EOF or an error: the next blocking recv says which */
        have += (size_t)n;
    }
    return have;
}

/* plain -> records */
static void seal_loop(half_t *h) {
    unsigned char *in = malloc(RECORD_MAX), *out = malloc(RECORD_CAP);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!in || !out || !ctx || !EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, h->key, NULL)) {
        h->error = "out of memory or no AES-GCM in libcrypto";
        goto done;
    }
    for (;;) {
        ssize_t got = recv_some(h->src, in, RECORD_MAX);
        if (got <= 0) {
            if (got < 0)
                h->error = "the local side failed";
            break;
        }
        size_t n = drain(h->src, in, (size_t)got, RECORD_MAX);
        if (!record_seal(ctx, h->iv, h->seq++, in, n, out)) {
            h->error = "encryption failed";
            break;
        }
        if (send_all_with(send, h->dst, out, HDR + n + TAG) < 0) {
            h->error = "the connection to the peer failed";
            break;
        }
    }
done:
    EVP_CIPHER_CTX_free(ctx);
    free(in);
    free(out);
}

/* records -> plain */
static void open_loop(half_t *h) {
    unsigned char *buf = malloc(NET_CAP), *out = malloc(RECORD_MAX);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    size_t have = 0;
    if (!buf || !out || !ctx || !EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, h->key, NULL)) {
        h->error = "out of memory or no AES-GCM in libcrypto";
        goto done;
    }
    if (h->npending > NET_CAP) {
        h->error = "too many bytes before the first record";
        goto done;
    }
    if (h->npending)
        memcpy(buf, h->pending, h->npending);
    have = h->npending;
    for (;;) {
        size_t at = 0;
        /* every complete record in the buffer */
        while (have - at >= HDR) {
            const unsigned char *r = buf + at;
            size_t n = record_len(r);
            if (n > RECORD_MAX) {
                h->error = "a record is larger than the protocol allows";
                goto done;
            }
            if (have - at < HDR + n + TAG)
                break;
            if (!record_open(ctx, h->iv, h->seq++, r, n, out)) {
                h->error = "a record failed authentication";
                goto done;
            }
            if (n && send_all_with(send, h->dst, out, n) < 0) {
                h->error = "the local side failed";
                goto done;
            }
            at += HDR + n + TAG;
        }
        if (at) {
            memmove(buf, buf + at, have - at);
            have -= at;
        }
        ssize_t got = recv_some(h->src, buf + have, NET_CAP - have);
        if (got <= 0) {
            if (got < 0)
                h->error = "the connection to the peer failed";
            else if (have)
                h->error = "the peer ended in the middle of a record";
            break;
        }
        have = drain(h->src, buf, have + (size_t)got, NET_CAP);
    }
done:
    EVP_CIPHER_CTX_free(ctx);
    free(buf);
    free(out);
}

typedef struct {
    half_t up, down;
} relay_t;

static void shut_both(relay_t *r) {
    shutdown(r->up.src, SHUT_RDWR);
    shutdown(r->up.dst, SHUT_RDWR);
}

static void *seal_thread(void *arg) {
    relay_t *r = arg;
    seal_loop(&r->up);
    shut_both(r); /* the other direction wakes and ends */
    return NULL;
}

static int take_key(PyObject *o, unsigned char *dst, Py_ssize_t want, const char *what) {
    char *p;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(o, &p, &n) < 0)
        return -1;
    if (n != want) {
        PyErr_Format(PyExc_ValueError, "%s must be %zd bytes, got %zd", what, want, n);
        return -1;
    }
    memcpy(dst, p, (size_t)want);
    return 0;
}

static PyObject *relay_run(PyObject *self, PyObject *args) {
    int plain_fd, net_fd;
    PyObject *tx_key, *tx_iv, *rx_key, *rx_iv;
    Py_buffer pending;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiSSSSy*", &plain_fd, &net_fd, &tx_key, &tx_iv, &rx_key,
                          &rx_iv, &pending))
        return NULL;
    relay_t *r = calloc(1, sizeof *r);
    unsigned char *pend = NULL;
    if (!r) {
        PyBuffer_Release(&pending);
        return PyErr_NoMemory();
    }
    r->up.src = plain_fd;
    r->up.dst = net_fd;
    r->down.src = net_fd;
    r->down.dst = plain_fd;
    if (take_key(tx_key, r->up.key, KEY, "tx_key") < 0 ||
        take_key(tx_iv, r->up.iv, IVLEN, "tx_iv") < 0 ||
        take_key(rx_key, r->down.key, KEY, "rx_key") < 0 ||
        take_key(rx_iv, r->down.iv, IVLEN, "rx_iv") < 0)
        goto fail;
    if (pending.len) {
        pend = malloc((size_t)pending.len);
        if (!pend) {
            PyErr_NoMemory();
            goto fail;
        }
        memcpy(pend, pending.buf, (size_t)pending.len);
    }
    r->down.pending = pend;
    r->down.npending = (size_t)pending.len;
    PyBuffer_Release(&pending);

    pthread_t tid;
    int started;
    Py_BEGIN_ALLOW_THREADS
    started = pthread_create(&tid, NULL, seal_thread, r) == 0;
    if (started) {
        open_loop(&r->down);
        shut_both(r);
        pthread_join(tid, NULL);
    } else {
        shut_both(r);
    }
    Py_END_ALLOW_THREADS

    const char *why = !started ? "could not start a relay thread"
                      : r->down.error ? r->down.error
                      : r->up.error ? r->up.error
                                    : "";
    OPENSSL_cleanse(r, sizeof *r);
    free(r);
    free(pend);
    return PyUnicode_FromString(why);

fail:
    PyBuffer_Release(&pending);
    OPENSSL_cleanse(r, sizeof *r);
    free(r);
    return NULL;
}

static PyMethodDef methods[] = {
    {"run", relay_run, METH_VARARGS,
     "run(plain_fd, net_fd, tx_key, tx_iv, rx_key, rx_iv, pending) -> str\n"
     "Relay until either side ends; returns '' or why it ended. Shuts both sockets down."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_relay", "The RPC tunnel's native data path (AES-256-GCM records).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__relay(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_RECORD", RECORD_MAX) < 0 ||
        PyModule_AddIntConstant(m, "KEY_BYTES", KEY) < 0 ||
        PyModule_AddIntConstant(m, "IV_BYTES", IVLEN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
