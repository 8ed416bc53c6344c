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

/// Keep the allocator from handing buffers back to the kernel between uses. glibc serves a
/// large allocation (a pull's ~400 KB network reads, its 256 KB to 4 MB stage buffers) with
/// a fresh mmap until it has seen one of that size freed, and trims a thread's heap as soon
/// as 128 KB lie free at its top: memory touched again costs a page fault and a zeroed page
/// per 4 KB. A pull took ~17,000 faults, ~12,500 with these settings, and ~4% less CPU
/// (`perf stat -e page-faults,task-clock berth image pull …`). The cost: up to 64 MB freed
/// at a heap's top stay with the process.
pub fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters (under the allocator's own lock); a
    // rejected value leaves the default in place and is harmless.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
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

/// Close every descriptor from 3 up (`close_range(2)`), except `keep`. For processes that
/// inherit descriptors they did not open (the shim, from whoever ran berth; `exec`, before any
/// path inside a container is resolved): a host directory's descriptor reachable through
/// `/proc/self/fd/N` would let a container path escape to the host (CVE-2024-21626). Falls
/// back to closing one by one where the kernel lacks close_range.
pub fn close_inherited_fds(keep: &[std::os::fd::RawFd]) {
    let mut keep: Vec<i32> = keep.iter().copied().filter(|fd| *fd > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first: u32 = 3;
    let mut ranges = vec![];
    for k in keep {
        if k as u32 > first {
            ranges.push((first, k as u32 - 1));
        }
        first = k as u32 + 1;
    }
    ranges.push((first, u32::MAX));
    for (lo, hi) in ranges {
        // SAFETY: close_range closes descriptors by number; the caller owns none of them in
        // Rust objects it will use again (it is about to exec, or has only just started and
        // holds nothing open above 2 but `keep`).
        let r = unsafe { libc::close_range(lo, hi, 0) };
        if r != 0 {
            let keep: Vec<i32> = (3..lo as i32).collect();
            close_fds_except(&keep);
            return;
        }
    }
}

/// Make the mount at `fd` and every mount below it read-only (`mount_setattr(2)` with
/// `AT_RECURSIVE`; Linux 5.12). A plain read-only remount of a recursive bind leaves the
/// mounts below it writable.
pub fn mount_set_readonly_recursive(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: the path is an empty NUL-terminated string (AT_EMPTY_PATH: the descriptor
    // itself), `attr` is a live `struct mount_attr` of the size passed, and `fd` is open for
    // the call's duration.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    nix::errno::Errno::result(r).map(drop)
}

/// Join a new anonymous session keyring (`keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`), as runc
/// does per container: the host's session keyring is no longer this process's.
pub fn join_new_session_keyring() -> nix::Result<()> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: a NULL name asks for an anonymous keyring; no memory of ours is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    nix::errno::Errno::result(r).map(drop)
}

/// Open the executable at `path` through a new, detached, read-only overlayfs mount of its
/// directory (with `empty`, an empty directory, as the second layer overlayfs needs without
/// an upper layer): the same file, but every write through it fails with EROFS, and the
/// mount is reachable only through the returned descriptor. runc ≥ 1.2 does the same; it
/// costs a few system calls instead of a copy of the binary. Needs the new mount API
/// (Linux 5.2) and overlayfs.
pub fn read_only_view(
    path: &std::path::Path,
    empty: &std::path::Path,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
    const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
    const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
    let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let dir = path.parent().ok_or_else(invalid)?;
    let name =
        CString::new(path.file_name().ok_or_else(invalid)?.as_bytes()).map_err(|_| invalid())?;
    // overlayfs splits lowerdir at ':' and takes '\\' as an escape
    let escape = |p: &std::path::Path| {
        let mut v = vec![];
        for &b in p.as_os_str().as_bytes() {
            if b == b':' || b == b'\\' {
                v.push(b'\\');
            }
            v.push(b);
        }
        v
    };
    let mut lower = escape(dir);
    lower.push(b':');
    lower.extend_from_slice(&escape(empty));
    let lower = CString::new(lower).map_err(|_| invalid())?;
    let owned = |r: libc::c_long| -> std::io::Result<OwnedFd> {
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this new descriptor to us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
    };
    // SAFETY: a NUL-terminated file-system name and plain flags.
    let fs =
        owned(unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) })?;
    for (key, value) in [(c"lowerdir", lower.as_c_str()), (c"xino", c"off")] {
        // SAFETY: `fs` is an open fs context; key and value are NUL-terminated strings that
        // live across the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        };
        if r < 0 && key != c"xino" {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: no pointers; `fs` is an open fs context.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: no pointers; `fs` is a created fs context.
    let mnt = owned(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        )
    })?;
    let fd = nix::fcntl::openat(
        mnt,
        name.as_c_str(),
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NOFOLLOW,
        nix::sys::stat::Mode::empty(),
    )?;
    Ok(fd)
}

