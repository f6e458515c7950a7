//! A synchronous QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! This crate is a placeholder in the workspace until the client lands (issue 3): it will
//! wrap the `qapi` crate's typed commands with a reader that turns EOF, garbage and error
//! replies into typed errors instead of panicking.
#![warn(missing_docs)]
