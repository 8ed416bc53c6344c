//! As root, the attacks of the security review, each tried against berth: an unprivileged
//! local user against the state directory, a hostile container against its terminal, the
//! host binary, the kernel (seccomp, keyrings), inherited descriptors and read-only mounts.
//! Each test fails on a berth without the fix it names.

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const IMAGE: &str = "example.com/sec/bb:1";

/// A static probe (`probe WHAT`), built with the machine's C compiler: it tries what a hostile
/// program in a container would and prints one line per attempt, `NAME ok` or `NAME errno N`.
fn probe() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("probe.c");
    std::fs::write(
        &src,
        r#"#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
static void say(const char *what, long r) {
    if (r < 0) printf("%s errno %d\n", what, errno); else printf("%s ok\n", what);
    fflush(stdout);
}
int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (!strcmp(argv[1], "tiocsti")) {
        char c = '#';
        /* stdout and stderr only: stdin may be a terminal berth gave it on purpose (-t) */
        say("fd1", ioctl(1, TIOCSTI, &c));
        say("fd2", ioctl(2, TIOCSTI, &c));
        int t = open("/dev/tty", O_RDWR);
        say("devtty", t < 0 ? -1 : ioctl(t, TIOCSTI, &c));
    } else if (!strcmp(argv[1], "session")) {
        /* KEYCTL_GET_KEYRING_ID of KEY_SPEC_SESSION_KEYRING, created if need be */
        printf("session %ld\n", syscall(SYS_keyctl, 0, -3, 1));
    } else if (!strcmp(argv[1], "kernel")) {
        /* KEYCTL_GET_KEYRING_ID of KEY_SPEC_USER_KEYRING: the host root's user keyring */
        say("keyctl", syscall(SYS_keyctl, 0, -4, 0));
        say("add_key", syscall(SYS_add_key, "user", "berth-probe", "x", 1, -3));
        say("unshare_user", syscall(SYS_unshare, CLONE_NEWUSER));
        say("unshare_ipc", syscall(SYS_unshare, CLONE_NEWIPC));
        say("getpid", syscall(SYS_getpid));
        pid_t p = fork();
        if (p == 0) _exit(0);
        say("fork", p);
    }
    return 0;
}
"#,
    )
    .unwrap();
    let out = d.path().join("probe");
    let st = std::process::Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("a C compiler (cc) builds the probe");
    assert!(st.success());
    std::fs::read(out).unwrap()
}

/// A state directory with busybox and the probe imported, and a manifests directory.
struct Host {
    _teardown: Teardown,
    state: tempfile::TempDir,
    dir: tempfile::TempDir,
    tag: &'static str,
}

