//! Health checks, run by a container's supervisor: a prober process forked by the shim runs
//! the check command through `berth exec` (so in the container's namespaces and cgroup, with
//! its user, capabilities and seccomp filter; never in a multi-threaded berth), every
//! `interval`, killed after `timeout`, its output read through a pipe and cut. It keeps `health.json` (one writer): the state
//! (`starting`, `healthy`, `unhealthy`), the failing streak and the last results with their
//! output, as docker's `State.Health`. With `on_unhealthy = "restart"` (the default) an
//! unhealthy container is stopped and its supervisor starts it again through the backoff.

use super::config::ContainerDir;
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// A container's health check, as the runtime carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    pub cmd: Vec<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
    pub start_period_ms: u64,
    /// Stop an unhealthy container so that its supervisor starts it again.
    pub restart_on_unhealthy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Starting,
    Healthy,
    Unhealthy,
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HealthStatus::Starting => "starting",
            HealthStatus::Healthy => "healthy",
            HealthStatus::Unhealthy => "unhealthy",
        })
    }
}

/// One run of the check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Unix milliseconds.
    pub start_ms: u64,
    pub end_ms: u64,
    /// The command's exit code; -1 when it timed out or could not run.
    pub exit_code: i32,
    /// The first [`MAX_OUTPUT`] bytes of its output (stdout and stderr), or why it failed.
    pub output: String,
}

/// What `health.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    pub failing_streak: u32,
    /// The last [`KEEP`] probes, oldest first.
    pub log: Vec<Probe>,
    /// Set when the prober stopped the container for being unhealthy: its supervisor starts
    /// it again whatever the restart policy.
    #[serde(default)]
    pub stopped_unhealthy: bool,
}

/// Probes kept in `health.json`.
pub const KEEP: usize = 5;
/// Bytes of a probe's output kept.
pub const MAX_OUTPUT: usize = 4096;

impl Health {
    pub fn new() -> Health {
        Health {
            status: HealthStatus::Starting,
            failing_streak: 0,
            log: vec![],
            stopped_unhealthy: false,
        }
    }

