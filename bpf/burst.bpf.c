// SPDX-License-Identifier: GPL-2.0-only
/*
 * burst-qemu's sched_ext scheduler: per-VM CPU budgets for QEMU vCPU threads.
 *
 * Partial mode (SCX_OPS_SWITCH_PARTIAL): only threads set to SCHED_EXT (the VMs' vCPU threads,
 * set by the agent) are scheduled here; everything else stays on the fair class.
 *
 * User space (src/enforce/scx.rs) writes each VM's budget per period (baseline and grant, ns of
 * CPU per period over all its vCPUs) into `budgets`, and which VM each thread belongs to into
 * `tasks`. Here:
 *  - every vCPU thread waits in its VM's DSQ (id = VM index + 1);
 *  - ops.dispatch takes the next thread from the VM that most deserves a CPU: VMs below their
 *    baseline first (the least served in proportion to its baseline first), then VMs below
 *    their grant (split in proportion to grant - baseline); a VM that used its grant is not
 *    dispatched until the next period;
 *  - ops.running/stopping/tick charge the CPU time run to the VM; ops.tick ends the slice of a
 *    thread whose VM ran out of grant, or that is above its baseline while a VM below its own
 *    waits;
 *  - a BPF timer refills every VM each period and kicks idle CPUs, so a held thread waits at
 *    most one period (100 ms), far below the watchdog (timeout_ms = 30 s).
 *
 * No vmlinux.h: the few kernel types used are declared below with CO-RE relocations
 * (preserve_access_index), so field offsets come from the running kernel's BTF at load time.
 * Member names and constants were checked against the BTF of Linux 6.12.117 (the scx-6.12
 * guest kernel); kfuncs use their 6.12 names (scx_bpf_dispatch, scx_bpf_consume).
 */

#include "intf.h"

typedef unsigned char u8;
typedef int s32;
typedef long long s64;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define SEC(name) __attribute__((section(name), used))
#define __ksym __attribute__((section(".ksyms")))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name
#define __always_inline inline __attribute__((always_inline))

/* Map types and flags (uapi linux/bpf.h). */
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_ANY 0
#define CLOCK_MONOTONIC 1

/* Helpers (ids from uapi linux/bpf.h). */
static void *(*const bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static u32 (*const bpf_get_smp_processor_id)(void) = (void *)8;
struct bpf_timer {
	u64 __opaque[2];
} __attribute__((aligned(8)));
static long (*const bpf_timer_init)(struct bpf_timer *timer, void *map, u64 flags) = (void *)169;
static long (*const bpf_timer_set_callback)(struct bpf_timer *timer, void *cb) = (void *)170;
static long (*const bpf_timer_start)(struct bpf_timer *timer, u64 nsecs, u64 flags) = (void *)171;
static long (*const bpf_loop)(u32 nr_loops, void *callback_fn, void *callback_ctx, u64 flags) = (void *)181;

/* Kernel types (CO-RE). */
struct sched_ext_entity {
	u64 slice;
} __attribute__((preserve_access_index));

struct sched_entity {
	u64 sum_exec_runtime;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	struct sched_entity se;
	struct sched_ext_entity scx;
} __attribute__((preserve_access_index));

struct scx_exit_info;

/* 6.12 constants (checked against the kernel's BTF, see the head of this file). */
#define SCX_DSQ_GLOBAL 0x8000000000000001ULL
#define SCX_DSQ_LOCAL 0x8000000000000002ULL
#define SCX_ENQ_LAST (1ULL << 41)
#define SCX_KICK_IDLE 1
#define SCX_OPS_ENQ_LAST 2
#define SCX_OPS_SWITCH_PARTIAL 8

/* 6.12 kfuncs. */
extern s32 scx_bpf_select_cpu_dfl(struct task_struct *p, s32 prev_cpu, u64 wake_flags,
				  bool *is_idle) __ksym;
extern void scx_bpf_dispatch(struct task_struct *p, u64 dsq_id, u64 slice, u64 enq_flags) __ksym;
extern bool scx_bpf_consume(u64 dsq_id) __ksym;
extern s32 scx_bpf_create_dsq(u64 dsq_id, s32 node) __ksym;
extern void scx_bpf_kick_cpu(s32 cpu, u64 flags) __ksym;
extern s32 scx_bpf_dsq_nr_queued(u64 dsq_id) __ksym;
extern s32 scx_bpf_task_cpu(const struct task_struct *p) __ksym;

/* MAX_VMS, MAX_CPUS, NO_VM and struct conf, budget, usage: intf.h. */

struct running {
	u64 since; /* the running thread's se.sum_exec_runtime when last charged */
	u32 vm1; /* the VM running there + 1; 0 when none (the array starts zeroed) */
	u32 pad;
};

struct timer_slot {
	struct bpf_timer timer;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct conf);
} conf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_VMS);
	__type(key, u32);
	__type(value, struct budget);
} budgets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_VMS);
	__type(key, u32);
	__type(value, struct usage);
} usage SEC(".maps");

