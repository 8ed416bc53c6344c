//! Images against a real registry (Debian's docker-registry on 127.0.0.1), with skopeo and
//! umoci as independent peers. Run as root (layer ownership, whiteouts, overlay mounts).

mod common;
use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

/// A layer over busybox: a file, a whiteout of /www/index.html, an opaque /etc/app.d,
/// a hardlink, ownership and modes.
fn second_layer() -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc/app.d", 0o755)
        .file("etc/app.d/.wh..wh..opq", b"", 0o644)
        .file("etc/app.d/new.conf", b"new=1\n", 0o640)
        .file("www/.wh.index.html", b"", 0o644)
        .file_owned("srv/data.txt", b"owned by app\n", 0o600, 1000, 1000)
        .hardlink("srv/data-link.txt", "srv/data.txt")
        .file("bin/tool", b"#!/bin/sh\necho tool\n", 0o4755)
        .build()
}

fn first_extra_layer() -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc/app.d", 0o755)
        .file("etc/app.d/old.conf", b"old=1\n", 0o644)
        .build()
}

#[test]
fn pull_matches_umoci_and_skopeo_reads_the_store() {
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let layers = vec![busybox_layer(), first_extra_layer(), second_layer()];
    let digest = write_layout(layout.path(), "t", &layers, &["/bin/sh"]);
    let dest = format!("{}/interop/app:1", reg.addr);
    skopeo_push(layout.path(), "t", &dest);

    let state = tempfile::tempdir().unwrap();
    let out = ok(&berth(state.path(), &["image", "pull", "--quiet", &dest]));
    assert!(out.is_empty(), "--quiet printed {out}");
    let out = ok(&berth(state.path(), &["image", "inspect", &dest]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["digest"], digest,
        "berth stores the manifest skopeo pushed, byte for byte"
    );
    assert_eq!(v["layers"].as_array().unwrap().len(), 3);

    // the unpacked root filesystem equals umoci's unpack of the same image
    let theirs = umoci_tree(layout.path());
    let merged = Merged::mount(state.path(), &dest);
    let ours = tree(merged.dir.path());
    assert!(
        !ours.contains_key("www/index.html"),
        "whiteout hides the lower file"
    );
    assert!(
        !ours.contains_key("etc/app.d/old.conf"),
        "opaque dir hides the lower content"
    );
    assert!(ours.contains_key("etc/app.d/new.conf"));
    assert_eq!(
        ours.get("srv/data.txt")
            .map(String::as_str)
            .unwrap_or("")
            .split(' ')
            .nth(2),
        Some("1000:1000")
    );
    assert_eq!(ours, theirs, "berth's rootfs differs from umoci's");
    drop(merged);

    // skopeo can read berth's store as an OCI layout
    let copy = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--quiet",
        &format!("oci:{}:{dest}", state.path().join("store").display()),
        &format!("oci:{}:x", copy.path().display()),
    ]);
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copy.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(idx["manifests"][0]["digest"], digest);

    // pulling again reuses everything
    let out = ok(&berth(state.path(), &["image", "pull", "--json", &dest]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reused"], 3);
    assert_eq!(v["downloaded"], 0);
}

#[test]
fn berth_push_is_read_by_skopeo_with_the_same_digest() {
    let reg = Registry::start();
    let src = format!("{}/push/src:1", reg.addr);
    push_image(&src, &[second_layer()]);
    let state = tempfile::tempdir().unwrap();
    ok(&berth(state.path(), &["image", "pull", "-q", &src]));
    let dst = format!("{}/push/dst:2", reg.addr);
    ok(&berth(state.path(), &["image", "tag", &src, &dst]));
    ok(&berth(state.path(), &["image", "push", "-q", &dst]));
    let ours: serde_json::Value =
        serde_json::from_str(&ok(&berth(state.path(), &["image", "inspect", &dst]))).unwrap();
    let out = skopeo(&["inspect", "--tls-verify=false", &format!("docker://{dst}")]);
    let theirs: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(theirs["Digest"], ours["digest"]);
    // and skopeo can copy all its blobs
    let copy = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{dst}"),
        &format!("oci:{}:x", copy.path().display()),
    ]);
    // pushing again finds every blob present
    ok(&berth(state.path(), &["image", "push", "-q", &dst]));
}

