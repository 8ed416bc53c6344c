//! What the shim needs to run one container, computed by `apply` from the manifest and the
//! image config and written to `STATE/containers/NAME/config.json`.

use crate::manifest::spec::ContainerSpec;
use crate::registry::types::ImageConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const LOG_MAX_SIZE: u64 = 10 << 20;
pub const LOG_MAX_FILES: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetMode {
    /// The host's network namespace.
    Host,
    /// A fresh namespace with only loopback.
    None,
    /// A fresh namespace with one veth per bridge network (eth0, eth1, …) and a default
    /// route via the first network's gateway.
    Bridge {
        ifaces: Vec<BridgeIface>,
        gateway: std::net::Ipv4Addr,
    },
}

impl NetMode {
    /// Whether the container gets its own network namespace.
    pub fn own_namespace(&self) -> bool {
        !matches!(self, NetMode::Host)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BridgeIface {
    pub network: String,
    pub bridge: String,
    /// Host side of the veth pair.
    pub host_veth: String,
    /// The container side's name until it is renamed inside.
    pub peer: String,
    /// eth0, eth1, …
    pub name: String,
    pub addr: std::net::Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MountKind {
    Bind {
        source: PathBuf,
        read_only: bool,
    },
    /// A named volume: `source` is its data directory; filled from the image on first use.
    Volume {
        source: PathBuf,
        read_only: bool,
        populate_marker: PathBuf,
    },
    Tmpfs {
        size: Option<u64>,
        mode: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MountSpec {
    pub target: PathBuf,
    pub kind: MountKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `uid[:gid]` or `name[:group]`, resolved inside the container's /etc/passwd and /etc/group.
    pub user: Option<String>,
    /// Capability names (`CAP_…`) the process keeps.
    pub capabilities: Vec<String>,
    /// Run under docker's default seccomp profile (false: unconfined). Configs written before
    /// it existed get the filter.
    #[serde(default = "yes")]
    pub seccomp: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Limits {
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    pub name: String,
    /// Snapshot `fs` directories, bottom layer first.
    pub layers: Vec<PathBuf>,
    pub read_only: bool,
    pub hostname: String,
    pub net: NetMode,
    pub process: ProcessSpec,
    pub mounts: Vec<MountSpec>,
    pub limits: Limits,
    /// Absolute cgroup parent from the host config; None = below berth's own cgroup.
    pub cgroup_parent: Option<PathBuf>,
    pub log_max_size: u64,
    pub log_max_files: u32,
    pub stop_signal: String,
    pub stop_timeout_ms: u64,
    /// Published ports, proxied by the shim to the first bridge address.
    #[serde(default)]
    pub ports: Vec<crate::net::proxy::PortMap>,
    /// The published ports come from the container this one replaces, handed over once it
    /// proves itself (see [`super::handoff`]): the shim binds none of them at start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ports_from_peer: bool,
    /// What the shim does when the container exits (read again after every exit, so an
    /// in-place update applies to the next decision).
    #[serde(default)]
    pub restart: super::supervise::RestartPolicy,
    #[serde(default)]
    pub backoff: super::supervise::Backoff,
    #[serde(default)]
    pub health: Option<super::health::HealthConfig>,
}

/// Files and folders of one container under `STATE/containers/NAME`.
#[derive(Debug, Clone)]
pub struct ContainerDir(pub PathBuf);

impl ContainerDir {
    pub fn config(&self) -> PathBuf {
        self.0.join("config.json")
    }
    pub fn state(&self) -> PathBuf {
        self.0.join("state.json")
    }
    pub fn exit(&self) -> PathBuf {
        self.0.join("exit.json")
    }
    pub fn upper(&self) -> PathBuf {
        self.0.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.0.join("work")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.0.join("rootfs")
    }
    pub fn etc(&self) -> PathBuf {
        self.0.join("etc")
    }
    pub fn log(&self) -> PathBuf {
        self.0.join("container.log")
    }
    /// Present while the container is stopped by intent (`berth stop`, a removal): its
    /// supervisor does not start it again.
    pub fn stop_intent(&self) -> PathBuf {
        self.0.join("stop-intent")
    }
    /// The health check's state, kept by the prober.
    pub fn health(&self) -> PathBuf {
        self.0.join("health.json")
    }
    /// Mounted at `/run/berth` in the container (read-write): where it puts `update.lock`.
    pub fn berth_run(&self) -> PathBuf {
        self.0.join("berth-run")
    }
    /// The shim's socket for handing published ports over ([`super::handoff`]).
    pub fn handoff(&self) -> PathBuf {
        self.0.join(super::handoff::SOCKET)
    }
    /// The container's update lock, as the host sees it.
    pub fn update_lock(&self) -> PathBuf {
        self.berth_run().join("update.lock")
    }
    /// When a replacement first found the update lock held (Unix seconds): the deadline
    /// counts from there.
    pub fn deferred_since(&self) -> PathBuf {
        self.0.join("update-deferred-since")
    }
}

/// Merge entrypoint and command with the image config exactly as docker does: a manifest
/// `entrypoint` replaces the image's and drops the image's CMD; a manifest `command`
/// replaces the image's CMD.
pub fn merge_args(spec: &ContainerSpec, image: &ImageConfig) -> Vec<String> {
    let rc = image.config.clone().unwrap_or_default();
    let (entry, cmd) = match &spec.entrypoint {
        Some(e) => (e.clone(), spec.command.clone().unwrap_or_default()),
        None => (
            rc.entrypoint.unwrap_or_default(),
            spec.command.clone().or(rc.cmd).unwrap_or_default(),
        ),
    };
    entry.into_iter().chain(cmd).collect()
}

/// Image env, then manifest env over it; PATH defaulted; HOSTNAME set.
pub fn merge_env(spec: &ContainerSpec, image: &ImageConfig, hostname: &str) -> Vec<String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = vec![];
    let mut put = |k: &str, v: &str, env: &mut BTreeMap<String, String>| {
        if !env.contains_key(k) {
            order.push(k.to_string());
        }
        env.insert(k.to_string(), v.to_string());
    };
    put("PATH", DEFAULT_PATH, &mut env);
    put("HOSTNAME", hostname, &mut env);
    for kv in image
        .config
        .as_ref()
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
    {
        if let Some((k, v)) = kv.split_once('=') {
            put(k, v, &mut env);
        }
    }
    for (k, v) in &spec.env {
        put(k, v, &mut env);
    }
    order
        .into_iter()
        .map(|k| format!("{k}={}", env[&k]))
        .collect()
}

/// Docker's default capabilities plus `cap_add` minus `cap_drop` (`ALL` allowed in both).
pub fn capabilities(spec: &ContainerSpec) -> Vec<String> {
    use crate::manifest::units::{CAPABILITIES, DEFAULT_CAPABILITIES};
    let mut set: std::collections::BTreeSet<String> = DEFAULT_CAPABILITIES
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    if spec.cap_add.iter().any(|c| c == "ALL") {
        set = CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect();
    }
    set.extend(spec.cap_add.iter().filter(|c| *c != "ALL").cloned());
    if spec.cap_drop.iter().any(|c| c == "ALL") {
        set.clear();
        set.extend(spec.cap_add.iter().filter(|c| *c != "ALL").cloned());
    }
    for c in &spec.cap_drop {
        set.remove(c);
    }
    set.into_iter().collect()
}

pub fn working_dir(spec: &ContainerSpec, image: &ImageConfig) -> String {
    spec.working_dir
        .clone()
        .or_else(|| {
            image
                .config
                .as_ref()
                .and_then(|c| c.working_dir.clone())
                .filter(|w| !w.is_empty())
        })
        .unwrap_or_else(|| "/".into())
}

pub fn user(spec: &ContainerSpec, image: &ImageConfig) -> Option<String> {
    spec.user.clone().or_else(|| {
        image
            .config
            .as_ref()
            .and_then(|c| c.user.clone())
            .filter(|u| !u.is_empty())
    })
}

/// The directory of a named volume's data.
pub fn volume_data(volumes_dir: &Path, name: &str) -> PathBuf {
    volumes_dir.join(name).join("_data")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::types::RunConfig;

    fn img(entry: Option<&[&str]>, cmd: Option<&[&str]>) -> ImageConfig {
        ImageConfig {
            config: Some(RunConfig {
                entrypoint: entry.map(|e| e.iter().map(|s| s.to_string()).collect()),
                cmd: cmd.map(|e| e.iter().map(|s| s.to_string()).collect()),
                env: Some(vec!["PATH=/bin".into(), "A=image".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn spec(entry: Option<&[&str]>, cmd: Option<&[&str]>) -> ContainerSpec {
        let mut s = ContainerSpec::with_image("x/y", "x/y".parse().unwrap());
        s.entrypoint = entry.map(|e| e.iter().map(|s| s.to_string()).collect());
        s.command = cmd.map(|e| e.iter().map(|s| s.to_string()).collect());
        s
    }

    #[test]
    fn args_merge_like_docker() {
        let i = img(Some(&["/init"]), Some(&["serve"]));
        assert_eq!(merge_args(&spec(None, None), &i), ["/init", "serve"]);
        assert_eq!(merge_args(&spec(None, Some(&["x"])), &i), ["/init", "x"]);
        assert_eq!(merge_args(&spec(Some(&["/bin/sh"]), None), &i), ["/bin/sh"]);
        assert_eq!(
            merge_args(&spec(Some(&["/bin/sh"]), Some(&["-c", "true"])), &i),
            ["/bin/sh", "-c", "true"]
        );
        let i2 = img(None, Some(&["/bin/sh"]));
        assert_eq!(merge_args(&spec(None, Some(&["echo"])), &i2), ["echo"]);
    }

    #[test]
    fn env_and_caps() {
        let mut s = spec(None, None);
        s.env.insert("A".into(), "manifest".into());
        let env = merge_env(&s, &img(None, None), "h");
        assert!(env.contains(&"PATH=/bin".to_string()));
        assert!(env.contains(&"A=manifest".to_string()));
        assert!(env.contains(&"HOSTNAME=h".to_string()));
        s.cap_add = vec!["CAP_NET_ADMIN".into()];
        s.cap_drop = vec!["CAP_NET_RAW".into()];
        let caps = capabilities(&s);
        assert_eq!(caps.len(), 14);
        assert!(
            caps.contains(&"CAP_NET_ADMIN".to_string())
                && !caps.contains(&"CAP_NET_RAW".to_string())
        );
        s.cap_drop = vec!["ALL".into()];
        assert_eq!(capabilities(&s), ["CAP_NET_ADMIN"]);
    }
}
