/* Another CUDA injection library (a "profiler"), for TALLY_CHAINED_INJECTION.
 *
 * Its InitializeInjection subscribes to CUPTI (unless FAKE_PROFILER_SUBSCRIBE=0)
 * and counts cuLaunchKernel calls; it reports on stdout so the tests can see
 * that it ran and that it kept working next to tally.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef struct CUpti_Subscriber_st *CUpti_SubscriberHandle;
typedef void (*CUpti_CallbackFunc)(void *, int, uint32_t, const void *);
int cuptiSubscribe(CUpti_SubscriberHandle *, CUpti_CallbackFunc, void *);
int cuptiEnableCallback(uint32_t, CUpti_SubscriberHandle, int, uint32_t);

typedef struct {
    int callbackSite;
    /* the rest of CUpti_CallbackData is not needed here */
} callback_data_head;

static atomic_long launches;
static int init_calls;

static void on_api(void *userdata, int domain, uint32_t cbid, const void *data) {
    (void)userdata;
    (void)domain;
    if (cbid == 307 /* cuLaunchKernel */ && ((const callback_data_head *)data)->callbackSite == 0)
        atomic_fetch_add(&launches, 1);
}

static void report(void) {
    printf("fake_profiler: launches=%ld\n", atomic_load(&launches));
    fflush(stdout);
}

EXPORT int InitializeInjection(void) {
    init_calls++;
    printf("fake_profiler: initialized calls=%d\n", init_calls);
    const char *sub = getenv("FAKE_PROFILER_SUBSCRIBE");
    if (!sub || strcmp(sub, "0") != 0) {
        CUpti_SubscriberHandle h;
        int r = cuptiSubscribe(&h, on_api, NULL);
        printf("fake_profiler: subscribe=%d\n", r);
        if (r == 0) cuptiEnableCallback(1, h, 1, 307);
    }
    fflush(stdout);
    atexit(report);
    return 1;
}
