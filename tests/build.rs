//! `berth image build` end to end, as root: from scratch (a static binary copied in), from a
//! base image with RUN steps that create, change and delete files (the deletion must be a
//! whiteout in the layer), multi-stage with COPY --from, the cache (hits, a miss from a
//! changed file on), ADD of a local archive, a bad instruction and a failing RUN with their
//! lines; and interop: the image pushed to a real registry runs under podman, and umoci
//! unpacks it to the same tree berth runs. Each test has its own state directory.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const BASE: &str = "localhost/build-base:1";

/// A state directory with busybox imported as `BASE`, and a build context.
struct Build {
    _teardown: Teardown,
    state: tempfile::TempDir,
    ctx: tempfile::TempDir,
}

impl Build {
    fn new() -> Build {
        let state = state_with_image(BASE, vec![]);
        Build {
            _teardown: Teardown::new(state.path()),
            state,
            ctx: tempfile::tempdir().unwrap(),
        }
    }

    fn s(&self) -> &Path {
        self.state.path()
    }

    fn file(&self, name: &str, body: &str) {
        let p = self.ctx.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }

    /// `image build --json`: the result, or the failed run's output.
    fn build(&self, tag: &str) -> Result<Value, std::process::Output> {
        let o = berth(
            self.s(),
            &[
                "image",
                "build",
                "--json",
                "-t",
                tag,
                self.ctx.path().to_str().unwrap(),
            ],
        );
        if o.status.success() {
            Ok(serde_json::from_slice(&o.stdout).unwrap())
        } else {
            Err(o)
        }
    }

