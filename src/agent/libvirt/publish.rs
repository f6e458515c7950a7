//! What the libvirt watcher sees, published in [`LIBVIRT_JSON`] for `burst-qemu check`: every
//! running domain it may consider, whether it is in the fleet, and why not.

use std::collections::BTreeMap;
use std::path::Path;

use crate::source::libvirt::control::state_name;
use crate::source::libvirt::lifecycle::Seen;
use crate::state;

/// The file in the state dir where the watcher says what it sees (for `burst-qemu check`).
pub const LIBVIRT_JSON: &str = "libvirt.json";

/// What the watcher publishes in [`LIBVIRT_JSON`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// The connection.
    pub uri: String,
    /// Whether libvirtd answered the last poll.
    pub connected: bool,
    /// Why it did not, when it did not.
    pub error: Option<String>,
    /// Every running domain the agent may consider (after `--libvirt-domains`).
    pub domains: Vec<PublishedDomain>,
    /// The agent's pid.
    pub pid: u32,
}

/// One running domain in [`Published`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PublishedDomain {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// libvirt's state.
    pub state: String,
    /// Whether it is in the fleet.
    pub in_fleet: bool,
    /// Why not, when it is not (not opted in, or refused and why).
    pub why_not: Option<String>,
}

/// The running domains among `seen` as published, by name: `in_fleet` and `why_not` say what
/// the watcher decided for each UUID.
pub(super) fn running<'a>(
    seen: impl Iterator<Item = &'a Seen>,
    in_fleet: impl Fn(&str) -> bool,
    why_not: impl Fn(&str) -> Option<String>,
) -> Vec<PublishedDomain> {
    let mut domains: Vec<PublishedDomain> = seen
        .filter(|s| s.id.is_some())
        .map(|s| PublishedDomain {
            name: s.name.clone(),
            uuid: s.uuid.clone(),
            state: state_name(s.state),
            in_fleet: in_fleet(&s.uuid),
            why_not: why_not(&s.uuid),
        })
        .collect();
    domains.sort_by(|a, b| a.name.cmp(&b.name));
    domains
}

/// Writes `published` into [`LIBVIRT_JSON`] of `state_dir` (best effort: `check` reads it).
pub(super) fn write(state_dir: &Path, published: &Published) {
    let path = state_dir.join(LIBVIRT_JSON);
    if let Ok(text) = serde_json::to_string_pretty(published) {
        let _ = state::write_published(&path, (text + "\n").as_bytes());
    }
}

/// A summary of [`Published`] for `check`: the domains in the fleet and the others with why.
pub fn read_published(state_dir: &Path) -> Option<Published> {
    let bytes = std::fs::read(state_dir.join(LIBVIRT_JSON)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The domains [`read_published`] lists, by name.
pub fn by_name(p: &Published) -> BTreeMap<String, &PublishedDomain> {
    p.domains.iter().map(|d| (d.name.clone(), d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::libvirt::lifecycle::State;

    fn seen(name: &str, uuid: &str, id: Option<u32>, state: State) -> Seen {
        Seen {
            uuid: uuid.into(),
            name: name.into(),
            id,
            state,
            reason: 0,
            vcpus: 1,
        }
    }

    #[test]
    fn only_running_domains_are_published_by_name_with_the_watchers_verdicts() {
        let all = [
            seen("web", "u-2", Some(7), State::Paused),
            seen("db", "u-1", Some(3), State::Running),
            seen("old", "u-3", None, State::Shutoff),
        ];
        let p = running(
            all.iter(),
            |u| u == "u-1",
            |u| (u == "u-2").then(|| "not opted in".to_owned()),
        );
        let got: Vec<_> = p
            .iter()
            .map(|d| {
                (
                    d.name.as_str(),
                    d.state.as_str(),
                    d.in_fleet,
                    d.why_not.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("db", "running", true, None),
                ("web", "paused", false, Some("not opted in")),
            ]
        );
    }
}
