//! `update = "start-first"`: a replacement that never refuses a connection.
//!
//! 1. The new container is made beside the running one, under `containers/.next/NAME`
//!    (its own slot, addresses leased as `NAME@next`, veths of its own), told to take its
//!    published ports from its predecessor rather than bind them, and started.
//! 2. It must prove itself as any replacement does (healthy, or running for `min_ready`).
//!    If it does not, it is removed: the old one never stopped serving. The refused spec is
//!    remembered as for a rollback.
//! 3. Its shim takes the listening sockets from the old one's (`SCM_RIGHTS`, see
//!    [`crate::runtime::handoff`]) and serves them too; from here on the switch is finished
//!    even if berth is killed (the `switched` mark).
//! 4. The name passes to it: `containers/NAME` now names its slot (the old one's is named
//!    `containers/.prev/NAME`), its addresses are leased as `NAME` (the old one's as
//!    `NAME@prev`), its record is written, and every peer's /etc/hosts follows.
//! 5. The old one's proxy stops accepting and finishes the connections it carries (up to
//!    its stop timeout); then it is stopped as it asks and removed.
//!
//! Every step can be done again: an apply killed anywhere is finished by the next
//! ([`Executor::resume_hand_overs`]).

use super::network::{next_key, port_maps, prev_key};
use super::{ApplyError, Executor, error_chain};
use crate::manifest::spec::{Kind, UpdateStrategy};
use crate::plan::{Action, Op, Step};
use crate::runtime::{NEXT, PREV, Runtime, handoff};
use crate::state::{ContainerRecord, StateError};
use std::os::fd::AsFd;
use std::time::Duration;

/// In the new container's directory: the record it gets with the name.
pub(super) const NEXT_RECORD: &str = "next-record.json";
/// In the new container's directory: it serves the ports; the switch is to be finished.
const SWITCHED: &str = "switched";

