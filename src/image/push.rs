//! `berth image push`: upload an image from the store to its registry (blobs the registry
//! lacks, then the manifest), keeping the manifest bytes so digests match exactly.

use super::ImageError;
use super::progress::Progress;
use crate::registry::client::RegistryClient;
use crate::registry::reference::Reference;
use crate::store::Store;

/// Push `local` (a reference in the store) to `dest`; returns the manifest digest.
pub async fn push(
    client: &RegistryClient,
    store: &Store,
    local: &str,
    dest: &Reference,
    progress: &Progress,
) -> Result<String, ImageError> {
    let img = store.get(local)?;
    let blobs = img
        .manifest
        .layers
        .iter()
        .chain(std::iter::once(&img.manifest.config));
    for b in blobs {
        if client.blob_exists(dest, &b.digest).await? {
            progress.message(&format!(
                "{}: already in the registry",
                super::progress::short_digest(&b.digest)
            ));
            continue;
        }
        let path = store.blob_path(&b.digest)?;
        if !path.is_file() {
            return Err(crate::store::StoreError::MissingBlob(b.digest.clone()).into());
        }
        let bar = progress.layer(&b.digest, b.size);
        let body = || match std::fs::File::open(&path) {
            Ok(f) => reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(
                tokio::fs::File::from_std(f),
            )),
            Err(_) => reqwest::Body::from(Vec::new()),
        };
        client.upload_blob(dest, &b.digest, b.size, &body).await?;
        bar.inc(b.size);
        bar.finish("pushed");
    }
    let bytes = store.read_blob(img.digest())?;
    let object = dest
        .digest
        .clone()
        .or(dest.tag.clone())
        .unwrap_or_else(|| "latest".into());
    client
        .put_manifest(dest, &object, &img.descriptor.media_type, &bytes)
        .await?;
    Ok(img.digest().to_string())
}