    fn built(&self, tag: &str) -> Value {
        self.build(tag).unwrap_or_else(|o| {
            panic!(
                "build failed: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
    }

    /// Run a container of `image` once (restart no) and return its output.
    fn run(&self, name: &str, image: &str, command: Option<&str>) -> String {
        let m = tempfile::tempdir().unwrap();
        let cmd = command.map_or(String::new(), |c| format!("command = {c}\n"));
        std::fs::write(
            m.path().join("c.toml"),
            format!(
                "[image.i]\nref = \"{image}\"\npull = \"never\"\n\n[container.{name}]\nimage = \"i\"\nnetworks = [\"none\"]\n{cmd}"
            ),
        )
        .unwrap();
        ok(&berth(self.s(), &["apply", m.path().to_str().unwrap()]));
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let ps: Value =
                serde_json::from_str(&ok(&berth(self.s(), &["ps", "-a", "--json"]))).unwrap();
            let row = ps
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["name"] == name)
                .cloned()
                .unwrap();
            if row["detail"]["state"] == "exited" {
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "{name} never exited: {row}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        ok(&berth(self.s(), &["logs", name]))
    }

    /// Container `name`'s output once it has written some (at most 60 s: a bound, not a
    /// timing assertion).
    fn logs(&self, name: &str) -> String {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = ok(&berth(self.s(), &["logs", name]));
            if !out.is_empty() || std::time::Instant::now() > end {
                return out;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// `plan --detailed-exitcode DIR` says there is nothing to do.
    fn converged(&self, dir: &str) {
        let o = berth(self.s(), &["plan", "--detailed-exitcode", dir]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
    }

    /// The entry names of a layer blob in the store.
    fn layer_entries(&self, digest: &str) -> Vec<String> {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let blob = self.s().join("store/blobs/sha256").join(hex);
        let f = std::fs::File::open(&blob).unwrap();
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(f));
        a.entries()
            .unwrap()
            .map(|e| {
                String::from_utf8_lossy(&e.unwrap().path_bytes())
                    .trim_end_matches('/')
                    .to_string()
            })
            .collect()
    }
}

fn steps(v: &Value) -> &Vec<Value> {
    v["steps"].as_array().unwrap()
}

#[test]
fn from_scratch_a_static_binary() {
    let b = Build::new();
    std::fs::copy("/bin/busybox", b.ctx.path().join("busybox")).unwrap();
    b.file(
        "Containerfile",
        "# a static binary and nothing else\nFROM scratch\nCOPY busybox /bin/busybox\nCMD [\"/bin/busybox\", \"echo\", \"hello from scratch\"]\n",
    );
    let v = b.built("localhost/scratch-app:1");
    assert_eq!(steps(&v).len(), 3);
    let layer = steps(&v)[1]["layer"].as_str().unwrap().to_string();
    assert_eq!(b.layer_entries(&layer), vec!["bin", "bin/busybox"]);
    let out = b.run("scr", "localhost/scratch-app:1", None);
    assert_eq!(out.trim(), "hello from scratch");
}

#[test]
fn run_steps_create_change_and_delete_with_whiteouts() {
    let b = Build::new();
    b.file(
        "Containerfile",
        &format!(
            "FROM {BASE}\n\
             RUN mkdir -p /data && echo one > /data/a && echo two > /data/b\n\
             RUN echo changed > /data/a && rm /data/b && rm /bin/true\n\
             ENV GREETING=hi \\\n    OTHER=\"two words\"\n\
             WORKDIR /data\n\
             LABEL org.example.name=\"test\"\n\
             CMD [\"sh\", \"-c\", \"cat a; ls; echo $GREETING $OTHER; pwd\"]\n"
        ),
    );
    let v = b.built("localhost/run-app:1");
    let second = steps(&v)[2]["layer"].as_str().unwrap().to_string();
    let entries = b.layer_entries(&second);
    assert!(entries.contains(&"data/.wh.b".to_string()), "{entries:?}");
    assert!(entries.contains(&"bin/.wh.true".to_string()), "{entries:?}");
    assert!(entries.contains(&"data/a".to_string()), "{entries:?}");
    // the runtime's mount points are not the step's
    for e in [
        "proc",
        "sys",
        "dev",
        "etc/hosts",
        "etc/resolv.conf",
        "etc/hostname",
    ] {
        assert!(!entries.contains(&e.to_string()), "{e} in {entries:?}");
    }
    let out = b.run("runapp", "localhost/run-app:1", None);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec!["changed", "a", "hi two words", "/data"],
        "{out}"
    );
    let inspect: Value = serde_json::from_str(&ok(&berth(
        b.s(),
        &["image", "inspect", "localhost/run-app:1"],
    )))
    .unwrap();
    assert_eq!(inspect["layers"].as_array().unwrap().len(), 3, "{inspect}");
    // a failing RUN names its line, exit code and output
    b.file(
        "Containerfile",
        &format!("FROM {BASE}\n\nRUN echo about to fail; exit 3\n"),
    );
    let o = b.build("localhost/fails:1").unwrap_err();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Containerfile:3: RUN exited with code 3"),
        "{err}"
    );
    assert!(err.contains("about to fail"), "{err}");
}

#[test]
fn multi_stage_and_the_cache() {
    let b = Build::new();
    b.file("src/message", "first\n");
    b.file("src/ignored.log", "noise\n");
    b.file(".dockerignore", "**/*.log\n");
    b.file(
        "Containerfile",
        &format!(
            "ARG BASE_IMAGE={BASE}\n\
             FROM $BASE_IMAGE AS builder\n\
             ARG SUFFIX=default\n\
             RUN mkdir /out && echo built-$SUFFIX > /out/artifact\n\
             COPY src/ /in/\n\
             RUN cat /in/message >> /out/artifact && ls /in > /out/listing\n\
             FROM scratch\n\
             COPY --from=builder /out/ /\n\
             COPY --from=builder /bin/busybox /bin/busybox\n\
             CMD [\"/bin/busybox\", \"cat\", \"/artifact\", \"/listing\"]\n"
        ),
    );
    let v1 = b.built("localhost/multi:1");
    let out = b.run("multi1", "localhost/multi:1", None);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["built-default", "first", "message"],
        "{out}"
    );
    // unchanged: every layer from the cache, the same image
    let v2 = b.built("localhost/multi:1");
    for s in steps(&v2).iter().filter(|s| s["layer"].is_string()) {
        assert_eq!(s["cached"], true, "{s}");
    }
    assert_eq!(v1["digest"], v2["digest"]);
    // an ignored file changed: still all cached
    b.file("src/ignored.log", "more noise\n");
    let v3 = b.built("localhost/multi:1");
    assert_eq!(v1["digest"], v3["digest"]);
    // the copied file changed: the steps from its COPY on run again, those before do not
    b.file("src/message", "second\n");
    let v4 = b.built("localhost/multi:2");
    let cached: Vec<bool> = steps(&v4)
        .iter()
        .filter(|s| s["layer"].is_string())
        .map(|s| s["cached"].as_bool().unwrap())
        .collect();
    assert_eq!(cached, vec![true, false, false, false, false], "{v4:#}");
    let out = b.run("multi2", "localhost/multi:2", None);
    assert!(out.contains("second"), "{out}");
}

#[test]
fn add_extracts_archives_and_bad_instructions_name_their_line() {
    let b = Build::new();
    let arch = b.ctx.path().join("files.tar.gz");
    let tarball = gzip(
        &LayerBuilder::new()
            .dir("pkg/", 0o755)
            .file("pkg/hello.txt", b"from the archive\n", 0o644)
            .build(),
    );
    std::fs::write(&arch, tarball).unwrap();
    b.file(
        "Containerfile",
        &format!(
            "FROM {BASE}\nADD files.tar.gz /opt/\nCOPY --chown=1000:1000 --chmod=0600 files.tar.gz /kept.tgz\nCMD [\"sh\", \"-c\", \"cat /opt/pkg/hello.txt; stat -c '%u:%g %a' /kept.tgz\"]\n"
        ),
    );
    b.built("localhost/add:1");
    let out = b.run("addapp", "localhost/add:1", None);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["from the archive", "1000:1000 600"],
        "{out}"
    );
    b.file("Containerfile", "FROM scratch\nFOO bar\nCOPY onlyone\n");
    let o = b.build("localhost/bad:1").unwrap_err();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Containerfile:2:1"), "{err}");
    assert!(err.contains("Containerfile:3:"), "both problems: {err}");
}

/// Pushed to a real registry, the image runs under podman and unpacks with umoci to the
/// tree berth's own layers give.
#[test]
fn built_images_run_under_podman_and_unpack_with_umoci() {
    // a peer the test needs, never skipped: scripts/test installs it
    assert!(
        Command::new("podman").arg("--version").output().is_ok(),
        "podman is not installed (scripts/test installs it: apt-get install podman runc)"
    );
    let b = Build::new();
    b.file(
        "Containerfile",
        &format!(
            "FROM {BASE}\nRUN mkdir /srv && echo interop > /srv/msg && rm /bin/true\nCMD [\"cat\", \"/srv/msg\"]\n"
        ),
    );
    let reg = Registry::start();
    let dest = format!("{}/built/app:1", reg.addr);
    b.built(&dest);
    // a loopback registry is plain HTTP without configuration
    ok(&berth(b.s(), &["image", "push", "--quiet", &dest]));
    let podman = |args: &[&str]| {
        Command::new("podman")
            .args(["--cgroup-manager=cgroupfs", "--runtime", "runc"])
            .args(args)
            .output()
            .unwrap()
    };
    let name = format!("berth-build-{}", std::process::id());
    let out = podman(&[
        "run",
        "--rm",
        "--name",
        &name,
        "--tls-verify=false",
        "--network",
        "none",
        "--ulimit",
        "nofile=1000:1000",
        "--ulimit",
        "nproc=1000:1000",
        &dest,
    ]);
    let _ = podman(&["rmi", "-f", &dest]);
    assert!(out.status.success(), "podman run: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "interop");

    let layout = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{dest}"),
        &format!("oci:{}:t", layout.path().display()),
    ]);
    let theirs = umoci_tree(layout.path());
    assert_eq!(
        theirs
            .get("srv/msg")
            .map(|s| s.split(' ').next().unwrap_or("")),
        Some("file")
    );
    assert!(!theirs.contains_key("bin/true"), "the whiteout hides it");
    assert!(theirs.contains_key("bin/sh"));
    // berth's own layers give the same tree, entry for entry
    let merged = Merged::mount(b.s(), &dest);
    let ours = tree(merged.dir.path());
    assert_eq!(
        ours, theirs,
        "the built image unpacks differently with umoci"
    );
}

