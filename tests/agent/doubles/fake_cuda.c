/* Test double of the CUDA driver, built as libcuda.so.1.
 *
 * cuInit does what the real driver does with CUDA_INJECTION64_PATH: on the
 * first call it dlopens that library and calls its InitializeInjection() once.
 * Every API call is reported to the attached tool (the fake libcupti), which
 * turns it into CUPTI callbacks; launches are reported at once as kernel
 * executions for the Activity API. No callbacks happen while no tool is
 * attached, as with the real driver.
 *
 * The fake GPU (for the agent's scheduling path, agent/sched.c): every stream
 * is a FIFO of work items. A kernel launch enqueues a kernel lasting the
 * calling thread's current duration (fake_cuda_set_kernel_duration_us; 0 by
 * default: a zero-length kernel on an idle stream completes at once, without
 * the queue); cuStreamWriteValue64 enqueues a 64-bit store into host memory
 * registered with cuMemHostRegister, and cuStreamWaitValue64 (GEQ or AND) a
 * wait on such memory that holds the rest of its stream until the word is
 * large enough (GEQ) or has a bit of the value set (AND). A background "GPU" thread runs the
 * streams concurrently, each in order: it sleeps through kernels and then
 * performs stores with release semantics, so completions arrive later,
 * asynchronously, in stream order. The legacy default stream (NULL or
 * CU_STREAM_LEGACY) is one stream; CU_STREAM_PER_THREAD (and a NULL stream
 * given to a _ptsz entry point) is a separate stream for each host thread, as
 * with the real driver. cuCtxSynchronize waits until every stream is idle.
 *
 * Block-level scheduling (agent/blocksched.c): cuModuleGetFunction ties a
 * function to its module (cuFuncGetModule), and a function takes
 * FAKE_CUDA_PARAM_COUNT parameters (default 2) plus, for an entry named
 * *__tally_slice, four u32 ones (cuFuncGetParamInfo). The GPU has
 * FAKE_CUDA_SM_COUNT SMs (default 4) and fits FAKE_CUDA_OCCUPANCY blocks
 * (default 2) per SM. With fake_cuda_set_wave_duration_us, a kernel lasts
 * that long per wave of SMs x occupancy blocks (a slice entry
 * FAKE_CUDA_SLICE_SLOWDOWN times as long, default 1). Every kernel launch is
 * recorded (fake_cuda_launch_record), reading the launch's arguments from the
 * parameter block after API enter, as the real driver does: a tool may have
 * rewritten them.
 *
 * Knobs (environment): FAKE_CUDA_UUID=hex (16 bytes, dashes and a "GPU-"
 * prefix allowed) for cuDeviceGetUuid; FAKE_CUDA_HOST_REGISTER_RESULT=n makes
 * cuMemHostRegister fail with n; FAKE_CUDA_MODULE_LOAD_RESULT=n makes the
 * module and library loads from memory fail with n. Stream capture is set per stream with
 * fake_cuda_set_capturing. Counters: fake_cuda_gpu_stats.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

#include "fake_driver.h"

#define EXPORT __attribute__((visibility("default")))

static const fake_tool_ops *_Atomic tool;
static atomic_int initialized;
static atomic_uint next_stream_id = 20;
static atomic_uint next_graph_id = 1;

EXPORT void fake_cuda_register_tool(const fake_tool_ops *ops) {
    if (ops && ops->version == 1) atomic_store(&tool, ops);
}

/* ----------------------------------------------------------- cuInit */

static void load_injection(void) {
    const char *path = getenv("CUDA_INJECTION64_PATH");
    if (!path || !*path) return;
    void *h = dlopen(path, RTLD_NOW);
    if (!h) {
        fprintf(stderr, "fake libcuda: cannot load injection %s: %s\n", path, dlerror());
        return;
    }
    int (*init)(void) = (int (*)(void))dlsym(h, "InitializeInjection");
    if (!init) {
        fprintf(stderr, "fake libcuda: %s has no InitializeInjection\n", path);
        return;
    }
    init();
}

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void do_init(void) {
    load_injection();
    atomic_store(&initialized, 1);
}

EXPORT CUresult cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_once(&init_once, do_init);
    return CUDA_SUCCESS;
}

/* ------------------------------------------------- API call plumbing */

typedef struct {
    uint32_t cbid;
    const char *name;
    const void *params;
    const char *symbol;
    uint32_t correlation;
    uint64_t correlation_data;
    const fake_tool_ops *tool;
} api_call;

static void enter(api_call *c, uint32_t cbid, const char *name, const void *params, const char *symbol) {
    c->cbid = cbid;
    c->name = name;
    c->params = params;
    c->symbol = symbol;
    c->correlation = 0;
    c->correlation_data = 0;
    c->tool = atomic_load(&tool);
    if (c->tool) c->correlation = c->tool->api_enter(cbid, name, params, symbol, &c->correlation_data);
}

static CUresult leave(api_call *c, CUresult r) {
    if (c->tool)
        c->tool->api_exit(c->cbid, c->name, c->params, c->symbol, c->correlation, &c->correlation_data, &r);
    return r;
}

static uint32_t stream_id(CUstream s, int per_thread_default) {
    if (s == NULL) return per_thread_default ? FAKE_STREAM_PER_THREAD_ID : FAKE_STREAM_DEFAULT_ID;
    if (s == (CUstream)0x1) return FAKE_STREAM_DEFAULT_ID;    /* CU_STREAM_LEGACY */
    if (s == (CUstream)0x2) return FAKE_STREAM_PER_THREAD_ID; /* CU_STREAM_PER_THREAD */
    return s->id;
}

static uint64_t gpu_launch(uint64_t key, uint64_t blocks, int slice);
static int is_slice(const char *name) {
    size_t n = strlen(name), k = strlen("__tally_slice");
    return n > k && strcmp(name + n - k, "__tally_slice") == 0;
}

