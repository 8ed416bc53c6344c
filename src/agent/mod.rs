//! `berth agent DIR`: keep the host converged to a manifest directory with nobody watching.
//!
//! One process per state directory (it holds `agent.lock` for its life; `berth apply`
//! refuses meanwhile). The reconcile passes are [`crate::reconcile::converge`], the same as
//! `apply`'s, run one at a time on the process's main thread; everything else (the file
//! watch, signals, the status socket, metrics) runs on one tokio runtime and only asks for a
//! pass. A pass starts on a change in the directory (after a quiet `--debounce`), every
//! `--resync`, when a failing resource is due for a retry, and on SIGHUP (which re-reads
//! the host configuration too). SIGTERM or SIGINT ends the pass under way at the next safe
//! point (no new step starts, waits end, pulls are abandoned) and exits; containers keep
//! running under their supervisors, and the next agent adopts them as they are.

pub mod git;
pub mod metrics;
pub mod status;

use crate::apply::{STOPPING, StepOutcome};
use crate::config::Config;
use crate::manifest::spec::Desired;
use crate::plan::Action;
use crate::reconcile::{self, Events, Host, ReconcileError, Settings};
use crate::state::{StateDir, StateError};
use status::{LastReconcile, ResourceState, State, Status};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("another berth agent (pid {pid}) already manages {}", .state.display())]
    AlreadyRunning { pid: i32, state: PathBuf },
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("finding berth's own executable: {0}")]
    Exe(#[source] std::io::Error),
    #[error("the status socket: {0}")]
    Status(#[from] crate::fsutil::PathError),
    #[error("metrics address {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How the agent runs (`berth agent --help` explains each).
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub resync: Duration,
    pub debounce: Duration,
    pub allow_empty: bool,
    pub max_deletions: usize,
    pub parallel: usize,
    pub wait_timeout: Duration,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The host configuration file, re-read on SIGHUP; `required` when named explicitly.
    pub config_path: PathBuf,
    pub config_required: bool,
    /// A failing resource waits this long before its second attempt, doubling up to
    /// `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// Why the loop wakes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Change,
    Reload,
    Stop,
}

/// Run the agent until SIGTERM or SIGINT.
pub fn run(state: StateDir, config: Config, opts: Options) -> Result<(), AgentError> {
    // descriptors for a long life: the soft limit up to the hard one
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let mut lock = take_lock(&state)?;
    lock.write_pid()
        .map_err(|e| crate::fsutil::PathError::new("write", &state.agent_lock_path(), e))?;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("berth-agent")
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let host = Host::new(state.clone(), config, tokio.handle().clone()).map_err(AgentError::Exe)?;
    let cancel = CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel::<Trigger>();
    let status = Arc::new(Mutex::new(Status {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: crate::fsutil::now_unix(),
        dir: opts.dir.clone(),
        ..Default::default()
    }));
    let metrics = Arc::new(metrics::Metrics::new());
    // the local API first: `berth status` works from the first moment
    {
        let _g = tokio.enter();
        let std_listener = bind_status(&state)?;
        let listener = tokio::net::UnixListener::from_std(std_listener).map_err(|e| {
            crate::fsutil::PathError::new("listen on", &state.root.join(status::SOCKET), e)
        })?;
        tokio.spawn(status::serve(listener, status.clone()));
    }
    if let Some(addr) = opts.metrics_addr {
        let listener = tokio
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|source| AgentError::Metrics { addr, source })?;
        let containers_dir = host.runtime();
        let list = Arc::new(move || container_states(&containers_dir));
        tokio.spawn(metrics::serve(
            listener,
            metrics.clone(),
            status.clone(),
            list,
        ));
    }
    tokio.spawn(signals(tx.clone(), cancel.clone()));
    tracing::info!(
        dir = %opts.dir.display(),
        state = %state.root.display(),
        pid = std::process::id(),
        "berth agent started"
    );
    let mut agent = Agent {
        host,
        opts,
        status,
        metrics,
        cancel,
        watch: None,
        tx,
        last_valid: None,
        last_errors: vec![],
        retries: BTreeMap::new(),
        deleted: vec![],
    };
    agent.run(&rx);
    tracing::info!("berth agent stopped; containers keep running");
    // the runtime's tasks (socket, metrics) end with it; the lock is released on return
    tokio.shutdown_timeout(Duration::from_secs(1));
    let _ = std::fs::remove_file(state.root.join(status::SOCKET));
    Ok(())
}

