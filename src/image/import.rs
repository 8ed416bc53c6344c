//! `berth image import FILE`: bring images in without a registry, from an OCI image layout
//! (a directory, or a tar of one: `skopeo copy … oci-archive:…`) or a `docker save` archive.
//! Every blob is verified (digest, size, diffID) on its way into the store.

use super::ImageError;
use super::pull::snapshot_from_blob;
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
use std::path::{Component, Path, PathBuf};

fn import_err(path: &Path, message: impl Into<String>) -> ImageError {
    ImageError::Import {
        path: path.to_path_buf(),
        message: message.into(),
    }
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
    let meta = std::fs::metadata(path).map_err(|e| import_err(path, e.to_string()))?;
    if meta.is_dir() {
        return import_dir(store, path, path, tag, opts);
    }
    let tmp = store.root.join("ingest").join(format!(
        "import-{}-{}",
        std::process::id(),
        crate::fsutil::now_unix()
    ));
    let res = (|| {
        extract_archive(path, &tmp)?;
        import_dir(store, path, &tmp, tag, opts)
    })();
    let _ = crate::store::remove_tree(&tmp);
    res
}

fn import_dir(
    store: &Store,
    orig: &Path,
    dir: &Path,
    tag: Option<&Reference>,
    opts: &UnpackOptions,
) -> Result<Vec<(String, String)>, ImageError> {
    if dir.join("index.json").is_file() && dir.join("oci-layout").is_file() {
        import_oci_layout(store, orig, dir, tag, opts)
    } else if dir.join("manifest.json").is_file() {
        import_docker_save(store, orig, dir, tag, opts)
    } else {
        Err(import_err(
            orig,
            "neither an OCI image layout (oci-layout, index.json) nor a docker save archive (manifest.json)",
        ))
    }
}

/// Extract the regular files and directories of a (possibly gzip-compressed) tar; anything
/// else is skipped and no path may leave `dest`.
fn extract_archive(path: &Path, dest: &Path) -> Result<(), ImageError> {
    let mut f = std::fs::File::open(path).map_err(|e| import_err(path, e.to_string()))?;
    let mut magic = [0u8; 2];
    let n = f
        .read(&mut magic)
        .map_err(|e| import_err(path, e.to_string()))?;
    let f = std::fs::File::open(path).map_err(|e| import_err(path, e.to_string()))?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut ar = tar::Archive::new(reader);
    std::fs::create_dir_all(dest).map_err(|e| import_err(dest, e.to_string()))?;
    for entry in ar
        .entries()
        .map_err(|e| import_err(path, format!("not a tar archive: {e}")))?
    {
        let mut entry = entry.map_err(|e| import_err(path, format!("reading archive: {e}")))?;
        let p = entry
            .path()
            .map_err(|e| import_err(path, e.to_string()))?
            .into_owned();
        let mut rel = PathBuf::new();
        for c in p.components() {
            match c {
                Component::Normal(s) => rel.push(s),
                Component::CurDir => {}
                _ => {
                    return Err(import_err(
                        path,
                        format!("unsafe path {} in archive", p.display()),
                    ));
                }
            }
        }
        if rel.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(|e| import_err(&target, e.to_string()))?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| import_err(parent, e.to_string()))?;
                }
                let mut out = std::fs::File::create(&target)
                    .map_err(|e| import_err(&target, e.to_string()))?;
                std::io::copy(&mut entry, &mut out)
                    .map_err(|e| import_err(&target, e.to_string()))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Copy a blob file into the store, verifying digest and size.
fn copy_blob(store: &Store, src: &Path, digest: &str, size: Option<u64>) -> Result<(), ImageError> {
    if store.has_blob(digest) {
        return Ok(());
    }
    let mut f =
        std::fs::File::open(src).map_err(|e| import_err(src, format!("blob {digest}: {e}")))?;
    let mut w = store.ingest(digest, size)?;
    std::io::copy(&mut f, &mut w).map_err(|e| import_err(src, e.to_string()))?;
    w.commit()?;
    Ok(())
}

fn layout_blob(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    if !crate::registry::reference::valid_digest(digest) {
        return Err(StoreError::BadDigest(digest.into()).into());
    }
    Ok(dir.join("blobs/sha256").join(&digest["sha256:".len()..]))
}

fn read_verified(dir: &Path, d: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let p = layout_blob(dir, &d.digest)?;
    let b = std::fs::read(&p).map_err(|e| import_err(&p, e.to_string()))?;
    let actual = types::sha256_digest(&b);
    if actual != d.digest {
        return Err(StoreError::DigestMismatch {
            digest: d.digest.clone(),
            actual,
        }
        .into());
    }
    Ok(b)
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
    for key in ["io.containerd.image.name", REF_NAME_ANNOTATION] {
        if let Some(n) = annotations.get(key)
            && (n.contains('/') || n.contains(':'))
            && let Ok(r) = n.parse::<Reference>()
        {
            return Ok(r.to_string());
        }
    }
    Err(import_err(
        orig,
        "the archive does not name its image with a full reference; pass --tag REF",
    ))
}

