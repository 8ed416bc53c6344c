//! The container's first process, between clone(2) and execve(2): root filesystem, mounts,
//! hostname, user, capabilities, then exec. Runs in the new namespaces, single-threaded.
//!
//! Every mount target is resolved inside the root filesystem with
//! `openat2(RESOLVE_IN_ROOT)` and mounted through `/proc/self/fd/N`, so a symlink in an image
//! can never redirect a mount or a `mkdir` onto the host. All mounts happen in the
//! container's private mount namespace and vanish with it.

use super::config::{MountKind, NetMode, ProcessSpec, RuntimeConfig};
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknodat};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

/// A failed step: the message goes back to the shim through the error pipe.
#[derive(Debug)]
pub struct InitError {
    pub step: String,
    pub message: String,
}

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.message)
    }
}

fn fail(step: impl Into<String>, e: impl std::fmt::Display) -> InitError {
    InitError {
        step: step.into(),
        message: e.to_string(),
    }
}

type R<T> = Result<T, InitError>;

/// Docker's masked paths: hidden behind /dev/null (files) or an empty read-only tmpfs (dirs).
pub const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/interrupts",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The umask a container's processes start with (docker's).
pub const CONTAINER_UMASK: u32 = 0o022;

/// The most of `/etc/passwd` or `/etc/group` read from an image.
const MAX_USER_DB: u64 = 4 << 20;
/// Docker's read-only paths.
pub const READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn rel(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

fn how() -> OpenHow {
    OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

/// Open `path` inside `root` (never escaping it); `None` when it does not exist.
fn open_in(root: &OwnedFd, path: &Path) -> R<Option<OwnedFd>> {
    let r = rel(path);
    let p = if r.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        r
    };
    match openat2(root.as_fd(), &p, how()) {
        Ok(fd) => Ok(Some(fd)),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(fail(format!("resolve {}", path.display()), e)),
    }
}

/// Make `path` exist inside `root` as a directory (or, with `file`, an empty file) and open it.
fn ensure_in(root: &OwnedFd, path: &Path, file: bool) -> R<OwnedFd> {
    if let Some(fd) = open_in(root, path)? {
        return Ok(fd);
    }
    let r = rel(path);
    let comps: Vec<_> = r.components().collect();
    let mut prefix = PathBuf::new();
    for (i, c) in comps.iter().enumerate() {
        let parent = prefix.clone();
        prefix.push(c);
        if open_in(root, &prefix)?.is_some() {
            continue;
        }
        let pfd = open_in(root, &parent)?
            .ok_or_else(|| fail("mkdir", format!("{} vanished", parent.display())))?;
        let dir = std::fs::File::open(format!("/proc/self/fd/{}", pfd.as_raw_fd()))
            .map_err(|e| fail(format!("open {}", parent.display()), e))?;
        let name = c.as_os_str();
        if file && i + 1 == comps.len() {
            let fd = nix::fcntl::openat(
                dir.as_fd(),
                name,
                OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
                Mode::from_bits_truncate(0o644),
            )
            .map_err(|e| fail(format!("create {}", prefix.display()), e))?;
            drop(fd);
        } else {
            match nix::sys::stat::mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(fail(format!("mkdir {}", prefix.display()), e)),
            }
        }
    }
    open_in(root, path)?
        .ok_or_else(|| fail("mkdir", format!("{} could not be created", path.display())))
}

