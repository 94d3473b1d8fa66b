/* Run-ahead admission (TALLY_RUN_AHEAD=1, `tally run --run-ahead`, off by default; docs/scheduling.md,
 * "What limits best-effort throughput"). A BE launch the gate would hold does
 * not hold the program's thread: it is enqueued on the GPU behind
 * cuStreamWaitValue64(release >= ticket), and the releaser thread raises
 * `release` as the gate admits the queued launches, in ticket (issue) order.
 * Releasing in issue order cannot deadlock: a launch can depend only on work
 * issued before it, which was released first. The program's thread blocks
 * only while the queue is full. Every way out (the gate giving up, process
 * exit) releases everything first, so no stream is left waiting. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agent.h"
#include "gate.h"
#include "scoreboard.h"
#include "sched_internal.h"

#define RA_SLOTS 128 /* well under the driver's queue of pending launches: a full one blocks in the driver */
#define RA_QUEUED_NS 20000000ull /* and at most this much estimated work queued */

struct ra_entry {
    uint64_t ticket;
    uint64_t est_ns;
    uint64_t queued_ns;        /* when it was queued, for held_ns */
    _Atomic int released;      /* the word has reached its ticket */
    _Atomic int exited;        /* its API exit is done: the slot may be reused once released too */
    _Atomic uint64_t ring_ref; /* after exit, if tracked: lane index + 1 << 56 | seq (0: untracked) */
};

static struct {
    int enabled;
    pthread_mutex_t lock;
    pthread_cond_t work, space;
    struct ra_entry q[RA_SLOTS];
    uint64_t head, next, tail;  /* [head, next) released, not yet exited; [next, tail) queued */
    uint64_t queued_est;        /* estimated work of [next, tail) */
    uint64_t next_ticket;
    _Atomic uint64_t *word;     /* host memory the GPU polls */
    CUdeviceptr word_device;
    int thread_started, stopped;
    /* Tracked BE launches let through in place (not queued) whose API exit has not come: a
     * wait enqueued meanwhile could land in front of them on their stream (or, on the legacy
     * stream, by its implicit synchronization) and they would then wait for a release that
     * waits for them. runahead_enter lets them reach their exit first. */
    _Atomic int in_place;
    /* Held by a queueing thread from its ticket to its launch's API exit, never by the
     * releaser: waits and their kernels reach a stream in ticket order even when threads
     * share it, and a driver call that blocks holds up other queueing threads, never the
     * releaser. */
    pthread_mutex_t order;
} RA = {.lock = PTHREAD_MUTEX_INITIALIZER, .work = PTHREAD_COND_INITIALIZER, .space = PTHREAD_COND_INITIALIZER,
        .order = PTHREAD_MUTEX_INITIALIZER};

/* At join, for a BE client with TALLY_RUN_AHEAD=1: the word, mapped for the GPU. */
void runahead_init(void) {
    const char *env = getenv("TALLY_RUN_AHEAD");
    if (!env || strcmp(env, "1") != 0 || !drv.stream_wait_value64) return;
    void *page = NULL;
    if (posix_memalign(&page, 4096, 4096) != 0) return;
    memset(page, 0, 4096);
    if (drv.mem_host_register(page, 4096, CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP) !=
            CUDA_SUCCESS ||
        drv.mem_host_get_device_pointer(&RA.word_device, page, 0) != CUDA_SUCCESS) {
        tally_warn("run-ahead admission is off: cannot map its word into GPU memory");
        return; /* the page stays allocated: it may be half registered */
    }
    RA.word = page;
    RA.enabled = 1;
}

/* RA.lock is held. The ring entry of a released launch is running from now on. */
static void ra_mark_running(struct ra_entry *e) {
    uint64_t ref = atomic_load(&e->ring_ref);
    if (!ref) return;
    struct lane *l = &S.lanes[(ref >> 56) - 1];
    uint64_t seq = ref & ((1ull << 56) - 1);
    pthread_mutex_lock(&l->lock);
    for (uint32_t k = l->head; k != l->tail; k++) {
        struct inflight *f = &l->ring[k % RING];
        if (f->seq == seq && f->queued) {
            f->queued = 0;
            f->launch_ns = tally_now_ns();
        }
    }
    pthread_mutex_unlock(&l->lock);
}

