//! The validated desired state: what the manifests declare, with defaults filled in.

use super::units::{Cidr, Duration, PortSpec, Restart, Size, TmpfsMount, VolumeMount};
use crate::registry::reference::Reference;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// Where a resource was declared: a path relative to the manifest directory, and a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Source {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Image,
    Volume,
    Network,
    Container,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Volume => "volume",
            Kind::Network => "network",
            Kind::Container => "container",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    #[default]
    Missing,
    Always,
    Never,
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullPolicy::Missing => "missing",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub reference: Reference,
    pub pull: PullPolicy,
    /// True when no `[image.*]` declares it: a container named a reference directly.
    #[serde(default)]
    pub implicit: bool,
    /// Built on this host from a Containerfile instead of pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildSpec>,
}

/// `build = { context, file, args, network }` of an `[image.*]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    /// The build context, absolute (written relative to the manifest file).
    pub context: PathBuf,
    /// The Containerfile, absolute; None: the context's Containerfile or Dockerfile.
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// Where RUN steps may connect: "none" (default), "host", or a declared network.
    #[serde(default = "no_network")]
    pub network: String,
    /// What the inputs are now (read when the manifests are loaded): a digest of all of
    /// them, and each context file's (relative path → digest), for the plan's reasons.
    pub inputs: BuildInputs,
}

fn no_network() -> String {
    NET_NONE.to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BuildInputs {
    pub digest: String,
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetworkSpec {
    /// Declared subnet; `None` lets berth choose a free /24.
    pub subnet: Option<Cidr>,
    pub internal: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VolumeSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DependCondition {
    Started,
    Healthy,
    Completed,
}

impl fmt::Display for DependCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DependCondition::Started => "started",
            DependCondition::Healthy => "healthy",
            DependCondition::Completed => "completed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthSpec {
    pub cmd: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub start_period: Duration,
    /// Absent from records made before it existed; left out when default.
    #[serde(default, skip_serializing_if = "OnUnhealthy::is_default")]
    pub on_unhealthy: OnUnhealthy,
}

/// What the supervisor does with an unhealthy container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnhealthy {
    /// Stop it and start it again through the restart backoff.
    #[default]
    Restart,
    /// Only report it.
    None,
}

impl OnUnhealthy {
    pub fn is_default(&self) -> bool {
        *self == OnUnhealthy::Restart
    }
}

/// Delays between a container's restarts (`[container.NAME.backoff]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackoffSpec {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for BackoffSpec {
    /// kubelet's: 10 s doubling to 5 min, reset after 10 min running.
    fn default() -> Self {
        BackoffSpec {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

/// The system-call filter a container runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Seccomp {
    /// docker's default profile.
    #[default]
    Default,
    /// No filter: the explicit opt-out.
    Unconfined,
}

impl Seccomp {
    pub fn is_default(&self) -> bool {
        *self == Seccomp::Default
    }
}

/// Network names with a special meaning.
pub const NET_DEFAULT: &str = "default";
pub const NET_HOST: &str = "host";
pub const NET_NONE: &str = "none";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// The `image` value as written: an `[image.*]` name or a reference.
    pub image: String,
    /// The normalised reference it resolves to.
    pub image_ref: Reference,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub hostname: Option<String>,
    pub ports: Vec<PortSpec>,
    pub volumes: Vec<VolumeMount>,
    pub tmpfs: Vec<TmpfsMount>,
    pub networks: Vec<String>,
    pub restart: Restart,
    pub memory: Option<Size>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    pub read_only: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    /// Absent from records made before it existed; left out when default so plans and
    /// records of containers that keep the default do not change.
    #[serde(default, skip_serializing_if = "Seccomp::is_default")]
    pub seccomp: Seccomp,
    pub stop_signal: String,
    pub stop_timeout: Duration,
    pub depends_on: BTreeMap<String, DependCondition>,
    pub labels: BTreeMap<String, String>,
    pub health: Option<HealthSpec>,
    /// Absent from records made before it existed and when not declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,
    /// `[container.NAME.update]`: how a replacement goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateSpec>,
    /// Dependencies whose replacement or restart restarts this container after them
    /// (`depends_on = { db = { condition = "…", restart = true } }`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub restart_with: std::collections::BTreeSet<String>,
    /// A replacement that does not prove itself is undone (`rollback = false`: kept).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub rollback: bool,
    /// `[container.NAME.rollout]`: how a replacement proves itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

/// `[container.NAME.rollout]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// With a health check: healthy within this long.
    pub timeout: Duration,
    /// Without one: running this long without exiting (an exit with code 0 is a job done).
    pub min_ready: Duration,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec {
            timeout: Duration::from_secs(120),
            min_ready: Duration::from_secs(10),
        }
    }
}

