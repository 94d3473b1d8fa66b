/* Block-level scheduling of best-effort kernels: which launches can run as
 * slices, and the slice kernels themselves (TALLY_BLOCKSCHED_PLAN set).
 *
 * A launch-level gate cannot bound how long a high-priority (HP) request
 * waits behind one long best-effort (BE) kernel. Slicing can: the kernel's
 * grid is launched as several smaller grids of a transformed entry
 * (`<entry>__tally_slice`, ABI in src/tally/ptx/abi.py), and the gate runs
 * between slices. `tally blocksched prepare --compile` transforms and
 * assembles the kernels ahead of time and writes the plan this file reads
 * (format: docs/blocksched.md, "The plan"):
 *
 *   tally-blocksched-plan 1
 *   slice <image fnv> <entry> <nparams> <cubin fnv> <cubin path to the end of the line>
 *
 * A launch is matched to a plan line by the image its CUfunction's module was
 * loaded from (FNV-1a-64 of the bytes the program handed the driver,
 * recorded at the load's API exit, forgotten at cuModuleUnload) and the
 * entry's mangled name. Matching on the image, not the name alone, matters:
 * Triton and Inductor reuse kernel names across different code.
 *
 * The slice cubin is the whole transformed module, loaded as a second module
 * beside the program's; prepare leaves out modules with module-scope
 * variables, whose second copy would not see what the program wrote.
 *
 * When (sched.c decides) to slice, what to launch comes from here; when, from
 * the gate. Anything that does not check out (a cubin whose hash differs from
 * the plan's, a load that fails, a parameter count that does not match) puts
 * that kernel back on the original code path, with one warning; the program
 * never sees an error of ours.
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

#include "agent.h"

#define PLAN_MAGIC "tally-blocksched-plan 1"
#define PLAN_MAX_BYTES (16u << 20)
#define MAX_CUBIN_BYTES (1u << 30)
#define MODULE_SLOTS 4096   /* loaded modules whose image is in the plan */
#define FUNCTION_SLOTS 8192 /* CUfunctions resolved to a plan kernel (or to none) */
#define CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT 16
#define CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES 8
#define CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT 9
#define SLICE_SUFFIX "__tally_slice"

struct cubin {
    uint64_t fnv;
    char *path;
    int state;        /* 0: not loaded yet; 1: loaded; -1: unusable */
    CUmodule module;
};

struct plan_kernel {
    uint64_t image_fnv;
    char *entry;
    uint32_t nparams;
    struct cubin *cubin;
    int state;        /* 0: not resolved yet; 1: slice function ready; -1: unusable */
    CUfunction slice;
    char *slice_symbol; /* <entry>__tally_slice, once resolved */
    unsigned occ_threads, occ_smem; /* the block shape occ_blocks was computed for */
    int occ_blocks;
    /* what happened to its launches, for the stats file */
    _Atomic uint64_t sliced_launches, slices, whole_launches;
    /* the last sliced launch's configuration and what it was sized from */
    _Atomic uint64_t waves_per_slice, wave_ns, budget_ns, wave_blocks;
    char reason[160]; /* why it is unusable, or why its last launch ran whole */
};

static struct {
    int enabled;
    char path[4096];
    struct plan_kernel *kernels;
    size_t n_kernels;
    struct cubin *cubins;
    size_t n_cubins;
    pthread_mutex_t lock; /* the tables below and every plan_kernel's and cubin's state */
    struct { CUmodule module; uint64_t fnv; } modules[MODULE_SLOTS];
    struct { CUfunction f; struct plan_kernel *k; } functions[FUNCTION_SLOTS];
    size_t n_functions;
    int sm_count;
    double floor; /* TALLY_BLOCKSCHED_FLOOR: the least share of the whole kernel's speed slices must keep */
    atomic_int warned;
    struct {
        CUresult (*module_load_data)(CUmodule *, const void *);
        CUresult (*module_get_function)(CUfunction *, CUmodule, const char *);
        CUresult (*func_get_module)(CUmodule *, CUfunction);
        CUresult (*func_get_param_info)(CUfunction, size_t, size_t *, size_t *); /* CUDA >= 12.4 */
        CUresult (*occupancy)(int *, CUfunction, int, size_t);
        CUresult (*func_get_attribute)(int *, int, CUfunction);
        CUresult (*func_set_attribute)(CUfunction, int, int);
        CUresult (*ctx_get_device)(CUdevice *);
        CUresult (*device_get_attribute)(int *, int, CUdevice);
        CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                  unsigned, CUstream, void **, void **);
    } drv;
    struct tally_blocksched_stats stats;
} B = {.lock = PTHREAD_MUTEX_INITIALIZER};

