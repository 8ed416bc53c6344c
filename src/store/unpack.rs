//! Secure extraction of one uncompressed OCI/Docker image layer (a tar
//! stream) into a snapshot directory, keeping whiteouts in overlayfs form so
//! the snapshot can be stacked as an overlayfs `lowerdir`.
//!
//! # Rules
//!
//! * **Paths.** Every entry path is normalised: leading `/` and `./` are
//!   stripped, `.` components dropped, and any `..` component is rejected
//!   with [`UnpackError::UnsafePath`]. An empty path (or `.`) is the root
//!   itself; only a directory entry may name it, and its metadata is applied
//!   to the root.
//! * **No host paths.** Everything happens relative to a directory fd of the
//!   root. An entry's parent directory is opened with
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so symlinks planted
//!   by earlier entries (`evil -> /etc`, `evil -> ../../..`) resolve *inside*
//!   the root. Missing parents are created (mode 0755) by walking the path
//!   one component at a time from safely opened fds; symlinks met on the way
//!   are expanded by hand, in-root, so `evil -> /nonexistent` followed by
//!   `evil/x` creates `<root>/nonexistent/x`.
//! * **Final component.** Acted on with `*at` syscalls on the parent fd
//!   (`mkdirat`, `openat(O_CREAT|O_EXCL|O_NOFOLLOW)`, `symlinkat`, `linkat`,
//!   `mknodat`). Whatever an earlier entry of this layer left at that name is
//!   removed first (recursively; a regular file tries the name first and
//!   clears it only on `EEXIST`), except that a directory entry over an
//!   existing directory keeps it and only updates its metadata.
//! * **Hardlinks.** The target is normalised like an entry path and its
//!   parent is opened in-root too, so a hardlink can never reach a host file.
//!   The link itself gets no metadata (it shares the target's inode).
//! * **Symlink targets** are stored verbatim: they are data, and nothing here
//!   ever follows them outside the root.
//! * **Devices.** Char/block devices only with
//!   [`UnpackOptions::allow_devices`], otherwise skipped silently. FIFOs are
//!   always created.
//! * **Metadata.** Order: contents, `fchownat(AT_SYMLINK_NOFOLLOW)` (only
//!   with [`UnpackOptions::preserve_ownership`]), xattrs, `fchmodat` (with
//!   setuid/setgid/sticky; never on symlinks; after chown since chown clears
//!   setuid), `utimensat(AT_SYMLINK_NOFOLLOW)`. PAX `uid`/`gid`/`mtime`/`atime`
//!   records are honoured (atime defaults to mtime). A regular file is created
//!   with its permission bits (never setuid/setgid/sticky) and gets the rest
//!   through its descriptor (`fchown`, `fchmod`, `futimens`: no path lookups),
//!   skipping the chown when it was born with the right owner and the chmod
//!   when the umask left its bits whole. Directory modes and
//!   times are applied at the very end, in reverse order, after re-resolving
//!   each directory safely (children would change the mtime; a deferred mode
//!   also lets a read-only directory receive its children).
//! * **Xattrs.** From PAX `SCHILY.xattr.NAME` records, on regular files and
//!   directories only, through an fd opened with `O_NOFOLLOW`. Names under
//!   `trusted.overlay.` and `user.overlay.` are dropped (they would let an
//!   archive fake whiteouts or opaque dirs). `EOPNOTSUPP` from the filesystem
//!   is ignored, as containerd does; other failures are errors.
//! * **Whiteouts (OCI).** `D/.wh.NAME` becomes a 0/0 character device `D/NAME`
//!   (replacing anything this layer put there). `D/.wh..wh..opq` sets
//!   `trusted.overlay.opaque=y` on `D` (created if needed) and deletes
//!   nothing: this layer's own entries in `D` stay, before or after the
//!   marker. A bare `.wh.` is [`UnpackError::BareWhiteout`]; any other
//!   `.wh..wh.` name, `.wh..` and `.wh...` are
//!   [`UnpackError::InvalidWhiteout`]. Whiteout entries are never written as
//!   files.
//! * **Entry types.** Regular, Continuous, Directory (also a Regular entry
//!   whose name ends in `/`), Symlink, Link, Char, Block, Fifo. PAX global
//!   headers are skipped. GNU sparse files, old-style (`S`: the `tar` crate
//!   would write the holes out as zeros, a 2 KB entry becoming a 2 GiB file)
//!   and PAX-format (`GNU.sparse.*` records), and every other type are
//!   [`UnpackError::Unsupported`]; image builders do not write them.
//! * **Space.** With [`UnpackOptions::min_free`], each entry (its contents
//!   and a fixed cost for its inode) is counted against the file system's
//!   free space before it is written; an entry that would leave less than the
//!   reserve fails the unpack with [`UnpackError::NoSpace`].
//! * **Stream.** The reader is always read to its end on success: bytes after
//!   the end-of-archive marker are drained, so a caller hashing the stream
//!   sees all of it.
//!
//! [`UnpackStats::entries`] counts every entry the tar iterator yields
//! (whiteouts, skipped devices and global headers included);
//! [`UnpackStats::bytes`] counts regular-file content bytes written.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens,
    makedev, mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use xattr::FileExt;

/// Options for [`unpack_layer`].
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    /// Apply the archive's uid/gid (true when running as root).
    pub preserve_ownership: bool,
    /// Create char/block devices (needs `CAP_MKNOD`); when false they are skipped.
    pub allow_devices: bool,
    /// Bytes the snapshot's file system must keep free: an entry that would leave less fails
    /// the unpack with [`UnpackError::NoSpace`] before it is written. 0: no check.
    pub min_free: u64,
}

/// What [`unpack_layer`] did.
#[derive(Debug, Default, Clone)]
pub struct UnpackStats {
    /// Tar entries seen (including whiteouts and skipped entries).
    pub entries: u64,
    /// Regular-file content bytes written.
    pub bytes: u64,
}

/// Why a layer could not be unpacked. Every variant names the in-archive path.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The snapshot root itself could not be opened (`path` is the host path).
    #[error("opening snapshot root {}", shown(.path))]
    OpenRoot { path: PathBuf, source: io::Error },
    /// Reading the tar stream failed (`path`: the entry being read, or the
    /// last entry read; empty before the first one).
    #[error("reading layer archive at entry {}", shown(.path))]
    ReadArchive { path: PathBuf, source: io::Error },
    #[error("unsafe path {} in layer: {}", shown(.path), .why)]
    UnsafePath { path: PathBuf, why: String },
    #[error("bare whiteout {} (nothing after the `.wh.` prefix)", shown(.path))]
    BareWhiteout { path: PathBuf },
    #[error("invalid whiteout {}: {}", shown(.path), .why)]
    InvalidWhiteout { path: PathBuf, why: &'static str },
    #[error("resolving the directory of {} inside the root", shown(.path))]
    Resolve { path: PathBuf, source: io::Error },
    #[error("creating directory for {}", shown(.path))]
    Mkdir { path: PathBuf, source: io::Error },
    #[error("removing what an earlier entry left at {}", shown(.path))]
    Remove { path: PathBuf, source: io::Error },
    #[error("creating file {}", shown(.path))]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("writing file {}", shown(.path))]
    WriteFile { path: PathBuf, source: io::Error },
    #[error("opening {}", shown(.path))]
    Open { path: PathBuf, source: io::Error },
    #[error("creating symlink {} -> {}", shown(.path), shown(.target))]
    Symlink {
        path: PathBuf,
        target: PathBuf,
        source: io::Error,
    },
    #[error("creating hardlink {} -> {}", shown(.path), shown(.target))]
    Hardlink {
        path: PathBuf,
        target: PathBuf,
        source: io::Error,
    },
    #[error("creating device or fifo {}", shown(.path))]
    Mknod { path: PathBuf, source: io::Error },
    #[error("changing owner of {}", shown(.path))]
    Chown { path: PathBuf, source: io::Error },
    #[error("changing mode of {}", shown(.path))]
    Chmod { path: PathBuf, source: io::Error },
    #[error("setting times of {}", shown(.path))]
    SetTimes { path: PathBuf, source: io::Error },
    #[error("setting xattr {} on {}", shown(.name), shown(.path))]
    Xattr {
        path: PathBuf,
        name: String,
        source: io::Error,
    },
    #[error("applying whiteout {}", shown(.path))]
    Whiteout { path: PathBuf, source: io::Error },
    #[error("unsupported entry {}: {}", shown(.path), .kind)]
    Unsupported { path: PathBuf, kind: String },
    /// Unpacking `path` would leave less than the reserve free.
    #[error(
        "unpacking {} ({needed} bytes) would leave less than the reserve of {reserve} bytes free on the store's file system ({available} bytes available)",
        shown(.path)
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
        reserve: u64,
    },
    /// Unpacking would leave the file system all but out of inodes (under 5%).
    #[error(
        "unpacking {} would leave the store's file system all but out of inodes ({available} free)",
        shown(.path)
    )]
    NoInodes { path: PathBuf, available: u64 },
}

