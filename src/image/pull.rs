//! `berth image pull`: resolve the manifest (index → linux/<arch>), fetch the config, then
//! download the layers in parallel (bounded) and unpack each while it downloads. A layer
//! enters the store only when its digest, size and diffID all check out; the reference is
//! tagged last, so a failed pull leaves no visible trace.

use super::ImageError;
use super::progress::{LayerProgress, Progress};
use crate::registry::client::{RegistryClient, RegistryError};
use crate::registry::reference::Reference;
use crate::registry::types::{
    Compression, Descriptor, Document, ImageConfig, chain_ids, layer_compression, parse_document,
    select_platform,
};
use crate::store::unpack::{UnpackOptions, UnpackStats, unpack_layer};
use crate::store::{Store, StoreError};
use bytes::Bytes;
use sha2::Digest as _;
use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// Largest image config berth accepts (pull and import alike).
pub const MAX_CONFIG: usize = 16 << 20;

#[derive(Debug, Clone, serde::Serialize)]
pub struct PullOutcome {
    pub reference: String,
    pub digest: String,
    pub layers: usize,
    /// Layers that were already present (blob and snapshot).
    pub reused: usize,
    /// Compressed bytes downloaded.
    pub downloaded: u64,
}

pub struct Puller {
    pub client: Arc<RegistryClient>,
    pub store: Store,
    pub concurrency: usize,
    pub progress: Progress,
    pub unpack: UnpackOptions,
}

/// A buffered reader over chunks sent from another thread: its consumer reads them in place
/// (`BufRead`), with no copy into a buffer of its own. `next` is handed each chunk once it is
/// read through (to recycle it) and returns the next one, None at the end.
struct ChunkReader<C, F> {
    next: F,
    cur: C,
    pos: usize,
}

impl<C: AsRef<[u8]> + Default, F: FnMut(C) -> Option<C>> ChunkReader<C, F> {
    fn new(next: F) -> Self {
        ChunkReader {
            next,
            cur: C::default(),
            pos: 0,
        }
    }
}

/// `Read::read` for a reader whose `BufRead` buffer is all there is: copy out, consume.
fn read_buffered(r: &mut impl BufRead, buf: &mut [u8]) -> std::io::Result<usize> {
    let avail = r.fill_buf()?;
    let n = buf.len().min(avail.len());
    buf[..n].copy_from_slice(&avail[..n]);
    r.consume(n);
    Ok(n)
}

impl<C: AsRef<[u8]> + Default, F: FnMut(C) -> Option<C>> Read for ChunkReader<C, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        read_buffered(self, buf)
    }
}

impl<C: AsRef<[u8]> + Default, F: FnMut(C) -> Option<C>> BufRead for ChunkReader<C, F> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos == self.cur.as_ref().len() {
            let spent = std::mem::take(&mut self.cur);
            self.pos = 0;
            match (self.next)(spent) {
                Some(c) => self.cur = c,
                None => break,
            }
        }
        Ok(&self.cur.as_ref()[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.cur.as_ref().len());
    }
}

/// Chunks buffered between the stages of a layer download (each up to hyper's read size).
const STAGE_CHUNKS: usize = 16;

/// Size of the decompressed chunks the unpacker takes.
const INFLATE_CHUNK: usize = 256 << 10;
/// Decompressed chunks that may wait for the unpacker.
const INFLATE_CHUNKS: usize = 8;

/// Read buffer for unpacking a layer from a stored blob.
const BLOB_READ_BUF: usize = 1 << 20;

/// Decompress and unpack one layer from `reader` into `root`; returns the diffID.
/// `reader` is read to its end.
pub fn unpack_stream<R: BufRead>(
    reader: &mut R,
    compression: Compression,
    root: &Path,
    opts: &UnpackOptions,
    digest: &str,
) -> Result<(String, UnpackStats), ImageError> {
    let mut h = sha2::Sha256::new();
    let stats = decompress_and_unpack(reader, compression, root, opts, digest, |d| h.update(d))?;
    Ok((format!("sha256:{}", hex::encode(h.finalize())), stats))
}

