//! Reading the host into [`Observed`]: berth's records plus what is live on the host.
//! Observing never changes the host.

use crate::manifest::spec::Kind;
use crate::state::{ContainerRecord, NetworkRecord, StateDir, StateError, VolumeRecord};
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What the host has, as far as berth is concerned.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Observed {
    /// Images in the store, by normalised reference (`registry/repo:tag` or `…@sha256:…`).
    pub images: BTreeMap<String, ObservedImage>,
    pub volumes: BTreeMap<String, VolumeRecord>,
    pub networks: BTreeMap<String, NetworkRecord>,
    pub containers: BTreeMap<String, ObservedContainer>,
    /// Networks whose bridge or rules are missing on the host, with the reason.
    pub network_drift: BTreeMap<String, String>,
    /// Containers on the host (a directory in the state directory) without a record: the
    /// record was removed outside berth. They are replaced when declared, removed when not.
    pub unrecorded: BTreeSet<String>,
    /// The last build of each image built here, by reference: from which inputs.
    pub builds: BTreeMap<String, crate::build::BuildRecord>,
    /// Replacements undone, by container: which desired spec was refused, and why.
    pub rollbacks: BTreeMap<String, crate::state::RollbackRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservedImage {
    /// Digest of the manifest the store holds for this reference.
    pub digest: String,
    /// Digest the registry now serves for the tag, when it was asked (`pull = "always"`).
    #[serde(default)]
    pub remote_digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservedContainer {
    pub record: ContainerRecord,
    pub status: ContainerStatus,
    /// Limits read from the live cgroup, when it could be read.
    #[serde(default)]
    pub live_limits: Option<LiveLimits>,
    /// The health check's verdict, while it runs.
    #[serde(default)]
    pub health: Option<crate::runtime::health::Health>,
    /// While it runs and holds its update lock: since when a replacement waits for it
    /// (`Some(None)`: none has yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_lock: Option<Option<u64>>,
}

/// The live state of a container berth created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ContainerStatus {
    /// Created but never started (or not yet).
    Created,
    Running {
        pid: i32,
        started_at: u64,
    },
    /// Exited by itself; restart policy decides what happens.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        #[serde(default)]
        oom: bool,
        finished_at: u64,
        #[serde(default)]
        restarts: u32,
    },
    /// Exited; its supervisor starts it again at `restart_at_ms` (Unix milliseconds), by
    /// its restart policy, after backing off.
    Restarting {
        code: Option<i32>,
        signal: Option<i32>,
        #[serde(default)]
        oom: bool,
        finished_at: u64,
        restarts: u32,
        restart_at_ms: u64,
    },
    /// Stopped with `berth stop`: stays stopped until started or reconfigured.
    StoppedByUser,
    /// Something berth needs is gone (process killed with its shim, rootfs or cgroup removed).
    Lost {
        reason: String,
    },
}

/// cgroup limits as read from the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LiveLimits {
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Observe from berth's records and the image store (no live container checks yet): every
/// recorded container is assumed to be as recorded.
pub fn from_records(state: &StateDir, store: &Store) -> Result<Observed, ObserveError> {
    let containers: BTreeMap<String, ContainerRecord> = state.read_records(Kind::Container)?;
    let images = store
        .references()?
        .into_iter()
        .map(|(r, d)| {
            (
                r,
                ObservedImage {
                    digest: d.digest,
                    remote_digest: None,
                },
            )
        })
        .collect();
    Ok(Observed {
        images,
        volumes: state.read_records(Kind::Volume)?,
        networks: state.read_records(Kind::Network)?,
        network_drift: BTreeMap::new(),
        unrecorded: BTreeSet::new(),
        builds: crate::build::read_records(&state.root),
        rollbacks: state.read_rollbacks(),
        containers: containers
            .into_iter()
            .map(|(n, record)| {
                let status = if record.stopped_by_user {
                    ContainerStatus::StoppedByUser
                } else {
                    ContainerStatus::Running {
                        pid: 0,
                        started_at: record.created_at,
                    }
                };
                (
                    n,
                    ObservedContainer {
                        record,
                        status,
                        live_limits: None,
                        health: None,
                        update_lock: None,
                    },
                )
            })
            .collect(),
    })
}

/// Observe the host: records, the store, and each container's live state (process, exit,
/// cgroup limits) from the runtime.
pub fn observe(
    state: &StateDir,
    store: &Store,
    runtime: &crate::runtime::Runtime,
) -> Result<Observed, ObserveError> {
    let mut o = from_records(state, store)?;
    for (name, oc) in o.containers.iter_mut() {
        let status = runtime
            .status(name)
            .unwrap_or_else(|e| ContainerStatus::Lost {
                reason: e.to_string(),
            });
        oc.status = match status {
            ContainerStatus::Exited { .. } | ContainerStatus::Created
                if oc.record.stopped_by_user =>
            {
                ContainerStatus::StoppedByUser
            }
            s => s,
        };
        if matches!(oc.status, ContainerStatus::Running { .. }) {
            oc.live_limits = runtime.live_limits(name);
            let cd = runtime.dir(name);
            oc.health = crate::runtime::health::read(&cd);
            if std::fs::symlink_metadata(cd.update_lock()).is_ok() {
                oc.update_lock = Some(crate::apply::deferred_since(&cd));
            }
        }
    }
    o.unrecorded = runtime
        .names()
        .into_iter()
        .filter(|n| !o.containers.contains_key(n))
        .collect();
    for name in o.networks.keys() {
        let bridge = crate::net::bridge_name(&state.root, name);
        let why = if !crate::net::link::exists(&bridge) {
            format!("its bridge {bridge} is missing")
        } else if !crate::net::nat::present(&bridge) {
            format!("its nftables table ip {bridge} is missing")
        } else {
            continue;
        };
        o.network_drift.insert(name.clone(), why);
    }
    Ok(o)
}
