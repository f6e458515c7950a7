//! The agent's libvirt watcher (`agent --libvirt [URI]`, feature `libvirt`): which domains of
//! the connection are in the fleet, and what happens to them as they start, stop, move and
//! change.
//!
//! Once a second (with the agent's rescan) one `virConnectGetAllDomainStats` call lists every
//! domain's state, id and vCPU count. A running domain is in the fleet when it opts in — a
//! `vms/NAME.toml`, or burst-qemu's `<config>` element in its `<metadata>` (read from libvirt's
//! status file, so no call per domain) — with a valid config, and the two agreeing when both
//! exist. The watcher then writes the domain's record into a runtime dir of the state dir
//! (`state::place_foreign`), and from there it is a VM like any other: the agent's scan adopts
//! it, charges it, enforces it, publishes it. What only a domain needs is decided here and
//! carried out by the agent (`watch::Action`):
//!
//! - a departure (shut down, destroyed, crashed, saved, migrated away, undefined, restarted):
//!   the VM ends at once (nothing more is charged here), its checkpoint goes into the persistent
//!   definition, its runtime dir is removed (libvirt removes its cgroups);
//! - an edit of the `<config>` element (the status file changes): the config is applied, as a
//!   file edit is; the element and the file both gone: the domain is let go while it runs
//!   (threads back to libvirt's groups);
//! - a vCPU count change (hotplug): the VM is taken again with its new threads, balance kept;
//! - every [`CHECKPOINT_EVERY`](crate::agent::CHECKPOINT_EVERY) (when the balance moved) and
//!   when the agent stops: the checkpoint into the running domain's metadata (live, and
//!   persistent when it has a definition), so that a saved image or a migrated domain carries
//!   its credits.
//!
//! A VM stays alive while its QEMU does (pid and start time), not while libvirtd answers:
//! with libvirtd down the agent goes on charging and enforcing from `/proc` and cgroups and
//! reconnects every couple of seconds; the first poll after it is back reconciles whatever
//! happened meanwhile. The same reconciliation runs when the agent starts.
//!
//! | file | what |
//! |---|---|
//! | `apply` | the agent's side: starts the watcher, carries out its actions, answers for its domains |
//! | `checkpoint` | the credit checkpoints written into the domains' `<metadata>` |
//! | `watch` | the watcher: one poll of the connection → who arrives, departs, changes (its actions) |
//! | `publish` | what the watcher sees, in [`LIBVIRT_JSON`] for `burst-qemu check` |
//!
//! Each file uses only those below it in this table (and the agent's own modules).

mod apply;
mod checkpoint;
mod publish;
mod watch;

pub use publish::{by_name, read_published, Published, PublishedDomain, LIBVIRT_JSON};
pub use watch::glob;
pub(in crate::agent) use watch::Watch;
