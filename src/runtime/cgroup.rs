//! Container cgroups through `cgroups-rs`, v1 and v2.
//!
//! A container's cgroup goes beneath the cgroup berth itself runs in (per controller on v1),
//! under `berth/<container>` — the delegated-subtree model of systemd's `Delegate=yes` — unless
//! the host config names an absolute `cgroup_parent`. The paths used are recorded in the
//! container's state so a later berth process, wherever it runs, finds the same cgroup.

use super::config::Limits;
use cgroups_rs::CgroupPid;
use cgroups_rs::fs::cgroup::{Cgroup, get_cgroups_relative_paths};
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::devices::{DevicePermissions, DeviceType, DevicesController};
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Controller, Hierarchy, MaxValue, Subsystem, hierarchies};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {step}: {message}")]
    Failed {
        path: String,
        step: &'static str,
        message: String,
    },
}

/// Where a container's cgroup is: enough to load it again from any process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CgroupLocation {
    /// Path below each controller's base (relative, no leading slash).
    pub path: String,
    /// v1: each controller's base (berth's own cgroup at creation); empty with an absolute parent.
    #[serde(default)]
    pub relative: HashMap<String, String>,
    pub v2: bool,
}

const CPU_PERIOD_US: u64 = 100_000;

/// The xattr naming, on a container's cgroup directories, the container directory it is for.
const OWNER_XATTR: &str = "trusted.berth.container";

/// How a container directory is named in [`OWNER_XATTR`]: absolute, through no symlink (the
/// state directory may be given relative or through a link). A directory that no longer
/// exists is resolved through its parent.
pub fn owner_path(container_dir: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(container_dir) {
        return p;
    }
    match (container_dir.parent(), container_dir.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| container_dir.to_path_buf()),
        _ => container_dir.to_path_buf(),
    }
}

fn err(path: &str, step: &'static str, e: impl std::fmt::Display) -> CgroupError {
    CgroupError::Failed {
        path: path.to_string(),
        step,
        message: e.to_string(),
    }
}

/// berth's own cgroup on the unified (v2) hierarchy, from /proc/self/cgroup.
fn own_v2_path() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("0::")
                    .map(|p| p.trim_start_matches('/').to_string())
            })
        })
        .unwrap_or_default()
}

/// The v1 controllers a container gets a cgroup in: those berth limits (memory, cpu, pids,
/// devices) or reads (cpuacct). runc makes one in every mounted hierarchy; each further one
/// here (blkio, cpuset — whose cpus and mems must be copied down first —, freezer, net_cls,
/// perf_event, hugetlb, name=systemd) would cost a mkdir on every start and an rmdir on every
/// removal for nothing berth uses, and leaves the container where berth itself is.
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids", "devices"];

/// A v1 hierarchy narrowed to [`V1_CONTROLLERS`].
#[derive(Debug, Clone)]
struct V1Subset(hierarchies::V1);

impl Hierarchy for V1Subset {
    fn subsystems(&self) -> Vec<Subsystem> {
        self.0
            .subsystems()
            .into_iter()
            .filter(|s| V1_CONTROLLERS.contains(&s.controller_name().as_str()))
            .collect()
    }
    fn root(&self) -> PathBuf {
        self.0.root()
    }
    fn root_control_group(&self) -> Cgroup {
        Cgroup::load(Box::new(self.clone()), "")
    }
    fn parent_control_group(&self, path: &str) -> Cgroup {
        let parent = std::path::Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        Cgroup::load(Box::new(self.clone()), parent)
    }
    fn v2(&self) -> bool {
        false
    }
}

/// The host's cgroup hierarchy, read at most once per [`HIERARCHY_TTL`]: `hierarchies::auto()`
/// parses /proc/self/mountinfo every time, and `plan` loads every container's cgroup; but a
/// process that runs for months (the agent) must see a hierarchy mounted or changed since.
fn hierarchy() -> Box<dyn Hierarchy> {
    #[derive(Clone)]
    enum Cached {
        V1(V1Subset),
        V2(hierarchies::V2),
    }
    static HIER: std::sync::Mutex<Option<(std::time::Instant, Cached)>> =
        std::sync::Mutex::new(None);
    let read = || {
        if hierarchies::is_cgroup2_unified_mode() {
            Cached::V2(hierarchies::V2::new())
        } else {
            Cached::V1(V1Subset(hierarchies::V1::new()))
        }
    };
    let cached = match HIER.lock() {
        Ok(mut g) => match &*g {
            Some((at, c)) if at.elapsed() < HIERARCHY_TTL => c.clone(),
            _ => {
                let c = read();
                *g = Some((std::time::Instant::now(), c.clone()));
                c
            }
        },
        Err(_) => read(),
    };
    match cached {
        Cached::V1(h) => Box::new(h),
        Cached::V2(h) => Box::new(h),
    }
}

