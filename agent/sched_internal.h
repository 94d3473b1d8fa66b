/* Private to sched.c, runahead.c and gpugate.c; nothing else includes it
 * (agent.h stays the agent-wide interface). It holds the scheduler's internals
 * that run-ahead admission (runahead.c) and the GPU-side gate (gpugate.c)
 * share with the rest of the scheduler (sched.c): one scheduler in three files. */
#ifndef TALLY_SCHED_INTERNAL_H
#define TALLY_SCHED_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "agent.h"
#include "gate.h"
#include "scoreboard.h"

/* -fvisibility=hidden covers definitions, not these declarations: hidden here too, the
 * shared state is reached as directly as when it was static to one file. */
#pragma GCC visibility push(hidden)

/* join registers the scoreboard, runahead_init its word: both with these flags. */
#define CU_MEMHOSTREGISTER_PORTABLE 0x01
#define CU_MEMHOSTREGISTER_DEVICEMAP 0x02
/* Sizes of struct lane and struct sched_state below. */
#define RING 512            /* tracked BE launches in flight per lane */
#define GPU_GATED_SLICE_SAMPLES 4 /* timed slices of a kernel before its slices wait on the GPU-side gate */
#define PROFILE_SLOTS 4096  /* kernels with a duration estimate */

/* The releaser runs only while the process is JOINED. */
enum join_state { NOT_JOINED = 0, JOINED = 1, UNGATED = -1 };

/* Loaded at join; run-ahead makes the wait and context calls, the GPU-side gate the waits. */
struct sched_driver {
    CUresult (*ctx_get_device)(CUdevice *);
    CUresult (*ctx_set_current)(CUcontext); /* run-ahead's releaser thread only */
    CUresult (*device_get_uuid)(CUuuid *, CUdevice);
    CUresult (*mem_host_register)(void *, size_t, unsigned int);
    CUresult (*mem_host_get_device_pointer)(CUdeviceptr *, void *, unsigned int);
    CUresult (*stream_write_value64)(CUstream, CUdeviceptr, uint64_t, unsigned int);
    CUresult (*stream_wait_value64)(CUstream, CUdeviceptr, uint64_t, unsigned int); /* run-ahead, GPU gate */
    CUresult (*stream_is_capturing)(CUstream, int *);
};
extern struct sched_driver drv;

/* A ring entry: a released run-ahead launch's entry is marked running from runahead.c. */
struct inflight {
    uint64_t seq;
    uint64_t est_ns;
    uint64_t launch_ns;
    uint32_t profile;  /* index into profiles, or PROFILE_SLOTS for none */
    uint32_t units;    /* the profile is per unit: a slice of k waves is k units of a one-wave profile */
    uint32_t gpu_timed; /* its GPU time will come from CUPTI activity (tally_sched_kernel_ran) */
    uint32_t batched;   /* shares a completion write with other launches: its poll timing says nothing */
    uint32_t queued;    /* run-ahead: held on the GPU behind its wait, not yet released (not running) */
};

/* Run-ahead finds a released launch's ring entry through its lane. */
struct lane {
    /* The stream (or per-thread key) whose completions this lane carries.
     * Written only under lanes_lock, and once the lane is in use (below
     * n_lanes) only with its lock held as well; see lock_lane_of. */
    CUstream stream;
    pthread_mutex_t lock;  /* keeps memory operations in sequence order per stream */
    uint64_t next_seq;     /* never reset, not even when the lane changes streams */
    uint64_t last_used_ns; /* the last tracked launch: the least recently used idle lane is reused first */
    /* best-effort only: launches whose completion has not been seen yet */
    struct inflight ring[RING];
    uint32_t head, tail;
    uint64_t last_done_ns;
    uint64_t last_done_err; /* last_done_ns is at most this late */
    /* Batched completion writes (TALLY_BATCH_WRITES=1): BE launches since the lane's last write,
     * their estimated work, and their stream (a flush may come from another thread). */
    uint32_t unwritten;
    uint64_t unwritten_est;
    CUstream unwritten_stream;
};

/* Part of struct sched_state. */
struct profile {
    uintptr_t kernel;
    uint64_t grid_threads;
    uint64_t est_ns;
    uint64_t samples;      /* including those of a seed from the profile file */
    uint64_t learned;      /* samples learned in this process (what is saved at exit) */
    uint64_t gpu_samples;  /* of those, from GPU kernel times: once there is one, polls teach nothing */
    const struct tally_kernel_name *name; /* for the profile file; NULL without one */
};

