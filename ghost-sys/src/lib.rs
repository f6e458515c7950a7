//! Raw types and constants of the ghOSt kernel ABI.
//!
//! This crate is a placeholder in the workspace until the ABI mirror lands (issue 5).
#![warn(missing_docs)]

/// The ghOSt ABI version this crate mirrors.
pub const GHOST_VERSION: u32 = 91;
