/* The launch-level priority gate: what a best-effort (BE) launch may do, given
 * the scoreboard and the time.
 *
 * Policy (defaults in scoreboard.h, set by `tally up`):
 *   - high-priority (HP) launches are never delayed;
 *   - HP is busy while any HP lane has work in flight on the GPU, an HP
 *     launch call is in progress, or an HP launch happened within idle_window_ns;
 *   - a BE launch waits while HP is busy; otherwise it is admitted if its
 *     process's own BE work in flight plus its estimate stay within
 *     turnaround_budget_ns, or alone if it alone exceeds the budget;
 *   - once HP has been idle for unthrottle_after_ns, BE is "unthrottled": its
 *     in-flight work is bounded only by TALLY_GATE_IDLE_DEPTH_NS, so an HP
 *     request that arrives after a long idle period waits for at most that
 *     much BE work (an unbounded launch queue could hold tens of ms);
 *   - no HP client, the passthrough policy, or a dead daemon: ungated.
 *
 * Policy tgs (the TGS baseline, NSDI'23; docs/scheduling.md): BE launches pass
 * a token bucket at the rate the daemon's AIMD controller sets in
 * be_rate_limit_per_s (0 = unlimited), be_rate_burst deep. The bucket is
 * process-local (struct tally_gate_bucket) and kept as a GCRA "theoretical
 * arrival time", updated with a CAS so launching threads need no lock. HP is
 * never delayed; no HP client or a dead daemon: ungated / fail open.
 *
 * The decision is a pure function of (scoreboard, now, BE in-flight
 * estimate, kernel estimate) so it is tested on a simulated clock.
 */
#ifndef TALLY_GATE_H
#define TALLY_GATE_H

#include <stdint.h>

#include <stddef.h>

#include "scoreboard.h"

enum tally_gate_decision {
    TALLY_GATE_ADMIT = 0,        /* within the budget */
    TALLY_GATE_ADMIT_ALONE = 1,  /* estimate exceeds the budget: runs with nothing else of ours in flight */
    TALLY_GATE_ADMIT_IDLE = 2,   /* HP idle for unthrottle_after_ns: only the idle depth bounds BE */
    TALLY_GATE_UNGATED = 3,      /* no HP client, or passthrough policy: nothing is tracked */
    TALLY_GATE_DAEMON_DEAD = 4,  /* heartbeat stale: fail open */
    TALLY_GATE_WAIT_HP = 5,      /* HP busy */
    TALLY_GATE_WAIT_BUDGET = 6,  /* our in-flight BE work must drain first */
    TALLY_GATE_ADMIT_RATE = 7,   /* policy tgs: a token was taken */
    TALLY_GATE_WAIT_RATE = 8,    /* policy tgs: no token yet */
};

#define TALLY_GATE_IS_WAIT(d) \
    ((d) == TALLY_GATE_WAIT_HP || (d) == TALLY_GATE_WAIT_BUDGET || (d) == TALLY_GATE_WAIT_RATE)

/* A BE process's token bucket (policy tgs); zero-initialized = full. */
struct tally_gate_bucket {
    uint64_t tat_ns; /* GCRA theoretical arrival time of the next launch */
};

#define TALLY_GATE_IDLE_DEPTH_NS 2000000ull

/* Nonzero when some active HP client has GPU work in flight, or a launch call in progress. */
int tally_gate_hp_inflight(const struct tally_sb_header *h);

int tally_gate_daemon_alive(const struct tally_sb_header *h, uint64_t now_ns);

/* Policy tally. be_remaining_ns: this process's BE work in flight that is
 * still to run, estimated (what an HP request arriving now would wait for);
 * be_inflight: its BE launches in flight, complete or not (a kernel longer
 * than the budget runs only when this is 0). */
enum tally_gate_decision tally_gate_decide(const struct tally_sb_header *h, uint64_t now_ns,
                                           uint64_t be_remaining_ns, uint64_t be_inflight, uint64_t kernel_est_ns);

