//! `diff(&Desired, &Observed) -> Plan`: a pure function. A [`Plan`] is the contract between
//! `berth plan` and `berth apply`: the typed steps, in execution order, each with its reasons.

pub mod render;

use crate::manifest::spec::{
    ContainerSpec, Declared, Desired, Kind, NetworkSpec, PullPolicy, Source, topo_order,
};
use crate::manifest::units::Restart;
use crate::observe::{ContainerStatus, Observed};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What happens to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// `+`
    Create,
    /// `~`: changed (or started) in place
    Update,
    /// `-/+`: destroyed and created again
    Replace,
    /// `-`
    Destroy,
}

impl Action {
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Update => "~",
            Action::Replace => "-/+",
            Action::Destroy => "-",
        }
    }
}

/// The primitive operations `apply` executes for a step, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    PullImage,
    BuildImage,
    CreateVolume,
    CreateNetwork,
    RemoveNetwork,
    CreateContainer,
    StartContainer,
    StopContainer,
    RemoveContainer,
    UpdateContainer,
}

/// Why a step is there. `field` is set for a field-level change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    pub forces_replacement: bool,
    pub message: String,
}

impl Reason {
    pub fn note(message: impl Into<String>) -> Self {
        Reason {
            field: None,
            before: None,
            after: None,
            forces_replacement: false,
            message: message.into(),
        }
    }
    fn forcing(message: impl Into<String>) -> Self {
        Reason {
            forces_replacement: true,
            ..Reason::note(message)
        }
    }
    fn field(field: &str, before: Option<String>, after: Option<String>, forces: bool) -> Self {
        let b = before.clone().unwrap_or_else(|| "(unset)".into());
        let a = after.clone().unwrap_or_else(|| "(unset)".into());
        let mut message = format!("{field}: {b} → {a}");
        if forces {
            message.push_str(" forces replacement");
        }
        Reason {
            field: Some(field.into()),
            before,
            after,
            forces_replacement: forces,
            message,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// `kind.name`, e.g. `container.web`.
    pub address: String,
    pub kind: Kind,
    pub name: String,
    pub action: Action,
    pub ops: Vec<Op>,
    pub reasons: Vec<Reason>,
    /// `file:line` of the declaration (desired side), or of the record for a destroy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A resource the plan leaves alone but reports (e.g. an orphaned volume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    pub address: String,
    pub kind: Kind,
    pub name: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub add: usize,
    pub change: usize,
    pub replace: usize,
    pub destroy: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub kept: Vec<Kept>,
}

impl Plan {
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for st in &self.steps {
            match st.action {
                Action::Create => s.add += 1,
                Action::Update => s.change += 1,
                Action::Replace => s.replace += 1,
                Action::Destroy => s.destroy += 1,
            }
        }
        s
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn destroy_count(&self) -> usize {
        self.summary().destroy
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error(
        "{address}: image {reference} is not in the store and pull = \"never\" ({declared_at}); import it with `berth image import` or `berth image pull`"
    )]
    ImageNeverPulled {
        address: String,
        reference: String,
        declared_at: String,
    },
    #[error(
        "the plan destroys {count} resources, more than --max-deletions {max}; check the manifest directory, then rerun with --max-deletions {count} if this is intended"
    )]
    TooManyDeletions { count: usize, max: usize },
}

fn src(s: &Source) -> Option<String> {
    if s.file.as_os_str().is_empty() {
        None
    } else {
        Some(s.to_string())
    }
}

fn step(
    kind: Kind,
    name: &str,
    action: Action,
    ops: Vec<Op>,
    reasons: Vec<Reason>,
    source: Option<String>,
) -> Step {
    Step {
        address: format!("{kind}.{name}"),
        kind,
        name: name.to_string(),
        action,
        ops,
        reasons,
        source,
    }
}