fn fdpath(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn mnt(
    src: Option<&str>,
    target: &OwnedFd,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
    what: &str,
) -> R<()> {
    mount(src, fdpath(target).as_str(), fstype, flags, data)
        .map_err(|e| fail(format!("mount {what}"), e))
}

/// Bind `src` onto `target` (already opened inside `root` at `path`); with `read_only`,
/// remount the new mount read-only (reopened, since the old fd still names what is below it).
fn bind(src: &Path, root: &OwnedFd, path: &Path, target: &OwnedFd, read_only: bool) -> R<()> {
    let what = path.display();
    let t = fdpath(target);
    mount(
        Some(src),
        t.as_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| fail(format!("bind mount {what}"), e))?;
    if read_only {
        // every mount below the source too: a plain remount leaves those writable
        let top =
            open_in(root, path)?.ok_or_else(|| fail(format!("bind mount {what}"), "vanished"))?;
        crate::sys::mount_set_readonly_recursive(top.as_fd()).map_err(|e| {
            let e = if e == nix::errno::Errno::ENOSYS {
                "read-only bind mounts need mount_setattr (Linux 5.12 or later)".to_string()
            } else {
                e.to_string()
            };
            fail(format!("make {what} read-only"), e)
        })?;
    }
    Ok(())
}

/// How deep [`copy_tree`] descends before it gives up.
const MAX_COPY_DEPTH: usize = 128;

/// Copy a directory tree (modes, owners, symlinks) from the image into an empty volume on
/// first use, descriptor by descriptor: nothing is ever resolved through a symlink on either
/// side (another container sharing the volume could plant one in it), and the volume's own
/// top directory takes the mode and owner of the directory in the image, as docker does.
fn copy_tree(
    src: std::os::fd::BorrowedFd<'_>,
    dst: std::os::fd::BorrowedFd<'_>,
) -> nix::Result<()> {
    let st = nix::sys::stat::fstat(src)?;
    copy_entries(src, dst, 0)?;
    nix::sys::stat::fchmod(dst, Mode::from_bits_truncate(st.st_mode & 0o7777))?;
    nix::unistd::fchown(
        dst,
        Some(nix::unistd::Uid::from_raw(st.st_uid)),
        Some(nix::unistd::Gid::from_raw(st.st_gid)),
    )
}

fn copy_entries(
    src: std::os::fd::BorrowedFd<'_>,
    dst: std::os::fd::BorrowedFd<'_>,
    depth: usize,
) -> nix::Result<()> {
    use nix::fcntl::{AtFlags, openat};
    use nix::sys::stat::fstatat;
    if depth > MAX_COPY_DEPTH {
        return Err(nix::errno::Errno::ELOOP);
    }
    let nofollow = OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let dir = nix::dir::Dir::openat(
        src,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | nofollow,
        Mode::empty(),
    )?;
    let names: Vec<CString> = dir
        .into_iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.to_bytes() != b"." && n.to_bytes() != b"..")
        .collect();
    for name in names {
        let st = fstatat(src, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        let mode = Mode::from_bits_truncate(st.st_mode & 0o7777);
        let (uid, gid) = (
            Some(nix::unistd::Uid::from_raw(st.st_uid)),
            Some(nix::unistd::Gid::from_raw(st.st_gid)),
        );
        match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(src, name.as_c_str())?;
                nix::unistd::symlinkat(target.as_os_str(), dst, name.as_c_str())?;
                nix::unistd::fchownat(
                    dst,
                    name.as_c_str(),
                    uid,
                    gid,
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )?;
            }
            SFlag::S_IFDIR => {
                nix::sys::stat::mkdirat(dst, name.as_c_str(), Mode::from_bits_truncate(0o700))?;
                let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | nofollow;
                let s = openat(src, name.as_c_str(), flags, Mode::empty())?;
                let d = openat(dst, name.as_c_str(), flags, Mode::empty())?;
                copy_entries(s.as_fd(), d.as_fd(), depth + 1)?;
                nix::unistd::fchown(d.as_fd(), uid, gid)?;
                nix::sys::stat::fchmod(d.as_fd(), mode)?;
            }
            SFlag::S_IFREG => {
                let s = openat(
                    src,
                    name.as_c_str(),
                    OFlag::O_RDONLY | nofollow,
                    Mode::empty(),
                )?;
                let d = openat(
                    dst,
                    name.as_c_str(),
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | nofollow,
                    Mode::from_bits_truncate(0o600),
                )?;
                let (mut s, mut d) = (std::fs::File::from(s), std::fs::File::from(d));
                std::io::copy(&mut s, &mut d).map_err(|e| {
                    e.raw_os_error()
                        .map(nix::errno::Errno::from_raw)
                        .unwrap_or(nix::errno::Errno::EIO)
                })?;
                nix::unistd::fchown(d.as_fd(), uid, gid)?;
                nix::sys::stat::fchmod(d.as_fd(), mode)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Mount the root filesystem and everything below it at `rootfs` (in the container's fresh
/// mount namespace, still seeing the host's); the root, open, for [`enter_rootfs`].
pub fn mount_rootfs(cfg: &RuntimeConfig, dir: &Path) -> R<OwnedFd> {
    let cd = super::config::ContainerDir(dir.to_path_buf());
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| fail("make / private", e))?;
    // overlayfs: image snapshots below, the container's own upper layer on top. The options
    // must fit in one page: the layers are named by short links in the container's
    // directory (`l/0`, `l/1`, …) and every path is given relative to that directory, the
    // mount made from there (docker's overlay2 does the same), so that images of up to
    // MAX_LAYERS layers mount whatever the state directory's path.
    if cfg.layers.is_empty() {
        return Err(fail("rootfs", "the image has no layers"));
    }
    if cfg.layers.len() > crate::registry::types::MAX_LAYERS {
        return Err(fail(
            "rootfs",
            format!(
                "the image has {} layers; overlayfs mounts at most {}",
                cfg.layers.len(),
                crate::registry::types::MAX_LAYERS
            ),
        ));
    }
    let links = cd.0.join("l");
    if links.exists() {
        std::fs::remove_dir_all(&links).map_err(|e| fail("clear the layer links", e))?;
    }
    std::fs::create_dir(&links).map_err(|e| fail("make the layer links", e))?;
    let mut lower = vec![];
    // the top layer first, as overlayfs wants them
    for (i, p) in cfg.layers.iter().rev().enumerate() {
        let name = format!("{i:x}");
        std::os::unix::fs::symlink(p, links.join(&name))
            .map_err(|e| fail(format!("link layer {}", p.display()), e))?;
        lower.push(format!("l/{name}"));
    }
    // no redirects or metadata-only copies in the upper directory, whatever the kernel's
    // defaults: a build commits the upper directory as a layer, in the format every image
    // reader knows (renamed directories copied up, whiteouts for what went away)
    let opts = format!(
        "lowerdir={},upperdir=upper,workdir=work,redirect_dir=off,metacopy=off",
        lower.join(":")
    );
    let back = std::env::current_dir().unwrap_or_else(|_| "/".into());
    std::env::set_current_dir(&cd.0).map_err(|e| fail("enter the container's directory", e))?;
    let rootfs = cd.rootfs();
    mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| fail("mount overlay root filesystem", e))?;
    std::env::set_current_dir(&back).map_err(|e| fail("leave the container's directory", e))?;
    let root: OwnedFd = nix::fcntl::open(
        &rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail("open rootfs", e))?;

    // volumes, bind mounts, tmpfs
    for m in &cfg.mounts {
        let what = m.target.display().to_string();
        match &m.kind {
            MountKind::Bind { source, read_only } => {
                let is_file = std::fs::metadata(source)
                    .map_err(|e| fail(format!("bind source {}", source.display()), e))?
                    .is_file();
                let t = ensure_in(&root, &m.target, is_file)?;
                bind(source, &root, &m.target, &t, *read_only)?;
            }
            MountKind::Volume {
                source,
                read_only,
                populate_marker,
            } => {
                let t = ensure_in(&root, &m.target, false)?;
                if !populate_marker.exists() {
                    let empty = std::fs::read_dir(source)
                        .map(|mut d| d.next().is_none())
                        .unwrap_or(true);
                    if empty {
                        let filled = (|| {
                            let flags = OFlag::O_RDONLY
                                | OFlag::O_DIRECTORY
                                | OFlag::O_NOFOLLOW
                                | OFlag::O_CLOEXEC;
                            let s = nix::fcntl::openat(t.as_fd(), ".", flags, Mode::empty())?;
                            let d = nix::fcntl::open(source.as_path(), flags, Mode::empty())?;
                            copy_tree(s.as_fd(), d.as_fd())
                        })();
                        filled.map_err(|e| {
                            fail(format!("fill volume at {what} from the image"), e)
                        })?;
                    }
                    // berth's own file: private, whatever the container's umask
                    crate::fsutil::write_mode(populate_marker, b"", 0o600)
                        .map_err(|e| fail("mark volume filled", e))?;
                }
                bind(source, &root, &m.target, &t, *read_only)?;
            }
            MountKind::Tmpfs { size, mode } => {
                let t = ensure_in(&root, &m.target, false)?;
                let mut data = format!("mode={:o}", mode.unwrap_or(0o1777));
                if let Some(s) = size {
                    data.push_str(&format!(",size={s}"));
                }
                mnt(
                    Some("tmpfs"),
                    &t,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(&data),
                    &what,
                )?;
            }
        }
    }

    // /proc
    let nse = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let t = ensure_in(&root, Path::new("/proc"), false)?;
    mnt(Some("proc"), &t, Some("proc"), nse, None, "/proc")?;
    // /dev
    let t = ensure_in(&root, Path::new("/dev"), false)?;
    mnt(
        Some("tmpfs"),
        &t,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
        "/dev",
    )?;
    let dev =
        open_in(&root, Path::new("/dev"))?.ok_or_else(|| fail("/dev", "missing after mount"))?;
    let devdir = std::fs::File::open(fdpath(&dev)).map_err(|e| fail("open /dev", e))?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        mknodat(
            devdir.as_fd(),
            name,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(|e| fail(format!("mknod /dev/{name}"), e))?;
        // the umask may have cut the mode
        let _ = nix::sys::stat::fchmodat(
            devdir.as_fd(),
            name,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        );
    }
    for (name, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        nix::unistd::symlinkat(target, devdir.as_fd(), name)
            .map_err(|e| fail(format!("symlink /dev/{name}"), e))?;
    }
    for (name, fstype, flags, data) in [
        (
            "pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
        ),
        ("shm", "tmpfs", nse, "mode=1777,size=65536k"),
        ("mqueue", "mqueue", nse, ""),
    ] {
        let t = ensure_in(&root, &Path::new("/dev").join(name), false)?;
        mnt(
            Some(fstype),
            &t,
            Some(fstype),
            flags,
            (!data.is_empty()).then_some(data),
            &format!("/dev/{name}"),
        )?;
    }
    // /sys, read-only
    let t = ensure_in(&root, Path::new("/sys"), false)?;
    mnt(
        Some("sysfs"),
        &t,
        Some("sysfs"),
        nse | MsFlags::MS_RDONLY,
        None,
        "/sys",
    )?;
    // /etc/hostname, /etc/hosts, /etc/resolv.conf from berth
    for f in ["hostname", "hosts", "resolv.conf"] {
        let t = ensure_in(&root, &Path::new("/etc").join(f), true)?;
        // an image's /etc/hosts may be a symlink (followed inside the root), but never onto
        // the kernel's own files: berth's file would be mounted over /proc or /sys
        let kernel_fs = nix::sys::statfs::fstatfs(&t).is_ok_and(|fs| {
            let t = fs.filesystem_type();
            t == nix::sys::statfs::PROC_SUPER_MAGIC || t == nix::sys::statfs::SYSFS_MAGIC
        });
        if kernel_fs {
            return Err(fail(
                format!("mount /etc/{f}"),
                format!("the image's /etc/{f} leads into /proc or /sys"),
            ));
        }
        bind(
            &cd.etc().join(f),
            &root,
            &Path::new("/etc").join(f),
            &t,
            false,
        )?;
    }
    // masked and read-only paths
    for p in MASKED {
        if let Some(t) = open_in(&root, Path::new(p))? {
            let is_dir = std::fs::metadata(fdpath(&t))
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if is_dir {
                mnt(
                    Some("tmpfs"),
                    &t,
                    Some("tmpfs"),
                    MsFlags::MS_RDONLY,
                    Some("size=0"),
                    p,
                )?;
            } else {
                bind(Path::new("/dev/null"), &root, Path::new(p), &t, false)?;
            }
        }
    }
    for p in READ_ONLY {
        if let Some(t) = open_in(&root, Path::new(p))? {
            let tp = fdpath(&t);
            bind(Path::new(&tp), &root, Path::new(p), &t, true)?;
        }
    }

    Ok(root)
}

/// Pivot into the root that [`mount_rootfs`] prepared and detach the host's.
pub fn enter_rootfs(cfg: &RuntimeConfig, root: OwnedFd) -> R<()> {
    nix::unistd::fchdir(root.as_fd()).map_err(|e| fail("chdir rootfs", e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| fail("pivot_root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| fail("detach the old root", e))?;
    nix::unistd::chdir("/").map_err(|e| fail("chdir /", e))?;
    // a missing working directory is made now, while / can still be written (as docker
    // makes it in the container's layer even with --read-only)
    ensure_cwd(&cfg.process.cwd)?;
    if cfg.read_only {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| fail("remount / read-only", e))?;
    }
    Ok(())
}

/// Make the working directory exist, resolving it inside the container's root (never
/// through a magic link such as `/proc/self/fd/N`, which could name a host directory);
/// returns it open.
fn ensure_cwd(cwd: &str) -> R<OwnedFd> {
    let root: OwnedFd = nix::fcntl::open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail("open /", e))?;
    ensure_in(&root, Path::new(cwd), false)
        .map_err(|e| fail(format!("create working directory {cwd}"), e))
}

/// Read the container's `/etc/passwd` or `/etc/group`: only a regular file, and only so
/// much of it (a symlink to `/dev/zero` or a FIFO must not hang or exhaust the start).
/// Missing or unusable reads as empty, as docker treats a missing file.
fn read_user_db(path: &str) -> R<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        Err(_) => return Ok(String::new()),
    };
    let m = f.metadata().map_err(|e| fail(format!("stat {path}"), e))?;
    if !m.is_file() {
        return Err(fail("user", format!("{path} is not a regular file")));
    }
    if m.len() > MAX_USER_DB {
        return Err(fail(
            "user",
            format!("{path} is larger than {} MiB", MAX_USER_DB >> 20),
        ));
    }
    let mut buf = Vec::new();
    f.take(MAX_USER_DB)
        .read_to_end(&mut buf)
        .map_err(|e| fail(format!("read {path}"), e))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A resolved user: ids, supplementary groups, home.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// Resolve `uid[:gid]` or `name[:group]` against passwd and group file contents (docker's
/// rules: numeric ids need no entry; a name must exist).
pub fn resolve_user(spec: Option<&str>, passwd: &str, group: &str) -> Result<User, String> {
    let pw: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .collect();
    let gr: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let (u, g) = match spec {
        None | Some("") => ("0", None),
        Some(s) => match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        },
    };
    let entry = pw
        .iter()
        .find(|f| f[0] == u || (u.parse::<u32>().is_ok() && f[2] == u));
    let uid: u32 = match (u.parse::<u32>(), entry) {
        (Ok(n), _) => n,
        (Err(_), Some(e)) => e[2]
            .parse()
            .map_err(|_| format!("bad uid for user {u:?} in /etc/passwd"))?,
        (Err(_), None) => {
            return Err(format!(
                "user {u:?} not found in the container's /etc/passwd"
            ));
        }
    };
    let name = entry.map(|e| e[0]);
    let gid: u32 = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => gr
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("group {g:?} not found in the container's /etc/group"))?,
        },
        None => entry.and_then(|e| e[3].parse().ok()).unwrap_or(0),
    };
    let mut groups: Vec<u32> = vec![];
    if let Some(n) = name {
        for f in &gr {
            if f[3].split(',').any(|m| m == n)
                && let Ok(id) = f[2].parse::<u32>()
                && id != gid
                && !groups.contains(&id)
            {
                groups.push(id);
            }
        }
    }
    // (uid_t)-1 means "unchanged" to setresuid and chown: never a user
    if uid == u32::MAX || gid == u32::MAX || groups.contains(&u32::MAX) {
        return Err(format!("user {spec:?}: id 4294967295 is not a valid id"));
    }
    let home = entry
        .map(|e| e[5].to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".into());
    Ok(User {
        uid,
        gid,
        groups,
        home,
    })
}

