//! One reconcile pass, shared by `berth apply` and `berth agent`: load → validate → observe →
//! diff → deletion guard → pull (outside the state lock) → execute (under it) → report.
//! Callers only choose settings and how to tell what happens ([`Events`]).

use crate::apply::{ApplyError, Executor, StepOutcome};
use crate::config::Config;
use crate::image::pull::Puller;
use crate::manifest::{self, Diagnostic, LoadError, spec::Desired};
use crate::observe::{self, ObserveError, Observed};
use crate::plan::{self, Op, Plan, PlanError, Step};
use crate::runtime::Runtime;
use crate::state::{StateDir, StateError, StateLock};
use crate::store::Store;
use crate::store::unpack::UnpackOptions;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(
        "{} declares no resources; pass --allow-empty if you mean to remove everything berth created",
        .0.display()
    )]
    Empty(PathBuf),
    #[error("{0}; pass --allow-empty if you mean to remove everything berth created")]
    Unreadable(LoadError),
    /// The manifests do not validate; each diagnostic names file:line:col.
    #[error("manifests in {} are invalid; nothing was changed", .dir.display())]
    Invalid {
        dir: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
    #[error("reading berth's state: {0}")]
    Observe(#[from] ObserveError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("registry client: {0}")]
    Registry(#[from] crate::registry::client::RegistryError),
    #[error("a berth agent (pid {pid}) manages {}; let it converge the host (`berth status` shows how it is doing), or stop it first", .state.display())]
    AgentRunning { pid: i32, state: PathBuf },
}

/// The host berth works on, for a process that may run for months: nothing here caches
/// host facts across passes.
pub struct Host {
    pub state: StateDir,
    pub config: Config,
    /// The berth executable shims are started from: the path resolved when the process
    /// started, so that after a package upgrade new shims run the new binary at that path
    /// (`/proc/self/exe` would name the deleted old one).
    pub exe: PathBuf,
    /// The process's async runtime (pulls, registry checks, netlink).
    pub handle: tokio::runtime::Handle,
}

impl Host {
    /// `exe`: `BERTH_EXE` if set, else this process's executable.
    pub fn new(
        state: StateDir,
        config: Config,
        handle: tokio::runtime::Handle,
    ) -> std::io::Result<Host> {
        let exe = berth_exe()?;
        crate::net::link::use_runtime(handle.clone());
        Ok(Host {
            state,
            config,
            exe,
            handle,
        })
    }

    pub fn runtime(&self) -> Runtime {
        Runtime::new(
            self.state.containers_dir(),
            self.exe.clone(),
            self.config.cgroup_parent.clone(),
        )
    }

    pub fn store(&self) -> Store {
        store(&self.state, &self.config)
    }

    /// A registry client and puller built now (a fresh client per pass: which mirror was
    /// down is not remembered for the life of a long-running process).
    pub fn puller(&self, quiet: bool) -> Result<Puller, ReconcileError> {
        Ok(Puller {
            client: Arc::new(crate::registry::client::RegistryClient::new(&self.config)?),
            store: self.store(),
            concurrency: self.config.pull.concurrency,
            progress: crate::image::progress::Progress::auto(quiet),
            unpack: unpack_options(&self.state, &self.config),
        })
    }
}

/// The berth executable shims are started from: `BERTH_EXE` if set, else this process's.
pub fn berth_exe() -> std::io::Result<PathBuf> {
    match std::env::var_os("BERTH_EXE") {
        Some(p) => Ok(p.into()),
        None => std::env::current_exe(),
    }
}

/// The store of a state directory, keeping the configured free-space reserve.
pub fn store(state: &StateDir, config: &Config) -> Store {
    Store::new(state.store_dir(), state.snapshots_dir()).with_min_free(reserve(state, config))
}

/// The free space the state directory's file system keeps (`[store] min_free`).
fn reserve(state: &StateDir, config: &Config) -> u64 {
    // the file system the store will be on (the nearest directory that exists yet)
    let snapshots = state.snapshots_dir();
    let total = snapshots
        .ancestors()
        .find_map(|d| nix::sys::statvfs::statvfs(d).ok())
        .map(|v| v.blocks().saturating_mul(v.fragment_size()))
        .unwrap_or(0);
    config.store.min_free_bytes(total)
}

pub fn unpack_options(state: &StateDir, config: &Config) -> UnpackOptions {
    let root = nix::unistd::geteuid().is_root();
    UnpackOptions {
        preserve_ownership: root,
        allow_devices: root,
        min_free: reserve(state, config),
    }
}

/// Load and validate the manifest directory, with the deletion guard: a missing, unreadable
/// or empty directory is an error unless `allow_empty`.
pub fn load(dir: &Path, allow_empty: bool) -> Result<Desired, ReconcileError> {
    match manifest::load_dir(dir) {
        Ok(d) if d.declared_count() == 0 && !allow_empty => {
            Err(ReconcileError::Empty(dir.to_path_buf()))
        }
        Ok(d) => Ok(d),
        Err(LoadError::Io { path, source })
            if allow_empty && source.kind() == std::io::ErrorKind::NotFound =>
        {
            tracing::info!(
                "{} is missing; treating it as empty (--allow-empty)",
                path.display()
            );
            Ok(Desired {
                dir: dir.to_path_buf(),
                ..Default::default()
            })
        }
        Err(e @ (LoadError::Io { .. } | LoadError::NotADirectory(_))) => {
            Err(ReconcileError::Unreadable(e))
        }
        Err(LoadError::Invalid(diagnostics)) => Err(ReconcileError::Invalid {
            dir: dir.to_path_buf(),
            diagnostics,
        }),
    }
}

/// Observe the host for a plan: records, the store, each container's live state, and (for
/// `pull = "always"` images) the digest the registry serves now.
pub fn observe(
    host: &Host,
    desired: &Desired,
    events: &dyn Events,
) -> Result<Observed, ReconcileError> {
    let rt = host.runtime();
    let mut observed = observe::observe(&host.state, &host.store(), &rt)?;
    let always: Vec<_> = desired
        .images
        .values()
        .filter(|i| i.spec.pull == crate::manifest::spec::PullPolicy::Always)
        .filter(|i| observed.images.contains_key(&i.spec.reference.to_string()))
        .map(|i| i.spec.reference.clone())
        .collect();
    if !always.is_empty() {
        let client = crate::registry::client::RegistryClient::new(&host.config)?;
        for r in always {
            match host.handle.block_on(client.resolve_digest(&r)) {
                Ok(d) => {
                    if let Some(o) = observed.images.get_mut(&r.to_string()) {
                        o.remote_digest = Some(d);
                    }
                }
                Err(e) => events.notice(&format!("cannot check {r} for a newer image: {e}")),
            }
        }
    }
    Ok(observed)
}

/// The plan for `desired` on this host now, checked against the deletion guard.
pub fn plan(host: &Host, desired: &Desired, settings: &Settings) -> Result<Plan, ReconcileError> {
    let observed = observe(host, desired, &Quiet)?;
    let plan = plan::diff(desired, &observed)?;
    plan::check_deletions(&plan, settings.max_deletions)?;
    Ok(plan)
}

/// How one pass runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Refuse a plan that destroys more than this many resources.
    pub max_deletions: usize,
    /// Container steps at once.
    pub parallel: usize,
    /// How long a container waits for its `depends_on` conditions.
    pub wait_timeout: Duration,
    /// Show pull progress (bars or lines on stderr).
    pub progress: bool,
    /// Cancelled to stop: pulls are abandoned, no new step starts (see [`Executor`]).
    pub cancel: tokio_util::sync::CancellationToken,
}

/// What a pass tells as it goes. Every method has a default that says nothing.
pub trait Events: Sync {
    /// Addresses leased for containers that no longer exist were released.
    fn released(&self, _names: &[String]) {}
    /// The plan about to be carried out (pulls first, outside the state lock).
    fn planned(&self, _plan: &Plan) {}
    /// The host changed while images were pulled: this is the plan now carried out.
    fn replanned(&self, _plan: &Plan) {}
    /// A step finished (or was skipped, or held back).
    fn step(&self, _outcome: &StepOutcome) {}
    /// Progress worth a line: waiting for a dependency, a registry that could not be asked.
    fn notice(&self, _message: &str) {}
}

/// [`Events`] that says nothing.
pub struct Quiet;
impl Events for Quiet {}

/// What one pass did.
#[derive(Debug)]
pub struct Pass {
    /// The steps carried out: the plan under the lock, after the pulls done before it.
    pub plan: Plan,
    pub outcomes: Vec<StepOutcome>,
    /// `Err` names every failed step; the outcomes say which.
    pub result: Result<(), ApplyError>,
    /// Compressed bytes the pulls before the lock downloaded.
    pub pulled_bytes: u64,
}

/// Converge the host to `desired` once.
///
/// Images the plan pulls are pulled first, without the state lock (the store has its own),
/// so that `berth stop` or `start` is not held up by a long download; then, under the lock
/// `lock` takes, the host is observed again and the plan made again, and carried out. A pull
/// that failed is not tried again in the same pass: its dependents are skipped.
///
/// `held` are outcomes decided by the caller (the agent holds back a resource while it backs
/// off): those steps do not run, and what uses them is skipped.
pub fn converge(
    host: &Host,
    desired: &Desired,
    settings: &Settings,
    held: &BTreeMap<String, StepOutcome>,
    events: &dyn Events,
    lock: &dyn Fn() -> Result<StateLock, StateError>,
) -> Result<Pass, ReconcileError> {
    let mut pulled: BTreeMap<String, (Step, StepOutcome)> = BTreeMap::new();
    let mut pulled_bytes = 0;
    let mut first: Option<Plan> = None;
    loop {
        let guard = lock()?;
        // build containers and scratch files of builds that were killed
        crate::build::reap(host);
        let store = host.store();
        let rt = host.runtime();
        let notice = |m: &str| events.notice(m);
        let executor = |puller| executor(host, desired, settings, &store, &rt, &notice, puller);
        // replacements an interrupted apply left undecided are decided first
        executor(None).resume_hand_overs();
        if !host.state.read_rollouts().is_empty() {
            executor(None).resume_rollouts();
        }
        let released = crate::apply::release_orphan_leases(&host.state)?;
        if !released.is_empty() {
            events.released(&released);
        }
        let observed = observe(host, desired, events)?;
        let plan = plan::diff(desired, &observed)?;
        plan::check_deletions(&plan, settings.max_deletions)?;
        match &first {
            None => events.planned(&plan),
            Some(before) if !same_steps(before, &plan, &pulled) => events.replanned(&plan),
            Some(_) => {}
        }
        let pulls: Vec<&Step> = plan
            .steps
            .iter()
            .filter(|s| s.ops.contains(&Op::PullImage) && !held.contains_key(&s.address))
            .collect();
        if first.is_none() && !pulls.is_empty() {
            drop(guard);
            let puller = host.puller(!settings.progress)?;
            for (st, o, bytes) in pull_all(host, desired, &puller, &pulls, &settings.cancel) {
                pulled_bytes += bytes;
                events.step(&o);
                pulled.insert(st.address.clone(), (st, o));
            }
            first = Some(plan);
            continue;
        }
        let mut preset = held.clone();
        // a pull that failed before the lock: its outcome stands (it was reported)
        preset.extend(
            pulled
                .iter()
                .filter(|(_, (_, o))| !o.ok)
                .map(|(a, (_, o))| (a.clone(), o.clone())),
        );
        let puller = if plan
            .steps
            .iter()
            .any(|s| s.ops.contains(&Op::PullImage) && !preset.contains_key(&s.address))
        {
            Some(host.puller(!settings.progress)?)
        } else {
            None
        };
        let ex = executor(puller.as_ref());
        // a failed pull before the lock stands as it was reported then; anything else is
        // reported as it happens
        let report = |o: &StepOutcome| {
            if pulled.get(&o.address).is_none_or(|(_, p)| p.ok) {
                events.step(o);
            }
        };
        let done = ex.execute(&plan, &preset, &report);
        drop(guard);
        // the pulls done before the lock lead the plan and the outcomes
        let mut steps: Vec<Step> = vec![];
        let mut outcomes: Vec<StepOutcome> = vec![];
        for (a, (st, o)) in &pulled {
            // a failed pull whose step is gone from the plan (the image arrived meanwhile)
            // is not a failure of this pass
            if o.ok && !plan.steps.iter().any(|s| &s.address == a) {
                steps.push(st.clone());
                outcomes.push(o.clone());
            }
        }
        steps.extend(plan.steps.iter().cloned());
        outcomes.extend(done.outcomes);
        return Ok(Pass {
            plan: Plan { steps, ..plan },
            outcomes,
            result: done.result,
            pulled_bytes,
        });
    }
}

/// The executor of a pass.
fn executor<'a>(
    host: &'a Host,
    desired: &'a Desired,
    settings: &Settings,
    store: &'a Store,
    rt: &'a Runtime,
    notice: &'a (dyn Fn(&str) + Sync),
    puller: Option<&'a Puller>,
) -> Executor<'a> {
    Executor {
        state: &host.state,
        store,
        runtime: rt,
        puller,
        desired,
        config: &host.config,
        parallel: settings.parallel,
        wait_timeout: settings.wait_timeout,
        net_lock: Default::default(),
        handle: host.handle.clone(),
        notice,
        cancel: settings.cancel.clone(),
    }
}

