/*
 * SSL_MODE_RELEASE_BUFFERS on gRPC's TLS connections.
 *
 * Without that mode OpenSSL keeps a read and a write record buffer of about
 * 17 KiB each for the whole life of a connection. With it, it frees them
 * whenever they are empty, which on a stekd connection is nearly all the time
 * (a watch stream carries a set of about 1 KiB per epoch and a heartbeat per
 * interval). Measured with heaptrack under bench_load: 33 KiB per connection,
 * 64 MiB of heap for 2,000 watchers; 16 MiB less peak RSS with the mode.
 *
 * gRPC (1.51, as Debian packages it) creates its SSL_CTX itself and offers no
 * way to set a mode on it, so stekd defines SSL_CTX_new: the executable comes
 * first in the dynamic linker's lookup, so libgrpc's call lands here, and this
 * calls OpenSSL's and sets the mode. stekd creates no SSL_CTX of its own.
 * A gRPC that does not reach OpenSSL through the dynamic linker (a static or
 * BoringSSL build) simply never calls this; stekd logs a warning at start
 * then, and the buffers are kept as before.
 */
#include "tls_buffers.h"

#include <dlfcn.h>
#include <stdatomic.h>
#include <string.h>

#include <openssl/ssl.h>

#include "log.h"

typedef SSL_CTX *ssl_ctx_new_fn(const SSL_METHOD *);

static atomic_bool applied;

SSL_CTX *SSL_CTX_new(const SSL_METHOD *meth)
{
    static _Atomic(ssl_ctx_new_fn *) next;
    ssl_ctx_new_fn *f = atomic_load(&next);
    if (f == NULL) {
        void *sym = dlsym(RTLD_NEXT, "SSL_CTX_new");
        if (sym == NULL) {
            /* No TLS at all rather than TLS without this: stekd fails to start. */
            stek_log(STEK_LOG_ERROR, "stekd", "cannot find OpenSSL's SSL_CTX_new: %s", dlerror());
            return NULL;
        }
        memcpy(&f, &sym, sizeof(f)); /* ISO C has no void * to function pointer cast */
        atomic_store(&next, f);
    }
    SSL_CTX *ctx = f(meth);
    if (ctx != NULL) {
        SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
        atomic_store(&applied, true);
    }
    return ctx;
}

bool stekd_tls_buffers_released(void)
{
    return atomic_load(&applied);
}
