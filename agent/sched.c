/* Priority scheduling in the agent: joining the GPU's scoreboard, tracking
 * GPU work in flight per stream, and holding best-effort launches at the gate.
 *
 * Completion is seen on the GPU side: after each tracked launch the agent
 * enqueues a stream memory operation (cuStreamWriteValue64) that writes the
 * launch's sequence number into the scoreboard, which is host memory mapped
 * into the GPU's address space. "In flight" is launched_seq > completed_seq;
 * nobody polls the driver.
 *
 * Everything here fails open: a scoreboard that cannot be joined, a driver
 * call that fails, or a dead daemon leaves the program running ungated, with
 * one warning.
 *
 * Run-ahead admission (TALLY_RUN_AHEAD=1) is in runahead.c: a queue and a
 * thread of its own, kept apart from the launch path it hooks into; what the
 * two files share is in sched_internal.h.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "gate.h"
#include "scoreboard.h"
#include "sched_internal.h"

#define CU_STREAM_PER_THREAD ((CUstream)0x2)
#define CU_STREAM_CAPTURE_STATUS_NONE 0
#define SPIN_NS 200000      /* busy-wait this long before sleeping at the gate */
#define ACCURATE_POLL_NS 20000 /* completions seen within this of the last poll are timed... */
#define ACCURATE_POLL_SHARE 8  /* ...as are those whose timing error is under 1/8 of the sample */
#define BATCH_MAX_LAUNCHES 16  /* batched completion writes: at most this many launches share one... */
#define BATCH_BUDGET_SHARE 4   /* ...and at most 1/4 of the turnaround budget of estimated work */

struct sched_driver drv;

struct sched_state S = {
    .join_lock = PTHREAD_MUTEX_INITIALIZER,
    .lanes_lock = PTHREAD_MUTEX_INITIALIZER,
    .profile_lock = PTHREAD_MUTEX_INITIALIZER,
};

__thread struct sched_pending pending;
static _Atomic uintptr_t ptds_keys; /* per-thread keys handed out so far */

int tally_sched_enabled(void) { return S.priority >= 0 && atomic_load(&S.state) != UNGATED; }

int tally_sched_exit_needed(void) { return pending.track || pending.launching || pending.ra || pending.in_place; }

/* Nothing of ours may stay waiting on the GPU once the gate is gone (failing open, process exit):
 * run-ahead's queued launches are released, the GPU-side gate's word opened for good. */
static void release_gpu_waits(void) {
    runahead_release_all();
    gpugate_disable();
}

static void give_up(const char *why) {
    release_gpu_waits();
    atomic_store(&S.state, UNGATED);
    tally_warn("%s; %s launches are not scheduled", why,
               S.priority == TALLY_SB_PRIO_HIGH ? "high-priority" : "best-effort");
    if (S.slot) __atomic_store_n(&S.slot->failopen, 1, __ATOMIC_RELAXED);
}

void tally_sched_init(void) {
    S.priority = -1;
    const char *p = getenv("TALLY_PRIORITY");
    if (!p || !*p) return;
    if (strcmp(p, "high") == 0) S.priority = TALLY_SB_PRIO_HIGH;
    else if (strcmp(p, "best-effort") == 0) S.priority = TALLY_SB_PRIO_BEST_EFFORT;
    else {
        tally_warn("TALLY_PRIORITY=%s is neither 'high' nor 'best-effort'", p);
        return;
    }
    for (int i = 0; i < (int)TALLY_SB_MAX_LANES; i++) pthread_mutex_init(&S.lanes[i].lock, NULL);
    /* The gate never holds a launch forever: a completion write that never
     * comes (a lost memory operation, a torn-down context) would otherwise
     * hang the program. Past this, the process fails open. */
    S.max_hold_ns = TALLY_SB_AGENT_MAX_HOLD_NS;
    const char *hold = getenv("TALLY_MAX_HOLD_MS");
    if (hold && *hold) {
        char *end = NULL;
        unsigned long long ms = strtoull(hold, &end, 10);
        if (end && *end == 0 && ms > 0) S.max_hold_ns = ms * 1000000ull;
    }
    const char *batch = getenv("TALLY_BATCH_WRITES");
    S.batch_writes = batch && strcmp(batch, "1") == 0;
    /* SLO mode (docs/operations.md): the daemon adapts the BE budget to this HP target. */
    const char *slo = getenv("TALLY_SLO_P99_MS");
    if (slo && *slo) {
        char *end = NULL;
        double ms = strtod(slo, &end);
        if (!end || *end != 0 || !(ms > 0) || ms > 1e9)
            tally_warn("TALLY_SLO_P99_MS=%s is not a positive number of milliseconds; no SLO", slo);
        else if (S.priority != TALLY_SB_PRIO_HIGH)
            tally_warn("TALLY_SLO_P99_MS is set but this process is not high priority; no SLO");
        else
            S.slo_p99_ns = (uint64_t)(ms * 1e6 + 0.5);
    }
}

/* ------------------------------------------------------------- joining */

static void *cuda_symbol(void *lib, const char *a, const char *b) {
    void *f = dlsym(lib, a);
    return f || !b ? f : dlsym(lib, b);
}

static int load_driver(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) return 0;
    *(void **)&drv.ctx_get_device = cuda_symbol(lib, "cuCtxGetDevice", NULL);
    *(void **)&drv.ctx_set_current = cuda_symbol(lib, "cuCtxSetCurrent", NULL);
    *(void **)&drv.device_get_uuid = cuda_symbol(lib, "cuDeviceGetUuid_v2", "cuDeviceGetUuid");
    *(void **)&drv.mem_host_register = cuda_symbol(lib, "cuMemHostRegister_v2", "cuMemHostRegister");
    *(void **)&drv.mem_host_get_device_pointer =
        cuda_symbol(lib, "cuMemHostGetDevicePointer_v2", "cuMemHostGetDevicePointer");
    *(void **)&drv.stream_write_value64 = cuda_symbol(lib, "cuStreamWriteValue64_v2", "cuStreamWriteValue64");
    *(void **)&drv.stream_is_capturing = cuda_symbol(lib, "cuStreamIsCapturing", NULL);
    *(void **)&drv.stream_wait_value64 = cuda_symbol(lib, "cuStreamWaitValue64_v2", "cuStreamWaitValue64");
    return drv.ctx_get_device && drv.device_get_uuid && drv.mem_host_register &&
           drv.mem_host_get_device_pointer && drv.stream_write_value64 && drv.stream_is_capturing;
}

static void format_uuid(const CUuuid *u, char out[64]) {
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, 64,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
}