/// ADD of a URL downloads it (mode 0600, as docker); with network none only from public
/// addresses (a repository's Containerfile must not fetch the host's loopback services).
#[test]
fn add_downloads_urls() {
    let b = Build::new();
    let reg = Registry::start();
    b.file(
        "Containerfile",
        &format!(
            "FROM {BASE}\nADD http://{}/v2/ /fetched.json\nCMD [\"sh\", \"-c\", \"cat /fetched.json; echo; stat -c %a /fetched.json\"]\n",
            reg.addr
        ),
    );
    let o = b.build("localhost/url:1").unwrap_err();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not a public address"), "{err}");
    ok(&berth(
        b.s(),
        &[
            "image",
            "build",
            "--quiet",
            "--network",
            "host",
            "-t",
            "localhost/url:1",
            b.ctx.path().to_str().unwrap(),
        ],
    ));
    let out = b.run("urlapp", "localhost/url:1", None);
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["{}", "600"], "{out}");
}

/// An image declared with `build` is built by `apply`, and built again (its containers
/// replaced) when a file of its context changes; the plan names the file.
#[test]
fn declared_builds_are_planned_built_and_rebuilt_on_change() {
    let b = Build::new();
    let m = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(m.path().join("app")).unwrap();
    std::fs::write(
        m.path().join("app/Containerfile"),
        format!("FROM {BASE}\nCOPY msg /msg\nCMD [\"cat\", \"/msg\"]\n"),
    )
    .unwrap();
    std::fs::write(m.path().join("app/msg"), "v1\n").unwrap();
    let name = format!("decl{}", std::process::id());
    std::fs::write(
        m.path().join("host.toml"),
        format!(
            "[image.app]\nref = \"localhost/declared-app:1\"\nbuild = {{ context = \"app/\" }}\n\n[container.{name}]\nimage = \"app\"\nnetworks = [\"none\"]\n"
        ),
    )
    .unwrap();
    let dir = m.path().to_str().unwrap();
    let plan = ok(&berth(b.s(), &["plan", dir]));
    assert!(
        plan.contains("build localhost/declared-app:1: not in the store"),
        "{plan}"
    );
    ok(&berth(b.s(), &["apply", dir]));
    let logs = || b.logs(&name);
    assert_eq!(logs().trim(), "v1");
    b.converged(dir);

    std::fs::write(m.path().join("app/msg"), "v2\n").unwrap();
    let o = berth(b.s(), &["plan", "--detailed-exitcode", dir]);
    let plan = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{plan}");
    assert!(plan.contains("changed in the context: msg"), "{plan}");
    assert!(plan.contains("is built again"), "{plan}");
    ok(&berth(b.s(), &["apply", dir]));
    assert_eq!(logs().trim(), "v2");
    b.converged(dir);
}

