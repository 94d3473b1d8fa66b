/* tally agent: loaded into every CUDA process by the driver through
 * CUDA_INJECTION64_PATH (see DESIGN.md, facts 2 and 3: CUPTI callbacks see every
 * launch on CUDA 13, symbol interposition does not).
 *
 * What it does:
 *   - subscribes to every kernel- and graph-launch callback the driver offers,
 *     found by name at run time so new launch entry points are covered;
 *   - counts launches per entry point (written to TALLY_STATS_DIR at exit);
 *   - with TALLY_TRACE_DIR set, records every kernel execution through the
 *     CUPTI Activity API as JSON lines (one file per process).
 *   - with TALLY_MODULE_DIR set, saves the code images the program loads
 *     (modules.c), for kernel transformation later.
 *
 * Rule one: never break the user's program. Every failure (no libcupti, a
 * profiler already subscribed, an unwritable trace dir) prints one warning
 * line and leaves the program running unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "cuda_decls.h"

#define EXPORT TALLY_EXPORT
#define MAX_CBID 4096          /* driver callback ids are < 1000 in CUDA 13 */
#define TRACE_BUFFER_BYTES (8u << 20)
/* Kernel times alone come in small buffers: CUPTI hands a buffer over when it
 * is full, and the estimates should learn within tens of milliseconds. */
#define TIMES_BUFFER_BYTES (256u << 10)
#define PATH_BYTES 4096

enum launch_kind { LAUNCH_NONE = 0, LAUNCH_KERNEL = 1, LAUNCH_GRAPH = 2 };

/* How an entry point's parameter block is laid out (generated_cuda_meta.h). */
enum param_layout {
    PARAMS_UNKNOWN = 0,     /* e.g. cuLaunchCooperativeKernelMultiDevice: not tracked */
    PARAMS_KERNEL,          /* cuLaunchKernel, cuLaunchCooperativeKernel (+ _ptsz) */
    PARAMS_KERNEL_EX,       /* cuLaunchKernelEx (+ _ptsz) */
    PARAMS_GRAPH,           /* cuGraphLaunch (+ _ptsz) */
    PARAMS_GRID_ASYNC,      /* cuLaunchGridAsync(f, w, h, stream) */
    PARAMS_LEGACY_SYNC,     /* cuLaunch(f), cuLaunchGrid(f, w, h): legacy default stream */
};

/* ---------------------------------------------------------------- logging */

static atomic_int warned;

static void vwarn_once(atomic_int *flag, const char *fmt, va_list ap) {
    if (atomic_exchange(flag, 1)) return;
    char line[1024];
    vsnprintf(line, sizeof line, fmt, ap);
    fprintf(stderr, "tally: warning: %s\n", line);
}

/* One warning per process: the user needs to know tally is off, once. */
void tally_warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vwarn_once(&warned, fmt, ap);
    va_end(ap);
}

void tally_warn_once(atomic_int *flag, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vwarn_once(flag, fmt, ap);
    va_end(ap);
}

#define warn_failopen(fmt, ...) tally_warn(fmt "; the program runs without tally", ##__VA_ARGS__)
#define warn_no_trace(fmt, ...) tally_warn(fmt "; no trace is recorded, launches are still counted", ##__VA_ARGS__)