/* RA.lock is held. Raises the word to entry `i`'s ticket. */
static void ra_release(uint64_t i) {
    struct ra_entry *e = &RA.q[i % RA_SLOTS];
    atomic_store_explicit(RA.word, e->ticket, memory_order_release);
    atomic_store(&e->released, 1); /* seq_cst: pairs with runahead_ring_entry's check, see there */
    ra_mark_running(e);
    RA.queued_est -= e->est_ns;
}

/* Releases every queued launch at once (failing open, exiting); safe from any thread. */
void runahead_release_all(void) {
    if (!RA.enabled) return;
    pthread_mutex_lock(&RA.lock);
    RA.stopped = 1;
    while (RA.next != RA.tail) ra_release(RA.next++);
    pthread_cond_broadcast(&RA.space);
    pthread_cond_broadcast(&RA.work);
    pthread_mutex_unlock(&RA.lock);
}

/* In a forked child (no releaser thread, no usable context; the locks may have been held
 * by a parent thread at the fork): run-ahead is off. */
void runahead_after_fork(void) {
    RA.enabled = 0;
    pthread_mutex_init(&RA.lock, NULL);
    pthread_mutex_init(&RA.order, NULL);
    atomic_store(&RA.in_place, 0);
}

/* RA.lock is held: frees the released slots whose API exit is done. */
static void ra_reap(void) {
    while (RA.head != RA.next && atomic_load(&RA.q[RA.head % RA_SLOTS].exited)) RA.head++;
    pthread_cond_broadcast(&RA.space);
}

/* This thread's launch goes through in place: counted in RA.in_place until its API exit. */
static void count_in_place(void) {
    if (!pending.in_place) atomic_fetch_add(&RA.in_place, 1);
    pending.in_place = 1;
}

/* RA.lock is held: waits on cond for at most 1 ms. */
static void wait_1ms(pthread_cond_t *cond) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += 1000000;
    if (until.tv_nsec >= 1000000000) until.tv_sec++, until.tv_nsec -= 1000000000;
    pthread_cond_timedwait(cond, &RA.lock, &until);
}

/* RA.lock is held: the work in flight, including released launches whose API exit has not
 * put them in a ring yet. */
static struct be_backlog ra_backlog(uint64_t now, uint32_t *skipped) {
    struct be_backlog backlog = retire_lanes(now, skipped);
    for (uint64_t i = RA.head; i != RA.next; i++) {
        struct ra_entry *e = &RA.q[i % RA_SLOTS];
        if (!atomic_load(&e->ring_ref) && !atomic_load(&e->exited)) backlog.remaining_ns += e->est_ns, backlog.launches++;
    }
    return backlog;
}