static uint64_t own_start_ticks(void) {
    FILE *f = fopen("/proc/self/stat", "r");
    if (!f) return 0;
    char buf[1024];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* comm may hold spaces; fields restart after ')' */
    if (!p) return 0;
    unsigned long long ticks = 0;
    /* after ')': field 3 (state) ... field 22 (starttime) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu",
               &ticks) != 1)
        return 0;
    return ticks;
}

static struct tally_sb_slot *claim_slot(struct tally_sb_header *h) {
    for (uint32_t i = 0; i < TALLY_SB_MAX_CLIENTS; i++) {
        struct tally_sb_slot *s = tally_sb_slot_at(h, i);
        uint32_t expected = TALLY_SB_SLOT_FREE;
        if (!__atomic_compare_exchange_n(&s->state, &expected, TALLY_SB_SLOT_ACTIVE, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        __atomic_store_n(&s->priority, (uint32_t)S.priority, __ATOMIC_RELAXED);
        __atomic_store_n(&s->failopen, 0, __ATOMIC_RELAXED);
        /* A slot freed by its previous owner's exit still holds its counters. */
        __atomic_store_n(&s->launches, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->graph_launches, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->last_launch_ns, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->held_ns, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->held_launches, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->long_kernels, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->slo_p99_ns, S.slo_p99_ns, __ATOMIC_RELAXED);
        __atomic_store_n(&s->busy_start_ns, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->busy_periods, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->sliced_launches, 0, __ATOMIC_RELAXED);
        memset(tally_sb_slo_at(h, i), 0, TALLY_SB_SLO_SIZE); /* request latencies of a previous owner */
        memset(s->comm, 0, sizeof s->comm);
        FILE *f = fopen("/proc/self/comm", "r");
        if (f) {
            if (fgets(s->comm, sizeof s->comm, f)) s->comm[strcspn(s->comm, "\n")] = 0;
            fclose(f);
        }
        __atomic_store_n(&s->claim_ns, tally_now_ns(), __ATOMIC_RELAXED);
        __atomic_store_n(&s->pid_start_ticks, own_start_ticks(), __ATOMIC_RELAXED);
        __atomic_store_n(&s->pid, (uint32_t)getpid(), __ATOMIC_RELEASE);
        return s;
    }
    return NULL;
}

static void save_profiles(void);

/* Called on the first launch, when its context is current. */
static void join(CUcontext context) {
    pthread_mutex_lock(&S.join_lock);
    if (atomic_load(&S.state) != NOT_JOINED) goto out;
    const char *prefix = getenv(TALLY_SB_PREFIX_ENV);
    if (!prefix || !*prefix) {
        give_up(TALLY_SB_PREFIX_ENV " is not set (start the program with `tally run --priority ...`)");
        goto out;
    }
    if (!load_driver()) {
        give_up("libcuda lacks the stream memory operations tally needs");
        goto out;
    }
    CUdevice dev;
    CUuuid uuid;
    char uuid_text[64], path[4096];
    if (drv.ctx_get_device(&dev) != CUDA_SUCCESS || drv.device_get_uuid(&uuid, dev) != CUDA_SUCCESS) {
        give_up("cannot tell which GPU this process uses");
        goto out;
    }
    format_uuid(&uuid, uuid_text);
    snprintf(path, sizeof path, "%s%s", prefix, uuid_text);
    int fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK); /* never block on something that is not our file */
    if (fd < 0) {
        char why[4200];
        snprintf(why, sizeof why, "no tally scoreboard for %s (%s): is `tally up` running on this GPU?",
                 uuid_text, path);
        give_up(why);
        goto out;
    }
    struct stat st;
    void *map = MAP_FAILED;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size >= TALLY_SB_TOTAL_SIZE)
        map = mmap(NULL, TALLY_SB_TOTAL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    struct tally_sb_header *h = map;
    if (map == MAP_FAILED || h->magic != TALLY_SB_MAGIC || h->version != TALLY_SB_VERSION ||
        h->header_size != TALLY_SB_HEADER_SIZE || h->slot_size != TALLY_SB_SLOT_SIZE ||
        h->max_clients != TALLY_SB_MAX_CLIENTS || h->max_lanes != TALLY_SB_MAX_LANES) {
        if (map != MAP_FAILED) munmap(map, TALLY_SB_TOTAL_SIZE);
        give_up("the scoreboard is not one this agent understands (tally versions differ?)");
        goto out;
    }
    /* The GPU writes completions straight into the scoreboard. */
    CUresult r = drv.mem_host_register(map, TALLY_SB_TOTAL_SIZE,
                                       CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP);
    if (r == CUDA_SUCCESS) r = drv.mem_host_get_device_pointer(&S.sb_device, map, 0);
    if (r != CUDA_SUCCESS) {
        munmap(map, TALLY_SB_TOTAL_SIZE);
        give_up("cannot map the scoreboard into GPU memory (cuMemHostRegister failed)");
        goto out;
    }
    struct tally_sb_slot *slot = claim_slot(h);
    if (!slot) {
        munmap(map, TALLY_SB_TOTAL_SIZE);
        give_up("the scoreboard has no free client slot");
        goto out;
    }
    S.sb = h;
    S.slot = slot;
    /* A bit of the GPU-side gate left by the slot's previous owner (killed): not ours. */
    __atomic_fetch_and(&h->gpu_gate_slots, ~(1ull << tally_sb_slot_index(h, slot)), __ATOMIC_SEQ_CST);
    S.context = context;
    /* A reused slot keeps its lanes' numbers (repaired: launched == completed);
     * continue after them so "launched > completed" stays meaningful. */
    for (uint32_t i = 0; i < TALLY_SB_MAX_LANES; i++) {
        uint64_t a = __atomic_load_n(&slot->lanes[i].launched_seq, __ATOMIC_ACQUIRE);
        uint64_t b = __atomic_load_n(&slot->lanes[i].completed_seq, __ATOMIC_ACQUIRE);
        S.lanes[i].next_seq = a > b ? a : b;
        __atomic_store_n(&slot->lanes[i].completed_seq, S.lanes[i].next_seq, __ATOMIC_RELEASE);
        __atomic_store_n(&slot->lanes[i].launched_seq, S.lanes[i].next_seq, __ATOMIC_RELEASE);
    }
    /* Best effort: kernel duration estimates persist per program (docs/scheduling.md). */
    if (S.priority == TALLY_SB_PRIO_BEST_EFFORT && tally_profiles_load()) atexit(save_profiles);
    if (S.priority == TALLY_SB_PRIO_BEST_EFFORT) {
        runahead_init();
        gpugate_init();
    }
    atomic_store(&S.state, JOINED);
    const char *verbose = getenv("TALLY_VERBOSE");
    if (verbose && *verbose && strcmp(verbose, "0") != 0)
        fprintf(stderr, "tally: pid %d joined %s as %s (slot %ld)\n", (int)getpid(), path,
                S.priority == TALLY_SB_PRIO_HIGH ? "high priority" : "best effort",
                (long)tally_sb_slot_index(h, slot));
out:
    pthread_mutex_unlock(&S.join_lock);
}

/* --------------------------------------------------------------- lanes */

/* One lane per stream with work in flight, not per stream ever used: a
 * program may use more streams over its life than a slot has lanes (PyTorch's
 * stream pools, per-thread default streams of many threads), and a stream
 * without a lane is invisible to the gate. So a stream that needs a lane when
 * all are assigned takes over an idle one.
 *
 * Why reuse is safe. A lane's completion writes all go to the one stream it
 * is assigned to: they are enqueued under its lock, in sequence order, and
 * land in that order. completed_seq == next_seq therefore means that nothing
 * of the old stream is left to land, and no late write of the old stream can
 * later lower completed_seq under the new one. Sequence numbers continue
 * where the old stream stopped, so to every reader (the gate of other
 * processes, the daemon's completion rate) the lane is one monotonic counter.
 * (A write the driver refuses is counted done by the CPU at once, which could
 * pass a write of the same stream still queued; that was already a hazard
 * within one stream's lane, and a driver refusing memory operations on a
 * stream that took them before is not expected.)
 *
 * Why the lookup is safe without locks. A launch must enqueue its write on
 * the lane of its own stream; the danger is a lane taken over between finding
 * it and enqueuing, leaving two streams writing into one lane. Taking over
 * needs both lanes_lock and the lane's lock, and the launch path enqueues
 * only while holding the lane's lock after seeing there that the lane is
 * still its stream's. A lane found by the lock-free scan is checked again
 * under its lock (a miss falls back to the locked path); one found or
 * assigned under lanes_lock is locked before lanes_lock is released, so
 * nobody can take it over in between. Lock order: lanes_lock, then a lane's
 * lock; the launch path never takes lanes_lock while holding a lane's lock,
 * and retire_completed holds only the lane's lock. */

