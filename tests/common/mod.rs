//! Shared test harness: a real registry (Debian's `docker-registry`) on a free 127.0.0.1 port,
//! OCI images built here from Debian's busybox-static, a fault-injecting HTTP proxy, and
//! helpers to drive the berth binary with its own state directory.
#![allow(dead_code)]

pub mod harness;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub fn berth_bin() -> &'static str {
    env!("CARGO_BIN_EXE_berth")
}

/// Run berth with a state directory; config comes from `BERTH_CONFIG` = /dev/null.
pub fn berth(state: &Path, args: &[&str]) -> Output {
    Command::new(berth_bin())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env("BERTH_CONFIG", "/dev/null")
        .env("DOCKER_CONFIG", state.join("no-docker-config"))
        .output()
        .expect("run berth")
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "berth failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until the registry at `addr` answers (a TLS one: until it accepts connections).
fn wait_http(addr: &str, tls: bool) -> bool {
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect(addr) {
            if tls {
                return true;
            }
            let _ = s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.1 200") {
                return true;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// A docker-registry process on 127.0.0.1, stopped on drop.
pub struct Registry {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_at("127.0.0.1", None, None)
    }

    /// Where this registry keeps its images (another one may serve them too).
    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// A registry on `ip` (a free port), serving TLS with `(certificate, key)` if given, over
    /// the images in `data` (another registry's [`Registry::data_dir`]) if given.
    pub fn start_at(ip: &str, tls: Option<(&Path, &Path)>, data: Option<&Path>) -> Registry {
        let bin = ["/usr/bin/docker-registry", "/usr/local/bin/docker-registry"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("docker-registry is not installed (apt-get install docker-registry; .ci/run does this)");
        let dir = tempfile::tempdir().unwrap();
        let data = data
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("data"));
        let tls_cfg = tls
            .map(|(c, k)| {
                format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    c.display(),
                    k.display()
                )
            })
            .unwrap_or_default();
        for _ in 0..5 {
            let port = free_port();
            let addr = format!("{ip}:{port}");
            let cfg = dir.path().join("config.yml");
            std::fs::write(
                &cfg,
                format!(
                    "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{tls_cfg}",
                    data.display()
                ),
            )
            .unwrap();
            let child = Command::new(bin)
                .arg("serve")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut reg = Registry {
                child,
                addr: addr.clone(),
                _dir: tempfile::tempdir().unwrap(),
            };
            if wait_http(&addr, tls.is_some()) {
                reg._dir = dir;
                return reg;
            }
            let _ = reg.child.kill();
        }
        panic!("docker-registry did not come up");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(kind);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    h
}

/// A layer under construction (an uncompressed tar).
pub struct LayerBuilder(tar::Builder<Vec<u8>>);

impl LayerBuilder {
    pub fn new() -> Self {
        LayerBuilder(tar::Builder::new(Vec::new()))
    }
    pub fn dir(mut self, p: &str, mode: u32) -> Self {
        let h = header(p, 0, mode, tar::EntryType::Directory);
        self.0.append(&h, std::io::empty()).unwrap();
        self
    }
    pub fn file(mut self, p: &str, data: &[u8], mode: u32) -> Self {
        let h = header(p, data.len() as u64, mode, tar::EntryType::Regular);
        self.0.append(&h, data).unwrap();
        self
    }
    pub fn file_owned(mut self, p: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = header(p, data.len() as u64, mode, tar::EntryType::Regular);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    pub fn symlink(mut self, p: &str, target: &str) -> Self {
        let mut h = header(p, 0, 0o777, tar::EntryType::Symlink);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        self.0.append(&h, std::io::empty()).unwrap();
        self
    }
    pub fn hardlink(mut self, p: &str, target: &str) -> Self {
        let mut h = header(p, 0, 0o644, tar::EntryType::Link);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        self.0.append(&h, std::io::empty()).unwrap();
        self
    }
    pub fn build(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// busybox-static with the applets tests use, /etc/passwd and /etc/group.
pub fn busybox_layer() -> Vec<u8> {
    let bb = std::fs::read("/bin/busybox")
        .or_else(|_| std::fs::read("/usr/bin/busybox"))
        .expect("busybox-static is not installed (apt-get install busybox-static)");
    let mut l = LayerBuilder::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("tmp", 0o1777)
        .dir("www", 0o755)
        .file("bin/busybox", &bb, 0o755);
    for a in [
        "sh", "ls", "cat", "echo", "httpd", "wget", "sleep", "true", "false", "id", "env", "ps",
        "grep", "head", "nc", "mkdir", "touch", "dd", "yes", "hostname", "stat", "test", "seq",
        "tail", "mknod",
    ] {
        l = l.symlink(&format!("bin/{a}"), "busybox");
    }
    l.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644)
        .file("etc/group", b"root:x:0:\napp:x:1000:\nextra:x:2000:app\nnobody:x:65534:\n", 0o644)
        .file("www/index.html", b"hello from berth\n", 0o644)
        .build()
}

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// Write an OCI image layout at `dir` with one image tagged `tag`, layers gzip-compressed.
/// Returns the manifest digest.
pub fn write_layout(dir: &Path, tag: &str, layers: &[Vec<u8>], cmd: &[&str]) -> String {
    let gz: Vec<(Vec<u8>, Packing)> = layers.iter().map(|l| (l.clone(), Packing::Gzip)).collect();
    write_layout_packed(dir, tag, &gz, cmd)
}

/// How a test layer is stored in an image.
#[derive(Clone, Copy, Debug)]
pub enum Packing {
    Gzip,
    Zstd,
    Uncompressed,
}

/// [`write_layout`] with each layer compressed as given.
pub fn write_layout_packed(
    dir: &Path,
    tag: &str,
    layers: &[(Vec<u8>, Packing)],
    cmd: &[&str],
) -> String {
    let (md, size) = put_image(dir, layers, cmd, arch());
    tag_in_layout(
        dir,
        tag,
        &serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": size}),
    );
    md
}

/// Put a blob into an OCI layout; returns its digest.
pub fn put_blob(dir: &Path, b: &[u8]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let d = sha256(b);
    std::fs::write(blobs.join(&d[7..]), b).unwrap();
    d
}

/// Make `desc` the layout's only image, named `tag`.
pub fn tag_in_layout(dir: &Path, tag: &str, desc: &serde_json::Value) {
    let mut desc = desc.clone();
    desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Put an image's layers, config (for `architecture`) and manifest into an OCI layout, without
/// naming it; returns the manifest's digest and size.
pub fn put_image(
    dir: &Path,
    layers: &[(Vec<u8>, Packing)],
    cmd: &[&str],
    architecture: &str,
) -> (String, usize) {
    let put = |b: &[u8]| put_blob(dir, b);
    let mut diff_ids = vec![];
    let mut descs = vec![];
    for (l, packing) in layers {
        diff_ids.push(sha256(l));
        let (blob, media_type) = match packing {
            Packing::Gzip => (gzip(l), "application/vnd.oci.image.layer.v1.tar+gzip"),
            Packing::Zstd => (
                zstd::encode_all(&l[..], 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            Packing::Uncompressed => (l.clone(), "application/vnd.oci.image.layer.v1.tar"),
        };
        let d = put(&blob);
        descs.push(serde_json::json!({"mediaType": media_type, "digest": d, "size": blob.len()}));
    }
    let config = serde_json::json!({
        "architecture": architecture, "os": "linux", "created": "2026-01-01T00:00:00Z",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let cb = serde_json::to_vec(&config).unwrap();
    let cd = put(&cb);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cb.len()},
        "layers": descs,
    });
    let mb = serde_json::to_vec(&manifest).unwrap();
    (put(&mb), mb.len())
}

pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}

/// Run skopeo (an independent peer) with `args`; it must succeed. Returns its stdout.
pub fn skopeo(args: &[&str]) -> Vec<u8> {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("skopeo is not installed (apt-get install skopeo)");
    assert!(
        out.status.success(),
        "skopeo {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Push an OCI layout image to a registry with skopeo.
pub fn skopeo_push(layout: &Path, tag: &str, dest: &str) {
    // --preserve-digests: layers go up as they are (skopeo would gzip uncompressed ones)
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{dest}"),
    ]);
}

/// Build a busybox image (plus `extra` layers) and push it to `dest` on the registry.
pub fn push_image(dest: &str, extra: &[Vec<u8>]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut layers = vec![busybox_layer()];
    layers.extend(extra.iter().cloned());
    let d = write_layout(dir.path(), "t", &layers, &["/bin/sh"]);
    skopeo_push(dir.path(), "t", dest);
    d
}

/// What the fault proxy does to each request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Forward untouched.
    None,
    /// Answer blob requests with half the body, then close the connection.
    ResetBlobs,
    /// Answer every request with HTTP 500.
    Error500,
    /// Flip one byte in every blob body.
    CorruptBlobs,
    /// A registry with Basic auth: every request needs `AUTH_USER:AUTH_PASS`, else 401 with
    /// `WWW-Authenticate: Basic`.
    BasicAuth,
    /// A registry with Docker Hub's token flow: requests need `Bearer AUTH_TOKEN`, else 401
    /// with `WWW-Authenticate: Bearer realm=<this proxy>/token,…`; `/token` hands out the
    /// token for Basic `AUTH_USER:AUTH_PASS` and a pull scope of the repository asked for.
    BearerAuth,
    /// Every repository request is refused with 403 (credentials fine, no permission).
    Forbidden,
    /// Blob requests are answered after 300 ms (so that parallel downloads overlap).
    SlowBlobs,
    /// Answer with 429 Too Many Requests and `Retry-After: 1`.
    TooManyRequests,
    /// Answer with HTTP 500 and a body that never ends.
    EndlessError,
    /// [`Fault::BearerAuth`] whose `/token` answers 200 with a body that never ends.
    EndlessToken,
    /// Manifest bodies are sent one byte per second.
    TrickleManifests,
    /// Blob bodies over 4 KiB (layers, not configs) stop after their first 100 bytes; the
    /// connection stays open.
    StallBlobs,
    /// Blob bodies over 4 KiB (layers) are answered after 3 s.
    VerySlowBlobs,
    /// Requests are read and never answered.
    Silent,
}

pub const AUTH_USER: &str = "berth";
pub const AUTH_PASS: &str = "s3cret";
pub const AUTH_TOKEN: &str = "tok-3f9a";

/// The `Authorization` header's value in a request head, if any.
fn authorization(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("authorization")
            .then(|| v.trim().to_string())
    })
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Write a docker `config.json` with credentials for `registry` in `dir`.
pub fn docker_config(dir: &Path, registry: &str, user: &str, pass: &str) {
    use base64::Engine as _;
    std::fs::create_dir_all(dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    std::fs::write(
        dir.join("config.json"),
        format!("{{\"auths\": {{\"{registry}\": {{\"auth\": \"{auth}\"}}}}}}"),
    )
    .unwrap();
}

/// The auth modes' answer to a request, when it is not forwarded: (status line, headers,
/// body).
fn auth_answer(fault: Fault, head: &str, me: &str) -> Option<(String, String, String)> {
    let line = head.lines().next().unwrap_or("");
    let path = line.split(' ').nth(1).unwrap_or("");
    let auth = authorization(head);
    let unauthorized = |challenge: String| {
        Some((
            "401 Unauthorized".to_string(),
            format!("WWW-Authenticate: {challenge}\r\nContent-Type: application/json\r\n"),
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#
                .to_string(),
        ))
    };
    let fault = if fault == Fault::EndlessToken {
        Fault::BearerAuth
    } else {
        fault
    };
    match fault {
        Fault::BasicAuth if auth.as_deref() != Some(basic(AUTH_USER, AUTH_PASS).as_str()) => {
            unauthorized("Basic realm=\"berth-test\"".into())
        }
        Fault::BearerAuth if path.starts_with("/token") => {
            let scope_ok =
                path.contains("scope=repository%3A") || path.contains("scope=repository:");
            if auth.as_deref() == Some(basic(AUTH_USER, AUTH_PASS).as_str()) && scope_ok {
                Some((
                    "200 OK".into(),
                    "Content-Type: application/json\r\n".into(),
                    format!("{{\"token\": \"{AUTH_TOKEN}\"}}"),
                ))
            } else {
                Some(("401 Unauthorized".into(), String::new(), String::new()))
            }
        }
        Fault::BearerAuth if auth.as_deref() != Some(format!("Bearer {AUTH_TOKEN}").as_str()) => {
            // the repository from /v2/<repo>/(manifests|blobs)/…
            let repo = path
                .strip_prefix("/v2/")
                .and_then(|r| {
                    ["/manifests/", "/blobs/"]
                        .iter()
                        .find_map(|k| r.find(k).map(|i| &r[..i]))
                })
                .unwrap_or("");
            let scope = if repo.is_empty() {
                String::new()
            } else {
                format!(",scope=\"repository:{repo}:pull\"")
            };
            unauthorized(format!(
                "Bearer realm=\"http://{me}/token\",service=\"berth-test\"{scope}"
            ))
        }
        Fault::Forbidden if path.starts_with("/v2/") && path != "/v2/" => Some((
            "403 Forbidden".into(),
            "Content-Type: application/json\r\n".into(),
            r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#
                .into(),
        )),
        _ => None,
    }
}

/// An HTTP proxy in front of the registry that injects faults into the first `count`
/// matching requests (usize::MAX: all), one request per connection.
pub struct FaultProxy {
    pub addr: String,
    stop: Arc<AtomicBool>,
    pub faults_left: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    /// Blob downloads in progress now, and the most there ever were at once.
    pub blobs_in_flight: Arc<(AtomicUsize, AtomicUsize)>,
}

/// Counts a blob download in progress for as long as it lives.
struct InFlight<'a>(&'a (AtomicUsize, AtomicUsize));

impl<'a> InFlight<'a> {
    fn new(c: &'a (AtomicUsize, AtomicUsize)) -> Self {
        let now = c.0.fetch_add(1, Ordering::SeqCst) + 1;
        c.1.fetch_max(now, Ordering::SeqCst);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FaultProxy {
    pub fn start(upstream: &str, fault: Fault, count: usize) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let faults_left = Arc::new(AtomicUsize::new(count));
        let requests = Arc::new(AtomicUsize::new(0));
        let blobs_in_flight = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let (s, f, r, b, up) = (
            stop.clone(),
            faults_left.clone(),
            requests.clone(),
            blobs_in_flight.clone(),
            upstream.to_string(),
        );
        let me = addr.clone();
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (f, r, b, up, me) =
                            (f.clone(), r.clone(), b.clone(), up.clone(), me.clone());
                        std::thread::spawn(move || {
                            let _ = proxy_one(conn, &up, &me, fault, &f, &r, &b);
                        });
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        FaultProxy {
            addr,
            stop,
            faults_left,
            requests,
            blobs_in_flight,
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::Error::other("eof"));
        }
        head.push(b[0]);
    }
    Ok(head)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.eq_ignore_ascii_case("content-length"))
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

fn proxy_one(
    mut client: TcpStream,
    upstream: &str,
    me: &str,
    fault: Fault,
    left: &AtomicUsize,
    reqs: &AtomicUsize,
    blobs: &(AtomicUsize, AtomicUsize),
) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let head = read_head(&mut client)?;
    let head_s = String::from_utf8_lossy(&head).into_owned();
    let mut body = vec![0u8; content_length(&head_s)];
    client.read_exact(&mut body)?;
    reqs.fetch_add(1, Ordering::SeqCst);
    let path = head_s.split(' ').nth(1).unwrap_or("");
    match fault {
        Fault::Silent => {
            // hold the connection, unanswered, until the client gives up
            let mut b = [0u8; 1];
            let _ = client.read(&mut b);
            return Ok(());
        }
        Fault::EndlessError => {
            client.write_all(b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\n")?;
            return endless(client);
        }
        Fault::EndlessToken if path.starts_with("/token") => {
            client.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"token\": \"",
            )?;
            return endless(client);
        }
        _ => {}
    }
    if let Some((status, headers, body)) = auth_answer(fault, &head_s, me) {
        client.write_all(
            format!(
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )?;
        return Ok(());
    }
    let is_blob_get = head_s.starts_with("GET ")
        && head_s
            .lines()
            .next()
            .is_some_and(|l| l.contains("/blobs/sha256:"));
    let _in_flight = is_blob_get.then(|| InFlight::new(blobs));
    if fault == Fault::SlowBlobs && is_blob_get {
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let applies = match fault {
        Fault::None
        | Fault::BasicAuth
        | Fault::BearerAuth
        | Fault::Forbidden
        | Fault::SlowBlobs
        | Fault::VerySlowBlobs
        | Fault::EndlessError
        | Fault::EndlessToken
        | Fault::Silent => false,
        Fault::TrickleManifests => head_s.contains("/manifests/"),
        Fault::StallBlobs => is_blob_get,
        Fault::Error500 | Fault::TooManyRequests => true,
        Fault::ResetBlobs | Fault::CorruptBlobs => is_blob_get,
    };
    let take = applies
        && left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if take && fault == Fault::TooManyRequests {
        client.write_all(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    if take && fault == Fault::Error500 {
        client.write_all(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    // forward with Connection: close
    let mut up = TcpStream::connect(upstream)?;
    let mut fwd = String::new();
    for l in head_s.split("\r\n") {
        if l.to_ascii_lowercase().starts_with("connection:") || l.is_empty() {
            continue;
        }
        fwd.push_str(l);
        fwd.push_str("\r\n");
    }
    fwd.push_str("Connection: close\r\n\r\n");
    up.write_all(fwd.as_bytes())?;
    up.write_all(&body)?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(resp.len());
    let (rh, rb) = resp.split_at(split);
    let mut rb = rb.to_vec();
    if take && fault == Fault::CorruptBlobs && !rb.is_empty() {
        let i = rb.len() / 2;
        rb[i] ^= 0xff;
    }
    client.write_all(rh)?;
    if take && fault == Fault::TrickleManifests {
        for b in &rb {
            client.write_all(std::slice::from_ref(b))?;
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        return Ok(());
    }
    if fault == Fault::VerySlowBlobs && is_blob_get && rb.len() > 4096 {
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    if take && fault == Fault::StallBlobs && rb.len() > 4096 {
        client.write_all(&rb[..rb.len().min(100)])?;
        // until the client closes
        let mut b = [0u8; 1];
        let _ = client.read(&mut b);
        return Ok(());
    }
    if take && fault == Fault::ResetBlobs {
        client.write_all(&rb[..rb.len() / 2])?;
        let _ = client.shutdown(std::net::Shutdown::Both);
        return Ok(());
    }
    client.write_all(&rb)?;
    Ok(())
}

/// Write `x` to the client until it goes away (an endless body).
fn endless(mut client: TcpStream) -> std::io::Result<()> {
    let chunk = vec![b'x'; 64 << 10];
    loop {
        client.write_all(&chunk)?;
    }
}

/// Every file below a directory (relative path → description of type, mode, owner, content).
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    fn walk(root: &Path, p: &Path, out: &mut std::collections::BTreeMap<String, String>) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let ft = m.file_type();
            let desc = if ft.is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if ft.is_dir() {
                format!("dir {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid())
            } else if ft.is_file() {
                format!(
                    "file {:o} {}:{} {}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    sha256(&std::fs::read(&path).unwrap())
                )
            } else {
                format!("other {:o} rdev {}", m.mode(), m.rdev())
            };
            out.insert(rel, desc);
            if ft.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    walk(root, root, &mut out);
    out
}

pub fn paths_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// What a state directory holds of containers: the names in `STATE/containers` and its
/// areas (`.next`, `.prev`), and the slots (`.slots`) — empty once every container is gone.
pub fn container_dirs(state: &Path) -> Vec<PathBuf> {
    let root = state.join("containers");
    let mut v = vec![];
    for p in paths_in(&root) {
        if p.file_name().is_some_and(|n| {
            [".slots", ".next", ".prev"]
                .map(std::ffi::OsStr::new)
                .contains(&n)
        }) {
            v.extend(paths_in(&p));
        } else {
            v.push(p);
        }
    }
    v
}

/// Cgroup directories of container `name` (named `name-`, its slot's 16 random hex digits
/// unless it was made before slots, and the containers directory's 10-digit hash) beneath a `berth` directory anywhere in the cgroup tree (every v1 controller and v2),
/// i.e. what berth created for container `name` in any state directory.
pub fn cgroups_named(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: usize, found: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let leaf = e.file_name().to_string_lossy().into_owned();
            let hex = |h: &str, n: usize| h.len() == n && h.bytes().all(|b| b.is_ascii_hexdigit());
            let ours = leaf
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|h| match h.split_once('-') {
                    Some((slot, h)) => hex(slot, 16) && hex(h, 10),
                    None => hex(h, 10),
                });
            if ours && dir.file_name().is_some_and(|f| f == "berth") {
                found.push(p.clone());
            }
            if depth > 0 {
                walk(&p, name, depth - 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 5, &mut found);
    found
}

/// Removes every container of a state directory when dropped, so a failing test leaves nothing
/// running. Declare it after the state directory's `TempDir` so it runs first.
pub struct Teardown {
    state: PathBuf,
    empty: tempfile::TempDir,
}

impl Teardown {
    pub fn new(state: &Path) -> Teardown {
        Teardown {
            state: state.to_path_buf(),
            empty: tempfile::tempdir().unwrap(),
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let _ = berth(
            &self.state,
            &[
                "apply",
                "--allow-empty",
                "--max-deletions",
                "1000",
                self.empty.path().to_str().unwrap_or_default(),
            ],
        );
    }
}

/// `image inspect REF` shows every layer of the image unpacked.
pub fn assert_unpacked(state: &Path, reference: &str) {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&berth(state, &["image", "inspect", reference]))).unwrap();
    let layers = v["layers"].as_array().expect("layers");
    assert!(
        !layers.is_empty() && layers.iter().all(|l| l["unpacked"] == true),
        "{reference}: not every layer is unpacked: {v}"
    );
}

/// `n` bytes that do not compress (xorshift), different for each seed.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The unified (v2) cgroup hierarchy, mounted where the host has it or, where it has not (a
/// v1-only host), at a temporary directory of the test's own, unmounted on drop. The kernel
/// has one unified hierarchy whatever is mounted, so a test can use its v2 paths (device
/// programs, `cgroup.procs`) on any host.
pub struct Cgroup2 {
    pub mount: PathBuf,
    own: Option<tempfile::TempDir>,
}

impl Cgroup2 {
    pub fn new() -> Cgroup2 {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        if let Some(m) = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&"cgroup2"))
        {
            return Cgroup2 {
                mount: PathBuf::from(m[1]),
                own: None,
            };
        }
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount cgroup2 at {}", dir.path().display());
        Cgroup2 {
            mount: dir.path().to_path_buf(),
            own: Some(dir),
        }
    }

    /// The directory of a process's cgroup on the unified hierarchy (`/proc/PID/cgroup`'s `0::`
    /// line; `self` for this process).
    pub fn of(&self, pid: &str) -> PathBuf {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/");
        self.mount.join(path.trim_start_matches('/'))
    }
}

impl Drop for Cgroup2 {
    fn drop(&mut self) {
        if let Some(d) = &self.own {
            let _ = Command::new("umount").arg("-l").arg(d.path()).status();
        }
    }
}

/// The pid of container `name`'s shim in state directory `state`, from its state.json.
pub fn shim_pid(state: &Path, name: &str) -> i64 {
    let p = state.join("containers").join(name).join("state.json");
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    st["shim_pid"].as_i64().unwrap()
}

/// Mount berth's snapshots of an image read-only as overlayfs (as the runtime will) and
/// return the mount point; unmounted on drop.
pub struct Merged {
    pub dir: tempfile::TempDir,
}
impl Merged {
    pub fn mount(state: &Path, reference: &str) -> Merged {
        let out = berth(state, &["image", "inspect", reference]);
        let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        let lowers: Vec<String> = v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .map(|l| {
                state
                    .join("snapshots")
                    .join(&l["chain_id"].as_str().unwrap()[7..])
                    .join("fs")
                    .display()
                    .to_string()
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "overlay",
                "overlay",
                "-o",
                &format!("ro,lowerdir={}", lowers.join(":")),
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "overlay mount failed");
        Merged { dir }
    }
}
impl Drop for Merged {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A fresh state directory holding one image, busybox's layer then `extra`, with `/bin/sh`
/// as its command, imported under `tag`.
pub fn state_with_image(tag: &str, extra: Vec<Vec<u8>>) -> tempfile::TempDir {
    let layout = tempfile::tempdir().unwrap();
    let mut layers = vec![busybox_layer()];
    layers.extend(extra);
    write_layout(layout.path(), "t", &layers, &["/bin/sh"]);
    let state = tempfile::tempdir().unwrap();
    ok(&berth(
        state.path(),
        &[
            "image",
            "import",
            "--tag",
            tag,
            layout.path().to_str().unwrap(),
        ],
    ));
    state
}

/// `umoci unpack` of the OCI layout `layout` at tag `t`: the tree of the root filesystem it
/// makes (see [`tree`]).
pub fn umoci_tree(layout: &Path) -> std::collections::BTreeMap<String, String> {
    let bundle = tempfile::tempdir().unwrap();
    let st = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:t", layout.display())])
        .arg(bundle.path().join("b"))
        .output()
        .expect("umoci is not installed (apt-get install umoci)");
    assert!(
        st.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    tree(&bundle.path().join("b/rootfs"))
}
