//! The content store: an OCI image layout under `STATE/store` (readable by `skopeo copy
//! oci:STATE/store:REF …`), plus unpacked layer snapshots keyed by chain ID under
//! `STATE/snapshots`.
//!
//! Blobs are written to `ingest/` and enter `blobs/sha256/` only after their size and digest
//! were verified, by an atomic rename: nothing half-written is ever visible. `index.json` maps
//! references (the `org.opencontainers.image.ref.name` annotation holds the full normalised
//! reference) to image manifests; it is rewritten atomically under a lock.

pub mod targuard;
pub mod unpack;

use crate::fsutil::{self, PathError, at};
use crate::registry::reference::valid_digest;
use crate::registry::types::{
    Descriptor, Document, ImageConfig, Index, Manifest, REF_NAME_ANNOTATION, chain_ids,
    parse_document,
};
use sha2::Digest as _;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] PathError),
    #[error(
        "blob {digest}: size {actual} does not match the expected {expected}; the bytes were discarded"
    )]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest}: content hashes to {actual}; the bytes were discarded")]
    DigestMismatch { digest: String, actual: String },
    #[error("invalid digest \"{}\"", crate::text::printable(.0, 100))]
    BadDigest(String),
    /// Writing a blob would leave less than the reserve free.
    #[error(
        "writing {path}: the store's file system would keep less than its reserve of {reserve} bytes free ({available} available, {needed} needed)"
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
        reserve: u64,
    },
    #[error("image {0} is not in the store")]
    NotFound(String),
    #[error(
        "pulls or imports in progress held the store for {0}s; nothing was collected (try again)"
    )]
    Busy(u64),
    #[error("blob {0} is missing from the store")]
    MissingBlob(String),
    #[error("{what} {digest} is malformed: {message}")]
    Malformed {
        what: &'static str,
        digest: String,
        message: String,
    },
}

/// A stored image: its reference, manifest and config.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub reference: String,
    pub descriptor: Descriptor,
    pub manifest: Manifest,
    pub config: ImageConfig,
}

impl StoredImage {
    pub fn digest(&self) -> &str {
        &self.descriptor.digest
    }
    /// Chain IDs of the layers, bottom first.
    pub fn chain_ids(&self) -> Vec<String> {
        chain_ids(&self.config.rootfs.diff_ids)
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
    pub snapshots: PathBuf,
    /// Bytes the file system must keep free: a blob that would take them is refused
    /// ([`StoreError::NoSpace`]); 0: no check.
    pub min_free: u64,
}

fn hex_of(digest: &str) -> Result<&str, StoreError> {
    if !valid_digest(digest) {
        return Err(StoreError::BadDigest(digest.to_string()));
    }
    Ok(&digest["sha256:".len()..])
}

/// Held while one berth process works on a key (a layer, the index); released on drop.
pub struct KeyLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Held by a pull or an import for as long as it writes to the store (a shared lock on
/// `gc.lock`): [`Store::gc`] takes the lock exclusively, so it never collects what a writer has
/// stored but not yet tagged, and the ingest files it finds are no live writer's. containerd's
/// leases, coarse: a collection waits for the writers in progress, and new ones wait for it.
pub struct Lease {
    _lock: nix::fcntl::Flock<File>,
}

impl Store {
    /// Take a [`Lease`] (blocking while a collection runs).
    pub fn lease(&self) -> Result<Lease, StoreError> {
        let f = self.gc_lock_file()?;
        Ok(Lease {
            _lock: flock(
                f,
                nix::fcntl::FlockArg::LockShared,
                &self.root.join("gc.lock"),
            )?,
        })
    }

    fn gc_lock_file(&self) -> Result<File, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(&self.root).map_err(at("create directory", &self.root))?;
        let p = self.root.join("gc.lock");
        std::fs::OpenOptions::new()
            .mode(0o600)
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| PathError::new("open", &p, e).into())
    }

    pub fn new(root: impl Into<PathBuf>, snapshots: impl Into<PathBuf>) -> Self {
        Store {
            root: root.into(),
            snapshots: snapshots.into(),
            min_free: 0,
        }
    }