static void retire_lane(struct lane *l, uint64_t done, uint64_t now, uint64_t gap);

/* The lane's lock is held. Idle: every completion written for it has landed
 * and (best effort) none of its launches is still counted in flight. */
static int lane_idle(struct lane *l, uint32_t i) {
    uint64_t done = __atomic_load_n(&S.slot->lanes[i].completed_seq, __ATOMIC_ACQUIRE);
    if (done < l->next_seq) return 0;
    /* Everything in the ring is done; these completions were not timed by a
     * poll, so they teach no estimate (an unbounded gap). */
    if (l->head != l->tail) retire_lane(l, done, tally_now_ns(), UINT64_MAX);
    return l->head == l->tail;
}

_Static_assert(TALLY_SB_MAX_LANES <= 32, "lane masks are 32 bits");

/* lanes_lock is held and every lane is assigned: gives the least recently
 * used idle lane to key and returns it locked, or NULL when all are busy. */
static struct lane *take_idle_lane(CUstream key) {
    uint32_t tried = 0;
    for (;;) {
        struct lane *best = NULL;
        uint32_t best_i = 0;
        uint64_t best_used = 0;
        for (uint32_t i = 0; i < TALLY_SB_MAX_LANES; i++) {
            if (tried & (1u << i)) continue;
            /* Unlocked first look, to lock only lanes that may be idle. */
            uint64_t done = __atomic_load_n(&S.slot->lanes[i].completed_seq, __ATOMIC_ACQUIRE);
            if (done < __atomic_load_n(&S.slot->lanes[i].launched_seq, __ATOMIC_ACQUIRE)) continue;
            uint64_t used = __atomic_load_n(&S.lanes[i].last_used_ns, __ATOMIC_RELAXED);
            if (!best || used < best_used) best = &S.lanes[i], best_i = i, best_used = used;
        }
        if (!best) return NULL;
        tried |= 1u << best_i;
        pthread_mutex_lock(&best->lock);
        if (lane_idle(best, best_i)) {
            __atomic_store_n(&best->stream, key, __ATOMIC_RELAXED);
            best->last_done_ns = best->last_done_err = 0; /* the old stream's timing says nothing of the new one */
            return best;
        }
        pthread_mutex_unlock(&best->lock);
    }
}

/* The lane of key, with its lock held; NULL (untracked) when every lane is busy. */
static struct lane *lock_lane_of(CUstream key) {
    uint32_t n = atomic_load_explicit(&S.n_lanes, memory_order_acquire);
    for (uint32_t i = 0; i < n; i++) {
        struct lane *l = &S.lanes[i];
        if (__atomic_load_n(&l->stream, __ATOMIC_RELAXED) != key) continue;
        pthread_mutex_lock(&l->lock);
        if (__atomic_load_n(&l->stream, __ATOMIC_RELAXED) == key) return l;
        pthread_mutex_unlock(&l->lock); /* taken over since the scan: ask under lanes_lock */
        break;
    }
    pthread_mutex_lock(&S.lanes_lock);
    n = atomic_load(&S.n_lanes);
    struct lane *found = NULL;
    for (uint32_t i = 0; i < n && !found; i++)
        if (__atomic_load_n(&S.lanes[i].stream, __ATOMIC_RELAXED) == key) found = &S.lanes[i];
    if (!found && n < TALLY_SB_MAX_LANES) {
        found = &S.lanes[n];
        __atomic_store_n(&found->stream, key, __ATOMIC_RELAXED);
        atomic_store_explicit(&S.n_lanes, n + 1, memory_order_release);
    }
    if (found) pthread_mutex_lock(&found->lock);
    else found = take_idle_lane(key);
    pthread_mutex_unlock(&S.lanes_lock);
    if (!found && !atomic_exchange(&S.warned_lanes, 1))
        fprintf(stderr, "tally: warning: more than %u streams with work in flight at once; launches on the others "
                        "are not tracked until a stream goes idle\n",
                TALLY_SB_MAX_LANES);
    return found;
}

/* CU_STREAM_PER_THREAD is a different stream in every thread: one key each,
 * or their completions would be written out of order into one lane. The key
 * is a number never handed out twice, not the address of something
 * thread-local: a thread that starts after another exits can get the same
 * thread-local address while the old thread's completion writes are still
 * queued on its own stream. An exited thread's lane is reused once idle.
 * Odd values: never a stream handle (those are aligned), and from 3 up, never
 * CU_STREAM_LEGACY (0x1). */
static CUstream per_thread_key(void) {
    if (!pending.ptds_key) pending.ptds_key = (atomic_fetch_add(&ptds_keys, 1) + 1) << 1 | 1;
    return (CUstream)pending.ptds_key;
}

static int capturing(CUstream stream) {
    /* The legacy default stream cannot capture, and querying it while
     * another stream captures is itself an error. */
    if (stream == NULL) return 0;
    int status = CU_STREAM_CAPTURE_STATUS_NONE;
    if (drv.stream_is_capturing(stream, &status) != CUDA_SUCCESS) return 1;
    return status != CU_STREAM_CAPTURE_STATUS_NONE;
}

/* ------------------------------------------------------------ profiles */

/* symbol: the launch's mangled kernel name (or NULL), used only the first time
 * a (kernel, grid_threads) is seen, to seed its estimate from the profile file. */
static uint32_t profile_index(uintptr_t kernel, uint64_t grid_threads, const char *symbol) {
    uint64_t h = (uint64_t)kernel * 0x9E3779B97F4A7C15ull ^ grid_threads * 0xC2B2AE3D27D4EB4Full;
    uint32_t i = (uint32_t)(h >> 40) % PROFILE_SLOTS;
    for (uint32_t probe = 0; probe < 32; probe++, i = (i + 1) % PROFILE_SLOTS) {
        struct profile *p = &S.profiles[i];
        if (p->kernel == kernel && p->grid_threads == grid_threads) return i;
        if (p->kernel == 0) {
            p->kernel = kernel;
            p->grid_threads = grid_threads;
            p->name = tally_profiles_name(kernel, symbol); /* hashed once per CUfunction */
            if (p->name) tally_profiles_seed(p->name->hash, grid_threads, &p->est_ns, &p->samples);
            return i;
        }
    }
    return PROFILE_SLOTS; /* table crowded: no estimate, treated as unknown */
}

/* Unknown kernels are estimated at the whole budget (or at a guess the caller
 * has, hint_ns), so they run alone once and are timed exactly while the next
 * launch waits for them. */
static uint64_t estimate(uint32_t profile, uint64_t hint_ns) {
    if (profile >= PROFILE_SLOTS || S.profiles[profile].samples == 0)
        return hint_ns ? hint_ns : __atomic_load_n(&S.sb->turnaround_budget_ns, __ATOMIC_RELAXED);
    return S.profiles[profile].est_ns;
}

static void learn(uint32_t profile, uint64_t sample_ns) {
    if (profile >= PROFILE_SLOTS) return;
    struct profile *p = &S.profiles[profile];
    /* exponentially weighted, weight 1/4 for the new sample */
    p->est_ns = p->samples ? p->est_ns + ((int64_t)sample_ns - (int64_t)p->est_ns) / 4 : sample_ns;
    p->samples++;
    p->learned++;
}

