//! Domain lifecycle from polls: two consecutive views of a connection's domains → what
//! happened in between. Pure: the views come from one `virConnectGetAllDomainStats(STATE)`
//! call (one round trip for every domain, see `conn.rs`).
//!
//! Why a poll and not libvirt's lifecycle events: events need an event loop thread and are lost
//! while the agent or libvirtd is down, so the agent needs this reconciliation anyway (at
//! start, after a reconnect). A poll once a second is that reconciliation run all the time;
//! events could later only make it quicker. What a poll cannot see is a domain that stopped
//! and started again between two polls with the same id: libvirt gives each start a new id
//! (ids only grow while libvirtd runs, and a restarted libvirtd continues after the largest
//! id of the domains still running), so a changed id is a restart.
//!
//! The numeric states and reasons are libvirt's `virDomainState` and
//! `virDomain{Running,Paused,Shutoff}Reason` (checked against libvirt's headers by
//! `tests/libvirt.rs`).

use std::collections::BTreeMap;

/// `virDomainState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// 0: no state.
    NoState,
    /// 1.
    Running,
    /// 2: blocked on a resource.
    Blocked,
    /// 3: paused by a user, a migration, a save, an I/O error, …
    Paused,
    /// 4: being shut down.
    Shutdown,
    /// 5: not running.
    Shutoff,
    /// 6.
    Crashed,
    /// 7: suspended by guest power management.
    PmSuspended,
    /// Another value (a newer libvirt).
    Other(i32),
}

impl State {
    /// From libvirt's number.
    pub fn from_raw(n: i32) -> State {
        match n {
            0 => State::NoState,
            1 => State::Running,
            2 => State::Blocked,
            3 => State::Paused,
            4 => State::Shutdown,
            5 => State::Shutoff,
            6 => State::Crashed,
            7 => State::PmSuspended,
            n => State::Other(n),
        }
    }

    /// Whether the vCPUs can run (the domain is charged).
    pub fn runs(self) -> bool {
        matches!(self, State::Running | State::Blocked | State::Shutdown)
    }
}

/// `virDomainRunningReason` values used here.
pub mod running {
    /// Started.
    pub const BOOTED: i32 = 1;
    /// Arrived by incoming migration.
    pub const MIGRATED: i32 = 2;
    /// Restored from a saved image.
    pub const RESTORED: i32 = 3;
    /// Reverted to a snapshot.
    pub const FROM_SNAPSHOT: i32 = 4;
}

/// `virDomainShutoffReason` values used here.
pub mod shutoff {
    /// Shut down from inside.
    pub const SHUTDOWN: i32 = 1;
    /// Destroyed (forced off).
    pub const DESTROYED: i32 = 2;
    /// QEMU died.
    pub const CRASHED: i32 = 3;
    /// Migrated to another host.
    pub const MIGRATED: i32 = 4;
    /// Saved to a file.
    pub const SAVED: i32 = 5;
    /// Failed to start.
    pub const FAILED: i32 = 6;
    /// libvirtd found it dead when it (re)started.
    pub const DAEMON: i32 = 8;
}

/// One domain in one poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Its UUID (the key: names can be reused and renamed).
    pub uuid: String,
    /// Its name.
    pub name: String,
    /// Its id while active; `None` when inactive.
    pub id: Option<u32>,
    /// Its state.
    pub state: State,
    /// libvirt's reason for the state (its meaning depends on the state).
    pub reason: i32,
    /// Its vCPUs now while active (`vcpu.current`); 0 when inactive or not reported.
    pub vcpus: u32,
}

/// How a domain came to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Started (booted).
    Booted,
    /// Arrived by live migration.
    MigratedIn,
    /// Restored from a saved image.
    Restored,
    /// Reverted to a snapshot.
    FromSnapshot,
    /// It was already active when first seen (the agent or the connection is new).
    Found,
    /// Another reason.
    Other,
}

/// How a domain stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    /// Shut down from inside.
    Shutdown,
    /// Destroyed.
    Destroyed,
    /// QEMU died (or the domain's state is crashed).
    Crashed,
    /// Migrated away.
    MigratedAway,
    /// Saved to a file.
    Saved,
    /// Another or unknown reason (including a transient domain that disappeared).
    Other,
}

/// What happened to a domain between two polls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// It became active (or got a new id: it was restarted between polls).
    Arrived {
        /// The UUID.
        uuid: String,
        /// How.
        how: Arrival,
    },
    /// It stopped being active.
    Departed {
        /// The UUID.
        uuid: String,
        /// How.
        how: Departure,
    },
    /// Its vCPUs stopped running (paused, suspended) while it stays active.
    Paused {
        /// The UUID.
        uuid: String,
    },
    /// Its vCPUs run again.
    Resumed {
        /// The UUID.
        uuid: String,
    },
    /// It is no longer defined (gone from the list).
    Undefined {
        /// The UUID.
        uuid: String,
    },
    /// It was renamed (same UUID).
    Renamed {
        /// The UUID.
        uuid: String,
        /// The old name.
        from: String,
    },
}

