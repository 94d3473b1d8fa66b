/* The launch-level priority gate's decision; see gate.h. */
#include "gate.h"

#include <string.h>

static uint64_t load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static uint32_t load32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
/* Time from since to now; 0 for a since ahead of now (another thread's later clock reading). */
static uint64_t elapsed(uint64_t since, uint64_t now) { return now > since ? now - since : 0; }

int tally_gate_hp_inflight(const struct tally_sb_header *h) {
    struct tally_sb_header *hh = (struct tally_sb_header *)h;
    for (uint32_t i = 0; i < TALLY_SB_MAX_CLIENTS; i++) {
        const struct tally_sb_slot *s = tally_sb_slot_at(hh, i);
        if (load32(&s->state) != TALLY_SB_SLOT_ACTIVE || load32(&s->priority) != TALLY_SB_PRIO_HIGH)
            continue;
        /* A launch between API enter and exit: its work may already run, and its lane shows it
         * only at exit, which a large graph can reach only after the idle window is over. */
        if (load32(&s->launching)) return 1;
        for (uint32_t j = 0; j < TALLY_SB_MAX_LANES; j++) {
            /* completed first: a completion can only catch up with a launch
             * already published, so this order never misses in-flight work. */
            uint64_t done = load64(&s->lanes[j].completed_seq);
            uint64_t launched = load64(&s->lanes[j].launched_seq);
            if (launched > done) return 1;
        }
    }
    return 0;
}

int tally_gate_daemon_alive(const struct tally_sb_header *h, uint64_t now_ns) {
    uint64_t beat = load64(&h->daemon_heartbeat_ns);
    if (beat == 0) return 0;
    return now_ns <= beat || now_ns - beat <= load64(&h->daemon_timeout_ns);
}

/* HP's last sign of life: its last launch or the last moment its work was seen in flight. */
static uint64_t hp_last_mark(const struct tally_sb_header *h) {
    uint64_t last = load64(&h->hp_last_launch_ns);
    uint64_t busy = load64(&h->hp_last_busy_ns);
    return busy > last ? busy : last;
}

/* How long HP has been idle at now_ns, given it has nothing in flight. */
static uint64_t hp_idle_ns(const struct tally_sb_header *h, uint64_t now_ns) {
    return elapsed(hp_last_mark(h), now_ns);
}

static uint64_t bound_when_idle(const struct tally_sb_header *h, uint64_t idle_ns) {
    uint64_t budget = load64(&h->turnaround_budget_ns);
    if (idle_ns >= load64(&h->unthrottle_after_ns) && budget < TALLY_GATE_IDLE_DEPTH_NS)
        budget = TALLY_GATE_IDLE_DEPTH_NS;
    return budget;
}

uint64_t tally_gate_bound_ns(const struct tally_sb_header *h, uint64_t now_ns) {
    if (tally_gate_hp_inflight(h)) return load64(&h->turnaround_budget_ns);
    return bound_when_idle(h, hp_idle_ns(h, now_ns));
}

enum tally_gate_decision tally_gate_decide(const struct tally_sb_header *h, uint64_t now_ns,
                                           uint64_t be_remaining_ns, uint64_t be_inflight, uint64_t kernel_est_ns) {
    if (load32(&h->policy) != TALLY_SB_POLICY_TALLY) return TALLY_GATE_UNGATED;
    if (!tally_gate_daemon_alive(h, now_ns)) return TALLY_GATE_DAEMON_DEAD;
    if (load32(&h->hp_active) == 0) return TALLY_GATE_UNGATED;
    if (tally_gate_hp_inflight(h)) {
        /* HP is idle only from the end of its work, not from its last launch:
         * a request that is one long CUDA graph launched 100 ms ago must not
         * count as 100 ms of idleness the moment it completes. */
        uint64_t *busy = (uint64_t *)&h->hp_last_busy_ns;
        if (load64(busy) < now_ns) __atomic_store_n(busy, now_ns, __ATOMIC_RELAXED);
        return TALLY_GATE_WAIT_HP;
    }
    uint64_t idle = hp_idle_ns(h, now_ns);
    if (idle < load64(&h->idle_window_ns)) return TALLY_GATE_WAIT_HP;
    int unthrottled = idle >= load64(&h->unthrottle_after_ns);
    uint64_t budget = bound_when_idle(h, idle);
    if (be_remaining_ns + kernel_est_ns <= budget)
        return unthrottled ? TALLY_GATE_ADMIT_IDLE : TALLY_GATE_ADMIT;
    if (be_inflight == 0) return TALLY_GATE_ADMIT_ALONE;
    return TALLY_GATE_WAIT_BUDGET;
}