    /// The same store, keeping `bytes` free (see [`Store::min_free`]).
    pub fn with_min_free(mut self, bytes: u64) -> Self {
        self.min_free = bytes;
        self
    }

    /// Create the layout files if missing.
    pub fn init(&self) -> Result<(), StoreError> {
        for d in [
            self.root.join("blobs/sha256"),
            self.root.join("ingest"),
            self.root.join("locks"),
            self.snapshots.clone(),
        ] {
            std::fs::create_dir_all(&d).map_err(at("create directory", &d))?;
        }
        let layout = self.root.join("oci-layout");
        if !layout.exists() {
            fsutil::write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = self.root.join("index.json");
        if !index.exists() {
            fsutil::write_json(&index, &Index::default())?;
        }
        Ok(())
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// The size of a stored blob, if the store has it.
    pub fn blob_size(&self, digest: &str) -> Option<u64> {
        let p = self.blob_path(digest).ok()?;
        std::fs::metadata(p)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// Whether the store has the blob a descriptor names: the blob is present only if it is
    /// also of the descriptor's size (a manifest that lies about the size of a blob the store
    /// already holds is refused, as a download of a wrong size would be).
    pub fn has_blob_sized(&self, digest: &str, size: u64) -> Result<bool, StoreError> {
        match self.blob_size(digest) {
            None => Ok(false),
            Some(actual) if actual == size => Ok(true),
            Some(actual) => Err(StoreError::SizeMismatch {
                digest: digest.to_string(),
                expected: size,
                actual,
            }),
        }
    }

    /// The bytes an image's config and layers take in the store (each blob once), from the
    /// blobs themselves, not from what its manifest claims.
    pub fn image_size(&self, img: &StoredImage) -> u64 {
        let digests: BTreeSet<&str> = std::iter::once(&img.manifest.config)
            .chain(&img.manifest.layers)
            .map(|d| d.digest.as_str())
            .collect();
        digests.iter().filter_map(|d| self.blob_size(d)).sum()
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(digest)?;
        match std::fs::read(&p) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::MissingBlob(digest.into()))
            }
            Err(e) => Err(PathError::new("read", &p, e).into()),
        }
    }

