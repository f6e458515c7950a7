//! The `burst-qemu` command.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("burst-qemu: error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}
