//! Turning a directory into an OCI image layer: a gzip-compressed tar with whiteouts, and its
//! two digests.
//!
//! A build step runs in a container whose root is an overlayfs; afterwards its upper
//! directory holds exactly what the step changed, in overlayfs's on-disk form. A COPY/ADD step
//! hands over a staging tree instead (the same code path, just without whiteouts). Either way
//! [`write_layer`] writes the layer blob and reports the `digest` (of the compressed blob, for
//! the manifest) and the `diffID` (of the tar, for the image config), both hashed while the
//! bytes pass through, never by reading the output again.
//!
//! # Rules
//!
//! * **Order.** Depth first, each directory's names in byte order, a directory before its
//!   children: the same tree always gives the same bytes, so the same digests (the gzip header
//!   carries no time and no file name).
//! * **No escape.** The tree may have been written by a hostile process (root inside a build
//!   container). Directories are opened one component at a time relative to their parent's
//!   descriptor with `O_NOFOLLOW | O_DIRECTORY`, and the walk holds each one open: a directory
//!   swapped for a symlink afterwards changes nothing. Everything else is looked at with
//!   `fstatat(AT_SYMLINK_NOFOLLOW)`/`readlinkat` on the held parent. Regular files are opened
//!   only through [`crate::fsutil::open_regular`] (resolved beneath the tree through no symlink,
//!   and refused unless a regular file: a name swapped for a FIFO or device never blocks or
//!   arms anything); their header comes from the opened file's `fstat`, and exactly that many
//!   bytes are copied (a file that shrinks meanwhile is an error, one that grows is cut).
//!   Xattrs are read through the open descriptor, or (symlinks, devices, FIFOs) through
//!   `/proc/self/fd/<parent>/<name>` with the no-follow calls: no path is resolved twice.
//! * **Whiteouts.** A 0/0 character device `D/N` (overlayfs's whiteout) becomes an empty
//!   regular file `D/.wh.N` (mode 0, owner 0:0). It is recognised before hard links are looked
//!   for: overlayfs may make all whiteouts links to one shared inode.
//! * **Opaque directories.** A directory with `trusted.overlay.opaque` (or
//!   `user.overlay.opaque`) = `y` is written, then an empty regular file `D/.wh..wh..opq`,
//!   then its children.
//! * **Overlay features the layer cannot express** are refused rather than silently written
//!   wrong: `*.overlay.metacopy` (the data stays in a lower layer) and `*.overlay.redirect` (a
//!   renamed lower directory whose upper copy holds only the changes). Mount build overlays
//!   with `metacopy=off,redirect_dir=off`.
//! * **Names starting with `.wh.`** are refused: every reader would take them for whiteouts.
//! * **Xattrs** go into PAX `SCHILY.xattr.<name>` records, sorted by name, except
//!   `trusted.overlay.*` and `user.overlay.*` (overlayfs's own state) and `security.selinux`
//!   (the build host's label, e.g. a container's MCS categories, not the image's).
//! * **Entry types.** Regular files with their contents, directories (`name/`), symlinks,
//!   hard links (a later path to a (dev, inode) already written links to the first path),
//!   FIFOs, character and block devices with their numbers. Sockets are skipped. Mode
//!   (permission bits with setuid/setgid/sticky), uid, gid and mtime are kept, or replaced
//!   by [`LayerOptions`].
//! * **Format.** POSIX ustar headers, with PAX records for what they cannot hold: names or
//!   link targets over 100 bytes (`path`, `linkpath`, plus `hdrcharset=BINARY` when such a
//!   value is not UTF-8), ids, sizes and times out of the octal fields' range, and xattrs.
//!   Names are bytes throughout; nothing needs to be UTF-8.
//! * **Bounds.** A path or symlink target over 4096 bytes, more than a million entries,
//!   directories nested deeper than 512, PAX records over
//!   [`crate::store::targuard::MAX_EXTENSION`] (what berth's own import accepts) are refused.
//!
//! The output is created exclusively (mode 0600), fsync'd before returning, and removed
//! again on any error.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, fstat, fstatat};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};
use xattr::FileExt;

/// The longest entry path accepted (the kernel's PATH_MAX). Deeper trees can exist on disk
/// (paths are only limited per system call), but no process could use such a path, and it
/// bounds what each entry costs.
const MAX_PATH: usize = 4096;
/// The longest symlink target accepted (what the kernel itself allows).
const MAX_TARGET: usize = 4096;
/// Names in the tree (and entries in the layer) beyond which the layer is refused: a step
/// that made more is broken or hostile, and each one costs memory while its directory is
/// listed.
const MAX_ENTRIES: u64 = 1_000_000;
/// Directories nested deeper than this are refused: the walk holds one descriptor per level.
const MAX_DEPTH: usize = 512;
/// The ustar `name` and `linkname` fields.
const NAME_FIELD: usize = 100;
/// The largest value of an 8-byte octal field (uid, gid, device numbers).
const OCTAL8_MAX: u64 = 0o7_777_777;
/// The largest value of a 12-byte octal field (size, mtime).
const OCTAL12_MAX: u64 = 0o77_777_777_777;
/// What marks a whiteout in a layer.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The entry that makes its directory opaque in a layer.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Xattr namespaces that hold overlayfs's own state: never copied into a layer.
const OVERLAY_XATTR_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];
/// The host's SELinux label of a file: not part of the image.
const SELINUX_XATTR: &[u8] = b"security.selinux";
/// PAX keyword prefix of an xattr record.
const XATTR_PAX_PREFIX: &[u8] = b"SCHILY.xattr.";
/// Buffer between the compressor and the output file.
const OUT_BUF: usize = 64 << 10;

/// The layer written by [`write_layer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerOut {
    /// "sha256:<hex>" of the compressed blob (the layer's digest in the manifest).
    pub digest: String,
    /// "sha256:<hex>" of the uncompressed tar (the diffID in the image config).
    pub diff_id: String,
    /// Compressed size in bytes.
    pub size: u64,
    /// Entries written (0: the step changed nothing).
    pub entries: u64,
}

/// Why a layer could not be written. Paths are in the tree (`dir` joined with the entry), or
/// the output file for errors writing it. On any error the output file is removed.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// An IO operation failed.
    #[error("{op} {}: {source}", shown(.path))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The tree holds something a layer must not carry, or exceeds a bound.
    #[error("cannot put {} in a layer: {why}", shown(.path))]
    Refused { path: PathBuf, why: String },
}