static __thread int in_internal_call; /* a driver call of ours: the callbacks let it through */

int tally_blocksched_internal(void) { return in_internal_call; }

int tally_blocksched_enabled(void) { return B.enabled; }

double tally_blocksched_floor(void) { return B.floor; }

#define warn(fmt, ...) tally_warn_once(&B.warned, "block-level scheduling: " fmt, ##__VA_ARGS__)

/* ------------------------------------------------------------- the plan */

static int hex64(const char *s, size_t n, uint64_t *out) {
    if (n != 16) return 0;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return 0;
        v = v << 4 | (uint64_t)d;
    }
    *out = v;
    return 1;
}

/* The next space-separated field of a line: [*p, end of field); advances *p past one space. */
static int field(char **p, char **start, size_t *len) {
    char *s = *p, *e = strchr(s, ' ');
    if (!e || e == s) return 0;
    *start = s;
    *len = (size_t)(e - s);
    *p = e + 1;
    return 1;
}

static struct cubin *cubin_of(uint64_t fnv, const char *path) {
    for (size_t i = 0; i < B.n_cubins; i++)
        if (B.cubins[i].fnv == fnv) return strcmp(B.cubins[i].path, path) == 0 ? &B.cubins[i] : NULL;
    struct cubin *c = &B.cubins[B.n_cubins++];
    c->fnv = fnv;
    c->path = strdup(path);
    return c->path ? c : NULL;
}

/* Parses the whole plan or nothing: returns NULL, or what is wrong. */
static const char *parse_plan(char *text, size_t n_lines) {
    B.kernels = calloc(n_lines, sizeof *B.kernels);
    B.cubins = calloc(n_lines, sizeof *B.cubins);
    if (!B.kernels || !B.cubins) return "is too large";
    char *save = NULL;
    char *line = strtok_r(text, "\n", &save);
    if (!line || strcmp(line, PLAN_MAGIC) != 0) return "is not a tally plan of version 1";
    while ((line = strtok_r(NULL, "\n", &save))) {
        if (line[0] == '#') continue;
        char *p = line, *s;
        size_t len;
        if (!field(&p, &s, &len)) return "has a malformed line";
        if (len != 5 || strncmp(s, "slice", 5) != 0) continue; /* a mode this agent does not run */
        struct plan_kernel *k = &B.kernels[B.n_kernels];
        uint64_t cubin_fnv;
        char *entry, *end;
        size_t entry_len;
        if (!field(&p, &s, &len) || !hex64(s, len, &k->image_fnv)) return "has a malformed image hash";
        if (!field(&p, &entry, &entry_len)) return "has a malformed entry";
        if (!field(&p, &s, &len)) return "has a malformed parameter count";
        errno = 0;
        unsigned long nparams = strtoul(s, &end, 10);
        if (end != s + len || errno || nparams > TALLY_BLOCKSCHED_MAX_PARAMS) return "has a bad parameter count";
        if (!field(&p, &s, &len) || !hex64(s, len, &cubin_fnv)) return "has a malformed cubin hash";
        if (p[0] != '/') return "names a cubin by a relative path";
        k->nparams = (uint32_t)nparams;
        k->entry = strndup(entry, entry_len);
        k->cubin = cubin_of(cubin_fnv, p);
        if (!k->entry || !k->cubin) return "names one cubin hash for two paths";
        B.n_kernels++;
    }
    return NULL;
}

