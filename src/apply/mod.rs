//! Executing a [`Plan`]: exactly its steps, in dependency order, independent container steps
//! in parallel (bounded), reporting each step as it completes. `apply` decides nothing: the
//! plan did.

use crate::config::Config;
use crate::image::ImageError;
use crate::image::pull::Puller;
use crate::manifest::spec::{ContainerSpec, Declared, Desired, Kind};
use crate::manifest::units::MountSource;
use crate::plan::{Action, Op, Plan, Step};
use crate::runtime::config::{self as rc, NetMode};
use crate::runtime::{Runtime, RuntimeError};
use crate::state::{ContainerRecord, StateDir, StateError, VolumeRecord};
use crate::store::{Store, StoreError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub mod container_config;
mod network;
pub mod schedule;
use container_config::missing_bind_source;
pub use container_config::{backoff, health, limits, restart_policy, runtime_config};
pub use network::{refresh_hosts, release_orphan_leases};
pub use schedule::dependency_met;
use schedule::{DESTROY_PARALLEL, describe_dependency, waves};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    /// A dependency that may still meet its condition did not in time.
    #[error("{0}")]
    Waiting(String),
    /// A step failed; `transient` when trying again later may succeed.
    #[error("{message}")]
    Step { message: String, transient: bool },
}

impl ApplyError {
    /// Worth trying again later (an agent backs off and retries): a registry that could not
    /// be reached or answered 5xx/429, a published port held by a process that may go away,
    /// a dependency not yet ready. Anything else (a missing image, a bad mount source, an
    /// invalid configuration) fails the same way until something is changed.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Step { transient, .. } => *transient,
            ApplyError::Waiting(_) => true,
            ApplyError::Image(ImageError::Registry(r)) => r.is_transient(),
            ApplyError::Runtime(RuntimeError::StartFailed { message, .. }) => {
                message.contains("Address in use") || message.contains("address already in use")
            }
            _ => false,
        }
    }
}

/// What happened to one step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepOutcome {
    pub address: String,
    pub action: Action,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a failed step: whether trying again later may succeed ([`ApplyError::is_transient`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub transient: bool,
    pub millis: u64,
}

pub struct Executor<'a> {
    pub state: &'a StateDir,
    pub store: &'a Store,
    pub runtime: &'a Runtime,
    /// Built only when the plan pulls (building a TLS client reads every CA certificate).
    pub puller: Option<&'a Puller>,
    pub desired: &'a Desired,
    pub config: &'a Config,
    /// Container steps run at once.
    pub parallel: usize,
    /// How long a container's start waits for its `depends_on` conditions.
    pub wait_timeout: Duration,
    /// Serialises IPAM and hosts-file updates between parallel container steps, and holds
    /// the IPAM files written without fsync since the wave began (made durable after it).
    pub net_lock: std::sync::Mutex<std::collections::BTreeSet<std::path::PathBuf>>,
}

