//! The registry HTTP client (OCI distribution API v2): auth (Basic and the Bearer token flow),
//! manifests, blobs, uploads, mirrors, and bounded retries with backoff and jitter.

use super::reference::{Reference, registry_is_loopback};
use super::types::{self, MANIFEST_ACCEPT};
use crate::config::{Config, STALL_MIN_BYTES};
use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest manifest or index berth accepts.
pub const MAX_MANIFEST: usize = 4 << 20;

/// Most of an error response's body berth reads (the rest is dropped unread) and the largest
/// token response it accepts.
pub const MAX_SMALL_BODY: usize = 64 << 10;

/// All attempts of one request together stop being retried after this long.
const RETRY_WITHIN: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "{registry}: authentication required for {repository}; log in (docker login writes ~/.docker/config.json) or check the credentials there"
    )]
    Unauthorized {
        registry: String,
        repository: String,
    },
    #[error("{registry}: access to {repository} denied (403)")]
    Denied {
        registry: String,
        repository: String,
    },
    #[error("{registry}: {repository}:{object} not found (404)")]
    NotFound {
        registry: String,
        repository: String,
        object: String,
    },
    #[error("{registry}: {what} for {repository} failed: HTTP {status}{detail}")]
    Status {
        registry: String,
        repository: String,
        what: String,
        status: u16,
        detail: String,
    },
    #[error("{registry}: {what}: {source}")]
    Transport {
        registry: String,
        what: String,
        #[source]
        source: reqwest::Error,
    },
    // the cause (certificate or protocol) follows in the error chain
    #[error(
        "{registry}: {what}: TLS handshake failed (a registry with a private CA needs `ca_file`, \
         one that speaks plain HTTP `insecure = true`, under [registry.\"{registry}\"] in the \
         host config)"
    )]
    Tls {
        registry: String,
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{registry}: {repository}: {source}")]
    Document {
        registry: String,
        repository: String,
        #[source]
        source: types::DocumentError,
    },
    #[error("{registry}: {repository}: manifest digest is {actual}, expected {expected}")]
    DigestMismatch {
        registry: String,
        repository: String,
        expected: String,
        actual: String,
    },
    #[error("{registry}: {repository}: manifest larger than {MAX_MANIFEST} bytes")]
    TooLarge {
        registry: String,
        repository: String,
    },
    #[error("{registry}: no image for linux/{arch} in {repository}:{object}")]
    NoPlatform {
        registry: String,
        repository: String,
        object: String,
        arch: String,
    },
    #[error("{registry}: authentication: {message}")]
    Auth { registry: String, message: String },
    #[error("CA file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error("{registry}: blob upload: {message}")]
    Upload { registry: String, message: String },
    /// A time bound hit: `which` says which (no headers in time, a body not complete in
    /// time, a download stalled).
    #[error("{registry}: {what}: {which}")]
    TimedOut {
        registry: String,
        what: String,
        which: String,
    },
    #[error("{registry}: {what}: response larger than {limit} bytes")]
    BodyTooLarge {
        registry: String,
        what: String,
        limit: usize,
    },
}

/// Whether a request failed in the TLS handshake (a certificate not trusted, or a server
/// that is not speaking TLS): rustls reports those as an I/O error of kind InvalidData,
/// which no network fault produces. Not worth retrying.
fn tls_failure(e: &reqwest::Error) -> bool {
    if !e.is_connect() {
        return false;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        cause = match c.downcast_ref::<std::io::Error>() {
            Some(io) if io.kind() == std::io::ErrorKind::InvalidData => return true,
            // an io::Error's source() skips the error it wraps: look at that one itself
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    false
}

impl RegistryError {
    /// Worth another try (network fault, 5xx, 429)?
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport { source, .. } => {
                source.is_connect()
                    || source.is_timeout()
                    || source.is_request()
                    || source.is_body()
                    || source.is_decode()
            }
            RegistryError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            RegistryError::TimedOut { .. } => true,
            _ => false,
        }
    }
}

/// Bounded exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `n` (1-based retry count), jittered to 50–100%.
    pub fn delay(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(Duration::from_secs(30));
        }
        let exp = self.base.saturating_mul(1u32 << n.min(16)).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let frac = 0.5 + f64::from(nanos % 1000) / 2000.0;
        exp.mul_f64(frac)
    }
}

/// `host[:port]` of a URL, as berth names registry hosts (the port only when the URL has one).
fn url_authority(u: &reqwest::Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}

