//! The state directory: berth's records of what it created, and the lock that lets only one
//! berth process change a host at a time.
//!
//! ```text
//! STATE/
//!   lock                      flock(2) held by a mutating berth process
//!   records/containers/N.json records/networks/N.json records/volumes/N.json
//!   store/                    OCI image layout (blobs, index.json) + ingest/
//!   snapshots/                unpacked layers by chain ID
//!   containers/N/             per-container runtime state, rootfs, logs
//!   volumes/N/_data           named volume data
//! ```

use crate::fsutil::{self, PathError, at};
use crate::manifest::spec::{ContainerSpec, Kind, NetworkSpec, Source, VolumeSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("another berth process is changing {0}; wait for it to finish")]
    Locked(PathBuf),
    /// `agent.lock` is held the other way: by an agent (`pid` when it wrote it), or by an
    /// apply when an agent asks.
    #[error("{} is held by {}", .path.display(), match .pid { Some(p) => format!("berth agent pid {p}"), None => "a berth apply".into() })]
    AgentLocked { path: PathBuf, pid: Option<i32> },
}

/// What berth recorded when it created a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub name: String,
    pub source: Source,
    pub spec: ContainerSpec,
    /// Manifest digest of the image it was created from.
    pub image_digest: Option<String>,
    pub created_at: u64,
    /// Set by `berth stop`; cleared by `start`, `restart` or a new configuration.
    #[serde(default)]
    pub stopped_by_user: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub name: String,
    pub source: Source,
    /// As applied: the subnet is the one in use (declared or chosen).
    pub spec: NetworkSpec,
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub source: Source,
    pub spec: VolumeSpec,
    pub created_at: u64,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

/// Held while a berth process mutates the state directory; released on drop.
#[derive(Debug)]
pub struct StateLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

/// `STATE/agent.lock`: held by `berth agent` for its life (exclusively, its pid inside) and
/// by `berth apply` for its run (shared), so that the two never converge one state
/// directory at once.
pub struct AgentLock {
    file: nix::fcntl::Flock<std::fs::File>,
}

impl AgentLock {
    /// Write this process's pid into the lock (the agent's, for `apply` and `status`).
    pub fn write_pid(&mut self) -> std::io::Result<()> {
        use std::io::{Seek, Write};
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file
            .write_all(format!("{}\n", std::process::id()).as_bytes())?;
        self.file.sync_data()
    }
}

/// A replacement that did not prove itself and was undone: not tried again while the
/// container's desired spec is the same (`spec`, [`ContainerSpec::digest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRecord {
    pub spec: String,
    /// The image digest the refused container ran, when known: a later image of the same
    /// spec is tried.
    #[serde(default)]
    pub image: Option<String>,
    pub reason: String,
    /// Unix seconds.
    pub at: u64,
}

impl StateDir {
    /// `STATE/DIR/NAME.json` written, removed, or all read (unreadable ones skipped): the
    /// rollouts under way and the rollbacks done.
    fn write_named<T: Serialize>(&self, dir: &str, name: &str, v: &T) -> Result<(), StateError> {
        let p = self.root.join(dir).join(format!("{name}.json"));
        Ok(crate::fsutil::write_json(&p, v)?)
    }

