//! What may run when: the plan's steps as a dependency graph (each step starts as soon as
//! what it needs is done), and whether a dependency meets its `depends_on` condition.

use crate::manifest::spec::{Desired, Kind};
use crate::manifest::units::MountSource;
use crate::plan::{Action, Plan};
use crate::state::ContainerRecord;
use std::collections::BTreeMap;

/// Destroys of independent containers run this many at a time (at least).
pub const DESTROY_PARALLEL: usize = 32;
/// Image pulls run this many at a time (at least).
pub const PULL_PARALLEL: usize = 8;

/// One edge of the graph: the step at `step` must be finished first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub step: usize,
    /// The step uses what that one makes (its image, network, volume, a container it depends
    /// on): if that one fails, this one is skipped. Otherwise only the order matters (a
    /// removal frees ports, addresses and names before anything new is created).
    pub uses: bool,
}

/// For each step of `plan`, the steps it needs finished first.
///
/// - A container that is created, replaced, started or updated needs the steps of its
///   image, networks and volumes and of the containers it depends on (it uses them), and
///   the removal of every container the plan destroys (their published ports, addresses
///   and names become free).
/// - A container destroy needs the destroys of the containers whose records depend on it:
///   dependents go first.
/// - A network that is created or changed needs every container destroy (a removed
///   network's subnet or a detached container); a network destroy needs every container
///   step (nothing is attached any more).
/// - An image built on a network needs that network; other images and volumes need
///   nothing.
pub fn graph(
    plan: &Plan,
    desired: &Desired,
    records: &BTreeMap<String, ContainerRecord>,
) -> Vec<Vec<Need>> {
    let index: BTreeMap<(Kind, &str), usize> = plan
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.kind, s.name.as_str()), i))
        .collect();
    let is_destroy = |i: usize| plan.steps[i].action == Action::Destroy;
    let container_destroys: Vec<usize> = plan
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind == Kind::Container && s.action == Action::Destroy)
        .map(|(i, _)| i)
        .collect();
    // the network an image step builds on, when it is a bridge network
    let build_network = |j: usize| -> Option<&str> {
        let s = &plan.steps[j];
        if s.kind != Kind::Image {
            return None;
        }
        let b = desired.images.get(&s.name)?.spec.build.as_ref()?;
        (b.network != crate::manifest::spec::NET_NONE
            && b.network != crate::manifest::spec::NET_HOST)
            .then_some(b.network.as_str())
    };
    let order = |steps: &[usize]| -> Vec<Need> {
        steps
            .iter()
            .map(|&step| Need { step, uses: false })
            .collect()
    };
    plan.steps
        .iter()
        .enumerate()
        .map(|(i, st)| match (st.kind, st.action) {
            // an image built on a network needs that network, and goes after the builds on
            // it before it (a build leases an address without the executor's network lock)
            (Kind::Image, _) => {
                let Some(net) = build_network(i) else {
                    return vec![];
                };
                let mut needs: Vec<Need> = index
                    .get(&(Kind::Network, net))
                    .filter(|&&j| !is_destroy(j))
                    .map(|&step| Need { step, uses: true })
                    .into_iter()
                    .collect();
                needs.extend(
                    (0..i)
                        .filter(|&j| build_network(j) == Some(net))
                        .map(|step| Need { step, uses: false }),
                );
                needs
            }
            (Kind::Volume, _) => vec![],
            (Kind::Network, Action::Destroy) => order(
                &plan
                    .steps
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.kind == Kind::Container)
                    .map(|(j, _)| j)
                    .collect::<Vec<_>>(),
            ),
            (Kind::Network, _) => order(&container_destroys),
            (Kind::Container, Action::Destroy) => {
                let dependents = records.iter().filter(|(_, r)| {
                    r.spec.depends_on.contains_key(&st.name)
                        || r.spec.restart_with.contains(&st.name)
                });
                dependents
                    .filter_map(|(n, _)| index.get(&(Kind::Container, n.as_str())).copied())
                    .filter(|&j| j != i && is_destroy(j))
                    .map(|step| Need { step, uses: false })
                    .collect()
            }
            (Kind::Container, _) => {
                let mut needs = order(&container_destroys);
                // after the builds on its networks: they lease addresses there unlocked
                if let Some(c) = desired.containers.get(&st.name) {
                    needs.extend(
                        (0..plan.steps.len())
                            .filter(|&j| {
                                build_network(j)
                                    .is_some_and(|n| c.spec.networks.iter().any(|x| x == n))
                            })
                            .map(|step| Need { step, uses: false }),
                    );
                }
                let Some(c) = desired.containers.get(&st.name) else {
                    return needs;
                };
                let mut uses = |k: Kind, n: &str| {
                    if let Some(&step) = index.get(&(k, n))
                        && step != i
                        && !is_destroy(step)
                    {
                        needs.push(Need { step, uses: true });
                    }
                };
                for (n, img) in &desired.images {
                    if img.spec.reference == c.spec.image_ref {
                        uses(Kind::Image, n);
                    }
                }
                for n in &c.spec.networks {
                    uses(Kind::Network, n);
                }
                for m in &c.spec.volumes {
                    if let MountSource::Volume(v) = &m.source {
                        uses(Kind::Volume, v);
                    }
                }
                for d in c.spec.depends_on.keys() {
                    uses(Kind::Container, d);
                }
                needs
            }
        })
        .collect()
}