/// Decompress `reader` to its end and unpack what comes out into `root`; `hash` is shown
/// every decompressed byte, in order (for the diffID).
///
/// Two threads share the work, so that a layer unpacked alone (often the last of a pull)
/// still uses more than one core: this one decompresses into large buffers and hashes each
/// while it is in this core's cache; they pass to another that unpacks them and hands them
/// back to be reused.
fn decompress_and_unpack<R: BufRead>(
    reader: &mut R,
    compression: Compression,
    root: &Path,
    opts: &UnpackOptions,
    digest: &str,
    hash: impl FnMut(&[u8]),
) -> Result<UnpackStats, ImageError> {
    use std::sync::mpsc;
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(INFLATE_CHUNKS);
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
    let (inflated, unpacked) = std::thread::scope(|s| {
        let unpacker = s.spawn(move || {
            let reader = ChunkReader::new(|spent: Vec<u8>| {
                let _ = spare_tx.send(spent);
                rx.recv().ok()
            });
            // it reads to the end, what follows the archive included (all of it is hashed)
            unpack_layer(reader, root, opts)
        });
        let inflated = inflate(reader, compression, tx, spare_rx, hash);
        (inflated, unpacker.join())
    });
    let unpacked =
        unpacked.map_err(|_| ImageError::Task(format!("layer {digest}: the unpacker panicked")))?;
    // a broken stream first: the unpacker saw it end early, which is not its fault
    let complete = inflated.map_err(|source| ImageError::Decompress {
        digest: digest.to_string(),
        source,
    })?;
    let stats = unpacked.map_err(|source| ImageError::Unpack {
        digest: digest.to_string(),
        root: root.to_owned(),
        source,
    })?;
    if !complete {
        // only a failed unpacker stops early, and it did not fail
        return Err(ImageError::Task(format!(
            "layer {digest}: the unpacker stopped reading"
        )));
    }
    Ok(stats)
}

/// The compressed side of a layer download, as the decompressor reads it: each byte it
/// consumes goes to the blob's ingest file at once, and is kept (a reference into the
/// download's chunk, not a copy) in `unhashed` until [`hash_beside`] hashes it together
/// with the decompressed bytes it became.
struct BlobTee<'a, F> {
    chunks: ChunkReader<Bytes, F>,
    ingest: &'a mut crate::store::Ingest,
    unhashed: &'a std::cell::RefCell<std::collections::VecDeque<Bytes>>,
    /// The blob could not be written: nothing more is read (the decompressor sees an error,
    /// and the caller reports this one).
    write_error: Option<std::io::Error>,
}

impl<F: FnMut(Bytes) -> Option<Bytes>> BufRead for BlobTee<'_, F> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if let Some(e) = &self.write_error {
            return Err(std::io::Error::new(
                e.kind(),
                "the layer blob could not be stored",
            ));
        }
        self.chunks.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        let start = self.chunks.pos;
        let end = (start + n).min(self.chunks.cur.len());
        if end == start {
            return;
        }
        let taken = self.chunks.cur.slice(start..end);
        self.chunks.consume(n);
        if self.write_error.is_none()
            && let Err(e) = self.ingest.write_all(&taken)
        {
            self.write_error = Some(e);
        }
        self.unhashed.borrow_mut().push_back(taken);
    }
}

impl<F: FnMut(Bytes) -> Option<Bytes>> Read for BlobTee<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        read_buffered(self, buf)
    }
}

/// Hash `decompressed` in the second lane of `pair` beside as many of the compressed bytes
/// waiting in `unhashed` (the first lane), so that both digests cost little more than one.
fn hash_beside(
    pair: &mut crate::hash::Sha256Pair,
    unhashed: &std::cell::RefCell<std::collections::VecDeque<Bytes>>,
    mut decompressed: &[u8],
) {
    let mut q = unhashed.borrow_mut();
    while !decompressed.is_empty() {
        let Some(c) = q.front_mut() else { break };
        let n = c.len().min(decompressed.len());
        pair.update(&c[..n], &decompressed[..n]);
        decompressed = &decompressed[n..];
        if n == c.len() {
            q.pop_front();
        } else {
            bytes::Buf::advance(c, n);
        }
    }
    pair.update(&[], decompressed);
}

