//! The translation of a container's manifest spec into the runtime's config: limits,
//! mounts, process, restart policy, backoff, health check. Pure but for
//! [`runtime_config`]'s look at the store (the image's unpacked layers); the runtime never
//! sees a manifest type.

use super::ApplyError;
use crate::config::Config;
use crate::manifest::spec::ContainerSpec;
use crate::manifest::spec::UpdateSpec;
use crate::manifest::units::MountSource;
use crate::net;
use crate::runtime::config::{
    self as rc, Limits, MountKind, MountSpec, NetMode, ProcessSpec, RuntimeConfig,
};
use crate::state::StateDir;
use crate::store::Store;

pub fn limits(spec: &ContainerSpec) -> Limits {
    Limits {
        memory: spec.memory.map(|m| m.0),
        cpus: spec.cpus,
        pids: spec.pids,
    }
}

/// The first host path a container bind-mounts that does not exist.
pub(crate) fn missing_bind_source(spec: &ContainerSpec) -> Option<&std::path::Path> {
    spec.volumes.iter().find_map(|v| match &v.source {
        MountSource::Bind(p) if !p.exists() => Some(p.as_path()),
        _ => None,
    })
}

/// Compute what the shim needs for a container whose (real) directory is `dir`.
#[allow(clippy::too_many_arguments)]
pub fn runtime_config(
    store: &Store,
    state: &StateDir,
    config: &Config,
    dir: &rc::ContainerDir,
    name: &str,
    spec: &ContainerSpec,
    img: &crate::store::StoredImage,
    (net, ports): (NetMode, Vec<net::proxy::PortMap>),
) -> Result<RuntimeConfig, ApplyError> {
    let mut layers = vec![];
    for c in img.chain_ids() {
        if !store.has_snapshot(&c) {
            return Err(ApplyError::Invalid(format!(
                "image {}: layer {c} is not unpacked; pull the image again",
                img.reference
            )));
        }
        layers.push(store.snapshot_dir(&c)?.join("fs"));
    }
    let hostname = spec
        .hostname
        .clone()
        .unwrap_or_else(|| name.chars().take(63).collect());
    // checked before the apply began too (preflight); here for a path removed meanwhile
    if let Some(p) = missing_bind_source(spec) {
        return Err(ApplyError::Invalid(format!(
            "bind mount source {} does not exist",
            p.display()
        )));
    }
    let mut mounts = vec![];
    for v in &spec.volumes {
        let kind = match &v.source {
            MountSource::Bind(p) => MountKind::Bind {
                source: p.clone(),
                read_only: v.read_only,
            },
            MountSource::Volume(n) => MountKind::Volume {
                source: rc::volume_data(&state.volumes_dir(), n),
                read_only: v.read_only,
                populate_marker: state.volumes_dir().join(n).join(".populated"),
            },
        };
        mounts.push(MountSpec {
            target: v.target.clone(),
            kind,
        });
    }
    for t in &spec.tmpfs {
        mounts.push(MountSpec {
            target: t.target.clone(),
            kind: MountKind::Tmpfs {
                size: t.size.map(|s| s.0),
                mode: t.mode,
            },
        });
    }
    // /run/berth, last (over a tmpfs at /run): where a container that declares
    // [container.NAME.update] holds its update lock (only those get the writable mount)
    if UpdateSpec::locks(spec.update) {
        mounts.push(MountSpec {
            target: std::path::PathBuf::from("/run/berth"),
            kind: MountKind::Bind {
                // the slot's own, not through the name: the name may pass to a successor
                source: dir.berth_run(),
                read_only: false,
            },
        });
    }
    let args = rc::merge_args(spec, &img.config);
    if args.is_empty() {
        return Err(ApplyError::Invalid(format!(
            "image {} has no CMD or ENTRYPOINT: set `command`",
            img.reference
        )));
    }
    Ok(RuntimeConfig {
        name: name.into(),
        layers,
        read_only: spec.read_only,
        hostname: hostname.clone(),
        net,
        ports,
        ports_from_peer: false,
        process: ProcessSpec {
            args,
            env: rc::merge_env(spec, &img.config, &hostname),
            cwd: rc::working_dir(spec, &img.config),
            user: rc::user(spec, &img.config),
            capabilities: rc::capabilities(spec),
            seccomp: spec.seccomp.is_default(),
        },
        mounts,
        limits: limits(spec),
        cgroup_parent: config.cgroup_parent.clone(),
        log_max_size: rc::LOG_MAX_SIZE,
        log_max_files: rc::LOG_MAX_FILES,
        stop_signal: spec.stop_signal.clone(),
        stop_timeout_ms: spec.stop_timeout.0,
        restart: restart_policy(spec),
        backoff: backoff(spec),
        health: health(spec),
    })
}

/// The manifest's health check as the runtime's prober runs it.
pub fn health(spec: &ContainerSpec) -> Option<crate::runtime::health::HealthConfig> {
    spec.health
        .as_ref()
        .map(|h| crate::runtime::health::HealthConfig {
            cmd: h.cmd.clone(),
            interval_ms: h.interval.0,
            timeout_ms: h.timeout.0,
            retries: h.retries,
            start_period_ms: h.start_period.0,
            restart_on_unhealthy: h.on_unhealthy == crate::manifest::spec::OnUnhealthy::Restart,
        })
}

