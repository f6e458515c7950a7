//! The vCPU pinning balancer's planner: from each vCPU's demand and where it runs now, a new
//! set of pins, only when one is needed and worth it. Pure: no I/O, no clock.
//!
//! # What is balanced
//!
//! The *load* of a physical CPU is the sum of the demands of the vCPUs placed on it, in CPUs
//! (not capped at 1: two spinning vCPUs on one CPU load it 2.0, which is what tells the planner
//! that moving one helps). The fleet is **balanced** when the standard deviation σ of the loads
//! over the managed CPUs is at most [`Params::threshold`] (5 %) of their mean, or at most
//! [`Params::floor`] CPUs (an idle fleet's few per cent of noise is not worth a move). Loads
//! balanced by demand are balanced by use too: a CPU's use is its load capped at 1.
//!
//! # How a vCPU's demand is read (the caller's job; [`vm_demands`] does the arithmetic)
//!
//! Measured run time under-states demand on a shared CPU (eight spinners on one CPU each
//! *measure* 12.5 %): the agent adds the thread's run-queue wait (`schedstat` field 2), time it
//! was runnable but not running, so a spinner reads 100 % wherever it is. A vCPU held to its
//! credit grant (cgroup throttling) cannot use more than the grant, however long it waits:
//! its demand is **capped by its VM's grant**, shared by the VM's vCPUs in proportion to what
//! each asked for. A throttled VM therefore loads its CPUs with what it may run, not with what
//! it would like. (Not by the contention stage's allocation: that is recomputed every second
//! from how much the VMs wait, which is what the pins change, and capping by it fed the
//! balancer's own moves back into its readings: in a 4-CPU guest the light VMs' allocations
//! swung between 14 and 65 % and the plans with them.)
//!
//! # When a plan is made (stability)
//!
//! - Never while balanced and every vCPU is pinned to a CPU it may use.
//! - A vCPU that floats (its affinity is not one CPU) or is pinned outside its allowed CPUs is
//!   always (re)pinned: the balancer owns the placement of the vCPUs it manages.
//! - Otherwise a plan is applied only if it lowers σ by [`Params::margin`] CPUs *and* by
//!   [`Params::min_gain`] of the current σ. Exchanging two vCPUs of equal load never does, so
//!   equal loads do not ping-pong, and measurement noise smaller than the margin does not move
//!   anything.
//! - Candidate plans start from the current pins (a local search of single moves and pair
//!   swaps) and from scratch (longest-processing-time first, ties to the vCPU's current CPU);
//!   the lowest σ wins, and among plans within [`Params::tie`] CPUs of it, the one that moves
//!   fewest vCPUs. Keeping a vCPU where it is always wins a tie.
//!
//! It works for any number of vCPUs and CPUs: with fewer vCPUs than CPUs the best plan leaves
//! CPUs idle (and σ is then as low as it can be, which the gain rule recognises: no change).

/// Where a vCPU runs now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Its affinity is exactly this CPU.
    Pinned(u32),
    /// Its affinity allows several CPUs; it last ran on `last`.
    Floating {
        /// The CPU it last ran on (`/proc/PID/task/TID/stat` field 39).
        last: u32,
    },
}

impl Placement {
    /// The CPU its load is counted on now.
    pub fn cpu(self) -> u32 {
        match self {
            Placement::Pinned(c) | Placement::Floating { last: c } => c,
        }
    }
}

/// One vCPU as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Vcpu {
    /// Estimated demand, in CPUs (0 ..= 1).
    pub demand: f64,
    /// Where it runs now.
    pub now: Placement,
    /// The CPUs it may be pinned to (its VM's `cpus`); empty: every managed CPU.
    pub allowed: Vec<u32>,
}