/// How entries' metadata is recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerOptions {
    /// Set every entry's mtime to this (reproducible builds, SOURCE_DATE_EPOCH); None keeps the files' own mtimes.
    pub mtime: Option<u64>,
    /// Override owner of every entry (COPY --chown resolved to numbers), None keeps the files' own.
    pub owner: Option<(u32, u32)>,
}

/// Write `dir`'s tree as a layer to `out` (created exclusively, mode 0600; fsync'd before returning). Entry paths are relative to `dir`, without a leading "./" or "/" (like "etc/passwd", directories as "etc/").
///
/// `dir` itself is not an entry (an empty `dir` gives an empty layer, `entries == 0`); the
/// path to it is trusted, everything under it is not. See the module documentation for the
/// rules.
pub fn write_layer(dir: &Path, out: &Path, opts: &LayerOptions) -> Result<LayerOut, LayerError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(out_error(out, "create"))?;
    let result = Writer::new(dir, out, opts, file).and_then(Writer::run);
    if result.is_err() {
        // `create_new` guarantees the file is this call's own: a partial layer must not be
        // mistaken for a whole one later.
        let _ = std::fs::remove_file(out);
    }
    result
}

/// An entry path (or xattr name) in a message: quoted, escaped, cut.
fn shown(p: impl AsRef<OsStr>) -> String {
    format!(
        "\"{}\"",
        crate::text::printable_bytes(p.as_ref().as_bytes(), 300)
    )
}

fn out_error<'a>(out: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError::Io {
        op,
        path: out.to_path_buf(),
        source,
    }
}

/// A writer that hashes and counts what passes through it: the digests come from the bytes
/// as they are written.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Exactly `left` bytes of a file, the size its header announced: a tar entry whose data is
/// shorter or longer than its header says corrupts the rest of the archive. `failed` tells a
/// read error from a write error after the copy fails.
struct Exact {
    inner: File,
    left: u64,
    failed: bool,
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = usize::try_from(self.left).map_or(buf.len(), |l| l.min(buf.len()));
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(n) => n,
            // `io::copy` retries these.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                self.failed = true;
                return Err(e);
            }
        };
        if n == 0 {
            self.failed = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being read",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Where an entry's xattrs are read from.
enum XattrSource<'a> {
    /// An open regular file or directory.
    File(&'a File),
    /// `/proc/self/fd/<parent>/<name>`, read with the no-follow calls (symlinks, devices,
    /// FIFOs, which are never opened).
    Path(PathBuf),
}

#[derive(Default)]
struct Xattrs {
    /// (name, value) to record, sorted by name.
    copied: Vec<(Vec<u8>, Vec<u8>)>,
    /// `*.overlay.opaque` = "y".
    opaque: bool,
}

/// Metadata recorded in a header.
#[derive(Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
}

/// One archive entry to write.
struct Item<'a> {
    kind: EntryType,
    /// The name in the archive (a directory's ends in `/`).
    name: &'a [u8],
    link: Option<&'a [u8]>,
    meta: Meta,
    size: u64,
    dev: (u32, u32),
    xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

impl<'a> Item<'a> {
    /// An entry without data, device numbers or xattrs.
    fn bare(kind: EntryType, name: &'a [u8], link: Option<&'a [u8]>, meta: Meta) -> Self {
        Item {
            kind,
            name,
            link,
            meta,
            size: 0,
            dev: (0, 0),
            xattrs: &[],
        }
    }
}

/// A directory being walked: held open, with the names still to visit.
struct Frame {
    dir: File,
    /// Its path relative to the tree ("" for the root), without a trailing slash.
    rel: Vec<u8>,
    names: std::vec::IntoIter<Vec<u8>>,
}

type Sink = Hashing<GzEncoder<Hashing<BufWriter<File>>>>;

struct Writer<'a> {
    dir: &'a Path,
    out: &'a Path,
    opts: &'a LayerOptions,
    tar: tar::Builder<Sink>,
    /// (dev, inode) of the output: found in the tree, it would be read while written.
    out_id: (u64, u64),
    /// First archive path of each (dev, inode) with more than one link.
    links: HashMap<(u64, u64), Vec<u8>>,
    entries: u64,
    /// Names listed so far.
    seen: u64,
}

impl<'a> Writer<'a> {
    fn new(
        dir: &'a Path,
        out: &'a Path,
        opts: &'a LayerOptions,
        file: File,
    ) -> Result<Self, LayerError> {
        let meta = file.metadata().map_err(out_error(out, "stat"))?;
        let blob = Hashing::new(BufWriter::with_capacity(OUT_BUF, file));
        // mtime 0 and no file name: the gzip header says nothing about when or where.
        let gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(blob, flate2::Compression::default());
        Ok(Writer {
            dir,
            out,
            opts,
            tar: tar::Builder::new(Hashing::new(gz)),
            out_id: (meta.dev(), meta.ino()),
            links: HashMap::new(),
            entries: 0,
            seen: 0,
        })
    }

    fn run(mut self) -> Result<LayerOut, LayerError> {
        let root = nix::fcntl::open(
            self.dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io("open directory", b"", e.into()))?;
        let root = File::from(root);
        let names = self.list(&root, b"")?;
        let mut stack = vec![Frame {
            dir: root,
            rel: Vec::new(),
            names: names.into_iter(),
        }];
        loop {
            // The depth of the entries of the directory on top (the root's are at 1).
            let depth = stack.len();
            let next = match stack.last_mut() {
                None => break,
                Some(top) => top.names.next(),
            };
            let Some(name) = next else {
                stack.pop();
                continue;
            };
            let Some(top) = stack.last() else { break };
            let child = self.entry(&top.dir, &top.rel, name, depth)?;
            if let Some(frame) = child {
                stack.push(frame);
            }
        }
        self.finish()
    }

    fn finish(self) -> Result<LayerOut, LayerError> {
        let out = self.out;
        let entries = self.entries;
        let Hashing {
            inner: gz,
            hash: tar_hash,
            count: _,
        } = self.tar.into_inner().map_err(out_error(out, "write"))?;
        let Hashing {
            inner: buf,
            hash: blob_hash,
            count: size,
        } = gz.finish().map_err(out_error(out, "write"))?;
        let file = buf
            .into_inner()
            .map_err(|e| out_error(out, "write")(e.into_error()))?;
        file.sync_all().map_err(out_error(out, "fsync"))?;
        Ok(LayerOut {
            digest: format!("sha256:{}", hex::encode(blob_hash.finalize())),
            diff_id: format!("sha256:{}", hex::encode(tar_hash.finalize())),
            size,
            entries,
        })
    }