/// Store and unpack a layer as it downloads, on this thread and one more: `chunks` is the
/// download; the blob is written to `ingest` as the decompressor reads it, and hashed beside
/// the decompressed stream. The whole blob is stored and verified even when decompressing or
/// unpacking fails, so that its digest tells a corrupt download from a bad layer. Returns
/// the blob's commit and the unpacking (diffID and stats).
fn store_and_unpack<F: FnMut(Bytes) -> Option<Bytes>>(
    chunks: ChunkReader<Bytes, F>,
    mut ingest: crate::store::Ingest,
    compression: Compression,
    root: &Path,
    opts: &UnpackOptions,
    digest: &str,
) -> (
    Result<(), StoreError>,
    Result<(String, UnpackStats), ImageError>,
) {
    let unhashed = std::cell::RefCell::new(std::collections::VecDeque::new());
    let mut pair = crate::hash::Sha256Pair::new();
    let mut tee = BlobTee {
        chunks,
        ingest: &mut ingest,
        unhashed: &unhashed,
        write_error: None,
    };
    let unpacked = decompress_and_unpack(&mut tee, compression, root, opts, digest, |d| {
        hash_beside(&mut pair, &unhashed, d)
    });
    // what the decompressor left: all of it after a failure, else nothing
    if tee.write_error.is_none() {
        let _ = std::io::copy(&mut tee, &mut std::io::sink());
    }
    let write_error = tee.write_error.take();
    for c in unhashed.take() {
        pair.update(&c, &[]);
    }
    let (blob, diff) = pair.finish();
    let stored = match write_error {
        Some(e) => Err(crate::fsutil::PathError::new("write", &ingest.tmp, e).into()),
        None => ingest.commit_hashed(blob),
    };
    (stored, unpacked.map(|stats| (diff, stats)))
}

/// Decompress `reader` to its end in [`INFLATE_CHUNK`] pieces, each shown to `hash` and sent
/// to `out`, in buffers taken from `spare` when there are any, then drain `reader` (trailing
/// compressed bytes, so that the blob's digest covers them). Returns false when the consumer
/// stopped first (it failed, and says why). `out` is dropped on return, ending its stream.
fn inflate<R: BufRead>(
    reader: &mut R,
    compression: Compression,
    out: std::sync::mpsc::SyncSender<Vec<u8>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    mut hash: impl FnMut(&[u8]),
) -> std::io::Result<bool> {
    {
        let mut decompressed: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(&mut *reader),
            Compression::Gzip => Box::new(super::gunzip::Gunzip::new(&mut *reader)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(&mut *reader)?),
        };
        loop {
            // a reused buffer is full length already: no zeroing on the way
            let mut buf = spare.try_recv().unwrap_or_default();
            buf.resize(INFLATE_CHUNK, 0);
            let n = crate::fsutil::read_full(&mut decompressed, &mut buf)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            hash(&buf);
            if out.send(buf).is_err() {
                return Ok(false);
            }
            if n < INFLATE_CHUNK {
                break;
            }
        }
    }
    std::io::copy(reader, &mut std::io::sink())?;
    Ok(true)
}

/// Make sure the snapshot for a layer whose blob is in the store exists.
pub fn snapshot_from_blob(
    store: &Store,
    layer: &Descriptor,
    diff_id: &str,
    chain_id: &str,
    opts: &UnpackOptions,
) -> Result<(), ImageError> {
    if store.has_snapshot(chain_id) {
        return Ok(());
    }
    let compression =
        layer_compression(&layer.media_type).ok_or_else(|| ImageError::LayerMediaType {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
        })?;
    let path = store.blob_path(&layer.digest)?;
    let mut f = std::io::BufReader::with_capacity(
        BLOB_READ_BUF,
        std::fs::File::open(&path)
            .map_err(|e| StoreError::from(crate::fsutil::PathError::new("open", &path, e)))?,
    );
    let tmp = store.prepare_snapshot(chain_id)?;
    let res = unpack_stream(&mut f, compression, &tmp.join("fs"), opts, &layer.digest);
    match res {
        Ok((d, _)) if d == diff_id => Ok(store.commit_snapshot(&tmp, chain_id)?),
        Ok((d, _)) => {
            let _ = crate::store::remove_tree(&tmp);
            Err(ImageError::DiffIdMismatch {
                digest: layer.digest.clone(),
                expected: diff_id.into(),
                actual: d,
            })
        }
        Err(e) => {
            let _ = crate::store::remove_tree(&tmp);
            Err(e)
        }
    }
}

