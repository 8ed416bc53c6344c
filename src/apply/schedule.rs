//! What may run when: the plan's steps in waves (dependency levels; destroys in reverse),
//! and whether a dependency meets its `depends_on` condition.

use crate::manifest::spec::{Desired, Kind};
use crate::plan::{Action, Plan, Step};
use std::collections::BTreeMap;

/// Destroys of independent containers run this many at a time (at least).
pub const DESTROY_PARALLEL: usize = 32;

/// Group the plan's steps into waves that must run one after another; steps within a wave
/// are independent. Container destroys go by reverse dependency level (dependents first,
/// independent ones together); image pulls form one wave; containers go by dependency level.
pub fn waves<'p>(
    plan: &'p Plan,
    desired: &Desired,
    destroy_levels: &BTreeMap<String, usize>,
) -> Vec<Vec<&'p Step>> {
    let mut level: BTreeMap<String, usize> = BTreeMap::new();
    for c in desired.containers_in_order() {
        let l = c
            .spec
            .depends_on
            .keys()
            .filter_map(|d| level.get(d))
            .max()
            .map(|m| m + 1)
            .unwrap_or(0);
        level.insert(c.name.clone(), l);
    }
    let mut keyed: Vec<((u8, usize), &Step)> = plan
        .steps
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let key = match (st.kind, st.action) {
                (Kind::Container, Action::Destroy) => {
                    (0, destroy_levels.get(&st.name).copied().unwrap_or(i))
                }
                (Kind::Image, _) => (1, 0),
                (Kind::Volume, _) => (2, i),
                (Kind::Network, Action::Destroy) => (5, i),
                (Kind::Network, _) => (3, i),
                (Kind::Container, _) => (4, level.get(&st.name).copied().unwrap_or(0)),
            };
            (key, st)
        })
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    let mut out: Vec<Vec<&Step>> = vec![];
    let mut last = None;
    for (k, st) in keyed {
        match out.last_mut() {
            Some(w) if last == Some(k) => w.push(st),
            _ => out.push(vec![st]),
        }
        last = Some(k);
    }
    out
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
