//! `berth shim`: one per container, a re-exec of berth's own binary, single-threaded. It
//! detaches from whoever started it, creates the cgroup, clones the container's first process
//! into new namespaces, reports the pid (or the failure) on its stdout, then captures the
//! container's stdout/stderr into the log, reaps it, records the exit atomically, and removes
//! the cgroup. Killing the berth CLI or agent never kills a container.

use super::cgroup::CgroupLocation;
use super::config::{ContainerDir, NetMode, RuntimeConfig};
use super::logs::LogWriter;
use super::state::{ContainerState, ExitRecord, pid_start_time};
use crate::fsutil::{self, now_unix};
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::CloneFlags;
use nix::sys::wait::{WaitStatus, waitpid};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

/// Contents of /etc/hosts for a container without a bridge network.
pub fn hosts_file(hostname: &str, net: &NetMode) -> String {
    match net {
        NetMode::Host => std::fs::read_to_string("/etc/hosts")
            .unwrap_or_else(|_| "127.0.0.1\tlocalhost\n".into()),
        NetMode::None => format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
        ),
        NetMode::Bridge { ifaces, .. } => {
            let mut m = std::collections::BTreeMap::new();
            if let Some(i) = ifaces.first() {
                m.insert(i.addr, vec![hostname.to_string()]);
            }
            crate::net::hosts::render(&m)
        }
    }
}

/// Write the per-container files the shim mounts: /etc/hostname, /etc/hosts, /etc/resolv.conf.
pub fn write_etc(dir: &ContainerDir, cfg: &RuntimeConfig) -> std::io::Result<()> {
    let etc = dir.etc();
    std::fs::create_dir_all(&etc)?;
    // bind-mounted into the container, where any user reads them
    fsutil::write_mode(
        &etc.join("hostname"),
        format!("{}\n", cfg.hostname).as_bytes(),
        0o644,
    )?;
    let hosts = etc.join("hosts");
    // on bridge networks apply manages the file (peers by name); only seed it
    if !matches!(cfg.net, NetMode::Bridge { .. }) || !hosts.exists() {
        fsutil::write_mode(
            &hosts,
            hosts_file(&cfg.hostname, &cfg.net).as_bytes(),
            0o644,
        )?;
    }
    let mut resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    if cfg.net.own_namespace() {
        resolv = crate::net::hosts::resolv_conf(&resolv);
    }
    fsutil::write_mode(&etc.join("resolv.conf"), resolv.as_bytes(), 0o644)?;
    Ok(())
}

fn report(out: &mut std::fs::File, msg: &str) {
    let _ = out.write_all(msg.as_bytes());
    let _ = out.flush();
}

/// Entry point of `berth shim DIR`. `dir` is the container's directory. Never returns.
pub fn main(dir: &Path) -> ! {
    // nothing the process that started us had open may reach the container; stdout (fd 1)
    // is the readiness pipe
    crate::sys::close_inherited_fds(&[]);
    // detach: a new session, then fork so the process that started us can reap our parent
    let _ = nix::unistd::setsid();
    match crate::sys::fork_process() {
        Ok(Some(_)) => std::process::exit(0),
        Ok(None) => {}
        Err(e) => {
            println!("error cannot fork the shim: {e}");
            std::process::exit(1);
        }
    }
    // stdout is the readiness pipe; keep a handle and point fd 1 elsewhere later
    let ready = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from);
    let mut ready = match ready {
        Ok(f) => Some(f),
        Err(_) => std::process::exit(1),
    };
    let code = match run(dir, &mut ready) {
        Ok(()) => 0,
        Err(e) => {
            if let Some(r) = ready.as_mut() {
                report(r, &format!("error {e}\n"));
            }
            1
        }
    };
    std::process::exit(code)
}

fn devnull_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = crate::sys::dup_onto(null.as_fd(), 0);
        let _ = crate::sys::dup_onto(null.as_fd(), 1);
    }
}