    /// Count a probe, as docker does: a success makes the container healthy; a failure adds
    /// to the streak, except while still starting within the start period; `retries`
    /// failures in a row make it unhealthy.
    pub fn record(&mut self, probe: Probe, in_start_period: bool, retries: u32) {
        if probe.exit_code == 0 {
            self.status = HealthStatus::Healthy;
            self.failing_streak = 0;
        } else if !(in_start_period && self.status == HealthStatus::Starting) {
            self.failing_streak += 1;
            if self.failing_streak >= retries {
                self.status = HealthStatus::Unhealthy;
            }
        }
        self.log.push(probe);
        if self.log.len() > KEEP {
            self.log.remove(0);
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

pub fn read(cd: &ContainerDir) -> Option<Health> {
    fsutil::read_json(&cd.health()).ok().flatten()
}

/// The prober: forked by the shim (so single-threaded, and dying with it) once the container
/// runs, killed when the container exits. `pid` is the container's first process, `stop` its
/// stop signal and timeout. Never returns.
pub fn probe_loop(cd: &ContainerDir, h: &HealthConfig, pid: i32, stop: (&str, u64)) -> ! {
    let started = Instant::now();
    let mut health = Health::new();
    let _ = fsutil::write_json_volatile(&cd.health(), &health);
    loop {
        std::thread::sleep(Duration::from_millis(h.interval_ms));
        let probe = run_probe(cd, h);
        let in_start = started.elapsed() < Duration::from_millis(h.start_period_ms);
        health.record(probe, in_start, h.retries);
        let unhealthy = health.status == HealthStatus::Unhealthy;
        if unhealthy && h.restart_on_unhealthy {
            health.stopped_unhealthy = true;
        }
        let _ = fsutil::write_json_volatile(&cd.health(), &health);
        if unhealthy && h.restart_on_unhealthy {
            stop_container(pid, stop);
            std::process::exit(0);
        }
    }
}

/// Run the check once through `berth exec` (this executable: the shim's unwritable view of
/// berth), its output (stdout and stderr) through a pipe of which the first [`MAX_OUTPUT`]
/// bytes are kept and the rest read and dropped, killed after the timeout.
fn run_probe(cd: &ContainerDir, h: &HealthConfig) -> Probe {
    use std::os::fd::AsFd;
    let start_ms = fsutil::now_unix_ms();
    let fail = |why: String| Probe {
        start_ms,
        end_ms: fsutil::now_unix_ms(),
        exit_code: -1,
        output: why,
    };
    let (Some(name), Some(parent)) = (cd.0.file_name().and_then(|n| n.to_str()), cd.0.parent())
    else {
        return fail("no container name".into());
    };
    // a slot (STATE/containers/.slots/NAME-…) is addressed as such: its name may be another
    // container's too (one being replaced start-first) or pass to it meanwhile
    let slot = parent.file_name().is_some_and(|n| n == ".slots");
    let Some(state) = (if slot {
        parent.parent().and_then(|p| p.parent())
    } else {
        parent.parent()
    }) else {
        return fail("no state directory".into());
    };
    let Ok((rd, wr)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        return fail("cannot make a pipe".into());
    };
    let Ok(wr2) = wr.try_clone() else {
        return fail("cannot duplicate the pipe".into());
    };
    let spawned = std::process::Command::new("/proc/self/exe")
        .arg("--state-dir")
        .arg(state)
        .arg("exec")
        .args(slot.then_some("--slot"))
        .arg(name)
        .arg("--")
        .args(&h.cmd)
        .stdin(std::process::Stdio::null())
        .stdout(wr)
        .stderr(wr2)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot run the check: {e}")),
    };
    let deadline = Instant::now() + Duration::from_millis(h.timeout_ms);
    // the output, until the end of the pipe or the deadline
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut f = std::fs::File::from(rd);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut fds = [nix::poll::PollFd::new(
            f.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(0) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        use std::io::Read;
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let keep = n.min(MAX_OUTPUT.saturating_sub(out.len()));
                out.extend_from_slice(&buf[..keep]);
            }
        }
    }
    drop(f);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                // berth exec's child in the container dies with it (parent-death signal)
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    // kept as text (JSON escapes it); whoever prints it to a terminal escapes it there
    let output = String::from_utf8_lossy(&out).into_owned();
    let end_ms = fsutil::now_unix_ms();
    match status {
        Some(st) => Probe {
            start_ms,
            end_ms,
            exit_code: st.code().unwrap_or(-1),
            output,
        },
        None => Probe {
            start_ms,
            end_ms,
            exit_code: -1,
            output: format!("timed out after {} ms{}", h.timeout_ms, tail(&output)),
        },
    }
}

fn tail(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

/// Stop the container's first process: its stop signal, then SIGKILL after its timeout.
fn stop_container(pid: i32, (signal, timeout_ms): (&str, u64)) {
    let pid = nix::unistd::Pid::from_raw(pid);
    let sig = signal
        .parse::<nix::sys::signal::Signal>()
        .unwrap_or(nix::sys::signal::Signal::SIGTERM);
    let start = super::state::pid_start_time(pid.as_raw());
    let alive = || start.is_some() && super::state::pid_start_time(pid.as_raw()) == start;
    let _ = nix::sys::signal::kill(pid, sig);
    let end = Instant::now() + Duration::from_millis(timeout_ms);
    while alive() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive() {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(code: i32) -> Probe {
        Probe {
            start_ms: 0,
            end_ms: 1,
            exit_code: code,
            output: String::new(),
        }
    }

    #[test]
    fn states_follow_docker() {
        let mut h = Health::new();
        // failures within the start period do not count while starting
        h.record(probe(1), true, 2);
        h.record(probe(1), true, 2);
        assert_eq!((h.status, h.failing_streak), (HealthStatus::Starting, 0));
        h.record(probe(0), true, 2);
        assert_eq!(h.status, HealthStatus::Healthy);
        // once healthy, failures count even within the start period
        h.record(probe(1), true, 2);
        assert_eq!((h.status, h.failing_streak), (HealthStatus::Healthy, 1));
        h.record(probe(-1), false, 2);
        assert_eq!((h.status, h.failing_streak), (HealthStatus::Unhealthy, 2));
        h.record(probe(0), false, 2);
        assert_eq!((h.status, h.failing_streak), (HealthStatus::Healthy, 0));
        // the log keeps the last five
        assert_eq!(h.log.len(), KEEP);
        assert_eq!(h.log.last().unwrap().exit_code, 0);
        // out of the start period, failures count from the start
        let mut h = Health::new();
        h.record(probe(1), false, 1);
        assert_eq!(h.status, HealthStatus::Unhealthy);
    }
}