/// Whether a dependency in `status` meets `cond` now (`Ok(true)`), may still (`Ok(false)`),
/// or cannot any more (`Err`, why).
pub fn dependency_met(
    cond: crate::manifest::spec::DependCondition,
    status: &crate::observe::ContainerStatus,
    health: Option<&crate::runtime::health::Health>,
) -> Result<bool, String> {
    use crate::manifest::spec::DependCondition as C;
    use crate::observe::ContainerStatus as S;
    use crate::runtime::health::HealthStatus as H;
    match (cond, status) {
        (C::Started, S::Running { .. } | S::Restarting { .. } | S::Exited { .. }) => Ok(true),
        (C::Healthy, S::Running { .. }) => Ok(health.is_some_and(|h| h.status == H::Healthy)),
        (C::Healthy | C::Started, S::Restarting { .. } | S::Created) => Ok(false),
        (C::Completed, S::Exited { code: Some(0), .. }) => Ok(true),
        (C::Completed, S::Running { .. } | S::Restarting { .. } | S::Created) => Ok(false),
        (_, S::Exited { code, signal, .. }) => Err(match (code, signal) {
            (Some(c), _) => format!("it exited with code {c}"),
            (_, Some(s)) => format!("it was killed by signal {s}"),
            _ => "it exited".into(),
        }),
        (_, S::StoppedByUser) => Err("it is stopped by the user".into()),
        (_, S::Lost { reason }) => Err(format!("it is lost: {reason}")),
    }
}