static void *releaser(void *unused) {
    (void)unused;
    /* Its flushes of batched writes are driver calls, which need the program's context. */
    int can_flush = drv.ctx_set_current && drv.ctx_set_current(S.context) == CUDA_SUCCESS;
    if (!can_flush) S.batch_writes = 0; /* then no group is left for it to write */
    pthread_mutex_lock(&RA.lock);
    uint64_t held_since = 0;
    struct tally_gate_hold hold;
    while (!RA.stopped && atomic_load(&S.state) == JOINED) {
        ra_reap();
        if (RA.next == RA.tail) {
            wait_1ms(&RA.work); /* timed: exits are not signalled */
            continue;
        }
        struct ra_entry *e = &RA.q[RA.next % RA_SLOTS];
        uint64_t now = tally_now_ns();
        uint32_t skipped = 0;
        struct be_backlog backlog = ra_backlog(now, &skipped);
        enum tally_gate_decision d = tally_gate_decide(S.sb, now, backlog.remaining_ns, backlog.launches, e->est_ns);
        /* A busy lane is not counted: decide without it only after 50 ms of trying, when its
         * holder may be blocked in the driver behind one of our waits (a full queue). */
        if (skipped && !TALLY_GATE_IS_WAIT(d) && (!held_since || now - held_since < 50000000ull))
            d = TALLY_GATE_WAIT_BUDGET;
        if (!TALLY_GATE_IS_WAIT(d)) {
            __atomic_fetch_add(&S.slot->held_ns, now - e->queued_ns, __ATOMIC_RELAXED);
            if (d == TALLY_GATE_ADMIT_ALONE) __atomic_fetch_add(&S.slot->long_kernels, 1, __ATOMIC_RELAXED);
            warn_if_daemon_dead(d);
            ra_release(RA.next++);
            held_since = 0;
            continue;
        }
        if (!held_since) {
            held_since = now;
            tally_gate_hold_start(&hold, thread_watch(), now);
        }
        /* a lane left out (its lock busy) may hold the oldest launch: keep what was seen before */
        uint64_t oldest = skipped ? TALLY_GATE_OLDEST_UNKNOWN : backlog.oldest_ns;
        if (tally_gate_hold_stall_ns(&hold, S.sb, now, d, oldest) >= S.max_hold_ns) {
            pthread_mutex_unlock(&RA.lock);
            give_up_held(d); /* releases everything queued first */
            return NULL;
        }
        pthread_mutex_unlock(&RA.lock);
        /* Every time (launches exiting meanwhile may defer their writes), and outside RA.lock:
         * a driver call may block, and only a release unblocks a stream. */
        if (can_flush) flush_unwritten();
        gate_pause(now - held_since, 1);
        pthread_mutex_lock(&RA.lock);
    }
    pthread_mutex_unlock(&RA.lock);
    runahead_release_all();
    return NULL;
}

/* API enter of a tracked BE launch (pending's profile fields set): 1 when it was queued
 * behind a wait, 0 when the caller is to apply the gate as usual (nothing queued ahead of
 * it, so it goes through now if it can; or run-ahead could not queue it). */
static int runahead_enter(const struct tally_launch *launch, uint64_t now, uint64_t est) {
    pthread_mutex_lock(&RA.order);
    pthread_mutex_lock(&RA.lock);
    if (RA.stopped) {
        pthread_mutex_unlock(&RA.lock);
        pthread_mutex_unlock(&RA.order);
        return 0;
    }
    if (RA.next == RA.tail) {
        /* Nothing queued: admitted now, it needs no wait. */
        struct be_backlog backlog = ra_backlog(now, NULL);
        if (!TALLY_GATE_IS_WAIT(tally_gate_decide(S.sb, now, backlog.remaining_ns, backlog.launches, est))) {
            count_in_place();
            pthread_mutex_unlock(&RA.lock);
            pthread_mutex_unlock(&RA.order);
            return 0;
        }
    }
    uint64_t held_since = now;
    while (!RA.stopped && (RA.tail - RA.head >= RA_SLOTS || (RA.next != RA.tail && RA.queued_est + est >
                                                                                      RA_QUEUED_NS))) {
        if (tally_now_ns() - held_since >= S.max_hold_ns) break; /* the releaser gives up and frees us */
        wait_1ms(&RA.space);
        ra_reap();
    }
    if (RA.stopped || RA.tail - RA.head >= RA_SLOTS) {
        pthread_mutex_unlock(&RA.lock);
        pthread_mutex_unlock(&RA.order);
        return 0;
    }
    uint64_t waited = tally_now_ns() - held_since;
    if (waited > 1000) __atomic_fetch_add(&S.slot->held_ns, waited, __ATOMIC_RELAXED);
    /* Reserved under RA.lock; once the queue is not empty, nothing else is let through in
     * place, and the ones already let through reach their API exit before our wait. */
    struct ra_entry *e = &RA.q[RA.tail % RA_SLOTS];
    e->ticket = ++RA.next_ticket;
    e->est_ns = est;
    e->queued_ns = tally_now_ns(); /* the wait for space above is counted already */
    atomic_store(&e->released, 0);
    atomic_store(&e->exited, 0);
    atomic_store(&e->ring_ref, 0);
    RA.tail++;
    RA.queued_est += est;
    if (!RA.thread_started) RA.thread_started = tally_spawn_detached(releaser);
    int started = RA.thread_started;
    pthread_mutex_unlock(&RA.lock);
    /* This launch, counted in place by runahead_drain, is queued instead. */
    if (pending.in_place) {
        pending.in_place = 0;
        atomic_fetch_sub(&RA.in_place, 1);
    }
    /* Outside RA.lock: these are driver calls, which may block until the GPU moves on. The
     * in-place launches reach their exits without any lock of ours; bounded all the same. */
    uint64_t since = tally_now_ns();
    while (atomic_load(&RA.in_place) > 0 && started) {
        if (tally_now_ns() - since >= S.max_hold_ns) started = 0; /* give up queueing (below) */
        sched_yield();
    }
    /* Batched writes: a deferred group must be written before the wait, or its completion
     * would sit behind a launch that cannot be released until the group is seen complete. */
    flush_unwritten();
    int queued = started &&
                 drv.stream_wait_value64(launch->stream, RA.word_device, e->ticket, CU_STREAM_WAIT_VALUE_GEQ) == CUDA_SUCCESS;
    if (!queued) { /* nobody to release it, or no wait: stop queueing; what is queued is released */
        pthread_mutex_unlock(&RA.order);
        runahead_release_all();
        return 0;
    }
    pthread_mutex_lock(&RA.lock);
    pthread_cond_signal(&RA.work);
    pthread_mutex_unlock(&RA.lock);
    /* RA.order stays held until this launch's API exit: its kernel must follow its own wait on
     * the stream, not another thread's later one (which it would then wait for, released). */
    pending.ra = e;
    return 1;
}

