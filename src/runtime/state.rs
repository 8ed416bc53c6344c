//! A container's live state on disk: `state.json` (written by the shim when the process
//! started) and `exit.json` (written by the shim when it ended), both atomically.

use super::cgroup::CgroupLocation;
use crate::fsutil::{self, PathError};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerState {
    pub pid: i32,
    pub shim_pid: i32,
    /// Unix seconds.
    pub started_at: u64,
    /// Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), to tell a
    /// reused pid from ours.
    pub pid_start_time: u64,
    pub cgroup: CgroupLocation,
    /// How many times this container was started again after exiting.
    #[serde(default)]
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom: bool,
    pub started_at: u64,
    pub finished_at: u64,
    /// Set when the container never got to exec its process.
    #[serde(default)]
    pub error: Option<String>,
    /// When the supervisor starts the container again (Unix milliseconds), if it does;
    /// written with the exit, so that no reader sees the exit without the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_at_ms: Option<u64>,
}

pub fn read_state(p: &Path) -> Result<Option<ContainerState>, PathError> {
    fsutil::read_json(p)
}

pub fn read_exit(p: &Path) -> Result<Option<ExitRecord>, PathError> {
    fsutil::read_json(p)
}

/// Field 22 of /proc/PID/stat, or None when the process is gone.
pub fn pid_start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

/// Is this exact process (pid and start time) still alive (and not a zombie)?
pub fn alive(pid: i32, start: u64) -> bool {
    let s = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ESRCH) =>
        {
            return false;
        }
        // out of descriptors or memory says nothing about the process: taken for alive,
        // so that no running container is replaced as lost
        Err(_) => return true,
    };
    let Some(i) = s.rfind(')') else { return false };
    let rest: Vec<&str> = s[i + 2..].split(' ').collect();
    rest.first() != Some(&"Z") && rest.get(19).and_then(|v| v.parse::<u64>().ok()) == Some(start)
}