/* Slots 0 .. nr_vms - 1 may be in use (intf.h): the bound of every loop over the VMs. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, u32);
} nr_vms SEC(".maps");

/* Thread id -> VM index: 16 vCPU threads per VM on average at MAX_VMS. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS * 16);
	__type(key, u32);
	__type(value, u32);
} tasks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CPUS);
	__type(key, u32);
	__type(value, struct running);
} cpus SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct timer_slot);
} refill SEC(".maps");

char _license[] SEC("license") = "GPL";

static __always_inline struct conf *config(void)
{
	u32 zero = 0;
	return bpf_map_lookup_elem(&conf, &zero);
}

static __always_inline u64 slice_ns(void)
{
	struct conf *c = config();
	return c && c->slice_ns ? c->slice_ns : 5000000ULL;
}

/* The slots the loops over the VMs visit: 0 .. slots_in_use() - 1. */
static __always_inline u32 slots_in_use(void)
{
	u32 zero = 0;
	u32 *n = bpf_map_lookup_elem(&nr_vms, &zero);
	if (!n)
		return 0;
	return *n < MAX_VMS ? *n : MAX_VMS;
}

/* The VM of `p`; NO_VM for a thread of no VM, and for one of a slot the loops do not visit
 * (none is, see intf.h: a thread queued there would never be dispatched). */
static __always_inline u32 vm_of(struct task_struct *p)
{
	u32 pid = p->pid;
	u32 *vm = bpf_map_lookup_elem(&tasks, &pid);
	return vm && *vm < slots_in_use() ? *vm : NO_VM;
}

/* Whether VM `vm` may still run this period. */
static __always_inline bool has_budget(u32 vm)
{
	struct budget *b = bpf_map_lookup_elem(&budgets, &vm);
	struct usage *u = bpf_map_lookup_elem(&usage, &vm);
	return b && u && u->used_ns < b->grant_ns;
}

/* Loops over the VMs run as bpf_loop callbacks: the verifier checks a body once, where an
 * open loop over the VMs with branches explodes into too many states. Each runs over the slots
 * in use (slots_in_use(), the highest slot in use + 1: slots are taken lowest-free), so a
 * dispatch costs what the VMs there cost, not MAX_VMS. */
struct below_ctx {
	u32 except;
	bool found;
};

static long below_cb(u64 index, struct below_ctx *c)
{
	u32 i = index;
	struct budget *b = bpf_map_lookup_elem(&budgets, &i);
	struct usage *u = bpf_map_lookup_elem(&usage, &i);
	if (!b || !u || i == c->except || !b->grant_ns)
		return 0;
	if (u->used_ns < b->base_ns && u->used_ns < b->grant_ns &&
	    scx_bpf_dsq_nr_queued(i + 1) > 0) {
		c->found = true;
		return 1;
	}
	return 0;
}

/* Whether some VM other than `except` is below its baseline with a thread waiting. */
static __always_inline bool someone_below_baseline(u32 except)
{
	struct below_ctx c = { .except = except, .found = false };
	bpf_loop(slots_in_use(), below_cb, &c, 0);
	return c.found;
}

/* Charges the CPU time `p` ran on `cpu` since the last charge to its VM. The kernel's own
 * per-thread runtime (se.sum_exec_runtime, updated before ops.tick and ops.stopping) is what
 * /proc/PID/task/TID/schedstat shows and the agent's ledger charges: one clock for all. */
static __always_inline u32 charge(u32 cpu, struct task_struct *p)
{
	struct running *r = bpf_map_lookup_elem(&cpus, &cpu);
	if (!r || !r->vm1)
		return NO_VM;
	u64 now = p->se.sum_exec_runtime;
	u32 vm = r->vm1 - 1;
	u64 delta = now > r->since ? now - r->since : 0;
	r->since = now;
	struct usage *u = bpf_map_lookup_elem(&usage, &vm);
	if (u) {
		__sync_fetch_and_add(&u->used_ns, delta);
		__sync_fetch_and_add(&u->total_ns, delta);
	}
	return vm;
}

