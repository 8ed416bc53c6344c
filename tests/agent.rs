//! `berth agent` end to end, as root: it converges, follows changes (a burst is one pass),
//! keeps the last valid state while the directory is invalid, repairs drift at resync,
//! backs a failing resource off on its own, serves `berth status` and metrics, refuses a
//! second agent and `apply`, stops on SIGTERM leaving containers running, adopts them on
//! start, survives a replaced binary, and after a "reboot" (every supervisor and container
//! killed) starts containers in depends_on order. Each test has its own state directory,
//! names and manifests; the agent is killed and everything removed on drop.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "localhost/agent-busybox:1";

/// A state directory with busybox imported, a manifest directory, and at most one agent.
struct Host {
    // first: the agent goes before the teardown's apply (which it would refuse)
    agent: Option<Child>,
    _teardown: Teardown,
    state: tempfile::TempDir,
    dir: tempfile::TempDir,
    tag: &'static str,
    log: PathBuf,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_agent();
    }
}

impl Host {
    fn new(tag: &'static str) -> Host {
        let state = state_with_image(IMAGE, vec![]);
        let log = state.path().join("agent.log");
        Host {
            agent: None,
            _teardown: Teardown::new(state.path()),
            state,
            dir: tempfile::tempdir().unwrap(),
            tag,
            log,
        }
    }

    fn s(&self) -> &Path {
        self.state.path()
    }

    fn name(&self, n: &str) -> String {
        format!("{}{n}{}", self.tag, std::process::id())
    }

