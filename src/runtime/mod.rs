//! berth's container runtime: namespaces, overlayfs, cgroups, one shim per container.
//!
//! Lifecycle verbs: [`Runtime::prepare`] writes the container's config, [`Runtime::start`]
//! spawns its shim and waits until the process runs (or failed to), [`Runtime::stop`] signals
//! it and escalates to SIGKILL, [`Runtime::remove`] deletes what it had on the host (never
//! volumes), [`Runtime::status`] reads its live state.
//!
//! A container's files live in a directory of its own under `STATE/containers/.slots`
//! (`NAME-RANDOM`), named by a symlink `STATE/containers/NAME`; the shim and its cgroup only
//! ever know the real directory. Two containers of one name can so run side by side: the
//! one being started beside the running one (`update = "start-first"`) is named under
//! `containers/.next`, the one being retired under `containers/.prev` (see
//! [`Runtime::area`]); renaming a symlink hands a name over without touching either
//! container. Containers made before slots existed have a real directory at
//! `containers/NAME`, which works the same except that it cannot be handed over.

pub mod cgroup;
pub mod config;
pub mod devices;
pub mod exec;
pub mod handoff;
pub mod health;
pub mod init;
pub mod logs;
pub mod seccomp;
pub mod shim;
pub mod state;
pub mod supervise;

use crate::fsutil::{self, PathError};
use crate::observe::{ContainerStatus, LiveLimits};
use config::{ContainerDir, RuntimeConfig};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("container {name}: starting the shim: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("container {name}: {message}")]
    StartFailed { name: String, message: String },
    #[error("container {name} is not created")]
    NotCreated { name: String },
    #[error("container {name} is not running")]
    NotRunning { name: String },
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("container {name}: did not stop within {secs}s of SIGKILL")]
    StopTimeout { name: String, secs: u64 },
    #[error("container {name}: invalid stop signal {signal}")]
    BadSignal { name: String, signal: String },
    #[error("container {name} is restarting: its supervisor starts it again in {in_secs}s")]
    Restarting { name: String, in_secs: u64 },
}

pub struct Runtime {
    /// `STATE/containers`
    pub containers: PathBuf,
    /// The berth executable to run as the shim (`/proc/self/exe` is not always berth).
    pub berth_exe: PathBuf,
    /// The host config's `cgroup_parent`: where a container's cgroup is when its state is lost.
    pub cgroup_parent: Option<PathBuf>,
    /// Where containers' directories are (`STATE/containers/.slots`), shared by the areas.
    slots: PathBuf,
}

/// The area of containers started beside a running one of the same name.
pub const NEXT: &str = "next";
/// The area of containers whose name was handed to a successor, until they are removed.
pub const PREV: &str = "prev";

/// The identity of a file: device, inode, size and modification time.
type FileId = (u64, u64, u64, i64, i64);

/// Descriptors of unwritable views of executables, by path and the identity of the file
/// there when the view was made; see [`Runtime::unwritable_exe`].
static UNWRITABLE: std::sync::Mutex<Vec<(PathBuf, FileId, std::os::fd::OwnedFd)>> =
    std::sync::Mutex::new(Vec::new());

/// See [`Runtime::unwritable_exe`]; `empty` is a directory berth keeps empty (the overlay's
/// second layer). The view is made once per file: when a package upgrade puts a new file
/// at `exe` (a long-running agent sees this), a view of the new one is made.
pub fn unwritable_exe(exe: &Path, empty: &Path) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(exe)?;
    let id: FileId = (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
    let mut cache = UNWRITABLE
        .lock()
        .map_err(|_| std::io::Error::other("poisoned lock"))?;
    if let Some((_, _, fd)) = cache.iter().find(|(p, i, _)| p == exe && *i == id) {
        return Ok(PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())));
    }
    let fd = std::fs::create_dir_all(empty)
        .and_then(|()| crate::sys::read_only_view(exe, empty))
        .or_else(|e| {
            tracing::debug!("read-only overlay view of {}: {e}; copying", exe.display());
            crate::sys::sealed_copy(exe)
        })?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    // the view of the file that was there before stays open: another thread may be about
    // to start a shim from it (one descriptor per upgrade of the binary)
    cache.push((exe.to_path_buf(), id, fd));
    Ok(path)
}