    fn remove_named(&self, dir: &str, name: &str) -> Result<(), StateError> {
        let p = self.root.join(dir).join(format!("{name}.json"));
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(PathError::new("remove", &p, e).into())
            }
            _ => Ok(()),
        }
    }

    fn read_named<T: serde::de::DeserializeOwned>(&self, dir: &str) -> BTreeMap<String, T> {
        let Ok(rd) = std::fs::read_dir(self.root.join(dir)) else {
            return BTreeMap::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
                let r = crate::fsutil::read_json(&e.path()).ok().flatten()?;
                Some((name, r))
            })
            .collect()
    }

    pub fn write_rollback(&self, name: &str, r: &RollbackRecord) -> Result<(), StateError> {
        self.write_named("rollbacks", name, r)
    }

    /// Forget a rollback (`apply --retry NAME`, or a replacement that proved itself).
    pub fn remove_rollback(&self, name: &str) -> Result<(), StateError> {
        self.remove_named("rollbacks", name)
    }

    pub fn read_rollbacks(&self) -> BTreeMap<String, RollbackRecord> {
        self.read_named("rollbacks")
    }

    /// A replacement under way: the container it replaces, to go back to.
    pub fn write_rollout(&self, name: &str, previous: &ContainerRecord) -> Result<(), StateError> {
        self.write_named("rollouts", name, previous)
    }

    pub fn remove_rollout(&self, name: &str) -> Result<(), StateError> {
        self.remove_named("rollouts", name)
    }

    /// Replacements an interrupted apply left undecided, by container.
    pub fn read_rollouts(&self) -> BTreeMap<String, ContainerRecord> {
        self.read_named("rollouts")
    }

    pub fn agent_lock_path(&self) -> PathBuf {
        self.root.join("agent.lock")
    }

    /// Take `agent.lock`: exclusively for an agent, shared for an apply; without waiting.
    /// Held the other way: [`StateError::AgentLocked`], with the agent's pid when an agent
    /// holds it.
    pub fn agent_lock(&self, agent: bool) -> Result<AgentLock, StateError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(&self.root).map_err(at("create directory", &self.root))?;
        let p = self.agent_lock_path();
        let mut file = std::fs::OpenOptions::new()
            .mode(0o600)
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&p)
            .map_err(at("open", &p))?;
        let arg = if agent {
            nix::fcntl::FlockArg::LockExclusiveNonblock
        } else {
            nix::fcntl::FlockArg::LockSharedNonblock
        };
        loop {
            match nix::fcntl::Flock::lock(file, arg) {
                Ok(l) => return Ok(AgentLock { file: l }),
                Err((f, nix::errno::Errno::EINTR)) => file = f,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(StateError::AgentLocked {
                        pid: self.agent_pid(),
                        path: p,
                    });
                }
                Err((_, e)) => return Err(PathError::new("lock", &p, e.into()).into()),
            }
        }
    }

    /// The pid of the agent that runs on this state directory, if one does: the pid in
    /// `agent.lock` while the lock is held exclusively.
    pub fn agent_pid(&self) -> Option<i32> {
        let p = self.agent_lock_path();
        let file = std::fs::File::open(&p).ok()?;
        let pid: i32 = std::fs::read_to_string(&p).ok()?.trim().parse().ok()?;
        // free, or only shared (applies): no agent
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
            Ok(_) => None,
            Err(_) => Some(pid),
        }
    }

    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn records_dir(&self, kind: Kind) -> PathBuf {
        self.root
            .join("records")
            .join(format!("{}s", kind.as_str()))
    }

    pub fn record_path(&self, kind: Kind, name: &str) -> PathBuf {
        self.records_dir(kind).join(format!("{name}.json"))
    }

    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn containers_dir(&self) -> PathBuf {
        self.root.join("containers")
    }

    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    /// All records of one kind, by name. A missing folder means none.
    pub fn read_records<T: serde::de::DeserializeOwned>(
        &self,
        kind: Kind,
    ) -> Result<BTreeMap<String, T>, StateError> {
        let dir = self.records_dir(kind);
        let mut out = BTreeMap::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(PathError::new("read directory", &dir, e).into()),
        };
        for entry in rd {
            let entry = entry.map_err(at("read directory", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if stem.starts_with('.') {
                continue;
            }
            if let Some(v) = fsutil::read_json(&entry.path())? {
                out.insert(stem.to_string(), v);
            }
        }
        Ok(out)
    }

    pub fn write_record<T: Serialize>(
        &self,
        kind: Kind,
        name: &str,
        v: &T,
    ) -> Result<(), StateError> {
        Ok(fsutil::write_json(&self.record_path(kind, name), v)?)
    }

    pub fn remove_record(&self, kind: Kind, name: &str) -> Result<(), StateError> {
        let p = self.record_path(kind, name);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PathError::new("remove", &p, e).into()),
        }
    }

    /// Make the state directory private to root (mode 0700), tightening one that an older
    /// berth or a person left open: image layers and writable layers below it hold setuid
    /// files, and records and configs hold secrets. Nothing happens when it does not exist
    /// yet (it is created 0700 under berth's umask).
    pub fn make_private(&self) -> Result<(), StateError> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(&self.root) {
            Ok(m) if m.is_dir() && m.permissions().mode() & 0o7777 != 0o700 => {
                std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
                    .map_err(at("chmod", &self.root))?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Take the state lock. With `wait`, block until the holder finishes; else fail at once.
    pub fn lock(&self, wait: bool) -> Result<StateLock, StateError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(&self.root).map_err(at("create directory", &self.root))?;
        let p = self.root.join("lock");
        let file = std::fs::OpenOptions::new()
            .mode(0o600)
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(at("open", &p))?;
        let arg = if wait {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockExclusiveNonblock
        };
        let mut file = file;
        loop {
            match nix::fcntl::Flock::lock(file, arg) {
                Ok(l) => return Ok(StateLock { _file: l }),
                Err((f, nix::errno::Errno::EINTR)) => file = f,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(StateError::Locked(self.root.clone()));
                }
                Err((_, e)) => return Err(PathError::new("lock", &p, e.into()).into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_excludes_second_holder() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let l = s.lock(false).unwrap();
        // flock locks belong to the open file description: a second open conflicts.
        assert!(matches!(s.lock(false), Err(StateError::Locked(_))));
        drop(l);
        assert!(s.lock(false).is_ok());
    }

    #[test]
    fn records_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        let r = VolumeRecord {
            name: "v".into(),
            source: Source::default(),
            spec: VolumeSpec::default(),
            created_at: 1,
        };
        s.write_record(Kind::Volume, "v", &r).unwrap();
        let all: BTreeMap<String, VolumeRecord> = s.read_records(Kind::Volume).unwrap();
        assert_eq!(all["v"], r);
        s.remove_record(Kind::Volume, "v").unwrap();
        assert!(
            s.read_records::<VolumeRecord>(Kind::Volume)
                .unwrap()
                .is_empty()
        );
    }
}