static void run_kernel(api_call *c, uint64_t gpu_stream_key, CUfunction f, unsigned gx, unsigned gy,
                       unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem, uint32_t stream,
                       uint32_t device, uint8_t launch_type, uint32_t graph_id, uint64_t node_id) {
    uint64_t duration = gpu_launch(gpu_stream_key, (uint64_t)gx * gy * gz, is_slice(f->name));
    if (!c->tool) return;
    fake_kernel_exec k = {
        .name = f->name, .registers = f->registers, .static_smem = f->static_smem,
        .grid = {gx, gy, gz}, .block = {bx, by, bz}, .dynamic_smem = smem,
        .device_id = device, .context_id = FAKE_CONTEXT_ID, .stream_id = stream,
        .launch_type = launch_type, .graph_id = graph_id, .graph_node_id = node_id, .duration_ns = duration,
    };
    c->tool->kernel_executed(c->correlation, &k);
}

#define CHECK_INIT() \
    do { if (!atomic_load(&initialized)) return CUDA_ERROR_NOT_INITIALIZED; } while (0)


/* ------------------------------------------------------------ fake GPU */

#define GPU_MAX_STREAMS 512
#define GPU_MAX_REGISTERED 16
#define GPU_KEY_LEGACY 1ull
#define GPU_KEY_PER_THREAD_BASE (1ull << 40) /* + host thread number */

enum { WORK_KERNEL = 1, WORK_WRITE = 2, WORK_WAIT = 3 };

typedef struct work {
    struct work *next;
    int kind;
    uint64_t duration_ns; /* kernel */
    uint64_t end_ns;      /* kernel, once it reached the head of its stream */
    int started;
    uint64_t *address; /* write; wait: the word waited on */
    uint64_t value;    /* write: stored; wait: the stream goes on once the word is >= this (or & this) */
    int and_mask;      /* wait: CU_STREAM_WAIT_VALUE_AND */
} work;

typedef struct {
    uint64_t key;
    work *head, *tail;
    int capturing;
    uint64_t writes, kernels;
} gpu_stream;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, idle;
    int thread_running;
    gpu_stream streams[GPU_MAX_STREAMS];
    int n_streams;
    long queued;           /* work items in all queues */
    long inflight;         /* kernels launched and not completed */
    long max_inflight;
    long running;          /* kernels started (at the head of their stream) and not completed */
    long max_running;
    uint64_t waits_issued, waits_done;
    uint64_t kernels, writes_issued, writes_done, bad_writes, regressions, captured_writes,
        capturing_queries, host_registers;
    struct { char *base; size_t size; unsigned flags; } registered[GPU_MAX_REGISTERED];
    int n_registered;
} gpu = {.lock = PTHREAD_MUTEX_INITIALIZER};

static atomic_uint next_thread_number = 1;
static __thread unsigned thread_number;
static __thread uint64_t kernel_duration_ns, wave_duration_ns;

EXPORT void fake_cuda_set_kernel_duration_us(unsigned us) { kernel_duration_ns = (uint64_t)us * 1000; }
EXPORT void fake_cuda_set_wave_duration_us(unsigned us) { wave_duration_ns = (uint64_t)us * 1000; }

static int env_int(const char *name, int fallback) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}

static uint64_t gpu_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Which FIFO a stream handle names, for the calling thread. */
static uint64_t gpu_key(CUstream s, int per_thread_default) {
    if (s == (CUstream)0x2 || (s == NULL && per_thread_default)) {
        if (!thread_number) thread_number = atomic_fetch_add(&next_thread_number, 1);
        return GPU_KEY_PER_THREAD_BASE + thread_number;
    }
    if (s == NULL || s == (CUstream)0x1) return GPU_KEY_LEGACY;
    return 100 + (uint64_t)s->id;
}

static int key_is_per_thread(uint64_t key) { return key > GPU_KEY_PER_THREAD_BASE; }

/* Under gpu.lock. */
static gpu_stream *gpu_stream_of(uint64_t key) {
    for (int i = 0; i < gpu.n_streams; i++)
        if (gpu.streams[i].key == key) return &gpu.streams[i];
    if (gpu.n_streams == GPU_MAX_STREAMS) {
        fprintf(stderr, "fake libcuda: more than %d streams\n", GPU_MAX_STREAMS);
        abort();
    }
    gpu_stream *q = &gpu.streams[gpu.n_streams++];
    memset(q, 0, sizeof *q);
    q->key = key;
    return q;
}

static int any_capturing(void) {
    for (int i = 0; i < gpu.n_streams; i++)
        if (gpu.streams[i].capturing) return 1;
    return 0;
}

static void *gpu_main(void *arg) {
    (void)arg;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* sleep through kernels precisely */
    pthread_mutex_lock(&gpu.lock);
    for (;;) {
        uint64_t now = gpu_now_ns(), next = UINT64_MAX;
        for (int i = 0; i < gpu.n_streams; i++) {
            gpu_stream *q = &gpu.streams[i];
            while (q->head) {
                work *w = q->head;
                if (w->kind == WORK_KERNEL) {
                    if (!w->started) {
                        w->started = 1;
                        w->end_ns = now + w->duration_ns;
                        if (++gpu.running > gpu.max_running) gpu.max_running = gpu.running;
                    }
                    if (now < w->end_ns) {
                        if (w->end_ns < next) next = w->end_ns;
                        break;
                    }
                    gpu.inflight--; /* the kernel is done before anything after it in the stream */
                    gpu.running--;
                } else if (w->kind == WORK_WAIT) {
                    /* Host writes do not wake this thread: poll the word every 20 us, as a GPU's
                     * front end polls a semaphore. */
                    uint64_t word = __atomic_load_n(w->address, __ATOMIC_ACQUIRE);
                    if (w->and_mask ? (word & w->value) == 0 : word < w->value) {
                        if (now + 20000 < next) next = now + 20000;
                        break;
                    }
                    gpu.waits_done++;
                } else {
                    uint64_t old = __atomic_load_n(w->address, __ATOMIC_ACQUIRE);
                    if (w->value < old) gpu.regressions++;
                    __atomic_store_n(w->address, w->value, __ATOMIC_RELEASE);
                    gpu.writes_done++;
                }
                q->head = w->next;
                if (!q->head) q->tail = NULL;
                gpu.queued--;
                free(w);
            }
        }
        if (gpu.queued == 0) pthread_cond_broadcast(&gpu.idle);
        if (next == UINT64_MAX) {
            pthread_cond_wait(&gpu.wake, &gpu.lock);
        } else {
            struct timespec ts = {(time_t)(next / 1000000000ull), (long)(next % 1000000000ull)};
            pthread_cond_timedwait(&gpu.wake, &gpu.lock, &ts);
        }
    }
    return NULL;
}

