//! Golden plan tests: fixture manifest directories diffed against observed states built here
//! (empty, converged, partially converged, changed, drifted, orphaned), compared with the
//! expected text and JSON under tests/fixtures/plan/golden/. BERTH_BLESS=1 rewrites them.

use berth::manifest::{load_dir, spec::Desired};
use berth::observe::{ContainerStatus, LiveLimits, Observed, ObservedContainer, ObservedImage};
use berth::plan::{self, render};
use berth::state::{ContainerRecord, NetworkRecord, VolumeRecord};
use std::path::{Path, PathBuf};

const DIGEST_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DIGEST_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plan")
}

fn desired(set: &str) -> Desired {
    load_dir(&fixtures().join("manifests").join(set)).unwrap()
}

/// The observed state right after a successful apply of `d`.
fn converged(d: &Desired) -> Observed {
    let mut o = Observed::default();
    for img in d.images.values() {
        o.images.insert(
            img.spec.reference.to_string(),
            ObservedImage {
                digest: DIGEST_A.into(),
                remote_digest: None,
            },
        );
    }
    for v in d.volumes.values() {
        o.volumes.insert(
            v.name.clone(),
            VolumeRecord {
                name: v.name.clone(),
                source: v.source.clone(),
                spec: v.spec.clone(),
                created_at: 1,
            },
        );
    }
    for (i, n) in d.networks.values().enumerate() {
        let mut spec = n.spec.clone();
        if spec.subnet.is_none() {
            spec.subnet = Some(format!("10.200.{i}.0/24").parse().unwrap());
        }
        o.networks.insert(
            n.name.clone(),
            NetworkRecord {
                name: n.name.clone(),
                source: n.source.clone(),
                spec,
                created_at: 1,
            },
        );
    }
    for c in d.containers.values() {
        o.containers.insert(
            c.name.clone(),
            ObservedContainer {
                record: ContainerRecord {
                    name: c.name.clone(),
                    source: c.source.clone(),
                    spec: c.spec.clone(),
                    image_digest: Some(DIGEST_A.into()),
                    created_at: 1,
                    stopped_by_user: false,
                },
                status: ContainerStatus::Running {
                    pid: 100,
                    started_at: 1,
                },
                live_limits: None,
                health: None,
                update_lock: None,
            },
        );
    }
    o
}

fn check(name: &str, d: &Desired, o: &Observed) {
    let plan = plan::diff(d, o).unwrap();
    let text = render::to_text(&plan);
    let json = render::to_json(&plan) + "\n";
    let dir = fixtures().join("golden");
    let (tp, jp) = (
        dir.join(format!("{name}.txt")),
        dir.join(format!("{name}.json")),
    );
    if std::env::var_os("BERTH_BLESS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&tp, &text).unwrap();
        std::fs::write(&jp, &json).unwrap();
        return;
    }
    let et = std::fs::read_to_string(&tp).unwrap_or_else(|_| panic!("missing {}", tp.display()));
    let ej = std::fs::read_to_string(&jp).unwrap_or_else(|_| panic!("missing {}", jp.display()));
    assert_eq!(text, et, "{name}: text plan differs");
    assert_eq!(json, ej, "{name}: JSON plan differs");
    // the JSON summary agrees with the steps
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["format_version"], 1);
    let s = plan.summary();
    assert_eq!(v["summary"]["add"], s.add);
    assert_eq!(v["steps"].as_array().unwrap().len(), plan.steps.len());
}

#[test]
fn empty_host() {
    let d = desired("webapp");
    check("empty", &d, &Observed::default());
    let plan = plan::diff(&d, &Observed::default()).unwrap();
    // dependency order: images, volumes, networks, then db before web
    let addrs: Vec<&str> = plan.steps.iter().map(|s| s.address.as_str()).collect();
    let pos = |a: &str| addrs.iter().position(|x| *x == a).unwrap();
    assert!(pos("image.busybox") < pos("container.db"));
    assert!(pos("network.front") < pos("container.web"));
    assert!(pos("container.db") < pos("container.web"));
}

#[test]
fn converged_host_has_no_changes() {
    let d = desired("webapp");
    let plan = plan::diff(&d, &converged(&d)).unwrap();
    assert!(plan.is_empty(), "{}", render::to_text(&plan));
    check("converged", &d, &converged(&d));
}