impl Runtime {
    pub fn new(
        containers: impl Into<PathBuf>,
        berth_exe: impl Into<PathBuf>,
        cgroup_parent: Option<PathBuf>,
    ) -> Self {
        let containers = containers.into();
        Runtime {
            slots: containers.join(".slots"),
            containers,
            berth_exe: berth_exe.into(),
            cgroup_parent,
        }
    }

    /// The runtime of an area beside this one ([`NEXT`], [`PREV`]): the same containers'
    /// store, names under `containers/.AREA`.
    pub fn area(&self, which: &str) -> Runtime {
        self.naming_in(self.root().join(format!(".{which}")))
    }

    /// `STATE/containers`, whatever the area (the slots' parent).
    fn root(&self) -> &Path {
        self.slots.parent().unwrap_or(&self.containers)
    }

    /// The runtime whose names are slots' (`web-0123…`): a container addressed by its
    /// directory, whichever name it has at the moment (the health prober's `berth exec`).
    pub fn by_slot(&self) -> Runtime {
        self.naming_in(self.slots.clone())
    }

    /// This runtime with its names in `containers` (the same store of slots).
    fn naming_in(&self, containers: PathBuf) -> Runtime {
        Runtime {
            containers,
            berth_exe: self.berth_exe.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            slots: self.slots.clone(),
        }
    }

    pub fn dir(&self, name: &str) -> ContainerDir {
        ContainerDir(self.containers.join(name))
    }

    /// The container's real directory (its slot), as its shim knows it.
    pub fn real_dir(&self, name: &str) -> ContainerDir {
        ContainerDir(fsutil::canonical(&self.dir(name).0))
    }

    /// Whether the container's name is a symlink to a slot (so it can be handed over).
    pub fn in_slot(&self, name: &str) -> bool {
        std::fs::symlink_metadata(self.dir(name).0).is_ok_and(|m| m.file_type().is_symlink())
    }

    /// The container's directory, made if it does not exist: a fresh slot and the name's
    /// symlink to it (a symlink whose slot is gone is replaced). Returns the real directory.
    pub fn create_dir(&self, name: &str) -> Result<ContainerDir, RuntimeError> {
        let d = self.dir(name);
        if d.0.exists() {
            return Ok(self.real_dir(name));
        }
        if self.in_slot(name) {
            std::fs::remove_file(&d.0).map_err(fsutil::at("remove", &d.0))?;
        }
        fsutil::create_dir_mode(&self.containers, 0o700)?;
        fsutil::create_dir_mode(&self.slots, 0o700)?;
        let slot = self.slots.join(format!("{name}-{}", fsutil::random_hex()));
        std::fs::create_dir(&slot).map_err(fsutil::at("create directory", &slot))?;
        std::os::unix::fs::symlink(&slot, &d.0).map_err(fsutil::at("symlink", &d.0))?;
        Ok(ContainerDir(slot))
    }

    /// Give the container `name` of this area to `to` (the name there is replaced
    /// atomically; the container itself is untouched).
    pub fn hand_over(&self, name: &str, to: &Runtime) -> Result<(), RuntimeError> {
        let (from, dest) = (self.dir(name).0, to.dir(name).0);
        fsutil::create_dir_mode(&to.containers, 0o700)?;
        std::fs::rename(&from, &dest).map_err(fsutil::at("rename", &from))?;
        Ok(())
    }

    /// Name the container `name` of this area in `to` as well (replacing what that name
    /// pointed to there).
    pub fn also_name(&self, name: &str, to: &Runtime) -> Result<(), RuntimeError> {
        let real = self.real_dir(name).0;
        fsutil::create_dir_mode(&to.containers, 0o700)?;
        let dest = to.dir(name).0;
        let tmp = to
            .containers
            .join(format!(".{name}.{}", fsutil::random_hex()));
        std::os::unix::fs::symlink(&real, &tmp).map_err(fsutil::at("symlink", &tmp))?;
        std::fs::rename(&tmp, &dest).map_err(fsutil::at("rename", &tmp))?;
        Ok(())
    }

