/* Does the CUDA driver honour changes a CUPTI callback makes to a launch's
 * parameters at API_ENTER? Block-level scheduling (issue 5) would rewrite
 * best-effort launches this way (docs/blocksched.md, option 1); CUPTI passes
 * the parameters as `const void *` and documents no such use, so it has to be
 * measured on a real driver before anything is built on it.
 *
 * An injection library (CUDA_INJECTION64_PATH). PROBE_MODE selects what it
 * does to every launch of the kernel named marker_a:
 *   none   nothing (the control)
 *   grid   gridDimX = 1
 *   func   f = marker_b of the same module
 *   param  kernelParams replaced by an array whose second value is 77
 * cuLaunchKernel(_ptsz) and cuLaunchKernelEx(_ptsz) are both handled; for Ex
 * the caller's CUlaunchConfig is left alone and a copy is swapped in. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../agent/cuda_decls.h"

typedef struct CUmod_st *CUmodule;

static CUptiResult (*subscribe)(CUpti_SubscriberHandle *, CUpti_CallbackFunc, void *);
static CUptiResult (*enable)(uint32_t, CUpti_SubscriberHandle, CUpti_CallbackDomain, CUpti_CallbackId);
static CUptiResult (*name_of)(CUpti_CallbackDomain, uint32_t, const char **);
static CUresult (*func_get_module)(CUmodule *, CUfunction);
static CUresult (*module_get_function)(CUfunction *, CUmodule, const char *);
static const char *mode = "none";
static int is_ex[4096];
static int rewrites;
static int seventy_seven = 77;
static void *swapped_params[2];
static tally_CUlaunchConfig swapped_config;

static void rewrite(CUfunction *f, unsigned *gx, void ***params) {
    if (!strcmp(mode, "grid")) {
        *gx = 1;
    } else if (!strcmp(mode, "func")) {
        CUmodule m;
        CUfunction b;
        if (func_get_module(&m, *f) || module_get_function(&b, m, "marker_b")) return;
        *f = b;
    } else if (!strcmp(mode, "param")) {
        swapped_params[0] = (*params)[0];
        swapped_params[1] = &seventy_seven;
        *params = swapped_params;
    } else {
        return;
    }
    rewrites++;
}

static void on_api(void *u, CUpti_CallbackDomain domain, CUpti_CallbackId cbid, const void *data) {
    (void)u;
    const CUpti_CallbackData *d = data;
    if (domain != CUPTI_CB_DOMAIN_DRIVER_API || d->callbackSite != CUPTI_API_ENTER || !d->symbolName) return;
    if (!strstr(d->symbolName, "marker_a")) return;
    if (cbid < 4096 && is_ex[cbid]) {
        tally_cuLaunchKernelEx_params *p = (tally_cuLaunchKernelEx_params *)d->functionParams;
        swapped_config = *p->config;
        rewrite(&p->f, &swapped_config.gridDimX, &p->kernelParams);
        p->config = &swapped_config;
    } else {
        tally_cuLaunchKernel_params *p = (tally_cuLaunchKernel_params *)d->functionParams;
        rewrite(&p->f, &p->gridDimX, &p->kernelParams);
    }
}

static void report(void) { fprintf(stderr, "probe: mode %s, %d launch(es) rewritten\n", mode, rewrites); }

int InitializeInjection(void) {
    const char *m = getenv("PROBE_MODE");
    if (m) mode = m;
    void *cupti = dlopen(getenv("PROBE_CUPTI") ? getenv("PROBE_CUPTI") : "libcupti.so", RTLD_NOW);
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cupti || !cuda) {
        fprintf(stderr, "probe: cannot load libcupti (PROBE_CUPTI) or libcuda\n");
        return 1;
    }
    subscribe = dlsym(cupti, "cuptiSubscribe");
    enable = dlsym(cupti, "cuptiEnableCallback");
    name_of = dlsym(cupti, "cuptiGetCallbackName");
    func_get_module = dlsym(cuda, "cuFuncGetModule");
    module_get_function = dlsym(cuda, "cuModuleGetFunction");
    CUpti_SubscriberHandle s;
    if (!subscribe || !enable || !name_of || !func_get_module || !module_get_function || subscribe(&s, on_api, NULL))
        return 1;
    for (uint32_t cbid = 1; cbid < 4096; cbid++) {
        const char *n = NULL;
        if (name_of(CUPTI_CB_DOMAIN_DRIVER_API, cbid, &n) || !n) continue;
        int kernel = !strcmp(n, "cuLaunchKernel") || !strcmp(n, "cuLaunchKernel_ptsz");
        int ex = !strcmp(n, "cuLaunchKernelEx") || !strcmp(n, "cuLaunchKernelEx_ptsz");
        if (kernel || ex) {
            is_ex[cbid] = ex;
            enable(1, s, CUPTI_CB_DOMAIN_DRIVER_API, cbid);
        }
    }
    atexit(report);
    return 1;
}
