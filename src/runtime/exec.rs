//! `berth exec`: run a command inside a running container, joining all its namespaces and
//! its cgroup, with its user, environment, capabilities and working directory.

use super::config::ProcessSpec;
use super::{Runtime, RuntimeError};
use crate::observe::ContainerStatus;
use nix::sched::CloneFlags;
use nix::sys::wait::{WaitStatus, waitpid};
use std::io::{Read, Write};
use std::os::fd::{AsFd, IntoRawFd, OwnedFd};

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

/// Execute this process again from an unwritable view of its own binary (see
/// [`Runtime::unwritable_exe`]) unless it already runs from one: `exec`'s child is berth
/// inside the container's pid namespace until it executes the command, and a container's
/// root must not be able to reach the host's binary through its `/proc/PID/exe`. Returns only
/// when nothing needed doing; a failure to re-execute is an error, never a silent fallback.
pub fn reexec_unwritable(rt: &Runtime) -> Result<(), RuntimeError> {
    if crate::sys::running_sealed() {
        return Ok(());
    }
    let failed = |e: std::io::Error| RuntimeError::Spawn {
        name: "exec".into(),
        source: e,
    };
    let me = std::fs::read_link("/proc/self/exe").map_err(failed)?;
    let exe = if me.exists() {
        rt.unwritable_exe_of(&me)
    } else {
        // replaced since we started: copy what we run
        // (the descriptor stays open for the execve below)
        crate::sys::sealed_copy(std::path::Path::new("/proc/self/exe"))
            .map(|fd| std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.into_raw_fd())))
    }
    .map_err(failed)?;
    let cstr = |s: &std::ffi::OsStr| {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::CString::new(s.as_bytes())
            .map_err(|_| failed(std::io::Error::from(std::io::ErrorKind::InvalidInput)))
    };
    let mut args: Vec<std::ffi::CString> = vec![c"berth".to_owned()];
    for a in std::env::args_os().skip(1) {
        args.push(cstr(&a)?);
    }
    let path = cstr(exe.as_os_str())?;
    match nix::unistd::execv(&path, &args) {
        Ok(never) => match never {},
        Err(e) => Err(failed(e.into())),
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
    // the process, pinned: a directory descriptor of /proc/<pid> names that process and no
    // other that might later reuse its pid (it fails once the process is gone); checked to be
    // the container's by its start time
    let proc_dir = std::fs::File::open(format!("/proc/{pid}"))
        .map_err(|_| RuntimeError::NotRunning { name: name.into() })?;
    let started = {
        use std::os::fd::AsRawFd;
        std::fs::read_to_string(format!("/proc/self/fd/{}/stat", proc_dir.as_raw_fd()))
            .ok()
            .and_then(|s| {
                let after = s[s.rfind(')')? + 2..].to_string();
                after.split(' ').nth(19)?.parse::<u64>().ok()
            })
    };
    if started != Some(st.pid_start_time) {
        return Err(RuntimeError::NotRunning { name: name.into() });
    }
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
        let p = {
            use std::os::fd::AsRawFd;
            format!("/proc/self/fd/{}/ns/{n}", proc_dir.as_raw_fd())
        };
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
    // Without a terminal of its own, the command gets pipes, never the caller's descriptors:
    // a program in the container holding the admin's terminal could push keystrokes into
    // the admin's shell (TIOCSTI) or read what is typed after exec returns.
    let failed = |e: nix::Error| RuntimeError::StartFailed {
        name: name.into(),
        message: format!("pipe: {e}"),
    };
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(failed);
    let pipes = if tty {
        None
    } else {
        let stdin = if interactive { Some(pipe()?) } else { None };
        Some((stdin, pipe()?, pipe()?))
    };
    let cg = st.cgroup.open();
    let me = nix::unistd::getpid();
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
        // killed with `berth exec` (a health check past its timeout): nothing outlives it
        if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err()
            || nix::unistd::getppid() != me
        {
            die("berth exec is gone".into());
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
        // only the command keeps its ends of the pipes and the terminal: a copy held here
        // would keep its stdin from ever ending
        let pty = pty.map(|p| {
            drop(p.master);
            p.slave
        });
        let pipes = pipes.map(|(stdin, (out_r, out_w), (err_r, err_w))| {
            drop((out_r, err_r));
            (
                stdin.map(|(r, w)| {
                    drop(w);
                    r
                }),
                out_w,
                err_w,
            )
        });
        match crate::sys::fork_process() {
            Ok(Some(gc)) => {
                drop((pty, pipes));
                std::process::exit(wait(gc))
            }
            Ok(None) => {}
            Err(e) => die(format!("fork: {e}")),
        }
        // a session of its own: no controlling terminal of the caller's
        if let Err(e) = nix::unistd::setsid() {
            die(format!("setsid: {e}"));
        }
        let stdio = if let Some(slave) = &pty {
            crate::sys::set_controlling_tty(slave.as_fd())
                .map_err(|e| format!("set the controlling terminal: {e}"))
                .and_then(|()| {
                    (0..3).try_for_each(|t| {
                        crate::sys::dup_onto(slave.as_fd(), t).map_err(|e| e.to_string())
                    })
                })
        } else if let Some((stdin, out_w, err_w)) = &pipes {
            let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string());
            null.and_then(|null| {
                let input = stdin.as_ref().map(|r| r.as_fd()).unwrap_or(null.as_fd());
                crate::sys::dup_onto(input, 0)
                    .and_then(|()| crate::sys::dup_onto(out_w.as_fd(), 1))
                    .and_then(|()| crate::sys::dup_onto(err_w.as_fd(), 2))
                    .map_err(|e| e.to_string())
            })
        } else {
            Ok(())
        };
        if let Err(e) = stdio {
            die(format!("stdio: {e}"));
        }
        drop((pty, pipes));
        let e = match super::init::exec_as(&spec, -1, true) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        eprintln!("berth exec: {e}");
        std::process::exit(127);
    };
    drop(ns);
    // a command that stops reading its stdin must not kill us with SIGPIPE
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&nix::sys::signal::SigSet::from(
            nix::sys::signal::Signal::SIGPIPE,
        )),
        None,
    );
    if let Some(p) = pty {
        drop(p.slave);
        let input = if interactive {
            p.master.try_clone().ok().map(std::fs::File::from)
        } else {
            None
        };
        relay(
            input,
            vec![(std::fs::File::from(p.master), Out::Stdout)],
            true,
        );
    } else if let Some((stdin, (out_r, out_w), (err_r, err_w))) = pipes {
        drop((out_w, err_w));
        let input = stdin.map(|(r, w)| {
            drop(r);
            std::fs::File::from(w)
        });
        relay(
            input,
            vec![
                (std::fs::File::from(out_r), Out::Stdout),
                (std::fs::File::from(err_r), Out::Stderr),
            ],
            false,
        );
    }
    Ok(wait(child))
}

