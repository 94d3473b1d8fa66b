/* Test double of CUPTI, built as libcupti.so.
 *
 * Implements the callback and Activity API functions the tally agent resolves,
 * with the real signatures and semantics of CUDA 13.0:
 *   - one subscriber at a time: a second cuptiSubscribe returns 39
 *     (CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED);
 *   - cuptiGetCallbackName knows the real driver-API names and ids 1..806 and
 *     returns CUPTI_ERROR_INVALID_PARAMETER outside that range;
 *   - only enabled callbacks are delivered, ENTER then EXIT, with the real
 *     CUpti_CallbackData and the driver's parameter block;
 *   - kernel activity records are full-size CUpti_ActivityKernel10 records,
 *     several per buffer, handed out through the registered buffer callbacks
 *     and walked with cuptiActivityGetNextRecord.
 *
 * Build variants: -DFAKE_CUPTI_WITHOUT_ENABLE_CALLBACK (a libcupti lacking a
 * required symbol) and -DFAKE_CUPTI_WITHOUT_ACTIVITY (no Activity API).
 *
 * Knobs (environment, read when the library loads):
 *   FAKE_CUPTI_SUBSCRIBE_RESULT=n   cuptiSubscribe fails with n (e.g. 39: a
 *                                   profiler outside our view holds CUPTI)
 *   FAKE_CUPTI_RECORDS_PER_BUFFER=n a buffer is completed after n records (16)
 *   FAKE_CUPTI_FOREIGN_RECORDS=1    put a non-kernel record before every kernel
 *                                   record (as when another kind is enabled)
 *   FAKE_CUPTI_KERNEL_NS=n          every kernel record lasts n ns (default: as
 *                                   long as the fake GPU runs the kernel)
 * and the exported fake_cupti_* functions at the end of this file.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "driver_cbid_names.h"
#include "fake_driver.h"

#define EXPORT __attribute__((visibility("default")))

#include "fake_cupti_types.h"

/* ------------------------------------------------------------- state */

struct CUpti_Subscriber_st {
    CUpti_CallbackFunc callback;
    void *userdata;
};
typedef struct CUpti_Subscriber_st *CUpti_SubscriberHandle;

static struct CUpti_Subscriber_st the_subscriber;
static _Atomic(CUpti_SubscriberHandle) current;
static pthread_mutex_t subscribe_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int subscribe_result;
static _Atomic uint8_t enabled[FAKE_DRIVER_CBID_SIZE];
static atomic_uint next_correlation = 1;
static _Atomic uint64_t callbacks_delivered;
static struct CUctx_st { int dummy; } the_context;

static _Atomic uint8_t activity_enabled[MAX_ACTIVITY_KIND];
static CUpti_BuffersCallbackRequestFunc _Atomic buffer_requested;
static CUpti_BuffersCallbackCompleteFunc _Atomic buffer_completed;
static pthread_mutex_t buffer_lock = PTHREAD_MUTEX_INITIALIZER;
static uint8_t *buf;
static size_t buf_size, buf_valid, buf_records, buf_max_records;
static size_t records_per_buffer = 16;
static int foreign_records;
static long long kernel_ns; /* FAKE_CUPTI_KERNEL_NS */
static _Atomic uint64_t dropped, buffers_delivered, kernel_records;
static atomic_long grid_id;

static int env_int(const char *name, int fallback) {
    const char *v = getenv(name);
    return (v && *v) ? atoi(v) : fallback;
}

static const fake_tool_ops tool_ops;

__attribute__((constructor)) static void fake_cupti_load(void) {
    atomic_store(&subscribe_result, env_int("FAKE_CUPTI_SUBSCRIBE_RESULT", 0));
    int n = env_int("FAKE_CUPTI_RECORDS_PER_BUFFER", 16);
    records_per_buffer = n > 0 ? (size_t)n : 16;
    foreign_records = env_int("FAKE_CUPTI_FOREIGN_RECORDS", 0);
    const char *ns = getenv("FAKE_CUPTI_KERNEL_NS");
    kernel_ns = ns && *ns ? atoll(ns) : 0;
    /* Attach to the (fake) driver, as libcupti attaches to libcuda. */
    void (*reg)(const fake_tool_ops *) =
        (void (*)(const fake_tool_ops *))dlsym(RTLD_DEFAULT, "fake_cuda_register_tool");
    if (reg) reg(&tool_ops);
}

/* ------------------------------------------------- callback API */