/// An entry path (or xattr name, link target) in a message: quoted, escaped, cut.
fn shown(p: impl AsRef<OsStr>) -> String {
    format!(
        "\"{}\"",
        crate::text::printable_bytes(p.as_ref().as_bytes(), 300)
    )
}

/// The overlayfs xattr marking a directory opaque.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Xattr name prefixes never copied from an archive.
const FORBIDDEN_XATTR_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];
/// Symlink expansions allowed while creating missing parents (like the kernel).
const MAX_SYMLINKS: u32 = 40;
/// Bytes gathered before each write of a regular file's contents.
const WRITE_BUF: usize = 1 << 20;
/// The longest entry path (the kernel's PATH_MAX): a path no process could use, and the bound
/// on what the extractor keeps per directory.
const MAX_PATH: usize = 4096;
/// Entries between two looks at the free space and free inodes.
const RESTAT_ENTRIES: u64 = 4096;
/// Bytes written between two looks at the free space (the budget is counted down between).
const RESTAT_EVERY: u64 = 64 << 20;
/// What an entry, or a directory made for one, is charged beyond its contents: a block (its
/// inode and directory entry, or a directory's first block).
const ENTRY_COST: u64 = 4096;
/// Retries of `openat2` on `EAGAIN` (a concurrent rename elsewhere on the fs).
const OPENAT2_RETRIES: u32 = 16;

/// Extract one uncompressed layer tar stream into `root` (an existing, empty
/// directory). See the module documentation for the rules.
pub fn unpack_layer<R: Read>(
    reader: R,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    let root_fd = openat(
        AT_FDCWD,
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::OpenRoot {
        path: root.to_owned(),
        source: e.into(),
    })?;
    // Every directory in the snapshot is made by this unpack (modes applied at the end), so
    // a new file's group is the creator's unless the root itself is setgid.
    let setgid_root = nix::sys::stat::fstat(&root_fd)
        .map(|st| st.st_mode & libc::S_ISGID != 0)
        .unwrap_or(true);
    let mut ex = Extractor {
        root: root_fd,
        opts: *opts,
        stats: UnpackStats::default(),
        dirs: Vec::new(),
        dir_index: std::collections::HashMap::new(),
        buf: vec![0; WRITE_BUF],
        last_dir: RefCell::new(None),
        born_owner: (!setgid_root).then(|| (nix::unistd::geteuid(), nix::unistd::getegid())),
        umask: current_umask(),
        budget: None,
        since_stat: 0,
        entries_since_stat: 0,
        made_dirs: std::cell::Cell::new(0),
    };

    // extension entries the tar crate would read whole are bounded before it sees them
    let mut archive = tar::Archive::new(super::targuard::TarGuard::new(reader));
    archive.set_ignore_zeros(false);
    let mut last = PathBuf::new();
    {
        let entries = archive
            .entries()
            .map_err(|source| UnpackError::ReadArchive {
                path: last.clone(),
                source,
            })?;
        for entry in entries {
            let mut entry = entry.map_err(|source| UnpackError::ReadArchive {
                path: last.clone(),
                source,
            })?;
            ex.stats.entries += 1;
            last = PathBuf::from(OsStr::from_bytes(&entry.path_bytes()));
            ex.entry(&mut entry, &last)?;
            // the parent directories the entry made, charged once they are known
            let made = ex.made_dirs.take();
            if made > 0 {
                ex.charge(&last, made * ENTRY_COST)?;
            }
        }
    }
    // Drain whatever follows the end-of-archive marker: the caller hashes it.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink())
        .map_err(|source| UnpackError::ReadArchive { path: last, source })?;

    ex.finish_dirs()?;
    Ok(ex.stats)
}

/// Metadata of one entry, from its header and PAX records.
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    atime: TimeSpec,
    mtime: TimeSpec,
    xattrs: Vec<(OsString, Vec<u8>)>,
    pax_sparse: bool,
}

/// A directory whose mode and times are applied at the end.
struct DirRecord {
    /// The normalised path (components joined); its components are taken again at the end.
    rel: PathBuf,
    path: PathBuf,
    mode: u32,
    atime: TimeSpec,
    mtime: TimeSpec,
}

struct Extractor {
    root: OwnedFd,
    opts: UnpackOptions,
    stats: UnpackStats,
    dirs: Vec<DirRecord>,
    /// Where each directory's record is in `dirs`: a directory named again (a layer may
    /// repeat an entry any number of times) updates its record instead of adding one.
    dir_index: std::collections::HashMap<PathBuf, usize>,
    buf: Vec<u8>,
    /// The directory [`Extractor::open_dir`] resolved last, by its components: most entries
    /// share their parent with the one before. An entry only removes children of the
    /// directory it resolved, so this one is never removed under the cache; it is dropped on
    /// every removal all the same (removal is the only way a path resolved earlier can come
    /// to name another directory).
    last_dir: RefCell<Option<(Vec<OsString>, Rc<OwnedFd>)>>,
    /// The owner a new file gets without a chown (None: not known).
    born_owner: Option<(Uid, Gid)>,
    /// This process's umask (None: not known).
    umask: Option<u32>,
    /// Bytes that may still be written before the reserve is reached (None: look first).
    budget: Option<u64>,
    /// Bytes charged since the free space was last looked at.
    since_stat: u64,
    /// Entries charged since then.
    entries_since_stat: u64,
    /// Directories [`Extractor::create_dirs`] made for the current entry, not yet charged.
    made_dirs: std::cell::Cell<u64>,
}