fn import_oci_layout(
    store: &Store,
    orig: &Path,
    dir: &Path,
    tag: Option<&Reference>,
    opts: &UnpackOptions,
) -> Result<Vec<(String, String)>, ImageError> {
    let idx_path = dir.join("index.json");
    let bytes = std::fs::read(&idx_path).map_err(|e| import_err(&idx_path, e.to_string()))?;
    let index =
        match parse_document(&bytes, None).map_err(|e| import_err(&idx_path, e.to_string()))? {
            Document::Index(i) => i,
            Document::Manifest(_) => {
                return Err(import_err(&idx_path, "index.json is not an image index"));
            }
        };
    let count = index.manifests.len();
    let mut out = vec![];
    for top in &index.manifests {
        let reference = name_for(orig, tag, count, &top.annotations)?;
        let mut desc = top.clone();
        let mut mbytes = read_verified(dir, &desc)?;
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
            mbytes = read_verified(dir, &desc)?;
        }
        let manifest = match parse_document(&mbytes, Some(&desc.media_type))
            .map_err(|e| import_err(orig, e.to_string()))?
        {
            Document::Manifest(m) => m,
            Document::Index(_) => return Err(import_err(orig, "nested indexes are not supported")),
        };
        let cbytes = read_verified(dir, &manifest.config)?;
        store.put_verified(&manifest.config.digest, &cbytes)?;
        let cfg: ImageConfig = serde_json::from_slice(&cbytes)
            .map_err(|e| import_err(orig, format!("image config: {e}")))?;
        for l in &manifest.layers {
            copy_blob(
                store,
                &layout_blob(dir, &l.digest)?,
                &l.digest,
                Some(l.size),
            )?;
        }
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

fn safe_join(dir: &Path, rel: &str, orig: &Path) -> Result<PathBuf, ImageError> {
    let p = Path::new(rel);
    if p.components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(import_err(
            orig,
            format!("unsafe path {rel:?} in manifest.json"),
        ));
    }
    Ok(dir.join(p))
}

fn hash_file(p: &Path) -> Result<(String, u64), ImageError> {
    let mut f = std::fs::File::open(p).map_err(|e| import_err(p, e.to_string()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| import_err(p, e.to_string()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

fn import_docker_save(
    store: &Store,
    orig: &Path,
    dir: &Path,
    tag: Option<&Reference>,
    opts: &UnpackOptions,
) -> Result<Vec<(String, String)>, ImageError> {
    let mp = dir.join("manifest.json");
    let bytes = std::fs::read(&mp).map_err(|e| import_err(&mp, e.to_string()))?;
    let entries: Vec<SaveEntry> =
        serde_json::from_slice(&bytes).map_err(|e| import_err(&mp, e.to_string()))?;
    let mut out = vec![];
    for e in &entries {
        let cpath = safe_join(dir, &e.config, orig)?;
        let cbytes = std::fs::read(&cpath).map_err(|er| import_err(&cpath, er.to_string()))?;
        let cfg: ImageConfig = serde_json::from_slice(&cbytes)
            .map_err(|er| import_err(&cpath, format!("image config: {er}")))?;
        let cdigest = store.put_bytes(&cbytes)?;
        let mut layers = vec![];
        for l in &e.layers {
            let lp = safe_join(dir, l, orig)?;
            let (digest, size) = hash_file(&lp)?;
            let mut magic = [0u8; 2];
            let gz = std::fs::File::open(&lp)
                .and_then(|mut f| f.read_exact(&mut magic))
                .is_ok()
                && magic == [0x1f, 0x8b];
            copy_blob(store, &lp, &digest, Some(size))?;
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
        let names: Vec<String> = match tag {
            Some(t) if entries.len() == 1 => vec![t.to_string()],
            Some(_) => {
                return Err(import_err(
                    orig,
                    format!(
                        "--tag names one image but the archive holds {}",
                        entries.len()
                    ),
                ));
            }
            None => e
                .repo_tags
                .clone()
                .unwrap_or_default()
                .iter()
                .filter_map(|t| t.parse::<Reference>().ok())
                .map(|r| r.to_string())
                .collect(),
        };
        if names.is_empty() {
            return Err(import_err(
                orig,
                "an image in the archive has no RepoTags; pass --tag REF",
            ));
        }
        for n in names {
            let digest = finish_image(store, &n, &manifest, &mbytes, OCI_MANIFEST, &cfg, opts)?;
            out.push((n, digest));
        }
    }
    Ok(out)
}