impl Host {
    fn new(tag: &'static str) -> Host {
        let extra = LayerBuilder::new()
            .dir("bin", 0o755)
            .file("bin/probe", &probe(), 0o755)
            .dir("seed", 0o755)
            .file("seed/a", b"from the image\n", 0o644)
            .build();
        let state = state_with_image(IMAGE, vec![extra]);
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
    fn name(&self, n: &str) -> String {
        format!("{}{n}{}", self.tag, std::process::id())
    }
    fn declare(&self, extra: &str, containers: &[(&str, &str)]) {
        let mut t = format!("[image.bb]\nref = \"{IMAGE}\"\npull = \"never\"\n{extra}\n");
        for (n, body) in containers {
            t.push_str(&format!(
                "\n[container.{}]\nimage = \"bb\"\nstop_timeout = \"1s\"\nnetworks = [\"none\"]\n{body}\n",
                self.name(n)
            ));
        }
        std::fs::write(self.dir.path().join("c.toml"), t).unwrap();
    }
    fn apply(&self) -> String {
        ok(&berth(self.s(), &["apply", self.d()]))
    }
    fn exec(&self, n: &str, script: &str) -> String {
        ok(&berth(
            self.s(),
            &["exec", &self.name(n), "--", "sh", "-c", script],
        ))
    }
    fn inspect(&self, n: &str) -> Value {
        serde_json::from_str(&ok(&berth(self.s(), &["inspect", &self.name(n)]))).unwrap()
    }
    fn shim_pid(&self, n: &str) -> i64 {
        shim_pid(self.s(), &self.name(n))
    }
}

const SLEEPER: &str = "command = [\"sh\", \"-c\", \"trap 'exit 0' TERM; sleep 1000 & wait\"]";

/// Run berth with `args` and descriptor 9 open (not close-on-exec) on `path`, as a careless
/// caller would leave one: the shell opens it, then becomes berth.
fn berth_with_fd9(state: &Path, path: &Path, args: &[&str]) -> std::process::Output {
    let mut line = format!(
        "exec 9<'{}'; exec '{}' --state-dir '{}'",
        path.display(),
        berth_bin(),
        state.display()
    );
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    std::process::Command::new("sh")
        .args(["-c", &line])
        .env("BERTH_CONFIG", "/dev/null")
        .output()
        .unwrap()
}

/// Run `args` as the unprivileged user `nobody`.
fn as_nobody(args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs a command as nobody")
}

#[test]
fn the_state_directory_is_private_to_root() {
    let h = Host::new("priv");
    // an existing state directory left open is tightened on the next run
    std::fs::set_permissions(h.s(), std::fs::Permissions::from_mode(0o755)).unwrap();
    h.declare(
        "[volume.data]\n",
        &[
            (
                "c",
                &format!(
                    "{SLEEPER}\nenv = {{ PASSWORD = \"hunter2\" }}\nvolumes = [\"data:/data\"]"
                ),
            ),
            ("n", &format!("{SLEEPER}\nuser = \"1000:1000\"")),
        ],
    );
    h.apply();
    // the container makes a setuid copy of a shell in its writable layer and in its volume
    h.exec(
        "c",
        "cp /bin/busybox /suid && chmod 4755 /suid && cp /bin/busybox /data/suid && chmod 4755 /data/suid",
    );
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(h.s()), 0o700, "the state directory");
    // every file berth wrote is for root alone
    let mut open = vec![];
    for (path, _) in tree(h.s()) {
        let p = h.s().join(&path);
        let m = std::fs::symlink_metadata(&p).unwrap();
        // image layers, containers' own files, and the /etc files bind-mounted into them
        let in_image_or_container = path.starts_with("snapshots/")
            || ["/upper/", "/rootfs/", "/_data/", "/etc/"]
                .iter()
                .any(|x| path.contains(x));
        if m.is_file() && !in_image_or_container && m.permissions().mode() & 0o077 != 0 {
            open.push(format!("{path} {:o}", m.permissions().mode() & 0o7777));
        }
    }
    assert!(open.is_empty(), "files others can read: {open:?}");
    let c = h.s().join("containers").join(h.name("c"));
    let setuid_copies = [c.join("upper/suid"), h.s().join("volumes/data/_data/suid")];
    for f in &setuid_copies {
        assert_eq!(mode(f) & 0o4000, 0o4000, "{} is setuid", f.display());
    }
    // nobody reaches any of it: not the setuid copies, not the secrets, not the locks
    for f in setuid_copies.iter().chain([
        &c.join("config.json"),
        &c.join("container.log"),
        &h.s().join("lock"),
    ]) {
        let out = as_nobody(&["cat", f.to_str().unwrap()]);
        assert!(!out.status.success(), "nobody read {}", f.display());
    }
    let out = as_nobody(&[
        "flock",
        "-n",
        "-s",
        h.s().join("lock").to_str().unwrap(),
        "true",
    ]);
    assert!(!out.status.success(), "nobody took the state lock");
    let out = as_nobody(&[setuid_copies[0].to_str().unwrap(), "id", "-u"]);
    assert!(!out.status.success(), "nobody ran the setuid copy");
    // and the container's own users still see a normal system: `/` and the volume 0755,
    // /etc/hosts readable, files made with umask 022
    let out = h.exec("c", "stat -c %a / /data; touch /made && stat -c %a /made");
    assert_eq!(out, "755\n755\n644\n", "{out}");
    let out = h.exec(
        "n",
        "id -u; cat /etc/hosts /etc/resolv.conf /etc/hostname >/dev/null && ls / >/dev/null && echo reads",
    );
    assert_eq!(out, "1000\nreads\n", "{out}");
}

