/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The interface between burst-qemu's sched_ext program (bpf/burst.bpf.c) and user space: the
 * constants and the values of the maps the scheduler process (src/enforce/scx/loader.rs)
 * reads and writes. Mirrored once in Rust, `repr(C)`, in src/enforce/scx/abi.rs; build.rs
 * (feature scx) compiles this header with the host's C compiler, measures every size, offset
 * and constant below and makes the Rust build fail when abi.rs disagrees, and checks with
 * clang -target bpf that the BPF side lays them out the same.
 *
 * Self-contained: the types are spelled out so that a host program can include it alone.
 */
#ifndef BURST_QEMU_INTF_H
#define BURST_QEMU_INTF_H

typedef unsigned int u32;
typedef unsigned long long u64;

/* The most VMs one scheduler holds (DSQ ids 1 .. MAX_VMS, the budgets and usage maps). The
 * program's loops over the VMs run to `nr_vms` (below), not to MAX_VMS. */
#define MAX_VMS 1024
/* The most CPUs the per-CPU state covers. */
#define MAX_CPUS 256
/* The `tasks` map's answer for a thread of no VM. */
#define NO_VM 0xffffffffu

/* `conf` (one entry): written once by the scheduler process before it enables the program. */
struct conf {
	u64 period_ns; /* budget period */
	u64 slice_ns;  /* the longest a thread runs before dispatch decides again */
	u32 nr_cpus;   /* CPUs the timer kicks: 0 .. nr_cpus - 1 */
	u32 user_dispatch; /* 1: the scheduler process decides every dispatch (below) */
};

/* `budgets` (MAX_VMS entries, by VM index): written by the scheduler process. */
struct budget {
	u64 base_ns;  /* baseline, ns of CPU per period (all vCPUs) */
	u64 grant_ns; /* grant, ns of CPU per period; 0 = the VM slot is unused */
	u64 weight;   /* weight for the spare: the planner's target above the baseline, ns per
		       * period (only ratios matter; 0 = served last) */
};

/* `usage` (MAX_VMS entries, by VM index): written by the program, read for the stats. */
struct usage {
	u64 used_ns;  /* charged this period (carries at most one period of overshoot) */
	u64 total_ns; /* charged since load */
	u64 held;     /* times a thread was held back for want of budget */
};

/* `tasks` maps a thread id (u32) to its VM index (u32, < MAX_VMS). */

/* `nr_vms` (one u32): every slot in use is below it; written by the scheduler process as the
 * highest slot in use + 1, raised before the new VM's threads enter `tasks` and lowered after a
 * freed slot's threads left it. The program loops over slots 0 .. nr_vms - 1 only, and treats a
 * thread of a slot at or above it as of no VM. */

/*
 * The user-space dispatch mode (conf.user_dispatch = 1): a VM's runnable thread is not queued
 * by the program but held for the scheduler process, which is told of every change on the
 * `events` ring buffer and orders each dispatch with the `bq_order` syscall program.
 */

/* `events` (a BPF ring buffer), one record per change of a VM's thread. */
#define EV_WAKE 1    /* ops.enqueue: runnable and waiting for an order */
#define EV_RUNNING 2 /* ops.running: on `cpu` */
#define EV_STOP 3    /* ops.stopping: off `cpu`, still runnable */
#define EV_BLOCK 4   /* ops.stopping: off `cpu`, blocked */
#define EV_FAILED 5  /* an order to run it found it not waiting (it ran, left or is gone), or
		      * not allowed on `cpu`; or a dispatch an order made was undone before the
		      * run (the thread is held again). An EV_WAKE follows when it is held. */
#define EV_PAUSE 6   /* ops.stopping: a higher class took `cpu`; it goes on there after */

struct event {
	u64 at;	  /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	u32 tid;
	u32 cpu;
	u32 kind; /* EV_* */
	u32 pad;
};

/* `enq_at` (a hash map, tid -> u64): a VM's thread enqueued and not yet running -> when (ns,
 * bits 2 and up), whether its wait is counted in `latency` (ENQ_COUNTED: with budget; every
 * one in the user-space mode) and, in the user-space mode, whether an order took it already
 * (ENQ_TAKEN). In the user-space mode, present without ENQ_TAKEN = held for an order: the
 * scheduler process reads it for threads whose reports were lost. */
#define ENQ_COUNTED 1ULL
#define ENQ_TAKEN 2ULL
#define ENQ_FLAGS 3ULL

/* `plans` (an array, one per CPU; user-space mode): the thread ordered to run there next
 * (`next`, taken by the CPU's ops.dispatch) and until when, and the thread ordered there last
 * (`cur`) with the end of its slice, which ops.tick keeps. The scheduler process reads `next`
 * and `cur` to say where a thread it finds held was ordered. */
struct plan {
	u64 next; /* tid, 0 = none */
	u64 next_until;
	u64 next_hard; /* ORDER_HARD given with `next` */
	u64 next_at;   /* when `next` was decided: its slice is next_until - next_at */
	u64 cur; /* tid */
	u64 cur_until;
	u64 cur_hard;
};

/* The context of `bq_order` (BPF_PROG_RUN): what the scheduler process orders for a CPU. */
#define ORDER_RUN 1	/* run `tid` on `cpu` until `until` */
#define ORDER_EXTEND 2	/* the thread on `cpu` runs on until `until` */
#define ORDER_PREEMPT 3 /* take the thread off `cpu` and leave it idle */
/* Or'ed into ORDER_RUN or ORDER_EXTEND: `until` is a hard end (the VM's budget ends there),
 * which the CPU's tick keeps to the tick; without it the end is the policy's next look (a
 * turn among threads), and the tick only ends the slice one slice_ns after it, should the
 * process not have ordered anything by then. */
#define ORDER_HARD 0x100
/* Or'ed into ORDER_RUN or ORDER_PREEMPT, decided ahead of the end of the slice running on
 * `cpu`: that slice ends at its own end, as a hard one (the tick), and then the CPU takes the
 * thread ordered (or none), without a kick. On a CPU running nothing ordered, at once. */
#define ORDER_DEFER 0x200

struct order {
	u64 until;    /* CLOCK_MONOTONIC ns */
	u32 op;	      /* ORDER_* */
	u32 cpu;
	u32 tid;      /* ORDER_RUN; ORDER_EXTEND: only if it is the thread ordered there */
	u32 replaced; /* out: the thread of an earlier ORDER_RUN the CPU had not taken yet, or 0 */
	u64 from;     /* ORDER_RUN: when it was decided; the slice is until - from, from its start */
};

/* `latency` (one entry): how long a VM's runnable thread with budget waited to run, in both
 * modes (ops.enqueue to ops.running: a wake-up, or the end of a slice), and how many times a
 * VM's thread was put on a CPU. hist[i] counts waits of [2^i, 2^(i+1)) microseconds (hist[0]
 * also those below 1). */
#define LAT_BUCKETS 24

struct latency {
	u64 waits;
	u64 sum_ns;
	u64 max_ns;
	u64 runs;
	u64 hist[LAT_BUCKETS];
};

#endif