    /// Take an exclusive lock on `key` (blocking), shared across threads and processes.
    pub fn lock_key(&self, key: &str) -> Result<KeyLock, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.root.join("locks");
        std::fs::create_dir_all(&dir).map_err(at("create directory", &dir))?;
        let p = dir.join(key.replace([':', '/'], "_"));
        let f = std::fs::OpenOptions::new()
            .mode(0o600)
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(at("open", &p))?;
        let mut f = f;
        loop {
            match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive) {
                Ok(l) => {
                    // gc removes lock files nobody holds: if ours went while we waited, the
                    // next locker would make a new one, so lock that one instead
                    if same_file(&l, &p) {
                        return Ok(KeyLock { _lock: l });
                    }
                    drop(l);
                    return self.lock_key(key);
                }
                Err((back, nix::errno::Errno::EINTR)) => f = back,
                Err((_, e)) => return Err(PathError::new("lock", &p, e.into()).into()),
            }
        }
    }

    /// Remove the lock files no process holds (all but `keep`); each is removed while locked,
    /// and [`Store::lock_key`] checks that the file it locked is still the one at the path.
    fn prune_locks(&self, keep: &str) -> Result<(), StoreError> {
        let dir = self.root.join("locks");
        for name in read_dir_names(&dir)? {
            if name == keep {
                continue;
            }
            let p = dir.join(&name);
            let Ok(f) = File::open(&p) else {
                continue;
            };
            if let Ok(l) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
                && same_file(&l, &p)
            {
                std::fs::remove_file(&p).map_err(at("remove", &p))?;
            }
        }
        Ok(())
    }

    /// Start writing a blob whose digest and size are known in advance.
    pub fn ingest(&self, digest: &str, size: Option<u64>) -> Result<Ingest, StoreError> {
        hex_of(digest)?;
        let dir = self.root.join("ingest");
        std::fs::create_dir_all(&dir).map_err(at("create directory", &dir))?;
        let tmp = tempfile_in(&dir, &digest["sha256:".len()..])?;
        // a blob that would eat into the reserve is refused before a byte is written
        if self.min_free > 0
            && let Some(available) = free_bytes(&dir)
            && size.unwrap_or(0).saturating_add(self.min_free) > available
        {
            return Err(StoreError::NoSpace {
                path: tmp,
                needed: size.unwrap_or(0),
                available,
                reserve: self.min_free,
            });
        }
        let (file, direct) = create_blob_file(&tmp, size)?;
        Ok(Ingest {
            final_path: self.blob_path(digest)?,
            tmp,
            file: Some(file),
            direct,
            hasher: Some(sha2::Sha256::new()),
            written: 0,
            queued: 0,
            digest: digest.to_string(),
            size,
            min_free: self.min_free,
            checked: 0,
        })
    }

    /// Store bytes whose digest is computed here; returns the digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let digest = crate::registry::types::sha256_digest(bytes);
        if !self.has_blob(&digest) {
            let mut w = self.ingest(&digest, Some(bytes.len() as u64))?;
            w.write_all(bytes).map_err(at("write", &w.tmp.clone()))?;
            w.commit()?;
        }
        Ok(digest)
    }

    /// Store bytes that must hash to `digest`.
    pub fn put_verified(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
        if self.has_blob(digest) {
            return Ok(());
        }
        let mut w = self.ingest(digest, Some(bytes.len() as u64))?;
        w.write_all(bytes).map_err(at("write", &w.tmp.clone()))?;
        w.commit()
    }

    pub fn read_index(&self) -> Result<Index, StoreError> {
        let p = self.root.join("index.json");
        Ok(fsutil::read_json(&p)?.unwrap_or_default())
    }

    fn write_index(&self, idx: &Index) -> Result<(), StoreError> {
        Ok(fsutil::write_json(&self.root.join("index.json"), idx)?)
    }

    /// Point `reference` at the manifest `desc` (replacing what it pointed at).
    pub fn tag(&self, reference: &str, desc: &Descriptor) -> Result<(), StoreError> {
        self.init()?;
        let _l = self.lock_key("index")?;
        let mut idx = self.read_index()?;
        idx.manifests.retain(|d| {
            d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) != Some(reference)
        });
        let mut d = desc.clone();
        d.annotations
            .insert(REF_NAME_ANNOTATION.into(), reference.to_string());
        idx.manifests.push(d);
        idx.manifests.sort_by(|a, b| {
            a.annotations
                .get(REF_NAME_ANNOTATION)
                .cmp(&b.annotations.get(REF_NAME_ANNOTATION))
        });
        self.write_index(&idx)
    }

    /// Remove a reference; returns the descriptor it pointed at.
    pub fn untag(&self, reference: &str) -> Result<Option<Descriptor>, StoreError> {
        let _l = self.lock_key("index")?;
        let mut idx = self.read_index()?;
        let pos = idx.manifests.iter().position(|d| {
            d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) == Some(reference)
        });
        let removed = pos.map(|p| idx.manifests.remove(p));
        if removed.is_some() {
            self.write_index(&idx)?;
        }
        Ok(removed)
    }

    /// References in the store, with their manifest descriptors.
    pub fn references(&self) -> Result<BTreeMap<String, Descriptor>, StoreError> {
        Ok(self
            .read_index()?
            .manifests
            .into_iter()
            .filter_map(|d| {
                d.annotations
                    .get(REF_NAME_ANNOTATION)
                    .cloned()
                    .map(|r| (r, d))
            })
            .collect())
    }

    /// Load an image by manifest descriptor.
    pub fn load(&self, reference: &str, desc: &Descriptor) -> Result<StoredImage, StoreError> {
        let bytes = self.read_blob(&desc.digest)?;
        let manifest = match parse_document(&bytes, Some(&desc.media_type)) {
            Ok(Document::Manifest(m)) => m,
            Ok(Document::Index(_)) => {
                return Err(StoreError::Malformed {
                    what: "manifest",
                    digest: desc.digest.clone(),
                    message: "is an index, not an image manifest".into(),
                });
            }
            Err(e) => {
                return Err(StoreError::Malformed {
                    what: "manifest",
                    digest: desc.digest.clone(),
                    message: e.to_string(),
                });
            }
        };
        let cbytes = self.read_blob(&manifest.config.digest)?;
        let config: ImageConfig =
            serde_json::from_slice(&cbytes).map_err(|e| StoreError::Malformed {
                what: "image config",
                digest: manifest.config.digest.clone(),
                message: e.to_string(),
            })?;
        Ok(StoredImage {
            reference: reference.to_string(),
            descriptor: desc.clone(),
            manifest,
            config,
        })
    }

    /// Look an image up by reference (exact normalised string) or by manifest digest.
    pub fn get(&self, reference: &str) -> Result<StoredImage, StoreError> {
        let refs = self.references()?;
        if let Some(d) = refs.get(reference) {
            return self.load(reference, d);
        }
        if let Some((r, d)) = refs.iter().find(|(_, d)| {
            d.digest == reference
                || d.digest
                    .strip_prefix("sha256:")
                    .is_some_and(|h| reference.len() >= 12 && h.starts_with(reference))
        }) {
            return self.load(r, d);
        }
        Err(StoreError::NotFound(reference.to_string()))
    }

    pub fn snapshot_dir(&self, chain_id: &str) -> Result<PathBuf, StoreError> {
        Ok(self.snapshots.join(hex_of(chain_id)?))
    }

    pub fn has_snapshot(&self, chain_id: &str) -> bool {
        self.snapshot_dir(chain_id)
            .map(|p| p.join("fs").is_dir())
            .unwrap_or(false)
    }

    /// A fresh directory to unpack into; [`Store::commit_snapshot`] renames it into place.
    pub fn prepare_snapshot(&self, chain_id: &str) -> Result<PathBuf, StoreError> {
        std::fs::create_dir_all(&self.snapshots)
            .map_err(at("create directory", &self.snapshots))?;
        let tmp = tempfile_in(&self.snapshots, &format!(".tmp-{}", hex_of(chain_id)?))?;
        let fs = tmp.join("fs");
        std::fs::create_dir_all(&fs).map_err(at("create directory", &fs))?;
        Ok(tmp)
    }

    pub fn commit_snapshot(&self, tmp: &Path, chain_id: &str) -> Result<(), StoreError> {
        let dest = self.snapshot_dir(chain_id)?;
        if dest.exists() {
            remove_tree(tmp)?;
            return Ok(());
        }
        std::fs::rename(tmp, &dest).map_err(at("rename into place", &dest))?;
        fsutil::sync_dir(&self.snapshots)?;
        Ok(())
    }

    /// Remove blobs and snapshots no reference needs (also leftovers in ingest/).
    /// `keep_chains` adds snapshots in use by containers. Returns bytes freed.
    pub fn gc(&self, keep_chains: &BTreeSet<String>) -> Result<u64, StoreError> {
        // no writer in progress (before the index lock: a writer takes that one under its lease)
        let lock_path = self.root.join("gc.lock");
        let f = self.gc_lock_file()?;
        // waiting a bounded time: the caller may hold the state directory's lock
        let end = std::time::Instant::now() + GC_WAIT;
        let mut f = f;
        let mut said = false;
        let _gc = loop {
            match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((back, nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR)) => {
                    if std::time::Instant::now() >= end {
                        return Err(StoreError::Busy(GC_WAIT.as_secs()));
                    }
                    if !said {
                        tracing::warn!("waiting for the pulls and imports in progress to finish");
                        said = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    f = back;
                }
                Err((_, e)) => return Err(PathError::new("lock", &lock_path, e.into()).into()),
            }
        };
        let _l = self.lock_key("index")?;
        let mut blobs: BTreeSet<String> = BTreeSet::new();
        let mut chains: BTreeSet<String> = keep_chains
            .iter()
            .filter_map(|c| hex_of(c).ok().map(str::to_string))
            .collect();
        for (r, d) in self.references()? {
            blobs.insert(d.digest.clone());
            if let Ok(img) = self.load(&r, &d) {
                blobs.insert(img.manifest.config.digest.clone());
                blobs.extend(img.manifest.layers.iter().map(|l| l.digest.clone()));
                chains.extend(
                    img.chain_ids()
                        .iter()
                        .filter_map(|c| hex_of(c).ok().map(str::to_string)),
                );
            }
        }
        let mut freed = 0;
        let bdir = self.root.join("blobs/sha256");
        for e in read_dir_names(&bdir)? {
            if !blobs.contains(&format!("sha256:{e}")) {
                let p = bdir.join(&e);
                freed += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&p).map_err(at("remove", &p))?;
            }
        }
        for e in read_dir_names(&self.snapshots)? {
            if !chains.contains(&e) {
                let p = self.snapshots.join(&e);
                freed += tree_size(&p);
                remove_tree(&p)?;
            }
        }
        // what a killed pull or import left (every live writer holds a lease)
        let ingest = self.root.join("ingest");
        for e in read_dir_names(&ingest)? {
            let p = ingest.join(&e);
            freed += tree_size(&p);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => remove_tree(&p)?,
                Ok(_) => std::fs::remove_file(&p).map_err(at("remove", &p))?,
                Err(_) => {}
            }
        }
        self.prune_locks("index")?;
        Ok(freed)
    }
}