/* The launch path's way into run-ahead: 1 when the launch was queued (pending filled in as
 * be_wait_at_gate would; it counts as held). */
int runahead_try(const struct tally_launch *launch, uint64_t now) {
    if (!RA.enabled || !launch->trackable ||
        __atomic_load_n(&S.sb->policy, __ATOMIC_RELAXED) != TALLY_SB_POLICY_TALLY)
        return 0;
    uint32_t profile;
    uint64_t est = launch_estimate(launch, 0, 1, &profile);
    if (!runahead_enter(launch, now, est)) return 0;
    pending.track = 1;
    pending.est_ns = est;
    pending.profile = profile;
    pending.units = 1;
    pending.gpu_timed = 0;
    pending.held = 1;
    pending.alone = pending.idle = 0;
    return 1;
}

/* Blocks until the launches queued before it are released: a launch gated in place (slices)
 * must not pass them; then counts it in place until its API exit. */
void runahead_drain(void) {
    if (!RA.enabled) return;
    pthread_mutex_lock(&RA.lock);
    /* Until what was queued before this launch is released, however long HP keeps it: the
     * releaser fails the process open (and releases everything) once HP stops making progress,
     * so this is bounded by that, not by a clock of its own (a saturated HP client no longer
     * fails the releaser open after TALLY_MAX_HOLD_MS, and a bound here would let this launch
     * pass them). Launches queued by other threads meanwhile are not waited for. */
    uint64_t queued_before = RA.tail;
    while (RA.next < queued_before && !RA.stopped) wait_1ms(&RA.space);
    count_in_place();
    pthread_mutex_unlock(&RA.lock);
}

/* In API exit, with the lane's lock held: a queued launch's ring entry waits for its
 * release. Its release and this exit can come in either order, from two threads: each side
 * stores its own flag and then reads the other's (sequentially consistent), so at least one
 * of them sees both and marks it running. */
void runahead_ring_entry(struct lane *l, struct inflight *entry) {
    struct ra_entry *e = pending.ra;
    if (!e) return;
    entry->queued = 1;
    atomic_store(&e->ring_ref, (uint64_t)(l - S.lanes + 1) << 56 | entry->seq);
    if (atomic_load(&e->released) && entry->queued) {
        entry->queued = 0;
        entry->launch_ns = tally_now_ns();
    }
}

/* The end of every API exit, once the launch and its completion write are in the stream. */
void runahead_exit(void) {
    if (pending.in_place) {
        pending.in_place = 0;
        atomic_fetch_sub(&RA.in_place, 1);
    }
    struct ra_entry *e = pending.ra;
    if (!e) return;
    pending.ra = NULL;
    atomic_store(&e->exited, 1);
    pthread_mutex_unlock(&RA.order); /* taken in runahead_enter */
}
