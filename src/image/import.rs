//! `berth image import FILE`: bring images in without a registry, from an OCI image layout
//! (a directory, or a tar of one: `skopeo copy … oci-archive:…`) or a `docker save` archive.
//! Every blob is verified (digest, size, diffID) on its way into the store.

use super::ImageError;
use super::pull::MAX_CONFIG;
use super::pull::snapshot_from_blob;
use crate::registry::client::MAX_MANIFEST;
use crate::registry::reference::Reference;
use crate::registry::types::{
    self, Descriptor, Document, ImageConfig, Manifest, OCI_CONFIG, OCI_LAYER, OCI_LAYER_GZIP,
    OCI_MANIFEST, REF_NAME_ANNOTATION, chain_ids, parse_document, select_platform,
};
use crate::store::unpack::UnpackOptions;
use crate::store::{Store, StoreError};
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path};

fn import_err(path: &Path, message: impl Into<String>) -> ImageError {
    ImageError::Import {
        path: path.to_path_buf(),
        // a message may quote the archive's bytes
        message: crate::text::printable(&message.into(), 500),
    }
}

/// The most images one import takes: each costs passes over the archive.
const MAX_IMAGES: usize = 64;

/// Largest `index.json`, `oci-layout` or `manifest.json` berth reads (a manifest's limit).
const MAX_METADATA: usize = MAX_MANIFEST;

/// What [`Source::each_member`] runs on a member: its name, size and contents.
type MemberFn<'f> = dyn FnMut(&str, u64, &mut dyn Read) -> Result<(), ImageError> + 'f;