#[test]
fn exec_never_hands_the_callers_terminal_to_the_container() {
    let h = Host::new("tty");
    h.declare("", &[("c", SLEEPER)]);
    h.apply();
    // berth exec from a terminal, as an admin types it: `script` gives it a pty
    let run = |flags: &str, cmd: &str| -> String {
        let line = format!(
            "{} --state-dir {} exec {flags} {} -- {cmd}",
            berth_bin(),
            h.s().display(),
            h.name("c")
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("BERTH_CONFIG", "/dev/null")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("script (bsdutils) gives berth a terminal");
        String::from_utf8_lossy(&out.stdout).replace('\r', "")
    };
    // without -t: no terminal at all, a session of its own, TIOCSTI refused everywhere
    let out = run("", "/bin/probe tiocsti");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["fd1 errno 25", "fd2 errno 25", "devtty errno 6"],
        "ENOTTY on the pipes, ENXIO for /dev/tty: {out}"
    );
    // fields 6 and 7 of /proc/PID/stat: session and controlling terminal
    let out = run(
        "",
        "sh -c 'echo $$; cut -d\" \" -f6,7 /proc/$$/stat; readlink /proc/self/fd/1'",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[1],
        format!("{} 0", lines[0]),
        "a session of its own, no controlling terminal: {out}"
    );
    assert!(
        lines[2].starts_with("pipe:"),
        "output through a pipe: {out}"
    );
    // -i relays stdin through a pipe too
    let piped = std::process::Command::new(berth_bin())
        .args(["--state-dir", h.s().to_str().unwrap(), "exec", "-i"])
        .arg(h.name("c"))
        .args([
            "--",
            "sh",
            "-c",
            "read x; echo got $x; readlink /proc/self/fd/0",
        ])
        .env("BERTH_CONFIG", "/dev/null")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    piped.stdin.as_ref().unwrap().write_all(b"hi\n").unwrap();
    let out = piped.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.starts_with("got hi\npipe:"), "{out}");
    // a command that never reads its stdin cannot stall its output (a single-threaded relay
    // blocked writing the full stdin pipe, and never drained stdout)
    let mut big = std::process::Command::new(berth_bin())
        .args(["--state-dir", h.s().to_str().unwrap(), "exec", "-i"])
        .arg(h.name("c"))
        .args(["--", "sh", "-c", "yes | head -c 1000000"])
        .env("BERTH_CONFIG", "/dev/null")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = big.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..32 {
            if stdin.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let out = big.wait_with_output().unwrap();
    assert_eq!(out.stdout.len(), 1_000_000, "the whole output came through");
    let _ = feeder.join();
    // with -t: a fresh pty of the container's own, which is its controlling terminal (where
    // the kernel still allows TIOCSTI at all)
    let legacy = std::fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti")
        .map(|v| v.trim() != "0")
        .unwrap_or(true);
    let out = run("-t", "/bin/probe tiocsti");
    let want = if legacy { "fd1 ok" } else { "fd1 errno 5" };
    assert!(out.contains(want), "its own terminal: {out}");
    // in a session of its own (a terminal is the controlling terminal of one session only,
    // so not the caller's), whose terminal is the pty on its stdin
    let out = run(
        "-t",
        "sh -c 'echo $$; cut -d\" \" -f6 /proc/$$/stat; readlink /proc/self/fd/0; [ -t 0 ] && echo terminal'",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], lines[1], "a session of its own: {out}");
    assert!(lines[2].starts_with("/dev/pts/"), "{out}");
    assert_eq!(lines[3], "terminal", "{out}");
}

