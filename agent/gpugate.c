/* The GPU-side gate (TALLY_GPU_GATE=1; what `tally run --priority best-effort` sets by default).
 *
 * Why. On an H200, part of HP's overhead under the launch-level gate came from
 * BE work that was already on the GPU when an HP request arrived: about the
 * budget's worth at every arrival while BE kept the budget full (the rest comes
 * with any second MPS client: benchmarks/results/issue3-floor-2026-12-03f-h200).
 * And holding the BE
 * thread at the gate cost BE throughput that run-ahead admission won back
 * (benchmarks/results/issue3-switches-2026-12-03d-h200). Here the GPU itself
 * stops BE work the moment HP launches:
 * - while an HP client is connected, every BE launch is preceded on its stream
 *   by a wait for the top bit of its process's gate word (gpu_gate in its
 *   scoreboard slot) to be set: open;
 * - every HP launch closes the gate word of every BE process that uses the
 *   gate (gpu_gate_slots in the header) by storing its time, before the launch
 *   is enqueued, so each BE stream stops at its next wait;
 * - BE work that passed its wait still runs: the kernel running at that moment
 *   and whatever the GPU's front end had already let past its wait.
 * The BE thread is never held, and there is no turnaround budget: what BE
 * leaves in HP's way does not depend on how far ahead the program queued.
 *
 * Opening. A thread of the BE process opens its word once the launch-level
 * gate would admit a BE launch with nothing in flight: HP has nothing in flight
 * (launch calls in progress included) and has been idle for the idle window,
 * or nobody is left to protect (no HP client, another policy, the daemon
 * dead). It opens by a CAS from the value it read, so the mark of a newer HP
 * launch is never lost. A new word is 0: closed until the thread has looked.
 *
 * Never hanging, and failing open alone. Each process has a word of its own,
 * so it can open its waits for good without opening anyone else's: the
 * DISABLED value is open (top bit set) and HP launches leave it alone. The
 * process disables its word when it fails open (the daemon dead, its waits
 * pending for TALLY_MAX_HOLD_MS while HP's work made no progress, a refused wait),
 * and at exit, so that no stream of its is left waiting when CUDA tears the
 * context down. */
#define _GNU_SOURCE
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sched_internal.h"

/* While the word is open the thread only has to see it closed before HP is idle again (a
 * request's length away); while it is closed with our waits behind it, how often it looks adds
 * to BE's restart; closed with none, only to the first wait's. */
#define LOOK_WHILE_OPEN_NS 200000
#define LOOK_WITHOUT_HP_NS 1000000
#define LOOK_WHILE_HOLDING_NS 50000
#define LOOK_WHILE_CLOSED_NS 500000
/* Waits enqueued this long before the word closed may still be queued behind the GPU's work;
 * older ones are taken to have passed (a deeper queue of BE work is not expected). */
#define RECENT_WAIT_NS 100000000ull

enum { THREAD_NONE = 0, THREAD_STARTING, THREAD_RUNNING, THREAD_FAILED };

static struct {
    int enabled;                /* TALLY_GPU_GATE=1, a BE client, stream waits available */
    uint64_t *word;             /* our slot's gpu_gate */
    CUdeviceptr word_device;    /* the same on the GPU */
    uint64_t slot_bit;          /* our bit in gpu_gate_slots */
    atomic_int thread;          /* THREAD_*: waits are enqueued only while it runs */
    atomic_int disabled;
    _Atomic uint64_t waits;     /* waits enqueued (the stats file's gpu_gate_waits) */
    _Atomic uint64_t last_wait_ns;
    _Atomic uint64_t first_closed_wait_ns; /* the first wait enqueued while the word was closed; 0 = none */
    _Atomic uint64_t closed_launches;      /* program launches whose wait was enqueued while closed */
} GG;

static void nap(uint64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    nanosleep(&ts, NULL);
}

/* Our waits pass from now on, and HP launches stop closing the word. */
static void open_for_good(void) {
    __atomic_fetch_and(&S.sb->gpu_gate_slots, ~GG.slot_bit, __ATOMIC_SEQ_CST);
    __atomic_store_n(GG.word, TALLY_SB_GPU_GATE_DISABLED, __ATOMIC_SEQ_CST);
}

void gpugate_disable(void) {
    if (GG.enabled && !atomic_exchange(&GG.disabled, 1)) open_for_good();
}