/// The planner's thresholds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Balanced when σ ≤ threshold × mean (0.05: the published criterion).
    pub threshold: f64,
    /// … or when σ ≤ floor, in CPUs (an idle fleet is balanced).
    pub floor: f64,
    /// A plan must lower σ by at least this many CPUs …
    pub margin: f64,
    /// … and by at least this fraction of the current σ.
    pub min_gain: f64,
    /// Plans whose σ differ by less than this (CPUs) are equal: the fewer moves wins.
    pub tie: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            threshold: 0.05,
            floor: 0.02,
            margin: 0.02,
            min_gain: 0.2,
            tie: 0.005,
        }
    }
}

/// Mean and standard deviation (population) of per-CPU loads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// Mean load, CPUs.
    pub mean: f64,
    /// Standard deviation, CPUs.
    pub sigma: f64,
}

impl Spread {
    /// Of `loads`.
    pub fn of(loads: &[f64]) -> Spread {
        if loads.is_empty() {
            return Spread {
                mean: 0.0,
                sigma: 0.0,
            };
        }
        let n = loads.len() as f64;
        let mean = loads.iter().sum::<f64>() / n;
        let var = loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n;
        Spread {
            mean,
            sigma: var.sqrt(),
        }
    }
    /// σ as a fraction of the mean (0 for an empty or idle set).
    pub fn relative(&self) -> f64 {
        if self.mean > 0.0 {
            self.sigma / self.mean
        } else {
            0.0
        }
    }
    /// Whether this spread is balanced under `p`.
    pub fn balanced(&self, p: &Params) -> bool {
        self.sigma <= (p.threshold * self.mean).max(p.floor)
    }
}

/// A new placement: one CPU per vCPU, in the input's order.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The CPU each vCPU is to be pinned to.
    pub pins: Vec<u32>,
    /// How many vCPUs change CPU or go from floating to pinned.
    pub changes: usize,
    /// The loads now.
    pub before: Spread,
    /// The loads under the plan (with the same demands).
    pub after: Spread,
    /// Whether it had to be made (a vCPU floated or was pinned outside its CPUs), rather
    /// than chosen for a better balance.
    pub forced: bool,
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Nothing to do; the current spread.
    Keep(Spread),
    /// Pin as planned.
    Apply(Plan),
}

/// The confirmation rule between intervals: a plan chosen for a better balance (not a forced
/// one) is let through only when the interval before also produced one, so a single noisy
/// interval (a neighbour's burst, a VM starting) never moves anything.
#[derive(Clone, Debug, Default)]
pub struct Confirm {
    pending: bool,
}

impl Confirm {
    /// This interval's decision, after the rule.
    pub fn admit(&mut self, decision: Decision) -> Decision {
        match decision {
            Decision::Apply(plan) if !plan.forced && !self.pending => {
                self.pending = true;
                Decision::Keep(plan.before)
            }
            other => {
                self.pending = false;
                other
            }
        }
    }
}

/// The per-CPU loads of `cpus` when vCPU `i` is on `at[i]` (a CPU outside `cpus` adds nothing).
pub fn loads(cpus: &[u32], demands: &[f64], at: &[u32]) -> Vec<f64> {
    let mut l = vec![0.0; cpus.len()];
    for (d, c) in demands.iter().zip(at) {
        if let Some(i) = cpus.iter().position(|x| x == c) {
            l[i] += d;
        }
    }
    l
}

/// The demands of one VM's vCPUs: `raw[i]` = (run + run-queue wait) / interval of vCPU `i`,
/// each capped at one CPU, then, when they add up to more than the VM's cap (`cap_cpus`: its
/// grant or allocation, in CPUs), scaled down in proportion so that they add up to the cap.
pub fn vm_demands(raw: &[f64], cap_cpus: f64) -> Vec<f64> {
    let clipped: Vec<f64> = raw
        .iter()
        .map(|d| {
            if d.is_finite() {
                d.clamp(0.0, 1.0)
            } else {
                0.0
            }
        })
        .collect();
    let sum: f64 = clipped.iter().sum();
    let cap = if cap_cpus.is_finite() {
        cap_cpus.max(0.0)
    } else {
        sum
    };
    if sum > cap && sum > 0.0 {
        clipped.iter().map(|d| d * cap / sum).collect()
    } else {
        clipped
    }
}