fn retryable(e: &ImageError) -> bool {
    match e {
        ImageError::Registry(r) => r.is_transient(),
        ImageError::Store(StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. }) => {
            true
        }
        _ => false,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Task(e.to_string()))
}

impl Puller {
    pub async fn pull(&self, r: &Reference) -> Result<PullOutcome, ImageError> {
        self.store.init()?;
        // nothing this pull stores is collected before it is tagged
        let store = self.store.clone();
        let _lease = blocking(move || store.lease()).await??;
        let doc = self.client.fetch_manifest(r, r.object()).await?;
        if let Some(pin) = &r.digest
            && &doc.digest != pin
        {
            return Err(ImageError::PinnedDigest {
                reference: r.to_string(),
                expected: pin.clone(),
                actual: doc.digest,
            });
        }
        let docerr = |source| RegistryError::Document {
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            source,
        };
        let parsed = parse_document(&doc.bytes, doc.content_type.as_deref()).map_err(docerr)?;
        let (manifest, mbytes, mdesc) = match parsed {
            Document::Manifest(m) => {
                let mt = m
                    .media_type
                    .clone()
                    .or(doc.content_type.clone())
                    .unwrap_or_else(|| crate::registry::types::OCI_MANIFEST.into());
                let size = doc.bytes.len() as u64;
                (
                    m,
                    doc.bytes,
                    Descriptor {
                        media_type: mt,
                        digest: doc.digest,
                        size,
                        platform: None,
                        annotations: Default::default(),
                        urls: vec![],
                    },
                )
            }
            Document::Index(idx) => {
                let d = select_platform(&idx).ok_or_else(|| RegistryError::NoPlatform {
                    registry: r.registry.clone(),
                    repository: r.repository.clone(),
                    object: r.object().into(),
                    arch: crate::registry::types::host_platform().0.into(),
                })?;
                let sub = self.client.fetch_manifest(r, &d.digest).await?;
                match parse_document(&sub.bytes, sub.content_type.as_deref()).map_err(docerr)? {
                    Document::Manifest(m) => {
                        let mt = m.media_type.clone().unwrap_or_else(|| d.media_type.clone());
                        let size = sub.bytes.len() as u64;
                        (
                            m,
                            sub.bytes,
                            Descriptor {
                                media_type: mt,
                                digest: sub.digest,
                                size,
                                platform: d.platform.clone(),
                                annotations: Default::default(),
                                urls: vec![],
                            },
                        )
                    }
                    Document::Index(_) => {
                        return Err(ImageError::Invalid(format!(
                            "{r}: an index points at another index; not supported"
                        )));
                    }
                }
            }
        };
        // config
        let cfg_bytes = if self
            .store
            .has_blob_sized(&manifest.config.digest, manifest.config.size)?
        {
            self.store.read_blob(&manifest.config.digest)?
        } else {
            let bytes = self.fetch_small_blob(r, &manifest.config).await?;
            self.store.put_verified(&manifest.config.digest, &bytes)?;
            bytes
        };
        let config: ImageConfig = serde_json::from_slice(&cfg_bytes).map_err(|e| {
            ImageError::Invalid(format!(
                "{r}: image config {} is malformed: {e}",
                manifest.config.digest
            ))
        })?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::LayerCount {
                reference: r.to_string(),
                diff_ids: config.rootfs.diff_ids.len(),
                layers: manifest.layers.len(),
            });
        }
        let chains = chain_ids(&config.rootfs.diff_ids);
        // room for what is missing, before a byte of it is fetched
        self.check_room(r, &manifest.layers, &chains)?;
        let sem = Arc::new(tokio::sync::Semaphore::new(self.concurrency.max(1)));
        let jobs = manifest
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .zip(&chains)
            .map(|((l, d), c)| {
                let sem = sem.clone();
                async move {
                    let _permit = sem
                        .acquire()
                        .await
                        .map_err(|e| ImageError::Task(e.to_string()))?;
                    self.fetch_layer(r, l, d, c).await
                }
            });
        let results = futures::future::try_join_all(jobs).await?;
        let downloaded: u64 = results.iter().map(|(n, _)| n).sum();
        let reused = results.iter().filter(|(_, reused)| *reused).count();
        self.store.put_verified(&mdesc.digest, &mbytes)?;
        self.store.tag(&r.to_string(), &mdesc)?;
        Ok(PullOutcome {
            reference: r.to_string(),
            digest: mdesc.digest,
            layers: manifest.layers.len(),
            reused,
            downloaded,
        })
    }

    /// Refuse a pull whose missing layers (blobs to download, snapshots to unpack, the
    /// latter reckoned at [`UNPACK_FACTOR`] times the compressed size) would eat into the
    /// store's reserve: refused before anything is downloaded, rather than failing half way.
    fn check_room(
        &self,
        r: &Reference,
        layers: &[Descriptor],
        chains: &[String],
    ) -> Result<(), ImageError> {
        let mut download = 0u64;
        let mut unpacked = 0u64;
        for (l, c) in layers.iter().zip(chains) {
            if self.store.has_snapshot(c) {
                continue;
            }
            if !self.store.has_blob_sized(&l.digest, l.size)? {
                download = download.saturating_add(l.size);
            }
            unpacked = unpacked.saturating_add(l.size.saturating_mul(super::UNPACK_FACTOR));
        }
        if download == 0 && unpacked == 0 {
            return Ok(());
        }
        let path = self.store.root.clone();
        let Some(v) = path
            .ancestors()
            .find_map(|d| nix::sys::statvfs::statvfs(d).ok())
        else {
            return Ok(());
        };
        let available = v.blocks_available().saturating_mul(v.fragment_size());
        let reserve = self.store.min_free;
        if download.saturating_add(unpacked).saturating_add(reserve) > available {
            return Err(ImageError::NoRoom {
                reference: r.to_string(),
                path,
                download,
                unpacked,
                available,
                reserve,
            });
        }
        Ok(())
    }

    async fn fetch_small_blob(&self, r: &Reference, d: &Descriptor) -> Result<Vec<u8>, ImageError> {
        if d.size as usize > MAX_CONFIG {
            return Err(ImageError::Invalid(format!(
                "{r}: config blob {} is larger than {MAX_CONFIG} bytes",
                d.digest
            )));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res: Result<Vec<u8>, ImageError> = async {
                let mut resp = self
                    .client
                    .blob(r, &d.digest, d.size, "config download", true)
                    .await?;
                let mut out = Vec::with_capacity(d.size as usize);
                while let Some(c) = resp.chunk().await? {
                    if out.len() + c.len() > d.size as usize {
                        return Err(StoreError::SizeMismatch {
                            digest: d.digest.clone(),
                            expected: d.size,
                            actual: (out.len() + c.len()) as u64,
                        }
                        .into());
                    }
                    out.extend_from_slice(&c);
                }
                let actual = crate::registry::types::sha256_digest(&out);
                if out.len() as u64 != d.size {
                    return Err(StoreError::SizeMismatch {
                        digest: d.digest.clone(),
                        expected: d.size,
                        actual: out.len() as u64,
                    }
                    .into());
                }
                if actual != d.digest {
                    return Err(StoreError::DigestMismatch {
                        digest: d.digest.clone(),
                        actual,
                    }
                    .into());
                }
                Ok(out)
            }
            .await;
            match res {
                Err(e) if retryable(&e) && attempt < self.client.retry.attempts => {
                    tokio::time::sleep(self.client.retry.delay(attempt, None)).await;
                }
                other => return other,
            }
        }
    }

    /// Fetch and unpack one layer unless present. Returns (bytes downloaded, reused).
    async fn fetch_layer(
        &self,
        r: &Reference,
        layer: &Descriptor,
        diff_id: &str,
        chain_id: &str,
    ) -> Result<(u64, bool), ImageError> {
        let compression =
            layer_compression(&layer.media_type).ok_or_else(|| ImageError::LayerMediaType {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            })?;
        let store = self.store.clone();
        let key = layer.digest.clone();
        // one puller per layer at a time, across threads and processes
        let _lock = blocking(move || store.lock_key(&key)).await??;
        let have_blob = self.store.has_blob_sized(&layer.digest, layer.size)?;
        if have_blob && self.store.has_snapshot(chain_id) {
            return Ok((0, true));
        }
        if have_blob {
            let (store, layer, d, c, o) = (
                self.store.clone(),
                layer.clone(),
                diff_id.to_string(),
                chain_id.to_string(),
                self.unpack,
            );
            blocking(move || snapshot_from_blob(&store, &layer, &d, &c, &o)).await??;
            return Ok((0, true));
        }
        let bar = self.progress.layer(&layer.digest, layer.size);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .download_and_unpack(r, layer, diff_id, chain_id, compression, &bar)
                .await
            {
                Ok(n) => {
                    bar.finish("done");
                    return Ok((n, false));
                }
                Err(e) if retryable(&e) && attempt < self.client.retry.attempts => {
                    let d = self.client.retry.delay(attempt, None);
                    tracing::warn!("layer {}: {e}; retrying in {d:?}", layer.digest);
                    bar.reset();
                    tokio::time::sleep(d).await;
                }
                Err(e) => {
                    bar.finish("failed");
                    return Err(e);
                }
            }
        }
    }

    async fn download_and_unpack(
        &self,
        r: &Reference,
        layer: &Descriptor,
        diff_id: &str,
        chain_id: &str,
        compression: Compression,
        bar: &LayerProgress,
    ) -> Result<u64, ImageError> {
        let mut resp = self
            .client
            .blob(
                r,
                &layer.digest,
                layer.size,
                &format!("layer {} download", layer.digest),
                false,
            )
            .await?;
        let tmp = self.store.prepare_snapshot(chain_id)?;
        let cleanup = scopeguard_remove(tmp.clone());
        // Three stages on threads of their own, so that one layer can use several cores: the
        // download (async); storing the blob and decompressing it, both hashed here side by
        // side; unpacking (see store_and_unpack).
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STAGE_CHUNKS);
        let fs = tmp.join("fs");
        let opts = self.unpack;
        let digest = layer.digest.clone();
        let ingest = self
            .store
            .ingest(&layer.digest, Some(layer.size))?
            .hashed_by_caller();
        let worker = tokio::task::spawn_blocking(move || {
            let mut rx = rx;
            let chunks = ChunkReader::new(|_spent: Bytes| rx.blocking_recv());
            store_and_unpack(chunks, ingest, compression, &fs, &opts, &digest)
        });
        let mut n: u64 = 0;
        let download: Result<(), ImageError> = async {
            while let Some(chunk) = resp.chunk().await? {
                n += chunk.len() as u64;
                bar.inc(chunk.len() as u64);
                if tx.send(chunk).await.is_err() {
                    // the worker stopped: it could not write the blob and says why below
                    break;
                }
            }
            Ok(())
        }
        .await;
        drop(tx);
        let (committed, unpacked) = worker.await.map_err(|e| ImageError::Task(e.to_string()))?;
        download?;
        // the blob's digest and size first: a corrupt download is reported as such
        committed?;
        let (actual, _stats) = unpacked?;
        if actual != diff_id {
            return Err(ImageError::DiffIdMismatch {
                digest: layer.digest.clone(),
                expected: diff_id.into(),
                actual,
            });
        }
        self.store.commit_snapshot(&tmp, chain_id)?;
        cleanup.disarm();
        Ok(n)
    }
}