impl Executor<'_> {
    /// Run the plan. `report` is called as each step completes. A failed step does not stop
    /// the others: what depends on it (a container on its image, volume, network or a
    /// container it depends on) is skipped and reported so, everything else is carried out;
    /// the error then names every failed step.
    pub fn execute(
        &self,
        plan: &Plan,
        report: &(dyn Fn(&StepOutcome) + Sync),
    ) -> Result<Vec<StepOutcome>, ApplyError> {
        self.preflight(plan)?;
        let mut outcomes: Vec<StepOutcome> = vec![];
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let destroy_levels = self.destroy_levels(plan);
        for wave in waves(plan, self.desired, &destroy_levels) {
            let touches_containers = wave.iter().any(|s| s.kind == Kind::Container);
            let mut runnable = vec![];
            for st in wave {
                match self.blocked_by(st, &failed) {
                    Some(dep) => {
                        let o = StepOutcome {
                            address: st.address.clone(),
                            action: st.action,
                            ok: false,
                            error: Some(format!("skipped: {dep} failed")),
                            transient: false,
                            millis: 0,
                        };
                        report(&o);
                        outcomes.push(o);
                    }
                    None => runnable.push(st),
                }
            }
            let results: Vec<StepOutcome> =
                if runnable.len() > 1 && runnable.iter().all(|s| s.kind == Kind::Image) {
                    self.pull_all(&runnable, report)
                } else if runnable.len() > 1 && runnable.iter().all(|s| s.kind == Kind::Container) {
                    // stops mostly wait: destroys of independent containers go many at a time
                    let bound = if runnable.iter().all(|s| s.action == Action::Destroy) {
                        self.parallel.max(DESTROY_PARALLEL)
                    } else {
                        self.parallel
                    };
                    self.parallel_steps(&runnable, bound, report)
                } else {
                    runnable
                        .iter()
                        .map(|st| {
                            let o = self.timed(st);
                            report(&o);
                            o
                        })
                        .collect()
                };
            outcomes.extend(results);
            for o in outcomes.iter().filter(|o| !o.ok) {
                failed
                    .entry(o.address.clone())
                    .or_insert_with(|| o.error.clone().unwrap_or_default());
            }
            // the wave's leases durable; names of containers that came or went, everywhere
            if touches_containers
                && let Err(e) = self
                    .sync_leases()
                    .and_then(|()| refresh_hosts(self.state, None))
            {
                failed.insert("hosts files".into(), e.to_string());
            }
        }
        if failed.is_empty() {
            return Ok(outcomes);
        }
        let skipped = failed
            .values()
            .filter(|e| e.starts_with("skipped: "))
            .count();
        let errors: Vec<String> = failed
            .iter()
            .filter(|(_, e)| !e.starts_with("skipped: "))
            .map(|(a, e)| format!("{a}: {e}"))
            .collect();
        Err(ApplyError::Invalid(format!(
            "{}{}",
            errors.join("\n"),
            if skipped > 0 {
                format!("\n{skipped} step(s) that depend on them skipped")
            } else {
                String::new()
            }
        )))
    }

    /// For the containers the plan destroys: 0 for those no other destroyed container depends
    /// on (by their records), then one more than the highest of their dependents: a
    /// dependent goes before what it depends on, independent ones together.
    fn destroy_levels(&self, plan: &Plan) -> BTreeMap<String, usize> {
        let gone: Vec<&str> = plan
            .steps
            .iter()
            .filter(|s| s.kind == Kind::Container && s.action == Action::Destroy)
            .map(|s| s.name.as_str())
            .collect();
        let records: BTreeMap<String, ContainerRecord> =
            self.state.read_records(Kind::Container).unwrap_or_default();
        let deps = |n: &str| -> Vec<&str> {
            records.get(n).map_or_else(Vec::new, |r| {
                r.spec
                    .depends_on
                    .keys()
                    .map(String::as_str)
                    .filter(|d| gone.contains(d))
                    .collect()
            })
        };
        let mut level: BTreeMap<String, usize> = gone.iter().map(|n| (n.to_string(), 0)).collect();
        // relax: a dependency is one level after its dependents (bounded: a cycle in old
        // records stops at the number of containers)
        for _ in 0..gone.len() {
            let mut changed = false;
            for n in &gone {
                let l = level[*n];
                for d in deps(n) {
                    if level[d] < l + 1 {
                        level.insert(d.to_string(), l + 1);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        level
    }

    /// The failed step, if any, this step needs: a container's image, networks, volumes and
    /// the containers it depends on.
    fn blocked_by(&self, st: &Step, failed: &BTreeMap<String, String>) -> Option<String> {
        if failed.is_empty() || st.kind != Kind::Container || st.action == Action::Destroy {
            return None;
        }
        let c = self.desired.containers.get(&st.name)?;
        let mut needs = vec![
            format!("image.{}", c.spec.image),
            format!("image.{}", c.spec.image_ref),
        ];
        needs.extend(c.spec.networks.iter().map(|n| format!("network.{n}")));
        needs.extend(c.spec.volumes.iter().filter_map(|m| match &m.source {
            MountSource::Volume(v) => Some(format!("volume.{v}")),
            _ => None,
        }));
        needs.extend(c.spec.depends_on.keys().map(|d| format!("container.{d}")));
        needs.into_iter().find(|a| failed.contains_key(a))
    }

    fn timed(&self, st: &Step) -> StepOutcome {
        let t = Instant::now();
        let r = self.run_step(st);
        StepOutcome {
            address: st.address.clone(),
            action: st.action,
            ok: r.is_ok(),
            transient: r.as_ref().err().is_some_and(ApplyError::is_transient),
            error: r.err().map(|e| error_chain(&e)),
            millis: t.elapsed().as_millis() as u64,
        }
    }

    fn parallel_steps(
        &self,
        wave: &[&Step],
        bound: usize,
        report: &(dyn Fn(&StepOutcome) + Sync),
    ) -> Vec<StepOutcome> {
        let mut out = vec![];
        for chunk in wave.chunks(bound.max(1)) {
            let results: Vec<StepOutcome> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|st| {
                        s.spawn(move || {
                            let o = self.timed(st);
                            report(&o);
                            o
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| StepOutcome {
                            address: "?".into(),
                            action: Action::Create,
                            ok: false,
                            error: Some("step panicked".into()),
                            transient: false,
                            millis: 0,
                        })
                    })
                    .collect()
            });
            out.extend(results);
        }
        out
    }

    /// What can be known to fail before anything is changed: a bind mount whose host path is
    /// missing, for any container the plan creates.
    fn preflight(&self, plan: &Plan) -> Result<(), ApplyError> {
        for st in plan
            .steps
            .iter()
            .filter(|s| s.ops.contains(&Op::CreateContainer))
        {
            let Some(c) = self.desired.containers.get(&st.name) else {
                continue;
            };
            if let Some(p) = missing_bind_source(&c.spec) {
                return Err(ApplyError::Invalid(format!(
                    "{}: bind mount source {} does not exist (declared in {}); nothing was changed",
                    st.address,
                    p.display(),
                    c.source
                )));
            }
        }
        Ok(())
    }

    fn pull_all(&self, wave: &[&Step], report: &(dyn Fn(&StepOutcome) + Sync)) -> Vec<StepOutcome> {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                return vec![StepOutcome {
                    address: "image".into(),
                    action: Action::Create,
                    ok: false,
                    error: Some(e.to_string()),
                    transient: false,
                    millis: 0,
                }];
            }
        };
        rt.block_on(async {
            let jobs = wave.iter().map(|st| async move {
                let t = Instant::now();
                let r =
                    match self.image_ref(st) {
                        Ok(r) => match self.puller() {
                            Ok(p) => p.pull(&r).await.map(|_| ()).map_err(|e| {
                                (error_chain(&e), ApplyError::Image(e).is_transient())
                            }),
                            Err(e) => Err((e.to_string(), false)),
                        },
                        Err(e) => Err((e.to_string(), false)),
                    };
                let o = StepOutcome {
                    address: st.address.clone(),
                    action: st.action,
                    ok: r.is_ok(),
                    transient: r.as_ref().err().is_some_and(|(_, t)| *t),
                    error: r.err().map(|(e, _)| e),
                    millis: t.elapsed().as_millis() as u64,
                };
                report(&o);
                o
            });
            futures::future::join_all(jobs).await
        })
    }

    fn puller(&self) -> Result<&Puller, ApplyError> {
        self.puller
            .ok_or_else(|| ApplyError::Invalid("no registry client for this plan".into()))
    }

    fn image_ref(&self, st: &Step) -> Result<crate::registry::reference::Reference, ApplyError> {
        self.desired
            .images
            .get(&st.name)
            .map(|i| i.spec.reference.clone())
            .ok_or_else(|| ApplyError::Invalid(format!("{}: not in the manifests", st.address)))
    }

    fn run_step(&self, st: &Step) -> Result<(), ApplyError> {
        if st.kind == Kind::Container && st.ops.contains(&Op::StartContainer) {
            self.wait_for_dependencies(&st.name)?;
        }
        for op in &st.ops {
            self.run_op(st, *op).map_err(|e| ApplyError::Step {
                message: format!("{}: {}", op_name(*op), error_chain(&e)),
                transient: e.is_transient(),
            })?;
        }
        Ok(())
    }

    fn run_op(&self, st: &Step, op: Op) -> Result<(), ApplyError> {
        let name = st.name.as_str();
        match op {
            Op::PullImage => {
                let r = self.image_ref(st)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| ApplyError::Invalid(e.to_string()))?;
                rt.block_on(self.puller()?.pull(&r))?;
                crate::fault::point("after-pull");
            }
            Op::CreateVolume => {
                let v = self
                    .desired
                    .volumes
                    .get(name)
                    .ok_or_else(|| ApplyError::Invalid("not declared".into()))?;
                let data = rc::volume_data(&self.state.volumes_dir(), name);
                // docker's mode for a volume's data; the volumes directory above stays private
                crate::fsutil::create_dir_mode(&data, 0o755).map_err(StateError::Io)?;
                let rec = VolumeRecord {
                    name: name.into(),
                    source: v.source.clone(),
                    spec: v.spec.clone(),
                    created_at: crate::fsutil::now_unix(),
                };
                self.state.write_record(Kind::Volume, name, &rec)?;
                crate::fault::point("after-volume");
            }
            Op::CreateNetwork => {
                self.create_network(name)?;
                crate::fault::point("after-network");
            }
            Op::RemoveNetwork => self.remove_network(name, st.action == Action::Destroy)?,
            Op::CreateContainer => self.create_container(name)?,
            Op::StartContainer => {
                match self.runtime.start(name) {
                    // its supervisor got there first: it starts it after the backoff
                    Ok(_) | Err(crate::runtime::RuntimeError::Restarting { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                crate::fault::point("after-start");
                if let Some(mut rec) = self.record(name)?
                    && rec.stopped_by_user
                {
                    rec.stopped_by_user = false;
                    self.state.write_record(Kind::Container, name, &rec)?;
                }
            }
            Op::StopContainer => {
                let (sig, timeout) = self.stop_settings(name)?;
                self.runtime.stop(name, &sig, timeout)?;
                crate::fault::point("after-stop");
            }
            Op::RemoveContainer => {
                let (sig, timeout) = self.stop_settings(name)?;
                self.runtime.remove(name, &sig, timeout)?;
                crate::fault::point("after-remove");
                self.release_addresses(name)?;
                crate::fault::point("after-release");
                self.state.remove_record(Kind::Container, name)?;
            }
            Op::UpdateContainer => {
                let c = self
                    .desired
                    .containers
                    .get(name)
                    .ok_or_else(|| ApplyError::Invalid("not declared".into()))?;
                let mut rec = self
                    .record(name)?
                    .ok_or_else(|| ApplyError::Invalid("no record".into()))?;
                if self.runtime.exists(name) {
                    self.runtime.update_limits(name, &limits(&c.spec))?;
                    self.runtime.update_supervision(
                        name,
                        restart_policy(&c.spec),
                        backoff(&c.spec),
                        health(&c.spec),
                    )?;
                }
                rec.spec = c.spec.clone();
                rec.source = c.source.clone();
                self.state.write_record(Kind::Container, name, &rec)?;
            }
        }
        Ok(())
    }

    /// Wait until each of `name`'s dependencies meets its condition (started, healthy,
    /// completed), saying what it waits for; fail, naming the dependency and its state, when
    /// one cannot meet it any more or the wait timeout passes.
    fn wait_for_dependencies(&self, name: &str) -> Result<(), ApplyError> {
        let Some(c) = self.desired.containers.get(name) else {
            return Ok(());
        };
        let deadline = Instant::now() + self.wait_timeout;
        for (dep, cond) in &c.spec.depends_on {
            let mut said = false;
            loop {
                let status = self.runtime.status(dep)?;
                let health = crate::runtime::health::read(&self.runtime.dir(dep));
                let why = match dependency_met(*cond, &status, health.as_ref()) {
                    Ok(true) => break,
                    Ok(false) => describe_dependency(&status, health.as_ref()),
                    Err(never) => {
                        return Err(ApplyError::Invalid(format!(
                            "depends_on: {dep} cannot become {cond}: {never}"
                        )));
                    }
                };
                if Instant::now() >= deadline {
                    return Err(ApplyError::Waiting(format!(
                        "depends_on: {dep} did not become {cond} within {} ({why})",
                        crate::manifest::units::Duration(self.wait_timeout.as_millis() as u64)
                    )));
                }
                if !said {
                    eprintln!("container.{name}: waiting for {dep} to be {cond} ({why})");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    fn record(&self, name: &str) -> Result<Option<ContainerRecord>, ApplyError> {
        Ok(
            crate::fsutil::read_json(&self.state.record_path(Kind::Container, name))
                .map_err(StateError::Io)?,
        )
    }

    fn stop_settings(&self, name: &str) -> Result<(String, Duration), ApplyError> {
        let spec = match self.record(name)? {
            Some(r) => r.spec,
            None => match self.desired.containers.get(name) {
                Some(c) => c.spec.clone(),
                // neither record nor declaration (its record was removed outside berth): the
                // settings the container was started with, else docker's defaults
                None => {
                    return Ok(match self.runtime.config(name) {
                        Ok(c) => (c.stop_signal, Duration::from_millis(c.stop_timeout_ms)),
                        Err(_) => ("SIGTERM".into(), Duration::from_secs(10)),
                    });
                }
            },
        };
        Ok((spec.stop_signal.clone(), spec.stop_timeout.as_std()))
    }

    fn create_container(&self, name: &str) -> Result<(), ApplyError> {
        let c: &Declared<ContainerSpec> = self
            .desired
            .containers
            .get(name)
            .ok_or_else(|| ApplyError::Invalid("not declared".into()))?;
        let r = c.spec.image_ref.to_string();
        let img = self.store.get(&r)?;
        let net = self.attach(name, &c.spec)?;
        crate::fault::point("after-attach");
        let cfg = runtime_config(
            self.store,
            self.state,
            self.config,
            name,
            &c.spec,
            &img,
            net,
        )?;
        let rec = ContainerRecord {
            name: name.into(),
            source: c.source.clone(),
            spec: c.spec.clone(),
            image_digest: Some(img.digest().to_string()),
            created_at: crate::fsutil::now_unix(),
            stopped_by_user: false,
        };
        // the record first: a crash after it shows up as drift and is repaired
        self.state.write_record(Kind::Container, name, &rec)?;
        crate::fault::point("after-record");
        self.runtime.prepare(&cfg)?;
        crate::fault::point("after-prepare");
        if matches!(cfg.net, NetMode::Bridge { .. }) {
            // its own hosts file now; its peers' after the wave (refresh_hosts in execute)
            let _g = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
            refresh_hosts(self.state, Some(name))?;
        }
        Ok(())
    }
}

/// An error and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::PullImage => "pull image",
        Op::CreateVolume => "create volume",
        Op::CreateNetwork => "create network",
        Op::RemoveNetwork => "remove network",
        Op::CreateContainer => "create container",
        Op::StartContainer => "start container",
        Op::StopContainer => "stop container",
        Op::RemoveContainer => "remove container",
        Op::UpdateContainer => "update container",
    }
}
