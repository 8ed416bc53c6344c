//! Docker's default seccomp profile, compiled to classic BPF with `seccompiler` 0.5.
//!
//! # Where the profile comes from
//!
//! Transcribed from moby's `profiles/seccomp/default.json` (github.com/moby/moby) at commit
//! `00f3d189e420d485e42d15fe494f96d272284e0e` — the revision with the `socket` rule rejecting
//! `AF_VSOCK`, the `pkey_*` syscalls, `name_to_handle_at` in the unconditional group and the
//! `CAP_BPF` / `CAP_PERFMON` groups. Nothing here is added to or removed from that file except
//! what the target architecture forces (see the per-architecture tables) and one deliberate
//! removal: `io_uring_setup`, `io_uring_enter` and `io_uring_register` are not allowed (as in
//! containerd's default profile and moby's since 2023: io_uring has a long record of kernel
//! bugs reachable from unprivileged code). The stored revision is named in
//! [`PROFILE_SOURCE`].
//!
//! # How the JSON maps onto BPF
//!
//! * `defaultAction: SCMP_ACT_ERRNO` with `defaultErrnoRet: 1` is the allow-list's mismatch
//!   action, `Errno(EPERM)`; every `SCMP_ACT_ALLOW` entry that applies becomes a syscall of that
//!   allow-list ([`Profile::allow`]). An entry with `args` becomes a [`SeccompRule`] (seccompiler
//!   ORs the rules of one syscall, ANDs the conditions of one rule — libseccomp's semantics for
//!   several entries of one syscall); an entry without `args` allows the syscall outright and
//!   wins over any rule.
//! * `includes.caps` / `excludes.caps` are evaluated against the capabilities the process keeps;
//!   `includes.arches` / `excludes.arches` against the compile target (`amd64` on x86_64,
//!   `arm64` on aarch64); `includes.minKernel` (4.8, for `ptrace` and `process_vm_*`) is taken
//!   as satisfied (berth already needs 5.6+ for `openat2`).
//! * Entries with another action (`SCMP_ACT_ERRNO` + `errnoRet`: only `clone3` → `ENOSYS`
//!   without `CAP_SYS_ADMIN`) become extra filters, one per errno value ([`Profile::errno`]),
//!   installed after the allow-list. The kernel runs every filter and keeps the most severe
//!   action; between equal actions (`ERRNO` and `ERRNO`) the most recently installed filter's
//!   wins, so `clone3` gets `ENOSYS` (glibc then falls back to `clone`) instead of `EPERM`.
//!
//! # Differences from libseccomp's rendering of the same file
//!
//! * Architectures: seccompiler's filters check `seccomp_data.arch` and kill the process for any
//!   other ABI. Docker also allows the `archMap` sub-architectures (x86 and x32 on amd64, arm on
//!   arm64); here 32-bit (`int 0x80`, AArch32) syscalls kill the process, and x32 syscalls
//!   (numbers with `__X32_SYSCALL_BIT`) match nothing and get `EPERM`.
//! * Argument comparisons are 32 bits wide ([`SeccompCmpArgLen::Dword`]): the kernel reads
//!   `socket`'s domain as `int`, `personality`'s argument as `unsigned int` and only the low 32
//!   bits of `clone`'s flags, so comparing the low half is exact, and a domain with stray high
//!   bits (`0x1_0000_0028`) cannot slip past the `AF_VSOCK` check.
//! * Names that are not syscalls of the target (the 32-bit `*32`/`*64`/`*_time64` variants,
//!   `socketcall`, `umount`, `stime`, the arm/s390/ppc/riscv private calls, …) are skipped, as
//!   libseccomp skips them; each table lists what it left out.
//!
//! Installing ([`install`]) sets `no_new_privs` (seccompiler does it before each filter) and
//! applies to the calling thread only: call it in the single-threaded container init, after the
//! last privileged step and right before `execve` — which, like `prctl` and `seccomp` (needed to
//! install the second filter), is on the allow-list.

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

/// The profile this module transcribes.
pub const PROFILE_SOURCE: &str =
    "moby/moby profiles/seccomp/default.json @ 00f3d189e420d485e42d15fe494f96d272284e0e";

/// `defaultErrnoRet`: what a syscall outside the allow-list returns (`EPERM`).
const DEFAULT_ERRNO_RET: u32 = 1;
/// The `clone3` entry's `errnoRet` (`ENOSYS`), applied when `CAP_SYS_ADMIN` is absent.
const CLONE3_ERRNO_RET: u32 = 38;
/// `socket` is allowed when arg 0 (the domain) is not 40, `AF_VSOCK` (`SCMP_CMP_NE`).
const SOCKET_DENIED_DOMAIN: u64 = 40;
/// `personality` is allowed for these arg 0 values only (one `SCMP_CMP_EQ` entry each):
/// `PER_LINUX`, `PER_LINUX32`, `UNAME26`, `UNAME26 | PER_LINUX32`, and `0xffffffff` (query).
const PERSONALITY_ALLOWED: &[u64] = &[0, 8, 131_072, 131_080, 4_294_967_295];
/// Without `CAP_SYS_ADMIN`, `clone` is allowed when `flags & 2114060288 == 0`
/// (`SCMP_CMP_MASKED_EQ`): 0x7E020000 is every `CLONE_NEW*` flag `clone` accepts
/// (NS, CGROUP, UTS, IPC, USER, PID, NET).
const CLONE_NAMESPACE_MASK: u64 = 2_114_060_288;
const CAP_SYS_ADMIN: &str = "CAP_SYS_ADMIN";

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: docker's default profile is not transcribed for architecture {0}")]
    UnsupportedArch(&'static str),
    #[error("seccomp: compiling the filter: {0}")]
    Build(#[from] BackendError),
    #[error("seccomp: installing filter {} of {total}: {source}", .index + 1)]
    Install {
        index: usize,
        total: usize,
        #[source]
        source: seccompiler::Error,
    },
}

/// The profile resolved for one set of capabilities, before compilation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// The allow-list (mismatch: `Errno(EPERM)`): syscall number → rules, an empty list
    /// meaning "allowed whatever the arguments".
    pub allow: BTreeMap<i64, Vec<SeccompRule>>,
    /// errno value → the syscalls (and rules) that return it; each becomes a filter of its own
    /// (mismatch: `Allow`), installed after the allow-list.
    pub errno: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>>,
}