#[test]
fn pinned_digests_shared_layers_and_concurrent_pulls() {
    let reg = Registry::start();
    let a = format!("{}/share/a:1", reg.addr);
    let b = format!("{}/share/b:1", reg.addr);
    let da = push_image(
        &a,
        &[LayerBuilder::new().file("a.txt", b"a", 0o644).build()],
    );
    push_image(
        &b,
        &[LayerBuilder::new().file("b.txt", b"b", 0o644).build()],
    );
    let state = tempfile::tempdir().unwrap();
    // two berth processes pulling the same image at once
    let spawn = |r: &str| {
        Command::new(berth_bin())
            .arg("--state-dir")
            .arg(state.path())
            .args(["image", "pull", "-q", r])
            .env("BERTH_CONFIG", "/dev/null")
            .spawn()
            .unwrap()
    };
    let (mut p1, mut p2) = (spawn(&a), spawn(&a));
    assert!(p1.wait().unwrap().success() && p2.wait().unwrap().success());
    ok(&berth(state.path(), &["image", "pull", "-q", &b]));
    // the busybox base is unpacked once: 3 snapshots for 4 layers
    let snaps: Vec<_> = paths_in(&state.path().join("snapshots"))
        .into_iter()
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    // a pinned reference must match
    let pinned = format!("{}/share/a@{da}", reg.addr);
    ok(&berth(state.path(), &["image", "pull", "-q", &pinned]));
    let wrong = format!("{}/share/a@sha256:{}", reg.addr, "0".repeat(64));
    let out = berth(state.path(), &["image", "pull", "-q", &wrong]);
    assert!(!out.status.success());
    // ls shows all three references
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&berth(state.path(), &["image", "ls", "--json"]))).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 3);
}

#[test]
fn registry_errors_name_registry_and_repository() {
    let reg = Registry::start();
    let state = tempfile::tempdir().unwrap();
    let missing = format!("{}/nothing/here:1", reg.addr);
    let err = pull_error(state.path(), &missing);
    assert!(
        err.contains(&reg.addr) && err.contains("nothing/here") && err.contains("not found"),
        "{err}"
    );
    // nothing is listening here
    let dead = format!("127.0.0.1:{}/x/y:1", free_port());
    let out = berth(state.path(), &["image", "pull", "-q", &dead]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1"));
    // the store is empty and consistent
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&berth(state.path(), &["image", "ls", "--json"]))).unwrap();
    assert!(ls.as_array().unwrap().is_empty());
}

/// `image pull -q REF` that must fail with exit 1: its stderr.
fn pull_error(state: &Path, reference: &str) -> String {
    let out = berth(state, &["image", "pull", "-q", reference]);
    assert_eq!(out.status.code(), Some(1), "pull {reference} did not fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `image pull -q REF` into a fresh state directory with `config` (TOML) as the host config:
/// the state directory and berth's output.
fn pull_with_config(config: &str, reference: &str) -> (tempfile::TempDir, std::process::Output) {
    let state = tempfile::tempdir().unwrap();
    let cfg = state.path().join("host-config.toml");
    std::fs::write(&cfg, config).unwrap();
    let args = [
        "--config",
        cfg.to_str().unwrap(),
        "image",
        "pull",
        "-q",
        reference,
    ];
    let out = berth(state.path(), &args);
    (state, out)
}

fn assert_store_clean(state: &Path) {
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&berth(state, &["image", "ls", "--json"]))).unwrap();
    assert!(
        ls.as_array().unwrap().is_empty(),
        "no reference after a failed pull"
    );
    let ingest = paths_in(&state.join("store/ingest"));
    assert!(ingest.is_empty(), "ingest/ left behind {ingest:?}");
    let tmp: Vec<_> = paths_in(&state.join("snapshots"))
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(tmp.is_empty(), "temporary snapshots left behind {tmp:?}");
}

#[test]
fn transient_faults_are_retried() {
    let reg = Registry::start();
    let name = "faults/app:1";
    push_image(&format!("{}/{name}", reg.addr), &[second_layer()]);
    for (fault, count) in [
        (Fault::ResetBlobs, 2),
        (Fault::Error500, 3),
        (Fault::TooManyRequests, 2),
        (Fault::CorruptBlobs, 1),
    ] {
        let proxy = FaultProxy::start(&reg.addr, fault, count);
        let state = tempfile::tempdir().unwrap();
        let r = format!("{}/{name}", proxy.addr);
        let out = berth(state.path(), &["image", "pull", "-q", &r]);
        assert!(
            out.status.success(),
            "{fault:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            proxy.faults_left.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{fault:?}: faults were injected"
        );
        assert_unpacked(state.path(), &r);
    }
}

