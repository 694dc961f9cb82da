/* The tunnel's in-process data path: llama.cpp's own RPC sockets carry the sealed records.
 *
 * Loaded with LD_PRELOAD into the two processes that run ggml-rpc: the inference child (the
 * RPC client) and the agent's worker (the RPC server). It interposes the socket calls
 * libggml-rpc.so makes (connect, bind, listen, accept, setsockopt, send, recv, close; and
 * accept4, which Python's accept uses). Every other descriptor passes straight through.
 *
 * Why: the native relay (_relay.c) still costs two extra loopback legs each way per RPC
 * round trip (desktop relay, agent relay), ~50 us per round trip on an H200 host, which is
 * 12-16% of a split's token rate. Here the record layer runs inside ggml-rpc's own send and
 * recv, on the one TCP connection between the hosts, so a round trip crosses the network
 * once each way, as with `llama-bench --rpc` direct, plus AES-GCM (~1 us).
 *
 * No TCP port speaks raw ggml-rpc where the shim runs: any local user could reach one
 * (docs/SECURITY.md). Tunnel endpoints use the address 127.82.80.67 ("RPC", TUNNEL_ADDR;
 * tunnel.TUNNEL_HOST), which the shim never connects to or binds over TCP; the port is only
 * a label naming a Unix socket in a private (0700) folder.
 *
 * How a connection gets here (tunnel.py does the authentication, in Python, as before):
 * - client (CORRAL_RPCSHIM_CONNECT=DIR): ggml-rpc connects to 127.82.80.67:PORT, the
 *   desktop tunnel's endpoint; the shim asks the Unix socket DIR/PORT instead (no socket
 *   there: a refused connection, never TCP): the desktop opens the mutually authenticated
 *   TLS channel to the agent as before, and hands over the agent connection (SCM_RIGHTS)
 *   with the record keys; the shim puts it in place of ggml-rpc's socket (dup2). Mode 'P'
 *   hands over the Unix socket itself, a plain stream the desktop pumps through TLS (an
 *   agent without the record layer). Other addresses pass through to libc.
 * - server (CORRAL_RPCSHIM_LISTEN=PATH, CORRAL_RPCSHIM_PORT=PORT): ggml-rpc binds and
 *   listens on 127.82.80.67:PORT; the shim binds nothing (that socket stays unbound) and its
 *   accept() takes connections from the Unix listener PATH (0600): a hand-over of a
 *   desktop's connection with its keys once the agent checked the lease, or, mode 'P', the
 *   Unix connection itself as a plain client (the agent's probe, its relay and pump
 *   fallbacks). Where PATH cannot listen, binding fails: the worker does not start.
 *
 * A handed-over connection: the 100-byte hello below, the descriptor as SCM_RIGHTS on its
 * first byte, then `pending` bytes of ciphertext that arrived with the channel's last TLS
 * record. The handing process keeps a copy of the descriptor, to end the connection when
 * the tunnel closes or the lease ends (tunnel.HandedOver), and the shim keeps the Unix
 * connection open as long as the handed one: when this process dies, the kernel closes
 * it and the handing side ends the connection for the far end. Closing a handed connection
 * here shuts the socket down first, so the far end sees the end despite that copy.
 *
 * The environment variables (and LD_PRELOAD) are removed at load, so nothing the process
 * starts inherits them; CORRAL_RPCSHIM_PRELOAD_WAS restores a LD_PRELOAD the user had.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "_records.h"

#define FD_LIMIT 65536
#define HELLO_MAGIC "CRS1"
#define HELLO_SIZE 100 /* magic 4, mode 1, pad 3, pending 4 (big-endian), keys 88 */

typedef struct {
    pthread_mutex_t tx_lock, rx_lock;
    EVP_CIPHER_CTX *tx, *rx;
    unsigned char tx_iv[IVLEN], rx_iv[IVLEN];
    uint64_t tx_seq, rx_seq;
    unsigned char *net;   /* ciphertext read, not yet opened: [net_at, net_have) (NET_CAP) */
    size_t net_at, net_have;
    unsigned char *plain; /* the last opened record, not yet returned (RECORD_MAX) */
    size_t plain_at, plain_len;
    unsigned char *out;   /* one sealed record (RECORD_CAP) */
    int broken;           /* a record failed: every later call fails */
    int keep;             /* the hand-over's Unix connection, open while this one is: the
                           * handing side watches it to learn that this process is gone */
} conn_t;

