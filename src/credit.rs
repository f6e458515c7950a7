//! The credit ledger and the decline planner: pure, exact integer arithmetic.
//!
//! This module does no I/O and reads no clock. The caller (the agent, or `simulate`) tells
//! [`Ledger::tick`] how much time passed and how much CPU time the VM's vCPU threads used in
//! that time; the ledger updates the balances and returns the [`Grant`] for the next interval.
//!
//! # Units
//!
//! * Credit amounts are [`Credits`]: an exact count of **vCPU-nanoseconds**. One credit is one
//!   vCPU at 100 % for one minute, i.e. [`NS_PER_CREDIT`] = 60 × 10⁹ vCPU-ns.
//! * CPU rates are [`Rate`]s in **millionths of one CPU** (ppm): one vCPU at 100 % is
//!   1 000 000, a 2-vCPU VM at full speed is 2 000 000. A rate `r` used for `t` ns consumes
//!   `r × t / 10⁶` vCPU-ns.
//! * The baseline is given in percent **per vCPU** and pooled over the VM: a 2-vCPU VM with a
//!   5 % baseline may run at 10 % of one CPU, spread however the guest likes.
//!
//! # Accounting (one tick)
//!
//! 1. Earnings for the elapsed time, `baseline × elapsed`, are computed exactly: the fraction
//!    of a nanosecond that does not divide evenly is carried to the next tick, so nothing is
//!    lost to rounding however short the ticks are.
//! 2. CPU time used is paid from the launch credits (`initial_credits`) first, then from the
//!    earned balance.
//! 3. With `adjusted = earned − surplus + earnings − rest_of_used` (AWS's CloudWatch equation):
//!    if `adjusted ≥ 0`, the earned balance becomes `min(max_credits, adjusted)` and the
//!    surplus 0 (earnings above the cap are discarded; they first pay back any surplus);
//!    otherwise the earned balance is 0 and, in `unlimited` mode, the surplus becomes
//!    `−adjusted`, of which anything above `max_surplus` is *charged* (counted cumulatively,
//!    like `CPUSurplusCreditsCharged`, and no longer owed). In `standard` mode the enforcer
//!    holds the VM to its grant, so an overrun can only be enforcement slack (a period's burst
//!    measured in the next tick, or the runtime a kernel refills when a quota is rewritten). It
//!    is carried as an internal *debt* of at most one second of the VM's full rate and repaid
//!    from the next earnings, so that slack in both directions cancels: forgiving overruns
//!    while keeping underruns would make a VM held at its baseline drift above it. The debt is
//!    not part of the balance shown, which stays 0.
//!
//! # The grant and the smooth decline
//!
//! In `unlimited` mode the grant is always the VM's full rate. In `standard` mode it is a
//! function of the spendable balance `B` (launch + earned credits) alone:
//!
//! ```text
//! grant(B) = min(full, baseline + √(2·B·k) − k·dt/2),   k = (full − baseline) / D
//! ```
//!
//! where `D` is `decline_minutes` and `dt` the length of the tick. Why this shape: a grant
//! that falls linearly from `g₀` to the baseline over a time `T` drains `(g₀ − baseline)·T/2`
//! beyond the earnings; solving the linear ramp of slope `k` for its remaining drain gives
//! `B = (g − baseline)² / (2k)`, i.e. `g = baseline + √(2·B·k)`. The grant is held for a
//! whole tick, so the planner grants the ramp's *average* over the tick, `√(2·B·k) − k·dt/2`:
//! with it the balance after the tick is exactly `k·(T − dt)²/2`, the continuous schedule, so
//! the discrete decline ends on time however coarse the tick (a plain `√(2·B·k)` would end
//! early by a few ticks). Consequences, all tested:
//!
//! * While `B ≥ (full − baseline)·D/2` the VM may use all its vCPUs.
//! * A VM that keeps using its grant sees the grant fall *linearly* from its full rate to the
//!   baseline over exactly `D`, and its balance reaches 0 at that moment (`d√B/dt` is constant).
//!   The per-tick step is at most `k × interval`: for `D` = 20 min that is 0.083 % of the full
//!   rate per second, far inside the 2 %/s bound.
//! * The grant depends on `B` only and grows with it, so during a decline it never rises unless
//!   credits are added (by an override, or by earning while the VM runs below its baseline).
//! * A VM that bursts below its full rate meets the falling grant later and then follows it down
//!   on the same slope. The *rate* of decline is what the operator sets; the duration of a
//!   partial burst's decline is proportionally shorter. This keeps the planner stateless: it
//!   cannot be fooled by a VM whose measured usage is itself limited by the grant.
//! * In the last tick of the ramp (`√(2·B·k) ≤ k·dt`) the grant is what the balance can pay
//!   for over that tick, rounded up, so the balance reaches exactly 0; at 0 it is the baseline.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Nanoseconds in one second.
pub const NS_PER_SEC: u64 = 1_000_000_000;
/// Nanoseconds in one minute.
pub const NS_PER_MIN: u64 = 60 * NS_PER_SEC;
/// vCPU-nanoseconds in one credit (one vCPU at 100 % for one minute).
pub const NS_PER_CREDIT: u64 = NS_PER_MIN;
/// A rate of one full CPU, in millionths of a CPU.
pub const PPM_PER_CPU: u64 = 1_000_000;
/// The largest VM the ledger accepts, in vCPUs (QEMU's own x86 limit is lower).
pub const MAX_VCPUS: u32 = 4096;
/// Default launch credits per vCPU (as T2, Azure B and Alibaba t6 launch credits).
pub const DEFAULT_INITIAL_CREDITS_PER_VCPU: u64 = 30;
/// Default length of the smooth decline, in minutes.
pub const DEFAULT_DECLINE_MINUTES: u64 = 20;
/// The longest decline accepted, in minutes (one day).
pub const MAX_DECLINE_MINUTES: u64 = 24 * 60;