impl Extractor {
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
    ) -> Result<(), UnpackError> {
        let mut kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let comps = normalize(path).map_err(|why| UnpackError::UnsafePath {
            path: path.to_owned(),
            why: why.to_owned(),
        })?;
        // every entry costs an inode and a block, whatever it is (a whiteout, a directory, a
        // link), before its contents; the parents it makes are charged as they are made
        let size = if matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            entry.size()
        } else {
            0
        };
        self.charge(path, size + ENTRY_COST)?;
        if let Some(rest) = comps
            .last()
            .and_then(|c| c.as_bytes().strip_prefix(b".wh."))
        {
            return self.whiteout(path, &comps, rest);
        }
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let meta = read_meta(entry, path)?;
        if meta.pax_sparse {
            return Err(unsupported(path, "PAX-format GNU sparse file"));
        }
        if kind == tar::EntryType::Regular && path.as_os_str().as_bytes().ends_with(b"/") {
            kind = tar::EntryType::Directory;
        }
        if comps.is_empty() && kind != tar::EntryType::Directory {
            return Err(UnpackError::UnsafePath {
                path: path.to_owned(),
                why: format!("a {kind:?} entry cannot replace the layer root"),
            });
        }
        match kind {
            tar::EntryType::Directory => self.directory(path, comps, &meta),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.regular(entry, path, &comps, &meta)
            }
            // the tar crate writes the holes out as zeros: a 2 KB entry can be a 2 GiB file
            tar::EntryType::GNUSparse => Err(unsupported(
                path,
                "old-style GNU sparse file (its holes would be written out in full)",
            )),
            tar::EntryType::Symlink => self.symlink(path, &comps, link, &meta),
            tar::EntryType::Link => self.hardlink(path, &comps, link),
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.node(entry, kind, path, &comps, &meta)
            }
            other => Err(unsupported(path, &format!("entry type {other:?}"))),
        }
    }

    fn directory(
        &mut self,
        path: &Path,
        comps: Vec<OsString>,
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let (parent, name) = if comps.is_empty() {
            (self.open_dir(path, &[], false)?, OsStr::new("."))
        } else {
            self.slot(path, &comps)?
        };
        if !comps.is_empty() && !self.clear_slot(&parent, name, path, &comps, true)? {
            mkdirat(&parent, name, Mode::from_bits_truncate(0o755)).map_err(|e| {
                UnpackError::Mkdir {
                    path: path.to_owned(),
                    source: e.into(),
                }
            })?;
        }
        self.chown(&parent, name, path, meta)?;
        if !meta.xattrs.is_empty() {
            let dir = open_file(
                &parent,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                path,
            )?;
            set_xattrs(&dir, path, &meta.xattrs)?;
        }
        let rec = DirRecord {
            rel: join(&comps),
            path: path.to_owned(),
            mode: meta.mode,
            atime: meta.atime,
            mtime: meta.mtime,
        };
        match self.dir_index.get(&rec.rel) {
            // the last entry's metadata wins, as it would have at the end
            Some(&i) => self.dirs[i] = rec,
            None => {
                self.dir_index.insert(rec.rel.clone(), self.dirs.len());
                self.dirs.push(rec);
            }
        }
        Ok(())
    }

    /// Count `n` bytes against the reserve: fail if writing them would leave less than
    /// `min_free` free. The free space is looked at first, then every [`RESTAT_EVERY`] bytes
    /// (others may be writing too), and counted down in between.
    fn charge(&mut self, path: &Path, n: u64) -> Result<(), UnpackError> {
        let reserve = self.opts.min_free;
        if reserve == 0 {
            return Ok(());
        }
        self.entries_since_stat += 1;
        let stale = self.budget.is_none_or(|b| b < n)
            || self.since_stat >= RESTAT_EVERY
            || self.entries_since_stat >= RESTAT_ENTRIES;
        if stale {
            let v = nix::sys::statvfs::fstatvfs(&self.root).ok();
            let available = v
                .as_ref()
                .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
                .unwrap_or(u64::MAX);
            self.budget = Some(available.saturating_sub(reserve));
            self.since_stat = 0;
            self.entries_since_stat = 0;
            // inodes too: a layer of empty files exhausts them long before the blocks (a
            // file system without an inode count, such as btrfs, reports 0 of 0)
            if let Some(v) = v
                && v.files() > 0
                && v.files_available() < (v.files() / 20).max(RESTAT_ENTRIES)
            {
                return Err(UnpackError::NoInodes {
                    path: path.to_owned(),
                    available: v.files_available(),
                });
            }
        }
        let budget = self.budget.unwrap_or(0);
        if n > budget {
            return Err(UnpackError::NoSpace {
                path: path.to_owned(),
                needed: n,
                available: budget.saturating_add(reserve),
                reserve,
            });
        }
        self.budget = Some(budget - n);
        self.since_stat += n;
        Ok(())
    }

    fn regular<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        comps: &[OsString],
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let (parent, name) = self.slot(path, comps)?;
        // created with its permission bits (never setuid/setgid/sticky, which come after the
        // chown), so that a file whose bits survive the umask needs no chmod
        let perms = meta.mode & 0o777;
        let create = || {
            openat(
                &parent,
                name,
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_WRONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(perms as libc::mode_t),
            )
        };
        // the name is usually free: create first, clear what an earlier entry left only if not
        let fd = match create() {
            Err(Errno::EEXIST) => {
                self.clear_slot(&parent, name, path, comps, false)?;
                create()
            }
            r => r,
        }
        .map_err(|e| UnpackError::CreateFile {
            path: path.to_owned(),
            source: e.into(),
        })?;
        let mut file = File::from(fd);
        loop {
            let n = crate::fsutil::read_full(entry, &mut self.buf).map_err(|source| {
                UnpackError::ReadArchive {
                    path: path.to_owned(),
                    source,
                }
            })?;
            if n == 0 {
                break;
            }
            file.write_all(&self.buf[..n])
                .map_err(|source| UnpackError::WriteFile {
                    path: path.to_owned(),
                    source,
                })?;
            self.stats.bytes += n as u64;
        }
        // metadata through the descriptor of the file just created (no path lookups), and
        // owner and mode only where the creation did not already get them right
        if let Some(owner) = self.owner(path, meta)?
            && Some(owner) != self.born_owner
        {
            fchown(&file, Some(owner.0), Some(owner.1)).map_err(|e| UnpackError::Chown {
                path: path.to_owned(),
                source: e.into(),
            })?;
        }
        set_xattrs(&file, path, &meta.xattrs)?;
        if self.umask.is_none_or(|u| perms & !u != meta.mode & 0o7777) {
            fchmod(&file, file_mode(meta.mode)).map_err(|e| UnpackError::Chmod {
                path: path.to_owned(),
                source: e.into(),
            })?;
        }
        futimens(&file, &meta.atime, &meta.mtime).map_err(|e| UnpackError::SetTimes {
            path: path.to_owned(),
            source: e.into(),
        })
    }

    fn symlink(
        &mut self,
        path: &Path,
        comps: &[OsString],
        link: Option<Vec<u8>>,
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let target = PathBuf::from(OsString::from_vec(link.unwrap_or_default()));
        let (parent, name) = self.slot(path, comps)?;
        self.clear_slot(&parent, name, path, comps, false)?;
        symlinkat(target.as_path(), &parent, name).map_err(|e| UnpackError::Symlink {
            path: path.to_owned(),
            target: target.clone(),
            source: e.into(),
        })?;
        self.chown(&parent, name, path, meta)?;
        set_times(&parent, name, path, meta.atime, meta.mtime)
    }

    fn hardlink(
        &mut self,
        path: &Path,
        comps: &[OsString],
        link: Option<Vec<u8>>,
    ) -> Result<(), UnpackError> {
        let target = PathBuf::from(OsString::from_vec(link.unwrap_or_default()));
        let link_err = |e: io::Error| UnpackError::Hardlink {
            path: path.to_owned(),
            target: target.clone(),
            source: e,
        };
        let tcomps = normalize(&target).map_err(|why| UnpackError::UnsafePath {
            path: path.to_owned(),
            why: format!("hardlink target {target:?}: {why}"),
        })?;
        let Some((tname, tdir)) = tcomps.split_last() else {
            return Err(link_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "hardlink target is empty or the layer root",
            )));
        };
        if tcomps.as_slice() == comps {
            return Ok(()); // a link to itself: nothing to do
        }
        let (parent, name) = self.slot(path, comps)?;
        let tparent = self.resolve(&join(tdir)).map_err(|e| link_err(e.into()))?;
        self.clear_slot(&parent, name, path, comps, false)?;
        linkat(&tparent, tname.as_os_str(), &parent, name, AtFlags::empty())
            .map_err(|e| link_err(e.into()))
    }

    fn node<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        kind: tar::EntryType,
        path: &Path,
        comps: &[OsString],
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let read_err = |source| UnpackError::ReadArchive {
            path: path.to_owned(),
            source,
        };
        let (sflag, dev) = match kind {
            tar::EntryType::Fifo => (SFlag::S_IFIFO, 0),
            _ if !self.opts.allow_devices => return Ok(()),
            _ => {
                let h = entry.header();
                let major = h.device_major().map_err(read_err)?.unwrap_or(0);
                let minor = h.device_minor().map_err(read_err)?.unwrap_or(0);
                let sflag = if kind == tar::EntryType::Block {
                    SFlag::S_IFBLK
                } else {
                    SFlag::S_IFCHR
                };
                (sflag, makedev(major.into(), minor.into()))
            }
        };
        let (parent, name) = self.slot(path, comps)?;
        self.clear_slot(&parent, name, path, comps, false)?;
        mknodat(&parent, name, sflag, Mode::from_bits_truncate(0o600), dev).map_err(|e| {
            UnpackError::Mknod {
                path: path.to_owned(),
                source: e.into(),
            }
        })?;
        self.chown(&parent, name, path, meta)?;
        chmod(&parent, name, path, meta.mode)?;
        set_times(&parent, name, path, meta.atime, meta.mtime)
    }

    /// Handle an entry whose last component starts with `.wh.`; `rest` is
    /// what follows the prefix.
    fn whiteout(
        &mut self,
        path: &Path,
        comps: &[OsString],
        rest: &[u8],
    ) -> Result<(), UnpackError> {
        let wh_err = |e: io::Error| UnpackError::Whiteout {
            path: path.to_owned(),
            source: e,
        };
        let dir = &comps[..comps.len().saturating_sub(1)];
        if rest.is_empty() {
            return Err(UnpackError::BareWhiteout {
                path: path.to_owned(),
            });
        }
        if let Some(meta) = rest.strip_prefix(b".wh.") {
            if meta != b".opq" {
                return Err(UnpackError::InvalidWhiteout {
                    path: path.to_owned(),
                    why: "unknown `.wh..wh.` meta whiteout (only `.wh..wh..opq` exists)",
                });
            }
            // Opaque: hides the LOWER layers only; this layer's entries stay.
            let dfd = self.open_dir(path, dir, true)?;
            let d = openat(
                &dfd,
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| wh_err(e.into()))?;
            return File::from(d).set_xattr(OPAQUE_XATTR, b"y").map_err(wh_err);
        }
        if rest == b"." || rest == b".." {
            return Err(UnpackError::InvalidWhiteout {
                path: path.to_owned(),
                why: "whiteout of `.` or `..`",
            });
        }
        let name = OsStr::from_bytes(rest);
        let parent = self.open_dir(path, dir, true)?;
        let mut victim = dir.to_vec();
        victim.push(name.to_owned());
        self.clear_slot(&parent, name, path, &victim, false)?;
        mknodat(&parent, name, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
            .map_err(|e| wh_err(e.into()))
    }

    /// The (safely resolved, created if missing) parent fd and final name.
    fn slot<'c>(
        &self,
        path: &Path,
        comps: &'c [OsString],
    ) -> Result<(Rc<OwnedFd>, &'c OsStr), UnpackError> {
        match comps.split_last() {
            Some((name, dir)) => Ok((self.open_dir(path, dir, true)?, name.as_os_str())),
            None => Err(UnpackError::UnsafePath {
                path: path.to_owned(),
                why: "empty path".to_owned(),
            }),
        }
    }

    /// `openat2(root, rel, O_PATH|O_DIRECTORY, RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS)`.
    fn resolve(&self, rel: &Path) -> nix::Result<OwnedFd> {
        let mut tries = 0;
        loop {
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            match openat2(&self.root, rel, how) {
                Err(Errno::EAGAIN) if tries < OPENAT2_RETRIES => tries += 1,
                r => return r,
            }
        }
    }

    /// Open the directory at `comps` (in root), creating missing ones if `create`.
    fn open_dir(
        &self,
        path: &Path,
        comps: &[OsString],
        create: bool,
    ) -> Result<Rc<OwnedFd>, UnpackError> {
        if let Some((last, fd)) = &*self.last_dir.borrow()
            && last.as_slice() == comps
        {
            return Ok(fd.clone());
        }
        let fd = Rc::new(match self.resolve(&join(comps)) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) if create => self.create_dirs(path, comps)?,
            Err(e) => {
                return Err(UnpackError::Resolve {
                    path: path.to_owned(),
                    source: e.into(),
                });
            }
        });
        *self.last_dir.borrow_mut() = Some((comps.to_vec(), fd.clone()));
        Ok(fd)
    }

    /// Walk `comps` from the root one component at a time, creating missing
    /// directories (0755). Symlinks met on the way are expanded by hand with
    /// the same semantics as `RESOLVE_IN_ROOT` (absolute targets restart at
    /// the root, `..` never climbs above it). `real` only ever holds names of
    /// real directories, so popping it for `..` is exact; every fd used is
    /// re-derived from it with `openat2(RESOLVE_IN_ROOT)`.
    fn create_dirs(&self, path: &Path, comps: &[OsString]) -> Result<OwnedFd, UnpackError> {
        let rerr = |e: Errno| UnpackError::Resolve {
            path: path.to_owned(),
            source: e.into(),
        };
        let mut todo: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut real: Vec<OsString> = Vec::new();
        let mut cur = self.resolve(Path::new(".")).map_err(rerr)?;
        let mut links = 0;
        while let Some(c) = todo.pop_front() {
            if c.is_empty() || c == "." {
                continue;
            }
            if c == ".." {
                real.pop();
                cur = self.resolve(&join(&real)).map_err(rerr)?;
                continue;
            }
            match fstatat(&cur, c.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_type(&st, libc::S_IFDIR) => {}
                Ok(st) if is_type(&st, libc::S_IFLNK) => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(rerr(Errno::ELOOP));
                    }
                    let target = readlinkat(&cur, c.as_os_str()).map_err(rerr)?;
                    let target = target.as_bytes();
                    if target.starts_with(b"/") {
                        real.clear();
                        cur = self.resolve(Path::new(".")).map_err(rerr)?;
                    }
                    for part in target.split(|b| *b == b'/').rev() {
                        todo.push_front(OsStr::from_bytes(part).to_owned());
                    }
                    continue;
                }
                Ok(_) => return Err(rerr(Errno::ENOTDIR)),
                Err(Errno::ENOENT) => {
                    let mode = Mode::from_bits_truncate(0o755);
                    self.made_dirs.set(self.made_dirs.get() + 1);
                    mkdirat(&cur, c.as_os_str(), mode).map_err(|e| UnpackError::Mkdir {
                        path: path.to_owned(),
                        source: e.into(),
                    })?;
                    // Undo the umask.
                    fchmodat(&cur, c.as_os_str(), mode, FchmodatFlags::NoFollowSymlink).map_err(
                        |e| UnpackError::Chmod {
                            path: path.to_owned(),
                            source: e.into(),
                        },
                    )?;
                }
                Err(e) => return Err(rerr(e)),
            }
            real.push(c);
            cur = self.resolve(&join(&real)).map_err(rerr)?;
        }
        Ok(cur)
    }

    /// Make room for a new entry at `parent/name`. Returns true when an
    /// existing directory is kept (`keep_dir` and it is a directory).
    fn clear_slot(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
        comps: &[OsString],
        keep_dir: bool,
    ) -> Result<bool, UnpackError> {
        let err = |e: Errno| UnpackError::Remove {
            path: path.to_owned(),
            source: e.into(),
        };
        match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(err(e)),
            Ok(st) if keep_dir && is_type(&st, libc::S_IFDIR) => Ok(true),
            Ok(st) => {
                self.last_dir.get_mut().take();
                remove_all_at(parent, name).map_err(err)?;
                // a directory removed takes its records with it (only a directory has any
                // below it)
                if is_type(&st, libc::S_IFDIR) {
                    let gone = join(comps);
                    self.dirs.retain(|d| !d.rel.starts_with(&gone));
                    self.dir_index = self
                        .dirs
                        .iter()
                        .enumerate()
                        .map(|(i, d)| (d.rel.clone(), i))
                        .collect();
                }
                Ok(false)
            }
        }
    }

    fn chown(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        let Some((uid, gid)) = self.owner(path, meta)? else {
            return Ok(());
        };
        fchownat(
            parent,
            name,
            Some(uid),
            Some(gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| UnpackError::Chown {
            path: path.to_owned(),
            source: e.into(),
        })
    }

    /// The owner to give an entry, or None when ownership is not preserved.
    fn owner(&self, path: &Path, meta: &Meta) -> Result<Option<(Uid, Gid)>, UnpackError> {
        if !self.opts.preserve_ownership {
            return Ok(None);
        }
        let id = |v: u64| {
            u32::try_from(v).map_err(|_| UnpackError::Chown {
                path: path.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidData, format!("id {v} out of range")),
            })
        };
        Ok(Some((
            Uid::from_raw(id(meta.uid)?),
            Gid::from_raw(id(meta.gid)?),
        )))
    }

    /// Apply deferred directory modes and times, latest entry per directory
    /// wins, in reverse order of appearance.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        let dirs = std::mem::take(&mut self.dirs);
        self.dir_index.clear();
        for d in dirs.iter().rev() {
            let comps = normalize(&d.rel).unwrap_or_default();
            let (dir, name) = match comps.split_last() {
                Some((name, dir)) => (dir, name.as_os_str()),
                None => (&[][..], OsStr::new(".")),
            };
            let parent = match self.resolve(&join(dir)) {
                Ok(fd) => fd,
                Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
                Err(e) => {
                    return Err(UnpackError::Resolve {
                        path: d.path.clone(),
                        source: e.into(),
                    });
                }
            };
            match fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_type(&st, libc::S_IFDIR) => {}
                Ok(_) | Err(Errno::ENOENT) => continue,
                Err(e) => {
                    return Err(UnpackError::Resolve {
                        path: d.path.clone(),
                        source: e.into(),
                    });
                }
            }
            chmod(&parent, name, &d.path, d.mode)?;
            set_times(&parent, name, &d.path, d.atime, d.mtime)?;
        }
        Ok(())
    }
}

