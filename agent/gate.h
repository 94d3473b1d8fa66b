/* The launch-level priority gate: what a best-effort (BE) launch may do, given
 * the scoreboard and the time.
 *
 * Policy (defaults in scoreboard.h, set by `tally up`):
 *   - high-priority (HP) launches are never delayed;
 *   - HP is busy while any HP lane has work in flight on the GPU, or an HP
 *     launch happened within idle_window_ns;
 *   - a BE launch waits while HP is busy; otherwise it is admitted if its
 *     process's own BE work in flight plus its estimate stay within
 *     turnaround_budget_ns, or alone if it alone exceeds the budget;
 *   - once HP has been idle for unthrottle_after_ns, BE is "unthrottled": its
 *     in-flight work is bounded only by TALLY_GATE_IDLE_DEPTH_NS, so an HP
 *     request that arrives after a long idle period waits for at most that
 *     much BE work (an unbounded launch queue could hold tens of ms);
 *   - no HP client, the passthrough policy, or a dead daemon: ungated.
 *
 * The decision is a pure function of (scoreboard, now, BE in-flight
 * estimate, kernel estimate) so it is tested on a simulated clock.
 */
#ifndef TALLY_GATE_H
#define TALLY_GATE_H

#include <stdint.h>

#include "scoreboard.h"

enum tally_gate_decision {
    TALLY_GATE_ADMIT = 0,        /* within the budget */
    TALLY_GATE_ADMIT_ALONE = 1,  /* estimate exceeds the budget: runs with nothing else of ours in flight */
    TALLY_GATE_ADMIT_IDLE = 2,   /* HP idle for unthrottle_after_ns: only the idle depth bounds BE */
    TALLY_GATE_UNGATED = 3,      /* no HP client, or passthrough policy: nothing is tracked */
    TALLY_GATE_DAEMON_DEAD = 4,  /* heartbeat stale: fail open */
    TALLY_GATE_WAIT_HP = 5,      /* HP busy */
    TALLY_GATE_WAIT_BUDGET = 6,  /* our in-flight BE work must drain first */
};

#define TALLY_GATE_IS_WAIT(d) ((d) >= TALLY_GATE_WAIT_HP)

#define TALLY_GATE_IDLE_DEPTH_NS 2000000ull

/* Nonzero when some active HP client has GPU work in flight. */
int tally_gate_hp_inflight(const struct tally_sb_header *h);

int tally_gate_daemon_alive(const struct tally_sb_header *h, uint64_t now_ns);

enum tally_gate_decision tally_gate_decide(const struct tally_sb_header *h, uint64_t now_ns,
                                           uint64_t be_inflight_est_ns, uint64_t kernel_est_ns);

const char *tally_gate_decision_name(enum tally_gate_decision d);

#endif