    fn path_of(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.dir.to_path_buf()
        } else {
            self.dir.join(OsStr::from_bytes(rel))
        }
    }

    fn io(&self, op: &'static str, rel: &[u8], source: io::Error) -> LayerError {
        LayerError::Io {
            op,
            path: self.path_of(rel),
            source,
        }
    }

    fn refused(&self, rel: &[u8], why: impl Into<String>) -> LayerError {
        LayerError::Refused {
            path: self.path_of(rel),
            why: why.into(),
        }
    }

    fn write_error(&self, source: io::Error) -> LayerError {
        out_error(self.out, "write")(source)
    }

    /// The names in a directory, byte-sorted (`.` and `..` left out).
    fn list(&mut self, dir: &File, rel: &[u8]) -> Result<Vec<Vec<u8>>, LayerError> {
        // A second descriptor for the listing; `dir` stays the handle for the `*at` calls.
        let mut d = Dir::openat(
            dir,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io("open directory", rel, e.into()))?;
        let mut names = Vec::new();
        for ent in d.iter() {
            let ent = ent.map_err(|e| self.io("read directory", rel, e.into()))?;
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            self.seen += 1;
            if self.seen > MAX_ENTRIES {
                return Err(self.refused(
                    rel,
                    format!("the tree holds more than {MAX_ENTRIES} entries"),
                ));
            }
            names.push(name.to_vec());
        }
        names.sort_unstable();
        Ok(names)
    }

    /// Write the entry `name` of the directory `parent` (at `parent_rel`); a directory is
    /// written and returned, to be walked next.
    fn entry(
        &mut self,
        parent: &File,
        parent_rel: &[u8],
        name: Vec<u8>,
        depth: usize,
    ) -> Result<Option<Frame>, LayerError> {
        let mut rel = Vec::with_capacity(parent_rel.len() + 1 + name.len());
        if !parent_rel.is_empty() {
            rel.extend_from_slice(parent_rel);
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        if rel.len() > MAX_PATH {
            return Err(self.refused(&rel, format!("its path is longer than {MAX_PATH} bytes")));
        }
        if name.starts_with(WHITEOUT_PREFIX) {
            return Err(self.refused(
                &rel,
                "a name starting with `.wh.` would be read as a whiteout",
            ));
        }
        let st = fstatat(parent, &name[..], AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| self.io("stat", &rel, e.into()))?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => return self.directory(parent, rel, &name, depth).map(Some),
            libc::S_IFREG => self.regular(&rel)?,
            libc::S_IFLNK => self.symlink(parent, &rel, &name, &st)?,
            // overlayfs's whiteout
            libc::S_IFCHR if st.st_rdev == 0 => self.whiteout(parent_rel, &name, &st)?,
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO => {
                self.special(parent, &rel, &name, &st)?
            }
            libc::S_IFSOCK => {
                tracing::debug!(path = %shown(self.path_of(&rel)), "socket left out of the layer");
            }
            _ => return Err(self.refused(&rel, "unknown file type")),
        }
        Ok(None)
    }

    fn directory(
        &mut self,
        parent: &File,
        rel: Vec<u8>,
        name: &[u8],
        depth: usize,
    ) -> Result<Frame, LayerError> {
        if depth > MAX_DEPTH {
            return Err(self.refused(
                &rel,
                format!("directories nest deeper than {MAX_DEPTH} levels"),
            ));
        }
        let fd = openat(
            parent,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io("open directory", &rel, e.into()))?;
        let dir = File::from(fd);
        let st = fstat(&dir).map_err(|e| self.io("stat", &rel, e.into()))?;
        let xattrs = self.xattrs(&XattrSource::File(&dir), &rel)?;
        let mut tar_name = rel.clone();
        tar_name.push(b'/');
        let item = Item {
            xattrs: &xattrs.copied,
            ..Item::bare(EntryType::Directory, &tar_name, None, self.meta(&st))
        };
        self.emit(&item, None)?;
        if xattrs.opaque {
            let mut marker = tar_name.clone();
            marker.extend_from_slice(OPAQUE_MARKER);
            let meta = self.marker_meta(&st);
            self.emit(&Item::bare(EntryType::Regular, &marker, None, meta), None)?;
        }
        let names = self.list(&dir, &rel)?;
        Ok(Frame {
            dir,
            rel,
            names: names.into_iter(),
        })
    }

    fn regular(&mut self, rel: &[u8]) -> Result<(), LayerError> {
        let file = crate::fsutil::open_regular(Path::new(OsStr::from_bytes(rel)), Some(self.dir))
            .map_err(|e| self.io("open", rel, e))?;
        // The opened file's own metadata: whatever the name pointed at when it was stat'ed,
        // the header describes the bytes that follow it.
        let st = fstat(&file).map_err(|e| self.io("stat", rel, e.into()))?;
        if (st.st_dev, st.st_ino) == self.out_id {
            return Err(self.refused(rel, "it is the layer being written"));
        }
        let meta = self.meta(&st);
        if let Some(done) = self.hard_link(&st, rel, meta) {
            return done;
        }
        let xattrs = self.xattrs(&XattrSource::File(&file), rel)?;
        let size = u64::try_from(st.st_size).map_err(|_| self.refused(rel, "negative size"))?;
        let item = Item {
            size,
            xattrs: &xattrs.copied,
            ..Item::bare(EntryType::Regular, rel, None, meta)
        };
        self.emit(&item, Some((file, rel)))
    }

    fn symlink(
        &mut self,
        parent: &File,
        rel: &[u8],
        name: &[u8],
        st: &FileStat,
    ) -> Result<(), LayerError> {
        let meta = self.meta(st);
        if let Some(done) = self.hard_link(st, rel, meta) {
            return done;
        }
        let target = readlinkat(parent, name)
            .map_err(|e| self.io("read link", rel, e.into()))?
            .into_vec();
        if target.len() > MAX_TARGET {
            return Err(self.refused(
                rel,
                format!("its symlink target is longer than {MAX_TARGET} bytes"),
            ));
        }
        let xattrs = self.xattrs(&XattrSource::Path(proc_path(parent, name)), rel)?;
        let item = Item {
            xattrs: &xattrs.copied,
            ..Item::bare(EntryType::Symlink, rel, Some(target.as_slice()), meta)
        };
        self.emit(&item, None)
    }

    /// FIFOs and devices other than whiteouts: never opened.
    fn special(
        &mut self,
        parent: &File,
        rel: &[u8],
        name: &[u8],
        st: &FileStat,
    ) -> Result<(), LayerError> {
        let meta = self.meta(st);
        if let Some(done) = self.hard_link(st, rel, meta) {
            return done;
        }
        let (kind, dev) = match st.st_mode & libc::S_IFMT {
            libc::S_IFCHR => (EntryType::Char, self.dev_numbers(st.st_rdev, rel)?),
            libc::S_IFBLK => (EntryType::Block, self.dev_numbers(st.st_rdev, rel)?),
            _ => (EntryType::Fifo, (0, 0)),
        };
        let xattrs = self.xattrs(&XattrSource::Path(proc_path(parent, name)), rel)?;
        let item = Item {
            dev,
            xattrs: &xattrs.copied,
            ..Item::bare(kind, rel, None, meta)
        };
        self.emit(&item, None)
    }

    /// A 0/0 character device: `.wh.<name>` in the same directory. Only the name matters to
    /// readers, so nothing of the device but its time is recorded.
    fn whiteout(
        &mut self,
        parent_rel: &[u8],
        name: &[u8],
        st: &FileStat,
    ) -> Result<(), LayerError> {
        let mut wh = Vec::with_capacity(parent_rel.len() + 1 + WHITEOUT_PREFIX.len() + name.len());
        if !parent_rel.is_empty() {
            wh.extend_from_slice(parent_rel);
            wh.push(b'/');
        }
        wh.extend_from_slice(WHITEOUT_PREFIX);
        wh.extend_from_slice(name);
        let meta = self.marker_meta(st);
        self.emit(&Item::bare(EntryType::Regular, &wh, None, meta), None)
    }

    fn dev_numbers(&self, rdev: u64, rel: &[u8]) -> Result<(u32, u32), LayerError> {
        let major = nix::sys::stat::major(rdev);
        let minor = nix::sys::stat::minor(rdev);
        if major > OCTAL8_MAX || minor > OCTAL8_MAX {
            return Err(self.refused(
                rel,
                format!("device number {major}:{minor} does not fit a tar header"),
            ));
        }
        // Both fit (checked above).
        Ok((
            u32::try_from(major).unwrap_or(0),
            u32::try_from(minor).unwrap_or(0),
        ))
    }

    fn meta(&self, st: &FileStat) -> Meta {
        let (uid, gid) = self.opts.owner.unwrap_or((st.st_uid, st.st_gid));
        Meta {
            mode: st.st_mode & 0o7777,
            uid: u64::from(uid),
            gid: u64::from(gid),
            mtime: self.mtime(st.st_mtime),
        }
    }

    /// Whiteouts and opaque markers: mode 0, owned by 0:0 whatever the options (they are
    /// names, never files), with the time of what they stand for.
    fn marker_meta(&self, st: &FileStat) -> Meta {
        Meta {
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: self.mtime(st.st_mtime),
        }
    }

    fn mtime(&self, own: i64) -> i64 {
        self.opts
            .mtime
            .map_or(own, |t| i64::try_from(t).unwrap_or(i64::MAX))
    }

    /// A second path of an inode already written: its entry, a hard link to the first
    /// (`Some` with the result of writing it); otherwise `None`.
    fn hard_link(
        &mut self,
        st: &FileStat,
        rel: &[u8],
        meta: Meta,
    ) -> Option<Result<(), LayerError>> {
        let first = self.first_link(st, rel)?;
        Some(self.emit(
            &Item::bare(EntryType::Link, rel, Some(first.as_slice()), meta),
            None,
        ))
    }

    /// The path this inode was first written at, if it was; otherwise remember `rel` for the
    /// inode's other links.
    fn first_link(&mut self, st: &FileStat, rel: &[u8]) -> Option<Vec<u8>> {
        if st.st_nlink < 2 {
            return None;
        }
        match self.links.entry((st.st_dev, st.st_ino)) {
            MapEntry::Occupied(e) => Some(e.get().clone()),
            MapEntry::Vacant(e) => {
                e.insert(rel.to_vec());
                None
            }
        }
    }

    fn xattrs(&self, src: &XattrSource<'_>, rel: &[u8]) -> Result<Xattrs, LayerError> {
        let listed = match src {
            XattrSource::File(f) => f.list_xattr(),
            XattrSource::Path(p) => xattr::list(p),
        };
        let names = match listed {
            Ok(names) => names,
            Err(e) if unsupported(&e) => return Ok(Xattrs::default()),
            Err(e) => return Err(self.io("list xattrs of", rel, e)),
        };
        let mut out = Xattrs::default();
        for name in names {
            let b = name.as_bytes();
            if let Some(what) = OVERLAY_XATTR_PREFIXES
                .iter()
                .find_map(|p| b.strip_prefix(*p))
            {
                match what {
                    b"opaque" => {
                        let v = self.xattr_value(src, &name, rel)?;
                        out.opaque |= v.as_deref() == Some(b"y".as_slice());
                    }
                    b"metacopy" => {
                        return Err(self.refused(
                            rel,
                            "its data is in a lower layer (overlayfs metacopy); \
                             mount the build overlay with metacopy=off",
                        ));
                    }
                    b"redirect" => {
                        return Err(self.refused(
                            rel,
                            "it was renamed from a lower layer (overlayfs redirect_dir); \
                             mount the build overlay with redirect_dir=off",
                        ));
                    }
                    _ => {}
                }
                continue;
            }
            if b == SELINUX_XATTR {
                continue;
            }
            // A PAX keyword ends at the first `=`, and the tar crate splits records at
            // newlines: such a name would come back as another one.
            if b.contains(&b'=') || b.contains(&b'\n') {
                return Err(self.refused(
                    rel,
                    format!("its xattr {} cannot be named in a PAX record", shown(&name)),
                ));
            }
            if let Some(v) = self.xattr_value(src, &name, rel)? {
                out.copied.push((b.to_vec(), v));
            }
        }
        out.copied.sort();
        Ok(out)
    }

    /// An xattr's value; None when it went away since it was listed.
    fn xattr_value(
        &self,
        src: &XattrSource<'_>,
        name: &OsStr,
        rel: &[u8],
    ) -> Result<Option<Vec<u8>>, LayerError> {
        let got = match src {
            XattrSource::File(f) => f.get_xattr(name),
            XattrSource::Path(p) => xattr::get(p, name),
        };
        match got {
            Ok(v) => Ok(v),
            Err(e) if unsupported(&e) => Ok(None),
            Err(e) => Err(self.io("read xattrs of", rel, e)),
        }
    }

    /// Append one entry (its PAX header first when it needs one), with `data` (the file and
    /// its path, for errors) for a regular file.
    fn emit(&mut self, item: &Item<'_>, data: Option<(File, &[u8])>) -> Result<(), LayerError> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(self.refused(
                item.name,
                format!("the layer would hold more than {MAX_ENTRIES} entries"),
            ));
        }
        let (header, pax) = self.header(item)?;
        if !pax.is_empty() {
            let mut ph = Header::new_ustar();
            ph.set_entry_type(EntryType::XHeader);
            ph.set_mode(0);
            ph.set_uid(0);
            ph.set_gid(0);
            ph.set_size(pax.len() as u64);
            ph.set_device_major(0).map_err(|e| self.write_error(e))?;
            ph.set_device_minor(0).map_err(|e| self.write_error(e))?;
            ph.set_cksum();
            self.tar
                .append(&ph, pax.as_slice())
                .map_err(|e| self.write_error(e))?;
        }
        match data {
            None => self
                .tar
                .append(&header, io::empty())
                .map_err(|e| self.write_error(e)),
            Some((file, src)) => {
                let mut reader = Exact {
                    inner: file,
                    left: item.size,
                    failed: false,
                };
                match self.tar.append(&header, &mut reader) {
                    Ok(()) => Ok(()),
                    Err(e) if reader.failed => Err(self.io("read", src, e)),
                    Err(e) => Err(self.write_error(e)),
                }
            }
        }
    }

    /// The ustar header of `item` and the PAX records it needs (empty if none).
    fn header(&self, item: &Item<'_>) -> Result<(Header, Vec<u8>), LayerError> {
        // A reader that splits PAX records at newlines (the tar crate, so berth's own unpack)
        // fails on an xattr value holding one, or worse, reads the value's tail as records of
        // its own, a `path` among them. Spelling out the real path and link target first
        // makes such a reader, which takes the first `path`, still see the right ones.
        let newline_value = item.xattrs.iter().any(|(_, v)| v.contains(&b'\n'));
        let name_pax = item.name.len() > NAME_FIELD || newline_value;
        let link_pax = item.link.filter(|l| l.len() > NAME_FIELD || newline_value);
        if (name_pax && item.name.contains(&b'\n')) || link_pax.is_some_and(|l| l.contains(&b'\n'))
        {
            return Err(self.refused(
                item.name,
                "a newline in a name or link target that needs a PAX record: readers that \
                 split PAX records at newlines (the tar crate among them) would read others",
            ));
        }
        let mut pax = Vec::new();
        let binary = (name_pax && std::str::from_utf8(item.name).is_err())
            || link_pax.is_some_and(|l| std::str::from_utf8(l).is_err());
        if binary {
            // POSIX: the path and linkpath values are not UTF-8. First, so a reader knows
            // before it meets them.
            pax_record(&mut pax, b"hdrcharset", b"BINARY");
        }
        if name_pax {
            pax_record(&mut pax, b"path", item.name);
        }
        if let Some(link) = link_pax {
            pax_record(&mut pax, b"linkpath", link);
        }

        let mut h = Header::new_ustar();
        // Names are bytes: copied as they are (cut to the field when a PAX record has them
        // whole), never through `set_path`, which wants UTF-8-ish paths and normalises them.
        put(&mut h.as_old_mut().name, item.name);
        if let Some(link) = item.link {
            put(&mut h.as_old_mut().linkname, link);
        }
        h.set_entry_type(item.kind);
        h.set_mode(item.meta.mode & 0o7777);
        // The numeric setters fall back to GNU base-256 for values the octal fields cannot
        // hold; the PAX records say the same for readers that know only POSIX.
        h.set_uid(item.meta.uid);
        h.set_gid(item.meta.gid);
        h.set_size(item.size);
        if item.size > OCTAL12_MAX {
            pax_record(&mut pax, b"size", item.size.to_string().as_bytes());
        }
        if item.meta.uid > OCTAL8_MAX {
            pax_record(&mut pax, b"uid", item.meta.uid.to_string().as_bytes());
        }
        if item.meta.gid > OCTAL8_MAX {
            pax_record(&mut pax, b"gid", item.meta.gid.to_string().as_bytes());
        }
        match u64::try_from(item.meta.mtime) {
            Ok(t) => {
                h.set_mtime(t);
                if t > OCTAL12_MAX {
                    pax_record(&mut pax, b"mtime", t.to_string().as_bytes());
                }
            }
            Err(_) => {
                // Before 1970: only PAX can say it.
                h.set_mtime(0);
                pax_record(&mut pax, b"mtime", item.meta.mtime.to_string().as_bytes());
            }
        }
        h.set_device_major(item.dev.0)
            .map_err(|e| self.write_error(e))?;
        h.set_device_minor(item.dev.1)
            .map_err(|e| self.write_error(e))?;
        h.set_cksum();

        // Last: a reader that splits at newlines stops honouring records at the first value
        // holding one, and these are the only records whose values may.
        for (name, value) in item.xattrs {
            let mut key = Vec::with_capacity(XATTR_PAX_PREFIX.len() + name.len());
            key.extend_from_slice(XATTR_PAX_PREFIX);
            key.extend_from_slice(name);
            pax_record(&mut pax, &key, value);
        }
        if (pax.len() as u64) > crate::store::targuard::MAX_EXTENSION {
            return Err(self.refused(
                item.name,
                format!(
                    "its PAX records (long names, xattrs) take {} bytes, more than the {} \
                     a layer import accepts",
                    pax.len(),
                    crate::store::targuard::MAX_EXTENSION
                ),
            ));
        }
        Ok((h, pax))
    }
}