/// Flatten a JSON value into `path → rendered leaf`: objects recurse with `.`, arrays and
/// scalars are leaves rendered as JSON text.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() || prefix.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        serde_json::Value::Object(_) | serde_json::Value::Null => {}
        serde_json::Value::Array(a) if a.is_empty() => {}
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Field-level differences between two container specs, as reasons.
pub fn container_changes(before: &ContainerSpec, after: &ContainerSpec) -> Vec<Reason> {
    let mut b = BTreeMap::new();
    let mut a = BTreeMap::new();
    // `image` as written may change between a name and the same reference: compare refs.
    let strip = |c: &ContainerSpec| {
        let mut v = serde_json::to_value(c).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.remove("image");
        }
        v
    };
    flatten("", &strip(before), &mut b);
    flatten("", &strip(after), &mut a);
    let keys: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
    keys.into_iter()
        .filter(|k| b.get(*k) != a.get(*k))
        .map(|k| {
            let field = if k == "image_ref" {
                "image"
            } else {
                k.as_str()
            };
            Reason::field(
                field,
                b.get(k).cloned(),
                a.get(k).cloned(),
                ContainerSpec::field_forces_replacement(field),
            )
        })
        .collect()
}

fn short(d: &str) -> String {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    format!("sha256:{}", &hex[..hex.len().min(12)])
}

/// Should a container that exited by itself be started again under its restart policy?
pub fn restart_wanted(restart: Restart, code: Option<i32>, restarts: u32) -> bool {
    match restart {
        Restart::No => false,
        Restart::Always | Restart::UnlessStopped => true,
        Restart::OnFailure(max) => code != Some(0) && max.is_none_or(|m| restarts < m),
    }
}

/// Why a container without a record is in the plan.
const UNRECORDED: &str =
    "a container of this name is on the host but its record was removed outside berth";