/// An exact amount of CPU credit, in vCPU-nanoseconds.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Credits(pub u64);

impl Credits {
    /// No credit.
    pub const ZERO: Credits = Credits(0);

    /// From a count of credits, rounded to the nearest vCPU-nanosecond.
    ///
    /// Returns `None` for a negative, non-finite or absurdly large amount (more than ten
    /// million credits).
    pub fn from_credits(credits: f64) -> Option<Self> {
        if !credits.is_finite() || !(0.0..=1.0e7).contains(&credits) {
            return None;
        }
        Some(Credits((credits * NS_PER_CREDIT as f64).round() as u64))
    }

    /// The amount in vCPU-nanoseconds.
    pub const fn vcpu_ns(self) -> u64 {
        self.0
    }

    /// The amount in credits, for display and JSON.
    pub fn as_credits(self) -> f64 {
        self.0 as f64 / NS_PER_CREDIT as f64
    }
}

impl fmt::Display for Credits {
    /// Credits with three decimals, rounded half up, computed in integers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let milli =
            (u128::from(self.0) * 1000 + u128::from(NS_PER_CREDIT) / 2) / u128::from(NS_PER_CREDIT);
        write!(f, "{}.{:03}", milli / 1000, milli % 1000)
    }
}

/// A CPU rate in millionths of one CPU (1 000 000 = one vCPU busy all the time).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Rate(pub u64);

impl Rate {
    /// The CPU time this rate consumes over `ns` nanoseconds, in vCPU-ns (rounded down).
    pub fn over(self, ns: u64) -> u64 {
        (u128::from(self.0) * u128::from(ns) / u128::from(PPM_PER_CPU)) as u64
    }

    /// The rate as a percentage of the whole VM's capacity (`vcpus` CPUs), 0–100.
    pub fn percent_of(self, vcpus: u32) -> f64 {
        self.0 as f64 * 100.0 / (u64::from(vcpus) * PPM_PER_CPU) as f64
    }

    /// The rate that is `percent` (0–100) of a VM with `vcpus` vCPUs, rounded.
    pub fn from_percent_of(percent: f64, vcpus: u32) -> Rate {
        Rate((percent * u64::from(vcpus) as f64 * (PPM_PER_CPU as f64 / 100.0)).round() as u64)
    }
}

/// What a VM does when its balance is spent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Held to the baseline at a zero balance (after a smooth decline).
    #[default]
    Standard,
    /// Keeps bursting on surplus credits, repaid from later earnings; surplus beyond the
    /// cap is charged.
    Unlimited,
}

