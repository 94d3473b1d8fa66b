/* A CUDA "application" for the agent tests. Linked against the fake libcuda.
 *
 *   fake_app STEP...
 *
 * cuInit(0) runs first (which loads CUDA_INJECTION64_PATH), then each step:
 *   launch:ENTRY:N        N launches through one entry point, main thread
 *   launch:ENTRY:N:DUR_US[:STREAM]
 *                         the same, each kernel lasting DUR_US on the fake GPU,
 *                         on STREAM (s0..s3: streams this app created, s0 the one
 *                         plain launches use; null; legacy = 0x1; ptds = 0x2);
 *                         prints "fake_app: launch i=K call_ns=T0 ret_ns=T1"
 *                         (CLOCK_MONOTONIC around each call) and flushes;
 *                         STREAM may also be kI, one of the streams:N streams
 *   tlaunch:T:ENTRY:M:DUR_US:STREAM
 *                         T threads released together, M such launches each;
 *                         thread t's kernels last (t % 3 + 1) x DUR_US ("ptds":
 *                         each thread its own per-thread default stream)
 *   streams:N             create N more streams, named k0..k(N-1) (at most 64)
 *   tturns:T:ENTRY:M:DUR_US:STREAM
 *                         T threads take turns: thread t waits for thread
 *                         t - 1, makes M such launches, cuCtxSynchronize, and
 *                         stays alive until all T are done ("ptds": T
 *                         distinct per-thread default streams, used one by one)
 *   tstreams:T:M:DUR_US:S T threads released together, M launches each; thread
 *                         t's launch j is on stream k((t + j) mod S)
 *   trounds:T:R:P:DUR_US:S
 *                         T threads, R rounds: in round r, thread t launches P
 *                         times on each of k(2(rT + t) mod S) and
 *                         k(2(rT + t) + 1 mod S), alternating; then all wait
 *                         for cuCtxSynchronize (so at most 2T streams have work
 *                         in flight at any time)
 *   sleep:US              sleep
 *   capture:STREAM:on|off the fake driver reports STREAM as capturing (or not)
 *   sync                  cuCtxSynchronize (waits for the fake GPU)
 *   wait_file:PATH        print "fake_app: waiting=PATH", flush, and wait (60 s
 *                         at most) until PATH exists
 *   threads:T:M           T threads released together, M launches each;
 *                         thread t's launch j uses entry (t + j) % N_ENTRIES
 *   names                 one cuLaunchKernel per awkward kernel name
 *   fork:C:CODE           fork; the child makes C cuLaunchKernel calls and
 *                         exit(CODE)s; the parent waits for it
 *   report                print what the fake libcupti saw (enabled callbacks)
 *   load:API:FILE[:OPTS]  load FILE's bytes as a code image through API (data =
 *                         cuModuleLoadData, data_ex = cuModuleLoadDataEx, fatbin =
 *                         cuModuleLoadFatBinary, library = cuLibraryLoadData);
 *                         the bytes, plus a NUL unless OPTS has 'n', end right
 *                         before an inaccessible page, so reading past them
 *                         crashes; OPTS 'w': pass a fatbin wrapper
 *                         {0x466243B1, 1, &bytes, NULL} instead; prints
 *                         "fake_app: loadK=RESULT" (K counts loads from 0)
 *   tload:T:API:FILE[:OPTS]
 *                         T threads released together, each one such load
 *   module_stats          print the agent's tally_agent_module_stats
 *                         ("fake_app: modules_enabled/seen/written/present/failed")
 *   exit:CODE             exit(CODE) right away
 * Entries: kernel kernel_ptsz ex ex_ptsz coop coop_ptsz coop_multi legacy grid
 * grid_async graph graph_ptsz host host_ptsz.
 *
 * Output (stdout): "fake_app: key=value" lines, "fake_app: called NAME=N" per
 * entry point actually called, the fake GPU's counters ("fake_app: gpu_*=N",
 * "fake_app: writes_STREAM=N"), and "fake_app: done" at a normal end.
 *
 * Hermeticity: this program interposes dlopen. Any library whose name contains
 * "cupti" and that is not under $FAKE_APP_LIB_ROOT is reported missing, so a
 * CUDA toolkit installed on the test machine (libcupti in the loader cache or
 * /usr/local/cuda) is invisible to the agent: the tests see only the doubles.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fake_driver.h"

CUresult cuInit(unsigned int);
CUresult cuDriverGetVersion(int *);
CUresult cuModuleGetFunction(CUfunction *, CUmodule, const char *);
CUresult cuFuncSetBlockShape(CUfunction, int, int, int);
CUresult cuStreamCreate(CUstream *, unsigned int);
CUresult cuCtxSynchronize(void);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, CUstream, void **, void **);
CUresult cuLaunchKernel_ptsz(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, CUstream, void **, void **);
CUresult cuLaunchKernelEx(const CUlaunchConfig *, CUfunction, void **, void **);
CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *, CUfunction, void **, void **);
CUresult cuLaunchCooperativeKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                   unsigned, unsigned, CUstream, void **);
CUresult cuLaunchCooperativeKernel_ptsz(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                        unsigned, unsigned, CUstream, void **);
CUresult cuLaunchCooperativeKernelMultiDevice(CUDA_LAUNCH_PARAMS *, unsigned int, unsigned int);
CUresult cuLaunch(CUfunction);
CUresult cuLaunchGrid(CUfunction, int, int);
CUresult cuLaunchGridAsync(CUfunction, int, int, CUstream);
CUresult cuGraphLaunch(CUgraphExec, CUstream);
CUresult cuGraphLaunch_ptsz(CUgraphExec, CUstream);
CUresult cuLaunchHostFunc(CUstream, CUhostFn, void *);
CUresult cuLaunchHostFunc_ptsz(CUstream, CUhostFn, void *);
CUresult cuModuleLoadData(CUmodule *, const void *);
CUresult cuModuleUnload(CUmodule);
CUresult cuModuleLoad(CUmodule *, const char *);
CUresult cuFuncSetAttribute(CUfunction, int, int);
CUresult cuModuleLoadDataEx(CUmodule *, const void *, unsigned int, CUjit_option *, void **);
CUresult cuModuleLoadFatBinary(CUmodule *, const void *);
CUresult cuLibraryLoadData(CUlibrary *, const void *, CUjit_option *, void **, unsigned int, CUlibraryOption *,
                           void **, unsigned int);

/* ------------------------------------------------ dlopen interposer */