static conn_t *table[FD_LIMIT];

static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static int (*real_accept)(int, struct sockaddr *, socklen_t *);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
static ssize_t (*real_send)(int, const void *, size_t, int);
static ssize_t (*real_recv)(int, void *, size_t, int);
static int (*real_close)(int);
static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static int (*real_listen)(int, int);
static int (*real_setsockopt)(int, int, int, const void *, socklen_t);

#define TUNNEL_ADDR 0x7F525043u /* 127.82.80.67 */

static char connect_dir[80];
static int listen_fd = -1;
static int listen_port;
static int worker_fd = -1; /* ggml-rpc's (unbound) server socket */

static void resolve(void) {
    if (real_close)
        return;
    real_connect = dlsym(RTLD_NEXT, "connect");
    real_accept = dlsym(RTLD_NEXT, "accept");
    real_accept4 = dlsym(RTLD_NEXT, "accept4");
    real_send = dlsym(RTLD_NEXT, "send");
    real_recv = dlsym(RTLD_NEXT, "recv");
    real_bind = dlsym(RTLD_NEXT, "bind");
    real_listen = dlsym(RTLD_NEXT, "listen");
    real_setsockopt = dlsym(RTLD_NEXT, "setsockopt");
    real_close = dlsym(RTLD_NEXT, "close");
}

/* The port of a tunnel address (127.82.80.67:PORT), else 0. */
static int tunnel_port(const struct sockaddr *addr, socklen_t alen) {
    if (!addr || addr->sa_family != AF_INET || alen < (socklen_t)sizeof(struct sockaddr_in))
        return 0;
    const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
    return in->sin_addr.s_addr == htonl(TUNNEL_ADDR) ? ntohs(in->sin_port) : 0;
}

static conn_t *lookup(int fd) {
    if (fd < 0 || fd >= FD_LIMIT)
        return NULL;
    return __atomic_load_n(&table[fd], __ATOMIC_ACQUIRE);
}

static void conn_free(conn_t *c) {
    if (c->keep >= 0)
        real_close(c->keep);
    EVP_CIPHER_CTX_free(c->tx);
    EVP_CIPHER_CTX_free(c->rx);
    free(c->net);
    free(c->plain);
    free(c->out);
    pthread_mutex_destroy(&c->tx_lock);
    pthread_mutex_destroy(&c->rx_lock);
    OPENSSL_cleanse(c, sizeof *c);
    free(c);
}

/* A record connection from the hello's 88 key bytes (tx key, tx iv, rx key, rx iv). */
static conn_t *conn_new(const unsigned char *keys) {
    conn_t *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->keep = -1;
    pthread_mutex_init(&c->tx_lock, NULL);
    pthread_mutex_init(&c->rx_lock, NULL);
    c->tx = EVP_CIPHER_CTX_new();
    c->rx = EVP_CIPHER_CTX_new();
    c->net = malloc(NET_CAP);
    c->plain = malloc(RECORD_MAX);
    c->out = malloc(RECORD_CAP);
    memcpy(c->tx_iv, keys + KEY, IVLEN);
    memcpy(c->rx_iv, keys + 2 * KEY + IVLEN, IVLEN);
    if (!c->tx || !c->rx || !c->net || !c->plain || !c->out ||
        !EVP_EncryptInit_ex(c->tx, EVP_aes_256_gcm(), NULL, keys, NULL) ||
        !EVP_DecryptInit_ex(c->rx, EVP_aes_256_gcm(), NULL, keys + KEY + IVLEN, NULL)) {
        conn_free(c);
        return NULL;
    }
    return c;
}