impl Mode {
    /// The name used in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Standard => "standard",
            Mode::Unlimited => "unlimited",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "standard" => Ok(Mode::Standard),
            "unlimited" => Ok(Mode::Unlimited),
            other => Err(format!(
                "unknown mode {other:?}: expected \"standard\" or \"unlimited\""
            )),
        }
    }
}

/// A baseline of percent per vCPU, kept in millionths of one vCPU (1 % = 10 000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Baseline(u32);

impl Baseline {
    /// A baseline of `percent` per vCPU; it must lie in (0, 100] and not round to zero at a
    /// resolution of 0.0001 %.
    pub fn from_percent(percent: f64) -> Result<Self, PolicyError> {
        if !percent.is_finite() || percent <= 0.0 || percent > 100.0 {
            return Err(PolicyError::Baseline(percent));
        }
        let ppm = (percent * 10_000.0).round() as u32;
        if ppm == 0 {
            return Err(PolicyError::Baseline(percent));
        }
        Ok(Baseline(ppm))
    }

    /// The baseline in percent per vCPU.
    pub fn percent(self) -> f64 {
        f64::from(self.0) / 10_000.0
    }

    /// The baseline in millionths of one vCPU.
    pub fn ppm_per_vcpu(self) -> u32 {
        self.0
    }
}

/// A policy value out of range.
#[derive(Debug, Error, PartialEq)]
pub enum PolicyError {
    /// `vcpus` is 0 or above [`MAX_VCPUS`].
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u32),
    /// The baseline is not in (0, 100].
    #[error("baseline must be a percentage per vCPU in (0, 100], got {0}")]
    Baseline(f64),
    /// `decline_minutes` is not in (0, one day].
    #[error("decline_minutes must be more than 0 and at most {MAX_DECLINE_MINUTES}, got {0}")]
    Decline(f64),
    /// A credit amount is negative, not a number or absurdly large.
    #[error("{field} must be a number of credits between 0 and 10000000, got {value}")]
    Credits {
        /// The field's name.
        field: &'static str,
        /// The value given.
        value: f64,
    },
}

/// Everything that decides how a VM earns and spends credits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    vcpus: u32,
    baseline: Baseline,
    mode: Mode,
    max_credits: Credits,
    max_surplus: Credits,
    decline_ns: u64,
}

impl Policy {
    /// A standard-mode policy with the documented defaults: `max_credits` = 24 h of earnings,
    /// `max_surplus` = `max_credits`, a 20-minute decline.
    pub fn new(vcpus: u32, baseline: Baseline) -> Result<Self, PolicyError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(PolicyError::Vcpus(vcpus));
        }
        let max = Self::earnings_per_day(vcpus, baseline);
        Ok(Policy {
            vcpus,
            baseline,
            mode: Mode::Standard,
            max_credits: max,
            max_surplus: max,
            decline_ns: DEFAULT_DECLINE_MINUTES * NS_PER_MIN,
        })
    }

    /// What a VM of this size and baseline earns in 24 hours (the default cap).
    pub fn earnings_per_day(vcpus: u32, baseline: Baseline) -> Credits {
        let rate = u64::from(baseline.0) * u64::from(vcpus);
        Credits(Rate(rate).over(24 * 60 * NS_PER_MIN))
    }

    /// The default launch credits for `vcpus` vCPUs (30 per vCPU).
    pub fn default_initial_credits(vcpus: u32) -> Credits {
        Credits(DEFAULT_INITIAL_CREDITS_PER_VCPU * u64::from(vcpus) * NS_PER_CREDIT)
    }

    /// Sets the mode.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the cap on the earned balance (and, unless set separately, on the surplus).
    pub fn with_max_credits(mut self, max: Credits) -> Self {
        if self.max_surplus == self.max_credits {
            self.max_surplus = max;
        }
        self.max_credits = max;
        self
    }

    /// Sets the cap on the surplus of an `unlimited` VM; beyond it surplus is charged.
    pub fn with_max_surplus(mut self, max: Credits) -> Self {
        self.max_surplus = max;
        self
    }

    /// Sets the length of the smooth decline, in minutes (fractions allowed).
    pub fn with_decline_minutes(mut self, minutes: f64) -> Result<Self, PolicyError> {
        if !minutes.is_finite() || minutes <= 0.0 || minutes > MAX_DECLINE_MINUTES as f64 {
            return Err(PolicyError::Decline(minutes));
        }
        self.decline_ns = ((minutes * NS_PER_MIN as f64).round() as u64).max(1);
        Ok(self)
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }
    /// Baseline per vCPU.
    pub fn baseline(&self) -> Baseline {
        self.baseline
    }
    /// Mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Cap on the earned balance.
    pub fn max_credits(&self) -> Credits {
        self.max_credits
    }
    /// Cap on the surplus.
    pub fn max_surplus(&self) -> Credits {
        self.max_surplus
    }
    /// Length of the smooth decline in nanoseconds.
    pub fn decline_ns(&self) -> u64 {
        self.decline_ns
    }

    /// The VM's full rate: all its vCPUs busy.
    pub fn full_rate(&self) -> Rate {
        Rate(u64::from(self.vcpus) * PPM_PER_CPU)
    }

    /// The VM's pooled baseline rate (`baseline × vcpus`).
    pub fn baseline_rate(&self) -> Rate {
        Rate(u64::from(self.baseline.0) * u64::from(self.vcpus))
    }

    /// Credits earned per hour.
    pub fn earn_per_hour(&self) -> Credits {
        Credits(self.baseline_rate().over(60 * NS_PER_MIN))
    }

    /// The balance at which a VM using all its vCPUs starts its decline:
    /// `(full − baseline) × D / 2`.
    pub fn decline_threshold(&self) -> Credits {
        let excess = self.full_rate().0 - self.baseline_rate().0;
        Credits(Rate(excess).over(self.decline_ns) / 2)
    }
}