impl Executor<'_> {
    /// Whether this step replaces a container start-first: declared so, and possible (the
    /// old container runs, and was made with a slot). A declared start-first that is not
    /// possible is said, and the replacement goes stop-first.
    pub(super) fn starts_first(&self, st: &Step) -> bool {
        let declared = st.kind == Kind::Container
            && st.action == Action::Replace
            && st.ops.contains(&Op::CreateContainer)
            && self
                .desired
                .containers
                .get(&st.name)
                .and_then(|c| c.spec.update)
                .is_some_and(|u| u.strategy == UpdateStrategy::StartFirst);
        if !declared {
            return false;
        }
        let why_not = if !matches!(
            self.runtime.status(&st.name),
            Ok(crate::observe::ContainerStatus::Running { .. })
        ) {
            Some("it is not running")
        } else if !self.runtime.in_slot(&st.name) {
            Some("it was created by a berth before start-first existed")
        } else {
            self.ports_cannot_pass(&st.name)
        };
        match why_not {
            None => true,
            Some(why) => {
                (self.notice)(&format!(
                    "container.{}: replaced stop-first: {why}",
                    st.name
                ));
                false
            }
        }
    }

    /// Why the published ports cannot pass from the running container to one of the
    /// desired spec, if they cannot: a port that keeps its number and protocol but changes
    /// its address (the new address could not be bound beside the old), or more than a
    /// message carries.
    fn ports_cannot_pass(&self, name: &str) -> Option<&'static str> {
        let old = self.runtime.config(name).ok()?.ports;
        let new = port_maps(&self.desired.containers.get(name)?.spec);
        if old.len() > crate::sys::MAX_FDS || new.len() > crate::sys::MAX_FDS {
            return Some("it publishes more ports than are handed over at once (64)");
        }
        new.iter()
            .any(|p| {
                old.iter().any(|o| {
                    o.host_port == p.host_port && o.proto == p.proto && o.host_ip != p.host_ip
                })
            })
            .then_some("a published port changes its host address")
    }

    /// Replace `st`'s container start-first (see the module's documentation). `false`: it
    /// cannot be done so after all (no address is free for a second container), and nothing
    /// was changed: the caller replaces it stop-first.
    pub(super) fn replace_start_first(&self, st: &Step) -> Result<bool, ApplyError> {
        let name = st.name.as_str();
        let c = self
            .desired
            .containers
            .get(name)
            .ok_or_else(|| ApplyError::Invalid("not declared".into()))?;
        let next = self.runtime.area(NEXT);
        // what an interrupted one left: a container never switched to is removed, one that
        // was takes the name; one still retiring goes
        if left_in(&next, name) && next.dir(name).0.join(SWITCHED).exists() {
            self.promote(name)?;
        } else {
            self.discard_next(name)?;
        }
        if left_in(&self.runtime.area(PREV), name) {
            self.retire(name)?;
        }
        let made = self.make_next(&next, name);
        if let Err(ApplyError::Net(crate::net::NetError::Exhausted { .. })) = &made {
            self.discard_next(name)?;
            (self.notice)(&format!(
                "container.{name}: replaced stop-first: no address is free for a second container on its network"
            ));
            return Ok(false);
        }
        let started = made.and_then(|()| match next.start(name) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        });
        if let Err(e) = started {
            let _ = self.discard_next(name);
            return Err(e);
        }
        crate::fault::point("after-start-next");
        if let Err(why) = self.proves_itself_in(&next, name) {
            if self.cancel.is_cancelled() {
                let _ = self.discard_next(name);
                return Err(ApplyError::Waiting(why));
            }
            if c.spec.rollback {
                let refused = crate::fsutil::read_json::<ContainerRecord>(
                    &next.dir(name).0.join(NEXT_RECORD),
                )
                .ok()
                .flatten()
                .and_then(|r| r.image_digest);
                self.discard_next(name)?;
                self.record_refusal(name, refused, &why)?;
                return Err(ApplyError::Step {
                    message: format!(
                        "rolled back: {why}; the previous container kept running and serving (`berth apply --retry {name}` tries this spec again)"
                    ),
                    transient: false,
                });
            }
            (self.notice)(&format!(
                "container.{name}: {why}; it takes over anyway (rollback = false)"
            ));
        }
        self.switch(name)?;
        self.state.remove_rollback(name)?;
        Ok(true)
    }

    /// The new container beside the old (see [`Executor::make`]).
    fn make_next(&self, next: &Runtime, name: &str) -> Result<(), ApplyError> {
        let c = self
            .desired
            .containers
            .get(name)
            .ok_or_else(|| ApplyError::Invalid("not declared".into()))?;
        let img = self.store.get(&c.spec.image_ref.to_string())?;
        self.make(next, name, true, &c.spec, &c.source, &img)
    }

    /// Hand the ports over, then the name, then retire the old container.
    fn switch(&self, name: &str) -> Result<(), ApplyError> {
        let next = self.runtime.area(NEXT);
        let new_dir = next.real_dir(name);
        if next.config(name)?.ports_from_peer {
            let old_dir = self.runtime.real_dir(name);
            // an old container without published ports has none to give
            let gives = self.runtime.config(name).is_ok_and(|c| !c.ports.is_empty());
            let given = if gives {
                handoff::request(&old_dir.0, "give", &[])
            } else {
                Ok((String::new(), vec![]))
            };
            let (fds, stopped) = match given {
                Ok((_, fds)) => (fds, false),
                Err(e) => {
                    // a shim that cannot give (made before hand-overs existed, or between
                    // restarts): the old one stops first, its ports are bound afresh
                    (self.notice)(&format!(
                        "container.{name}: its ports could not be handed over ({e}): the old container stops first"
                    ));
                    let (sig, timeout) = self.stop_settings(name)?;
                    self.runtime.stop(name, &sig, timeout)?;
                    (vec![], true)
                }
            };
            let lent: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            if let Err(e) = handoff::request(&new_dir.0, "take", &lent) {
                let _ = self.discard_next(name);
                if stopped {
                    let _ = self.runtime.start(name);
                }
                return Err(ApplyError::Step {
                    message: format!("handing the published ports over: {e}"),
                    transient: true,
                });
            }
        }
        crate::fsutil::write_atomic(&new_dir.0.join(SWITCHED), b"").map_err(StateError::Io)?;
        crate::fault::point("after-switch");
        self.promote(name)
    }

    /// Pass the name to the container beside it, and retire its predecessor. Done again,
    /// it finishes what is left.
    fn promote(&self, name: &str) -> Result<(), ApplyError> {
        let (next, prev) = (self.runtime.area(NEXT), self.runtime.area(PREV));
        let cd = self.runtime.dir(name);
        {
            // no hosts file is written between the names and the addresses moving
            let _g = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
            if next.dir(name).0.exists() && self.runtime.dir(name).0.exists() {
                // the old one named in .prev first: it is never without a name
                if !prev.dir(name).0.exists() {
                    self.runtime.also_name(name, &prev)?;
                } else if prev.real_dir(name).0 != self.runtime.real_dir(name).0 {
                    return Err(ApplyError::Invalid(format!(
                        "another container called {name} is still being retired ({})",
                        prev.dir(name).0.display()
                    )));
                }
            }
            // the addresses move with the name, once (the name moved: they did)
            if next.dir(name).0.exists() {
                self.hand_over_leases(name)?;
                next.hand_over(name, self.runtime)?;
            }
            crate::fault::point("after-hand-over");
            let nrec = cd.0.join(NEXT_RECORD);
            if let Some(rec) =
                crate::fsutil::read_json::<ContainerRecord>(&nrec).map_err(StateError::Io)?
            {
                self.state.write_record(Kind::Container, name, &rec)?;
                let _ = std::fs::remove_file(&nrec);
            }
            // a restart of its shim (after a reboot) binds the ports itself
            if let Ok(mut cfg) = self.runtime.config(name)
                && cfg.ports_from_peer
            {
                cfg.ports_from_peer = false;
                self.runtime.prepare(&cfg)?;
            }
            super::refresh_hosts(self.state, None)?;
        }
        self.retire(name)?;
        let _ = std::fs::remove_file(cd.0.join(SWITCHED));
        Ok(())
    }

    /// Remove the container whose name passed on: its proxy stops accepting and finishes
    /// its connections (up to its stop timeout), then it stops as it asks.
    fn retire(&self, name: &str) -> Result<(), ApplyError> {
        let prev = self.runtime.area(PREV);
        if prev.dir(name).0.exists() && prev.real_dir(name).0 == self.runtime.real_dir(name).0 {
            // the container that has the name (a promotion interrupted before it moved):
            // only the second name goes
            let link = prev.dir(name).0;
            std::fs::remove_file(&link)
                .map_err(|e| StateError::Io(crate::fsutil::PathError::new("remove", &link, e)))?;
            return Ok(());
        }
        if prev.exists(name) {
            let (sig, timeout) = stop_settings_of(&prev, name);
            if let Ok((pids, _)) = handoff::request(&prev.real_dir(name).0, "release", &[]) {
                let pids: Vec<i32> = pids
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect();
                self.wait_for_drain(&pids, timeout);
            }
            crate::fault::point("after-release-ports");
            prev.remove(name, &sig, timeout)?;
        } else {
            prev.remove(name, "SIGKILL", Duration::from_secs(10))?;
        }
        self.release_addresses(&prev_key(name))?;
        Ok(())
    }

    /// Remove a container started beside its predecessor that did not take its name, and
    /// its addresses.
    pub(super) fn discard_next(&self, name: &str) -> Result<(), ApplyError> {
        let next = self.runtime.area(NEXT);
        if left_in(&next, name) {
            let (sig, timeout) = stop_settings_of(&next, name);
            next.remove(name, &sig, timeout)?;
        }
        self.release_addresses(&next_key(name))?;
        Ok(())
    }

    /// Finish what an interrupted start-first replacement left: a new container that had
    /// not yet taken the ports is removed (the old one kept serving); one that had takes
    /// the name, and the old one is retired.
    pub fn resume_hand_overs(&self) {
        self.runtime.sweep_unnamed_slots();
        let (next, prev) = (self.runtime.area(NEXT), self.runtime.area(PREV));
        let mut names = next.names();
        names.extend(prev.names());
        names.sort();
        names.dedup();
        for name in names {
            let switched = next.dir(&name).0.join(SWITCHED).exists();
            let r = if left_in(&next, &name) && !switched {
                self.discard_next(&name)
            } else {
                self.promote(&name)
            };
            if let Err(e) = r {
                (self.notice)(&format!(
                    "container.{name}: finishing an interrupted start-first replacement: {}",
                    error_chain(&e)
                ));
            }
        }
    }

    /// Wait until the released proxies `pids` have finished their connections and exited,
    /// at most `timeout`, or until berth is asked to stop.
    fn wait_for_drain(&self, pids: &[i32], timeout: Duration) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let end = std::time::Instant::now() + timeout;
        let mut fds: Vec<std::os::fd::OwnedFd> = pids
            .iter()
            .filter_map(|p| crate::sys::pidfd_open(*p).ok())
            .collect();
        while !fds.is_empty() && !self.cancel.is_cancelled() {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            let mut polls: Vec<PollFd> = fds
                .iter()
                .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
                .collect();
            let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
            if poll(&mut polls, PollTimeout::from(ms)).is_err() {
                return;
            }
            let done: Vec<bool> = polls
                .iter()
                .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(polls);
            let mut i = 0;
            fds.retain(|_| {
                let keep = !done[i];
                i += 1;
                keep
            });
        }
    }
}

/// Whether `rt` (an area) still has something called `name`: a container, or a name whose
/// slot is gone.
fn left_in(rt: &Runtime, name: &str) -> bool {
    rt.in_slot(name) || rt.dir(name).0.exists()
}

/// How the container `name` of `rt` asks to be stopped (its config), else docker's default.
pub(super) fn stop_settings_of(rt: &Runtime, name: &str) -> (String, Duration) {
    match rt.config(name) {
        Ok(c) => (c.stop_signal, Duration::from_millis(c.stop_timeout_ms)),
        Err(_) => ("SIGTERM".into(), Duration::from_secs(10)),
    }
}