/// EOPNOTSUPP: the file system (or this file type) keeps no xattrs.
fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// `/proc/self/fd/<parent>/<name>`: the held directory itself (the magic link is followed),
/// then one component that the no-follow xattr calls do not follow. No path under the tree
/// is resolved again, so nothing swapped in meanwhile can lead outside it.
fn proc_path(parent: &File, name: &[u8]) -> PathBuf {
    let mut p = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    PathBuf::from(OsString::from_vec(p))
}

/// Copy `value` into a zero-filled header field, cut to its size.
fn put(field: &mut [u8], value: &[u8]) {
    let n = field.len().min(value.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// Append the PAX record `"<len> <key>=<value>\n"`, where `<len>` counts the whole record,
/// its own digits included. Keys and values are bytes.
fn pax_record(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    loop {
        let total = rest + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    buf.extend_from_slice(len.to_string().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(key);
    buf.push(b'=');
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt, symlink};

    use nix::sys::stat::{SFlag, makedev, mkdirat, mknod};

    /// One entry read back.
    #[derive(Debug)]
    struct Ent {
        kind: EntryType,
        path: Vec<u8>,
        link: Option<Vec<u8>>,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
        dev: (u32, u32),
        pax: Vec<(Vec<u8>, Vec<u8>)>,
        data: Vec<u8>,
    }

    impl Ent {
        fn pax(&self, key: &[u8]) -> Option<&[u8]> {
            self.pax
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_slice())
        }
    }

    fn read_back(path: &Path) -> Vec<Ent> {
        let f = File::open(path).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
        let mut v = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let pax = match e.pax_extensions().unwrap() {
                Some(exts) => exts
                    .map(|x| {
                        let x = x.unwrap();
                        (x.key_bytes().to_vec(), x.value_bytes().to_vec())
                    })
                    .collect(),
                None => Vec::new(),
            };
            let h = e.header();
            let kind = h.entry_type();
            let mode = h.mode().unwrap();
            let uid = h.uid().unwrap();
            let gid = h.gid().unwrap();
            let mtime = h.mtime().unwrap();
            let dev = (
                h.device_major().unwrap().unwrap_or(0),
                h.device_minor().unwrap().unwrap_or(0),
            );
            let path = e.path_bytes().into_owned();
            let link = e.link_name_bytes().map(|l| l.into_owned());
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            v.push(Ent {
                kind,
                path,
                link,
                mode,
                uid,
                gid,
                mtime,
                dev,
                pax,
                data,
            });
        }
        v
    }

    fn find<'e>(ents: &'e [Ent], path: &[u8]) -> &'e Ent {
        ents.iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no entry {}", String::from_utf8_lossy(path)))
    }

    fn sha(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    /// The digests are those of the file and of its decompressed bytes.
    fn check_digests(out: &Path, r: &LayerOut) {
        let blob = fs::read(out).unwrap();
        assert_eq!(r.digest, sha(&blob));
        assert_eq!(r.size, blob.len() as u64);
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(blob.as_slice())
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(r.diff_id, sha(&raw));
    }

    fn file(p: &Path, data: &[u8], mode: u32) {
        fs::write(p, data).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    const NON_UTF8: &[u8] = b"bad\xffname";

    fn long_name() -> Vec<u8> {
        let mut n = b"long/".to_vec();
        n.extend(std::iter::repeat_n(b'x', 150));
        n
    }

    /// The full tree of an overlay upper dir. Err: why this host cannot make it.
    fn upper_tree(root: &Path) -> Result<bool, String> {
        file(&root.join("file.txt"), b"hello\n", 0o644);
        fs::create_dir(root.join("bin")).unwrap();
        file(&root.join("bin/tool"), b"#!/bin/sh\n", 0o4755);
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        file(&root.join("a/b/c/deep.txt"), b"deep", 0o600);
        symlink("file.txt", root.join("link")).unwrap();
        symlink("/etc", root.join("etc-link")).unwrap();
        file(&root.join("hard1"), b"same inode", 0o644);
        fs::hard_link(root.join("hard1"), root.join("hard2")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        fs::set_permissions(root.join("fifo"), fs::Permissions::from_mode(0o640)).unwrap();
        mknod(&root.join("gone"), SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(|e| format!("mknod 0/0: {e}"))?;
        mknod(
            &root.join("null"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .map_err(|e| format!("mknod 1/3: {e}"))?;
        fs::set_permissions(root.join("null"), fs::Permissions::from_mode(0o666)).unwrap();
        fs::create_dir(root.join("opq")).unwrap();
        xattr::set(root.join("opq"), "trusted.overlay.opaque", b"y")
            .map_err(|e| format!("setting trusted.overlay.opaque: {e}"))?;
        file(&root.join("opq/kept.txt"), b"kept", 0o644);
        file(&root.join("xattr.txt"), b"x", 0o644);
        xattr::set(root.join("xattr.txt"), "trusted.overlay.origin", b"junk")
            .map_err(|e| format!("setting trusted.overlay.origin: {e}"))?;
        let user_xattr = match xattr::set(root.join("xattr.txt"), "user.test", b"hello") {
            Ok(()) => true,
            Err(e) => {
                eprintln!("no user.* xattrs on this file system ({e}): not checked");
                false
            }
        };
        fs::create_dir(root.join("long")).unwrap();
        file(&root.join(OsStr::from_bytes(&long_name())), b"long", 0o644);
        file(&root.join(OsStr::from_bytes(NON_UTF8)), b"bytes", 0o644);
        Ok(user_xattr)
    }

    /// Writing a layer of `tree` is refused, and leaves no output behind.
    fn assert_refused(tree: &Path) {
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("l");
        let err = write_layer(tree, &out, &LayerOptions::default()).unwrap_err();
        assert!(matches!(err, LayerError::Refused { .. }), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn overlay_upper_dir_becomes_a_layer() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (mknod, trusted.* xattrs)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("upper");
        fs::create_dir(&root).unwrap();
        let user_xattr = match upper_tree(&root) {
            Ok(u) => u,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("layer.tar.gz");
        let r = write_layer(&root, &out, &LayerOptions::default()).unwrap();
        check_digests(&out, &r);
        let mode = fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let ents = read_back(&out);
        assert_eq!(r.entries, ents.len() as u64);
        let long = long_name();
        let expected: Vec<&[u8]> = vec![
            &b"a/"[..],
            &b"a/b/"[..],
            &b"a/b/c/"[..],
            &b"a/b/c/deep.txt"[..],
            NON_UTF8,
            &b"bin/"[..],
            &b"bin/tool"[..],
            &b"etc-link"[..],
            &b"fifo"[..],
            &b"file.txt"[..],
            &b".wh.gone"[..],
            &b"hard1"[..],
            &b"hard2"[..],
            &b"link"[..],
            &b"long/"[..],
            &long[..],
            &b"null"[..],
            &b"opq/"[..],
            &b"opq/.wh..wh..opq"[..],
            &b"opq/kept.txt"[..],
            &b"xattr.txt"[..],
        ];
        let got: Vec<&[u8]> = ents.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(got, expected);

        let f = find(&ents, b"file.txt");
        let md = fs::symlink_metadata(root.join("file.txt")).unwrap();
        assert_eq!(f.kind, EntryType::Regular);
        assert_eq!(f.mode, 0o644);
        assert_eq!(f.data, b"hello\n");
        assert_eq!((f.uid, f.gid), (u64::from(md.uid()), u64::from(md.gid())));
        assert_eq!(f.mtime, md.mtime() as u64);
        assert_eq!(find(&ents, b"bin/tool").mode, 0o4755);
        assert_eq!(find(&ents, b"bin/").kind, EntryType::Directory);
        assert_eq!(find(&ents, b"a/b/c/deep.txt").data, b"deep");

        let l = find(&ents, b"link");
        assert_eq!(l.kind, EntryType::Symlink);
        assert_eq!(l.link.as_deref(), Some(b"file.txt".as_slice()));
        let e = find(&ents, b"etc-link");
        assert_eq!(e.kind, EntryType::Symlink);
        assert_eq!(e.link.as_deref(), Some(b"/etc".as_slice()));
        assert!(e.data.is_empty());

        let h1 = find(&ents, b"hard1");
        assert_eq!(h1.kind, EntryType::Regular);
        assert_eq!(h1.data, b"same inode");
        let h2 = find(&ents, b"hard2");
        assert_eq!(h2.kind, EntryType::Link);
        assert_eq!(h2.link.as_deref(), Some(b"hard1".as_slice()));
        assert!(h2.data.is_empty());

        let fifo = find(&ents, b"fifo");
        assert_eq!(fifo.kind, EntryType::Fifo);
        assert_eq!(fifo.mode, 0o640);
        let null = find(&ents, b"null");
        assert_eq!(null.kind, EntryType::Char);
        assert_eq!(null.dev, (1, 3));
        assert_eq!(null.mode, 0o666);

        let wh = find(&ents, b".wh.gone");
        assert_eq!(wh.kind, EntryType::Regular);
        assert!(wh.data.is_empty());
        assert_eq!((wh.mode, wh.uid, wh.gid), (0, 0, 0));

        let i = ents.iter().position(|e| e.path == b"opq/").unwrap();
        assert_eq!(ents[i].kind, EntryType::Directory);
        assert_eq!(ents[i + 1].path, b"opq/.wh..wh..opq");
        assert_eq!(ents[i + 1].kind, EntryType::Regular);
        assert!(ents[i + 1].data.is_empty());
        for e in &ents {
            assert!(
                !e.pax
                    .iter()
                    .any(|(k, _)| k.starts_with(b"SCHILY.xattr.trusted.overlay.")),
                "overlay xattr copied on {:?}",
                String::from_utf8_lossy(&e.path)
            );
        }
        let x = find(&ents, b"xattr.txt");
        if user_xattr {
            assert_eq!(x.pax(b"SCHILY.xattr.user.test"), Some(b"hello".as_slice()));
        }

        let lf = find(&ents, &long);
        assert_eq!(lf.data, b"long");
        assert_eq!(lf.pax(b"path"), Some(long.as_slice()));
        let nu = find(&ents, NON_UTF8);
        assert_eq!(nu.kind, EntryType::Regular);
        assert_eq!(nu.data, b"bytes");

        // The same tree, the same layer.
        let out2 = outs.path().join("again.tar.gz");
        assert_eq!(
            write_layer(&root, &out2, &LayerOptions::default()).unwrap(),
            r
        );

        // berth's own unpack reads it back into the overlay form it came from.
        let dest = t.path().join("unpacked");
        fs::create_dir(&dest).unwrap();
        let opts = crate::store::unpack::UnpackOptions {
            preserve_ownership: true,
            allow_devices: true,
            min_free: 0,
        };
        crate::store::unpack::unpack_layer(
            flate2::read::GzDecoder::new(File::open(&out).unwrap()),
            &dest,
            &opts,
        )
        .unwrap();
        assert_eq!(fs::read(dest.join("file.txt")).unwrap(), b"hello\n");
        assert_eq!(fs::read(dest.join("a/b/c/deep.txt")).unwrap(), b"deep");
        let tool = fs::symlink_metadata(dest.join("bin/tool")).unwrap();
        assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
        assert_eq!(
            fs::read_link(dest.join("link")).unwrap(),
            Path::new("file.txt")
        );
        assert_eq!(
            fs::read_link(dest.join("etc-link")).unwrap(),
            Path::new("/etc")
        );
        assert_eq!(
            fs::symlink_metadata(dest.join("hard1")).unwrap().ino(),
            fs::symlink_metadata(dest.join("hard2")).unwrap().ino()
        );
        assert!(
            fs::symlink_metadata(dest.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        let gone = fs::symlink_metadata(dest.join("gone")).unwrap();
        assert!(gone.file_type().is_char_device());
        assert_eq!(gone.rdev(), 0);
        assert_eq!(
            fs::symlink_metadata(dest.join("null")).unwrap().rdev(),
            makedev(1, 3)
        );
        assert_eq!(
            xattr::get(dest.join("opq"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
        assert_eq!(fs::read(dest.join("opq/kept.txt")).unwrap(), b"kept");
        if user_xattr {
            assert_eq!(
                xattr::get(dest.join("xattr.txt"), "user.test").unwrap(),
                Some(b"hello".to_vec())
            );
        }
        assert_eq!(
            fs::read(dest.join(OsStr::from_bytes(&long))).unwrap(),
            b"long"
        );
        assert_eq!(
            fs::read(dest.join(OsStr::from_bytes(NON_UTF8))).unwrap(),
            b"bytes"
        );
    }

    #[test]
    fn empty_dir_gives_an_empty_layer() {
        let t = tempfile::tempdir().unwrap();
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("l");
        let r = write_layer(t.path(), &out, &LayerOptions::default()).unwrap();
        assert_eq!(r.entries, 0);
        check_digests(&out, &r);
        // An archive of nothing: its end marker, two zero blocks.
        assert_eq!(r.diff_id, sha(&[0u8; 1024]));
        assert!(read_back(&out).is_empty());
    }

    #[test]
    fn options_set_mtime_and_owner() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir(root.join("d")).unwrap();
        file(&root.join("d/f"), b"data", 0o640);
        symlink("d/f", root.join("s")).unwrap();
        let outs = tempfile::tempdir().unwrap();

        let opts = LayerOptions {
            mtime: Some(1_700_000_000),
            owner: Some((1234, 5678)),
        };
        let out = outs.path().join("set");
        let r = write_layer(root, &out, &opts).unwrap();
        check_digests(&out, &r);
        let ents = read_back(&out);
        assert_eq!(ents.len(), 3);
        for e in &ents {
            assert_eq!(e.mtime, 1_700_000_000);
            assert_eq!((e.uid, e.gid), (1234, 5678));
        }
        assert_eq!(find(&ents, b"d/f").mode, 0o640);
        // Reproducible: the same again.
        let r2 = write_layer(root, &outs.path().join("set2"), &opts).unwrap();
        assert_eq!(r, r2);

        let out = outs.path().join("own");
        write_layer(root, &out, &LayerOptions::default()).unwrap();
        let ents = read_back(&out);
        let md = fs::symlink_metadata(root.join("d/f")).unwrap();
        let f = find(&ents, b"d/f");
        assert_eq!(f.mtime, md.mtime() as u64);
        assert_eq!((f.uid, f.gid), (u64::from(md.uid()), u64::from(md.gid())));
    }

    #[test]
    fn large_ids_also_go_to_pax() {
        let t = tempfile::tempdir().unwrap();
        file(&t.path().join("f"), b"", 0o644);
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("l");
        let opts = LayerOptions {
            mtime: None,
            owner: Some((3_000_000, 3_000_001)),
        };
        write_layer(t.path(), &out, &opts).unwrap();
        let ents = read_back(&out);
        let f = find(&ents, b"f");
        assert_eq!(f.pax(b"uid"), Some(b"3000000".as_slice()));
        assert_eq!(f.pax(b"gid"), Some(b"3000001".as_slice()));
        assert_eq!((f.uid, f.gid), (3_000_000, 3_000_001));
    }

    #[test]
    fn symlinks_are_stored_not_followed() {
        let t = tempfile::tempdir().unwrap();
        symlink("/etc", t.path().join("etc")).unwrap();
        symlink("/etc/passwd", t.path().join("passwd")).unwrap();
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("l");
        let r = write_layer(t.path(), &out, &LayerOptions::default()).unwrap();
        assert_eq!(r.entries, 2);
        let ents = read_back(&out);
        let got: Vec<_> = ents
            .iter()
            .map(|e| (e.path.as_slice(), e.kind, e.link.as_deref(), e.data.len()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    b"etc".as_slice(),
                    EntryType::Symlink,
                    Some(b"/etc".as_slice()),
                    0
                ),
                (
                    b"passwd".as_slice(),
                    EntryType::Symlink,
                    Some(b"/etc/passwd".as_slice()),
                    0
                ),
            ]
        );
    }

    #[test]
    fn user_overlay_opaque_is_a_marker_not_an_xattr() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        if let Err(e) = xattr::set(t.path().join("d"), "user.overlay.opaque", b"y") {
            eprintln!("skipped: no user.* xattrs on this file system ({e})");
            return;
        }
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("l");
        write_layer(t.path(), &out, &LayerOptions::default()).unwrap();
        let ents = read_back(&out);
        let got: Vec<&[u8]> = ents.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(got, vec![b"d/".as_slice(), b"d/.wh..wh..opq".as_slice()]);
        assert!(ents[0].pax.is_empty());
    }

    #[test]
    fn overlay_metacopy_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (trusted.* xattrs)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        file(&t.path().join("f"), b"", 0o644);
        if let Err(e) = xattr::set(t.path().join("f"), "trusted.overlay.metacopy", b"") {
            eprintln!("skipped: cannot set trusted.overlay.metacopy ({e})");
            return;
        }
        assert_refused(t.path());
    }

    #[test]
    fn refuses_deep_trees_and_removes_the_output() {
        let t = tempfile::tempdir().unwrap();
        let deep: PathBuf = std::iter::repeat_n("d", MAX_DEPTH + 8).collect();
        fs::create_dir_all(t.path().join(deep)).unwrap();
        assert_refused(t.path());
    }

    #[test]
    fn refuses_long_paths() {
        let t = tempfile::tempdir().unwrap();
        // 17 levels of 250 bytes: 4266 bytes, more than any one system call takes, so built
        // a level at a time.
        let comp = "n".repeat(250);
        let mut fd = nix::fcntl::open(
            t.path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        for _ in 0..17 {
            mkdirat(&fd, comp.as_str(), Mode::from_bits_truncate(0o755)).unwrap();
            fd = openat(
                &fd,
                comp.as_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .unwrap();
        }
        assert_refused(t.path());
    }

    #[test]
    fn refuses_names_that_read_as_whiteouts() {
        let t = tempfile::tempdir().unwrap();
        file(&t.path().join(".wh.x"), b"", 0o644);
        assert_refused(t.path());
    }

    #[test]
    fn never_replaces_an_existing_output() {
        let t = tempfile::tempdir().unwrap();
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("l");
        fs::write(&out, b"keep").unwrap();
        let err = write_layer(t.path(), &out, &LayerOptions::default()).unwrap_err();
        assert!(matches!(err, LayerError::Io { op: "create", .. }), "{err}");
        assert_eq!(fs::read(&out).unwrap(), b"keep");
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for n in 0..1200 {
            let value = vec![b'\n'; n];
            let mut buf = Vec::new();
            pax_record(&mut buf, b"k", &value);
            let sp = buf.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
            assert_eq!(len, buf.len(), "value of {n} bytes");
            assert!(buf.ends_with(b"\n"));
            assert_eq!(&buf[sp + 1..sp + 3], b"k=");
        }
    }
}