/// The CPU rate a VM may use during the next interval, with what decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The rate, in millionths of one CPU; never above the VM's full rate and never below its
    /// baseline.
    pub rate: Rate,
    /// `true` when the grant is below the VM's full rate (the VM is in its decline or held to
    /// its baseline).
    pub limited: bool,
}

/// A VM's balances: what is persisted and what an operator reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balances {
    /// Earned credits, at most `max_credits`.
    pub earned: Credits,
    /// Launch credits not yet spent; spent before earned credits, not capped.
    pub launch: Credits,
    /// Credits spent beyond a zero balance in `unlimited` mode, still to be repaid.
    pub surplus: Credits,
    /// Surplus credits charged so far (cumulative).
    pub charged: Credits,
    /// The part of a vCPU-nanosecond earned but not yet credited, in millionths: carried so
    /// that short ticks lose nothing to rounding.
    #[serde(default)]
    pub earn_remainder: u64,
    /// Standard mode: CPU used beyond a zero balance (enforcement slack), at most one second of
    /// the VM's full rate, repaid from later earnings before the balance grows. Not part of the
    /// balance shown.
    #[serde(default)]
    pub debt: Credits,
}

impl Balances {
    /// The spendable balance: launch plus earned credits.
    pub fn balance(&self) -> Credits {
        Credits(self.earned.0.saturating_add(self.launch.0))
    }
}

/// One VM's credit account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ledger {
    policy: Policy,
    balances: Balances,
    grant: Grant,
    interval_ns: u64,
}

impl Ledger {
    /// A new account holding `initial` launch credits.
    pub fn new(policy: Policy, initial: Credits) -> Self {
        Self::restore(
            policy,
            Balances {
                launch: initial,
                ..Balances::default()
            },
        )
    }