fn run(dir: &Path, ready: &mut Option<std::fs::File>) -> Result<(), String> {
    let cd = ContainerDir(dir.to_path_buf());
    let mut cfg: RuntimeConfig = fsutil::read_json(&cd.config())
        .map_err(|e| e.to_string())?
        .ok_or("no config.json")?;
    // diagnostics of the shim itself
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("shim.log"))
    {
        let _ = crate::sys::dup_onto(f.as_fd(), 2);
    }
    // the writable layer's top directory is the container's `/`: 0755 as docker makes it
    // (the container's directory above it stays private)
    for d in [cd.upper(), cd.work(), cd.rootfs()] {
        fsutil::create_dir_mode(&d, 0o755).map_err(|e| e.to_string())?;
    }
    // one supervisor per container: held for the shim's life (its forks die with it)
    let _supervisor = supervisor_lock(&cd)?;
    // the restart count has one writer, the supervisor: a start after an exit counts
    let restarts = std::cell::Cell::new(
        fsutil::read_json::<ContainerState>(&cd.state())
            .ok()
            .flatten()
            .map(|s| s.restarts + u32::from(cd.exit().exists()))
            .unwrap_or(0),
    );
    let _ = std::fs::remove_file(cd.exit());
    // published ports are bound before the container exists, once for all its restarts: a
    // port in use fails the start. Or they come from the container this one replaces, once
    // it proves itself.
    let mut ports = if cfg.ports_from_peer {
        vec![]
    } else {
        crate::net::proxy::bind(&cfg.ports)?
    };
    // where they can be handed over, to this container or from it
    let control = if cfg.ports.is_empty() {
        None
    } else {
        match super::handoff::listen(dir) {
            Ok(l) => Some(l),
            Err(e) if cfg.ports_from_peer => {
                return Err(format!("{}: {e}", cd.handoff().display()));
            }
            Err(e) => {
                eprintln!("shim: {}: {e}", cd.handoff().display());
                None
            }
        }
    };
    // after an exit: start it again, and when? Decided before the exit is written, and
    // written with it, so no reader sees an exit without the decision.
    let mut failures = 0u32;
    let mut decide = |exit: &ExitRecord| -> Option<u64> {
        if !cd.0.is_dir() || cd.stop_intent().exists() {
            return None;
        }
        // read again: an in-place update applies to this decision
        let cfg: RuntimeConfig = fsutil::read_json(&cd.config()).ok().flatten()?;
        // an unhealthy container its prober stopped is started again whatever the policy
        let unhealthy = super::health::read(&cd).is_some_and(|h| h.stopped_unhealthy);
        if !(unhealthy || super::supervise::should_restart(cfg.restart, exit, restarts.get())) {
            return None;
        }
        let ran_ms = exit.finished_at.saturating_sub(exit.started_at) * 1000;
        failures = cfg.backoff.next_failures(failures, ran_ms);
        let delay = cfg
            .backoff
            .delay(failures.saturating_sub(1), super::supervise::clock_jitter());
        Some(fsutil::now_unix_ms() + delay.as_millis() as u64)
    };
    let mut first = true;
    loop {
        let started = write_etc(&cd, &cfg)
            .map_err(|e| format!("write /etc files: {e}"))
            .and_then(|()| {
                run_once(
                    &cd,
                    &cfg,
                    (&mut ports, control.as_ref()),
                    restarts.get(),
                    ready,
                    &mut decide,
                )
            });
        match started {
            // the first start's failure is the starter's to report: nothing to supervise
            Err(e) if first => return Err(e),
            Err(e) => eprintln!("shim: restart {} failed: {e}", restarts.get()),
            Ok(()) => {}
        }
        first = false;
        let Some(mut exit) = super::state::read_exit(&cd.exit()).ok().flatten() else {
            break;
        };
        let Some(at) = exit.restart_at_ms else {
            break;
        };
        let delay = std::time::Duration::from_millis(at.saturating_sub(fsutil::now_unix_ms()));
        if !wait_unless_stopped(&cd, delay) {
            // stopped while waiting: the exit stands, with no restart to come
            exit.restart_at_ms = None;
            if cd.0.is_dir() {
                let _ = fsutil::write_json(&cd.exit(), &exit);
            }
            break;
        }
        if let Ok(Some(c)) = fsutil::read_json::<RuntimeConfig>(&cd.config()) {
            cfg = c;
        }
        restarts.set(restarts.get() + 1);
    }
    Ok(())
}

/// The container's supervisor lock (`shim.lock`, exclusive, for the shim's life): a second
/// shim for the same container refuses to start instead of supervising it too.
fn supervisor_lock(cd: &ContainerDir) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = cd.0.join("shim.lock");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&p)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            "the container already has a supervisor (its shim runs)".to_string()
        } else {
            format!("lock {}: {e}", p.display())
        }
    })
}