/// How long the cgroup hierarchy read from mountinfo is trusted.
const HIERARCHY_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// The number on the `key value` line of a cgroup file such as memory.events or cpu.stat.
fn read_keyed(path: &std::path::Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// One number from a cgroup file of `controller` ("max" and unreadable files give `None`).
/// cgroups-rs reads a dozen files to report one memory value; `plan` needs just the one.
fn read_number(controller: &dyn Controller, file: &str) -> Option<i64> {
    std::fs::read_to_string(controller.path().join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A container's cgroup directory name: `NAME-` + a hash of the state directory it belongs
/// to (`dir` is `STATE/containers/NAME`), so that two state directories can run containers of
/// the same name side by side.
pub fn leaf_name(dir: &Path) -> String {
    // a container's name leads to its slot: the slot's name it is
    let dir = crate::fsutil::canonical(dir);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let containers = crate::fsutil::canonical(dir.parent().unwrap_or(Path::new("/")));
    format!(
        "{name}-{}",
        crate::fsutil::short_hash(&[containers.as_os_str().as_encoded_bytes()])
    )
}

impl CgroupLocation {
    /// The location for a new container cgroup.
    pub fn for_container(dir: &Path, parent: Option<&Path>) -> CgroupLocation {
        let v2 = hierarchies::is_cgroup2_unified_mode();
        let name = leaf_name(dir);
        match parent {
            Some(p) => CgroupLocation {
                path: p
                    .join(&name)
                    .to_string_lossy()
                    .trim_start_matches('/')
                    .to_string(),
                relative: HashMap::new(),
                v2,
            },
            None if v2 => {
                let own = PathBuf::from(own_v2_path());
                CgroupLocation {
                    path: own.join("berth").join(&name).to_string_lossy().into_owned(),
                    relative: HashMap::new(),
                    v2,
                }
            }
            None => CgroupLocation {
                path: format!("berth/{name}"),
                relative: get_cgroups_relative_paths().unwrap_or_default(),
                v2,
            },
        }
    }

    fn load(&self) -> Cgroup {
        let hier = hierarchy();
        if self.relative.is_empty() {
            Cgroup::load(hier, &self.path)
        } else {
            Cgroup::load_with_relative_paths(hier, &self.path, self.relative.clone())
        }
    }

    /// Create the cgroup with its limits, for the container whose directory is `owner`.
    pub fn create(&self, limits: &Limits, owner: &Path) -> Result<ContainerCgroup, CgroupError> {
        let owner = owner_path(owner);
        let existing = self.open();
        if existing.exists() && !existing.procs().is_empty() {
            match existing.owner() {
                // processes of this very container that berth lost track of (its directory
                // was removed outside berth): they go, as their container is being replaced
                Some(o) if o == owner => existing.destroy()?,
                // Two state directories may declare a container of the same name: never
                // share (and later kill) a cgroup that another container's processes are in.
                o => {
                    return Err(err(
                        &self.path,
                        "create",
                        match o {
                            Some(o) => format!(
                                "the cgroup holds the processes of the container in {}",
                                o.display()
                            ),
                            None => "the cgroup already holds processes of another container \
                                     (a container of this name from another berth state \
                                     directory?)"
                                .to_string(),
                        },
                    ));
                }
            }
        }
        let cg = self.load();
        cg.create().map_err(|e| err(&self.path, "create", e))?;
        let c = ContainerCgroup {
            cg,
            loc: self.clone(),
        };
        c.set_owner(&owner);
        // a cgroup that cannot be restricted is not left behind (nor reused later with a
        // device program too many)
        if let Err(e) = c.restrict_devices().and_then(|()| c.set_limits(limits)) {
            let _ = c.destroy();
            return Err(e);
        }
        Ok(c)
    }

    /// A handle to an existing cgroup (it may have been removed).
    pub fn open(&self) -> ContainerCgroup {
        ContainerCgroup {
            cg: self.load(),
            loc: self.clone(),
        }
    }
}

pub struct ContainerCgroup {
    cg: Cgroup,
    loc: CgroupLocation,
}

impl ContainerCgroup {
    pub fn exists(&self) -> bool {
        self.cg.exists()
    }

    /// Mark the cgroup as the one of the container in directory `owner` (an xattr on each of
    /// its directories), so that berth can tell its own processes from another state
    /// directory's when the container's directory is gone. Best effort: an unmarked cgroup
    /// is simply never claimed.
    fn set_owner(&self, owner: &Path) {
        for d in self.dirs() {
            let _ = xattr::set(&d, OWNER_XATTR, owner.as_os_str().as_bytes());
        }
    }

    /// The directory of the container this cgroup was made for, if it is marked.
    pub fn owner(&self) -> Option<PathBuf> {
        self.dirs().iter().find_map(|d| {
            let v = xattr::get(d, OWNER_XATTR).ok()??;
            Some(PathBuf::from(std::ffi::OsString::from_vec(v)))
        })
    }

    /// Docker's device rules (see `super::devices`): on v1 through the devices controller,
    /// on v2 as an eBPF program attached to the cgroup. Fails closed.
    fn restrict_devices(&self) -> Result<(), CgroupError> {
        let p = &self.loc.path;
        if self.loc.v2 {
            return super::devices::restrict_v2(&self.v2_dir())
                .map_err(|e| err(p, "attach the device filter", e));
        }
        let dev = self.cg.controller_of::<DevicesController>().ok_or_else(|| {
            err(
                p,
                "restrict devices",
                "no devices controller is mounted: refusing to run a container with unrestricted device access",
            )
        })?;
        let all = DevicePermissions::all();
        dev.deny_device(DeviceType::All, -1, -1, &all)
            .map_err(|e| err(p, "deny all devices", e))?;
        for r in super::devices::ALLOWED {
            let t = match r.kind {
                super::devices::Kind::Char => DeviceType::Char,
                super::devices::Kind::Block => DeviceType::Block,
            };
            let any = |n: Option<u32>| n.map(i64::from).unwrap_or(-1);
            let perms: Vec<DevicePermissions> = r
                .access
                .chars()
                .filter_map(DevicePermissions::from_char)
                .collect();
            dev.allow_device(t, any(r.major), any(r.minor), &perms)
                .map_err(|e| err(p, "allow device", e))?;
        }
        Ok(())
    }

    /// The cgroup's directory on the unified hierarchy (v2).
    fn v2_dir(&self) -> PathBuf {
        hierarchy().root().join(&self.loc.path)
    }

    /// Whether the container's first process joins the cgroup itself ([`Self::join_self`])
    /// rather than being added by the shim ([`Self::add`]): on v1.
    pub fn joins_itself(&self) -> bool {
        !self.loc.v2
    }

    /// Move the calling process, which must be single-threaded, into the cgroup (v1). Writing
    /// 0 to `tasks` moves just the caller, which the kernel does without taking its global
    /// threadgroup lock for writing; writing a pid to `cgroup.procs` takes it, and each such
    /// write waits out an RCU grace period (5-15 ms here) — the largest single cost of a
    /// container start.
    pub fn join_self(&self) -> Result<(), CgroupError> {
        self.cg
            .add_task(CgroupPid::from(0))
            .map_err(|e| err(&self.loc.path, "join", e))
    }

    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        self.cg
            .add_task_by_tgid(CgroupPid::from(pid as u64))
            .map_err(|e| err(&self.loc.path, "add process", e))
    }

    /// Apply memory (with memory+swap equal to it), CPU quota and pids limits; `None` lifts one.
    pub fn set_limits(&self, l: &Limits) -> Result<(), CgroupError> {
        let p = &self.loc.path;
        if let Some(mem) = self.cg.controller_of::<MemController>() {
            let v = l.memory.map(|m| m as i64).unwrap_or(-1);
            if self.loc.v2 {
                mem.set_limit(v).map_err(|e| err(p, "set memory.max", e))?;
                if l.memory.is_some() {
                    // swap.max is swap alone on v2: none means memory+swap = memory
                    let _ = mem.set_memswap_limit(0);
                } else {
                    let _ = mem.set_memswap_limit(-1);
                }
            } else if l.memory.is_some() {
                // v1 needs limit ≤ memsw: lower memsw last when shrinking, raise it first when growing
                let _ = mem.set_memswap_limit(v);
                mem.set_limit(v)
                    .map_err(|e| err(p, "set memory.limit_in_bytes", e))?;
                let _ = mem.set_memswap_limit(v);
            } else {
                let _ = mem.set_memswap_limit(-1);
                mem.set_limit(-1)
                    .map_err(|e| err(p, "set memory.limit_in_bytes", e))?;
                let _ = mem.set_memswap_limit(-1);
            }
        }
        if let Some(cpu) = self.cg.controller_of::<CpuController>() {
            let quota = l
                .cpus
                .map(|c| (c * CPU_PERIOD_US as f64).round() as i64)
                .unwrap_or(-1);
            cpu.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
                .map_err(|e| err(p, "set cpu quota", e))?;
        }
        if let Some(pids) = self.cg.controller_of::<PidController>() {
            let v = l
                .pids
                .map(|n| MaxValue::Value(n as i64))
                .unwrap_or(MaxValue::Max);
            pids.set_pid_max(v).map_err(|e| err(p, "set pids.max", e))?;
        }
        Ok(())
    }

    /// The limits as the host has them now.
    pub fn read_limits(&self) -> Limits {
        let mut l = Limits::default();
        if let Some(mem) = self.cg.controller_of::<MemController>() {
            let file = if self.loc.v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            let lim = read_number(mem, file).unwrap_or(-1);
            // "unlimited" on v1 is a huge page-rounded number
            if lim > 0 && lim < (1i64 << 50) {
                l.memory = Some(lim as u64);
            }
        }
        if let Some(cpu) = self.cg.controller_of::<CpuController>()
            && let Ok(q) = cpu.cfs_quota()
            && q > 0
        {
            l.cpus = Some(q as f64 / CPU_PERIOD_US as f64);
        }
        if let Some(p) = self.cg.controller_of::<PidController>()
            && let Ok(MaxValue::Value(n)) = p.get_pid_max()
        {
            l.pids = Some(n as u64);
        }
        l
    }

    /// How many times the OOM killer struck in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        // the count is the `oom_kill` line of memory.events (v2) or memory.oom_control (v1)
        let file = if self.loc.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.cg
            .controller_of::<MemController>()
            .and_then(|m| read_keyed(&m.path().join(file), "oom_kill"))
            .unwrap_or(0)
    }

    /// Memory in use, bytes.
    pub fn memory_usage(&self) -> u64 {
        self.cg
            .controller_of::<MemController>()
            .and_then(|m| {
                let file = if self.loc.v2 {
                    "memory.current"
                } else {
                    "memory.usage_in_bytes"
                };
                read_number(m, file)
            })
            .map(|n| n.max(0) as u64)
            .unwrap_or(0)
    }

    pub fn pids_current(&self) -> u64 {
        self.cg
            .controller_of::<PidController>()
            .and_then(|p| p.get_pid_current().ok())
            .unwrap_or(0)
    }

    /// CPU time used, nanoseconds.
    pub fn cpu_usage_ns(&self) -> u64 {
        if self.loc.v2 {
            return read_keyed(&self.v2_dir().join("cpu.stat"), "usage_usec")
                .map(|us| us * 1000)
                .unwrap_or(0);
        }
        self.cg
            .controller_of::<cgroups_rs::fs::cpuacct::CpuAcctController>()
            .map(|c| c.cpuacct().usage)
            .unwrap_or(0)
    }

    /// Processes in the cgroup.
    pub fn procs(&self) -> Vec<i32> {
        self.cg.procs().into_iter().map(|p| p.pid as i32).collect()
    }

    /// Kill whatever is left and remove the cgroup.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        if !self.cg.exists() {
            return Ok(());
        }
        for _ in 0..50 {
            let procs = self.procs();
            if procs.is_empty() {
                break;
            }
            for p in procs {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let dirs = self.dirs();
        self.cg
            .delete()
            .map_err(|e| err(&self.loc.path, "remove", e))?;
        // a container made before berth narrowed its v1 controllers has directories in more
        // hierarchies than the handle knows; its processes are gone, so they are empty
        for d in &dirs {
            let _ = std::fs::remove_dir(d);
        }
        // the shared `berth` parent goes when its last container does (fails while not empty)
        for d in dirs {
            if let Some(p) = d.parent().filter(|p| p.ends_with("berth")) {
                let _ = std::fs::remove_dir(p);
            }
        }
        Ok(())
    }

    /// Directories of this cgroup on the host (one per controller on v1).
    pub fn dirs(&self) -> Vec<PathBuf> {
        if self.loc.v2 {
            return vec![self.v2_dir()];
        }
        let mut out = vec![];
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in rd.flatten() {
                let ctl = e.file_name().to_string_lossy().into_owned();
                let base = self
                    .loc
                    .relative
                    .get(&ctl)
                    .map(|s| s.trim_start_matches('/').to_string())
                    .unwrap_or_default();
                let p = e.path().join(base).join(&self.loc.path);
                if p.is_dir() {
                    out.push(p);
                }
            }
        }
        out
    }
}
