/* A pool of worker threads for our kernels: a parallel loop costs about a microsecond to start, not the 70-90 us
 * of a thread woken from sleep (OMP_WAIT_POLICY=PASSIVE), because a worker keeps polling for work for a short while
 * after its last task before it sleeps. Built as its own library and loaded once, so every kernel shares one pool. */
#ifndef SB_THREAD_POOL_H
#define SB_THREAD_POOL_H
#include <stdint.h>

/* a task runs items [begin, end) of a loop */
typedef void (*sb_task)(void *context, int64_t begin, int64_t end);

/* Runs task over items [0, items) split into `threads` contiguous parts, the caller taking the first; serially where
 * threads <= 1, items <= 1, or another caller holds the pool. Returns when every part is done. */
void sb_parallel_for(sb_task task, void *context, int64_t items, int threads);

/* sb_parallel_for for a long loop (a prefill's, milliseconds): the workers sleep right after it instead of polling for
 * the next call, which would take a core from whatever runs next (PyTorch's own threads sleep after their loops too). */
void sb_parallel_for_then_sleep(sb_task task, void *context, int64_t items, int threads);

#endif