/// Credentials from docker's config.json (`auths` entries).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_host: HashMap<String, (String, String)>,
}

impl Credentials {
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; missing means none.
    pub fn load() -> Credentials {
        let path = match std::env::var_os("DOCKER_CONFIG") {
            Some(d) => PathBuf::from(d).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".docker/config.json"),
                None => return Credentials::default(),
            },
        };
        match std::fs::read(&path) {
            Ok(b) => Credentials::parse(&b).unwrap_or_else(|e| {
                tracing::warn!("ignoring {}: {e}", path.display());
                Credentials::default()
            }),
            Err(_) => Credentials::default(),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Credentials, String> {
        use base64::Engine;
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut by_host = HashMap::new();
        if let Some(auths) = v.get("auths").and_then(|a| a.as_object()) {
            for (k, entry) in auths {
                let host = k
                    .trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .to_string();
                let host = if host == "index.docker.io" {
                    "docker.io".to_string()
                } else {
                    host
                };
                let pair = if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(a)
                        .map_err(|e| format!("{k}: bad auth: {e}"))?;
                    let s =
                        String::from_utf8(raw).map_err(|_| format!("{k}: auth is not UTF-8"))?;
                    s.split_once(':')
                        .map(|(u, p)| (u.to_string(), p.to_string()))
                } else {
                    match (
                        entry.get("username").and_then(|u| u.as_str()),
                        entry.get("password").and_then(|p| p.as_str()),
                    ) {
                        (Some(u), Some(p)) => Some((u.to_string(), p.to_string())),
                        _ => None,
                    }
                };
                if let Some(p) = pair {
                    by_host.insert(host, p);
                }
            }
        }
        Ok(Credentials { by_host })
    }

    pub fn get(&self, registry: &str) -> Option<&(String, String)> {
        self.by_host.get(registry)
    }
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, remaining) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_string(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(k, v);
        s = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

pub struct RegistryClient {
    http: reqwest::Client,
    config: Config,
    creds: Credentials,
    /// Bearer tokens by "registry|scope".
    tokens: Mutex<HashMap<String, String>>,
    /// Registries (host) that answered over plain HTTP.
    plain_http: Mutex<HashMap<String, bool>>,
    /// Mirrors that could not be reached: skipped for the rest of this client's life (a pull).
    mirrors_down: Mutex<HashSet<String>>,
    pub retry: RetryPolicy,
    /// Headers per attempt, and a small document's whole body ([`crate::config::PullConfig`]).
    pub timeout: Duration,
    /// A blob body moving under [`STALL_MIN_BYTES`] in this long fails.
    pub stall_timeout: Duration,
    /// The longest one blob download may take.
    pub max_time: Duration,
}

/// A fetched manifest or index.
#[derive(Debug, Clone)]
pub struct FetchedDocument {
    pub bytes: Vec<u8>,
    pub content_type: Option<String>,
    pub digest: String,
}

impl RegistryClient {
    pub fn new(config: &Config) -> Result<RegistryClient, RegistryError> {
        let mut extra = Vec::new();
        for rc in config.registry.values() {
            if let Some(p) = &rc.ca_file {
                extra.extend(super::tls::read_ca_file(p).map_err(|message| {
                    RegistryError::CaFile {
                        path: p.clone(),
                        message,
                    }
                })?);
            }
        }
        let tls =
            super::tls::client_config(extra).map_err(|e| RegistryError::TlsSetup(e.to_string()))?;
        let b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(5))
            .use_preconfigured_tls(tls);
        let http = b.build().map_err(|e| RegistryError::Transport {
            registry: "-".into(),
            what: "client setup".into(),
            source: e,
        })?;
        Ok(RegistryClient {
            http,
            config: config.clone(),
            creds: Credentials::load(),
            tokens: Mutex::new(HashMap::new()),
            plain_http: Mutex::new(HashMap::new()),
            mirrors_down: Mutex::new(HashSet::new()),
            retry: RetryPolicy::default(),
            timeout: config.pull.timeout.as_std(),
            stall_timeout: config.pull.stall_timeout.as_std(),
            max_time: config.pull.max_time.as_std(),
        })
    }

    pub fn with_credentials(mut self, creds: Credentials) -> Self {
        self.creds = creds;
        self
    }

    /// Hosts to try for a reference, in order: configured mirrors (but those found down),
    /// then the registry itself.
    fn hosts(&self, r: &Reference) -> Vec<String> {
        let down = self
            .mirrors_down
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        let mut v: Vec<String> = self
            .config
            .registry(&r.registry)
            .mirrors
            .iter()
            .filter(|m| !down.contains(*m))
            .cloned()
            .collect();
        v.push(r.api_host().to_string());
        v
    }

    /// The credentials for `host` when asked about `r`: the registry's own when `host` is the
    /// registry (its API host may differ from its name, as docker.io's does), a mirror's own
    /// (by its host name) when it is a mirror.
    fn creds_for(&self, host: &str, r: &Reference) -> Option<&(String, String)> {
        if host == r.api_host() {
            self.creds.get(&r.registry).or_else(|| self.creds.get(host))
        } else {
            self.creds.get(host)
        }
    }

    fn allows_plain_http(&self, host: &str) -> bool {
        registry_is_loopback(host) || self.config.registry(host).insecure
    }

    fn scheme(&self, host: &str) -> &'static str {
        let plain = self
            .plain_http
            .lock()
            .map(|m| m.get(host).copied())
            .ok()
            .flatten();
        match plain {
            Some(true) => "http",
            Some(false) => "https",
            // loopback and insecure registries: plain HTTP first (as docker does for 127.0.0.0/8)
            None if self.allows_plain_http(host) => "http",
            None => "https",
        }
    }

    fn cache_key(host: &str, scope: &str) -> String {
        format!("{host}|{scope}")
    }

    /// Send a request with auth, retries and the plain-HTTP rule. `path` starts with `/v2/`.
    async fn send(
        &self,
        host: &str,
        r: &Reference,
        what: &str,
        method: Method,
        path: &str,
        build: &(dyn Fn(RequestBuilder) -> RequestBuilder + Sync),
    ) -> Result<Response, RegistryError> {
        // reads need a pull token; writes a push one
        let actions = if method == Method::GET || method == Method::HEAD {
            "pull"
        } else {
            "pull,push"
        };
        let scope = format!("repository:{}:{actions}", r.repository);
        let mirror = host != r.api_host();
        let mut attempt = 0;
        let mut authed_once = false;
        let started = Instant::now();
        loop {
            attempt += 1;
            let url = if path.starts_with("http://") || path.starts_with("https://") {
                path.to_string()
            } else {
                format!("{}://{host}{path}", self.scheme(host))
            };
            let mut rb = build(self.http.request(method.clone(), &url));
            let token = self
                .tokens
                .lock()
                .ok()
                .and_then(|t| t.get(&Self::cache_key(host, &scope)).cloned());
            // credentials go only to the host they are for: never to a mirror of the
            // registry, nor to another host an upload location names
            let same_host = reqwest::Url::parse(&url)
                .ok()
                .is_some_and(|u| url_authority(&u) == host);
            if same_host && let Some(t) = &token {
                rb = rb.bearer_auth(t);
            } else if same_host && let Some((u, p)) = self.creds_for(host, r) {
                rb = rb.basic_auth(u, Some(p));
            }
            // the headers within the deadline; not for uploads, whose request body is sent
            // first (those have the read timeout between packets)
            let result = if method == Method::GET || method == Method::HEAD {
                match tokio::time::timeout(self.timeout, rb.send()).await {
                    Ok(r) => r,
                    Err(_) => {
                        let err = RegistryError::TimedOut {
                            registry: host.to_string(),
                            what: what.to_string(),
                            which: format!("no response within {}", secs(self.timeout)),
                        };
                        if !mirror && self.backoff_within(&err, attempt, None, started).await {
                            continue;
                        }
                        return Err(err);
                    }
                }
            } else {
                rb.send().await
            };
            let resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    let (registry, what) = (host.to_string(), what.to_string());
                    let err = if tls_failure(&e) {
                        RegistryError::Tls {
                            registry,
                            what,
                            source: e,
                        }
                    } else {
                        RegistryError::Transport {
                            registry,
                            what,
                            source: e,
                        }
                    };
                    if mirror {
                        // a mirror is a shortcut, not the source: no retries; one that cannot
                        // be reached is not asked again
                        if let RegistryError::Transport { source, .. } = &err
                            && (source.is_connect() || source.is_timeout())
                            && let Ok(mut d) = self.mirrors_down.lock()
                        {
                            d.insert(host.to_string());
                        }
                        return Err(err);
                    }
                    if self.backoff_within(&err, attempt, None, started).await {
                        continue;
                    }
                    return Err(err);
                }
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !authed_once {
                authed_once = true;
                if let Some(ch) = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .and_then(parse_challenge)
                    && ch.scheme == "bearer"
                {
                    let token = self.fetch_token(host, r, &ch, &scope).await?;
                    if let Ok(mut t) = self.tokens.lock() {
                        t.insert(Self::cache_key(host, &scope), token);
                    }
                    attempt -= 1;
                    continue;
                }
            }
            if status.is_success() || status.is_redirection() {
                return Ok(resp);
            }
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            if status == StatusCode::NOT_FOUND && method == Method::HEAD && what == "blob check" {
                return Ok(resp);
            }
            let err = match status {
                StatusCode::UNAUTHORIZED => RegistryError::Unauthorized {
                    registry: r.registry.clone(),
                    repository: r.repository.clone(),
                },
                StatusCode::FORBIDDEN => RegistryError::Denied {
                    registry: r.registry.clone(),
                    repository: r.repository.clone(),
                },
                StatusCode::NOT_FOUND if method != Method::HEAD || what.starts_with("manifest") => {
                    RegistryError::NotFound {
                        registry: r.registry.clone(),
                        repository: r.repository.clone(),
                        object: r.object().to_string(),
                    }
                }
                _ => {
                    // at most MAX_SMALL_BODY of it, for at most the deadline: an error body
                    // may be endless
                    let body = read_prefix(resp, MAX_SMALL_BODY, self.timeout).await;
                    let body = String::from_utf8_lossy(&body);
                    let detail = if body.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", crate::text::printable(body.trim(), 200))
                    };
                    RegistryError::Status {
                        registry: host.to_string(),
                        repository: r.repository.clone(),
                        what: what.to_string(),
                        status: status.as_u16(),
                        detail,
                    }
                }
            };
            if !mirror
                && self
                    .backoff_within(&err, attempt, retry_after, started)
                    .await
            {
                continue;
            }
            return Err(err);
        }
    }

    /// [`Self::backoff`], unless the request's attempts have taken [`RETRY_WITHIN`] already.
    async fn backoff_within(
        &self,
        err: &RegistryError,
        attempt: u32,
        retry_after: Option<Duration>,
        started: Instant,
    ) -> bool {
        if started.elapsed() >= RETRY_WITHIN {
            tracing::info!("{err}; not retried: attempts took {}", secs(RETRY_WITHIN));
            return false;
        }
        self.backoff(err, attempt, retry_after).await
    }

    /// For a transient error with attempts left: log, wait the backoff, return true (retry).
    async fn backoff(
        &self,
        err: &RegistryError,
        attempt: u32,
        retry_after: Option<Duration>,
    ) -> bool {
        if !err.is_transient() || attempt >= self.retry.attempts {
            return false;
        }
        let d = self.retry.delay(attempt, retry_after);
        tracing::info!(
            "{err}; retrying in {d:?} ({attempt}/{})",
            self.retry.attempts
        );
        tokio::time::sleep(d).await;
        true
    }

    async fn fetch_token(
        &self,
        host: &str,
        r: &Reference,
        ch: &Challenge,
        scope: &str,
    ) -> Result<String, RegistryError> {
        let realm = ch.params.get("realm").ok_or_else(|| RegistryError::Auth {
            registry: host.into(),
            message: "Bearer challenge without realm".into(),
        })?;
        // the realm gets the registry's credentials: it must be HTTPS, unless the registry
        // itself is spoken to in plain HTTP (loopback, or `insecure`)
        let realm_url = reqwest::Url::parse(realm).map_err(|e| RegistryError::Auth {
            registry: host.into(),
            message: format!(
                "Bearer realm \"{}\" is not a URL: {e}",
                crate::text::printable(realm, 200)
            ),
        })?;
        if realm_url.scheme() != "https" && !self.allows_plain_http(host) {
            return Err(RegistryError::Auth {
                registry: host.into(),
                message: format!(
                    "Bearer realm \"{}\" is not HTTPS; credentials are sent only over HTTPS \
                     (set `insecure = true` for this registry to allow it)",
                    crate::text::printable(realm, 200)
                ),
            });
        }
        let mut rb = self.http.get(realm_url);
        let mut q: Vec<(&str, &str)> = vec![("scope", scope)];
        if let Some(s) = ch.params.get("service") {
            q.push(("service", s));
        }
        rb = rb.query(&q);
        if let Some((u, p)) = self.creds_for(host, r) {
            rb = rb.basic_auth(u, Some(p));
        }
        let resp = rb.send().await.map_err(|e| RegistryError::Transport {
            registry: host.into(),
            what: "token request".into(),
            source: e,
        })?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: r.registry.clone(),
                repository: r.repository.clone(),
            });
        }
        if !resp.status().is_success() {
            return Err(RegistryError::Auth {
                registry: host.into(),
                message: format!("token endpoint answered HTTP {}", resp.status().as_u16()),
            });
        }
        let body = self
            .read_document(resp, MAX_SMALL_BODY, host, "token response")
            .await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Auth {
                registry: host.into(),
                message: format!("token response is not JSON: {e}"),
            })?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| RegistryError::Auth {
                registry: host.into(),
                message: "token response has no token".into(),
            })
    }

    /// Try each host (mirrors first) until one answers.
    async fn on_hosts<T, F, Fut>(&self, r: &Reference, f: F) -> Result<T, RegistryError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let hosts = self.hosts(r);
        let mut last = None;
        for (i, h) in hosts.iter().enumerate() {
            match f(h.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if i + 1 < hosts.len() => {
                    tracing::info!("mirror {h} failed ({e}); trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(RegistryError::NotFound {
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            object: r.object().into(),
        }))
    }

    /// GET a manifest or index by tag or digest; checks size, digest (when asked by digest),
    /// and the document rules.
    pub async fn fetch_manifest(
        &self,
        r: &Reference,
        object: &str,
    ) -> Result<FetchedDocument, RegistryError> {
        self.on_hosts(r, |host| async move {
            let path = format!("/v2/{}/manifests/{object}", r.repository);
            let resp = self
                .send(&host, r, "manifest", Method::GET, &path, &|rb| {
                    rb.header(header::ACCEPT, MANIFEST_ACCEPT)
                })
                .await?;
            let content_type = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = self
                .read_document(resp, MAX_MANIFEST, &host, "manifest body")
                .await
                .map_err(|e| match e {
                    RegistryError::BodyTooLarge { .. } => RegistryError::TooLarge {
                        registry: r.registry.clone(),
                        repository: r.repository.clone(),
                    },
                    e => e,
                })?;
            let digest = types::sha256_digest(&bytes);
            if object.starts_with("sha256:") && digest != object {
                return Err(RegistryError::DigestMismatch {
                    registry: r.registry.clone(),
                    repository: r.repository.clone(),
                    expected: object.into(),
                    actual: digest,
                });
            }
            Ok(FetchedDocument {
                bytes,
                content_type,
                digest,
            })
        })
        .await
    }

    /// The digest the registry serves for a reference now (HEAD, falling back to GET).
    pub async fn resolve_digest(&self, r: &Reference) -> Result<String, RegistryError> {
        let object = r.object().to_string();
        let head = self
            .on_hosts(r, |host| {
                let object = object.clone();
                async move {
                    let path = format!("/v2/{}/manifests/{object}", r.repository);
                    let resp = self
                        .send(&host, r, "manifest", Method::HEAD, &path, &|rb| {
                            rb.header(header::ACCEPT, MANIFEST_ACCEPT)
                        })
                        .await?;
                    Ok(resp
                        .headers()
                        .get("docker-content-digest")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string))
                }
            })
            .await?;
        match head {
            Some(d) if super::reference::valid_digest(&d) => Ok(d),
            _ => Ok(self.fetch_manifest(r, &object).await?.digest),
        }
    }

    /// Start downloading a blob of `size` bytes; the caller streams (with the stall and overall
    /// deadlines of [`BlobBody`]) and verifies it. A `small` blob (a config) must come whole
    /// within the timeout, as a manifest must.
    pub async fn blob(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        what: &str,
        small: bool,
    ) -> Result<BlobBody, RegistryError> {
        let (resp, host) = self
            .on_hosts(r, |host| async move {
                let path = format!("/v2/{}/blobs/{digest}", r.repository);
                let resp = self
                    .send(&host, r, "blob download", Method::GET, &path, &|rb| rb)
                    .await?;
                Ok((resp, host))
            })
            .await?;
        let overall = if small {
            self.timeout
        } else {
            // at the least rate a download may keep up, the whole blob, plus the timeout;
            // never more than max_time
            let least_rate = STALL_MIN_BYTES as f64 / self.stall_timeout.as_secs_f64().max(0.001);
            (self.timeout + Duration::from_secs_f64((size as f64 / least_rate).min(1e9)))
                .min(self.max_time)
        };
        Ok(BlobBody::new(
            resp,
            host,
            what.to_string(),
            overall,
            self.stall_timeout,
        ))
    }

    /// A small document's body: at most `limit` bytes, whole within the deadline.
    async fn read_document(
        &self,
        resp: Response,
        limit: usize,
        host: &str,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        if resp.content_length().is_some_and(|l| l > limit as u64) {
            return Err(RegistryError::BodyTooLarge {
                registry: host.into(),
                what: what.into(),
                limit,
            });
        }
        match tokio::time::timeout(self.timeout, read_limited(resp, limit)).await {
            Err(_) => Err(RegistryError::TimedOut {
                registry: host.into(),
                what: what.into(),
                which: format!("not complete within {}", secs(self.timeout)),
            }),
            Ok(Err(None)) => Err(RegistryError::BodyTooLarge {
                registry: host.into(),
                what: what.into(),
                limit,
            }),
            Ok(Err(Some(source))) => Err(RegistryError::Transport {
                registry: host.into(),
                what: what.into(),
                source,
            }),
            Ok(Ok(b)) => Ok(b),
        }
    }

    /// Whether the registry already has a blob (for push).
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool, RegistryError> {
        let host = r.api_host().to_string();
        let path = format!("/v2/{}/blobs/{digest}", r.repository);
        let resp = self
            .send(&host, r, "blob check", Method::HEAD, &path, &|rb| rb)
            .await?;
        Ok(resp.status().is_success())
    }

    /// Upload a blob in one PUT (monolithic upload), body produced by `body`.
    pub async fn upload_blob(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        body: &(dyn Fn() -> reqwest::Body + Sync),
    ) -> Result<(), RegistryError> {
        let host = r.api_host().to_string();
        let start = format!("/v2/{}/blobs/uploads/", r.repository);
        let resp = self
            .send(&host, r, "blob upload start", Method::POST, &start, &|rb| {
                rb.header(header::CONTENT_LENGTH, 0)
            })
            .await?;
        let loc = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Upload {
                registry: host.clone(),
                message: "no Location in the upload response".into(),
            })?
            .to_string();
        let base = if loc.starts_with("http://") || loc.starts_with("https://") {
            loc
        } else {
            format!("{}://{host}{loc}", self.scheme(&host))
        };
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}digest={digest}");
        self.send(&host, r, "blob upload", Method::PUT, &url, &|rb| {
            rb.header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, size)
                .body(body())
        })
        .await?;
        Ok(())
    }

    /// PUT a manifest under a tag or digest.
    pub async fn put_manifest(
        &self,
        r: &Reference,
        object: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), RegistryError> {
        let host = r.api_host().to_string();
        let path = format!("/v2/{}/manifests/{object}", r.repository);
        let body = bytes.to_vec();
        self.send(&host, r, "manifest upload", Method::PUT, &path, &|rb| {
            rb.header(header::CONTENT_TYPE, media_type)
                .body(body.clone())
        })
        .await?;
        Ok(())
    }
}