    /// Write a container's config (creating its directory).
    pub fn prepare(&self, cfg: &RuntimeConfig) -> Result<(), RuntimeError> {
        self.create_dir(&cfg.name)?;
        let d = self.dir(&cfg.name);
        // derived from the record and the image: atomic, no fsync on the start path (a config
        // lost to a power cut shows as drift and is written again)
        fsutil::write_json_volatile(&d.config(), cfg)?;
        Ok(())
    }

    pub fn config(&self, name: &str) -> Result<RuntimeConfig, RuntimeError> {
        fsutil::read_json(&self.dir(name).config())?
            .ok_or_else(|| RuntimeError::NotCreated { name: name.into() })
    }

    /// A path that executes `berth_exe` but through which nobody can write it, as
    /// `/proc/self/fd/N`: a read-only overlayfs view of it, or else a sealed in-memory copy.
    /// Made once per process (and per executable): the shim, and the container's first
    /// process until its `execve`, run from it, so `/proc/PID/exe` of a process a container
    /// can see never names the host's binary (CVE-2019-5736).
    pub fn unwritable_exe(&self) -> std::io::Result<PathBuf> {
        self.unwritable_exe_of(&self.berth_exe)
    }

    /// [`Runtime::unwritable_exe`] for another executable.
    pub fn unwritable_exe_of(&self, exe: &Path) -> std::io::Result<PathBuf> {
        let state = self.root().parent().unwrap_or(self.root());
        unwritable_exe(exe, &state.join("empty"))
    }