/// Sleep `delay` in short steps (a crash loop costs no CPU to speak of), returning false as
/// soon as a stop intent appears or the container's directory goes.
fn wait_unless_stopped(cd: &ContainerDir, delay: std::time::Duration) -> bool {
    let end = std::time::Instant::now() + delay;
    loop {
        if cd.stop_intent().exists() || !cd.0.is_dir() {
            return false;
        }
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(200)));
    }
}

/// Start the container once and supervise it until it exits: its output into the log, its
/// exit recorded, its cgroup and veths removed. `ready`, if still there, hears the pid (or
/// the failure) of this start.
fn run_once(
    cd: &ContainerDir,
    cfg: &RuntimeConfig,
    (ports, control): (
        &mut Vec<crate::net::proxy::Bound>,
        Option<&std::os::unix::net::UnixListener>,
    ),
    restarts: u32,
    ready: &mut Option<std::fs::File>,
    decide: &mut dyn FnMut(&ExitRecord) -> Option<u64>,
) -> Result<(), String> {
    let dir = cd.0.as_path();
    // the last run's health says nothing of this one
    let _ = std::fs::remove_file(cd.health());
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let (fail_r, fail_w) = pipe()?;
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWPID;
    if cfg.net.own_namespace() {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    let loc = CgroupLocation::for_container(dir, cfg.cgroup_parent.as_deref());
    // read the cgroup mounts now, once: the child inherits them and needs them after go
    let _ = loc.open();
    let child_loc = loc.clone();
    let child_cfg = cfg.clone();
    let child_dir = dir.to_path_buf();
    let (cout, cerr, cgo, cfail, shim_go) = (
        out_w.as_raw_fd(),
        err_w.as_raw_fd(),
        go_r.as_raw_fd(),
        fail_w.as_raw_fd(),
        go_w.as_raw_fd(),
    );
    // The container's first process mounts its root filesystem while the shim creates the
    // cgroup and the network (one on each core); it joins the cgroup and pivots into the root
    // only once the shim says go. Nothing of the image runs before that.
    let child = Box::new(move || -> isize {
        // the shim's end of the go pipe: with our copy closed, a shim that dies before go
        // reads as end of file below instead of leaving us waiting forever
        let _ = nix::unistd::close(shim_go);
        // files made in the container (mount points, the working directory, a volume's
        // first contents) get the modes a container expects, not berth's private umask
        crate::sys::set_umask(super::init::CONTAINER_UMASK);
        let fail_fd = cfail;
        let die = |msg: String| -> isize {
            // SAFETY-free: write through /proc/self/fd to avoid owning the raw fd here
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/self/fd/{fail_fd}"))
            {
                let _ = f.write_all(msg.as_bytes());
            }
            127
        };
        let stdio = (|| -> std::io::Result<()> {
            let null = std::fs::File::open("/dev/null")?;
            let o = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/self/fd/{cout}"))?;
            let e = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/self/fd/{cerr}"))?;
            crate::sys::dup_onto(null.as_fd(), 0)?;
            crate::sys::dup_onto(o.as_fd(), 1)?;
            crate::sys::dup_onto(e.as_fd(), 2)?;
            Ok(())
        })();
        if let Err(e) = stdio {
            return die(format!("stdio: {e}"));
        }
        let root = match super::init::mount_rootfs(&child_cfg, &child_dir) {
            Ok(r) => r,
            Err(e) => return die(e.to_string()),
        };
        // wait until the shim has made the cgroup and the network (and, on v2, put us in it)
        let mut b = [0u8; 1];
        match std::fs::File::open(format!("/proc/self/fd/{cgo}")).and_then(|mut f| f.read(&mut b)) {
            Ok(1) => {}
            _ => return die("setup: the shim went away".into()),
        }
        let cg = child_loc.open();
        if cg.joins_itself()
            && let Err(e) = cg.join_self()
        {
            return die(e.to_string());
        }
        if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP) {
            return die(format!("cgroup namespace: {e}"));
        }
        if let Err(e) = super::init::enter_rootfs(&child_cfg, root) {
            return die(e.to_string());
        }
        let e = super::init::exec_process(&child_cfg, fail_fd);
        die(e.to_string())
    });
    let pid = crate::sys::clone_child(child, flags).map_err(|e| format!("clone: {e}"))?;
    drop((out_w, err_w, go_r, fail_w));
    // a child that failed early has closed its end of the go pipe: writing "g" must then be
    // an error, not a SIGPIPE that kills the shim (the child was cloned with the old mask)
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&nix::sys::signal::SigSet::from(
            nix::sys::signal::Signal::SIGPIPE,
        )),
        None,
    );
    let started_at = now_unix();
    // the child's own account of a failure, once it has exited (empty if it did not fail)
    let child_failure = |fail_r: OwnedFd| {
        let mut failure = String::new();
        let _ = std::fs::File::from(fail_r).read_to_string(&mut failure);
        failure
    };
    let cg = match loc.create(&cfg.limits, dir) {
        Ok(cg) => cg,
        Err(e) => {
            abandon(pid, None, &cfg.net);
            return Err(e.to_string());
        }
    };
    let added = if cg.joins_itself() {
        Ok(())
    } else {
        cg.add(pid.as_raw()).map_err(|e| e.to_string())
    };
    if let Err(e) = added.and_then(|()| attach_network(&cfg.net, pid.as_raw())) {
        abandon(pid, Some(&cg), &cfg.net);
        // the network fails too when the child died mounting its root: say why it died
        let failure = child_failure(fail_r);
        if failure.is_empty() {
            return Err(e);
        }
        record_start_failure(cd, started_at, &failure, decide);
        return Err(failure);
    }
    let mut go = std::fs::File::from(go_w);
    let _ = go.write_all(b"g");
    drop(go);
    let failure = child_failure(fail_r);
    if !failure.is_empty() {
        abandon(pid, Some(&cg), &cfg.net);
        record_start_failure(cd, started_at, &failure, decide);
        return Err(failure);
    }
    let state = ContainerState {
        pid: pid.as_raw(),
        shim_pid: std::process::id() as i32,
        started_at,
        pid_start_time: pid_start_time(pid.as_raw()).unwrap_or(0),
        cgroup: loc.clone(),
        restarts,
    };
    // a pid means nothing after a reboot: atomic, but not worth an fsync on the start path;
    // without its state or its log the container could not be managed: it does not start
    let opened = fsutil::write_json_volatile(&cd.state(), &state)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            LogWriter::open(&cd.log(), cfg.log_max_size, cfg.log_max_files)
                .map_err(|e| e.to_string())
        });
    // the last run's exit is over (the new state is written first: no reader sees neither)
    let _ = std::fs::remove_file(cd.exit());
    let mut log = match opened {
        Ok(log) => log,
        Err(e) => {
            abandon(pid, Some(&cg), &cfg.net);
            return Err(e);
        }
    };
    if let Some(mut r) = ready.take() {
        report(&mut r, &format!("ok {}\n", pid.as_raw()));
        // the starter reads until EOF: no copy of the readiness pipe may stay open
        devnull_stdio();
    }
    let target = match &cfg.net {
        NetMode::Bridge { ifaces, .. } => ifaces.first().map(|i| i.addr),
        _ => None,
    };
    let close = [out_r.as_raw_fd(), err_r.as_raw_fd()];
    // the port proxies this run started (one, or a second after a hand-over to this one)
    let mut proxies: Vec<nix::unistd::Pid> = match target {
        Some(t) if !ports.is_empty() => start_proxy(ports, t, close).into_iter().collect(),
        _ => vec![],
    };

    let prober = cfg.health.as_ref().and_then(|h| {
        start_prober(
            cd,
            h,
            pid.as_raw(),
            (&cfg.stop_signal, cfg.stop_timeout_ms),
            [out_r.as_raw_fd(), err_r.as_raw_fd()],
        )
    });

    // capture output until both pipes close, answering hand-over requests meanwhile
    {
        let mut on_request =
            |r: super::handoff::Request| handle_request(r, cfg, ports, &mut proxies, target, close);
        pump(
            &mut log,
            out_r,
            err_r,
            crate::sys::pidfd_open(pid.as_raw()).ok(),
            control.map(|l| {
                (
                    l,
                    &mut on_request as &mut dyn FnMut(super::handoff::Request),
                )
            }),
        );
    }
    let _ = log.flush_pending();
    let status = loop {
        match waitpid(pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    let (code, signal) = match status {
        Ok(WaitStatus::Exited(_, c)) => (Some(c), None),
        Ok(WaitStatus::Signaled(_, s, _)) => (None, Some(s as i32)),
        _ => (None, None),
    };
    let oom = cg.oom_kills() > 0;
    let mut rec = ExitRecord {
        code,
        signal,
        oom,
        started_at,
        finished_at: now_unix(),
        error: None,
        restart_at_ms: None,
    };
    for p in proxies.into_iter().chain(prober) {
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(p, None);
    }
    rec.restart_at_ms = decide(&rec);
    detach_network(&cfg.net);
    // a container whose directory is gone was removed (perhaps outside berth, then by apply
    // through its cgroup): writing the record would make the directory again
    if cd.0.is_dir() {
        let _ = fsutil::write_json(&cd.exit(), &rec);
    }
    if let Err(e) = cg.destroy() {
        eprintln!("shim: {e}");
    }
    Ok(())
}

/// Undo a start: kill (if it has not exited) and reap the container's first process, remove
/// its cgroup and any veths.
fn abandon(pid: nix::unistd::Pid, cg: Option<&super::cgroup::ContainerCgroup>, net: &NetMode) {
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = waitpid(pid, None);
    if let Some(cg) = cg {
        let _ = cg.destroy();
    }
    detach_network(net);
}

/// A start that failed inside the container (before its command ran) is an exit with
/// code 127, as a shell reports a command it could not run.
fn record_start_failure(
    cd: &ContainerDir,
    started_at: u64,
    failure: &str,
    decide: &mut dyn FnMut(&ExitRecord) -> Option<u64>,
) {
    let mut rec = ExitRecord {
        code: Some(127),
        signal: None,
        oom: false,
        started_at,
        finished_at: now_unix(),
        error: Some(failure.to_string()),
        restart_at_ms: None,
    };
    rec.restart_at_ms = decide(&rec);
    let _ = fsutil::write_json(&cd.exit(), &rec);
}

/// Host side of bridge networking: a veth per network, its peer moved into the container.
fn attach_network(net: &NetMode, pid: i32) -> Result<(), String> {
    if let NetMode::Bridge { ifaces, .. } = net {
        for i in ifaces {
            crate::net::link::create_veth(&i.host_veth, &i.peer, &i.bridge, pid, i.addr)
                .map_err(|e| format!("network {}: {e}", i.network))?;
        }
    }
    Ok(())
}

/// The veths go with the container's namespace; remove any the kernel has not yet.
fn detach_network(net: &NetMode) {
    if let NetMode::Bridge { ifaces, .. } = net {
        for i in ifaces {
            if crate::net::link::exists(&i.host_veth) {
                let _ = crate::net::link::delete(&i.host_veth);
            }
        }
    }
}

/// Fork a helper of the shim that runs `run` (never returning): it dies with the shim
/// (parent-death signal; a shim gone before that took effect is seen by the parent's pid, not
/// by getppid() == 1, which misses under a subreaper), holds none of the container's output
/// pipes (`close`), and is killed by the shim when the container exits.
fn fork_helper(what: &str, close: [i32; 2], run: impl FnOnce()) -> Option<nix::unistd::Pid> {
    let shim = nix::unistd::getpid();
    match crate::sys::fork_process() {
        Ok(Some(child)) => Some(child),
        Ok(None) => {
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            if nix::unistd::getppid() != shim {
                std::process::exit(0);
            }
            for fd in close {
                let _ = nix::unistd::close(fd);
            }
            run();
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("shim: cannot start the {what}: {e}");
            None
        }
    }
}

/// Fork the health prober ([`super::health::probe_loop`]).
fn start_prober(
    cd: &ContainerDir,
    h: &super::health::HealthConfig,
    pid: i32,
    stop: (&str, u64),
    close: [i32; 2],
) -> Option<nix::unistd::Pid> {
    fork_helper("health prober", close, || {
        super::health::probe_loop(cd, h, pid, stop)
    })
}

/// Fork the port proxy, serving copies of the shim's sockets (the shim keeps its own for the
/// next start).
fn start_proxy(
    ports: &[crate::net::proxy::Bound],
    target: std::net::Ipv4Addr,
    close: [i32; 2],
) -> Option<nix::unistd::Pid> {
    use crate::net::proxy::Bound;
    fork_helper("port proxy", close, || {
        let copies: Vec<Bound> = ports
            .iter()
            .filter_map(|b| match b {
                Bound::Tcp(l, p) => l.try_clone().ok().map(|l| Bound::Tcp(l, *p)),
                Bound::Udp(u, p) => u.try_clone().ok().map(|u| Bound::Udp(u, *p)),
            })
            .collect();
        crate::net::proxy::serve(copies, target)
    })
}

/// Answer one hand-over request ([`super::handoff`]): give the ports' sockets, take them
/// (and serve them), or release them (the proxy finishes its connections and exits).
fn handle_request(
    r: super::handoff::Request,
    cfg: &RuntimeConfig,
    ports: &mut Vec<crate::net::proxy::Bound>,
    proxies: &mut Vec<nix::unistd::Pid>,
    target: Option<std::net::Ipv4Addr>,
    close: [i32; 2],
) {
    use super::handoff::{give_reply, reply, take};
    match r.word.as_str() {
        "give" if ports.is_empty() => reply(&r.stream, "error it holds no published ports", &[]),
        "give" => give_reply(&r.stream, ports),
        "take" if !ports.is_empty() => {
            reply(&r.stream, "error it holds its published ports already", &[])
        }
        "take" => {
            let Some(t) = target else {
                return reply(&r.stream, "error it is on no bridge network", &[]);
            };
            match take(&cfg.ports, r.fds) {
                Ok(b) => {
                    *ports = b;
                    proxies.extend(start_proxy(ports, t, close));
                    reply(&r.stream, "ok", &[]);
                }
                Err(e) => reply(&r.stream, &format!("error {e}"), &[]),
            }
        }
        "release" => {
            // its restarts serve no ports either: the successor has them
            ports.clear();
            let mut pids = vec![];
            for p in proxies.iter() {
                if nix::sys::signal::kill(*p, nix::sys::signal::Signal::SIGUSR1).is_ok() {
                    pids.push(p.as_raw().to_string());
                }
            }
            reply(&r.stream, &format!("ok {}", pids.join(" ")), &[]);
        }
        _ => reply(&r.stream, "error unknown request", &[]),
    }
}

/// Capture the container's output into the log until both pipes close and, when hand-over
/// requests are answered (`control`), until the container has exited too (`exited`, its
/// pidfd: a container that sends its output elsewhere closes its pipes early).
fn pump(
    log: &mut LogWriter,
    out: OwnedFd,
    err: OwnedFd,
    exited: Option<OwnedFd>,
    mut control: Option<(
        &std::os::unix::net::UnixListener,
        &mut dyn FnMut(super::handoff::Request),
    )>,
) {
    let mut open = [
        Some(std::fs::File::from(out)),
        Some(std::fs::File::from(err)),
    ];
    // without a pidfd (a kernel before 5.3) requests are answered while the pipes are open
    let mut running = exited.filter(|_| control.is_some());
    let mut finished = vec![];
    let mut buf = vec![0u8; 64 * 1024];
    while open.iter().any(Option::is_some) || running.is_some() {
        let mut fds: Vec<PollFd> = vec![];
        let mut idx = vec![];
        for (i, f) in open.iter().enumerate() {
            if let Some(f) = f {
                fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
                idx.push(i);
            }
        }
        let control_at = fds.len();
        if let Some((l, _)) = &control {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        let exit_at = fds.len();
        if let Some(p) = &running {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        let fired = |i: usize| {
            fds.get(i)
                .and_then(|p| p.revents())
                .is_some_and(|r| !r.is_empty())
        };
        let ready: Vec<(usize, bool)> = idx
            .iter()
            .enumerate()
            .map(|(k, i)| (*i, fired(k)))
            .collect();
        let request = control.is_some() && fired(control_at);
        let gone = running.is_some() && fired(exit_at);
        drop(fds);
        if gone {
            running = None;
        }
        if request
            && let Some((l, handle)) = control.as_mut()
            && let Some(r) = super::handoff::accept(l)
        {
            handle(r);
        }
        for (i, r) in ready {
            if !r {
                continue;
            }
            let n = open[i].as_mut().map(|f| f.read(&mut buf)).unwrap_or(Ok(0));
            match n {
                // kept open until the end: a helper forked meanwhile (the proxy, on a
                // hand-over) closes these descriptor numbers, which must not be reused
                Ok(0) | Err(_) => finished.extend(open[i].take()),
                Ok(n) => {
                    let _ = log.write(i, &buf[..n]);
                }
            }
        }
    }
}