/* The bound on BE work in flight that tally_gate_decide applies at now_ns
 * while HP is not busy: the turnaround budget, or the idle depth once HP has
 * been idle for unthrottle_after_ns. Slicing sizes its slices by it, so a
 * kernel is not cut into budget-sized pieces while nobody waits for the GPU. */
uint64_t tally_gate_bound_ns(const struct tally_sb_header *h, uint64_t now_ns);

/* Policy tgs: whether a BE launch at now_ns may go; takes a token (advances
 * the bucket) when it may. With a wait, *wait_ns (if not NULL) is how long
 * until the next token. Pure apart from the bucket it is given. */
enum tally_gate_decision tally_gate_decide_rate(const struct tally_sb_header *h, uint64_t now_ns,
                                                struct tally_gate_bucket *bucket, uint64_t *wait_ns);

/* A BE launch under whichever policy the scoreboard holds: tally_gate_decide
 * for policy tally, tally_gate_decide_rate for policy tgs, else ungated. */
enum tally_gate_decision tally_gate_decide_be(const struct tally_sb_header *h, uint64_t now_ns,
                                              uint64_t be_remaining_ns, uint64_t be_inflight, uint64_t kernel_est_ns,
                                              struct tally_gate_bucket *bucket);

const char *tally_gate_decision_name(enum tally_gate_decision d);

/* How long HP has gone without progress on the work that makes it busy, watched across looks:
 * for each HP lane with work in flight, the time since its completion count last moved; for each
 * HP slot with launch calls in progress, since its count of them was last seen at 0 or one of its
 * lanes last completed something; with nothing of HP in flight (HP busy only by its idle window),
 * since HP's last launch or busy time last moved. A saturated HP client keeps completing work and
 * never stalls; one whose completion write never comes, or whose launch call never returns, does.
 * Zero-initialized = nothing watched yet. */
struct tally_gate_watch {
    struct { uint64_t completed, since_ns; } lane[TALLY_SB_MAX_CLIENTS][TALLY_SB_MAX_LANES];
    uint64_t call_since_ns[TALLY_SB_MAX_CLIENTS];
    uint64_t idle_mark, idle_since_ns;
};
uint64_t tally_gate_hp_stall_ns(struct tally_gate_watch *w, const struct tally_sb_header *h, uint64_t now_ns);
/* sizeof(struct tally_gate_watch), for callers that allocate one without its layout (the tests) */
size_t tally_gate_watch_size(void);

/* One held launch's clock for TALLY_MAX_HOLD_MS: how long it has waited for nothing. Waiting for
 * HP (wait-hp): the HP stall above. Waiting for this process's own work (wait-budget): how long
 * its oldest launch in flight has been running (own_oldest_ns: when it started, 0 = none; a lost
 * completion write never ends it, however many other launches of ours complete), within this
 * hold. Waiting for the TGS rate: since that run of rate waits began. watch NULL (no memory):
 * HP's busy time counts, as before the watch existed. */
struct tally_gate_hold {
    struct tally_gate_watch *watch;
    uint64_t held_since_ns, own_oldest_ns, rate_since_ns;
};
#define TALLY_GATE_OLDEST_UNKNOWN UINT64_MAX /* own_oldest_ns when not all lanes were seen: keep the last */
void tally_gate_hold_start(struct tally_gate_hold *hold, struct tally_gate_watch *watch, uint64_t now_ns);
uint64_t tally_gate_hold_stall_ns(struct tally_gate_hold *hold, const struct tally_sb_header *h, uint64_t now_ns,
                                  enum tally_gate_decision d, uint64_t own_oldest_ns);

/* Whether something held since held_since (0: nothing is held) has been held for max_hold_ns
 * at now_ns. held_since may be another thread's clock reading, taken after now_ns was read:
 * such a mark is no hold at all, not one that wrapped around to centuries. */
int tally_gate_held_too_long(uint64_t held_since, uint64_t now_ns, uint64_t max_hold_ns);

#endif
