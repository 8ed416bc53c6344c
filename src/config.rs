//! Host configuration: `/etc/berth/config.toml` (optional).
//!
//! ```toml
//! cgroup_parent = "/berth"          # absolute cgroup parent; default: below berth's own cgroup
//! [pull]
//! concurrency = 4                   # layers downloaded at once
//! timeout = "60s"                   # a response's headers; a manifest, config, token or error body
//! stall_timeout = "30s"             # a layer download that moves under 64 KiB this long fails
//! max_time = "1h"                   # the longest one layer download may take
//! [registry."registry.example:5000"]
//! insecure = true                   # plain HTTP (loopback registries never need this)
//! mirrors = ["mirror.example:5000"] # tried in order, then the registry itself
//! ca_file = "/etc/berth/ca.pem"     # extra CA for this registry
//! [store]
//! min_free = "2GiB"                 # free space kept; default 10% of the fs or 2 GiB if less
//! ```

use crate::manifest::units::{Duration, Size};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/berth/config.toml";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub cgroup_parent: Option<PathBuf>,
    #[serde(default)]
    pub pull: PullConfig,
    #[serde(default)]
    pub registry: BTreeMap<String, RegistryConfig>,
    #[serde(default)]
    pub store: StoreConfig,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Free space the state directory's file system keeps: unpacking a layer fails rather
    /// than leave less. Default: 10% of the file system or 2 GiB, whichever is smaller.
    #[serde(default)]
    pub min_free: Option<Size>,
}

impl StoreConfig {
    /// The reserve in bytes on a file system of `total` bytes.
    pub fn min_free_bytes(&self, total: u64) -> u64 {
        match self.min_free {
            Some(s) => s.0,
            None => (total / 10).min(2 << 30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullConfig {
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Deadline for a response's headers (per attempt) and for the whole body of a small
    /// document: a manifest, a config, a token, an error message.
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// A blob download that moves fewer than [`STALL_MIN_BYTES`] in this long fails the
    /// attempt (a registry trickling bytes to hold berth forever).
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: Duration,
    /// The longest a layer download may take, however large the layer says it is (a
    /// registry declaring 1 TiB and trickling it just above the stall rate would otherwise
    /// hold a pull, and the state directory's lock, for years).
    #[serde(default = "default_max_time")]
    pub max_time: Duration,
}

/// See [`PullConfig::stall_timeout`].
pub const STALL_MIN_BYTES: u64 = 64 << 10;

impl Default for PullConfig {
    fn default() -> Self {
        PullConfig {
            concurrency: default_concurrency(),
            timeout: default_timeout(),
            stall_timeout: default_stall_timeout(),
            max_time: default_max_time(),
        }
    }
}

fn default_concurrency() -> usize {
    4
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_stall_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_time() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub mirrors: Vec<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl Config {
    /// Load the config. A missing file is an empty config unless `required` (the user named it).
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        let cfg: Config = toml::from_str(&text).map_err(|e| {
            let (line, col) = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                    (line, col)
                })
                .unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.into(),
                message: format!("{line}:{col}: {}", e.message()),
            }
        })?;
        if cfg.pull.concurrency == 0 {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: "pull.concurrency must be at least 1".into(),
            });
        }
        for (name, d) in [
            ("pull.timeout", cfg.pull.timeout),
            ("pull.stall_timeout", cfg.pull.stall_timeout),
        ] {
            if !(100..=3_600_000).contains(&d.0) {
                return Err(ConfigError::Parse {
                    path: path.into(),
                    message: format!("{name} = \"{d}\" must be between 100ms and 1h"),
                });
            }
        }
        if !(1_000..=7 * 86_400_000).contains(&cfg.pull.max_time.0) {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!(
                    "pull.max_time = \"{}\" must be between 1s and 7d",
                    cfg.pull.max_time
                ),
            });
        }
        if let Some(p) = &cfg.cgroup_parent
            && !p.is_absolute()
        {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!("cgroup_parent {} must be absolute", p.display()),
            });
        }
        Ok(cfg)
    }

    pub fn registry(&self, host: &str) -> RegistryConfig {
        self.registry.get(host).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_rejects() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        assert!(Config::load(&p, false).is_ok());
        assert!(Config::load(&p, true).is_err());
        std::fs::write(
            &p,
            "[registry.\"r:5000\"]\ninsecure = true\nmirrors = [\"m:1\"]\n",
        )
        .unwrap();
        let c = Config::load(&p, true).unwrap();
        assert!(c.registry("r:5000").insecure);
        assert_eq!(c.pull.timeout, Duration::from_secs(60));
        std::fs::write(&p, "[pull]\ntimeout = \"5ms\"\n").unwrap();
        let e = Config::load(&p, true).unwrap_err().to_string();
        assert!(
            e.contains("pull.timeout = \"5ms\" must be between 100ms and 1h"),
            "{e}"
        );
        std::fs::write(&p, "[pull]\nstall_timeout = \"5s\"\n").unwrap();
        assert_eq!(
            Config::load(&p, true).unwrap().pull.stall_timeout,
            Duration::from_secs(5)
        );
        std::fs::write(&p, "[pull]\nconcurency = 3\n").unwrap();
        let e = Config::load(&p, true).unwrap_err().to_string();
        assert!(e.contains("2:1"), "{e}");
    }
}