/// Whether `now` has the steps of `before`, apart from the pulls done in between.
fn same_steps(before: &Plan, now: &Plan, pulled: &BTreeMap<String, (Step, StepOutcome)>) -> bool {
    let key = |p: &Plan| -> Vec<(String, Vec<Op>)> {
        p.steps
            .iter()
            .filter(|s| !pulled.get(&s.address).is_some_and(|(_, o)| o.ok))
            .map(|s| (s.address.clone(), s.ops.clone()))
            .collect()
    };
    key(before) == key(now)
}

/// Pull the images of `steps` at once (bounded by the puller's own layer concurrency).
fn pull_all(
    host: &Host,
    desired: &Desired,
    puller: &Puller,
    steps: &[&Step],
    cancel: &tokio_util::sync::CancellationToken,
) -> Vec<(Step, StepOutcome, u64)> {
    host.handle.block_on(async {
        let jobs = steps.iter().map(|st| async move {
            let t = Instant::now();
            let r = match desired.images.get(&st.name) {
                // abandoned on cancel: what was fetched stays in the store's ingest area
                // until the next gc
                Some(i) => tokio::select! {
                    r = puller.pull(&i.spec.reference) => r.map(|p| p.downloaded).map_err(|e| {
                        (
                            crate::apply::error_chain(&e),
                            ApplyError::Image(e).is_transient(),
                        )
                    }),
                    () = cancel.cancelled() => Err((crate::apply::STOPPING.to_string(), true)),
                },
                None => Err((format!("{}: not in the manifests", st.address), false)),
            };
            let bytes = *r.as_ref().unwrap_or(&0);
            let o = StepOutcome {
                address: st.address.clone(),
                action: st.action,
                ok: r.is_ok(),
                transient: r.as_ref().err().is_some_and(|(_, t)| *t),
                error: r.err().map(|(e, _)| format!("pull image: {e}")),
                millis: t.elapsed().as_millis() as u64,
            };
            ((*st).clone(), o, bytes)
        });
        futures::future::join_all(jobs).await
    })
}
