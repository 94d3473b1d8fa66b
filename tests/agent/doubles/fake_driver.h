/* Shared declarations of the libcuda / libcupti test doubles.
 *
 * The doubles stand in for the NVIDIA driver and CUPTI so the tally agent can be
 * driven on a machine without a GPU. Types and parameter blocks follow the real
 * CUDA 13.0 ABI (cuda.h, generated_cuda_meta.h, cupti_callbacks.h), declared
 * here so no CUDA toolkit is needed to build the doubles.
 *
 * How the pieces talk: the application calls the fake libcuda's cu* functions.
 * Like the real driver, the fake libcuda reports each API call to the attached
 * profiling tool (the fake libcupti registers itself through
 * fake_cuda_register_tool when it is loaded); the tool turns those reports into
 * CUPTI callbacks for whoever subscribed and into activity records.
 */
#ifndef FAKE_DRIVER_H
#define FAKE_DRIVER_H

#include <stdint.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUlib_st *CUlibrary;
typedef int CUjit_option;      /* enum CUjit_option */
typedef int CUlibraryOption;   /* enum CUlibraryOption */
typedef struct CUstream_st *CUstream;
typedef struct CUfunc_st *CUfunction;
typedef struct CUgraphExec_st *CUgraphExec;
typedef void (*CUhostFn)(void *userData);
typedef unsigned long long CUdeviceptr;
typedef struct { char bytes[16]; } CUuuid;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CUDA_ERROR_NOT_INITIALIZED 3
#define CUDA_ERROR_FILE_NOT_FOUND 301
#define CUDA_ERROR_NOT_FOUND 500
#define CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED 712
#define CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED 713
#define CUDA_ERROR_STREAM_CAPTURE_IMPLICIT 906

/* The double's objects behind the opaque handles. */
struct CUfunc_st {
    char name[256];
    int registers;
    int static_smem;
    unsigned block[3]; /* cuFuncSetBlockShape, for the legacy cuLaunch* */
    CUmodule module;   /* cuFuncGetModule; NULL for functions of no module */
    int nparams;       /* cuFuncGetParamInfo: parameters of 8 bytes, and 4 of 4 bytes for __tally_slice entries */
    int max_dynamic_smem; /* CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: 48 KiB until raised */
};
struct CUstream_st {
    uint32_t id;
};
#define FAKE_GRAPH_MAX_NODES 8
struct CUgraphExec_st {
    uint32_t id;
    int n_nodes;
    CUfunction nodes[FAKE_GRAPH_MAX_NODES];
};

typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    void *attrs; /* CUlaunchAttribute * */
    unsigned int numAttrs;
} CUlaunchConfig;

typedef struct {
    CUfunction function;
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    void **kernelParams;
} CUDA_LAUNCH_PARAMS;

/* Parameter blocks handed to CUPTI callbacks (generated_cuda_meta.h). */
typedef struct {
    CUfunction f;
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    void **kernelParams;
    void **extra;
} cuLaunchKernel_params;
typedef cuLaunchKernel_params cuLaunchKernel_ptsz_params;

typedef struct {
    const CUlaunchConfig *config;
    CUfunction f;
    void **kernelParams;
    void **extra;
} cuLaunchKernelEx_params;
typedef cuLaunchKernelEx_params cuLaunchKernelEx_ptsz_params;

typedef struct {
    CUfunction f;
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    void **kernelParams;
} cuLaunchCooperativeKernel_params;
typedef cuLaunchCooperativeKernel_params cuLaunchCooperativeKernel_ptsz_params;

typedef struct {
    CUDA_LAUNCH_PARAMS *launchParamsList;
    unsigned int numDevices;
    unsigned int flags;
} cuLaunchCooperativeKernelMultiDevice_params;

typedef struct { CUfunction f; } cuLaunch_params;
typedef struct { CUfunction f; int grid_width; int grid_height; } cuLaunchGrid_params;
typedef struct { CUfunction f; int grid_width; int grid_height; CUstream hStream; } cuLaunchGridAsync_params;
typedef struct { CUgraphExec hGraph; CUstream hStream; } cuGraphLaunch_params;
typedef cuGraphLaunch_params cuGraphLaunch_ptsz_params;
typedef struct { CUstream hStream; CUhostFn fn; void *userData; } cuLaunchHostFunc_params;
typedef struct { int *driverVersion; } cuDriverGetVersion_params;
typedef struct { CUfunction *hfunc; CUmodule hmod; const char *name; } cuModuleGetFunction_params;
typedef struct { CUstream *phStream; unsigned int Flags; } cuStreamCreate_params;
typedef struct { CUfunction hfunc; int x; int y; int z; } cuFuncSetBlockShape_params;
typedef struct { int dummy; } cuCtxSynchronize_params;
typedef struct { CUmodule *module; const void *image; } cuModuleLoadData_params;
typedef struct {
    CUmodule *module;
    const void *image;
    unsigned int numOptions;
    CUjit_option *options;
    void **optionValues;
} cuModuleLoadDataEx_params;
typedef struct { CUmodule *module; const void *fatCubin; } cuModuleLoadFatBinary_params;
typedef struct { CUmodule hmod; } cuModuleUnload_params;
typedef struct { CUmodule *module; const char *fname; } cuModuleLoad_params;
typedef struct {
    CUlibrary *library;
    const void *code;
    CUjit_option *jitOptions;
    void **jitOptionsValues;
    unsigned int numJitOptions;
    CUlibraryOption *libraryOptions;
    void **libraryOptionValues;
    unsigned int numLibraryOptions;
} cuLibraryLoadData_params;

