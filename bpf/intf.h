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
	u32 pad;
};

/* `budgets` (MAX_VMS entries, by VM index): written by the scheduler process. */
struct budget {
	u64 base_ns;  /* baseline, ns of CPU per period (all vCPUs) */
	u64 grant_ns; /* grant, ns of CPU per period; 0 = the VM slot is unused */
	u64 weight;   /* the planner's weight for the spare (only ratios matter; 0 = served last) */
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

#endif
