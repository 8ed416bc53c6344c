//! Executing a [`Plan`]: exactly its steps, in dependency order, independent container steps
//! in parallel (bounded), reporting each step as it completes. `apply` decides nothing: the
//! plan did.

use crate::config::Config;
use crate::image::ImageError;
use crate::image::pull::Puller;
use crate::manifest::spec::UpdateSpec;
use crate::manifest::spec::{ContainerSpec, Declared, Desired, Kind};
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
mod start_first;
use container_config::missing_bind_source;
pub use container_config::{backoff, health, limits, restart_policy, runtime_config};
pub use network::{refresh_hosts, release_orphan_leases};
pub use schedule::dependency_met;
use schedule::{DESTROY_PARALLEL, PULL_PARALLEL, describe_dependency};

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
    #[error(transparent)]
    Build(#[from] Box<crate::build::BuildError>),
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
            // space may be freed (a prune, a removal): tried again later
            ApplyError::Image(ImageError::NoRoom { .. }) => true,
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

/// Why a step did not run: the process was asked to stop.
pub const STOPPING: &str = "not started: berth is stopping";

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
    /// the IPAM files written without fsync since the last steps finished (made durable then).
    pub net_lock: std::sync::Mutex<std::collections::BTreeSet<std::path::PathBuf>>,
    /// The process's async runtime: pulls run on it (steps run on threads of their own).
    pub handle: tokio::runtime::Handle,
    /// Progress worth telling while a step runs ("waiting for db to be healthy").
    pub notice: &'a (dyn Fn(&str) + Sync),
    /// Cancelled when the process is asked to stop (the agent's SIGTERM): no new step
    /// starts, waits for dependencies end; steps under way finish.
    pub cancel: tokio_util::sync::CancellationToken,
}

/// What [`Executor::execute`] did: every step's outcome, and the error naming the failed
/// steps if any failed.
pub struct Executed {
    pub outcomes: Vec<StepOutcome>,
    pub result: Result<(), ApplyError>,
}