/// A sealed in-memory copy of the executable at `path` (`memfd_create`, then every seal):
/// what berth runs as whenever a container can see the process before its `execve` (the
/// shim and the container's first process; `berth exec`'s child). `/proc/PID/exe` of such a
/// process names the copy, which nobody can write, never the host's binary, which a
/// container's root could otherwise open and overwrite (CVE-2019-5736).
pub fn sealed_copy(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(
        c"berth",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut src = std::fs::File::open(path)?;
    let mut dst = std::fs::File::from(fd);
    std::io::copy(&mut src, &mut dst)?;
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(&dst, FcntlArg::F_ADD_SEALS(seals))?;
    Ok(dst.into())
}

/// Whether this process runs from a view no one can write: a [`sealed_copy`], or a
/// [`read_only_view`] (a file on a read-only overlayfs).
pub fn running_sealed() -> bool {
    if std::fs::read_link("/proc/self/exe")
        .is_ok_and(|p| p.to_string_lossy().starts_with("/memfd:berth"))
    {
        return true;
    }
    let Ok(exe) = std::fs::File::open("/proc/self/exe") else {
        return false;
    };
    nix::sys::statfs::fstatfs(&exe).is_ok_and(|s| {
        s.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC
            && nix::sys::statvfs::fstatvfs(&exe)
                .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
    })
}

/// Set the process umask (`umask(2)` through nix; here so callers need not import it).
pub fn set_umask(mask: u32) {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        mask as libc::mode_t,
    ));
}

