//! Bridge networking end to end, as root with real namespaces: names between containers on
//! a network, isolation between networks, hosts files kept current, published TCP and UDP
//! ports on 127.0.0.1, addresses kept across restarts, drift repair, and nothing left behind.
//! Traffic goes only to 127.0.0.1 or to the tests' own containers on their own bridges.

mod common;
use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const IMAGE: &str = "example.com/net/bb:1";

/// A state directory with the busybox image (plus a static UDP echo server) imported, and a
/// manifests directory. Applies an empty set on drop.
struct Host {
    // first, so it runs before the state directory goes
    _teardown: Teardown,
    state: tempfile::TempDir,
    dir: tempfile::TempDir,
    tag: &'static str,
}

/// A static UDP echo server (`udpecho PORT`), built with the machine's C compiler.
fn udpecho() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("udpecho.c");
    std::fs::write(
        &src,
        r#"#include <netinet/in.h>
#include <sys/socket.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[1]));
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) return 1;
    char buf[2048];
    for (;;) {
        struct sockaddr_in f; socklen_t fl = sizeof f;
        long n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&f, &fl);
        if (n >= 0) sendto(s, buf, n, 0, (struct sockaddr *)&f, fl);
    }
}
"#,
    )
    .unwrap();
    let out = d.path().join("udpecho");
    let st = std::process::Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("a C compiler (cc) builds the UDP echo server");
    assert!(st.success());
    std::fs::read(out).unwrap()
}

impl Host {
    fn new(tag: &'static str) -> Host {
        let extra = LayerBuilder::new()
            .dir("bin", 0o755)
            .file("bin/udpecho", &udpecho(), 0o755)
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
    /// Manifests: `networks` as TOML tables, containers by short name with their bodies.
    fn declare(&self, networks: &str, containers: &[(&str, &str)]) {
        let mut t = format!("[image.bb]\nref = \"{IMAGE}\"\npull = \"never\"\n\n{networks}\n");
        for (n, body) in containers {
            t.push_str(&format!(
                "\n[container.{}]\nimage = \"bb\"\nstop_timeout = \"1s\"\n{body}\n",
                self.name(n)
            ));
        }
        std::fs::write(self.dir.path().join("c.toml"), t).unwrap();
    }
    fn apply(&self) -> String {
        ok(&berth(self.s(), &["apply", self.d()]))
    }
    fn exec(&self, n: &str, script: &str) -> std::process::Output {
        berth(self.s(), &["exec", &self.name(n), "--", "sh", "-c", script])
    }
    fn pid(&self, n: &str) -> i64 {
        let i: Value =
            serde_json::from_str(&ok(&berth(self.s(), &["inspect", &self.name(n)]))).unwrap();
        i["state"]["pid"].as_i64().unwrap_or(0)
    }
    /// The address container `n`'s /etc/hosts gives for `name`.
    fn address_in(&self, n: &str, name: &str) -> String {
        self.hosts(n)
            .lines()
            .find(|l| l.contains(name))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_string()
    }
    fn hosts(&self, n: &str) -> String {
        std::fs::read_to_string(
            self.s()
                .join("containers")
                .join(self.name(n))
                .join("etc/hosts"),
        )
        .unwrap()
    }
    /// Interfaces on the host that this state directory's networks own.
    fn links(&self) -> Vec<String> {
        let ipams: Vec<PathBuf> = paths_in(&self.s().join("net"));
        let mut bridges = vec![];
        for p in ipams {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            bridges.push(v["bridge"].as_str().unwrap().to_string());
        }
        bridges
    }
}

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The time, to tell which step a client's failure fell in (the steps print it too).
fn stamp() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{}.{:03}", t.as_secs(), t.subsec_millis())
}

