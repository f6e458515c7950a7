//! The agent's side of the vCPU pinning balancer (`--balance cpu`): each interval, the VMs'
//! vCPU threads, config CPU lists and caps go to [`crate::balance::pin::PinBalancer`], and the
//! pins and pin-change counts it reports come back to be published with each VM's credits.

use super::Agent;
use crate::balance::pin::VmInput;
use crate::credit::PPM_PER_CPU;

impl Agent {
    /// Runs the pinning balancer when it is on and its interval has passed.
    pub(super) fn balance_cpus(&mut self) {
        if !self.balancer.as_ref().is_some_and(|b| b.due()) {
            return;
        }
        let mut names: Vec<&String> = self.vms.keys().collect();
        names.sort();
        let vms: Vec<&super::vm::Vm> = names.iter().filter_map(|n| self.vms.get(*n)).collect();
        // Each VM's vCPUs are pinned through its control handle (libvirt's API for a domain).
        let controls: Vec<_> = vms.iter().map(|vm| self.control_of(&vm.record)).collect();
        let inputs: Vec<VmInput> = vms
            .iter()
            .zip(&controls)
            .map(|(vm, control)| {
                // The credit grant, not the contention allocation (see crate::balance::cpu).
                let cap = vm.ledger.grant().rate;
                VmInput {
                    name: &vm.record.name,
                    pid: vm.record.pid,
                    tids: &vm.record.vcpu_tids,
                    allowed: vm.config.cpus.as_deref(),
                    cap_cpus: cap.0 as f64 / PPM_PER_CPU as f64,
                    control: control.as_ref(),
                }
            })
            .collect();
        let Some(balancer) = self.balancer.as_mut() else {
            return;
        };
        balancer.step(&inputs, &self.settings.state_dir);
        for vm in self.vms.values_mut() {
            let name = &vm.record.name;
            vm.pins = balancer
                .pins(name)
                .map(|p| (p.clone(), balancer.changes(name)));
        }
    }
}