/* The scheduler's process-wide state: run-ahead reads the join, the lanes and the limits. */
struct sched_state {
    _Atomic int priority;           /* TALLY_SB_PRIO_*; HIGH becomes BEST_EFFORT if the daemon demotes us */
    _Atomic int state;              /* enum join_state */
    pthread_mutex_t join_lock;
    struct tally_sb_header *sb;
    struct tally_sb_slot *slot;
    CUcontext context;              /* scheduled context: the first launch's */
    CUdeviceptr sb_device;          /* the scoreboard's address on the GPU */
    struct lane lanes[TALLY_SB_MAX_LANES];
    _Atomic uint32_t n_lanes;
    pthread_mutex_t lanes_lock;
    pthread_mutex_t profile_lock;
    struct profile profiles[PROFILE_SLOTS];
    uint64_t last_poll_ns;
    _Atomic int warned_lanes, warned_daemon, warned_demoted;
    uint64_t max_hold_ns;
    uint64_t slo_p99_ns;            /* HP: TALLY_SLO_P99_MS, stored in the slot at claim */
    int batch_writes;               /* TALLY_BATCH_WRITES=1: see defer_write */
    _Atomic uint32_t deferred_lanes; /* lanes with launches whose completion write is deferred */
    /* Threads held at the launch-level gate now, and when the last such hold ended: the GPU-side
     * gate leaves a span of its own holds out of held_ns when these already counted it. */
    _Atomic int launch_holds;
    _Atomic uint64_t launch_hold_end_ns;
};
extern struct sched_state S;

/* Where a word of the scoreboard is on the GPU, for the stream memory operations on it. */
static inline CUdeviceptr sb_device_address(const void *word) {
    return S.sb_device + (CUdeviceptr)((const char *)word - (const char *)S.sb);
}

struct ra_entry; /* runahead.c's queue entry; sched.c only carries pointers to it */

/* What launch_enter decided, for launch_exit on the same thread. Run-ahead
 * fills it in for a queued launch and keeps its own fields in it. */
struct sched_pending {
    int track;
    int be;                /* tracked as best effort (the priority may change between enter and exit) */
    uint64_t est_ns;
    uint32_t profile;
    uint32_t units;        /* see struct inflight */
    int gpu_timed;         /* see struct inflight */
    struct ra_entry *ra;   /* run-ahead: the launch was queued behind a wait (this is its entry) */
    int in_place;          /* run-ahead: counted in RA.in_place until its API exit */
    int held, alone;       /* be_wait_at_gate: the launch waited; it was admitted alone (long_kernels) */
    int idle;              /* be_wait_at_gate: admitted under the idle depth (HP idle for unthrottle_after) */
    int launching;         /* HP: counted in the slot's launching until the API exit */
    uint64_t now;          /* launch_enter's clock, for the lane's last_used_ns */
    uintptr_t ptds_key;    /* this thread's per-thread default stream's lane key; 0 until first used */
};
extern __thread struct sched_pending pending;

/* What this process's BE launches in flight still have to do: the turnaround
 * an HP request arriving now would see from us. */
struct be_backlog {
    uint64_t remaining_ns; /* estimated GPU time still to run */
    uint64_t launches;     /* launches not yet seen complete */
    uint64_t oldest_ns;    /* when the longest-running of them started (0: none): the max hold's clock */
};

/* sched.c, for run-ahead: the releaser applies the gate as be_wait_at_gate does. */
struct be_backlog retire_lanes(uint64_t now, uint32_t *skipped); /* the work in flight it decides on */
void flush_unwritten(void);                                       /* before a wait, and while waiting */
void gate_pause(uint64_t held_ns, int spin);                      /* between two looks at the gate */
void give_up_held(enum tally_gate_decision d);                    /* past TALLY_MAX_HOLD_MS */
void warn_if_daemon_dead(enum tally_gate_decision d);             /* its admissions warn alike */
uint64_t launch_estimate(const struct tally_launch *launch, uint64_t hint_ns, uint32_t units,
                         uint32_t *profile);                      /* a queued launch's estimate */

/* runahead.c, for the scheduler's ways in and out. */
void runahead_init(void);                 /* join, for a BE client */
void runahead_release_all(void);          /* failing open and process exit */
void runahead_after_fork(void);           /* tally_sched_after_fork */
int runahead_try(const struct tally_launch *launch, uint64_t now); /* launch_enter, before the gate */
void runahead_drain(void);                /* launch_enter, before slicing */
void runahead_ring_entry(struct lane *l, struct inflight *entry); /* track_launch's ring entry */
void runahead_exit(void);                 /* the end of every API exit */

/* This thread's watch of HP's progress (gate.h), which bounds a hold by TALLY_MAX_HOLD_MS of
 * waiting for nothing; not cleared (tally_gate_hold_start clears it); NULL without memory (HP's
 * busy time then counts). */
struct tally_gate_watch *thread_watch(void);

/* gpugate.c (TALLY_GPU_GATE=1), for the same ways in and out. */
void gpugate_init(void);                  /* join, for a BE client */
int gpugate_try(const struct tally_launch *launch, uint64_t now); /* launch_enter: 1 = waits on the GPU */
int gpugate_ready(uint64_t now);         /* whether launches may wait on the GPU now (starts the thread) */
int gpugate_wait(CUstream stream, uint64_t now, int program_launch); /* one wait on stream (program_launch: the
                                                                        program's own, counted as a held launch);
                                                                        0: the gate is off for good */
void gpugate_close_all(uint64_t now);     /* an HP launch, before it is enqueued */
void gpugate_disable(void);               /* failing open and process exit: our waits pass for good */
void gpugate_after_fork(void);            /* tally_sched_after_fork */

#pragma GCC visibility pop

#endif
