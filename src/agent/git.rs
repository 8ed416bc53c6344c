//! Which git commit a manifest directory is at, read straight from `.git`.
//!
//! `berth agent DIR` records the revision it applied, so that an operator can tell which
//! state of the manifests a host converged to. Running the `git` program would make the agent
//! depend on a binary the host may not have (or has in an unexpected version), and a git
//! library is a large dependency for reading a handful of files: `HEAD`, one ref (loose or
//! packed), the repository config and the index.
//!
//! Everything read here comes from a directory that whoever can push manifests controls, so
//! every length is checked against the buffer it indexes, and a hostile or truncated file
//! gives a [`GitError`], never a panic or an unbounded allocation.
//!
//! Not handled, because a manifest repository has no need of them: `.gitignore` (an ignored
//! `*.toml` counts as an untracked manifest), split indexes, `core.worktree`, `GIT_DIR`, and
//! `core.symlinks = false`.

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A modification time as the index stores it: seconds and nanoseconds.
type Mtime = (u32, u32);

/// The commit a manifest directory is at, if it is in a git work tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Revision {
    /// Full hex object id of HEAD's commit (40 hex for SHA-1 repos, 64 for SHA-256 repos). None on an unborn branch.
    pub commit: Option<String>,
    /// The branch HEAD points to ("main"), None when detached.
    pub branch: Option<String>,
    /// Whether files tracked under the manifest directory differ from the index (modified or deleted), or a `*.toml` file under the manifest directory is not in the index (untracked manifest).
    pub dirty: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git: {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file of the repository is not what git writes; `what` says how.
    #[error("git: {path}: {what}")]
    Malformed { path: PathBuf, what: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> GitError + '_ {
    move |source| GitError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn malformed(path: &Path, what: impl Into<String>) -> GitError {
    GitError::Malformed {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Largest index read: git's own indexes for trees of a million files stay well below this.
const MAX_INDEX: u64 = 256 << 20;
/// Largest `HEAD`, loose ref, `commondir`, `config` or `.git` file read.
const MAX_SMALL: u64 = 1 << 20;
/// Larger work tree files are not hashed: unless size and mtime match they count as dirty.
const MAX_HASHED: u64 = 64 << 20;
/// Most directory entries looked at when searching for untracked manifests.
const MAX_WALK: usize = 100_000;
/// The longest path an index entry may have (PATH_MAX).
const MAX_PATH: usize = 4096;
/// All the index's paths together (a v4 index compresses them: its size does not bound them).
const MAX_PATH_BYTES: usize = 32 << 20;
/// Bytes hashed per [`revision`] call; past it the directory is reported dirty (unverified).
const HASH_BUDGET: u64 = 256 << 20;
/// Most symbolic refs followed after HEAD's own.
const MAX_SYMREF_HOPS: usize = 5;
const HASH_CHUNK: usize = 64 << 10;

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Find the work tree containing `dir` (walk up from `dir` to `/` looking for `.git`, which is either a directory or a file `gitdir: <path>` as in worktrees/submodules, path relative to the file's directory when not absolute) and read its revision. Ok(None) when `dir` is in no git work tree.
pub fn revision(dir: &Path) -> Result<Option<Revision>, GitError> {
    // Canonical, so that walking up reaches `/` from a relative path and so that the manifest
    // directory's path relative to the work tree is the one the index uses.
    let dir = fs::canonicalize(dir).map_err(io_err(dir))?;
    let Some((root, git_dir)) = find_repo(&dir)? else {
        return Ok(None);
    };
    let repo = Repo::open(root, git_dir)?;
    let (commit, branch) = repo.head()?;
    let (entries, index_mtime) = repo.read_index()?;
    let prefix = dir.strip_prefix(&repo.root).unwrap_or(Path::new(""));
    let dirty = repo.tracked_dirty(&entries, prefix.as_os_str().as_bytes(), index_mtime)?
        || repo.untracked_manifest(&entries, &dir)?;
    Ok(Some(Revision {
        commit,
        branch,
        dirty,
    }))
}

/// Errors that mean "this file is not there", as opposed to "it could not be read".
fn absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory
    )
}

/// Open a regular file; None when it does not exist. Opened `O_PATH` first and checked to
/// be a regular file before it is opened for reading ([`crate::fsutil::open_regular`]): a
/// FIFO or a device planted where a ref should be is reported, never opened.
fn open_file(path: &Path) -> Result<Option<(File, Metadata)>, GitError> {
    let file = match crate::fsutil::open_regular(path, None) {
        Ok(f) => f,
        Err(e) if absent(&e) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            return Err(malformed(path, "not a regular file"));
        }
        Err(source) => {
            return Err(GitError::Io {
                path: path.into(),
                source,
            });
        }
    };
    let meta = file.metadata().map_err(io_err(path))?;
    Ok(Some((file, meta)))
}

/// Read a small file whole; None when it does not exist.
fn read_small(path: &Path) -> Result<Option<Vec<u8>>, GitError> {
    let Some((file, _)) = open_file(path)? else {
        return Ok(None);
    };
    let mut buf = Vec::new();
    file.take(MAX_SMALL + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > MAX_SMALL {
        return Err(malformed(path, "larger than 1 MiB"));
    }
    Ok(Some(buf))
}

fn trim(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

fn bytes_path(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

/// The work tree root and git directory for `dir` (canonical), walking up, as git's
/// `safe.directory` rule would have it: not across a file system boundary, and only a
/// `.git` (and a `gitdir:` target) owned by root or by the owner of `dir`: whoever can
/// write an ancestor directory such as /srv or /tmp cannot plant a repository for the agent
/// (running as root) to read.
fn find_repo(dir: &Path) -> Result<Option<(PathBuf, PathBuf)>, GitError> {
    let top = fs::metadata(dir).map_err(io_err(dir))?;
    let trusted = |m: &Metadata| m.uid() == 0 || m.uid() == top.uid();
    for root in dir.ancestors() {
        match fs::metadata(root) {
            Ok(m) if m.dev() == top.dev() => {}
            _ => return Ok(None),
        }
        let dot = root.join(".git");
        let meta = match fs::symlink_metadata(&dot) {
            Ok(m) => m,
            Err(e) if absent(&e) => continue,
            Err(source) => return Err(GitError::Io { path: dot, source }),
        };
        if !trusted(&meta) {
            tracing::debug!(path = %dot.display(), "ignored: owned by neither root nor the manifest directory's owner");
            return Ok(None);
        }
        if meta.is_dir() {
            return Ok(Some((root.to_path_buf(), dot)));
        }
        if !meta.is_file() {
            return Err(malformed(&dot, "neither a directory nor a file"));
        }
        // A file, as `git worktree add` and submodules write: `gitdir: <path>`.
        let text = read_small(&dot)?.ok_or_else(|| malformed(&dot, "vanished while reading"))?;
        let target = trim(&text)
            .strip_prefix(b"gitdir:")
            .map(trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| malformed(&dot, "neither a directory nor a `gitdir: <path>` file"))?;
        let git_dir = root.join(bytes_path(target));
        match fs::metadata(&git_dir) {
            Ok(m) if trusted(&m) => {}
            Ok(_) => {
                return Err(malformed(
                    &dot,
                    "its gitdir is owned by neither root nor the manifest directory's owner",
                ));
            }
            Err(e) if absent(&e) => return Err(malformed(&dot, "its gitdir does not exist")),
            Err(source) => {
                return Err(GitError::Io {
                    path: git_dir,
                    source,
                });
            }
        }
        return Ok(Some((root.to_path_buf(), git_dir)));
    }
    Ok(None)
}

/// A git `config` value: the last `key` of the plain `[section]`, both case-insensitive. A
/// minimal reading of the format (no includes, no continuation lines), enough for the two
/// settings that change how the index is read and compared.
fn config_value(text: &[u8], section: &str, key: &str) -> Option<String> {
    let text = String::from_utf8_lossy(text);
    let mut in_section = false;
    let mut found = None;
    for line in text.lines() {
        // Cut the comment: `#` or `;` outside double quotes.
        let mut quoted = false;
        let end = line
            .char_indices()
            .find(|&(_, c)| {
                if c == '"' {
                    quoted = !quoted;
                }
                !quoted && (c == '#' || c == ';')
            })
            .map_or(line.len(), |(i, _)| i);
        let line = line.get(..end).unwrap_or(line).trim();
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.split(']').next().unwrap_or("").trim();
            in_section = name.eq_ignore_ascii_case(section);
        } else if in_section && !line.is_empty() {
            // A key without `=` is a boolean true.
            let (k, v) = line.split_once('=').unwrap_or((line, "true"));
            if k.trim().eq_ignore_ascii_case(key) {
                found = Some(v.trim().replace('"', ""));
            }
        }
    }
    found
}

/// One index entry: what the dirty check compares.
#[derive(Debug)]
struct Entry {
    path: Vec<u8>,
    mtime: (u32, u32),
    size: u32,
    mode: u32,
    id: Vec<u8>,
    stage: u16,
    /// Assume-unchanged or skip-worktree: git does not look at the work tree file either.
    ignore_worktree: bool,
}

struct Repo {
    /// The work tree.
    root: PathBuf,
    /// Holds HEAD and the index: per work tree.
    git_dir: PathBuf,
    /// Holds refs, packed-refs and config: shared by linked worktrees.
    common_dir: PathBuf,
    /// 20 for SHA-1, 32 for SHA-256.
    hash_len: usize,
    /// `core.filemode`: whether an executable bit change is a modification.
    filemode: bool,
    /// Bytes this reading may still hash ([`HASH_BUDGET`]).
    budget: std::cell::Cell<u64>,
}

impl Repo {
    fn open(root: PathBuf, git_dir: PathBuf) -> Result<Repo, GitError> {
        let common_dir = match read_small(&git_dir.join("commondir"))? {
            None => git_dir.clone(),
            Some(text) => match trim(&text) {
                [] => return Err(malformed(&git_dir.join("commondir"), "empty")),
                p => git_dir.join(bytes_path(p)),
            },
        };
        let config_path = common_dir.join("config");
        let config = read_small(&config_path)?.unwrap_or_default();
        let hash_len = match config_value(&config, "extensions", "objectformat") {
            None => 20,
            Some(f) if f.eq_ignore_ascii_case("sha1") => 20,
            Some(f) if f.eq_ignore_ascii_case("sha256") => 32,
            Some(f) => {
                return Err(malformed(
                    &config_path,
                    format!("unknown objectformat {f:?}"),
                ));
            }
        };
        let filemode = config_value(&config, "core", "filemode").is_none_or(|v| {
            !["false", "no", "off", "0"]
                .iter()
                .any(|f| v.eq_ignore_ascii_case(f))
        });
        Ok(Repo {
            root,
            git_dir,
            common_dir,
            hash_len,
            filemode,
            budget: std::cell::Cell::new(HASH_BUDGET),
        })
    }

    /// A hex object id of this repository's length, lowercased.
    fn parse_id(&self, text: &[u8], path: &Path) -> Result<String, GitError> {
        if text.len() != self.hash_len * 2 || !text.iter().all(u8::is_ascii_hexdigit) {
            return Err(malformed(
                path,
                format!("expected a {}-digit hex object id", self.hash_len * 2),
            ));
        }
        Ok(String::from_utf8_lossy(text).to_ascii_lowercase())
    }

    /// (commit, branch) of HEAD.
    fn head(&self) -> Result<(Option<String>, Option<String>), GitError> {
        let path = self.git_dir.join("HEAD");
        let text = read_small(&path)?.ok_or_else(|| malformed(&path, "missing"))?;
        let text = trim(&text);
        let Some(target) = symref_target(text) else {
            return Ok((Some(self.parse_id(text, &path)?), None));
        };
        let name = ref_name(target, &path)?;
        let branch = name
            .strip_prefix("refs/heads/")
            .unwrap_or(&name)
            .to_string();
        Ok((self.resolve(name, &path)?, Some(branch)))
    }

    /// The object id `name` points to, None when the ref does not exist (unborn branch).
    fn resolve(&self, mut name: String, head: &Path) -> Result<Option<String>, GitError> {
        for _ in 0..=MAX_SYMREF_HOPS {
            // Pseudo-refs and a few namespaces are per work tree; the rest are shared.
            let per_worktree = !name.starts_with("refs/")
                || ["refs/worktree/", "refs/bisect/", "refs/rewritten/"]
                    .iter()
                    .any(|p| name.starts_with(p));
            let dir = if per_worktree {
                &self.git_dir
            } else {
                &self.common_dir
            };
            let path = dir.join(&name);
            let Some(text) = read_small(&path)? else {
                return self.packed_ref(&name);
            };
            let text = trim(&text);
            match symref_target(text) {
                Some(target) => name = ref_name(target, &path)?,
                None => return self.parse_id(text, &path).map(Some),
            }
        }
        Err(malformed(head, "symbolic refs chained more than 5 deep"))
    }

    fn packed_ref(&self, name: &str) -> Result<Option<String>, GitError> {
        let path = self.common_dir.join("packed-refs");
        let Some((file, _)) = open_file(&path)? else {
            return Ok(None);
        };
        let mut reader = BufReader::new(file.take(MAX_INDEX));
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).map_err(io_err(&path))? == 0 {
                return Ok(None);
            }
            let l = trim(&line);
            // Comments (`# pack-refs with: ...`) and peeled tag objects (`^<id>`).
            if matches!(l.first(), None | Some(b'#' | b'^')) {
                continue;
            }
            let Some(space) = l.iter().position(|&b| b == b' ') else {
                return Err(malformed(&path, "a line without `<id> <ref>`"));
            };
            let (id, refname) = l.split_at(space);
            if trim(refname) == name.as_bytes() {
                return self.parse_id(id, &path).map(Some);
            }
        }
    }

    /// The index entries, and the index file's mtime (for git's racy-clean rule).
    fn read_index(&self) -> Result<(Vec<Entry>, Option<Mtime>), GitError> {
        let path = self.git_dir.join("index");
        let Some((file, meta)) = open_file(&path)? else {
            return Ok((Vec::new(), None));
        };
        if meta.len() > MAX_INDEX {
            return Err(malformed(&path, "index larger than 256 MiB"));
        }
        let mut buf = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_INDEX + 1)
            .read_to_end(&mut buf)
            .map_err(io_err(&path))?;
        if buf.len() as u64 > MAX_INDEX {
            return Err(malformed(&path, "index larger than 256 MiB"));
        }
        let entries = parse_index(&buf, &path, self.hash_len)?;
        Ok((
            entries,
            Some((meta.mtime() as u32, meta.mtime_nsec() as u32)),
        ))
    }

    /// Whether a tracked file under `prefix` (relative to the work tree, "" for all) differs.
    fn tracked_dirty(
        &self,
        entries: &[Entry],
        prefix: &[u8],
        index_mtime: Option<Mtime>,
    ) -> Result<bool, GitError> {
        let under = |p: &[u8]| {
            prefix.is_empty() || (p.starts_with(prefix) && p.get(prefix.len()) == Some(&b'/'))
        };
        for e in entries.iter().filter(|e| under(e.path.as_slice())) {
            let path = self.root.join(bytes_path(&e.path));
            if e.stage != 0 {
                tracing::debug!(path = %path.display(), "manifest directory dirty: unmerged");
                return Ok(true);
            }
            // Gitlinks (submodules) and sparse directory entries have no file to compare.
            let kind = e.mode & S_IFMT;
            if e.ignore_worktree || (kind != S_IFREG && kind != S_IFLNK) {
                continue;
            }
            if let Some(why) = self.entry_dirty(e, &path, index_mtime)? {
                tracing::debug!(path = %path.display(), "manifest directory dirty: {why}");
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Why the work tree file of `e` differs from the index, None when it does not. The file
    /// is looked up inside the work tree through no symlink (an entry that is itself a
    /// symlink is read as a link): an index naming `link/secret`, with `link` pointing
    /// elsewhere, reads nothing outside the tree.
    fn entry_dirty(
        &self,
        e: &Entry,
        path: &Path,
        index_mtime: Option<Mtime>,
    ) -> Result<Option<&'static str>, GitError> {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
        use std::os::fd::AsRawFd;
        let root = nix::fcntl::open(
            &self.root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io_err(&self.root)(e.into()))?;
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        let fd = match nix::fcntl::openat2(&root, bytes_path(&e.path), how) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {
                return Ok(Some("deleted"));
            }
            Err(nix::errno::Errno::ELOOP | nix::errno::Errno::EXDEV) => {
                return Ok(Some("its path goes through a symlink"));
            }
            Err(err) => return Err(io_err(path)(err.into())),
        };
        let st = nix::sys::stat::fstat(&fd).map_err(|err| io_err(path)(err.into()))?;
        let kind = st.st_mode & libc::S_IFMT;
        let symlink = e.mode & S_IFMT == S_IFLNK;
        if (symlink && kind != libc::S_IFLNK) || (!symlink && kind != libc::S_IFREG) {
            return Ok(Some("type changed"));
        }
        if !symlink && self.filemode && (e.mode & 0o100 != 0) != (st.st_mode & 0o100 != 0) {
            return Ok(Some("mode changed"));
        }
        // git's fast path: same size and mtime means unchanged, unless the file could have
        // changed within the same timestamp the index was written at ("racily clean").
        let len = st.st_size.max(0) as u64;
        let mtime = (st.st_mtime as u32, st.st_mtime_nsec as u32);
        let racy = index_mtime.is_some_and(|i| i <= e.mtime);
        if !racy && len as u32 == e.size && mtime == e.mtime {
            return Ok(None);
        }
        let id = if symlink {
            let target = nix::fcntl::readlinkat(&fd, "").map_err(|err| io_err(path)(err.into()))?;
            Some(blob_id(self.hash_len, target.as_bytes()))
        } else if len > MAX_HASHED {
            return Ok(Some("changed stat data, too large to hash"));
        } else if len > self.budget.get() {
            return Ok(Some("not verified: hashing budget spent"));
        } else {
            self.budget.set(self.budget.get() - len);
            // a regular file (checked above), opened for reading through its own descriptor
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOCTTY)
                .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(io_err(path))?;
            self.hash_file(file, path, len)?
        };
        Ok(match id {
            Some(id) if id == e.id => None,
            Some(_) => Some("modified"),
            None => Some("changed while reading"),
        })
    }

    /// The blob id of an open regular file, streamed; None if its length is not `len` (it
    /// is being written to).
    fn hash_file(
        &self,
        mut file: File,
        path: &Path,
        len: u64,
    ) -> Result<Option<Vec<u8>>, GitError> {
        let mut h = Hasher::blob(self.hash_len, len);
        let mut buf = vec![0u8; HASH_CHUNK];
        let mut total = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(GitError::Io {
                        path: path.into(),
                        source,
                    });
                }
            };
            total += n as u64;
            if total > len {
                return Ok(None);
            }
            h.update(buf.get(..n).unwrap_or_default());
        }
        Ok((total == len).then(|| h.finish()))
    }

    /// Whether a regular `*.toml` file below `dir` is not in the index.
    fn untracked_manifest(&self, entries: &[Entry], dir: &Path) -> Result<bool, GitError> {
        let tracked: HashSet<&[u8]> = entries.iter().map(|e| e.path.as_slice()).collect();
        let mut stack = vec![dir.to_path_buf()];
        let mut seen = 0usize;
        while let Some(d) = stack.pop() {
            // A nested repository (or submodule) is not this one's to track.
            if d != self.root && fs::symlink_metadata(d.join(".git")).is_ok() {
                continue;
            }
            let listing = match fs::read_dir(&d) {
                Ok(r) => r,
                Err(e) if absent(&e) => continue,
                Err(source) => return Err(GitError::Io { path: d, source }),
            };
            for item in listing {
                let item = item.map_err(io_err(&d))?;
                seen += 1;
                if seen > MAX_WALK {
                    tracing::warn!(dir = %dir.display(), "more than {MAX_WALK} entries below the manifest directory; not looking further for untracked manifests");
                    return Ok(false);
                }
                let name = item.file_name();
                if name == ".git" {
                    continue;
                }
                let path = item.path();
                // file_type does not follow symlinks: symlinked directories are not entered.
                let ft = item.file_type().map_err(io_err(&path))?;
                if ft.is_dir() {
                    stack.push(path);
                } else if ft.is_file() && name.as_bytes().ends_with(b".toml") {
                    let Ok(rel) = path.strip_prefix(&self.root) else {
                        continue;
                    };
                    if !tracked.contains(rel.as_os_str().as_bytes()) {
                        tracing::debug!(path = %path.display(), "manifest directory dirty: untracked manifest");
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }
}

/// The target of a symbolic ref's content `ref: <name>`.
fn symref_target(text: &[u8]) -> Option<&[u8]> {
    text.strip_prefix(b"ref:").map(trim)
}

/// A ref name, checked as `git check-ref-format` does: it cannot name a file outside the git
/// directory, and carries no control character or escape sequence into a log or terminal.
fn ref_name(b: &[u8], path: &Path) -> Result<String, GitError> {
    let ok = |s: &str| {
        s.len() <= 1024
            && !s.contains("..")
            && !s.contains("@{")
            && !s.ends_with('.')
            && !s.ends_with(".lock")
            && s.bytes()
                .all(|c| c > 0x20 && c != 0x7f && !b"~^:?*[\\".contains(&c))
            && s.split('/').all(|c| !c.is_empty() && !c.starts_with('.'))
    };
    match std::str::from_utf8(b) {
        Ok(s) if ok(s) => Ok(s.to_string()),
        _ => Err(malformed(
            path,
            format!("invalid ref name {}", crate::text::printable_bytes(b, 200)),
        )),
    }
}

/// A path git would store: relative, no empty, `.` or `..` component (a sparse directory
/// entry ends in `/`).
fn safe_path(p: &[u8]) -> bool {
    let p = p.strip_suffix(b"/").unwrap_or(p);
    !p.is_empty()
        && p.split(|&b| b == b'/')
            .all(|c| !matches!(c, b"" | b"." | b".."))
}

/// A bounds-checked reader over the index bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a Path,
}

impl<'a> Cursor<'a> {
    fn past_end(&self, what: &str) -> GitError {
        malformed(
            self.file,
            format!("{what} at offset {} runs past the end", self.pos),
        )
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GitError> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.past_end(what))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.past_end(what))?;
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self, what: &str) -> Result<u16, GitError> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2, what)?);
        Ok(u16::from_be_bytes(a))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GitError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_be_bytes(a))
    }

    /// Bytes up to a NUL, which is consumed.
    fn nul_terminated(&mut self, what: &str) -> Result<&'a [u8], GitError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.past_end(what))?;
        let s = rest.get(..n).unwrap_or_default();
        self.pos += n + 1;
        Ok(s)
    }

    /// git's offset varint (varint.c): each continuation adds one before shifting, so every
    /// value has exactly one encoding.
    fn varint(&mut self, what: &str) -> Result<u64, GitError> {
        let mut b = self.take(1, what)?[0];
        let mut val = u64::from(b & 0x7f);
        while b & 0x80 != 0 {
            val = val
                .checked_add(1)
                .filter(|v| v >> 57 == 0)
                .ok_or_else(|| malformed(self.file, format!("{what} overflows")))?;
            b = self.take(1, what)?[0];
            val = (val << 7) | u64::from(b & 0x7f);
        }
        Ok(val)
    }
}

