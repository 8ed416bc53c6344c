//! Small file-system helpers shared by the state records, the store and the runtime.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An IO error with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct PathError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl PathError {
    pub fn new(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        PathError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// 10 hex digits of the SHA-256 of `parts` (each followed by a NUL): short names that tell
/// state directories apart (bridges, veths, cgroups).
pub fn short_hash(parts: &[&[u8]]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..5])
}

/// 16 random hex digits, for names that must not collide (scratch files, a container's
/// directory).
pub fn random_hex() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    hex::encode(b)
}

/// `path` made absolute and free of symlinks, or as it is when that fails.
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `map_err` helper: `.map_err(at("read", &path))`.
pub fn at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PathError + 'a {
    move |e| PathError::new(op, path, e)
}

/// berth's umask: everything it creates is private to root unless it says otherwise. Image
/// layers and containers' writable layers hold setuid files, and records and configs hold
/// containers' secrets (their env): no local user may read or run them.
pub const UMASK: u32 = 0o077;

/// Create `path` (and missing parents, under the umask) and give the last component exactly
/// `mode`, whatever the umask: for the few directories others must traverse or read (a
/// volume's data, a container's writable layer that becomes its `/`).
pub fn create_dir_mode(path: &Path, mode: u32) -> Result<(), PathError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).map_err(at("create directory", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(at("chmod", path))
}

/// Write `bytes` to `path` with exactly `mode` (not atomic): for small files that are
/// bind-mounted into containers and must be readable by their users.
pub fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Write `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync the folder.
/// Readers see the old content or the new, never a torn write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PathError> {
    write_atomic_opts(path, bytes, true)
}

/// Like [`write_atomic`] but without fsync: readers see the old or the new file, never a
/// mix, but a power loss may lose the write. For state that dies with the host anyway (a
/// running container's pid).
pub fn write_atomic_volatile(path: &Path, bytes: &[u8]) -> Result<(), PathError> {
    write_atomic_opts(path, bytes, false)
}

fn write_atomic_opts(path: &Path, bytes: &[u8], durable: bool) -> Result<(), PathError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(at("create directory", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(at("create", &tmp))?;
        f.write_all(bytes).map_err(at("write", &tmp))?;
        if durable {
            f.sync_all().map_err(at("fsync", &tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(at("rename into place", path))?;
        if durable { sync_dir(dir) } else { Ok(()) }
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// fsync a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), PathError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at("fsync directory", dir))
}

/// fsync a file and its directory: makes earlier volatile writes of it durable.
pub fn sync_file(path: &Path) -> Result<(), PathError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(at("fsync", path))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Serialize to pretty JSON and write atomically.
fn json_bytes<T: serde::Serialize>(path: &Path, v: &T) -> Result<Vec<u8>, PathError> {
    let mut bytes = serde_json::to_vec_pretty(v)
        .map_err(|e| PathError::new("serialize", path, std::io::Error::other(e)))?;
    bytes.push(b'\n');
    Ok(bytes)
}

pub fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<(), PathError> {
    write_atomic(path, &json_bytes(path, v)?)
}

/// [`write_json`] through [`write_atomic_volatile`].
pub fn write_json_volatile<T: serde::Serialize>(path: &Path, v: &T) -> Result<(), PathError> {
    write_atomic_volatile(path, &json_bytes(path, v)?)
}

/// Read a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, PathError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| PathError::new("parse JSON", path, std::io::Error::other(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PathError::new("read", path, e)),
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Read into `buf` until it is full or the reader ends; returns the bytes read (short only at
/// the end). Decompressors hand out a few kilobytes per call; their consumers work best on
/// large pieces (one large write costs the page cache much less than many small ones).
pub fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Open a regular file for reading with no side effect on anything else: the path is first
/// opened `O_PATH` (which opens no device, FIFO or terminal: a link to `/dev/watchdog` arms
/// nothing), checked to be a regular file, and only then opened for reading, through that
/// descriptor. With `beneath`, `path` is relative to that directory and resolved inside it,
/// through no symlink at all.
pub fn open_regular(path: &Path, beneath: Option<&Path>) -> std::io::Result<std::fs::File> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
    let fd = match beneath {
        Some(dir) => {
            let d = nix::fcntl::open(
                dir,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )?;
            let how = OpenHow::new().flags(flags).resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
            nix::fcntl::openat2(&d, path, how)?
        }
        None => nix::fcntl::open(path, flags, nix::sys::stat::Mode::empty())?,
    };
    let st = nix::sys::stat::fstat(&fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        let what = match st.st_mode & libc::S_IFMT {
            libc::S_IFIFO => "a FIFO",
            libc::S_IFSOCK => "a socket",
            libc::S_IFCHR | libc::S_IFBLK => "a device",
            libc::S_IFDIR => "a directory",
            _ => "not a regular file",
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what}; only regular files are read"),
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x/y.json");
        write_json(&p, &vec![1, 2]).unwrap();
        write_json(&p, &vec![3]).unwrap();
        let v: Vec<i32> = read_json(&p).unwrap().unwrap();
        assert_eq!(v, vec![3]);
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        assert!(
            read_json::<Vec<i32>>(&d.path().join("none"))
                .unwrap()
                .is_none()
        );
    }
}