/* GCRA: launches are spaced interval = 1e9 / rate apart on average; a launch
 * conforms when now >= tat - (burst - 1) * interval, and then moves tat to
 * max(tat, now) + interval. An idle bucket refills to `burst` launches. */
enum tally_gate_decision tally_gate_decide_rate(const struct tally_sb_header *h, uint64_t now_ns,
                                                struct tally_gate_bucket *bucket, uint64_t *wait_ns) {
    if (wait_ns) *wait_ns = 0;
    if (load32(&h->policy) != TALLY_SB_POLICY_TGS) return TALLY_GATE_UNGATED;
    if (!tally_gate_daemon_alive(h, now_ns)) return TALLY_GATE_DAEMON_DEAD;
    if (load32(&h->hp_active) == 0) return TALLY_GATE_UNGATED;
    uint64_t rate = load64(&h->be_rate_limit_per_s);
    if (rate == 0) return TALLY_GATE_UNGATED; /* unlimited */
    if (rate > 1000000000ull) rate = 1000000000ull;
    uint64_t interval = 1000000000ull / rate;
    uint64_t burst = load64(&h->be_rate_burst);
    if (burst == 0) burst = 1;
    if (burst > 1000000ull) burst = 1000000ull;
    uint64_t tolerance = (burst - 1) * interval;
    uint64_t tat = __atomic_load_n(&bucket->tat_ns, __ATOMIC_RELAXED);
    for (;;) {
        uint64_t earliest = tat > tolerance ? tat - tolerance : 0;
        if (now_ns < earliest) {
            if (wait_ns) *wait_ns = earliest - now_ns;
            return TALLY_GATE_WAIT_RATE;
        }
        uint64_t next = (tat > now_ns ? tat : now_ns) + interval;
        if (__atomic_compare_exchange_n(&bucket->tat_ns, &tat, next, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return TALLY_GATE_ADMIT_RATE;
        /* another thread took a token: tat was reloaded, decide again */
    }
}

enum tally_gate_decision tally_gate_decide_be(const struct tally_sb_header *h, uint64_t now_ns,
                                              uint64_t be_remaining_ns, uint64_t be_inflight, uint64_t kernel_est_ns,
                                              struct tally_gate_bucket *bucket) {
    if (load32(&h->policy) == TALLY_SB_POLICY_TGS) return tally_gate_decide_rate(h, now_ns, bucket, NULL);
    return tally_gate_decide(h, now_ns, be_remaining_ns, be_inflight, kernel_est_ns);
}

const char *tally_gate_decision_name(enum tally_gate_decision d) {
    switch (d) {
    case TALLY_GATE_ADMIT: return "admit";
    case TALLY_GATE_ADMIT_ALONE: return "admit-alone";
    case TALLY_GATE_ADMIT_IDLE: return "admit-idle";
    case TALLY_GATE_UNGATED: return "ungated";
    case TALLY_GATE_DAEMON_DEAD: return "daemon-dead";
    case TALLY_GATE_WAIT_HP: return "wait-hp";
    case TALLY_GATE_WAIT_BUDGET: return "wait-budget";
    case TALLY_GATE_ADMIT_RATE: return "admit-rate";
    case TALLY_GATE_WAIT_RATE: return "wait-rate";
    }
    return "unknown";
}

int tally_gate_held_too_long(uint64_t held_since, uint64_t now_ns, uint64_t max_hold_ns) {
    return held_since != 0 && elapsed(held_since, now_ns) >= max_hold_ns;
}

uint64_t tally_gate_hp_stall_ns(struct tally_gate_watch *w, const struct tally_sb_header *h, uint64_t now_ns) {
    struct tally_sb_header *hh = (struct tally_sb_header *)h;
    uint64_t longest = 0;
    int any = 0;
    for (uint32_t i = 0; i < TALLY_SB_MAX_CLIENTS; i++) {
        const struct tally_sb_slot *s = tally_sb_slot_at(hh, i);
        if (load32(&s->state) != TALLY_SB_SLOT_ACTIVE || load32(&s->priority) != TALLY_SB_PRIO_HIGH) {
            /* forget it: a process that claims the slot next starts afresh */
            for (uint32_t j = 0; j < TALLY_SB_MAX_LANES; j++) w->lane[i][j].since_ns = w->lane[i][j].completed = 0;
            w->call_since_ns[i] = 0;
            continue;
        }
        int completed_any = 0;
        for (uint32_t j = 0; j < TALLY_SB_MAX_LANES; j++) {
            uint64_t done = load64(&s->lanes[j].completed_seq);
            uint64_t launched = load64(&s->lanes[j].launched_seq);
            uint64_t before = w->lane[i][j].completed;
            w->lane[i][j].completed = done;
            if (before != done) completed_any = 1;
            if (launched <= done) {
                w->lane[i][j].since_ns = 0;
                continue;
            }
            any = 1;
            if (before != done || !w->lane[i][j].since_ns) w->lane[i][j].since_ns = now_ns;
            if (elapsed(w->lane[i][j].since_ns, now_ns) > longest) longest = elapsed(w->lane[i][j].since_ns, now_ns);
        }
        /* Launch calls in progress make progress by ending, seen as the count at 0 or as the slot's
         * work completing (threads whose calls overlap may never leave it at 0); a call that never
         * returns, or a count that leaked, is a stall once the slot's lanes have nothing to complete. */
        if (load32(&s->launching)) {
            any = 1;
            if (!w->call_since_ns[i] || completed_any) w->call_since_ns[i] = now_ns;
            if (elapsed(w->call_since_ns[i], now_ns) > longest) longest = elapsed(w->call_since_ns[i], now_ns);
        } else {
            w->call_since_ns[i] = 0;
        }
    }
    if (any) {
        w->idle_since_ns = 0;
        return longest;
    }
    /* Busy by the idle window alone: that ends by itself unless HP's marks stop moving in a way the
     * window never passes (a mark ahead of this clock). */
    uint64_t mark = hp_last_mark(h);
    if (mark != w->idle_mark || !w->idle_since_ns) {
        w->idle_mark = mark;
        w->idle_since_ns = now_ns;
    }
    return elapsed(w->idle_since_ns, now_ns);
}

size_t tally_gate_watch_size(void) { return sizeof(struct tally_gate_watch); }

void tally_gate_hold_start(struct tally_gate_hold *hold, struct tally_gate_watch *watch, uint64_t now_ns) {
    *hold = (struct tally_gate_hold){.watch = watch, .held_since_ns = now_ns};
    if (watch) memset(watch, 0, sizeof *watch);
}

uint64_t tally_gate_hold_stall_ns(struct tally_gate_hold *hold, const struct tally_sb_header *h, uint64_t now_ns,
                                  enum tally_gate_decision d, uint64_t own_oldest_ns) {
    if (own_oldest_ns != TALLY_GATE_OLDEST_UNKNOWN) hold->own_oldest_ns = own_oldest_ns;
    uint64_t since;
    if (d == TALLY_GATE_WAIT_RATE) {
        if (!hold->rate_since_ns) hold->rate_since_ns = now_ns;
        since = hold->rate_since_ns;
    } else {
        hold->rate_since_ns = 0;
        if (d == TALLY_GATE_WAIT_HP)
            return hold->watch ? tally_gate_hp_stall_ns(hold->watch, h, now_ns) : elapsed(hold->held_since_ns, now_ns);
        if (!hold->own_oldest_ns) return 0; /* nothing of ours in flight: this wait ends at the next look */
        since = hold->own_oldest_ns > hold->held_since_ns ? hold->own_oldest_ns : hold->held_since_ns;
    }
    return elapsed(since, now_ns);
}