/// Compare desired with observed. Pure: no I/O.
pub fn diff(desired: &Desired, observed: &Observed) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();

    // 1. containers no longer declared: destroyed first, dependents before dependencies.
    let gone: Vec<&String> = observed
        .containers
        .keys()
        .filter(|n| !desired.containers.contains_key(*n))
        .collect();
    let mut order = topo_order(&gone, |n| {
        observed.containers[n]
            .record
            .spec
            .depends_on
            .keys()
            .cloned()
            .collect()
    });
    order.reverse();
    for n in order {
        let oc = &observed.containers[&n];
        plan.steps.push(step(
            Kind::Container,
            &n,
            Action::Destroy,
            vec![Op::StopContainer, Op::RemoveContainer],
            vec![Reason::note(format!(
                "no longer declared; was in {}",
                oc.record.source
            ))],
            src(&oc.record.source),
        ));
    }
    for n in observed
        .unrecorded
        .iter()
        .filter(|n| !desired.containers.contains_key(*n))
    {
        plan.steps.push(step(
            Kind::Container,
            n,
            Action::Destroy,
            vec![Op::StopContainer, Op::RemoveContainer],
            vec![Reason::note(format!("not declared; drift: {UNRECORDED}"))],
            None,
        ));
    }

    // 2. images
    let mut image_digest: BTreeMap<String, Option<String>> = BTreeMap::new();
    // images this plan builds (again): what runs them is replaced
    let mut rebuilt: BTreeSet<String> = BTreeSet::new();
    for (name, img) in &desired.images {
        let r = img.spec.reference.to_string();
        let seen = observed.images.get(&r);
        let label = if img.spec.implicit {
            format!("image.{r:?}")
        } else {
            format!("image.{name}")
        };
        if let Some(b) = &img.spec.build {
            let rec = observed.builds.get(&r);
            let why = match (seen, rec) {
                (Some(o), Some(rec))
                    if rec.inputs.digest == b.inputs.digest && rec.digest == o.digest =>
                {
                    image_digest.insert(r.clone(), Some(o.digest.clone()));
                    continue;
                }
                (None, _) => vec![Reason::note(format!("build {r}: not in the store"))],
                (Some(_), None) => vec![Reason::note(format!(
                    "build {r}: not built here from these manifests"
                ))],
                (Some(o), Some(rec)) if rec.digest != o.digest => {
                    vec![Reason::note(format!(
                        "build {r}: the tag was moved since it was built"
                    ))]
                }
                (Some(_), Some(rec)) => build_changes(&rec.inputs, &b.inputs),
            };
            let mut st = step(
                Kind::Image,
                name,
                if seen.is_some() {
                    Action::Update
                } else {
                    Action::Create
                },
                vec![Op::BuildImage],
                why,
                src(&img.source),
            );
            st.address = label.clone();
            plan.steps.push(st);
            image_digest.insert(r.clone(), None);
            rebuilt.insert(r.clone());
            continue;
        }
        let mut s = |action, reasons| {
            let mut st = step(
                Kind::Image,
                name,
                action,
                vec![Op::PullImage],
                reasons,
                src(&img.source),
            );
            st.address = label.clone();
            plan.steps.push(st);
        };
        match seen {
            None if img.spec.pull == PullPolicy::Never => {
                return Err(PlanError::ImageNeverPulled {
                    address: label.clone(),
                    reference: r,
                    declared_at: src(&img.source).unwrap_or_else(|| "used by a container".into()),
                });
            }
            None => {
                s(
                    Action::Create,
                    vec![Reason::note(format!("pull {r}: not in the store"))],
                );
                image_digest.insert(r.clone(), None);
            }
            Some(o) => match &o.remote_digest {
                Some(rd) if img.spec.pull == PullPolicy::Always && rd != &o.digest => {
                    s(
                        Action::Update,
                        vec![Reason {
                            field: Some("digest".into()),
                            before: Some(o.digest.clone()),
                            after: Some(rd.clone()),
                            forces_replacement: false,
                            message: format!(
                                "pull {r}: tag now points at {} (store has {})",
                                short(rd),
                                short(&o.digest)
                            ),
                        }],
                    );
                    image_digest.insert(r.clone(), Some(rd.clone()));
                }
                _ => {
                    image_digest.insert(r.clone(), Some(o.digest.clone()));
                }
            },
        }
    }

    // 3. volumes: created when missing; never destroyed.
    for (name, v) in &desired.volumes {
        if !observed.volumes.contains_key(name) {
            plan.steps.push(step(
                Kind::Volume,
                name,
                Action::Create,
                vec![Op::CreateVolume],
                vec![Reason::note(format!("declared in {}", v.source))],
                src(&v.source),
            ));
        }
    }
    for (name, _) in observed
        .volumes
        .iter()
        .filter(|(n, _)| !desired.volumes.contains_key(*n))
    {
        plan.kept.push(Kept {
            address: format!("volume.{name}"),
            kind: Kind::Volume,
            name: name.clone(),
            message: "orphaned, kept".into(),
        });
    }

    // 4. networks: created or replaced before the containers that use them.
    let mut replaced_networks = BTreeSet::new();
    for (name, n) in &desired.networks {
        match observed.networks.get(name) {
            None => {
                let what = match n.spec.subnet {
                    Some(s) => format!("subnet {s}"),
                    None => "subnet chosen by berth".into(),
                };
                let why = if n.source.file.as_os_str().is_empty() {
                    format!("built-in network used by containers; {what}")
                } else {
                    format!("declared in {}; {what}", n.source)
                };
                plan.steps.push(step(
                    Kind::Network,
                    name,
                    Action::Create,
                    vec![Op::CreateNetwork],
                    vec![Reason::note(why)],
                    src(&n.source),
                ));
            }
            Some(rec) => {
                let reasons = network_changes(&rec.spec, &n.spec);
                if reasons.is_empty()
                    && let Some(why) = observed.network_drift.get(name)
                {
                    // set up again in place; attached containers keep their addresses
                    plan.steps.push(step(
                        Kind::Network,
                        name,
                        Action::Update,
                        vec![Op::CreateNetwork],
                        vec![Reason::note(format!("drift: {why}"))],
                        src(&n.source),
                    ));
                }
                if !reasons.is_empty() {
                    replaced_networks.insert(name.clone());
                    plan.steps.push(step(
                        Kind::Network,
                        name,
                        Action::Replace,
                        vec![Op::RemoveNetwork, Op::CreateNetwork],
                        reasons,
                        src(&n.source),
                    ));
                }
            }
        }
    }

    // 5. containers, dependencies first.
    // (a container replaced or started again restarts, after it, the dependents that ask
    // for it with `restart = true`)
    let mut restarted: BTreeSet<String> = BTreeSet::new();
    for c in desired.containers_in_order() {
        let mut st = container_step(
            desired,
            observed,
            c,
            &image_digest,
            &rebuilt,
            &replaced_networks,
            &mut plan.kept,
        );
        // a replacement by the spec (and image) a rollback refused is not tried again; a
        // repair still is (the container lost or exited, a network replaced), and a new
        // image of the same spec is tried
        let want_image = desired.image_for(&c.spec).and_then(|i| {
            image_digest
                .get(&i.spec.reference.to_string())
                .cloned()
                .flatten()
        });
        if let (Some(s), Some(rb), Some(o)) = (
            st.as_ref(),
            observed.rollbacks.get(&c.name),
            observed.containers.get(&c.name),
        ) && s.action == Action::Replace
            && rb.spec == c.spec.digest()
            && (rb.image.is_none() || rb.image == want_image)
            && matches!(o.status, ContainerStatus::Running { .. })
            && !s.reasons.iter().any(|r| r.message.contains(" is replaced"))
        {
            plan.kept.push(Kept {
                address: format!("container.{}", c.name),
                kind: Kind::Container,
                name: c.name.clone(),
                message: format!(
                    "rolled back at {}: {}; not tried again until the manifests change or `berth apply --retry {}`",
                    crate::runtime::logs::rfc3339(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(rb.at)
                    ),
                    rb.reason,
                    c.name
                ),
            });
            st = None;
        }
        let starts = |s: &Step| {
            s.action == Action::Replace
                || s.action == Action::Create
                || s.ops.contains(&Op::StartContainer)
        };
        let running = observed
            .containers
            .get(&c.name)
            .is_some_and(|o| matches!(o.status, ContainerStatus::Running { .. }));
        let started_at = |n: &str| match observed.containers.get(n).map(|o| &o.status) {
            Some(ContainerStatus::Running { started_at, .. }) => Some(*started_at),
            _ => None,
        };
        // a dependency started again after this container was: by this plan, or since the
        // last one (by its supervisor, `berth restart`, a reboot)
        let again = c.spec.restart_with.iter().find_map(|d| {
            if restarted.contains(d) {
                Some(format!("{d} is started again (depends_on restart = true)"))
            } else {
                match (started_at(d), started_at(&c.name)) {
                    (Some(ds), Some(cs)) if ds > cs => Some(format!(
                        "{d} was started again after it (depends_on restart = true)"
                    )),
                    _ => None,
                }
            }
        });
        if let Some(why) = again
            && running
            && !st.as_ref().is_some_and(starts)
        {
            let note = Reason::note(why);
            st = Some(match st {
                Some(mut s) => {
                    s.ops.push(Op::StopContainer);
                    s.ops.push(Op::StartContainer);
                    s.reasons.push(note);
                    s
                }
                None => step(
                    Kind::Container,
                    &c.name,
                    Action::Update,
                    vec![Op::StopContainer, Op::StartContainer],
                    vec![note],
                    src(&c.source),
                ),
            });
        }
        // a replacement waits for the container's update lock (apply says how long)
        if let (Some(s), Some(o)) = (st.as_mut(), observed.containers.get(&c.name))
            && s.action == Action::Replace
            && let Some(since) = o.update_lock
        {
            let deadline = c.spec.update.unwrap_or_default().lock_deadline;
            s.reasons.push(Reason::note(match since {
                Some(t) => format!(
                    "deferred by the container's update lock since {}, deadline {deadline} after that",
                    crate::runtime::logs::rfc3339(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)
                    )
                ),
                None => format!(
                    "deferred while the container holds its update lock (/run/berth/update.lock), at most {deadline}"
                ),
            }));
        }
        // how the replacement goes when the old container runs (apply falls back to
        // stop-first, saying why, when it cannot)
        if let (Some(s), Some(o)) = (st.as_mut(), observed.containers.get(&c.name))
            && s.action == Action::Replace
            && s.ops.contains(&Op::CreateContainer)
            && matches!(o.status, crate::observe::ContainerStatus::Running { .. })
            && c.spec
                .update
                .is_some_and(|u| u.strategy == crate::manifest::spec::UpdateStrategy::StartFirst)
        {
            s.reasons.push(Reason::note(
                "start-first: the new container starts beside the old one and takes over its ports once it proves itself",
            ));
        }
        if let Some(st) = st {
            if starts(&st) {
                restarted.insert(c.name.clone());
            }
            plan.steps.push(st);
        }
    }

    // 6. networks no longer declared (or no longer used), after their containers are gone.
    for (name, rec) in observed
        .networks
        .iter()
        .filter(|(n, _)| !desired.networks.contains_key(*n))
    {
        plan.steps.push(step(
            Kind::Network,
            name,
            Action::Destroy,
            vec![Op::RemoveNetwork],
            vec![Reason::note(if rec.source.file.as_os_str().is_empty() {
                "built-in network no longer used by any container".to_string()
            } else {
                format!("no longer declared; was in {}", rec.source)
            })],
            src(&rec.source),
        ));
    }
    Ok(plan)
}

