//! What the agent does differently for a libvirt domain, without a libvirt call: its config
//! from either opt-in (`vms/NAME.toml`, the `<metadata>` element) and never from two that
//! disagree, and its ledger — owned by the domain's UUID, continued from the newer of the
//! local ledger and the domain's metadata checkpoint (the gap since a checkpoint charged at the
//! grant). A libvirt VM whose connection this agent does not watch is let go: its vCPU
//! threads back in libvirt's groups, its runtime dir removed.

use std::fs;
use std::path::Path;

use super::vm::Vm;
use super::vm_config::{read_config, Unusable};
use super::{Agent, LedgerFile, TICK};
use crate::base::chain;
use crate::config::{self, VmConfig};
use crate::credit::Ledger;
use crate::source::libvirt::metadata::{self, Checkpoint, CONFIG_NS};
use crate::state::{self, Source, VmRecord};

/// How often a running domain's checkpoint is written into its metadata (when its balance
/// changed); a domain that leaves without the agent seeing it carries one at most this old.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A domain's config from its two opt-ins: the file `record.config` and the metadata element
/// `element` (its text, as libvirt stores it). Either alone is used; both must agree.
pub(super) fn combined_config(
    record: &VmRecord,
    element: Option<&str>,
) -> Result<VmConfig, Unusable> {
    let file = match read_config(record) {
        Ok(c) => Some(c),
        Err(Unusable::Missing) => None,
        Err(e) => return Err(e),
    };
    let meta = element
        .map(|x| metadata::parse_config(&record.name, x, record.vcpus))
        .transpose()
        .map_err(|e| Unusable::Invalid(e.to_string()))?;
    match (file, meta) {
        (None, None) => Err(Unusable::Missing),
        (Some(c), None) | (None, Some(c)) => Ok(c),
        (Some(f), Some(m)) if f == m => Ok(f),
        (Some(f), Some(m)) => Err(Unusable::Invalid(format!(
            "{} and the domain's <metadata> element {CONFIG_NS} both set {}'s config, and they differ ({}): remove one or make them agree",
            record.config.display(),
            record.name,
            differences(&f, &m)
        ))),
    }
}

/// The settings two configs set differently: `file: baseline = 20; metadata: baseline = 30`.
fn differences(file: &VmConfig, meta: &VmConfig) -> String {
    let lines = |c: &VmConfig| -> Vec<String> {
        config::render(c)
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(" = "))
            .map(str::to_owned)
            .collect()
    };
    let (f, m) = (lines(file), lines(meta));
    let only = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|l| !b.contains(l)).cloned().collect()
    };
    format!(
        "file: {}; metadata: {}",
        only(&f, &m).join(", "),
        only(&m, &f).join(", ")
    )
}

/// Whether a saved ledger may be continued by the domain `uuid`: its own, or one without an
/// owner (a burst-qemu VM of the same name, now defined in libvirt). Another domain's ledger
/// (a domain undefined, and another defined with its name) is moved aside, never taken.
pub(super) fn own_ledger(path: &Path, saved: Option<LedgerFile>, uuid: &str) -> Option<LedgerFile> {
    let s = saved?;
    match &s.uuid {
        Some(owner) if !owner.eq_ignore_ascii_case(uuid) => {
            let aside = path.with_extension(format!("json.{owner}"));
            tracing::warn!(
                "{}: the ledger {} belongs to another domain (UUID {owner}): kept as {}, not continued",
                s.name,
                path.display(),
                aside.display()
            );
            let _ = fs::rename(path, aside);
            None
        }
        _ => Some(s),
    }
}

/// Continues `vm` (a domain that is not the QEMU the local ledger last saw) from its metadata
/// checkpoint `cp` when that is newer than the local ledger (`local_saved_ns`, 0 for none):
/// the checkpoint's balances, then the time since it was written (at most a checkpoint
/// interval and a tick: longer, and the domain was not running) charged as if the domain had
/// used its whole grant, with the baseline earned as every tick earns it: the most it could
/// have done, so the gap never gives credits away.
pub(super) fn continue_from_checkpoint(vm: &mut Vm, cp: Option<Checkpoint>, local_saved_ns: u64) {
    let Some(uuid) = vm.record.source.libvirt_uuid() else {
        return;
    };
    let Some(cp) = cp else { return };
    let name = vm.record.name.clone();
    if !cp.belongs_to(uuid) {
        tracing::warn!(
            "{name}: its metadata checkpoint was written for domain {} (a copied definition): ignored",
            cp.uuid
        );
        return;
    }
    if cp.vcpus != vm.record.vcpus || cp.at_unix_ns <= local_saved_ns {
        return;
    }
    let now = crate::base::unix_now_ns();
    let max_gap = (CHECKPOINT_EVERY + TICK).as_nanos() as u64;
    let gap = now.saturating_sub(cp.at_unix_ns).min(max_gap);
    let charge = cp.gap_charge(now, max_gap);
    let policy = vm.ledger.policy().clone();
    vm.ledger = Ledger::restore(policy, cp.balances);
    vm.ledger.set_interval(TICK.as_nanos() as u64);
    vm.ledger.tick(gap, charge.vcpu_ns());
    vm.used_total = crate::credit::Credits(cp.used.vcpu_ns() + charge.vcpu_ns());
    vm.credits_applied = cp.credits_applied;
    vm.last_grant = vm.ledger.grant().rate;
    tracing::info!(
        "{name}: continues from its metadata checkpoint (written by {} {:.1} s ago): balance {}, the gap charged at its grant ({:.3} vCPU-s)",
        cp.host,
        now.saturating_sub(cp.at_unix_ns) as f64 / 1e9,
        vm.ledger.balances().balance(),
        charge.vcpu_ns() as f64 / 1e9
    );
}

