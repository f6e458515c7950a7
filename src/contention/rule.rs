//! The spare rule: how the contention stage shares what is left once every VM has its
//! guarantee (`burst-qemu agent --contention headroom|baseline|rescoin`). Pure.
//!
//! Each hungry VM (one that wants more than its guarantee and has room under its grant) gets a
//! weight; the spare is water-filled in proportion to the weights, never above a VM's grant.
//!
//! | rule | weight | depends on history |
//! |---|---|---|
//! | [`SpareRule::Headroom`] (default) | grant − guarantee: the burst its credits buy | no |
//! | [`SpareRule::Baseline`] | its baseline | no |
//! | [`SpareRule::Rescoin`] | \|accumulated credit\| over the last 9 periods | yes |
//!
//! **Why headroom is the default.** It is the rule the sched_ext program (`bpf/burst.bpf.c`)
//! and the ghOSt scheduler (`src/sched/`) already apply per dispatch, so every enforcer splits
//! an overcommitted host alike; it depends only on what the VMs pay for now (baseline and
//! credits), so identical VMs get equal shares and the same fleet gets the same split whatever
//! happened before; and it ties the burst to the credits: a VM without credits (grant =
//! baseline) gets none of the spare, and with weights grant − guarantee every hungry VM
//! reaches its grant at the same point of the water-filling, so a VM whose baseline and grant
//! are both at least another's never gets less. ResCoin's rule stays for comparison (the seed
//! scheme): its weights are neutral at their fixed point, so the spare stays split wherever it
//! first settled — on the 2-core host the 20 % VM kept more than the 80 % one (issue 20).
//! `baseline` is the choice for an operator who wants the spare to follow what each VM pays
//! for its guarantee rather than its credits.

use std::fmt;
use std::str::FromStr;

use crate::credit::Rate;

/// What the planner gives an enforcer that dispatches by itself (sched_ext, ghOSt) for one VM:
/// the numbers it orders by, not a rule of its own. Its dispatch serves, among VMs with a
/// waiting thread, those below their guarantee first, then those below their cap in
/// proportion to their weights, so busy VMs converge to the planner's split
/// ([`crate::sched::fair_shares`], the stage's water-filling over the same numbers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entitlement {
    /// The most it may use in any period: the ledger's grant.
    pub cap: Rate,
    /// What it gets first whenever it wants it: its pooled baseline, never above the cap.
    pub guarantee: Rate,
    /// Its weight for the spare under the rule in force (0: none of it). Only the ratios
    /// between VMs matter.
    pub weight: Rate,
}

/// How the spare is shared under contention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SpareRule {
    /// In proportion to grant − guarantee (history-free; the default).
    #[default]
    Headroom,
    /// In proportion to the baseline (history-free).
    Baseline,
    /// In proportion to |accumulated credit| over the last 9 periods: ResCoin's rule
    /// (history-dependent).
    Rescoin,
}

impl SpareRule {
    /// Every rule, default first.
    pub const ALL: [SpareRule; 3] = [SpareRule::Headroom, SpareRule::Baseline, SpareRule::Rescoin];

    /// The rule's name in flags and config files.
    pub fn name(self) -> &'static str {
        match self {
            SpareRule::Headroom => "headroom",
            SpareRule::Baseline => "baseline",
            SpareRule::Rescoin => "rescoin",
        }
    }

    /// Whether the split depends only on the present period's inputs.
    pub fn history_free(self) -> bool {
        self != SpareRule::Rescoin
    }

    /// `grant` and `baseline` as an enforcer that dispatches by itself is given them, or `None`
    /// for a rule whose weight is a history the dispatcher does not keep (ResCoin's accumulated
    /// credit: the stage's per-period plan, which only the cgroup enforcer applies).
    pub fn entitlement(self, grant: Rate, baseline: Rate) -> Option<Entitlement> {
        let guarantee = baseline.min(grant);
        let weight = match self {
            SpareRule::Rescoin => return None,
            _ => self.weight(grant.0, baseline.0, guarantee.0, 0),
        };
        Some(Entitlement {
            cap: grant,
            guarantee,
            weight: Rate(weight as u64),
        })
    }

    /// The weight of a hungry VM for the spare: `grant`, `baseline`, its `guarantee` (what it
    /// already has) and its accumulated `credit`.
    pub(super) fn weight(self, grant: u64, baseline: u64, guarantee: u64, credit: i64) -> u128 {
        match self {
            SpareRule::Headroom => u128::from(grant.saturating_sub(guarantee)),
            SpareRule::Baseline => u128::from(baseline),
            SpareRule::Rescoin => u128::from(credit.unsigned_abs()),
        }
    }
}

impl fmt::Display for SpareRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SpareRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        SpareRule::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                format!("unknown spare rule {s:?} (expected headroom, baseline or rescoin)")
            })
    }
}

#[cfg(test)]
mod tests;