#[test]
fn partially_converged() {
    check(
        "partial",
        &desired("webapp"),
        &converged(&desired("partial")),
    );
}

#[test]
fn changed_fields() {
    let plan_of = |o: &Observed| plan::diff(&desired("changed"), o).unwrap();
    let o = converged(&desired("webapp"));
    let p = plan_of(&o);
    let web = p
        .steps
        .iter()
        .find(|s| s.address == "container.web")
        .unwrap();
    assert_eq!(web.action, plan::Action::Replace);
    assert!(
        web.reasons
            .iter()
            .any(|r| r.message == "env.GREETING: \"hello\" → \"hola\" forces replacement")
    );
    let db = p
        .steps
        .iter()
        .find(|s| s.address == "container.db")
        .unwrap();
    assert_eq!(db.action, plan::Action::Update, "memory changes in place");
    check("changed", &desired("changed"), &o);
}

#[test]
fn drifted() {
    let d = desired("webapp");
    let mut o = converged(&d);
    o.containers.get_mut("db").unwrap().status = ContainerStatus::Lost {
        reason: "process 100 vanished and no exit was recorded".into(),
    };
    let web = o.containers.get_mut("web").unwrap();
    web.live_limits = Some(LiveLimits {
        memory: Some(128 << 20),
        cpus: Some(0.5),
        pids: Some(128),
    });
    check("drifted", &d, &o);
}

#[test]
fn exited_and_stopped() {
    let d = desired("webapp");
    let mut o = converged(&d);
    // web (restart = always) exited: started again; db stopped by the user: left alone.
    o.containers.get_mut("web").unwrap().status = ContainerStatus::Exited {
        code: Some(1),
        signal: None,
        oom: false,
        finished_at: 5,
        restarts: 0,
    };
    o.containers.get_mut("db").unwrap().status = ContainerStatus::StoppedByUser;
    check("exited", &d, &o);
}

#[test]
fn new_image_digest() {
    let mut d = desired("webapp");
    d.images.get_mut("busybox").unwrap().spec.pull = berth::manifest::spec::PullPolicy::Always;
    let mut o = converged(&d);
    o.images.values_mut().next().unwrap().remote_digest = Some(DIGEST_B.into());
    check("new-digest", &d, &o);
}

#[test]
fn orphaned_resources() {
    let o = converged(&desired("extra"));
    let d = desired("webapp");
    check("orphaned", &d, &o);
    let plan = plan::diff(&d, &o).unwrap();
    // the volume is never destroyed
    assert!(
        plan.steps
            .iter()
            .all(|s| s.kind != berth::manifest::spec::Kind::Volume)
    );
    assert_eq!(plan.kept.len(), 1);
    // the old container goes before its network
    let addrs: Vec<&str> = plan.steps.iter().map(|s| s.address.as_str()).collect();
    let pos = |a: &str| addrs.iter().position(|x| *x == a).unwrap();
    assert!(pos("container.old") < pos("network.legacy"));
    // deletion guard
    assert!(plan::check_deletions(&plan, 1).is_err());
    assert!(plan::check_deletions(&plan, 2).is_ok());
}

#[test]
fn exited_with_restart_no_is_not_drift() {
    let mut d = desired("webapp");
    d.containers.get_mut("web").unwrap().spec.restart = berth::manifest::units::Restart::No;
    let mut o = converged(&d);
    o.containers.get_mut("web").unwrap().status = ContainerStatus::Exited {
        code: Some(0),
        signal: None,
        oom: false,
        finished_at: 5,
        restarts: 0,
    };
    let plan = plan::diff(&d, &o).unwrap();
    assert!(plan.is_empty(), "{}", render::to_text(&plan));
    assert_eq!(plan.kept.len(), 1);
    assert!(plan.kept[0].message.contains("stays exited"));
    // on-failure restarts a failed container until its retry budget is spent
    assert!(plan::restart_wanted(
        berth::manifest::units::Restart::OnFailure(Some(2)),
        Some(1),
        1
    ));
    assert!(!plan::restart_wanted(
        berth::manifest::units::Restart::OnFailure(Some(2)),
        Some(1),
        2
    ));
    assert!(!plan::restart_wanted(
        berth::manifest::units::Restart::OnFailure(None),
        Some(0),
        0
    ));
}