/// Parse the entries of an index (versions 2 to 4); extensions and checksum are ignored.
fn parse_index(buf: &[u8], file: &Path, hash_len: usize) -> Result<Vec<Entry>, GitError> {
    let mut c = Cursor { buf, pos: 0, file };
    if c.take(4, "signature")? != b"DIRC" {
        return Err(malformed(file, "not an index (no DIRC signature)"));
    }
    let version = c.u32("version")?;
    if !(2..=4).contains(&version) {
        return Err(malformed(
            file,
            format!("unsupported index version {version}"),
        ));
    }
    let count = c.u32("entry count")?;
    // An entry is at least 62 bytes: the count cannot make this allocate more than the file.
    let mut entries: Vec<Entry> = Vec::with_capacity((count as usize).min(buf.len() / 62));
    let mut path_bytes = 0usize;
    for i in 0..count {
        let start = c.pos;
        c.take(8, "ctime")?;
        let mtime = (c.u32("mtime")?, c.u32("mtime")?);
        c.take(8, "dev and ino")?;
        let mode = c.u32("mode")?;
        c.take(8, "uid and gid")?;
        let size = c.u32("size")?;
        let id = c.take(hash_len, "object id")?.to_vec();
        let flags = c.u16("flags")?;
        let mut extended = 0;
        if flags & 0x4000 != 0 {
            if version < 3 {
                return Err(malformed(
                    file,
                    format!("entry {i}: extended flags in a version 2 index"),
                ));
            }
            extended = c.u16("extended flags")?;
        }
        let path = if version == 4 {
            let strip = c.varint("path prefix length")?;
            let prev = entries
                .last()
                .map(|e| e.path.as_slice())
                .unwrap_or_default();
            let keep = usize::try_from(strip)
                .ok()
                .and_then(|s| prev.len().checked_sub(s))
                .ok_or_else(|| {
                    malformed(
                        file,
                        format!("entry {i}: strips more than the previous path"),
                    )
                })?;
            let suffix = c.nul_terminated("path")?;
            let mut p = prev.get(..keep).unwrap_or_default().to_vec();
            p.extend_from_slice(suffix);
            p
        } else {
            let name = c.nul_terminated("path")?.to_vec();
            // NUL padding to a multiple of 8 bytes; the path's own NUL is the first of it.
            let len = c.pos - 1 - start;
            let padded = (len + 8) & !7;
            c.take(padded - (len + 1), "padding")?;
            name
        };
        let name_len = usize::from(flags & 0xfff);
        if name_len != 0xfff && name_len != path.len() {
            return Err(malformed(
                file,
                format!("entry {i}: path length does not match its flags"),
            ));
        }
        if path.len() > MAX_PATH {
            return Err(malformed(
                file,
                format!("entry {i}: a path longer than {MAX_PATH} bytes"),
            ));
        }
        path_bytes += path.len();
        if path_bytes > MAX_PATH_BYTES {
            return Err(malformed(
                file,
                format!("more than {} MiB of paths", MAX_PATH_BYTES >> 20),
            ));
        }
        let stage = (flags >> 12) & 3;
        // git keeps entries sorted by path, then stage, each once: duplicates are hostile
        if let Some(prev) = entries.last()
            && (prev.path.as_slice(), prev.stage) >= (path.as_slice(), stage)
        {
            return Err(malformed(
                file,
                format!("entry {i}: out of order or repeated"),
            ));
        }
        if !safe_path(&path) {
            let shown = String::from_utf8_lossy(&path).into_owned();
            return Err(malformed(
                file,
                format!("entry {i}: invalid path {shown:?}"),
            ));
        }
        entries.push(Entry {
            path,
            mtime,
            size,
            mode,
            id,
            stage,
            ignore_worktree: flags & 0x8000 != 0 || extended & 0x4000 != 0,
        });
    }
    Ok(entries)
}