static int env_flag(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

/* ------------------------------------------------------------------ CUPTI */

static struct {
    void *handle;
    char path[PATH_BYTES];
    CUptiResult (*subscribe)(CUpti_SubscriberHandle *, CUpti_CallbackFunc, void *);
    CUptiResult (*unsubscribe)(CUpti_SubscriberHandle);
    CUptiResult (*enable_callback)(uint32_t, CUpti_SubscriberHandle, CUpti_CallbackDomain,
                                   CUpti_CallbackId);
    CUptiResult (*get_callback_name)(CUpti_CallbackDomain, uint32_t, const char **);
    CUptiResult (*get_result_string)(CUptiResult, const char **);
    CUptiResult (*activity_enable)(CUpti_ActivityKind);
    CUptiResult (*activity_register_callbacks)(CUpti_BuffersCallbackRequestFunc,
                                               CUpti_BuffersCallbackCompleteFunc);
    CUptiResult (*activity_flush_all)(uint32_t);
    CUptiResult (*activity_get_next_record)(uint8_t *, size_t, void **);
    CUptiResult (*activity_get_num_dropped_records)(CUcontext, uint32_t, size_t *);
} cupti;

static const char *cupti_error(CUptiResult r) {
    const char *s = NULL;
    if (cupti.get_result_string && cupti.get_result_string(r, &s) == CUPTI_SUCCESS && s) return s;
    return "unknown CUPTI error";
}

static int try_dlopen_cupti(const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    if (!h) return 0;
    cupti.handle = h;
    /* dlinfo would give the resolved file; the name we asked for is enough to report. */
    snprintf(cupti.path, sizeof cupti.path, "%s", path);
    return 1;
}

/* Search order: TALLY_CUPTI_PATH (explicit, no fallback if it fails), the
 * candidate list the launcher computed (wheel dirs next to the program's
 * Python, toolkit dirs, LD_LIBRARY_PATH), then the dynamic loader's own
 * search and the usual toolkit locations for a manually set
 * CUDA_INJECTION64_PATH. */
static int load_cupti(char *why, size_t why_len) {
    const char *explicit_path = getenv("TALLY_CUPTI_PATH");
    if (explicit_path && *explicit_path) {
        if (try_dlopen_cupti(explicit_path)) goto resolve;
        snprintf(why, why_len, "TALLY_CUPTI_PATH=%s cannot be loaded (%s)", explicit_path, dlerror());
        return 0;
    }
    const char *search = getenv("TALLY_CUPTI_SEARCH");
    if (search && *search) {
        char *copy = strdup(search), *save = NULL;
        for (char *p = strtok_r(copy, ":", &save); p; p = strtok_r(NULL, ":", &save))
            if (try_dlopen_cupti(p)) break;
        free(copy);
        if (cupti.handle) goto resolve;
    }
    static const char *fallbacks[] = {
        "libcupti.so", "libcupti.so.13", "libcupti.so.12",
        "/usr/local/cuda/extras/CUPTI/lib64/libcupti.so",
        "/usr/local/cuda/targets/x86_64-linux/lib/libcupti.so",
        "/usr/local/cuda/lib64/libcupti.so",
    };
    for (size_t i = 0; i < sizeof fallbacks / sizeof fallbacks[0]; i++)
        if (try_dlopen_cupti(fallbacks[i])) goto resolve;
    snprintf(why, why_len, "libcupti not found (set TALLY_CUPTI_PATH, or see `tally doctor`)");
    return 0;

resolve:;
#define RESOLVE(field, symbol, required)                                              \
    do {                                                                               \
        *(void **)&cupti.field = dlsym(cupti.handle, symbol);                          \
        if (!cupti.field && (required)) {                                              \
            snprintf(why, why_len, "libcupti %s lacks %s", cupti.path, symbol); \
            return 0;                                                                  \
        }                                                                              \
    } while (0)
    RESOLVE(subscribe, "cuptiSubscribe", 1);
    RESOLVE(unsubscribe, "cuptiUnsubscribe", 1);
    RESOLVE(enable_callback, "cuptiEnableCallback", 1);
    RESOLVE(get_callback_name, "cuptiGetCallbackName", 1);
    RESOLVE(get_result_string, "cuptiGetResultString", 0);
    RESOLVE(activity_enable, "cuptiActivityEnable", 0);
    RESOLVE(activity_register_callbacks, "cuptiActivityRegisterCallbacks", 0);
    RESOLVE(activity_flush_all, "cuptiActivityFlushAll", 0);
    RESOLVE(activity_get_next_record, "cuptiActivityGetNextRecord", 0);
    RESOLVE(activity_get_num_dropped_records, "cuptiActivityGetNumDroppedRecords", 0);
#undef RESOLVE
    return 1;
}

/* ------------------------------------------------ launch entry points */

static uint8_t launch_kind_of[MAX_CBID];
static uint8_t param_layout_of[MAX_CBID];
static uint8_t per_thread_stream[MAX_CBID]; /* _ptsz: a NULL stream means the per-thread stream */
static const char *callback_name[MAX_CBID];
static _Atomic uint64_t launches_by_cbid[MAX_CBID];
enum module_event { MODULE_NONE = 0, MODULE_LOAD, MODULE_LOAD_FILE, LIBRARY_LOAD, MODULE_UNLOAD };
static uint8_t module_event_of[MAX_CBID]; /* see modules.c and blocksched.c */
static uint8_t rewrite_of[MAX_CBID];      /* TALLY_REWRITE_*: launches block-level scheduling may rewrite */
static int n_launch_callbacks;

/* Classify a driver entry point by name. Names are stable across CUDA
 * versions while ids are only appended, so matching names covers every launch
 * entry point of whatever CUDA version is running (cuLaunchKernel, _ptsz,
 * cuLaunchKernelEx, cuLaunchCooperativeKernel*, legacy cuLaunch/cuLaunchGrid*,
 * cuGraphLaunch*). cuLaunchHostFunc runs host code, not a kernel. */
static int classify_launch(const char *name) {
    if (!name) return LAUNCH_NONE;
    if (strncmp(name, "cuGraphLaunch", 13) == 0) return LAUNCH_GRAPH;
    if (strncmp(name, "cuLaunchHostFunc", 16) == 0) return LAUNCH_NONE;
    if (strncmp(name, "cuLaunch", 8) == 0) return LAUNCH_KERNEL;
    return LAUNCH_NONE;
}

static int classify_params(const char *name) {
    size_t n = strlen(name);
    char base[128];
    if (n >= sizeof base) return PARAMS_UNKNOWN;
    memcpy(base, name, n + 1);
    if (n > 5 && strcmp(base + n - 5, "_ptsz") == 0) base[n - 5] = 0;
    if (!strcmp(base, "cuLaunchKernel") || !strcmp(base, "cuLaunchCooperativeKernel")) return PARAMS_KERNEL;
    if (!strcmp(base, "cuLaunchKernelEx")) return PARAMS_KERNEL_EX;
    if (!strcmp(base, "cuGraphLaunch")) return PARAMS_GRAPH;
    if (!strcmp(base, "cuLaunchGridAsync")) return PARAMS_GRID_ASYNC;
    if (!strcmp(base, "cuLaunch") || !strcmp(base, "cuLaunchGrid")) return PARAMS_LEGACY_SYNC;
    return PARAMS_UNKNOWN;
}

typedef struct {
    CUfunction f;
    int grid_width, grid_height;
    CUstream hStream;
} grid_async_params;

static void decode_launch(CUpti_CallbackId cbid, const void *params, struct tally_launch *out) {
    memset(out, 0, sizeof *out);
    out->is_graph = launch_kind_of[cbid] == LAUNCH_GRAPH;
    if (!params) return;
    switch (param_layout_of[cbid]) {
    case PARAMS_KERNEL: {
        const tally_cuLaunchKernel_params *p = params;
        out->kernel = (uintptr_t)p->f;
        out->grid_threads = (uint64_t)p->gridDimX * p->gridDimY * p->gridDimZ * p->blockDimX * p->blockDimY *
                            p->blockDimZ;
        out->stream = p->hStream;
        out->trackable = 1;
        break;
    }
    case PARAMS_KERNEL_EX: {
        const tally_cuLaunchKernelEx_params *p = params;
        if (!p->config) return;
        const tally_CUlaunchConfig *c = p->config;
        out->kernel = (uintptr_t)p->f;
        out->grid_threads = (uint64_t)c->gridDimX * c->gridDimY * c->gridDimZ * c->blockDimX * c->blockDimY *
                            c->blockDimZ;
        out->stream = c->hStream;
        out->trackable = 1;
        break;
    }
    case PARAMS_GRAPH: {
        const tally_cuGraphLaunch_params *p = params;
        out->kernel = (uintptr_t)p->hGraphExec;
        out->stream = p->hStream;
        out->trackable = 1;
        break;
    }
    case PARAMS_GRID_ASYNC: {
        const grid_async_params *p = params;
        out->kernel = (uintptr_t)p->f;
        out->stream = p->hStream;
        out->trackable = 1;
        break;
    }
    case PARAMS_LEGACY_SYNC:
        out->kernel = (uintptr_t) * (CUfunction const *)params;
        out->stream = NULL;
        out->trackable = 1;
        break;
    default:
        return;
    }
    if (out->stream == NULL && per_thread_stream[cbid]) out->stream = (CUstream)0x2; /* CU_STREAM_PER_THREAD */
    out->rewrite = rewrite_of[cbid];
    out->params = out->rewrite ? (void *)params : NULL;
}

/* ------------------------------------------------------------ tracing */

static struct {
    int enabled;
    FILE *out;
    pthread_mutex_t lock;
    uint64_t kernels_written;
} trace = {.lock = PTHREAD_MUTEX_INITIALIZER};

int tally_spawn_detached(void *(*run)(void *)) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int ok = pthread_create(&t, &attr, run, NULL) == 0;
    pthread_attr_destroy(&attr);
    return ok;
}