    /// An account continued from persisted balances.
    pub fn restore(policy: Policy, balances: Balances) -> Self {
        let mut ledger = Ledger {
            grant: Grant {
                rate: policy.full_rate(),
                limited: false,
            },
            policy,
            balances,
            interval_ns: NS_PER_SEC,
        };
        ledger.clamp_to_policy();
        ledger.grant = ledger.plan();
        ledger
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The balances now.
    pub fn balances(&self) -> Balances {
        self.balances
    }

    /// The grant returned by the last tick (or computed at creation).
    pub fn grant(&self) -> Grant {
        self.grant
    }

    /// Sets the interval the grant is planned for: the caller's regular tick (default 1 s).
    /// Ticks may be irregular (an edit applied between two regular ticks); the grant is
    /// planned for the regular interval all the same.
    pub fn set_interval(&mut self, interval_ns: u64) {
        self.interval_ns = interval_ns.max(1);
        self.grant = self.plan();
    }

    /// Accounts `elapsed_ns` of wall time during which the VM's vCPU threads used `used_ns` of
    /// CPU time, and returns the grant for the next interval.
    pub fn tick(&mut self, elapsed_ns: u64, used_ns: u64) -> Grant {
        let b = &mut self.balances;
        let p = &self.policy;

        // Earnings, exact: carry the fraction of a vCPU-ns to the next tick.
        let numerator =
            u128::from(elapsed_ns) * u128::from(p.baseline_rate().0) + u128::from(b.earn_remainder);
        let earned_now = numerator / u128::from(PPM_PER_CPU);
        b.earn_remainder = (numerator % u128::from(PPM_PER_CPU)) as u64;

        // Launch credits pay first.
        let from_launch = b.launch.0.min(used_ns);
        b.launch.0 -= from_launch;
        let used = used_ns - from_launch;

        let adjusted = i128::from(b.earned.0) - i128::from(b.surplus.0) - i128::from(b.debt.0)
            + earned_now as i128
            - i128::from(used);
        if adjusted >= 0 {
            b.earned.0 = (adjusted as u128).min(u128::from(p.max_credits.0)) as u64;
            b.surplus.0 = 0;
            b.debt.0 = 0;
        } else {
            b.earned.0 = 0;
            let owed = u128::try_from(-adjusted).unwrap_or(u128::MAX);
            match p.mode {
                // The enforcer holds a standard VM to its grant: what it used beyond the balance
                // is enforcement slack (a period's burst straddling two ticks, a quota rewrite).
                // It is carried and repaid, so slack in both directions cancels and the long-run
                // use is exactly the baseline; beyond one second of the full rate it is forgiven.
                Mode::Standard => {
                    b.surplus.0 = 0;
                    let cap = u128::from(p.full_rate().over(NS_PER_SEC));
                    b.debt.0 = owed.min(cap) as u64;
                }
                Mode::Unlimited => {
                    let cap = u128::from(p.max_surplus.0);
                    if owed > cap {
                        b.charged.0 = b
                            .charged
                            .0
                            .saturating_add((owed - cap).min(u128::from(u64::MAX)) as u64);
                        b.surplus.0 = p.max_surplus.0;
                    } else {
                        b.surplus.0 = owed as u64;
                    }
                }
            }
        }

        self.grant = self.plan();
        self.grant
    }

    /// The grant for the next interval, from the balances alone (see the module docs).
    fn plan(&self) -> Grant {
        let interval_ns = self.interval_ns;
        let p = &self.policy;
        let full = p.full_rate();
        let unlimited = Grant {
            rate: full,
            limited: false,
        };
        if p.mode == Mode::Unlimited {
            return unlimited;
        }
        let spendable = self.balances.balance().0;
        // Fast path for the common case, far above the decline: twice the threshold is more
        // than the half-tick correction below can ever need while ticks are under D/2.
        if spendable >= 2 * p.decline_threshold().0 && 2 * interval_ns <= p.decline_ns {
            return unlimited;
        }
        let base = p.baseline_rate().0;
        let excess = u128::from(full.0 - base);
        let decline = u128::from(p.decline_ns);
        let interval = u128::from(interval_ns.max(1));
        // √(2·B·k) in ppm, with k = excess / D in ppm per ns: (g − base)² = 2·10⁶·B·excess / D.
        let headroom =
            (2 * u128::from(PPM_PER_CPU) * u128::from(spendable) * excess / decline).isqrt();
        // How far the ramp falls during one interval, in ppm.
        let step = excess * interval / decline;
        let extra = if headroom > step {
            // The ramp's average over the interval: holding it makes the balance follow the
            // continuous schedule exactly, B' = k·(T − dt)²/2.
            headroom - step / 2
        } else {
            // Less than one interval of ramp left: spend the residue (rounded up, so the
            // balance reaches exactly 0).
            (u128::from(spendable) * u128::from(PPM_PER_CPU)).div_ceil(interval)
        };
        let extra = extra.min(excess) as u64;
        Grant {
            rate: Rate(base + extra),
            limited: u128::from(extra) < excess,
        }
    }

    /// Sets the spendable balance to `credits` (an operator's override). Anything above
    /// `max_credits` is kept as launch credits (spent first, not capped), so every value
    /// sticks; an outstanding surplus is cleared, charged credits stay as they were.
    pub fn set_balance(&mut self, credits: Credits) {
        let b = &mut self.balances;
        b.earned = credits.min(self.policy.max_credits);
        b.launch = Credits(credits.0 - b.earned.0);
        b.surplus = Credits::ZERO;
        b.debt = Credits::ZERO;
        self.grant = self.plan();
    }

    /// Replaces the policy (a live config change). The number of vCPUs must not change.
    /// Going from `unlimited` to `standard` charges any outstanding surplus at once, as AWS
    /// does; a lower cap discards earned credits above it.
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), PolicyError> {
        if policy.vcpus != self.policy.vcpus {
            return Err(PolicyError::Vcpus(policy.vcpus));
        }
        self.policy = policy;
        self.clamp_to_policy();
        self.grant = self.plan();
        Ok(())
    }