#[test]
fn persistent_faults_fail_cleanly() {
    let reg = Registry::start();
    let name = "faults/bad:1";
    push_image(&format!("{}/{name}", reg.addr), &[]);
    // a registry that always corrupts blobs: the digest error names the blob, nothing stays
    let proxy = FaultProxy::start(&reg.addr, Fault::CorruptBlobs, usize::MAX);
    let state = tempfile::tempdir().unwrap();
    let err = pull_error(state.path(), &format!("{}/{name}", proxy.addr));
    assert!(
        err.contains("sha256:") && err.contains("discarded"),
        "{err}"
    );
    assert_store_clean(state.path());
    let blobs = paths_in(&state.path().join("store/blobs/sha256"));
    assert!(
        blobs.is_empty(),
        "no corrupt blob enters the store: {blobs:?}"
    );
    // a registry that always answers 500
    let proxy = FaultProxy::start(&reg.addr, Fault::Error500, usize::MAX);
    let out = berth(
        state.path(),
        &["image", "pull", "-q", &format!("{}/{name}", proxy.addr)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("500"));
    assert_store_clean(state.path());
}

/// A tmpfs of `size` for a test's state directory: a disk that fills up. Unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let d = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount a tmpfs");
        SmallDisk(d)
    }

    fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.0.path())
            .status()
            .unwrap();
        assert!(st.success(), "resize the tmpfs");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_disk_fails_the_pull_cleanly_and_a_retry_after_freeing_space_works() {
    let reg = Registry::start();
    let r = format!("{}/full/disk:1", reg.addr);
    let big = LayerBuilder::new()
        .dir("data", 0o755)
        .file("data/noise", &noise(12 << 20, 1), 0o644)
        .build();
    push_image(&r, &[big]);
    let disk = SmallDisk::new("8m");
    let state = disk.0.path().join("state");
    // the missing layer (12 MiB to download, reckoned at 4x that unpacked) does not fit
    // beside the reserve (10% of the disk): refused before anything is downloaded, saying
    // the sizes
    let err = pull_error(&state, &r);
    assert!(err.contains("nothing was downloaded"), "{err}");
    assert!(
        err.contains("to download") && err.contains("keeps a reserve of"),
        "{err}"
    );
    assert!(
        err.contains(&state.display().to_string()),
        "names the path: {err}"
    );
    assert_store_clean(&state);
    // without a reserve it still does not fit: refused the same way
    let cfg = disk.0.path().join("no-reserve.toml");
    std::fs::write(&cfg, "[store]\nmin_free = \"0\"\n").unwrap();
    let out = berth(
        &state,
        &["--config", cfg.to_str().unwrap(), "image", "pull", "-q", &r],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was downloaded"), "{err}");
    assert_store_clean(&state);
    // a layer that compresses 1000 times passes the check and fills the disk when it is
    // unpacked: that pull fails cleanly all the same (busybox's layer fits, 40 MiB of
    // zeros do not)
    disk.resize("16m");
    let zeros = format!("{}/full/zeros:1", reg.addr);
    push_image(
        &zeros,
        &[LayerBuilder::new()
            .dir("z", 0o755)
            .file("z/zeros", &vec![0u8; 40 << 20], 0o644)
            .build()],
    );
    let out = berth(
        &state,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "image",
            "pull",
            "-q",
            &zeros,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(&state.display().to_string()), "{err}");
    assert_store_clean(&state);
    // room again: the same pull completes, nothing half-written got in its way
    disk.resize("128m");
    ok(&berth(&state, &["image", "pull", "-q", &r]));
    assert_unpacked(&state, &r);
}

#[test]
fn credentials_from_docker_config_with_basic_and_bearer_auth() {
    let reg = Registry::start();
    let repo = "private/bb";
    push_image(&format!("{}/{repo}:1", reg.addr), &[]);
    for mode in [Fault::BasicAuth, Fault::BearerAuth] {
        let proxy = FaultProxy::start(&reg.addr, mode, usize::MAX);
        let state = tempfile::tempdir().unwrap();
        let r = format!("{}/{repo}:1", proxy.addr);
        // berth() points DOCKER_CONFIG here
        let cfg_dir = state.path().join("no-docker-config");
        let pull = || berth(state.path(), &["image", "pull", "-q", &r]);
        // no credentials, then wrong ones: refused, saying so, with the registry and
        // repository named
        for creds in [None, Some("wrong")] {
            if let Some(p) = creds {
                docker_config(&cfg_dir, &proxy.addr, AUTH_USER, p);
            }
            let out = pull();
            assert_eq!(out.status.code(), Some(1), "{mode:?} {creds:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&proxy.addr)
                    && err.contains(repo)
                    && err.contains("authentication required"),
                "{mode:?} {creds:?}: {err}"
            );
            assert_store_clean(state.path());
        }
        docker_config(&cfg_dir, &proxy.addr, AUTH_USER, AUTH_PASS);
        ok(&pull());
        assert_unpacked(state.path(), &r);
    }
    // credentials accepted but no permission: 403, said as such
    let proxy = FaultProxy::start(&reg.addr, Fault::Forbidden, usize::MAX);
    let state = tempfile::tempdir().unwrap();
    let err = pull_error(state.path(), &format!("{}/{repo}:1", proxy.addr));
    assert!(
        err.contains(&format!("{}: access to {repo} denied (403)", proxy.addr)),
        "{err}"
    );
    assert_store_clean(state.path());
}

/// A non-loopback address of this host for the test's lifetime: one from 198.18.0.0/15
/// (benchmarking space) on `lo`, removed on drop.
struct DummyAddr {
    ip: String,
}

impl DummyAddr {
    fn add() -> DummyAddr {
        let pid = std::process::id();
        let ip = format!("198.18.{}.{}", (pid >> 8) & 0xff, (pid & 0xff).max(1));
        let st = Command::new("ip")
            .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .status()
            .unwrap();
        assert!(st.success(), "ip addr add {ip}/32 dev lo");
        DummyAddr { ip }
    }
}

impl Drop for DummyAddr {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.ip), "dev", "lo"])
            .status();
    }
}

