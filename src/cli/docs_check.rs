//! The book checked against the code: every relative link of `README.md` and `docs/*.md`
//! resolves (the file exists, and a `#anchor` names one of its headings), and every
//! `burst-qemu` command in their examples still parses with this CLI definition. A synopsis
//! (`[--opt]`, `A|B`, `<x>`, `…`, an upper-case placeholder such as `NAME`) is not a command and
//! is counted apart.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;

use super::Cli;

fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The text outside fenced code blocks, and the lines inside them.
fn split_fences(text: &str) -> (String, Vec<String>) {
    let (mut prose, mut code, mut fenced) = (String::new(), Vec::new(), false);
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if fenced {
            code.push(line.to_owned());
        } else {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    (prose, code)
}

fn anchors(page: &Path) -> BTreeSet<String> {
    let text = fs::read_to_string(page).unwrap();
    split_fences(&text)
        .0
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

/// `(label, target)` of every `[label](target)` in `prose`.
fn links(prose: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = prose;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_owned());
        }
    }
    out
}

#[test]
fn every_relative_link_of_the_book_resolves() {
    let mut bad = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = fs::read_to_string(&page).unwrap();
        for target in links(&split_fences(&text).0) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            if !path.exists() {
                bad.push(format!("{}: {target}: no such file", page.display()));
            } else if let Some(a) = anchor {
                if path.extension().is_some_and(|e| e == "md") && !anchors(&path).contains(a) {
                    bad.push(format!("{}: {target}: no such heading", page.display()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "dead links:\n{}", bad.join("\n"));
    assert!(
        checked >= 30,
        "only {checked} links found: is the book there?"
    );
}

/// The `burst-qemu …` commands of `text`: fenced lines (a `$ ` prompt and a trailing
/// `# comment` dropped, `\` continuations joined) and inline code spans.
fn commands(text: &str) -> Vec<String> {
    let (prose, code) = split_fences(text);
    let mut out = Vec::new();
    let mut joined = String::new();
    for line in code {
        let line = line.trim().trim_start_matches("$ ");
        let line = line.split(" #").next().unwrap().trim_end();
        if let Some(head) = line.strip_suffix('\\') {
            joined.push_str(head);
            continue;
        }
        joined.push_str(line);
        out.push(std::mem::take(&mut joined));
    }
    let mut spans = prose.split('`');
    spans.next();
    out.extend(spans.step_by(2).map(str::to_owned));
    out.into_iter()
        .map(|c| c.trim().to_owned())
        .filter(|c| c.starts_with("burst-qemu ") || c == "burst-qemu")
        .collect()
}

/// Whether `command` is a synopsis rather than a command to run.
fn synopsis(command: &str) -> bool {
    // After `--` come QEMU's own arguments: `…` there is just "and the rest".
    let ours = command.split(" -- ").next().unwrap();
    ours.contains(['[', '|', '<', '…'])
        || ours.contains("...")
        || ours.split_whitespace().any(|w| {
            !w.starts_with('-')
                && w.chars().any(|c| c.is_ascii_uppercase())
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_.=,".contains(c))
        })
}

/// Words of a command line, with '…' and "…" quotes removed (no expansions).
fn words(command: &str) -> Vec<String> {
    let (mut out, mut word, mut quote, mut any) = (Vec::new(), String::new(), None, false);
    for c in command.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            (_, c) => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(word);
    }
    out
}

#[test]
fn every_cli_example_of_the_book_parses() {
    let (mut parsed, mut synopses, mut bad) = (0, 0, Vec::new());
    for page in pages() {
        let text = fs::read_to_string(&page).unwrap();
        for command in commands(&text) {
            if synopsis(&command) {
                synopses += 1;
                continue;
            }
            let words = words(&command);
            if words.get(1).is_some_and(|w| w.ends_with(':')) {
                // A screen's title line (`burst-qemu top: 2 VMs …`), not a command.
                synopses += 1;
                continue;
            }
            match Cli::try_parse_from(&words) {
                Ok(_) => parsed += 1,
                // `--version` and `--help` end the parse by design.
                Err(e)
                    if matches!(
                        e.kind(),
                        clap::error::ErrorKind::DisplayVersion
                            | clap::error::ErrorKind::DisplayHelp
                    ) =>
                {
                    parsed += 1
                }
                // `burst-qemu simulate` named in prose: the command exists, its arguments
                // are elsewhere.
                Err(e)
                    if words.len() == 2
                        && e.kind() == clap::error::ErrorKind::MissingRequiredArgument =>
                {
                    parsed += 1
                }
                Err(e) => bad.push(format!(
                    "{}: `{command}`: {}",
                    page.display(),
                    e.to_string().lines().next().unwrap_or("")
                )),
            }
        }
    }
    eprintln!("book: {parsed} burst-qemu commands parse, {synopses} synopses not run");
    assert!(
        bad.is_empty(),
        "examples that no longer parse:\n{}",
        bad.join("\n")
    );
    assert!(
        parsed >= 20,
        "only {parsed} commands found: is the book there?"
    );
}

#[test]
fn the_checks_tell_a_command_from_a_synopsis_and_quote_words() {
    assert!(synopsis("burst-qemu plot NAME [--since 6h]"));
    assert!(synopsis("burst-qemu credits NAME"));
    assert!(!synopsis(
        "burst-qemu --vcpus 2 --baseline 5 -- qemu-system-x86_64 …"
    ));
    assert!(!synopsis("burst-qemu credits web1 --set 50"));
    assert_eq!(
        words("burst-qemu a 'b c' \"d\""),
        ["burst-qemu", "a", "b c", "d"]
    );
    assert_eq!(slug("`burst-qemu simulate`"), "burst-qemu-simulate");
    assert_eq!(
        slug("sched_ext: burst-qemu's own scheduler on Linux 6.12"),
        "sched_ext-burst-qemus-own-scheduler-on-linux-612"
    );
    assert!(Cli::try_parse_from(["burst-qemu", "no-such-command", "--bogus"]).is_err());
}
