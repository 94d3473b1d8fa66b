/* Declarations shared by the agent's source files (not a public API). */
#ifndef TALLY_AGENT_H
#define TALLY_AGENT_H

#include <stddef.h>
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
    const char *symbol;    /* the kernel's mangled name (CUPTI symbolName), or NULL; valid in the callback only */
};

/* sched.c: priority scheduling through the scoreboard (TALLY_PRIORITY set). */
void tally_sched_init(void);
int tally_sched_enabled(void);
void tally_sched_launch_enter(const struct tally_launch *launch);
void tally_sched_launch_exit(const struct tally_launch *launch, CUresult result);
void tally_sched_exit(void);
void tally_sched_after_fork(void);

/* profiles.c: per-program kernel duration profiles, the file named by
 * TALLY_PROFILE_FILE (format: docs/scheduling.md, "Profile files"). */
#define TALLY_PROFILES_VERSION 1
#define TALLY_PROFILES_MAX_KERNELS 4096 /* lines in a file */
#define TALLY_PROFILES_MAX_NAME 4095    /* bytes of a mangled name */

struct tally_profile_entry {
    uint64_t name_hash;    /* tally_fnv1a64 of the mangled name */
    uint64_t grid_threads;
    uint64_t est_ns;
    uint64_t samples;      /* 0: none */
    const char *name;
};

/* A CUfunction's name, copied and hashed the first time it is seen. */
struct tally_kernel_name {
    uintptr_t kernel;
    uint64_t hash;
    const char *name;      /* NULL: no persistable name */
};

TALLY_EXPORT uint64_t tally_fnv1a64(const char *s, size_t n);
/* Reads TALLY_PROFILE_FILE (once; a bad file: one warning, ignored). 0 when unset. */
int tally_profiles_load(void);
/* The name of kernel (symbol: its launch's symbolName), or NULL without one. */
const struct tally_kernel_name *tally_profiles_name(uintptr_t kernel, const char *symbol);
/* The loaded file's estimate for a kernel; 0 when it has none. */
int tally_profiles_seed(uint64_t name_hash, uint64_t grid_threads, uint64_t *est_ns, uint64_t *samples);
/* Merges what this run learned (samples: learned in this run) into the file, atomically. */
void tally_profiles_save(const struct tally_profile_entry *learned, size_t n);

/* modules.c: copies of the code images the program loads, in TALLY_MODULE_DIR
 * (format: the comment at the top of modules.c). */
/* Reads TALLY_MODULE_DIR; 1 when images are to be saved. */
int tally_modules_init(void);
/* Whether a driver entry point (by CUPTI callback name) loads an image from memory. */
int tally_modules_is_load(const char *name);
/* At the API exit of such a load: saves its image if the load succeeded. */
void tally_modules_loaded(const void *params, CUresult result);

#endif