void *dlopen(const char *file, int mode) {
    static void *(*real)(const char *, int);
    if (!real) real = (void *(*)(const char *, int))dlsym(RTLD_NEXT, "dlopen");
    const char *root = getenv("FAKE_APP_LIB_ROOT");
    if (file && root && *root) {
        const char *base = strrchr(file, '/');
        base = base ? base + 1 : file;
        if (strstr(base, "cupti") && strncmp(file, root, strlen(root)) != 0)
            return real("/nonexistent/hidden-by-fake_app/libcupti.so", mode); /* sets dlerror */
    }
    return real(file, mode);
}

/* ------------------------------------------------------------ entries */

enum {
    E_KERNEL, E_KERNEL_PTSZ, E_EX, E_EX_PTSZ, E_COOP, E_COOP_PTSZ, E_COOP_MULTI, E_LEGACY, E_GRID,
    E_GRID_ASYNC, E_GRAPH, E_GRAPH_PTSZ, E_HOST, E_HOST_PTSZ, N_ENTRIES
};
static const char *entry_arg[N_ENTRIES] = {
    "kernel", "kernel_ptsz", "ex", "ex_ptsz", "coop", "coop_ptsz", "coop_multi", "legacy", "grid",
    "grid_async", "graph", "graph_ptsz", "host", "host_ptsz",
};
static const char *entry_api[N_ENTRIES] = {
    "cuLaunchKernel", "cuLaunchKernel_ptsz", "cuLaunchKernelEx", "cuLaunchKernelEx_ptsz",
    "cuLaunchCooperativeKernel", "cuLaunchCooperativeKernel_ptsz",
    "cuLaunchCooperativeKernelMultiDevice", "cuLaunch", "cuLaunchGrid", "cuLaunchGridAsync",
    "cuGraphLaunch", "cuGraphLaunch_ptsz", "cuLaunchHostFunc", "cuLaunchHostFunc_ptsz",
};

static CUfunction funcs[N_ENTRIES];
static CUfunction graph_nodes[2];
static CUgraphExec graph;
static CUstream stream;
static CUstream extra_streams[3];

static const char *stream_names[] = {"s0", "s1", "s2", "s3", "null", "legacy", "ptds"};
#define N_STREAM_NAMES 7
#define MAX_MANY_STREAMS 64
static CUstream many_streams[MAX_MANY_STREAMS]; /* streams:N, named k0..k(N-1) */
static int n_many_streams;