/// The checkpoint of a saved ledger (what a departed domain carries in its definition): final,
/// so the domain started from it owes no gap.
pub fn checkpoint_of(file: &LedgerFile, uuid: &str, host: &str) -> Option<Checkpoint> {
    let policy = file.policy.clone()?;
    let grant = Ledger::restore(policy.clone(), file.balances).grant().rate;
    Some(Checkpoint {
        uuid: uuid.to_owned(),
        balances: file.balances,
        used: file.used_total,
        mode: policy.mode(),
        grant,
        vcpus: file.vcpus,
        at_unix_ns: file.saved_unix_ns,
        host: host.to_owned(),
        credits_applied: file.credits_applied,
        departed: true,
    })
}

/// The checkpoint of a running VM's ledger now.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub(super) fn checkpoint_now(vm: &Vm, uuid: &str, host: &str) -> Checkpoint {
    Checkpoint {
        uuid: uuid.to_owned(),
        balances: vm.ledger.balances(),
        used: vm.used_total,
        mode: vm.ledger.policy().mode(),
        grant: vm.last_grant,
        vcpus: vm.record.vcpus,
        at_unix_ns: crate::base::unix_now_ns(),
        host: host.to_owned(),
        credits_applied: vm.credits_applied,
        departed: false,
    }
}

/// This host's name, for checkpoints (people read it; nothing decides on it).
pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

impl Agent {
    /// Lets go of a libvirt VM no watcher of this agent serves (the agent was started without
    /// `--libvirt`, or for another connection): its threads back in libvirt's groups, its
    /// runtime dir removed. Its ledger stays as last saved.
    pub(super) fn release_unwatched(&mut self, record: &VmRecord) {
        let Source::Libvirt { uri, .. } = &record.source else {
            return;
        };
        if record.qemu_alive_in(&self.settings.proc) {
            // Attached again (idempotent) so that the enforcer knows where the threads go home.
            let _ = self.enforcer.attach(record);
            if let Err(e) = self.enforcer.detach(&record.name) {
                tracing::warn!("{}: {}", record.name, chain(&e));
            }
        }
        state::remove_foreign(&self.settings.state_dir, &record.name);
        tracing::warn!(
            "{}: libvirt domain let go: this agent does not watch {uri} (agent --libvirt {uri} manages it)",
            record.name
        );
    }
}

/// Without the `libvirt` feature no connection is watched: libvirt VMs in the state dir are
/// let go, and no checkpoint is read or written.
#[cfg(not(feature = "libvirt"))]
impl Agent {
    pub(super) fn start_libvirt(&mut self) {
        if let Some(s) = &self.settings.libvirt {
            tracing::error!(
                "this burst-qemu was built without the `libvirt` feature: {} is not watched",
                s.uri
            );
        }
    }
    pub(super) fn serves_libvirt(&self, _uri: &str) -> bool {
        false
    }
    pub(super) fn metadata_element(&self, _uuid: &str) -> Option<String> {
        None
    }
    pub(super) fn take_arrival_checkpoint(&mut self, _uuid: &str) -> Option<Checkpoint> {
        None
    }
    pub(super) fn libvirt_control(
        &self,
        record: &VmRecord,
    ) -> std::sync::Arc<dyn crate::control::Control> {
        std::sync::Arc::new(crate::control::Unavailable {
            name: record.name.clone(),
            why: "this burst-qemu was built without the `libvirt` feature".into(),
        })
    }
    pub(super) fn poll_libvirt(&mut self, _events: &mut super::Events) {}
    pub(super) fn checkpoint_domains(&mut self, _force: bool) {}
    pub(super) fn checkpoint_soon(&mut self, _record: &VmRecord) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credit::{Balances, Baseline, Credits, Mode, Policy, Rate};

    fn record(dir: &Path) -> VmRecord {
        VmRecord {
            name: "web".into(),
            pid: 1,
            wrapper_pid: 0,
            vcpus: 2,
            baseline: 10.0,
            mode: Mode::Standard,
            vcpu_tids: vec![2, 3],
            config: dir.join("web.toml"),
            qmp_socket: Default::default(),
            qemu_start: 0,
            boot_id: String::new(),
            source: Source::Libvirt {
                uri: "qemu:///system".into(),
                uuid: "u-1".into(),
                cgroup: None,
            },
            agent_socket: None,
        }
    }