/// The README's first command (scripts/demo) in a test: the hello example, its program
/// compiled static, applied offline with a throw-away state directory.
#[test]
fn the_hello_example_runs_offline() {
    let b = Build::new();
    let ex = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    std::fs::create_dir_all(ex.path().join("app")).unwrap();
    for f in [
        "host.toml",
        "app/Containerfile",
        "app/.dockerignore",
        "app/hello.rs",
    ] {
        std::fs::copy(src.join(f), ex.path().join(f)).unwrap();
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let o = Command::new(rustc)
        .args(["-O", "-C", "target-feature=+crt-static", "-o"])
        .arg(ex.path().join("app/hello"))
        .arg(ex.path().join("app/hello.rs"))
        .output()
        .unwrap();
    assert!(o.status.success(), "rustc: {o:?}");
    let dir = ex.path().to_str().unwrap();
    ok(&berth(b.s(), &["apply", dir]));
    let logs = b.logs("hello");
    assert!(
        logs.starts_with("hello from berth: pid 1 in container hello"),
        "{logs}"
    );
    b.converged(dir);
}

/// What an attack review of builds found, each refused or cleaned up.
#[test]
fn hostile_contexts_and_interrupted_builds() {
    let b = Build::new();
    // a Containerfile that is a symlink out of the context is not read (nor echoed)
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(
        secret.path().join("shadow"),
        "root:$6$SECRETHASH:19000:0:99999:7:::\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(
        secret.path().join("shadow"),
        b.ctx.path().join("Containerfile"),
    )
    .unwrap();
    let o = b.build("localhost/leak:1").unwrap_err();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("SECRETHASH"), "{err}");
    std::fs::remove_file(b.ctx.path().join("Containerfile")).unwrap();

    // a source through a symlinked directory is refused
    std::os::unix::fs::symlink("/etc", b.ctx.path().join("hostetc")).unwrap();
    b.file("Containerfile", "FROM scratch\nCOPY hostetc/hostname /x\n");
    let o = b.build("localhost/leak:2").unwrap_err();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("goes through the symlink hostetc"), "{err}");

    // a variable doubled twenty times is refused, not grown to gigabytes
    let mut cf = String::from("FROM scratch\nENV A=xxxxxxxxxxxxxxxx\n");
    for _ in 0..20 {
        cf.push_str("ENV A=$A$A\n");
    }
    b.file("Containerfile", &cf);
    let o = b.build("localhost/big:1").unwrap_err();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("longer than 1 MiB"), "{err}");

    // SIGTERM during a RUN: the build stops and removes its container
    b.file("Containerfile", &format!("FROM {BASE}\nRUN sleep 600\n"));
    let containers = b.s().join("build/containers");
    // the containers' names and their directories (slots)
    let names = || -> Vec<String> {
        let list = |d: &std::path::Path| -> Vec<String> {
            std::fs::read_dir(d)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| !n.ends_with(".lock") && n != ".slots")
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut v = list(&containers);
        v.extend(
            list(&containers.join(".slots"))
                .into_iter()
                .map(|n| format!(".slots/{n}")),
        );
        v
    };
    let wait_for = |what: &str, f: &dyn Fn() -> bool| {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !f() {
            assert!(std::time::Instant::now() < end, "never {what}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let start = || {
        Command::new(berth_bin())
            .arg("--state-dir")
            .arg(b.s())
            .args(["image", "build", "-q", "-t", "localhost/slow:1"])
            .arg(b.ctx.path())
            .env("BERTH_CONFIG", "/dev/null")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let running = |n: &str| {
        b.s()
            .join("build/containers")
            .join(n)
            .join("state.json")
            .exists()
    };
    let child = start();
    wait_for("a build container running", &|| {
        names().iter().any(|n| running(n))
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interrupted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(names().is_empty(), "left: {:?}", names());

    // SIGKILL: nothing can clean up then; the next build (or apply) removes what was left
    let mut child = start();
    wait_for("a build container running", &|| {
        names().iter().any(|n| running(n))
    });
    let left = names();
    let shim: i64 = {
        let st: Value = serde_json::from_slice(
            &std::fs::read(containers.join(&left[0]).join("state.json")).unwrap(),
        )
        .unwrap();
        st["shim_pid"].as_i64().unwrap()
    };
    child.kill().unwrap();
    let _ = child.wait();
    b.file("Containerfile", "FROM scratch\nLABEL a=b\n");
    b.built("localhost/after:1");
    assert!(names().is_empty(), "left: {:?}", names());
    wait_for("the killed build's supervisor gone", &|| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim as i32), None).is_err()
    });
    let tmp = b.s().join("build/tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).map(|r| r.count()).unwrap_or(0),
        0,
        "scratch left in {}",
        tmp.display()
    );
}

/// A build on a declared network: its RUN steps get an address there (released after),
/// and the network is created before the image is built.
#[test]
fn builds_on_a_declared_network() {
    let b = Build::new();
    let m = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(m.path().join("app")).unwrap();
    std::fs::write(
        m.path().join("app/Containerfile"),
        format!(
            "FROM {BASE}\nRUN /bin/busybox ip -4 addr show eth0 > /netinfo\nCMD [\"cat\", \"/netinfo\"]\n"
        ),
    )
    .unwrap();
    let net = format!("bn{}", std::process::id());
    let name = format!("bnc{}", std::process::id());
    std::fs::write(
        m.path().join("host.toml"),
        format!(
            "[network.{net}]\nsubnet = \"10.251.{}.0/24\"\n\n[image.app]\nref = \"localhost/net-built:1\"\nbuild = {{ context = \"app/\", network = \"{net}\" }}\n\n[container.{name}]\nimage = \"app\"\nnetworks = [\"none\"]\n",
            std::process::id() % 250
        ),
    )
    .unwrap();
    ok(&berth(b.s(), &["apply", m.path().to_str().unwrap()]));
    let out = b.logs(&name);
    assert!(
        out.contains(&format!("inet 10.251.{}.", std::process::id() % 250)),
        "{out}"
    );
    let ipam = std::fs::read_to_string(b.s().join(format!("net/{net}.json"))).unwrap();
    assert!(
        !ipam.contains("build-"),
        "the build's lease is released: {ipam}"
    );
    // undeclared: a validation error naming the image
    std::fs::write(
        m.path().join("host.toml"),
        "[image.app]\nref = \"localhost/net-built:1\"\nbuild = { context = \"app/\", network = \"nosuch\" }\n",
    )
    .unwrap();
    let o = berth(b.s(), &["validate", m.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("build network \"nosuch\" is not declared"),
        "{err}"
    );
}