/* GPU kernel times (CUPTI activity records, tally_agent.c) teach the
 * estimates without the polls' lateness. A record names its launch by the API
 * call's correlation id, so each timed launch leaves (correlation, profile,
 * units) here, packed in one word so that the activity thread never sees half
 * of an entry; a slot is reused 2^17 correlation ids later, long after its
 * record has come (CUPTI hands buffers over within milliseconds). Launches
 * the agent makes itself (slices but the last) have no correlation id of
 * their own and keep the polls' timing, as do graphs (one id, many kernels). */
#define TIMED_SLOTS (1u << 17)
_Static_assert(PROFILE_SLOTS <= 0xFFFF, "a profile index fits in 16 bits");
static _Atomic uint64_t timed[TIMED_SLOTS];
static _Atomic uint64_t gpu_timed_samples;

/* pending describes a tracked best-effort kernel launch whose API call has this correlation id. */
static void expect_gpu_time(uint32_t correlation) {
    pending.gpu_timed = 0;
    if (!correlation || pending.profile >= PROFILE_SLOTS || pending.units == 0 || pending.units > 0xFFFF) return;
    if (!tally_agent_kernel_times_on()) {
        tally_agent_start_kernel_times(); /* once; the next launches are timed when it is on */
        return;
    }
    atomic_store_explicit(&timed[correlation % TIMED_SLOTS],
                          (uint64_t)correlation << 32 | (uint64_t)pending.profile << 16 | pending.units,
                          memory_order_release);
    pending.gpu_timed = 1;
}

void tally_sched_kernel_ran(uint32_t correlation, uint64_t gpu_ns) {
    _Atomic uint64_t *slot = &timed[correlation % TIMED_SLOTS];
    uint64_t entry = atomic_load_explicit(slot, memory_order_acquire);
    if (!correlation || (uint32_t)(entry >> 32) != correlation ||
        !atomic_compare_exchange_strong(slot, &entry, 0))
        return;
    uint32_t profile = (uint32_t)(entry >> 16) & 0xFFFF, units = (uint32_t)entry & 0xFFFF;
    uint64_t sample = gpu_ns / units;
    if (!sample) sample = 1;
    pthread_mutex_lock(&S.profile_lock);
    struct profile *p = &S.profiles[profile];
    if (p->kernel) {
        /* The first GPU time replaces what the polls or the profile file said (both err long),
         * and the polls' samples no longer count. */
        if (p->gpu_samples == 0) p->samples = p->learned = 0;
        learn(profile, sample);
        p->gpu_samples++;
        atomic_fetch_add_explicit(&gpu_timed_samples, 1, memory_order_relaxed);
    }
    pthread_mutex_unlock(&S.profile_lock);
}

uint64_t tally_sched_gpu_timed(void) { return atomic_load(&gpu_timed_samples); }

/* At exit (registered by join when a profile file is in use): what this
 * process learned goes into the program's profile file. */
static void save_profiles(void) {
    static struct tally_profile_entry learned[PROFILE_SLOTS];
    size_t n = 0;
    tally_agent_flush_kernel_times(); /* the last kernels' times */
    pthread_mutex_lock(&S.profile_lock);
    for (uint32_t i = 0; i < PROFILE_SLOTS; i++) {
        const struct profile *p = &S.profiles[i];
        if (p->learned && p->name && p->est_ns)
            learned[n++] = (struct tally_profile_entry){p->name->hash, p->grid_threads, p->est_ns, p->learned,
                                                        p->name->name};
    }
    pthread_mutex_unlock(&S.profile_lock);
    tally_profiles_save(learned, n);
}

/* Retire BE launches whose completion the GPU has written. A completion seen
 * now happened after the previous poll, so a sample taken now is late by at
 * most the gap between polls (plus the error of its start, when it started at
 * the previous completion); samples whose error is small teach the estimates.
 * The error bound is relative as well as absolute: past SPIN_NS the gate polls
 * every ~20 us of nanosleep plus timer slack, and kernels longer than that must
 * still be learned. gap: the time since the previous poll, UINT64_MAX when this
 * is no poll (nothing is learned). The lane's lock is held. */
static void retire_lane(struct lane *l, uint64_t done, uint64_t now, uint64_t gap) {
    while (l->head != l->tail && l->ring[l->head % RING].seq <= done) {
        struct inflight *e = &l->ring[l->head % RING];
        /* It started at its launch, or queued behind the previous one, at that one's completion. */
        uint64_t start = e->launch_ns, err = gap;
        if (l->last_done_ns > start) {
            start = l->last_done_ns;
            err = gap > UINT64_MAX - l->last_done_err ? UINT64_MAX : gap + l->last_done_err;
        }
        uint64_t sample = now - start;
        if (err <= ACCURATE_POLL_NS || err <= sample / ACCURATE_POLL_SHARE) {
            pthread_mutex_lock(&S.profile_lock);
            if (!e->batched &&
                (!e->gpu_timed || e->profile >= PROFILE_SLOTS || S.profiles[e->profile].gpu_samples == 0))
                learn(e->profile, sample / e->units);
            pthread_mutex_unlock(&S.profile_lock);
        }
        l->last_done_ns = now;
        l->last_done_err = gap;
        l->head++;
    }
}

/* The lane's lock is held. A lane's launches run one after another: the first
 * has been running since its launch or since the previous one's completion
 * was seen (later than it happened: the estimate errs long), the others have
 * not started. So what is left is the first one's estimate less the time it
 * has run, plus the others' whole estimates. Counting only what is left, and
 * not whole kernels, lets the next kernel be queued just before the running
 * one ends, so the GPU does not idle for a launch round trip; a kernel that
 * has overrun its estimate counts in full again (how long it still runs is
 * unknown). */
static void lane_backlog(const struct lane *l, uint64_t now, struct be_backlog *b) {
    for (uint32_t k = l->head; k != l->tail; k++) {
        const struct inflight *e = &l->ring[k % RING];
        if (e->queued) break; /* run-ahead: it and what follows it in the stream wait for their release */
        uint64_t left = e->est_ns;
        if (k == l->head) {
            uint64_t start = l->last_done_ns > e->launch_ns ? l->last_done_ns : e->launch_ns;
            uint64_t ran = now > start ? now - start : 0;
            if (ran < e->est_ns) left = e->est_ns - ran;
            if (!b->oldest_ns || start < b->oldest_ns) b->oldest_ns = start;
        }
        b->remaining_ns += left;
        b->launches++;
    }
}

/* A poll of every lane; returns what is still in flight. skipped: NULL to wait for every
 * lane's lock; else lanes whose lock is busy are left out and counted there (run-ahead's
 * releaser must never wait for a thread that may itself be blocked in the driver behind a
 * stream wait only the releaser can release). */
struct be_backlog retire_lanes(uint64_t now, uint32_t *skipped) {
    struct be_backlog backlog = {0, 0, 0};
    uint64_t gap = S.last_poll_ns ? now - S.last_poll_ns : UINT64_MAX;
    S.last_poll_ns = now;
    uint32_t n = atomic_load_explicit(&S.n_lanes, memory_order_acquire);
    for (uint32_t i = 0; i < n; i++) {
        struct lane *l = &S.lanes[i];
        if (l->head == l->tail) continue;
        /* Read before the lock: if the lane changes streams meanwhile, its new
         * stream's launches have higher numbers than this, so none is retired early. */
        uint64_t done = __atomic_load_n(&S.slot->lanes[i].completed_seq, __ATOMIC_ACQUIRE);
        if (!skipped) {
            pthread_mutex_lock(&l->lock);
        } else if (pthread_mutex_trylock(&l->lock) != 0) {
            (*skipped)++;
            continue;
        }
        retire_lane(l, done, now, gap);
        lane_backlog(l, now, &backlog);
        pthread_mutex_unlock(&l->lock);
    }
    return backlog;
}