void tally_json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static int forked_child;

/* GPU kernel times for the scheduler's estimates (tally_agent_start_kernel_times). */
static atomic_int kernel_times; /* enum kernel_times_state */
enum kernel_times_state { TIMES_OFF = 0, TIMES_STARTING, TIMES_ON, TIMES_UNAVAILABLE, TIMES_DISABLED };

static void on_buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    *size = trace.enabled ? TRACE_BUFFER_BYTES : TIMES_BUFFER_BYTES;
    *max_records = 0;
    if (posix_memalign((void **)buffer, 8, *size) != 0) {
        *buffer = NULL;
        *size = 0;
    }
}

static void on_buffer_completed(CUcontext ctx, uint32_t stream_id, uint8_t *buffer,
                                      size_t size, size_t valid) {
    (void)ctx;
    (void)stream_id;
    (void)size;
    void *record = NULL;
    int times = atomic_load(&kernel_times) == TIMES_ON;
    pthread_mutex_lock(&trace.lock);
    while ((trace.out || times) && cupti.activity_get_next_record(buffer, valid, &record) == CUPTI_SUCCESS) {
        const tally_ActivityHeader *h = record;
        if (h->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && h->kind != CUPTI_ACTIVITY_KIND_KERNEL)
            continue;
        const tally_ActivityKernelPrefix *k = record;
        if (times && k->end > k->start) tally_sched_kernel_ran(k->correlationId, k->end - k->start);
        if (!trace.out) continue;
        fputs("{\"type\":\"kernel\",\"name\":", trace.out);
        tally_json_string(trace.out, k->name);
        fprintf(trace.out,
                ",\"grid\":[%d,%d,%d],\"block\":[%d,%d,%d],\"static_smem\":%d,\"dynamic_smem\":%d,"
                "\"registers\":%u,\"device\":%u,\"context\":%u,\"stream\":%u,\"correlation\":%u,"
                "\"start_ns\":%llu,\"end_ns\":%llu}\n",
                k->gridX, k->gridY, k->gridZ, k->blockX, k->blockY, k->blockZ,
                k->staticSharedMemory, k->dynamicSharedMemory, (unsigned)k->registersPerThread,
                k->deviceId, k->contextId, k->streamId, k->correlationId,
                (unsigned long long)k->start, (unsigned long long)k->end);
        trace.kernels_written++;
    }
    pthread_mutex_unlock(&trace.lock);
    free(buffer);
}