int tally_blocksched_init(void) {
    const char *path = getenv("TALLY_BLOCKSCHED_PLAN");
    if (!path || !*path) return 0;
    snprintf(B.path, sizeof B.path, "%s", path);
    FILE *f = fopen(path, "rb");
    if (!f) {
        warn("cannot read the plan %s (%s); kernels run whole", path, strerror(errno));
        return 0;
    }
    char *text = malloc(PLAN_MAX_BYTES + 1);
    size_t n = text ? fread(text, 1, PLAN_MAX_BYTES + 1, f) : 0;
    fclose(f);
    if (!text || n > PLAN_MAX_BYTES) {
        free(text);
        warn("the plan %s is larger than %u MiB; kernels run whole", path, PLAN_MAX_BYTES >> 20);
        return 0;
    }
    text[n] = 0;
    size_t lines = 1;
    for (size_t i = 0; i < n; i++) lines += text[i] == '\n';
    const char *bad = n && text[n - 1] != '\n' ? "is truncated (no newline at its end)"
                      : strlen(text) != n     ? "holds a NUL byte"
                                              : parse_plan(text, lines);
    free(text);
    if (bad) {
        warn("the plan %s %s; kernels run whole (run `tally blocksched prepare --compile` again)", path, bad);
        B.n_kernels = 0;
        return 0;
    }
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW);
#define SYM(field, name) *(void **)&B.drv.field = lib ? dlsym(lib, name) : NULL
    SYM(module_load_data, "cuModuleLoadData");
    SYM(module_get_function, "cuModuleGetFunction");
    SYM(func_get_module, "cuFuncGetModule");
    SYM(func_get_param_info, "cuFuncGetParamInfo");
    SYM(occupancy, "cuOccupancyMaxActiveBlocksPerMultiprocessor");
    SYM(func_get_attribute, "cuFuncGetAttribute");
    SYM(func_set_attribute, "cuFuncSetAttribute");
    SYM(ctx_get_device, "cuCtxGetDevice");
    SYM(device_get_attribute, "cuDeviceGetAttribute");
    SYM(launch_kernel, "cuLaunchKernel");
#undef SYM
    if (!B.drv.module_load_data || !B.drv.module_get_function || !B.drv.func_get_module || !B.drv.occupancy ||
        !B.drv.ctx_get_device || !B.drv.device_get_attribute || !B.drv.launch_kernel) {
        warn("libcuda lacks a call slicing needs (cuFuncGetModule: CUDA >= 11); kernels run whole");
        return 0;
    }
    B.floor = 0.5;
    const char *floor = getenv("TALLY_BLOCKSCHED_FLOOR");
    if (floor && *floor) {
        char *end = NULL;
        double v = strtod(floor, &end);
        if (end && !*end && v >= 0 && v <= 1) B.floor = v;
        else warn("TALLY_BLOCKSCHED_FLOOR=%s is not a number from 0 to 1; the floor stays %.2f", floor, B.floor);
    }
    B.stats.plan_kernels = B.n_kernels;
    B.enabled = 1;
    return 1;
}

/* ---------------------------------------------------- modules and functions */

static uint32_t slot_of(uintptr_t key, uint32_t slots) {
    return (uint32_t)(((uint64_t)key * 0x9E3779B97F4A7C15ull) >> 40) % slots;
}

static int plan_has_image(uint64_t fnv) {
    for (size_t i = 0; i < B.n_kernels; i++)
        if (B.kernels[i].image_fnv == fnv) return 1;
    return 0;
}

/* Forgets every CUfunction's resolution: a module went away, and the driver
 * may hand its handles out again for other code. Under B.lock. */
static void forget_functions(void) {
    memset(B.functions, 0, sizeof B.functions);
    B.n_functions = 0;
}

/* The module table is open-addressed and kept without holes (a removal
 * re-inserts the rest of its cluster), so a lookup stops at the first empty
 * slot. All three under B.lock. */
static int module_slot(CUmodule module) {
    for (uint32_t probe = 0, i = slot_of((uintptr_t)module, MODULE_SLOTS); probe < MODULE_SLOTS && B.modules[i].module;
         probe++, i = (i + 1) % MODULE_SLOTS)
        if (B.modules[i].module == module) return (int)i;
    return -1;
}

static void module_insert(CUmodule module, uint64_t fnv) {
    uint32_t probe = 0, i = slot_of((uintptr_t)module, MODULE_SLOTS);
    while (probe < MODULE_SLOTS && B.modules[i].module) probe++, i = (i + 1) % MODULE_SLOTS;
    if (probe == MODULE_SLOTS) return; /* full: this module's kernels run whole */
    B.modules[i].module = module;
    B.modules[i].fnv = fnv;
}

static void module_remove(uint32_t i) {
    B.modules[i].module = NULL;
    for (uint32_t j = (i + 1) % MODULE_SLOTS; B.modules[j].module; j = (j + 1) % MODULE_SLOTS) {
        CUmodule m = B.modules[j].module;
        B.modules[j].module = NULL;
        module_insert(m, B.modules[j].fnv);
    }
}

