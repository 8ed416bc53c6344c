//! End to end as root: apply a container from an imported busybox image, check it runs with
//! its settings and isolation, then remove everything and check nothing is left.

mod common;
use common::*;

#[test]
fn apply_run_exec_and_clean_up() {
    let layout = tempfile::tempdir().unwrap();
    write_layout(layout.path(), "t", &[busybox_layer()], &["/bin/sh"]);
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let _teardown = Teardown::new(s);
    ok(&berth(
        s,
        &[
            "image",
            "import",
            "--tag",
            "example.com/e2e/bb:1",
            layout.path().to_str().unwrap(),
        ],
    ));
    let dir = tempfile::tempdir().unwrap();
    let name = format!("e2e{}", std::process::id());
    std::fs::write(
        dir.path().join("c.toml"),
        format!(
            "[image.bb]\nref = \"example.com/e2e/bb:1\"\npull = \"never\"\n\n[container.{name}]\nimage = \"bb\"\ncommand = [\"sh\", \"-c\", \"echo hello $GREETING; trap 'exit 0' TERM; sleep 1000 & wait\"]\nenv = {{ GREETING = \"world\" }}\nnetworks = [\"none\"]\nhostname = \"box\"\nmemory = \"64MiB\"\npids = 64\nstop_timeout = \"2s\"\n"
        ),
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let out = ok(&berth(s, &["apply", d]));
    assert!(out.contains("Apply complete"), "{out}");
    // idempotent
    assert_eq!(
        berth(s, &["plan", "--detailed-exitcode", d]).status.code(),
        Some(0)
    );
    let ps: serde_json::Value = serde_json::from_str(&ok(&berth(s, &["ps", "--json"]))).unwrap();
    assert_eq!(ps[0]["state"], "running");
    let pid = ps[0]["pid"].as_i64().unwrap();
    // only fds 0-2 reach the container
    let fds: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut fds = fds;
    fds.sort();
    assert_eq!(fds, ["0", "1", "2"]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(
        status.contains("CapEff:\t00000000a80425fb"),
        "docker's 14 capabilities: {status}"
    );
    let sh = |script: &str| ok(&berth(s, &["exec", &name, "--", "sh", "-c", script]));
    let ex = sh(
        "hostname; ls /proc | grep -c '^[0-9]'; cat /proc/kcore | wc -c; touch /sys/x 2>&1 || echo ro",
    );
    let lines: Vec<&str> = ex.lines().collect();
    assert_eq!(lines[0], "box");
    assert!(
        lines[1].parse::<u32>().unwrap() <= 6,
        "host processes are invisible: {ex}"
    );
    assert_eq!(lines[2], "0", "/proc/kcore is masked");
    assert!(
        ex.contains("ro") || ex.contains("Read-only"),
        "/sys is read-only: {ex}"
    );
    // device nodes may be made (CAP_MKNOD) but only docker's few may be opened: not a block
    // device such as loop0 (7:0), which root on this host can open
    let ex = sh(
        "mknod /dev/loopx b 7 0 && echo made; (exec 3</dev/loopx) 2>&1 || true; echo x > /dev/null && echo null-ok",
    );
    let lines: Vec<&str> = ex.lines().collect();
    assert_eq!(lines.len(), 3, "device access: {ex}");
    assert_eq!(lines[0], "made");
    assert!(
        lines[1].contains("Operation not permitted"),
        "a block device must not be usable: {ex}"
    );
    assert_eq!(lines[2], "null-ok");
    let code = berth(s, &["exec", &name, "--", "sh", "-c", "exit 7"])
        .status
        .code();
    assert_eq!(code, Some(7));
    let logs = ok(&berth(s, &["logs", &name]));
    assert_eq!(logs, "hello world\n");
    // a change in place keeps the process
    let c = std::fs::read_to_string(dir.path().join("c.toml"))
        .unwrap()
        .replace("64MiB", "96MiB");
    std::fs::write(dir.path().join("c.toml"), c).unwrap();
    ok(&berth(s, &["apply", d]));
    let ps: serde_json::Value = serde_json::from_str(&ok(&berth(s, &["ps", "--json"]))).unwrap();
    assert_eq!(
        ps[0]["pid"].as_i64().unwrap(),
        pid,
        "memory changes in place"
    );
    // everything away: no mount, cgroup or directory left
    let out = ok(&berth(
        s,
        &[
            "apply",
            "--allow-empty",
            dir.path().join("none").to_str().unwrap(),
        ],
    ));
    assert!(out.contains("destroyed"), "{out}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(s.to_str().unwrap()), "mounts left behind");
    assert!(
        container_dirs(s).is_empty(),
        "container directories left behind"
    );
    let leftovers = cgroups_named(&name);
    assert!(leftovers.is_empty(), "cgroup left behind: {leftovers:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process still running"
    );
}