static void trace_graph_launch(uint32_t correlation_id, const tally_cuGraphLaunch_params *p) {
    pthread_mutex_lock(&trace.lock);
    if (trace.out)
        fprintf(trace.out, "{\"type\":\"graph_launch\",\"correlation\":%u,\"graph_exec\":\"%p\",\"stream\":\"%p\"}\n",
                correlation_id, (void *)p->hGraphExec, (void *)p->hStream);
    pthread_mutex_unlock(&trace.lock);
}

static int activity_api_present(void) {
    return cupti.activity_enable && cupti.activity_register_callbacks && cupti.activity_get_next_record &&
           cupti.activity_flush_all;
}

/* Kernel records into on_buffer_completed, for the trace and for kernel times alike. */
static CUptiResult start_kernel_activity(void) {
    CUptiResult r = cupti.activity_register_callbacks(on_buffer_requested, on_buffer_completed);
    return r == CUPTI_SUCCESS ? cupti.activity_enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) : r;
}

static void start_trace(const char *dir) {
    char path[PATH_BYTES];
    snprintf(path, sizeof path, "%s/trace-%d.jsonl", dir, (int)getpid());
    FILE *f = fopen(path, "w");
    if (!f) {
        warn_no_trace("cannot write the trace file %s (%s)", path, strerror(errno));
        return;
    }
    if (!activity_api_present()) {
        fclose(f);
        remove(path); /* an empty trace would read as "no kernels ran" */
        warn_no_trace("libcupti %s lacks the Activity API", cupti.path);
        return;
    }
    CUptiResult r = start_kernel_activity();
    if (r != CUPTI_SUCCESS) {
        fclose(f);
        remove(path);
        warn_no_trace("CUPTI activity tracing could not start (%s)", cupti_error(r));
        return;
    }
    trace.out = f;
    trace.enabled = 1;
}

