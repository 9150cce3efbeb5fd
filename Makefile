# Thin wrapper over CMake/CTest. The real build is CMakeLists.txt.
#
#   make test            install missing Debian packages (ci/packages.txt),
#                        configure with -Werror, build, run the whole suite
#   make test-sanitize   the same under ASan+UBSan, in its own build tree
#   make test-tsan       the client's threaded tests (CTest label tsan) under
#                        ThreadSanitizer, in its own build tree
#   make fuzz            every libFuzzer target (tests/fuzz) for FUZZ_SECONDS each
#   make build           configure and build only
#   make clean           remove both build trees
#   make format          clang-format every tracked .c/.h file
#
#   make demo            install missing packages, build, and show stek working:
#                        stekd on a throwaway SoftHSM token, two TLS servers on
#                        libstek, openssl s_client resuming across them (ci/demo.sh)
#
# Overridable: BUILD_DIR, SANITIZE_BUILD_DIR, JOBS, CTEST_JOBS, CMAKE_ARGS,
# CTEST_ARGS (e.g. CTEST_ARGS='-L unit'), SKIP_DEPS=1 (skip the package step).

BUILD_DIR          ?= build
SANITIZE_BUILD_DIR ?= build-asan
TSAN_BUILD_DIR     ?= build-tsan
# What the tsan-labelled tests need; the rest of the tree is not built there.
TSAN_TARGETS       ?= stekd stek_p11shim test_keyring test_libstek test_libstek_threads \
                      test_libstek_vhosts
JOBS               ?= $(shell nproc 2>/dev/null || echo 2)
CTEST_JOBS         ?= 2
CMAKE_ARGS         ?=
CTEST_ARGS         ?=
SKIP_DEPS          ?=

DEPS  := ci/install-deps.sh
comma := ,

.DEFAULT_GOAL := test
.PHONY: test test-sanitize test-tsan build clean format deps demo

# configure-and-build(dir, extra cmake args)
define configure-and-build
	cmake -S . -B $(1) -DSTEK_WERROR=ON $(2) $(CMAKE_ARGS)
	cmake --build $(1) -j$(JOBS)
endef

# run-ctest(dir[, extra ctest args]): ctest prints per-test times and a total; this adds wall time.
define run-ctest
	cd $(1) && t0=$$(date +%s) && rc=0 && \
	  { ctest --output-on-failure -j$(CTEST_JOBS) $(CTEST_ARGS) $(2) || rc=$$?; } && \
	  echo "== ctest in $(1): $$(( $$(date +%s) - t0 ))s, exit $$rc" && exit $$rc
endef

deps:
ifeq ($(SKIP_DEPS),)
	$(DEPS) --check || $(DEPS)
endif

build: deps
	$(call configure-and-build,$(BUILD_DIR),-DSTEK_SANITIZE=)

test: build
	$(call run-ctest,$(BUILD_DIR))

demo: build
	BUILD_DIR="$(abspath $(BUILD_DIR))" bash ci/demo.sh

test-sanitize: deps
	$(call configure-and-build,$(SANITIZE_BUILD_DIR),-DSTEK_SANITIZE=address$(comma)undefined)
	$(call run-ctest,$(SANITIZE_BUILD_DIR))

test-tsan: deps
	cmake -S . -B $(TSAN_BUILD_DIR) -DSTEK_WERROR=ON -DSTEK_SANITIZE=thread $(CMAKE_ARGS)
	cmake --build $(TSAN_BUILD_DIR) -j$(JOBS) --target $(TSAN_TARGETS)
	$(call run-ctest,$(TSAN_BUILD_DIR),-L tsan)

clean:
	rm -rf $(BUILD_DIR) $(SANITIZE_BUILD_DIR) $(TSAN_BUILD_DIR) build-fuzz .demo

format:
	@command -v clang-format >/dev/null || { echo "clang-format not found (apt-get install clang-format)" >&2; exit 1; }
	git ls-files -z -- '*.c' '*.h' | xargs -0 -r clang-format -i

# make fuzz: every libFuzzer target of tests/fuzz for FUZZ_SECONDS each (clang,
# ASan+UBSan, in FUZZ_BUILD_DIR; ci/fuzz.sh prints execs, exec/s and crashes).
FUZZ_SECONDS   ?= 600
FUZZ_BUILD_DIR ?= build-fuzz
.PHONY: fuzz
fuzz: deps
	FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_BUILD_DIR=$(FUZZ_BUILD_DIR) JOBS=$(JOBS) bash ci/fuzz.sh
