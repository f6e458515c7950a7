//! The ghOSt enforcer: its refusals, and the enforcer itself — the global agent's thread, its
//! satellites idle-waiting in `GHOST_IOC_RUN`, commands through the `Enforcer` calls — run on
//! the kernel model with its CPUs running time in real time (no ghOSt kernel exists here).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::*;
use crate::contention::SpareRule;
use crate::ghost::model::{Model, NCPUS};

#[test]
fn without_a_ghost_kernel_start_fails_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let err = GhostEnforcer::start(&dir.path().join("ghost"), &[0, 1])
        .err()
        .expect("no ghostfs here");
    let text = crate::base::chain(&err);
    assert!(text.contains("ghOSt is not present"), "{text}");
    let err = GhostEnforcer::start(dir.path(), &[0])
        .err()
        .expect("one CPU");
    let text = crate::base::chain(&err);
    assert!(text.contains("at least two CPUs"), "{text}");
}

fn record(name: &str, baseline: f64, tids: [u32; 2]) -> VmRecord {
    VmRecord {
        name: name.into(),
        pid: 1,
        wrapper_pid: 1,
        vcpus: 2,
        baseline,
        mode: crate::credit::Mode::Standard,
        vcpu_tids: tids.to_vec(),
        config: PathBuf::new(),
        qmp_socket: PathBuf::new(),
        qemu_start: 0,
        boot_id: String::new(),
        source: Default::default(),
        agent_socket: None,
    }
}

/// The model's CPUs running in real time from the moment the enclave exists, as the
/// enforcer's agent reads the real clock.
struct RealTime {
    model: Model,
}

impl RealTime {
    fn start(model: &Model) -> RealTime {
        assert!(
            model.wait_for_enclave(1, Duration::from_secs(5)),
            "no enclave"
        );
        model.run_in_real_time(1);
        RealTime {
            model: model.clone(),
        }
    }

    /// CPU time the threads `tids` got (those still in the enclave).
    fn used(&self, tids: &[u32]) -> u64 {
        tids.iter()
            .filter_map(|&t| self.model.task(1, Model::gtid(t)))
            .map(|t| t.runtime)
            .sum()
    }

    /// Each VM's rate, % of one CPU, over `secs` of real time from now.
    fn rates(&self, vms: &[&[u32]], secs: f64) -> Vec<f64> {
        let start = Instant::now();
        let before: Vec<u64> = vms.iter().map(|t| self.used(t)).collect();
        std::thread::sleep(Duration::from_secs_f64(secs));
        let ns = start.elapsed().as_nanos() as f64;
        vms.iter()
            .zip(before)
            .map(|(t, u0)| self.used(t).saturating_sub(u0) as f64 * 100.0 / ns)
            .collect()
    }
}

/// Issue 20: `GhostEnforcer`, the enforcer `agent --enforcer ghost` uses, had only compiled.
/// Here it runs on the kernel model, with its own global agent thread and two satellites
/// blocking in the model's `GHOST_IOC_RUN`, driven through the `Enforcer` calls the agent
/// makes: two busy 2-vCPU VMs on two CPUs, one with credits (baseline 80 %), one held to its
/// 20 % baseline; then a live edit of the second's baseline to 60 % (which never reached the
/// ghOSt policy before: frozen at attach); then the first detached, its threads back to CFS.
/// Measured (debug build, four runs, two of them beside two busy loops on the 2 cores), % of
/// one CPU: 179.26–180.76 / 19.24–20.74, then 139.17–140.50 / 59.51–60.81, then the small VM
/// alone 57.17–58.67 (a step of this agent loop takes about 250 µs against the model, so a VM
/// alone waits that long each time its budget comes back; 57.71 with the 1-ms minimum slice).
/// A release build, whose agent dispatched each 100 µs of budget the moment it came back, held
/// that VM to 52.1–53.8 % before the minimum slice became 1 ms: 59.56 and 59.75 % since. Bound
/// 5 points: the agent thread spins on a shared host and is late when starved. So it runs with
/// the CPU-share tests (.config/nextest.toml): in CI's parallel phase, beside five other tests
/// and a release build, the small VM alone got 66.12 %.
#[test]
fn the_enforcer_runs_on_the_kernel_model_and_takes_live_edits() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ghost");
    let model = Model::new(&root, &[91]);
    let host = {
        let model = model.clone();
        GhostHost {
            kernel: Arc::new(move || Box::new(model.clone())),
            possible_cpus: NCPUS,
            pin: false,
        }
    };
    let mut e = GhostEnforcer::start_on(&root, &[0, 1, 2], host).unwrap();
    assert!(e.describe().contains("CPU 0"), "{}", e.describe());
    let time = RealTime::start(&model);
    let (big, small) = ([7001, 7002], [7101, 7102]);
    let entitle = |e: &mut GhostEnforcer, vm: &str, cap: u64, baseline: u64| {
        let entitled = SpareRule::Headroom
            .entitlement(Rate(cap), Rate(baseline))
            .unwrap();
        e.apply(vm, entitled.cap, Rate(2_000_000)).unwrap();
        e.entitle(vm, entitled).unwrap();
    };
    e.attach(&record("big", 40.0, big)).unwrap();
    e.attach(&record("small", 10.0, small)).unwrap();
    entitle(&mut e, "big", 2_000_000, 800_000);
    entitle(&mut e, "small", 200_000, 200_000);
    let mut seen: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut phase = |what: &'static str, want: &[f64], tids: &[&[u32]]| {
        time.rates(tids, 1.0); // settle
        let got = time.rates(tids, 2.0);
        eprintln!("{what}: {got:.2?} % of one CPU, planned {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 5.0, "{what}: {got:.2?} against {want:?}");
        }
        seen.insert(what, got);
    };
    phase("attached", &[180.0, 20.0], &[&big, &small]);
    // A live edit of the small VM's baseline (30 % a vCPU), its cap with it.
    entitle(&mut e, "small", 600_000, 600_000);
    phase("baseline edited", &[140.0, 60.0], &[&big, &small]);
    e.detach("big").unwrap();
    phase("big detached", &[0.0, 60.0], &[&big, &small]);
    let gone = model
        .task(1, Model::gtid(big[0]))
        .is_none_or(|t| !t.runnable);
    assert!(gone, "the detached VM's threads left the enclave");
    assert!(matches!(
        e.entitle("big", Entitlement::default()),
        Err(EnforceError::NotAttached { .. })
    ));
    drop(e);
    assert!(
        !model.has_enclave(1),
        "dropping the enforcer destroys the enclave"
    );
    drop(time);
}
