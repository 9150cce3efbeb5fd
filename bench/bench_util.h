/*
 * What the benchmarks share: the stop flag their SIGINT/SIGTERM handler
 * sets, clocks, knobs from the environment, and a process's CPU time.
 */
#ifndef STEK_BENCH_UTIL_H
#define STEK_BENCH_UTIL_H

#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

/* Set once SIGINT or SIGTERM arrived (after bench_catch_signals). */
extern volatile sig_atomic_t bench_stop_requested;

/* Installs the handler that sets bench_stop_requested; ignores SIGPIPE. */
void bench_catch_signals(void);

/* CLOCK_MONOTONIC and CLOCK_REALTIME in nanoseconds. */
int64_t bench_mono_ns(void);
int64_t bench_real_ns(void);

/* The integer in environment variable `name`, clamped to [lo, hi]; dflt
 * when it is unset or empty. */
int bench_env_int(const char *name, int dflt, int lo, int hi);

/* CPU seconds (user + system) of a process, from /proc; -1 if unknown. */
double bench_proc_cpu_s(pid_t pid);

#endif
