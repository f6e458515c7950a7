//! A VM's config file as the agent reads it: parsed and validated, then checked against the
//! running VM (its vCPU count is fixed while QEMU runs). Used at adoption, at every edit, and
//! for libvirt domains (whose settings may also come from the domain's metadata).

use std::io;

use crate::config::{self, ConfigError, VmConfig};
use crate::state::VmRecord;

/// Why a VM's config file cannot be applied.
pub(super) enum Unusable {
    /// The file is missing (an editor between unlink and rename: the next event brings it).
    Missing,
    /// It is invalid, or does not fit the running VM; the message names file, line and field.
    Invalid(String),
}

/// Reads and validates `record`'s config file, and checks it fits the running VM.
pub(super) fn read_config(record: &VmRecord) -> Result<VmConfig, Unusable> {
    match config::load(&record.config) {
        Ok(cfg) if cfg.policy.vcpus() != record.vcpus => Err(Unusable::Invalid(format!(
            "{}: vcpus = {} differs from the running VM's {} vCPUs; restart the VM to change it",
            record.config.display(),
            cfg.policy.vcpus(),
            record.vcpus
        ))),
        Ok(cfg) => Ok(cfg),
        Err(ConfigError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Err(Unusable::Missing)
        }
        Err(e) => Err(Unusable::Invalid(e.to_string())),
    }
}
