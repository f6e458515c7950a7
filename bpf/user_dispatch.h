/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The user-space dispatch mode of bpf/burst.bpf.c (conf.user_dispatch = 1; intf.h has the
 * interface): a VM's runnable thread is held in BPF custody and reported on `events`; the
 * scheduler process (src/enforce/scx/user.rs decides, src/enforce/scx/loader.rs carries out)
 * orders each run, extension and preemption through `bq_order`; the CPU's ops.dispatch takes
 * the thread ordered for it, and its ops.tick keeps the ordered slice's end. Included by
 * burst.bpf.c after its maps and helpers, which this part uses (`enq_at`, `slice_ns()`).
 */

/* The user-space mode. `events`: to the scheduler process (intf.h). `plans`, per CPU: the
 * thread ordered to run there next (`next`, taken by the CPU's ops.dispatch) and until when,
 * and the thread ordered there last (`cur`) with the end of its slice, which ops.tick keeps. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CPUS);
	__type(key, u32);
	__type(value, struct plan);
} plans SEC(".maps");

/* A VM's thread an order put on a CPU -> that CPU, from the dispatch until it stops there
 * (paused by a higher class, it stays). The process has the thread on that CPU meanwhile, and
 * only a report from there takes it off. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS * 16);
	__type(key, u32);
	__type(value, u32);
} placed SEC(".maps");

/* Tells the scheduler process of a change of thread `tid` (user-space mode). A full ring
 * loses the record: the process sees the thread again at its next change, and a held thread
 * no order reaches is the watchdog's (the cgroup quota holds it afterwards). */
static __always_inline void emit(u32 kind, u32 tid, u32 cpu)
{
	struct event e = { .at = bpf_ktime_get_ns(), .tid = tid, .cpu = cpu, .kind = kind };
	bpf_ringbuf_output(&events, &e, sizeof(e), 0);
}

/* Thread `tid` is no longer the one ordered on the CPU of plan `pl` (NULL: none): off that
 * plan's `cur`, and out of `placed`. */
static __always_inline void unplace(u32 tid, struct plan *pl)
{
	if (pl && pl->cur == (u64)tid)
		pl->cur = 0;
	bpf_map_delete_elem(&placed, &tid);
}

/* Holds VM thread `p` (`tid`) from ops.enqueue: in BPF custody, in no DSQ, until the
 * scheduler process orders it run; every such wait is counted in `latency`. */
static __always_inline void hold_for_order(struct task_struct *p, u32 tid)
{
	/* Back from a CPU an order put it on without a stop there: a change of its attributes
	 * (a renice, a new affinity, the kernel's own narrowing of a migration-disabled thread's
	 * CPUs) took it off that CPU's queue after the dispatch, or off the CPU where it was
	 * paused, and gave it back here. The process still had it on that CPU and took this
	 * wake for news of a thread already running, and the thread waited for an order that
	 * never came: seen in the scx-6.12 guest, threads held 1 s (found by the process) or
	 * until the watchdog (30 s). The order is reported failed first. */
	u32 *on = bpf_map_lookup_elem(&placed, &tid);
	if (on) {
		u32 cpu = *on;
		unplace(tid, bpf_map_lookup_elem(&plans, &cpu));
		emit(EV_FAILED, tid, cpu);
	}
	u64 at = (bpf_ktime_get_ns() & ~ENQ_FLAGS) | ENQ_COUNTED;
	bpf_map_update_elem(&enq_at, &tid, &at, BPF_ANY);
	emit(EV_WAKE, tid, scx_bpf_task_cpu(p));
}

