/* Test double of the CUDA driver, built as libcuda.so.1.
 *
 * cuInit does what the real driver does with CUDA_INJECTION64_PATH: on the
 * first call it dlopens that library and calls its InitializeInjection() once.
 * Every API call is reported to the attached tool (the fake libcupti), which
 * turns it into CUPTI callbacks; launches "run" at once on a fake GPU and are
 * reported as kernel executions for the Activity API. No callbacks happen
 * while no tool is attached, as with the real driver.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static void run_kernel(api_call *c, CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                       unsigned by, unsigned bz, unsigned smem, uint32_t stream, uint32_t device,
                       uint8_t launch_type, uint32_t graph_id, uint64_t node_id) {
    if (!c->tool) return;
    fake_kernel_exec k = {
        .name = f->name, .registers = f->registers, .static_smem = f->static_smem,
        .grid = {gx, gy, gz}, .block = {bx, by, bz}, .dynamic_smem = smem,
        .device_id = device, .context_id = FAKE_CONTEXT_ID, .stream_id = stream,
        .launch_type = launch_type, .graph_id = graph_id, .graph_node_id = node_id,
    };
    c->tool->kernel_executed(c->correlation, &k);
}

#define CHECK_INIT() \
    do { if (!atomic_load(&initialized)) return CUDA_ERROR_NOT_INITIALIZED; } while (0)

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
    return leave(&c, CUDA_SUCCESS);
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

/* ---------------------------------------------------------- launches */

static CUresult launch_kernel(uint32_t cbid, const char *name, int ptsz, CUfunction f, unsigned gx,
                              unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                              unsigned smem, CUstream s, void **params, void **extra) {
    CHECK_INIT();
    cuLaunchKernel_params p = {f, gx, gy, gz, bx, by, bz, smem, s, params, extra};
    api_call c;
    enter(&c, cbid, name, &p, f ? f->name : NULL);
    if (!f || !gx || !gy || !gz || !bx || !by || !bz) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    run_kernel(&c, f, gx, gy, gz, bx, by, bz, smem, stream_id(s, ptsz), 0, 0, 0, 0);
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
    if (!cfg || !f) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    run_kernel(&c, f, cfg->gridDimX, cfg->gridDimY, cfg->gridDimZ, cfg->blockDimX, cfg->blockDimY,
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
    run_kernel(&c, f, gx, gy, gz, bx, by, bz, smem, stream_id(s, ptsz), 0, 1, 0, 0);
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
        run_kernel(&c, l->function, l->gridDimX, l->gridDimY, l->gridDimZ, l->blockDimX, l->blockDimY,
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
    run_kernel(&c, f, 1, 1, 1, f->block[0], f->block[1], f->block[2], 0, FAKE_STREAM_DEFAULT_ID, 0, 0,
               0, 0);
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuLaunchGrid(CUfunction f, int w, int h) {
    CHECK_INIT();
    cuLaunchGrid_params p = {f, w, h};
    api_call c;
    enter(&c, FAKE_CBID_cuLaunchGrid, "cuLaunchGrid", &p, f ? f->name : NULL);
    if (!f || w <= 0 || h <= 0) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    run_kernel(&c, f, (unsigned)w, (unsigned)h, 1, f->block[0], f->block[1], f->block[2], 0,
               FAKE_STREAM_DEFAULT_ID, 0, 0, 0, 0);
    return leave(&c, CUDA_SUCCESS);
}

EXPORT CUresult cuLaunchGridAsync(CUfunction f, int w, int h, CUstream s) {
    CHECK_INIT();
    cuLaunchGridAsync_params p = {f, w, h, s};
    api_call c;
    enter(&c, FAKE_CBID_cuLaunchGridAsync, "cuLaunchGridAsync", &p, f ? f->name : NULL);
    if (!f || w <= 0 || h <= 0) return leave(&c, CUDA_ERROR_INVALID_VALUE);
    run_kernel(&c, f, (unsigned)w, (unsigned)h, 1, f->block[0], f->block[1], f->block[2], 0,
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
        run_kernel(&c, g->nodes[i], 4, 1, 1, 128, 1, 1, 0, stream_id(s, ptsz), 0, 0, g->id,
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