/// Plans the pins of `vcpus` over the managed `cpus` (distinct CPU numbers, non-empty).
///
/// The plan is a fixed point: planning again from it, with the same demands, keeps it, and so
/// it does with demands a little off. (The candidates depend on the current pins through the
/// tie-breaks, so a plan is re-planned from until nothing better by *half* the margin is
/// found, which leaves the other half for measurement noise; each round lowers σ by at least
/// that, so this ends, in practice after one round.)
pub fn plan(cpus: &[u32], vcpus: &[Vcpu], p: &Params) -> Decision {
    let mut first = match plan_once(cpus, vcpus, p) {
        Decision::Apply(plan) => plan,
        keep => return keep,
    };
    let half = Params {
        margin: p.margin / 2.0,
        min_gain: p.min_gain / 2.0,
        ..*p
    };
    for _ in 0..16 {
        let from: Vec<Vcpu> = vcpus
            .iter()
            .zip(&first.pins)
            .map(|(v, &c)| Vcpu {
                now: Placement::Pinned(c),
                ..v.clone()
            })
            .collect();
        match plan_once(cpus, &from, &half) {
            Decision::Apply(better) => {
                first.pins = better.pins;
                first.after = better.after;
            }
            Decision::Keep(_) => break,
        }
    }
    first.changes = vcpus
        .iter()
        .zip(&first.pins)
        .filter(|(v, c)| v.now != Placement::Pinned(**c))
        .count();
    if first.changes == 0 {
        return Decision::Keep(first.before);
    }
    Decision::Apply(first)
}

/// Each vCPU's demand (0..=1, garbage as 0) and the CPUs it may use among `cpus` (all of
/// them when its own list has none of them).
fn inputs(cpus: &[u32], vcpus: &[Vcpu]) -> (Vec<f64>, Vec<Vec<u32>>) {
    let demands: Vec<f64> = vcpus
        .iter()
        .map(|v| {
            if v.demand.is_finite() {
                v.demand.clamp(0.0, 1.0)
            } else {
                0.0
            }
        })
        .collect();
    let allowed: Vec<Vec<u32>> = vcpus
        .iter()
        .map(|v| {
            let a: Vec<u32> = v
                .allowed
                .iter()
                .copied()
                .filter(|c| cpus.contains(c))
                .collect();
            if a.is_empty() {
                cpus.to_vec()
            } else {
                a
            }
        })
        .collect();
    (demands, allowed)
}