    #[test]
    fn either_opt_in_alone_is_used_and_two_that_differ_are_refused_with_both_named() {
        let dir = tempfile::tempdir().unwrap();
        let r = record(dir.path());
        assert!(matches!(combined_config(&r, None), Err(Unusable::Missing)));
        let meta = r#"<config baseline="20"/>"#;
        let c = combined_config(&r, Some(meta)).ok().unwrap();
        assert_eq!(c.policy.baseline().percent(), 20.0);
        fs::write(&r.config, "vcpus = 2\nbaseline = 20\n").unwrap();
        assert_eq!(combined_config(&r, None).ok().unwrap(), c);
        assert_eq!(combined_config(&r, Some(meta)).ok().unwrap(), c);
        let Err(Unusable::Invalid(why)) = combined_config(&r, Some(r#"<config baseline="30"/>"#))
        else {
            panic!("two configs that differ are refused");
        };
        assert!(why.contains("web.toml") && why.contains(CONFIG_NS), "{why}");
        assert!(
            why.contains("file: baseline = 20") && why.contains("metadata: baseline = 30"),
            "{why}"
        );
        // A bad element is named, never ignored.
        let Err(Unusable::Invalid(why)) = combined_config(&r, Some(r#"<config baseline="x"/>"#))
        else {
            panic!("a bad element is refused");
        };
        assert!(why.contains("baseline"), "{why}");
    }

    #[test]
    fn another_domains_ledger_is_moved_aside_and_an_ownerless_one_continued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.json");
        let policy = Policy::new(2, Baseline::from_percent(10.0).unwrap()).unwrap();
        let file = |uuid: Option<&str>| LedgerFile {
            name: "web".into(),
            vcpus: 2,
            policy: Some(policy.clone()),
            balances: Balances::default(),
            credits_applied: None,
            used_total: Credits::ZERO,
            checkpoint: None,
            uuid: uuid.map(str::to_owned),
            saved_unix_ns: 1,
        };
        assert!(own_ledger(&path, Some(file(Some("U-1"))), "u-1").is_some());
        assert!(own_ledger(&path, Some(file(None)), "u-1").is_some());
        file(Some("u-2")).save(&path).unwrap();
        assert!(own_ledger(&path, Some(file(Some("u-2"))), "u-1").is_none());
        assert!(!path.exists() && dir.path().join("web.json.u-2").exists());
        // A departed domain's checkpoint carries the ledger's balances, exactly.
        let cp = checkpoint_of(&file(None), "u-1", "h").unwrap();
        assert_eq!(cp.balances, Balances::default());
        assert_eq!((cp.vcpus, cp.at_unix_ns), (2, 1));
        assert_eq!(cp.grant, Rate(200_000), "at 0 credits: the baseline");
    }

    #[test]
    fn a_newer_checkpoint_is_continued_and_its_gap_charged_at_its_grant() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy::new(2, Baseline::from_percent(10.0).unwrap()).unwrap();
        let ledger = Ledger::new(policy.clone(), Credits::ZERO);
        let cfg = super::super::vm::fallback_config(&record(dir.path()));
        let mut vm = Vm::new(
            crate::procfs::Proc::host(),
            record(dir.path()),
            ledger,
            cfg,
            vec![],
            0,
        );
        let mut cp = Checkpoint {
            uuid: "U-1".into(),
            balances: Ledger::new(policy.clone(), Credits::from_credits(10.0).unwrap()).balances(),
            used: Credits(5),
            mode: Mode::Standard,
            grant: Rate(2_000_000),
            vcpus: 2,
            at_unix_ns: crate::base::unix_now_ns() - 10_000_000_000,
            host: "src".into(),
            credits_applied: Some(Credits(1)),
            departed: false,
        };
        // Older than the local ledger: not taken.
        continue_from_checkpoint(&mut vm, Some(cp.clone()), u64::MAX);
        assert_eq!(vm.ledger.balances().balance(), Credits::ZERO);
        // Another domain's: not taken.
        cp.uuid = "u-2".into();
        continue_from_checkpoint(&mut vm, Some(cp.clone()), 0);
        assert_eq!(vm.ledger.balances().balance(), Credits::ZERO);
        cp.uuid = "u-1".into();
        continue_from_checkpoint(&mut vm, Some(cp.clone()), 0);
        // 10 credits, minus about 10 s at the full grant of 2 vCPUs (20 vCPU-s), plus about
        // 10 s of the 0.2-vCPU baseline (2 vCPU-s): 10 - (20 - 2) / 60 ≈ 9.7 credits.
        let left = vm.ledger.balances().balance().as_credits();
        assert!((9.69..9.71).contains(&left), "{left}");
        assert_eq!(vm.credits_applied, Some(Credits(1)));
        assert!(vm.used_total.vcpu_ns() > 19_000_000_000);
    }
}