EXPORT CUptiResult cuptiSubscribe(CUpti_SubscriberHandle *subscriber, CUpti_CallbackFunc callback,
                                  void *userdata) {
    if (!subscriber) return CUPTI_ERROR_INVALID_PARAMETER;
    int forced = atomic_load(&subscribe_result);
    if (forced != CUPTI_SUCCESS) return forced;
    pthread_mutex_lock(&subscribe_lock);
    if (atomic_load(&current)) {
        pthread_mutex_unlock(&subscribe_lock);
        return CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED;
    }
    the_subscriber.callback = callback;
    the_subscriber.userdata = userdata;
    for (int i = 0; i < FAKE_DRIVER_CBID_SIZE; i++) atomic_store(&enabled[i], 0);
    atomic_store(&current, &the_subscriber);
    pthread_mutex_unlock(&subscribe_lock);
    *subscriber = &the_subscriber;
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiUnsubscribe(CUpti_SubscriberHandle subscriber) {
    pthread_mutex_lock(&subscribe_lock);
    if (!subscriber || subscriber != atomic_load(&current)) {
        pthread_mutex_unlock(&subscribe_lock);
        return CUPTI_ERROR_INVALID_PARAMETER;
    }
    for (int i = 0; i < FAKE_DRIVER_CBID_SIZE; i++) atomic_store(&enabled[i], 0);
    atomic_store(&current, NULL);
    pthread_mutex_unlock(&subscribe_lock);
    return CUPTI_SUCCESS;
}

#ifndef FAKE_CUPTI_WITHOUT_ENABLE_CALLBACK
EXPORT CUptiResult cuptiEnableCallback(uint32_t enable, CUpti_SubscriberHandle subscriber,
                                       CUpti_CallbackDomain domain, CUpti_CallbackId cbid) {
    if (!subscriber || subscriber != atomic_load(&current)) return CUPTI_ERROR_INVALID_PARAMETER;
    if (domain != CUPTI_CB_DOMAIN_DRIVER_API) return CUPTI_ERROR_INVALID_PARAMETER;
    if (cbid == 0 || cbid >= FAKE_DRIVER_CBID_SIZE) return CUPTI_ERROR_INVALID_PARAMETER;
    atomic_store(&enabled[cbid], enable ? 1 : 0);
    return CUPTI_SUCCESS;
}
#endif

EXPORT CUptiResult cuptiGetCallbackName(CUpti_CallbackDomain domain, uint32_t cbid, const char **name) {
    if (!name) return CUPTI_ERROR_INVALID_PARAMETER;
    if (domain != CUPTI_CB_DOMAIN_DRIVER_API) return CUPTI_ERROR_INVALID_PARAMETER;
    if (cbid == 0 || cbid >= FAKE_DRIVER_CBID_SIZE) return CUPTI_ERROR_INVALID_PARAMETER;
    *name = fake_driver_cbid_names[cbid];
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiGetResultString(CUptiResult result, const char **str) {
    if (!str) return CUPTI_ERROR_INVALID_PARAMETER;
    switch (result) {
#define R(x) case x: *str = #x; return CUPTI_SUCCESS;
        R(CUPTI_SUCCESS)
        R(CUPTI_ERROR_INVALID_PARAMETER)
        R(CUPTI_ERROR_INVALID_OPERATION)
        R(CUPTI_ERROR_OUT_OF_MEMORY)
        R(CUPTI_ERROR_MAX_LIMIT_REACHED)
        R(CUPTI_ERROR_NOT_INITIALIZED)
        R(CUPTI_ERROR_INVALID_KIND)
        R(CUPTI_ERROR_NOT_SUPPORTED)
        R(CUPTI_ERROR_INSUFFICIENT_PRIVILEGES)
        R(CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED)
        R(CUPTI_ERROR_UNKNOWN)
#undef R
    default:
        *str = NULL;
        return CUPTI_ERROR_INVALID_PARAMETER;
    }
}

/* ------------------------------------------------- Activity API */

#ifndef FAKE_CUPTI_WITHOUT_ACTIVITY
static size_t record_size(const void *record) {
    switch (((const fake_ActivityOther *)record)->kind) {
    case CUPTI_ACTIVITY_KIND_KERNEL:
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
        return sizeof(fake_ActivityKernel10);
    case CUPTI_ACTIVITY_KIND_MEMCPY:
        return sizeof(fake_ActivityOther);
    default:
        return 0;
    }
}
#endif

/* Takes the current buffer away (under buffer_lock); the caller completes it
 * after unlocking, as CUPTI calls the completion callback without its locks. */
static uint8_t *detach_buffer(size_t *size, size_t *valid) {
    uint8_t *b = buf;
    *size = buf_size;
    *valid = buf_valid;
    buf = NULL;
    buf_size = buf_valid = buf_records = 0;
    return b;
}

static void complete(uint8_t *b, size_t size, size_t valid) {
    CUpti_BuffersCallbackCompleteFunc done = atomic_load(&buffer_completed);
    if (!b || !done) return;
    atomic_fetch_add(&buffers_delivered, 1);
    done(NULL, 0, b, size, valid);
}

static void emit(const void *record, size_t n) {
    CUpti_BuffersCallbackRequestFunc request = atomic_load(&buffer_requested);
    if (!request) {
        atomic_fetch_add(&dropped, 1);
        return;
    }
    uint8_t *full = NULL;
    size_t full_size = 0, full_valid = 0;
    pthread_mutex_lock(&buffer_lock);
    if (buf && buf_valid + n > buf_size) full = detach_buffer(&full_size, &full_valid);
    if (!buf) {
        uint8_t *b = NULL;
        size_t size = 0, max_records = 0;
        request(&b, &size, &max_records);
        if (!b || size < n || ((uintptr_t)b & 7)) {
            atomic_fetch_add(&dropped, 1);
            pthread_mutex_unlock(&buffer_lock);
            complete(full, full_size, full_valid);
            return;
        }
        buf = b;
        buf_size = size;
        buf_valid = buf_records = 0;
        buf_max_records = max_records ? max_records : records_per_buffer;
    }
    memcpy(buf + buf_valid, record, n);
    buf_valid += n;
    uint8_t *now_full = NULL;
    size_t now_size = 0, now_valid = 0;
    if (++buf_records >= buf_max_records) now_full = detach_buffer(&now_size, &now_valid);
    pthread_mutex_unlock(&buffer_lock);
    complete(full, full_size, full_valid);
    complete(now_full, now_size, now_valid);
}

#ifndef FAKE_CUPTI_WITHOUT_ACTIVITY
EXPORT CUptiResult cuptiActivityRegisterCallbacks(CUpti_BuffersCallbackRequestFunc requested,
                                                  CUpti_BuffersCallbackCompleteFunc completed) {
    if (!requested || !completed) return CUPTI_ERROR_INVALID_PARAMETER;
    atomic_store(&buffer_requested, requested);
    atomic_store(&buffer_completed, completed);
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiActivityEnable(CUpti_ActivityKind kind) {
    if (kind <= 0 || kind >= MAX_ACTIVITY_KIND) return CUPTI_ERROR_INVALID_KIND;
    atomic_store(&activity_enabled[kind], 1);
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiActivityDisable(CUpti_ActivityKind kind) {
    if (kind <= 0 || kind >= MAX_ACTIVITY_KIND) return CUPTI_ERROR_INVALID_KIND;
    atomic_store(&activity_enabled[kind], 0);
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiActivityFlushAll(uint32_t flag) {
    (void)flag;
    size_t size, valid;
    pthread_mutex_lock(&buffer_lock);
    uint8_t *b = detach_buffer(&size, &valid);
    pthread_mutex_unlock(&buffer_lock);
    complete(b, size, valid);
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiActivityGetNextRecord(uint8_t *buffer, size_t valid_size, void **record) {
    if (!buffer || !record) return CUPTI_ERROR_INVALID_PARAMETER;
    uint8_t *p = buffer;
    if (*record) {
        size_t n = record_size(*record);
        if (!n) return CUPTI_ERROR_INVALID_KIND;
        p = (uint8_t *)*record + n;
    }
    if (p + sizeof(CUpti_ActivityKind) > buffer + valid_size) return CUPTI_ERROR_MAX_LIMIT_REACHED;
    size_t n = record_size(p);
    if (!n || p + n > buffer + valid_size) return CUPTI_ERROR_INVALID_KIND;
    *record = p;
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiActivityGetNumDroppedRecords(CUcontext context, uint32_t stream_id,
                                                     size_t *n) {
    (void)context;
    (void)stream_id;
    if (!n) return CUPTI_ERROR_INVALID_PARAMETER;
    *n = (size_t)atomic_load(&dropped);
    return CUPTI_SUCCESS;
}
#endif

/* ------------------------------------------ driver -> tool reports */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void deliver(int site, uint32_t cbid, const char *function_name, const void *params,
                    const char *symbol, uint32_t correlation, uint64_t *correlation_data, void *ret) {
    CUpti_SubscriberHandle s = atomic_load(&current);
    if (!s || cbid == 0 || cbid >= FAKE_DRIVER_CBID_SIZE || !atomic_load(&enabled[cbid])) return;
    CUpti_CallbackData d = {
        .callbackSite = site, .functionName = function_name, .functionParams = params,
        .functionReturnValue = ret, .symbolName = symbol, .context = &the_context,
        .contextUid = FAKE_CONTEXT_ID, .correlationData = correlation_data,
        .correlationId = correlation,
    };
    atomic_fetch_add_explicit(&callbacks_delivered, 1, memory_order_relaxed);
    s->callback(s->userdata, CUPTI_CB_DOMAIN_DRIVER_API, cbid, &d);
}

static uint32_t api_enter(uint32_t cbid, const char *function_name, const void *params,
                          const char *symbol, uint64_t *correlation_data) {
    uint32_t correlation = atomic_fetch_add_explicit(&next_correlation, 1, memory_order_relaxed);
    deliver(CUPTI_API_ENTER, cbid, function_name, params, symbol, correlation, correlation_data, NULL);
    return correlation;
}

static void api_exit(uint32_t cbid, const char *function_name, const void *params, const char *symbol,
                     uint32_t correlation, uint64_t *correlation_data, CUresult *result) {
    deliver(CUPTI_API_EXIT, cbid, function_name, params, symbol, correlation, correlation_data, result);
}

/* Kernel names live as long as the process, as CUPTI's do. */
static const char *intern(const char *name) {
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static struct node { struct node *next; char *s; } *head;
    pthread_mutex_lock(&lock);
    struct node *n;
    for (n = head; n; n = n->next)
        if (strcmp(n->s, name) == 0) break;
    if (!n) {
        n = malloc(sizeof *n);
        n->s = strdup(name);
        n->next = head;
        head = n;
    }
    pthread_mutex_unlock(&lock);
    return n->s;
}

static void kernel_executed(uint32_t correlation, const fake_kernel_exec *k) {
    int kind = atomic_load(&activity_enabled[CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL])
                   ? CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL
               : atomic_load(&activity_enabled[CUPTI_ACTIVITY_KIND_KERNEL]) ? CUPTI_ACTIVITY_KIND_KERNEL
                                                                           : 0;
    if (!kind) return;
    uint64_t start = now_ns();
    if (foreign_records) {
        fake_ActivityOther o;
        memset(&o, 0, sizeof o);
        o.kind = CUPTI_ACTIVITY_KIND_MEMCPY;
        o.correlationId = correlation;
        o.start = start - 100;
        o.end = start - 50;
        o.bytes = 4096;
        o.streamId = k->stream_id;
        emit(&o, sizeof o);
    }
    fake_ActivityKernel10 r;
    memset(&r, 0, sizeof r);
    r.kind = kind;
    r.cacheConfig = 0x11;
    r.registersPerThread = (uint16_t)k->registers;
    r.start = start;
    /* As long as the fake GPU runs it, or a made-up 1..2 us for a kernel with no queue time. */
    r.end = start + (kernel_ns > 0 ? (uint64_t)kernel_ns
                     : k->duration_ns ? k->duration_ns : 1000 + 10 * (correlation % 97));
    r.completed = r.end;
    r.queued = start - 2000;
    r.submitted = start - 1000;
    r.deviceId = k->device_id;
    r.contextId = k->context_id;
    r.streamId = k->stream_id;
    r.gridX = (int32_t)k->grid[0], r.gridY = (int32_t)k->grid[1], r.gridZ = (int32_t)k->grid[2];
    r.blockX = (int32_t)k->block[0], r.blockY = (int32_t)k->block[1], r.blockZ = (int32_t)k->block[2];
    r.staticSharedMemory = k->static_smem;
    r.dynamicSharedMemory = (int32_t)k->dynamic_smem;
    r.correlationId = correlation;
    r.gridId = atomic_fetch_add(&grid_id, 1) + 1;
    r.name = intern(k->name);
    r.launchType = k->launch_type;
    r.sharedMemoryExecuted = (uint32_t)(k->static_smem + k->dynamic_smem);
    r.graphNodeId = k->graph_node_id;
    r.graphId = k->graph_id;
    r.clusterX = r.clusterY = r.clusterZ = 1;
    atomic_fetch_add(&kernel_records, 1);
    emit(&r, sizeof r);
}

static const fake_tool_ops tool_ops = {
    .version = 1, .api_enter = api_enter, .api_exit = api_exit, .kernel_executed = kernel_executed,
};

/* ----------------------------------------------- test-control API */

EXPORT void fake_cupti_set_subscribe_result(int result) { atomic_store(&subscribe_result, result); }

EXPORT int fake_cupti_has_subscriber(void) { return atomic_load(&current) != NULL; }

/* Number of enabled driver-API callbacks; fills ids (up to max) in id order. */
EXPORT int fake_cupti_enabled_cbids(uint32_t *ids, int max) {
    int n = 0;
    for (uint32_t i = 1; i < FAKE_DRIVER_CBID_SIZE; i++)
        if (atomic_load(&enabled[i])) {
            if (ids && n < max) ids[n] = i;
            n++;
        }
    return n;
}

EXPORT int fake_cupti_enabled_count(void) { return fake_cupti_enabled_cbids(NULL, 0); }

EXPORT uint64_t fake_cupti_callbacks_delivered(void) { return atomic_load(&callbacks_delivered); }
EXPORT uint64_t fake_cupti_kernel_records(void) { return atomic_load(&kernel_records); }
EXPORT uint64_t fake_cupti_buffers_delivered(void) { return atomic_load(&buffers_delivered); }
