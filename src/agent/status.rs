//! What the agent knows about itself and every resource, and the local API that serves it:
//! a unix socket in the state directory (mode 0600, root's peers only). A client writes one
//! request line (`status`), the agent answers with one JSON document and closes.

use crate::apply::StepOutcome;
use crate::fsutil::PathError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The socket's file name in the state directory.
pub const SOCKET: &str = "agent.sock";
/// A request line longer than this is refused.
const MAX_REQUEST: usize = 256;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    /// Unix seconds.
    pub started_at: u64,
    pub dir: PathBuf,
    /// The git commit of the desired state the agent converges to (the last valid one).
    #[serde(default)]
    pub revision: Option<super::git::Revision>,
    /// The last pass, whatever its result.
    #[serde(default)]
    pub last_reconcile: Option<LastReconcile>,
    /// Unix seconds of the last pass that converged everything.
    #[serde(default)]
    pub last_success: Option<u64>,
    /// Whether a pass runs now.
    #[serde(default)]
    pub reconciling: bool,
    /// Every resource of the desired state (and any the last plan destroyed), by address.
    #[serde(default)]
    pub resources: BTreeMap<String, ResourceState>,
    /// Why the manifest directory is not valid now (`file:line:col: message`); the agent
    /// keeps converging to the last valid state meanwhile.
    #[serde(default)]
    pub validation_errors: Vec<String>,
    /// Whether any valid desired state was read yet.
    #[serde(default)]
    pub has_desired: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastReconcile {
    /// Unix seconds when it ended.
    pub at: u64,
    pub millis: u64,
    /// What started it: "start", "change", "resync", "retry", "reload".
    pub trigger: String,
    pub ok: bool,
    /// Steps carried out, failed, skipped or held back.
    pub steps: usize,
    pub failed: usize,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// As declared.
    Converged,
    /// A step is still to be done (skipped because something it needs failed, or not
    /// started because the agent was stopping).
    Pending,
    /// Its last step failed; retried at `next_retry`.
    Failing,
    /// A replacement did not prove itself and was undone: the previous container runs;
    /// not tried again until the manifests change (or `berth apply --retry NAME`).
    RolledBack,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceState {
    pub state: State,
    #[serde(default)]
    pub error: Option<String>,
    /// For a failing resource: whether trying again may succeed without a change.
    #[serde(default)]
    pub transient: bool,
    /// Failed attempts in a row.
    #[serde(default)]
    pub attempts: u32,
    /// Unix milliseconds of the next attempt, while failing.
    #[serde(default)]
    pub next_retry_ms: Option<u64>,
    /// Unix seconds since it is in this state.
    pub since: u64,
}

impl ResourceState {
    pub fn converged(now: u64) -> ResourceState {
        ResourceState {
            state: State::Converged,
            error: None,
            transient: false,
            attempts: 0,
            next_retry_ms: None,
            since: now,
        }
    }
}

/// A held-back step's outcome while its resource backs off.
pub fn held(address: &str, action: crate::plan::Action, r: &ResourceState) -> StepOutcome {
    let now = crate::fsutil::now_unix_ms();
    let wait = r.next_retry_ms.unwrap_or(now).saturating_sub(now);
    StepOutcome {
        address: address.to_string(),
        action,
        ok: false,
        error: Some(format!(
            "held back after {} failed attempt(s), next in {}: {}",
            r.attempts,
            crate::manifest::units::Duration(wait.max(1000) / 1000 * 1000),
            r.error.as_deref().unwrap_or("failed")
        )),
        transient: r.transient,
        millis: 0,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Io(#[from] PathError),
    #[error("the agent's answer on {}: {source}", .path.display())]
    Answer {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Ask the agent on `state_dir` for its status. `Ok(None)` when no agent listens there.
pub fn query(state_dir: &Path) -> Result<Option<Status>, StatusError> {
    use std::io::{Read, Write};
    let path = state_dir.join(SOCKET);
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(PathError::new("connect to", &path, e).into()),
    };
    let io = |e| PathError::new("talk to the agent on", &path, e);
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    s.write_all(b"status\n").map_err(io)?;
    let mut body = Vec::new();
    // a status is a few KiB per resource: bounded all the same
    s.take(64 << 20).read_to_end(&mut body).map_err(io)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|source| StatusError::Answer { path, source })
}

/// Serve the status on `listener` (`STATE/agent.sock`) until the runtime stops.
pub async fn serve(
    listener: tokio::net::UnixListener,
    status: std::sync::Arc<std::sync::Mutex<Status>>,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            // root only (the file mode already says so; a peer in another mount namespace
            // that was handed the socket is checked here)
            let root = stream.peer_cred().is_ok_and(|c| c.uid() == 0);
            let _ =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, root, status)).await;
            drop(slot);
        });
    }
}