/// Normalise an in-archive path into its components; `Err` explains why it
/// is unsafe. An empty result is the root.
fn normalize(path: &Path) -> Result<Vec<OsString>, &'static str> {
    if path.as_os_str().len() > MAX_PATH {
        return Err("is longer than 4096 bytes");
    }
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_owned()),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("contains a `..` component"),
            Component::Prefix(_) => return Err("has a path prefix"),
        }
    }
    Ok(out)
}

/// Relative path of `comps`, or `.` for the root.
fn join(comps: &[OsString]) -> PathBuf {
    if comps.is_empty() {
        PathBuf::from(".")
    } else {
        comps.iter().collect()
    }
}

fn is_type(st: &FileStat, fmt: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == fmt
}

fn unsupported(path: &Path, kind: &str) -> UnpackError {
    UnpackError::Unsupported {
        path: path.to_owned(),
        kind: kind.to_owned(),
    }
}

fn open_file(
    parent: &OwnedFd,
    name: &OsStr,
    flags: OFlag,
    path: &Path,
) -> Result<File, UnpackError> {
    openat(parent, name, flags, Mode::empty())
        .map(File::from)
        .map_err(|e| UnpackError::Open {
            path: path.to_owned(),
            source: e.into(),
        })
}

/// The process umask, from /proc/self/status (reading it with umask(2) would change it for
/// every thread for a moment).
fn current_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(line.trim(), 8).ok()
}