void tally_blocksched_module_loaded(CUmodule module, const void *image, uint64_t n) {
    if (!B.enabled || !module) return;
    uint64_t fnv = tally_fnv1a64(image, n);
    pthread_mutex_lock(&B.lock);
    /* A handle the driver reuses: whatever was resolved through it is stale. */
    int i = module_slot(module);
    if (i >= 0) {
        module_remove((uint32_t)i);
        forget_functions();
    }
    if (plan_has_image(fnv)) module_insert(module, fnv);
    pthread_mutex_unlock(&B.lock);
}

void tally_blocksched_module_unloaded(CUmodule module) {
    if (!B.enabled || !module) return;
    pthread_mutex_lock(&B.lock);
    int i = module_slot(module);
    if (i >= 0) module_remove((uint32_t)i);
    forget_functions(); /* also functions resolved to no plan kernel: their handles may be reused */
    pthread_mutex_unlock(&B.lock);
}

/* Under B.lock. The plan kernel a CUfunction runs, or NULL. */
static struct plan_kernel *resolve(CUfunction f, const char *symbol) {
    if (!symbol) return NULL;
    CUmodule module = NULL;
    in_internal_call = 1;
    CUresult r = B.drv.func_get_module(&module, f);
    in_internal_call = 0;
    if (r != CUDA_SUCCESS || !module) return NULL;
    int slot = module_slot(module);
    if (slot < 0) return NULL;
    uint64_t fnv = B.modules[slot].fnv;
    for (size_t i = 0; i < B.n_kernels; i++)
        if (B.kernels[i].image_fnv == fnv && strcmp(B.kernels[i].entry, symbol) == 0) return &B.kernels[i];
    return NULL;
}