static struct be_backlog retire_completed(uint64_t now) { return retire_lanes(now, NULL); }

/* ------------------------------------------------------- launch hooks */

/* SLO proxy (docs/operations.md, "SLO mode"): an HP launch with none of this
 * process's tracked work in flight, more than idle_window_ns after its previous
 * launch, starts a busy period. The agent records only the start; the daemon
 * sees the end (all lanes completed, no launch for idle_window_ns) at its tick. */
static int own_inflight(void) {
    uint32_t n = atomic_load_explicit(&S.n_lanes, memory_order_acquire);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t done = __atomic_load_n(&S.slot->lanes[i].completed_seq, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&S.slot->lanes[i].launched_seq, __ATOMIC_ACQUIRE) > done) return 1;
    }
    return 0;
}

static void hp_busy_period(uint64_t previous_launch_ns, uint64_t now) {
    uint64_t idle = __atomic_load_n(&S.sb->idle_window_ns, __ATOMIC_RELAXED);
    if (previous_launch_ns != 0 && (now <= previous_launch_ns || now - previous_launch_ns <= idle)) return;
    if (own_inflight()) return;
    __atomic_store_n(&S.slot->busy_start_ns, now, __ATOMIC_RELAXED);
    __atomic_fetch_add(&S.slot->busy_periods, 1, __ATOMIC_RELEASE); /* after the start: readers see both */
}

/* For tally.slo (Python, in the same process): the index of this process's
 * scoreboard slot, with the scoreboard's address in *scoreboard, once the
 * agent has joined (its first launch); -1 before that, after failing open,
 * or without a priority. */
TALLY_EXPORT int tally_agent_slot(void **scoreboard) {
    if (atomic_load(&S.state) != JOINED || !S.slot || !S.sb) return -1;
    if (scoreboard) *scoreboard = S.sb;
    return (int)tally_sb_slot_index(S.sb, S.slot);
}