async fn answer(
    mut stream: tokio::net::UnixStream,
    root: bool,
    status: std::sync::Arc<std::sync::Mutex<Status>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !root {
        return stream.write_all(b"{\"error\":\"root only\"}\n").await;
    }
    let mut req = Vec::new();
    let mut buf = [0u8; 64];
    while !req.contains(&b'\n') && req.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = req.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let body = if line == b"status" {
        let s = status.lock().map(|s| s.clone()).unwrap_or_default();
        serde_json::to_vec(&s).unwrap_or_default()
    } else {
        b"{\"error\":\"unknown request\"}".to_vec()
    };
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// `berth status`'s text.
pub fn to_text(s: &Status) -> String {
    use std::fmt::Write;
    let now = crate::fsutil::now_unix();
    let ago = |t: u64| {
        format!(
            "{} ago",
            crate::manifest::units::Duration(now.saturating_sub(t) * 1000)
        )
    };
    // whatever the manifests, their repository or a registry put in a message reaches the
    // terminal escaped: no control characters, no forged lines
    let p = crate::text::printable;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "berth agent: pid {}, version {}, up {}",
        s.pid,
        s.version,
        crate::manifest::units::Duration(now.saturating_sub(s.started_at) * 1000)
    );
    let rev = match &s.revision {
        Some(r) => format!(
            " at {}{}{}",
            r.commit
                .as_deref()
                .map_or("(no commit)".into(), |c| p(c, 12)),
            r.branch
                .as_deref()
                .map_or(String::new(), |b| format!(" ({})", p(b, 200))),
            if r.dirty { ", dirty" } else { "" }
        ),
        None => String::new(),
    };
    let _ = writeln!(
        o,
        "manifests: {}{rev}",
        p(&s.dir.display().to_string(), 4096)
    );
    match &s.last_reconcile {
        Some(l) => {
            let _ = writeln!(
                o,
                "last reconcile: {} ({}), {}, {} step(s), {} failed, {} ms{}",
                ago(l.at),
                l.trigger,
                if l.ok { "ok" } else { "FAILED" },
                l.steps,
                l.failed,
                l.millis,
                if s.reconciling {
                    "; reconciling now"
                } else {
                    ""
                }
            );
            if let Some(e) = &l.error {
                for line in e.lines() {
                    let _ = writeln!(o, "  {}", p(line, 4096));
                }
            }
        }
        None => {
            let _ = writeln!(o, "last reconcile: none yet");
        }
    }
    let _ = writeln!(
        o,
        "last success: {}",
        s.last_success.map_or("never".into(), ago)
    );
    let count = |st: State| s.resources.values().filter(|r| r.state == st).count();
    let _ = writeln!(
        o,
        "resources: {} converged, {} pending, {} failing, {} rolled back",
        count(State::Converged),
        count(State::Pending),
        count(State::Failing),
        count(State::RolledBack)
    );
    let now_ms = crate::fsutil::now_unix_ms();
    for (a, r) in s
        .resources
        .iter()
        .filter(|(_, r)| r.state != State::Converged)
    {
        let next = r.next_retry_ms.map_or(String::new(), |t| {
            format!(
                ", next attempt in {}",
                crate::manifest::units::Duration(t.saturating_sub(now_ms) / 1000 * 1000)
            )
        });
        let _ = writeln!(
            o,
            "  {}: {}{}{next}: {}",
            p(a, 200),
            match r.state {
                State::Failing => "failing",
                State::Pending => "pending",
                State::Converged => "converged",
                State::RolledBack => "rolled back",
            },
            if r.attempts > 0 {
                format!(" ({} attempt(s))", r.attempts)
            } else {
                String::new()
            },
            p(r.error.as_deref().unwrap_or(""), 4096)
        );
    }
    if !s.validation_errors.is_empty() {
        let _ = writeln!(
            o,
            "the manifest directory is INVALID{}:",
            if s.has_desired {
                "; converging to the last valid state"
            } else {
                "; nothing is converged until it is valid"
            }
        );
        for e in &s.validation_errors {
            let _ = writeln!(o, "  {}", p(e, 4096));
        }
    }
    o.push('\n');
    o
}