impl Profile {
    fn allow_always(&mut self, nr: i64) {
        self.allow.insert(nr, Vec::new());
    }

    fn allow_if(&mut self, nr: i64, rule: SeccompRule) {
        match self.allow.entry(nr) {
            // An empty list already allows every argument: a rule would only narrow it.
            Entry::Occupied(mut e) => {
                if !e.get().is_empty() {
                    e.get_mut().push(rule);
                }
            }
            Entry::Vacant(e) => {
                e.insert(vec![rule]);
            }
        }
    }
}

/// Resolve the profile for a process keeping `caps` (names like `"CAP_SYS_ADMIN"`; the match
/// is case-insensitive and the `CAP_` prefix optional). Unknown capability names are ignored.
pub fn profile(caps: &[String]) -> Result<Profile, SeccompError> {
    let table = TABLE.ok_or(SeccompError::UnsupportedArch(std::env::consts::ARCH))?;
    let mut p = Profile::default();

    // Unconditional group, the minKernel 4.8 group, and this architecture's `arches` groups.
    for &nr in table.allow.iter().chain(table.arch_allow) {
        p.allow_always(nr);
    }
    // `includes.caps` groups.
    for &(cap, syscalls) in table.cap_allow {
        if has_cap(caps, cap) {
            for &nr in syscalls {
                p.allow_always(nr);
            }
        }
    }
    p.allow_if(
        table.socket,
        arg0_rule(SeccompCmpOp::Ne, SOCKET_DENIED_DOMAIN)?,
    );
    for &persona in PERSONALITY_ALLOWED {
        p.allow_if(table.personality, arg0_rule(SeccompCmpOp::Eq, persona)?);
    }
    // `excludes.caps: [CAP_SYS_ADMIN]` entries (with it, the CAP_SYS_ADMIN group above
    // already allowed clone and clone3 outright).
    if !has_cap(caps, CAP_SYS_ADMIN) {
        p.allow_if(
            table.clone,
            arg0_rule(SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_MASK), 0)?,
        );
        p.errno
            .entry(CLONE3_ERRNO_RET)
            .or_default()
            .insert(table.clone3, Vec::new());
    }
    Ok(p)
}

/// Build the filters for a process keeping `caps` (capability names like `"CAP_SYS_ADMIN"`,
/// upper case, with the `CAP_` prefix). Returns the programs to install, in order: the
/// allow-list first, then one program per errno override (none with `CAP_SYS_ADMIN`, else one:
/// `clone3` → `ENOSYS`).
pub fn build(caps: &[String]) -> Result<Vec<BpfProgram>, SeccompError> {
    let table = TABLE.ok_or(SeccompError::UnsupportedArch(std::env::consts::ARCH))?;
    let profile = profile(caps)?;
    let mut programs = Vec::with_capacity(1 + profile.errno.len());
    let allow = SeccompFilter::new(
        profile.allow,
        SeccompAction::Errno(DEFAULT_ERRNO_RET),
        SeccompAction::Allow,
        table.target,
    )?;
    programs.push(BpfProgram::try_from(allow)?);
    for (errno, rules) in profile.errno {
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            table.target,
        )?;
        programs.push(BpfProgram::try_from(filter)?);
    }
    Ok(programs)
}

/// Install `progs` on the calling thread, in order (sets `no_new_privs` first).
pub fn install(progs: &[BpfProgram]) -> Result<(), SeccompError> {
    for (index, prog) in progs.iter().enumerate() {
        seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install {
            index,
            total: progs.len(),
            source,
        })?;
    }
    Ok(())
}

fn arg0_rule(op: SeccompCmpOp, value: u64) -> Result<SeccompRule, SeccompError> {
    let condition = SeccompCondition::new(0, SeccompCmpArgLen::Dword, op, value)?;
    Ok(SeccompRule::new(vec![condition])?)
}

fn has_cap(caps: &[String], cap: &str) -> bool {
    let want = cap.strip_prefix("CAP_").unwrap_or(cap);
    caps.iter().any(|c| {
        let c = c.trim();
        let bare = match (c.get(..4), c.get(4..)) {
            (Some(prefix), Some(rest)) if prefix.eq_ignore_ascii_case("CAP_") => rest,
            _ => c,
        };
        bare.eq_ignore_ascii_case(want)
    })
}

/// One architecture's transcription of the profile.
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
struct ArchTable {
    target: TargetArch,
    /// Unconditional `SCMP_ACT_ALLOW` entries (plus the `minKernel: 4.8` one).
    allow: &'static [i64],
    /// Entries whose `includes.arches` names this architecture.
    arch_allow: &'static [i64],
    /// Entries with `includes.caps`: (capability, syscalls), in the file's order.
    cap_allow: &'static [(&'static str, &'static [i64])],
    socket: i64,
    personality: i64,
    clone: i64,
    clone3: i64,
}

#[cfg(target_arch = "x86_64")]
const TABLE: Option<ArchTable> = Some(ArchTable {
    target: TargetArch::x86_64,
    allow: x86_64::ALLOW,
    arch_allow: x86_64::ARCH_ALLOW,
    cap_allow: x86_64::CAP_ALLOW,
    socket: libc::SYS_socket,
    personality: libc::SYS_personality,
    clone: libc::SYS_clone,
    clone3: libc::SYS_clone3,
});

#[cfg(target_arch = "aarch64")]
const TABLE: Option<ArchTable> = Some(ArchTable {
    target: TargetArch::aarch64,
    allow: aarch64::ALLOW,
    arch_allow: aarch64::ARCH_ALLOW,
    cap_allow: aarch64::CAP_ALLOW,
    socket: libc::SYS_socket,
    personality: libc::SYS_personality,
    clone: libc::SYS_clone,
    clone3: libc::SYS_clone3,
});

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const TABLE: Option<ArchTable> = None;

/// x86_64 (`amd64` in the profile). Every `libc::SYS_*` here exists for
/// `x86_64-unknown-linux-gnu` in libc 0.2.191.
#[cfg(target_arch = "x86_64")]
mod x86_64 {
    /// `io_pgetevents` is in the profile's first group, but libc 0.2.191 has no
    /// `SYS_io_pgetevents` for x86_64 gnu: 333 in arch/x86/entry/syscalls/syscall_64.tbl
    /// (the test `io_pgetevents_number` pins it next to `SYS_rseq`, 334).
    pub(super) const SYS_IO_PGETEVENTS: i64 = 333;

