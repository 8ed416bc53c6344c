//! Container lifecycle end to end, as root: OOM kills, the pids limit, restart policies,
//! drift after a killed shim, stop/start by hand, a killed CLI, logs options, and images
//! pulled from a real registry. Each test has its own state directory and container names,
//! and removes what it created (even when it fails) by applying an empty set on drop.

mod common;
use common::harness::{self, tests};
use common::*;
use serde_json::Value;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let tests = tests![
        oom_kill_is_recorded_and_shown,
        limits_changed_by_hand_are_drift_and_apply_restores_them,
        a_start_that_fails_inside_the_container_says_why_and_leaves_nothing,
        pids_limit_stops_a_fork_bomb,
        restart_policies_are_carried_out_by_the_supervisor,
        killed_shim_is_drift_and_apply_repairs_it,
        stopped_by_hand_stays_stopped_until_started,
        killed_cli_leaves_the_container_running_and_its_exit_recorded,
        logs_tail_since_and_timestamps,
        apply_pulls_from_a_registry_and_runs,
        same_name_in_two_state_dirs_does_not_share_a_cgroup,
        v1_cgroups_are_made_only_where_used_and_older_ones_are_still_removed,
        parts_removed_outside_berth_are_drift_and_apply_repairs_them,
        volumes_binds_and_tmpfs,
        user_working_dir_read_only_and_capabilities,
        debugging_commands_and_stop_settings,
        cgroups_go_below_berths_own_cgroup_or_the_configured_parent,
        cgroup_v2_on_the_unified_hierarchy,
        an_image_of_many_layers_runs,
        health_checks_run_as_the_container_and_restart_it_when_unhealthy,
        dependents_wait_for_their_conditions_and_a_failure_skips_only_them,
        prune_keeps_what_a_container_stands_on_after_its_tag_moved,
        a_relative_state_directory_works,
        killed_at_every_step_an_apply_converges_with_nothing_leaked,
        dependents_that_ask_are_restarted_after_their_dependency,
        a_step_starts_when_what_it_needs_is_done_not_a_wave_later,
        an_update_lock_defers_a_replacement_until_it_goes_or_the_deadline,
        a_replacement_that_does_not_prove_itself_is_rolled_back,
    ]
    .into_iter()
    .map(|t| match t.name() {
        "v1_cgroups_are_made_only_where_used_and_older_ones_are_still_removed" => {
            t.unless(no_v1_freezer())
        }
        _ => t,
    })
    .collect();
    harness::run(tests)
}

/// Why the v1 test cannot run here, if it cannot: it needs v1 hierarchies, the freezer among
/// them (an older berth's cgroup is made in it).
fn no_v1_freezer() -> Option<String> {
    if v2_host() {
        Some("this host is cgroup v2 throughout: no v1 hierarchies".into())
    } else if own_cgroup("freezer").is_none() {
        Some("no v1 freezer hierarchy".into())
    } else {
        None
    }
}

const IMAGE: &str = "example.com/e2e/bb:1";

struct Host {
    // first, so it runs before the state directory goes
    _teardown: Teardown,
    state: tempfile::TempDir,
    dir: tempfile::TempDir,
    tag: &'static str,
}

impl Host {
    /// A fresh state directory with the busybox image imported under `IMAGE`.
    fn new(tag: &'static str) -> Host {
        Host::with_layers(tag, vec![])
    }

    /// [`Host::new`] with more layers over busybox in the image.
    fn with_layers(tag: &'static str, extra: Vec<Vec<u8>>) -> Host {
        let state = state_with_image(IMAGE, extra);
        Host {
            _teardown: Teardown::new(state.path()),
            state,
            dir: tempfile::tempdir().unwrap(),
            tag,
        }
    }

    fn s(&self) -> &Path {
        self.state.path()
    }

