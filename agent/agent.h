/* Declarations shared by the agent's source files (not a public API). */
#ifndef TALLY_AGENT_H
#define TALLY_AGENT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include "cuda_decls.h"

#define TALLY_EXPORT __attribute__((visibility("default")))

/* Runs run(NULL) on a detached thread of the agent's own; 0 when none could be started. */
int tally_spawn_detached(void *(*run)(void *));

/* s as a JSON string literal (quoted, escaped). */
void tally_json_string(FILE *f, const char *s);

/* One warning line per reason class per process, prefixed "tally: warning: ". */
void tally_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The same, for a part of the agent with its own one warning (*flag). */
void tally_warn_once(atomic_int *flag, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static inline uint64_t tally_clock_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t tally_now_ns(void) { return tally_clock_ns(CLOCK_MONOTONIC); }

/* The same clock at the kernel's tick (a few ms): never a system call. In a VM whose clock the vDSO
 * cannot read, CLOCK_MONOTONIC is one, and a launch path that needs no precise time should not pay it. */
static inline uint64_t tally_coarse_now_ns(void) { return tally_clock_ns(CLOCK_MONOTONIC_COARSE); }

/* A launch as the scheduler sees it, decoded from the callback's parameters. */
struct tally_launch {
    CUcontext context;     /* the launching context (one per GPU for PyTorch) */
    int is_graph;
    int trackable;         /* the stream is known, so completion can be tracked */
    CUstream stream;       /* with the per-thread default stream made explicit */
    uintptr_t kernel;      /* CUfunction or CUgraphExec: identifies the work */
    uint64_t grid_threads; /* grid blocks x block threads; 0 for graphs */
    const char *symbol;    /* the kernel's mangled name (CUPTI symbolName), or NULL; valid in the callback only */
    /* For block-level scheduling: the callback's parameter block, which the
     * driver reads only after API enter returns, so a launch can be rewritten
     * there; NULL for entry points that are never rewritten. */
    void *params;
    int rewrite;           /* TALLY_REWRITE_*: how params is laid out */
    uint32_t correlation;  /* the API call's CUPTI correlation id (its kernel's activity record has it); 0: none */
};

enum { TALLY_REWRITE_NONE = 0, TALLY_REWRITE_KERNEL = 1 /* cuLaunchKernel(_ptsz) */,
       TALLY_REWRITE_KERNEL_EX = 2 /* cuLaunchKernelEx(_ptsz) */ };

/* sched.c: priority scheduling through the scoreboard (TALLY_PRIORITY set). */
void tally_sched_init(void);
int tally_sched_enabled(void);
/* Whether this thread's last launch_enter left work for launch_exit (tracking, run-ahead, HP's
 * launching count); the common best-effort launch with nobody to protect leaves none. */
int tally_sched_exit_needed(void);
void tally_sched_launch_enter(const struct tally_launch *launch);
void tally_sched_launch_exit(const struct tally_launch *launch, CUresult result);
void tally_sched_exit(void);
void tally_sched_after_fork(void);
/* A kernel launched by the API call with this correlation id ran gpu_ns on the GPU (CUPTI activity). */
void tally_sched_kernel_ran(uint32_t correlation, uint64_t gpu_ns);
/* Estimate samples taken from GPU kernel times so far. */
uint64_t tally_sched_gpu_timed(void);
/* Stream waits the GPU-side gate (TALLY_GPU_GATE=1) put before BE launches. */
uint64_t tally_sched_gpu_gate_waits(void);

/* tally_agent.c: GPU kernel times from the CUPTI Activity API for the scheduler's estimates.
 * start: once, asynchronously (safe inside a callback); on: records are flowing; flush: hand
 * over what CUPTI holds (at exit, before the estimates are saved). */
void tally_agent_start_kernel_times(void);
int tally_agent_kernel_times_on(void);
void tally_agent_flush_kernel_times(void);

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
/* Whether it loads a module from a file (cuModuleLoad). */
int tally_modules_is_file_load(const char *name);
/* A regular file's bytes (malloc'd, *n of them) if it has min..max; else NULL with errno set. */
void *tally_read_file(const char *path, uint64_t min, uint64_t max, size_t *n);
/* At the API exit of a load from a file: the same, with the file's bytes. */
void tally_modules_loaded_file(const void *params, CUresult result);
/* At the API exit of such a load (is_library: cuLibraryLoadData*, whose
 * handle is a CUlibrary): saves its image if the load succeeded, and tells
 * block-level scheduling which image a module came from. */
void tally_modules_loaded(const void *params, CUresult result, int is_library);

/* blocksched.c: slices of best-effort kernels (TALLY_BLOCKSCHED_PLAN set). */
#define TALLY_BLOCKSCHED_MAX_PARAMS 1024

struct tally_blocksched_stats {
    uint64_t plan_kernels;
    _Atomic uint64_t sliced_launches, slices, unsliced_launches;
    /* estimated GPU time of BE launches admitted under the turnaround budget (HP present, not idle
     * past unthrottle_after) that ran sliced / whole */
    _Atomic uint64_t sliced_est_ns, unsliced_est_ns;
    _Atomic uint64_t not_in_plan, unusable;          /* lookups that found no usable slice kernel */
    _Atomic uint64_t gpu_gated_slices;               /* slices that waited on the GPU-side gate instead */
};

/* What a launch of a plan kernel runs instead, per slice. */
struct tally_slice_kernel {
    CUfunction slice;     /* <entry>__tally_slice */
    const char *slice_symbol; /* its name: slices' per-wave times persist in the profile file under it */
    uint32_t nparams;     /* the original's; the slice takes these and 4 u32 */
    uint64_t wave_blocks; /* blocks of this shape resident on the whole GPU at once */
    struct plan_kernel *kernel;
};

/* Reads TALLY_BLOCKSCHED_PLAN; 1 when a plan is in effect. */
int tally_blocksched_init(void);
int tally_blocksched_enabled(void);
/* TALLY_BLOCKSCHED_FLOOR (default 0.5): slices slower than this share of the whole kernel's speed are not used. */
double tally_blocksched_floor(void);
/* Nonzero inside a driver call the agent makes itself: callbacks ignore it. */
int tally_blocksched_internal(void);
void tally_blocksched_module_loaded(CUmodule module, const void *image, uint64_t n);
void tally_blocksched_module_unloaded(CUmodule module);
/* 1 and *out filled when f (launched with this block shape) has a usable slice kernel. */
int tally_blocksched_lookup(CUfunction f, const char *symbol, unsigned block_threads, unsigned smem,
                            struct tally_slice_kernel *out);
/* One launch of a plan kernel ran whole, for this reason (the stats file keeps the last one). */
void tally_blocksched_whole(struct tally_slice_kernel *sk, const char *reason);
/* One launch of a plan kernel ran as `slices` slices of `waves` waves each, sized from a wave
 * estimate of wave_ns (0: unknown) and the turnaround budget: the configuration `tally blocksched
 * show` reports with the reason for it. */
void tally_blocksched_sliced(struct tally_slice_kernel *sk, uint64_t slices, uint64_t waves, uint64_t wave_ns,
                             uint64_t budget_ns);
/* The kernel goes back to running whole for the rest of the process. */
void tally_blocksched_disable(struct tally_slice_kernel *sk, const char *why);
/* A slice launch of the agent's own (1-D grid of `blocks`), which the callbacks let through. */
CUresult tally_blocksched_launch(const struct tally_slice_kernel *sk, unsigned blocks, const unsigned block[3],
                                 unsigned smem, CUstream stream, void **args);
struct tally_blocksched_stats *tally_blocksched_stats(void);
/* Appends `,"blocksched":{...}` to the stats file's object when a plan is in effect. */
void tally_blocksched_write_stats(FILE *f);

#endif