    /// The profile's first group (unconditional `SCMP_ACT_ALLOW`), then its `minKernel: 4.8`
    /// group (`process_vm_readv`, `process_vm_writev`, `ptrace`).
    ///
    /// Names of the first group that are not x86_64 syscalls (no `libc::SYS_*` for them):
    /// `chown32` `clock_adjtime64` `clock_getres_time64` `clock_gettime64` `clock_nanosleep_time64`
    /// `fadvise64_64` `fchown32` `fcntl64` `fstat64` `fstatat64` `fstatfs64` `ftruncate64`
    /// `futex_time64` `getegid32` `geteuid32` `getgid32` `getgroups32` `getresgid32` `getresuid32`
    /// `getuid32` `io_pgetevents_time64` `ipc` `lchown32` `_llseek` `lstat64` `mmap2`
    /// `mq_timedreceive_time64` `mq_timedsend_time64` `_newselect` `ppoll_time64` `pselect6_time64`
    /// `recv` `recvmmsg_time64` `rt_sigtimedwait_time64` `sched_rr_get_interval_time64`
    /// `semtimedop_time64` `send` `sendfile64` `setfsgid32` `setfsuid32` `setgid32` `setgroups32`
    /// `setregid32` `setresgid32` `setresuid32` `setreuid32` `setuid32` `sigprocmask` `sigreturn`
    /// `socketcall` `stat64` `statfs64` `timer_gettime64` `timer_settime64` `timerfd_gettime64`
    /// `timerfd_settime64` `truncate64` `ugetrlimit` `utimensat_time64` `waitpid`
    #[rustfmt::skip]
    pub(super) const ALLOW: &[i64] = &[
        libc::SYS_accept, libc::SYS_accept4, libc::SYS_access, libc::SYS_adjtimex, libc::SYS_alarm,
        libc::SYS_bind, libc::SYS_brk, libc::SYS_capget, libc::SYS_capset, libc::SYS_chdir,
        libc::SYS_chmod, libc::SYS_chown, libc::SYS_clock_adjtime, libc::SYS_clock_getres,
        libc::SYS_clock_gettime, libc::SYS_clock_nanosleep, libc::SYS_close, libc::SYS_close_range,
        libc::SYS_connect, libc::SYS_copy_file_range, libc::SYS_creat, libc::SYS_dup,
        libc::SYS_dup2, libc::SYS_dup3, libc::SYS_epoll_create, libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl, libc::SYS_epoll_ctl_old, libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2,
        libc::SYS_epoll_wait, libc::SYS_epoll_wait_old, libc::SYS_eventfd, libc::SYS_eventfd2,
        libc::SYS_execve, libc::SYS_execveat, libc::SYS_exit, libc::SYS_exit_group,
        libc::SYS_faccessat, libc::SYS_faccessat2, libc::SYS_fadvise64, libc::SYS_fallocate,
        libc::SYS_fanotify_mark, libc::SYS_fchdir, libc::SYS_fchmod, libc::SYS_fchmodat,
        libc::SYS_fchown, libc::SYS_fchownat, libc::SYS_fcntl, libc::SYS_fdatasync,
        libc::SYS_fgetxattr, libc::SYS_flistxattr, libc::SYS_flock, libc::SYS_fork,
        libc::SYS_fremovexattr, libc::SYS_fsetxattr, libc::SYS_fstat, libc::SYS_fstatfs,
        libc::SYS_fsync, libc::SYS_ftruncate, libc::SYS_futex, libc::SYS_futex_waitv,
        libc::SYS_futimesat, libc::SYS_getcpu, libc::SYS_getcwd, libc::SYS_getdents,
        libc::SYS_getdents64, libc::SYS_getegid, libc::SYS_geteuid, libc::SYS_getgid,
        libc::SYS_getgroups, libc::SYS_getitimer, libc::SYS_getpeername, libc::SYS_getpgid,
        libc::SYS_getpgrp, libc::SYS_getpid, libc::SYS_getppid, libc::SYS_getpriority,
        libc::SYS_getrandom, libc::SYS_getresgid, libc::SYS_getresuid, libc::SYS_getrlimit,
        libc::SYS_get_robust_list, libc::SYS_getrusage, libc::SYS_getsid, libc::SYS_getsockname,
        libc::SYS_getsockopt, libc::SYS_get_thread_area, libc::SYS_gettid, libc::SYS_gettimeofday,
        libc::SYS_getuid, libc::SYS_getxattr, libc::SYS_inotify_add_watch, libc::SYS_inotify_init,
        libc::SYS_inotify_init1, libc::SYS_inotify_rm_watch, libc::SYS_io_cancel, libc::SYS_ioctl,
        libc::SYS_io_destroy, libc::SYS_io_getevents, SYS_IO_PGETEVENTS, libc::SYS_ioprio_get,
        libc::SYS_ioprio_set, libc::SYS_io_setup, libc::SYS_io_submit,
        libc::SYS_kill,
        libc::SYS_landlock_add_rule, libc::SYS_landlock_create_ruleset,
        libc::SYS_landlock_restrict_self, libc::SYS_lchown, libc::SYS_lgetxattr, libc::SYS_link,
        libc::SYS_linkat, libc::SYS_listen, libc::SYS_listxattr, libc::SYS_llistxattr,
        libc::SYS_lremovexattr, libc::SYS_lseek, libc::SYS_lsetxattr, libc::SYS_lstat,
        libc::SYS_madvise, libc::SYS_membarrier, libc::SYS_memfd_create, libc::SYS_memfd_secret,
        libc::SYS_mincore, libc::SYS_mkdir, libc::SYS_mkdirat, libc::SYS_mknod, libc::SYS_mknodat,
        libc::SYS_mlock, libc::SYS_mlock2, libc::SYS_mlockall, libc::SYS_mmap, libc::SYS_mprotect,
        libc::SYS_mq_getsetattr, libc::SYS_mq_notify, libc::SYS_mq_open, libc::SYS_mq_timedreceive,
        libc::SYS_mq_timedsend, libc::SYS_mq_unlink, libc::SYS_mremap, libc::SYS_msgctl,
        libc::SYS_msgget, libc::SYS_msgrcv, libc::SYS_msgsnd, libc::SYS_msync, libc::SYS_munlock,
        libc::SYS_munlockall, libc::SYS_munmap, libc::SYS_name_to_handle_at, libc::SYS_nanosleep,
        libc::SYS_newfstatat, libc::SYS_open, libc::SYS_openat, libc::SYS_openat2, libc::SYS_pause,
        libc::SYS_pidfd_open, libc::SYS_pidfd_send_signal, libc::SYS_pipe, libc::SYS_pipe2,
        libc::SYS_pkey_alloc, libc::SYS_pkey_free, libc::SYS_pkey_mprotect, libc::SYS_poll,
        libc::SYS_ppoll, libc::SYS_prctl, libc::SYS_pread64, libc::SYS_preadv, libc::SYS_preadv2,
        libc::SYS_prlimit64, libc::SYS_process_mrelease, libc::SYS_pselect6, libc::SYS_pwrite64,
        libc::SYS_pwritev, libc::SYS_pwritev2, libc::SYS_read, libc::SYS_readahead,
        libc::SYS_readlink, libc::SYS_readlinkat, libc::SYS_readv, libc::SYS_recvfrom,
        libc::SYS_recvmmsg, libc::SYS_recvmsg, libc::SYS_remap_file_pages, libc::SYS_removexattr,
        libc::SYS_rename, libc::SYS_renameat, libc::SYS_renameat2, libc::SYS_restart_syscall,
        libc::SYS_rmdir, libc::SYS_rseq, libc::SYS_rt_sigaction, libc::SYS_rt_sigpending,
        libc::SYS_rt_sigprocmask, libc::SYS_rt_sigqueueinfo, libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigsuspend, libc::SYS_rt_sigtimedwait, libc::SYS_rt_tgsigqueueinfo,
        libc::SYS_sched_getaffinity, libc::SYS_sched_getattr, libc::SYS_sched_getparam,
        libc::SYS_sched_get_priority_max, libc::SYS_sched_get_priority_min,
        libc::SYS_sched_getscheduler, libc::SYS_sched_rr_get_interval, libc::SYS_sched_setaffinity,
        libc::SYS_sched_setattr, libc::SYS_sched_setparam, libc::SYS_sched_setscheduler,
        libc::SYS_sched_yield, libc::SYS_seccomp, libc::SYS_select, libc::SYS_semctl,
        libc::SYS_semget, libc::SYS_semop, libc::SYS_semtimedop, libc::SYS_sendfile,
        libc::SYS_sendmmsg, libc::SYS_sendmsg, libc::SYS_sendto, libc::SYS_setfsgid,
        libc::SYS_setfsuid, libc::SYS_setgid, libc::SYS_setgroups, libc::SYS_setitimer,
        libc::SYS_setpgid, libc::SYS_setpriority, libc::SYS_setregid, libc::SYS_setresgid,
        libc::SYS_setresuid, libc::SYS_setreuid, libc::SYS_setrlimit, libc::SYS_set_robust_list,
        libc::SYS_setsid, libc::SYS_setsockopt, libc::SYS_set_thread_area,
        libc::SYS_set_tid_address, libc::SYS_setuid, libc::SYS_setxattr, libc::SYS_shmat,
        libc::SYS_shmctl, libc::SYS_shmdt, libc::SYS_shmget, libc::SYS_shutdown,
        libc::SYS_sigaltstack, libc::SYS_signalfd, libc::SYS_signalfd4, libc::SYS_socketpair,
        libc::SYS_splice, libc::SYS_stat, libc::SYS_statfs, libc::SYS_statx, libc::SYS_symlink,
        libc::SYS_symlinkat, libc::SYS_sync, libc::SYS_sync_file_range, libc::SYS_syncfs,
        libc::SYS_sysinfo, libc::SYS_tee, libc::SYS_tgkill, libc::SYS_time, libc::SYS_timer_create,
        libc::SYS_timer_delete, libc::SYS_timer_getoverrun, libc::SYS_timer_gettime,
        libc::SYS_timer_settime, libc::SYS_timerfd_create, libc::SYS_timerfd_gettime,
        libc::SYS_timerfd_settime, libc::SYS_times, libc::SYS_tkill, libc::SYS_truncate,
        libc::SYS_umask, libc::SYS_uname, libc::SYS_unlink, libc::SYS_unlinkat, libc::SYS_utime,
        libc::SYS_utimensat, libc::SYS_utimes, libc::SYS_vfork, libc::SYS_vmsplice, libc::SYS_wait4,
        libc::SYS_waitid, libc::SYS_write, libc::SYS_writev, libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev, libc::SYS_ptrace,
    ];