/// Start writing back the dirty pages of `fd` in `offset..offset+len` without waiting for
/// them (`sync_file_range(SYNC_FILE_RANGE_WRITE)`; nix has no wrapper). A later fsync then
/// finds most of the file already on its way to the disk.
pub fn start_writeback(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: u64) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(nix::errno::Errno::EINVAL);
    };
    // SAFETY: plain integer arguments and a descriptor that `fd` borrows open for the call;
    // the kernel touches no user memory.
    let r =
        unsafe { libc::sync_file_range(fd.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    nix::errno::Errno::result(r).map(drop)
}

/// Put `fd` on stdin/stdout/stderr number `target` (0, 1 or 2).
pub fn dup_onto(fd: std::os::fd::BorrowedFd<'_>, target: i32) -> nix::Result<()> {
    match target {
        0 => nix::unistd::dup2_stdin(fd),
        1 => nix::unistd::dup2_stdout(fd),
        _ => nix::unistd::dup2_stderr(fd),
    }
}

/// A pidfd for process `pid` (`pidfd_open`, Linux 5.3): readable once the process has
/// exited, so its end can be waited for with poll instead of polling /proc.
pub fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain integer arguments; no pointers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new descriptor to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
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

/// One eBPF instruction (`struct bpf_insn`): opcode, dst/src registers (4 bits each), offset,
/// immediate.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// `union bpf_attr` as BPF_PROG_LOAD reads it, up to `expected_attach_type`.
#[repr(C, align(8))]
#[derive(Default)]
struct BpfProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` as BPF_PROG_ATTACH reads it.
#[repr(C, align(8))]
#[derive(Default)]
struct BpfProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    /// Explicit, so that it is zero: kernels 5.7-6.5 reject the call when any byte past
    /// `replace_bpf_fd` (up to the size passed) is not zero.
    _pad: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// Load a BPF_PROG_TYPE_CGROUP_DEVICE program. On a verifier rejection the error carries the
/// verifier's log.
pub fn bpf_load_device_program(insns: &[BpfInsn]) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let license = c"Apache-2.0";
    let load = |log: Option<&mut Vec<u8>>| -> std::io::Result<std::os::fd::OwnedFd> {
        let mut attr = BpfProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        attr.prog_name[..5].copy_from_slice(b"berth");
        if let Some(buf) = log {
            attr.log_level = 1;
            attr.log_size = buf.len() as u32;
            attr.log_buf = buf.as_mut_ptr() as u64;
        }
        // SAFETY: `insns`, `license` and the log buffer outlive the call, which reads the
        // first two and writes at most `log_size` bytes into the third.
        let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr) }?;
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
    };
    load(None).or_else(|e| {
        if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::EACCES) {
            return Err(e);
        }
        let mut log = vec![0u8; 64 * 1024];
        let again = load(Some(&mut log));
        let text = String::from_utf8_lossy(&log);
        let text = text.trim_end_matches('\0').trim();
        again.map_err(|e2| std::io::Error::new(e2.kind(), format!("{e2}: {text}")))
    })
}

/// Attach a device program to the cgroup open as `cgroup` (alongside any that its ancestors
/// run: every program on the path must allow an access).
pub fn bpf_attach_device_program(
    cgroup: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut attr = BpfProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
        _pad: 0,
    };
    // SAFETY: the attr carries no pointers; both descriptors are open for the call.
    unsafe { bpf(BPF_PROG_ATTACH, &mut attr) }.map(|_| ())
}

/// Marks the `#[repr(C)]` structs laid out as a prefix of the kernel's `union bpf_attr` for
/// one command, every byte initialised (explicit padding only).
trait BpfAttr {}
impl BpfAttr for BpfProgLoadAttr {}
impl BpfAttr for BpfProgAttachAttr {}

/// bpf(2) with `attr` and its size; the non-negative result.
///
/// # Safety
/// Every pointer `attr` carries must be valid, for the length it gives, for the call.
unsafe fn bpf<A: BpfAttr>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a correctly laid out, fully initialised prefix of `union bpf_attr`
    // for `cmd` (the `BpfAttr` types) and its size is passed, so the kernel reads and writes
    // within it; the pointers inside are valid by this function's contract.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// SHA-256 compression of `a` into `sa` and of `b` into `sb`, the two messages' rounds
/// interleaved on one core (see [`crate::hash`]).
/// Returns false, having done nothing, when the lengths differ or the CPU lacks the SHA
/// extensions (the caller then hashes one at a time).
pub fn sha256_compress2(
    sa: &mut [u32; 8],
    a: &[[u8; 64]],
    sb: &mut [u32; 8],
    b: &[[u8; 64]],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if a.len() == b.len()
        && std::arch::is_x86_feature_detected!("sha")
        && std::arch::is_x86_feature_detected!("sse2")
        && std::arch::is_x86_feature_detected!("ssse3")
        && std::arch::is_x86_feature_detected!("sse4.1")
    {
        // SAFETY: the function needs exactly these CPU features, detected just above; it
        // takes only references (its loads stay within the blocks they borrow, see there).
        unsafe { sha_ni::compress2(sa, a, sb, b) };
        return true;
    }
    let _ = (sa, a, sb, b);
    false
}

/// The SHA-NI kernel behind [`sha256_compress2`]: `sha2`'s x86 compression function with two
/// messages' instructions interleaved.
#[cfg(target_arch = "x86_64")]
mod sha_ni {
    /// The SHA-NI compression of `a` and `b` (equal lengths) into `sa` and `sb`, their rounds
    /// interleaved. Call through [`crate::sys::sha256_compress2`], which checks the CPU.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) fn compress2(sa: &mut [u32; 8], a: &[[u8; 64]], sb: &mut [u32; 8], b: &[[u8; 64]]) {
        use std::arch::x86_64::*;

        const K32: [u32; 64] = [
            0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
            0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
            0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
            0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
            0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
            0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
            0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
            0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
            0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
            0xc67178f2,
        ];
        let k: [__m128i; 16] = std::array::from_fn(|r| {
            let q = |i: usize| K32[4 * r + i] as i32;
            _mm_set_epi32(q(3), q(2), q(1), q(0))
        });

        // four rounds of one message: macros, so that everything stays in registers
        macro_rules! rounds4 {
            ($abef:ident, $cdgh:ident, $w:expr, $r:expr) => {{
                let t1 = _mm_add_epi32($w, k[$r]);
                $cdgh = _mm_sha256rnds2_epu32($cdgh, $abef, t1);
                let t2 = _mm_shuffle_epi32(t1, 0x0E);
                $abef = _mm_sha256rnds2_epu32($abef, $cdgh, t2);
            }};
        }
        // the next four schedule words from the last sixteen
        macro_rules! schedule {
            ($w0:ident, $w1:ident, $w2:ident, $w3:ident) => {{
                let t = _mm_add_epi32(_mm_sha256msg1_epu32($w0, $w1), _mm_alignr_epi8($w3, $w2, 4));
                $w0 = _mm_sha256msg2_epu32(t, $w3);
            }};
        }
        let load_block = |block: &[u8; 64]| -> [__m128i; 4] {
            // big-endian words: a byte shuffle of each 16 bytes loaded as they are (building
            // the vectors from integers instead costs a third of the speed)
            let mask = _mm_set_epi64x(0x0C0D_0E0F_0809_0A0B, 0x0405_0607_0001_0203);
            let p: *const __m128i = block.as_ptr().cast();
            // SAFETY: four unaligned 16-byte loads at offsets 0, 16, 32 and 48 of a 64-byte
            // array that `block` borrows.
            [0, 1, 2, 3].map(|i| _mm_shuffle_epi8(unsafe { _mm_loadu_si128(p.add(i)) }, mask))
        };
        let load = |s: &[u32; 8]| -> (__m128i, __m128i) {
            let q = |i: usize| s[i] as i32;
            let dcba = _mm_set_epi32(q(3), q(2), q(1), q(0));
            let hgfe = _mm_set_epi32(q(7), q(6), q(5), q(4));
            let cdab = _mm_shuffle_epi32(dcba, 0xB1);
            let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
            (
                _mm_alignr_epi8(cdab, efgh, 8),
                _mm_blend_epi16(efgh, cdab, 0xF0),
            )
        };
        let store = |abef: __m128i, cdgh: __m128i, s: &mut [u32; 8]| {
            let feba = _mm_shuffle_epi32(abef, 0x1B);
            let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
            let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
            let hgfe = _mm_alignr_epi8(dchg, feba, 8);
            *s = [
                _mm_extract_epi32::<0>(dcba) as u32,
                _mm_extract_epi32::<1>(dcba) as u32,
                _mm_extract_epi32::<2>(dcba) as u32,
                _mm_extract_epi32::<3>(dcba) as u32,
                _mm_extract_epi32::<0>(hgfe) as u32,
                _mm_extract_epi32::<1>(hgfe) as u32,
                _mm_extract_epi32::<2>(hgfe) as u32,
                _mm_extract_epi32::<3>(hgfe) as u32,
            ];
        };

        let (mut xabef, mut xcdgh) = load(sa);
        let (mut yabef, mut ycdgh) = load(sb);
        for (ba, bb) in a.iter().zip(b) {
            let (xs0, xs1, ys0, ys1) = (xabef, xcdgh, yabef, ycdgh);
            let [mut x0, mut x1, mut x2, mut x3] = load_block(ba);
            let [mut y0, mut y1, mut y2, mut y3] = load_block(bb);
            rounds4!(xabef, xcdgh, x0, 0);
            rounds4!(yabef, ycdgh, y0, 0);
            rounds4!(xabef, xcdgh, x1, 1);
            rounds4!(yabef, ycdgh, y1, 1);
            rounds4!(xabef, xcdgh, x2, 2);
            rounds4!(yabef, ycdgh, y2, 2);
            rounds4!(xabef, xcdgh, x3, 3);
            rounds4!(yabef, ycdgh, y3, 3);
            for g in 1..4 {
                let r = 4 * g;
                schedule!(x0, x1, x2, x3);
                schedule!(y0, y1, y2, y3);
                rounds4!(xabef, xcdgh, x0, r);
                rounds4!(yabef, ycdgh, y0, r);
                schedule!(x1, x2, x3, x0);
                schedule!(y1, y2, y3, y0);
                rounds4!(xabef, xcdgh, x1, r + 1);
                rounds4!(yabef, ycdgh, y1, r + 1);
                schedule!(x2, x3, x0, x1);
                schedule!(y2, y3, y0, y1);
                rounds4!(xabef, xcdgh, x2, r + 2);
                rounds4!(yabef, ycdgh, y2, r + 2);
                schedule!(x3, x0, x1, x2);
                schedule!(y3, y0, y1, y2);
                rounds4!(xabef, xcdgh, x3, r + 3);
                rounds4!(yabef, ycdgh, y3, r + 3);
            }
            xabef = _mm_add_epi32(xabef, xs0);
            xcdgh = _mm_add_epi32(xcdgh, xs1);
            yabef = _mm_add_epi32(yabef, ys0);
            ycdgh = _mm_add_epi32(ycdgh, ys1);
        }
        store(xabef, xcdgh, sa);
        store(yabef, ycdgh, sb);
    }
}

/// Send `bytes` on a unix stream socket with `fds` attached (SCM_RIGHTS): the receiver gets
/// its own descriptors of the same open files.
pub fn send_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> nix::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let iov = [std::io::IoSlice::new(bytes)];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
}

/// At most this many descriptors arrive with one message ([`recv_with_fds`]).
pub const MAX_FDS: usize = 64;

/// Receive into `buf` from a unix stream socket, with the descriptors that came along
/// (close-on-exec, owned: closed when dropped). More than [`MAX_FDS`] is an error.
pub fn recv_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
) -> nix::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = vec![];
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: SCM_RIGHTS just installed this descriptor in our table for us;
                // nothing else knows of it, so this is its only owner.
                fds.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(nix::errno::Errno::EMSGSIZE);
    }
    Ok((msg.bytes, fds))
}