/* Reports VM thread `p` off `cpu` (ops.stopping), which no longer runs an ordered slice. */
static __always_inline void stopped_ordered(u32 cpu, struct task_struct *p, bool runnable)
{
	/* Runnable with slice left: a higher class took the CPU, and the thread waits at the
	 * head of this CPU's queue to go on (the kernel's own doing, no order). It stays the
	 * thread ordered here: cleared, an order deferred to its slice's end found none and
	 * kicked it off at once (5 ms early in the scx-6.12 guest), and its tick no longer kept
	 * its slice's end. */
	/* Not runnable by the callback but still TASK_RUNNING: a change of its attributes from
	 * elsewhere dequeued it while it ran, and it goes on at once (the kernel calls
	 * ops.running next, without ops.enqueue); a pause as the process sees it. */
	if (!runnable && p->__state == 0)
		runnable = true;
	u32 kind = !runnable ? EV_BLOCK : p->scx.slice ? EV_PAUSE : EV_STOP;
	u32 tid = p->pid;
	struct plan *pl = bpf_map_lookup_elem(&plans, &cpu);
	if (kind != EV_PAUSE)
		unplace(tid, pl);
	emit(kind, tid, cpu);
}

/* ops.tick of a VM thread `p` on `cpu`: keeps the end of the slice ordered there. */
static __always_inline void tick_ordered(u32 cpu, struct task_struct *p)
{
	/* The end ordered (kept by ORDER_EXTEND): a hard one to the tick; a turn one slice_ns
	 * later, as the process ends turns itself (deciding ahead, ORDER_DEFER), and the extra
	 * slice only bounds a stalled process. A thread it did not order here runs its slice
	 * out. */
	struct plan *pl = bpf_map_lookup_elem(&plans, &cpu);
	if (pl && pl->cur == (u64)p->pid) {
		u64 now = bpf_ktime_get_ns();
		u64 end = pl->cur_until + (pl->cur_hard ? 0 : slice_ns());
		p->scx.slice = end > now ? end - now : 0;
	}
}

/* After an order of `tid` failed: tells the process again that the thread waits if it is
 * held for an order now. A failure's report can follow the thread's own wake report in the
 * ring (the thread, not held when the order came, was held by another CPU before the report
 * went out), and the process, which took that wake for news of a thread already ordered,
 * then had it blocked while it waited. */
static __always_inline void still_held(u32 tid, u32 cpu)
{
	u64 *enq = bpf_map_lookup_elem(&enq_at, &tid);
	if (enq && !(*enq & ENQ_TAKEN))
		emit(EV_WAKE, tid, cpu);
}

/* User-space mode: runs here the thread the scheduler process ordered for this CPU, if it is
 * still held for an order (else tells the process it failed). */
static __always_inline void dispatch_ordered(u32 cpu)
{
	struct plan *pl = bpf_map_lookup_elem(&plans, &cpu);
	if (!pl)
		return;
	u32 tid = __sync_lock_test_and_set(&pl->next, 0);
	if (!tid)
		return;
	u64 until = pl->next_until;
	u64 hard = pl->next_hard;
	u64 at = pl->next_at;
	u64 *enq = bpf_map_lookup_elem(&enq_at, &tid);
	if (!enq || (*enq & ENQ_TAKEN)) {
		emit(EV_FAILED, tid, cpu);
		still_held(tid, cpu);
		return;
	}
	struct task_struct *p = bpf_task_from_pid(tid);
	if (!p) {
		emit(EV_FAILED, tid, cpu);
		return;
	}
	s32 on = scx_bpf_task_cpu(p);
	if (p->migration_disabled && on != (s32)cpu) {
		/* Stopped where it may not leave (migrate_disable()): moving it here would abort
		 * the scheduler ("cannot move migration disabled", seen in the scx-6.12 guest).
		 * Tested before its CPUs, which the kernel narrows to that one CPU while it is
		 * switched out so. It runs where it is, briefly and unordered, and the process
		 * hears the order failed; it is held again at its next enqueue. */
		__sync_fetch_and_or(enq, ENQ_TAKEN);
		scx_bpf_dispatch(p, SCX_DSQ_LOCAL_ON | (u64)on, 100000, 0);
		scx_bpf_kick_cpu(on, SCX_KICK_IDLE);
		bpf_task_release(p);
		emit(EV_FAILED, tid, cpu);
		return;
	}
	if (!bpf_cpumask_test_cpu(cpu, p->cpus_ptr)) {
		/* Not allowed here (its affinity changed): dispatching it would abort the
		 * scheduler. It stays held: the process hears the order failed and that it waits
		 * (it had it blocked after the failure alone, and the thread waited for the
		 * watchdog). */
		bpf_task_release(p);
		emit(EV_FAILED, tid, cpu);
		still_held(tid, cpu);
		return;
	}
	__sync_fetch_and_or(enq, ENQ_TAKEN);
	bpf_map_update_elem(&placed, &tid, &cpu, BPF_ANY);
	/* The slice as ordered, from now: the time the order took to reach this CPU is not
	 * taken from it (the process charges from the reported start, and what ran past its
	 * end from the reported stop). */
	u64 now = bpf_ktime_get_ns();
	until = now + (until > at ? until - at : 0);
	u64 slice = until - now + (hard ? 0 : slice_ns());
	if (slice < 100000)
		slice = 100000;
	pl->cur = tid;
	pl->cur_until = until;
	pl->cur_hard = hard;
	scx_bpf_dispatch(p, SCX_DSQ_LOCAL, slice, 0);
	bpf_task_release(p);
}

