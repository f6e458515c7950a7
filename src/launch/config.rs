//! The VM's name and its config at launch: `--name`, QEMU's `-name` or a generated one; the
//! config file when it exists (a flag that contradicts it is refused, unless `--force-config`),
//! else one built from the flags.

use std::path::Path;

use super::args::{option, qemu_name};
use super::{LaunchError, Request};
use crate::base::validate_name;
use crate::config::{self, VmConfig};
use crate::credit::{Baseline, Credits, Policy};

/// Resolves the VM's name from `--name`, QEMU's `-name`, or generates one.
pub(super) fn resolve_name(req: &Request) -> Result<String, LaunchError> {
    let args = &req.qemu[1..];
    let name = match (&req.name, option(args, "name").first()) {
        (Some(n), _) => n.clone(),
        (None, Some((_, v))) => qemu_name(v)
            .ok_or_else(|| {
                LaunchError::Usage(format!("cannot read a guest name from QEMU's -name {v:?}"))
            })?
            .to_owned(),
        (None, None) => format!("vm-{}", std::process::id()),
    };
    validate_name(&name).map_err(LaunchError::Usage)?;
    Ok(name)
}

/// The config in force: the file's when it exists (flags must agree, unless
/// `--force-config`), else built from the flags. Returns whether the file must be written.
pub(super) fn resolve_config(
    req: &Request,
    path: &Path,
    smp: Option<u32>,
) -> Result<(VmConfig, bool), LaunchError> {
    let usage = LaunchError::Usage;
    let flag_credits = req
        .credits
        .map(|c| {
            Credits::from_credits(c)
                .ok_or_else(|| usage(format!("--credits {c}: not a number of credits ≥ 0")))
        })
        .transpose()?;
    let flag_baseline = req
        .baseline
        .map(|b| Baseline::from_percent(b).map_err(|e| usage(format!("--baseline: {e}"))))
        .transpose()?;

    if path.exists() {
        let file = config::load(path)?;
        if !req.force_config {
            let mut conflicts = Vec::new();
            let p = &file.policy;
            if let Some(v) = req.vcpus.filter(|&v| v != p.vcpus()) {
                conflicts.push(format!("--vcpus {v} contradicts vcpus = {}", p.vcpus()));
            }
            if let Some(b) = flag_baseline.filter(|&b| b != p.baseline()) {
                conflicts.push(format!(
                    "--baseline {} contradicts baseline = {}",
                    b.percent(),
                    p.baseline().percent()
                ));
            }
            if let Some(m) = req.mode.filter(|&m| m != p.mode()) {
                conflicts.push(format!("--mode {m} contradicts mode = \"{}\"", p.mode()));
            }
            if let Some(c) = flag_credits.filter(|&c| c != file.initial_credits) {
                conflicts.push(format!(
                    "--credits {c} contradicts initial_credits = {}",
                    file.initial_credits
                ));
            }
            if !conflicts.is_empty() {
                return Err(usage(format!(
                    "{} in {} (edit the file, drop the flag, or pass --force-config to rewrite the file from the flags)",
                    conflicts.join("; "),
                    path.display()
                )));
            }
            return Ok((file, false));
        }
        // --force-config: the flags win, the file's other settings stay.
        let vcpus = req.vcpus.unwrap_or(file.policy.vcpus());
        let baseline = flag_baseline.unwrap_or(file.policy.baseline());
        let policy = Policy::new(vcpus, baseline)
            .map_err(|e| usage(format!("--vcpus: {e}")))?
            .with_mode(req.mode.unwrap_or(file.policy.mode()))
            .with_max_credits(file.policy.max_credits())
            .with_max_surplus(file.policy.max_surplus())
            .with_decline_minutes(
                file.policy.decline_ns() as f64 / crate::credit::NS_PER_MIN as f64,
            )
            .map_err(|e| usage(e.to_string()))?;
        let cfg = VmConfig {
            policy,
            initial_credits: flag_credits.unwrap_or(file.initial_credits),
            credits: file.credits,
            disk_share: file.disk_share,
            cpus: file.cpus,
            memory: file.memory,
        };
        return Ok((cfg, true));
    }

    let vcpus = req.vcpus.or(smp).ok_or_else(|| {
        usage(format!(
            "--vcpus is required: {} does not exist and QEMU has no -smp",
            path.display()
        ))
    })?;
    let baseline = flag_baseline.ok_or_else(|| {
        usage(format!(
            "--baseline is required: {} does not exist",
            path.display()
        ))
    })?;
    let policy = Policy::new(vcpus, baseline)
        .map_err(|e| usage(format!("--vcpus: {e}")))?
        .with_mode(req.mode.unwrap_or_default());
    let cfg = VmConfig {
        initial_credits: flag_credits.unwrap_or(Policy::default_initial_credits(vcpus)),
        policy,
        credits: None,
        disk_share: None,
        cpus: None,
        memory: None,
    };
    Ok((cfg, true))
}