/* Under gpu.lock. */
static void gpu_enqueue(gpu_stream *q, work *w) {
    if (!gpu.thread_running) {
        pthread_condattr_t attr;
        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        pthread_cond_init(&gpu.wake, &attr);
        pthread_cond_init(&gpu.idle, NULL);
        pthread_condattr_destroy(&attr);
        pthread_t t;
        if (pthread_create(&t, NULL, gpu_main, NULL) != 0) {
            fprintf(stderr, "fake libcuda: cannot start the GPU thread\n");
            abort();
        }
        pthread_detach(t);
        gpu.thread_running = 1;
    }
    w->next = NULL;
    if (q->tail) q->tail->next = w;
    else q->head = w;
    q->tail = w;
    gpu.queued++;
    pthread_cond_signal(&gpu.wake);
}

/* One kernel of a launch, which runs for the returned time. A kernel on a
 * capturing stream is recorded, not run. */
static uint64_t gpu_launch(uint64_t key, uint64_t blocks, int slice) {
    uint64_t duration = kernel_duration_ns;
    if (wave_duration_ns) {
        uint64_t wave = (uint64_t)env_int("FAKE_CUDA_SM_COUNT", 4) * (uint64_t)env_int("FAKE_CUDA_OCCUPANCY", 2);
        duration = (blocks + wave - 1) / wave * wave_duration_ns;
        if (slice) duration *= (uint64_t)env_int("FAKE_CUDA_SLICE_SLOWDOWN", 1);
    }
    pthread_mutex_lock(&gpu.lock);
    gpu_stream *q = gpu_stream_of(key);
    if (q->capturing) {
        pthread_mutex_unlock(&gpu.lock);
        return duration;
    }
    gpu.kernels++;
    q->kernels++;
    if (++gpu.inflight > gpu.max_inflight) gpu.max_inflight = gpu.inflight;
    if (duration == 0 && !q->head) {
        gpu.inflight--;
    } else {
        work *w = calloc(1, sizeof *w);
        w->kind = WORK_KERNEL;
        w->duration_ns = duration;
        gpu_enqueue(q, w);
    }
    pthread_mutex_unlock(&gpu.lock);
    return duration;
}

static void gpu_synchronize(void) {
    pthread_mutex_lock(&gpu.lock);
    while (gpu.queued) pthread_cond_wait(&gpu.idle, &gpu.lock);
    pthread_mutex_unlock(&gpu.lock);
}

/* fork: the child has no GPU thread; start it again on demand. */
static void gpu_before_fork(void) { pthread_mutex_lock(&gpu.lock); }
static void gpu_after_fork_parent(void) { pthread_mutex_unlock(&gpu.lock); }
static void gpu_after_fork_child(void) {
    for (int i = 0; i < gpu.n_streams; i++) gpu.streams[i].head = gpu.streams[i].tail = NULL;
    gpu.queued = gpu.inflight = 0;
    gpu.thread_running = 0;
    pthread_mutex_init(&gpu.lock, NULL);
}

__attribute__((constructor)) static void gpu_load(void) {
    pthread_atfork(gpu_before_fork, gpu_after_fork_parent, gpu_after_fork_child);
}

/* Test control and introspection. */
EXPORT void fake_cuda_set_capturing(CUstream s, int per_thread_default, int on) {
    pthread_mutex_lock(&gpu.lock);
    gpu_stream_of(gpu_key(s, per_thread_default))->capturing = on;
    pthread_mutex_unlock(&gpu.lock);
}

/* out: kernels, max_inflight, writes_issued, writes_done, bad_writes,
 * regressions, captured_writes, host_registers, capturing_queries, max_running,
 * waits_issued, waits_done */
EXPORT int fake_cuda_gpu_stats(uint64_t *out, int n) {
    pthread_mutex_lock(&gpu.lock);
    uint64_t v[] = {gpu.kernels, (uint64_t)gpu.max_inflight, gpu.writes_issued, gpu.writes_done,
                    gpu.bad_writes, gpu.regressions, gpu.captured_writes, gpu.host_registers,
                    gpu.capturing_queries, (uint64_t)gpu.max_running, gpu.waits_issued, gpu.waits_done};
    pthread_mutex_unlock(&gpu.lock);
    int m = (int)(sizeof v / sizeof v[0]);
    for (int i = 0; i < n && i < m; i++) out[i] = v[i];
    return m;
}

/* Memory writes issued to the stream a handle names (for CU_STREAM_PER_THREAD:
 * summed over every thread's per-thread stream). */
