/*
 * ThreadSanitizer annotations for hand-offs through gRPC's completion
 * queue. gRPC core (and the Abseil mutexes under it) is not instrumented,
 * so TSan cannot see that a tag's memory written before a batch starts is
 * ordered before the thread that receives the tag's event reads it. A
 * release before starting a batch and an acquire on the received tag
 * state exactly that ordering. Without -fsanitize=thread they are nothing.
 */
#ifndef STEK_COMMON_TSAN_H
#define STEK_COMMON_TSAN_H

#if defined(__SANITIZE_THREAD__)
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define STEK_TSAN_RELEASE(p) __tsan_release((void *)(p))
#define STEK_TSAN_ACQUIRE(p) __tsan_acquire((void *)(p))
#else
#define STEK_TSAN_RELEASE(p) ((void)(p))
#define STEK_TSAN_ACQUIRE(p) ((void)(p))
#endif

#endif