static CUstream stream_named(const char *name) {
    if (name[0] == 'k' && name[1]) {
        char *end = NULL;
        long k = strtol(name + 1, &end, 10);
        if (end && !*end && k >= 0 && k < n_many_streams) return many_streams[k];
    }
    if (!strcmp(name, "s0")) return stream;
    if (!strcmp(name, "s1")) return extra_streams[0];
    if (!strcmp(name, "s2")) return extra_streams[1];
    if (!strcmp(name, "s3")) return extra_streams[2];
    if (!strcmp(name, "null")) return NULL;
    if (!strcmp(name, "legacy")) return (CUstream)0x1;
    if (!strcmp(name, "ptds")) return (CUstream)0x2;
    fprintf(stderr, "fake_app: unknown stream %s\n", name);
    exit(98);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
static atomic_long called[N_ENTRIES];
static atomic_long host_func_runs;

static void check(CUresult r, const char *what) {
    if (r != CUDA_SUCCESS) {
        fprintf(stderr, "fake_app: %s failed with %d\n", what, r);
        exit(99);
    }
}

static void host_fn(void *arg) {
    (void)arg;
    atomic_fetch_add(&host_func_runs, 1);
}

/* on: the stream to use instead of the entry's usual one (s0, or NULL for _ptsz) */
static void launch_on(int e, unsigned salt, int override, CUstream on) {
    CUstream stream_ = override ? on : stream, null_ = override ? on : NULL;
#define stream stream_
#define NULL_STREAM null_
    CUfunction f = funcs[e];
    unsigned g = 1 + salt % 64, b = 32 * (1 + salt % 8), smem = 16 * (salt % 4);
    CUresult r = CUDA_SUCCESS;
    switch (e) {
    case E_KERNEL: r = cuLaunchKernel(f, g, 2, 1, b, 1, 1, smem, stream, NULL, NULL); break;
    case E_KERNEL_PTSZ: r = cuLaunchKernel_ptsz(f, g, 1, 3, b, 2, 1, smem, NULL_STREAM, NULL, NULL); break;
    case E_EX:
    case E_EX_PTSZ: {
        CUlaunchConfig cfg = {g, 1, 1, b, 1, 1, smem, stream, NULL, 0};
        r = e == E_EX ? cuLaunchKernelEx(&cfg, f, NULL, NULL) : cuLaunchKernelEx_ptsz(&cfg, f, NULL, NULL);
        break;
    }
    case E_COOP: r = cuLaunchCooperativeKernel(f, g, 1, 1, b, 1, 1, smem, stream, NULL); break;
    case E_COOP_PTSZ: r = cuLaunchCooperativeKernel_ptsz(f, g, 1, 1, b, 1, 1, smem, NULL_STREAM, NULL); break;
    case E_COOP_MULTI: {
        CUDA_LAUNCH_PARAMS l[2] = {{f, g, 1, 1, b, 1, 1, smem, stream, NULL},
                                   {f, g, 1, 1, b, 1, 1, smem, stream, NULL}};
        r = cuLaunchCooperativeKernelMultiDevice(l, 2, 0);
        break;
    }
    case E_LEGACY: r = cuLaunch(f); break;
    case E_GRID: r = cuLaunchGrid(f, (int)g, 2); break;
    case E_GRID_ASYNC: r = cuLaunchGridAsync(f, (int)g, 2, stream); break;
    case E_GRAPH: r = cuGraphLaunch(graph, stream); break;
    case E_GRAPH_PTSZ: r = cuGraphLaunch_ptsz(graph, NULL_STREAM); break;
    case E_HOST: r = cuLaunchHostFunc(stream, host_fn, NULL); break;
    case E_HOST_PTSZ: r = cuLaunchHostFunc_ptsz(NULL_STREAM, host_fn, NULL); break;
    }
#undef stream
#undef NULL_STREAM
    check(r, entry_api[e]);
    atomic_fetch_add_explicit(&called[e], 1, memory_order_relaxed);
}

static void launch(int e, unsigned salt) { launch_on(e, salt, 0, NULL); }

/* One timed launch: the fake GPU runs its kernel(s) for us microseconds. Always
 * the same launch configuration, so the agent sees one kernel it can learn. */
static atomic_long timed_launches;

static void launch_timed(int e, unsigned us, CUstream on) {
    fake_cuda_set_kernel_duration_us(us);
    uint64_t t0 = now_ns();
    launch_on(e, 0, 1, on);
    uint64_t t1 = now_ns();
    fake_cuda_set_kernel_duration_us(0);
    long k = atomic_fetch_add(&timed_launches, 1);
    printf("fake_app: launch i=%ld call_ns=%llu ret_ns=%llu\n", k, (unsigned long long)t0,
           (unsigned long long)t1);
    fflush(stdout);
}

static int entry_of(const char *arg) {
    for (int e = 0; e < N_ENTRIES; e++)
        if (strcmp(arg, entry_arg[e]) == 0) return e;
    fprintf(stderr, "fake_app: unknown entry %s\n", arg);
    exit(98);
}

/* ------------------------------------------------------------ threads */

static pthread_barrier_t start_together;
static long per_thread;

static void *thread_main(void *arg) {
    long t = (long)arg;
    pthread_barrier_wait(&start_together);
    for (long j = 0; j < per_thread; j++) launch((int)((t + j) % N_ENTRIES), (unsigned)(t * 7919 + j));
    return NULL;
}

static int timed_entry;
static unsigned timed_us;
static CUstream timed_stream;

static void *timed_thread_main(void *arg) {
    long t = (long)arg;
    pthread_barrier_wait(&start_together);
    /* thread t's kernels last (t % 3 + 1) x DUR_US: per-stream order is all that keeps completions in order */
    for (long j = 0; j < per_thread; j++)
        launch_timed(timed_entry, timed_us * (unsigned)(t % 3 + 1), timed_stream);
    return NULL;
}

static void run_threads_of(long n, long m, void *(*body)(void *)) {
    pthread_t *tids = calloc((size_t)n, sizeof *tids);
    per_thread = m;
    pthread_barrier_init(&start_together, NULL, (unsigned)n);
    for (long t = 0; t < n; t++)
        if (pthread_create(&tids[t], NULL, body, (void *)t) != 0) {
            fprintf(stderr, "fake_app: pthread_create failed\n");
            exit(97);
        }
    for (long t = 0; t < n; t++) pthread_join(tids[t], NULL);
    pthread_barrier_destroy(&start_together);
    free(tids);
}

static void run_threads(long n, long m) { run_threads_of(n, m, thread_main); }

/* tturns: one thread at a time, each kept alive until the last is done, so
 * that per-thread default streams (and thread-local addresses) are all distinct. */
static pthread_mutex_t turn_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t turn_cond = PTHREAD_COND_INITIALIZER;
static long turn;
static pthread_barrier_t finish_together;

static void *turn_thread_main(void *arg) {
    long t = (long)arg;
    pthread_barrier_wait(&start_together);
    pthread_mutex_lock(&turn_lock);
    while (turn != t) pthread_cond_wait(&turn_cond, &turn_lock);
    pthread_mutex_unlock(&turn_lock);
    for (long j = 0; j < per_thread; j++) launch_timed(timed_entry, timed_us, timed_stream);
    check(cuCtxSynchronize(), "cuCtxSynchronize");
    pthread_mutex_lock(&turn_lock);
    turn++;
    pthread_cond_broadcast(&turn_cond);
    pthread_mutex_unlock(&turn_lock);
    pthread_barrier_wait(&finish_together);
    return NULL;
}

/* trounds and tstreams: the streams used are k0..k(many_used - 1) */
static long many_used;

/* trounds */
static long round_threads, rounds;
static pthread_barrier_t round_end;

static void *rounds_thread_main(void *arg) {
    long t = (long)arg;
    pthread_barrier_wait(&start_together);
    for (long r = 0; r < rounds; r++) {
        long first = 2 * (r * round_threads + t);
        for (long p = 0; p < per_thread; p++)
            for (long w = 0; w < 2; w++) launch_timed(E_KERNEL, timed_us, many_streams[(first + w) % many_used]);
        pthread_barrier_wait(&round_end);
        if (t == 0) check(cuCtxSynchronize(), "cuCtxSynchronize");
        pthread_barrier_wait(&round_end);
    }
    return NULL;
}

/* tstreams: thread t's launch j goes to k((t + j) mod many_used) */
static void *streams_thread_main(void *arg) {
    long t = (long)arg;
    pthread_barrier_wait(&start_together);
    for (long j = 0; j < per_thread; j++)
        launch_timed(E_KERNEL, timed_us, many_streams[(t + j) % many_used]);
    return NULL;
}

/* ------------------------------------------------------------- names */

static const char *awkward_names[] = {
    "plain_kernel",
    "_Z6gemm_fPKfS0_Pfiii",
    "quote\"in\"name",
    "back\\slash\\",
    "ctrl\x01\x1f" "chars",
    "tab\tnew\nline",
    "utf8_\xc3\xa9t\xc3\xa9_\xe2\x9c\x93",
    "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::fill<float>>(int, at::detail::Array<char*, 1>)",
};

static void launch_names(void) {
    for (size_t i = 0; i < sizeof awkward_names / sizeof awkward_names[0]; i++) {
        CUfunction f;
        check(cuModuleGetFunction(&f, NULL, awkward_names[i]), "cuModuleGetFunction");
        check(cuLaunchKernel(f, 3, 2, 1, 64, 2, 1, 128, stream, NULL, NULL), "cuLaunchKernel");
        atomic_fetch_add(&called[E_KERNEL], 1);
        printf("fake_app: name_hex=");
        for (const unsigned char *p = (const unsigned char *)awkward_names[i]; *p; p++) printf("%02x", *p);
        printf("\n");
    }
}

/* ------------------------------------------------------------ report */

static void report(void) {
    int (*enabled)(uint32_t *, int) = (int (*)(uint32_t *, int))dlsym(RTLD_DEFAULT, "fake_cupti_enabled_cbids");
    int (*has_sub)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "fake_cupti_has_subscriber");
    printf("fake_app: cupti_loaded=%d\n", enabled != NULL);
    if (!enabled) return;
    printf("fake_app: subscriber=%d\n", has_sub ? has_sub() : -1);
    uint32_t ids[1024];
    int n = enabled(ids, 1024);
    printf("fake_app: enabled_count=%d\nfake_app: enabled=", n);
    for (int i = 0; i < n && i < 1024; i++) printf(i ? ",%u" : "%u", ids[i]);
    printf("\n");
}