/// What the UDP echo server behind published port `udp` sends back for "ping" (a few tries:
/// it may still be starting).
fn udp_echo(udp: u16) -> Option<Vec<u8>> {
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        u.send_to(b"ping", ("127.0.0.1", udp)).unwrap();
        if let Ok((n, _)) = u.recv_from(&mut buf) {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

fn nft_tables() -> String {
    std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
fn names_resolve_on_a_network_and_networks_are_isolated() {
    let h = Host::new("nm");
    let web = h.name("web");
    h.declare(
        "[network.app]\n\n[network.other]\n",
        &[
            (
                "web",
                "command = [\"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/www\"]\nnetworks = [\"app\"]\nhostname = \"www\"",
            ),
            ("client", "command = [\"sleep\", \"1000\"]\nnetworks = [\"app\"]"),
            ("stranger", "command = [\"sleep\", \"1000\"]\nnetworks = [\"other\"]"),
        ],
    );
    h.apply();
    let got = ok(&h.exec("client", &format!("wget -qO- http://{web}/")));
    assert_eq!(got, "hello from berth\n", "by container name");
    let got = ok(&h.exec("client", "wget -qO- http://www/"));
    assert_eq!(got, "hello from berth\n", "by hostname");
    // the other network neither resolves nor reaches it
    let web_ip = h.address_in("client", &web);
    assert!(!h.hosts("stranger").contains(&web));
    let o = h.exec("stranger", &format!("wget -qO- http://{web}/"));
    assert!(!o.status.success(), "resolved across networks: {}", out(&o));
    let o = h.exec("stranger", &format!("wget -T 3 -qO- http://{web_ip}/"));
    assert!(!o.status.success(), "reached across networks: {}", out(&o));
    // an IPAM file as berth wrote it before it kept hostnames there: they are not lost
    let ipam = h.s().join("net/app.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&ipam).unwrap()).unwrap();
    let m = v.as_object_mut().unwrap();
    assert!(m.remove("hostnames").is_some() && m.remove("hostnames_complete").is_some());
    std::fs::write(&ipam, serde_json::to_string(&v).unwrap()).unwrap();
    // a container that comes later is known to the others without restarting them
    let client_pid = h.pid("client");
    let body = std::fs::read_to_string(h.dir.path().join("c.toml")).unwrap();
    std::fs::write(
        h.dir.path().join("c.toml"),
        format!(
            "{body}\n[container.{}]\nimage = \"bb\"\ncommand = [\"sleep\", \"1000\"]\nnetworks = [\"app\"]\nstop_timeout = \"1s\"\n",
            h.name("late")
        ),
    )
    .unwrap();
    h.apply();
    assert_eq!(h.pid("client"), client_pid);
    let got = ok(&h.exec("client", "cat /etc/hosts"));
    assert!(got.contains(&h.name("late")), "{got}");
    assert!(
        got.contains(" www") || got.contains("\twww"),
        "hostname kept: {got}"
    );
    std::fs::write(h.dir.path().join("c.toml"), body).unwrap();
    h.apply();
    let got = ok(&h.exec("client", "cat /etc/hosts"));
    assert!(!got.contains(&h.name("late")), "{got}");
    assert_eq!(h.pid("client"), client_pid);
}

#[test]
fn published_tcp_and_udp_ports_answer_on_loopback_and_are_freed() {
    let h = Host::new("pt");
    let (tcp, udp) = (free_port(), free_port());
    h.declare(
        "[network.pub]\n",
        &[
            (
                "web",
                &format!("command = [\"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/www\"]\nnetworks = [\"pub\"]\nports = [\"127.0.0.1:{tcp}:80\"]"),
            ),
            (
                "echo",
                &format!("command = [\"udpecho\", \"9000\"]\nnetworks = [\"pub\"]\nports = [\"127.0.0.1:{udp}:9000/udp\"]"),
            ),
        ],
    );
    h.apply();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.") && resp.contains(" 200 "),
        "{resp}"
    );
    assert!(resp.ends_with("hello from berth\n"), "{resp}");
    assert_eq!(udp_echo(udp).as_deref(), Some(&b"ping"[..]));
    // a port already taken on the host is a clear error at apply time
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let body = std::fs::read_to_string(h.dir.path().join("c.toml")).unwrap();
    std::fs::write(
        h.dir.path().join("c.toml"),
        format!(
            "{body}\n[container.{}]\nimage = \"bb\"\ncommand = [\"sleep\", \"1000\"]\nnetworks = [\"pub\"]\nports = [\"127.0.0.1:{port}:80\"]\n",
            h.name("clash")
        ),
    )
    .unwrap();
    let o = berth(h.s(), &["apply", h.d()]);
    assert_eq!(o.status.code(), Some(1));
    let err = format!("{}{}", out(&o), String::from_utf8_lossy(&o.stderr));
    assert!(
        err.contains(&format!("127.0.0.1:{port}/tcp is already in use")),
        "{err}"
    );
    drop(taken);
    // removing the containers frees the ports
    std::fs::write(h.dir.path().join("c.toml"), "").unwrap();
    ok(&berth(h.s(), &["apply", "--allow-empty", h.d()]));
    std::net::TcpListener::bind(("127.0.0.1", tcp)).expect("tcp port freed");
    std::net::UdpSocket::bind(("127.0.0.1", udp)).expect("udp port freed");
    // the start that failed on the taken port left nothing behind either
    let left = cgroups_named(&h.name("clash"));
    assert!(left.is_empty(), "cgroup left behind: {left:?}");
}

#[test]
fn addresses_survive_restarts_drift_is_repaired_and_nothing_is_left() {
    let h = Host::new("ad");
    h.declare(
        "[network.sealed]\ninternal = true\n",
        &[
            // no `networks`: the built-in default network
            ("a", "command = [\"sleep\", \"1000\"]"),
            (
                "b",
                "command = [\"sleep\", \"1000\"]\nnetworks = [\"sealed\"]",
            ),
        ],
    );
    let plan = ok(&berth(h.s(), &["plan", h.d()]));
    assert!(plan.contains("+ network.default"), "{plan}");
    h.apply();
    let ip = |n: &str| {
        let o = ok(&h.exec(n, "ip -4 -o addr show eth0"));
        let mut it = o.split_whitespace().skip_while(|w| *w != "inet");
        it.nth(1).unwrap_or_default().to_string()
    };
    let first = ip("a");
    assert!(first.starts_with("10."), "{first}");
    ok(&berth(h.s(), &["restart", &h.name("a")]));
    assert_eq!(ip("a"), first, "restart keeps the address");
    h.apply();
    assert_eq!(ip("a"), first, "a second apply keeps the address");
    // rules: the default network masquerades, the internal one does not
    let bridges = h.links();
    assert_eq!(bridges.len(), 2);
    for b in &bridges {
        assert!(Path::new("/sys/class/net").join(b).exists(), "{b}");
        assert!(nft_tables().contains(b.as_str()), "{b}");
    }
    // a bridge removed by hand is drift; apply puts it back with the container attached
    let default_bridge = {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(h.s().join("net/default.json")).unwrap())
                .unwrap();
        v["bridge"].as_str().unwrap().to_string()
    };
    let st = std::process::Command::new("ip")
        .args(["link", "del", &default_bridge])
        .status()
        .unwrap();
    assert!(st.success());
    let o = berth(h.s(), &["plan", "--detailed-exitcode", h.d()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(out(&o).contains("is missing"), "{}", out(&o));
    h.apply();
    assert_eq!(
        berth(h.s(), &["plan", "--detailed-exitcode", h.d()])
            .status
            .code(),
        Some(0)
    );
    let veths: Vec<String> = std::fs::read_dir(
        Path::new("/sys/class/net")
            .join(&default_bridge)
            .join("brif"),
    )
    .unwrap()
    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
    .collect();
    assert_eq!(veths.len(), 1, "the container's veth is back on the bridge");
    // everything away: no bridge, veth, address, route or rule left
    let empty = h.dir.path().join("nothing");
    ok(&berth(
        h.s(),
        &["apply", "--allow-empty", empty.to_str().unwrap()],
    ));
    for b in &bridges {
        assert!(!Path::new("/sys/class/net").join(b).exists(), "{b} left");
        assert!(!nft_tables().contains(b.as_str()), "rules of {b} left");
        let routes = std::fs::read_to_string("/proc/net/route").unwrap();
        assert!(!routes.contains(b.as_str()), "route via {b} left");
    }
    for v in veths {
        assert!(!Path::new("/sys/class/net").join(&v).exists(), "{v} left");
    }
    assert!(paths_in(&h.s().join("net")).is_empty());
}

/// A network namespace standing for another machine on the LAN, joined to the host by a veth
/// pair (172.31.254.1 on the host, .2 inside): removed on drop.
struct Lan {
    ns: String,
    host_side: String,
}

impl Lan {
    const HOST_IP: &str = "172.31.254.1";
    const LAN_IP: &str = "172.31.254.2";

    fn new(tag: &str) -> Lan {
        let lan = Lan {
            ns: format!("berthlan{tag}{}", std::process::id()),
            host_side: format!("bl{tag}{}", std::process::id() % 100_000),
        };
        let ip = |args: &[&str]| {
            let o = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        ip(&["netns", "add", &lan.ns]);
        ip(&[
            "link",
            "add",
            &lan.host_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &lan.ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", Lan::HOST_IP),
            "dev",
            &lan.host_side,
        ]);
        ip(&["link", "set", &lan.host_side, "up"]);
        lan.run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", Lan::LAN_IP),
            "dev",
            "eth0",
        ]);
        lan.run(&["ip", "link", "set", "eth0", "up"]);
        lan.run(&["ip", "link", "set", "lo", "up"]);
        lan
    }

    /// Run a command inside the LAN machine.
    fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_side])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .output();
    }
}