    /// `includes.arches`: `arch_prctl` (amd64, x32) and `modify_ldt` (amd64, x32, x86).
    pub(super) const ARCH_ALLOW: &[i64] = &[libc::SYS_arch_prctl, libc::SYS_modify_ldt];

    /// `includes.caps` entries. Not x86_64 syscalls: `umount` (CAP_SYS_ADMIN), `stime` and
    /// `clock_settime64` (CAP_SYS_TIME).
    #[rustfmt::skip]
    pub(super) const CAP_ALLOW: &[(&str, &[i64])] = &[
        ("CAP_DAC_READ_SEARCH", &[libc::SYS_open_by_handle_at]),
        ("CAP_SYS_ADMIN", &[
            libc::SYS_bpf, libc::SYS_clone, libc::SYS_clone3, libc::SYS_fanotify_init,
            libc::SYS_fsconfig, libc::SYS_fsmount, libc::SYS_fsopen, libc::SYS_fspick,
            libc::SYS_lookup_dcookie, libc::SYS_mount, libc::SYS_mount_setattr,
            libc::SYS_move_mount, libc::SYS_open_tree, libc::SYS_perf_event_open,
            libc::SYS_quotactl, libc::SYS_quotactl_fd, libc::SYS_setdomainname,
            libc::SYS_sethostname, libc::SYS_setns, libc::SYS_syslog, libc::SYS_umount2,
            libc::SYS_unshare,
        ]),
        ("CAP_SYS_BOOT", &[libc::SYS_reboot]),
        ("CAP_SYS_CHROOT", &[libc::SYS_chroot]),
        ("CAP_SYS_MODULE", &[
            libc::SYS_delete_module, libc::SYS_init_module, libc::SYS_finit_module,
        ]),
        ("CAP_SYS_PACCT", &[libc::SYS_acct]),
        ("CAP_SYS_PTRACE", &[
            libc::SYS_kcmp, libc::SYS_pidfd_getfd, libc::SYS_process_madvise,
            libc::SYS_process_vm_readv, libc::SYS_process_vm_writev, libc::SYS_ptrace,
        ]),
        ("CAP_SYS_RAWIO", &[libc::SYS_iopl, libc::SYS_ioperm]),
        ("CAP_SYS_TIME", &[libc::SYS_settimeofday, libc::SYS_clock_settime]),
        ("CAP_SYS_TTY_CONFIG", &[libc::SYS_vhangup]),
        ("CAP_SYS_NICE", &[
            libc::SYS_get_mempolicy, libc::SYS_mbind, libc::SYS_set_mempolicy,
            libc::SYS_set_mempolicy_home_node,
        ]),
        ("CAP_SYSLOG", &[libc::SYS_syslog]),
        ("CAP_BPF", &[libc::SYS_bpf]),
        ("CAP_PERFMON", &[libc::SYS_perf_event_open]),
    ];
}