/// A blob download's body, read chunk by chunk under two bounds: it must move at least
/// [`STALL_MIN_BYTES`] in every stall window (else "stalled"), and finish within the
/// deadline plus the time its size takes at that least rate (else "not complete").
pub struct BlobBody {
    resp: Response,
    registry: String,
    what: String,
    stall: Duration,
    window_end: Instant,
    window_bytes: u64,
    deadline: Instant,
    overall: Duration,
}

impl BlobBody {
    fn new(
        resp: Response,
        registry: String,
        what: String,
        overall: Duration,
        stall: Duration,
    ) -> BlobBody {
        let now = Instant::now();
        BlobBody {
            resp,
            registry,
            what,
            stall,
            window_end: now + stall,
            window_bytes: 0,
            deadline: now + overall,
            overall,
        }
    }

    fn timed_out(&self, which: String) -> RegistryError {
        RegistryError::TimedOut {
            registry: self.registry.clone(),
            what: self.what.clone(),
            which,
        }
    }

    /// The next piece of the body, `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                return Err(self.timed_out(format!(
                    "not complete within {} (the deadline for its size, at most pull.max_time)",
                    secs(self.overall)
                )));
            }
            if now >= self.window_end {
                if self.window_bytes < STALL_MIN_BYTES {
                    return Err(self.timed_out(format!(
                        "stalled: {} bytes in {} (at least {} expected)",
                        self.window_bytes,
                        secs(self.stall),
                        STALL_MIN_BYTES
                    )));
                }
                self.window_end = now + self.stall;
                self.window_bytes = 0;
            }
            let until = self.window_end.min(self.deadline);
            match tokio::time::timeout_at(until.into(), self.resp.chunk()).await {
                // the window or the deadline ended: checked at the top
                Err(_) => continue,
                Ok(Err(source)) => {
                    return Err(RegistryError::Transport {
                        registry: self.registry.clone(),
                        what: self.what.clone(),
                        source,
                    });
                }
                Ok(Ok(c)) => {
                    if let Some(c) = &c {
                        self.window_bytes += c.len() as u64;
                    }
                    return Ok(c);
                }
            }
        }
    }
}