/* ------------------------------------------------------------ modules */

/* FILE's bytes (and a NUL unless exact) placed so that they end right before
 * a PROT_NONE page: an agent reading past the image crashes the test. */
static const void *guarded_copy(const char *path, int exact) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "fake_app: cannot open %s\n", path);
        exit(94);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    size_t total = (size_t)n + (exact ? 0 : 1);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t pages = (total + page - 1) / page + 1;
    char *base = mmap(NULL, pages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(base + (pages - 1) * page, page, PROT_NONE) != 0) exit(93);
    char *bytes = base + (pages - 1) * page - total;
    if (n && fread(bytes, 1, (size_t)n, f) != (size_t)n) exit(94);
    fclose(f);
    if (!exact) bytes[n] = 0;
    return bytes;
}

struct fatbin_wrapper {
    uint32_t magic;
    uint32_t version;
    const void *data;
    void *filename_or_fatbins;
};

struct load_step {
    char api[16];
    const void *image;
};

static atomic_int loads_done;
static CUmodule last_module; /* the last module loaded (load:) */

static CUresult load_image(const struct load_step *l) {
    CUmodule m = NULL;
    CUlibrary lib = NULL;
    CUresult r;
    if (!strcmp(l->api, "data")) r = cuModuleLoadData(&m, l->image);
    else if (!strcmp(l->api, "file")) r = cuModuleLoad(&m, l->image);
    else if (!strcmp(l->api, "data_ex")) r = cuModuleLoadDataEx(&m, l->image, 0, NULL, NULL);
    else if (!strcmp(l->api, "fatbin")) r = cuModuleLoadFatBinary(&m, l->image);
    else if (!strcmp(l->api, "library")) r = cuLibraryLoadData(&lib, l->image, NULL, NULL, 0, NULL, NULL, 0);
    else {
        fprintf(stderr, "fake_app: unknown load API %s\n", l->api);
        exit(98);
    }
    printf("fake_app: load%d=%d\n", atomic_fetch_add(&loads_done, 1), r);
    if (r == CUDA_SUCCESS && m) last_module = m;
    return r;
}