/// aarch64 (`arm64` in the profile). Every `libc::SYS_*` here exists for
/// `aarch64-unknown-linux-gnu` in libc 0.2.191.
#[cfg(target_arch = "aarch64")]
mod aarch64 {
    /// `io_pgetevents` is in the profile's first group, but libc 0.2.191 has no
    /// `SYS_io_pgetevents` for aarch64 gnu: 292 in include/uapi/asm-generic/unistd.h
    /// (the test `io_pgetevents_number` pins it next to `SYS_rseq`, 293).
    pub(super) const SYS_IO_PGETEVENTS: i64 = 292;

    /// The profile's first group (unconditional `SCMP_ACT_ALLOW`), then its `minKernel: 4.8`
    /// group (`process_vm_readv`, `process_vm_writev`, `ptrace`).
    ///
    /// Names of the first group that are not aarch64 syscalls (no `libc::SYS_*` for them):
    /// `access` `alarm` `chmod` `chown` `chown32` `clock_adjtime64` `clock_getres_time64`
    /// `clock_gettime64` `clock_nanosleep_time64` `creat` `dup2` `epoll_create` `epoll_ctl_old`
    /// `epoll_wait` `epoll_wait_old` `eventfd` `fadvise64_64` `fchown32` `fcntl64` `fork` `fstat64`
    /// `fstatat64` `fstatfs64` `ftruncate64` `futex_time64` `futimesat` `getdents` `getegid32`
    /// `geteuid32` `getgid32` `getgroups32` `getpgrp` `getresgid32` `getresuid32` `get_thread_area`
    /// `getuid32` `inotify_init` `io_pgetevents_time64` `ipc` `lchown` `lchown32` `link` `_llseek`
    /// `lstat` `lstat64` `mkdir` `mknod` `mmap2` `mq_timedreceive_time64` `mq_timedsend_time64`
    /// `_newselect` `open` `pause` `pipe` `poll` `ppoll_time64` `pselect6_time64` `readlink` `recv`
    /// `recvmmsg_time64` `rename` `rmdir` `rt_sigtimedwait_time64` `sched_rr_get_interval_time64`
    /// `select` `semtimedop_time64` `send` `sendfile64` `setfsgid32` `setfsuid32` `setgid32`
    /// `setgroups32` `setregid32` `setresgid32` `setresuid32` `setreuid32` `set_thread_area` `setuid32`
    /// `signalfd` `sigprocmask` `sigreturn` `socketcall` `stat` `stat64` `statfs64` `symlink` `time`
    /// `timer_gettime64` `timer_settime64` `timerfd_gettime64` `timerfd_settime64` `truncate64`
    /// `ugetrlimit` `unlink` `utime` `utimensat_time64` `utimes` `vfork` `waitpid`
    #[rustfmt::skip]
    pub(super) const ALLOW: &[i64] = &[
        libc::SYS_accept, libc::SYS_accept4, libc::SYS_adjtimex, libc::SYS_bind, libc::SYS_brk,
        libc::SYS_capget, libc::SYS_capset, libc::SYS_chdir, libc::SYS_clock_adjtime,
        libc::SYS_clock_getres, libc::SYS_clock_gettime, libc::SYS_clock_nanosleep, libc::SYS_close,
        libc::SYS_close_range, libc::SYS_connect, libc::SYS_copy_file_range, libc::SYS_dup,
        libc::SYS_dup3, libc::SYS_epoll_create1, libc::SYS_epoll_ctl, libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2, libc::SYS_eventfd2, libc::SYS_execve, libc::SYS_execveat,
        libc::SYS_exit, libc::SYS_exit_group, libc::SYS_faccessat, libc::SYS_faccessat2,
        libc::SYS_fadvise64, libc::SYS_fallocate, libc::SYS_fanotify_mark, libc::SYS_fchdir,
        libc::SYS_fchmod, libc::SYS_fchmodat, libc::SYS_fchown, libc::SYS_fchownat, libc::SYS_fcntl,
        libc::SYS_fdatasync, libc::SYS_fgetxattr, libc::SYS_flistxattr, libc::SYS_flock,
        libc::SYS_fremovexattr, libc::SYS_fsetxattr, libc::SYS_fstat, libc::SYS_fstatfs,
        libc::SYS_fsync, libc::SYS_ftruncate, libc::SYS_futex, libc::SYS_futex_waitv,
        libc::SYS_getcpu, libc::SYS_getcwd, libc::SYS_getdents64, libc::SYS_getegid,
        libc::SYS_geteuid, libc::SYS_getgid, libc::SYS_getgroups, libc::SYS_getitimer,
        libc::SYS_getpeername, libc::SYS_getpgid, libc::SYS_getpid, libc::SYS_getppid,
        libc::SYS_getpriority, libc::SYS_getrandom, libc::SYS_getresgid, libc::SYS_getresuid,
        libc::SYS_getrlimit, libc::SYS_get_robust_list, libc::SYS_getrusage, libc::SYS_getsid,
        libc::SYS_getsockname, libc::SYS_getsockopt, libc::SYS_gettid, libc::SYS_gettimeofday,
        libc::SYS_getuid, libc::SYS_getxattr, libc::SYS_inotify_add_watch, libc::SYS_inotify_init1,
        libc::SYS_inotify_rm_watch, libc::SYS_io_cancel, libc::SYS_ioctl, libc::SYS_io_destroy,
        libc::SYS_io_getevents, SYS_IO_PGETEVENTS, libc::SYS_ioprio_get, libc::SYS_ioprio_set,
        libc::SYS_io_setup, libc::SYS_io_submit,
        libc::SYS_kill,
        libc::SYS_landlock_add_rule, libc::SYS_landlock_create_ruleset,
        libc::SYS_landlock_restrict_self, libc::SYS_lgetxattr, libc::SYS_linkat, libc::SYS_listen,
        libc::SYS_listxattr, libc::SYS_llistxattr, libc::SYS_lremovexattr, libc::SYS_lseek,
        libc::SYS_lsetxattr, libc::SYS_madvise, libc::SYS_membarrier, libc::SYS_memfd_create,
        libc::SYS_memfd_secret, libc::SYS_mincore, libc::SYS_mkdirat, libc::SYS_mknodat,
        libc::SYS_mlock, libc::SYS_mlock2, libc::SYS_mlockall, libc::SYS_mmap, libc::SYS_mprotect,
        libc::SYS_mq_getsetattr, libc::SYS_mq_notify, libc::SYS_mq_open, libc::SYS_mq_timedreceive,
        libc::SYS_mq_timedsend, libc::SYS_mq_unlink, libc::SYS_mremap, libc::SYS_msgctl,
        libc::SYS_msgget, libc::SYS_msgrcv, libc::SYS_msgsnd, libc::SYS_msync, libc::SYS_munlock,
        libc::SYS_munlockall, libc::SYS_munmap, libc::SYS_name_to_handle_at, libc::SYS_nanosleep,
        libc::SYS_newfstatat, libc::SYS_openat, libc::SYS_openat2, libc::SYS_pidfd_open,
        libc::SYS_pidfd_send_signal, libc::SYS_pipe2, libc::SYS_pkey_alloc, libc::SYS_pkey_free,
        libc::SYS_pkey_mprotect, libc::SYS_ppoll, libc::SYS_prctl, libc::SYS_pread64,
        libc::SYS_preadv, libc::SYS_preadv2, libc::SYS_prlimit64, libc::SYS_process_mrelease,
        libc::SYS_pselect6, libc::SYS_pwrite64, libc::SYS_pwritev, libc::SYS_pwritev2,
        libc::SYS_read, libc::SYS_readahead, libc::SYS_readlinkat, libc::SYS_readv,
        libc::SYS_recvfrom, libc::SYS_recvmmsg, libc::SYS_recvmsg, libc::SYS_remap_file_pages,
        libc::SYS_removexattr, libc::SYS_renameat, libc::SYS_renameat2, libc::SYS_restart_syscall,
        libc::SYS_rseq, libc::SYS_rt_sigaction, libc::SYS_rt_sigpending, libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigqueueinfo, libc::SYS_rt_sigreturn, libc::SYS_rt_sigsuspend,
        libc::SYS_rt_sigtimedwait, libc::SYS_rt_tgsigqueueinfo, libc::SYS_sched_getaffinity,
        libc::SYS_sched_getattr, libc::SYS_sched_getparam, libc::SYS_sched_get_priority_max,
        libc::SYS_sched_get_priority_min, libc::SYS_sched_getscheduler,
        libc::SYS_sched_rr_get_interval, libc::SYS_sched_setaffinity, libc::SYS_sched_setattr,
        libc::SYS_sched_setparam, libc::SYS_sched_setscheduler, libc::SYS_sched_yield,
        libc::SYS_seccomp, libc::SYS_semctl, libc::SYS_semget, libc::SYS_semop,
        libc::SYS_semtimedop, libc::SYS_sendfile, libc::SYS_sendmmsg, libc::SYS_sendmsg,
        libc::SYS_sendto, libc::SYS_setfsgid, libc::SYS_setfsuid, libc::SYS_setgid,
        libc::SYS_setgroups, libc::SYS_setitimer, libc::SYS_setpgid, libc::SYS_setpriority,
        libc::SYS_setregid, libc::SYS_setresgid, libc::SYS_setresuid, libc::SYS_setreuid,
        libc::SYS_setrlimit, libc::SYS_set_robust_list, libc::SYS_setsid, libc::SYS_setsockopt,
        libc::SYS_set_tid_address, libc::SYS_setuid, libc::SYS_setxattr, libc::SYS_shmat,
        libc::SYS_shmctl, libc::SYS_shmdt, libc::SYS_shmget, libc::SYS_shutdown,
        libc::SYS_sigaltstack, libc::SYS_signalfd4, libc::SYS_socketpair, libc::SYS_splice,
        libc::SYS_statfs, libc::SYS_statx, libc::SYS_symlinkat, libc::SYS_sync,
        libc::SYS_sync_file_range, libc::SYS_syncfs, libc::SYS_sysinfo, libc::SYS_tee,
        libc::SYS_tgkill, libc::SYS_timer_create, libc::SYS_timer_delete,
        libc::SYS_timer_getoverrun, libc::SYS_timer_gettime, libc::SYS_timer_settime,
        libc::SYS_timerfd_create, libc::SYS_timerfd_gettime, libc::SYS_timerfd_settime,
        libc::SYS_times, libc::SYS_tkill, libc::SYS_truncate, libc::SYS_umask, libc::SYS_uname,
        libc::SYS_unlinkat, libc::SYS_utimensat, libc::SYS_vmsplice, libc::SYS_wait4,
        libc::SYS_waitid, libc::SYS_write, libc::SYS_writev, libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev, libc::SYS_ptrace,
    ];