/// Removes a directory on drop unless disarmed.
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = crate::store::remove_tree(&p);
        }
    }
}

fn scopeguard_remove(p: std::path::PathBuf) -> RemoveOnDrop {
    RemoveOnDrop(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const OPTS: UnpackOptions = UnpackOptions {
        preserve_ownership: false,
        allow_devices: false,
        min_free: 0,
    };

    /// A tar of one file of `size` bytes at `path` (no validation of the path: hostile ones
    /// are made on purpose), with `pad` zero bytes after the end-of-archive blocks.
    fn tar_of(path: &str, size: usize, pad: usize) -> (Vec<u8>, Vec<u8>) {
        let content: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        (tar_with(path, &content, pad), content)
    }

    /// A tar of one file holding `content` at `path`, then `pad` zero bytes.
    fn tar_with(path: &str, content: &[u8], pad: usize) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, content).unwrap();
        let mut tar = b.into_inner().unwrap();
        tar.extend(std::iter::repeat_n(0, pad));
        tar
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// The error unpacking a gzip `blob` into `root` gives.
    fn gzip_unpack_err(blob: &[u8], root: &Path) -> ImageError {
        let mut reader = Cursor::new(blob);
        unpack_stream(&mut reader, Compression::Gzip, root, &OPTS, "d").unwrap_err()
    }

    fn root() -> (tempfile::TempDir, std::path::PathBuf) {
        let t = tempfile::Builder::new()
            .prefix("pull-unpack-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        let root = t.path().join("fs");
        std::fs::create_dir(&root).unwrap();
        (t, root)
    }

    #[test]
    fn chunk_reader_reads_across_chunks_and_recycles_each_once() {
        let mut chunks = vec![b"ab".to_vec(), vec![], b"cde".to_vec()].into_iter();
        let mut spent = Vec::new();
        let mut r = ChunkReader::new(|c: Vec<u8>| {
            spent.push(c);
            chunks.next()
        });
        let mut out = String::new();
        r.read_to_string(&mut out).unwrap();
        assert_eq!(out, "abcde");
        // at the end it stays at the end
        assert_eq!(r.fill_buf().unwrap(), b"");
        assert_eq!(r.read(&mut [0; 4]).unwrap(), 0);
        drop(r);
        assert!(spent.contains(&b"ab".to_vec()) && spent.contains(&b"cde".to_vec()));
    }

    #[test]
    fn every_compression_unpacks_and_the_diff_id_covers_the_padding() {
        // several decompressed chunks, and padding after the tar's end that tar never reads
        let (tar, content) = tar_of("big", 3 * INFLATE_CHUNK + 12345, 20_000);
        let expected = crate::registry::types::sha256_digest(&tar);
        let blobs = [
            (Compression::None, tar.clone()),
            (Compression::Gzip, gzip(&tar)),
            (
                Compression::Zstd,
                zstd::stream::encode_all(&tar[..], 1).unwrap(),
            ),
        ];
        for (compression, blob) in blobs {
            let (_t, root) = root();
            let mut reader = Cursor::new(&blob);
            let (diff, stats) =
                unpack_stream(&mut reader, compression, &root, &OPTS, "sha256:x").unwrap();
            assert_eq!(diff, expected, "{compression:?}");
            assert_eq!(stats.entries, 1);
            assert_eq!(std::fs::read(root.join("big")).unwrap(), content);
            // the compressed stream was read to its end (its digest covers all of it)
            assert_eq!(reader.position(), blob.len() as u64, "{compression:?}");
        }
    }

    #[test]
    fn a_corrupt_stream_is_a_decompression_error() {
        let (tar, _) = tar_of("f", 2 * INFLATE_CHUNK, 0);
        let mut blob = gzip(&tar);
        let mid = blob.len() / 2;
        blob.truncate(mid);
        let (_t, root) = root();
        let err = gzip_unpack_err(&blob, &root);
        assert!(matches!(err, ImageError::Decompress { .. }), "{err}");
        // garbage in the middle, the footer intact: also the decompressor's error
        let mut blob = gzip(&tar);
        for b in &mut blob[100..200] {
            *b = !*b;
        }
        let err = gzip_unpack_err(&blob, &root);
        assert!(matches!(err, ImageError::Decompress { .. }), "{err}");
    }

    #[test]
    fn an_unpacker_error_stops_the_pipeline_and_is_reported() {
        // a hostile first entry, then more chunks than the stages buffer: the decompressor
        // must not wait forever for an unpacker that has stopped
        let (mut tar, _) = tar_of("../escape", 10, 0);
        tar.truncate(tar.len() - 1024);
        tar.extend(tar_of("after", 4 * INFLATE_CHUNKS * INFLATE_CHUNK, 0).0);
        let (t, root) = root();
        let blob = gzip(&tar);
        let err = gzip_unpack_err(&blob, &root);
        match &err {
            ImageError::Unpack { root: r, .. } => assert_eq!(r, &root),
            other => panic!("expected an unpack error, got {other}"),
        }
        assert!(err.to_string().contains("`..`"), "{err}");
        assert!(!t.path().join("escape").exists());
    }

    /// What `store_and_unpack_in_pieces` leaves: the store (in `_dir`), the results, the root.
    struct Fed {
        _dir: tempfile::TempDir,
        store: Store,
        stored: Result<(), StoreError>,
        unpacked: Result<(String, UnpackStats), ImageError>,
        root: std::path::PathBuf,
    }

    /// `store_and_unpack` of `blob` (declared as `digest`, `size`) fed in `piece`-byte chunks
    /// into a fresh store.
    fn store_and_unpack_in_pieces(blob: &[u8], digest: &str, size: u64, piece: usize) -> Fed {
        let (t, root) = root();
        let store = Store::new(t.path().join("store"), t.path().join("snapshots"));
        store.init().unwrap();
        let ingest = store.ingest(digest, Some(size)).unwrap().hashed_by_caller();
        let mut pieces = blob
            .chunks(piece)
            .map(Bytes::copy_from_slice)
            .collect::<Vec<_>>()
            .into_iter();
        let chunks = ChunkReader::new(|_spent: Bytes| pieces.next());
        let (stored, unpacked) =
            store_and_unpack(chunks, ingest, Compression::Gzip, &root, &OPTS, digest);
        Fed {
            _dir: t,
            store,
            stored,
            unpacked,
            root,
        }
    }

    #[test]
    fn a_download_is_stored_and_unpacked_with_both_digests_checked() {
        // incompressible, so that the blob takes the O_DIRECT path (two full buffers for the
        // writer thread, and a tail)
        let content = crate::hash::tests::bytes(9 << 20, 1);
        let tar = tar_with("big", &content, 0);
        let blob = gzip(&tar);
        assert!(blob.len() > 8 << 20);
        let digest = crate::registry::types::sha256_digest(&blob);
        let diff = crate::registry::types::sha256_digest(&tar);
        for piece in [blob.len(), 65_537, 4093] {
            let f = store_and_unpack_in_pieces(&blob, &digest, blob.len() as u64, piece);
            f.stored.unwrap();
            let (d, _) = f.unpacked.unwrap();
            assert_eq!(d, diff, "piece {piece}");
            let stored = std::fs::read(f.store.blob_path(&digest).unwrap()).unwrap();
            assert!(stored == blob, "piece {piece}: the stored blob differs");
            assert!(std::fs::read(f.root.join("big")).unwrap() == content);
        }
    }

    #[test]
    fn a_bad_layer_is_still_stored_and_a_corrupt_blob_is_not() {
        // a hostile layer whose blob is what it claims: the unpack fails, the blob is whole
        let (mut tar, _) = tar_of("../escape", 10, 0);
        tar.truncate(tar.len() - 1024);
        tar.extend(tar_of("after", 2 << 20, 0).0);
        let blob = gzip(&tar);
        let digest = crate::registry::types::sha256_digest(&blob);
        let f = store_and_unpack_in_pieces(&blob, &digest, blob.len() as u64, 100_000);
        f.stored.unwrap();
        assert!(matches!(f.unpacked, Err(ImageError::Unpack { .. })));
        assert!(f.store.has_blob(&digest));
        // bytes flipped in transit: the digest check fails and nothing enters the store
        let mut bad = blob.clone();
        for b in &mut bad[1000..1100] {
            *b = !*b;
        }
        let f = store_and_unpack_in_pieces(&bad, &digest, bad.len() as u64, 100_000);
        assert!(matches!(f.stored, Err(StoreError::DigestMismatch { .. })));
        assert!(f.unpacked.is_err());
        assert!(!f.store.has_blob(&digest));
        // a download cut short: a size mismatch
        let cut = &blob[..blob.len() / 2];
        let f = store_and_unpack_in_pieces(cut, &digest, blob.len() as u64, 100_000);
        assert!(matches!(f.stored, Err(StoreError::SizeMismatch { .. })));
        assert!(f.unpacked.is_err());
        assert!(!f.store.has_blob(&digest));
    }
}