static int read_exact(int fd, unsigned char *buf, size_t len) {
    while (len) {
        ssize_t n = real_recv(fd, buf, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Read one hand-over from the Unix connection `u`. Returns the descriptor to use (the
 * handed connection, or `u` itself in mode 'P') and sets *conn for a record connection;
 * -1 when the hand-over failed (the handing side refused or ended). */
static int take_handover(int u, conn_t **conn) {
    unsigned char hello[HELLO_SIZE];
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {hello, HELLO_SIZE};
    struct msghdr msg = {0};
    int fd = -1;
    *conn = NULL;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t got;
    do {
        got = recvmsg(u, &msg, MSG_CMSG_CLOEXEC);
    } while (got < 0 && errno == EINTR);
    if (got <= 0)
        return -1;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm))
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS)
            memcpy(&fd, CMSG_DATA(cm), sizeof fd);
    if ((size_t)got < HELLO_SIZE && read_exact(u, hello + got, HELLO_SIZE - (size_t)got) < 0)
        goto refuse;
    if (memcmp(hello, HELLO_MAGIC, 4) != 0)
        goto refuse;
    if (hello[4] == 'P' && fd < 0)
        return u;
    if (hello[4] != 'R' || fd < 0)
        goto refuse;
    size_t pending = record_len(hello + 8);
    conn_t *c = pending <= NET_CAP ? conn_new(hello + 12) : NULL;
    OPENSSL_cleanse(hello, sizeof hello);
    if (!c)
        goto refuse;
    if (pending && read_exact(u, c->net, pending) < 0) {
        conn_free(c);
        goto refuse;
    }
    c->net_have = pending;
    *conn = c;
    return fd;
refuse:
    OPENSSL_cleanse(hello, sizeof hello);
    if (fd >= 0)
        real_close(fd);
    return -1;
}

static void put(int fd, conn_t *c) { __atomic_store_n(&table[fd], c, __ATOMIC_RELEASE); }

/* ------------------------------------------------------------------ the interposed calls */

int connect(int fd, const struct sockaddr *addr, socklen_t alen) {
    resolve();
    int port = tunnel_port(addr, alen);
    if (!connect_dir[0] || !port)
        return real_connect(fd, addr, alen);
    if (fd < 0 || fd >= FD_LIMIT) {
        errno = EBADF;
        return -1;
    }
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    snprintf(un.sun_path, sizeof un.sun_path, "%s/%d", connect_dir, port);
    int u = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (u < 0)
        return -1;
    if (real_connect(u, (struct sockaddr *)&un, sizeof un) < 0) {
        real_close(u); /* that tunnel is gone: refused, never a TCP connection */
        errno = ECONNREFUSED;
        return -1;
    }
    conn_t *c;
    int got = take_handover(u, &c);
    if (got < 0) {
        real_close(u);
        errno = ECONNREFUSED; /* the tunnel could not open: as a refused connection */
        return -1;
    }
    int placed = dup2(got, fd);
    if (got != u)
        real_close(got);
    if (c && placed >= 0)
        c->keep = u;
    else
        real_close(u);
    if (placed < 0) {
        if (c)
            conn_free(c);
        return -1;
    }
    if (c)
        put(fd, c);
    return 0;
}

/* ggml-rpc's server socket on 127.82.80.67:PORT: not bound, so that no TCP client reaches
 * it; remembered, so that its accept() takes the Unix listener's connections instead. */
int bind(int fd, const struct sockaddr *addr, socklen_t alen) {
    resolve();
    int port = tunnel_port(addr, alen);
    if (!port || port != listen_port)
        return real_bind(fd, addr, alen);
    if (listen_fd < 0) {
        errno = EADDRNOTAVAIL; /* the Unix listener failed (see the log): do not serve */
        return -1;
    }
    worker_fd = fd;
    return 0;
}

int listen(int fd, int backlog) {
    resolve();
    return fd >= 0 && fd == worker_fd ? 0 : real_listen(fd, backlog);
}

/* accept() or accept4() on the worker's socket: the next good connection on the Unix
 * listener, a hand-over (its connection, with the record layer) or a plain client (mode
 * 'P': the Unix connection itself). Blocking and close-on-exec, whatever the flags. */
static int accept_unix(struct sockaddr *addr, socklen_t *alen, int flags) {
    for (;;) {
        int u = real_accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (u < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return -1;
        }
        conn_t *c;
        int got = take_handover(u, &c);
        if (got < 0 || got >= FD_LIMIT || (got != u && !c)) {
            if (c)
                conn_free(c);
            if (got >= 0 && got != u)
                real_close(got);
            real_close(u);
            continue; /* a bad hand-over ends that one, not the server */
        }
        if (c) {
            c->keep = u;
            put(got, c);
        }
        /* close-on-exec whatever ggml-rpc asked: nothing this process starts gets a tunnel
         * connection (SOCK_NONBLOCK is not applied either: records are read whole) */
        (void)flags;
        if (addr && alen) {
            struct sockaddr_in from = {.sin_family = AF_INET};
            from.sin_addr.s_addr = htonl(TUNNEL_ADDR);
            socklen_t n = *alen < (socklen_t)sizeof from ? *alen : (socklen_t)sizeof from;
            memcpy(addr, &from, n);
            *alen = sizeof from;
        }
        return got;
    }
}