    /// `includes.arches: [arm, arm64]` names `arm_fadvise64_64`, `arm_sync_file_range`,
    /// `sync_file_range2`, `breakpoint`, `cacheflush` and `set_tls`: AArch32 calls, none of
    /// them an aarch64 syscall (aarch64's number 84 is `sync_file_range`, already allowed).
    pub(super) const ARCH_ALLOW: &[i64] = &[];

    /// `includes.caps` entries. Not aarch64 syscalls: `umount` (CAP_SYS_ADMIN), `iopl` and
    /// `ioperm` (CAP_SYS_RAWIO), `stime` and `clock_settime64` (CAP_SYS_TIME).
    #[rustfmt::skip]
    pub(super) const CAP_ALLOW: &[(&str, &[i64])] = &[
        ("CAP_DAC_READ_SEARCH", &[libc::SYS_open_by_handle_at]),
        ("CAP_SYS_ADMIN", &[
            libc::SYS_bpf, libc::SYS_clone, libc::SYS_clone3, libc::SYS_fanotify_init,
            libc::SYS_fsconfig, libc::SYS_fsmount, libc::SYS_fsopen, libc::SYS_fspick,
            libc::SYS_lookup_dcookie, libc::SYS_mount, libc::SYS_mount_setattr,
            libc::SYS_move_mount, libc::SYS_open_tree, libc::SYS_perf_event_open,
            libc::SYS_quotactl, libc::SYS_quotactl_fd, libc::SYS_setdomainname,
            libc::SYS_sethostname, libc::SYS_setns, libc::SYS_syslog, libc::SYS_umount2,
            libc::SYS_unshare,
        ]),
        ("CAP_SYS_BOOT", &[libc::SYS_reboot]),
        ("CAP_SYS_CHROOT", &[libc::SYS_chroot]),
        ("CAP_SYS_MODULE", &[
            libc::SYS_delete_module, libc::SYS_init_module, libc::SYS_finit_module,
        ]),
        ("CAP_SYS_PACCT", &[libc::SYS_acct]),
        ("CAP_SYS_PTRACE", &[
            libc::SYS_kcmp, libc::SYS_pidfd_getfd, libc::SYS_process_madvise,
            libc::SYS_process_vm_readv, libc::SYS_process_vm_writev, libc::SYS_ptrace,
        ]),
        ("CAP_SYS_RAWIO", &[]),
        ("CAP_SYS_TIME", &[libc::SYS_settimeofday, libc::SYS_clock_settime]),
        ("CAP_SYS_TTY_CONFIG", &[libc::SYS_vhangup]),
        ("CAP_SYS_NICE", &[
            libc::SYS_get_mempolicy, libc::SYS_mbind, libc::SYS_set_mempolicy,
            libc::SYS_set_mempolicy_home_node,
        ]),
        ("CAP_SYSLOG", &[libc::SYS_syslog]),
        ("CAP_BPF", &[libc::SYS_bpf]),
        ("CAP_PERFMON", &[libc::SYS_perf_event_open]),
    ];
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;
    use seccompiler::sock_filter;

    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    fn default_caps() -> Vec<String> {
        [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FSETID",
            "CAP_FOWNER",
            "CAP_MKNOD",
            "CAP_NET_RAW",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETFCAP",
            "CAP_SETPCAP",
            "CAP_NET_BIND_SERVICE",
            "CAP_SYS_CHROOT",
            "CAP_KILL",
            "CAP_AUDIT_WRITE",
        ]
        .iter()
        .map(|c| c.to_string())
        .collect()
    }

