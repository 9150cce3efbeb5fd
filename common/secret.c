#include "secret.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <openssl/crypto.h>

struct stek_secret {
    uint8_t *data; /* page-aligned mapping; the struct itself holds no secret */
    size_t len;
    size_t map_len;
};

static size_t round_to_pages(size_t len)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (len + page - 1) / page * page;
}

stek_status stek_secret_new(size_t len, stek_secret **out)
{
    STEK_ENSURE_REF(out);
    *out = NULL;
    STEK_ENSURE(len > 0 && len <= STEK_SECRET_MAX_BYTES, STEK_ERR_INVALID_ARG);

    stek_secret *s = calloc(1, sizeof(*s));
    STEK_ENSURE(s != NULL, STEK_ERR_NOMEM);
    s->map_len = round_to_pages(len);
    s->data = mmap(NULL, s->map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s->data == MAP_FAILED) {
        free(s);
        STEK_BAIL(STEK_ERR_NOMEM, "mmap(%zu): %s", len, strerror(errno));
    }
    /* Lock first: a secret written to an unlocked page may reach swap. */
    if (mlock(s->data, s->map_len) != 0) {
        int e = errno;
        munmap(s->data, s->map_len);
        free(s);
        STEK_BAIL(STEK_ERR_NOMEM, "mlock(%zu): %s (raise RLIMIT_MEMLOCK)", len, strerror(e));
    }
    /* Best effort: kernels without MADV_DONTDUMP still lock the page. */
    (void)madvise(s->data, s->map_len, MADV_DONTDUMP);
    s->len = len;
    *out = s;
    return STEK_OK;
}

uint8_t *stek_secret_data(stek_secret *s)
{
    return s->data;
}

const uint8_t *stek_secret_cdata(const stek_secret *s)
{
    return s->data;
}

size_t stek_secret_len(const stek_secret *s)
{
    return s->len;
}

stek_status stek_secret_truncate(stek_secret *s, size_t len)
{
    STEK_ENSURE_REF(s);
    STEK_ENSURE(len <= s->len, STEK_ERR_INVALID_ARG);
    stek_cleanse(s->data + len, s->len - len);
    s->len = len;
    return STEK_OK;
}

void stek_secret_free(stek_secret *s)
{
    if (s == NULL)
        return;
    /* Cleanse the whole mapping, not just len: truncate may have left bytes. */
    stek_cleanse(s->data, s->map_len);
    munlock(s->data, s->map_len);
    munmap(s->data, s->map_len);
    free(s);
}

void stek_cleanse(void *p, size_t len)
{
    if (p != NULL && len > 0)
        OPENSSL_cleanse(p, len);
}

bool stek_ct_equal(const void *a, const void *b, size_t len)
{
    return CRYPTO_memcmp(a, b, len) == 0;
}

bool stek_ct_is_zero(const void *p, size_t len)
{
    const volatile uint8_t *b = p;
    uint8_t acc = 0;
    for (size_t i = 0; i < len; i++)
        acc |= b[i];
    return acc == 0;
}
