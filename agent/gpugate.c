/* The GPU-side gate (TALLY_GPU_GATE=1; experimental, off by default).
 *
 * Why. On an H200, HP's overhead under the launch-level gate came from BE work
 * that was already on the GPU when an HP request arrived: about the budget's
 * worth at every arrival while BE kept the budget full. And holding the BE
 * thread at the gate cost BE throughput that run-ahead admission won back
 * (benchmarks/results/issue3-switches-2026-12-03d-h200). Here the GPU itself
 * stops BE work the moment HP launches:
 * - while an HP client is connected, every BE launch is preceded on its stream
 *   by a wait for the scoreboard's hp_gate word to be 0;
 * - every HP launch stores its time (nonzero) into hp_gate before it is
 *   enqueued, so each BE stream stops at its next wait;
 * - BE work that passed its wait still runs: the kernel running at that moment
 *   and whatever the GPU's front end had already let past its wait.
 * The BE thread is never held, and there is no turnaround budget: what BE
 * leaves in HP's way does not depend on how far ahead the program queued.
 *
 * Clearing. A thread of each BE process that uses the gate clears the word
 * once the launch-level gate would admit a BE launch with nothing in flight:
 * HP has no work in flight and has been idle for the idle window, or nobody
 * is left to protect (no HP client, another policy, the daemon dead). It clears
 * by a CAS from the value it read, so the mark of a newer HP launch is never
 * lost. Any BE process's thread may clear it: the word is one per GPU.
 *
 * Never hanging. Our waits pass once the word is 0, which our own thread sees
 * to as long as the process lives, whether or not the daemon does (a dead
 * daemon makes the word clearable). HP looking busy for TALLY_MAX_HOLD_MS
 * without a break (an HP completion write that never lands) makes the process
 * fail open as the launch-level gate does, and the word is cleared. At exit,
 * the process waits (at most TALLY_MAX_HOLD_MS) until the word is 0 before
 * CUDA tears its context down, so no stream of ours is left waiting. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sched_internal.h"

#define CU_STREAM_WAIT_VALUE_EQ 0x1
/* How often the clearing thread looks while the word is 0: it only has to have seen the
 * word set before HP goes idle again, so a request's length is the scale, not a launch's. */
#define LOOK_WHILE_OPEN_NS 50000
#define LOOK_WITHOUT_HP_NS 1000000

static struct {
    int enabled;               /* TALLY_GPU_GATE=1, a BE client, stream waits available */
    CUdeviceptr word_device;   /* &S.sb->hp_gate on the GPU */
    atomic_int off;            /* a wait failed or no thread: the launch-level gate again */
    atomic_int thread_started; /* 0, 1 starting/started, -1 could not start */
    _Atomic uint64_t waits;    /* waits enqueued (the stats file's gpu_gate_waits) */
} GG;

static void nap(uint64_t ns) {
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    nanosleep(&ts, NULL);
}

/* Clears the word when the launch-level gate says HP is not busy; 1 when it is 0 afterwards. */
static int clear_if_hp_idle(uint64_t word, uint64_t now, enum tally_gate_decision *d) {
    *d = tally_gate_decide(S.sb, now, 0, 0, 0);
    if (*d == TALLY_GATE_WAIT_HP) return 0;
    __atomic_compare_exchange_n(&S.sb->hp_gate, &word, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    return 1;
}

static void *clearing_thread(void *unused) {
    (void)unused;
    uint64_t busy_since = 0;
    for (;;) {
        uint64_t word = __atomic_load_n(&S.sb->hp_gate, __ATOMIC_ACQUIRE);
        uint64_t now = tally_now_ns();
        if (word == 0) {
            busy_since = 0;
            nap(__atomic_load_n(&S.sb->hp_active, __ATOMIC_RELAXED) ? LOOK_WHILE_OPEN_NS : LOOK_WITHOUT_HP_NS);
            continue;
        }
        if (!busy_since) busy_since = now;
        enum tally_gate_decision d;
        if (clear_if_hp_idle(word, now, &d)) {
            warn_if_daemon_dead(d);
            busy_since = 0;
            continue;
        }
        if (now - busy_since >= S.max_hold_ns) {
            if (atomic_load(&S.state) == JOINED) give_up_held(d); /* one warning; no more waits of ours */
            __atomic_compare_exchange_n(&S.sb->hp_gate, &word, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
            busy_since = 0;
            continue;
        }
        gate_pause(now - busy_since, 1);
    }
    return NULL;
}

void gpugate_init(void) {
    const char *env = getenv("TALLY_GPU_GATE");
    GG.enabled = env && strcmp(env, "1") == 0 && drv.stream_wait_value64 != NULL;
    GG.word_device = S.sb_device + offsetof(struct tally_sb_header, hp_gate);
}

int gpugate_try(const struct tally_launch *launch) {
    /* Not trackable: the stream is not known (a multi-device launch), so there is none to wait on. */
    if (!GG.enabled || !launch->trackable || atomic_load_explicit(&GG.off, memory_order_relaxed)) return 0;
    if (__atomic_load_n(&S.sb->policy, __ATOMIC_RELAXED) != TALLY_SB_POLICY_TALLY) return 0;
    if (atomic_load(&GG.thread_started) <= 0) {
        int expected = 0;
        if (atomic_compare_exchange_strong(&GG.thread_started, &expected, 1) &&
            !tally_spawn_detached(clearing_thread))
            atomic_store(&GG.thread_started, -1);
        if (atomic_load(&GG.thread_started) < 0) { /* nobody would clear the word for our waits */
            if (!atomic_exchange(&GG.off, 1))
                tally_warn("TALLY_GPU_GATE: cannot start the agent's thread; best-effort launches are "
                           "gated at launch instead");
            return 0;
        }
    }
    if (drv.stream_wait_value64(launch->stream, GG.word_device, 0, CU_STREAM_WAIT_VALUE_EQ) != CUDA_SUCCESS) {
        if (!atomic_exchange(&GG.off, 1))
            tally_warn("TALLY_GPU_GATE: the driver refused a stream wait; best-effort launches are gated at "
                       "launch instead");
        return 0;
    }
    atomic_fetch_add_explicit(&GG.waits, 1, memory_order_relaxed);
    return 1;
}

void gpugate_exit(void) {
    if (!GG.enabled || atomic_load(&GG.waits) == 0 || !S.sb) return;
    uint64_t since = tally_now_ns();
    for (;;) {
        uint64_t word = __atomic_load_n(&S.sb->hp_gate, __ATOMIC_ACQUIRE);
        uint64_t now = tally_now_ns();
        enum tally_gate_decision d;
        if (word == 0 || clear_if_hp_idle(word, now, &d) || now - since >= S.max_hold_ns) return;
        gate_pause(now - since, 1);
    }
}

void gpugate_after_fork(void) {
    GG.enabled = 0; /* the child has neither the thread nor a usable context */
    atomic_store(&GG.thread_started, 0);
    atomic_store(&GG.waits, 0);
}

uint64_t tally_sched_gpu_gate_waits(void) { return atomic_load(&GG.waits); }