// One planning pass read top to bottom (place, improve, compare, decide) over the same
// locals; its steps are already the `Problem` methods, and what is left is their order.
fn plan_once(cpus: &[u32], vcpus: &[Vcpu], p: &Params) -> Decision {
    let (demands, allowed) = inputs(cpus, vcpus);
    let now: Vec<u32> = vcpus.iter().map(|v| v.now.cpu()).collect();
    let before = Spread::of(&loads(cpus, &demands, &now));
    if cpus.is_empty() || vcpus.is_empty() {
        return Decision::Keep(before);
    }
    // A vCPU must be (re)pinned when it floats or sits outside what it may use.
    let forced = vcpus
        .iter()
        .zip(&allowed)
        .any(|(v, a)| !matches!(v.now, Placement::Pinned(c) if a.contains(&c)));
    if !forced && before.balanced(p) {
        return Decision::Keep(before);
    }

    let problem = Problem::new(cpus, &demands, &allowed, &now);
    let score = |at: &[u32]| {
        let s = Spread::of(&loads(cpus, &demands, at));
        let moves = vcpus
            .iter()
            .zip(at)
            .filter(|(v, c)| v.now != Placement::Pinned(**c))
            .count();
        (s, moves)
    };
    // Candidate 1: the current placement, repaired, then improved by moves and swaps.
    let mut local: Vec<u32> = now
        .iter()
        .zip(&allowed)
        .map(|(c, a)| if a.contains(c) { *c } else { u32::MAX })
        .collect();
    problem.place_missing(&mut local);
    problem.improve(&mut local);
    // Candidate 2: from scratch, heaviest first, each to the least-loaded CPU it may use;
    // candidate 3 the same with the vCPUs that may use fewest CPUs first (CPU lists).
    let mut fresh = vec![u32::MAX; vcpus.len()];
    problem.place_missing(&mut fresh);
    problem.improve(&mut fresh);
    let (fs0, fm0) = score(&fresh);
    if allowed.iter().any(|a| a.len() < cpus.len()) {
        let mut constrained = vec![u32::MAX; vcpus.len()];
        problem.place_constrained_first(&mut constrained);
        problem.improve(&mut constrained);
        let (cs, cm) = score(&constrained);
        if cs.sigma < fs0.sigma - p.tie || (cs.sigma <= fs0.sigma + p.tie && cm < fm0) {
            fresh = constrained;
        }
    }

    let (ls, lm) = score(&local);
    let (fs, fm) = score(&fresh);
    let take_fresh = fs.sigma < ls.sigma - p.tie || (fs.sigma <= ls.sigma + p.tie && fm < lm);
    let (pins, after, changes) = if take_fresh {
        (fresh, fs, fm)
    } else {
        (local, ls, lm)
    };
    if changes == 0 {
        return Decision::Keep(before);
    }
    let gain = before.sigma - after.sigma;
    let worth = gain >= p.margin && gain >= p.min_gain * before.sigma;
    if forced || worth {
        Decision::Apply(Plan {
            pins,
            changes,
            before,
            after,
            forced,
        })
    } else {
        Decision::Keep(before)
    }
}

struct Problem<'a> {
    cpus: &'a [u32],
    demands: &'a [f64],
    allowed: &'a [Vec<u32>],
    now: &'a [u32],
    /// `slot[c]`: the index in `cpus` of CPU number `c` (`usize::MAX`: not managed).
    slot: Vec<usize>,
    /// `may[i × cpus + k]`: whether vCPU `i` may use the CPU at index `k`.
    may: Vec<bool>,
}

impl<'a> Problem<'a> {
    fn new(cpus: &'a [u32], demands: &'a [f64], allowed: &'a [Vec<u32>], now: &'a [u32]) -> Self {
        let top = cpus.iter().copied().max().map_or(0, |c| c as usize + 1);
        let mut slot = vec![usize::MAX; top];
        for (i, &c) in cpus.iter().enumerate() {
            slot[c as usize] = i;
        }
        let mut may = vec![false; allowed.len() * cpus.len()];
        for (i, list) in allowed.iter().enumerate() {
            for &c in list {
                if let Some(&k) = slot.get(c as usize).filter(|&&k| k != usize::MAX) {
                    may[i * cpus.len() + k] = true;
                }
            }
        }
        Problem {
            cpus,
            demands,
            allowed,
            now,
            slot,
            may,
        }
    }

    fn index(&self, cpu: u32) -> usize {
        let i = self.slot.get(cpu as usize).copied().unwrap_or(usize::MAX);
        assert!(i != usize::MAX, "only managed CPUs are placed");
        i
    }

    fn loads(&self, at: &[u32]) -> Vec<f64> {
        let mut l = vec![0.0; self.cpus.len()];
        for (i, &c) in at.iter().enumerate() {
            if c != u32::MAX {
                l[self.index(c)] += self.demands[i];
            }
        }
        l
    }

    /// Places every vCPU at `u32::MAX`: heaviest first (ties by input order), on the least
    /// loaded CPU it may use; ties go to its current CPU, then to the lowest-numbered.
    fn place_missing(&self, at: &mut [u32]) {
        let mut load = self.loads(at);
        let mut order: Vec<usize> = (0..at.len()).filter(|&i| at[i] == u32::MAX).collect();
        order.sort_by(|&a, &b| self.demands[b].total_cmp(&self.demands[a]).then(a.cmp(&b)));
        for i in order {
            let best = self.allowed[i]
                .iter()
                .copied()
                .min_by(|&x, &y| {
                    let (lx, ly) = (load[self.index(x)], load[self.index(y)]);
                    if (lx - ly).abs() > 1e-9 {
                        lx.total_cmp(&ly)
                    } else {
                        (x != self.now[i]).cmp(&(y != self.now[i])).then(x.cmp(&y))
                    }
                })
                .expect("allowed is never empty");
            at[i] = best;
            load[self.index(best)] += self.demands[i];
        }
    }