/// A CA and a server certificate for `ip` signed by it, made with openssl: (ca.pem,
/// cert.pem, key.pem).
fn certificates(dir: &Path, ip: &str) -> (PathBuf, PathBuf, PathBuf) {
    let script = format!(
        "set -e
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=berth-test-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout key.pem -out req.csr -subj /CN={ip} 2>/dev/null
printf 'subjectAltName=IP:{ip}\\nbasicConstraints=CA:FALSE\\nkeyUsage=digitalSignature,keyEncipherment\\nextendedKeyUsage=serverAuth\\n' > ext.cnf
openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 -extfile ext.cnf 2>/dev/null"
    );
    let st = Command::new("sh")
        .args(["-c", &script])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "openssl");
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

#[test]
fn https_with_a_configured_ca_and_plain_http_only_when_insecure() {
    let reg = Registry::start();
    push_image(&format!("{}/tls/bb:1", reg.addr), &[]);
    let dummy = DummyAddr::add();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(certs.path(), &dummy.ip);
    // two more registries over the same images, on an address that is not loopback
    let tls = Registry::start_at(&dummy.ip, Some((&cert, &key)), Some(&reg.data_dir()));
    let plain = Registry::start_at(&dummy.ip, None, Some(&reg.data_dir()));
    let pull = |r: &str, config: Option<&str>| {
        let (state, out) = pull_with_config(config.unwrap_or(""), r);
        if out.status.success() {
            assert_unpacked(state.path(), r);
        } else {
            assert_store_clean(state.path());
        }
        out
    };
    // HTTPS by default: a certificate from an unknown CA is refused, naming the registry
    let r = format!("{}/tls/bb:1", tls.addr);
    let out = pull(&r, None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&tls.addr) && err.contains("TLS handshake failed") && err.contains("ca_file"),
        "{err}"
    );
    // ... and trusted with the registry's ca_file
    let c = format!(
        "[registry.\"{}\"]\nca_file = \"{}\"\n",
        tls.addr,
        ca.display()
    );
    ok(&pull(&r, Some(&c)));
    // a plain-HTTP registry off loopback: not without insecure = true
    let r = format!("{}/tls/bb:1", plain.addr);
    let out = pull(&r, None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&plain.addr) && err.contains("insecure = true"),
        "{err}"
    );
    let c = format!("[registry.\"{}\"]\ninsecure = true\n", plain.addr);
    ok(&pull(&r, Some(&c)));
}

#[test]
fn mirrors_are_tried_in_order_then_the_registry() {
    let reg = Registry::start();
    push_image(&format!("{}/mir/bb:1", reg.addr), &[]);
    let origin = FaultProxy::start(&reg.addr, Fault::None, 0);
    let mirror = FaultProxy::start(&reg.addr, Fault::None, 0);
    let dead = format!("127.0.0.1:{}", free_port());
    let r = format!("{}/mir/bb:1", origin.addr);
    let pull = |mirrors: &[&str]| {
        let list: Vec<String> = mirrors.iter().map(|m| format!("\"{m}\"")).collect();
        let config = format!(
            "[registry.\"{}\"]\nmirrors = [{}]\n",
            origin.addr,
            list.join(", ")
        );
        let (state, out) = pull_with_config(&config, &r);
        ok(&out);
        assert_unpacked(state.path(), &r);
    };
    // a dead mirror, then a live one: the live mirror serves, the registry is not asked
    pull(&[&dead, &mirror.addr]);
    assert!(mirror.requests.load(Ordering::SeqCst) > 0);
    assert_eq!(origin.requests.load(Ordering::SeqCst), 0);
    // only dead mirrors: the registry itself
    pull(&[&dead]);
    assert!(origin.requests.load(Ordering::SeqCst) > 0);
}