fn find_executable(arg0: &str, env: &[String]) -> Option<String> {
    if arg0.contains('/') {
        return Some(arg0.to_string());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(super::config::DEFAULT_PATH);
    path.split(':')
        .map(|d| format!("{}/{arg0}", d.trim_end_matches('/')))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Everything after the root filesystem: hostname, limits, user, capabilities, exec.
/// Returns only on failure.
pub fn exec_process(cfg: &RuntimeConfig, keep_fd: RawFd) -> InitError {
    match exec_inner(cfg, keep_fd) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn exec_inner(cfg: &RuntimeConfig, keep_fd: RawFd) -> R<std::convert::Infallible> {
    nix::unistd::sethostname(&cfg.hostname).map_err(|e| fail("sethostname", e))?;
    match &cfg.net {
        NetMode::Host => {}
        NetMode::None => crate::net::link::configure_inside(&[], None)
            .map_err(|e| fail("bring up loopback", e))?,
        NetMode::Bridge { ifaces, gateway } => {
            let inside: Vec<_> = ifaces
                .iter()
                .map(|i| crate::net::link::InsideIface {
                    from: i.peer.clone(),
                    name: i.name.clone(),
                    addr: i.addr,
                    prefix: i.prefix,
                })
                .collect();
            crate::net::link::configure_inside(&inside, Some(*gateway))
                .map_err(|e| fail("configure the network", e))?
        }
    }
    exec_as(&cfg.process, keep_fd, false)
}

/// Become the container process described by `p` (user, capabilities, working directory,
/// no_new_privs) and exec it. Used for the container's init and for `berth exec`.
/// With `die_with_parent` (a command `berth exec` runs), the command is killed when its parent
/// (berth's helper outside the container) dies: a check killed for its timeout leaves
/// nothing behind.
pub fn exec_as(
    p: &ProcessSpec,
    keep_fd: RawFd,
    die_with_parent: bool,
) -> R<std::convert::Infallible> {
    use caps::{CapSet, Capability};
    // nothing inherited may be reachable while paths inside the container are resolved
    crate::sys::close_inherited_fds(&[keep_fd]);
    crate::sys::set_umask(CONTAINER_UMASK);
    // open files: docker's 1048576, never above the host's hard limit
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(|e| fail("getrlimit", e))?;
    let n = hard.min(1 << 20);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
        .map_err(|e| fail("setrlimit nofile", e))?;
    let passwd = read_user_db("/etc/passwd")?;
    let group = read_user_db("/etc/group")?;
    let user = resolve_user(p.user.as_deref(), &passwd, &group).map_err(|e| fail("user", e))?;
    // working directory: created if missing, resolved inside the root, checked after chdir
    // (CVE-2024-21626)
    let cwd = &p.cwd;
    let dir = ensure_cwd(cwd)?;
    nix::unistd::fchdir(dir.as_fd()).map_err(|e| fail(format!("chdir {cwd}"), e))?;
    drop(dir);
    let real = nix::unistd::getcwd().map_err(|e| fail("getcwd", e))?;
    if !real.is_absolute() || real.to_string_lossy().starts_with("(unreachable)") {
        return Err(fail(
            "working directory",
            format!("{cwd} resolves outside the container"),
        ));
    }
    // capabilities: bounding set first (needs CAP_SETPCAP), then ids, then the rest
    let keep: std::collections::HashSet<Capability> = p
        .capabilities
        .iter()
        .filter_map(|c| c.parse::<Capability>().ok())
        .collect();
    for c in caps::all() {
        if !keep.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, c)
                .map_err(|e| fail(format!("drop {c} from the bounding set"), e))?;
        }
    }
    // a keyring of its own: the host's session keyring is not the container's
    match crate::sys::join_new_session_keyring() {
        Ok(()) | Err(nix::errno::Errno::ENOSYS) => {}
        Err(e) => return Err(fail("join a new session keyring", e)),
    }
    // the filter is built now, while a failure can still be reported, and installed last
    let filters = if p.seccomp {
        super::seccomp::build(&p.capabilities).map_err(|e| fail("seccomp", e))?
    } else {
        vec![]
    };
    let gids: Vec<nix::unistd::Gid> = user
        .groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).map_err(|e| fail("setgroups", e))?;
    let gid = nix::unistd::Gid::from_raw(user.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| fail("setgid", e))?;
    let uid = nix::unistd::Uid::from_raw(user.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| fail("setuid", e))?;
    // after the ids change (which clears it); the parent is outside our pid namespace, so
    // getppid() is 0 while it lives
    if die_with_parent {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(|e| fail("parent-death signal", e))?;
        if nix::unistd::getppid().as_raw() != 0 {
            return Err(fail("parent-death signal", "the parent is gone"));
        }
    }
    caps::clear(None, CapSet::Inheritable)
        .map_err(|e| fail("clear inheritable capabilities", e))?;
    let _ = caps::clear(None, CapSet::Ambient);
    if user.uid == 0 {
        caps::set(None, CapSet::Effective, &keep)
            .map_err(|e| fail("set effective capabilities", e))?;
        caps::set(None, CapSet::Permitted, &keep)
            .map_err(|e| fail("set permitted capabilities", e))?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| fail("no_new_privs", e))?;
    // nothing of the host may be reachable through /proc/<pid>/exe while berth's code runs
    nix::sys::prctl::set_dumpable(false).map_err(|e| fail("set non-dumpable", e))?;
    let mut env = p.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    let arg0 = p.args.first().ok_or_else(|| {
        fail(
            "exec",
            "no command: set `command` or `entrypoint`, or use an image with CMD",
        )
    })?;
    let exe = find_executable(arg0, &env).ok_or_else(|| {
        fail(
            "exec",
            format!("{arg0:?}: executable file not found in $PATH"),
        )
    })?;
    let cstr =
        |s: &str| CString::new(s).map_err(|_| fail("exec", format!("{s:?} contains a NUL byte")));
    let argv: Vec<CString> = p.args.iter().map(|a| cstr(a)).collect::<R<_>>()?;
    let envp: Vec<CString> = env.iter().map(|a| cstr(a)).collect::<R<_>>()?;
    let path = cstr(&exe)?;
    crate::sys::close_fds_except(&[keep_fd]);
    super::seccomp::install(&filters).map_err(|e| fail("seccomp", e))?;
    match nix::unistd::execve(&path, &argv, &envp) {
        Ok(never) => match never {},
        Err(e) => Err(fail(format!("exec {exe}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nextra:x:2000:app\nother:x:3000:root,app\n";

    #[test]
    fn users_resolve_like_docker() {
        let u = resolve_user(None, PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
        let u = resolve_user(Some("app"), PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, [2000, 3000]);
        let u = resolve_user(Some("1000:extra"), PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 2000));
        let u = resolve_user(Some("4242"), PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.home.as_str()), (4242, "/"));
        assert!(resolve_user(Some("ghost"), PASSWD, GROUP).is_err());
        assert!(resolve_user(Some("app:ghosts"), PASSWD, GROUP).is_err());
    }
}