/* Between two looks at the gate, held_ns into a wait: spin (yielding) at first, then sleep. */
void gate_pause(uint64_t held_ns, int spin) {
    if (spin && held_ns < SPIN_NS) {
        sched_yield();
    } else {
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
}

/* A launch held past TALLY_MAX_HOLD_MS at decision d: the process fails open, with one warning. */
void give_up_held(enum tally_gate_decision d) {
    char why[200];
    snprintf(why, sizeof why, "a best-effort launch was held for %llu ms while what it waited for made no progress "
                              "(%s; see `tally status`)",
             (unsigned long long)(S.max_hold_ns / 1000000ull), tally_gate_decision_name(d));
    give_up(why);
}

void warn_if_daemon_dead(enum tally_gate_decision d) {
    if (d == TALLY_GATE_DAEMON_DEAD && !atomic_exchange(&S.warned_daemon, 1))
        fprintf(stderr, "tally: warning: the tally daemon stopped responding; best-effort launches run ungated\n");
}

/* units: how many times the kernel's profile the launch is (slices of k waves
 * share the one-wave profile of their slice kernel); 1 for any other launch. */
uint64_t launch_estimate(const struct tally_launch *launch, uint64_t hint_ns, uint32_t units,
                         uint32_t *profile) {
    pthread_mutex_lock(&S.profile_lock);
    *profile = profile_index(launch->kernel, launch->grid_threads, launch->symbol);
    pthread_mutex_unlock(&S.profile_lock);
    return estimate(*profile, hint_ns) * units;
}

/* Each thread's watch of HP's progress, allocated at its first hold and freed at its exit. */
static pthread_key_t watch_key;
static pthread_once_t watch_once = PTHREAD_ONCE_INIT;
static int watch_key_ok;
static void make_watch_key(void) { watch_key_ok = pthread_key_create(&watch_key, free) == 0; }

struct tally_gate_watch *thread_watch(void) {
    pthread_once(&watch_once, make_watch_key);
    if (!watch_key_ok) return NULL;
    struct tally_gate_watch *watch = pthread_getspecific(watch_key);
    if (!watch && (watch = malloc(tally_gate_watch_size())) && pthread_setspecific(watch_key, watch) != 0) {
        free(watch);
        watch = NULL;
    }
    return watch; /* tally_gate_hold_start clears it */
}

static void be_wait_at_gate(const struct tally_launch *launch, uint64_t now, uint64_t hint_ns, uint32_t units) {
    uint32_t profile;
    uint64_t est = launch_estimate(launch, hint_ns, units, &profile);
    uint64_t held_since = 0;
    struct tally_gate_hold hold;
    pending.gpu_timed = 0;
    static struct tally_gate_bucket bucket; /* policy tgs: this process's token bucket */
    enum tally_gate_decision d;
    int stuck = 0;
    for (;;) {
        struct be_backlog backlog = retire_completed(now);
        d = tally_gate_decide_be(S.sb, now, backlog.remaining_ns, backlog.launches, est, &bucket);
        if (!TALLY_GATE_IS_WAIT(d)) break;
        if (!held_since) {
            held_since = now;
            tally_gate_hold_start(&hold, thread_watch(), now);
            atomic_fetch_add(&S.launch_holds, 1);
        }
        /* What the gate waits for must be able to complete; other threads may defer more meanwhile. */
        flush_unwritten();
        if (tally_gate_hold_stall_ns(&hold, S.sb, now, d, backlog.oldest_ns) >= S.max_hold_ns) {
            stuck = 1;
            break;
        }
        gate_pause(now - held_since, d != TALLY_GATE_WAIT_RATE); /* rate waits sleep */
        now = tally_now_ns();
    }
    /* held_launches and long_kernels count the program's launches (the caller adds them up:
     * a launch run as slices waits at the gate once per slice); held time adds up as it is. */
    if (held_since) {
        __atomic_fetch_add(&S.slot->held_ns, now - held_since, __ATOMIC_RELAXED);
        atomic_store(&S.launch_hold_end_ns, now);
        atomic_fetch_sub(&S.launch_holds, 1);
    }
    pending.held = held_since != 0;
    pending.alone = d == TALLY_GATE_ADMIT_ALONE;
    pending.idle = d == TALLY_GATE_ADMIT_IDLE;
    if (stuck) {
        give_up_held(d);
        pending.track = 0;
        return;
    }
    warn_if_daemon_dead(d);
    /* Track only while an HP client exists: with none, BE pays nothing. */
    pending.track = launch->trackable && (d == TALLY_GATE_ADMIT || d == TALLY_GATE_ADMIT_ALONE ||
                                          d == TALLY_GATE_ADMIT_IDLE);
    pending.est_ns = est;
    pending.profile = profile;
    pending.units = units;
}

/* ------------------------------------------------------------ slicing */

/* The parts of a kernel launch slicing reads, wherever the entry point keeps them. */
struct kernel_args {
    CUfunction f;
    unsigned grid[3];
    unsigned block[3];
    unsigned smem;
    void **args;         /* kernelParams */
    void **extra;
};

static int kernel_args_of(const struct tally_launch *launch, struct kernel_args *a) {
    if (launch->rewrite == TALLY_REWRITE_KERNEL) {
        const tally_cuLaunchKernel_params *p = launch->params;
        *a = (struct kernel_args){p->f, {p->gridDimX, p->gridDimY, p->gridDimZ},
                                  {p->blockDimX, p->blockDimY, p->blockDimZ}, p->sharedMemBytes, p->kernelParams,
                                  p->extra};
        return 1;
    }
    if (launch->rewrite == TALLY_REWRITE_KERNEL_EX) {
        const tally_cuLaunchKernelEx_params *p = launch->params;
        const tally_CUlaunchConfig *c = p->config;
        /* Launch attributes (clusters, programmatic serialization...) change
         * what a grid means: such launches run whole. */
        if (!c || c->numAttrs != 0) return 0;
        *a = (struct kernel_args){p->f, {c->gridDimX, c->gridDimY, c->gridDimZ},
                                  {c->blockDimX, c->blockDimY, c->blockDimZ}, c->sharedMemBytes, p->kernelParams,
                                  p->extra};
        return 1;
    }
    return 0;
}

static void track_launch(const struct tally_launch *launch, CUresult result);

/* Turns the program's launch, in the callback's parameter block (which the
 * driver reads after API enter), into a 1-D launch of `blocks` blocks of f. */
static void rewrite_launch(const struct tally_launch *launch, CUfunction f, unsigned blocks, void **args) {
    static __thread tally_CUlaunchConfig config_copy;
    if (launch->rewrite == TALLY_REWRITE_KERNEL) {
        tally_cuLaunchKernel_params *p = launch->params;
        p->f = f;
        p->gridDimX = blocks;
        p->gridDimY = p->gridDimZ = 1;
        p->kernelParams = args;
    } else {
        tally_cuLaunchKernelEx_params *p = launch->params;
        /* The configuration is the program's memory: point the block at a changed copy. */
        config_copy = *p->config;
        config_copy.gridDimX = blocks;
        config_copy.gridDimY = config_copy.gridDimZ = 1;
        p->config = &config_copy;
        p->f = f;
        p->kernelParams = args;
    }
}

/* A best-effort launch of a kernel the plan has a slice kernel for, run as
 * slices of whole waves, each admitted by the gate like a launch of its own:
 * an HP request then waits behind at most one slice instead of the whole
 * kernel. Slices 0..n-2 are launched here, from the callback, on the
 * launch's stream; the program's own launch is rewritten in place into the
 * last slice, so its API call returns what that launch returns and API exit
 * tracks it like any launch. Same stream, in order, every original block
 * exactly once: the program sees the same results in the same stream order.
 *
 * Slice size: as many whole waves (blocks of this shape resident on the GPU
 * at once) as fit in the turnaround budget, at least one. A kernel that
 * fits in one slice runs whole. Returns 1 when the launch was handled here. */
static int be_launch_sliced(const struct tally_launch *launch, uint64_t now) {
    static __thread void *args[TALLY_BLOCKSCHED_MAX_PARAMS + 4];
    static __thread uint32_t appended[4];
    struct kernel_args a;
    if (!kernel_args_of(launch, &a)) return 0;
    struct tally_slice_kernel sk;
    unsigned block_threads = a.block[0] * a.block[1] * a.block[2];
    /* Arguments in `extra` are one opaque buffer the appended ones cannot join. */
    if (a.extra || !tally_blocksched_lookup(a.f, launch->symbol, block_threads, a.smem, &sk)) return 0;
    if (sk.nparams && !a.args) return 0;
    uint64_t total = (uint64_t)a.grid[0] * a.grid[1] * a.grid[2];
    uint64_t waves = (total + sk.wave_blocks - 1) / sk.wave_blocks;
    if (waves <= 1 || total >= 0xFFFFFFFFull) {
        tally_blocksched_whole(&sk, waves <= 1 ? "one wave or less" : "grid too large");
        return 0;
    }
    /* A wave's time: from earlier slices of this kernel (timed per wave),
     * else from the whole kernel's estimate (timed when it ran whole, or
     * seeded from the profile file); unknown, the slices are one wave each. */
    struct tally_launch slice = *launch;
    slice.kernel = (uintptr_t)sk.slice;
    /* Under its own name, so a wave's time persists in the profile file like a kernel's:
     * the next run sizes its slices (and applies the floor) from its first launch. */
    slice.symbol = sk.slice_symbol;
    slice.grid_threads = sk.wave_blocks * block_threads;
    slice.correlation = 0; /* the program's call's id belongs to the last slice, its own launch */
    uint64_t wave_ns = 0, whole_wave_ns = 0, wave_samples = 0;
    pthread_mutex_lock(&S.profile_lock);
    uint32_t whole = profile_index(launch->kernel, launch->grid_threads, launch->symbol);
    uint32_t one_wave = profile_index(slice.kernel, slice.grid_threads, slice.symbol);
    if (whole < PROFILE_SLOTS && S.profiles[whole].samples && S.profiles[whole].est_ns)
        whole_wave_ns = S.profiles[whole].est_ns / waves;
    if (one_wave < PROFILE_SLOTS && S.profiles[one_wave].samples && S.profiles[one_wave].est_ns) {
        wave_ns = S.profiles[one_wave].est_ns; /* measured as slices: includes what slicing costs */
        wave_samples = S.profiles[one_wave].samples;
    } else {
        wave_ns = whole_wave_ns;
    }
    pthread_mutex_unlock(&S.profile_lock);
    /* Both known: slices that keep less than the floor of the whole kernel's speed are not
     * worth their bound (docs/blocksched.md, "The choice"); the kernel runs whole. */
    if (whole_wave_ns && wave_ns && (double)whole_wave_ns < tally_blocksched_floor() * (double)wave_ns) {
        char why[96];
        snprintf(why, sizeof why, "slices keep %.2fx of its speed, under the floor %.2fx",
                 (double)whole_wave_ns / (double)wave_ns, tally_blocksched_floor());
        tally_blocksched_whole(&sk, why);
        return 0;
    }
    uint64_t budget = tally_gate_bound_ns(S.sb, now);
    uint64_t per_slice = (wave_ns && budget / wave_ns ? budget / wave_ns : 1) * sk.wave_blocks;
    if (per_slice >= total) {
        char why[64];
        snprintf(why, sizeof why, "fits in one slice of the %llu us bound", (unsigned long long)(budget / 1000));
        tally_blocksched_whole(&sk, why);
        return 0;
    }
    uint64_t n = (total + per_slice - 1) / per_slice, waves_per_slice = per_slice / sk.wave_blocks;
    for (uint32_t i = 0; i < sk.nparams; i++) args[i] = a.args[i];
    for (int i = 0; i < 4; i++) args[sk.nparams + i] = &appended[i];
    appended[0] = a.grid[0], appended[1] = a.grid[1], appended[2] = a.grid[2];
    uint64_t est_sum = 0, on_gpu_slices = 0;
    int any_held = 0, any_alone = 0;
    /* With the GPU-side gate (tally run --block-level --gpu-gate), once a wave's time is known from
     * slices the launch-level gate timed: every slice waits on the GPU for the gate word, so an HP
     * launch stops this kernel at its next slice and the thread is never held. Such slices are not
     * tracked, so they teach nothing: the wave's time stays what the timed slices learned. */
    int on_gpu = wave_samples >= GPU_GATED_SLICE_SAMPLES && launch->trackable && gpugate_ready(now);
    /* The sliced share counts BE work while HP may need the GPU, as for slices admitted at launch:
     * not once HP has been idle past unthrottle_after. */
    int on_gpu_idle = on_gpu && tally_gate_decide(S.sb, now, 0, 0, 0) == TALLY_GATE_ADMIT_IDLE;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t offset = i * per_slice, blocks = total - offset < per_slice ? total - offset : per_slice;
        appended[3] = (uint32_t)offset;
        /* Slices are timed per wave: every slice of this kernel and block shape teaches one estimate. */
        uint32_t units = (uint32_t)((blocks + sk.wave_blocks - 1) / sk.wave_blocks);
        /* the last slice's wait is the program's launch's: it counts once as a held launch */
        if (on_gpu && !gpugate_wait(launch->stream, now, i + 1 == n)) on_gpu = 0; /* the rest wait at launch */
        if (on_gpu) {
            pending.track = 0;
            pending.held = pending.alone = 0;
            pending.idle = on_gpu_idle;
            pending.est_ns = wave_ns * units;
            on_gpu_slices++;
        } else if (atomic_load(&S.state) == JOINED) {
            be_wait_at_gate(&slice, now, wave_ns, units);
        } else { /* the gate gave up on an earlier slice: the rest run ungated */
            pending.track = 0;
            pending.held = pending.alone = pending.idle = 0;
        }
        if (!pending.idle) est_sum += pending.est_ns; /* the sliced share counts throttled time only */
        any_held |= pending.held;
        any_alone |= pending.alone;
        if (i + 1 == n) break;
        CUresult r = tally_blocksched_launch(&sk, (unsigned)blocks, a.block, a.smem, launch->stream, args);
        if (r != CUDA_SUCCESS) {
            pending.track = 0;
            if (i == 0) { /* nothing ran yet: the original kernel runs, as if never planned */
                tally_blocksched_disable(&sk, "a slice launch failed");
                return 0;
            }
            /* Slices ran already: the rest of the grid must run, as one slice (below). */
            tally_blocksched_disable(&sk, "a slice launch failed; the rest of that launch ran as one slice");
            per_slice = total - offset;
            n = i + 1;
            break;
        }
        track_launch(&slice, CUDA_SUCCESS); /* as a launch of its own; the program's API exit is still to come */
        now = tally_now_ns();
    }
    /* The program's launch becomes the last slice (appended[3]: its offset). */
    if (pending.track) expect_gpu_time(launch->correlation);
    rewrite_launch(launch, sk.slice, (unsigned)(total - appended[3] < per_slice ? total - appended[3] : per_slice),
                   args);
    struct tally_blocksched_stats *st = tally_blocksched_stats();
    atomic_fetch_add_explicit(&st->sliced_launches, 1, memory_order_relaxed);
    if (S.slot) { /* for tally status */
        __atomic_fetch_add(&S.slot->sliced_launches, 1, __ATOMIC_RELAXED);
        if (any_held) __atomic_fetch_add(&S.slot->held_launches, 1, __ATOMIC_RELAXED);
        if (any_alone) __atomic_fetch_add(&S.slot->long_kernels, 1, __ATOMIC_RELAXED);
    }
    atomic_fetch_add_explicit(&st->slices, n, memory_order_relaxed);
    atomic_fetch_add_explicit(&st->gpu_gated_slices, on_gpu_slices, memory_order_relaxed);
    atomic_fetch_add_explicit(&st->sliced_est_ns, est_sum, memory_order_relaxed);
    tally_blocksched_sliced(&sk, n, waves_per_slice, wave_ns, budget);
    return 1;
}