impl ContainerSpec {
    /// A digest of the whole spec: which desired state a rollback refused.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(
            serde_json::to_vec(self).unwrap_or_default(),
        ))
    }

    /// A spec with every default, for `image`.
    pub fn with_image(image: &str, image_ref: Reference) -> Self {
        ContainerSpec {
            image: image.to_string(),
            image_ref,
            entrypoint: None,
            command: None,
            env: BTreeMap::new(),
            working_dir: None,
            user: None,
            hostname: None,
            ports: vec![],
            volumes: vec![],
            tmpfs: vec![],
            networks: vec![NET_DEFAULT.to_string()],
            restart: Restart::No,
            memory: None,
            cpus: None,
            pids: None,
            read_only: false,
            cap_add: vec![],
            cap_drop: vec![],
            seccomp: Seccomp::Default,
            stop_signal: "SIGTERM".to_string(),
            stop_timeout: Duration::from_secs(10),
            depends_on: BTreeMap::new(),
            labels: BTreeMap::new(),
            health: None,
            backoff: None,
            update: None,
            rollback: true,
            rollout: None,
            restart_with: Default::default(),
        }
    }

    /// Fields a change to which is applied without recreating the container.
    pub const IN_PLACE_FIELDS: &'static [&'static str] = &[
        "restart",
        "memory",
        "cpus",
        "pids",
        "labels",
        "stop_signal",
        "stop_timeout",
        "depends_on",
        "health",
        "backoff",
        "restart_with",
        "update",
        "rollback",
        "rollout",
    ];

    pub fn field_forces_replacement(field: &str) -> bool {
        let top = field.split(['.', '[']).next().unwrap_or(field);
        !Self::IN_PLACE_FIELDS.contains(&top)
    }
}

/// `[container.NAME.update]`, or `update = "start-first"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateSpec {
    /// How long a replacement waits while the container holds its update lock
    /// (`/run/berth/update.lock` inside it); then it proceeds.
    pub lock_deadline: Duration,
    /// Absent from records made before it existed, and when default.
    #[serde(default, skip_serializing_if = "UpdateStrategy::is_default")]
    pub strategy: UpdateStrategy,
    /// The container may hold its update lock: it gets a writable `/run/berth`. Declared
    /// by the table form (`[container.NAME.update]`), not by `update = "start-first"`.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub locks: bool,
}

impl UpdateSpec {
    /// Whether a container of this spec gets `/run/berth` (for its update lock).
    pub fn locks(u: Option<UpdateSpec>) -> bool {
        u.is_some_and(|u| u.locks)
    }
}

impl Default for UpdateSpec {
    fn default() -> Self {
        UpdateSpec {
            lock_deadline: Duration::from_secs(3600),
            strategy: UpdateStrategy::StopFirst,
            locks: true,
        }
    }
}

/// How a replacement goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateStrategy {
    /// The old container stops, then the new one starts (its ports are refused meanwhile).
    #[default]
    StopFirst,
    /// The new container starts beside the old one; once it proves itself the published
    /// ports pass to it without refusing a connection, and the old one stops.
    StartFirst,
}

impl UpdateStrategy {
    pub fn is_default(&self) -> bool {
        *self == UpdateStrategy::StopFirst
    }
}

impl std::fmt::Display for UpdateStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpdateStrategy::StopFirst => "stop-first",
            UpdateStrategy::StartFirst => "start-first",
        })
    }
}

/// A declared resource with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Declared<T> {
    pub name: String,
    pub source: Source,
    pub spec: T,
}

/// Everything the manifest directory declares, validated.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub dir: PathBuf,
    /// Keyed by resource name; implicit images (named by reference in a container) are keyed
    /// by their normalised reference.
    pub images: BTreeMap<String, Declared<ImageSpec>>,
    pub volumes: BTreeMap<String, Declared<VolumeSpec>>,
    /// Includes the built-in `default` network when a container uses it.
    pub networks: BTreeMap<String, Declared<NetworkSpec>>,
    pub containers: BTreeMap<String, Declared<ContainerSpec>>,
}

impl Desired {
    /// Number of resources declared in files (implicit ones not counted).
    pub fn declared_count(&self) -> usize {
        self.images.values().filter(|i| !i.spec.implicit).count()
            + self.volumes.len()
            + self
                .networks
                .values()
                .filter(|n| !n.source.file.as_os_str().is_empty())
                .count()
            + self.containers.len()
    }

    /// The image resource a container uses.
    pub fn image_for(&self, c: &ContainerSpec) -> Option<&Declared<ImageSpec>> {
        self.images
            .get(&c.image)
            .or_else(|| self.images.get(&c.image_ref.to_string()))
    }

    /// Containers in dependency order (dependencies first, then by name).
    pub fn containers_in_order(&self) -> Vec<&Declared<ContainerSpec>> {
        let names: Vec<&String> = self.containers.keys().collect();
        let order = topo_order(&names, |n| {
            self.containers
                .get(n)
                .map(|c| c.spec.depends_on.keys().cloned().collect())
                .unwrap_or_default()
        });
        order
            .iter()
            .filter_map(|n| self.containers.get(n.as_str()))
            .collect()
    }
}

/// Kahn's algorithm with name order for ties; nodes in a cycle come last, by name.
pub fn topo_order(names: &[&String], deps: impl Fn(&str) -> Vec<String>) -> Vec<String> {
    use std::collections::{BTreeSet, HashMap};
    let set: BTreeSet<&str> = names.iter().map(|s| s.as_str()).collect();
    let mut indeg: HashMap<&str, usize> = HashMap::new();
    let mut users: HashMap<String, Vec<&str>> = HashMap::new();
    for n in &set {
        let ds: Vec<String> = deps(n)
            .into_iter()
            .filter(|d| set.contains(d.as_str()))
            .collect();
        indeg.insert(n, ds.len());
        for d in ds {
            users.entry(d).or_default().push(n);
        }
    }
    let mut ready: BTreeSet<&str> = set
        .iter()
        .copied()
        .filter(|n| indeg.get(n) == Some(&0))
        .collect();
    let mut out = vec![];
    while let Some(n) = ready.pop_first() {
        out.push(n.to_string());
        for u in users.get(n).cloned().unwrap_or_default() {
            if let Some(d) = indeg.get_mut(u) {
                *d -= 1;
                if *d == 0 {
                    ready.insert(u);
                }
            }
        }
    }
    for n in set {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    out
}