    fn clamp_to_policy(&mut self) {
        let b = &mut self.balances;
        let p = &self.policy;
        b.earned = b.earned.min(p.max_credits);
        let surplus_cap = if p.mode == Mode::Standard {
            Credits::ZERO
        } else {
            p.max_surplus
        };
        if b.surplus > surplus_cap {
            b.charged.0 = b.charged.0.saturating_add(b.surplus.0 - surplus_cap.0);
            b.surplus = surplus_cap;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t3_nano() -> Policy {
        Policy::new(2, Baseline::from_percent(5.0).unwrap()).unwrap()
    }

    fn credits(c: f64) -> Credits {
        Credits::from_credits(c).unwrap()
    }

    #[test]
    fn default_cap_is_24_hours_of_earnings() {
        assert_eq!(t3_nano().max_credits(), credits(144.0));
        assert_eq!(t3_nano().earn_per_hour(), credits(6.0));
    }

    #[test]
    fn default_launch_credits_are_30_per_vcpu() {
        assert_eq!(Policy::default_initial_credits(4), credits(120.0));
    }

    #[test]
    fn credits_print_with_three_rounded_decimals() {
        assert_eq!(credits(86.4).to_string(), "86.400");
        assert_eq!(Credits(NS_PER_CREDIT / 2000).to_string(), "0.001"); // 0.0005 rounds up
        assert_eq!(Credits(0).to_string(), "0.000");
    }

    #[test]
    fn earnings_are_exact_over_many_short_ticks() {
        // 1 vCPU at 0.0007 % earns 7 000 vCPU-ns per second, 0.007 vCPU-ns per 1 µs tick.
        let p = Policy::new(1, Baseline::from_percent(0.0007).unwrap()).unwrap();
        let mut l = Ledger::new(p, Credits::ZERO);
        for _ in 0..1_000_000 {
            l.tick(1_000, 0);
        }
        assert_eq!(l.balances().earned, Credits(7_000));
    }

    #[test]
    fn launch_credits_are_spent_first_and_not_capped() {
        let p = t3_nano().with_max_credits(credits(1.0));
        let mut l = Ledger::new(p, credits(10.0));
        l.tick(60 * NS_PER_MIN, 0); // earns 6, capped at 1
        assert_eq!(l.balances().earned, credits(1.0));
        assert_eq!(l.balances().launch, credits(10.0));
        l.tick(NS_PER_MIN, 4 * NS_PER_CREDIT); // earns 0.1 (capped), spends 4 launch credits
        assert_eq!(l.balances().launch, credits(6.0));
        assert_eq!(l.balances().earned, credits(1.0));
    }

    #[test]
    fn override_above_the_cap_is_kept_as_launch_credits() {
        let mut l = Ledger::new(t3_nano(), Credits::ZERO);
        l.set_balance(credits(200.0));
        assert_eq!(l.balances().balance(), credits(200.0));
        assert_eq!(l.balances().earned, credits(144.0));
        l.set_balance(credits(3.0));
        assert_eq!(l.balances().balance(), credits(3.0));
        assert_eq!(l.balances().launch, Credits::ZERO);
    }

    #[test]
    fn override_clears_surplus_but_keeps_charges() {
        let mut l = Ledger::new(t3_nano().with_mode(Mode::Unlimited), Credits::ZERO);
        l.tick(10 * 60 * NS_PER_MIN, 2 * 10 * 60 * NS_PER_MIN); // 10 h at 100 %
        assert!(l.balances().charged > Credits::ZERO);
        let charged = l.balances().charged;
        l.set_balance(credits(5.0));
        assert_eq!(l.balances().surplus, Credits::ZERO);
        assert_eq!(l.balances().charged, charged);
        assert_eq!(l.balances().balance(), credits(5.0));
    }

    #[test]
    fn switching_to_standard_charges_the_surplus() {
        let mut l = Ledger::new(t3_nano().with_mode(Mode::Unlimited), Credits::ZERO);
        l.tick(NS_PER_MIN, 2 * NS_PER_MIN); // 2 credits used, 0.1 earned
        assert_eq!(l.balances().surplus, credits(1.9));
        l.set_policy(t3_nano()).unwrap();
        assert_eq!(l.balances().surplus, Credits::ZERO);
        assert_eq!(l.balances().charged, credits(1.9));
    }

    #[test]
    fn vcpus_cannot_change_live() {
        let mut l = Ledger::new(t3_nano(), Credits::ZERO);
        let four = Policy::new(4, Baseline::from_percent(5.0).unwrap()).unwrap();
        assert_eq!(l.set_policy(four), Err(PolicyError::Vcpus(4)));
    }

    #[test]
    fn standard_overrun_at_zero_is_a_small_debt_repaid_first() {
        let mut l = Ledger::new(t3_nano(), Credits::ZERO);
        // 0.1 vCPU-s over: a debt, the balance shown stays 0 and the VM at its baseline.
        l.tick(NS_PER_SEC, 200_000_000);
        assert_eq!(l.balances().balance(), Credits::ZERO);
        assert_eq!(l.balances().debt, Credits(100_000_000));
        assert_eq!(l.grant().rate, t3_nano().baseline_rate());
        // A second at baseline/2 earns 0.1 vCPU-s and uses 0.05: half the debt repaid.
        l.tick(NS_PER_SEC, 50_000_000);
        assert_eq!(l.balances().debt, Credits(50_000_000));
        assert_eq!(l.balances().balance(), Credits::ZERO);
        l.tick(NS_PER_SEC, 0);
        assert_eq!(
            (l.balances().debt, l.balances().balance()),
            (Credits::ZERO, Credits(50_000_000))
        );
    }

    #[test]
    fn debt_is_capped_at_one_second_of_the_full_rate() {
        let mut l = Ledger::new(t3_nano(), Credits::ZERO);
        l.tick(NS_PER_SEC, 100 * NS_PER_SEC);
        assert_eq!(l.balances().debt, Credits(2 * NS_PER_SEC));
        l.set_balance(Credits::ZERO);
        assert_eq!(l.balances().debt, Credits::ZERO);
    }

    #[test]
    fn unlimited_is_never_limited() {
        let mut l = Ledger::new(t3_nano().with_mode(Mode::Unlimited), Credits::ZERO);
        let g = l.tick(NS_PER_SEC, 2 * NS_PER_SEC);
        assert_eq!(g.rate, t3_nano().full_rate());
        assert!(!g.limited);
    }

    #[test]
    fn full_rate_above_the_decline_threshold() {
        // (2 − 0.1) vCPU × 20 min / 2 = 19 credits.
        assert_eq!(t3_nano().decline_threshold(), credits(19.0));
        let l = Ledger::new(t3_nano(), credits(19.1));
        assert_eq!(l.grant().rate, t3_nano().full_rate());
        let l = Ledger::new(t3_nano(), credits(18.9));
        assert!(l.grant().rate < t3_nano().full_rate());
    }

    #[test]
    fn policy_rejects_out_of_range_values() {
        assert_eq!(Baseline::from_percent(0.0), Err(PolicyError::Baseline(0.0)));
        assert_eq!(
            Baseline::from_percent(100.5),
            Err(PolicyError::Baseline(100.5))
        );
        assert!(Baseline::from_percent(f64::NAN).is_err());
        assert!(Baseline::from_percent(100.0).is_ok());
        let b = Baseline::from_percent(5.0).unwrap();
        assert_eq!(Policy::new(0, b), Err(PolicyError::Vcpus(0)));
        assert!(t3_nano().with_decline_minutes(0.0).is_err());
        assert!(t3_nano().with_decline_minutes(-1.0).is_err());
        assert!(Credits::from_credits(-0.5).is_none());
    }
}
