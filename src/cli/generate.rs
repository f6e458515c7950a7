//! `burst-qemu generate` (hidden): the man pages and shell completions, from the clap
//! definition itself, for the Debian package (contrib/deb/build) or a manual install.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{agent_args, Cli, Failure};

#[derive(Debug, Args)]
pub(super) struct GenerateArgs {
    /// Write a man page per visible command here: burst-qemu.1, burst-qemu-agent.1, …
    #[arg(long, value_name = "DIR")]
    man: Option<PathBuf>,
    /// Write the completions here: burst-qemu.bash, _burst-qemu (zsh), burst-qemu.fish.
    #[arg(long, value_name = "DIR")]
    completions: Option<PathBuf>,
}

pub(super) fn generate(a: &GenerateArgs) -> Result<(), Failure> {
    if let Some(dir) = &a.man {
        man_pages(dir).map_err(Failure::host)?;
    }
    if let Some(dir) = &a.completions {
        completions(dir).map_err(Failure::host)?;
    }
    Ok(())
}

/// Text for roff: backslashes and hyphens escaped, no line starting with a control character.
fn roff_text(text: &str) -> String {
    text.replace('\\', "\\e")
        .replace('-', "\\-")
        .lines()
        .map(|l| {
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else if l.is_empty() {
                ".PP".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One page per visible command, named as git names its own (`burst-qemu-agent.1`).
fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut root = Cli::command().disable_help_subcommand(true);
    root.build();
    let date = env!("BURST_QEMU_COMMIT")
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_owned();
    let mut commands = vec![root.clone()];
    commands.extend(root.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    let names: Vec<String> = commands
        .iter()
        .map(|c| c.get_display_name().unwrap_or(c.get_name()).to_owned())
        .collect();
    for (cmd, name) in commands.into_iter().zip(&names) {
        let is_agent = cmd.get_name() == "agent";
        let man = clap_mangen::Man::new(cmd)
            .date(date.clone())
            .source(format!("burst-qemu {}", env!("CARGO_PKG_VERSION")))
            .manual("burst-qemu manual");
        let mut page = Vec::new();
        man.render_title(&mut page)?;
        man.render_name_section(&mut page)?;
        man.render_synopsis_section(&mut page)?;
        man.render_description_section(&mut page)?;
        man.render_options_section(&mut page)?;
        if name == "burst-qemu" {
            man.render_subcommands_section(&mut page)?;
        }
        if is_agent {
            writeln!(page, ".SH \"CONFIGURATION FILE\"")?;
            writeln!(page, "{}", roff_text(agent_args::CONFIG_HELP))?;
            writeln!(page, ".SH FILES")?;
            writeln!(page, ".TP\n/etc/burst\\-qemu/agent.toml\nThe configuration file; the package's copy documents every key.")?;
            writeln!(
                page,
                ".TP\n/run/burst\\-qemu\nThe state dir of the system's VMs (as root)."
            )?;
            writeln!(page, ".TP\n/var/lib/burst\\-qemu\nThe ledgers, kept across restarts, upgrades and reboots (as root).")?;
        }
        let see_also: Vec<String> = names
            .iter()
            .filter(|n| *n != name)
            .map(|n| format!("\\fB{}\\fR(1)", n.replace('-', "\\-")))
            .collect();
        writeln!(page, ".SH \"SEE ALSO\"\n{}", see_also.join(", "))?;
        if name == "burst-qemu" {
            man.render_version_section(&mut page)?;
        }
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `cmd` without its hidden options and commands (which clap_complete would offer).
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name().to_owned())
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(
            cmd.get_subcommands()
                .filter(|c| !c.is_hide_set())
                .map(visible),
        );
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        out = out.version(version.to_owned());
    }
    out
}

/// bash, zsh and fish completions.
fn completions(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (shell, file) in [
        (Shell::Bash, "burst-qemu.bash"),
        (Shell::Zsh, "_burst-qemu"),
        (Shell::Fish, "burst-qemu.fish"),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(
            shell,
            &mut visible(&Cli::command()),
            "burst-qemu",
            &mut text,
        );
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