#[test]
fn progress_is_lines_off_a_terminal_bars_on_one_and_nothing_when_quiet() {
    let reg = Registry::start();
    let r = format!("{}/prog/bb:1", reg.addr);
    push_image(&r, &[second_layer()]);
    let layers: Vec<String> = {
        let state = tempfile::tempdir().unwrap();
        ok(&berth(state.path(), &["image", "pull", "-q", &r]));
        let v: serde_json::Value =
            serde_json::from_str(&ok(&berth(state.path(), &["image", "inspect", &r]))).unwrap();
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let d = l["digest"].as_str().unwrap_or_else(|| l.as_str().unwrap());
                d.trim_start_matches("sha256:")[..12].to_string()
            })
            .collect()
    };
    assert_eq!(layers.len(), 2);
    // not a terminal: a line per layer when it is done
    let state = tempfile::tempdir().unwrap();
    let out = berth(state.path(), &["image", "pull", &r]);
    let err = String::from_utf8_lossy(&out.stderr);
    for l in &layers {
        assert!(
            err.lines()
                .any(|x| x.starts_with(&format!("{l}: done (")) && x.ends_with("/s)")),
            "{err}"
        );
    }
    // --quiet: nothing at all
    let state = tempfile::tempdir().unwrap();
    let out = berth(state.path(), &["image", "pull", "--quiet", &r]);
    assert!(out.status.success() && out.stderr.is_empty() && out.stdout.is_empty());
    // a terminal (script(1) gives one): a bar per layer with bytes and rate
    let state = tempfile::tempdir().unwrap();
    let cmd = format!(
        "{} --state-dir {} --config /dev/null image pull {r}",
        berth_bin(),
        state.path().display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("DOCKER_CONFIG", state.path().join("none"))
        .env("TERM", "xterm")
        .output()
        .unwrap();
    assert!(out.status.success());
    let tty = String::from_utf8_lossy(&out.stdout);
    for l in &layers {
        assert!(
            tty.lines()
                .any(|x| x.contains(l) && x.contains("[===") && x.contains("/s done")),
            "{tty:?}"
        );
    }
}

#[test]
fn zstd_and_uncompressed_layers_unpack_like_gzip_ones() {
    let reg = Registry::start();
    let layers = [busybox_layer(), first_extra_layer(), second_layer()];
    let packed =
        |p: [Packing; 3]| -> Vec<(Vec<u8>, Packing)> { layers.iter().cloned().zip(p).collect() };
    let push = |name: &str, p: [Packing; 3]| -> String {
        let dir = tempfile::tempdir().unwrap();
        write_layout_packed(dir.path(), "t", &packed(p), &["/bin/sh"]);
        let r = format!("{}/packing/{name}:1", reg.addr);
        skopeo_push(dir.path(), "t", &r);
        r
    };
    let gz = push("gz", [Packing::Gzip; 3]);
    let mixed = push(
        "mixed",
        [Packing::Gzip, Packing::Zstd, Packing::Uncompressed],
    );
    let pulled = |r: &str| {
        let state = tempfile::tempdir().unwrap();
        ok(&berth(state.path(), &["image", "pull", "-q", r]));
        assert_unpacked(state.path(), r);
        state
    };
    let a = pulled(&gz);
    let b = pulled(&mixed);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&berth(b.path(), &["image", "inspect", &mixed]))).unwrap();
    let types: Vec<&str> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["media_type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar"
        ],
        "{v}"
    );
    let (ma, mb) = (
        Merged::mount(a.path(), &gz),
        Merged::mount(b.path(), &mixed),
    );
    assert_eq!(tree(ma.dir.path()), tree(mb.dir.path()));
    drop((ma, mb));
    // both in one store: the same diffIDs, so the same snapshots, and both blobs kept
    ok(&berth(a.path(), &["image", "pull", "-q", &mixed]));
    assert_unpacked(a.path(), &mixed);
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&berth(a.path(), &["image", "ls", "--json"]))).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2, "{ls}");
    let snapshots = std::fs::read_dir(a.path().join("snapshots"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))
        })
        .count();
    assert_eq!(snapshots, 3, "one snapshot per chain ID");
}

#[test]
fn layers_download_in_parallel_up_to_the_configured_bound() {
    let reg = Registry::start();
    let extra: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            LayerBuilder::new()
                .file(
                    &format!("l{i}.txt"),
                    format!("layer {i}\n").as_bytes(),
                    0o644,
                )
                .build()
        })
        .collect();
    let r0 = format!("{}/par/bb:1", reg.addr);
    push_image(&r0, &extra);
    let pull_max = |concurrency: usize| -> usize {
        let proxy = FaultProxy::start(&reg.addr, Fault::SlowBlobs, usize::MAX);
        let r = format!("{}/par/bb:1", proxy.addr);
        let (state, out) = pull_with_config(&format!("[pull]\nconcurrency = {concurrency}\n"), &r);
        ok(&out);
        assert_unpacked(state.path(), &r);
        proxy.blobs_in_flight.1.load(Ordering::SeqCst)
    };
    assert_eq!(pull_max(1), 1, "concurrency = 1: one layer at a time");
    let most = pull_max(4);
    assert!(
        (2..=4).contains(&most),
        "concurrency = 4: the four layers overlap: {most} at once"
    );
}

