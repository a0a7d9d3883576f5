/* The kernels' worker pool (thread_pool.h). Workers start on first use, up to the most threads a call asked for.
 * A call publishes its task, then gives each worker it needs a new call number in that worker's slot; a worker polls its
 * slot for POLL_NS after its last task (none after a sb_parallel_for_then_sleep loop), then sleeps on a condition
 * variable until a call signals it. Each part is
 * claimed before it runs, by its worker or by the caller: after its own part the caller runs every part no worker has
 * claimed yet, so a worker that is asleep or off its core (a busy machine) delays nobody, and one that comes late finds
 * its part taken. A loop never has more parts than this process may use CPUs: polling workers beyond them would take
 * the cores the work needs. One call at a time: a second caller (another thread) runs its loop serially instead of
 * waiting.
 * After fork() the child starts with no workers. */
#define _GNU_SOURCE
#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#define MAX_WORKERS 63
/* How long a worker polls after its last task before it sleeps: longer than the gaps between a decode step's kernel
 * calls (tens of microseconds) and between steps (about a millisecond), short enough to leave an idle core alone. */
#define POLL_NS 3000000L

static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;  /* held by the caller running a parallel loop */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static atomic_long calls;                /* numbers the calls */
static atomic_long slots[MAX_WORKERS + 1]; /* slots[part]: the last call that gave this worker a part */
static long first_seen[MAX_WORKERS + 1];   /* a new worker's slot as its creator found it: calls after that are for it */
static atomic_int sleepers;
static atomic_long owners[MAX_WORKERS + 1];   /* owners[part]: the last call whose part was claimed */
static atomic_long finished[MAX_WORKERS + 1]; /* finished[part]: the last call whose part a worker finished */
static int workers;
static int fork_handler_set;

/* the published loop: read by a worker after its slot changes */
static sb_task job_task;
static void *job_context;
static int64_t job_items;
static int job_parts;
static long job_poll_ns; /* how long a worker polls after this loop's part */

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void run_part(int part) {
    int64_t begin = job_items * part / job_parts, end = job_items * (part + 1) / job_parts;
    if (begin < end) job_task(job_context, begin, end);
}

/* Claims `part` of call `call` for whoever asks first; a claim for an older call fails. */
static int claim(int part, long call) {
    long owner = atomic_load(&owners[part]);
    while (owner < call)
        if (atomic_compare_exchange_weak(&owners[part], &owner, call)) return 1;
    return 0;
}

static void *worker_main(void *arg) {
    int part = (int)(intptr_t)arg;
    long seen = first_seen[part], poll = POLL_NS;
    for (;;) {
        long started = now_ns(), current;
        while ((current = atomic_load(&slots[part])) == seen && now_ns() - started < poll) __builtin_ia32_pause();
        if (current == seen) {
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while ((current = atomic_load(&slots[part])) == seen) pthread_cond_wait(&wake, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = current;
        poll = job_poll_ns;
        if (claim(part, current)) {  /* the job is this call's: its caller waits for the part */
            run_part(part);
            atomic_store(&finished[part], current);
        }
    }
    return NULL;
}

static void forget_workers_after_fork(void) {
    /* only the forking thread lives on in the child: no workers, every lock free */
    workers = 0;
    pthread_mutex_init(&busy, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&wake, NULL);
    atomic_store(&sleepers, 0);
}

/* Starts workers until there are `wanted`; returns how many there are (fewer if a thread could not start). */
static int ensure_workers(int wanted) {
    if (!fork_handler_set) {
        pthread_atfork(NULL, NULL, forget_workers_after_fork);
        fork_handler_set = 1;
    }
    while (workers < wanted) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        first_seen[workers + 1] = atomic_load(&slots[workers + 1]);
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)(workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        workers++;
    }
    return workers;
}

/* CPUs this process may run on (at least 1) */
static int usable_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
    int count = CPU_COUNT(&set);
    return count > 0 ? count : 1;
}

static void parallel_for(sb_task task, void *context, int64_t items, int threads, long poll_ns) {
    static int cpus;
    if (cpus == 0) cpus = usable_cpus();
    if (threads > cpus) threads = cpus;
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    if (threads <= 1 || items <= 1 || pthread_mutex_trylock(&busy) != 0) {
        task(context, 0, items);
        return;
    }
    int parts = 1 + ensure_workers(threads - 1);
    if (parts > items) parts = (int)items;
    job_task = task, job_context = context, job_items = items, job_parts = parts, job_poll_ns = poll_ns;
    long call = atomic_fetch_add(&calls, 1) + 1;
    for (int part = 1; part < parts; part++) atomic_store(&slots[part], call); /* seq_cst: the job above is visible first */
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
    run_part(0);
    for (int part = 1; part < parts; part++) {
        if (claim(part, call))
            run_part(part);
        else
            while (atomic_load(&finished[part]) != call) __builtin_ia32_pause();
    }
    pthread_mutex_unlock(&busy);
}

void sb_parallel_for(sb_task task, void *context, int64_t items, int threads) {
    parallel_for(task, context, items, threads, POLL_NS);
}

void sb_parallel_for_then_sleep(sb_task task, void *context, int64_t items, int threads) {
    parallel_for(task, context, items, threads, 0);
}
