/* Declarations shared by the agent's source files (not a public API). */
#ifndef TALLY_AGENT_H
#define TALLY_AGENT_H

#include <stdint.h>
#include <time.h>

#include "cuda_decls.h"

#define TALLY_EXPORT __attribute__((visibility("default")))

/* One warning line per reason class per process, prefixed "tally: warning: ". */
void tally_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static inline uint64_t tally_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A launch as the scheduler sees it, decoded from the callback's parameters. */
struct tally_launch {
    CUcontext context;     /* the launching context (one per GPU for PyTorch) */
    int is_graph;
    int trackable;         /* the stream is known, so completion can be tracked */
    CUstream stream;       /* with the per-thread default stream made explicit */
    uintptr_t kernel;      /* CUfunction or CUgraphExec: identifies the work */
    uint64_t grid_threads; /* grid blocks x block threads; 0 for graphs */
};

/* sched.c: priority scheduling through the scoreboard (TALLY_PRIORITY set). */
void tally_sched_init(void);
int tally_sched_enabled(void);
void tally_sched_launch_enter(const struct tally_launch *launch);
void tally_sched_launch_exit(const struct tally_launch *launch, CUresult result);
void tally_sched_exit(void);
void tally_sched_after_fork(void);

#endif