/* The Activity API's kernel records carry the GPU's own start and end of
 * every kernel. The scheduler learns its duration estimates from them
 * (tally_sched_kernel_ran) instead of from when its polls happen to see a
 * completion, which can be tens of microseconds late: estimates of short
 * kernels came out several times too long, and the turnaround budget then
 * admitted that much less real work. Started by the scheduler the first time
 * a best-effort launch is tracked (an HP client is present), so a program
 * with nobody to protect pays nothing; started from a thread of its own,
 * because that moment is inside a driver API callback. Without the Activity
 * API, or when it cannot start, estimates keep coming from the polls.
 * Off unless TALLY_KERNEL_TIMES=1: on an H200 each launch cost about 1 us more
 * with the Activity API running, and the pairs of issue 3 ran no better with
 * it (benchmarks/results/issue3-switches-2026-12-03d-h200). */
static void *enable_kernel_times(void *unused) {
    (void)unused;
    CUptiResult r = trace.enabled ? CUPTI_SUCCESS : start_kernel_activity(); /* a trace has them flowing */
    atomic_store(&kernel_times, r == CUPTI_SUCCESS ? TIMES_ON : TIMES_UNAVAILABLE);
    return NULL;
}

void tally_agent_start_kernel_times(void) {
    int expected = TIMES_OFF;
    if (!atomic_compare_exchange_strong(&kernel_times, &expected, TIMES_STARTING)) return;
    /* The Activity API has one set of buffer callbacks per process: a profiler injected
     * before tally (nsys, chained) has registered its own, which ours would replace. */
    const char *env = getenv("TALLY_KERNEL_TIMES"), *chained = getenv("TALLY_CHAINED_INJECTION");
    if (!env || strcmp(env, "1") != 0)
        atomic_store(&kernel_times, TIMES_DISABLED);
    else if ((chained && *chained) || !activity_api_present() || !tally_spawn_detached(enable_kernel_times))
        atomic_store(&kernel_times, TIMES_UNAVAILABLE);
}

int tally_agent_kernel_times_on(void) { return atomic_load(&kernel_times) == TIMES_ON; }

void tally_agent_flush_kernel_times(void) {
    if (atomic_load(&kernel_times) == TIMES_ON && !forked_child) cupti.activity_flush_all(1);
}

/* ----------------------------------------------------------- callback */

static CUpti_SubscriberHandle subscriber;
static atomic_int active;             /* 1 once subscribed; 0 when failed open */
static _Atomic uint64_t callbacks_seen; /* every callback, launch or not */