/// Writes a blob to ingest/, hashing as it goes; `commit` verifies and renames into place.
/// Dropped without commit, the partial file is removed.
pub struct Ingest {
    pub tmp: PathBuf,
    final_path: PathBuf,
    file: Option<File>,
    /// Set when `file` was opened with `O_DIRECT` (see [`create_blob_file`]).
    direct: Option<DirectBuf>,
    /// None when the caller hashes what it writes ([`Ingest::hashed_by_caller`]).
    hasher: Option<sha2::Sha256>,
    written: u64,
    /// Bytes handed to writeback so far (see [`WRITEBACK_STEP`]).
    queued: u64,
    digest: String,
    size: Option<u64>,
    /// The store's reserve, looked at again every [`RESERVE_STEP`] bytes (others write too).
    min_free: u64,
    /// `written` when the free space was last looked at.
    checked: u64,
}

/// The longest a collection waits for the pulls and imports in progress.
const GC_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Bytes an ingest writes between two looks at the free space.
const RESERVE_STEP: u64 = 64 << 20;

/// Bytes available to an unprivileged writer on the file system of `p`.
fn free_bytes(p: &Path) -> Option<u64> {
    nix::sys::statvfs::statvfs(p)
        .ok()
        .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
}

/// Every this many bytes, an ingest starts writing the blob back to disk, so that the fsync at
/// commit does not wait for a whole layer's worth of dirty pages.
const WRITEBACK_STEP: u64 = 8 << 20;