#[test]
fn an_image_index_resolves_to_this_hosts_platform() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let other = if arch() == "amd64" { "arm64" } else { "amd64" };
    let mine = put_image(
        dir.path(),
        &[(busybox_layer(), Packing::Gzip)],
        &["/bin/sh"],
        arch(),
    );
    let theirs = put_image(
        dir.path(),
        &[(
            LayerBuilder::new().file("other.txt", b"x", 0o644).build(),
            Packing::Gzip,
        )],
        &["/bin/sh"],
        other,
    );
    let desc = |(d, size): &(String, usize), a: &str| {
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": d, "size": size, "platform": {"architecture": a, "os": "linux"}})
    };
    // the other platform first: berth must choose, not take the first entry
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [desc(&theirs, other), desc(&mine, arch())],
    }))
    .unwrap();
    let id = put_blob(dir.path(), &index);
    tag_in_layout(
        dir.path(),
        "multi",
        &serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": id, "size": index.len()}),
    );
    let r = format!("{}/multi/bb:1", reg.addr);
    skopeo(&[
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", dir.path().display()),
        &format!("docker://{r}"),
    ]);
    let state = tempfile::tempdir().unwrap();
    ok(&berth(state.path(), &["image", "pull", "-q", &r]));
    assert_unpacked(state.path(), &r);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&berth(state.path(), &["image", "inspect", &r]))).unwrap();
    assert_eq!(v["digest"], mine.0, "the linux/{} manifest: {v}", arch());
    assert_eq!(v["config"]["architecture"], arch());
    // the same as a Docker manifest list of schema2 manifests (skopeo converts; digests change)
    let r2 = format!("{}/multi/bb-docker:1", reg.addr);
    skopeo(&[
        "copy",
        "--quiet",
        "--all",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", dir.path().display()),
        &format!("docker://{r2}"),
    ]);
    ok(&berth(state.path(), &["image", "pull", "-q", &r2]));
    assert_unpacked(state.path(), &r2);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&berth(state.path(), &["image", "inspect", &r2]))).unwrap();
    assert_eq!(
        v["media_type"], "application/vnd.docker.distribution.manifest.v2+json",
        "{v}"
    );
    assert_eq!(v["config"]["architecture"], arch(), "{v}");
}