/// A TCP client (`nc`, giving up after 3 s); the address and port follow.
fn hello() -> Vec<&'static str> {
    vec!["busybox", "nc", "-w", "3"]
}

#[test]
fn machines_routed_via_the_host_cannot_reach_unpublished_ports() {
    let h = Host::new("lan");
    let web = h.name("web");
    h.declare(
        "[network.app]\n",
        &[(
            "web",
            "command = [\"sh\", \"-c\", \"while true; do echo hi | nc -l -p 80; done\"]\nnetworks = [\"app\"]",
        )],
    );
    h.apply();
    let web_ip = h.address_in("web", &web);
    // the host itself reaches the server (not forwarded: local traffic)
    let mut answered = false;
    for _ in 0..50 {
        let o = std::process::Command::new("busybox")
            .args(&hello()[1..])
            .args([web_ip.as_str(), "80"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        if out(&o) == "hi\n" {
            answered = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(answered, "the server answers the host");
    let lan = Lan::new("a");
    // the LAN machine routes the container subnet via this host, as a router would
    let o = lan.run(&[
        "ip",
        "route",
        "add",
        &format!("{web_ip}/32"),
        "via",
        Lan::HOST_IP,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = lan.run(&["busybox", "ping", "-c", "1", "-W", "5", Lan::HOST_IP]);
    assert!(o.status.success(), "the LAN machine reaches the host");
    // but not the container port, which was not published
    let mut args = hello();
    args.extend([web_ip.as_str(), "80"]);
    let o = lan.run(&args);
    assert_ne!(out(&o), "hi\n", "reached an unpublished port from the LAN");
    // while the container's own connections out to the LAN still work (and their replies
    // come back in)
    // (what the listener receives, not the client's exit status, says the connection went
    // through; its stdin is a pipe held open, so it never closes the connection early)
    let mut listener = std::process::Command::new("ip")
        .args([
            "netns", "exec", &lan.ns, "busybox", "nc", "-l", "-p", "7000",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut stdout = listener.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(b"\n") {
                let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
                break;
            }
        }
    });
    let mut got = None;
    for _ in 0..50 {
        let _ = h.exec("web", &format!("echo out | nc -w 1 {} 7000", Lan::LAN_IP));
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(100)) {
            got = Some(line);
            break;
        }
    }
    let _ = listener.kill();
    let _ = listener.wait();
    assert_eq!(
        got.as_deref(),
        Some("out\n"),
        "the container could not connect out"
    );
}

/// A client of a published port on 127.0.0.1, connecting again and again until stopped:
/// each connection sends `GET /` and reads the whole answer. Every connection that is not
/// answered 200 (refused, reset, closed without an answer, timed out) is a failure.
struct Client {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Seen>>,
}

/// The failures a [`Client`] saw, and how often each body was answered.
type Seen = (Vec<String>, std::collections::BTreeMap<String, usize>);

impl Client {
    fn start(port: u16) -> Client {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut failures = vec![];
            let mut answers = std::collections::BTreeMap::new();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let got = (|| -> std::io::Result<String> {
                    let mut c = std::net::TcpStream::connect_timeout(
                        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                        Duration::from_secs(10),
                    )?;
                    c.set_read_timeout(Some(Duration::from_secs(10)))?;
                    c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                    let mut r = String::new();
                    c.read_to_string(&mut r)?;
                    Ok(r)
                })();
                match got {
                    Ok(r) if r.starts_with("HTTP/1.") && r.contains(" 200 ") => {
                        let body = r.rsplit("\r\n\r\n").next().unwrap_or("").trim().to_string();
                        *answers.entry(body).or_insert(0) += 1;
                    }
                    Ok(r) => failures.push(format!("{}: answered {r:?}", stamp())),
                    Err(e) => failures.push(format!("{}: {e}", stamp())),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (failures, answers)
        });
        Client {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop; the failures and how often each body was answered.
    fn finish(mut self) -> Seen {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
/// `update = "start-first"`: while a client connects continuously to the published ports,
/// the container is replaced again and again (an env change), with berth killed at each
/// point of a replacement, and with a replacement that fails and is undone: no connection
/// is refused or fails, every version answers in turn, peers' /etc/hosts follow the name
/// to the new container, the UDP port passes too, and nothing of the old one is left. The
/// server sends its output elsewhere (its shim answers hand-over requests all the same). A
/// change the ports cannot pass through (a port's host address) goes stop-first, saying so.
fn start_first_replaces_without_refusing_a_connection() {
    let h = Host::new("sf");
    let (tcp, udp) = (free_port(), free_port());
    let web = h.name("web");
    let declare = |v: &str, command: &str| {
        h.declare(
            "[network.pub]\n",
            &[
                (
                    "web",
                    &format!(
                        "command = [\"sh\", \"-c\", '{command}']\nenv = {{ V = \"{v}\" }}\nnetworks = [\"pub\"]\nports = [\"127.0.0.1:{tcp}:80\", \"127.0.0.1:{udp}:9000/udp\"]\nupdate = \"start-first\"\n[container.{web}.rollout]\nmin_ready = \"1s\"\n"
                    ),
                ),
                ("client", "command = [\"sleep\", \"1000\"]\nnetworks = [\"pub\"]"),
            ],
        )
    };
    let serve = "mkdir -p /w && echo v$V > /w/index.html && (udpecho 9000 >/dev/null 2>&1 &) && exec httpd -f -p 80 -h /w >/dev/null 2>&1";
    // an apply, what it said printed with the time (shown if the test fails)
    let apply = |env: &[(&str, &str)]| {
        eprintln!("{} apply {env:?}", stamp());
        let o = std::process::Command::new(berth_bin())
            .arg("--state-dir")
            .arg(h.s())
            .args(["apply", "-v", h.d()])
            .env("BERTH_CONFIG", "/dev/null")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        eprintln!(
            "{} done {:?}\n{}{}",
            stamp(),
            o.status,
            out(&o),
            String::from_utf8_lossy(&o.stderr)
        );
        o
    };
    declare("1", serve);
    h.apply();
    let pid = h.pid("web");
    let client = Client::start(tcp);
    std::thread::sleep(Duration::from_millis(300));
    // two plain replacements
    for v in ["2", "3"] {
        declare(v, serve);
        let plan = ok(&berth(h.s(), &["plan", h.d()]));
        assert!(plan.contains("start-first"), "{plan}");
        assert!(apply(&[]).status.success());
    }
    assert_ne!(h.pid("web"), pid);
    // killed at each point of a replacement: the next apply finishes (or undoes and redoes) it
    let mut v = 3;
    for point in berth::fault::START_FIRST_POINTS {
        v += 1;
        declare(&v.to_string(), serve);
        let o = apply(&[("BERTH_FAULT", point)]);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(o.status.signal(), Some(9), "{point}: not met");
        assert!(apply(&[]).status.success());
        let plan = berth(h.s(), &["plan", "--detailed-exitcode", h.d()]);
        assert_eq!(plan.status.code(), Some(0), "{point}: {}", out(&plan));
    }
    // a new container that does not prove itself is removed; the old one never stopped
    let before = h.pid("web");
    declare("bad", "exit 3");
    let o = apply(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).into_owned() + &out(&o);
    assert!(
        err.contains("rolled back") && err.contains("kept running"),
        "{err}"
    );
    assert_eq!(h.pid("web"), before);
    std::thread::sleep(Duration::from_millis(300));
    let (failures, answers) = client.finish();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let last = format!("v{v}");
    for n in 1..=v {
        assert!(
            answers.contains_key(&format!("v{n}")),
            "v{n} never answered: {answers:?}"
        );
    }
    // the name follows: peers reach the new container by it
    assert_eq!(h.address_in("client", &web), h.address_in("web", &web));
    let got = ok(&h.exec("client", &format!("wget -qO- http://{web}/")));
    assert_eq!(got.trim(), last);
    assert_eq!(
        h.hosts("client").matches(&web).count(),
        1,
        "{}",
        h.hosts("client")
    );
    // the UDP port passed along
    assert_eq!(udp_echo(udp).as_deref(), Some(&b"ping"[..]));
    // nothing of the old containers: no second name, lease, slot or process
    for area in [".next", ".prev"] {
        let left = paths_in(&h.s().join("containers").join(area));
        assert!(left.is_empty(), "{area}: {left:?}");
    }
    let ipam = std::fs::read_to_string(h.s().join("net/pub.json")).unwrap();
    assert!(!ipam.contains('@'), "{ipam}");
    let slots = paths_in(&h.s().join("containers/.slots"));
    assert_eq!(slots.len(), 2, "{slots:?}");
    // `update = "start-first"` alone gives no /run/berth (no update lock)
    assert!(!h.exec("web", "test -e /run/berth").status.success());
    // a port that changes its host address cannot be bound beside the old one: stop-first
    declare(&v.to_string(), &serve.replace("v$V", "moved"));
    let c = std::fs::read_to_string(h.dir.path().join("c.toml")).unwrap();
    std::fs::write(
        h.dir.path().join("c.toml"),
        c.replace(
            &format!("127.0.0.1:{tcp}:80"),
            &format!("127.0.0.2:{tcp}:80"),
        ),
    )
    .unwrap();
    let o = berth(h.s(), &["apply", h.d()]);
    let said = String::from_utf8_lossy(&o.stderr).into_owned() + &out(&o);
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains("replaced stop-first: a published port changes its host address"),
        "{said}"
    );
    let mut c = std::net::TcpStream::connect(("127.0.0.2", tcp)).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut r = String::new();
    c.read_to_string(&mut r).unwrap();
    assert!(r.ends_with("moved\n"), "{r}");
    // onto another network, start-first: the old container's address on the network it
    // left goes with it (peers there no longer know the name)
    let c = std::fs::read_to_string(h.dir.path().join("c.toml")).unwrap();
    let web_body = c.find(&format!("[container.{web}]")).unwrap();
    let (head, body) = c.split_at(web_body);
    let body = body.replacen("networks = [\"pub\"]", "networks = [\"side\"]", 1);
    let body = body.replacen("echo moved", "echo side", 1);
    std::fs::write(
        h.dir.path().join("c.toml"),
        format!("{head}[network.side]\n{body}"),
    )
    .unwrap();
    let o = apply(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ipam = std::fs::read_to_string(h.s().join("net/pub.json")).unwrap();
    assert!(!ipam.contains(&web), "{ipam}");
    assert!(!h.hosts("client").contains(&web), "{}", h.hosts("client"));
    let mut c = std::net::TcpStream::connect(("127.0.0.2", tcp)).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut r = String::new();
    c.read_to_string(&mut r).unwrap();
    assert!(r.ends_with("side\n"), "{r}");
}