    /// The manifests: the image plus `containers` (TOML bodies by name), in `file`.
    fn declare_in(&self, file: &str, containers: &[(&str, &str)]) {
        let mut t = format!("[image.bb]\nref = \"{IMAGE}\"\npull = \"never\"\n");
        for (n, body) in containers {
            t.push_str(&format!(
                "\n[container.{}]\nimage = \"bb\"\nnetworks = [\"none\"]\nstop_timeout = \"1s\"\n{body}\n",
                self.name(n)
            ));
        }
        // written whole, then renamed: the agent never reads half a file
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, t).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(file)).unwrap();
    }

    fn declare(&self, containers: &[(&str, &str)]) {
        self.declare_in("c.toml", containers)
    }

    /// Start `berth agent` (from `exe`) on the manifest directory; its log goes to
    /// `self.log` (appended).
    fn start_agent_with(&mut self, exe: &Path, extra: &[&str]) {
        assert!(self.agent.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(exe)
            .arg("--state-dir")
            .arg(self.s())
            .args([
                "-v",
                "agent",
                "--debounce",
                "300ms",
                "--retry-initial",
                "200ms",
            ])
            .args(extra)
            .arg(self.dir.path())
            .env("BERTH_CONFIG", "/dev/null")
            .env("DOCKER_CONFIG", self.s().join("no-docker-config"))
            .env_remove("BERTH_EXE")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
        self.wait_status("the agent answering", |s| s["agent"]["pid"].is_number());
    }

    fn start_agent(&mut self, extra: &[&str]) {
        self.start_agent_with(Path::new(berth_bin()), extra)
    }

    fn agent_pid(&self) -> i32 {
        self.agent.as_ref().unwrap().id() as i32
    }

    fn signal_agent(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.agent_pid()), sig).unwrap();
    }

    /// SIGTERM, then wait for the exit (at most 60 s): its status.
    fn stop_agent(&mut self) -> std::process::ExitStatus {
        self.signal_agent(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.agent.take().unwrap();
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > end {
                let _ = child.kill();
                panic!(
                    "the agent did not exit on SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        berth(self.s(), args)
    }

    fn status(&self) -> Value {
        serde_json::from_str(&ok(&self.run(&["status", "--json"]))).unwrap()
    }

    /// Poll `berth status --json` until `f` holds (at most 90 s: a bound, not a timing
    /// assertion).
    fn wait_status(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "never {what}; last status: {s:#}\nagent log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `ps` row of container `n` in a status (Null if absent).
    fn row(&self, s: &Value, n: &str) -> Value {
        let name = self.name(n);
        s["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name.as_str())
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn running_pid(&self, s: &Value, n: &str) -> Option<i64> {
        let r = self.row(s, n);
        (r["detail"]["state"] == "running")
            .then(|| r["pid"].as_i64())
            .flatten()
    }

    /// Wait until container `n` runs: its pid.
    fn wait_running(&self, n: &str) -> i64 {
        let s = self.wait_status(&format!("{n} running"), |s| {
            self.running_pid(s, n).is_some()
        });
        self.running_pid(&s, n).unwrap()
    }

    fn reconciles(s: &Value) -> u64 {
        s["agent"]["last_reconcile"]["at"].as_u64().unwrap_or(0)
    }
}

fn kill(pid: i64, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

fn alive(pid: i64) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Everything a careful user does in the first hour with an agent.
#[test]
fn agent_converges_follows_changes_and_keeps_the_last_valid_state() {
    let mut h = Host::new("ag");
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    h.start_agent(&["--resync", "2s", "--metrics-addr", &addr]);
    let a = h.wait_running("a");
    let s = h.wait_status("converged", |s| {
        s["agent"]["resources"][format!("container.{}", h.name("a"))]["state"] == "converged"
            && s["agent"]["last_reconcile"]["ok"] == true
    });
    assert_eq!(s["agent"]["pid"], h.agent_pid());

    // one agent per state directory; apply is refused while it runs
    let second = h.run(&["agent", h.dir.path().to_str().unwrap()]);
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&format!("another berth agent (pid {})", h.agent_pid())),
        "{err}"
    );
    let apply = h.run(&["apply", h.dir.path().to_str().unwrap()]);
    assert_eq!(apply.status.code(), Some(1));
    let err = String::from_utf8_lossy(&apply.stderr);
    assert!(
        err.contains(&format!("a berth agent (pid {})", h.agent_pid())),
        "{err}"
    );

    // text status
    let text = ok(&h.run(&["status"]));
    assert!(
        text.contains(&format!("berth agent: pid {}", h.agent_pid())),
        "{text}"
    );
    assert!(text.contains("resources: "), "{text}");

    // metrics
    let m = http_get(&addr, "/metrics");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(m.contains("berth_reconciles_total{result=\"ok\"}"), "{m}");
    assert!(
        m.contains(&format!(
            "berth_container_running{{container=\"{}\"}} 1",
            h.name("a")
        )),
        "{m}"
    );
    assert!(m.contains("berth_last_success_timestamp_seconds"), "{m}");
    assert!(http_get(&addr, "/other").starts_with("HTTP/1.1 404"));

    // a syntax error changes nothing: reported with file:line:col, the last valid state kept
    std::fs::write(
        h.dir.path().join("broken.toml"),
        "[container.x\nimage = 1\n",
    )
    .unwrap();
    let s = h.wait_status("reporting the syntax error", |s| {
        s["agent"]["validation_errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    });
    let errs = s["agent"]["validation_errors"].to_string();
    assert!(errs.contains("broken.toml:1:"), "{errs}");
    // a resync later, still the same container
    let before = Host::reconciles(&s);
    let s = h.wait_status("a resync", |s| Host::reconciles(s) > before);
    assert_eq!(h.running_pid(&s, "a"), Some(a), "kept while invalid");
    assert!(ok(&h.run(&["status"])).contains("INVALID"));
    let m = http_get(&addr, "/metrics");
    assert!(m.contains("berth_validation_errors 1"), "{m}");

    // fixed, and a second container declared: converged
    std::fs::remove_file(h.dir.path().join("broken.toml")).unwrap();
    h.declare(&[
        ("a", "command = [\"sleep\", \"1000\"]"),
        ("b", "command = [\"sleep\", \"1000\"]"),
    ]);
    h.wait_running("b");
    let s = h.wait_status("valid again", |s| {
        s["agent"]["validation_errors"]
            .as_array()
            .is_some_and(|e| e.is_empty())
    });
    assert_eq!(h.running_pid(&s, "a"), Some(a));

    // edited: replaced; its file deleted: removed
    let b = h.running_pid(&s, "b").unwrap();
    h.declare(&[
        ("a", "command = [\"sleep\", \"1000\"]"),
        ("b", "command = [\"sleep\", \"1001\"]"),
    ]);
    let s = h.wait_status("b replaced", |s| {
        h.running_pid(s, "b").is_some_and(|p| p != b)
    });
    assert_eq!(h.running_pid(&s, "a"), Some(a));
    h.declare_in("b.toml", &[("b", "command = [\"sleep\", \"1001\"]")]);
    h.declare(&[("a", "command = [\"sleep\", \"1000\"]")]);
    std::fs::remove_file(h.dir.path().join("b.toml")).unwrap();
    let s = h.wait_status("b removed", |s| h.row(s, "b").is_null());
    assert_eq!(h.running_pid(&s, "a"), Some(a));
    h.declare(&[
        ("a", "command = [\"sleep\", \"1000\"]"),
        ("b", "command = [\"sleep\", \"1000\"]"),
    ]);
    h.wait_running("b");

    // SIGHUP: the configuration is read again and the directory rescanned
    h.signal_agent(nix::sys::signal::Signal::SIGHUP);
    h.wait_status("a pass after SIGHUP", |s| {
        s["agent"]["last_reconcile"]["trigger"] == "reload"
    });
    assert!(h.log_text().contains("configuration reloaded"));

    // a burst of twenty files is reconciled in one pass or two, not twenty
    let log_before = h.log_text().matches("reconciled").count();
    for i in 0..20 {
        std::fs::write(
            h.dir.path().join(format!("v{i}.toml")),
            format!("[volume.{}]\n", h.name(&format!("v{i}"))),
        )
        .unwrap();
    }
    h.wait_status("twenty volumes", |s| {
        (0..20).all(|i| {
            s["agent"]["resources"][format!("volume.{}", h.name(&format!("v{i}")))]["state"]
                == "converged"
        })
    });
    let passes = h.log_text().matches("reconciled").count() - log_before;
    assert!((1..=3).contains(&passes), "{passes} passes for one burst");

    // drift (a's supervisor and process killed) is repaired at a resync
    kill(
        shim_pid(h.s(), &h.name("a")),
        nix::sys::signal::Signal::SIGKILL,
    );
    kill(a, nix::sys::signal::Signal::SIGKILL);
    let s = h.wait_status("a repaired", |s| {
        h.running_pid(s, "a").is_some_and(|p| p != a)
    });
    let a = h.running_pid(&s, "a").unwrap();
    let b = h.running_pid(&s, "b").unwrap();

    // SIGTERM: the agent exits, the containers keep running
    let st = h.stop_agent();
    assert!(st.success(), "{st:?}\n{}", h.log_text());
    assert!(alive(a) && alive(b));
    let text = ok(&h.run(&["status"]));
    assert!(text.contains("no berth agent runs"), "{text}");
    let s = h.status();
    assert_eq!(s["agent"], Value::Null);

    // a new agent adopts them: same processes, no step
    h.start_agent(&["--resync", "1h"]);
    let s = h.wait_status("a first pass", |s| s["agent"]["last_reconcile"].is_object());
    assert_eq!(s["agent"]["last_reconcile"]["steps"], 0, "{s:#}");
    assert_eq!(h.running_pid(&s, "a"), Some(a));
    assert_eq!(h.running_pid(&s, "b"), Some(b));

    // an emptied directory is refused by the deletion guard: nothing removed
    for e in std::fs::read_dir(h.dir.path()).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let s = h.wait_status("refusing the empty directory", |s| {
        s["agent"]["validation_errors"]
            .to_string()
            .contains("declares no resources")
    });
    assert_eq!(h.running_pid(&s, "a"), Some(a));
    h.stop_agent();
}

/// A resource that keeps failing backs off on its own: the others converge, it is retried
/// with growing delays, and status and metrics say so.
#[test]
fn a_failing_resource_backs_off_without_holding_up_the_others() {
    let mut h = Host::new("bo");
    // nothing listens on port 1: every pull fails at once (transient)
    let mut t = format!(
        "[image.gone]\nref = \"127.0.0.1:1/{}/x:1\"\n",
        h.name("gone")
    );
    t.push_str(&format!(
        "\n[container.{}]\nimage = \"gone\"\nnetworks = [\"none\"]\n",
        h.name("bad")
    ));
    std::fs::write(h.dir.path().join("bad.toml"), t).unwrap();
    h.declare(&[("good", "command = [\"sleep\", \"1000\"]")]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    h.start_agent(&["--resync", "1h", "--metrics-addr", &addr]);
    h.wait_running("good");
    let s = h.wait_status("the image retried twice", |s| {
        s["agent"]["resources"]["image.gone"]["attempts"]
            .as_u64()
            .is_some_and(|n| n >= 3)
    });
    let img = &s["agent"]["resources"]["image.gone"];
    assert_eq!(img["state"], "failing", "{s:#}");
    assert_eq!(img["transient"], true, "{s:#}");
    assert!(img["next_retry_ms"].is_u64(), "{s:#}");
    assert!(
        img["error"].as_str().unwrap().contains("127.0.0.1:1"),
        "{s:#}"
    );
    let bad = &s["agent"]["resources"][format!("container.{}", h.name("bad"))];
    assert_eq!(bad["state"], "pending", "{s:#}");
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("skipped: image.gone failed"),
        "{s:#}"
    );
    let good = &s["agent"]["resources"][format!("container.{}", h.name("good"))];
    assert_eq!(good["state"], "converged", "{s:#}");
    let text = ok(&h.run(&["status"]));
    assert!(text.contains("image.gone: failing ("), "{text}");
    let m = http_get(&addr, "/metrics");
    assert!(m.contains("berth_resources{state=\"failing\"} 1"), "{m}");
    assert!(m.contains("berth_pulls_total{result=\"failed\"}"), "{m}");
    h.stop_agent();
}

/// Replacing the binary (as a package upgrade does) and restarting the agent keeps every
/// container running and supervised; after a "reboot" (every supervisor and container
/// killed) the agent starts them again in depends_on order; and it records the git commit
/// of the manifest directory.
#[test]
fn upgrade_reboot_and_git_revision() {
    let mut h = Host::new("up");
    let bin = tempfile::tempdir().unwrap();
    let exe = bin.path().join("berth");
    std::fs::copy(berth_bin(), &exe).unwrap();
    let db = "command = [\"sleep\", \"1000\"]\nrestart = \"always\"\nbackoff = { initial = \"100ms\", max = \"1s\", reset_after = \"10m\" }\nhealth = { cmd = [\"true\"], interval = \"200ms\" }";
    let web = format!(
        "command = [\"sleep\", \"1000\"]\ndepends_on = {{ {} = \"healthy\" }}",
        h.name("db")
    );
    h.declare(&[("db", db), ("web", &web)]);
    git(h.dir.path(), &["init", "-q", "-b", "main"]);
    git(h.dir.path(), &["add", "."]);
    git(h.dir.path(), &["commit", "-q", "-m", "first"]);
    let head = String::from_utf8(git(h.dir.path(), &["rev-parse", "HEAD"]))
        .unwrap()
        .trim()
        .to_string();
    h.start_agent_with(&exe, &["--resync", "1s"]);
    let (db1, web1) = (h.wait_running("db"), h.wait_running("web"));
    let s = h.wait_status("the revision", |s| s["agent"]["revision"].is_object());
    assert_eq!(s["agent"]["revision"]["commit"], head.as_str(), "{s:#}");
    assert_eq!(s["agent"]["revision"]["branch"], "main");
    assert_eq!(s["agent"]["revision"]["dirty"], false);
    // an uncommitted change: dirty
    h.declare(&[("db", db), ("web", &web)]);
    std::fs::write(h.dir.path().join("c.toml"), {
        let mut t = std::fs::read_to_string(h.dir.path().join("c.toml")).unwrap();
        t.push_str("# edited\n");
        t
    })
    .unwrap();
    h.wait_status("dirty", |s| s["agent"]["revision"]["dirty"] == true);

    // the upgrade: a new file renamed over the old one, then the agent restarted
    let new = bin.path().join("berth.new");
    std::fs::copy(berth_bin(), &new).unwrap();
    std::fs::rename(&new, &exe).unwrap();
    assert!(h.stop_agent().success());
    h.start_agent_with(&exe, &["--resync", "1s"]);
    let s = h.wait_status("a pass by the new agent", |s| {
        s["agent"]["last_reconcile"].is_object()
    });
    assert_eq!(h.running_pid(&s, "db"), Some(db1), "{s:#}");
    assert_eq!(h.running_pid(&s, "web"), Some(web1), "{s:#}");
    // the old supervisor (its binary deleted) still restarts db
    kill(db1, nix::sys::signal::Signal::SIGKILL);
    h.wait_status("db restarted by its supervisor", |s| {
        h.running_pid(s, "db").is_some_and(|p| p != db1)
    });

    // the reboot: the agent stopped, every supervisor and process killed
    assert!(h.stop_agent().success());
    for n in ["db", "web"] {
        let name = h.name(n);
        let shim = shim_pid(h.s(), &name);
        kill(shim, nix::sys::signal::Signal::SIGKILL);
    }
    let s = h.status();
    for n in ["db", "web"] {
        if let Some(p) = h.running_pid(&s, n) {
            kill(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let mark = h.log_text().len();
    h.start_agent_with(&exe, &["--resync", "1s"]);
    let (db2, web2) = (h.wait_running("db"), h.wait_running("web"));
    assert!(db2 != db1 && web2 != web1);
    let log = h.log_text()[mark..].to_string();
    let done = |n: &str| {
        log.lines()
            .position(|l| l.contains(&format!("container.{}", h.name(n))) && l.contains("done"))
            .unwrap_or_else(|| panic!("no step for {n}:\n{log}"))
    };
    assert!(done("db") < done("web"), "db first:\n{log}");
    h.stop_agent();
}

fn git(dir: &Path, args: &[&str]) -> Vec<u8> {
    let o = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git");
    assert!(o.status.success(), "git {args:?}: {o:?}");
    o.stdout
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `--max-deletions` counts what the agent destroyed within the last hour: a directory
/// emptied a commit at a time is refused like one emptied at once.
#[test]
fn deletions_are_counted_across_passes() {
    let mut h = Host::new("del");
    let sleeper = "command = [\"sleep\", \"1000\"]";
    h.declare(&[("a", sleeper), ("b", sleeper), ("c", sleeper)]);
    h.start_agent(&["--resync", "1h", "--max-deletions", "2"]);
    for n in ["a", "b", "c"] {
        h.wait_running(n);
    }
    h.declare(&[("a", sleeper), ("b", sleeper)]);
    h.wait_status("c removed", |s| h.row(s, "c").is_null());
    h.declare(&[("a", sleeper)]);
    h.wait_status("b removed", |s| h.row(s, "b").is_null());
    // a third within the hour: refused, a stays
    h.declare_in("other.toml", &[]);
    std::fs::remove_file(h.dir.path().join("c.toml")).unwrap();
    let s = h.wait_status("the third deletion refused", |s| {
        s["agent"]["last_reconcile"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("within the last hour"))
    });
    assert!(h.running_pid(&s, "a").is_some(), "{s:#}");
    h.stop_agent();
}