/// Where an import reads its members: a directory (an OCI layout, an unpacked `docker
/// save`), or a tar archive of one, possibly gzip-compressed, read once for each pass. Only
/// members the image names are read and only within the limits a pull has; nothing else of
/// an archive reaches the disk.
enum Source<'a> {
    Dir(&'a Path),
    Archive(&'a Path),
}

impl Source<'_> {
    /// The user's file (for messages).
    fn path(&self) -> &Path {
        match self {
            Source::Dir(p) | Source::Archive(p) => p,
        }
    }

    /// Run `f` on each of the members `names` the source has, as a reader of its contents
    /// with its size: a directory's members opened one by one ([`open_member`]; one missing
    /// is skipped, one that cannot be read is an error), an archive's as its single pass over
    /// them meets them. The callers say what a missing member means.
    fn each_member(&self, names: &[&str], f: &mut MemberFn) -> Result<(), ImageError> {
        let path = self.path();
        match self {
            Source::Dir(dir) => {
                for n in names {
                    let mut file = match open_member(dir, n) {
                        Ok(file) => file,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(import_err(&dir.join(n), e.to_string())),
                    };
                    let size = file
                        .metadata()
                        .map_err(|e| import_err(&dir.join(n), e.to_string()))?
                        .len();
                    f(n, size, &mut file)?;
                }
                Ok(())
            }
            Source::Archive(_) => {
                let open =
                    || std::fs::File::open(path).map_err(|e| import_err(path, e.to_string()));
                let mut magic = [0u8; 2];
                let n = open()?
                    .read(&mut magic)
                    .map_err(|e| import_err(path, e.to_string()))?;
                let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
                    Box::new(flate2::read::MultiGzDecoder::new(open()?))
                } else {
                    Box::new(open()?)
                };
                let mut ar = tar::Archive::new(crate::store::targuard::TarGuard::new(reader));
                let entries = ar
                    .entries()
                    .map_err(|e| import_err(path, format!("not a tar archive: {e}")))?;
                for entry in entries {
                    let mut entry =
                        entry.map_err(|e| import_err(path, format!("not a tar archive: {e}")))?;
                    if !matches!(
                        entry.header().entry_type(),
                        tar::EntryType::Regular | tar::EntryType::Continuous
                    ) {
                        continue;
                    }
                    let raw = entry.path_bytes().into_owned();
                    let Some(name) = member_name(&raw) else {
                        continue;
                    };
                    if names.contains(&name.as_str()) {
                        let size = entry.size();
                        f(&name, size, &mut entry)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// The members named, each whole in memory and at most `limit` bytes; a member that is
    /// missing is absent from the map.
    fn read_small(
        &self,
        names: &[String],
        limit: usize,
    ) -> Result<BTreeMap<String, Vec<u8>>, ImageError> {
        let path = self.path();
        let mut out = BTreeMap::new();
        let too_large = |n: &str| import_err(path, format!("{n} is larger than {limit} bytes"));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.each_member(&names, &mut |n, size, r| {
            if size > limit as u64 {
                return Err(too_large(n));
            }
            let mut b = Vec::new();
            r.take(limit as u64 + 1)
                .read_to_end(&mut b)
                .map_err(|e| import_err(path, format!("{n}: {e}")))?;
            if b.len() > limit {
                return Err(too_large(n));
            }
            out.insert(n.to_string(), b);
            Ok(())
        })?;
        Ok(out)
    }

    /// A blob named by a descriptor, verified (size, digest), bounded by `limit`.
    fn read_blob(&self, d: &Descriptor, limit: usize) -> Result<Vec<u8>, ImageError> {
        if d.size > limit as u64 {
            return Err(import_err(
                self.path(),
                format!(
                    "{}: {} bytes, more than the {limit} allowed",
                    d.digest, d.size
                ),
            ));
        }
        let name = blob_member(&d.digest)?;
        let b = self
            .read_small(std::slice::from_ref(&name), limit)?
            .remove(&name)
            .ok_or_else(|| import_err(self.path(), format!("no blob {}", d.digest)))?;
        let actual = types::sha256_digest(&b);
        if actual != d.digest || b.len() as u64 != d.size {
            return Err(import_err(
                self.path(),
                format!(
                    "blob {} has digest {actual} and {} bytes, not the {} its descriptor gives",
                    d.digest,
                    b.len(),
                    d.size
                ),
            ));
        }
        Ok(b)
    }

    /// Store the members `wanted` (member name → digest and size, if known) as blobs, each
    /// verified by the store on commit; those the store holds are not read again.
    fn store_blobs(
        &self,
        store: &Store,
        wanted: &BTreeMap<String, (String, u64)>,
    ) -> Result<(), ImageError> {
        let mut missing = BTreeMap::new();
        for (n, (digest, size)) in wanted {
            if !store.has_blob_sized(digest, *size)? {
                missing.insert(n.clone(), (digest.clone(), *size));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let path = self.path();
        let names: Vec<&str> = missing.keys().map(String::as_str).collect();
        let mut seen = std::collections::BTreeSet::new();
        self.each_member(&names, &mut |n, _, r| {
            seen.insert(n.to_string());
            let (digest, size) = &missing[n];
            if store.has_blob(digest) {
                return Ok(()); // the same blob under two names
            }
            let mut w = store.ingest(digest, Some(*size))?;
            std::io::copy(&mut r.take(size + 1), &mut w)
                .map_err(|e| import_err(path, format!("{n}: {e}")))?;
            w.commit()
                .map_err(|e| import_err(path, format!("{n}: {e}")))?;
            Ok(())
        })?;
        if let Some(n) = missing.keys().find(|n| !seen.contains(*n)) {
            return Err(import_err(path, format!("no member {n}")));
        }
        Ok(())
    }

    /// The digest and size of a member (a `docker save` layer, named by path only).
    fn hash_members(
        &self,
        names: &[String],
    ) -> Result<BTreeMap<String, (String, u64)>, ImageError> {
        let path = self.path();
        let mut out = BTreeMap::new();
        let mut hash = |n: &str, r: &mut dyn Read| -> Result<(), ImageError> {
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut size = 0u64;
            loop {
                let k = r
                    .read(&mut buf)
                    .map_err(|e| import_err(path, format!("{n}: {e}")))?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                size += k as u64;
            }
            out.insert(
                n.to_string(),
                (format!("sha256:{}", hex::encode(h.finalize())), size),
            );
            Ok(())
        };
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        self.each_member(&wanted, &mut |n, _, r| hash(n, r))?;
        if let Some(n) = names.iter().find(|n| !out.contains_key(*n)) {
            return Err(import_err(path, format!("no member {n}")));
        }
        Ok(out)
    }
}

/// A member of a directory source: a regular file inside `dir`, reached through no symlink
/// (an import of a directory someone else controls reads nothing outside it, and opens no
/// device or FIFO).
fn open_member(dir: &Path, name: &str) -> std::io::Result<std::fs::File> {
    crate::fsutil::open_regular(Path::new(name), Some(dir))
}

/// An archive member's path, normalised (`./a//b` → `a/b`); None for paths that leave the
/// archive or are not UTF-8 (no image member is such).
fn member_name(raw: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?;
    let mut parts = vec![];
    for c in Path::new(s).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?),
            Component::CurDir | Component::RootDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// The member of an OCI layout holding a blob.
fn blob_member(digest: &str) -> Result<String, ImageError> {
    if !crate::registry::reference::valid_digest(digest) {
        return Err(StoreError::BadDigest(digest.into()).into());
    }
    Ok(format!("blobs/sha256/{}", &digest["sha256:".len()..]))
}

/// Import every image in `path`. `tag` names the image when the archive holds exactly one.
/// Returns (reference, manifest digest) for each imported image.
pub fn import(
    store: &Store,
    path: &Path,
    tag: Option<&Reference>,
    opts: &UnpackOptions,
) -> Result<Vec<(String, String)>, ImageError> {
    store.init()?;
    // nothing this import stores is collected before it is tagged
    let _lease = store.lease()?;
    let meta = std::fs::metadata(path).map_err(|e| import_err(path, e.to_string()))?;
    let src = if meta.is_dir() {
        Source::Dir(path)
    } else {
        Source::Archive(path)
    };
    let names = ["oci-layout", "index.json", "manifest.json"].map(String::from);
    let top = src.read_small(&names, MAX_METADATA)?;
    if top.contains_key("oci-layout") && top.contains_key("index.json") {
        import_oci_layout(store, &src, &top["index.json"], tag, opts)
    } else if let Some(m) = top.get("manifest.json") {
        import_docker_save(store, &src, m, tag, opts)
    } else {
        Err(import_err(
            path,
            "neither an OCI image layout (oci-layout, index.json) nor a docker save archive (manifest.json)",
        ))
    }
}

/// Store an image's layers, snapshots, config and manifest, then tag it.
fn finish_image(
    store: &Store,
    reference: &str,
    manifest: &Manifest,
    mbytes: &[u8],
    media_type: &str,
    cfg: &ImageConfig,
    opts: &UnpackOptions,
) -> Result<String, ImageError> {
    if cfg.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::LayerCount {
            reference: reference.into(),
            diff_ids: cfg.rootfs.diff_ids.len(),
            layers: manifest.layers.len(),
        });
    }
    for ((l, d), c) in manifest
        .layers
        .iter()
        .zip(&cfg.rootfs.diff_ids)
        .zip(chain_ids(&cfg.rootfs.diff_ids))
    {
        let _lock = store.lock_key(&l.digest)?;
        snapshot_from_blob(store, l, d, &c, opts)?;
    }
    let digest = types::sha256_digest(mbytes);
    store.put_verified(&digest, mbytes)?;
    let desc = Descriptor {
        media_type: media_type.into(),
        digest: digest.clone(),
        size: mbytes.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
        urls: vec![],
    };
    store.tag(reference, &desc)?;
    Ok(digest)
}

fn name_for(
    orig: &Path,
    tag: Option<&Reference>,
    count: usize,
    annotations: &BTreeMap<String, String>,
) -> Result<String, ImageError> {
    if let Some(t) = tag {
        if count != 1 {
            return Err(import_err(
                orig,
                format!("--tag names one image but the archive holds {count}"),
            ));
        }
        return Ok(t.to_string());
    }
    let mut refused = vec![];
    for key in ["io.containerd.image.name", REF_NAME_ANNOTATION] {
        if let Some(n) = annotations.get(key) {
            match full_reference(n) {
                Ok(r) => return Ok(r),
                Err(why) => refused.push(format!("{key} {why}")),
            }
        }
    }
    Err(import_err(
        orig,
        format!(
            "the archive does not name its image with a full reference{}; pass --tag REF",
            reasons(&refused)
        ),
    ))
}

/// A name from an archive as a full reference, or why it is not one.
fn full_reference(n: &str) -> Result<String, String> {
    let shown = crate::text::printable(n, 100);
    if !(n.contains('/') || n.contains(':')) {
        return Err(format!("{shown:?} is a bare tag, not a reference"));
    }
    n.parse::<Reference>()
        .map(|r| r.to_string())
        .map_err(|e| format!("{shown:?}: {}", crate::text::printable(&e.to_string(), 200)))
}

/// ` (refused: a; b)` for a non-empty list.
fn reasons(refused: &[String]) -> String {
    if refused.is_empty() {
        String::new()
    } else {
        format!(" (refused: {})", refused.join("; "))
    }
}

fn import_oci_layout(
    store: &Store,
    src: &Source,
    index_json: &[u8],
    tag: Option<&Reference>,
    opts: &UnpackOptions,
) -> Result<Vec<(String, String)>, ImageError> {
    let orig = src.path();
    let index = match parse_document(index_json, None)
        .map_err(|e| import_err(orig, format!("index.json: {e}")))?
    {
        Document::Index(i) => i,
        Document::Manifest(_) => {
            return Err(import_err(orig, "index.json is not an image index"));
        }
    };
    let count = index.manifests.len();
    if count > MAX_IMAGES {
        return Err(import_err(
            orig,
            format!("index.json names {count} images; at most {MAX_IMAGES} are imported at once"),
        ));
    }
    let mut out = vec![];
    for top in &index.manifests {
        let reference = name_for(orig, tag, count, &top.annotations)?;
        let mut desc = top.clone();
        let mut mbytes = src.read_blob(&desc, MAX_MANIFEST)?;
        if let Document::Index(sub) = parse_document(&mbytes, Some(&desc.media_type))
            .map_err(|e| import_err(orig, e.to_string()))?
        {
            desc = select_platform(&sub).cloned().ok_or_else(|| {
                import_err(
                    orig,
                    format!(
                        "{reference}: no linux/{} image in the index",
                        types::host_platform().0
                    ),
                )
            })?;
            mbytes = src.read_blob(&desc, MAX_MANIFEST)?;
        }
        let manifest = match parse_document(&mbytes, Some(&desc.media_type))
            .map_err(|e| import_err(orig, e.to_string()))?
        {
            Document::Manifest(m) => m,
            Document::Index(_) => return Err(import_err(orig, "nested indexes are not supported")),
        };
        let cbytes = src.read_blob(&manifest.config, MAX_CONFIG)?;
        let cfg: ImageConfig = serde_json::from_slice(&cbytes)
            .map_err(|e| import_err(orig, format!("image config: {e}")))?;
        let mut layers = BTreeMap::new();
        for l in &manifest.layers {
            layers.insert(blob_member(&l.digest)?, (l.digest.clone(), l.size));
        }
        src.store_blobs(store, &layers)?;
        store.put_verified(&manifest.config.digest, &cbytes)?;
        let mt = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| desc.media_type.clone());
        let digest = finish_image(store, &reference, &manifest, &mbytes, &mt, &cfg, opts)?;
        out.push((reference, digest));
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A `docker save` member path from its manifest.json, normalised; refused if it would leave
/// the archive.
fn save_member(rel: &str, orig: &Path) -> Result<String, ImageError> {
    member_name(rel.as_bytes()).ok_or_else(|| {
        import_err(
            orig,
            format!(
                "unsafe path {:?} in manifest.json",
                crate::text::printable(rel, 200)
            ),
        )
    })
}

fn import_docker_save(
    store: &Store,
    src: &Source,
    manifest_json: &[u8],
    tag: Option<&Reference>,
    opts: &UnpackOptions,
) -> Result<Vec<(String, String)>, ImageError> {
    let orig = src.path();
    let entries: Vec<SaveEntry> = serde_json::from_slice(manifest_json)
        .map_err(|e| import_err(orig, format!("manifest.json: {e}")))?;
    if entries.len() > MAX_IMAGES {
        return Err(import_err(
            orig,
            format!(
                "manifest.json names {} images; at most {MAX_IMAGES} are imported at once",
                entries.len()
            ),
        ));
    }
    if tag.is_some() && entries.len() != 1 {
        return Err(import_err(
            orig,
            format!(
                "--tag names one image but the archive holds {}",
                entries.len()
            ),
        ));
    }
    let mut out = vec![];
    for e in &entries {
        if e.layers.len() > types::MAX_LAYERS {
            return Err(import_err(
                orig,
                types::DocumentError::TooManyLayers(e.layers.len()).to_string(),
            ));
        }
        // the names first: an image that has none is refused before anything is read
        let mut refused = vec![];
        let names: Vec<String> = match tag {
            Some(t) => vec![t.to_string()],
            None => e
                .repo_tags
                .clone()
                .unwrap_or_default()
                .iter()
                .filter_map(|t| {
                    full_reference(t)
                        .map_err(|why| refused.push(format!("RepoTag {why}")))
                        .ok()
                })
                .collect(),
        };
        if names.is_empty() {
            return Err(import_err(
                orig,
                format!(
                    "an image in the archive has no usable RepoTags{}; pass --tag REF",
                    reasons(&refused)
                ),
            ));
        }
        let cname = save_member(&e.config, orig)?;
        let cbytes = src
            .read_small(std::slice::from_ref(&cname), MAX_CONFIG)?
            .remove(&cname)
            .ok_or_else(|| import_err(orig, format!("no member {cname}")))?;
        let cfg: ImageConfig = serde_json::from_slice(&cbytes)
            .map_err(|er| import_err(orig, format!("{cname}: image config: {er}")))?;
        let lnames = e
            .layers
            .iter()
            .map(|l| save_member(l, orig))
            .collect::<Result<Vec<_>, _>>()?;
        let hashed = src.hash_members(&lnames)?;
        src.store_blobs(store, &hashed)?;
        let cdigest = store.put_bytes(&cbytes)?;
        let mut layers = vec![];
        for n in &lnames {
            let (digest, size) = hashed[n].clone();
            let mut magic = [0u8; 2];
            let gz = store
                .blob_path(&digest)
                .ok()
                .and_then(|p| std::fs::File::open(p).ok())
                .is_some_and(|mut f| f.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]);
            layers.push(Descriptor {
                media_type: if gz { OCI_LAYER_GZIP } else { OCI_LAYER }.into(),
                digest,
                size,
                platform: None,
                annotations: BTreeMap::new(),
                urls: vec![],
            });
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: OCI_CONFIG.into(),
                digest: cdigest,
                size: cbytes.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
                urls: vec![],
            },
            layers,
            annotations: BTreeMap::new(),
        };
        let mbytes =
            serde_json::to_vec(&manifest).map_err(|er| import_err(orig, er.to_string()))?;
        for n in names {
            let digest = finish_image(store, &n, &manifest, &mbytes, OCI_MANIFEST, &cfg, opts)?;
            out.push((n, digest));
        }
    }
    Ok(out)
}