static int parse_load(const char *arg, struct load_step *l) {
    char path[4096], opts[16] = "";
    if (sscanf(arg, "%15[^:]:%4095[^:]:%15s", l->api, path, opts) < 2) return 0;
    if (!strcmp(l->api, "file")) { /* cuModuleLoad takes the path */
        l->image = strdup(path);
        return 1;
    }
    l->image = guarded_copy(path, strchr(opts, 'n') != NULL);
    if (strchr(opts, 'w')) {
        struct fatbin_wrapper *w = calloc(1, sizeof *w);
        w->magic = 0x466243B1u;
        w->version = 1;
        w->data = l->image;
        l->image = w;
    }
    return 1;
}

static struct load_step threaded_load;

static void *load_thread_main(void *arg) {
    (void)arg;
    pthread_barrier_wait(&start_together);
    load_image(&threaded_load);
    return NULL;
}

static void module_stats(void) {
    const char *agent = getenv("CUDA_INJECTION64_PATH");
    void *h = agent && *agent ? dlopen(agent, RTLD_NOW | RTLD_NOLOAD) : NULL;
    int (*stats)(uint64_t *) = h ? (int (*)(uint64_t *))dlsym(h, "tally_agent_module_stats") : NULL;
    if (!stats) {
        printf("fake_app: modules_enabled=-1\n");
        return;
    }
    uint64_t v[4] = {0};
    int enabled = stats(v);
    printf("fake_app: modules_enabled=%d\nfake_app: modules_seen=%llu\nfake_app: modules_written=%llu\n"
           "fake_app: modules_present=%llu\nfake_app: modules_failed=%llu\n",
           enabled, (unsigned long long)v[0], (unsigned long long)v[1], (unsigned long long)v[2],
           (unsigned long long)v[3]);
}