static void on_driver_api(void *userdata, CUpti_CallbackDomain domain, CUpti_CallbackId cbid,
                          const void *cbdata) {
    (void)userdata;
    if (domain != CUPTI_CB_DOMAIN_DRIVER_API || cbid >= MAX_CBID) return;
    /* The agent's own launches and loads (slices, slice modules) are not the program's. */
    if (tally_blocksched_internal()) return;
    const CUpti_CallbackData *d = cbdata;
    atomic_fetch_add_explicit(&callbacks_seen, 1, memory_order_relaxed);
    if (module_event_of[cbid]) {
        if (d->callbackSite != CUPTI_API_EXIT) return;
        CUresult r = d->functionReturnValue ? *(const CUresult *)d->functionReturnValue : CUDA_SUCCESS;
        if (module_event_of[cbid] == MODULE_LOAD_FILE) {
            tally_modules_loaded_file(d->functionParams, r);
        } else if (module_event_of[cbid] == MODULE_UNLOAD) {
            /* cuModuleUnload's only parameter is the module */
            if (r == CUDA_SUCCESS && d->functionParams) tally_blocksched_module_unloaded(*(CUmodule const *)d->functionParams);
        } else {
            tally_modules_loaded(d->functionParams, r, module_event_of[cbid] == LIBRARY_LOAD);
        }
        return;
    }
    int kind = launch_kind_of[cbid];
    if (kind == LAUNCH_NONE) return;
    struct tally_launch launch;
    if (d->callbackSite == CUPTI_API_ENTER) {
        atomic_fetch_add_explicit(&launches_by_cbid[cbid], 1, memory_order_relaxed);
        if (kind == LAUNCH_GRAPH && trace.enabled && d->functionParams)
            trace_graph_launch(d->correlationId, d->functionParams);
        if (tally_sched_enabled()) {
            decode_launch(cbid, d->functionParams, &launch);
            launch.context = d->context;
            launch.symbol = kind == LAUNCH_KERNEL ? d->symbolName : NULL;
            launch.correlation = d->correlationId;
            tally_sched_launch_enter(&launch);
        }
    } else if (d->callbackSite == CUPTI_API_EXIT && tally_sched_enabled() && tally_sched_exit_needed()) {
        decode_launch(cbid, d->functionParams, &launch);
        launch.context = d->context;
        CUresult result = d->functionReturnValue ? *(const CUresult *)d->functionReturnValue : CUDA_SUCCESS;
        tally_sched_launch_exit(&launch, result);
    }
}

/* ------------------------------------------------------ stats at exit */

static char stats_dir[PATH_BYTES];
static char failopen_reason[512];

static void write_stats(void) {
    if (!stats_dir[0]) return;
    uint64_t kernels = 0, graphs = 0;
    for (int i = 0; i < MAX_CBID; i++) {
        uint64_t n = atomic_load(&launches_by_cbid[i]);
        if (launch_kind_of[i] == LAUNCH_KERNEL) kernels += n;
        else if (launch_kind_of[i] == LAUNCH_GRAPH) graphs += n;
    }
    /* A forked child that never used CUDA inherited the parent's counters;
     * reporting them would double count. */
    if (forked_child && kernels == 0 && graphs == 0) return;
    char path[PATH_BYTES], tmp[PATH_BYTES + 8];
    snprintf(path, sizeof path, "%s/stats-%d.json", stats_dir, (int)getpid());
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "{\"pid\":%d,\"active\":%s,\"failopen_reason\":", (int)getpid(),
            atomic_load(&active) ? "true" : "false");
    tally_json_string(f, failopen_reason);
    fputs(",\"cupti\":", f);
    tally_json_string(f, cupti.path);
    fprintf(f, ",\"launch_callbacks\":%d,\"kernel_launches\":%llu,\"graph_launches\":%llu,"
               "\"callbacks\":%llu,\"trace_kernels\":%llu",
            n_launch_callbacks, (unsigned long long)kernels, (unsigned long long)graphs,
            (unsigned long long)atomic_load(&callbacks_seen),
            (unsigned long long)trace.kernels_written);
    size_t dropped = 0;
    if (trace.enabled && cupti.activity_get_num_dropped_records)
        cupti.activity_get_num_dropped_records(NULL, 0, &dropped);
    static const char *const times_state[] = {"off", "starting", "on", "unavailable", "disabled"};
    fprintf(f, ",\"trace_dropped\":%zu,\"kernel_times\":\"%s\",\"gpu_timed_samples\":%llu,\"gpu_gate_waits\":%llu,"
               "\"by_entry_point\":{",
            dropped, times_state[atomic_load(&kernel_times)], (unsigned long long)tally_sched_gpu_timed(),
            (unsigned long long)tally_sched_gpu_gate_waits());
    int first = 1;
    for (int i = 0; i < MAX_CBID; i++) {
        uint64_t n = atomic_load(&launches_by_cbid[i]);
        if (!n) continue;
        if (!first) fputc(',', f);
        first = 0;
        tally_json_string(f, callback_name[i]);
        fprintf(f, ":%llu", (unsigned long long)n);
    }
    fputc('}', f);
    tally_blocksched_write_stats(f);
    fputs("}\n", f);
    fclose(f);
    rename(tmp, path);
}