/* HP launch path, before the launch is enqueued: close every BE gate word in use. */
void gpugate_close_all(uint64_t now) {
    uint64_t slots = __atomic_load_n(&S.sb->gpu_gate_slots, __ATOMIC_SEQ_CST);
    while (slots) {
        uint32_t i = (uint32_t)__builtin_ctzll(slots);
        slots &= slots - 1;
        struct tally_sb_slot *slot = tally_sb_slot_at(S.sb, i);
        /* a bit left by a process that died: its waits died with its context */
        if (__atomic_load_n(&slot->state, __ATOMIC_RELAXED) != TALLY_SB_SLOT_ACTIVE) continue;
        uint64_t *word = &slot->gpu_gate;
        uint64_t old = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        /* A CAS, not a store: a word disabled in between stays open. Any change of value makes
         * an opener's CAS from what it read fail, so an older time is as good a mark; the same
         * time would not be a change. */
        while (old != TALLY_SB_GPU_GATE_DISABLED &&
               !__atomic_compare_exchange_n(word, &old, old == now ? now + 1 : now, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_ACQUIRE)) {
        }
    }
}

/* Held since: the first wait enqueued while closed, or the close itself when a wait enqueued
 * shortly before may still be queued. Without either nothing of ours is held: a process that is
 * not launching is not failed open because HP is busy. */
static uint64_t held_since_for(uint64_t closed_since) {
    uint64_t held_since = atomic_load(&GG.first_closed_wait_ns);
    if (!held_since && atomic_load(&GG.last_wait_ns) + RECENT_WAIT_NS >= closed_since) held_since = closed_since;
    return held_since;
}

/* Nothing of ours is behind the closed word (any more). */
static void forget_hold(void) {
    atomic_store(&GG.first_closed_wait_ns, 0);
    atomic_store(&GG.closed_launches, 0);
}

/* The word opens (or the thread stops looking at it): what it held counts as held at the gate, as
 * the launch-level gate's holds do (tally status, the metrics): from the first wait enqueued while
 * it was closed, and the program launches enqueued meanwhile. Not a close with nothing behind it,
 * and not time the launch-level gate already counted for a thread of ours held meanwhile. */
static void count_hold(void) {
    uint64_t held_since = atomic_exchange(&GG.first_closed_wait_ns, 0);
    uint64_t launches = atomic_exchange(&GG.closed_launches, 0);
    uint64_t now = tally_now_ns();
    if (!held_since || now <= held_since) return;
    __atomic_fetch_add(&S.slot->held_launches, launches, __ATOMIC_RELAXED);
    if (atomic_load(&S.launch_holds) == 0 && atomic_load(&S.launch_hold_end_ns) < held_since)
        __atomic_fetch_add(&S.slot->held_ns, now - held_since, __ATOMIC_RELAXED);
}