SEC("struct_ops/bq_select_cpu")
s32 bq_select_cpu(unsigned long long *ctx)
{
	struct task_struct *p = (void *)ctx[0];
	s32 prev_cpu = ctx[1];
	u64 wake_flags = ctx[2];
	bool idle = false;
	/* An idle CPU at once; the thread still waits in its VM's DSQ, so a VM out of budget
	 * is not run there. */
	return scx_bpf_select_cpu_dfl(p, prev_cpu, wake_flags, &idle);
}

SEC("struct_ops/bq_enqueue")
void bq_enqueue(unsigned long long *ctx)
{
	struct task_struct *p = (void *)ctx[0];
	u64 enq_flags = ctx[1];
	u32 vm = vm_of(p);

	if (vm == NO_VM) {
		/* A SCHED_EXT thread that is not (yet) a known vCPU: plain FIFO. */
		scx_bpf_dispatch(p, SCX_DSQ_GLOBAL, slice_ns(), enq_flags);
		return;
	}
	if (has_budget(vm)) {
		if (enq_flags & SCX_ENQ_LAST) {
			/* Nothing else wants this CPU and the VM may run: keep running. */
			scx_bpf_dispatch(p, SCX_DSQ_LOCAL, slice_ns(), enq_flags);
			return;
		}
		scx_bpf_dispatch(p, vm + 1, slice_ns(), enq_flags);
		scx_bpf_kick_cpu(scx_bpf_task_cpu(p), SCX_KICK_IDLE);
		return;
	}
	/* Out of budget: held in the VM's DSQ until the refill timer kicks the CPUs. */
	struct usage *u = bpf_map_lookup_elem(&usage, &vm);
	if (u)
		__sync_fetch_and_add(&u->held, 1);
	scx_bpf_dispatch(p, vm + 1, slice_ns(), enq_flags);
}

struct pick_ctx {
	/* The VMs whose DSQ was found empty when consumed (NO_VM: none): two, as the third and
	 * last try records none. */
	u32 tried0;
	u32 tried1;
	u32 best;
	u32 best_tier;
	u64 best_key;
};

/* Rates VM `index` for dispatch: VMs below their baseline first (tier 0, the least served in
 * proportion to its baseline first), then VMs below their grant (tier 1, in proportion to
 * grant - baseline: the spare is split by what the grant adds to the baseline). */
static long pick_cb(u64 index, struct pick_ctx *c)
{
	u32 i = index;
	struct budget *b = bpf_map_lookup_elem(&budgets, &i);
	struct usage *u = bpf_map_lookup_elem(&usage, &i);
	if (!b || !u || !b->grant_ns || u->used_ns >= b->grant_ns)
		return 0;
	if (i == c->tried0 || i == c->tried1)
		return 0;
	if (scx_bpf_dsq_nr_queued(i + 1) <= 0)
		return 0;
	u32 tier;
	u64 key;
	/* Keys in parts per 2^20 of the budget, so VMs of any size compare. */
	if (u->used_ns < b->base_ns) {
		tier = 0;
		key = (u->used_ns << 20) / b->base_ns;
	} else {
		u64 spare = b->grant_ns - b->base_ns;
		tier = 1;
		key = spare ? ((u->used_ns - b->base_ns) << 20) / spare : ~0ULL - 1;
	}
	if (tier < c->best_tier || (tier == c->best_tier && key < c->best_key)) {
		c->best = i;
		c->best_tier = tier;
		c->best_key = key;
	}
	return 0;
}

SEC("struct_ops/bq_dispatch")
void bq_dispatch(unsigned long long *ctx)
{
	struct pick_ctx c = { .tried0 = NO_VM, .tried1 = NO_VM };
	u32 n = slots_in_use();
	/* Up to three tries: a DSQ seen non-empty may be emptied by another CPU meanwhile. */
	for (int attempt = 0; attempt < 3; attempt++) {
		c.best = NO_VM;
		c.best_tier = 2;
		c.best_key = ~0ULL;
		bpf_loop(n, pick_cb, &c, 0);
		if (c.best >= MAX_VMS)
			return;
		if (scx_bpf_consume(c.best + 1))
			return;
		if (attempt == 0)
			c.tried0 = c.best;
		else
			c.tried1 = c.best;
	}
}

SEC("struct_ops/bq_running")
void bq_running(unsigned long long *ctx)
{
	struct task_struct *p = (void *)ctx[0];
	u32 cpu = bpf_get_smp_processor_id();
	struct running *r = bpf_map_lookup_elem(&cpus, &cpu);
	if (!r)
		return;
	r->since = p->se.sum_exec_runtime;
	u32 vm = vm_of(p);
	r->vm1 = vm == NO_VM ? 0 : vm + 1;
}