/* ggml-rpc turns TCP_NODELAY on for each connection and gives up on one where it fails: a
 * plain client is a Unix connection, where the option does not exist (nor is needed). */
int setsockopt(int fd, int level, int name, const void *value, socklen_t len) {
    resolve();
    if (level == IPPROTO_TCP && name == TCP_NODELAY) {
        struct sockaddr_storage a;
        socklen_t n = sizeof a;
        if (getsockname(fd, (struct sockaddr *)&a, &n) == 0 && a.ss_family == AF_UNIX)
            return 0;
    }
    return real_setsockopt(fd, level, name, value, len);
}

int accept(int fd, struct sockaddr *addr, socklen_t *alen) {
    resolve();
    if (fd < 0 || fd != worker_fd)
        return real_accept(fd, addr, alen);
    return accept_unix(addr, alen, 0);
}

int accept4(int fd, struct sockaddr *addr, socklen_t *alen, int flags) {
    resolve();
    if (fd < 0 || fd != worker_fd)
        return real_accept4(fd, addr, alen, flags);
    return accept_unix(addr, alen, flags);
}

ssize_t send(int fd, const void *buf, size_t len, int flags) {
    resolve();
    conn_t *c = lookup(fd);
    if (!c)
        return real_send(fd, buf, len, flags);
    const unsigned char *p = buf;
    size_t done = 0;
    int err = 0;
    pthread_mutex_lock(&c->tx_lock);
    if (c->broken)
        err = EPIPE;
    while (!err && done < len) {
        /* records as large as the format allows: smaller ones (64 KiB), so that the far end
         * opens one while this end seals the next, were slower on a GPU host (AES-GCM at
         * ~13 GB/s), a segment and a wake-up more per record (bench/handover.py) */
        size_t n = len - done < RECORD_MAX ? len - done : RECORD_MAX;
        if (!record_seal(c->tx, c->tx_iv, c->tx_seq++, p + done, n, c->out))
            err = EIO;
        else if (send_all_with(real_send, fd, c->out, HDR + n + TAG) < 0)
            err = errno;
        done += n;
    }
    if (err)
        c->broken = 1; /* a record may be half sent: nothing after it can be read */
    pthread_mutex_unlock(&c->tx_lock);
    if (err) {
        errno = err;
        return -1;
    }
    return (ssize_t)len;
}

/* Open the next record: straight into `buf` when the caller wants all of it (ggml-rpc asks
 * for a whole payload at once, so big messages are not copied twice), else into c->plain.
 * Returns the bytes now in `buf` (0 when they went to c->plain), or 0 with *end set at a
 * clean end, or -1 with errno. */