    fn d(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    /// A container name unique to this test and process.
    fn name(&self, n: &str) -> String {
        format!("{}{n}{}", self.tag, std::process::id())
    }
    /// The name of container `n`'s cgroup directories (its name and the state directory's
    /// hash).
    fn leaf(&self, n: &str) -> String {
        berth::runtime::cgroup::leaf_name(&self.s().join("containers").join(self.name(n)))
    }

    /// Write the manifests: the image resource plus `containers` (TOML bodies by name).
    fn declare(&self, containers: &[(&str, &str)]) {
        let mut t = format!("[image.bb]\nref = \"{IMAGE}\"\npull = \"never\"\n");
        for (n, body) in containers {
            t.push_str(&format!(
                "\n[container.{}]\nimage = \"bb\"\nnetworks = [\"none\"]\nstop_timeout = \"1s\"\n{body}\n",
                self.name(n)
            ));
        }
        std::fs::write(self.dir.path().join("c.toml"), t).unwrap();
    }

    /// `sh -c script` in container `n` through `berth exec`: its output (asserting success).
    fn sh(&self, n: &str, script: &str) -> String {
        ok(&self.run(&["exec", &self.name(n), "--", "sh", "-c", script]))
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        berth(self.s(), args)
    }

    fn apply(&self) -> String {
        ok(&self.run(&["apply", self.d()]))
    }

    /// `plan --detailed-exitcode`: (exit code, text).
    fn plan(&self) -> (Option<i32>, String) {
        let o = self.run(&["plan", "--detailed-exitcode", self.d()]);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }

    /// The pid of container `n`'s shim, from its state.json.
    fn shim_pid(&self, n: &str) -> i64 {
        shim_pid(self.s(), &self.name(n))
    }

    fn ps(&self, n: &str) -> Value {
        let all: Value = serde_json::from_str(&ok(&self.run(&["ps", "-a", "--json"]))).unwrap();
        let name = self.name(n);
        all.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name.as_str())
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Poll `ps` until `f` holds (at most 60 s; a bound, not a timing assertion).
    fn wait_for(&self, n: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.ps(n);
            if f(&r) {
                return r;
            }
            assert!(Instant::now() < end, "{n}: never {what}; last ps: {r}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `berth inspect` of container `n`, with `global` options before the command.
    fn inspect(&self, global: &[&str], n: &str) -> Value {
        let name = self.name(n);
        let mut args = global.to_vec();
        args.extend(["inspect", &name]);
        serde_json::from_str(&ok(&self.run(&args))).unwrap()
    }

    /// The directories of container `n`'s cgroup (one per controller on v1), per inspect.
    fn cgroup_dirs(&self, global: &[&str], n: &str) -> Vec<String> {
        self.inspect(global, n)["cgroup_dirs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect()
    }

    /// `file` in the container's cgroup (in whichever controller's directory has it).
    fn cgroup_path(&self, n: &str, file: &str) -> Option<std::path::PathBuf> {
        self.cgroup_dirs(&[], n)
            .iter()
            .map(|d| Path::new(d).join(file))
            .find(|p| p.exists())
    }

    fn cgroup_file(&self, n: &str, file: &str) -> Option<String> {
        std::fs::read_to_string(self.cgroup_path(n, file)?).ok()
    }
}

fn state(r: &Value) -> &str {
    r["state"].as_str().unwrap_or("")
}

/// A process's parent (`/proc/PID/status`'s `PPid`).
fn parent_pid(pid: i64) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no PPid in /proc/{pid}/status"))
}

/// Whether a process runs (exists and is not a zombie its parent has yet to reap).
fn running(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

fn pid_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn oom_kill_is_recorded_and_shown() {
    let h = Host::new("oom");
    // busybox `tail` keeps the current line in memory; /dev/zero never ends one
    h.declare(&[(
        "a",
        "command = [\"tail\", \"/dev/zero\"]\nmemory = \"16MiB\"",
    )]);
    h.apply();
    let r = h.wait_for("a", "exited", |r| state(r) == "exited");
    assert_eq!(r["detail"]["oom"], true, "{r}");
    assert!(r["status"].as_str().unwrap().contains("OOM killed"), "{r}");
    let text = ok(&h.run(&["ps", "-a"]));
    assert!(text.contains("OOM killed"), "{text}");
    // restart = "no": staying exited is the declared state, not drift
    let (code, out) = h.plan();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("killed by the OOM killer"),
        "plan says why it stays exited: {out}"
    );
}

fn limits_changed_by_hand_are_drift_and_apply_restores_them() {
    let h = Host::new("lim");
    h.declare(&[(
        "a",
        "command = [\"sleep\", \"1000\"]\nmemory = \"64MiB\"\npids = 20",
    )]);
    h.apply();
    let pid = h.ps("a")["pid"].as_i64().unwrap();
    // someone lowers both limits behind berth's back
    let write = |file: &str, v: &str| {
        let p = h
            .cgroup_path("a", file)
            .unwrap_or_else(|| panic!("no {file} in the cgroup"));
        std::fs::write(p, v).unwrap();
    };
    let mem_file = if h.cgroup_path("a", "memory.max").is_some() {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    write(mem_file, &(32u64 << 20).to_string());
    write("pids.max", "5");
    let (code, plan) = h.plan();
    assert_eq!(code, Some(2), "{plan}");
    assert!(
        plan.contains("memory: 32MiB on the host (changed outside berth) → 64MiB"),
        "{plan}"
    );
    assert!(
        plan.contains("pids: 5 on the host (changed outside berth) → 20"),
        "{plan}"
    );
    h.apply();
    assert_eq!(h.plan().0, Some(0), "converged again");
    assert_eq!(h.cgroup_file("a", "pids.max").unwrap().trim(), "20");
    assert_eq!(
        h.cgroup_file("a", mem_file).unwrap().trim(),
        (64u64 << 20).to_string()
    );
    assert_eq!(h.ps("a")["pid"].as_i64().unwrap(), pid, "repaired in place");
}

fn a_start_that_fails_inside_the_container_says_why_and_leaves_nothing() {
    let h = Host::new("bad");
    // a file bind-mounted over a directory of the image: the container's root cannot be made
    h.declare(&[(
        "a",
        "command = [\"sleep\", \"1000\"]\nvolumes = [\"/etc/hostname:/bin\"]",
    )]);
    let o = h.run(&["apply", h.d()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bind mount /bin") && err.contains(&h.name("a")),
        "{err}"
    );
    let r = h.ps("a");
    assert_eq!(r["state"], "exited", "{r}");
    assert_eq!(r["detail"]["code"], 127, "{r}");
    let left = cgroups_named(&h.name("a"));
    assert!(left.is_empty(), "cgroup left behind: {left:?}");
}

fn pids_limit_stops_a_fork_bomb() {
    let h = Host::new("pid");
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]\npids = 12")]);
    h.apply();
    let out = h.run(&[
        "exec",
        &h.name("a"),
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 40 ]; do sleep 1000 >/dev/null 2>&1 & i=$((i+1)); done; echo done",
    ]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("can't fork"), "fork must fail: {all}");
    let current: u64 = h
        .cgroup_file("a", "pids.current")
        .expect("pids.current")
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 12, "pids.current = {current}");
    let max = h.cgroup_file("a", "pids.max").unwrap();
    assert_eq!(max.trim(), "12");
}

/// Restart policies are carried out by each container's supervisor (its shim), with no
/// berth process running: on-failure up to its count, a crash loop backing off, `berth stop`
/// ending the supervision (the stop returns once the supervisor is gone, so nothing can start
/// the container again), `berth start` resuming it.
fn restart_policies_are_carried_out_by_the_supervisor() {
    let h = Host::new("rst");
    let flaky = "command = [\"sh\", \"-c\", \"exit 3\"]\nrestart = \"on-failure:2\"\nbackoff = { initial = \"200ms\", max = \"400ms\" }";
    h.declare(&[
        ("flaky", flaky),
        ("once", "command = [\"true\"]\nrestart = \"no\""),
        (
            "loop",
            "command = [\"sh\", \"-c\", \"exit 1\"]\nrestart = \"always\"\nbackoff = { initial = \"1s\", max = \"2s\" }",
        ),
    ]);
    h.apply();
    // two restarts by the supervisor, then it stays exited: converged
    let r = h.wait_for("flaky", "restarted twice and exited", |r| {
        r["restarts"] == 2 && state(r) == "exited"
    });
    assert!(r["status"].as_str().unwrap().contains("code 3"), "{r}");
    let once = h.wait_for("once", "exited", |r| state(r) == "exited");
    assert!(
        once["status"].as_str().unwrap().contains("code 0"),
        "{once}"
    );
    assert_eq!(once["restarts"], 0, "{once}");
    // a crash loop: restarting, shown with its next attempt and count; plan leaves it be
    let r = h.wait_for("loop", "backing off after a restart", |r| {
        state(r) == "restarting" && r["restarts"].as_u64().is_some_and(|n| n >= 1)
    });
    assert!(
        r["status"].as_str().unwrap().contains("restart")
            && r["status"].as_str().unwrap().contains("last code 1"),
        "{r}"
    );
    assert!(r["detail"]["restart_at_ms"].as_u64().is_some(), "{r}");
    let (code, out) = h.plan();
    assert_eq!(code, Some(0), "the supervisor has it in hand: {out}");
    // one supervisor, however often it is started meanwhile (it knows the container by
    // its slot)
    let dir = std::fs::canonicalize(h.s().join("containers").join(h.name("loop"))).unwrap();
    for _ in 0..50 {
        let _ = h.run(&["start", &h.name("loop")]);
        let shims = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains(" shim ") && c.trim_end().ends_with(dir.to_str().unwrap())
                })
            })
            .count();
        assert!(shims <= 1, "{shims} supervisors for one container");
    }
    // stop ends the supervision: when it returns, the supervisor is gone
    let shim = h.shim_pid("loop");
    ok(&h.run(&["stop", &h.name("loop")]));
    assert!(!running(shim), "the supervisor {shim} outlived the stop");
    let r = h.ps("loop");
    assert_eq!(state(&r), "stopped by user", "{r}");
    let restarts = r["restarts"].as_u64().unwrap();
    // start resumes it: it runs (and fails) again, counted
    ok(&h.run(&["start", &h.name("loop")]));
    h.wait_for("loop", "restarted again", |r| {
        r["restarts"].as_u64().is_some_and(|n| n > restarts)
    });
}

fn killed_shim_is_drift_and_apply_repairs_it() {
    let h = Host::new("drf");
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    h.apply();
    let r = h.wait_for("a", "running", |r| state(r) == "running");
    let pid = r["pid"].as_i64().unwrap();
    let st: Value = serde_json::from_str(
        &std::fs::read_to_string(
            h.s()
                .join("containers")
                .join(h.name("a"))
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let shim = st["shim_pid"].as_i64().unwrap();
    for p in [shim, pid] {
        Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status()
            .unwrap();
    }
    let end = Instant::now() + Duration::from_secs(30);
    while pid_alive(pid) || pid_alive(shim) {
        assert!(Instant::now() < end, "processes survived SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, out) = h.plan();
    assert_eq!(code, Some(2), "a vanished container is drift: {out}");
    assert!(out.contains(&h.name("a")), "{out}");
    h.apply();
    let r = h.wait_for("a", "running again", |r| state(r) == "running");
    assert_ne!(r["pid"].as_i64().unwrap(), pid);
    assert_eq!(h.plan().0, Some(0));
}

fn stopped_by_hand_stays_stopped_until_started() {
    let h = Host::new("stp");
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]\nrestart = \"always\"")]);
    h.apply();
    let r = h.wait_for("a", "running", |r| state(r) == "running");
    let pid = r["pid"].as_i64().unwrap();
    ok(&h.run(&["stop", &h.name("a")]));
    assert!(!pid_alive(pid), "stop ends the process");
    assert_eq!(state(&h.ps("a")), "stopped by user");
    let (code, out) = h.plan();
    assert_eq!(code, Some(0), "stopped by hand is not drift: {out}");
    assert!(out.contains("stopped by user"), "{out}");
    // apply leaves it alone too
    h.apply();
    assert_eq!(state(&h.ps("a")), "stopped by user");
    ok(&h.run(&["start", &h.name("a")]));
    let r = h.wait_for("a", "running", |r| state(r) == "running");
    let pid2 = r["pid"].as_i64().unwrap();
    ok(&h.run(&["restart", &h.name("a")]));
    let r = h.wait_for("a", "running", |r| state(r) == "running");
    assert_ne!(
        r["pid"].as_i64().unwrap(),
        pid2,
        "restart starts a new process"
    );
    assert_eq!(h.plan().0, Some(0));
}

fn killed_cli_leaves_the_container_running_and_its_exit_recorded() {
    let h = Host::new("cli");
    h.declare(&[(
        "a",
        "command = [\"sh\", \"-c\", \"echo up; while [ ! -e /tmp/go ]; do sleep 0.1; done; exit 5\"]",
    )]);
    h.apply();
    let r = h.wait_for("a", "running", |r| state(r) == "running");
    let pid = r["pid"].as_i64().unwrap();
    // a berth CLI attached to the container (logs -f), killed with SIGKILL
    let mut follower = Command::new(berth_bin())
        .arg("--state-dir")
        .arg(h.s())
        .args(["logs", "-f", &h.name("a")])
        .env("BERTH_CONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        use std::io::BufRead;
        let mut rd = std::io::BufReader::new(follower.stdout.take().unwrap());
        rd.read_line(&mut first).unwrap();
    }
    assert_eq!(first, "up\n");
    follower.kill().unwrap();
    follower.wait().unwrap();
    assert!(pid_alive(pid), "the container outlives the CLI");
    assert_eq!(state(&h.ps("a")), "running");
    ok(&h.run(&["exec", &h.name("a"), "--", "touch", "/tmp/go"]));
    let r = h.wait_for("a", "exited", |r| state(r) == "exited");
    assert_eq!(r["detail"]["code"], 5, "{r}");
}

