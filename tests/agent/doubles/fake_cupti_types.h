/* The CUPTI types of CUDA 13.0 (cupti_result.h, cupti_callbacks.h,
 * cupti_activity.h) the libcupti double uses, declared without the toolkit.
 * test_agent.py checks these layouts against the toolkit headers when present. */
#ifndef FAKE_CUPTI_TYPES_H
#define FAKE_CUPTI_TYPES_H

#include <stddef.h>
#include <stdint.h>

#include "fake_driver.h"

typedef int CUptiResult;
typedef int CUpti_CallbackDomain;
typedef uint32_t CUpti_CallbackId;
typedef int CUpti_ActivityKind;

enum {
    CUPTI_SUCCESS = 0,
    CUPTI_ERROR_INVALID_PARAMETER = 1,
    CUPTI_ERROR_INVALID_OPERATION = 7,
    CUPTI_ERROR_OUT_OF_MEMORY = 8,
    CUPTI_ERROR_MAX_LIMIT_REACHED = 12,
    CUPTI_ERROR_NOT_INITIALIZED = 15,
    CUPTI_ERROR_INVALID_KIND = 21,
    CUPTI_ERROR_NOT_SUPPORTED = 27,
    CUPTI_ERROR_INSUFFICIENT_PRIVILEGES = 35,
    CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED = 39,
    CUPTI_ERROR_UNKNOWN = 999,
};

enum { CUPTI_CB_DOMAIN_DRIVER_API = 1 };
enum { CUPTI_API_ENTER = 0, CUPTI_API_EXIT = 1 };
enum {
    CUPTI_ACTIVITY_KIND_MEMCPY = 1,
    CUPTI_ACTIVITY_KIND_KERNEL = 3,
    CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL = 10,
};
#define MAX_ACTIVITY_KIND 64

typedef struct {
    int callbackSite;
    const char *functionName;
    const void *functionParams;
    void *functionReturnValue;
    const char *symbolName;
    CUcontext context;
    uint32_t contextUid;
    uint64_t *correlationData;
    uint32_t correlationId;
} CUpti_CallbackData;

typedef void (*CUpti_CallbackFunc)(void *userdata, CUpti_CallbackDomain domain, CUpti_CallbackId cbid,
                                   const void *cbdata);
typedef void (*CUpti_BuffersCallbackRequestFunc)(uint8_t **buffer, size_t *size, size_t *maxNumRecords);
typedef void (*CUpti_BuffersCallbackCompleteFunc)(CUcontext context, uint32_t streamId, uint8_t *buffer,
                                                  size_t size, size_t validSize);

/* CUpti_ActivityKernel10 of CUDA 13.0 (cupti_activity.h), field for field.
 * CUPTI records are packed with 8-byte alignment (PACKED_ALIGNMENT). */
typedef struct __attribute__((packed, aligned(8))) {
    CUpti_ActivityKind kind;
    uint8_t cacheConfig; /* union { both; {requested:4, executed:4} } */
    uint8_t sharedMemoryConfig;
    uint16_t registersPerThread;
    int32_t partitionedGlobalCacheRequested; /* CUpti_ActivityPartitionedGlobalCacheConfig */
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
    void *reserved0;
    uint64_t queued;
    uint64_t submitted;
    uint8_t launchType;
    uint8_t isSharedMemoryCarveoutRequested;
    uint8_t sharedMemoryCarveoutRequested;
    uint8_t padding;
    uint32_t sharedMemoryExecuted;
    uint64_t graphNodeId;
    int32_t shmemLimitConfig; /* CUpti_FuncShmemLimitConfig */
    uint32_t graphId;
    void *pAccessPolicyWindow; /* CUaccessPolicyWindow * */
    uint32_t channelID;
    int32_t channelType; /* CUpti_ChannelType */
    uint32_t clusterX, clusterY, clusterZ;
    uint32_t clusterSchedulingPolicy;
    uint64_t localMemoryTotal_v2;
    uint32_t maxPotentialClusterSize;
    uint32_t maxActiveClusters;
    uint8_t isDeviceLaunched;
    uint8_t padding3[7];
} fake_ActivityKernel10;

_Static_assert(sizeof(fake_ActivityKernel10) == 216, "CUpti_ActivityKernel10 is 216 bytes");
_Static_assert(offsetof(fake_ActivityKernel10, correlationId) == 92, "layout");
_Static_assert(offsetof(fake_ActivityKernel10, name) == 104, "layout");
_Static_assert(offsetof(fake_ActivityKernel10, graphNodeId) == 144, "layout");
_Static_assert(offsetof(fake_ActivityKernel10, isDeviceLaunched) == 208, "layout");

/* A record of another kind, 40 bytes (the double's own shape; only its kind
 * and length matter to a reader walking the buffer). */
typedef struct __attribute__((packed, aligned(8))) {
    CUpti_ActivityKind kind;
    uint32_t correlationId;
    uint64_t start, end, bytes;
    uint32_t deviceId, streamId;
} fake_ActivityOther;
_Static_assert(sizeof(fake_ActivityOther) == 40, "layout");

#endif
