//! The credit contract of DESIGN.md, checked on the ledger's public API: AWS's published
//! walk-throughs, the CloudWatch update equation as a property, and the smooth decline.

use burst_qemu::credit::{
    Balances, Baseline, Credits, Grant, Ledger, Mode, Policy, Rate, NS_PER_CREDIT, NS_PER_MIN,
    NS_PER_SEC,
};
use proptest::prelude::*;

const HOUR: u64 = 60 * NS_PER_MIN;

fn policy(vcpus: u32, baseline_pct: f64) -> Policy {
    Policy::new(vcpus, Baseline::from_percent(baseline_pct).unwrap()).unwrap()
}

fn t3_nano() -> Policy {
    policy(2, 5.0)
}

fn credits(c: f64) -> Credits {
    Credits::from_credits(c).unwrap()
}

/// Runs the ledger at a demand of `pct` % of all vCPUs for `ns`, in 1-second ticks, the VM
/// using `min(demand, grant)` as an enforced VM does. Returns the grants of every tick.
fn run(ledger: &mut Ledger, ns: u64, pct: f64) -> Vec<Grant> {
    let demand = Rate::from_percent_of(pct, ledger.policy().vcpus());
    let mut grants = Vec::new();
    let mut left = ns;
    while left > 0 {
        let step = left.min(NS_PER_SEC);
        let grant = ledger.grant();
        ledger.tick(step, demand.min(grant.rate).over(step));
        grants.push(grant);
        left -= step;
    }
    grants
}

#[test]
fn aws_t3_nano_standard_walkthrough() {
    let mut l = Ledger::new(t3_nano(), Credits::ZERO);
    for (hours, pct, expected) in [
        (24, 0.0, 144.0),
        (12, 2.5, 144.0),
        (24, 7.0, 86.4),
        (12, 2.5, 122.4),
        (2, 100.0, 0.0),
        (14, 5.0, 0.0),
        (24, 0.0, 144.0),
    ] {
        run(&mut l, hours * HOUR, pct);
        assert_eq!(
            l.balances().balance(),
            credits(expected),
            "after {hours} h at {pct} %"
        );
    }
}

#[test]
fn seed_example_two_percent_for_an_hour_earns_3_6() {
    let mut l = Ledger::new(t3_nano(), Credits::ZERO);
    run(&mut l, HOUR, 2.0);
    assert_eq!(l.balances().balance(), credits(3.6));
}

#[test]
fn unlimited_surplus_is_charged_beyond_the_cap_then_repaid() {
    let mut l = Ledger::new(t3_nano().with_mode(Mode::Unlimited), Credits::ZERO);
    l.set_balance(credits(122.4));
    let grants = run(&mut l, 5 * HOUR, 100.0);
    assert!(
        grants.iter().all(|g| !g.limited),
        "unlimited never throttles"
    );
    let b = l.balances();
    assert_eq!(
        (b.balance(), b.surplus, b.charged),
        (Credits::ZERO, credits(144.0), credits(303.6))
    );
    run(&mut l, 24 * HOUR, 0.0);
    let b = l.balances();
    assert_eq!(
        (b.balance(), b.surplus, b.charged),
        (Credits::ZERO, Credits::ZERO, credits(303.6))
    );
}

#[test]
fn standard_mode_holds_a_spent_vm_to_its_pooled_baseline() {
    let mut l = Ledger::new(policy(4, 10.0), Credits::ZERO);
    let grants = run(&mut l, 10 * NS_PER_MIN, 100.0);
    assert!(grants.iter().all(|g| g.rate == Rate(400_000) && g.limited));
    assert_eq!(l.balances().balance(), Credits::ZERO);
}

/// Seconds from the first limited grant until the balance is 0, for a VM demanding 100 %.
fn decline(l: &mut Ledger) -> (u64, Vec<Grant>) {
    let mut grants = Vec::new();
    while !l.grant().limited {
        grants.extend(run(l, NS_PER_SEC, 100.0));
        assert!(grants.len() < 10_000_000, "never declined");
    }
    let start = grants.len();
    while l.balances().balance() > Credits::ZERO {
        grants.extend(run(l, NS_PER_SEC, 100.0));
    }
    (
        (grants.len() - start) as u64,
        grants[start.saturating_sub(1)..].to_vec(),
    )
}