fn logs_tail_since_and_timestamps() {
    let h = Host::new("log");
    h.declare(&[(
        "a",
        "command = [\"sh\", \"-c\", \"for i in 1 2 3 4 5; do echo $i; done; echo err >&2; exec sleep 1000\"]",
    )]);
    h.apply();
    let n = h.name("a");
    let end = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&h.run(&["logs", &n]).stderr).contains("err") {
        assert!(Instant::now() < end, "logs never complete");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ok(&h.run(&["logs", &n])), "1\n2\n3\n4\n5\n");
    let both = h.run(&["logs", &n]);
    assert_eq!(
        String::from_utf8_lossy(&both.stderr),
        "err\n",
        "stderr stays stderr"
    );
    // --tail counts lines of both streams, as docker's does
    let tail = h.run(&["logs", "--tail", "3", &n]);
    assert_eq!(ok(&tail), "4\n5\n");
    assert_eq!(String::from_utf8_lossy(&tail.stderr), "err\n");
    assert_eq!(
        ok(&h.run(&["logs", "--since", "1h", &n])),
        "1\n2\n3\n4\n5\n"
    );
    let ts = ok(&h.run(&["logs", "--timestamps", "--tail", "2", &n]));
    let (time, line) = ts.trim_end().split_once(' ').unwrap();
    assert_eq!(line, "5");
    assert!(
        time.len() >= 20 && time.as_bytes()[4] == b'-' && time.contains('T'),
        "RFC 3339 time: {ts}"
    );
    // -f: what is there, then each line as it comes, until the container exits
    h.declare(&[(
        "f",
        "command = [\"sh\", \"-c\", \"echo one; sleep 1; echo two; echo three >&2; sleep 1; echo four\"]",
    )]);
    h.apply();
    let mut follow = Command::new(berth_bin())
        .args([
            "--state-dir",
            h.s().to_str().unwrap(),
            "logs",
            "-f",
            &h.name("f"),
        ])
        .env("BERTH_CONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while follow.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = follow.kill();
            panic!("logs -f did not end with its container");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = follow.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\nfour\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "three\n");
}