impl Write for Ingest {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("ingest already finished"))?;
        if let Some(s) = self.size
            && self.written + buf.len() as u64 > s
        {
            return Err(std::io::Error::other(format!(
                "blob {} is larger than its declared size {s}",
                self.digest
            )));
        }
        if self.min_free > 0 && self.written - self.checked >= RESERVE_STEP {
            self.checked = self.written;
            if let Some(dir) = self.tmp.parent()
                && let Some(available) = free_bytes(dir)
                && available < self.min_free
            {
                return Err(std::io::Error::other(format!(
                    "the store's file system is down to {available} bytes free, below its reserve of {} bytes",
                    self.min_free
                )));
            }
        }
        let n = match &mut self.direct {
            Some(d) => d.write(f, buf)?,
            None => f.write(buf)?,
        };
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.written += n as u64;
        if self.direct.is_none() && self.written - self.queued >= WRITEBACK_STEP {
            // best effort: a filesystem without it just leaves the work to the fsync
            let _ = crate::sys::start_writeback(f.as_fd(), self.queued, self.written - self.queued);
            self.queued = self.written;
        }
        Ok(n)
    }
    /// Bytes held for an `O_DIRECT` write stay held: only [`Ingest::commit`] can write an
    /// unaligned tail (nothing reads an ingest file before its commit).
    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// Blobs at least this large (layers) are written with `O_DIRECT`.
const DIRECT_MIN: u64 = 4 << 20;
/// Bytes gathered, aligned, for each `O_DIRECT` write.
const DIRECT_BUF: usize = 4 << 20;
/// Alignment of `O_DIRECT` buffers, offsets and lengths (the largest logical block size).
const DIRECT_ALIGN: usize = 4096;