EXPORT uint64_t fake_cuda_stream_writes(CUstream s) {
    uint64_t n = 0;
    pthread_mutex_lock(&gpu.lock);
    for (int i = 0; i < gpu.n_streams; i++) {
        uint64_t k = gpu.streams[i].key;
        if (s == (CUstream)0x2 ? key_is_per_thread(k) : k == gpu_key(s, 0)) n += gpu.streams[i].writes;
    }
    pthread_mutex_unlock(&gpu.lock);
    return n;
}

/* ------------------------------------------- driver calls the agent uses */

EXPORT CUresult cuCtxGetDevice(CUdevice *device) {
    CHECK_INIT();
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    *device = 0;
    return CUDA_SUCCESS;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice device) {
    CHECK_INIT();
    if (!uuid || device != 0) return CUDA_ERROR_INVALID_VALUE;
    static const unsigned char fallback[16] = {0x5c, 0x3c, 0x1a, 0x2b, 0x00, 0x11, 0x22, 0x33,
                                               0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb};
    memcpy(uuid->bytes, fallback, 16);
    const char *text = getenv("FAKE_CUDA_UUID");
    if (text && *text) {
        if (strncmp(text, "GPU-", 4) == 0) text += 4;
        unsigned char b[16];
        int n = 0, hi = -1;
        for (; *text && n < 16; text++) {
            if (*text == '-') continue;
            int d = hex_digit(*text);
            if (d < 0) return CUDA_ERROR_INVALID_VALUE;
            if (hi < 0) hi = d;
            else b[n++] = (unsigned char)(hi << 4 | d), hi = -1;
        }
        if (n != 16) return CUDA_ERROR_INVALID_VALUE;
        memcpy(uuid->bytes, b, 16);
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice device) { return cuDeviceGetUuid_v2(uuid, device); }

EXPORT CUresult cuMemHostRegister_v2(void *p, size_t size, unsigned int flags) {
    CHECK_INIT();
    pthread_mutex_lock(&gpu.lock);
    gpu.host_registers++;
    pthread_mutex_unlock(&gpu.lock);
    const char *forced = getenv("FAKE_CUDA_HOST_REGISTER_RESULT");
    if (forced && *forced && atoi(forced) != 0) return atoi(forced);
    if (!p || !size || flags > 0xf) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&gpu.lock);
    CUresult r = CUDA_SUCCESS;
    for (int i = 0; i < gpu.n_registered; i++) {
        char *b = gpu.registered[i].base;
        if ((char *)p < b + gpu.registered[i].size && b < (char *)p + size) r = CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
    }
    if (r == CUDA_SUCCESS && gpu.n_registered == GPU_MAX_REGISTERED) r = CUDA_ERROR_OUT_OF_MEMORY;
    if (r == CUDA_SUCCESS) {
        gpu.registered[gpu.n_registered].base = p;
        gpu.registered[gpu.n_registered].size = size;
        gpu.registered[gpu.n_registered].flags = flags;
        gpu.n_registered++;
    }
    pthread_mutex_unlock(&gpu.lock);
    return r;
}

EXPORT CUresult cuMemHostRegister(void *p, size_t size, unsigned int flags) {
    return cuMemHostRegister_v2(p, size, flags);
}

/* Under gpu.lock: the registration holding [p, p + n), or -1. */
static int registration_of(const void *p, size_t n) {
    for (int i = 0; i < gpu.n_registered; i++) {
        const char *b = gpu.registered[i].base;
        if ((const char *)p >= b && (const char *)p + n <= b + gpu.registered[i].size) return i;
    }
    return -1;
}

EXPORT CUresult cuMemHostUnregister(void *p) {
    CHECK_INIT();
    pthread_mutex_lock(&gpu.lock);
    CUresult r = CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    for (int i = 0; i < gpu.n_registered; i++)
        if (gpu.registered[i].base == p) {
            gpu.registered[i] = gpu.registered[--gpu.n_registered];
            r = CUDA_SUCCESS;
            break;
        }
    pthread_mutex_unlock(&gpu.lock);
    return r;
}

/* Mapped host memory has the same address on the (fake) GPU. */
EXPORT CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *out, void *p, unsigned int flags) {
    CHECK_INIT();
    if (!out || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&gpu.lock);
    int i = registration_of(p, 1);
    int mapped = i >= 0 && (gpu.registered[i].flags & 0x02 /* DEVICEMAP */);
    pthread_mutex_unlock(&gpu.lock);
    if (!mapped) return CUDA_ERROR_INVALID_VALUE;
    *out = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemHostGetDevicePointer(CUdeviceptr *out, void *p, unsigned int flags) {
    return cuMemHostGetDevicePointer_v2(out, p, flags);
}

EXPORT CUresult cuStreamIsCapturing(CUstream s, int *status) {
    CHECK_INIT();
    if (!status) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&gpu.lock);
    gpu.capturing_queries++;
    uint64_t key = gpu_key(s, 0);
    CUresult r = CUDA_SUCCESS;
    /* The legacy stream may not be used while another stream captures (global mode). */
    if (key == GPU_KEY_LEGACY && any_capturing()) r = CUDA_ERROR_STREAM_CAPTURE_IMPLICIT;
    else *status = gpu_stream_of(key)->capturing ? 1 /* ACTIVE */ : 0 /* NONE */;
    pthread_mutex_unlock(&gpu.lock);
    return r;
}

/* gpu.lock is held. */
static void enqueue_memop(gpu_stream *q, int kind, uint64_t *address, uint64_t value, int and_mask) {
    work *w = calloc(1, sizeof *w);
    w->kind = kind;
    w->and_mask = and_mask;
    w->address = address;
    w->value = value;
    gpu_enqueue(q, w);
}