static void at_exit(void) {
    tally_sched_exit();
    if (trace.enabled && !forked_child) {
        cupti.activity_flush_all(1);
        pthread_mutex_lock(&trace.lock);
        if (trace.out) fclose(trace.out);
        trace.out = NULL;
        pthread_mutex_unlock(&trace.lock);
    }
    write_stats();
}

/* The trace lock is held across fork, and the trace file flushed first: a
 * child's exit() would otherwise write the parent's buffered lines again. */
static void before_fork(void) {
    pthread_mutex_lock(&trace.lock);
    if (trace.out) fflush(trace.out);
}

static void after_fork_in_parent(void) { pthread_mutex_unlock(&trace.lock); }

static void after_fork_in_child(void) {
    /* CUDA cannot be used across fork; the child starts its own accounting
     * and does not inherit the parent's open trace file. */
    forked_child = 1;
    atomic_store(&kernel_times, TIMES_UNAVAILABLE); /* the parent's CUPTI activity is not the child's */
    tally_sched_after_fork();
    for (int i = 0; i < MAX_CBID; i++) atomic_store(&launches_by_cbid[i], 0);
    atomic_store(&callbacks_seen, 0);
    trace.out = NULL;
    trace.enabled = 0;
    trace.kernels_written = 0;
    pthread_mutex_unlock(&trace.lock);
}

/* ------------------------------------------------------------ startup */

/* A profiler that was injected before tally (its CUDA_INJECTION64_PATH was
 * moved to TALLY_CHAINED_INJECTION by the launcher) keeps working: it is
 * initialized first, and if it took the CUPTI subscriber, tally fails open. */
EXPORT int InitializeInjection(void);

static void run_chained_injection(void) {
    const char *path = getenv("TALLY_CHAINED_INJECTION");
    if (!path || !*path) return;
    void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    int (*init)(void) = h ? (int (*)(void))dlsym(h, "InitializeInjection") : NULL;
    /* The agent itself under another path (tally run inside tally run): calling
     * it would re-enter pthread_once and hang the program. */
    if (init == InitializeInjection) return;
    if (init) init();
    else fprintf(stderr, "tally: warning: chained injection %s could not be loaded\n", path);
}

/* Which module event a driver entry point is, when images are saved or a plan is in effect. */
static int module_event(const char *name, int save_modules, int plan) {
    if ((save_modules || plan) && tally_modules_is_load(name))
        return strncmp(name, "cuLibrary", 9) == 0 ? LIBRARY_LOAD : MODULE_LOAD;
    if ((save_modules || plan) && tally_modules_is_file_load(name)) return MODULE_LOAD_FILE;
    if (plan && strcmp(name, "cuModuleUnload") == 0) return MODULE_UNLOAD;
    return MODULE_NONE;
}

static void fail_open(const char *reason) {
    snprintf(failopen_reason, sizeof failopen_reason, "%s", reason);
    warn_failopen("%s", reason);
}