SEC("struct_ops/bq_stopping")
void bq_stopping(unsigned long long *ctx)
{
	struct task_struct *p = (void *)ctx[0];
	u32 cpu = bpf_get_smp_processor_id();
	charge(cpu, p);
	struct running *r = bpf_map_lookup_elem(&cpus, &cpu);
	if (r)
		r->vm1 = 0;
}

SEC("struct_ops/bq_tick")
void bq_tick(unsigned long long *ctx)
{
	struct task_struct *p = (void *)ctx[0];
	u32 vm = charge(bpf_get_smp_processor_id(), p);
	if (vm == NO_VM)
		return;
	struct budget *b = bpf_map_lookup_elem(&budgets, &vm);
	struct usage *u = bpf_map_lookup_elem(&usage, &vm);
	if (!b || !u)
		return;
	if (u->used_ns >= b->grant_ns || (u->used_ns >= b->base_ns && someone_below_baseline(vm)))
		p->scx.slice = 0;
}

static long refill_vm_cb(u64 index, void *unused)
{
	u32 i = index;
	struct budget *b = bpf_map_lookup_elem(&budgets, &i);
	struct usage *u = bpf_map_lookup_elem(&usage, &i);
	if (!b || !u)
		return 0;
	/* Overshoot (a tick, or longer when the CPU itself stalled, as a vCPU of an emulated
	 * host does) is carried into the next periods, up to ten periods' grant: a VM is held
	 * at most a second, far below the watchdog. */
	u64 used = u->used_ns;
	u64 over = used > b->grant_ns ? used - b->grant_ns : 0;
	u->used_ns = over > 10 * b->grant_ns ? 10 * b->grant_ns : over;
	return 0;
}

static long kick_cb(u64 index, void *unused)
{
	scx_bpf_kick_cpu((s32)index, SCX_KICK_IDLE);
	return 0;
}

static int refill_cb(void *map, int *key, struct timer_slot *slot)
{
	struct conf *c = config();
	if (!c)
		return 0;
	bpf_loop(slots_in_use(), refill_vm_cb, NULL, 0);
	u32 n = c->nr_cpus;
	if (n > MAX_CPUS)
		n = MAX_CPUS;
	bpf_loop(n, kick_cb, NULL, 0);
	bpf_timer_start(&slot->timer, c->period_ns, 0);
	return 0;
}

static long create_cb(u64 index, s32 *err)
{
	*err = scx_bpf_create_dsq(index + 1, -1);
	return *err ? 1 : 0;
}

SEC("struct_ops.s/bq_init")
s32 bq_init(unsigned long long *ctx)
{
	s32 err = 0;
	bpf_loop(MAX_VMS, create_cb, &err, 0);
	if (err)
		return err;
	struct conf *c = config();
	if (!c || !c->period_ns)
		return -22;
	u32 zero = 0;
	struct timer_slot *slot = bpf_map_lookup_elem(&refill, &zero);
	if (!slot)
		return -2;
	bpf_timer_init(&slot->timer, &refill, CLOCK_MONOTONIC);
	bpf_timer_set_callback(&slot->timer, refill_cb);
	bpf_timer_start(&slot->timer, c->period_ns, 0);
	return 0;
}

SEC("struct_ops/bq_exit")
void bq_exit(unsigned long long *ctx)
{
}

/* Only the members used; libbpf matches them by name against the kernel's sched_ext_ops. */
struct sched_ext_ops {
	s32 (*select_cpu)(struct task_struct *, s32, u64);
	void (*enqueue)(struct task_struct *, u64);
	void (*dispatch)(s32, struct task_struct *);
	void (*tick)(struct task_struct *);
	void (*running)(struct task_struct *);
	void (*stopping)(struct task_struct *, bool);
	s32 (*init)(void);
	void (*exit)(struct scx_exit_info *);
	u64 flags;
	u32 timeout_ms;
	char name[128];
};

SEC(".struct_ops.link")
struct sched_ext_ops burst_ops = {
	.select_cpu = (void *)bq_select_cpu,
	.enqueue = (void *)bq_enqueue,
	.dispatch = (void *)bq_dispatch,
	.tick = (void *)bq_tick,
	.running = (void *)bq_running,
	.stopping = (void *)bq_stopping,
	.init = (void *)bq_init,
	.exit = (void *)bq_exit,
	.flags = SCX_OPS_SWITCH_PARTIAL | SCX_OPS_ENQ_LAST,
	/* The watchdog's limit: TCG guests run slowly; a held thread waits one period. */
	.timeout_ms = 30000,
	.name = "burst_qemu",
};