fn apply_pulls_from_a_registry_and_runs() {
    let reg = Registry::start();
    let reference = format!("{}/e2e/pulled:1", reg.addr);
    push_image(&reference, &[]);
    let state = tempfile::tempdir().unwrap();
    let _teardown = Teardown::new(state.path());
    let dir = tempfile::tempdir().unwrap();
    let name = format!("pul{}", std::process::id());
    std::fs::write(
        dir.path().join("c.toml"),
        format!(
            "[container.{name}]\nimage = \"{reference}\"\ncommand = [\"sleep\", \"1000\"]\nnetworks = [\"none\"]\nstop_timeout = \"1s\"\n"
        ),
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let plan = ok(&berth(state.path(), &["plan", d]));
    assert!(plan.contains("pull"), "{plan}");
    let out = berth(state.path(), &["apply", d]);
    let running = ok(&berth(state.path(), &["ps", "--json"]));
    let _ = berth(
        state.path(),
        &[
            "apply",
            "--allow-empty",
            dir.path().join("none").to_str().unwrap(),
        ],
    );
    ok(&out);
    let ps: Value = serde_json::from_str(&running).unwrap();
    assert_eq!(ps[0]["name"], name.as_str());
    assert_eq!(ps[0]["state"], "running");
    assert_eq!(ps[0]["image"], reference.as_str());
}

fn same_name_in_two_state_dirs_does_not_share_a_cgroup() {
    let a = Host::new("dup");
    let b = Host::new("dup");
    a.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    b.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    a.apply();
    let pid = a.wait_for("a", "running", |r| state(r) == "running")["pid"]
        .as_i64()
        .unwrap();
    // the same container name in another state directory runs beside it, in a cgroup of
    // its own
    b.apply();
    let other = b.wait_for("a", "running", |r| state(r) == "running")["pid"]
        .as_i64()
        .unwrap();
    assert_ne!(a.leaf("a"), b.leaf("a"));
    let (da, db) = (a.cgroup_dirs(&[], "a"), b.cgroup_dirs(&[], "a"));
    assert!(!da.is_empty() && !db.is_empty());
    assert!(da.iter().all(|d| !db.contains(d)), "{da:?} {db:?}");
    drop(b);
    assert!(
        !pid_alive(other),
        "the other state directory's container was removed"
    );
    assert!(
        pid_alive(pid),
        "the other state directory's cleanup spared it"
    );
    assert_eq!(state(&a.ps("a")), "running");
}

/// Removes an empty directory and then its parent, if empty, on drop (a test's hand-made
/// cgroup, should the test fail first).
struct RmDirOnDrop(std::path::PathBuf);

impl Drop for RmDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
        if let Some(p) = self.0.parent() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

fn v1_cgroups_are_made_only_where_used_and_older_ones_are_still_removed() {
    let h = Host::new("v1h");
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    h.apply();
    let r = h.wait_for("a", "running", |r| state(r) == "running");
    let pid = r["pid"].as_i64().unwrap();
    let dirs = h.cgroup_dirs(&[], "a");
    for c in ["memory", "cpu", "cpuacct", "pids", "devices"] {
        let mount = format!("/sys/fs/cgroup/{c}");
        if Path::new(&mount).is_dir() {
            assert!(
                dirs.iter().any(|d| d.starts_with(&format!("{mount}/"))),
                "no {c} cgroup: {dirs:?}"
            );
        }
    }
    assert!(
        !dirs
            .iter()
            .any(|d| d.starts_with("/sys/fs/cgroup/freezer/")),
        "a freezer cgroup berth does not use: {dirs:?}"
    );
    // an older berth made the cgroup in every hierarchy: put the container in a freezer one
    // too, as it did, and removal must take that one as well
    let base = own_cgroup("freezer").expect("a freezer hierarchy");
    let old = Path::new("/sys/fs/cgroup/freezer")
        .join(base.trim_start_matches('/'))
        .join("berth")
        .join(h.leaf("a"));
    std::fs::create_dir_all(&old).unwrap();
    let _rm = RmDirOnDrop(old.clone());
    std::fs::write(old.join("cgroup.procs"), pid.to_string()).unwrap();
    h.declare(&[]);
    ok(&h.run(&["apply", "--allow-empty", h.d()]));
    assert!(!old.exists(), "{} left behind", old.display());
    let left = cgroups_named(&h.name("a"));
    assert!(left.is_empty(), "cgroup left behind: {left:?}");
}

/// Move a container's process out of its cgroup (to the root of each hierarchy) and remove
/// the cgroup, as a person might by hand.
fn remove_cgroup_by_hand(dirs: &[String], pid: i64) {
    let v2 = v2_host();
    for d in dirs {
        let root = if v2 {
            "/sys/fs/cgroup".to_string()
        } else {
            let rest = d.strip_prefix("/sys/fs/cgroup/").unwrap();
            format!("/sys/fs/cgroup/{}", rest.split('/').next().unwrap())
        };
        std::fs::write(format!("{root}/cgroup.procs"), pid.to_string()).unwrap();
    }
    for d in dirs {
        std::fs::remove_dir(d).unwrap_or_else(|e| panic!("rmdir {d}: {e}"));
    }
}

fn parts_removed_outside_berth_are_drift_and_apply_repairs_them() {
    let h = Host::new("oob");
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    h.apply();
    let dir = h.s().join("containers").join(h.name("a"));
    let record = h
        .s()
        .join("records/containers")
        .join(format!("{}.json", h.name("a")));
    for (what, reason) in [
        ("record", "its record was removed outside berth"),
        ("directory", "its directory was removed"),
        ("rootfs", "its root filesystem was removed"),
        ("cgroup", "its cgroup was removed"),
    ] {
        let r = h.wait_for("a", "running", |r| state(r) == "running");
        let pid = r["pid"].as_i64().unwrap();
        match what {
            "record" => std::fs::remove_file(&record).unwrap(),
            "directory" => std::fs::remove_dir_all(&dir).unwrap(),
            "rootfs" => std::fs::remove_dir_all(dir.join("upper")).unwrap(),
            _ => remove_cgroup_by_hand(&h.cgroup_dirs(&[], "a"), pid),
        }
        let (code, out) = h.plan();
        assert_eq!(code, Some(2), "{what} removed: {out}");
        assert!(
            out.contains("drift: ") && out.contains(reason),
            "{what}: {out}"
        );
        h.apply();
        let r = h.wait_for("a", "running again", |r| state(r) == "running");
        assert_ne!(r["pid"].as_i64().unwrap(), pid, "{what}: not replaced");
        assert!(!pid_alive(pid), "{what}: the old process {pid} still runs");
        assert_eq!(h.plan().0, Some(0), "{what}: not converged");
        assert_eq!(
            cgroups_named(&h.name("a")).len(),
            h.cgroup_dirs(&[], "a").len(),
            "{what}"
        );
    }
    // removed outside berth and no longer declared: the process goes with it, and the shim
    // does not bring the directory back when it records the exit
    let pid = h.ps("a")["pid"].as_i64().unwrap();
    // the shim, the container's parent, is what would write the directory back on the exit
    let shim = parent_pid(pid);
    std::fs::remove_dir_all(&dir).unwrap();
    h.declare(&[]);
    ok(&h.run(&["apply", "--allow-empty", h.d()]));
    // wait for the shim's end (it has then recorded the exit, or not), not for a while
    let end = Instant::now() + Duration::from_secs(30);
    while pid_alive(pid) || pid_alive(shim) {
        assert!(
            Instant::now() < end,
            "the container's process or its shim survived"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dir.exists(), "the container's directory came back");
    assert!(cgroups_named(&h.name("a")).is_empty());
    assert_eq!(h.plan().0, Some(0));
    // its record removed and no longer declared: destroyed all the same
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    h.apply();
    let pid = h.wait_for("a", "running", |r| state(r) == "running")["pid"]
        .as_i64()
        .unwrap();
    std::fs::remove_file(&record).unwrap();
    h.declare(&[]);
    let o = h.run(&["plan", "--allow-empty", h.d()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!(
            "- container.{} (not declared; drift:",
            h.name("a")
        )),
        "{out}"
    );
    ok(&h.run(&["apply", "--allow-empty", h.d()]));
    assert!(!pid_alive(pid));
    assert!(!dir.exists());
    assert!(cgroups_named(&h.name("a")).is_empty());
}

fn volumes_binds_and_tmpfs() {
    let seed = LayerBuilder::new()
        .dir("srv", 0o755)
        .file("srv/seed.txt", b"seed\n", 0o644)
        .build();
    let h = Host::with_layers("vol", vec![seed]);
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("in.txt"), "from host\n").unwrap();
    let rw = tempfile::tempdir().unwrap();
    let volumes = format!(
        "volumes = [\"data:/srv\", \"{}:/in:ro\", \"{}:/out\"]\ntmpfs = [\"/scratch:size=1m\"]",
        ro.path().display(),
        rw.path().display()
    );
    let vol_toml = h.dir.path().join("v.toml");
    std::fs::write(&vol_toml, "[volume.data]\n").unwrap();
    h.declare(&[("a", &format!("command = [\"sleep\", \"1000\"]\n{volumes}"))]);
    h.apply();
    let pid = h.wait_for("a", "running", |r| state(r) == "running")["pid"]
        .as_i64()
        .unwrap();
    let out = h.sh(
        "a",
        "cat /srv/seed.txt; echo new > /srv/new; cat /in/in.txt; \
         touch /in/x 2>/dev/null && echo writable || echo read-only; echo out > /out/o; \
         grep ' /scratch ' /proc/mounts",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "seed",
        "a new volume is populated from the image: {out}"
    );
    assert_eq!(lines[1], "from host", "{out}");
    assert_eq!(lines[2], "read-only", ":ro is honoured: {out}");
    assert!(
        lines[3].starts_with("tmpfs /scratch tmpfs") && lines[3].contains("size=1024k"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(rw.path().join("o")).unwrap(),
        "out\n"
    );
    assert!(!ro.path().join("x").exists());

    // a field that forces replacement: a new container, the same volume
    h.declare(&[(
        "a",
        &format!("command = [\"sh\", \"-c\", \"sleep 1000\"]\n{volumes}"),
    )]);
    let (code, plan) = h.plan();
    assert_eq!(code, Some(2));
    assert!(
        plan.contains(&format!("-/+ container.{}", h.name("a")))
            && plan.contains("forces replacement"),
        "{plan}"
    );
    h.apply();
    let r = h.wait_for("a", "replaced", |r| {
        state(r) == "running" && r["pid"].as_i64() != Some(pid)
    });
    assert!(!pid_alive(pid), "the old container still runs");
    assert_eq!(h.sh("a", "cat /srv/new /srv/seed.txt"), "new\nseed\n");

    // neither the container nor the volume declared: the container goes, the data stays
    std::fs::remove_file(&vol_toml).unwrap();
    h.declare(&[]);
    ok(&h.run(&["apply", "--allow-empty", h.d()]));
    let pid = r["pid"].as_i64().unwrap();
    assert!(!pid_alive(pid));
    assert!(
        tree(h.s()).keys().any(|k| k.ends_with("/new")),
        "the volume's data was deleted"
    );
    std::fs::write(&vol_toml, "[volume.data]\n").unwrap();
    h.declare(&[("a", &format!("command = [\"sleep\", \"1000\"]\n{volumes}"))]);
    h.apply();
    h.wait_for("a", "running", |r| state(r) == "running");
    assert_eq!(
        h.sh("a", "cat /srv/new"),
        "new\n",
        "the volume came back with its data"
    );

    // a bind mount of a missing host path: an error that names it, before anything changes
    // (a, no longer declared, is not removed)
    let pid = h.ps("a")["pid"].as_i64().unwrap();
    h.declare(&[(
        "b",
        "command = [\"sleep\", \"1000\"]\nvolumes = [\"/nonexistent-berth-test:/x\"]",
    )]);
    let o = h.run(&["apply", "--allow-empty", h.d()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "container.{}: bind mount source /nonexistent-berth-test does not exist",
            h.name("b")
        )) && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(
        pid_alive(pid),
        "a was removed by an apply that could not succeed"
    );
    assert_eq!(state(&h.ps("a")), "running");
}

fn user_working_dir_read_only_and_capabilities() {
    let h = Host::new("prc");
    h.declare(&[
        (
            "u",
            "command = [\"sleep\", \"1000\"]\nuser = \"app\"\nworking_dir = \"/work/sub\"\nread_only = true",
        ),
        (
            "c",
            "command = [\"sleep\", \"1000\"]\ncap_add = [\"SYS_TIME\"]\ncap_drop = [\"net_raw\"]",
        ),
    ]);
    h.apply();
    h.wait_for("u", "running", |r| state(r) == "running");
    let out = h.sh(
        "u",
        "id; pwd; touch /x 2>/dev/null && echo writable || echo read-only",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "uid=1000(app) gid=1000(app) groups=2000(extra)",
        "the user from the image's /etc/passwd, supplementary groups (those listing it) from \
         its /etc/group, as runc sets them: {out}"
    );
    assert_eq!(
        lines[1], "/work/sub",
        "the working directory is made: {out}"
    );
    assert_eq!(lines[2], "read-only", "{out}");
    let pid = h.ps("u")["pid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert_eq!(h.sh("u", "cat /etc/hostname"), format!("{}\n", h.name("u")));
    // open files: docker's 1048576, never above the host's hard limit
    let nofile = |limits: &str| -> (u64, u64) {
        let l = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let f: Vec<&str> = l.split_whitespace().collect();
        (f[3].parse().unwrap(), f[4].parse().unwrap())
    };
    let (_, host_hard) = nofile(&std::fs::read_to_string("/proc/self/limits").unwrap());
    let want = host_hard.min(1 << 20);
    assert_eq!(
        nofile(&std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap()),
        (want, want)
    );
    let pid = h.wait_for("c", "running", |r| state(r) == "running")["pid"]
        .as_i64()
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    // docker's 14 (a80425fb) + SYS_TIME (bit 25) - NET_RAW (bit 13)
    assert!(status.contains("CapEff:\t00000000aa0405fb"), "{status}");
}

fn debugging_commands_and_stop_settings() {
    let h = Host::new("dbg");
    h.declare(&[
        (
            "d",
            "command = [\"sh\", \"-c\", \"trap 'echo got usr1; exit 3' USR1; sleep 1000 & wait\"]\n\
             stop_signal = \"SIGUSR1\"\ncpus = 0.5\nmemory = \"64MiB\"\npids = 50",
        ),
        // pid 1 of a pid namespace ignores SIGTERM it has no handler for: only SIGKILL, after
        // stop_timeout, ends it
        ("k", "command = [\"sleep\", \"1000\"]"),
    ]);
    let out = ok(&h.run(&["apply", "--json", h.d()]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], true, "{out}");
    assert_eq!(v["outcomes"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(v["plan"]["summary"]["add"], 2, "{out}");
    let pid = h.wait_for("d", "running", |r| state(r) == "running")["pid"]
        .as_i64()
        .unwrap();
    h.wait_for("k", "running", |r| state(r) == "running");

    let top = ok(&h.run(&["top", &h.name("d")]));
    assert!(
        top.contains("PID") && top.contains(&pid.to_string()) && top.contains("sleep 1000"),
        "{top}"
    );
    let stats: Value = serde_json::from_str(&ok(&h.run(&[
        "stats",
        "--no-stream",
        "--json",
        &h.name("d"),
    ])))
    .unwrap();
    let s = &stats[0];
    assert_eq!(s["name"], h.name("d").as_str(), "{stats}");
    assert_eq!(s["memory_limit"], 64 << 20, "{stats}");
    assert_eq!(s["pids_limit"], 50, "{stats}");
    assert!(s["pids"].as_u64().unwrap() >= 2, "sh and sleep: {stats}");
    assert!(s["memory"].as_u64().unwrap() > 0, "{stats}");
    let quota = h
        .cgroup_file("d", "cpu.cfs_quota_us")
        .or_else(|| h.cgroup_file("d", "cpu.max"))
        .unwrap();
    assert!(
        quota.trim() == "50000" || quota.trim() == "50000 100000",
        "cpus = 0.5 is half of each period: {quota}"
    );

    let i = h.inspect(&[], "d");
    assert_eq!(i["pid"], pid, "{i}");
    assert!(
        i["cgroup_path"]
            .as_str()
            .is_some_and(|p| p.ends_with(&format!("berth/{}", h.leaf("d")))),
        "{i}"
    );
    assert!(i["mounts"].is_array(), "{i}");
    // exec: stdin only with -i, a terminal only with -t
    let run_with_stdin = |args: &[&str], input: &str| -> String {
        let mut c = Command::new(berth_bin())
            .env("BERTH_STATE_DIR", h.s())
            .env("BERTH_CONFIG", "/dev/null")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        ok(&c.wait_with_output().unwrap())
    };
    let n = h.name("d");
    assert_eq!(
        run_with_stdin(&["exec", "-i", &n, "--", "cat"], "hello\n"),
        "hello\n"
    );
    assert_eq!(run_with_stdin(&["exec", &n, "--", "cat"], "hello\n"), "");
    let t = h.sh("d", "test -t 1 && echo tty || echo no-tty");
    assert_eq!(t.trim(), "no-tty");
    let t = ok(&h.run(&[
        "exec",
        "-t",
        &n,
        "--",
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo tty",
    ]));
    assert_eq!(t.trim(), "tty", "{t:?}");

    // stop: the container's stop signal, then SIGKILL after stop_timeout
    ok(&h.run(&["stop", &n]));
    assert!(!pid_alive(pid));
    let logs = ok(&h.run(&["logs", &n]));
    assert!(logs.contains("got usr1"), "stopped with SIGUSR1: {logs}");
    let i = h.inspect(&[], "d");
    assert_eq!(i["exit"]["code"], 3, "{i}");
    ok(&h.run(&["stop", &h.name("k")]));
    let i = h.inspect(&[], "k");
    assert_eq!(i["exit"]["signal"], 9, "killed after stop_timeout: {i}");
}

/// This process's cgroup path in hierarchy `controller` (v1) or the unified one (v2: ""),
/// if that hierarchy is mounted.
fn own_cgroup(controller: &str) -> Option<String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    own.lines().find_map(|l| {
        let f: Vec<&str> = l.splitn(3, ':').collect();
        (f.len() == 3 && f[1].split(',').any(|c| c == controller)).then(|| f[2].to_string())
    })
}

/// Whether this host is cgroup v2 throughout (no v1 hierarchies).
fn v2_host() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

fn cgroups_go_below_berths_own_cgroup_or_the_configured_parent() {
    let h = Host::new("cgp");
    let v2 = v2_host();
    let expect = |dir: &str, parent: Option<&str>, name: &str| {
        let (mount, ctl) = if v2 {
            ("/sys/fs/cgroup".to_string(), "")
        } else {
            let c = dir
                .strip_prefix("/sys/fs/cgroup/")
                .unwrap()
                .split('/')
                .next()
                .unwrap();
            (format!("/sys/fs/cgroup/{c}"), c)
        };
        let base = match parent {
            Some(p) => p.to_string(),
            None => format!("{}/berth", own_cgroup(ctl).unwrap().trim_end_matches('/')),
        };
        let want = format!("{mount}/{}/{name}", base.trim_start_matches('/'));
        assert_eq!(dir, want.replace("//", "/"));
    };
    // by default beneath the cgroup berth runs in (per hierarchy on v1): never moved out
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    h.apply();
    h.wait_for("a", "running", |r| state(r) == "running");
    let dirs = h.cgroup_dirs(&[], "a");
    assert!(!dirs.is_empty());
    for d in &dirs {
        expect(d, None, &h.leaf("a"));
    }
    // an absolute cgroup_parent from the host config
    let parent = format!("/berthtest{}", std::process::id());
    let etc = tempfile::tempdir().unwrap();
    let cfg = etc.path().join("config.toml");
    std::fs::write(&cfg, format!("cgroup_parent = \"{parent}\"\n")).unwrap();
    let cfg = ["--config", cfg.to_str().unwrap()];
    let mut made = Vec::new();
    h.declare(&[("b", "command = [\"sleep\", \"1000\"]")]);
    let mut args = cfg.to_vec();
    args.extend(["apply", "--allow-empty", h.d()]);
    ok(&h.run(&args));
    let dirs = h.cgroup_dirs(&cfg, "b");
    for d in &dirs {
        expect(d, Some(&parent), &h.leaf("b"));
        // the container's directory (gone by then) and the parent berth made for it
        made.push(RmDirOnDrop(Path::new(d).to_path_buf()));
    }
    h.declare(&[]);
    let mut args = cfg.to_vec();
    args.extend(["apply", "--allow-empty", h.d()]);
    ok(&h.run(&args));
    assert!(cgroups_named(&h.name("b")).is_empty());
    for d in &dirs {
        assert!(!Path::new(d).exists(), "{d} left behind");
    }
}

fn cgroup_v2_on_the_unified_hierarchy() {
    // On a v2 host every other test runs on v2 already. On a v1 host (hybrid, such as CI's, or
    // v1 only), berth is run in a mount namespace of its own where /sys/fs/cgroup is the
    // unified hierarchy, so it takes its v2 paths: cgroup creation, joining, the eBPF device
    // filter, exec, plan's reading of limits, removal. (No limits: on a v1 host the memory, cpu
    // and pids controllers belong to v1 hierarchies.)
    let unified = Cgroup2::new();
    let own = unified.of("self");
    let _subtree = SubtreeControl::save(&own.join("cgroup.subtree_control"));
    let h = Host::new("v2u");
    let v2 = |args: &[&str]| -> std::process::Output {
        Command::new("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t cgroup2 none /sys/fs/cgroup && exec \"$0\" \"$@\"",
                berth_bin(),
                "--state-dir",
                h.s().to_str().unwrap(),
            ])
            .args(args)
            .env("BERTH_CONFIG", "/dev/null")
            .output()
            .unwrap()
    };
    let name = h.name("a");
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    let applied = v2(&["apply", h.d()]);
    // named after its slot, known once it exists
    let dir = own.join("berth").join(h.leaf("a"));
    let _rm = RmDirOnDrop(dir.clone());
    ok(&applied);
    let ps: Value = serde_json::from_str(&ok(&v2(&["ps", "--json"]))).unwrap();
    assert_eq!(ps[0]["state"], "running", "{ps}");
    let pid = ps[0]["pid"].as_i64().unwrap();
    assert_eq!(unified.of(&pid.to_string()), dir, "its v2 cgroup");
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    assert_eq!(
        procs.trim(),
        pid.to_string(),
        "the container is in its v2 cgroup"
    );
    let i: Value = serde_json::from_str(&ok(&v2(&["inspect", &name]))).unwrap();
    assert_eq!(i["state"]["cgroup"]["v2"], true, "{i}");
    // exec joins the cgroup; the device filter is the eBPF program
    let out = ok(&v2(&[
        "exec",
        &name,
        "--",
        "sh",
        "-c",
        "cat /proc/self/cgroup; mknod /dev/loopx b 7 0 && (exec 3</dev/loopx) 2>&1 || true",
    ]));
    assert!(
        out.lines().any(|l| l == "0::/"),
        "in its v2 cgroup, the root of its cgroup namespace: {out}"
    );
    assert!(
        out.lines()
            .last()
            .is_some_and(|l| l.contains("Operation not permitted")),
        "a block device must not be usable: {out}"
    );
    assert_eq!(
        v2(&["plan", "--detailed-exitcode", h.d()]).status.code(),
        Some(0)
    );
    h.declare(&[]);
    ok(&v2(&["apply", "--allow-empty", h.d()]));
    assert!(!pid_alive(pid));
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// A cgroup.subtree_control file as it was, restored on drop: berth enables the unified
/// root's controllers for its subtree, as it must on a v2 host.
struct SubtreeControl {
    path: std::path::PathBuf,
    before: String,
}

impl SubtreeControl {
    fn save(path: &Path) -> SubtreeControl {
        SubtreeControl {
            path: path.to_path_buf(),
            before: std::fs::read_to_string(path).unwrap(),
        }
    }
}

impl Drop for SubtreeControl {
    fn drop(&mut self) {
        let now = std::fs::read_to_string(&self.path).unwrap_or_default();
        for c in now.split_whitespace() {
            if !self.before.split_whitespace().any(|o| o == c) {
                let _ = std::fs::write(&self.path, format!("-{c}"));
            }
        }
    }
}

/// An image of 200 layers (more than the overlay mount options held as absolute paths: 45
/// failed before) runs, every layer visible, the bottom one overridden by the top one.
fn an_image_of_many_layers_runs() {
    let extra: Vec<Vec<u8>> = (0..200)
        .map(|i| {
            LayerBuilder::new()
                .dir("layers", 0o755)
                .file(&format!("layers/{i}"), b"x", 0o644)
                .file("top", format!("{i}\n").as_bytes(), 0o644)
                .build()
        })
        .collect();
    let h = Host::with_layers("lay", extra);
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    h.apply();
    h.wait_for("a", "running", |r| state(r) == "running");
    assert_eq!(h.sh("a", "ls /layers | wc -l; cat /top"), "200\n199\n");
    // an image the runtime cannot mount is refused when it is imported
    let layout = tempfile::tempdir().unwrap();
    let too_many: Vec<Vec<u8>> = (0..501)
        .map(|i| {
            LayerBuilder::new()
                .file(&format!("f{i}"), b"x", 0o644)
                .build()
        })
        .collect();
    write_layout(layout.path(), "t", &too_many, &["/bin/sh"]);
    let out = h.run(&[
        "image",
        "import",
        "--tag",
        "example.com/e2e/many:1",
        layout.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the image has 501 layers; berth runs images of at most 500"),
        "{err}"
    );
}

/// Health checks run by the supervisor through the exec mechanism (the container's user and
/// namespaces): healthy when the check passes; unhealthy after `retries` failures, then
/// stopped and started again whatever the restart policy (`on_unhealthy = "restart"`, the
/// default), or only reported (`"none"`: shown by plan, left running).
fn health_checks_run_as_the_container_and_restart_it_when_unhealthy() {
    let h = Host::new("hlt");
    let check = |cmd: &str, extra: &str| {
        format!(
            "health = {{ cmd = {cmd}, interval = \"200ms\", timeout = \"5s\", retries = 2{extra} }}\nbackoff = {{ initial = \"200ms\" }}"
        )
    };
    let a = format!(
        "command = [\"sh\", \"-c\", \"touch /tmp/ok; exec sleep 1000\"]\nuser = \"1000:1000\"\n{}",
        check(r#"["sh", "-c", "id -u; test -f /tmp/ok"]"#, "")
    );
    let b = format!(
        "command = [\"sleep\", \"1000\"]\n{}",
        check(r#"["false"]"#, ", on_unhealthy = \"none\"")
    );
    h.declare(&[("a", &a), ("b", &b)]);
    h.apply();
    let r = h.wait_for("a", "healthy", |r| state(r) == "running (healthy)");
    let probe = &r["health"]["log"][0];
    assert_eq!(probe["exit_code"], 0, "{r}");
    assert_eq!(
        probe["output"], "1000\n",
        "the check runs as the container's user: {r}"
    );
    let pid = r["pid"].as_i64().unwrap();
    // failing now: unhealthy, stopped, started again (restart = "no" notwithstanding)
    h.sh("a", "rm /tmp/ok");
    let r = h.wait_for("a", "restarted for being unhealthy", |r| {
        r["restarts"].as_u64().is_some_and(|n| n >= 1) && state(r) == "running (healthy)"
    });
    assert_ne!(r["pid"].as_i64().unwrap(), pid, "{r}");
    // b: unhealthy, reported, left running
    let r = h.wait_for("b", "unhealthy", |r| state(r) == "running (unhealthy)");
    assert!(r["health"]["failing_streak"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(r["restarts"], 0, "{r}");
    let o = h.run(&["plan", h.d()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("container.{}", h.name("b"))) && out.contains("unhealthy ("),
        "{out}"
    );
    // a check past its timeout is killed with all it started; its output is read through
    // a pipe, cut, and never written to the host's disk
    let c = "command = [\"sleep\", \"1000\"]\nhealth = { cmd = [\"sh\", \"-c\", \"yes 0123456789 | head -c 50000000; trap '' TERM; sleep 1000\"], interval = \"300ms\", timeout = \"200ms\", retries = 100, on_unhealthy = \"none\" }";
    h.declare(&[("a", &a), ("b", &b), ("c", c)]);
    h.apply();
    let r = h.wait_for("c", "five checks timed out", |r| {
        r["health"]["failing_streak"]
            .as_u64()
            .is_some_and(|n| n >= 5)
    });
    let out = r["health"]["log"][0]["output"].as_str().unwrap();
    assert!(
        out.starts_with("timed out after 200 ms: 0123456789"),
        "{out}"
    );
    assert!(out.len() < 4200, "output cut: {}", out.len());
    // the container's own `sleep 1000`, and at most the check in flight
    let left = h.sh("c", "ps -o args | grep -c '^sleep 1000' || true");
    let n: u32 = left.trim().parse().unwrap();
    assert!(
        (1..=2).contains(&n),
        "the checks' processes outlived them: {n}"
    );
    assert!(
        !h.s()
            .join("containers")
            .join(h.name("c"))
            .join("health.out")
            .exists()
    );
}

/// `depends_on` conditions hold when apply starts a container: it waits (saying so) for a
/// dependency to be healthy or completed; a dependency that cannot meet its condition fails
/// its dependents with the reason, and everything else converges.
fn dependents_wait_for_their_conditions_and_a_failure_skips_only_them() {
    let h = Host::new("dep");
    let db = "command = [\"sh\", \"-c\", \"sleep 1; touch /tmp/ready; exec sleep 1000\"]\nhealth = { cmd = [\"test\", \"-f\", \"/tmp/ready\"], interval = \"200ms\" }";
    let web = format!(
        "command = [\"sleep\", \"1000\"]\ndepends_on = {{ {} = \"healthy\", {} = \"completed\" }}",
        h.name("db"),
        h.name("migrate")
    );
    let bad = format!(
        "command = [\"sleep\", \"1000\"]\ndepends_on = {{ {} = \"completed\" }}",
        h.name("broken")
    );
    let after_bad = format!(
        "command = [\"sleep\", \"1000\"]\ndepends_on = {{ {} = \"started\" }}",
        h.name("bad")
    );
    h.declare(&[
        ("db", db),
        ("migrate", "command = [\"sh\", \"-c\", \"sleep 0.5\"]"),
        ("web", &web),
        ("broken", "command = [\"sh\", \"-c\", \"exit 3\"]"),
        ("bad", &bad),
        ("afterbad", &after_bad),
        ("lone", "command = [\"sleep\", \"1000\"]"),
    ]);
    let o = h.run(&["apply", h.d()]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains(&format!("waiting for {} to be healthy", h.name("db"))),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "depends_on: {} cannot become completed: it exited with code 3",
            h.name("broken")
        )),
        "{err}"
    );
    assert!(
        format!("{out}{err}").contains(&format!("skipped: container.{} failed", h.name("bad"))),
        "{out}{err}"
    );
    // the dependent started only once its conditions held
    let web = h.ps("web");
    assert_eq!(state(&web), "running", "{web}");
    let db = h.ps("db");
    assert_eq!(state(&db), "running (healthy)", "{db}");
    let migrate = h.ps("migrate");
    assert!(
        migrate["status"].as_str().unwrap().contains("code 0"),
        "{migrate}"
    );
    assert_eq!(state(&h.ps("lone")), "running");
    assert_eq!(h.ps("afterbad"), Value::Null, "never created");
}

/// `image prune` after the container's tag was moved to another image (a re-pull, a
/// re-import) keeps the layers the running container stands on: it can still exec and be
/// restarted.
fn prune_keeps_what_a_container_stands_on_after_its_tag_moved() {
    let h = Host::new("prn");
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    h.apply();
    h.wait_for("a", "running", |r| state(r) == "running");
    let layout = tempfile::tempdir().unwrap();
    write_layout(
        layout.path(),
        "t",
        &[LayerBuilder::new().file("other", b"x", 0o644).build()],
        &["/other"],
    );
    ok(&h.run(&[
        "image",
        "import",
        "--tag",
        IMAGE,
        layout.path().to_str().unwrap(),
    ]));
    ok(&h.run(&["image", "prune"]));
    assert_eq!(h.sh("a", "ls /bin/sleep"), "/bin/sleep\n");
    ok(&h.run(&["restart", &h.name("a")]));
    h.wait_for("a", "running again", |r| state(r) == "running");
    assert_eq!(h.sh("a", "echo still"), "still\n");
}

/// A relative --state-dir: containers start (the runtime names layers and mounts from the
/// container's directory; a relative state directory once broke every start).
fn a_relative_state_directory_works() {
    let h = Host::new("rel");
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    let rel = h.s().file_name().unwrap().to_str().unwrap().to_string();
    let out = Command::new(berth_bin())
        .current_dir(h.s().parent().unwrap())
        .args(["--state-dir", &rel, "apply", h.d()])
        .env("BERTH_CONFIG", "/dev/null")
        .output()
        .unwrap();
    ok(&out);
    h.wait_for("a", "running", |r| state(r) == "running");
}

/// berth killed with SIGKILL at each fault point of an apply (`BERTH_FAULT`, see
/// `berth::fault`) converges on the next apply: the same containers, the volume's data kept;
/// and killed at each point of the teardown, the next teardown leaves nothing: no container
/// directory, record, cgroup, veth, bridge, nft table, address lease or mount. (The image is
/// imported, so `after-pull` is not met here; the pull's own crash safety is the store's
/// leases and ingest cleanup.)
fn killed_at_every_step_an_apply_converges_with_nothing_leaked() {
    for point in berth::fault::POINTS {
        let h = Host::new("crs");
        let port = free_port();
        let manifests = format!(
            "[network.n]\n[volume.v]\n[container.{db}]\nimage = \"bb\"\ncommand = [\"sh\", \"-c\", \"echo kept >> /data/log; exec sleep 1000\"]\nvolumes = [\"v:/data\"]\nnetworks = [\"n\"]\nstop_timeout = \"1s\"\n[container.{web}]\nimage = \"bb\"\ncommand = [\"sleep\", \"1000\"]\nnetworks = [\"n\"]\nports = [\"127.0.0.1:{port}:80\"]\ndepends_on = {{ {db} = \"started\" }}\nstop_timeout = \"1s\"\n",
            db = h.name("db"),
            web = h.name("web"),
        );
        h.declare(&[]);
        let c = h.dir.path().join("c.toml");
        let image = std::fs::read_to_string(&c).unwrap();
        std::fs::write(&c, format!("{image}\n{manifests}")).unwrap();
        let faulty = |args: &[&str]| {
            Command::new(berth_bin())
                .arg("--state-dir")
                .arg(h.s())
                .args(args)
                .env("BERTH_CONFIG", "/dev/null")
                .env("BERTH_FAULT", point)
                .output()
                .unwrap()
        };
        // killed while creating
        let o = faulty(&["apply", h.d()]);
        assert!(
            o.status.success() || o.status.signal() == Some(9),
            "{point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        h.apply();
        let db = h.wait_for("db", "running", |r| state(r) == "running");
        assert_eq!(state(&h.ps("web")), "running", "{point}");
        assert_eq!(h.plan().0, Some(0), "{point}: converged");
        // exactly one lease per container, one /etc/hosts line per peer
        let ipam: Value =
            serde_json::from_slice(&std::fs::read(h.s().join("net/n.json")).unwrap()).unwrap();
        assert_eq!(
            ipam["leases"].as_object().unwrap().len(),
            2,
            "{point}: {ipam}"
        );
        let hosts = h.sh("web", "cat /etc/hosts");
        assert_eq!(hosts.matches(&h.name("db")).count(), 1, "{point}: {hosts}");
        let data = h.sh("db", "cat /data/log");
        assert!(data.starts_with("kept\n"), "{point}: {data}");
        let _ = db;
        // killed while tearing down, then torn down
        h.declare(&[]);
        std::fs::write(&c, "").unwrap();
        let o = faulty(&["apply", "--allow-empty", h.d()]);
        assert!(
            o.status.success() || o.status.signal() == Some(9),
            "{point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        ok(&h.run(&["apply", "--allow-empty", h.d()]));
        let o = h.run(&["plan", "--allow-empty", "--detailed-exitcode", h.d()]);
        assert_eq!(o.status.code(), Some(0), "{point}: {o:?}");
        let no_leaks = |when: &str| {
            let root = h.s();
            assert!(container_dirs(root).is_empty(), "{point} {when}");
            assert!(
                paths_in(&root.join("records/containers")).is_empty(),
                "{point} {when}"
            );
            for n in ["db", "web"] {
                assert!(
                    cgroups_named(&h.name(n)).is_empty(),
                    "{point} {when}: cgroup of {n}"
                );
                let veth = berth::net::veth_name(root, &h.name(n), 0);
                assert!(
                    !Path::new("/sys/class/net").join(&veth).exists(),
                    "{point} {when}: {veth} left"
                );
            }
            let bridge = berth::net::bridge_name(root, "n");
            assert!(
                !Path::new("/sys/class/net").join(&bridge).exists(),
                "{point} {when}: {bridge}"
            );
            assert!(
                !berth::net::nat::present(&bridge),
                "{point} {when}: nft table {bridge}"
            );
            assert!(
                !root.join("net/n.json").exists(),
                "{point} {when}: the network's leases"
            );
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            assert!(
                !mounts.contains(root.to_str().unwrap()),
                "{point} {when}: a mount under the state directory is left"
            );
        };
        no_leaks("after the teardown");
        // killed while creating, then no longer declared: nothing of it stays (an address
        // leased before the kill included)
        std::fs::write(&c, format!("{image}\n{manifests}")).unwrap();
        let o = faulty(&["apply", h.d()]);
        assert!(
            o.status.success() || o.status.signal() == Some(9),
            "{point}"
        );
        // the containers undeclared, their network kept: no address stays leased
        std::fs::write(&c, format!("{image}\n[network.n]\n[volume.v]\n")).unwrap();
        ok(&h.run(&["apply", h.d()]));
        let ipam: Value =
            serde_json::from_slice(&std::fs::read(h.s().join("net/n.json")).unwrap()).unwrap();
        assert!(
            ipam["leases"].as_object().unwrap().is_empty(),
            "{point}: leases left: {ipam}"
        );
        std::fs::write(&c, "").unwrap();
        ok(&h.run(&["apply", "--allow-empty", h.d()]));
        no_leaks("after a create killed, then undeclared");
        let root = h.s();
        // volumes survive their manifest's removal
        let vol = root.join("volumes/v/_data/log");
        assert!(
            std::fs::read_to_string(&vol).unwrap().starts_with("kept\n"),
            "{point}"
        );
    }
}

/// `depends_on = { db = { condition = "started", restart = true } }`: when db is replaced,
/// the dependent is restarted after it; a dependent that does not ask is left running.
fn dependents_that_ask_are_restarted_after_their_dependency() {
    let h = Host::new("rsw");
    let db = h.name("db");
    let declare = |db_cmd: &str| {
        let asks = format!(
            "command = [\"sleep\", \"1000\"]\ndepends_on = {{ {db} = {{ condition = \"started\", restart = true }} }}"
        );
        let quiet =
            format!("command = [\"sleep\", \"1000\"]\ndepends_on = {{ {db} = \"started\" }}");
        h.declare(&[("db", db_cmd), ("asks", &asks), ("quiet", &quiet)]);
    };
    declare("command = [\"sleep\", \"1000\"]");
    h.apply();
    let pid = |n: &str| {
        h.wait_for(n, "running", |r| state(r) == "running")["pid"]
            .as_i64()
            .unwrap()
    };
    let (asks, quiet) = (pid("asks"), pid("quiet"));
    declare("command = [\"sleep\", \"2000\"]");
    let (code, out) = h.plan();
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("is started again (depends_on restart = true)"),
        "{out}"
    );
    h.apply();
    assert_ne!(pid("asks"), asks, "restarted after its dependency");
    assert_eq!(pid("quiet"), quiet, "left running");
    assert_eq!(h.plan().0, Some(0));

    // restarted by its own supervisor (it was killed): the next plan restarts `asks` too.
    // The backoff (at least 1 s) puts db's new start in a later second than asks' start.
    declare(
        "command = [\"sleep\", \"2000\"]\nrestart = \"always\"\nbackoff = { initial = \"1s\", max = \"2s\", reset_after = \"10m\" }",
    );
    h.apply();
    let (asks, quiet, old_db) = (pid("asks"), pid("quiet"), pid("db"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_db as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    h.wait_for("db", "restarted by its supervisor", |r| {
        state(r) == "running" && r["pid"].as_i64() != Some(old_db)
    });
    let (code, out) = h.plan();
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("was started again after it"), "{out}");
    h.apply();
    assert_ne!(
        pid("asks"),
        asks,
        "restarted after its dependency's supervisor restarted it"
    );
    assert_eq!(pid("quiet"), quiet, "left running");
    assert_eq!(h.plan().0, Some(0));
}

/// The plan runs as a graph: `c` (after `b`, after `a`) starts while `slow`, which is at `b`'s
/// depth, still waits for `gate` to become healthy. Run in waves, `c` would wait for `slow`,
/// and `slow` waits until the test sees `c` running: the test would fail, not hang (apply
/// gives up after its wait timeout, the test's wait after 60 s).
fn a_step_starts_when_what_it_needs_is_done_not_a_wave_later() {
    let h = Host::new("dag");
    let go = tempfile::tempdir().unwrap();
    let gate = format!(
        "command = [\"sleep\", \"1000\"]\nvolumes = [\"{}:/gate:ro\"]\nhealth = {{ cmd = [\"test\", \"-f\", \"/gate/go\"], interval = \"200ms\" }}",
        go.path().display()
    );
    let after = |d: &str, cond: &str| {
        format!(
            "command = [\"sleep\", \"1000\"]\ndepends_on = {{ {} = \"{cond}\" }}",
            h.name(d)
        )
    };
    h.declare(&[
        ("gate", &gate),
        ("slow", &after("gate", "healthy")),
        ("a", "command = [\"sleep\", \"1000\"]"),
        ("b", &after("a", "started")),
        ("c", &after("b", "started")),
    ]);
    let mut apply = Command::new(berth_bin())
        .arg("--state-dir")
        .arg(h.s())
        .args(["apply", "--wait-timeout", "90s", h.d()])
        .env("BERTH_CONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let c = h.wait_for("c", "running while slow waits", |r| state(r) == "running");
    assert_eq!(h.ps("slow"), Value::Null, "slow is not created yet: {c}");
    std::fs::write(go.path().join("go"), b"").unwrap();
    let mut out = String::new();
    apply
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    apply
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = apply.wait().unwrap();
    assert!(status.success(), "{out}{err}");
    assert!(
        err.contains(&format!("waiting for {} to be healthy", h.name("gate"))),
        "{err}"
    );
    // the report follows completion: c done before slow
    let pos = |n: &str| out.find(&format!("container.{}: done", h.name(n))).unwrap();
    assert!(pos("c") < pos("slow"), "{out}");
    assert_eq!(state(&h.ps("slow")), "running");
}

/// A container holding /run/berth/update.lock defers its replacement (the step fails as
/// deferred, the container keeps running) until the lock goes or `lock_deadline` passes;
/// plan says so; a removal is not deferred.
fn an_update_lock_defers_a_replacement_until_it_goes_or_the_deadline() {
    let h = Host::new("ulk");
    let body = |v: &str, deadline: &str| {
        format!(
            "command = [\"sleep\", \"1000\"]\nenv = {{ V = \"{v}\" }}\nupdate = {{ lock_deadline = \"{deadline}\" }}"
        )
    };
    h.declare(&[("a", &body("1", "1h"))]);
    h.apply();
    let pid = |h: &Host| {
        h.wait_for("a", "running", |r| state(r) == "running")["pid"]
            .as_i64()
            .unwrap()
    };
    let first = pid(&h);
    h.sh("a", "touch /run/berth/update.lock");
    // a replacement waits while the lock is held
    h.declare(&[("a", &body("2", "1h"))]);
    let (code, out) = h.plan();
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("update lock"), "{out}");
    let o = h.run(&["apply", h.d()]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(
        all.contains("deferred: the container holds its update lock"),
        "{all}"
    );
    assert_eq!(pid(&h), first, "not replaced while the lock is held");
    // the lock goes: replaced at the next apply
    h.sh("a", "rm /run/berth/update.lock");
    h.apply();
    let second = pid(&h);
    assert_ne!(second, first);
    // held again, with a deadline of 1 s: deferred once, replaced once it has passed
    h.sh("a", "touch /run/berth/update.lock");
    h.declare(&[("a", &body("3", "1s"))]);
    assert_eq!(
        h.run(&["apply", h.d()]).status.code(),
        Some(1),
        "deferred first"
    );
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let o = h.run(&["apply", h.d()]);
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < end,
            "never replaced after the deadline: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let third = pid(&h);
    assert_ne!(third, second);
    // a removal is not deferred
    h.sh("a", "touch /run/berth/update.lock");
    h.declare(&[]);
    ok(&h.run(&["apply", "--allow-empty", h.d()]));
    assert_eq!(h.ps("a"), Value::Null);
}

/// A replacement whose new container crashes, or turns unhealthy, is undone: the previous
/// container (its spec and image, the same volume) runs again, `apply` fails saying why,
/// the same spec is not tried again until the manifests change or `apply --retry`;
/// `rollback = false` keeps the new one.
fn a_replacement_that_does_not_prove_itself_is_rolled_back() {
    let h = Host::new("rbk");
    let vol = h.name("v");
    let name = h.name("a");
    let write = |body: &str| {
        // a short wait unless the body sets its own
        let rollout = if body.contains("rollout") {
            ""
        } else {
            "rollout = { min_ready = \"1s\", timeout = \"10s\" }\n"
        };
        std::fs::write(
            h.dir.path().join("c.toml"),
            format!(
                "[image.bb]\nref = \"{IMAGE}\"\npull = \"never\"\n\n[volume.{vol}]\n\n[container.{name}]\nimage = \"bb\"\nnetworks = [\"none\"]\nstop_timeout = \"1s\"\nvolumes = [\"{vol}:/data\"]\n{rollout}{body}\n"
            ),
        )
        .unwrap()
    };
    let apply = |extra: &[&str]| {
        let mut args = vec!["apply"];
        args.extend_from_slice(extra);
        args.push(h.d());
        let o = h.run(&args);
        (
            o.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    write("command = [\"sleep\", \"1000\"]");
    assert_eq!(apply(&[]).0, Some(0));
    h.wait_for("a", "running", |r| state(r) == "running");
    h.sh("a", "echo kept > /data/keep");

    // crashes at start: rolled back, the volume's data intact
    write("command = [\"sh\", \"-c\", \"exit 3\"]");
    let (code, out) = apply(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("rolled back: the new container exited 3"),
        "{out}"
    );
    let r = h.wait_for("a", "running again", |r| r["detail"]["state"] == "running");
    assert_eq!(state(&r), "running (rolled back)", "{r}");
    assert_eq!(h.sh("a", "cat /data/keep").trim(), "kept");
    assert!(h.sh("a", "cat /proc/1/cmdline").contains("sleep"));
    // not tried again: plan and apply leave it, saying why
    let (code, out) = h.plan();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("rolled back at"), "{out}");
    assert_eq!(apply(&[]).0, Some(0));
    // --retry tries again (and rolls back again)
    let (code, out) = apply(&["--retry", &name]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("rolled back"), "{out}");

    // unhealthy: rolled back with the check's output
    // (an env change: a replacement; health alone changes in place)
    write(
        "command = [\"sleep\", \"1000\"]\nenv = { V = \"2\" }\nhealth = { cmd = [\"sh\", \"-c\", \"echo not ready; exit 1\"], interval = \"200ms\", retries = 1 }",
    );
    let (code, out) = apply(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("rolled back: unhealthy: exit 1, not ready"),
        "{out}"
    );

    // a good change goes through and clears the mark
    write("command = [\"sleep\", \"2000\"]");
    let (code, out) = apply(&[]);
    assert_eq!(code, Some(0), "{out}");
    let r = h.wait_for("a", "running", |r| state(r) == "running");
    assert!(r["rolled_back"].is_null(), "{r}");
    assert_eq!(h.sh("a", "cat /data/keep").trim(), "kept");

    // an apply killed while the new container has to prove itself: the next apply finishes
    // the rollout (here: rolls back, the new one exits 3 after 2 s)
    let old_pid = h.wait_for("a", "running", |r| state(r) == "running")["pid"]
        .as_i64()
        .unwrap();
    write("command = [\"sh\", \"-c\", \"sleep 2; exit 3\"]\nrollout = { min_ready = \"30s\" }");
    let mut killed = Command::new(berth_bin())
        .arg("--state-dir")
        .arg(h.s())
        .args(["apply", h.d()])
        .env("BERTH_CONFIG", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    h.wait_for("a", "replaced", |r| {
        r["detail"]["state"] == "running" && r["pid"].as_i64() != Some(old_pid)
    });
    killed.kill().unwrap();
    let _ = killed.wait();
    let (code, out) = apply(&[]);
    assert!(
        out.contains("rolled back: the new container exited 3"),
        "{code:?} {out}"
    );
    let r = h.wait_for("a", "the previous one again", |r| {
        r["detail"]["state"] == "running"
    });
    assert_eq!(state(&r), "running (rolled back)", "{r}");
    assert!(h.sh("a", "cat /proc/1/cmdline").contains("2000"));

    // rollback = false keeps what it was asked to run
    write("command = [\"sh\", \"-c\", \"exit 3\"]\nrollback = false");
    let (code, out) = apply(&[]);
    assert_eq!(code, Some(0), "{out}");
    h.wait_for("a", "exited", |r| r["detail"]["state"] == "exited");
}