fn network_changes(before: &NetworkSpec, after: &NetworkSpec) -> Vec<Reason> {
    let mut out = vec![];
    if let Some(s) = after.subnet
        && before.subnet != Some(s)
    {
        out.push(Reason::field(
            "subnet",
            before.subnet.map(|s| format!("{:?}", s.to_string())),
            Some(format!("{:?}", s.to_string())),
            true,
        ));
    }
    if before.internal != after.internal {
        out.push(Reason::field(
            "internal",
            Some(before.internal.to_string()),
            Some(after.internal.to_string()),
            true,
        ));
    }
    out
}

/// A container replaced: stopped, removed, created and started again.
fn replacement(name: &str, reasons: Vec<Reason>, source: Option<String>) -> Step {
    step(
        Kind::Container,
        name,
        Action::Replace,
        vec![
            Op::StopContainer,
            Op::RemoveContainer,
            Op::CreateContainer,
            Op::StartContainer,
        ],
        reasons,
        source,
    )
}

/// Why an image is built again: the context files added, removed or changed (the first
/// ten), the Containerfile, arguments or network.
fn build_changes(
    before: &crate::manifest::spec::BuildInputs,
    now: &crate::manifest::spec::BuildInputs,
) -> Vec<Reason> {
    let mut changed: Vec<String> = vec![];
    for (f, d) in &now.files {
        match before.files.get(f) {
            None => changed.push(format!("{f} (new)")),
            Some(b) if b != d => changed.push(f.clone()),
            _ => {}
        }
    }
    for f in before.files.keys().filter(|f| !now.files.contains_key(*f)) {
        changed.push(format!("{f} (removed)"));
    }
    if changed.is_empty() {
        return vec![Reason::note(
            "build: the Containerfile, build arguments or network changed",
        )];
    }
    let n = changed.len();
    let shown: Vec<String> = changed.into_iter().take(10).collect();
    vec![Reason::note(format!(
        "build: changed in the context: {}{}",
        shown.join(", "),
        if n > 10 {
            format!(" and {} more", n - 10)
        } else {
            String::new()
        }
    ))]
}