/// Create an ingest file. A layer blob is written with `O_DIRECT`: it is read again only
/// by a later unpack or push, so passing it through the page cache would cost a copy and
/// ext4's per-page work on every byte, evict hotter pages, and leave a layer's worth of dirty
/// pages for the fsync at commit to wait on. Filesystems that refuse `O_DIRECT` get a
/// buffered file.
fn create_blob_file(
    path: &Path,
    size: Option<u64>,
) -> Result<(File, Option<DirectBuf>), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if size.is_some_and(|s| s >= DIRECT_MIN) {
        let mut direct = opts.clone();
        match direct.custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, Some(DirectBuf::new()))),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(PathError::new("create", path, e).into()),
        }
    }
    Ok((opts.open(path).map_err(at("create", path))?, None))
}

/// An aligned buffer in front of an `O_DIRECT` file: full buffers go to the disk on a thread
/// of their own (an `O_DIRECT` write returns only once the device has the data, and the
/// caller, a layer's decompressor, has better things to do meanwhile); the unaligned tail is
/// written through the page cache at commit.
struct DirectBuf {
    cur: Aligned,
    len: usize,
    /// Where full buffers go, and whence written ones come back (None until the first).
    writer: Option<DirectWriter>,
}

struct DirectWriter {
    full: std::sync::mpsc::SyncSender<Aligned>,
    spare: std::sync::mpsc::Receiver<Aligned>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

/// [`DIRECT_BUF`] bytes aligned to [`DIRECT_ALIGN`].
struct Aligned {
    mem: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new() -> Aligned {
        let mem = vec![0u8; DIRECT_BUF + DIRECT_ALIGN];
        let start = (DIRECT_ALIGN - mem.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        Aligned { mem, start }
    }

    fn bytes(&self, len: usize) -> &[u8] {
        &self.mem[self.start..self.start + len]
    }
}

impl DirectBuf {
    fn new() -> DirectBuf {
        DirectBuf {
            cur: Aligned::new(),
            len: 0,
            writer: None,
        }
    }

    fn write(&mut self, f: &File, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(DIRECT_BUF - self.len);
        let at = self.cur.start + self.len;
        self.cur.mem[at..at + n].copy_from_slice(&buf[..n]);
        self.len += n;
        if self.len == DIRECT_BUF {
            self.send_full(f)?;
        }
        Ok(n)
    }

    /// Hand the full buffer to the writer thread (started on the first), and take a buffer
    /// it is done with, or a new one while two are on their way.
    fn send_full(&mut self, f: &File) -> std::io::Result<()> {
        if self.writer.is_none() {
            let mut file = f.try_clone()?;
            let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Aligned>(1);
            let (spare_tx, spare_rx) = std::sync::mpsc::channel::<Aligned>();
            let thread = std::thread::Builder::new()
                .name("blob-writer".into())
                .spawn(move || {
                    for b in full_rx {
                        file.write_all(b.bytes(DIRECT_BUF))?;
                        let _ = spare_tx.send(b);
                    }
                    Ok(())
                })?;
            self.writer = Some(DirectWriter {
                full: full_tx,
                spare: spare_rx,
                thread,
            });
        }
        let Some(w) = &self.writer else {
            return Ok(());
        };
        let next = w.spare.try_recv().unwrap_or_else(|_| Aligned::new());
        let full = std::mem::replace(&mut self.cur, next);
        self.len = 0;
        if w.full.send(full).is_err() {
            // the writer stopped on an error: the join says which
            return self.join();
        }
        Ok(())
    }

    /// Wait for the writer thread to write what it was given; its error, if it had one.
    fn join(&mut self) -> std::io::Result<()> {
        let Some(w) = self.writer.take() else {
            return Ok(());
        };
        drop(w.full);
        match w.thread.join() {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::other("the blob writer thread panicked")),
        }
    }

    /// Write what is buffered, with `O_DIRECT` switched off for the unaligned tail.
    fn finish(&mut self, f: &mut File) -> std::io::Result<()> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        self.join()?;
        let flags = OFlag::from_bits_truncate(fcntl(&*f, FcntlArg::F_GETFL)?);
        fcntl(&*f, FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
        f.write_all(self.cur.bytes(self.len))?;
        self.len = 0;
        Ok(())
    }
}

impl Ingest {
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Leave the hashing to the caller, who passes the digest of what it wrote to
    /// [`Ingest::commit_hashed`] (a layer download hashes it beside the decompressed bytes).
    pub fn hashed_by_caller(mut self) -> Ingest {
        self.hasher = None;
        self
    }

