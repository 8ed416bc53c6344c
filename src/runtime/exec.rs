//! `berth exec`: run a command inside a running container, joining all its namespaces and
//! its cgroup, with its user, environment, capabilities and working directory.

use super::config::ProcessSpec;
use super::{Runtime, RuntimeError};
use crate::observe::ContainerStatus;
use nix::sched::CloneFlags;
use nix::sys::wait::{WaitStatus, waitpid};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

fn code_of(ws: nix::Result<WaitStatus>) -> i32 {
    match ws {
        Ok(WaitStatus::Exited(_, c)) => c,
        Ok(WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
        _ => 255,
    }
}

fn wait(pid: nix::unistd::Pid) -> i32 {
    loop {
        match waitpid(pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return code_of(other),
        }
    }
}

/// Run `args` in container `name`; returns the command's exit code (128+N for a signal).
/// Must be called from a single-threaded process.
pub fn exec(
    rt: &Runtime,
    name: &str,
    args: Vec<String>,
    interactive: bool,
    tty: bool,
) -> Result<i32, RuntimeError> {
    let pid = match rt.status(name)? {
        ContainerStatus::Running { pid, .. } => pid,
        _ => return Err(RuntimeError::NotRunning { name: name.into() }),
    };
    let cfg = rt.config(name)?;
    let st = rt
        .state(name)
        .ok_or_else(|| RuntimeError::NotRunning { name: name.into() })?;
    let spec = ProcessSpec {
        args,
        ..cfg.process.clone()
    };
    // namespaces to join, opened before anything changes
    let mut ns: Vec<(OwnedFd, CloneFlags)> = vec![];
    for (n, f) in [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let p = format!("/proc/{pid}/ns/{n}");
        let fd =
            std::fs::File::open(&p).map_err(crate::fsutil::at("open", std::path::Path::new(&p)))?;
        ns.push((fd.into(), f));
    }
    let pty = if tty {
        Some(
            nix::pty::openpty(None, None).map_err(|e| RuntimeError::StartFailed {
                name: name.into(),
                message: format!("openpty: {e}"),
            })?,
        )
    } else {
        None
    };
    let cg = st.cgroup.open();
    let child = crate::sys::fork_process().map_err(|e| RuntimeError::StartFailed {
        name: name.into(),
        message: format!("fork: {e}"),
    })?;
    let Some(child) = child else {
        // child: cgroup, namespaces, then fork once more so the pid namespace applies
        let die = |m: String| -> ! {
            eprintln!("berth exec: {m}");
            std::process::exit(126)
        };
        // Non-dumpable before joining anything: the process forked below appears in the
        // container's pid namespace while it is still berth, and a dumpable berth there could
        // be opened through /proc/<pid>/exe by the container's root (CVE-2019-5736). exec of
        // the command resets it.
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            die(format!("set non-dumpable: {e}"));
        }
        if let Err(e) = cg.add(std::process::id() as i32) {
            die(e.to_string());
        }
        for (fd, flag) in &ns {
            if let Err(e) = nix::sched::setns(fd.as_fd(), *flag) {
                die(format!("join {flag:?}: {e}"));
            }
        }
        drop(ns);
        match crate::sys::fork_process() {
            Ok(Some(gc)) => std::process::exit(wait(gc)),
            Ok(None) => {}
            Err(e) => die(format!("fork: {e}")),
        }
        if let Some(p) = &pty {
            let _ = nix::unistd::setsid();
            let _ = crate::sys::set_controlling_tty(p.slave.as_fd());
            for t in 0..3 {
                let _ = crate::sys::dup_onto(p.slave.as_fd(), t);
            }
        } else if !interactive && let Ok(null) = std::fs::File::open("/dev/null") {
            let _ = crate::sys::dup_onto(null.as_fd(), 0);
        }
        drop(pty);
        let e = match super::init::exec_as(&spec, -1) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        eprintln!("berth exec: {e}");
        std::process::exit(127);
    };
    drop(ns);
    let Some(p) = pty else {
        return Ok(wait(child));
    };
    drop(p.slave);
    relay(p.master, interactive);
    Ok(wait(child))
}

/// Copy our stdin to the pty and the pty to our stdout until the pty closes, with our
/// terminal (if any) in raw mode.
fn relay(master: OwnedFd, interactive: bool) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::termios;
    let stdin = std::io::stdin();
    let saved = termios::tcgetattr(stdin.as_fd()).ok();
    if let Some(t) = &saved {
        let mut raw = t.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw);
    }
    let mut m = std::fs::File::from(master);
    let mut buf = [0u8; 8192];
    let mut stdin_open = interactive;
    loop {
        let mfd = m.try_clone().ok();
        let Some(mfd) = mfd else { break };
        let mut fds = vec![PollFd::new(mfd.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        let m_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let in_ready = stdin_open
            && fds
                .get(1)
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty());
        drop(fds);
        if m_ready {
            match m.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
            }
        }
        if in_ready {
            match stdin.lock().read(&mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => {
                    let _ = m.write_all(&buf[..n]);
                }
            }
        }
    }
    if let Some(t) = saved {
        let _ = termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &t);
    }
}
