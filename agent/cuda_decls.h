/* The few CUDA driver and CUPTI declarations the agent needs.
 *
 * Declared here rather than included from the toolkit so the agent builds on a
 * machine with no CUDA toolkit; libcuda and libcupti are loaded at run time.
 * Every value below is part of the public, versioned ABI (cuda.h, cupti_*.h of
 * CUDA 12 and 13); enum values are appended to, never renumbered, by NVIDIA.
 */
#ifndef TALLY_CUDA_DECLS_H
#define TALLY_CUDA_DECLS_H

#include <stddef.h>
#include <stdint.h>

/* ---- driver API ---- */
typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUfunc_st *CUfunction;
typedef struct CUmod_st *CUmodule;
typedef struct CUgraphExec_st *CUgraphExec;
typedef unsigned long long CUdeviceptr;
typedef struct { char bytes[16]; } CUuuid;

#define CUDA_SUCCESS 0
/* cuStreamWaitValue64's conditions: the word >= value, or (word & value) != 0 */
#define CU_STREAM_WAIT_VALUE_GEQ 0x0
#define CU_STREAM_WAIT_VALUE_AND 0x2

/* cuLaunchKernel's parameter block as CUPTI hands it to callbacks
 * (generated_cuda_meta.h: cuLaunchKernel_params / cuLaunchKernel_ptsz_params). */
typedef struct {
    CUfunction f;
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    void **kernelParams;
    void **extra;
} tally_cuLaunchKernel_params;

/* CUlaunchConfig (cuda.h, CUDA >= 11.8) and cuLaunchKernelEx_params. */
typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    void *attrs;
    unsigned int numAttrs;
} tally_CUlaunchConfig;

typedef struct {
    const tally_CUlaunchConfig *config;
    CUfunction f;
    void **kernelParams;
    void **extra;
} tally_cuLaunchKernelEx_params;

typedef struct {
    CUgraphExec hGraphExec;
    CUstream hStream;
} tally_cuGraphLaunch_params;

/* ---- CUPTI ---- */
typedef int CUptiResult;
typedef int CUpti_CallbackDomain;
typedef uint32_t CUpti_CallbackId;
typedef int CUpti_ActivityKind;
typedef struct CUpti_Subscriber_st *CUpti_SubscriberHandle;

#define CUPTI_SUCCESS 0
#define CUPTI_ERROR_INVALID_PARAMETER 1
#define CUPTI_ERROR_MAX_LIMIT_REACHED 12
#define CUPTI_ERROR_NOT_INITIALIZED 15
#define CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED 39

#define CUPTI_CB_DOMAIN_DRIVER_API 1
#define CUPTI_API_ENTER 0
#define CUPTI_API_EXIT 1

#define CUPTI_ACTIVITY_KIND_KERNEL 3
#define CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL 10

typedef struct {
    int callbackSite; /* CUPTI_API_ENTER / CUPTI_API_EXIT */
    const char *functionName;
    const void *functionParams;
    void *functionReturnValue;
    const char *symbolName;
    CUcontext context;
    uint32_t contextUid;
    uint64_t *correlationData;
    uint32_t correlationId;
} CUpti_CallbackData;

typedef void (*CUpti_CallbackFunc)(void *userdata, CUpti_CallbackDomain domain,
                                   CUpti_CallbackId cbid, const void *cbdata);
typedef void (*CUpti_BuffersCallbackRequestFunc)(uint8_t **buffer, size_t *size,
                                                 size_t *maxNumRecords);
typedef void (*CUpti_BuffersCallbackCompleteFunc)(CUcontext context, uint32_t streamId,
                                                  uint8_t *buffer, size_t size,
                                                  size_t validSize);

/* The leading fields of every kernel activity record. CUpti_ActivityKernel4
 * through CUpti_ActivityKernel10 (CUDA 13.0) share this prefix byte for byte;
 * later versions only append. CUPTI packs these records with 8-byte alignment. */
typedef struct __attribute__((packed, aligned(8))) {
    CUpti_ActivityKind kind;
    uint8_t cacheConfig;
    uint8_t sharedMemoryConfig;
    uint16_t registersPerThread;
    int32_t partitionedGlobalCacheRequested;
    int32_t partitionedGlobalCacheExecuted;
    uint64_t start;
    uint64_t end;
    uint64_t completed;
    uint32_t deviceId;
    uint32_t contextId;
    uint32_t streamId;
    int32_t gridX, gridY, gridZ;
    int32_t blockX, blockY, blockZ;
    int32_t staticSharedMemory;
    int32_t dynamicSharedMemory;
    uint32_t localMemoryPerThread;
    uint32_t localMemoryTotal;
    uint32_t correlationId;
    int64_t gridId;
    const char *name;
} tally_ActivityKernelPrefix;

_Static_assert(offsetof(tally_ActivityKernelPrefix, start) == 16, "CUPTI kernel record layout");
_Static_assert(offsetof(tally_ActivityKernelPrefix, streamId) == 48, "CUPTI kernel record layout");
_Static_assert(offsetof(tally_ActivityKernelPrefix, correlationId) == 92, "CUPTI kernel record layout");
_Static_assert(offsetof(tally_ActivityKernelPrefix, name) == 104, "CUPTI kernel record layout");

typedef struct {
    CUpti_ActivityKind kind;
} tally_ActivityHeader;

#endif