fn container_step(
    desired: &Desired,
    observed: &Observed,
    c: &Declared<ContainerSpec>,
    image_digest: &BTreeMap<String, Option<String>>,
    rebuilt: &BTreeSet<String>,
    replaced_networks: &BTreeSet<String>,
    kept: &mut Vec<Kept>,
) -> Option<Step> {
    let name = &c.name;
    let source = src(&c.source);
    let Some(oc) = observed.containers.get(name) else {
        if observed.unrecorded.contains(name) {
            return Some(replacement(
                name,
                vec![Reason::forcing(format!("drift: {UNRECORDED}"))],
                source,
            ));
        }
        return Some(step(
            Kind::Container,
            name,
            Action::Create,
            vec![Op::CreateContainer, Op::StartContainer],
            vec![Reason::note(format!("declared in {}", c.source))],
            source,
        ));
    };
    let mut reasons = container_changes(&oc.record.spec, &c.spec);
    // the image's digest, when known
    let want = desired.image_for(&c.spec).and_then(|i| {
        image_digest
            .get(&i.spec.reference.to_string())
            .cloned()
            .flatten()
    });
    if let (Some(w), Some(have)) = (&want, &oc.record.image_digest)
        && w != have
        && !reasons.iter().any(|r| r.field.as_deref() == Some("image"))
    {
        reasons.push(Reason {
            field: Some("image_digest".into()),
            before: Some(have.clone()),
            after: Some(w.clone()),
            forces_replacement: true,
            message: format!("image: {} → {} forces replacement", short(have), short(w)),
        });
    }
    if let Some(i) = desired.image_for(&c.spec)
        && rebuilt.contains(&i.spec.reference.to_string())
        && !reasons.iter().any(|r| r.field.as_deref() == Some("image"))
    {
        reasons.push(Reason::forcing(format!(
            "image {} is built again",
            i.spec.reference
        )));
    }
    for n in &c.spec.networks {
        if replaced_networks.contains(n) {
            reasons.push(Reason::forcing(format!("network.{n} is replaced")));
        }
    }
    // live drift
    if let Some(live) = &oc.live_limits {
        let spec = &c.spec;
        let mut drift = |field: &str, live: Option<String>, want: Option<String>| {
            if live != want && !reasons.iter().any(|r| r.field.as_deref() == Some(field)) {
                let l = live.unwrap_or_else(|| "unlimited".into());
                let w = want.unwrap_or_else(|| "unlimited".into());
                reasons.push(Reason {
                    field: Some(field.into()),
                    before: Some(l.clone()),
                    after: Some(w.clone()),
                    forces_replacement: false,
                    message: format!("{field}: {l} on the host (changed outside berth) → {w}"),
                });
            }
        };
        drift(
            "memory",
            live.memory
                .map(|m| crate::manifest::units::Size(m).to_string()),
            spec.memory.map(|m| m.to_string()),
        );
        drift(
            "cpus",
            live.cpus.map(|c| format!("{c}")),
            spec.cpus.map(|c| format!("{c}")),
        );
        drift(
            "pids",
            live.pids.map(|p| p.to_string()),
            spec.pids.map(|p| p.to_string()),
        );
    }
    let forces = reasons.iter().any(|r| r.forces_replacement);
    match &oc.status {
        ContainerStatus::Lost { reason } => {
            reasons.push(Reason::forcing(format!("drift: {reason}")));
            return Some(replacement(name, reasons, source));
        }
        _ if forces => {
            return Some(replacement(name, reasons, source));
        }
        ContainerStatus::Exited {
            code,
            signal,
            oom,
            restarts,
            ..
        } => {
            let how = match (code, signal, oom) {
                (_, _, true) => "killed by the OOM killer".to_string(),
                (Some(c), _, _) => format!("exited with code {c}"),
                (_, Some(s), _) => format!("killed by signal {s}"),
                _ => "exited".to_string(),
            };
            if !restart_wanted(c.spec.restart, *code, *restarts) && reasons.is_empty() {
                kept.push(Kept {
                    address: format!("container.{name}"),
                    kind: Kind::Container,
                    name: name.clone(),
                    message: format!(
                        "{how}; restart = {:?}, stays exited",
                        c.spec.restart.to_string()
                    ),
                });
            }
            if restart_wanted(c.spec.restart, *code, *restarts) {
                reasons.push(Reason::note(format!(
                    "{how}; restart = {:?}",
                    c.spec.restart.to_string()
                )));
                let mut ops = vec![];
                if !reasons.iter().all(|r| r.field.is_none()) {
                    ops.push(Op::UpdateContainer);
                }
                ops.push(Op::StartContainer);
                return Some(step(
                    Kind::Container,
                    name,
                    Action::Update,
                    ops,
                    reasons,
                    source,
                ));
            }
        }
        ContainerStatus::Created => {
            reasons.push(Reason::note("created but not running"));
            let mut ops = vec![];
            if reasons.iter().any(|r| r.field.is_some()) {
                ops.push(Op::UpdateContainer);
            }
            ops.push(Op::StartContainer);
            return Some(step(
                Kind::Container,
                name,
                Action::Update,
                ops,
                reasons,
                source,
            ));
        }
        ContainerStatus::StoppedByUser => {
            if reasons.is_empty() {
                kept.push(Kept {
                    address: format!("container.{name}"),
                    kind: Kind::Container,
                    name: name.clone(),
                    message: "stopped by user".into(),
                });
            }
        }
        ContainerStatus::Running { .. } => {
            // an unhealthy container its supervisor leaves running (on_unhealthy = "none")
            if let Some(h) = &oc.health
                && h.status == crate::runtime::health::HealthStatus::Unhealthy
                && reasons.is_empty()
            {
                let last = h.log.last().map_or(String::new(), |p| {
                    format!("; last check: exit {} {}", p.exit_code, p.output.trim())
                });
                kept.push(Kept {
                    address: format!("container.{name}"),
                    kind: Kind::Container,
                    name: name.clone(),
                    message: crate::text::printable(
                        &format!(
                            "unhealthy ({} failed checks in a row{last})",
                            h.failing_streak
                        ),
                        300,
                    ),
                });
            }
        }
        // its supervisor starts it again after the backoff: as its policy wants
        ContainerStatus::Restarting { .. } => {}
    }
    if reasons.is_empty() {
        return None;
    }
    Some(step(
        Kind::Container,
        name,
        Action::Update,
        vec![Op::UpdateContainer],
        reasons,
        source,
    ))
}

/// Refuse a plan that destroys more than `max` resources.
pub fn check_deletions(plan: &Plan, max: usize) -> Result<(), PlanError> {
    let count = plan.destroy_count();
    if count > max {
        Err(PlanError::TooManyDeletions { count, max })
    } else {
        Ok(())
    }
}