/* The daemon's access rules let this user run only best effort, and it has
 * rewritten our slot's priority: from now on this process is gated like any
 * best-effort client. Without this, the daemon would no longer count its work
 * as high priority, but the process itself would go on launching ungated and
 * keep resetting the idle window every other client waits for. */
static void demoted(void) {
    S.priority = TALLY_SB_PRIO_BEST_EFFORT;
    if (!atomic_exchange(&S.warned_demoted, 1))
        fprintf(stderr, "tally: warning: the tally daemon runs this program as best effort (this user may not "
                        "claim high priority; see [access] in the config)\n");
}

void tally_sched_launch_enter(const struct tally_launch *launch) {
    pending.track = 0;
    pending.launching = 0;
    pending.ra = NULL;
    pending.in_place = 0;
    if (S.priority < 0) return;
    int state = atomic_load(&S.state);
    if (state == NOT_JOINED) {
        join(launch->context);
        state = atomic_load(&S.state);
    }
    /* One scoreboard per GPU: work of another context (another GPU) is not ours to schedule. */
    if (state != JOINED || launch->context != S.context) return;
    struct tally_sb_slot *slot = S.slot;
    __atomic_fetch_add(launch->is_graph ? &slot->graph_launches : &slot->launches, 1, __ATOMIC_RELAXED);
    if (S.priority == TALLY_SB_PRIO_HIGH &&
        __atomic_load_n(&slot->priority, __ATOMIC_RELAXED) != TALLY_SB_PRIO_HIGH)
        demoted();
    /* The common case for training with nobody to protect: a few loads, no tracking, and no
     * precise clock (on an H200 VM this path cost 270 ns a launch more than CUPTI's callbacks
     * alone; the last launch's time serves SLO mode, which watches HP slots only). */
    uint32_t policy = __atomic_load_n(&S.sb->policy, __ATOMIC_RELAXED);
    if (S.priority == TALLY_SB_PRIO_BEST_EFFORT &&
        ((policy != TALLY_SB_POLICY_TALLY && policy != TALLY_SB_POLICY_TGS) ||
         __atomic_load_n(&S.sb->hp_active, __ATOMIC_RELAXED) == 0)) {
        __atomic_store_n(&slot->last_launch_ns, tally_coarse_now_ns(), __ATOMIC_RELAXED);
        flush_unwritten(); /* groups left from while HP was present (one load when there are none) */
        return;
    }
    uint64_t now = tally_now_ns();
    pending.now = now;
    uint64_t previous_launch_ns = __atomic_load_n(&slot->last_launch_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->last_launch_ns, now, __ATOMIC_RELAXED);
    if (launch->trackable && capturing(launch->stream)) return; /* recorded into a graph, runs later */
    if (S.priority == TALLY_SB_PRIO_HIGH) {
        /* Busy from before the launch is enqueued until its completion is written. */
        __atomic_add_fetch(&slot->launching, 1, __ATOMIC_SEQ_CST); /* until its lane shows it */
        pending.launching = 1;
        __atomic_store_n(&S.sb->hp_last_launch_ns, now, __ATOMIC_RELEASE);
        gpugate_close_all(now); /* BE streams of the GPU-side gate stop at their next wait */
        hp_busy_period(previous_launch_ns, now);
        pending.track = launch->trackable;
        pending.be = 0;
        return;
    }
    pending.be = 1;
    int planned = launch->rewrite && tally_blocksched_enabled(); /* may run as slices, gated in place */
    if (!planned && gpugate_try(launch, now))
        return; /* waits on the GPU for HP to be idle: neither held nor tracked here */
    if (planned) runahead_drain();
    if (planned && __atomic_load_n(&S.sb->policy, __ATOMIC_RELAXED) == TALLY_SB_POLICY_TALLY &&
        be_launch_sliced(launch, now))
        return;
    if (!runahead_try(launch, now)) be_wait_at_gate(launch, now, 0, 1);
    if (pending.track && !launch->is_graph) expect_gpu_time(launch->correlation);
    if (pending.held) __atomic_fetch_add(&S.slot->held_launches, 1, __ATOMIC_RELAXED);
    if (pending.alone) __atomic_fetch_add(&S.slot->long_kernels, 1, __ATOMIC_RELAXED);
    /* The sliced share's denominator: planned or not, BE time admitted under the budget (while
     * HP is idle past unthrottle_after, kernels run whole on purpose: nobody waits for them). */
    if (tally_blocksched_enabled() && pending.track && !pending.idle) {
        struct tally_blocksched_stats *st = tally_blocksched_stats();
        atomic_fetch_add_explicit(&st->unsliced_launches, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&st->unsliced_est_ns, pending.est_ns, memory_order_relaxed);
    }
}