/* ---------------------------------------- a kernel of a loaded module */

/* pkfunc:ENTRY gets a function of the last loaded module; pklaunch launches it
 * with two parameters (a pointer and an int), each wave of its grid lasting
 * WAVE_US on the fake GPU, through one entry point:
 *   kernel, ptsz (NULL stream: the per-thread stream), ex, extra (arguments
 *   in `extra`), attrs (cuLaunchKernelEx with a launch attribute). */
static CUfunction pk;
static void *pk_pointer = &pk;
static int pk_int = 7;
static unsigned pk_smem; /* dynamic shared memory of pk's launches (pksmem:BYTES raises its limit to that) */
static void *pk_params[2] = {&pk_pointer, &pk_int};

static void pk_launch(long n, unsigned gx, unsigned gy, unsigned bx, unsigned wave_us, const char *how) {
    fake_cuda_set_wave_duration_us(wave_us);
    for (long i = 0; i < n; i++) {
        CUresult r;
        if (!strcmp(how, "kernel")) r = cuLaunchKernel(pk, gx, gy, 1, bx, 1, 1, pk_smem, stream, pk_params, NULL);
        else if (!strcmp(how, "ptsz")) r = cuLaunchKernel_ptsz(pk, gx, gy, 1, bx, 1, 1, 0, NULL, pk_params, NULL);
        else if (!strcmp(how, "extra")) {
            void *extra[] = {NULL};
            r = cuLaunchKernel(pk, gx, gy, 1, bx, 1, 1, 0, stream, NULL, extra);
        } else if (!strcmp(how, "ex") || !strcmp(how, "attrs")) {
            long attr[8] = {0};
            CUlaunchConfig cfg = {gx, gy, 1, bx, 1, 1, 0, stream, !strcmp(how, "attrs") ? attr : NULL,
                                  !strcmp(how, "attrs") ? 1u : 0u};
            r = cuLaunchKernelEx(&cfg, pk, pk_params, NULL);
            /* The program's configuration is its own: a tool may not change it. */
            if (cfg.gridDimX != gx || cfg.gridDimY != gy || cfg.gridDimZ != 1) {
                fprintf(stderr, "fake_app: cuLaunchKernelEx changed the caller's configuration\n");
                exit(94);
            }
        } else {
            fprintf(stderr, "fake_app: unknown launch kind %s\n", how);
            exit(98);
        }
        check(r, "pklaunch");
    }
    fake_cuda_set_wave_duration_us(0);
}

static void print_records(void) {
    fake_launch_record rec;
    printf("fake_app: pk_first_param=%p\n", (void *)&pk_pointer);
    for (long i = 0; fake_cuda_launch_record(i, &rec); i++)
        printf("fake_app: record %ld %s grid=%u,%u,%u first=%p appended=%u,%u,%u,%u\n", i, rec.name, rec.grid[0],
               rec.grid[1], rec.grid[2], rec.first_param, rec.appended[0], rec.appended[1], rec.appended[2],
               rec.appended[3]);
}

/* -------------------------------------------------------------- main */

static void print_called(void) {
    for (int e = 0; e < N_ENTRIES; e++) {
        long n = atomic_load(&called[e]);
        if (n) printf("fake_app: called %s=%ld\n", entry_api[e], n);
    }
    printf("fake_app: host_func_runs=%ld\n", atomic_load(&host_func_runs));
    static const char *gpu_names[] = {"kernels", "max_inflight", "writes_issued", "writes_done", "bad_writes",
                                      "regressions", "captured_writes", "host_registers", "capturing_queries",
                                      "max_running", "waits_issued", "waits_done"};
    uint64_t v[12] = {0};
    int n = fake_cuda_gpu_stats(v, 12);
    for (int i = 0; i < n && i < 12; i++) printf("fake_app: gpu_%s=%llu\n", gpu_names[i], (unsigned long long)v[i]);
    for (int i = 0; i < N_STREAM_NAMES; i++)
        printf("fake_app: writes_%s=%llu\n", stream_names[i],
               (unsigned long long)fake_cuda_stream_writes(stream_named(stream_names[i])));
    for (int i = 0; i < n_many_streams; i++)
        printf("fake_app: writes_k%d=%llu\n", i, (unsigned long long)fake_cuda_stream_writes(many_streams[i]));
}