    /// Places every vCPU from scratch, those that may use fewest CPUs first, then heaviest
    /// first, each on the least loaded CPU it may use.
    fn place_constrained_first(&self, at: &mut [u32]) {
        let mut order: Vec<usize> = (0..at.len()).collect();
        order.sort_by(|&a, &b| {
            self.allowed[a]
                .len()
                .cmp(&self.allowed[b].len())
                .then(self.demands[b].total_cmp(&self.demands[a]))
                .then(a.cmp(&b))
        });
        let mut load = vec![0.0f64; self.cpus.len()];
        for i in order {
            let best = self.allowed[i]
                .iter()
                .copied()
                .min_by(|&x, &y| {
                    load[self.index(x)]
                        .total_cmp(&load[self.index(y)])
                        .then((x != self.now[i]).cmp(&(y != self.now[i])))
                        .then(x.cmp(&y))
                })
                .expect("allowed is never empty");
            at[i] = best;
            load[self.index(best)] += self.demands[i];
        }
    }

    /// Lowers the sum of squared loads by single moves and pair swaps, best step first, until
    /// no step lowers it by more than a rounding error (bounded, so it always ends).
    ///
    /// A step moves load from a CPU `a` to a less loaded `b`, and its gain depends only on
    /// their two loads and the vCPUs on them, so the best step of every ordered pair of CPUs is
    /// kept and, after a step, found again only for the pairs that involve its two CPUs:
    /// O(CPUs × vCPUs per CPU) a step instead of O(vCPUs²) (a 1 000-VM fleet on 64 CPUs took
    /// 64 ms a step by scanning every pair of vCPUs; `cargo bench --bench balancers`).
    fn improve(&self, at: &mut [u32]) {
        let m = self.cpus.len();
        let mut on = Placed::new(self, at);
        let mut best: Vec<Option<Step>> = (0..m * m)
            .map(|k| on.best_step(self, k / m, k % m))
            .collect();
        for _ in 0..(4 * at.len() + 16) {
            let Some(step) = best.iter().flatten().copied().reduce(Step::better) else {
                return;
            };
            let (a, b) = (on.pos[step.i], self.index(step.to));
            on.shift(self, step.i, b);
            at[step.i] = self.cpus[b];
            if let Some(j) = step.partner {
                on.shift(self, j, a);
                at[j] = self.cpus[a];
            }
            for x in 0..m {
                for (p, q) in [(a, x), (x, a), (b, x), (x, b)] {
                    best[p * m + q] = on.best_step(self, p, q);
                }
            }
        }
    }
}

/// A change of the sum of squared loads (or a load gap) smaller than this is a rounding error.
const GAIN_EPS: f64 = 1e-9;

/// A step of the local search: vCPU `i` moves to CPU `to`, and `partner` (if any) moves to
/// where `i` was.
#[derive(Clone, Copy, Debug)]
struct Step {
    gain: f64,
    i: usize,
    to: u32,
    partner: Option<usize>,
}

impl Step {
    /// The better of two steps: the larger gain, or within a rounding error of each other, the
    /// one of the lower-numbered vCPU, a single move before a swap, then the lower partner (the
    /// order in which a scan of every vCPU, then every partner after it, would meet them).
    fn better(self, other: Step) -> Step {
        if other.gain > self.gain + GAIN_EPS {
            return other;
        }
        if self.gain > other.gain + GAIN_EPS {
            return self;
        }
        let key = |s: &Step| (s.i, s.partner.map_or(0, |j| j + 1), s.to);
        if key(&other) < key(&self) {
            other
        } else {
            self
        }
    }
}