#[test]
fn decline_reaches_baseline_as_the_balance_reaches_zero_after_decline_minutes() {
    let mut l = Ledger::new(t3_nano(), credits(60.0));
    let (seconds, grants) = decline(&mut l);
    assert!(
        seconds.abs_diff(20 * 60) <= 12,
        "balance reached 0 after {seconds} s, not 1200 s ± 1 %"
    );
    assert_eq!(l.grant().rate, t3_nano().baseline_rate());
    assert_eq!(grants.first().unwrap().rate, t3_nano().full_rate());
}

#[test]
fn decline_halfway_is_halfway_between_full_and_baseline() {
    let mut l = Ledger::new(t3_nano(), credits(60.0));
    let (_, grants) = decline(&mut l);
    // A linear ramp from 100 % to 5 % of the VM: 52.5 % at 600 s.
    let mid = grants[600].rate.percent_of(2);
    assert!((mid - 52.5).abs() < 0.5, "grant {mid} % at mid-decline");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// For any size, baseline and decline length: the grant never rises during the decline, no
    /// step between 1-second ticks exceeds 2 % of the full rate, and the balance reaches 0
    /// when the decline window has passed (within 1 %).
    #[test]
    fn decline_is_smooth_monotone_and_on_time(
        vcpus in 1u32..=8,
        baseline in 1u32..=60,
        minutes in 5u32..=60,
        head_start in 0.0f64..30.0,
    ) {
        let p = policy(vcpus, f64::from(baseline)).with_decline_minutes(f64::from(minutes)).unwrap();
        let start = Credits(p.decline_threshold().vcpu_ns() + (head_start * NS_PER_CREDIT as f64) as u64);
        let mut l = Ledger::new(p.clone(), start);
        let (seconds, grants) = decline(&mut l);
        let window = u64::from(minutes) * 60;
        prop_assert!(seconds.abs_diff(window) * 100 <= window, "{} s for a {} s window", seconds, window);
        let full = p.full_rate().0;
        for pair in grants.windows(2) {
            prop_assert!(pair[1].rate <= pair[0].rate, "grant rose during the decline");
            prop_assert!((pair[0].rate.0 - pair[1].rate.0) * 50 <= full, "step above 2 % of full");
        }
        prop_assert_eq!(l.grant().rate, p.baseline_rate());
    }

    /// A VM bursting below its full rate: still monotone and smooth, and at 0 it is at baseline.
    #[test]
    fn partial_burst_declines_smoothly(pct in 20.0f64..100.0, baseline in 1u32..=15) {
        let p = policy(2, f64::from(baseline));
        let mut l = Ledger::new(p.clone(), credits(40.0));
        // Long enough to drain 40 credits at the slowest net rate drawn (5 % of 2 vCPUs).
        let grants = run(&mut l, 8 * HOUR, pct);
        for pair in grants.windows(2) {
            prop_assert!(pair[1].rate <= pair[0].rate);
            prop_assert!((pair[0].rate.0 - pair[1].rate.0) * 50 <= p.full_rate().0);
        }
        prop_assert_eq!(l.balances().balance(), Credits::ZERO);
        prop_assert_eq!(l.grant().rate, p.baseline_rate());
    }
}

#[test]
fn the_grant_rises_during_a_decline_only_when_credits_are_added() {
    let mut l = Ledger::new(t3_nano(), credits(30.0));
    run(&mut l, 15 * NS_PER_MIN, 100.0);
    let before = l.grant();
    assert!(before.limited);
    l.set_balance(credits(100.0));
    assert_eq!(l.grant().rate, t3_nano().full_rate());
}

/// AWS's 5-minute CloudWatch update: `adjusted = (balance − surplus) + earned − used`.
fn oracle(
    prev: (i128, i128),
    earned: i128,
    used: i128,
    max: i128,
    mode: Mode,
) -> (i128, i128, i128) {
    let adjusted = prev.0 - prev.1 + earned - used;
    if adjusted >= 0 {
        (adjusted.min(max), 0, 0)
    } else if mode == Mode::Standard {
        (0, 0, 0)
    } else {
        (0, (-adjusted).min(max), (-adjusted - max).max(0))
    }
}