static void initialize(void) {
    const char *dir = getenv("TALLY_STATS_DIR");
    if (dir) snprintf(stats_dir, sizeof stats_dir, "%s", dir);
    atexit(at_exit);
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
    run_chained_injection();

    char why[1024] = "";
    if (!load_cupti(why, sizeof why)) {
        fail_open(why);
        return;
    }
    CUptiResult r = cupti.subscribe(&subscriber, (CUpti_CallbackFunc)on_driver_api, NULL);
    if (r == CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED || r == CUPTI_ERROR_MAX_LIMIT_REACHED) {
        fail_open("another CUPTI subscriber (a profiler?) already holds the callback API");
        return;
    }
    if (r != CUPTI_SUCCESS) {
        char reason[512];
        snprintf(reason, sizeof reason, "cuptiSubscribe failed (%s)", cupti_error(r));
        fail_open(reason);
        return;
    }
    int save_modules = tally_modules_init();
    int plan = tally_blocksched_init();
    /* Ids beyond the last one are rejected by cuptiGetCallbackName; gaps are
     * possible, so scan the whole range rather than stopping at the first. */
    for (uint32_t cbid = 1; cbid < MAX_CBID; cbid++) {
        const char *name = NULL;
        if (cupti.get_callback_name(CUPTI_CB_DOMAIN_DRIVER_API, cbid, &name) != CUPTI_SUCCESS || !name)
            continue;
        int event = module_event(name, save_modules, plan);
        if (event != MODULE_NONE) {
            if (cupti.enable_callback(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API, cbid) == CUPTI_SUCCESS)
                module_event_of[cbid] = (uint8_t)event;
            continue;
        }
        int kind = classify_launch(name);
        if (kind == LAUNCH_NONE) continue;
        if (cupti.enable_callback(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API, cbid) != CUPTI_SUCCESS)
            continue;
        callback_name[cbid] = name;
        launch_kind_of[cbid] = (uint8_t)kind;
        param_layout_of[cbid] = (uint8_t)classify_params(name);
        size_t len = strlen(name);
        per_thread_stream[cbid] = len > 5 && strcmp(name + len - 5, "_ptsz") == 0;
        /* Cooperative launches are never sliced: their blocks may wait on each other. */
        if (!strcmp(name, "cuLaunchKernel") || !strcmp(name, "cuLaunchKernel_ptsz")) rewrite_of[cbid] = TALLY_REWRITE_KERNEL;
        if (!strcmp(name, "cuLaunchKernelEx") || !strcmp(name, "cuLaunchKernelEx_ptsz"))
            rewrite_of[cbid] = TALLY_REWRITE_KERNEL_EX;
        n_launch_callbacks++;
    }
    if (n_launch_callbacks == 0) {
        cupti.unsubscribe(subscriber);
        fail_open("CUPTI offered no kernel-launch callbacks");
        return;
    }
    atomic_store(&active, 1);
    tally_sched_init();
    const char *trace_dir = getenv("TALLY_TRACE_DIR");
    if (trace_dir && *trace_dir) start_trace(trace_dir);
    if (env_flag("TALLY_VERBOSE"))
        fprintf(stderr, "tally: agent active in pid %d (%s, %d launch entry points)\n",
                (int)getpid(), cupti.path, n_launch_callbacks);
}

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

/* Called by the CUDA driver during cuInit when CUDA_INJECTION64_PATH names
 * this library. Returning 1 tells the driver injection succeeded; tally
 * always returns 1 because a failed tally must not fail the program. */
EXPORT int InitializeInjection(void) {
    pthread_once(&init_once, initialize);
    return 1;
}

/* Introspection for programs and tests that want to know what the agent saw
 * (tally.agent.counters() in Python): out[0] kernel launches, out[1] graph
 * launches, out[2] launch entry points subscribed. Returns 1 while the agent
 * is active, 0 when it failed open. */
EXPORT int tally_agent_counters(uint64_t out[3]) {
    uint64_t kernels = 0, graphs = 0;
    for (int i = 0; i < MAX_CBID; i++) {
        uint64_t n = atomic_load_explicit(&launches_by_cbid[i], memory_order_relaxed);
        if (launch_kind_of[i] == LAUNCH_KERNEL) kernels += n;
        else if (launch_kind_of[i] == LAUNCH_GRAPH) graphs += n;
    }
    out[0] = kernels;
    out[1] = graphs;
    out[2] = (uint64_t)n_launch_callbacks;
    return atomic_load(&active);
}
