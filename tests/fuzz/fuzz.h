/*
 * What every fuzz harness of tests/fuzz provides and shares.
 *
 * A harness is one C file with LLVMFuzzerTestOneInput. It is linked twice:
 * with libFuzzer (`-fsanitize=fuzzer`, STEK_FUZZ=ON, `make fuzz`), and with
 * fuzz_replay.c, a cmocka program that feeds it every file of its committed
 * corpus under the normal gcc build (CTest label `fuzz`), so `make test` and
 * `make test-sanitize` replay the corpora without clang.
 *
 * A harness aborts (fuzz_fail) when an invariant of the code it drives
 * breaks, besides what the sanitizers catch; libFuzzer reports that as a
 * crash and the replay test fails. Harnesses never print key bytes.
 */
#ifndef STEK_FUZZ_H
#define STEK_FUZZ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>

/* The libFuzzer entry point; every harness defines it. Returns 0. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * Every harness also writes its seed corpus through emit (one call per
 * seed), so the seeds are made by the same code, with the same fixed keys,
 * that reads them: `fuzz_replay_<target> --write-seeds DIR`
 * (ci/fuzz.sh --seeds).
 */
typedef void (*fuzz_emit_fn)(const char *name, const uint8_t *data, size_t len);
void fuzz_seeds(fuzz_emit_fn emit);

/* Prints "fuzz: <what>" and aborts: a broken invariant is a finding. */
void fuzz_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* True when $STEK_FUZZ_VERBOSE is set: harnesses then say what each input got
 * (to check that a seed reaches what its name says). */
bool fuzz_verbose(void);

/* Parses a PEM key (private, or public when no private key is in it); fails hard. */
EVP_PKEY *fuzz_pem_key(const char *pem);

/*
 * A test-only key derived from label, the same in every run, so that seeds
 * signed or sealed in one run still verify in the next without a key file
 * in the repository: EC P-256 with the private scalar
 * SHA-256("stek-fuzz-key:" label), or Ed25519 with that seed. Nothing
 * outside tests/fuzz trusts these keys. Fails hard; EVP_PKEY_free.
 */
EVP_PKEY *fuzz_derived_key(const char *label, bool ed25519);

/*
 * The harnesses' host certificate, PEM (static storage): CN
 * stek-fuzz-host, URI spiffe://fleet/edge/fuzz, DNS fuzz.edge.example, EKU
 * clientAuth, self-signed with fuzz_derived_key("host", false). Made on
 * the first call.
 */
const char *fuzz_host_cert_pem(void);

/* k as PKCS#8 PEM (private) in a malloc'd string; fails hard. */
char *fuzz_private_pem(EVP_PKEY *k);

/*
 * A directory of this process, made on first use under $STEK_TEST_TMPDIR
 * (or /tmp) and removed at exit.
 */
const char *fuzz_tmpdir(void);

/* Writes len bytes to dir/name (mode 0600, replaced) and stores the path in
 * out (at least 512 bytes); fails hard. */
void fuzz_write_file(const char *name, const uint8_t *data, size_t len, char *out);

#endif
