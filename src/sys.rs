//! The one module allowed to use `unsafe`: raw system calls that `nix` exposes only as unsafe
//! functions. Every block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

use nix::sys::signal::{SigHandler, Signal, signal};

/// Restore the default SIGPIPE action so `berth … | head` ends quietly instead of panicking
/// on a closed stdout (Rust ignores SIGPIPE by default).
pub fn reset_sigpipe() {
    // SAFETY: called at the start of main, before any thread exists; installing SIG_DFL runs
    // no handler code, so no async-signal-safety rules are involved.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// Start `child` in a new process created by clone(2) with `flags` (namespaces) and SIGCHLD
/// as its exit signal. Returns the child's pid. The child runs `child` and exits with its
/// return value.
pub fn clone_child(
    child: Box<dyn FnMut() -> isize + '_>,
    flags: nix::sched::CloneFlags,
) -> nix::Result<nix::unistd::Pid> {
    // 1 MiB stack for the child's setup code (mounts, user lookup, exec): it allocates little
    // and recurses nowhere, so this is generous. The buffer outlives the call; the child gets
    // its own copy-on-write view of this memory and never returns into our frames.
    let mut stack = vec![0u8; 1 << 20];
    // SAFETY: the shim calling this is single-threaded (no other thread can hold a lock the
    // child would inherit), the stack is large enough for the child's bounded work, and the
    // child only runs `child` and then exits, never unwinding into the parent's stack.
    unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
}

/// Close every open file descriptor above 2 except `keep` (CVE-2024-21626: no host fd may
/// reach the container).
pub fn close_fds_except(keep: &[std::os::fd::RawFd]) {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(rd) => rd
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => (3..1024).collect(),
    };
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor number we do not own elsewhere: the caller is about
            // to exec, nothing in this process uses these descriptors afterwards (the one we
            // listed /proc/self/fd with is already closed, and closing it twice returns EBADF).
            unsafe {
                libc::close(fd);
            }
        }
    }
}

/// Put `fd` on stdin/stdout/stderr number `target` (0, 1 or 2).
pub fn dup_onto(fd: std::os::fd::BorrowedFd<'_>, target: i32) -> nix::Result<()> {
    match target {
        0 => nix::unistd::dup2_stdin(fd),
        1 => nix::unistd::dup2_stdout(fd),
        _ => nix::unistd::dup2_stderr(fd),
    }
}

/// fork(2). Returns `Some(child pid)` in the parent and `None` in the child.
pub fn fork_process() -> nix::Result<Option<nix::unistd::Pid>> {
    // SAFETY: only the single-threaded shim calls this (before it starts any thread), so the
    // child cannot inherit a lock held by another thread; the child continues with ordinary
    // code of the same single thread.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child)),
        nix::unistd::ForkResult::Child => Ok(None),
    }
}

/// Make `fd` (a terminal) the controlling terminal of this session (TIOCSCTTY).
pub fn set_controlling_tty(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal); `fd` is a valid open
    // descriptor for the lifetime of the borrow.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) };
    nix::errno::Errno::result(r).map(drop)
}