    /// Spawn the shim and wait for it to report the container's pid.
    pub fn start(&self, name: &str) -> Result<i32, RuntimeError> {
        let d = self.dir(name);
        if !d.config().exists() {
            return Err(RuntimeError::NotCreated { name: name.into() });
        }
        // a start resumes supervision
        match std::fs::remove_file(d.stop_intent()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(PathError::new("remove", &d.stop_intent(), e).into());
            }
            _ => {}
        }
        match self.status(name)? {
            ContainerStatus::Running { pid, .. } => return Ok(pid),
            ContainerStatus::Restarting { restart_at_ms, .. } => {
                return Err(RuntimeError::Restarting {
                    name: name.into(),
                    in_secs: restart_at_ms
                        .saturating_sub(fsutil::now_unix_ms())
                        .div_ceil(1000),
                });
            }
            _ => {}
        }
        // a shim that has recorded the exit may still be cleaning up (the cgroup, veths):
        // one container, one supervisor
        if let Some(st) = state::read_state(&d.state())? {
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end
                && state::alive(st.shim_pid, state::pid_start_time(st.shim_pid).unwrap_or(0))
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // (the restart count is the shim's to keep: it counts a start after an exit)
        let exe = self
            .unwritable_exe()
            .map_err(|source| RuntimeError::Spawn {
                name: name.into(),
                source,
            })?;
        let mut child = std::process::Command::new(&exe)
            .arg0("berth")
            .arg("shim")
            .arg(&self.real_dir(name).0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|source| RuntimeError::Spawn {
                name: name.into(),
                source,
            })?;
        let mut out = String::new();
        if let Some(mut s) = child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        let _ = child.wait();
        let line = out.lines().next().unwrap_or("");
        match line
            .strip_prefix("ok ")
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            Some(pid) => Ok(pid),
            None => Err(RuntimeError::StartFailed {
                name: name.into(),
                message: line
                    .strip_prefix("error ")
                    .unwrap_or(if line.is_empty() {
                        "the shim exited without a word (see shim.log)"
                    } else {
                        line
                    })
                    .to_string(),
            }),
        }
    }

    /// The live state of a container.
    pub fn status(&self, name: &str) -> Result<ContainerStatus, RuntimeError> {
        let d = self.dir(name);
        if !d.0.exists() {
            return Ok(ContainerStatus::Lost {
                reason: "its directory was removed".into(),
            });
        }
        if !d.config().exists() {
            return Ok(ContainerStatus::Lost {
                reason: "its config was removed".into(),
            });
        }
        let st = state::read_state(&d.state())?;
        let ex = state::read_exit(&d.exit())?;
        let Some(st) = st else {
            return Ok(match ex {
                Some(e) => exited(&e, 0),
                None => ContainerStatus::Created,
            });
        };
        let shim_alive =
            || state::alive(st.shim_pid, state::pid_start_time(st.shim_pid).unwrap_or(0));
        if let Some(e) = ex
            && e.started_at >= st.started_at
        {
            // backing off before a restart, if its supervisor still lives to make it
            if let Some(at) = e.restart_at_ms
                && shim_alive()
            {
                return Ok(ContainerStatus::Restarting {
                    code: e.code,
                    signal: e.signal,
                    oom: e.oom,
                    finished_at: e.finished_at,
                    restarts: st.restarts,
                    restart_at_ms: at,
                });
            }
            return Ok(exited(&e, st.restarts));
        }
        if state::alive(st.pid, st.pid_start_time) {
            if !st.cgroup.open().exists() {
                return Ok(ContainerStatus::Lost {
                    reason: "its cgroup was removed".into(),
                });
            }
            if !d.upper().exists() {
                return Ok(ContainerStatus::Lost {
                    reason: "its root filesystem was removed".into(),
                });
            }
            return Ok(ContainerStatus::Running {
                pid: st.pid,
                started_at: st.started_at,
            });
        }
        // the exit may be being written right now: give the shim a moment if it lives
        if shim_alive() {
            for _ in 0..50 {
                if state::read_exit(&d.exit())?.is_some_and(|e| e.started_at >= st.started_at)
                    || state::read_state(&d.state())?.is_some_and(|n| n.pid != st.pid)
                {
                    // recorded, or started again: read it all afresh
                    return self.status(name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(ContainerStatus::Lost {
            reason: format!(
                "process {} vanished and no exit was recorded (its shim was killed?)",
                st.pid
            ),
        })
    }

    pub fn live_limits(&self, name: &str) -> Option<LiveLimits> {
        let st = state::read_state(&self.dir(name).state()).ok()??;
        let cg = st.cgroup.open();
        if !cg.exists() {
            return None;
        }
        let l = cg.read_limits();
        Some(LiveLimits {
            memory: l.memory,
            cpus: l.cpus,
            pids: l.pids,
        })
    }

    /// Change memory/cpus/pids of a running container in place (and in its config).
    pub fn update_limits(&self, name: &str, limits: &config::Limits) -> Result<(), RuntimeError> {
        let mut cfg = self.config(name)?;
        cfg.limits = limits.clone();
        fsutil::write_json(&self.dir(name).config(), &cfg)?;
        if let Some(st) = state::read_state(&self.dir(name).state())? {
            let cg = st.cgroup.open();
            if cg.exists() {
                cg.set_limits(limits)?;
            }
        }
        Ok(())
    }

    /// Change a container's restart policy, backoff and health check in its config: its
    /// supervisor reads them again after the next exit (the check from the next start on).
    pub fn update_supervision(
        &self,
        name: &str,
        restart: supervise::RestartPolicy,
        backoff: supervise::Backoff,
        health: Option<health::HealthConfig>,
    ) -> Result<(), RuntimeError> {
        let mut cfg = self.config(name)?;
        if cfg.restart != restart || cfg.backoff != backoff || cfg.health != health {
            cfg.restart = restart;
            cfg.backoff = backoff;
            cfg.health = health;
            fsutil::write_json(&self.dir(name).config(), &cfg)?;
        }
        Ok(())
    }

    /// Tell the supervisor to stop supervising (a stop intent it reads), send the stop signal,
    /// wait up to the timeout, then SIGKILL. Returns once the process and its shim are gone
    /// and the exit is recorded. A container its supervisor starts again meanwhile is
    /// signalled too.
    pub fn stop(&self, name: &str, signal: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let d = self.dir(name);
        let Some(first) = state::read_state(&d.state())? else {
            return Ok(());
        };
        let sig: nix::sys::signal::Signal =
            signal.parse().map_err(|_| RuntimeError::BadSignal {
                name: name.into(),
                signal: signal.into(),
            })?;
        if d.0.is_dir() {
            fsutil::write_mode(&d.stop_intent(), b"", 0o600)
                .map_err(|e| PathError::new("write", &d.stop_intent(), e))?;
        }
        let shim_alive = |st: &state::ContainerState| {
            state::alive(st.shim_pid, state::pid_start_time(st.shim_pid).unwrap_or(0))
        };
        let mut signalled: Option<(i32, u64)> = None;
        // the current state, and whether all is over: no process, no shim
        let mut look = |kill: Option<nix::sys::signal::Signal>| -> (state::ContainerState, bool) {
            let st = state::read_state(&d.state())
                .ok()
                .flatten()
                .unwrap_or(first.clone());
            let running = state::alive(st.pid, st.pid_start_time);
            if running
                && let Some(k) = kill
                && (signalled != Some((st.pid, st.pid_start_time))
                    || k == nix::sys::signal::Signal::SIGKILL)
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(st.pid), k);
                signalled = Some((st.pid, st.pid_start_time));
            }
            let over = !running && !shim_alive(&st);
            (st, over)
        };
        let mut wait = |until: Instant, kill: nix::sys::signal::Signal| {
            loop {
                let (st, over) = look(Some(kill));
                if over || Instant::now() >= until {
                    return (st, over);
                }
                // woken by the process's or its shim's end, not by a clock
                let left = until.saturating_duration_since(Instant::now());
                wait_for_an_exit(&[st.pid, st.shim_pid], left.min(Duration::from_secs(1)));
            }
        };
        let (st, over) = wait(Instant::now() + timeout, sig);
        let st = if over {
            st
        } else {
            let (st, over) = wait(
                Instant::now() + Duration::from_secs(10),
                nix::sys::signal::Signal::SIGKILL,
            );
            if !over {
                return Err(RuntimeError::StopTimeout {
                    name: name.into(),
                    secs: 10,
                });
            }
            st
        };
        self.finish_lost(name, &st)
    }

    /// When the shim is gone without recording the exit, record it and clean up ourselves.
    fn finish_lost(&self, name: &str, st: &state::ContainerState) -> Result<(), RuntimeError> {
        let d = self.dir(name);
        let recorded = state::read_exit(&d.exit())?.is_some_and(|e| e.started_at >= st.started_at);
        if !recorded {
            let cg = st.cgroup.open();
            let oom = cg.exists() && cg.oom_kills() > 0;
            cg.destroy()?;
            let rec = state::ExitRecord {
                code: None,
                signal: Some(9),
                oom,
                started_at: st.started_at,
                finished_at: fsutil::now_unix(),
                error: Some("the shim was gone; berth stopped the container".into()),
                restart_at_ms: None,
            };
            fsutil::write_json(&d.exit(), &rec)?;
        }
        Ok(())
    }

    /// Stop (if needed) and delete everything the container has on the host except volumes.
    pub fn remove(&self, name: &str, signal: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let d = self.dir(name);
        let link = self.in_slot(name);
        if !d.0.exists() {
            // where its files were: the slot its name led to, else the name itself
            let gone = match std::fs::read_link(&d.0) {
                Ok(t) if link => t,
                _ => d.0.clone(),
            };
            if link {
                // a name whose slot is gone
                std::fs::remove_file(&d.0).map_err(fsutil::at("remove", &d.0))?;
            }
            // removed outside berth, perhaps with the container running: its processes are
            // found by their cgroup, where berth puts it, if the cgroup says it is this one's
            let cg =
                cgroup::CgroupLocation::for_container(&gone, self.cgroup_parent.as_deref()).open();
            if cg.exists() && cg.owner().is_some_and(|o| o == cgroup::owner_path(&gone)) {
                cg.destroy()?;
            }
            // its name removed (`rm -r` of the symlink) but not its slot: that container
            self.remove_unnamed_slots(name, signal, timeout)?;
            return Ok(());
        }
        self.stop(name, signal, timeout)?;
        if let Some(st) = state::read_state(&d.state())? {
            st.cgroup.open().destroy()?;
        }
        // the slot, then its name (a name left without its slot is removed next time)
        let real = self.real_dir(name).0;
        crate::store::remove_tree(&real).map_err(|e| match e {
            crate::store::StoreError::Io(p) => RuntimeError::Io(p),
            other => RuntimeError::Io(PathError::new(
                "remove",
                &real,
                std::io::Error::other(other.to_string()),
            )),
        })?;
        if link {
            std::fs::remove_file(&d.0).map_err(fsutil::at("remove", &d.0))?;
        }
        Ok(())
    }

    /// Remove the slots of containers called `name` that no name leads to any more (in any
    /// area): what is left when the name's symlink was removed outside berth.
    fn remove_unnamed_slots(
        &self,
        name: &str,
        signal: &str,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let by_slot = self.by_slot();
        for slot in self.unnamed_slots(Some(name)) {
            by_slot.remove(&slot, signal, timeout)?;
        }
        Ok(())
    }

    /// Remove the slots no name leads to and no shim runs in: left by a berth killed between
    /// making a slot and naming it, or between removing a slot's name and its files. Only
    /// while the state directory is locked (nothing is being made meanwhile).
    pub fn sweep_unnamed_slots(&self) {
        let by_slot = self.by_slot();
        for slot in self.unnamed_slots(None) {
            if !supervised(&by_slot.dir(&slot)) {
                tracing::info!(slot = %slot, "removing a container directory nothing names");
                let _ = by_slot.remove(&slot, "SIGKILL", Duration::from_secs(5));
            }
        }
    }

    /// Slots (of containers called `name`, or all) that no name leads to, in any area.
    fn unnamed_slots(&self, name: Option<&str>) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.slots) else {
            return vec![];
        };
        let candidates: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| {
                let Some((base, hex)) = n.rsplit_once('-') else {
                    return false;
                };
                name.is_none_or(|want| want == base)
                    && hex.len() == 16
                    && hex.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .collect();
        if candidates.is_empty() {
            return vec![];
        }
        let mut named = std::collections::HashSet::new();
        for area in [
            self.root().to_path_buf(),
            self.area(NEXT).containers,
            self.area(PREV).containers,
        ] {
            let rd = match std::fs::read_dir(&area) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // what is named cannot be told: nothing is unnamed
                Err(_) => return vec![],
            };
            for e in rd {
                let Ok(e) = e else {
                    return vec![];
                };
                if std::fs::read_link(e.path()).is_ok() {
                    named.insert(fsutil::canonical(&e.path()));
                }
            }
        }
        candidates
            .into_iter()
            .filter(|slot| !named.contains(&fsutil::canonical(&self.slots.join(slot))))
            .collect()
    }

    pub fn state(&self, name: &str) -> Option<state::ContainerState> {
        state::read_state(&self.dir(name).state()).ok().flatten()
    }

    pub fn exit(&self, name: &str) -> Option<state::ExitRecord> {
        state::read_exit(&self.dir(name).exit()).ok().flatten()
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir(name).log()
    }

    /// Names of the containers with a directory here (whatever their records say).
    pub fn names(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.containers) else {
            return vec![];
        };
        let mut names: Vec<String> = rd
            .flatten()
            // a real directory, or a slot's name (also one whose slot is gone: removing it
            // finishes an interrupted removal)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_symlink() || t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    pub fn exists(&self, name: &str) -> bool {
        Path::new(&self.dir(name).config()).exists()
    }
}

/// Whether a shim supervises the container in `dir` (it holds `shim.lock` for its life).
fn supervised(dir: &ContainerDir) -> bool {
    let Ok(f) = std::fs::File::open(dir.0.join("shim.lock")) else {
        return false;
    };
    matches!(
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

/// Wait until one of `pids` exits, at most `timeout`: on their pidfds, or, where those
/// cannot be had (a kernel before 5.3), for a short while.
pub fn wait_for_an_exit(pids: &[i32], timeout: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let fds: Vec<std::os::fd::OwnedFd> = pids
        .iter()
        .filter(|p| **p > 0)
        .filter_map(|p| crate::sys::pidfd_open(*p).ok())
        .collect();
    if fds.is_empty() {
        std::thread::sleep(timeout.min(Duration::from_millis(20)));
        return;
    }
    let mut polls: Vec<PollFd> = fds
        .iter()
        .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
        .collect();
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let _ = poll(&mut polls, PollTimeout::from(ms));
}

fn exited(e: &state::ExitRecord, restarts: u32) -> ContainerStatus {
    ContainerStatus::Exited {
        code: e.code,
        signal: e.signal,
        oom: e.oom,
        finished_at: e.finished_at,
        restarts,
    }
}