fn period_traces() -> impl Strategy<Value = (u32, u32, u64, Vec<u64>)> {
    (1u32..=4, 1u32..=50, 0u64..=200).prop_flat_map(|(vcpus, baseline, start)| {
        // Per 5-minute period: used vCPU-ns, a multiple of 10 so ten ticks split it evenly.
        let full_period = u64::from(vcpus) * 5 * NS_PER_MIN / 10;
        (
            Just(vcpus),
            Just(baseline),
            Just(start),
            prop::collection::vec((0..=full_period).prop_map(|u| u * 10), 1..60),
        )
    })
}

fn check_against_oracle(
    mode: Mode,
    vcpus: u32,
    baseline: u32,
    start: u64,
    periods: &[u64],
) -> Result<(), TestCaseError> {
    let p = policy(vcpus, f64::from(baseline)).with_mode(mode);
    let max = i128::from(p.max_credits().vcpu_ns());
    let mut l = Ledger::new(p.clone(), Credits::ZERO);
    l.set_balance(Credits(
        (start * NS_PER_CREDIT).min(p.max_credits().vcpu_ns()),
    ));
    let mut expect = (i128::from(l.balances().earned.vcpu_ns()), 0i128);
    let mut charged = 0i128;
    let earned = i128::from(p.baseline_rate().over(5 * NS_PER_MIN));
    for &used in periods {
        // In standard mode the VM cannot use more than it has: an enforced VM never overruns
        // by a whole period's credits (AWS's equation has no standard-mode overrun either).
        let used = if mode == Mode::Standard {
            let available = (expect.0 + earned) as u64;
            (used.min(available) / 10) * 10
        } else {
            used
        };
        for _ in 0..10 {
            l.tick(30 * NS_PER_SEC, used / 10);
        }
        let (balance, surplus, charge) = oracle(expect, earned, i128::from(used), max, mode);
        expect = (balance, surplus);
        charged += charge;
        let b: Balances = l.balances();
        prop_assert_eq!(i128::from(b.balance().vcpu_ns()), balance);
        prop_assert_eq!(i128::from(b.surplus.vcpu_ns()), surplus);
        prop_assert_eq!(i128::from(b.charged.vcpu_ns()), charged);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn unlimited_mode_follows_the_cloudwatch_equation((vcpus, baseline, start, periods) in period_traces()) {
        check_against_oracle(Mode::Unlimited, vcpus, baseline, start, &periods)?;
    }

    #[test]
    fn standard_mode_follows_the_cloudwatch_equation((vcpus, baseline, start, periods) in period_traces()) {
        check_against_oracle(Mode::Standard, vcpus, baseline, start, &periods)?;
    }

    /// Launch credits are spent first, never count toward the cap, and the earned balance never
    /// exceeds it, whatever the usage.
    #[test]
    fn launch_credits_and_cap(initial in 0u64..500, max in 1u64..300, uses in prop::collection::vec(0u64..=120, 1..200)) {
        let p = t3_nano().with_max_credits(Credits(max * NS_PER_CREDIT));
        let mut l = Ledger::new(p, Credits(initial * NS_PER_CREDIT));
        for u in uses {
            let before = l.balances();
            let used = u * NS_PER_SEC; // up to 2 vCPU for a minute
            l.tick(NS_PER_MIN, used);
            let after = l.balances();
            prop_assert!(after.earned.vcpu_ns() <= max * NS_PER_CREDIT);
            prop_assert_eq!(after.launch.vcpu_ns(), before.launch.vcpu_ns().saturating_sub(used));
            if before.launch.vcpu_ns() >= used {
                // Paid wholly from launch credits: the earned balance only earned.
                prop_assert!(after.earned >= before.earned);
            }
        }
    }

    /// An override sets the spendable balance to exactly the value given.
    #[test]
    fn override_sets_the_balance(value in 0.0f64..10_000.0, unlimited in any::<bool>()) {
        let mode = if unlimited { Mode::Unlimited } else { Mode::Standard };
        let mut l = Ledger::new(t3_nano().with_mode(mode), credits(17.0));
        l.tick(HOUR, 2 * HOUR);
        l.set_balance(credits(value));
        prop_assert_eq!(l.balances().balance(), credits(value));
        prop_assert_eq!(l.balances().surplus, Credits::ZERO);
    }
}