static CUresult write_value64(CUstream s, CUdeviceptr address, uint64_t value, unsigned int flags, int ptsz) {
    CHECK_INIT();
    if (flags > 1 /* CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER */) return CUDA_ERROR_INVALID_VALUE;
    uint64_t *p = (uint64_t *)(uintptr_t)address;
    pthread_mutex_lock(&gpu.lock);
    gpu.writes_issued++;
    int i = ((uintptr_t)p & 7) ? -1 : registration_of(p, 8);
    if (i < 0 || !(gpu.registered[i].flags & 0x02)) {
        gpu.bad_writes++;
        pthread_mutex_unlock(&gpu.lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    gpu_stream *q = gpu_stream_of(gpu_key(s, ptsz));
    q->writes++;
    if (q->capturing) gpu.captured_writes++; /* recorded into the graph being captured */
    else enqueue_memop(q, WORK_WRITE, p, value, 0);
    pthread_mutex_unlock(&gpu.lock);
    return CUDA_SUCCESS;
}

/* cuStreamWaitValue64 with CU_STREAM_WAIT_VALUE_GEQ (0) or _AND (2), the flags the agent uses,
 * on registered, device-mapped host memory. */
static CUresult wait_value64(CUstream s, CUdeviceptr address, uint64_t value, unsigned int flags, int ptsz) {
    CHECK_INIT();
    if (flags != 0 && flags != 2) return CUDA_ERROR_INVALID_VALUE;
    uint64_t *p = (uint64_t *)(uintptr_t)address;
    pthread_mutex_lock(&gpu.lock);
    int i = ((uintptr_t)p & 7) ? -1 : registration_of(p, 8);
    if (i < 0 || !(gpu.registered[i].flags & 0x02)) {
        pthread_mutex_unlock(&gpu.lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    gpu.waits_issued++;
    enqueue_memop(gpu_stream_of(gpu_key(s, ptsz)), WORK_WAIT, p, value, flags == 2);
    pthread_mutex_unlock(&gpu.lock);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamWaitValue64_v2(CUstream s, CUdeviceptr address, uint64_t value, unsigned int flags) {
    return wait_value64(s, address, value, flags, 0);
}

EXPORT CUresult cuStreamWaitValue64(CUstream s, CUdeviceptr address, uint64_t value, unsigned int flags) {
    return wait_value64(s, address, value, flags, 0);
}

EXPORT CUresult cuStreamWriteValue64_v2(CUstream s, CUdeviceptr address, uint64_t value, unsigned int flags) {
    return write_value64(s, address, value, flags, 0);
}

EXPORT CUresult cuStreamWriteValue64(CUstream s, CUdeviceptr address, uint64_t value, unsigned int flags) {
    return write_value64(s, address, value, flags, 0);
}

EXPORT CUresult cuStreamWriteValue64_v2_ptsz(CUstream s, CUdeviceptr address, uint64_t value,
                                             unsigned int flags) {
    return write_value64(s, address, value, flags, 1);
}

/* ------------------------------------------------------ plain calls */

EXPORT CUresult cuDriverGetVersion(int *version) {
    cuDriverGetVersion_params p = {version};
    api_call c;
    enter(&c, FAKE_CBID_cuDriverGetVersion, "cuDriverGetVersion", &p, NULL);
    if (!version) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    *version = 13000;
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuModuleGetFunction(CUfunction *out, CUmodule mod, const char *name) {
    CHECK_INIT();
    cuModuleGetFunction_params p = {out, mod, name};
    api_call c;
    enter(&c, FAKE_CBID_cuModuleGetFunction, "cuModuleGetFunction", &p, NULL);
    if (!out || !name) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    CUfunction f = calloc(1, sizeof *f);
    snprintf(f->name, sizeof f->name, "%s", name);
    f->registers = 16 + (int)(strlen(name) % 48);
    f->static_smem = 256 * (int)(strlen(name) % 5);
    f->block[0] = f->block[1] = f->block[2] = 1;
    f->module = mod;
    f->max_dynamic_smem = 48 << 10;
    size_t n = strlen(name), k = strlen("__tally_slice");
    f->nparams = env_int("FAKE_CUDA_PARAM_COUNT", 2) + (n > k && strcmp(name + n - k, "__tally_slice") == 0 ? 4 : 0);
    *out = f;
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuFuncSetBlockShape(CUfunction f, int x, int y, int z) {
    CHECK_INIT();
    cuFuncSetBlockShape_params p = {f, x, y, z};
    api_call c;
    enter(&c, FAKE_CBID_cuFuncSetBlockShape, "cuFuncSetBlockShape", &p, NULL);
    if (!f || x <= 0 || y <= 0 || z <= 0) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    f->block[0] = (unsigned)x, f->block[1] = (unsigned)y, f->block[2] = (unsigned)z;
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuStreamCreate(CUstream *out, unsigned int flags) {
    CHECK_INIT();
    cuStreamCreate_params p = {out, flags};
    api_call c;
    enter(&c, FAKE_CBID_cuStreamCreate, "cuStreamCreate", &p, NULL);
    if (!out) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    CUstream s = calloc(1, sizeof *s);
    s->id = atomic_fetch_add(&next_stream_id, 1);
    *out = s;
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuCtxSynchronize(void) {
    CHECK_INIT();
    cuCtxSynchronize_params p = {0};
    api_call c;
    enter(&c, FAKE_CBID_cuCtxSynchronize, "cuCtxSynchronize", &p, NULL);
    gpu_synchronize();
    return leave(&c, CUDA_SUCCESS);
}

/* Loads from memory: the fake driver does not look at the image (the agent
 * must find its size by itself, as with the real driver), it only hands out
 * a handle. */
static CUresult module_load_result(const void *image) {
    if (!image) return CUDA_ERROR_INVALID_VALUE;
    const char *forced = getenv("FAKE_CUDA_MODULE_LOAD_RESULT");
    return forced && *forced ? (CUresult)atoi(forced) : CUDA_SUCCESS;
}

static atomic_uint next_module_id = 1;

static void *new_handle(void) {
    return (void *)(uintptr_t)(0x10000u + 16u * atomic_fetch_add(&next_module_id, 1));
}

/* A load from a file: the fake driver only checks that the file exists. */
EXPORT CUresult cuModuleLoad(CUmodule *module, const char *fname) {
    CHECK_INIT();
    cuModuleLoad_params p = {module, fname};
    api_call c;
    enter(&c, FAKE_CBID_cuModuleLoad, "cuModuleLoad", &p, NULL);
    if (!module || !fname) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    FILE *f = fopen(fname, "rb");
    if (!f) return leave(&c, CUDA_ERROR_FILE_NOT_FOUND);
    fclose(f);
    CUresult r = module_load_result(fname);
    if (r == CUDA_SUCCESS) *module = new_handle();
    return leave(&c, r);
}

EXPORT CUresult cuModuleLoadData(CUmodule *module, const void *image) {
    CHECK_INIT();
    cuModuleLoadData_params p = {module, image};
    api_call c;
    enter(&c, FAKE_CBID_cuModuleLoadData, "cuModuleLoadData", &p, NULL);
    if (!module) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    CUresult r = module_load_result(image);
    if (r == CUDA_SUCCESS) *module = new_handle();
    return leave(&c, r);
}

EXPORT CUresult cuModuleLoadDataEx(CUmodule *module, const void *image, unsigned int numOptions,
                                   CUjit_option *options, void **optionValues) {
    CHECK_INIT();
    cuModuleLoadDataEx_params p = {module, image, numOptions, options, optionValues};
    api_call c;
    enter(&c, FAKE_CBID_cuModuleLoadDataEx, "cuModuleLoadDataEx", &p, NULL);
    if (!module || (numOptions && (!options || !optionValues))) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    CUresult r = module_load_result(image);
    if (r == CUDA_SUCCESS) *module = new_handle();
    return leave(&c, r);
}

EXPORT CUresult cuModuleLoadFatBinary(CUmodule *module, const void *fatCubin) {
    CHECK_INIT();
    cuModuleLoadFatBinary_params p = {module, fatCubin};
    api_call c;
    enter(&c, FAKE_CBID_cuModuleLoadFatBinary, "cuModuleLoadFatBinary", &p, NULL);
    if (!module) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    CUresult r = module_load_result(fatCubin);
    if (r == CUDA_SUCCESS) *module = new_handle();
    return leave(&c, r);
}

EXPORT CUresult cuLibraryLoadData(CUlibrary *library, const void *code, CUjit_option *jitOptions,
                                  void **jitOptionsValues, unsigned int numJitOptions,
                                  CUlibraryOption *libraryOptions, void **libraryOptionValues,
                                  unsigned int numLibraryOptions) {
    CHECK_INIT();
    cuLibraryLoadData_params p = {library, code, jitOptions, jitOptionsValues, numJitOptions,
                                  libraryOptions, libraryOptionValues, numLibraryOptions};
    api_call c;
    enter(&c, FAKE_CBID_cuLibraryLoadData, "cuLibraryLoadData", &p, NULL);
    if (!library) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    CUresult r = module_load_result(code);
    if (r == CUDA_SUCCESS) *library = new_handle();
    return leave(&c, r);
}

/* Stands in for cuGraphCreate + cuGraphAddKernelNode + cuGraphInstantiate. */
EXPORT CUresult fake_cuda_graph_exec_create(CUgraphExec *out, const CUfunction *nodes, int n_nodes) {
    CHECK_INIT();
    if (!out || n_nodes < 0 || n_nodes > FAKE_GRAPH_MAX_NODES) return CUDA_ERROR_INVALID_VALUE;
    CUgraphExec g = calloc(1, sizeof *g);
    g->id = atomic_fetch_add(&next_graph_id, 1);
    g->n_nodes = n_nodes;
    for (int i = 0; i < n_nodes; i++) g->nodes[i] = nodes[i];
    *out = g;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleUnload(CUmodule mod) {
    CHECK_INIT();
    cuModuleUnload_params p = {mod};
    api_call c;
    enter(&c, FAKE_CBID_cuModuleUnload, "cuModuleUnload", &p, NULL);
    return leave(&c, mod ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE);
}

/* Calls tally makes that need no callback. */
EXPORT CUresult cuFuncGetModule(CUmodule *out, CUfunction f) {
    CHECK_INIT();
    if (!out || !f) return CUDA_ERROR_INVALID_VALUE;
    if (!f->module) return CUDA_ERROR_NOT_FOUND;
    *out = f->module;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncGetParamInfo(CUfunction f, size_t index, size_t *offset, size_t *size) {
    CHECK_INIT();
    if (!f || !offset || !size) return CUDA_ERROR_INVALID_VALUE;
    size_t n = strlen(f->name), k = strlen("__tally_slice");
    int slice = n > k && strcmp(f->name + n - k, "__tally_slice") == 0;
    int originals = f->nparams - (slice ? 4 : 0);
    if (index >= (size_t)f->nparams) return CUDA_ERROR_INVALID_VALUE;
    *offset = index < (size_t)originals ? 8 * index : 8 * (size_t)originals + 4 * (index - (size_t)originals);
    *size = index < (size_t)originals ? 8 : 4;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int *blocks, CUfunction f, int block_threads,
                                                            size_t smem) {
    CHECK_INIT();
    if (!blocks || !f || block_threads <= 0) return CUDA_ERROR_INVALID_VALUE;
    *blocks = smem > (size_t)f->max_dynamic_smem ? 0 : env_int("FAKE_CUDA_OCCUPANCY", 2);
    return CUDA_SUCCESS;
}

/* Only the dynamic shared memory limit (8) and the carveout (9) are known. */
EXPORT CUresult cuFuncGetAttribute(int *value, int attribute, CUfunction f) {
    CHECK_INIT();
    if (!value || !f) return CUDA_ERROR_INVALID_VALUE;
    if (attribute == 8) *value = f->max_dynamic_smem;
    else if (attribute == 9) *value = -1;
    else return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetAttribute(CUfunction f, int attribute, int value) {
    CHECK_INIT();
    if (!f) return CUDA_ERROR_INVALID_VALUE;
    if (attribute == 8) {
        if (value < 0 || value > 227 << 10) return CUDA_ERROR_INVALID_VALUE;
        f->max_dynamic_smem = value;
    } else if (attribute != 9) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    CHECK_INIT();
    if (!value || device != 0) return CUDA_ERROR_INVALID_VALUE;
    if (attribute != 16 /* CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT */) return CUDA_ERROR_INVALID_VALUE;
    *value = env_int("FAKE_CUDA_SM_COUNT", 4);
    return CUDA_SUCCESS;
}

#define LAUNCH_RECORDS 65536
static fake_launch_record launch_records[LAUNCH_RECORDS];
static long n_launch_records;
static pthread_mutex_t records_lock = PTHREAD_MUTEX_INITIALIZER;

static void record_launch(CUfunction f, unsigned gx, unsigned gy, unsigned gz, void **params) {
    pthread_mutex_lock(&records_lock);
    if (n_launch_records < LAUNCH_RECORDS) {
        fake_launch_record *r = &launch_records[n_launch_records++];
        memset(r, 0, sizeof *r);
        snprintf(r->name, sizeof r->name, "%s", f->name);
        r->grid[0] = gx, r->grid[1] = gy, r->grid[2] = gz;
        r->first_param = params && f->nparams > 0 ? params[0] : NULL;
        size_t n = strlen(f->name), k = strlen("__tally_slice");
        if (params && n > k && strcmp(f->name + n - k, "__tally_slice") == 0 && f->nparams >= 4)
            for (int i = 0; i < 4; i++) r->appended[i] = *(const unsigned *)params[f->nparams - 4 + i];
    }
    pthread_mutex_unlock(&records_lock);
}

EXPORT int fake_cuda_launch_record(long i, fake_launch_record *out) {
    pthread_mutex_lock(&records_lock);
    int ok = i >= 0 && i < n_launch_records;
    if (ok) *out = launch_records[i];
    pthread_mutex_unlock(&records_lock);
    return ok;
}

/* ---------------------------------------------------------- launches */

static CUresult launch_kernel(uint32_t cbid, const char *name, int ptsz, CUfunction f, unsigned gx,
                              unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                              unsigned smem, CUstream s, void **params, void **extra) {
    CHECK_INIT();
    cuLaunchKernel_params p = {f, gx, gy, gz, bx, by, bz, smem, s, params, extra};
    api_call c;
    enter(&c, cbid, name, &p, f ? f->name : NULL);
    /* What runs is what the parameter block says after API enter. */
    f = p.f, gx = p.gridDimX, gy = p.gridDimY, gz = p.gridDimZ, bx = p.blockDimX, by = p.blockDimY, bz = p.blockDimZ;
    smem = p.sharedMemBytes, s = p.hStream;
    if (!f || !gx || !gy || !gz || !bx || !by || !bz) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    if (smem > (unsigned)f->max_dynamic_smem) return leave(&c, CUDA_ERROR_INVALID_VALUE); /* as the real driver */
    record_launch(f, gx, gy, gz, p.kernelParams);
    run_kernel(&c, gpu_key(s, ptsz), f, gx, gy, gz, bx, by, bz, smem, stream_id(s, ptsz), 0, 0, 0, 0);
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                               unsigned by, unsigned bz, unsigned smem, CUstream s, void **params,
                               void **extra) {
    return launch_kernel(FAKE_CBID_cuLaunchKernel, "cuLaunchKernel", 0, f, gx, gy, gz, bx, by, bz,
                         smem, s, params, extra);
}

EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                    unsigned by, unsigned bz, unsigned smem, CUstream s,
                                    void **params, void **extra) {
    return launch_kernel(FAKE_CBID_cuLaunchKernel_ptsz, "cuLaunchKernel_ptsz", 1, f, gx, gy, gz, bx,
                         by, bz, smem, s, params, extra);
}

static CUresult launch_kernel_ex(uint32_t cbid, const char *name, int ptsz, const CUlaunchConfig *cfg,
                                 CUfunction f, void **params, void **extra) {
    CHECK_INIT();
    cuLaunchKernelEx_params p = {cfg, f, params, extra};
    api_call c;
    enter(&c, cbid, name, &p, f ? f->name : NULL);
    cfg = p.config, f = p.f; /* as rewritten at API enter, if it was */
    if (!cfg || !f) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    record_launch(f, cfg->gridDimX, cfg->gridDimY, cfg->gridDimZ, p.kernelParams);
    run_kernel(&c, gpu_key(cfg->hStream, ptsz), f, cfg->gridDimX, cfg->gridDimY, cfg->gridDimZ, cfg->blockDimX, cfg->blockDimY,
               cfg->blockDimZ, cfg->sharedMemBytes, stream_id(cfg->hStream, ptsz), 0, 0, 0, 0);
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *cfg, CUfunction f, void **params, void **extra) {
    return launch_kernel_ex(FAKE_CBID_cuLaunchKernelEx, "cuLaunchKernelEx", 0, cfg, f, params, extra);
}

EXPORT CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *cfg, CUfunction f, void **params,
                                      void **extra) {
    return launch_kernel_ex(FAKE_CBID_cuLaunchKernelEx_ptsz, "cuLaunchKernelEx_ptsz", 1, cfg, f,
                            params, extra);
}

static CUresult launch_coop(uint32_t cbid, const char *name, int ptsz, CUfunction f, unsigned gx,
                            unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned smem, CUstream s, void **params) {
    CHECK_INIT();
    cuLaunchCooperativeKernel_params p = {f, gx, gy, gz, bx, by, bz, smem, s, params};
    api_call c;
    enter(&c, cbid, name, &p, f ? f->name : NULL);
    if (!f) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    run_kernel(&c, gpu_key(s, ptsz), f, gx, gy, gz, bx, by, bz, smem, stream_id(s, ptsz), 0, 1, 0, 0);
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz,
                                          unsigned bx, unsigned by, unsigned bz, unsigned smem,
                                          CUstream s, void **params) {
    return launch_coop(FAKE_CBID_cuLaunchCooperativeKernel, "cuLaunchCooperativeKernel", 0, f, gx, gy,
                       gz, bx, by, bz, smem, s, params);
}

EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz,
                                               unsigned bx, unsigned by, unsigned bz, unsigned smem,
                                               CUstream s, void **params) {
    return launch_coop(FAKE_CBID_cuLaunchCooperativeKernel_ptsz, "cuLaunchCooperativeKernel_ptsz", 1,
                       f, gx, gy, gz, bx, by, bz, smem, s, params);
}

/* One API call, one kernel per device (device i runs launchParamsList[i]). */
EXPORT CUresult cuLaunchCooperativeKernelMultiDevice(CUDA_LAUNCH_PARAMS *list, unsigned int n,
                                                     unsigned int flags) {
    CHECK_INIT();
    cuLaunchCooperativeKernelMultiDevice_params p = {list, n, flags};
    api_call c;
    enter(&c, FAKE_CBID_cuLaunchCooperativeKernelMultiDevice, "cuLaunchCooperativeKernelMultiDevice",
          &p, (list && n) ? list[0].function->name : NULL);
    if (!list || !n) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    for (unsigned i = 0; i < n; i++) {
        const CUDA_LAUNCH_PARAMS *l = &list[i];
        run_kernel(&c, gpu_key(l->hStream, 0), l->function, l->gridDimX, l->gridDimY, l->gridDimZ, l->blockDimX, l->blockDimY,
                   l->blockDimZ, l->sharedMemBytes, stream_id(l->hStream, 0), i, 2, 0, 0);
    }
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuLaunch(CUfunction f) {
    CHECK_INIT();
    cuLaunch_params p = {f};
    api_call c;
    enter(&c, FAKE_CBID_cuLaunch, "cuLaunch", &p, f ? f->name : NULL);
    if (!f) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    run_kernel(&c, GPU_KEY_LEGACY, f, 1, 1, 1, f->block[0], f->block[1], f->block[2], 0, FAKE_STREAM_DEFAULT_ID, 0, 0,
               0, 0);
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuLaunchGrid(CUfunction f, int w, int h) {
    CHECK_INIT();
    cuLaunchGrid_params p = {f, w, h};
    api_call c;
    enter(&c, FAKE_CBID_cuLaunchGrid, "cuLaunchGrid", &p, f ? f->name : NULL);
    if (!f || w <= 0 || h <= 0) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    run_kernel(&c, GPU_KEY_LEGACY, f, (unsigned)w, (unsigned)h, 1, f->block[0], f->block[1], f->block[2], 0,
               FAKE_STREAM_DEFAULT_ID, 0, 0, 0, 0);
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuLaunchGridAsync(CUfunction f, int w, int h, CUstream s) {
    CHECK_INIT();
    cuLaunchGridAsync_params p = {f, w, h, s};
    api_call c;
    enter(&c, FAKE_CBID_cuLaunchGridAsync, "cuLaunchGridAsync", &p, f ? f->name : NULL);
    if (!f || w <= 0 || h <= 0) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    run_kernel(&c, gpu_key(s, 0), f, (unsigned)w, (unsigned)h, 1, f->block[0], f->block[1], f->block[2], 0,
               stream_id(s, 0), 0, 0, 0, 0);
    return leave(&c, CUDA_SUCCESS);
}

static CUresult graph_launch(uint32_t cbid, const char *name, int ptsz, CUgraphExec g, CUstream s) {
    CHECK_INIT();
    cuGraphLaunch_params p = {g, s};
    api_call c;
    enter(&c, cbid, name, &p, NULL);
    if (!g) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    for (int i = 0; i < g->n_nodes; i++)
        run_kernel(&c, gpu_key(s, ptsz), g->nodes[i], 4, 1, 1, 128, 1, 1, 0, stream_id(s, ptsz), 0, 0, g->id,
                   ((uint64_t)g->id << 32) | (uint64_t)i);
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuGraphLaunch(CUgraphExec g, CUstream s) {
    return graph_launch(FAKE_CBID_cuGraphLaunch, "cuGraphLaunch", 0, g, s);
}

EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec g, CUstream s) {
    return graph_launch(FAKE_CBID_cuGraphLaunch_ptsz, "cuGraphLaunch_ptsz", 1, g, s);
}

/* Enqueues host code, not a kernel: runs fn, produces no kernel record. */
static CUresult host_func(uint32_t cbid, const char *name, CUstream s, CUhostFn fn, void *arg) {
    CHECK_INIT();
    cuLaunchHostFunc_params p = {s, fn, arg};
    api_call c;
    enter(&c, cbid, name, &p, NULL);
    if (!fn) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    fn(arg);
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuLaunchHostFunc(CUstream s, CUhostFn fn, void *arg) {
    return host_func(FAKE_CBID_cuLaunchHostFunc, "cuLaunchHostFunc", s, fn, arg);
}

EXPORT CUresult cuLaunchHostFunc_ptsz(CUstream s, CUhostFn fn, void *arg) {
    return host_func(FAKE_CBID_cuLaunchHostFunc_ptsz, "cuLaunchHostFunc_ptsz", s, fn, arg);
}
