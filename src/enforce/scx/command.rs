//! The agent's commands to the scheduler process (`burst-qemu scx-scheduler`): one line of
//! text each on its standard input, written by [`super::ScxEnforcer`] and read by
//! [`super::loader`]. Pure: formatting and parsing only.

use super::MAX_VMS;

/// One command from the agent to the scheduler process, one line of text each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `vm IDX BASE_NS GRANT_NS WEIGHT NAME`: VM `NAME` (slot `IDX`) may run `GRANT_NS` of CPU
    /// per period, of which `BASE_NS` before any VM gets more than its own baseline; between
    /// the two it is served by its spare `WEIGHT` (ns per period: `struct budget`'s weight,
    /// [`super::abi::Budget::weight`]).
    Vm {
        idx: u32,
        base_ns: u64,
        grant_ns: u64,
        weight: u64,
        name: String,
    },
    /// `free IDX`: the slot is unused.
    Free { idx: u32 },
    /// `tid TID IDX`: thread `TID` is a vCPU of VM slot `IDX`.
    Tid { tid: u32, idx: u32 },
    /// `untid TID`.
    Untid { tid: u32 },
}

impl Command {
    /// The line for this command (with its newline).
    pub fn line(&self) -> String {
        match self {
            Command::Vm {
                idx,
                base_ns,
                grant_ns,
                weight,
                name,
            } => format!("vm {idx} {base_ns} {grant_ns} {weight} {name}\n"),
            Command::Free { idx } => format!("free {idx}\n"),
            Command::Tid { tid, idx } => format!("tid {tid} {idx}\n"),
            Command::Untid { tid } => format!("untid {tid}\n"),
        }
    }

    /// Parses one line; `Err` says what is wrong with it.
    pub fn parse(line: &str) -> Result<Command, String> {
        let mut words = line.split_ascii_whitespace();
        let verb = words.next().ok_or("empty line")?;
        let mut num = |what: &str| -> Result<u64, String> {
            let w = words.next().ok_or(format!("{verb}: missing {what}"))?;
            w.parse()
                .map_err(|_| format!("{verb}: {what} {w:?} is not a number"))
        };
        let idx_of = |v: u64| -> Result<u32, String> {
            if v < u64::from(MAX_VMS) {
                Ok(v as u32)
            } else {
                Err(format!("VM slot {v} out of range (0..{MAX_VMS})"))
            }
        };
        let tid_of = |v: u64| u32::try_from(v).map_err(|_| format!("thread id {v} out of range"));
        let cmd = match verb {
            "vm" => Command::Vm {
                idx: idx_of(num("slot")?)?,
                base_ns: num("baseline")?,
                grant_ns: num("grant")?,
                weight: num("weight")?,
                name: match words.next() {
                    Some(n) if crate::base::validate_name(n).is_ok() => n.to_owned(),
                    Some(n) => return Err(format!("vm: bad name {n:?}")),
                    None => return Err("vm: missing name".into()),
                },
            },
            "free" => Command::Free {
                idx: idx_of(num("slot")?)?,
            },
            "tid" => Command::Tid {
                tid: tid_of(num("thread id")?)?,
                idx: idx_of(num("slot")?)?,
            },
            "untid" => Command::Untid {
                tid: tid_of(num("thread id")?)?,
            },
            other => return Err(format!("unknown command {other:?}")),
        };
        if words.next().is_some() {
            return Err(format!("{verb}: too many fields"));
        }
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_garbage_is_refused_with_a_reason() {
        for c in [
            Command::Vm {
                idx: 3,
                base_ns: 20_000_000,
                grant_ns: 200_000_000,
                weight: 180_000_000,
                name: "web-1.a_b".into(),
            },
            Command::Free { idx: 1023 },
            Command::Tid { tid: 4242, idx: 0 },
            Command::Untid { tid: 1 },
        ] {
            assert_eq!(Command::parse(&c.line()), Ok(c.clone()));
        }
        for (bad, why) in [
            ("", "empty"),
            ("vm 1024 1 2 3 a", "out of range"),
            ("vm 1 x 2 3 a", "not a number"),
            ("vm 1 2", "missing grant"),
            ("vm 1 2 3 a", "weight \"a\" is not a number"),
            ("vm 1 2 3 4", "missing name"),
            ("vm 1 2 3 4 a/b", "bad name"),
            ("tid 1 2 3", "too many"),
            ("tid 99999999999 1", "thread id"),
            ("go 1", "unknown"),
        ] {
            let e = Command::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