impl Executor<'_> {
    /// Run the plan as a dependency graph ([`schedule::graph`]): each step starts as soon as
    /// the steps it needs are done, independent steps at once (up to `parallel`; destroys
    /// and pulls, which mostly wait, many more). `report` is called as each step completes.
    /// A failed step does not stop the others: what uses it (a container of its image,
    /// volume or network, or one that depends on it) is skipped and reported so, everything
    /// else is carried out; the error then names every failed step.
    ///
    /// `preset` holds outcomes decided before: a pull that already failed outside the state
    /// lock, a resource the agent holds back while it backs off. Those steps are not run;
    /// their outcome is reported as given, and what uses them is skipped.
    pub fn execute(
        &self,
        plan: &Plan,
        preset: &BTreeMap<String, StepOutcome>,
        report: &(dyn Fn(&StepOutcome) + Sync),
    ) -> Executed {
        if let Err(e) = self.preflight(plan) {
            return Executed {
                outcomes: vec![],
                result: Err(e),
            };
        }
        let records: BTreeMap<String, ContainerRecord> =
            self.state.read_records(Kind::Container).unwrap_or_default();
        let needs = schedule::graph(plan, self.desired, &records);
        let n = plan.steps.len();
        // None: not finished; Some(Ok(())) done; Some(Err(why)) failed or skipped
        let mut done: Vec<Option<Result<(), String>>> = vec![None; n];
        let mut started = vec![false; n];
        let mut outcomes: Vec<StepOutcome> = vec![];
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let class = |st: &Step| match (st.kind, st.action) {
            (Kind::Container, Action::Destroy) => 0,
            (Kind::Image, _) => 1,
            _ => 2,
        };
        let bounds = [
            self.parallel.max(DESTROY_PARALLEL),
            self.parallel.max(PULL_PARALLEL),
            self.parallel.max(1),
        ];
        let mut running = [0usize; 3];
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel::<(usize, StepOutcome)>();
            let spawn = |i: usize| {
                let tx = tx.clone();
                let st = &plan.steps[i];
                scope.spawn(move || {
                    let o =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.timed(st)))
                            .unwrap_or_else(|_| StepOutcome {
                                address: st.address.clone(),
                                action: st.action,
                                ok: false,
                                error: Some("step panicked".into()),
                                transient: false,
                                millis: 0,
                            });
                    // a report that fails (stdout gone) must not keep the outcome from the
                    // scheduler: it would wait for it forever, holding the locks
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| report(&o)));
                    let _ = tx.send((i, o));
                });
            };
            loop {
                // skip what uses a failed step; start what is ready, within the bounds
                let mut progress = true;
                while progress {
                    progress = false;
                    for i in 0..n {
                        if started[i] {
                            continue;
                        }
                        let st = &plan.steps[i];
                        if let Some(o) = preset.get(&st.address) {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                report(o)
                            }));
                            started[i] = true;
                            done[i] = Some(if o.ok {
                                Ok(())
                            } else {
                                Err(o.error.clone().unwrap_or_default())
                            });
                            outcomes.push(o.clone());
                            progress = true;
                            continue;
                        }
                        if let Some(bad) = needs[i]
                            .iter()
                            .find(|d| d.uses && matches!(done[d.step], Some(Err(_))))
                        {
                            let o = StepOutcome {
                                address: st.address.clone(),
                                action: st.action,
                                ok: false,
                                error: Some(format!(
                                    "skipped: {} failed",
                                    plan.steps[bad.step].address
                                )),
                                transient: false,
                                millis: 0,
                            };
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                report(&o)
                            }));
                            started[i] = true;
                            done[i] = Some(Err(o.error.clone().unwrap_or_default()));
                            outcomes.push(o);
                            progress = true;
                            continue;
                        }
                        if self.cancel.is_cancelled() {
                            let o = StepOutcome {
                                address: st.address.clone(),
                                action: st.action,
                                ok: false,
                                error: Some(STOPPING.into()),
                                transient: true,
                                millis: 0,
                            };
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                report(&o)
                            }));
                            started[i] = true;
                            done[i] = Some(Err(STOPPING.into()));
                            outcomes.push(o);
                            progress = true;
                            continue;
                        }
                        let c = class(st);
                        if running[c] < bounds[c] && needs[i].iter().all(|d| done[d.step].is_some())
                        {
                            started[i] = true;
                            running[c] += 1;
                            spawn(i);
                        }
                    }
                }
                if running.iter().sum::<usize>() == 0 {
                    match (0..n).find(|&i| !started[i]) {
                        None => break,
                        // only a cycle in old records can leave steps waiting on each other:
                        // break it by starting one
                        Some(i) => {
                            started[i] = true;
                            running[class(&plan.steps[i])] += 1;
                            spawn(i);
                        }
                    }
                }
                // wait for a step to finish, then take every other that has
                let Ok(first) = rx.recv() else { break };
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                let mut containers = false;
                for (i, o) in batch {
                    running[class(&plan.steps[i])] -= 1;
                    containers |= plan.steps[i].kind == Kind::Container;
                    done[i] = Some(if o.ok {
                        Ok(())
                    } else {
                        Err(o.error.clone().unwrap_or_default())
                    });
                    outcomes.push(o);
                }
                // the leases of what finished durable; names of containers that came or
                // went, everywhere
                if containers
                    && let Err(e) = self.sync_leases().and_then(|()| {
                        // workers write hosts files under the same lock
                        let _g = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
                        refresh_hosts(self.state, None)
                    })
                {
                    failed.insert("hosts files".into(), e.to_string());
                }
            }
        });
        for o in outcomes.iter().filter(|o| !o.ok) {
            failed
                .entry(o.address.clone())
                .or_insert_with(|| o.error.clone().unwrap_or_default());
        }
        if failed.is_empty() {
            return Executed {
                outcomes,
                result: Ok(()),
            };
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
        let result = Err(ApplyError::Invalid(format!(
            "{}{}",
            errors.join("\n"),
            if skipped > 0 {
                format!("\n{skipped} step(s) that depend on them skipped")
            } else {
                String::new()
            }
        )));
        Executed { outcomes, result }
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
        let replace = st.kind == Kind::Container && st.action == Action::Replace;
        if replace {
            self.check_update_lock(&st.name)?;
        }
        if st.kind == Kind::Container && st.ops.contains(&Op::StartContainer) {
            self.wait_for_dependencies(&st.name)?;
        }
        if replace && self.starts_first(st) && self.replace_start_first(st)? {
            return Ok(());
        }
        // what a replacement goes back to if the new container does not prove itself: only
        // with its image still in the store (checked now: a prune waits for the state lock
        // this apply holds)
        let previous = if replace
            && self
                .desired
                .containers
                .get(&st.name)
                .is_some_and(|c| c.spec.rollback)
        {
            match self.record(&st.name)? {
                Some(prev) => match prev
                    .image_digest
                    .as_deref()
                    .map(|d| self.image_by_digest(&prev.spec.image_ref.to_string(), d))
                {
                    Some(Ok(_)) => Some(prev),
                    _ => {
                        (self.notice)(&format!(
                            "container.{}: the previous image is no longer in the store: this replacement cannot be rolled back",
                            st.name
                        ));
                        None
                    }
                },
                None => None,
            }
        } else {
            None
        };
        // a rollout under way is remembered until it is decided, so that an apply killed
        // meanwhile is finished by the next (see resume_rollouts)
        if let Some(prev) = &previous {
            self.state.write_rollout(&st.name, prev)?;
        }
        let mut removed = false;
        for op in &st.ops {
            if let Err(e) = self.run_op(st, *op) {
                let why = format!("{}: {}", op_name(*op), error_chain(&e));
                if removed && let Some(prev) = &previous {
                    return Err(self.roll_back(&st.name, prev, &why));
                }
                self.state.remove_rollout(&st.name)?;
                return Err(ApplyError::Step {
                    message: why,
                    transient: e.is_transient(),
                });
            }
            removed |= *op == Op::RemoveContainer;
        }
        if let Some(prev) = &previous {
            // a replacement for a change (of the spec or the image), not a repair
            let changed = self
                .record(&st.name)?
                .is_some_and(|n| n.spec != prev.spec || n.image_digest != prev.image_digest);
            if changed {
                match self.proves_itself(&st.name) {
                    Ok(()) => {}
                    // stopping: decided by the next apply or agent (the rollout stays)
                    Err(why) if self.cancel.is_cancelled() => {
                        return Err(ApplyError::Waiting(why));
                    }
                    Err(why) => return Err(self.roll_back(&st.name, prev, &why)),
                }
            }
            self.state.remove_rollout(&st.name)?;
        }
        if st.kind == Kind::Container && matches!(st.action, Action::Replace | Action::Destroy) {
            self.state.remove_rollback(&st.name)?;
        }
        Ok(())
    }

    /// Finish the rollouts an interrupted apply left undecided (killed while it waited for
    /// the new container to prove itself, or in the middle of a rollback): the container is
    /// checked again, and rolled back if it does not prove itself, or if it is gone.
    pub fn resume_rollouts(&self) {
        for (name, prev) in self.state.read_rollouts() {
            let present = self.record(&name).ok().flatten().is_some() && self.runtime.exists(&name);
            let outcome = if present {
                self.proves_itself(&name)
            } else {
                Err("an apply was interrupted while it replaced it".to_string())
            };
            match outcome {
                Ok(()) => {
                    let _ = self.state.remove_rollout(&name);
                }
                Err(_) if self.cancel.is_cancelled() => {}
                Err(why) => {
                    let e = self.roll_back(&name, &prev, &why);
                    (self.notice)(&format!("container.{name}: {e}"));
                }
            }
        }
    }

    /// Whether a new container proves itself: healthy within `rollout.timeout` when it has a
    /// health check, otherwise running for `rollout.min_ready` (an exit with code 0 within
    /// it is a job done). `Err` says why not.
    fn proves_itself(&self, name: &str) -> Result<(), String> {
        self.proves_itself_in(self.runtime, name)
    }

    /// [`Executor::proves_itself`] for the container `name` of `runtime` (a container
    /// started beside its predecessor is in an area of its own).
    fn proves_itself_in(&self, runtime: &Runtime, name: &str) -> Result<(), String> {
        use crate::observe::ContainerStatus as S;
        use crate::runtime::health::HealthStatus as H;
        let Some(c) = self.desired.containers.get(name) else {
            return Ok(());
        };
        let r = c.spec.rollout.unwrap_or_default();
        let t0 = Instant::now();
        // a restart by its supervisor while it is watched is a failure too (a 100 ms poll
        // could miss the restarting state in between)
        let restarts = runtime.state(name).map_or(0, |s| s.restarts);
        let took = |t0: Instant| crate::manifest::units::Duration(t0.elapsed().as_millis() as u64);
        loop {
            if self.cancel.is_cancelled() {
                return Err("berth is stopping".into());
            }
            if self
                .runtime
                .state(name)
                .is_some_and(|s| s.restarts > restarts)
            {
                let (code, signal) = self
                    .runtime
                    .exit(name)
                    .map_or((None, None), |e| (e.code, e.signal));
                if code != Some(0) {
                    return Err(format!(
                        "the new container {} and was restarted, within {}",
                        exited(code, signal),
                        took(t0)
                    ));
                }
            }
            match runtime.status(name) {
                // a job done (also when its restart policy runs it again)
                Ok(S::Exited { code: Some(0), .. })
                | Ok(S::Restarting { code: Some(0), .. })
                | Ok(S::StoppedByUser) => return Ok(()),
                Ok(S::Exited { code, signal, .. }) | Ok(S::Restarting { code, signal, .. }) => {
                    return Err(format!(
                        "the new container {} after {}",
                        exited(code, signal),
                        took(t0)
                    ));
                }
                Ok(S::Lost { reason }) => {
                    return Err(format!("the new container was lost: {reason}"));
                }
                Ok(S::Running { .. }) | Ok(S::Created) => {}
                Err(e) => return Err(e.to_string()),
            }
            if c.spec.health.is_some() {
                match crate::runtime::health::read(&runtime.dir(name)) {
                    Some(h) if h.status == H::Healthy => return Ok(()),
                    Some(h) if h.status == H::Unhealthy => {
                        let last = h.log.last().map_or(String::new(), |p| {
                            format!(
                                ": exit {}, {}",
                                p.exit_code,
                                crate::text::printable(p.output.trim(), 200)
                            )
                        });
                        return Err(format!("unhealthy{last}"));
                    }
                    _ => {}
                }
                if t0.elapsed() >= r.timeout.as_std() {
                    return Err(format!("not healthy within {}", r.timeout));
                }
            } else if t0.elapsed() >= r.min_ready.as_std() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Undo a replacement: the new container removed, the previous one (its recorded spec
    /// and image digest, the same volumes) created and started again, and the desired spec
    /// remembered as refused (`apply --retry NAME` or a change of the manifests tries again).
    fn roll_back(&self, name: &str, prev: &ContainerRecord, why: &str) -> ApplyError {
        // the refused image, for the plan (a later image of the same spec is tried)
        let refused_image = self
            .record(name)
            .ok()
            .flatten()
            .and_then(|r| r.image_digest);
        let restore = || -> Result<(), ApplyError> {
            if self.runtime.exists(name) {
                // stopped as it asks (it may be writing to a volume the old one will use)
                let (sig, timeout) = self.stop_settings(name)?;
                self.runtime.remove(name, &sig, timeout)?;
            }
            self.release_addresses(name)?;
            self.state.remove_record(Kind::Container, name)?;
            let digest = prev
                .image_digest
                .clone()
                .ok_or_else(|| ApplyError::Invalid("no image digest was recorded".into()))?;
            let img = self.image_by_digest(&prev.spec.image_ref.to_string(), &digest)?;
            self.create_container_from(name, &prev.spec, &prev.source, &img)?;
            match self.runtime.start(name) {
                Ok(_) | Err(RuntimeError::Restarting { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        };
        match restore() {
            Ok(()) => {
                tracing::warn!(container = name, "rolled back: {why}");
                let _ = self.state.remove_rollout(name);
                if let Err(e) = self.record_refusal(name, refused_image, why) {
                    return ApplyError::Step {
                        message: format!(
                            "the previous container runs again ({why}), but the rollback could not be recorded: {e}"
                        ),
                        transient: true,
                    };
                }
                ApplyError::Step {
                    message: format!(
                        "rolled back: {why}; the previous container runs again (`berth apply --retry {name}` tries this spec again)"
                    ),
                    transient: false,
                }
            }
            Err(e) => ApplyError::Step {
                message: format!("{why}; rolling back failed too: {}", error_chain(&e)),
                transient: false,
            },
        }
    }

    /// Remember the desired spec of `name` (and the image it ran, if known) as refused, and
    /// why: the plan does not try it again until the manifests change or `--retry`.
    fn record_refusal(
        &self,
        name: &str,
        image: Option<String>,
        why: &str,
    ) -> Result<(), StateError> {
        let Some(c) = self.desired.containers.get(name) else {
            return Ok(());
        };
        let rec = crate::state::RollbackRecord {
            spec: c.spec.digest(),
            image,
            reason: why.to_string(),
            at: crate::fsutil::now_unix(),
        };
        self.state.write_rollback(name, &rec)
    }

    /// An image in the store by its manifest digest (a tag may have moved since).
    fn image_by_digest(
        &self,
        reference: &str,
        digest: &str,
    ) -> Result<crate::store::StoredImage, ApplyError> {
        let desc = self
            .store
            .references()?
            .into_values()
            .find(|d| d.digest == digest)
            .unwrap_or_else(|| crate::registry::types::Descriptor {
                media_type: crate::registry::types::OCI_MANIFEST.into(),
                digest: digest.to_string(),
                size: self.store.blob_size(digest).unwrap_or(0),
                platform: None,
                annotations: BTreeMap::new(),
                urls: vec![],
            });
        Ok(self.store.load(reference, &desc)?)
    }

    fn run_op(&self, st: &Step, op: Op) -> Result<(), ApplyError> {
        let name = st.name.as_str();
        match op {
            Op::PullImage => {
                let r = self.image_ref(st)?;
                let puller = self.puller()?;
                self.handle.block_on(async {
                    tokio::select! {
                        r = puller.pull(&r) => r.map(|_| ()).map_err(ApplyError::from),
                        () = self.cancel.cancelled() => Err(ApplyError::Waiting(STOPPING.into())),
                    }
                })?;
                crate::fault::point("after-pull");
            }
            Op::BuildImage => {
                let img = self
                    .desired
                    .images
                    .get(name)
                    .ok_or_else(|| ApplyError::Invalid("not declared".into()))?;
                let b = img
                    .spec
                    .build
                    .as_ref()
                    .ok_or_else(|| ApplyError::Invalid("declares no build".into()))?;
                let host = crate::reconcile::Host {
                    state: self.state.clone(),
                    config: self.config.clone(),
                    exe: self.runtime.berth_exe.clone(),
                    handle: self.handle.clone(),
                };
                let reference = img.spec.reference.to_string();
                let built = crate::build::build(
                    &host,
                    &crate::build::BuildOptions {
                        context: b.context.clone(),
                        file: b.file.clone(),
                        tag: reference.clone(),
                        args: b.args.clone(),
                        network: crate::build::Network::parse(&b.network),
                        no_cache: false,
                        state_locked: true,
                        cancel: self.cancel.clone(),
                    },
                    &Quiet,
                )
                .map_err(Box::new)?;
                crate::build::write_record(
                    &self.state.root,
                    &crate::build::BuildRecord {
                        reference,
                        inputs: b.inputs.clone(),
                        digest: built.digest,
                    },
                )
                .map_err(StateError::Io)?;
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
                if self.cancel.is_cancelled() {
                    return Err(ApplyError::Waiting(format!(
                        "depends_on: gave up waiting for {dep} to be {cond}: {STOPPING}"
                    )));
                }
                if Instant::now() >= deadline {
                    return Err(ApplyError::Waiting(format!(
                        "depends_on: {dep} did not become {cond} within {} ({why})",
                        crate::manifest::units::Duration(self.wait_timeout.as_millis() as u64)
                    )));
                }
                if !said {
                    (self.notice)(&format!(
                        "container.{name}: waiting for {dep} to be {cond} ({why})"
                    ));
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// A replacement waits while the running container holds its update lock
    /// (`/run/berth/update.lock`), up to its `lock_deadline` counted from when a replacement
    /// first found it: until then the step fails as deferred (transient: the agent tries
    /// again). Removals are never deferred.
    fn check_update_lock(&self, name: &str) -> Result<(), ApplyError> {
        let cd = self.runtime.dir(name);
        let held = std::fs::symlink_metadata(cd.update_lock()).is_ok();
        let running = matches!(
            self.runtime.status(name),
            Ok(crate::observe::ContainerStatus::Running { .. })
        );
        if !held || !running {
            let _ = std::fs::remove_file(cd.deferred_since());
            return Ok(());
        }
        let deadline = self
            .desired
            .containers
            .get(name)
            .and_then(|c| c.spec.update)
            .unwrap_or_default()
            .lock_deadline;
        let now = crate::fsutil::now_unix();
        // the deadline counts from when a replacement by this same spec first found the lock
        // (a deferral of another spec, since reverted, does not count)
        let want = self
            .desired
            .containers
            .get(name)
            .map(|c| c.spec.digest())
            .unwrap_or_default();
        let since = match deferred_marker(&cd) {
            Some((t, spec)) if spec == want => t,
            _ => {
                crate::fsutil::write_atomic(
                    &cd.deferred_since(),
                    format!("{now} {want}").as_bytes(),
                )
                .map_err(StateError::Io)?;
                now
            }
        };
        let ends = since.saturating_add(deadline.0 / 1000);
        if now >= ends {
            // the marker stays until the replacement removes the old container's directory
            // with it: a step that fails now does not start a fresh deadline
            tracing::warn!(
                container = name,
                "its update lock is held past the deadline ({deadline}): replaced anyway"
            );
            return Ok(());
        }
        Err(ApplyError::Step {
            message: format!(
                "deferred: the container holds its update lock (/run/berth/update.lock) since {} ago; it is replaced once the lock is gone, or in {} (lock_deadline {deadline})",
                crate::manifest::units::Duration(now.saturating_sub(since) * 1000),
                crate::manifest::units::Duration(ends.saturating_sub(now) * 1000),
            ),
            transient: true,
        })
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
                None => return Ok(start_first::stop_settings_of(self.runtime, name)),
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
        self.create_container_from(name, &c.spec, &c.source, &img)
    }

    /// A container of `spec` from `img`: addresses, record, config.
    fn create_container_from(
        &self,
        name: &str,
        spec: &ContainerSpec,
        source: &crate::manifest::spec::Source,
        img: &crate::store::StoredImage,
    ) -> Result<(), ApplyError> {
        self.make(self.runtime, name, false, spec, source, img)
    }

    /// Make container `name` of `spec` from `img` in `rt`: addresses, directory, config,
    /// record, hosts file. `beside`: started beside a running container of the same name
    /// (start-first): its addresses leased as `NAME@next`, veths of its own, its ports to
    /// be taken from its predecessor, and its record kept in its directory until it has
    /// the name.
    pub(super) fn make(
        &self,
        rt: &Runtime,
        name: &str,
        beside: bool,
        spec: &ContainerSpec,
        source: &crate::manifest::spec::Source,
        img: &crate::store::StoredImage,
    ) -> Result<(), ApplyError> {
        let key = if beside {
            network::next_key(name)
        } else {
            name.to_string()
        };
        let net = if beside {
            let veths = format!("{name}@{}", crate::fsutil::random_hex());
            let net = self.attach_as(&key, &veths, spec)?;
            // its veths must not change the bridge's MAC under the running container
            if let (NetMode::Bridge { ifaces, .. }, _) = &net {
                for i in ifaces {
                    let gateway = crate::net::Subnet::new(i.addr, i.prefix).gateway();
                    crate::net::link::pin_bridge_mac(&i.bridge, gateway)?;
                }
            }
            net
        } else {
            let net = self.attach(name, spec)?;
            crate::fault::point("after-attach");
            net
        };
        let dir = rt.create_dir(name)?;
        let mut cfg = runtime_config(
            self.store,
            self.state,
            self.config,
            &dir,
            name,
            spec,
            img,
            net,
        )?;
        cfg.ports_from_peer = beside && !cfg.ports.is_empty();
        // /run/berth's source (see runtime_config)
        if UpdateSpec::locks(spec.update) {
            crate::fsutil::create_dir_mode(&dir.berth_run(), 0o755).map_err(StateError::Io)?;
        }
        let rec = ContainerRecord {
            name: name.into(),
            source: source.clone(),
            spec: spec.clone(),
            image_digest: Some(img.digest().to_string()),
            created_at: crate::fsutil::now_unix(),
            stopped_by_user: false,
        };
        if beside {
            crate::fsutil::write_json(&dir.0.join(start_first::NEXT_RECORD), &rec)
                .map_err(StateError::Io)?;
            rt.prepare(&cfg)?;
        } else {
            // the record first: a crash after it shows up as drift and is repaired
            self.state.write_record(Kind::Container, name, &rec)?;
            crate::fault::point("after-record");
            rt.prepare(&cfg)?;
            crate::fault::point("after-prepare");
        }
        if matches!(cfg.net, NetMode::Bridge { .. }) {
            // its own hosts file now; its peers' after the wave (refresh_hosts in execute)
            let _g = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
            refresh_hosts(self.state, Some(&key))?;
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
        Op::BuildImage => "build image",
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

/// A build inside an apply tells nothing as it goes (the step's outcome says how it went).
struct Quiet;
impl crate::build::BuildEvents for Quiet {}

/// When a replacement first found `cd`'s update lock held (Unix seconds), if one did.
pub fn deferred_since(cd: &rc::ContainerDir) -> Option<u64> {
    deferred_marker(cd).map(|(t, _)| t)
}

/// The deferral marker: since when, and for which spec (a digest of it).
fn deferred_marker(cd: &rc::ContainerDir) -> Option<(u64, String)> {
    let s = std::fs::read_to_string(cd.deferred_since()).ok()?;
    let mut parts = s.split_whitespace();
    let t = parts.next()?.parse().ok()?;
    Some((t, parts.next().unwrap_or_default().to_string()))
}

/// How a container ended, for a rollback's reason: `exited 3`, `was killed by signal 9`.
fn exited(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exited {c}"),
        (_, Some(s)) => format!("was killed by signal {s}"),
        _ => "exited".into(),
    }
}