/// The host's berth binary, as (device, inode).
fn host_binary() -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(berth_bin()).unwrap();
    (m.dev(), m.ino())
}

/// Try to write the executable behind `/proc/PID/exe` (held open as `held`) once no process
/// runs it any more: the first byte is written back unchanged, so a failure of this test
/// cannot damage the binary. Returns whether the write went through.
fn writable(held: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let reopened = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", held.as_raw_fd()));
    match reopened {
        Ok(f) => f.write_at(&[0x7f], 0).is_ok(),
        Err(_) => false,
    }
}

#[test]
fn no_process_a_container_sees_runs_the_host_binary() {
    use std::os::unix::fs::MetadataExt;
    let h = Host::new("exe");
    h.declare("", &[("c", SLEEPER)]);
    h.apply();
    // the shim (whose clone is the container's first process until its execve)
    let shim = h.shim_pid("c");
    let exe = std::fs::File::open(format!("/proc/{shim}/exe")).unwrap();
    let m = exe.metadata().unwrap();
    assert_ne!(
        (m.dev(), m.ino()),
        host_binary(),
        "the shim runs the host's binary"
    );
    // berth exec: its child is berth inside the container's pid namespace until it execs
    let child = std::process::Command::new(berth_bin())
        .args(["--state-dir", h.s().to_str().unwrap(), "exec"])
        .arg(h.name("c"))
        .args(["--", "sleep", "3"])
        .env("BERTH_CONFIG", "/dev/null")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // berth re-executes itself before it forks: wait until it has
    let mut exec_exe = None;
    for _ in 0..200 {
        if let Ok(f) = std::fs::File::open(format!("/proc/{}/exe", child.id()))
            && let Ok(m) = f.metadata()
            && (m.dev(), m.ino()) != host_binary()
        {
            exec_exe = Some(f);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let exec_exe = exec_exe.expect("berth exec runs from an unwritable view of itself");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    // with everything stopped, nobody runs those files any more: still not writable
    ok(&berth(
        h.s(),
        &[
            "apply",
            "--allow-empty",
            h.dir.path().join("none").to_str().unwrap(),
        ],
    ));
    assert!(!writable(&exe), "the shim's executable can be written");
    assert!(!writable(&exec_exe), "exec's executable can be written");
}

#[test]
fn seccomp_and_keyrings_confine_the_container() {
    let h = Host::new("scmp");
    h.declare(
        "",
        &[
            ("c", SLEEPER),
            ("u", &format!("{SLEEPER}\nseccomp = \"unconfined\"")),
        ],
    );
    h.apply();
    let out = h.exec(
        "c",
        "/bin/probe kernel; grep -E '^Seccomp' /proc/self/status",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "keyctl errno 1",
            "add_key errno 1",
            "unshare_user errno 1",
            "unshare_ipc errno 1",
            "getpid ok",
            "fork ok",
            "Seccomp:\t2",
            "Seccomp_filters:\t2",
        ],
        "{out}"
    );
    // the container's first process is filtered too
    let pid = h.inspect("c")["state"]["pid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    // the explicit opt-out: no filter (keyctl then reaches the kernel; unshare of a user
    // namespace is still refused for want of capabilities, not by a filter)
    let out = h.exec(
        "u",
        "grep -E '^Seccomp:' /proc/self/status; /bin/probe session",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "Seccomp:\t0");
    // its session keyring is its own, not the host's (nor that of `berth exec`'s caller)
    let bin = tempfile::tempdir().unwrap();
    let probe_path = bin.path().join("probe");
    std::fs::write(&probe_path, probe()).unwrap();
    std::fs::set_permissions(&probe_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let host = std::process::Command::new(&probe_path)
        .arg("session")
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout).into_owned();
    assert!(host.starts_with("session "), "{host}");
    assert!(lines[1].starts_with("session "), "{out}");
    assert_ne!(
        lines[1],
        host.trim(),
        "the container shares the host's session keyring"
    );
    let plan = ok(&berth(h.s(), &["plan", h.d()]));
    assert!(plan.contains("No changes"), "{plan}");
    // seccomp is part of the spec: dropping the opt-out replaces the container
    h.declare("", &[("c", SLEEPER), ("u", SLEEPER)]);
    let plan = ok(&berth(h.s(), &["plan", h.d()]));
    assert!(
        plan.contains("seccomp: \"unconfined\"") && plan.contains("forces replacement"),
        "{plan}"
    );
}

#[test]
fn a_working_dir_through_an_inherited_descriptor_creates_nothing_on_the_host() {
    let h = Host::new("fd");
    let victim = tempfile::tempdir().unwrap();
    // the berth that starts the shim has the victim directory open as fd 9
    h.declare(
        "",
        &[(
            "c",
            &format!("{SLEEPER}\nworking_dir = \"/proc/self/fd/9/escaped\""),
        )],
    );
    let out = berth_with_fd9(h.s(), victim.path(), &["apply", h.d()]);
    assert!(
        std::fs::read_dir(victim.path()).unwrap().next().is_none(),
        "the container created a directory on the host"
    );
    // the start fails: a magic link is never followed to make the working directory
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("working directory"),
        "{err}"
    );
}

#[test]
fn read_only_binds_are_read_only_all_the_way_down() {
    let h = Host::new("ro");
    // a host directory with a mount below it
    let src = tempfile::tempdir().unwrap();
    let below = src.path().join("below");
    std::fs::create_dir(&below).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&below)
        .status()
        .unwrap();
    assert!(st.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(below.clone());
    h.declare(
        "",
        &[(
            "c",
            &format!(
                "{SLEEPER}\nvolumes = [\"{}:/src:ro\"]",
                src.path().display()
            ),
        )],
    );
    h.apply();
    let out = h.exec(
        "c",
        "touch /src/x 2>/dev/null && echo top-writable; touch /src/below/x 2>/dev/null && echo below-writable; echo done",
    );
    assert_eq!(out, "done\n", "{out}");
    assert!(!below.join("x").exists());
}

#[test]
fn docker_masks_and_refused_ids() {
    let h = Host::new("mask");
    h.declare(
        "",
        &[
            ("c", SLEEPER),
            ("m", &format!("{SLEEPER}\nuser = \"4294967295\"")),
        ],
    );
    let out = berth(h.s(), &["apply", h.d()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("4294967295"),
        "uid -1 refused: {err}"
    );
    let out = h.exec(
        "c",
        "ls /sys/devices/virtual/powercap | wc -l; touch /sys/devices/virtual/powercap/x 2>/dev/null || echo ro",
    );
    assert_eq!(out, "0\nro\n", "powercap masked: {out}");
}

#[test]
fn a_volume_is_filled_without_following_symlinks_on_the_host() {
    let h = Host::new("vol");
    h.declare(
        "[volume.v]\n",
        &[("c", &format!("{SLEEPER}\nvolumes = [\"v:/seed\"]"))],
    );
    h.apply();
    let data = h.s().join("volumes/v/_data");
    assert_eq!(
        std::fs::read_to_string(data.join("a")).unwrap(),
        "from the image\n"
    );
    let m = std::fs::metadata(&data).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o755);
}

#[test]
fn inherited_descriptors_never_reach_the_shim() {
    let h = Host::new("inh");
    h.declare("", &[("c", SLEEPER)]);
    // berth started with an extra open descriptor (as a careless caller would leave one)
    ok(&berth_with_fd9(h.s(), Path::new("/"), &["apply", h.d()]));
    let shim = h.shim_pid("c");
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{shim}/fd"))
        .unwrap()
        .map(|e| {
            std::fs::read_link(e.unwrap().path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(!fds.iter().any(|l| l == "/"), "the shim kept fd 9: {fds:?}");
}
