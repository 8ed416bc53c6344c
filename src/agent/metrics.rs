//! Prometheus metrics (`--metrics-addr`), with `prometheus-client`: counters the agent
//! bumps as it works, gauges computed from its status and the containers' state at each
//! scrape. Served over plain HTTP/1.1 (GET /metrics), one request per connection.

use super::status::{State, Status};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Labels = Vec<(String, String)>;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;

/// Each container's name, state and health status, read at scrape time.
pub type Containers = Vec<(String, crate::observe::ContainerStatus, Option<String>)>;
/// Reads [`Containers`].
pub type Snapshot = Arc<dyn Fn() -> Containers + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    /// One scrape renders at a time (each clears and refills the gauge families).
    rendering: Mutex<()>,
    /// Passes by result: ok, failed, error (the pass itself could not run).
    pub reconciles: Family<Labels, Counter>,
    pub reconcile_seconds: Histogram,
    /// Image pulls by result.
    pub pulls: Family<Labels, Counter>,
    pub pulled_bytes: Counter,
    resources: Family<Labels, Gauge>,
    restarts: Family<Labels, Gauge>,
    health: Family<Labels, Gauge>,
    running: Family<Labels, Gauge>,
    validation_errors: Gauge,
    last_success: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("berth");
        let m = Metrics {
            reconciles: Family::default(),
            reconcile_seconds: Histogram::new([
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            pulls: Family::default(),
            pulled_bytes: Counter::default(),
            resources: Family::default(),
            restarts: Family::default(),
            health: Family::default(),
            running: Family::default(),
            validation_errors: Gauge::default(),
            last_success: Gauge::default(),
            registry: Registry::default(),
            rendering: Mutex::new(()),
        };
        registry.register(
            "reconciles",
            "Reconcile passes by result (ok, failed, error)",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconcile passes took",
            m.reconcile_seconds.clone(),
        );
        registry.register("pulls", "Image pulls by result", m.pulls.clone());
        registry.register(
            "pulled_bytes",
            "Compressed bytes downloaded by pulls",
            m.pulled_bytes.clone(),
        );
        registry.register(
            "resources",
            "Declared resources by state (converged, pending, failing)",
            m.resources.clone(),
        );
        registry.register(
            "container_restarts",
            "Restarts by each container's supervisor",
            m.restarts.clone(),
        );
        registry.register(
            "container_health",
            "1 for each container's current health status",
            m.health.clone(),
        );
        registry.register(
            "container_running",
            "1 when the container runs",
            m.running.clone(),
        );
        registry.register(
            "validation_errors",
            "Errors in the manifest directory now (0 when valid)",
            m.validation_errors.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last pass that converged everything",
            m.last_success.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition, with the gauges brought up to date.
    pub fn render(
        &self,
        status: &Status,
        containers: &[(String, crate::observe::ContainerStatus, Option<String>)],
    ) -> String {
        let _one = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        self.resources.clear();
        for st in [
            State::Converged,
            State::Pending,
            State::Failing,
            State::RolledBack,
        ] {
            let n = status.resources.values().filter(|r| r.state == st).count();
            let label = serde_json::to_value(st)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            self.resources
                .get_or_create(&vec![("state".into(), label)])
                .set(n as i64);
        }
        self.restarts.clear();
        self.health.clear();
        self.running.clear();
        for (name, s, health) in containers {
            use crate::observe::ContainerStatus as S;
            let restarts = match s {
                S::Exited { restarts, .. } | S::Restarting { restarts, .. } => *restarts,
                _ => 0,
            };
            let l = vec![("container".to_string(), name.clone())];
            self.restarts.get_or_create(&l).set(i64::from(restarts));
            self.running
                .get_or_create(&l)
                .set(i64::from(matches!(s, S::Running { .. })));
            if let Some(h) = health {
                self.health
                    .get_or_create(&vec![
                        ("container".to_string(), name.clone()),
                        ("status".to_string(), h.clone()),
                    ])
                    .set(1);
            }
        }
        self.validation_errors
            .set(status.validation_errors.len() as i64);
        if let Some(t) = status.last_success {
            self.last_success.set(t as f64);
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serve `GET /metrics` on `listener` until the runtime stops. `snapshot` gives the status
/// and the containers' state at scrape time.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<Status>>,
    containers: Snapshot,
) {
    // a few scrapes at once; a connection beyond them is closed at once, and each has a few
    // seconds in all: no one who can reach the port can hold the agent's descriptors
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let (metrics, status, containers) = (metrics.clone(), status.clone(), containers.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                answer(stream, metrics, status, containers),
            )
            .await;
            drop(slot);
        });
    }
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<Status>>,
    containers: Snapshot,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // the request head only, bounded
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let first = head.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let mut parts = first.split(|b| *b == b' ');
    let (method, path) = (parts.next().unwrap_or(&[]), parts.next().unwrap_or(&[]));
    let (code, kind, body) = if method == b"GET" && (path == b"/metrics" || path == b"/") {
        let snapshot = status.lock().map(|s| s.clone()).unwrap_or_default();
        let list = tokio::task::spawn_blocking(move || containers())
            .await
            .unwrap_or_default();
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(&snapshot, &list),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "not found: GET /metrics\n".to_string(),
        )
    };
    let reply = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}
