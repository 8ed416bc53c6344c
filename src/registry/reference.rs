//! Image references, parsed and normalised as docker does:
//! `ubuntu` → `docker.io/library/ubuntu:latest`, `user/app` → `docker.io/user/app:latest`,
//! `host:5000/a/b:tag`, `name@sha256:…`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Where `docker.io` references are actually served from.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Reference {
    /// Registry host, with port if any (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path (`library/ubuntu`).
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Pinned digest (`sha256:…`).
    pub digest: Option<String>,
}

impl Reference {
    /// Host to contact for the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Is the registry on a loopback address (plain HTTP allowed, as docker does)?
    pub fn is_loopback(&self) -> bool {
        registry_is_loopback(&self.registry)
    }

    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }
}

pub fn registry_is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host == "localhost" {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+ separated by '.', '_', '__' or one or more '-'
    if c.is_empty() {
        return false;
    }
    let b = c.as_bytes();
    if !b[0].is_ascii_lowercase() && !b[0].is_ascii_digit() {
        return false;
    }
    let last = b[b.len() - 1];
    if !last.is_ascii_lowercase() && !last.is_ascii_digit() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            i += 1;
            continue;
        }
        match ch {
            b'.' => i += 1,
            b'_' => {
                i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 };
            }
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        // a separator must be followed by an alphanumeric
        match b.get(i) {
            Some(n) if n.is_ascii_lowercase() || n.is_ascii_digit() => {}
            _ => return false,
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

pub fn valid_digest(d: &str) -> bool {
    match d.split_once(':') {
        Some(("sha256", hex)) => {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        }
        _ => false,
    }
}

impl FromStr for Reference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // the input may be any length: quoted cut
        let bad = |why: &str| {
            format!(
                "invalid image reference \"{}\": {}",
                crate::text::printable(s, 200),
                crate::text::printable(why, 200)
            )
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > 512 {
            return Err(bad("longer than 512 characters"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !valid_digest(d) {
                    return Err(bad(
                        "the digest must be sha256: followed by 64 lowercase hex digits",
                    ));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                if !valid_tag(t) {
                    return Err(bad(&format!("{t:?} is not a valid tag")));
                }
                (&rest[..last_slash + i], Some(t.to_string()))
            }
            None => (rest, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), remainder.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        if registry.is_empty()
            || !registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            return Err(bad(&format!("{registry:?} is not a valid registry host")));
        }
        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        for comp in repository.split('/') {
            if !valid_component(comp) {
                if comp.chars().any(|c| c.is_ascii_uppercase()) {
                    return Err(bad("repository names must be lowercase"));
                }
                return Err(bad(&format!(
                    "{comp:?} is not a valid repository path component"
                )));
            }
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl TryFrom<String> for Reference {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}
impl From<Reference> for String {
    fn from(r: Reference) -> String {
        r.to_string()
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        s.parse::<Reference>().unwrap().to_string()
    }

    #[test]
    fn normalises_like_docker() {
        assert_eq!(norm("ubuntu"), "docker.io/library/ubuntu:latest");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(norm("host:5000/a/b:tag"), "host:5000/a/b:tag");
        assert_eq!(norm("localhost/x"), "localhost/x:latest");
        assert_eq!(
            norm("127.0.0.1:5000/busybox:1.36"),
            "127.0.0.1:5000/busybox:1.36"
        );
        assert_eq!(norm("index.docker.io/library/x:1"), "docker.io/library/x:1");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            norm(&format!("busybox@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
        assert_eq!(
            norm(&format!("busybox:1@{d}")),
            format!("docker.io/library/busybox:1@{d}")
        );
    }

    #[test]
    fn rejects_bad() {
        for bad in [
            "",
            "Ubuntu",
            "a//b",
            "a:",
            "a@sha256:12",
            "a:b:c",
            "-a",
            "a/b-",
            "a$b",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn loopback() {
        assert!(registry_is_loopback("127.0.0.1:5000"));
        assert!(registry_is_loopback("localhost:5000"));
        assert!(registry_is_loopback("[::1]:5000"));
        assert!(!registry_is_loopback("example.com"));
        assert_eq!(
            "busybox".parse::<Reference>().unwrap().api_host(),
            DOCKER_HUB_API
        );
    }
}
