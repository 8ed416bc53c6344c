//! OCI and Docker distribution documents: descriptors, manifests, indexes, and the checks a
//! document must pass before berth trusts it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// The Accept header berth sends for manifests.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        default,
        rename = "os.version",
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            schema_version: 2,
            media_type: Some(OCI_INDEX.into()),
            manifests: vec![],
            annotations: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The parts of an image configuration berth uses (unknown fields are kept by storing the
/// original bytes as a blob; this type only reads).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
    #[serde(default)]
    pub created: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub stop_signal: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

/// A fetched document, classified.
#[derive(Debug, Clone)]
pub enum Document {
    Index(Index),
    Manifest(Manifest),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DocumentError {
    #[error(
        "schema 1 manifests are not supported (deprecated by docker); push the image again with a current tool"
    )]
    Schema1,
    #[error("document declares mediaType {declared:?} but was served as {served:?}")]
    MediaTypeMismatch { declared: String, served: String },
    #[error("document has both `manifests` and `layers`: ambiguous, rejected (CVE-2021-41190)")]
    Ambiguous,
    #[error("unsupported document media type {0:?}")]
    Unsupported(String),
    #[error("malformed {what}: {message}")]
    Malformed { what: &'static str, message: String },
    #[error(
        "the image has {0} layers; berth runs images of at most {MAX_LAYERS} (overlayfs's limit)"
    )]
    TooManyLayers(usize),
}

/// The most layers an image may have: overlayfs stacks at most 500 lower directories.
pub const MAX_LAYERS: usize = 500;

fn strip_params(ct: &str) -> &str {
    ct.split(';').next().unwrap_or("").trim()
}

/// Parse and check a manifest or index. `served` is the Content-Type it came with, if any.
pub fn parse_document(bytes: &[u8], served: Option<&str>) -> Result<Document, DocumentError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| DocumentError::Malformed {
            what: "manifest",
            message: e.to_string(),
        })?;
    let obj = v.as_object().ok_or(DocumentError::Malformed {
        what: "manifest",
        message: "not a JSON object".into(),
    })?;
    if obj.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
        return Err(DocumentError::Schema1);
    }
    if obj.contains_key("manifests") && obj.contains_key("layers") {
        return Err(DocumentError::Ambiguous);
    }
    let declared = obj
        .get("mediaType")
        .and_then(|m| m.as_str())
        .map(str::to_string);
    let served = served
        .map(strip_params)
        .filter(|s| !s.is_empty() && *s != "application/json" && *s != "application/octet-stream");
    if let (Some(d), Some(s)) = (&declared, served)
        && d != s
    {
        return Err(DocumentError::MediaTypeMismatch {
            declared: d.clone(),
            served: s.to_string(),
        });
    }
    let mt = declared.or(served.map(str::to_string)).unwrap_or_else(|| {
        if obj.contains_key("manifests") {
            OCI_INDEX.to_string()
        } else {
            OCI_MANIFEST.to_string()
        }
    });
    let malformed = |e: serde_json::Error| DocumentError::Malformed {
        what: "manifest",
        message: e.to_string(),
    };
    match mt.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            if obj.contains_key("layers") || obj.contains_key("config") {
                return Err(DocumentError::Ambiguous);
            }
            Ok(Document::Index(
                serde_json::from_value(v).map_err(malformed)?,
            ))
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            if obj.contains_key("manifests") {
                return Err(DocumentError::Ambiguous);
            }
            let m: Manifest = serde_json::from_value(v).map_err(malformed)?;
            if m.layers.len() > MAX_LAYERS {
                return Err(DocumentError::TooManyLayers(m.layers.len()));
            }
            for d in std::iter::once(&m.config).chain(&m.layers) {
                if !crate::registry::reference::valid_digest(&d.digest) {
                    return Err(DocumentError::Malformed {
                        what: "manifest",
                        message: format!(
                            "unsupported digest {:?} (berth handles sha256)",
                            d.digest
                        ),
                    });
                }
            }
            Ok(Document::Manifest(m))
        }
        DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => Err(DocumentError::Schema1),
        other => Err(DocumentError::Unsupported(other.to_string())),
    }
}

/// The host's platform in OCI terms.
pub fn host_platform() -> (&'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        "powerpc64" => ("ppc64le", None),
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        other => (other, None),
    }
}

/// Choose the entry of an index for linux/<host arch> (with variant where relevant).
pub fn select_platform(index: &Index) -> Option<&Descriptor> {
    let (arch, variant) = host_platform();
    let candidates: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .collect();
    candidates
        .iter()
        .find(|d| d.platform.as_ref().and_then(|p| p.variant.as_deref()) == variant)
        .or_else(|| {
            candidates
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| p.variant.is_none()))
        })
        .or(candidates.first())
        .copied()
}

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn layer_compression(media_type: &str) -> Option<Compression> {
    if media_type.ends_with("+gzip")
        || media_type.ends_with(".tar.gzip")
        || media_type == DOCKER_LAYER_GZIP
    {
        Some(Compression::Gzip)
    } else if media_type.ends_with("+zstd") {
        Some(Compression::Zstd)
    } else if media_type.ends_with(".tar")
        || media_type == "application/vnd.docker.image.rootfs.diff.tar"
    {
        Some(Compression::None)
    } else {
        None
    }
}

/// `sha256:<hex>` of bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Chain IDs of a stack of diff IDs (OCI image spec).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_ambiguous_and_schema1() {
        let amb = br#"{"schemaVersion":2,"manifests":[],"layers":[]}"#;
        assert_eq!(
            parse_document(amb, None).unwrap_err(),
            DocumentError::Ambiguous
        );
        let s1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert_eq!(
            parse_document(s1, None).unwrap_err(),
            DocumentError::Schema1
        );
        let idx = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert!(matches!(
            parse_document(idx.as_bytes(), Some(OCI_MANIFEST)).unwrap_err(),
            DocumentError::MediaTypeMismatch { .. }
        ));
        assert!(matches!(
            parse_document(idx.as_bytes(), Some(OCI_INDEX)).unwrap(),
            Document::Index(_)
        ));
        // an index served as a manifest type, with config smuggled in
        let sneaky = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[],"config":{{}}}}"#
        );
        assert_eq!(
            parse_document(sneaky.as_bytes(), None).unwrap_err(),
            DocumentError::Ambiguous
        );
    }

    #[test]
    fn chain_id_rule() {
        let a = sha256_digest(b"a");
        let b = sha256_digest(b"b");
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], sha256_digest(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn platform_choice() {
        let (arch, _) = host_platform();
        let mk = |a: &str, v: Option<&str>, d: &str| Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: d.into(),
            size: 1,
            platform: Some(Platform {
                architecture: a.into(),
                os: "linux".into(),
                variant: v.map(str::to_string),
                os_version: None,
            }),
            annotations: BTreeMap::new(),
            urls: vec![],
        };
        let idx = Index {
            manifests: vec![mk("s390x", None, "x"), mk(arch, None, "mine")],
            ..Default::default()
        };
        assert_eq!(select_platform(&idx).unwrap().digest, "mine");
    }
}
