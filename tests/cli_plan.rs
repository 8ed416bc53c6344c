//! `berth plan` end to end through the binary, with berth's records in a temporary state dir.

use berth::manifest::spec::{ContainerSpec, Kind, Source};
use berth::state::{ContainerRecord, StateDir};
use std::path::Path;
use std::process::{Command, Output};

fn berth(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env("BERTH_CONFIG", "/dev/null")
        .output()
        .unwrap()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn record(state: &StateDir, name: &str, spec: ContainerSpec) {
    let r = ContainerRecord {
        name: name.into(),
        source: Source {
            file: "old.toml".into(),
            line: 1,
        },
        spec,
        image_digest: None,
        created_at: 1,
        stopped_by_user: false,
    };
    state.write_record(Kind::Container, name, &r).unwrap();
}

#[test]
fn plan_exit_codes_and_json() {
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        "[container.web]\nimage = \"example.com/app:1\"\nnetworks = [\"none\"]\n",
    );
    let d = dir.path().to_str().unwrap();
    let out = berth(state.path(), &["plan", d]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("+ container.web"), "{text}");
    assert!(
        text.contains("Plan: 2 to add, 0 to change, 0 to replace, 0 to destroy."),
        "{text}"
    );
    let out = berth(state.path(), &["plan", "--detailed-exitcode", d]);
    assert_eq!(out.status.code(), Some(2));
    let out = berth(state.path(), &["plan", "--json", d]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["summary"]["add"], 2);
    assert_eq!(v["steps"][1]["address"], "container.web");
    assert_eq!(v["steps"][1]["ops"][0], "create_container");
    // bad manifests: exit 1 with the location, nothing printed on stdout
    write(dir.path(), "b.toml", "[volume.x]\nsize = 1\n");
    let out = berth(state.path(), &["plan", "--detailed-exitcode", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("b.toml:2:1: unknown key \"size\""));
    assert!(out.stdout.is_empty());
}

#[test]
fn plan_reads_records_and_guards_deletions() {
    let state_dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(state_dir.path());
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        "[container.web]\nimage = \"example.com/app:1\"\nenv = { A = \"2\" }\n",
    );
    let d = dir.path().to_str().unwrap();
    let img: berth::registry::reference::Reference = "example.com/app:1".parse().unwrap();
    let mut spec = ContainerSpec::with_image("example.com/app:1", img.clone());
    spec.env.insert("A".into(), "1".into());
    record(&state, "web", spec);
    for i in 0..3 {
        record(
            &state,
            &format!("old{i}"),
            ContainerSpec::with_image("example.com/app:1", img.clone()),
        );
    }
    let out = berth(state_dir.path(), &["plan", d]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-/+ container.web (env.A: \"1\" → \"2\" forces replacement; drift: its directory was removed)"),
        "{text}"
    );
    assert!(
        text.contains("- container.old0 (no longer declared; was in old.toml:1)"),
        "{text}"
    );
    // more deletions than allowed: refused, with the way out named
    let out = berth(state_dir.path(), &["plan", "--max-deletions", "2", d]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("destroys 3 resources") && err.contains("--max-deletions 3"),
        "{err}"
    );
}

#[test]
fn empty_directory_is_refused_unless_allowed() {
    let state_dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(state_dir.path());
    let img: berth::registry::reference::Reference = "example.com/app:1".parse().unwrap();
    record(
        &state,
        "web",
        ContainerSpec::with_image("example.com/app:1", img),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = berth(state_dir.path(), &["plan", d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-empty"));
    let missing = dir.path().join("missing");
    let out = berth(state_dir.path(), &["plan", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-empty"));
    let out = berth(state_dir.path(), &["plan", "--allow-empty", d]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("- container.web"));
    let out = berth(
        state_dir.path(),
        &["plan", "--allow-empty", missing.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn help_explains() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["plan", "--help"])
        .output()
        .unwrap();
    let h = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--allow-empty",
        "--max-deletions",
        "--json",
        "--detailed-exitcode",
        "--state-dir",
    ] {
        assert!(h.contains(flag), "plan --help lacks {flag}");
    }
}
