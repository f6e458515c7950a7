/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The order among VMs in bpf/burst.bpf.c's BPF dispatch: the slots in use, the pace at which a
 * VM is owed its baseline, the set of VMs with a thread ready and its walk, and each VM's claim
 * (tier and key) with the comparison that dispatch, tick preemption and the model
 * (src/enforce/scx/dispatch_model.rs, kept in step) share. Included by burst.bpf.c after its
 * maps, which these helpers read.
 */

/* The slots the loops over the VMs visit: 0 .. slots_in_use() - 1. */
static __always_inline u32 slots_in_use(void)
{
	u32 zero = 0;
	u32 *n = bpf_map_lookup_elem(&nr_vms, &zero);
	if (!n)
		return 0;
	return *n < MAX_VMS ? *n : MAX_VMS;
}

/* The baseline a VM is owed by now: its period's baseline in proportion to the part of the
 * period gone since the last refill (all of it once the period is over). VMs are served below
 * their baseline, and ordered above it, by this pace rather than by the whole period's
 * baseline: with the whole baseline, a VM of a large baseline and many threads ran first after
 * each refill until it had used it, and a VM of few threads beside it could then use no more
 * than its threads for what was left of the period (the conformance test's 2-vCPU VM on 4 CPUs
 * got 145 % of a CPU for a plan of 190 %, src/conformance.rs). */
struct pace {
	u64 elapsed;
	u64 period;
};

static __always_inline struct pace pace_now(void)
{
	u32 zero = 0;
	struct timer_slot *slot = bpf_map_lookup_elem(&refill, &zero);
	struct conf *c = config();
	struct pace p = { .elapsed = 1, .period = 1 };
	if (!slot || !c || !c->period_ns)
		return p;
	u64 elapsed = bpf_ktime_get_ns() - slot->period_start;
	p.period = c->period_ns;
	p.elapsed = elapsed < p.period ? elapsed : p.period;
	return p;
}

/* `base_ns` at `p` (no overflow: a baseline is at most MAX_CPUS periods, 2.6e10 ns of 100 ms
 * periods, times at most a period, 1e8 ns). */