/// A dependency's state in a waiting message.
pub fn describe_dependency(
    status: &crate::observe::ContainerStatus,
    health: Option<&crate::runtime::health::Health>,
) -> String {
    use crate::observe::ContainerStatus as S;
    match (status, health) {
        (S::Running { .. }, Some(h)) => {
            let last = h.log.last().map_or(String::new(), |p| {
                format!(", last check exit {}", p.exit_code)
            });
            format!("it is running, {}{last}", h.status)
        }
        (S::Running { .. }, None) => "it is running".into(),
        (S::Restarting { restarts, .. }, _) => {
            format!("it is restarting after {restarts} restarts")
        }
        (S::Created, _) => "it is created, not started".into(),
        (s, _) => format!("{s:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Observed;

    fn load(toml: &str) -> Desired {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("host.toml"), toml).unwrap();
        crate::manifest::load_dir(dir.path()).unwrap()
    }

    fn needs_of<'p>(plan: &'p Plan, g: &[Vec<Need>], address: &str) -> Vec<(&'p str, bool)> {
        let i = plan
            .steps
            .iter()
            .position(|s| s.address == address)
            .unwrap();
        let mut v: Vec<(&str, bool)> = g[i]
            .iter()
            .map(|n| (plan.steps[n.step].address.as_str(), n.uses))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_container_needs_only_what_it_uses() {
        let d = load(
            r#"
[image.a]
ref = "127.0.0.1:5000/a:1"
[image.b]
ref = "127.0.0.1:5000/b:1"
[network.front]
[volume.data]
[container.db]
image = "a"
volumes = ["data:/var/lib/db"]
[container.web]
image = "b"
networks = ["front"]
depends_on = { db = "started" }
[container.other]
image = "b"
"#,
        );
        let plan = crate::plan::diff(&d, &Observed::default()).unwrap();
        let g = graph(&plan, &d, &BTreeMap::new());
        assert_eq!(
            needs_of(&plan, &g, "container.db"),
            vec![
                ("image.a", true),
                ("network.default", true),
                ("volume.data", true)
            ]
        );
        assert_eq!(
            needs_of(&plan, &g, "container.web"),
            vec![
                ("container.db", true),
                ("image.b", true),
                ("network.front", true)
            ]
        );
        // not after db, nor after a's pull: in waves it waited for both
        assert_eq!(
            needs_of(&plan, &g, "container.other"),
            vec![("image.b", true), ("network.default", true)]
        );
        assert!(needs_of(&plan, &g, "image.a").is_empty());
        assert!(needs_of(&plan, &g, "network.front").is_empty());
    }

    #[test]
    fn destroys_go_dependents_first_and_free_what_creates_need() {
        let old = load(
            r#"
[container.db]
image = "127.0.0.1:5000/a:1"
[container.app]
image = "127.0.0.1:5000/a:1"
depends_on = { db = "started" }
"#,
        );
        let records: BTreeMap<String, ContainerRecord> = old
            .containers
            .iter()
            .map(|(n, c)| {
                (
                    n.clone(),
                    ContainerRecord {
                        name: n.clone(),
                        source: c.source.clone(),
                        spec: c.spec.clone(),
                        image_digest: None,
                        created_at: 0,
                        stopped_by_user: false,
                    },
                )
            })
            .collect();
        let new = load(
            r#"
[container.web]
image = "127.0.0.1:5000/a:1"
"#,
        );
        let plan = crate::plan::Plan {
            steps: ["db", "app", "web"]
                .iter()
                .map(|n| crate::plan::Step {
                    address: format!("container.{n}"),
                    kind: Kind::Container,
                    name: n.to_string(),
                    action: if *n == "web" {
                        Action::Create
                    } else {
                        Action::Destroy
                    },
                    ops: vec![],
                    reasons: vec![],
                    source: None,
                })
                .collect(),
            ..Default::default()
        };
        let g = graph(&plan, &new, &records);
        assert_eq!(
            needs_of(&plan, &g, "container.db"),
            vec![("container.app", false)]
        );
        assert!(needs_of(&plan, &g, "container.app").is_empty());
        assert_eq!(
            needs_of(&plan, &g, "container.web"),
            vec![("container.app", false), ("container.db", false)]
        );
    }

    #[test]
    fn builds_on_a_network_go_one_after_another_and_before_its_containers() {
        let dir = tempfile::tempdir().unwrap();
        for a in ["a", "b"] {
            std::fs::create_dir_all(dir.path().join(a)).unwrap();
            std::fs::write(dir.path().join(a).join("Containerfile"), "FROM scratch\n").unwrap();
        }
        std::fs::write(
            dir.path().join("host.toml"),
            r#"
[network.n]
[image.a]
ref = "127.0.0.1:5000/a:1"
build = { context = "a/", network = "n" }
[image.b]
ref = "127.0.0.1:5000/b:1"
build = { context = "b/", network = "n" }
[image.c]
ref = "127.0.0.1:5000/c:1"
[container.web]
image = "c"
networks = ["n"]
"#,
        )
        .unwrap();
        let d = crate::manifest::load_dir(dir.path()).unwrap();
        let plan = crate::plan::diff(&d, &Observed::default()).unwrap();
        let g = graph(&plan, &d, &BTreeMap::new());
        assert_eq!(needs_of(&plan, &g, "image.a"), vec![("network.n", true)]);
        assert_eq!(
            needs_of(&plan, &g, "image.b"),
            vec![("image.a", false), ("network.n", true)]
        );
        assert_eq!(
            needs_of(&plan, &g, "container.web"),
            vec![
                ("image.a", false),
                ("image.b", false),
                ("image.c", true),
                ("network.n", true)
            ]
        );
    }
}