/// A registry that streams endless bodies, trickles, stalls or never answers: every pull fails
/// with the bound that was hit named, in bounded memory (an address-space limit of 4 GiB) and
/// time (the test gives up on a pull after 3 minutes), and leaves the store clean.
#[test]
fn hostile_registries_are_bounded_in_memory_and_time() {
    let reg = Registry::start();
    let name = "hostile/app:1";
    push_image(&format!("{}/{name}", reg.addr), &[]);
    let cases = [
        (Fault::EndlessError, "HTTP 500"),
        (
            Fault::EndlessToken,
            "token response: response larger than 65536 bytes",
        ),
        (
            Fault::TrickleManifests,
            "manifest body: not complete within 2 s",
        ),
        (Fault::StallBlobs, "download: stalled: 100 bytes in 2 s"),
        (Fault::Silent, "no response within 2 s"),
    ];
    let threads: Vec<_> = cases
        .into_iter()
        .map(|(fault, expected)| {
            let upstream = reg.addr.clone();
            std::thread::spawn(move || {
                let proxy = FaultProxy::start(&upstream, fault, usize::MAX);
                let state = tempfile::tempdir().unwrap();
                let cfg = state.path().join("host-config.toml");
                std::fs::write(&cfg, "[pull]\ntimeout = \"2s\"\nstall_timeout = \"2s\"\n").unwrap();
                let mut child = Command::new("prlimit")
                    .arg(format!("--as={}", 4u64 << 30))
                    .arg(berth_bin())
                    .arg("--state-dir")
                    .arg(state.path())
                    .arg("--config")
                    .arg(&cfg)
                    .args(["image", "pull", "-q", &format!("{}/{name}", proxy.addr)])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                let end = std::time::Instant::now() + std::time::Duration::from_secs(180);
                let status = loop {
                    if let Some(st) = child.try_wait().unwrap() {
                        break st;
                    }
                    if std::time::Instant::now() > end {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!("{fault:?}: the pull still runs after 3 minutes");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                };
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert_eq!(status.code(), Some(1), "{fault:?}: {err}");
                assert!(err.contains(expected), "{fault:?}: {err}");
                assert!(err.len() < 4096, "{fault:?}: a bounded message: {err}");
                assert_store_clean(state.path());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// `image prune` while a pull is in progress (its layers delayed by the registry) waits for
/// the pull: the config and layers the pull stored but had not yet tagged are not collected,
/// and the pulled image is whole.
#[test]
fn prune_during_a_pull_waits_for_it_and_collects_nothing_the_pull_stored() {
    let reg = Registry::start();
    let name = "lease/app:1";
    push_image(&format!("{}/{name}", reg.addr), &[second_layer()]);
    let proxy = FaultProxy::start(&reg.addr, Fault::VerySlowBlobs, usize::MAX);
    let state = tempfile::tempdir().unwrap();
    let r = format!("{}/{name}", proxy.addr);
    let mut pull = Command::new(berth_bin())
        .arg("--state-dir")
        .arg(state.path())
        .args(["image", "pull", "-q", &r])
        .env("BERTH_CONFIG", "/dev/null")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // the pull has stored the config and waits for its layers
    let blobs = state.path().join("store/blobs/sha256");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while paths_in(&blobs).is_empty() || proxy.blobs_in_flight.0.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < end, "the pull did not start");
        assert!(pull.try_wait().unwrap().is_none(), "the pull ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let config = paths_in(&blobs);
    let prune = berth(state.path(), &["image", "prune", "--json"]);
    ok(&prune);
    let st = pull.wait().unwrap();
    let mut err = String::new();
    pull.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(st.success(), "{err}");
    for p in &config {
        assert!(p.exists(), "{} was collected under the pull", p.display());
    }
    assert_unpacked(state.path(), &r);
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&berth(state.path(), &["image", "ls", "--json"]))).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
}

/// A pull killed mid-download leaves its partial blob in the ingest area; `image prune`
/// removes it (no live process holds it) and counts it as freed.
#[test]
fn prune_removes_what_a_killed_pull_left_in_ingest() {
    let reg = Registry::start();
    let name = "ingest/app:1";
    push_image(&format!("{}/{name}", reg.addr), &[]);
    let proxy = FaultProxy::start(&reg.addr, Fault::StallBlobs, usize::MAX);
    let state = tempfile::tempdir().unwrap();
    let mut pull = Command::new(berth_bin())
        .arg("--state-dir")
        .arg(state.path())
        .args(["image", "pull", "-q", &format!("{}/{name}", proxy.addr)])
        .env("BERTH_CONFIG", "/dev/null")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ingest = state.path().join("store/ingest");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while paths_in(&ingest).is_empty() {
        assert!(std::time::Instant::now() < end, "no ingest file appeared");
        assert!(pull.try_wait().unwrap().is_none(), "the pull ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    pull.kill().unwrap();
    pull.wait().unwrap();
    assert!(
        !paths_in(&ingest).is_empty(),
        "the killed pull left its file"
    );
    let out: serde_json::Value =
        serde_json::from_str(&ok(&berth(state.path(), &["image", "prune", "--json"]))).unwrap();
    assert!(paths_in(&ingest).is_empty(), "{:?}", paths_in(&ingest));
    assert!(out["bytes_freed"].as_u64().unwrap() > 0, "{out}");
}

/// A manifest that names a blob the store already holds, with another size, is refused (it
/// would otherwise be accepted with the lie, and `image ls` showed its sizes); `image ls`
/// sizes come from the stored blobs.
#[test]
fn a_manifest_lying_about_a_stored_blobs_size_is_refused() {
    let layout = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write_layout(layout.path(), "t", &[busybox_layer()], &["/bin/sh"]);
    ok(&berth(
        state.path(),
        &[
            "image",
            "import",
            "--tag",
            "example.com/lie/a:1",
            layout.path().to_str().unwrap(),
        ],
    ));
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&berth(state.path(), &["image", "ls", "--json"]))).unwrap();
    let honest = ls[0]["size"].as_u64().unwrap();
    let stored: u64 = paths_in(&state.path().join("store/blobs/sha256"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    // the blobs of the image: all but its manifest
    assert!(honest > 0 && honest < stored, "{honest} of {stored}");
    // the same layer claimed to be 1 PB
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.path().join("index.json")).unwrap()).unwrap();
    let mdigest = idx["manifests"][0]["digest"].as_str().unwrap().to_string();
    let mpath = layout.path().join("blobs/sha256").join(&mdigest[7..]);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["layers"][0]["size"] = serde_json::json!(1u64 << 50);
    let desc = put_blob(layout.path(), &serde_json::to_vec(&m).unwrap());
    let size = std::fs::metadata(layout.path().join("blobs/sha256").join(&desc[7..]))
        .unwrap()
        .len();
    tag_in_layout(
        layout.path(),
        "t",
        &serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": desc, "size": size
        }),
    );
    let out = berth(
        state.path(),
        &[
            "image",
            "import",
            "--tag",
            "example.com/lie/b:1",
            layout.path().to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1125899906842624"), "{err}");
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&berth(state.path(), &["image", "ls", "--json"]))).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
}

/// A gzip-compressed tar of the directory `dir` plus `extra` members streamed from readers
/// (name, size, reader).
fn archive_of(dir: &Path, extra: Vec<(&str, u64, Box<dyn std::io::Read>)>) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    b.append_dir_all(".", dir).unwrap();
    for (name, size, r) in extra {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, r).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// An archive holding 300 MiB of members no image names (zeros: a 300 KB archive) imports
/// into a 64 MiB state directory: only the members the image names are read to disk. A
/// config over the pull limit is refused like a pulled one, and errors name the user's file,
/// printably.
#[test]
fn import_reads_only_what_the_image_names_within_the_pull_limits() {
    let layout = tempfile::tempdir().unwrap();
    write_layout(
        layout.path(),
        "example.com/imp/junk:1",
        &[busybox_layer()],
        &["/bin/sh"],
    );
    let work = tempfile::tempdir().unwrap();
    let junk = work.path().join("junk.tar.gz");
    std::fs::write(
        &junk,
        archive_of(
            layout.path(),
            vec![
                (
                    "junk/zeros",
                    200 << 20,
                    Box::new(std::io::repeat(0).take(200 << 20)),
                ),
                (
                    "blobs/sha256/unreferenced",
                    100 << 20,
                    Box::new(std::io::repeat(0).take(100 << 20)),
                ),
            ],
        ),
    )
    .unwrap();
    // the archive itself fits the disk many times over; what it unpacks to would not
    assert!(std::fs::metadata(&junk).unwrap().len() < 16 << 20);
    let disk = SmallDisk::new("64m");
    let state = disk.0.path().join("state");
    ok(&berth(&state, &["image", "import", junk.to_str().unwrap()]));
    assert_unpacked(&state, "example.com/imp/junk:1");
    assert!(paths_in(&state.join("store/ingest")).is_empty());

    // a config of 17 MiB, over the 16 MiB a pull accepts
    let big = tempfile::tempdir().unwrap();
    let mut config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"pad":""#
            .to_vec();
    config.extend(std::iter::repeat_n(b'x', 17 << 20));
    config.extend(b"\"}");
    let cdigest = put_blob(big.path(), &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cdigest, "size": config.len()},
        "layers": []
    });
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let mdigest = put_blob(big.path(), &mbytes);
    tag_in_layout(
        big.path(),
        "example.com/imp/big:1",
        &serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": mdigest, "size": mbytes.len()}),
    );
    let big_tar = work.path().join("big.tar.gz");
    std::fs::write(&big_tar, archive_of(big.path(), vec![])).unwrap();
    let out = berth(&state, &["image", "import", big_tar.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(big_tar.to_str().unwrap()),
        "names the file: {err}"
    );
    assert!(err.contains("more than the 16777216 allowed"), "{err}");
    assert!(!err.contains("ingest/"), "no internal paths: {err}");

    // random bytes: refused, named, and nothing of them printed raw
    let noise_file = work.path().join("noise.tar");
    std::fs::write(&noise_file, noise(1 << 20, 7)).unwrap();
    let out = berth(&state, &["image", "import", noise_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("noise.tar"), "{err}");
    assert!(err.len() < 2000, "{err}");
    assert!(!err.chars().any(|c| c.is_control() && c != '\n'), "{err:?}");
}

/// A `docker save` directory at `dir/save` with an empty config and the given RepoTags and
/// Layers (JSON arrays).
fn docker_save_dir(dir: &Path, repo_tags: &str, layers: &str) -> PathBuf {
    let save = dir.join("save");
    std::fs::create_dir(&save).unwrap();
    std::fs::write(
        save.join("config.json"),
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    )
    .unwrap();
    std::fs::write(
        save.join("manifest.json"),
        format!(r#"[{{"Config":"config.json","RepoTags":{repo_tags},"Layers":{layers}}}]"#),
    )
    .unwrap();
    save
}

/// A `docker save` archive whose tags are all unusable says why each was refused.
#[test]
fn import_says_why_each_tag_was_refused() {
    let work = tempfile::tempdir().unwrap();
    let save = docker_save_dir(
        work.path(),
        r#"["latest","Bad Name:1","ex.com/ok:\u001b[2J"]"#,
        "[]",
    );
    let state = tempfile::tempdir().unwrap();
    let out = berth(state.path(), &["image", "import", save.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"latest\" is a bare tag"), "{err}");
    assert!(err.contains("\"Bad Name:1\""), "{err}");
    assert!(err.contains("\\u{1b}"), "escaped: {err}");
    assert!(!err.contains('\u{1b}'), "{err:?}");
    assert!(err.contains("pass --tag REF"), "{err}");
}

/// A directory import reads only regular files inside the directory, through no symlink:
/// a member linked to a file outside is refused (it would be copied into an image), and a
/// FIFO is refused without blocking.
#[test]
fn a_directory_import_reads_nothing_outside_it_and_opens_no_fifo() {
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("secret.tar");
    std::fs::write(
        &secret,
        LayerBuilder::new().file("secret", b"s3cret", 0o600).build(),
    )
    .unwrap();
    let save = docker_save_dir(work.path(), r#"["example.com/leak:1"]"#, r#"["layer.tar"]"#);
    std::os::unix::fs::symlink(&secret, save.join("layer.tar")).unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = berth(state.path(), &["image", "import", save.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("layer.tar"), "{err}");
    assert!(paths_in(&state.path().join("store/blobs/sha256")).is_empty());
    // a FIFO manifest.json: refused at once, not waited on
    std::fs::remove_file(save.join("manifest.json")).unwrap();
    nix::unistd::mkfifo(&save.join("manifest.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let out = berth(state.path(), &["image", "import", save.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a FIFO"), "{err}");
}