/* The lane's lock is held. Enqueues the completion write of the lane's latest
 * launch on its stream, which covers every launch of the lane before it: they
 * complete in stream order. */
static void write_completion(struct lane *l, CUstream stream) {
    struct tally_sb_lane *shared = &S.slot->lanes[l - S.lanes];
    uint64_t seq = l->next_seq;
    __atomic_store_n(&shared->launched_seq, seq, __ATOMIC_RELEASE);
    if (drv.stream_write_value64(stream, sb_device_address(&shared->completed_seq), seq, 0) != CUDA_SUCCESS) {
        /* Untrackable stream: count it done now rather than block anyone (and learn nothing from it). */
        for (uint32_t k = l->head; k != l->tail; k++)
            if (l->ring[k % RING].seq > __atomic_load_n(&shared->completed_seq, __ATOMIC_ACQUIRE))
                l->ring[k % RING].profile = PROFILE_SLOTS;
        __atomic_store_n(&shared->completed_seq, seq, __ATOMIC_RELEASE);
    }
    if (l->unwritten) atomic_fetch_sub(&S.deferred_lanes, 1);
    __atomic_store_n(&l->unwritten, 0, __ATOMIC_RELAXED);
    l->unwritten_est = 0;
}

/* Batched completion writes. A completion write costs the launching thread
 * about as much as a launch, and an eager training step launches thousands
 * of short kernels. With TALLY_BATCH_WRITES=1, a best-effort kernel launch
 * leaves its write to a later launch of its stream while the launches
 * without one add up to less than BATCH_BUDGET_SHARE of the budget and
 * BATCH_MAX_LAUNCHES: the gate then sees them complete a little late, as one
 * group. A group whose stream goes quiet is written when the gate next has
 * to wait (flush_unwritten), so it cannot hold anyone for long. Not for HP
 * (its last launch must be seen complete at once, or BE waits for nothing),
 * graphs, or the per-thread default stream (another thread cannot write to
 * it). */
static int defer_write(const struct tally_launch *launch, const struct lane *l) {
    if (!S.batch_writes || launch->is_graph || launch->stream == CU_STREAM_PER_THREAD) return 0;
    uint64_t window = __atomic_load_n(&S.sb->turnaround_budget_ns, __ATOMIC_RELAXED) / BATCH_BUDGET_SHARE;
    return l->unwritten + 1 < BATCH_MAX_LAUNCHES && l->unwritten_est + pending.est_ns < window;
}

/* Writes every lane's pending group: called when the gate has to wait, when
 * the work in flight must become visible. */
void flush_unwritten(void) {
    if (!atomic_load_explicit(&S.deferred_lanes, memory_order_relaxed)) return;
    uint32_t n = atomic_load_explicit(&S.n_lanes, memory_order_acquire);
    for (uint32_t i = 0; i < n; i++) {
        struct lane *l = &S.lanes[i];
        if (!__atomic_load_n(&l->unwritten, __ATOMIC_RELAXED)) continue;
        pthread_mutex_lock(&l->lock);
        if (l->unwritten) write_completion(l, l->unwritten_stream);
        pthread_mutex_unlock(&l->lock);
    }
}

/* API exit's bookkeeping of a tracked launch (also each slice the agent launches itself):
 * its ring entry and completion write. */
static void track_launch(const struct tally_launch *launch, CUresult result) {
    if (!pending.track || launch->context != S.context || result != CUDA_SUCCESS) {
        pending.track = 0;
        return;
    }
    pending.track = 0;
    CUstream key = launch->stream == CU_STREAM_PER_THREAD ? per_thread_key() : launch->stream;
    struct lane *l = lock_lane_of(key); /* held until the write is enqueued: see "Why the lookup is safe" */
    int be = pending.be;
    if (!l || (be && l->tail - l->head >= RING)) { /* no lane, or ring full: leave this one untracked */
        if (l) pthread_mutex_unlock(&l->lock);
        return;
    }
    __atomic_store_n(&l->last_used_ns, pending.now, __ATOMIC_RELAXED);
    uint64_t seq = ++l->next_seq;
    int defer = be && defer_write(launch, l);
    if (be) {
        l->ring[l->tail % RING] = (struct inflight){seq, pending.est_ns, tally_now_ns(), pending.profile, pending.units,
                                                    (uint32_t)pending.gpu_timed, (uint32_t)(defer || l->unwritten), 0};
        l->tail++;
        runahead_ring_entry(l, &l->ring[(l->tail - 1) % RING]);
    }
    if (defer) {
        if (!l->unwritten) atomic_fetch_add(&S.deferred_lanes, 1);
        __atomic_store_n(&l->unwritten, l->unwritten + 1, __ATOMIC_RELAXED);
        l->unwritten_est += pending.est_ns;
        l->unwritten_stream = launch->stream;
    } else {
        write_completion(l, launch->stream);
    }
    pthread_mutex_unlock(&l->lock);
}

void tally_sched_launch_exit(const struct tally_launch *launch, CUresult result) {
    track_launch(launch, result);
    if (pending.launching) { /* after track_launch: its lane shows the work from now on */
        pending.launching = 0;
        if (S.slot) __atomic_sub_fetch(&S.slot->launching, 1, __ATOMIC_SEQ_CST);
    }
    /* Last: its kernel and completion write are in the stream now, so a run-ahead wait may
     * follow them. */
    runahead_exit();
}

/* Leave the scoreboard: nothing of ours may look in flight after we are gone.
 * The slot is left REPAIRING, not FREE: completion writes still queued on the
 * GPU can land after this (CUDA tears contexts down after atexit handlers), and
 * the daemon frees the slot only after its quarantine, so such a late write
 * can never lower a new owner's completed_seq. */
void tally_sched_exit(void) {
    release_gpu_waits(); /* before CUDA tears the context down */
    if (atomic_load(&S.state) != JOINED || !S.slot) return;
    for (uint32_t i = 0; i < TALLY_SB_MAX_LANES; i++) {
        uint64_t a = __atomic_load_n(&S.slot->lanes[i].launched_seq, __ATOMIC_ACQUIRE);
        __atomic_store_n(&S.slot->lanes[i].completed_seq, a, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&S.slot->state, TALLY_SB_SLOT_REPAIRING, __ATOMIC_RELEASE);
    __atomic_store_n(&S.slot->pid, 0, __ATOMIC_RELAXED);
    atomic_store(&S.state, UNGATED);
}

void tally_sched_after_fork(void) {
    /* The child is a new process: it has no slot and no usable CUDA context. */
    S.slot = NULL;
    S.sb = NULL;
    atomic_store(&S.n_lanes, 0);
    atomic_store(&S.deferred_lanes, 0);
    for (uint32_t i = 0; i < TALLY_SB_MAX_LANES; i++) S.lanes[i].unwritten = 0;
    runahead_after_fork();
    gpugate_after_fork();
    atomic_store(&S.state, S.priority >= 0 ? UNGATED : NOT_JOINED);
}
