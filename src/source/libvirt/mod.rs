//! libvirt domains as burst-qemu VMs (issue 21, phase 1: everything but the agent loop).
//!
//! | file | what | needs |
//! |---|---|---|
//! | [`status`] | libvirt's status XML (pid, vCPU thread ids), a domain's cgroups from `/proc/PID/cgroup` | nothing |
//! | [`discover`] | a running domain's pid, start time, vCPU threads, cgroups, checked against `/proc` | nothing |
//! | [`metadata`] | our `<metadata>` elements: opt-in settings (the `vms/NAME.toml` keys) and the credit checkpoint | nothing |
//! | [`lifecycle`] | two polls of a connection → started, stopped (how), paused, resumed, undefined, renamed | nothing |
//! | `ffi` | declarations of libvirt's C API | feature `libvirt` (links `libvirt.so`) |
//! | `control` | a domain's control handle (run state, pause, pin, balloon) and the shared connection pool | feature `libvirt` |
//! | `conn` | the safe connection and domain handles: list, poll, states (every domain's state in one call, for `ls`), survey (state, UUID, name, pid, vCPU TIDs of every domain), metadata, pause, balloon, pin, save | feature `libvirt` |
//!
//! The pure parts build without libvirt, so the agent can read status files and metadata on any
//! build; only talking to libvirtd needs the feature (and `libvirt-dev` to link).
//!
//! # Why our own declarations, not the `virt` crate
//!
//! `virt` 0.5.0 (libvirt's own binding) and `virt-sys` 0.3.2 pin `libc = "=0.2.183"` (for
//! Rust 1.63 / Debian 12). Cargo.lock resolves optional dependencies too, so even behind a
//! feature that pin would downgrade the whole workspace (measured: `libc 0.2.191 → 0.2.183`
//! and `nix 0.31.3 → 0.31.2` in the lock for every build) and block any future dependency that
//! needs a newer libc. The only combination without the pin, `virt =0.4.3` with
//! `virt-sys =0.3.1`, builds here but needs two exact pins of an old release line of our own,
//! and still lacks what the agent needs beyond its safe API (the stats of all domains in one
//! call for polling). libvirt's C ABI is stable forever, the agent calls about thirty
//! functions, and every layout and constant is checked against the installed headers by
//! `tests/libvirt.rs`; so `ffi.rs` declares them.
#![doc = include_str!("../../../docs/libvirt-facts.md")]

#[cfg(feature = "libvirt")]
pub mod conn;
#[cfg(feature = "libvirt")]
pub mod control;
pub mod discover;
#[cfg(feature = "libvirt")]
pub mod ffi;
pub mod lifecycle;
pub mod metadata;
pub mod status;