static __always_inline u64 paced(u64 base_ns, struct pace p)
{
	return base_ns * p.elapsed / p.period;
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

#define READ_ONCE_U64(x) (*(volatile u64 *)&(x))

/* Marks VM `vm` ready (the protocol: above `ready`). */
static __always_inline void set_ready(u32 vm)
{
	u32 w = vm / 64;
	u64 *word = bpf_map_lookup_elem(&ready, &w);
	if (word)
		__sync_fetch_and_or(word, 1ULL << (vm % 64));
}

/* Whether VM `vm`'s DSQ has a thread; when it has none, clears the VM's ready bit by the
 * protocol above `ready` (count, length; clear; length, count: set again if either moved). */
static __always_inline bool has_queued(u32 vm)
{
	u64 *seq = bpf_map_lookup_elem(&enqueued, &vm);
	u32 w = vm / 64;
	u64 *word = bpf_map_lookup_elem(&ready, &w);
	if (!seq || !word)
		return scx_bpf_dsq_nr_queued(vm + 1) > 0;
	u64 count = READ_ONCE_U64(*seq);
	if (scx_bpf_dsq_nr_queued(vm + 1) > 0)
		return true;
	u64 bit = 1ULL << (vm % 64);
	__sync_fetch_and_and(word, ~bit);
	if (scx_bpf_dsq_nr_queued(vm + 1) > 0) {
		__sync_fetch_and_or(word, bit);
		return true;
	}
	if (READ_ONCE_U64(*seq) != count)
		__sync_fetch_and_or(word, bit); /* its thread is on its way: seen at a later look */
	return false;
}

/* One bit of a single-valued `b`: its index (0 .. 63). */
static __always_inline u32 bit_index(u64 b)
{
	u32 k = 0;
	if (b & 0xffffffff00000000ULL)
		k += 32;
	if (b & 0xffff0000ffff0000ULL)
		k += 16;
	if (b & 0xff00ff00ff00ff00ULL)
		k += 8;
	if (b & 0xf0f0f0f0f0f0f0f0ULL)
		k += 4;
	if (b & 0xccccccccccccccccULL)
		k += 2;
	if (b & 0xaaaaaaaaaaaaaaaaULL)
		k += 1;
	return k;
}

/* A walk over the set bits of `ready` below slot `n`, lowest first, one step per call of
 * walk_next(): a step visits one set bit or loads the next word, so a walk takes at most
 * n + READY_WORDS steps (the bpf_loop bound of its callers) and costs what the ready VMs and
 * the words up to slot n cost, whatever the idle VMs. */
struct walk {
	u32 n;	  /* slots in use: bits from n up are not visited */
	u32 word; /* the word `bits` was read from */
	u64 bits; /* its set bits not visited yet */
};

#define WALK_NEXT_WORD (NO_VM - 1) /* walk_next(): a word loaded, no VM this step */

static __always_inline void walk_start(struct walk *w, u32 n)
{
	u32 zero = 0;
	u64 *word = bpf_map_lookup_elem(&ready, &zero);
	w->n = n;
	w->word = 0;
	w->bits = word && n ? READ_ONCE_U64(*word) : 0;
}

/* The next VM of a set bit; WALK_NEXT_WORD after loading the next word; NO_VM at the end. */
static __always_inline u32 walk_next(struct walk *w)
{
	if (!w->bits) {
		u32 next = w->word + 1;
		if (next >= READY_WORDS || next * 64 >= w->n)
			return NO_VM;
		u64 *word = bpf_map_lookup_elem(&ready, &next);
		w->word = next;
		w->bits = word ? READ_ONCE_U64(*word) : 0;
		return WALK_NEXT_WORD;
	}
	u64 low = w->bits & -w->bits;
	w->bits &= ~low;
	u32 i = w->word * 64 + bit_index(low);
	return i < w->n ? i : NO_VM;
}

/* Loops over the VMs run as bpf_loop callbacks: the verifier checks a body once, where an
 * open loop over the VMs with branches explodes into too many states. The refill runs over the
 * slots in use (slots_in_use(), the highest slot in use + 1: slots are taken lowest-free);
 * dispatch and tick walk the ready bits of those slots only. */
/* A VM's claim to the next CPU, lower first: VMs behind their baseline's pace (tier 0, the
 * least served in proportion to its baseline first), then VMs below their grant (tier 1, the
 * least served above that pace in proportion to its weight; a VM of weight 0 last). Keys in
 * parts per 2^20 of the budget, so VMs of any size compare. For a VM below its grant. */
struct claim {
	u32 tier;
	u64 key;
};

static __always_inline struct claim claim_of(struct budget *b, struct usage *u, struct pace pace)
{
	struct claim c;
	u64 owed = paced(b->base_ns, pace);
	if (u->used_ns < owed) {
		c.tier = 0;
		c.key = (u->used_ns << 20) / b->base_ns;
	} else {
		c.tier = 1;
		c.key = b->weight ? ((u->used_ns - owed) << 20) / b->weight : ~0ULL - 1;
	}
	return c;
}

static __always_inline bool before(struct claim a, struct claim b)
{
	return a.tier < b.tier || (a.tier == b.tier && a.key < b.key);
}

struct before_ctx {
	struct walk walk;
	struct pace pace;
	struct claim mine;
	u32 except;
	bool found;
};

static long before_cb(u64 index, struct before_ctx *c)
{
	u32 i = walk_next(&c->walk);
	if (i == NO_VM)
		return 1;
	if (i == WALK_NEXT_WORD || i == c->except)
		return 0;
	struct budget *b = bpf_map_lookup_elem(&budgets, &i);
	struct usage *u = bpf_map_lookup_elem(&usage, &i);
	if (!b || !u || !b->grant_ns || u->used_ns >= b->grant_ns)
		return 0;
	if (before(claim_of(b, u, c->pace), c->mine) && has_queued(i)) {
		c->found = true;
		return 1;
	}
	return 0;
}

/* Whether some VM other than `except` has a thread waiting and a better claim than `mine`. A
 * VM whose bit was lost (above `ready`) is not seen until the refill sets it again: its thread
 * waits at most that period, and this thread runs on meanwhile, within its VM's grant. */
static __always_inline bool someone_before(u32 except, struct claim mine, struct pace pace)
{
	struct before_ctx c = { .pace = pace, .mine = mine, .except = except, .found = false };
	u32 n = slots_in_use();
	walk_start(&c.walk, n);
	bpf_loop(n + READY_WORDS, before_cb, &c, 0);
	return c.found;
}
