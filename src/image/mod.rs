//! Images: pulling from a registry into the store (layers downloaded in parallel and unpacked
//! while they download), pushing, importing archives, and removal.

mod gunzip;
pub mod import;
pub mod progress;
pub mod pull;
pub mod push;

use crate::registry::client::RegistryError;
use crate::store::StoreError;
use crate::store::unpack::UnpackError;

/// The unpacked size of a layer reckoned from its compressed size when checking for room
/// before a pull: generous (text compresses further, binaries less).
pub const UNPACK_FACTOR: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The missing layers would not fit beside the reserve: refused before any is fetched.
    #[error(
        "pull {reference}: needs about {} ({} to download, about {} unpacked, reckoned at {UNPACK_FACTOR}x the compressed size) but {} has {} free and keeps a reserve of {} ([store] min_free); nothing was downloaded and nothing running was touched",
        crate::manifest::units::human_bytes(.download + .unpacked),
        crate::manifest::units::human_bytes(*.download),
        crate::manifest::units::human_bytes(*.unpacked),
        .path.display(),
        crate::manifest::units::human_bytes(*.available),
        crate::manifest::units::human_bytes(*.reserve)
    )]
    NoRoom {
        reference: String,
        path: std::path::PathBuf,
        download: u64,
        unpacked: u64,
        available: u64,
        reserve: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `root` is the snapshot directory being filled: an entry's path alone does not say which
    /// filesystem ran out of space or refused a write.
    #[error("layer {digest}, unpacking into {root:?}: {source}")]
    Unpack {
        digest: String,
        root: std::path::PathBuf,
        #[source]
        source: UnpackError,
    },
    #[error("layer {digest}: reading the compressed stream: {source}")]
    Decompress {
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "layer {digest}: uncompressed content hashes to {actual}, but the image config says {expected}"
    )]
    DiffIdMismatch {
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("layer {digest}: unsupported media type \"{}\"", crate::text::printable(.media_type, 200))]
    LayerMediaType { digest: String, media_type: String },
    #[error(
        "image {reference}: config lists {diff_ids} layer diff IDs but the manifest has {layers} layers"
    )]
    LayerCount {
        reference: String,
        diff_ids: usize,
        layers: usize,
    },
    #[error("image {reference}: pinned digest {expected}, registry served {actual}")]
    PinnedDigest {
        reference: String,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("image {reference} is used by container {container}; remove the container first")]
    InUse {
        reference: String,
        container: String,
    },
    #[error("import {path}: {message}")]
    Import {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("internal task failed: {0}")]
    Task(String),
}