static void unusable(struct plan_kernel *k, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void unusable(struct plan_kernel *k, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(k->reason, sizeof k->reason, fmt, ap);
    va_end(ap);
    k->state = -1;
    warn("%s runs whole: %s", k->entry, k->reason);
}

/* Under B.lock: reads, checks and loads a cubin (once). */
static int load_cubin(struct cubin *c, char *why, size_t why_len) {
    if (c->state) return c->state > 0;
    c->state = -1;
    size_t n = 0;
    unsigned char *bytes = tally_read_file(c->path, 1, MAX_CUBIN_BYTES, &n);
    if (!bytes) {
        snprintf(why, why_len, "cannot read %s (%s)", c->path, strerror(errno));
        return 0;
    }
    if (tally_fnv1a64((const char *)bytes, n) != c->fnv) {
        free(bytes);
        snprintf(why, why_len, "%s is not the cubin the plan names (its hash differs); not trusted", c->path);
        return 0;
    }
    in_internal_call = 1;
    CUresult r = B.drv.module_load_data(&c->module, bytes);
    in_internal_call = 0;
    free(bytes);
    if (r != CUDA_SUCCESS) {
        snprintf(why, why_len, "the driver cannot load %s (CUresult %d)", c->path, r);
        return 0;
    }
    c->state = 1;
    return 1;
}

/* Under B.lock: the slice function of a plan kernel, checked against the original. */
static int prepare_kernel(struct plan_kernel *k, CUfunction original) {
    if (k->state) return k->state > 0;
    char why[sizeof k->reason];
    if (!load_cubin(k->cubin, why, sizeof why)) {
        unusable(k, "%s", why);
        return 0;
    }
    char name[4200];
    snprintf(name, sizeof name, "%s" SLICE_SUFFIX, k->entry);
    in_internal_call = 1;
    CUresult r = B.drv.module_get_function(&k->slice, k->cubin->module, name);
    in_internal_call = 0;
    if (r != CUDA_SUCCESS) {
        unusable(k, "the cubin has no entry %s (CUresult %d)", name, r);
        return 0;
    }
    if (!k->slice_symbol) k->slice_symbol = strdup(name); /* NULL (out of memory): learned in-process only */
    /* The plan's parameter count came from the PTX; where the driver can say
     * how many the loaded original and the slice take, they must agree, since
     * the slice's arguments are built as the original's followed by four. */
    if (B.drv.func_get_param_info) {
        size_t offset, size;
        /* A slice has at least four parameters: an error for the first says the
         * driver cannot tell (e.g. CUDA_ERROR_NOT_SUPPORTED), not a mismatch. */
        if (B.drv.func_get_param_info(k->slice, 0, &offset, &size) == CUDA_SUCCESS) {
            int original_ok =
                (k->nparams == 0 || B.drv.func_get_param_info(original, k->nparams - 1, &offset, &size) == CUDA_SUCCESS) &&
                B.drv.func_get_param_info(original, k->nparams, &offset, &size) != CUDA_SUCCESS;
            int slice_ok = B.drv.func_get_param_info(k->slice, k->nparams + 3, &offset, &size) == CUDA_SUCCESS &&
                           size == 4 &&
                           B.drv.func_get_param_info(k->slice, k->nparams + 4, &offset, &size) != CUDA_SUCCESS;
            if (!original_ok || !slice_ok) {
                unusable(k, "the driver reports other parameters than the plan's %u", k->nparams);
                return 0;
            }
        }
    }
    k->state = 1;
    return 1;
}

/* Under B.lock. Dynamic shared memory over 48 KiB needs the program's
 * cuFuncSetAttribute on the function it launches (Triton does it for its
 * large tiles); the slice kernel is another CUfunction and needs the same, or
 * its launches fail. The carveout preference is mirrored too (speed only). */
static void mirror_attributes(CUfunction original, CUfunction slice) {
    static const int attributes[] = {CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                     CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT};
    if (!B.drv.func_get_attribute || !B.drv.func_set_attribute) return;
    for (size_t i = 0; i < sizeof attributes / sizeof attributes[0]; i++) {
        int want = 0, have = 0;
        if (B.drv.func_get_attribute(&want, attributes[i], original) == CUDA_SUCCESS &&
            B.drv.func_get_attribute(&have, attributes[i], slice) == CUDA_SUCCESS && want != have)
            B.drv.func_set_attribute(slice, attributes[i], want);
    }
}

int tally_blocksched_lookup(CUfunction f, const char *symbol, unsigned block_threads, unsigned smem,
                            struct tally_slice_kernel *out) {
    if (!B.enabled || !f) return 0;
    pthread_mutex_lock(&B.lock);
    struct plan_kernel *k = NULL;
    uint32_t i = slot_of((uintptr_t)f, FUNCTION_SLOTS), probe = 0;
    while (probe < FUNCTION_SLOTS && B.functions[i].f && B.functions[i].f != f) probe++, i = (i + 1) % FUNCTION_SLOTS;
    if (probe < FUNCTION_SLOTS && B.functions[i].f == f) {
        k = B.functions[i].k;
    } else {
        k = resolve(f, symbol);
        /* Remember it, plan kernel or none, while the table is at most half full. */
        if (probe < FUNCTION_SLOTS && B.n_functions < FUNCTION_SLOTS / 2) {
            B.functions[i].f = f;
            B.functions[i].k = k;
            B.n_functions++;
        }
    }
    int ok = k && prepare_kernel(k, f);
    if (ok && (k->occ_threads != block_threads || k->occ_smem != smem || k->occ_blocks <= 0)) {
        if (!B.sm_count) {
            CUdevice dev;
            in_internal_call = 1;
            if (B.drv.ctx_get_device(&dev) != CUDA_SUCCESS ||
                B.drv.device_get_attribute(&B.sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev) !=
                    CUDA_SUCCESS)
                B.sm_count = 0;
            in_internal_call = 0;
        }
        int blocks = 0;
        in_internal_call = 1;
        mirror_attributes(f, k->slice);
        CUresult r = B.drv.occupancy(&blocks, k->slice, (int)block_threads, smem);
        in_internal_call = 0;
        k->occ_threads = block_threads;
        k->occ_smem = smem;
        k->occ_blocks = r == CUDA_SUCCESS ? blocks : 0;
        if (B.sm_count <= 0 || k->occ_blocks <= 0) {
            snprintf(k->reason, sizeof k->reason, "no occupancy for blocks of %u threads, %u bytes shared",
                     block_threads, smem);
            ok = 0;
        }
    }
    if (ok) {
        out->slice = k->slice;
        out->slice_symbol = k->slice_symbol;
        out->nparams = k->nparams;
        out->wave_blocks = (uint64_t)B.sm_count * (uint64_t)k->occ_blocks;
        out->kernel = k;
    }
    pthread_mutex_unlock(&B.lock);
    if (!k) atomic_fetch_add_explicit(&B.stats.not_in_plan, 1, memory_order_relaxed);
    else if (!ok) atomic_fetch_add_explicit(&B.stats.unusable, 1, memory_order_relaxed);
    return ok;
}

void tally_blocksched_whole(struct tally_slice_kernel *sk, const char *reason) {
    struct plan_kernel *k = sk->kernel;
    if (!k) return;
    atomic_fetch_add_explicit(&k->whole_launches, 1, memory_order_relaxed);
    pthread_mutex_lock(&B.lock);
    snprintf(k->reason, sizeof k->reason, "%s", reason);
    pthread_mutex_unlock(&B.lock);
}

void tally_blocksched_sliced(struct tally_slice_kernel *sk, uint64_t slices, uint64_t waves, uint64_t wave_ns,
                             uint64_t budget_ns) {
    struct plan_kernel *k = sk->kernel;
    if (!k) return;
    atomic_fetch_add_explicit(&k->sliced_launches, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&k->slices, slices, memory_order_relaxed);
    /* Relaxed and one at a time: a reader may pair one launch's waves with another's estimate,
     * which is harmless for a report of the recent configuration. */
    atomic_store_explicit(&k->waves_per_slice, waves, memory_order_relaxed);
    atomic_store_explicit(&k->wave_ns, wave_ns, memory_order_relaxed);
    atomic_store_explicit(&k->budget_ns, budget_ns, memory_order_relaxed);
    atomic_store_explicit(&k->wave_blocks, sk->wave_blocks, memory_order_relaxed);
}

void tally_blocksched_disable(struct tally_slice_kernel *sk, const char *why) {
    if (!sk->kernel) return;
    pthread_mutex_lock(&B.lock);
    unusable(sk->kernel, "%s", why);
    pthread_mutex_unlock(&B.lock);
}

CUresult tally_blocksched_launch(const struct tally_slice_kernel *sk, unsigned blocks, const unsigned block[3],
                                 unsigned smem, CUstream stream, void **args) {
    in_internal_call = 1;
    CUresult r = B.drv.launch_kernel(sk->slice, blocks, 1, 1, block[0], block[1], block[2], smem, stream, args, NULL);
    in_internal_call = 0;
    return r;
}

struct tally_blocksched_stats *tally_blocksched_stats(void) { return &B.stats; }

void tally_blocksched_write_stats(FILE *f) {
    if (!B.enabled) return;
    struct tally_blocksched_stats *s = &B.stats;
    fputs(",\"blocksched\":{\"plan\":", f);
    tally_json_string(f, B.path);
    fprintf(f, ",\"plan_kernels\":%llu,\"sliced_launches\":%llu,\"slices\":%llu,\"unsliced_launches\":%llu,"
               "\"sliced_est_ns\":%llu,\"unsliced_est_ns\":%llu,\"not_in_plan\":%llu,\"unusable\":%llu,"
               "\"gpu_gated_slices\":%llu,\"kernels\":[",
            (unsigned long long)s->plan_kernels, (unsigned long long)atomic_load(&s->sliced_launches),
            (unsigned long long)atomic_load(&s->slices), (unsigned long long)atomic_load(&s->unsliced_launches),
            (unsigned long long)atomic_load(&s->sliced_est_ns), (unsigned long long)atomic_load(&s->unsliced_est_ns),
            (unsigned long long)atomic_load(&s->not_in_plan), (unsigned long long)atomic_load(&s->unusable),
            (unsigned long long)atomic_load(&s->gpu_gated_slices));
    int first = 1;
    for (size_t i = 0; i < B.n_kernels; i++) {
        struct plan_kernel *k = &B.kernels[i];
        uint64_t sliced = atomic_load(&k->sliced_launches), whole = atomic_load(&k->whole_launches);
        if (!sliced && !whole && k->state >= 0) continue; /* never launched */
        fputs(first ? "{\"entry\":" : ",{\"entry\":", f);
        first = 0;
        tally_json_string(f, k->entry);
        fprintf(f, ",\"image\":\"%016llx\",\"sliced_launches\":%llu,\"slices\":%llu,\"whole_launches\":%llu,"
                   "\"waves_per_slice\":%llu,\"wave_blocks\":%llu,\"wave_ns\":%llu,\"budget_ns\":%llu,"
                   "\"usable\":%s,\"reason\":",
                (unsigned long long)k->image_fnv, (unsigned long long)sliced,
                (unsigned long long)atomic_load(&k->slices), (unsigned long long)whole,
                (unsigned long long)atomic_load(&k->waves_per_slice),
                (unsigned long long)atomic_load(&k->wave_blocks), (unsigned long long)atomic_load(&k->wave_ns),
                (unsigned long long)atomic_load(&k->budget_ns), k->state < 0 ? "false" : "true");
        tally_json_string(f, k->reason);
        fputc('}', f);
    }
    fputs("]}", f);
}
