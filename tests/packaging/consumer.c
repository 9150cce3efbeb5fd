/*
 * An application built against an *installed* libstek, as a user builds one:
 * only <stek/stek.h>, with the flags from pkg-config (stek.pc) or from
 * find_package(stek) (tests/integration/test_packaging.sh builds it both
 * ways). It calls into the shared library and OpenSSL, and prints one line
 * the script checks.
 */
#include <stdio.h>

#include <stek/stek.h>

int main(void)
{
    stek_options *o = NULL;
    stek_client *c = NULL;
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL || stek_options_new(&o) != STEK_RESULT_OK) {
        fprintf(stderr, "consumer: SSL_CTX_new or stek_options_new failed\n");
        SSL_CTX_free(ctx);
        return 1;
    }
    stek_result add = stek_options_add_server(o, "127.0.0.1:1");
    /* No CA, certificate, service key or group: the library refuses. */
    stek_result made = stek_client_new(o, &c);
    stek_result attach = stek_client_attach(NULL, ctx);
    printf("consumer: add_server=%s client_new=%s attach(NULL)=%s\n", stek_result_name(add),
           stek_result_name(made), stek_result_name(attach));
    stek_client_free(c);
    stek_options_free(o);
    SSL_CTX_free(ctx);
    return 0;
}