/// The permission bits (with setuid, setgid and sticky) of an archive mode.
fn file_mode(mode: u32) -> Mode {
    Mode::from_bits_truncate((mode & 0o7777) as libc::mode_t)
}

fn chmod(parent: &OwnedFd, name: &OsStr, path: &Path, mode: u32) -> Result<(), UnpackError> {
    fchmodat(
        parent,
        name,
        file_mode(mode),
        FchmodatFlags::NoFollowSymlink,
    )
    .map_err(|e| UnpackError::Chmod {
        path: path.to_owned(),
        source: e.into(),
    })
}

fn set_times(
    parent: &OwnedFd,
    name: &OsStr,
    path: &Path,
    atime: TimeSpec,
    mtime: TimeSpec,
) -> Result<(), UnpackError> {
    utimensat(
        parent,
        name,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| UnpackError::SetTimes {
        path: path.to_owned(),
        source: e.into(),
    })
}

fn set_xattrs(file: &File, path: &Path, xattrs: &[(OsString, Vec<u8>)]) -> Result<(), UnpackError> {
    for (name, value) in xattrs {
        match file.set_xattr(name, value) {
            Ok(()) => {}
            // The filesystem does not support this namespace: skip, like containerd.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(source) => {
                return Err(UnpackError::Xattr {
                    path: path.to_owned(),
                    name: name.to_string_lossy().into_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Remove `parent/name`, recursively if it is a directory, never following
/// symlinks.
fn remove_all_at(parent: &impl AsFd, name: &OsStr) -> nix::Result<()> {
    match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
        Err(Errno::EISDIR) => {}
        r => return r,
    }
    let fd = openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut dir = Dir::from_fd(fd)?;
    let mut children = Vec::new();
    for ent in dir.iter() {
        let n = ent?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            children.push(OsString::from_vec(n));
        }
    }
    for child in &children {
        remove_all_at(&dir, child)?;
    }
    drop(dir);
    unlinkat(parent, name, UnlinkatFlags::RemoveDir)
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, path: &Path) -> Result<Meta, UnpackError> {
    let err = |source| UnpackError::ReadArchive {
        path: path.to_owned(),
        source,
    };
    let h = entry.header();
    let mode = h.mode().map_err(err)?;
    // The tar crate already applies PAX `uid`/`gid` records to the header.
    let uid = h.uid().map_err(err)?;
    let gid = h.gid().map_err(err)?;
    let mtime_secs = i64::try_from(h.mtime().map_err(err)?).unwrap_or(i64::MAX);
    let mut mtime = TimeSpec::new(mtime_secs, 0);
    let mut atime = None;
    let mut xattrs = Vec::new();
    let mut pax_sparse = false;
    if let Some(exts) = entry.pax_extensions().map_err(err)? {
        for ext in exts {
            let ext = ext.map_err(err)?;
            let key = ext.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if !FORBIDDEN_XATTR_PREFIXES.iter().any(|p| name.starts_with(p)) {
                    xattrs.push((
                        OsStr::from_bytes(name).to_owned(),
                        ext.value_bytes().to_vec(),
                    ));
                }
            } else if key == b"mtime" {
                if let Some(t) = parse_pax_time(ext.value_bytes()) {
                    mtime = t;
                }
            } else if key == b"atime" {
                atime = parse_pax_time(ext.value_bytes());
            } else if key.starts_with(b"GNU.sparse.") {
                pax_sparse = true;
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        atime: atime.unwrap_or(mtime),
        mtime,
        xattrs,
        pax_sparse,
    })
}

/// Parse a PAX time record (`[-]SECONDS[.FRACTION]`).
fn parse_pax_time(v: &[u8]) -> Option<TimeSpec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let secs: i64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let digits = &frac[..frac.len().min(9)];
    let mut nanos: i64 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    for _ in digits.len()..9 {
        nanos *= 10;
    }
    Some(match (neg, nanos) {
        (false, _) => TimeSpec::new(secs, nanos),
        (true, 0) => TimeSpec::new(-secs, 0),
        (true, _) => TimeSpec::new(-secs - 1, 1_000_000_000 - nanos),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::{Builder, EntryType, Header};

    const OPTS: UnpackOptions = UnpackOptions {
        preserve_ownership: true,
        allow_devices: true,
        min_free: 0,
    };

    /// (guard, root, outside). Under /var/tmp: tmpfs may lack `trusted.*`.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::Builder::new()
            .prefix("unpack-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        (t, root, outside)
    }

    fn assert_empty(dir: &Path) {
        let names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(names.is_empty(), "{dir:?} not empty: {names:?}");
    }

    /// A header with a raw (unvalidated) name, so `..` and `/x` can be written.
    fn hdr(path: &str, kind: EntryType, size: u64, mode: u32) -> Header {
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }

    fn with_link(mut h: Header, link: &str) -> Header {
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h
    }

    fn add(b: &mut Builder<Vec<u8>>, mut h: Header, data: &[u8]) {
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    fn file(b: &mut Builder<Vec<u8>>, path: &str, data: &[u8]) {
        add(
            b,
            hdr(path, EntryType::Regular, data.len() as u64, 0o644),
            data,
        );
    }
    fn dir(b: &mut Builder<Vec<u8>>, path: &str) {
        add(b, hdr(path, EntryType::Directory, 0, 0o755), b"");
    }
    fn symlink(b: &mut Builder<Vec<u8>>, path: &str, target: &str) {
        add(
            b,
            with_link(hdr(path, EntryType::Symlink, 0, 0o777), target),
            b"",
        );
    }
    fn hardlink(b: &mut Builder<Vec<u8>>, path: &str, target: &str) {
        add(
            b,
            with_link(hdr(path, EntryType::Link, 0, 0o644), target),
            b"",
        );
    }

    fn unpack(b: Builder<Vec<u8>>, root: &Path) -> Result<UnpackStats, UnpackError> {
        let data = b.into_inner().unwrap();
        unpack_layer(data.as_slice(), root, &OPTS)
    }

    fn xattr_of(p: &Path, name: &str) -> Option<Vec<u8>> {
        xattr::get(p, name).unwrap()
    }

    #[test]
    fn normal_layer() {
        let (_t, root, outside) = setup();
        let mut b = Builder::new(Vec::new());
        let mut h = hdr("./", EntryType::Directory, 0, 0o751);
        h.set_mtime(900_000);
        add(&mut b, h, b"");
        let mut h = hdr("etc/", EntryType::Directory, 0, 0o755);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_000_000);
        add(&mut b, h, b"");
        b.append_pax_extensions([("SCHILY.xattr.user.foo", b"bar".as_slice())])
            .unwrap();
        let mut h = hdr("etc/hello", EntryType::Regular, 5, 0o640);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_500_000);
        add(&mut b, h, b"hello");
        let mut h = hdr("bin/su", EntryType::Regular, 3, 0o4755);
        h.set_uid(1000);
        h.set_gid(1000);
        add(&mut b, h, b"elf");
        add(&mut b, hdr("shared/", EntryType::Directory, 0, 0o2775), b"");
        add(&mut b, hdr("tmp/", EntryType::Directory, 0, 0o1777), b"");
        symlink(&mut b, "etc/link", "hello");
        hardlink(&mut b, "etc/hard", "etc/hello");
        add(&mut b, hdr("run/fifo", EntryType::Fifo, 0, 0o600), b"");
        let mut h = hdr("dev/null", EntryType::Char, 0, 0o666);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        add(&mut b, h, b"");
        let mut h = hdr("dev/loop0", EntryType::Block, 0, 0o660);
        h.set_device_major(7).unwrap();
        h.set_device_minor(0).unwrap();
        add(&mut b, h, b"");
        let data = b.into_inner().unwrap();

        let stats = unpack_layer(data.as_slice(), &root, &OPTS).unwrap();
        assert_eq!(stats.entries, 11);
        assert_eq!(stats.bytes, 8);

        let m = fs::symlink_metadata(&root).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o751);
        assert_eq!(m.mtime(), 900_000);
        let etc = root.join("etc");
        let m = fs::symlink_metadata(&etc).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mtime()), (1000, 1000, 1_000_000));
        let hello = etc.join("hello");
        assert_eq!(fs::read(&hello).unwrap(), b"hello");
        let m = fs::symlink_metadata(&hello).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!((m.uid(), m.gid(), m.mtime()), (1000, 1000, 1_500_000));
        assert_eq!(m.nlink(), 2);
        assert_eq!(xattr_of(&hello, "user.foo").as_deref(), Some(&b"bar"[..]));
        let hard = fs::symlink_metadata(etc.join("hard")).unwrap();
        assert_eq!(hard.ino(), m.ino());
        let su = fs::symlink_metadata(root.join("bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755);
        assert_eq!(su.uid(), 1000);
        let implicit = fs::symlink_metadata(root.join("bin")).unwrap();
        assert_eq!(implicit.mode() & 0o7777, 0o755);
        let mode = |p: &str| fs::symlink_metadata(root.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("shared"), 0o2775);
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(
            fs::read_link(etc.join("link")).unwrap(),
            PathBuf::from("hello")
        );
        let fifo = fs::symlink_metadata(root.join("run/fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o600);
        let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), makedev(1, 3));
        assert_eq!(null.mode() & 0o7777, 0o666);
        let lp = fs::symlink_metadata(root.join("dev/loop0")).unwrap();
        assert!(lp.file_type().is_block_device());
        assert_eq!(lp.rdev(), makedev(7, 0));

        // Without allow_devices the devices are skipped, the rest is there.
        let (_t2, root2, _) = setup();
        let opts = UnpackOptions {
            preserve_ownership: true,
            allow_devices: false,
            min_free: 0,
        };
        unpack_layer(data.as_slice(), &root2, &opts).unwrap();
        assert!(!root2.join("dev/null").exists());
        assert!(root2.join("run/fifo").symlink_metadata().is_ok());
        assert_empty(&outside);
    }

    #[test]
    fn parent_dir_escape_is_rejected() {
        for p in ["../outside/x", "a/../../outside/x", "./../outside/x"] {
            let (_t, root, outside) = setup();
            let mut b = Builder::new(Vec::new());
            file(&mut b, p, b"pwned");
            let err = unpack(b, &root).unwrap_err();
            assert!(matches!(err, UnpackError::UnsafePath { .. }), "{p}: {err}");
            assert!(err.to_string().contains(p), "{err}");
            assert_empty(&outside);
        }
    }

    #[test]
    fn absolute_path_is_stripped() {
        let (_t, root, outside) = setup();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "/etc/passwd", b"root::0:0::/:/bin/sh\n");
        file(&mut b, "//./etc/group", b"root:x:0:\n");
        unpack(b, &root).unwrap();
        assert_eq!(
            fs::read(root.join("etc/passwd")).unwrap(),
            b"root::0:0::/:/bin/sh\n"
        );
        assert!(root.join("etc/group").is_file());
        assert_empty(&outside);
    }

    #[test]
    fn symlink_escape_stays_in_root() {
        let (_t, root, outside) = setup();
        let abs = outside.to_str().unwrap().to_owned();
        let mut b = Builder::new(Vec::new());
        symlink(&mut b, "evil", "../outside");
        symlink(&mut b, "abs", &abs);
        symlink(&mut b, "up", "../../../../..");
        symlink(&mut b, "etc2", "/etc");
        file(&mut b, "evil/pwned", b"1");
        file(&mut b, "abs/pwned", b"2");
        file(&mut b, "up/tmp/pwned", b"3");
        file(&mut b, "etc2/pwned", b"4");
        let stats = unpack(b, &root).unwrap();
        assert_eq!(stats.entries, 8);
        // Links are kept verbatim.
        assert_eq!(
            fs::read_link(root.join("abs")).unwrap(),
            PathBuf::from(&abs)
        );
        // Targets resolved inside the root.
        assert_eq!(fs::read(root.join("outside/pwned")).unwrap(), b"1");
        let inner = root.join(abs.trim_start_matches('/')).join("pwned");
        assert_eq!(fs::read(inner).unwrap(), b"2");
        assert_eq!(fs::read(root.join("tmp/pwned")).unwrap(), b"3");
        assert_eq!(fs::read(root.join("etc/pwned")).unwrap(), b"4");
        assert!(!Path::new("/etc/pwned").exists());
        assert_empty(&outside);

        // A link to itself (in-root view) is a loop, not an escape.
        let (_t2, root2, _) = setup();
        let mut b = Builder::new(Vec::new());
        symlink(&mut b, "etc", "/etc");
        file(&mut b, "etc/pwned", b"5");
        let err = unpack(b, &root2).unwrap_err();
        assert!(matches!(err, UnpackError::Resolve { .. }), "{err}");
        assert!(!Path::new("/etc/pwned").exists());
        assert_empty(&outside);
    }

    #[test]
    fn hardlink_escape_is_impossible() {
        let (_t, root, outside) = setup();
        let secret = outside.join("secret");
        fs::write(&secret, b"secret").unwrap();

        let mut b = Builder::new(Vec::new());
        hardlink(&mut b, "h", "../outside/secret");
        let err = unpack(b, &root).unwrap_err();
        assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err}");

        let abs = outside.to_str().unwrap().to_owned();
        for (link, target) in [(abs.as_str(), "s/secret"), ("../outside", "s/secret")] {
            let (_t2, root2, _) = setup();
            let mut b = Builder::new(Vec::new());
            symlink(&mut b, "s", link);
            hardlink(&mut b, "h", target);
            let err = unpack(b, &root2).unwrap_err();
            assert!(matches!(err, UnpackError::Hardlink { .. }), "{err}");
            assert!(!root2.join("h").exists());
        }
        // An absolute target through an in-root symlink resolves in-root.
        let (_t3, root3, _) = setup();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "real/secret", b"inner");
        symlink(&mut b, "s", "/real");
        hardlink(&mut b, "h", "/s/secret");
        unpack(b, &root3).unwrap();
        assert_eq!(fs::read(root3.join("h")).unwrap(), b"inner");
        assert_eq!(fs::metadata(root3.join("real/secret")).unwrap().nlink(), 2);

        assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
        assert_eq!(fs::read(&secret).unwrap(), b"secret");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[test]
    fn whiteouts() {
        let (_t, root, outside) = setup();
        let mut b = Builder::new(Vec::new());
        file(&mut b, ".wh.gone", b"");
        file(&mut b, "x", b"replaced by a whiteout");
        file(&mut b, ".wh.x", b"");
        dir(&mut b, "dir/");
        file(&mut b, "dir/keep", b"k");
        file(&mut b, "dir/.wh..wh..opq", b"");
        file(&mut b, "dir/keep2", b"k2");
        file(&mut b, "implicit/.wh..wh..opq", b"");
        b.append_pax_extensions([
            ("SCHILY.xattr.trusted.overlay.opaque", b"y".as_slice()),
            ("SCHILY.xattr.user.overlay.opaque", b"y".as_slice()),
            ("SCHILY.xattr.user.ok", b"1".as_slice()),
        ])
        .unwrap();
        dir(&mut b, "fake/");
        unpack(b, &root).unwrap();

        for name in ["gone", "x"] {
            let m = fs::symlink_metadata(root.join(name)).unwrap();
            assert!(m.file_type().is_char_device(), "{name}");
            assert_eq!(m.rdev(), 0);
        }
        assert!(!root.join(".wh.gone").exists());
        assert!(!root.join(".wh.x").exists());
        assert!(!root.join("dir/.wh..wh..opq").exists());
        assert_eq!(fs::read(root.join("dir/keep")).unwrap(), b"k");
        assert_eq!(fs::read(root.join("dir/keep2")).unwrap(), b"k2");
        assert_eq!(
            xattr_of(&root.join("dir"), OPAQUE_XATTR).as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(
            xattr_of(&root.join("implicit"), OPAQUE_XATTR).as_deref(),
            Some(&b"y"[..])
        );
        let fake = root.join("fake");
        assert_eq!(xattr_of(&fake, OPAQUE_XATTR), None);
        assert_eq!(xattr_of(&fake, "user.overlay.opaque"), None);
        assert_eq!(xattr_of(&fake, "user.ok").as_deref(), Some(&b"1"[..]));
        assert_eq!(xattr_of(&root, OPAQUE_XATTR), None);
        assert_empty(&outside);
    }

    #[test]
    fn bad_whiteouts_are_errors() {
        let (_t, root, _) = setup();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "d/.wh.", b"");
        let err = unpack(b, &root).unwrap_err();
        assert!(matches!(err, UnpackError::BareWhiteout { .. }), "{err}");
        assert!(err.to_string().contains("d/.wh."), "{err}");
        for p in [".wh..wh.plnk", ".wh..wh.", ".wh..", ".wh..."] {
            let (_t, root, _) = setup();
            let mut b = Builder::new(Vec::new());
            file(&mut b, p, b"");
            let err = unpack(b, &root).unwrap_err();
            assert!(
                matches!(err, UnpackError::InvalidWhiteout { .. }),
                "{p}: {err}"
            );
        }
    }

    #[test]
    fn a_replaced_directory_is_resolved_again() {
        // open_dir keeps the last directory it resolved; after that directory is replaced
        // (by a symlink; by a whiteout and a new directory), later entries must go to what
        // the path names now
        let (_t, root, outside) = setup();
        let mut b = Builder::new(Vec::new());
        dir(&mut b, "d/");
        file(&mut b, "d/a", b"a");
        symlink(&mut b, "d", "e");
        file(&mut b, "d/x", b"through the link");
        dir(&mut b, "g/");
        file(&mut b, "g/a", b"a");
        whiteout_then_dir(&mut b, "g");
        file(&mut b, "g/b", b"b");
        unpack(b, &root).unwrap();

        assert!(
            fs::symlink_metadata(root.join("d"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(root.join("e/x")).unwrap(), b"through the link");
        assert!(!root.join("e/a").exists());
        assert_eq!(fs::read(root.join("g/b")).unwrap(), b"b");
        assert!(
            !root.join("g/a").exists(),
            "g was replaced: its old file is gone"
        );
        assert_empty(&outside);
    }

    /// `.wh.NAME` (a whiteout replaces NAME) followed by a fresh directory NAME.
    fn whiteout_then_dir(b: &mut Builder<Vec<u8>>, name: &str) {
        file(b, &format!(".wh.{name}"), b"");
        dir(b, &format!("{name}/"));
    }

    #[test]
    fn new_files_get_exact_modes_and_owners() {
        // files are created with their permission bits and chowned/chmodded only when that
        // left something to do: every combination must still end exact (under the usual
        // umask 022, 0o666 and 0o777 need the chmod; the process umask is not changed here,
        // as tests share it)
        let (_t, root, outside) = setup();
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let modes = [0o644, 0o666, 0o777, 0o4755, 0o2711, 0o1600, 0o000];
        let mut b = Builder::new(Vec::new());
        for (i, mode) in modes.iter().enumerate() {
            for (who, (uid, gid)) in [("mine", me), ("other", (1234, 5678))] {
                let mut h = hdr(&format!("{who}{i}"), EntryType::Regular, 1, *mode);
                h.set_uid(uid.into());
                h.set_gid(gid.into());
                add(&mut b, h, b"x");
            }
        }
        unpack(b, &root).unwrap();
        for (i, mode) in modes.iter().enumerate() {
            for (who, owner) in [("mine", me), ("other", (1234, 5678))] {
                let m = fs::symlink_metadata(root.join(format!("{who}{i}"))).unwrap();
                assert_eq!(m.mode() & 0o7777, *mode, "{who}{i}");
                assert_eq!((m.uid(), m.gid()), owner, "{who}{i}");
            }
        }
        assert_empty(&outside);
    }

    #[test]
    fn files_under_a_setgid_root_get_the_archives_group() {
        use std::os::unix::fs::PermissionsExt;
        let (_t, root, _outside) = setup();
        // a setgid root of another group: new files would inherit its group
        nix::unistd::chown(&root, None, Some(nix::unistd::Gid::from_raw(4321))).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o2755)).unwrap();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "f", b"x");
        unpack(b, &root).unwrap();
        let m = fs::symlink_metadata(root.join("f")).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0));
    }

    #[test]
    fn replacements_in_one_layer() {
        let (_t, root, outside) = setup();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "a", b"file first");
        dir(&mut b, "a/");
        file(&mut b, "a/b", b"b");
        let mut h = hdr("d/", EntryType::Directory, 0, 0o700);
        h.set_mtime(111);
        add(&mut b, h, b"");
        file(&mut b, "d/f", b"f");
        let mut h = hdr("d/", EntryType::Directory, 0, 0o750);
        h.set_mtime(222);
        add(&mut b, h, b"");
        dir(&mut b, "e/");
        file(&mut b, "e/child/deep", b"deep");
        file(&mut b, "e", b"dir replaced by file");
        symlink(&mut b, "s", "/etc");
        file(&mut b, "s", b"symlink replaced by file");
        file(&mut b, "f", b"old");
        file(&mut b, "f", b"new");
        unpack(b, &root).unwrap();

        assert!(root.join("a").is_dir());
        assert_eq!(fs::read(root.join("a/b")).unwrap(), b"b");
        let d = fs::symlink_metadata(root.join("d")).unwrap();
        assert_eq!((d.mode() & 0o7777, d.mtime()), (0o750, 222));
        assert_eq!(fs::read(root.join("d/f")).unwrap(), b"f");
        assert_eq!(fs::read(root.join("e")).unwrap(), b"dir replaced by file");
        let s = fs::symlink_metadata(root.join("s")).unwrap();
        assert!(s.file_type().is_file());
        assert_eq!(fs::read(root.join("f")).unwrap(), b"new");
        assert_empty(&outside);
    }

    #[test]
    fn old_gnu_sparse_entries_are_refused_before_anything_is_written() {
        let (_t, root, _) = setup();
        let mut b = Builder::new(Vec::new());
        // a 2 GiB file of one byte at its end, in 512 bytes of archive
        let mut h = Header::new_gnu();
        h.set_path("holes").unwrap();
        h.set_entry_type(EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(1);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset((2 << 30) - 1);
        gnu.sparse[0].set_length(1);
        gnu.set_real_size(2 << 30);
        h.set_cksum();
        b.append(&h, &[7u8][..]).unwrap();
        // refused as its header passes (TarGuard), before the tar crate expands it
        let err = unpack(b, &root).unwrap_err();
        assert!(format!("{err:?}").contains("GNU sparse"), "{err:?}");
        assert!(!root.join("holes").exists());
    }

    #[test]
    fn an_entry_that_would_eat_into_the_reserve_fails_before_it_is_written() {
        // a file system of its own, so that no one else's writes change its free space
        let t = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            t.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=8m"),
        )
        .unwrap();
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _u = Unmount(t.path());
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let free = {
            let v = nix::sys::statvfs::statvfs(&root).unwrap();
            v.blocks_available().saturating_mul(v.fragment_size())
        };
        let mut b = Builder::new(Vec::new());
        file(&mut b, "small", b"fits");
        file(&mut b, "big", &vec![1u8; 1 << 20]);
        let data = b.into_inner().unwrap();
        // a reserve that leaves room for the first entry, not the second
        let opts = UnpackOptions {
            min_free: free - (64 << 10),
            ..OPTS
        };
        let err = unpack_layer(data.as_slice(), &root, &opts).unwrap_err();
        assert!(
            matches!(&err, UnpackError::NoSpace { path, needed, .. }
                if path == Path::new("big") && *needed > 1 << 20),
            "{err}"
        );
        assert_eq!(fs::read(root.join("small")).unwrap(), b"fits");
        assert!(!root.join("big").exists(), "nothing of it written");
        // with a reserve it leaves, the same layer unpacks
        let root2 = t.path().join("root2");
        fs::create_dir(&root2).unwrap();
        let opts = UnpackOptions {
            min_free: 1 << 20,
            ..OPTS
        };
        unpack_layer(data.as_slice(), &root2, &opts).unwrap();
    }

    #[test]
    fn extension_bombs_long_paths_and_repeated_directories_are_bounded() {
        let (_t, root, _) = setup();
        // a GNU long name of 2 MiB: refused before the tar crate reads it whole
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::GNULongName);
        h.set_size(2 << 20);
        h.set_cksum();
        let mut bomb = h.as_bytes().to_vec();
        bomb.extend(std::iter::repeat_n(b'a', 2 << 20));
        let err = unpack_layer(bomb.as_slice(), &root, &OPTS).unwrap_err();
        assert!(
            format!("{err:?}").contains("GNU long name of 2097152 bytes"),
            "{err:?}"
        );
        // a path longer than PATH_MAX
        let mut b = Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "d/".repeat(2100) + "f", &b"x"[..])
            .unwrap();
        let err = unpack(b, &root).unwrap_err();
        assert!(err.to_string().contains("longer than 4096 bytes"), "{err}");
        assert!(err.to_string().len() < 2000, "the path is cut: {err}");
        // one directory named 20,000 times: one record, the last entry's mode
        let (_t, root, _) = setup();
        let mut b = Builder::new(Vec::new());
        for i in 0..20_000 {
            let mode = if i == 19_999 { 0o700 } else { 0o755 };
            add(&mut b, hdr("a/b/", EntryType::Directory, 0, mode), b"");
        }
        unpack(b, &root).unwrap();
        let m = fs::metadata(root.join("a/b")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
    }

    struct Counting<R> {
        inner: R,
        read: u64,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }

    #[test]
    fn trailing_garbage_is_drained() {
        let (_t, root, _) = setup();
        let mut b = Builder::new(Vec::new());
        file(&mut b, "f", b"data");
        let mut data = b.into_inner().unwrap();
        data.extend(std::iter::repeat_n(0xAB, 10_007));
        let mut r = Counting {
            inner: data.as_slice(),
            read: 0,
        };
        let stats = unpack_layer(&mut r, &root, &OPTS).unwrap();
        assert_eq!(stats.entries, 1);
        assert_eq!(r.read, data.len() as u64);
        assert_eq!(fs::read(root.join("f")).unwrap(), b"data");
    }

    #[test]
    fn unsupported_entries() {
        let (_t, root, _) = setup();
        let mut b = Builder::new(Vec::new());
        add(&mut b, hdr("vol", EntryType::new(b'V'), 0, 0o644), b"");
        let err = unpack(b, &root).unwrap_err();
        assert!(matches!(err, UnpackError::Unsupported { .. }), "{err}");

        let mut b = Builder::new(Vec::new());
        b.append_pax_extensions([("GNU.sparse.major", b"1".as_slice())])
            .unwrap();
        file(&mut b, "sparse", b"");
        let err = unpack(b, &root).unwrap_err();
        assert!(matches!(err, UnpackError::Unsupported { .. }), "{err}");

        let mut b = Builder::new(Vec::new());
        file(&mut b, "./", b"");
        dir(&mut b, "ok/");
        unpack(b, &root).unwrap();
        assert!(root.join("ok").is_dir());
    }

    #[test]
    fn root_cannot_be_replaced_by_a_file() {
        let (_t, root, _) = setup();
        let mut b = Builder::new(Vec::new());
        add(
            &mut b,
            with_link(hdr(".", EntryType::Symlink, 0, 0o777), "/"),
            b"",
        );
        let err = unpack(b, &root).unwrap_err();
        assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err}");
        assert!(root.is_dir());
    }

    #[test]
    fn pax_times_and_long_names() {
        let (_t, root, _) = setup();
        let mut b = Builder::new(Vec::new());
        b.append_pax_extensions([("mtime", b"1234567890.5".as_slice())])
            .unwrap();
        file(&mut b, "t", b"");
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(150));
        let mut h = Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, &long, &b"L"[..]).unwrap();
        unpack(b, &root).unwrap();
        let m = fs::symlink_metadata(root.join("t")).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_234_567_890, 500_000_000));
        assert_eq!(fs::read(root.join(&long)).unwrap(), b"L");
        assert_eq!(
            parse_pax_time(b"-1.25"),
            Some(TimeSpec::new(-2, 750_000_000))
        );
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
