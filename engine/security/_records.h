/* The tunnel's record format, shared by the relay (_relay.c) and the in-process data path
 * (_rpcshim.c), so that either end of a tunnel may run either one.
 *
 * A record: 4-byte big-endian length n (n <= RECORD_MAX), n bytes of AES-256-GCM ciphertext,
 * a 16-byte tag. The length is the additional authenticated data; the nonce is the
 * direction's IV XOR the record's sequence number (big-endian, in the last 8 bytes), as
 * TLS 1.3 does. Each direction's sequence starts at 0 and a connection ends long before
 * 2^64 records, so no nonce repeats under one key. The keys come from tunnel.relay_keys.
 */
#ifndef CORRAL_RECORDS_H
#define CORRAL_RECORDS_H

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#define RECORD_MAX (256 * 1024)
#define HDR 4
#define TAG 16
#define KEY 32
#define IVLEN 12
#define RECORD_CAP (HDR + RECORD_MAX + TAG)
#define NET_CAP (2 * RECORD_CAP)

typedef ssize_t (*send_fn)(int, const void *, size_t, int);

static inline void record_nonce(const unsigned char iv[IVLEN], uint64_t seq,
                                unsigned char nonce[IVLEN]) {
    memcpy(nonce, iv, IVLEN);
    for (int i = 0; i < 8; i++)
        nonce[IVLEN - 1 - i] ^= (unsigned char)(seq >> (8 * i));
}

/* The announced length of the record at `r` (HDR bytes available). */
static inline size_t record_len(const unsigned char *r) {
    return ((size_t)r[0] << 24) | ((size_t)r[1] << 16) | ((size_t)r[2] << 8) | r[3];
}

/* Seal n <= RECORD_MAX bytes into `out` (HDR + n + TAG bytes). `ctx` holds the key. */
static inline int record_seal(EVP_CIPHER_CTX *ctx, const unsigned char iv[IVLEN], uint64_t seq,
                              const unsigned char *in, size_t n, unsigned char *out) {
    unsigned char nonce[IVLEN];
    int len = 0, fin = 0;
    out[0] = (unsigned char)(n >> 24);
    out[1] = (unsigned char)(n >> 16);
    out[2] = (unsigned char)(n >> 8);
    out[3] = (unsigned char)n;
    record_nonce(iv, seq, nonce);
    return EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) &&
           EVP_EncryptUpdate(ctx, NULL, &len, out, HDR) &&
           EVP_EncryptUpdate(ctx, out + HDR, &len, in, (int)n) &&
           EVP_EncryptFinal_ex(ctx, out + HDR + len, &fin) &&
           EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG, out + HDR + n);
}

/* Open the complete record at `r` (its length n already checked) into `out` (n bytes);
 * 0 when it fails authentication. GCM decrypts before the tag is checked: a record that
 * fails leaves `out` zeroed, so no unauthenticated byte reaches whoever owns that buffer
 * (ggml-rpc's own, in the shim). */
static inline int record_open(EVP_CIPHER_CTX *ctx, const unsigned char iv[IVLEN], uint64_t seq,
                              const unsigned char *r, size_t n, unsigned char *out) {
    unsigned char nonce[IVLEN];
    int len = 0, fin = 0;
    record_nonce(iv, seq, nonce);
    int ok = EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nonce) &&
             EVP_DecryptUpdate(ctx, NULL, &len, r, HDR) &&
             EVP_DecryptUpdate(ctx, out, &len, r + HDR, (int)n) &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG, (void *)(r + HDR + n)) &&
             EVP_DecryptFinal_ex(ctx, out + len, &fin) > 0;
    if (!ok)
        OPENSSL_cleanse(out, n);
    return ok;
}

/* All of buf, retrying short writes and EINTR; -1 with errno on error. */
static inline int send_all_with(send_fn fn, int fd, const unsigned char *buf, size_t len) {
    while (len) {
        ssize_t n = fn(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

#endif