/* Ends the slice of the thread ordered on `pl`'s CPU now, for the kick that follows: the tick
 * keeps it at 0 until the thread is off. Without it, a tick on that CPU before the kick
 * arrived gave the thread its slice back (tick_ordered), and the kernel keeps running a task
 * with slice left without asking ops.dispatch: in the scx-6.12 guest (TCG, where a kick
 * waits for its CPU's turn on the emulator) a thread ordered off its CPU ran on there for
 * tens of ms while the process charged the thread it had ordered in its place. */
static __always_inline void end_now(struct plan *pl)
{
	pl->cur_until = bpf_ktime_get_ns();
	pl->cur_hard = 1;
}

/* The scheduler process's orders (user-space mode), run with BPF_PROG_RUN: see intf.h. */
SEC("syscall")
int bq_order(struct order *o)
{
	u32 cpu = o->cpu;
	struct plan *pl = bpf_map_lookup_elem(&plans, &cpu);
	if (!pl)
		return -22;
	u32 op = o->op & ~(ORDER_HARD | ORDER_DEFER);
	u64 hard = o->op & ORDER_HARD ? 1 : 0;
	bool defer = o->op & ORDER_DEFER;
	o->replaced = 0;
	if (op == ORDER_RUN) {
		pl->next_until = o->until;
		pl->next_hard = hard;
		/* The slice is until - from, from the thread's start here: an order decided
		 * ahead of a slice's end (ORDER_DEFER) comes before the time it was decided for. */
		pl->next_at = o->from && o->from <= o->until ? o->from : bpf_ktime_get_ns();
		o->replaced = __sync_lock_test_and_set(&pl->next, (u64)o->tid);
		if (defer && pl->cur) {
			pl->cur_hard = 1;
			return 0;
		}
		end_now(pl);
	} else if (op == ORDER_EXTEND) {
		if (pl->cur == (u64)o->tid) {
			pl->cur_until = o->until;
			pl->cur_hard = hard;
		}
		return 0;
	} else if (op == ORDER_PREEMPT) {
		o->replaced = __sync_lock_test_and_set(&pl->next, 0);
		if (defer) {
			pl->cur_hard = 1;
			return 0;
		}
		end_now(pl);
	} else {
		return -22;
	}
	/* Whatever of ours runs there gives way (its slice ends: it goes back through
	 * ops.enqueue, held for an order); an idle CPU wakes up and dispatches. */
	scx_bpf_kick_cpu((s32)cpu, SCX_KICK_PREEMPT);
	return 0;
}