static void *opening_thread(void *unused) {
    (void)unused;
    uint64_t closed_since = 0;
    int first_look = 1; /* the word starts closed until this look: no HP closed it */
    struct tally_gate_watch *watch = thread_watch(); /* HP's progress while the word is closed */
    while (!atomic_load(&GG.disabled)) {
        uint64_t word = __atomic_load_n(GG.word, __ATOMIC_ACQUIRE);
        uint64_t now = tally_now_ns();
        if (word & TALLY_SB_GPU_GATE_OPEN) {
            first_look = 0;
            closed_since = 0;
            forget_hold();
            nap(__atomic_load_n(&S.sb->hp_active, __ATOMIC_RELAXED) ? LOOK_WHILE_OPEN_NS : LOOK_WITHOUT_HP_NS);
            continue;
        }
        if (!closed_since) { /* a closed period begins: HP's progress is watched afresh */
            closed_since = now;
            if (watch) memset(watch, 0, sizeof *watch);
        }
        enum tally_gate_decision d = tally_gate_decide(S.sb, now, 0, 0, 0);
        if (d == TALLY_GATE_DAEMON_DEAD) {
            warn_if_daemon_dead(d);
            gpugate_disable();
            break;
        }
        if (d != TALLY_GATE_WAIT_HP) {
            if (__atomic_compare_exchange_n(GG.word, &word, TALLY_SB_GPU_GATE_OPEN, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
                if (first_look) forget_hold(); /* opened at once: the start's own close held nothing for HP */
                else count_hold();
                closed_since = 0; /* HP may close it again before the next look */
            }
            first_look = 0;
            continue;
        }
        first_look = 0;
        uint64_t held_since = held_since_for(closed_since);
        /* The launch path marks its wait with its own clock, possibly after `now` was read here:
         * measured against `now`, such a mark wrapped around to a hold of centuries and failed the
         * process open at once (2 of 5 runs on an H200). Read the clock again after the load, and
         * count a mark still ahead of it as no hold. */
        now = tally_now_ns();
        /* ... and only while HP's work makes no progress: a saturated HP client holds us, rightly */
        uint64_t stall = watch ? tally_gate_hp_stall_ns(watch, S.sb, now) : S.max_hold_ns;
        if (tally_gate_held_too_long(held_since, now, S.max_hold_ns) && stall >= S.max_hold_ns) {
            if (atomic_load(&S.state) == JOINED) give_up_held(d); /* one warning; disables the word */
            gpugate_disable();
            break;
        }
        nap(held_since ? LOOK_WHILE_HOLDING_NS : LOOK_WHILE_CLOSED_NS);
    }
    count_hold(); /* disabled (failed open, daemon dead, exit): what was held until now */
    return NULL;
}

void gpugate_init(void) {
    const char *env = getenv("TALLY_GPU_GATE");
    GG.enabled = env && strcmp(env, "1") == 0 && drv.stream_wait_value64 != NULL;
    if (!GG.enabled) return;
    GG.word = &S.slot->gpu_gate;
    GG.word_device = sb_device_address(GG.word);
    GG.slot_bit = 1ull << tally_sb_slot_index(S.sb, S.slot);
}

/* From the SLO controller's first step on (its warm-up included, when no target is judged yet). */
static int slo_mode_on(void) {
    return __atomic_load_n(&tally_sb_slo_status_of(S.sb)->slo_state, __ATOMIC_RELAXED) != TALLY_SB_SLO_STATE_OFF;
}

/* The first gated launch starts the thread; launches before it runs take the launch-level gate. */
static int thread_running(void) {
    int t = atomic_load(&GG.thread);
    if (t == THREAD_RUNNING) return 1;
    if (t != THREAD_NONE) return 0;
    if (!atomic_compare_exchange_strong(&GG.thread, &t, THREAD_STARTING)) return 0;
    /* Closed until the thread has looked at HP (a claimed slot's word is 0 already), then
     * marked by HP launches from here on; a word disabled meanwhile (another thread failed
     * open, or the process is exiting) stays disabled, and nothing waits on it. */
    uint64_t old = __atomic_load_n(GG.word, __ATOMIC_SEQ_CST);
    if (old != TALLY_SB_GPU_GATE_DISABLED) __atomic_compare_exchange_n(GG.word, &old, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    __atomic_fetch_or(&S.sb->gpu_gate_slots, GG.slot_bit, __ATOMIC_SEQ_CST);
    if (atomic_load(&GG.disabled)) { /* undo what may have landed after the disabling */
        open_for_good();
        atomic_store(&GG.thread, THREAD_FAILED);
        return 0;
    }
    if (!tally_spawn_detached(opening_thread)) {
        atomic_store(&GG.thread, THREAD_FAILED);
        tally_warn("TALLY_GPU_GATE: cannot start the agent's thread; best-effort launches are gated at "
                   "launch instead");
        gpugate_disable();
        return 0;
    }
    atomic_store(&GG.thread, THREAD_RUNNING);
    return 1;
}

int gpugate_ready(uint64_t now) {
    if (!GG.enabled || atomic_load_explicit(&GG.disabled, memory_order_relaxed)) return 0;
    if (__atomic_load_n(&S.sb->policy, __ATOMIC_RELAXED) != TALLY_SB_POLICY_TALLY) return 0;
    /* SLO mode adapts the turnaround budget, which only the launch-level gate applies: while it
     * is on, new launches take that gate (waits already queued are opened as before). */
    if (slo_mode_on()) return 0;
    if (!tally_gate_daemon_alive(S.sb, now)) {
        warn_if_daemon_dead(TALLY_GATE_DAEMON_DEAD);
        gpugate_disable();
        return 0;
    }
    return thread_running();
}

int gpugate_wait(CUstream stream, uint64_t now, int program_launch) {
    if (atomic_load_explicit(&GG.disabled, memory_order_relaxed)) return 0; /* failed open meanwhile */
    atomic_store_explicit(&GG.last_wait_ns, now, memory_order_relaxed);
    if (!(__atomic_load_n(GG.word, __ATOMIC_ACQUIRE) & TALLY_SB_GPU_GATE_OPEN)) {
        uint64_t none = 0;
        atomic_compare_exchange_strong(&GG.first_closed_wait_ns, &none, now);
        if (program_launch) atomic_fetch_add_explicit(&GG.closed_launches, 1, memory_order_relaxed);
    }
    if (drv.stream_wait_value64(stream, GG.word_device, TALLY_SB_GPU_GATE_OPEN, CU_STREAM_WAIT_VALUE_AND) !=
        CUDA_SUCCESS) {
        if (!atomic_load(&GG.disabled))
            tally_warn("TALLY_GPU_GATE: the driver refused a stream wait; best-effort launches are gated at "
                       "launch instead");
        gpugate_disable();
        return 0;
    }
    atomic_fetch_add_explicit(&GG.waits, 1, memory_order_relaxed);
    return 1;
}

int gpugate_try(const struct tally_launch *launch, uint64_t now) {
    /* Not trackable: the stream is not known (a multi-device launch), so there is none to wait on. */
    return launch->trackable && gpugate_ready(now) && gpugate_wait(launch->stream, now, 1);
}

void gpugate_after_fork(void) {
    /* The child has neither the thread nor a usable context, nor the parent's slot. */
    GG.enabled = 0;
    atomic_store(&GG.thread, THREAD_NONE);
    atomic_store(&GG.waits, 0);
}

uint64_t tally_sched_gpu_gate_waits(void) { return atomic_load(&GG.waits); }