/// `agent.lock`, exclusively: refused while another agent holds it; waited for while an
/// apply does.
fn take_lock(state: &StateDir) -> Result<crate::state::AgentLock, AgentError> {
    let mut said = false;
    loop {
        match state.agent_lock(true) {
            Ok(l) => return Ok(l),
            Err(StateError::AgentLocked { pid: Some(pid), .. }) => {
                return Err(AgentError::AlreadyRunning {
                    pid,
                    state: state.root.clone(),
                });
            }
            Err(StateError::AgentLocked { pid: None, .. }) => {
                if !said {
                    tracing::warn!("waiting for a berth apply on this state directory to finish");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Bind the status socket (the caller holds the agent lock: a socket file there is a dead
/// agent's).
fn bind_status(state: &StateDir) -> Result<std::os::unix::net::UnixListener, AgentError> {
    let path = state.root.join(status::SOCKET);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(crate::fsutil::PathError::new("remove", &path, e).into()),
    }
    // the process umask (077) makes it 0600 from the start; said again for clarity
    let l = std::os::unix::net::UnixListener::bind(&path)
        .map_err(|e| crate::fsutil::PathError::new("listen on", &path, e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| crate::fsutil::PathError::new("chmod", &path, e))?;
    }
    l.set_nonblocking(true)
        .map_err(|e| crate::fsutil::PathError::new("listen on", &path, e))?;
    Ok(l)
}

/// Each container's state for the metrics: name, status, health.
fn container_states(
    rt: &crate::runtime::Runtime,
) -> Vec<(String, crate::observe::ContainerStatus, Option<String>)> {
    rt.names()
        .into_iter()
        .filter_map(|n| {
            let s = rt.status(&n).ok()?;
            let h = crate::runtime::health::read(&rt.dir(&n)).map(|h| h.status.to_string());
            Some((n, s, h))
        })
        .collect()
}

async fn signals(tx: Sender<Trigger>, cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot listen for signals; stop the agent with SIGKILL");
        return;
    };
    loop {
        let t = tokio::select! {
            _ = term.recv() => Trigger::Stop,
            _ = int.recv() => Trigger::Stop,
            _ = hup.recv() => Trigger::Reload,
        };
        if t == Trigger::Stop {
            tracing::info!("stopping: the pass under way ends at its next safe point");
            cancel.cancel();
        }
        if tx.send(t).is_err() {
            return;
        }
    }
}

struct Agent {
    host: Host,
    opts: Options,
    status: Arc<Mutex<Status>>,
    metrics: Arc<metrics::Metrics>,
    cancel: CancellationToken,
    /// The directory watch, while it is in place, and the directory's identity it watches.
    watch: Option<(notify::RecommendedWatcher, (u64, u64))>,
    tx: Sender<Trigger>,
    /// The last desired state that validated: converged to while the directory is invalid.
    last_valid: Option<(Desired, Option<git::Revision>)>,
    /// The validation errors last logged (logged again only when they change).
    last_errors: Vec<String>,
    /// Failing resources: their state, including when to try again.
    retries: BTreeMap<String, ResourceState>,
    /// Resources destroyed by passes within the last [`DELETION_WINDOW`].
    deleted: Vec<(Instant, usize)>,
}

/// `--max-deletions` counts the resources destroyed within this window.
const DELETION_WINDOW: Duration = Duration::from_secs(3600);

impl Agent {
    fn run(&mut self, rx: &Receiver<Trigger>) {
        let mut next_resync = Instant::now();
        let mut trigger = "start";
        loop {
            self.ensure_watch();
            if Instant::now() >= next_resync || trigger != "resync" {
                self.pass(trigger);
                next_resync = Instant::now() + self.opts.resync;
            }
            if self.cancel.is_cancelled() {
                return;
            }
            // sleep until a change, a signal, the resync or the earliest retry
            let retry_at = self.earliest_retry();
            let wake = retry_at.map_or(next_resync, |r| r.min(next_resync));
            trigger = match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(Trigger::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Trigger::Reload) => {
                    self.reload();
                    "reload"
                }
                Ok(Trigger::Change) => {
                    // a burst (a git checkout rewriting twenty files) is one pass: wait
                    // until the directory is quiet for the debounce time, but not longer
                    // than ten of them (at least 1 s) or past the resync: a directory that
                    // never stops changing does not hold reconciles off
                    let until = (Instant::now()
                        + (self.opts.debounce * 10).max(Duration::from_secs(1)))
                    .min(next_resync.max(Instant::now()));
                    loop {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match rx.recv_timeout(self.opts.debounce.min(left)) {
                            Ok(Trigger::Change) => continue,
                            Ok(Trigger::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                            Ok(Trigger::Reload) => self.reload(),
                            Err(RecvTimeoutError::Timeout) => break,
                        }
                    }
                    "change"
                }
                Err(RecvTimeoutError::Timeout) => {
                    if retry_at.is_some_and(|r| r <= Instant::now()) && Instant::now() < next_resync
                    {
                        "retry"
                    } else {
                        "resync"
                    }
                }
            };
            if trigger == "resync" {
                next_resync = Instant::now();
            }
        }
    }

    /// When the first failing resource is due, as an [`Instant`].
    fn earliest_retry(&self) -> Option<Instant> {
        let now = crate::fsutil::now_unix_ms();
        self.retries
            .values()
            .filter_map(|r| r.next_retry_ms)
            .min()
            .map(|t| Instant::now() + Duration::from_millis(t.saturating_sub(now)))
    }

    /// Watch the directory (recursively) if it is not watched, or if it was replaced (a
    /// rename of a new checkout over it). Without a watch, resyncs still catch changes.
    fn ensure_watch(&mut self) {
        use notify::Watcher;
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::metadata(&self.opts.dir)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if let (Some((_, watched)), Some(id)) = (&self.watch, id)
            && *watched == id
        {
            return;
        }
        self.watch = None;
        let Some(id) = id else {
            return;
        };
        let tx = self.tx.clone();
        let dir = self.opts.dir.clone();
        let handler = move |ev: notify::Result<notify::Event>| {
            let Ok(ev) = ev else { return };
            if matches!(ev.kind, notify::EventKind::Access(_)) {
                return;
            }
            // git's own bookkeeping is not a change of the manifests
            if !ev.paths.is_empty() && ev.paths.iter().all(|p| in_dot_git(&dir, p)) {
                return;
            }
            let _ = tx.send(Trigger::Change);
        };
        // symlinks are not followed: a link to / in the directory would otherwise watch the
        // whole host (every directory one inotify watch, shared with root's other daemons)
        let config = notify::Config::default().with_follow_symlinks(false);
        match notify::RecommendedWatcher::new(handler, config).and_then(|mut w| {
            w.watch(&self.opts.dir, notify::RecursiveMode::Recursive)
                .map(|()| w)
        }) {
            Ok(w) => self.watch = Some((w, id)),
            Err(e) => tracing::warn!(
                dir = %self.opts.dir.display(),
                "cannot watch the manifest directory ({e}); changes are seen at each resync"
            ),
        }
    }

    /// SIGHUP: read the host configuration again (kept as it was if it does not load).
    fn reload(&mut self) {
        match Config::load(&self.opts.config_path, self.opts.config_required) {
            Ok(c) => {
                self.host.config = c;
                tracing::info!(config = %self.opts.config_path.display(), "configuration reloaded");
            }
            Err(e) => tracing::error!(
                config = %self.opts.config_path.display(),
                "configuration not reloaded, the previous one stays: {e}"
            ),
        }
    }

    /// One pass: read the directory, converge to it (or to the last valid state), record
    /// what happened.
    fn pass(&mut self, trigger: &str) {
        let t0 = Instant::now();
        self.set(|s| s.reconciling = true);
        self.load();
        let Some((desired, _)) = &self.last_valid else {
            self.set(|s| s.reconciling = false);
            return;
        };
        // --max-deletions holds for the last hour, not per pass: a directory emptied one
        // commit at a time is refused like one emptied at once
        let hour_ago = Instant::now().checked_sub(DELETION_WINDOW);
        self.deleted
            .retain(|(t, _)| hour_ago.is_none_or(|h| *t > h));
        let recent: usize = self.deleted.iter().map(|(_, n)| n).sum();
        let settings = Settings {
            max_deletions: self.opts.max_deletions.saturating_sub(recent),
            parallel: self.opts.parallel,
            wait_timeout: self.opts.wait_timeout,
            progress: false,
            cancel: self.cancel.clone(),
        };
        // a change in the directory (or SIGHUP) may be the fix: everything is tried now; a
        // resource that fails again goes on backing off from where it was
        if matches!(trigger, "change" | "reload") {
            for r in self.retries.values_mut() {
                r.next_retry_ms = None;
            }
        }
        // resources backing off are held back until they are due
        let now = crate::fsutil::now_unix_ms();
        let held: BTreeMap<String, StepOutcome> = self
            .retries
            .iter()
            .filter(|(_, r)| r.next_retry_ms.is_some_and(|t| t > now))
            .map(|(a, r)| (a.clone(), status::held(a, Action::Update, r)))
            .collect();
        let state = self.host.state.clone();
        let result =
            reconcile::converge(&self.host, desired, &settings, &held, &LogEvents, &|| {
                state.lock(true)
            });
        let millis = t0.elapsed().as_millis() as u64;
        self.metrics
            .reconcile_seconds
            .observe(t0.elapsed().as_secs_f64());
        let at = crate::fsutil::now_unix();
        let desired = desired.clone();
        match result {
            Ok(pass) => {
                for o in &pass.outcomes {
                    if o.address.starts_with("image.") && !held.contains_key(&o.address) {
                        let r = if o.ok { "ok" } else { "failed" };
                        self.metrics
                            .pulls
                            .get_or_create(&vec![("result".into(), r.into())])
                            .inc();
                    }
                }
                self.metrics.pulled_bytes.inc_by(pass.pulled_bytes);
                let ok = pass.result.is_ok();
                self.metrics
                    .reconciles
                    .get_or_create(&vec![(
                        "result".into(),
                        if ok { "ok" } else { "failed" }.into(),
                    )])
                    .inc();
                let failed = pass.outcomes.iter().filter(|o| !o.ok).count();
                if !pass.plan.is_empty() || !ok {
                    let s = pass.plan.summary();
                    tracing::info!(
                        trigger,
                        millis,
                        add = s.add,
                        change = s.change,
                        replace = s.replace,
                        destroy = s.destroy,
                        failed,
                        "reconciled"
                    );
                }
                let destroyed = pass
                    .outcomes
                    .iter()
                    .filter(|o| o.ok && o.action == Action::Destroy)
                    .count();
                if destroyed > 0 {
                    self.deleted.push((Instant::now(), destroyed));
                }
                if pass.outcomes.is_empty() && !ok {
                    // failed before any step (a preflight check): nothing is known of the
                    // resources beyond what was known before
                } else {
                    self.record_outcomes(&desired, &pass.outcomes, &held, &pass.plan.kept);
                }
                let error = pass.result.as_ref().err().map(|e| e.to_string());
                self.set(|s| {
                    s.last_reconcile = Some(LastReconcile {
                        at,
                        millis,
                        trigger: trigger.into(),
                        ok,
                        steps: pass.outcomes.len(),
                        failed,
                        error,
                    });
                    if ok && s.validation_errors.is_empty() {
                        s.last_success = Some(at);
                    }
                });
            }
            Err(e) => {
                let mut msg = crate::apply::error_chain(&e);
                if recent > 0
                    && matches!(
                        e,
                        ReconcileError::Plan(crate::plan::PlanError::TooManyDeletions { .. })
                    )
                {
                    msg.push_str(&format!(
                        " ({recent} resource(s) were destroyed by this agent within the last hour and count against --max-deletions {}; restart the agent or raise it if this is intended)",
                        self.opts.max_deletions
                    ));
                }
                // the same refusal at every resync is said once
                let again = self
                    .status
                    .lock()
                    .ok()
                    .and_then(|s| s.last_reconcile.as_ref().and_then(|l| l.error.clone()))
                    .is_some_and(|m| m == msg);
                let shown = crate::text::printable(&msg, 4096);
                if again {
                    tracing::debug!(trigger, "reconcile failed again: {shown}");
                } else {
                    tracing::error!(trigger, "reconcile failed: {shown}");
                }
                self.metrics
                    .reconciles
                    .get_or_create(&vec![("result".into(), "error".into())])
                    .inc();
                self.set(|s| {
                    s.last_reconcile = Some(LastReconcile {
                        at,
                        millis,
                        trigger: trigger.into(),
                        ok: false,
                        steps: 0,
                        failed: 0,
                        error: Some(msg),
                    })
                });
            }
        }
        // a retry that came due and was not rescheduled by an outcome of its own (the
        // resource was not planned, was skipped, or the pass failed before it) must not stay
        // due: the loop would run passes back to back
        let now = crate::fsutil::now_unix_ms();
        for r in self.retries.values_mut() {
            if r.next_retry_ms.is_some_and(|t| t <= now) {
                r.next_retry_ms = None;
            }
        }
        self.set(|s| s.reconciling = false);
    }

    /// Read and validate the directory: a valid one becomes the desired state; an invalid
    /// one is reported (logged when its errors change) and the last valid one stays.
    fn load(&mut self) {
        let revision = match git::revision(&self.opts.dir) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("git revision of {}: {e}", self.opts.dir.display());
                None
            }
        };
        let errors: Vec<String> = match reconcile::load(&self.opts.dir, self.opts.allow_empty) {
            Ok(d) => {
                if self.last_valid.as_ref().is_none_or(|(_, r)| *r != revision)
                    && let Some(r) = &revision
                {
                    tracing::info!(
                        commit = r.commit.as_deref().unwrap_or("(none)"),
                        dirty = r.dirty,
                        "manifest directory revision"
                    );
                }
                self.last_valid = Some((d, revision.clone()));
                vec![]
            }
            Err(ReconcileError::Invalid { diagnostics, .. }) => {
                diagnostics.iter().map(|d| d.to_string()).collect()
            }
            Err(e) => vec![e.to_string()],
        };
        if errors != self.last_errors {
            if errors.is_empty() {
                tracing::info!("the manifest directory is valid again");
            } else {
                for e in &errors {
                    tracing::error!("{}", crate::text::printable(e, 4096));
                }
                tracing::error!(
                    "the manifest directory is invalid; nothing changes until it is valid{}",
                    if self.last_valid.is_some() {
                        " (the last valid state is kept)"
                    } else {
                        ""
                    }
                );
            }
            self.last_errors = errors.clone();
        }
        let valid = self.last_valid.as_ref().map(|(_, r)| r.clone());
        self.set(|s| {
            s.validation_errors = errors;
            s.has_desired = valid.is_some();
            s.revision = valid.flatten();
        });
    }

    /// Each resource's state after a pass: converged unless its step failed (then it backs
    /// off: `retry_initial` doubling to `retry_max`, with jitter), was skipped or not
    /// started (pending), or was held back (unchanged).
    fn record_outcomes(
        &mut self,
        desired: &Desired,
        outcomes: &[StepOutcome],
        held: &BTreeMap<String, StepOutcome>,
        kept: &[crate::plan::Kept],
    ) {
        let now = crate::fsutil::now_unix();
        let mut resources: BTreeMap<String, ResourceState> = addresses(desired)
            .into_iter()
            .map(|a| (a, ResourceState::converged(now)))
            .collect();
        let before = self
            .status
            .lock()
            .map(|s| s.resources.clone())
            .unwrap_or_default();
        for o in outcomes {
            if held.contains_key(&o.address) {
                if let Some(r) = self.retries.get(&o.address) {
                    resources.insert(o.address.clone(), r.clone());
                }
                continue;
            }
            if o.ok {
                self.retries.remove(&o.address);
                if o.action == Action::Destroy {
                    resources.remove(&o.address);
                }
                continue;
            }
            let err = o.error.clone().unwrap_or_default();
            if err.starts_with("skipped: ") || err == STOPPING {
                resources.insert(
                    o.address.clone(),
                    ResourceState {
                        state: State::Pending,
                        error: Some(err),
                        transient: true,
                        attempts: 0,
                        next_retry_ms: None,
                        since: now,
                    },
                );
                continue;
            }
            let attempts = self.retries.get(&o.address).map_or(0, |r| r.attempts) + 1;
            let delay = backoff(self.opts.retry_initial, self.opts.retry_max, attempts);
            tracing::warn!(
                resource = %o.address,
                attempts,
                retry_in_ms = delay.as_millis() as u64,
                transient = o.transient,
                "{}",
                crate::text::printable(&err, 4096)
            );
            let r = ResourceState {
                state: State::Failing,
                error: Some(err),
                transient: o.transient,
                attempts,
                next_retry_ms: Some(crate::fsutil::now_unix_ms() + delay.as_millis() as u64),
                since: self.retries.get(&o.address).map_or(now, |r| r.since),
            };
            self.retries.insert(o.address.clone(), r.clone());
            resources.insert(o.address.clone(), r);
        }
        // a replacement rolled back (now, or in an earlier pass): not retried
        for o in outcomes.iter().filter(|o| {
            o.error
                .as_deref()
                .is_some_and(|e| e.starts_with("rolled back"))
        }) {
            self.retries.remove(&o.address);
            resources.insert(
                o.address.clone(),
                ResourceState {
                    state: State::RolledBack,
                    error: o.error.clone(),
                    transient: false,
                    attempts: 0,
                    next_retry_ms: None,
                    since: now,
                },
            );
        }
        for k in kept.iter().filter(|k| k.message.starts_with("rolled back")) {
            resources.insert(
                k.address.clone(),
                ResourceState {
                    state: State::RolledBack,
                    error: Some(k.message.clone()),
                    transient: false,
                    attempts: 0,
                    next_retry_ms: None,
                    since: now,
                },
            );
        }
        // a resource that is no longer declared is not retried, nor one the plan no longer
        // has a step for (converged meanwhile)
        let seen: std::collections::BTreeSet<&str> =
            outcomes.iter().map(|o| o.address.as_str()).collect();
        self.retries
            .retain(|a, _| resources.contains_key(a) && seen.contains(a.as_str()));
        // keep `since` for resources whose state did not change
        for (a, r) in resources.iter_mut() {
            if let Some(b) = before.get(a)
                && b.state == r.state
            {
                r.since = b.since;
            }
        }
        self.set(|s| s.resources = resources);
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
}

/// The delay before attempt `attempts + 1`: `initial` doubled per failure, at most `max`,
/// less up to a fifth at random (so that resources failing together spread out): the
/// supervisor's backoff, applied to a resource.
fn backoff(initial: Duration, max: Duration, attempts: u32) -> Duration {
    crate::runtime::supervise::Backoff {
        initial_ms: initial.as_millis() as u64,
        max_ms: max.as_millis() as u64,
        reset_after_ms: 0,
    }
    .delay(
        attempts.saturating_sub(1),
        crate::runtime::supervise::clock_jitter(),
    )
}

/// The address of every declared resource, as plan steps name them.
fn addresses(d: &Desired) -> Vec<String> {
    let mut v: Vec<String> = d
        .containers
        .keys()
        .map(|n| format!("container.{n}"))
        .collect();
    v.extend(d.volumes.keys().map(|n| format!("volume.{n}")));
    v.extend(
        d.networks
            .iter()
            .filter(|(_, n)| !n.source.file.as_os_str().is_empty())
            .map(|(k, _)| format!("network.{k}")),
    );
    v.extend(d.images.iter().map(|(k, i)| {
        if i.spec.implicit {
            format!("image.{:?}", i.spec.reference.to_string())
        } else {
            format!("image.{k}")
        }
    }));
    v
}

fn in_dot_git(dir: &Path, p: &Path) -> bool {
    p.strip_prefix(dir)
        .ok()
        .and_then(|r| r.components().next())
        .is_some_and(|c| c.as_os_str() == ".git")
}

/// Agent events go to the log: one line per change, nothing when nothing changes.
struct LogEvents;

impl Events for LogEvents {
    fn released(&self, names: &[String]) {
        tracing::info!("released the addresses of {}", names.join(", "));
    }
    fn planned(&self, plan: &crate::plan::Plan) {
        if !plan.is_empty() {
            for st in &plan.steps {
                let why: Vec<String> = st.reasons.iter().map(|r| r.to_string()).collect();
                tracing::info!(resource = %st.address, action = ?st.action, "planned: {}", crate::text::printable(&why.join("; "), 4096));
            }
        }
    }
    fn replanned(&self, plan: &crate::plan::Plan) {
        tracing::info!("the host changed while images were pulled; planning again");
        self.planned(plan);
    }
    fn step(&self, o: &StepOutcome) {
        match &o.error {
            None => {
                tracing::info!(resource = %o.address, action = ?o.action, millis = o.millis, "done")
            }
            Some(e) if e.starts_with("held back") => {
                tracing::debug!(resource = %o.address, "{}", crate::text::printable(e, 4096))
            }
            Some(e) => {
                tracing::warn!(resource = %o.address, action = ?o.action, transient = o.transient, "failed: {}", crate::text::printable(e, 4096))
            }
        }
    }
    fn notice(&self, message: &str) {
        tracing::info!("{}", crate::text::printable(message, 4096));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_doubling_to_the_cap() {
        let (i, m) = (Duration::from_secs(5), Duration::from_secs(300));
        let b1 = backoff(i, m, 1);
        assert!(b1 <= i && b1 >= i.mul_f64(0.8), "{b1:?}");
        let b3 = backoff(i, m, 3);
        assert!(b3 <= i * 4 && b3 >= (i * 4).mul_f64(0.8), "{b3:?}");
        let b30 = backoff(i, m, 30);
        assert!(b30 <= m && b30 >= m.mul_f64(0.8), "{b30:?}");
    }

    #[test]
    fn git_bookkeeping_is_not_a_change() {
        let d = Path::new("/srv/manifests");
        assert!(in_dot_git(d, Path::new("/srv/manifests/.git/index.lock")));
        assert!(!in_dot_git(d, Path::new("/srv/manifests/web.toml")));
        assert!(!in_dot_git(d, Path::new("/srv/manifests/sub/.gitignore")));
    }
}