    /// Verify size and digest, fsync, rename into `blobs/`.
    pub fn commit(self) -> Result<(), StoreError> {
        let Some(h) = &self.hasher else {
            return Err(StoreError::Malformed {
                what: "blob",
                digest: self.digest.clone(),
                message: "committed without a digest (it was to be hashed by the caller)".into(),
            });
        };
        let actual = format!("sha256:{}", hex::encode(h.clone().finalize()));
        self.commit_hashed(actual)
    }

    /// [`Ingest::commit`] for bytes the caller hashed: `actual` is their digest.
    pub fn commit_hashed(mut self, actual: String) -> Result<(), StoreError> {
        let Some(mut f) = self.file.take() else {
            return Ok(());
        };
        if let Some(s) = self.size
            && s != self.written
        {
            return Err(StoreError::SizeMismatch {
                digest: self.digest.clone(),
                expected: s,
                actual: self.written,
            });
        }
        if actual != self.digest {
            return Err(StoreError::DigestMismatch {
                digest: self.digest.clone(),
                actual,
            });
        }
        if let Some(d) = &mut self.direct {
            d.finish(&mut f).map_err(at("write", &self.tmp))?;
        }
        f.sync_all().map_err(at("fsync", &self.tmp))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.final_path)
            .map_err(at("rename into place", &self.final_path))?;
        if let Some(dir) = self.final_path.parent() {
            fsutil::sync_dir(dir)?;
        }
        Ok(())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // after a successful commit the temp name no longer exists; otherwise it is garbage
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Lock `f` as `arg` (blocking), retrying on EINTR.
fn flock(
    mut f: File,
    arg: nix::fcntl::FlockArg,
    path: &Path,
) -> Result<nix::fcntl::Flock<File>, StoreError> {
    loop {
        match nix::fcntl::Flock::lock(f, arg) {
            Ok(l) => return Ok(l),
            Err((back, nix::errno::Errno::EINTR)) => f = back,
            Err((_, e)) => return Err(PathError::new("lock", path, e.into()).into()),
        }
    }
}

/// Whether the open file `f` is the one now at `path`.
fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn tempfile_in(dir: &Path, stem: &str) -> Result<PathBuf, StoreError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Ok(dir.join(format!("{stem}.{}.{n}.{nanos}", std::process::id())))
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            let mut v = vec![];
            for e in rd {
                let e = e.map_err(at("read directory", dir))?;
                v.push(e.file_name().to_string_lossy().into_owned());
            }
            Ok(v)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(PathError::new("read directory", dir, e).into()),
    }
}

/// Remove a directory tree without following symlinks (`remove_dir_all` does not follow them).
pub fn remove_tree(p: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PathError::new("remove", p, e).into()),
    }
}