    fn with(extra: &str) -> Vec<String> {
        let mut caps = default_caps();
        caps.push(extra.to_string());
        caps
    }

    /// A classic-BPF interpreter for the instructions seccompiler emits, run on a
    /// `struct seccomp_data` (nr, arch, instruction pointer, six arguments; little endian).
    fn run(prog: &[sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let ins = prog.get(pc).expect("BPF program ran off its end");
            pc += 1;
            let jump = |cond: bool| usize::from(if cond { ins.jt } else { ins.jf });
            match ins.code {
                0x20 => {
                    let k = ins.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().expect("4 bytes"));
                }
                0x54 => acc &= ins.k,
                0x05 => pc += ins.k as usize,
                0x15 => pc += jump(acc == ins.k),
                0x25 => pc += jump(acc > ins.k),
                0x35 => pc += jump(acc >= ins.k),
                0x06 => return ins.k,
                code => panic!("unexpected BPF opcode {code:#x}"),
            }
        }
    }

    /// The kernel's verdict over stacked filters: the newest runs first, and an action only
    /// replaces the current one if strictly more severe (`ACTION_ONLY` compared as `s32`).
    fn verdict(progs: &[BpfProgram], nr: i64, args: [u64; 6]) -> u32 {
        let action = |r: u32| (r & libc::SECCOMP_RET_ACTION_FULL) as i32;
        let mut ret = libc::SECCOMP_RET_ALLOW;
        for prog in progs.iter().rev() {
            let cur = run(prog, AUDIT_ARCH, nr, args);
            if action(cur) < action(ret) {
                ret = cur;
            }
        }
        ret
    }

    fn call(progs: &[BpfProgram], nr: i64) -> u32 {
        verdict(progs, nr, [0; 6])
    }

    fn call1(progs: &[BpfProgram], nr: i64, arg0: u64) -> u32 {
        verdict(progs, nr, [arg0, 0, 0, 0, 0, 0])
    }

    #[test]
    fn profile_constants_match_libc() {
        assert_eq!(DEFAULT_ERRNO_RET, libc::EPERM as u32);
        assert_eq!(CLONE3_ERRNO_RET, libc::ENOSYS as u32);
        assert_eq!(SOCKET_DENIED_DOMAIN, libc::AF_VSOCK as u64);
        let namespaces = libc::CLONE_NEWNS
            | libc::CLONE_NEWCGROUP
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUSER
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET;
        assert_eq!(CLONE_NAMESPACE_MASK, namespaces as u64);
    }

    #[test]
    fn io_pgetevents_number() {
        #[cfg(target_arch = "aarch64")]
        use super::aarch64::SYS_IO_PGETEVENTS;
        #[cfg(target_arch = "x86_64")]
        use super::x86_64::SYS_IO_PGETEVENTS;
        // io_pgetevents and rseq were added together; rseq is the next number on both arches.
        assert_eq!(SYS_IO_PGETEVENTS, libc::SYS_rseq - 1);
    }

    #[test]
    fn default_caps_profile() {
        let p = profile(&default_caps()).expect("profile");
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_execve,
            libc::SYS_prctl,
            libc::SYS_seccomp,
            libc::SYS_ptrace,
            libc::SYS_chroot,
            libc::SYS_capset,
        ] {
            assert_eq!(p.allow.get(&nr), Some(&Vec::new()), "syscall {nr}");
        }
        for nr in [
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_clone3,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_open_by_handle_at,
            libc::SYS_reboot,
            libc::SYS_init_module,
            libc::SYS_kcmp,
            libc::SYS_pidfd_getfd,
        ] {
            assert!(
                !p.allow.contains_key(&nr),
                "syscall {nr} must not be allowed"
            );
        }

        let rule = |op, value| arg0_rule(op, value).expect("rule");
        assert_eq!(
            p.allow.get(&libc::SYS_clone),
            Some(&vec![rule(SeccompCmpOp::MaskedEq(0x7E02_0000), 0)])
        );
        assert_eq!(
            p.allow.get(&libc::SYS_socket),
            Some(&vec![rule(SeccompCmpOp::Ne, 40)])
        );
        let personality: Vec<_> = [0, 8, 0x2_0000, 0x2_0008, 0xffff_ffff]
            .into_iter()
            .map(|v| rule(SeccompCmpOp::Eq, v))
            .collect();
        assert_eq!(p.allow.get(&libc::SYS_personality), Some(&personality));

        assert_eq!(p.errno.len(), 1);
        let enosys = p.errno.get(&38).expect("clone3 errno filter");
        assert_eq!(enosys.len(), 1);
        assert_eq!(enosys.get(&libc::SYS_clone3), Some(&Vec::new()));
    }

    #[test]
    fn sys_admin_profile() {
        let p = profile(&with("CAP_SYS_ADMIN")).expect("profile");
        for nr in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_bpf,
            libc::SYS_sethostname,
        ] {
            assert_eq!(p.allow.get(&nr), Some(&Vec::new()), "syscall {nr}");
        }
        assert!(p.errno.is_empty());
        for nr in [
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
        ] {
            assert!(
                !p.allow.contains_key(&nr),
                "syscall {nr} must not be allowed"
            );
        }
    }

    #[test]
    fn capability_groups() {
        let p = profile(&default_caps()).expect("profile");
        assert!(!p.allow.contains_key(&libc::SYS_bpf));
        let p = profile(&with("CAP_BPF")).expect("profile");
        assert_eq!(p.allow.get(&libc::SYS_bpf), Some(&Vec::new()));
        let p = profile(&with("CAP_PERFMON")).expect("profile");
        assert_eq!(p.allow.get(&libc::SYS_perf_event_open), Some(&Vec::new()));
        let p = profile(&with("CAP_SYS_PTRACE")).expect("profile");
        assert_eq!(p.allow.get(&libc::SYS_kcmp), Some(&Vec::new()));
        // Without CAP_SYS_CHROOT, chroot goes.
        let caps: Vec<String> = default_caps()
            .into_iter()
            .filter(|c| c != "CAP_SYS_CHROOT")
            .collect();
        let p = profile(&caps).expect("profile");
        assert!(!p.allow.contains_key(&libc::SYS_chroot));
        // Names are matched case-insensitively, prefix optional.
        assert!(has_cap(&["sys_admin".to_string()], "CAP_SYS_ADMIN"));
        assert!(has_cap(&["cap_sys_admin".to_string()], "CAP_SYS_ADMIN"));
        assert!(!has_cap(&["CAP_SYS_ADMINX".to_string()], "CAP_SYS_ADMIN"));
        assert!(!has_cap(&["CA€X".to_string()], "CAP_SYS_ADMIN"));
    }

    #[test]
    fn build_default_caps() {
        let progs = build(&default_caps()).expect("build");
        assert_eq!(progs.len(), 2);
        for prog in &progs {
            assert!(
                !prog.is_empty() && prog.len() < 4096,
                "{} instructions",
                prog.len()
            );
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_execve,
            libc::SYS_ptrace,
        ] {
            assert_eq!(call(&progs, nr), ALLOW, "syscall {nr}");
        }
        for nr in [
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
        ] {
            assert_eq!(call(&progs, nr), EPERM, "syscall {nr}");
        }
        // clone3: EPERM from the allow-list alone, ENOSYS once the second filter is stacked.
        assert_eq!(call(&progs[..1], libc::SYS_clone3), EPERM);
        assert_eq!(call(&progs, libc::SYS_clone3), ENOSYS);
    }

    #[test]
    fn build_argument_rules() {
        let progs = build(&default_caps()).expect("build");
        let fork = libc::SIGCHLD as u64;
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(call1(&progs, libc::SYS_clone, fork), ALLOW);
        assert_eq!(call1(&progs, libc::SYS_clone, thread), ALLOW);
        for ns in [libc::CLONE_NEWUSER, libc::CLONE_NEWNS, libc::CLONE_NEWNET] {
            let flags = fork | ns as u64;
            assert_eq!(call1(&progs, libc::SYS_clone, flags), EPERM, "{flags:#x}");
        }

        assert_eq!(call1(&progs, libc::SYS_socket, libc::AF_INET as u64), ALLOW);
        assert_eq!(call1(&progs, libc::SYS_socket, libc::AF_UNIX as u64), ALLOW);
        assert_eq!(call1(&progs, libc::SYS_socket, 40), EPERM);
        // The kernel reads the domain as an int: high garbage must not get AF_VSOCK through.
        assert_eq!(call1(&progs, libc::SYS_socket, 0x1_0000_0028), EPERM);

        for persona in [0, 8, 0x2_0000, 0x2_0008, 0xffff_ffff] {
            assert_eq!(
                call1(&progs, libc::SYS_personality, persona),
                ALLOW,
                "{persona:#x}"
            );
        }
        assert_eq!(call1(&progs, libc::SYS_personality, 0x0040_0000), EPERM);
    }

    #[test]
    fn build_sys_admin() {
        let progs = build(&with("CAP_SYS_ADMIN")).expect("build");
        assert_eq!(progs.len(), 1);
        for nr in [
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_clone3,
            libc::SYS_setns,
        ] {
            assert_eq!(call(&progs, nr), ALLOW, "syscall {nr}");
        }
        let userns = (libc::SIGCHLD | libc::CLONE_NEWUSER) as u64;
        assert_eq!(call1(&progs, libc::SYS_clone, userns), ALLOW);
        assert_eq!(call(&progs, libc::SYS_keyctl), EPERM);
    }

    #[test]
    fn other_abis() {
        let progs = build(&default_caps()).expect("build");
        // Another audit arch (i386: 0x40000003) kills the process, in either filter.
        for prog in &progs {
            let r = run(prog, 0x4000_0003, libc::SYS_read, [0; 6]);
            assert_eq!(r, libc::SECCOMP_RET_KILL_PROCESS);
        }
        // x32 numbers (bit 30 set) match nothing on the allow-list.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(call(&progs, libc::SYS_read | 0x4000_0000), EPERM);
    }
}