/// The placement under search: each vCPU's CPU (an index into `cpus`), each CPU's load and
/// its vCPUs in order of demand.
struct Placed {
    pos: Vec<usize>,
    load: Vec<f64>,
    members: Vec<Vec<usize>>,
}

impl Placed {
    fn new(problem: &Problem<'_>, at: &[u32]) -> Self {
        let pos: Vec<usize> = at.iter().map(|&c| problem.index(c)).collect();
        let load = problem.loads(at);
        let mut members = vec![Vec::new(); problem.cpus.len()];
        for (i, &c) in pos.iter().enumerate() {
            members[c].push(i);
        }
        for list in &mut members {
            list.sort_by(|&x, &y| Self::order(problem, x, y));
        }
        Placed { pos, load, members }
    }

    fn order(problem: &Problem<'_>, x: usize, y: usize) -> std::cmp::Ordering {
        problem.demands[x]
            .total_cmp(&problem.demands[y])
            .then(x.cmp(&y))
    }

    /// Moves vCPU `i` to CPU index `to`.
    fn shift(&mut self, problem: &Problem<'_>, i: usize, to: usize) {
        let from = self.pos[i];
        let d = problem.demands[i];
        self.load[from] -= d;
        self.load[to] += d;
        self.pos[i] = to;
        self.members[from].retain(|&x| x != i);
        let list = &mut self.members[to];
        let at = list
            .binary_search_by(|&x| Self::order(problem, x, i))
            .unwrap_or_else(|e| e);
        list.insert(at, i);
    }

    /// The best step that moves load from CPU index `a` to CPU index `b` and lowers the sum of
    /// squared loads by more than a rounding error, if any.
    fn best_step(&self, problem: &Problem<'_>, a: usize, b: usize) -> Option<Step> {
        let gap = self.load[a] - self.load[b];
        if a == b || gap <= GAIN_EPS {
            return None;
        }
        let (ca, cb) = (problem.cpus[a], problem.cpus[b]);
        let may = |i: usize, c: usize| problem.may[i * problem.cpus.len() + c];
        let d = problem.demands;
        let mut best: Option<Step> = None;
        let mut consider = |gain: f64, i: usize, to: u32, partner: Option<usize>| {
            if gain > GAIN_EPS {
                let s = Step {
                    gain,
                    i,
                    to,
                    partner,
                };
                best = Some(best.map_or(s, |b| b.better(s)));
            }
        };
        let theirs = &self.members[b];
        // `k`: the first of `b`'s vCPUs whose demand is at least the ideal partner's, for each
        // of `a`'s in rising demand (so it only moves forward).
        let mut k = 0;
        for &i in &self.members[a] {
            if !may(i, b) {
                continue;
            }
            // Change of Σ load² when demand `delta` moves from `a` to `b`.
            let gain = |delta: f64| 2.0 * delta * gap - 2.0 * delta * delta;
            consider(gain(d[i]), i, cb, None);
            // A swap moves d[i] − d[j]: best near half the gap, worth something in (0, gap).
            let ideal = d[i] - gap / 2.0;
            while k < theirs.len() && d[theirs[k]] < ideal {
                k += 1;
            }
            // The gain falls on both sides of the ideal partner: the nearest allowed on each
            // side are the only candidates.
            let below = theirs[..k].iter().rev().find(|&&j| may(j, a));
            let above = theirs[k..].iter().find(|&&j| may(j, a));
            for &j in below.into_iter().chain(above) {
                let delta = d[i] - d[j];
                if delta > 0.0 && delta < gap {
                    // The swap is met from its lower vCPU: it moves to the other's CPU.
                    let (lo, hi, to) = if i < j { (i, j, cb) } else { (j, i, ca) };
                    consider(gain(delta), lo, to, Some(hi));
                }
            }
        }
        best
    }
}

#[cfg(test)]
#[path = "cpu_tests.rs"]
mod tests;