int main(int argc, char **argv) {
    CUresult r = cuInit(0);
    printf("fake_app: cuInit=%d\n", r);
    check(r, "cuInit");
    int version = 0;
    check(cuDriverGetVersion(&version), "cuDriverGetVersion");
    check(cuStreamCreate(&stream, 0), "cuStreamCreate");
    for (int i = 0; i < 3; i++) check(cuStreamCreate(&extra_streams[i], 0), "cuStreamCreate");
    for (int e = 0; e < N_ENTRIES; e++) {
        char name[64];
        snprintf(name, sizeof name, "mix_kernel_%s", entry_arg[e]);
        check(cuModuleGetFunction(&funcs[e], NULL, name), "cuModuleGetFunction");
    }
    check(cuFuncSetBlockShape(funcs[E_LEGACY], 64, 2, 1), "cuFuncSetBlockShape");
    check(cuFuncSetBlockShape(funcs[E_GRID], 128, 1, 1), "cuFuncSetBlockShape");
    check(cuFuncSetBlockShape(funcs[E_GRID_ASYNC], 256, 1, 1), "cuFuncSetBlockShape");
    check(cuModuleGetFunction(&graph_nodes[0], NULL, "graph_node_a"), "cuModuleGetFunction");
    check(cuModuleGetFunction(&graph_nodes[1], NULL, "graph_node_b"), "cuModuleGetFunction");
    check(fake_cuda_graph_exec_create(&graph, graph_nodes, 2), "graph");

    for (int i = 1; i < argc; i++) {
        char *arg = argv[i];
        if (strncmp(arg, "launch:", 7) == 0) {
            char entry[32], sname[32] = "";
            long n;
            unsigned us = 0;
            int got = sscanf(arg + 7, "%31[^:]:%ld:%u:%31s", entry, &n, &us, sname);
            if (got < 2) return 96;
            int e = entry_of(entry);
            if (got == 2) {
                for (long j = 0; j < n; j++) launch(e, (unsigned)j);
            } else {
                CUstream on = got == 4 ? stream_named(sname)
                              : (e == E_KERNEL_PTSZ || e == E_EX_PTSZ || e == E_COOP_PTSZ || e == E_GRAPH_PTSZ ||
                                 e == E_HOST_PTSZ) ? NULL : stream;
                for (long j = 0; j < n; j++) launch_timed(e, us, on);
            }
        } else if (strncmp(arg, "tlaunch:", 8) == 0) {
            char entry[32], sname[32];
            long t, m;
            if (sscanf(arg + 8, "%ld:%31[^:]:%ld:%u:%31s", &t, entry, &m, &timed_us, sname) != 5) return 96;
            timed_entry = entry_of(entry);
            timed_stream = stream_named(sname);
            run_threads_of(t, m, timed_thread_main);
        } else if (strncmp(arg, "streams:", 8) == 0) {
            long n = atol(arg + 8);
            if (n < 0 || n_many_streams + n > MAX_MANY_STREAMS) return 96;
            for (long j = 0; j < n; j++) check(cuStreamCreate(&many_streams[n_many_streams++], 0), "cuStreamCreate");
        } else if (strncmp(arg, "tturns:", 7) == 0) {
            char entry[32], sname[32];
            long t, m;
            if (sscanf(arg + 7, "%ld:%31[^:]:%ld:%u:%31s", &t, entry, &m, &timed_us, sname) != 5 || t < 1) return 96;
            timed_entry = entry_of(entry);
            timed_stream = stream_named(sname);
            turn = 0;
            pthread_barrier_init(&finish_together, NULL, (unsigned)t);
            run_threads_of(t, m, turn_thread_main);
            pthread_barrier_destroy(&finish_together);
        } else if (strncmp(arg, "tstreams:", 9) == 0) {
            long t, m;
            if (sscanf(arg + 9, "%ld:%ld:%u:%ld", &t, &m, &timed_us, &many_used) != 4 || many_used < 1 ||
                many_used > n_many_streams)
                return 96;
            run_threads_of(t, m, streams_thread_main);
        } else if (strncmp(arg, "trounds:", 8) == 0) {
            long p;
            if (sscanf(arg + 8, "%ld:%ld:%ld:%u:%ld", &round_threads, &rounds, &p, &timed_us, &many_used) != 5 ||
                round_threads < 1 || many_used < 1 || many_used > n_many_streams)
                return 96;
            pthread_barrier_init(&round_end, NULL, (unsigned)round_threads);
            run_threads_of(round_threads, p, rounds_thread_main);
            pthread_barrier_destroy(&round_end);
        } else if (strncmp(arg, "sleep:", 6) == 0) {
            long us = atol(arg + 6);
            struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
            nanosleep(&ts, NULL);
        } else if (strncmp(arg, "capture:", 8) == 0) {
            char sname[32], mode[8];
            if (sscanf(arg + 8, "%31[^:]:%7s", sname, mode) != 2) return 96;
            fake_cuda_set_capturing(stream_named(sname), 0, strcmp(mode, "on") == 0);
        } else if (strcmp(arg, "sync") == 0) {
            check(cuCtxSynchronize(), "cuCtxSynchronize");
        } else if (strncmp(arg, "wait_file:", 10) == 0) {
            printf("fake_app: waiting=%s\n", arg + 10);
            fflush(stdout);
            struct stat st;
            for (int k = 0; k < 60000 && stat(arg + 10, &st) != 0; k++) usleep(1000);
        } else if (strncmp(arg, "threads:", 8) == 0) {
            long t, m;
            if (sscanf(arg + 8, "%ld:%ld", &t, &m) != 2) return 96;
            run_threads(t, m);
        } else if (strcmp(arg, "names") == 0) {
            launch_names();
        } else if (strncmp(arg, "fork:", 5) == 0) {
            long c;
            int code;
            if (sscanf(arg + 5, "%ld:%d", &c, &code) != 2) return 96;
            fflush(stdout);
            fflush(stderr);
            pid_t pid = fork();
            if (pid < 0) return 95;
            if (pid == 0) {
                for (long j = 0; j < c; j++)
                    check(cuLaunchKernel(funcs[E_KERNEL], 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL),
                          "cuLaunchKernel in child");
                exit(code);
            }
            int status = 0;
            waitpid(pid, &status, 0);
            printf("fake_app: child_pid=%d\n", (int)pid);
            printf("fake_app: child_exit=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        } else if (strncmp(arg, "load:", 5) == 0) {
            struct load_step l;
            if (!parse_load(arg + 5, &l)) return 96;
            load_image(&l);
        } else if (strncmp(arg, "tload:", 6) == 0) {
            long t;
            int used = 0;
            if (sscanf(arg + 6, "%ld:%n", &t, &used) != 1 || !used || !parse_load(arg + 6 + used, &threaded_load))
                return 96;
            run_threads_of(t, 1, load_thread_main);
        } else if (strncmp(arg, "pkfunc:", 7) == 0) {
            check(cuModuleGetFunction(&pk, last_module, arg + 7), "cuModuleGetFunction");
        } else if (strncmp(arg, "pklaunch:", 9) == 0) {
            long n;
            unsigned gx, gy, bx, wave_us;
            char how[16];
            if (sscanf(arg + 9, "%ld:%u:%u:%u:%u:%15s", &n, &gx, &gy, &bx, &wave_us, how) != 6) return 96;
            pk_launch(n, gx, gy, bx, wave_us, how);
        } else if (strncmp(arg, "pksmem:", 7) == 0) {
            pk_smem = (unsigned)atol(arg + 7);
            check(cuFuncSetAttribute(pk, 8 /* MAX_DYNAMIC_SHARED_SIZE_BYTES */, (int)pk_smem), "cuFuncSetAttribute");
        } else if (strcmp(arg, "pkunload") == 0) {
            check(cuModuleUnload(last_module), "cuModuleUnload");
        } else if (strcmp(arg, "records") == 0) {
            print_records();
        } else if (strncmp(arg, "mark:", 5) == 0) { /* how many kernel launches the GPU has recorded so far */
            fake_launch_record rec;
            long n = 0;
            check(cuCtxSynchronize(), "cuCtxSynchronize");
            while (fake_cuda_launch_record(n, &rec)) n++;
            printf("fake_app: mark_%s=%ld\n", arg + 5, n);
        } else if (strcmp(arg, "module_stats") == 0) {
            module_stats();
        } else if (strcmp(arg, "report") == 0) {
            report();
        } else if (strncmp(arg, "exit:", 5) == 0) {
            print_called();
            fflush(stdout);
            exit(atoi(arg + 5));
        } else {
            fprintf(stderr, "fake_app: unknown step %s\n", arg);
            return 96;
        }
    }
    check(cuCtxSynchronize(), "cuCtxSynchronize");
    print_called();
    printf("fake_app: done\n");
    return 0;
}
