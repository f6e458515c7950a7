//! A libvirt domain's vCPU threads under the cgroup enforcer: where they go (v1: our tree, as
//! any VM's; v2: a threaded child of the domain's own cgroup, since v2 moves threads only inside
//! their process's threaded subtree) and how they go back to libvirt's `vcpuN` groups when the
//! domain is let go while it runs.

use std::fs;
use std::path::{Path, PathBuf};

use super::{err, Attached, CgroupEnforcer, Version};
use crate::enforce::EnforceError;
use crate::state::VmRecord;

/// A libvirt domain's cgroup directory, relative to the mount.
pub(super) fn libvirt_cgroup(vm: &VmRecord) -> Option<&str> {
    match &vm.source {
        crate::state::Source::Libvirt {
            cgroup: Some(dir), ..
        } => Some(dir.trim_start_matches('/')),
        _ => None,
    }
}

impl CgroupEnforcer {
    /// For a libvirt domain, each vCPU thread's `vcpuN` group in libvirt's tree.
    pub(super) fn home_of(&self, vm: &VmRecord) -> Vec<(u32, PathBuf)> {
        let Some(dir) = libvirt_cgroup(vm) else {
            return Vec::new();
        };
        let domain = self.mount.join(dir);
        vm.vcpu_tids
            .iter()
            .enumerate()
            .map(|(n, &tid)| (tid, domain.join(format!("vcpu{n}"))))
            .collect()
    }

    /// v2, libvirt domain: the vCPU threads into a threaded child `burst-qemu` of the domain's
    /// cgroup (libvirt enables `cpu` for its children), QEMU's process left where it is.
    pub(super) fn attach_in_domain(
        &mut self,
        vm: &VmRecord,
        domain: &Path,
        home: Vec<(u32, PathBuf)>,
    ) -> Result<(), EnforceError> {
        if !domain.is_dir() {
            return Err(EnforceError::Unsupported {
                what: "the libvirt domain's cgroup is missing:",
                path: domain.to_owned(),
            });
        }
        let vcpus = domain.join("burst-qemu");
        fs::create_dir_all(&vcpus).map_err(err("creating", &vcpus))?;
        let kind = fs::read_to_string(vcpus.join("cgroup.type")).unwrap_or_default();
        if kind.trim() != "threaded" {
            self.write(&vcpus.join("cgroup.type"), "threaded")?;
        }
        let foreign: Vec<String> = fs::read_to_string(vcpus.join("cgroup.threads"))
            .unwrap_or_default()
            .split_whitespace()
            .filter(|id| id.parse().is_ok_and(|t: u32| !vm.vcpu_tids.contains(&t)))
            .map(str::to_owned)
            .collect();
        for tid in &vm.vcpu_tids {
            self.write(&vcpus.join("cgroup.threads"), &tid.to_string())?;
        }
        for id in foreign {
            let _ = self.write(&domain.join("emulator").join("cgroup.threads"), &id);
        }
        self.vms.insert(
            vm.name.clone(),
            Attached {
                vcpus,
                home,
                in_domain: true,
                written: None,
                weight: None,
                kept: Default::default(),
            },
        );
        Ok(())
    }

    /// A libvirt domain's vCPU threads back into libvirt's `vcpuN` groups (those that still
    /// exist: a stopped domain's tree is gone with its threads).
    pub(super) fn send_home(&mut self, a: &Attached) {
        let list = match self.version {
            Version::V1 => "tasks",
            Version::V2 => "cgroup.threads",
        };
        for (tid, dir) in &a.home {
            if dir.is_dir() {
                let _ = self.write(&dir.join(list), &tid.to_string());
            }
        }
    }
}