static ssize_t next_record(int fd, conn_t *c, void *buf, size_t len, int *end) {
    for (;;) {
        size_t have = c->net_have - c->net_at;
        const unsigned char *r = c->net + c->net_at;
        if (have >= HDR) {
            size_t n = record_len(r);
            if (n > RECORD_MAX) {
                errno = EBADMSG;
                return -1;
            }
            if (have >= HDR + n + TAG) {
                unsigned char *dst = len >= n ? buf : c->plain;
                if (!record_open(c->rx, c->rx_iv, c->rx_seq++, r, n, dst)) {
                    errno = EBADMSG;
                    return -1;
                }
                c->net_at += HDR + n + TAG;
                if (c->net_at == c->net_have)
                    c->net_at = c->net_have = 0;
                if (!n)
                    continue; /* an empty record: read on */
                if (dst == buf)
                    return (ssize_t)n;
                c->plain_at = 0;
                c->plain_len = n;
                return 0;
            }
        }
        if (c->net_at) { /* a partial record left: to the front, once per read */
            memmove(c->net, r, have);
            c->net_at = 0;
            c->net_have = have;
        }
        ssize_t got = real_recv(fd, c->net + c->net_have, NET_CAP - c->net_have, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return -1;
        if (got == 0) {
            if (have == 0) {
                *end = 1;
                return 0;
            }
            errno = ECONNRESET; /* the peer ended inside a record */
            return -1;
        }
        c->net_have += (size_t)got;
    }
}

ssize_t recv(int fd, void *buf, size_t len, int flags) {
    resolve();
    conn_t *c = lookup(fd);
    if (!c)
        return real_recv(fd, buf, len, flags);
    if (flags & ~(MSG_NOSIGNAL | MSG_WAITALL)) {
        errno = EOPNOTSUPP; /* ggml-rpc never peeks; nothing else reads these sockets */
        return -1;
    }
    if (len == 0)
        return 0;
    ssize_t out = 0;
    int err = 0, end = 0;
    pthread_mutex_lock(&c->rx_lock);
    if (c->broken) {
        out = -1;
        err = EBADMSG;
    } else if (c->plain_at == c->plain_len) {
        out = next_record(fd, c, buf, len, &end);
        if (out < 0) {
            err = errno;
            c->broken = 1;
        }
    }
    if (out == 0 && !end && c->plain_at < c->plain_len) {
        size_t n = c->plain_len - c->plain_at;
        if (n > len)
            n = len;
        memcpy(buf, c->plain + c->plain_at, n);
        c->plain_at += n;
        out = (ssize_t)n;
    }
    pthread_mutex_unlock(&c->rx_lock);
    if (out < 0)
        errno = err;
    return out;
}

int close(int fd) {
    resolve();
    if (fd >= 0 && fd == worker_fd)
        worker_fd = -1;
    conn_t *c = lookup(fd);
    if (c) {
        put(fd, NULL);
        shutdown(fd, SHUT_RDWR); /* the handing process may still hold a copy */
        conn_free(c);
    }
    return real_close(fd);
}

/* ------------------------------------------------------------------ set-up at load */

/* A fork (nothing ggml-rpc does, but a library could) copies the record keys: the child
 * forgets them, and its copies of the connections fail every send and recv, so it can
 * neither read the tunnel nor write plaintext into it. */
static void forget_keys_in_child(void) {
    for (int fd = 0; fd < FD_LIMIT; fd++) {
        conn_t *c = table[fd];
        if (!c)
            continue;
        c->broken = 1;
        EVP_CIPHER_CTX_reset(c->tx);
        EVP_CIPHER_CTX_reset(c->rx);
        OPENSSL_cleanse(c->tx_iv, IVLEN);
        OPENSSL_cleanse(c->rx_iv, IVLEN);
    }
}

static void take_env(const char *name, char *dst, size_t cap) {
    const char *v = getenv(name);
    if (v && dst && strlen(v) < cap)
        strcpy(dst, v);
    unsetenv(name);
}

__attribute__((constructor)) static void shim_init(void) {
    char listen_path[sizeof(((struct sockaddr_un *)0)->sun_path)] = "";
    char port[8] = "", was[4096] = "";
    resolve();
    take_env("CORRAL_RPCSHIM_CONNECT", connect_dir, sizeof connect_dir);
    take_env("CORRAL_RPCSHIM_LISTEN", listen_path, sizeof listen_path);
    take_env("CORRAL_RPCSHIM_PORT", port, sizeof port);
    take_env("CORRAL_RPCSHIM_PRELOAD_WAS", was, sizeof was);
    if (was[0])
        setenv("LD_PRELOAD", was, 1);
    else
        unsetenv("LD_PRELOAD");
    pthread_atfork(NULL, NULL, forget_keys_in_child);
    listen_port = atoi(port);
    if (!listen_path[0] || listen_port <= 0)
        return;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    strcpy(un.sun_path, listen_path);
    unlink(listen_path);
    if (s >= 0 && bind(s, (struct sockaddr *)&un, sizeof un) == 0 &&
        chmod(listen_path, 0600) == 0 && listen(s, 16) == 0) {
        listen_fd = s;
        return;
    }
    if (s >= 0)
        real_close(s);
    fprintf(stderr, "corral rpcshim: cannot listen on %s (%s); the RPC worker does not start\n",
            listen_path, strerror(errno));
}