/// Bytes used by regular files below `p` (best effort, for reports).
pub fn tree_size(p: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| tree_size(&e.path()))
                    .sum()
            })
            .unwrap_or(0)
    } else if meta.is_file() {
        meta.len()
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blobs_go_through_the_aligned_direct_path() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path().join("store"), d.path().join("snap"));
        s.init().unwrap();
        // two full direct buffers and an unaligned tail, fed in odd-sized pieces
        let blob: Vec<u8> = (0..2 * DIRECT_BUF + 12_345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let digest = crate::registry::types::sha256_digest(&blob);
        let mut w = s.ingest(&digest, Some(blob.len() as u64)).unwrap();
        for piece in blob.chunks(100_003) {
            w.write_all(piece).unwrap();
        }
        assert_eq!(w.written(), blob.len() as u64);
        w.commit().unwrap();
        assert_eq!(s.read_blob(&digest).unwrap(), blob);
        // a corrupt large blob is discarded like a small one
        let mut bad = blob.clone();
        bad[DIRECT_BUF + 1] ^= 1;
        let bad_digest = crate::registry::types::sha256_digest(&bad);
        let mut w = s.ingest(&bad_digest, Some(bad.len() as u64)).unwrap();
        w.write_all(&blob).unwrap();
        assert!(matches!(w.commit(), Err(StoreError::DigestMismatch { .. })));
        assert!(!s.has_blob(&bad_digest));
        // and one longer than declared is refused as it arrives
        let mut w = s.ingest(&digest, Some(blob.len() as u64 - 1)).unwrap();
        assert!(w.write_all(&blob).is_err());
        drop(w);
        assert_eq!(std::fs::read_dir(s.root.join("ingest")).unwrap().count(), 0);
    }

    #[test]
    fn a_blob_that_would_eat_into_the_reserve_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s =
            Store::new(d.path().join("store"), d.path().join("snap")).with_min_free(u64::MAX / 4);
        s.init().unwrap();
        let blob = b"hello";
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(blob)));
        match s.ingest(&digest, Some(5)) {
            Err(StoreError::NoSpace { needed, .. }) => assert_eq!(needed, 5),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(!s.has_blob(&digest));
        assert!(
            read_dir_names(&d.path().join("store/ingest"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn ingest_verifies_and_discards() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path().join("store"), d.path().join("snap"));
        s.init().unwrap();
        let good = crate::registry::types::sha256_digest(b"hello");
        let mut w = s.ingest(&good, Some(5)).unwrap();
        w.write_all(b"hellx").unwrap();
        assert!(matches!(w.commit(), Err(StoreError::DigestMismatch { .. })));
        assert!(!s.has_blob(&good));
        let mut w = s.ingest(&good, Some(6)).unwrap();
        w.write_all(b"hello").unwrap();
        assert!(matches!(w.commit(), Err(StoreError::SizeMismatch { .. })));
        s.put_verified(&good, b"hello").unwrap();
        assert!(s.has_blob(&good));
        // nothing left behind in ingest/
        assert_eq!(std::fs::read_dir(s.root.join("ingest")).unwrap().count(), 0);
    }

    #[test]
    fn gc_prunes_the_lock_files_nobody_holds() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path().join("store"), d.path().join("snap"));
        s.init().unwrap();
        let locks = d.path().join("store/locks");
        drop(s.lock_key("sha256:aaaa").unwrap());
        let held = s.lock_key("sha256:bbbb").unwrap();
        s.gc(&BTreeSet::new()).unwrap();
        let mut left = read_dir_names(&locks).unwrap();
        left.sort();
        assert_eq!(
            left,
            ["index", "sha256_bbbb"],
            "only the held lock (and gc's own) stay"
        );
        // a locker that waited on a lock file gc then removed locks the new file instead
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || {
            let l = s2.lock_key("sha256:bbbb").unwrap();
            same_file(&l._lock, &s2.root.join("locks/sha256_bbbb"))
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::remove_file(locks.join("sha256_bbbb")).unwrap();
        drop(held);
        assert!(
            waiter.join().unwrap(),
            "the lock taken is the file now at the path"
        );
    }

    #[test]
    fn tags_and_gc() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path().join("store"), d.path().join("snap"));
        s.init().unwrap();
        let stray = s.put_bytes(b"stray").unwrap();
        let cfg =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cd = s.put_bytes(cfg).unwrap();
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{cd}","size":{}}},"layers":[]}}"#,
            crate::registry::types::OCI_MANIFEST,
            crate::registry::types::OCI_CONFIG,
            cfg.len()
        );
        let md = s.put_bytes(m.as_bytes()).unwrap();
        let desc = Descriptor {
            media_type: crate::registry::types::OCI_MANIFEST.into(),
            digest: md.clone(),
            size: m.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
            urls: vec![],
        };
        s.tag("example.com/a:1", &desc).unwrap();
        s.tag("example.com/a:2", &desc).unwrap();
        assert_eq!(s.references().unwrap().len(), 2);
        assert_eq!(s.get("example.com/a:1").unwrap().digest(), md);
        assert!(s.gc(&BTreeSet::new()).unwrap() > 0);
        assert!(!s.has_blob(&stray));
        assert!(s.has_blob(&md) && s.has_blob(&cd));
        s.untag("example.com/a:1").unwrap();
        s.untag("example.com/a:2").unwrap();
        s.gc(&BTreeSet::new()).unwrap();
        assert!(!s.has_blob(&md));
    }
}