/* Driver-API callback ids of CUDA 13.0 (cupti_driver_cbid.h) the doubles use. */
enum {
    FAKE_CBID_cuInit = 1,
    FAKE_CBID_cuDriverGetVersion = 2,
    FAKE_CBID_cuCtxSynchronize = 17,
    FAKE_CBID_cuModuleLoad = 18,
    FAKE_CBID_cuModuleLoadData = 19,
    FAKE_CBID_cuModuleLoadDataEx = 20,
    FAKE_CBID_cuModuleLoadFatBinary = 21,
    FAKE_CBID_cuModuleUnload = 22,
    FAKE_CBID_cuModuleGetFunction = 23,
    FAKE_CBID_cuFuncSetBlockShape = 83,
    FAKE_CBID_cuLaunch = 115,
    FAKE_CBID_cuLaunchGrid = 116,
    FAKE_CBID_cuLaunchGridAsync = 117,
    FAKE_CBID_cuStreamCreate = 124,
    FAKE_CBID_cuLaunchKernel = 307,
    FAKE_CBID_cuLaunchKernel_ptsz = 442,
    FAKE_CBID_cuLaunchCooperativeKernel = 477,
    FAKE_CBID_cuLaunchCooperativeKernel_ptsz = 478,
    FAKE_CBID_cuLaunchCooperativeKernelMultiDevice = 480,
    FAKE_CBID_cuGraphLaunch = 514,
    FAKE_CBID_cuGraphLaunch_ptsz = 515,
    FAKE_CBID_cuLaunchHostFunc = 527,
    FAKE_CBID_cuLaunchHostFunc_ptsz = 528,
    FAKE_CBID_cuLaunchKernelEx = 652,
    FAKE_CBID_cuLaunchKernelEx_ptsz = 653,
    FAKE_CBID_cuLibraryLoadData = 678,
};

/* One kernel execution, as the fake GPU reports it to the tool. */
typedef struct {
    const char *name;
    int registers;
    int static_smem;
    unsigned grid[3], block[3];
    unsigned dynamic_smem;
    uint32_t device_id, context_id, stream_id;
    uint8_t launch_type; /* CUpti_ActivityLaunchType */
    uint32_t graph_id;
    uint64_t graph_node_id;
    uint64_t duration_ns; /* how long the fake GPU runs it; 0: no queue time set */
} fake_kernel_exec;

typedef struct {
    int version; /* 1 */
    /* Before the API call: returns the call's correlation id. */
    uint32_t (*api_enter)(uint32_t cbid, const char *function_name, const void *params,
                          const char *symbol_name, uint64_t *correlation_data);
    /* After the API call. */
    void (*api_exit)(uint32_t cbid, const char *function_name, const void *params,
                     const char *symbol_name, uint32_t correlation_id, uint64_t *correlation_data,
                     CUresult *result);
    /* A kernel launched by the call with that correlation id ran on the fake GPU. */
    void (*kernel_executed)(uint32_t correlation_id, const fake_kernel_exec *k);
} fake_tool_ops;

/* Exported by the fake libcuda. */
void fake_cuda_register_tool(const fake_tool_ops *ops);
CUresult fake_cuda_graph_exec_create(CUgraphExec *out, const CUfunction *nodes, int n_nodes);
void fake_cuda_set_kernel_duration_us(unsigned us);
void fake_cuda_set_capturing(CUstream s, int per_thread_default, int on);
int fake_cuda_gpu_stats(uint64_t *out, int n);
uint64_t fake_cuda_stream_writes(CUstream s);
void fake_cuda_set_wave_duration_us(unsigned us);
/* The i-th kernel launch the fake GPU ran (in launch order): its function's
 * name, grid, and for a __tally_slice entry the four appended parameters.
 * Returns 0 past the last one. */
typedef struct {
    char name[256];
    unsigned grid[3];
    void *first_param;    /* the pointer kernelParams[0] held, or NULL */
    unsigned appended[4]; /* grid x, y, z, block offset of a slice */
} fake_launch_record;
int fake_cuda_launch_record(long i, fake_launch_record *out);

#define FAKE_STREAM_DEFAULT_ID 7u   /* CUPTI's id of the legacy default stream */
#define FAKE_STREAM_PER_THREAD_ID 13u
#define FAKE_CONTEXT_ID 1u

#endif