/// Where a command's output goes.
#[derive(Clone, Copy)]
enum Out {
    Stdout,
    Stderr,
}

/// Copy our stdin to `input` (on a thread of its own, so that a command that does not read
/// its stdin cannot stall its output; at the end of our stdin `input` is closed) and each of
/// `outputs` to our stdout or stderr, until every output has ended. With `terminal`, our
/// stdin (if a terminal) is in raw mode meanwhile.
fn relay(input: Option<std::fs::File>, outputs: Vec<(std::fs::File, Out)>, terminal: bool) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::termios;
    let stdin = std::io::stdin();
    let saved = if terminal {
        termios::tcgetattr(stdin.as_fd()).ok()
    } else {
        None
    };
    if let Some(t) = &saved {
        let mut raw = t.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw);
    }
    if let Some(mut input) = input {
        // never joined: it may sit in a read of our stdin when the command has ended
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut input);
        });
    }
    let mut outputs: Vec<Option<(std::fs::File, Out)>> = outputs.into_iter().map(Some).collect();
    let mut buf = [0u8; 8192];
    while outputs.iter().any(Option::is_some) {
        let mut fds = vec![];
        let mut which = vec![];
        for (i, o) in outputs.iter().enumerate() {
            if let Some((f, _)) = o {
                fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
                which.push(i);
            }
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        let ready: Vec<usize> = fds
            .iter()
            .zip(&which)
            .filter(|(p, _)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, w)| *w)
            .collect();
        drop(fds);
        for i in ready {
            let Some((f, out)) = outputs[i].as_mut() else {
                continue;
            };
            match f.read(&mut buf) {
                Ok(0) | Err(_) => outputs[i] = None,
                Ok(n) => {
                    let _ = match out {
                        Out::Stdout => {
                            let mut o = std::io::stdout();
                            o.write_all(&buf[..n]).and_then(|()| o.flush())
                        }
                        Out::Stderr => std::io::stderr().write_all(&buf[..n]),
                    };
                }
            }
        }
    }
    if let Some(t) = saved {
        let _ = termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &t);
    }
}