fn arrival(seen: &Seen) -> Arrival {
    match (seen.state, seen.reason) {
        (State::Running, running::BOOTED) => Arrival::Booted,
        (State::Running, running::MIGRATED) => Arrival::MigratedIn,
        (State::Running, running::RESTORED) => Arrival::Restored,
        (State::Running, running::FROM_SNAPSHOT) => Arrival::FromSnapshot,
        _ => Arrival::Other,
    }
}

fn departure(now: Option<&Seen>) -> Departure {
    match now.map(|s| (s.state, s.reason)) {
        Some((State::Shutoff, shutoff::SHUTDOWN)) => Departure::Shutdown,
        Some((State::Shutoff, shutoff::DESTROYED)) => Departure::Destroyed,
        Some((State::Shutoff, shutoff::CRASHED | shutoff::DAEMON)) | Some((State::Crashed, _)) => {
            Departure::Crashed
        }
        Some((State::Shutoff, shutoff::MIGRATED)) => Departure::MigratedAway,
        Some((State::Shutoff, shutoff::SAVED)) => Departure::Saved,
        _ => Departure::Other,
    }
}

/// The events between poll `before` (`None`: the first poll) and poll `now`, in a stable
/// order (by UUID, then departure before arrival).
pub fn diff(before: Option<&[Seen]>, now: &[Seen]) -> Vec<Event> {
    let old: BTreeMap<&str, &Seen> = before
        .unwrap_or_default()
        .iter()
        .map(|s| (s.uuid.as_str(), s))
        .collect();
    let new: BTreeMap<&str, &Seen> = now.iter().map(|s| (s.uuid.as_str(), s)).collect();
    let mut events = Vec::new();
    let uuids: std::collections::BTreeSet<&str> = old.keys().chain(new.keys()).copied().collect();
    for uuid in uuids {
        let (was, is) = (old.get(uuid).copied(), new.get(uuid).copied());
        let u = || uuid.to_owned();
        if let (Some(w), Some(i)) = (was, is) {
            if w.name != i.name {
                events.push(Event::Renamed {
                    uuid: u(),
                    from: w.name.clone(),
                });
            }
        }
        let was_active = was.and_then(|w| w.id);
        let is_active = is.and_then(|i| i.id);
        if was_active.is_some() && was_active != is_active {
            events.push(Event::Departed {
                uuid: u(),
                how: departure(is.filter(|_| is_active.is_none())),
            });
        }
        if let Some(i) = is.filter(|i| i.id.is_some()) {
            if was_active != is_active {
                let how = if before.is_none() {
                    Arrival::Found
                } else {
                    arrival(i)
                };
                events.push(Event::Arrived { uuid: u(), how });
                if !i.state.runs() {
                    events.push(Event::Paused { uuid: u() });
                }
            } else if let Some(w) = was {
                match (w.state.runs(), i.state.runs()) {
                    (true, false) => events.push(Event::Paused { uuid: u() }),
                    (false, true) => events.push(Event::Resumed { uuid: u() }),
                    _ => {}
                }
            }
        }
        if was.is_some() && is.is_none() {
            events.push(Event::Undefined { uuid: u() });
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seen(uuid: &str, id: Option<u32>, state: State, reason: i32) -> Seen {
        Seen {
            uuid: uuid.into(),
            name: format!("dom-{uuid}"),
            id,
            state,
            reason,
            vcpus: 1,
        }
    }

    #[test]
    fn the_first_poll_finds_running_and_paused_domains() {
        let now = [
            seen("a", Some(1), State::Running, running::BOOTED),
            seen("b", Some(2), State::Paused, 1),
            seen("c", None, State::Shutoff, shutoff::SHUTDOWN),
        ];
        assert_eq!(
            diff(None, &now),
            vec![
                Event::Arrived {
                    uuid: "a".into(),
                    how: Arrival::Found
                },
                Event::Arrived {
                    uuid: "b".into(),
                    how: Arrival::Found
                },
                Event::Paused { uuid: "b".into() },
            ]
        );
    }

    #[test]
    fn start_pause_resume_and_each_way_of_stopping_are_told_apart() {
        let off = seen("a", None, State::Shutoff, 0);
        let on = seen("a", Some(3), State::Running, running::BOOTED);
        let e = |before: &Seen, now: &Seen| {
            diff(
                Some(std::slice::from_ref(before)),
                std::slice::from_ref(now),
            )
        };
        assert_eq!(
            e(&off, &on),
            vec![Event::Arrived {
                uuid: "a".into(),
                how: Arrival::Booted
            }]
        );
        let paused = seen("a", Some(3), State::Paused, 1);
        assert_eq!(e(&on, &paused), vec![Event::Paused { uuid: "a".into() }]);
        assert_eq!(e(&paused, &on), vec![Event::Resumed { uuid: "a".into() }]);
        for (reason, how) in [
            (shutoff::SHUTDOWN, Departure::Shutdown),
            (shutoff::DESTROYED, Departure::Destroyed),
            (shutoff::CRASHED, Departure::Crashed),
            (shutoff::DAEMON, Departure::Crashed),
            (shutoff::MIGRATED, Departure::MigratedAway),
            (shutoff::SAVED, Departure::Saved),
            (shutoff::FAILED, Departure::Other),
        ] {
            let stopped = seen("a", None, State::Shutoff, reason);
            assert_eq!(
                e(&on, &stopped),
                vec![Event::Departed {
                    uuid: "a".into(),
                    how
                }]
            );
        }
        let crashed = seen("a", None, State::Crashed, 0);
        assert_eq!(
            e(&on, &crashed),
            vec![Event::Departed {
                uuid: "a".into(),
                how: Departure::Crashed
            }]
        );
    }

    #[test]
    fn arrivals_by_migration_and_restore_are_named() {
        let off = seen("a", None, State::Shutoff, shutoff::SAVED);
        for (reason, how) in [
            (running::MIGRATED, Arrival::MigratedIn),
            (running::RESTORED, Arrival::Restored),
            (running::FROM_SNAPSHOT, Arrival::FromSnapshot),
            (99, Arrival::Other),
        ] {
            let on = seen("a", Some(9), State::Running, reason);
            assert_eq!(
                diff(Some(std::slice::from_ref(&off)), &[on]),
                vec![Event::Arrived {
                    uuid: "a".into(),
                    how
                }]
            );
        }
        // A migration that arrives paused (virsh migrate --suspend).
        let paused = seen("a", Some(9), State::Paused, 2);
        assert_eq!(
            diff(Some(&[]), &[paused]),
            vec![
                Event::Arrived {
                    uuid: "a".into(),
                    how: Arrival::Other
                },
                Event::Paused { uuid: "a".into() },
            ]
        );
    }

    #[test]
    fn a_restart_between_polls_is_a_departure_and_an_arrival() {
        let before = seen("a", Some(3), State::Running, running::BOOTED);
        let after = seen("a", Some(4), State::Running, running::BOOTED);
        assert_eq!(
            diff(Some(&[before]), &[after]),
            vec![
                Event::Departed {
                    uuid: "a".into(),
                    how: Departure::Other
                },
                Event::Arrived {
                    uuid: "a".into(),
                    how: Arrival::Booted
                },
            ]
        );
    }

    #[test]
    fn transient_and_undefined_domains_disappear() {
        let on = seen("t", Some(5), State::Running, running::BOOTED);
        assert_eq!(
            diff(Some(&[on]), &[]),
            vec![
                Event::Departed {
                    uuid: "t".into(),
                    how: Departure::Other
                },
                Event::Undefined { uuid: "t".into() },
            ]
        );
        let off = seen("p", None, State::Shutoff, 0);
        assert_eq!(
            diff(Some(&[off]), &[]),
            vec![Event::Undefined { uuid: "p".into() }]
        );
    }

    #[test]
    fn a_rename_is_reported_by_uuid() {
        let a = seen("a", None, State::Shutoff, 0);
        let mut b = a.clone();
        b.name = "new".into();
        assert_eq!(
            diff(Some(&[a]), &[b]),
            vec![Event::Renamed {
                uuid: "a".into(),
                from: "dom-a".into()
            }]
        );
    }

    fn arb_seen() -> impl Strategy<Value = Seen> {
        ("[a-d]", proptest::option::of(1u32..4), -1i32..9, -1i32..12).prop_map(
            |(uuid, id, state, reason)| Seen {
                uuid: uuid.clone(),
                name: uuid,
                id,
                state: State::from_raw(state),
                reason,
                vcpus: 1,
            },
        )
    }

    proptest! {
        /// Whatever two polls say, every domain active now and not before (same id) has exactly
        /// one arrival, and every one active before and not now has one departure.
        #[test]
        fn arrivals_and_departures_balance(
            before in proptest::collection::vec(arb_seen(), 0..5),
            now in proptest::collection::vec(arb_seen(), 0..5),
        ) {
            let dedup = |v: Vec<Seen>| {
                let mut m = BTreeMap::new();
                for s in v { m.insert(s.uuid.clone(), s); }
                m.into_values().collect::<Vec<_>>()
            };
            let (before, now) = (dedup(before), dedup(now));
            let events = diff(Some(&before), &now);
            for s in &now {
                let was = before.iter().find(|b| b.uuid == s.uuid).and_then(|b| b.id);
                let arrived = events.iter().filter(|e| matches!(e, Event::Arrived { uuid, .. } if *uuid == s.uuid)).count();
                prop_assert_eq!(arrived, usize::from(s.id.is_some() && was != s.id));
            }
            for b in &before {
                let is = now.iter().find(|s| s.uuid == b.uuid).and_then(|s| s.id);
                let departed = events.iter().filter(|e| matches!(e, Event::Departed { uuid, .. } if *uuid == b.uuid)).count();
                prop_assert_eq!(departed, usize::from(b.id.is_some() && b.id != is));
            }
        }
    }
}