/// SHA-1, which the `sha2` crate does not provide and git still uses by default. Only a
/// content address here (compared with ids git computed), not a security boundary.
struct Sha1 {
    state: [u32; 5],
    block: [u8; 64],
    filled: usize,
    total: u64,
}

impl Sha1 {
    fn new() -> Sha1 {
        Sha1 {
            state: [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0],
            block: [0; 64],
            filled: 0,
            total: 0,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        self.total = self.total.wrapping_add(data.len() as u64);
        while !data.is_empty() {
            let n = (64 - self.filled).min(data.len());
            let (head, rest) = data.split_at(n);
            self.block[self.filled..self.filled + n].copy_from_slice(head);
            self.filled += n;
            data = rest;
            if self.filled == 64 {
                sha1_compress(&mut self.state, &self.block);
                self.filled = 0;
            }
        }
    }

    fn finish(mut self) -> [u8; 20] {
        let bits = self.total.wrapping_mul(8);
        self.update(&[0x80]);
        while self.filled != 56 {
            self.update(&[0]);
        }
        self.update(&bits.to_be_bytes());
        let mut out = [0u8; 20];
        for (chunk, word) in out.chunks_exact_mut(4).zip(self.state) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        out
    }
}

/// The SHA-1 compression function (FIPS 180-4, 6.1.2).
fn sha1_compress(state: &mut [u32; 5], block: &[u8; 64]) {
    let mut w = [0u32; 80];
    for (wi, chunk) in w.iter_mut().zip(block.chunks_exact(4)) {
        *wi = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    for i in 16..80 {
        w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
    }
    let [mut a, mut b, mut c, mut d, mut e] = *state;
    for (i, wi) in w.iter().enumerate() {
        let (f, k) = match i {
            0..=19 => ((b & c) | (!b & d), 0x5a827999),
            20..=39 => (b ^ c ^ d, 0x6ed9eba1),
            40..=59 => ((b & c) | (b & d) | (c & d), 0x8f1bbcdc),
            _ => (b ^ c ^ d, 0xca62c1d6),
        };
        let t = a
            .rotate_left(5)
            .wrapping_add(f)
            .wrapping_add(e)
            .wrapping_add(k)
            .wrapping_add(*wi);
        e = d;
        d = c;
        c = b.rotate_left(30);
        b = a;
        a = t;
    }
    for (s, v) in state.iter_mut().zip([a, b, c, d, e]) {
        *s = s.wrapping_add(v);
    }
}

/// SHA-1 of the concatenation of `parts`.
fn sha1(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.finish()
}

/// Git's object hash, of the repository's format.
enum Hasher {
    Sha1(Sha1),
    Sha256(Sha256),
}

impl Hasher {
    /// A hasher fed git's blob header, `blob <len>\0`.
    fn blob(hash_len: usize, len: u64) -> Hasher {
        let mut h = if hash_len == 32 {
            Hasher::Sha256(Sha256::new())
        } else {
            Hasher::Sha1(Sha1::new())
        };
        h.update(format!("blob {len}\0").as_bytes());
        h
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => Digest::update(h, data),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha1(h) => h.finish().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        }
    }
}

/// The blob id of in-memory content (a symlink's target).
fn blob_id(hash_len: usize, data: &[u8]) -> Vec<u8> {
    if hash_len == 32 {
        let mut h = Hasher::blob(hash_len, data.len() as u64);
        h.update(data);
        h.finish()
    } else {
        sha1(&[format!("blob {}\0", data.len()).as_bytes(), data]).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Output};
    use tempfile::TempDir;

    fn git_unchecked(dir: &Path, args: &[&str]) -> Output {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "berth test")
            .env("GIT_AUTHOR_EMAIL", "test@berth.invalid")
            .env("GIT_COMMITTER_NAME", "berth test")
            .env("GIT_COMMITTER_EMAIL", "test@berth.invalid")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env_remove("GIT_INDEX_FILE")
            .env_remove("GIT_COMMON_DIR")
            .env_remove("GIT_OBJECT_DIRECTORY")
            .output()
            .unwrap_or_else(|e| panic!("running git {args:?}: {e}"))
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = git_unchecked(dir, args);
        assert!(
            out.status.success(),
            "git {args:?} in {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A fresh repository at `<tmp>/repo`, not committed to.
    fn init(extra: &[&str]) -> (TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("repo");
        fs::create_dir(&root).unwrap();
        let mut args = vec!["init", "-q", "-b", "main"];
        args.extend_from_slice(extra);
        git(&root, &args);
        (tmp, root)
    }

    /// A repository with one commit of `a.toml`, `sub/b.toml`, `sub/c.toml` and `notes.txt`.
    fn repo(extra: &[&str]) -> (TempDir, PathBuf) {
        let (tmp, root) = init(extra);
        fs::write(root.join("a.toml"), "a = 1\n").unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("sub/b.toml"), "b = 1\n").unwrap();
        fs::write(root.join("sub/c.toml"), "c = 1\n").unwrap();
        fs::write(root.join("notes.txt"), "notes\n").unwrap();
        git(&root, &["add", "."]);
        git(&root, &["commit", "-q", "-m", "first"]);
        (tmp, root)
    }

    fn rev(dir: &Path) -> Revision {
        revision(dir).expect("revision").expect("in a work tree")
    }

    fn index_version(root: &Path) -> u32 {
        let b = fs::read(root.join(".git/index")).unwrap();
        u32::from_be_bytes([b[4], b[5], b[6], b[7]])
    }

    #[test]
    fn sha1_known_vectors() {
        assert_eq!(
            hex::encode(sha1(&[b"abc".as_slice()])),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex::encode(sha1(&[])),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(
            hex::encode(sha1(&[long.as_slice()])),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        // Split across calls and blocks: the same as one piece.
        let million = vec![b'a'; 1_000_000];
        let (x, y) = million.split_at(333_333);
        assert_eq!(
            hex::encode(sha1(&[x, y])),
            "34aa973cd4c4daa4f61eeb2bdbad27316534016f"
        );
        // git's empty blob.
        assert_eq!(
            hex::encode(blob_id(20, b"")),
            "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
        );
    }

    #[test]
    fn clean_repository() {
        let (_tmp, root) = repo(&[]);
        let head = git(&root, &["rev-parse", "HEAD"]);
        let expected = Revision {
            commit: Some(head),
            branch: Some("main".into()),
            dirty: false,
        };
        assert_eq!(rev(&root), expected);
        assert_eq!(rev(&root.join("sub")), expected);
        // Rewritten with the same content: stat data differs, the hash does not.
        fs::write(root.join("a.toml"), "a = 1\n").unwrap();
        assert!(!rev(&root).dirty);
    }

    #[test]
    fn modified_tracked_manifest_is_dirty() {
        let (_tmp, root) = repo(&[]);
        fs::write(root.join("sub/b.toml"), "b = 2\n# changed\n").unwrap();
        assert!(rev(&root).dirty);
        assert!(rev(&root.join("sub")).dirty);
    }

    #[test]
    fn same_size_modification_is_dirty() {
        let (_tmp, root) = repo(&[]);
        fs::write(root.join("a.toml"), "a = 2\n").unwrap();
        assert!(rev(&root).dirty);
    }

    #[test]
    fn deleted_and_mode_changes_are_dirty() {
        let (_tmp, root) = repo(&[]);
        fs::remove_file(root.join("notes.txt")).unwrap();
        assert!(rev(&root).dirty);
        let (_tmp, root) = repo(&[]);
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(root.join("a.toml"), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(rev(&root).dirty);
    }

    #[test]
    fn changes_outside_the_manifest_directory_do_not_count() {
        let (_tmp, root) = repo(&[]);
        fs::write(root.join("a.toml"), "a = 2\n# changed\n").unwrap();
        fs::write(root.join("new.toml"), "x = 1\n").unwrap();
        assert!(!rev(&root.join("sub")).dirty);
        assert!(rev(&root).dirty);
    }

    #[test]
    fn untracked_manifest_is_dirty_other_files_are_not() {
        let (_tmp, root) = repo(&[]);
        fs::write(root.join("sub/readme.md"), "hi\n").unwrap();
        fs::create_dir(root.join("sub/deeper")).unwrap();
        fs::write(root.join("sub/deeper/x.txt"), "x\n").unwrap();
        assert!(!rev(&root).dirty);
        fs::write(root.join("sub/deeper/new.toml"), "x = 1\n").unwrap();
        assert!(rev(&root).dirty);
        assert!(rev(&root.join("sub")).dirty);
    }

    #[test]
    fn symlinks_are_hashed_by_target() {
        let (_tmp, root) = repo(&[]);
        std::os::unix::fs::symlink("a.toml", root.join("link.toml")).unwrap();
        git(&root, &["add", "link.toml"]);
        git(&root, &["commit", "-q", "-m", "link"]);
        assert!(!rev(&root).dirty);
        fs::remove_file(root.join("link.toml")).unwrap();
        std::os::unix::fs::symlink("a.toml", root.join("link.toml")).unwrap();
        assert!(!rev(&root).dirty, "recreated link with the same target");
        fs::remove_file(root.join("link.toml")).unwrap();
        std::os::unix::fs::symlink("notes.txt", root.join("link.toml")).unwrap();
        assert!(rev(&root).dirty);
    }

    #[test]
    fn detached_head() {
        let (_tmp, root) = repo(&[]);
        git(&root, &["checkout", "-q", "--detach"]);
        let r = rev(&root);
        assert_eq!(r.branch, None);
        assert_eq!(r.commit, Some(git(&root, &["rev-parse", "HEAD"])));
        assert!(!r.dirty);
    }

    #[test]
    fn packed_refs() {
        let (_tmp, root) = repo(&[]);
        let head = git(&root, &["rev-parse", "HEAD"]);
        git(&root, &["tag", "-a", "-m", "annotated", "v1"]);
        git(&root, &["pack-refs", "--all"]);
        assert!(!root.join(".git/refs/heads/main").exists());
        let r = rev(&root);
        assert_eq!(r.commit, Some(head));
        assert_eq!(r.branch.as_deref(), Some("main"));
    }

    #[test]
    fn chained_symbolic_refs() {
        let (_tmp, root) = repo(&[]);
        let head = git(&root, &["rev-parse", "HEAD"]);
        fs::write(root.join(".git/refs/heads/alias"), "ref: refs/heads/main\n").unwrap();
        fs::write(root.join(".git/HEAD"), "ref: refs/heads/alias\n").unwrap();
        let r = rev(&root);
        assert_eq!(r.commit, Some(head));
        assert_eq!(r.branch.as_deref(), Some("alias"));
        // A loop ends in an error.
        fs::write(
            root.join(".git/refs/heads/alias"),
            "ref: refs/heads/alias\n",
        )
        .unwrap();
        assert!(matches!(revision(&root), Err(GitError::Malformed { .. })));
        // A ref naming a file outside the repository is refused.
        fs::write(root.join(".git/HEAD"), "ref: ../../../etc/passwd\n").unwrap();
        assert!(matches!(revision(&root), Err(GitError::Malformed { .. })));
    }

    #[test]
    fn unborn_branch() {
        let (_tmp, root) = init(&[]);
        let r = rev(&root);
        assert_eq!(r.commit, None);
        assert_eq!(r.branch.as_deref(), Some("main"));
        assert!(!r.dirty);
        fs::write(root.join("a.toml"), "a = 1\n").unwrap();
        assert!(rev(&root).dirty);
        git(&root, &["add", "a.toml"]);
        let r = rev(&root);
        assert_eq!(r.commit, None);
        assert!(!r.dirty, "staged, matching the index");
    }

    #[test]
    fn index_versions_3_and_4() {
        let (_tmp, root) = repo(&[]);
        let expected = rev(&root);
        git(&root, &["update-index", "--index-version", "4"]);
        assert_eq!(index_version(&root), 4);
        assert_eq!(rev(&root), expected);
        assert!(!rev(&root.join("sub")).dirty);
        fs::write(root.join("sub/c.toml"), "c = 2\n# changed\n").unwrap();
        assert!(rev(&root).dirty);
        fs::write(root.join("sub/c.toml"), "c = 1\n").unwrap();

        // Skip-worktree is an extended flag: git writes version 3 for it.
        git(&root, &["update-index", "--index-version", "2"]);
        git(&root, &["update-index", "--skip-worktree", "notes.txt"]);
        assert_eq!(index_version(&root), 3);
        fs::remove_file(root.join("notes.txt")).unwrap();
        assert_eq!(rev(&root), expected, "skip-worktree files are not compared");
    }

    #[test]
    fn conflicted_file_is_dirty() {
        let (_tmp, root) = repo(&[]);
        git(&root, &["checkout", "-q", "-b", "other"]);
        fs::write(root.join("a.toml"), "a = 'other'\n").unwrap();
        git(&root, &["commit", "-q", "-am", "other"]);
        git(&root, &["checkout", "-q", "main"]);
        fs::write(root.join("a.toml"), "a = 'main'\n").unwrap();
        git(&root, &["commit", "-q", "-am", "main"]);
        let out = git_unchecked(&root, &["merge", "-q", "other"]);
        assert!(!out.status.success(), "the merge was meant to conflict");
        assert!(rev(&root).dirty);
        assert!(!rev(&root.join("sub")).dirty);
    }

    #[test]
    fn linked_worktree() {
        let (tmp, root) = repo(&[]);
        git(&root, &["worktree", "add", "-q", "../wt", "-b", "other"]);
        let wt = tmp.path().join("wt");
        let r = rev(&wt.join("sub"));
        assert_eq!(r.commit, Some(git(&root, &["rev-parse", "HEAD"])));
        assert_eq!(r.branch.as_deref(), Some("other"));
        assert!(!r.dirty);
        fs::write(wt.join("sub/b.toml"), "b = 2\n# changed\n").unwrap();
        assert!(rev(&wt).dirty);
        assert!(!rev(&root).dirty, "the main work tree is untouched");
    }

    #[test]
    fn relative_gitdir_file() {
        let (tmp, root) = repo(&[]);
        let head = git(&root, &["rev-parse", "HEAD"]);
        fs::rename(root.join(".git"), tmp.path().join("store.git")).unwrap();
        fs::write(root.join(".git"), "gitdir: ../store.git\n").unwrap();
        let r = rev(&root.join("sub"));
        assert_eq!(r.commit, Some(head));
        assert!(!r.dirty);
    }

    #[test]
    fn sha256_repository() {
        let (_tmp, root) = repo(&["--object-format=sha256"]);
        let r = rev(&root);
        let head = git(&root, &["rev-parse", "HEAD"]);
        assert_eq!(head.len(), 64);
        assert_eq!(r.commit, Some(head));
        assert!(!r.dirty);
        fs::write(root.join("a.toml"), "a = 1\n").unwrap();
        assert!(!rev(&root).dirty, "rewritten, same content");
        fs::write(root.join("a.toml"), "a = 2\n").unwrap();
        assert!(rev(&root).dirty);
    }

    #[test]
    fn garbage_index_is_an_error_not_a_panic() {
        let (_tmp, root) = repo(&[]);
        let path = root.join(".git/index");
        let good = fs::read(&path).unwrap();
        let entries = parse_index(&good, &path, 20).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.path.as_slice()).collect();
        let expected: [&[u8]; 4] = [b"a.toml", b"notes.txt", b"sub/b.toml", b"sub/c.toml"];
        assert_eq!(names, expected);

        // Every truncation before the end of the entries is an error; after it, the ignored
        // extensions and checksum are all that is missing.
        let end = (0..=good.len())
            .find(|&n| parse_index(&good[..n], &path, 20).is_ok())
            .unwrap();
        assert!(end > 12 && end < good.len());
        for n in 0..end {
            assert!(
                parse_index(&good[..n], &path, 20).is_err(),
                "truncated at {n}"
            );
        }
        // Any flipped byte parses or fails; it never panics.
        for i in 0..good.len() {
            for mask in [0x01, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= mask;
                let _ = parse_index(&bad, &path, 20);
                let _ = parse_index(&bad, &path, 32);
            }
        }
        // A huge entry count does not allocate for it.
        let mut huge = good[..12].to_vec();
        huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_index(&huge, &path, 20).is_err());

        fs::write(&path, &good[..end - 3]).unwrap();
        assert!(matches!(revision(&root), Err(GitError::Malformed { .. })));
        fs::write(&path, b"not an index at all").unwrap();
        assert!(matches!(revision(&root), Err(GitError::Malformed { .. })));
        fs::write(&path, b"").unwrap();
        assert!(matches!(revision(&root), Err(GitError::Malformed { .. })));
    }

    #[test]
    fn outside_any_repository() {
        let tmp = tempfile::tempdir().unwrap();
        let canonical = fs::canonicalize(tmp.path()).unwrap();
        if let Some(a) = canonical.ancestors().find(|a| a.join(".git").exists()) {
            eprintln!(
                "skipped: the temporary directory is inside a git work tree at {}",
                a.display()
            );
            return;
        }
        assert_eq!(revision(tmp.path()).unwrap(), None);
    }

    /// The attacks an attack review found, each refused.
    #[test]
    fn hostile_repositories_are_refused() {
        let (_tmp, root) = repo(&[]);
        let path = root.join(".git/index");
        let good = fs::read(&path).unwrap();
        // the first entry twice: duplicates (which made a pass hash one file forever) are out
        let entries = parse_index(&good, &path, 20).unwrap();
        let first_len = {
            // v2: 62 bytes of fields, the path, NUL padding to a multiple of 8
            let n = 62 + entries[0].path.len();
            (n + 8) & !7
        };
        let mut dup = good[..12].to_vec();
        dup[8..12].copy_from_slice(&2u32.to_be_bytes());
        dup.extend_from_slice(&good[12..12 + first_len]);
        dup.extend_from_slice(&good[12..12 + first_len]);
        let e = parse_index(&dup, &path, 20).unwrap_err().to_string();
        assert!(e.contains("out of order or repeated"), "{e}");

        // v4 paths are capped each and in all (they grew quadratically before)
        git(&root, &["update-index", "--index-version", "4"]);
        let v4 = fs::read(&path).unwrap();
        let mut long = v4[..12].to_vec();
        long[8..12].copy_from_slice(&1u32.to_be_bytes());
        long.extend_from_slice(&v4[12..12 + 62]);
        // flags: name length 0xfff (too long to say), no strip, a 5000-byte name
        let at = long.len() - 2;
        long[at..].copy_from_slice(&0x0fffu16.to_be_bytes());
        long.push(0);
        long.extend(std::iter::repeat_n(b'a', 5000));
        long.push(0);
        let e = parse_index(&long, &path, 20).unwrap_err().to_string();
        assert!(e.contains("longer than 4096"), "{e}");

        // a ref with an escape sequence in its name is not taken (nor printed raw)
        fs::write(
            root.join(".git/HEAD"),
            "ref: refs/heads/main\x1b]0;OWNED\x07\n",
        )
        .unwrap();
        let e = revision(&root).unwrap_err().to_string();
        assert!(e.contains("invalid ref name") && !e.contains('\x1b'), "{e}");
        fs::write(root.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();

        // an index entry through a symlink reads nothing outside the work tree: dirty,
        // whatever the file there holds
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "a = 1\n").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("l")).unwrap();
        let blob = git(&root, &["hash-object", "-w", "a.toml"]);
        git(
            &root,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("100644,{},l/secret", blob.trim()),
            ],
        );
        assert!(rev(&root).dirty, "l/secret is not read through the link");

        // a .git owned by someone else (planted in a shared ancestor) is ignored
        let (_t2, other) = repo(&[]);
        nix::unistd::chown(
            &other.join(".git"),
            Some(nix::unistd::Uid::from_raw(12345)),
            None,
        )
        .unwrap();
        assert_eq!(revision(&other).unwrap(), None);
    }
}
