//! VM sources: where the VMs burst-qemu manages come from, other than its own launcher.
//!
//! | source | how a VM is found | its vCPU threads | its control |
//! |---|---|---|---|
//! | [`libvirt`] | a libvirt connection's domains that opt in (domain `<metadata>` or `vms/NAME.toml`) | libvirt's status XML, else thread names | the libvirt API (feature `libvirt`) |
//! | [`adopt`] | an operator names a QEMU pid (`adopt --pid`) | QMP `query-cpus-fast` on a free socket, else thread names | QMP when a socket is given |
//!
//! Each yields the same facts the launcher records for its own VMs (QEMU's pid and start
//! time, the vCPU thread ids in vCPU order); the agent's integration (a source kind in the VM
//! record, one control-handle trait implemented by QMP and libvirt) is phase 2 of issue 21 and
//! is described in `libvirt`'s module documentation.

pub mod adopt;
pub mod libvirt;
pub mod threads;