/// `30 s`, `1.5 s`: a duration in messages.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// Up to `limit` bytes of a body, for at most `within`; the rest is never read. Errors and a
/// timeout end it early with what came so far.
async fn read_prefix(mut resp: Response, limit: usize, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, async {
        while out.len() < limit {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    let n = c.len().min(limit - out.len());
                    out.extend_from_slice(&c[..n]);
                }
                _ => break,
            }
        }
    })
    .await;
    out
}

/// Read a response body up to `limit` bytes. `Err(None)` when over the limit.
async fn read_limited(mut resp: Response, limit: usize) -> Result<Vec<u8>, Option<reqwest::Error>> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Some)? {
        if out.len() + chunk.len() > limit {
            return Err(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_with(creds: &[u8]) -> RegistryClient {
        RegistryClient::new(&Config::default())
            .unwrap()
            .with_credentials(Credentials::parse(creds).unwrap())
    }

    #[test]
    fn credentials_go_only_to_their_own_host() {
        let c = client_with(
            br#"{"auths":{"reg.example:5000":{"username":"r","password":"rp"},"mirror.example:5000":{"username":"m","password":"mp"}}}"#,
        );
        let r: Reference = "reg.example:5000/app/web:1".parse().unwrap();
        let user = |host: &str| c.creds_for(host, &r).map(|(u, _)| u.clone());
        assert_eq!(user("reg.example:5000").as_deref(), Some("r"));
        // a mirror gets its own credentials, never the registry's
        assert_eq!(user("mirror.example:5000").as_deref(), Some("m"));
        assert_eq!(user("other.example:5000"), None);
        assert_eq!(
            url_authority(&reqwest::Url::parse("https://cdn.example/blob?x=1").unwrap()),
            "cdn.example"
        );
        assert_eq!(
            url_authority(&reqwest::Url::parse("http://reg.example:5000/v2/").unwrap()),
            "reg.example:5000"
        );
    }

    #[test]
    fn a_plain_http_token_realm_gets_no_credentials() {
        let c = client_with(br#"{"auths":{"reg.example:5000":{"username":"r","password":"rp"}}}"#);
        let r: Reference = "reg.example:5000/app/web:1".parse().unwrap();
        let ch =
            parse_challenge(r#"Bearer realm="http://auth.example/token",service="x""#).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // refused before anything is sent (auth.example does not exist either way)
        let e = rt
            .block_on(c.fetch_token("reg.example:5000", &r, &ch, "repository:app/web:pull"))
            .unwrap_err();
        assert!(e.to_string().contains("is not HTTPS"), "{e}");
    }

    #[test]
    fn challenge_parsing() {
        let c = parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#).unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["scope"], "repository:library/ubuntu:pull");
        let b = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(b.scheme, "basic");
    }

    #[test]
    fn docker_config_credentials() {
        let cfg = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"r.example:5000":{"username":"a","password":"b"}}}"#;
        let c = Credentials::parse(cfg).unwrap();
        assert_eq!(
            c.get("docker.io").unwrap(),
            &("user".to_string(), "pass".to_string())
        );
        assert_eq!(c.get("r.example:5000").unwrap().0, "a");
    }

    #[test]
    fn backoff_is_bounded() {
        let p = RetryPolicy::default();
        for n in 1..20 {
            assert!(p.delay(n, None) <= p.max);
        }
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
    }
}