/// The manifest's restart policy as the runtime's supervisor carries it.
pub fn restart_policy(spec: &ContainerSpec) -> crate::runtime::supervise::RestartPolicy {
    use crate::manifest::units::Restart;
    use crate::runtime::supervise::RestartPolicy;
    match spec.restart {
        Restart::No => RestartPolicy::No,
        Restart::OnFailure(max) => RestartPolicy::OnFailure { max },
        Restart::Always => RestartPolicy::Always,
        Restart::UnlessStopped => RestartPolicy::UnlessStopped,
    }
}

/// The manifest's backoff (kubelet's defaults when not declared).
pub fn backoff(spec: &ContainerSpec) -> crate::runtime::supervise::Backoff {
    let b = spec.backoff.unwrap_or_default();
    crate::runtime::supervise::Backoff {
        initial_ms: b.initial.0,
        max_ms: b.max.0,
        reset_after_ms: b.reset_after.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::spec::{BackoffSpec, HealthSpec, OnUnhealthy};
    use crate::manifest::units::{Duration, Restart, Size};
    use crate::runtime::supervise::RestartPolicy;

    fn spec() -> ContainerSpec {
        ContainerSpec::with_image(
            "docker.io/library/bb:1",
            "docker.io/library/bb:1".parse().unwrap(),
        )
    }

    #[test]
    fn supervision_and_limits_translate_one_for_one() {
        let mut s = spec();
        assert_eq!(restart_policy(&s), RestartPolicy::No);
        assert_eq!(
            backoff(&s),
            crate::runtime::supervise::Backoff::default(),
            "kubelet's"
        );
        assert_eq!(health(&s), None);
        s.restart = Restart::OnFailure(Some(3));
        assert_eq!(
            restart_policy(&s),
            RestartPolicy::OnFailure { max: Some(3) }
        );
        s.restart = Restart::UnlessStopped;
        assert_eq!(restart_policy(&s), RestartPolicy::UnlessStopped);
        s.backoff = Some(BackoffSpec {
            initial: Duration(200),
            max: Duration(1000),
            reset_after: Duration(5000),
        });
        let b = backoff(&s);
        assert_eq!(
            (b.initial_ms, b.max_ms, b.reset_after_ms),
            (200, 1000, 5000)
        );
        s.health = Some(HealthSpec {
            cmd: vec!["true".into()],
            interval: Duration(300),
            timeout: Duration(400),
            retries: 2,
            start_period: Duration(500),
            on_unhealthy: OnUnhealthy::None,
        });
        let h = health(&s).unwrap();
        assert_eq!(
            (
                h.interval_ms,
                h.timeout_ms,
                h.retries,
                h.start_period_ms,
                h.restart_on_unhealthy
            ),
            (300, 400, 2, 500, false)
        );
        s.memory = Some(Size(64 << 20));
        s.cpus = Some(0.5);
        s.pids = Some(10);
        let l = limits(&s);
        assert_eq!(
            (l.memory, l.cpus, l.pids),
            (Some(64 << 20), Some(0.5), Some(10))
        );
    }

    #[test]
    fn a_missing_bind_source_is_found_before_anything_changes() {
        let mut s = spec();
        assert_eq!(missing_bind_source(&s), None);
        s.volumes = vec!["/nonexistent/berth-test:/data".parse().unwrap()];
        assert_eq!(
            missing_bind_source(&s),
            Some(std::path::Path::new("/nonexistent/berth-test"))
        );
        s.volumes = vec!["/tmp:/data".parse().unwrap(), "v:/v".parse().unwrap()];
        assert_eq!(missing_bind_source(&s), None, "volumes are not host paths");
    }

    #[test]
    fn errors_are_classified_for_retries() {
        use crate::registry::client::RegistryError;
        let step = |transient| ApplyError::Step {
            message: "x".into(),
            transient,
        };
        assert!(step(true).is_transient() && !step(false).is_transient());
        assert!(ApplyError::Waiting("db not healthy yet".into()).is_transient());
        assert!(!ApplyError::Invalid("bad".into()).is_transient());
        let status = |status| {
            ApplyError::Image(crate::image::ImageError::Registry(RegistryError::Status {
                registry: "r".into(),
                repository: "a".into(),
                what: "manifest".into(),
                status,
                detail: String::new(),
            }))
        };
        assert!(status(503).is_transient() && status(429).is_transient());
        assert!(!status(400).is_transient());
        let port = |m: &str| {
            ApplyError::Runtime(crate::runtime::RuntimeError::StartFailed {
                name: "web".into(),
                message: m.into(),
            })
        };
        assert!(port("bind 0.0.0.0:80/tcp: Address in use (os error 98)").is_transient());
        assert!(!port("exec /bin/nope: No such file or directory").is_transient());
    }
}
