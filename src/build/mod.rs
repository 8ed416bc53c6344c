//! `berth image build`: Containerfile builds with berth's own runtime, as the Docker
//! documentation describes them. The `FROM` image is the first set of layers; each `RUN`
//! runs in a temporary container (the same isolation as any container: capabilities,
//! seccomp, masked paths; network none unless asked) whose overlay upper directory becomes
//! the step's layer, whiteouts included; `COPY` and `ADD` stage their files in a directory
//! that becomes the layer; the other instructions change the image config. A step whose
//! inputs (the steps before it, the instruction, the copied files' contents, the build
//! arguments it sees) are unchanged reuses the layer it made before.

pub mod containerfile;
pub mod context;
pub mod layer;

use crate::fsutil::PathError;
use crate::image::ImageError;
use crate::reconcile::Host;
use crate::registry::types::{self, Descriptor, Manifest};
use crate::runtime::config::{self as rc, NetMode, ProcessSpec, RuntimeConfig};
use crate::runtime::{Runtime, RuntimeError};
use crate::store::{Store, StoreError};
use containerfile::{Command, Containerfile, Kind};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Lines of a failed RUN's output shown with the error.
const LAST_LINES: usize = 20;
/// Processes a RUN step may have at once.
const BUILD_PIDS: u64 = 4096;
/// The longest value a variable expands to, and the largest image config.
const MAX_VALUE: usize = 1 << 20;
const MAX_CONFIG: usize = 16 << 20;
/// The most an ADD of a URL downloads.
const MAX_DOWNLOAD: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Containerfile does not parse: every problem, `file:line:col: message`.
    #[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Parse(Vec<crate::manifest::Diagnostic>),
    /// A step failed: the Containerfile line says which.
    #[error("{}:{line}: {message}", .file.display())]
    Step {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Layer(#[from] layer::LayerError),
    #[error(transparent)]
    Io(#[from] PathError),
    #[error(transparent)]
    Reconcile(#[from] Box<crate::reconcile::ReconcileError>),
    #[error("{0}")]
    Invalid(String),
}

/// Where `RUN` steps may connect.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    None,
    Host,
    /// A bridge network berth created: the step gets an address on it, for the time it runs.
    Bridge(String),
}

impl Network {
    /// "none", "host" or a network's name.
    pub fn parse(s: &str) -> Network {
        match s {
            "none" => Network::None,
            "host" => Network::Host,
            n => Network::Bridge(n.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub context: PathBuf,
    /// The Containerfile; default `CONTEXT/Containerfile`, else `CONTEXT/Dockerfile`.
    pub file: Option<PathBuf>,
    /// The reference the result is tagged with.
    pub tag: String,
    pub args: BTreeMap<String, String>,
    pub network: Network,
    /// Run every step, reusing nothing.
    pub no_cache: bool,
    /// Cancelled to stop (SIGINT, SIGTERM, an agent stopping): the RUN under way is killed
    /// and everything the build made so far removed.
    pub cancel: tokio_util::sync::CancellationToken,
    /// The caller holds the state directory's lock (apply): addresses on a network are
    /// leased without taking it again.
    pub state_locked: bool,
}

/// What a build tells as it goes.
pub trait BuildEvents {
    /// Step `n` of `total` starts (or was found in the cache).
    fn step(&self, _n: usize, _total: usize, _instruction: &str, _cached: bool) {}
    /// A line of a RUN step's output.
    fn output(&self, _line: &str) {}
}

/// One step's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    pub step: usize,
    pub line: usize,
    pub instruction: String,
    pub cached: bool,
    /// The layer it made or reused, if it makes one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    pub millis: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Built {
    pub reference: String,
    pub digest: String,
    pub steps: Vec<StepReport>,
}

/// The image a stage builds, as it stands after each step.
#[derive(Debug, Clone)]
struct StageState {
    name: Option<String>,
    /// The whole image config (unknown fields of the base image kept) but its `config`...
    config: Value,
    /// ...which is this: Env, Cmd, Entrypoint, WorkingDir, User, Labels, ExposedPorts…
    run: serde_json::Map<String, Value>,
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
    /// The cache key of everything so far (hex).
    key: String,
    /// ARG values in scope.
    args: BTreeMap<String, String>,
    /// The time of the last layer (the config's `created`): unchanged inputs, same image.
    created: String,
}

impl StageState {
    fn scratch() -> StageState {
        let (arch, variant) = types::host_platform();
        let mut config = json!({
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "history": [],
        });
        if let Some(v) = variant {
            config["variant"] = json!(v);
        }
        StageState {
            name: None,
            config,
            run: serde_json::Map::new(),
            layers: vec![],
            diff_ids: vec![],
            key: hex::encode(Sha256::digest(b"scratch")),
            args: BTreeMap::new(),
            created: "1970-01-01T00:00:00Z".into(),
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        self.run
            .get("Env")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str())
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn set_env(&mut self, k: &str, v: &str) {
        let mut env = self.env();
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v.to_string(),
            None => env.push((k.to_string(), v.to_string())),
        }
        let list: Vec<Value> = env.iter().map(|(k, v)| json!(format!("{k}={v}"))).collect();
        self.run.insert("Env".into(), Value::Array(list));
    }

    fn workdir(&self) -> String {
        self.run
            .get("WorkingDir")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("/")
            .to_string()
    }

    fn user(&self) -> Option<String> {
        self.run
            .get("User")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }

    /// A variable as `$X` sees it in an instruction: ENV first, then ARG.
    fn var(&self, name: &str) -> Option<String> {
        self.env()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .or_else(|| self.args.get(name).cloned())
    }

    fn chain_ids(&self) -> Vec<String> {
        types::chain_ids(&self.diff_ids)
    }

    fn advance(&mut self, what: &[u8]) {
        let mut h = Sha256::new();
        h.update(self.key.as_bytes());
        h.update([0]);
        h.update(what);
        self.key = hex::encode(h.finalize());
    }

    fn history(&mut self, created_by: &str, empty_layer: bool) {
        let mut entry =
            json!({"created": self.created, "created_by": created_by, "comment": "berth build"});
        if empty_layer {
            entry["empty_layer"] = json!(true);
        }
        match self.config["history"].as_array_mut() {
            Some(h) => h.push(entry),
            None => self.config["history"] = json!([entry]),
        }
    }

    fn add_layer(&mut self, l: &CachedLayer) {
        self.layers.push(Descriptor {
            media_type: LAYER_MEDIA_TYPE.into(),
            digest: l.digest.clone(),
            size: l.size,
            platform: None,
            annotations: BTreeMap::new(),
            urls: vec![],
        });
        self.diff_ids.push(l.diff_id.clone());
        self.created = l.created.clone();
        self.config["rootfs"] = json!({"type": "layers", "diff_ids": self.diff_ids});
        self.config["created"] = json!(self.created);
    }
}

/// A layer a step made, remembered under the step's cache key.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CachedLayer {
    digest: String,
    diff_id: String,
    size: u64,
    created: String,
}

/// Build the image `opts` describes and tag it.
pub fn build(
    host: &Host,
    opts: &BuildOptions,
    events: &dyn BuildEvents,
) -> Result<Built, BuildError> {
    let file = containerfile_path(&opts.context, opts.file.as_deref());
    let text = String::from_utf8(
        read_containerfile(&opts.context, &file).map_err(|e| PathError::new("read", &file, e))?,
    )
    .map_err(|e| {
        PathError::new(
            "read",
            &file,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    let cf = containerfile::parse(&text, &file).map_err(BuildError::Parse)?;
    let b = Builder {
        host,
        store: host.store(),
        opts,
        events,
        file: file.clone(),
        escape: cf.escape(),
        ignore: context::Ignore::load(&opts.context)?,
        runtime: Runtime::new(
            host.state.root.join("build").join("containers"),
            host.exe.clone(),
            host.config.cgroup_parent.clone(),
        ),
        tmp: host.state.root.join("build").join("tmp"),
        cache: host.state.root.join("build").join("cache"),
        owner: String::new(),
    };
    b.store.init()?;
    // nothing this build stands on or makes is collected before it is tagged
    let _lease = b.store.lease()?;
    // what builds killed before they could clean up left behind goes first
    reap(host);
    let owner = Owner::claim(&host.state.root.join("build"))?;
    let b = Builder {
        owner: owner.id.clone(),
        ..b
    };
    b.run(&cf)
}

/// The Containerfile of a build: `file` if given, else the context's `Containerfile`, else
/// its `Dockerfile`.
pub fn containerfile_path(context: &Path, file: Option<&Path>) -> PathBuf {
    match file {
        Some(f) => f.to_path_buf(),
        None => {
            let c = context.join("Containerfile");
            if c.exists() {
                c
            } else {
                context.join("Dockerfile")
            }
        }
    }
}

/// A Containerfile's bytes (at most 1 MiB): one in the context is opened inside it,
/// through no symlink (one pointing at /etc/shadow would have its lines echoed as errors);
/// one named elsewhere (`-f` on the command line) as given.
pub fn read_containerfile(context: &Path, file: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = match file.strip_prefix(context) {
        Ok(rel) => crate::fsutil::open_regular(rel, Some(context)),
        Err(_) => crate::fsutil::open_regular(file, None),
    }?;
    let mut b = vec![];
    f.take(1 << 20).read_to_end(&mut b)?;
    Ok(b)
}

struct Builder<'a> {
    host: &'a Host,
    store: Store,
    opts: &'a BuildOptions,
    events: &'a dyn BuildEvents,
    file: PathBuf,
    escape: char,
    ignore: context::Ignore,
    runtime: Runtime,
    tmp: PathBuf,
    cache: PathBuf,
    /// This build's id: its containers and scratch directories carry it (see [`reap`]).
    owner: String,
}

impl Builder<'_> {
    fn err(&self, line: usize, message: impl Into<String>) -> BuildError {
        BuildError::Step {
            file: self.file.clone(),
            line,
            message: message.into(),
        }
    }

    fn run(&self, cf: &Containerfile) -> Result<Built, BuildError> {
        let total: usize = cf.stages.iter().map(|s| 1 + s.instructions.len()).sum();
        let mut n = 0;
        let mut reports = vec![];
        let mut stages: Vec<StageState> = vec![];
        let globals: BTreeMap<String, String> = cf
            .global_args
            .iter()
            .filter_map(|(k, d)| {
                self.opts
                    .args
                    .get(k)
                    .cloned()
                    .or_else(|| d.clone())
                    .map(|v| (k.clone(), v))
            })
            .collect();
        for stage in &cf.stages {
            n += 1;
            let t0 = Instant::now();
            let from =
                containerfile::expand(&stage.from, self.escape, &|v| globals.get(v).cloned())
                    .map_err(|e| self.err(stage.line, e))?;
            let text = format!("FROM {from}");
            let mut st = if from.eq_ignore_ascii_case("scratch") {
                self.events.step(n, total, &text, false);
                StageState::scratch()
            } else if let Some(prev) = stages
                .iter()
                .find(|s| s.name.as_deref() == Some(from.to_ascii_lowercase().as_str()))
            {
                self.events.step(n, total, &text, false);
                prev.clone()
            } else {
                self.events.step(n, total, &text, false);
                self.base(&from, stage.line)?
            };
            st.name = stage.name.clone();
            st.args = BTreeMap::new();
            reports.push(StepReport {
                step: n,
                line: stage.line,
                instruction: text,
                cached: false,
                layer: None,
                millis: t0.elapsed().as_millis() as u64,
            });
            for ins in &stage.instructions {
                if self.opts.cancel.is_cancelled() {
                    return Err(self.err(ins.line, "the build was interrupted"));
                }
                n += 1;
                let t0 = Instant::now();
                let (cached, layer) = self.step(&mut st, ins, &stages, &globals, n, total)?;
                reports.push(StepReport {
                    step: n,
                    line: ins.line,
                    instruction: ins.text.clone(),
                    cached,
                    layer,
                    millis: t0.elapsed().as_millis() as u64,
                });
            }
            stages.push(st);
        }
        let Some(last) = stages.last() else {
            return Err(self.err(1, "no FROM: nothing to build"));
        };
        let digest = self.commit(last)?;
        Ok(Built {
            reference: self.opts.tag.clone(),
            digest,
            steps: reports,
        })
    }

    /// The base image of a stage, from the store or pulled.
    fn base(&self, from: &str, line: usize) -> Result<StageState, BuildError> {
        let r: crate::registry::reference::Reference = from
            .parse()
            .map_err(|e: String| self.err(line, format!("FROM {from}: {e}")))?;
        let img = match self.store.get(&r.to_string()) {
            Ok(i) => i,
            Err(_) => {
                let puller = self.host.puller(true).map_err(Box::new)?;
                self.host.handle.block_on(puller.pull(&r))?;
                self.store.get(&r.to_string())?
            }
        };
        let bytes = self.store.read_blob(&img.manifest.config.digest)?;
        let mut config: Value = serde_json::from_slice(&bytes)
            .map_err(|e| self.err(line, format!("FROM {from}: its config: {e}")))?;
        let run = match config.get_mut("config").map(Value::take) {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let created = config["created"]
            .as_str()
            .unwrap_or("1970-01-01T00:00:00Z")
            .to_string();
        Ok(StageState {
            name: None,
            config,
            run,
            layers: img.manifest.layers.clone(),
            diff_ids: img.config.rootfs.diff_ids.clone(),
            key: hex::encode(Sha256::digest(img.digest().as_bytes())),
            args: BTreeMap::new(),
            created,
        })
    }

    fn expand(&self, st: &StageState, s: &str, line: usize) -> Result<String, BuildError> {
        let v =
            containerfile::expand(s, self.escape, &|v| st.var(v)).map_err(|e| self.err(line, e))?;
        if v.len() > MAX_VALUE {
            return Err(self.err(
                line,
                format!(
                    "a value longer than {} MiB after expansion",
                    MAX_VALUE >> 20
                ),
            ));
        }
        Ok(v)
    }

    /// One instruction: (served from the cache, the layer digest if it makes one).
    fn step(
        &self,
        st: &mut StageState,
        ins: &containerfile::Instruction,
        stages: &[StageState],
        globals: &BTreeMap<String, String>,
        n: usize,
        total: usize,
    ) -> Result<(bool, Option<String>), BuildError> {
        let line = ins.line;
        let config_only = |st: &mut StageState, what: String| {
            st.advance(what.as_bytes());
            st.history(&ins.text, true);
        };
        match &ins.kind {
            Kind::Env(pairs) => {
                self.events.step(n, total, &ins.text, false);
                let mut shown = vec![];
                for (k, v) in pairs {
                    let v = self.expand(st, v, line)?;
                    st.set_env(k, &v);
                    shown.push(format!("{k}={v}"));
                }
                config_only(st, format!("ENV {}", shown.join(" ")));
                Ok((false, None))
            }
            Kind::Arg(name, default) => {
                self.events.step(n, total, &ins.text, false);
                let v = match (self.opts.args.get(name), default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(d)) => Some(self.expand(st, d, line)?),
                    (None, None) => globals.get(name).cloned(),
                };
                if let Some(v) = &v {
                    st.args.insert(name.clone(), v.clone());
                }
                config_only(st, format!("ARG {name}={}", v.unwrap_or_default()));
                Ok((false, None))
            }
            Kind::Workdir(p) => {
                self.events.step(n, total, &ins.text, false);
                let p = self.expand(st, p, line)?;
                let abs = Path::new(&st.workdir()).join(&p);
                let abs = abs.to_string_lossy().into_owned();
                st.run.insert("WorkingDir".into(), json!(abs));
                config_only(st, format!("WORKDIR {abs}"));
                Ok((false, None))
            }
            Kind::User(u) => {
                self.events.step(n, total, &ins.text, false);
                let u = self.expand(st, u, line)?;
                st.run.insert("User".into(), json!(u));
                config_only(st, format!("USER {u}"));
                Ok((false, None))
            }
            Kind::Label(_) | Kind::Maintainer(_) => {
                self.events.step(n, total, &ins.text, false);
                let pairs: Vec<(String, String)> = match &ins.kind {
                    Kind::Maintainer(m) => vec![("maintainer".into(), m.clone())],
                    Kind::Label(p) => p.clone(),
                    _ => vec![],
                };
                let mut labels = st
                    .run
                    .get("Labels")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                let mut shown = vec![];
                let maintainer = matches!(ins.kind, Kind::Maintainer(_));
                for (k, v) in &pairs {
                    // MAINTAINER is taken as written (docker does not expand it)
                    let (k, v) = if maintainer {
                        (k.clone(), v.clone())
                    } else {
                        (self.expand(st, k, line)?, self.expand(st, v, line)?)
                    };
                    shown.push(format!("{k}={v}"));
                    labels.insert(k, json!(v));
                }
                st.run.insert("Labels".into(), Value::Object(labels));
                config_only(st, format!("LABEL {}", shown.join(" ")));
                Ok((false, None))
            }
            Kind::Expose(ports) => {
                self.events.step(n, total, &ins.text, false);
                let mut exposed = st
                    .run
                    .get("ExposedPorts")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                for p in ports {
                    let p = self.expand(st, p, line)?;
                    let p = if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    };
                    exposed.insert(p, json!({}));
                }
                st.run.insert("ExposedPorts".into(), Value::Object(exposed));
                config_only(st, ins.text.clone());
                Ok((false, None))
            }
            Kind::Cmd(c) | Kind::Entrypoint(c) => {
                self.events.step(n, total, &ins.text, false);
                let args: Vec<String> = match c {
                    Command::Exec(v) => v.clone(),
                    Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
                };
                if matches!(ins.kind, Kind::Entrypoint(_)) {
                    st.run.insert("Entrypoint".into(), json!(args));
                    // as docker: a new ENTRYPOINT drops the CMD inherited from the base
                    st.run.remove("Cmd");
                } else {
                    st.run.insert("Cmd".into(), json!(args));
                }
                config_only(st, ins.text.clone());
                Ok((false, None))
            }
            Kind::Run(c) => {
                // the build arguments a RUN sees are inputs too
                // the command itself (the text squeezes blanks a quoted string keeps)
                let mut key_input = format!("RUN {c:?}\0{:?}", self.opts.network);
                for (k, v) in &st.args {
                    key_input.push_str(&format!("\0{k}={v}"));
                }
                st.advance(key_input.as_bytes());
                let key = st.key.clone();
                let (cached, l) = match self.cached(&key, st)? {
                    Some(l) => {
                        self.events.step(n, total, &ins.text, true);
                        (true, l)
                    }
                    None => {
                        self.events.step(n, total, &ins.text, false);
                        let l = self.run_step(st, c, line)?;
                        self.remember(&key, &l)?;
                        (false, l)
                    }
                };
                st.add_layer(&l);
                st.history(&ins.text, false);
                Ok((cached, Some(l.digest)))
            }
            Kind::Copy(spec) | Kind::Add(spec) => {
                let add = matches!(ins.kind, Kind::Add(_));
                let mut key_input = format!("{}\0", ins.text);
                let sources: Vec<String> = spec
                    .sources
                    .iter()
                    .map(|s| self.expand(st, s, line))
                    .collect::<Result<_, _>>()?;
                let dest = self.expand(st, &spec.dest, line)?;
                let chown = match &spec.chown {
                    Some(c) => Some(self.expand(st, c, line)?),
                    None => None,
                };
                let from_state = match &spec.from {
                    Some(f) => Some(self.stage_for(f, stages, line)?),
                    None => None,
                };
                // the inputs: what each source names, byte for byte (from another stage:
                // that stage's key, which covers everything it is made of)
                let mut h = Sha256::new();
                if let Some(fs) = &from_state {
                    h.update(fs.key.as_bytes());
                }
                for s in &sources {
                    h.update(s.as_bytes());
                    h.update([0]);
                    if (add && is_url(s)) || from_state.is_some() {
                        continue;
                    }
                    for m in context::matches(&self.opts.context, s, &self.ignore)
                        .map_err(|e| self.err(line, format!("{}: {e}", verb(add))))?
                    {
                        context::hash_tree(&self.opts.context, &m, &self.ignore, &mut h)
                            .map_err(|e| self.err(line, e))?;
                    }
                }
                key_input.push_str(&hex::encode(h.finalize()));
                key_input.push_str(&format!("\0{dest}\0{chown:?}\0{:?}", spec.chmod));
                st.advance(key_input.as_bytes());
                let key = st.key.clone();
                let (cached, l) = match self.cached(&key, st)? {
                    Some(l) if !sources.iter().any(|s| add && is_url(s)) => {
                        self.events.step(n, total, &ins.text, true);
                        (true, l)
                    }
                    _ => {
                        self.events.step(n, total, &ins.text, false);
                        let from_root = match &from_state {
                            Some(fs) => Some(self.source_root(fs, &sources, line)?),
                            None => None,
                        };
                        let l = self.copy_step(
                            st,
                            &sources,
                            &dest,
                            chown.as_deref(),
                            spec.chmod,
                            add,
                            from_root.as_ref().map(|r| r.path.as_path()),
                            line,
                        )?;
                        self.remember(&key, &l)?;
                        (false, l)
                    }
                };
                st.add_layer(&l);
                st.history(&ins.text, false);
                Ok((cached, Some(l.digest)))
            }
        }
    }

    /// The layer remembered under `key`, if its blob and snapshot are still in the store.
    fn cached(&self, key: &str, st: &StageState) -> Result<Option<CachedLayer>, BuildError> {
        if self.opts.no_cache {
            return Ok(None);
        }
        let p = self.cache.join(format!("{key}.json"));
        let Some(l): Option<CachedLayer> = crate::fsutil::read_json(&p).ok().flatten() else {
            return Ok(None);
        };
        let mut diff_ids = st.diff_ids.clone();
        diff_ids.push(l.diff_id.clone());
        let chain = types::chain_ids(&diff_ids);
        let present = self.store.has_blob(&l.digest)
            && chain.last().is_some_and(|c| self.store.has_snapshot(c));
        Ok(present.then_some(l))
    }

    fn remember(&self, key: &str, l: &CachedLayer) -> Result<(), BuildError> {
        let p = self.cache.join(format!("{key}.json"));
        crate::fsutil::write_json(&p, l)?;
        Ok(())
    }

    /// A fresh private directory for one step's scratch files, removed on drop.
    fn scratch(&self) -> Result<Scratch, BuildError> {
        std::fs::create_dir_all(&self.tmp).map_err(|e| PathError::new("create", &self.tmp, e))?;
        let p = self
            .tmp
            .join(format!("{}-{}", self.owner, crate::fsutil::random_hex()));
        crate::fsutil::create_dir_mode(&p, 0o700)?;
        Ok(Scratch(p))
    }

    /// Store the layer written at `file` (a blob, then its snapshot on top of `st`'s).
    fn store_layer(
        &self,
        st: &StageState,
        file: &Path,
        out: &layer::LayerOut,
    ) -> Result<CachedLayer, BuildError> {
        if !self.store.has_blob(&out.digest) {
            let mut w = self.store.ingest(&out.digest, Some(out.size))?;
            let mut f = std::fs::File::open(file).map_err(|e| PathError::new("open", file, e))?;
            std::io::copy(&mut f, &mut w).map_err(|e| PathError::new("store", file, e))?;
            w.commit()?;
        }
        let mut diff_ids = st.diff_ids.clone();
        diff_ids.push(out.diff_id.clone());
        let chain = types::chain_ids(&diff_ids);
        let desc = Descriptor {
            media_type: LAYER_MEDIA_TYPE.into(),
            digest: out.digest.clone(),
            size: out.size,
            platform: None,
            annotations: BTreeMap::new(),
            urls: vec![],
        };
        if let Some(c) = chain.last() {
            let _lock = self.store.lock_key(&out.digest)?;
            crate::image::pull::snapshot_from_blob(
                &self.store,
                &desc,
                &out.diff_id,
                c,
                &crate::reconcile::unpack_options(&self.host.state, &self.host.config),
            )?;
        }
        Ok(CachedLayer {
            digest: out.digest.clone(),
            diff_id: out.diff_id.clone(),
            size: out.size,
            created: now_rfc3339(),
        })
    }

    /// RUN: the command in a temporary container on the stage's layers; its changes are the
    /// layer.
    fn run_step(
        &self,
        st: &StageState,
        c: &Command,
        line: usize,
    ) -> Result<CachedLayer, BuildError> {
        let mut layers = vec![];
        for chain in st.chain_ids() {
            if !self.store.has_snapshot(&chain) {
                return Err(self.err(
                    line,
                    format!("layer {chain} is not unpacked; pull the base image again"),
                ));
            }
            layers.push(self.store.snapshot_dir(&chain)?.join("fs"));
        }
        let shell: Vec<String> = st
            .run
            .get("Shell")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .filter(|v: &Vec<String>| !v.is_empty())
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()]);
        let args = match c {
            Command::Shell(s) => shell.into_iter().chain([s.clone()]).collect(),
            Command::Exec(v) => v.clone(),
        };
        if args.is_empty() {
            return Err(self.err(line, "RUN: an empty command"));
        }
        // the image's env, PATH defaulted, then the build arguments ENV does not set
        let mut env: Vec<(String, String)> = st.env();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.insert(0, ("PATH".into(), rc::DEFAULT_PATH.into()));
        }
        for (k, v) in &st.args {
            if !env.iter().any(|(ek, _)| ek == k) {
                env.push((k.clone(), v.clone()));
            }
        }
        let name = format!("build-{}-{}", self.owner, crate::fsutil::random_hex());
        // an address on the network for the time the step runs (released after the
        // container is gone: guards drop in reverse order)
        let _lease;
        let net = match &self.opts.network {
            Network::None => NetMode::None,
            Network::Host => NetMode::Host,
            Network::Bridge(n) => {
                let (mode, lease) = self.lease(n, &name, line)?;
                _lease = lease;
                mode
            }
        };
        let cfg = RuntimeConfig {
            name: name.clone(),
            layers,
            read_only: false,
            hostname: "berth-build".into(),
            net,
            process: ProcessSpec {
                args,
                env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                cwd: st.workdir(),
                user: st.user(),
                capabilities: crate::manifest::units::DEFAULT_CAPABILITIES
                    .iter()
                    .map(|c| format!("CAP_{c}"))
                    .collect(),
                seccomp: true,
            },
            mounts: vec![],
            // a fork bomb in a RUN stops here, not at the host's limit
            limits: rc::Limits {
                pids: Some(BUILD_PIDS),
                ..Default::default()
            },
            cgroup_parent: self.host.config.cgroup_parent.clone(),
            log_max_size: rc::LOG_MAX_SIZE,
            log_max_files: rc::LOG_MAX_FILES,
            stop_signal: "SIGKILL".into(),
            stop_timeout_ms: 0,
            ports: vec![],
            ports_from_peer: false,
            restart: Default::default(),
            backoff: Default::default(),
            health: None,
        };
        self.runtime.prepare(&cfg)?;
        let _gone = Remove(&self.runtime, name.clone());
        let pid = self.runtime.start(&name)?;
        let mut follower =
            crate::runtime::logs::Follower::open(&self.runtime.log_path(&name), rc::LOG_MAX_FILES)
                .map_err(|e| PathError::new("read", &self.runtime.log_path(&name), e))?;
        let mut last: std::collections::VecDeque<String> = Default::default();
        let mut take = |f: &mut crate::runtime::logs::Follower| -> Result<(), BuildError> {
            for r in f
                .poll()
                .map_err(|e| PathError::new("read", &self.runtime.log_path(&name), e))?
            {
                self.events.output(&r.content);
                last.push_back(r.content);
                if last.len() > LAST_LINES {
                    last.pop_front();
                }
            }
            Ok(())
        };
        let status = loop {
            take(&mut follower)?;
            if self.opts.cancel.is_cancelled() {
                // the guard removes the container (SIGKILL) on the way out
                return Err(self.err(line, "RUN: the build was interrupted"));
            }
            match self.runtime.status(&name)? {
                crate::observe::ContainerStatus::Exited { code, signal, .. } => {
                    break (code, signal);
                }
                crate::observe::ContainerStatus::Lost { reason } => {
                    return Err(
                        self.err(line, format!("RUN: the build container was lost: {reason}"))
                    );
                }
                _ => crate::runtime::wait_for_an_exit(&[pid], Duration::from_millis(200)),
            }
        };
        // what it wrote after the exit was recorded
        std::thread::sleep(Duration::from_millis(20));
        take(&mut follower)?;
        if status != (Some(0), None) {
            let how = match status {
                (Some(c), _) => format!("exited with code {c}"),
                (_, Some(s)) => format!("was killed by signal {s}"),
                _ => "failed".into(),
            };
            let out: Vec<String> = last
                .iter()
                .map(|l| format!("  {}", crate::text::printable(l, 400)))
                .collect();
            return Err(self.err(
                line,
                format!(
                    "RUN {how}{}",
                    if out.is_empty() {
                        String::new()
                    } else {
                        format!("; its last output:\n{}", out.join("\n"))
                    }
                ),
            ));
        }
        let upper = self.runtime.dir(&name).upper();
        prune_mount_points(&upper, &st_layers(&self.store, st)?)?;
        let scratch = self.scratch()?;
        let file = scratch.0.join("layer.tar.gz");
        let out = layer::write_layer(
            &upper,
            &file,
            &layer::LayerOptions {
                mtime: None,
                owner: None,
            },
        )?;
        self.store_layer(st, &file, &out)
    }

    /// An address for build container `name` on network `n` (berth's IPAM, under the state
    /// lock unless the caller holds it), released when the returned guard drops.
    fn lease(&self, n: &str, name: &str, line: usize) -> Result<(NetMode, Lease), BuildError> {
        let root = self.host.state.root.clone();
        let path = crate::net::ipam_path(&root, n);
        let _lock = if self.opts.state_locked {
            None
        } else {
            Some(
                self.host
                    .state
                    .lock(true)
                    .map_err(|e| self.err(line, e.to_string()))?,
            )
        };
        let mut ipam = crate::net::ipam::Ipam::load(&path)
            .map_err(|e| self.err(line, e.to_string()))?
            .ok_or_else(|| {
                self.err(
                    line,
                    format!("network {n:?} has not been created (declare and apply it first)"),
                )
            })?;
        let addr = ipam
            .lease(name)
            .map_err(|e| self.err(line, e.to_string()))?;
        ipam.save(&path)
            .map_err(|e| self.err(line, e.to_string()))?;
        let host_veth = crate::net::veth_name(&root, name, 0);
        let iface = rc::BridgeIface {
            network: n.to_string(),
            bridge: ipam.bridge.clone(),
            peer: format!("bp{}", &host_veth[2..]),
            host_veth,
            name: "eth0".into(),
            addr,
            prefix: ipam.subnet.prefix,
        };
        let gateway = crate::net::Subnet::new(addr, ipam.subnet.prefix).gateway();
        Ok((
            NetMode::Bridge {
                ifaces: vec![iface],
                gateway,
            },
            Lease {
                path,
                name: name.to_string(),
                state: if self.opts.state_locked {
                    None
                } else {
                    Some(self.host.state.clone())
                },
            },
        ))
    }

    /// The stage (by name or index) or image a `--from` names.
    fn stage_for(
        &self,
        from: &str,
        stages: &[StageState],
        line: usize,
    ) -> Result<StageState, BuildError> {
        match from.parse::<usize>() {
            Ok(i) => stages.get(i).cloned().ok_or_else(|| {
                self.err(line, format!("--from={from}: no stage {i} before this one"))
            }),
            Err(_) => match stages
                .iter()
                .find(|s| s.name.as_deref() == Some(from.to_ascii_lowercase().as_str()))
            {
                Some(s) => Ok(s.clone()),
                None => self.base(from, line),
            },
        }
    }

    /// The root a `COPY --from` reads: what the sources name in that stage's (or image's)
    /// files, merged from its layers into a scratch directory (only those paths: not the
    /// whole image).
    fn source_root(
        &self,
        state: &StageState,
        sources: &[String],
        line: usize,
    ) -> Result<FromRoot, BuildError> {
        let scratch = self.scratch()?;
        let root = scratch.0.join("root");
        crate::fsutil::create_dir_mode(&root, 0o755)?;
        for s in sources {
            let rel = context::relative_source(s).map_err(|e| self.err(line, e))?;
            // the part before any wildcard
            let prefix: Vec<&str> = rel
                .split('/')
                .take_while(|c| !c.contains(['*', '?', '[']))
                .collect();
            let prefix = prefix.join("/");
            for dir in st_layers(&self.store, state)? {
                merge_layer(&dir, &root, &prefix)
                    .map_err(|e| self.err(line, format!("--from: {e}")))?;
            }
        }
        Ok(FromRoot {
            path: root,
            _scratch: scratch,
        })
    }

    /// COPY/ADD: the sources staged at their destination, the staging tree as the layer.
    #[allow(clippy::too_many_arguments)]
    fn copy_step(
        &self,
        st: &StageState,
        sources: &[String],
        dest: &str,
        chown: Option<&str>,
        chmod: Option<u32>,
        add: bool,
        from_root: Option<&Path>,
        line: usize,
    ) -> Result<CachedLayer, BuildError> {
        let scratch = self.scratch()?;
        let stage = scratch.0.join("stage");
        crate::fsutil::create_dir_mode(&stage, 0o755)?;
        let dest_abs = if dest.starts_with('/') {
            dest.to_string()
        } else {
            format!("{}/{dest}", st.workdir().trim_end_matches('/'))
        };
        let dest_rel = context::relative_source(&dest_abs).map_err(|e| self.err(line, e))?;
        let many = sources.len() > 1 || sources.iter().any(|s| s.contains(['*', '?', '[']));
        let into_dir = dest.ends_with('/') || many;
        let target = stage.join(&dest_rel);
        let mk_parents = |p: &Path| -> Result<(), BuildError> {
            std::fs::create_dir_all(p).map_err(|e| PathError::new("create", p, e).into())
        };
        let (root, ignore) = match from_root {
            Some(r) => (r.to_path_buf(), context::Ignore::default()),
            None => (self.opts.context.clone(), self.ignore.clone()),
        };
        for s in sources {
            if add && is_url(s) {
                let name = s
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("download");
                let to = if into_dir {
                    target.join(name)
                } else {
                    target.clone()
                };
                mk_parents(to.parent().unwrap_or(&stage))?;
                self.download(s, &to, line)?;
                continue;
            }
            for m in context::matches(&root, s, &ignore)
                .map_err(|e| self.err(line, format!("{}: {e}", verb(add))))?
            {
                let src = root.join(&m);
                let meta =
                    std::fs::symlink_metadata(&src).map_err(|e| PathError::new("stat", &src, e))?;
                if meta.is_dir() {
                    // a directory's contents go to the destination
                    mk_parents(&target)?;
                    for e in std::fs::read_dir(&src)
                        .map_err(|e| PathError::new("read", &src, e))?
                        .flatten()
                    {
                        let name = e.file_name();
                        let Some(nm) = name.to_str() else { continue };
                        let child = if m.is_empty() {
                            nm.to_string()
                        } else {
                            format!("{m}/{nm}")
                        };
                        if ignore.ignored(&child) {
                            continue;
                        }
                        context::copy_tree(&root, &child, &target.join(nm), &ignore, chmod)
                            .map_err(|e| self.err(line, e))?;
                    }
                    continue;
                }
                if add && meta.is_file() && from_root.is_none() {
                    // opened once, inside the context through no symlink: what is checked
                    // is what is extracted
                    let f = crate::fsutil::open_regular(Path::new(&m), Some(&root))
                        .map_err(|e| PathError::new("open", &src, e))?;
                    if let Some(f) = archive(f, &src)? {
                        mk_parents(&target)?;
                        self.extract(f, &src, &target, line)?;
                        continue;
                    }
                }
                let base = Path::new(&m)
                    .file_name()
                    .map(|n| n.to_owned())
                    .unwrap_or_default();
                let to = if into_dir || target_is_dir(&target) {
                    target.join(base)
                } else {
                    target.clone()
                };
                mk_parents(to.parent().unwrap_or(&stage))?;
                context::copy_tree(&root, &m, &to, &ignore, chmod)
                    .map_err(|e| self.err(line, e))?;
            }
        }
        let owner = match chown {
            Some(c) => Some(self.resolve_owner(st, c, line)?),
            None => None,
        };
        let file = scratch.0.join("layer.tar.gz");
        let out = layer::write_layer(&stage, &file, &layer::LayerOptions { mtime: None, owner })?;
        self.store_layer(st, &file, &out)
    }

    /// `--chown=user[:group]`: numbers, or names in the stage's /etc/passwd and /etc/group.
    fn resolve_owner(
        &self,
        st: &StageState,
        spec: &str,
        line: usize,
    ) -> Result<(u32, u32), BuildError> {
        let (u, g) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let layers = st_layers(&self.store, st)?;
        let db = |file: &str| -> String {
            layers
                .iter()
                .rev()
                .find_map(|l| {
                    let p = l.join(file);
                    crate::fsutil::open_regular(Path::new(file), Some(l))
                        .ok()
                        .and_then(|f| {
                            use std::io::Read;
                            let mut s = String::new();
                            f.take(4 << 20).read_to_string(&mut s).ok().map(|_| s)
                        })
                        .or_else(|| p.exists().then(String::new))
                })
                .unwrap_or_default()
        };
        let lookup = |name: &str, file: &str, col: usize| -> Option<u32> {
            name.parse().ok().or_else(|| {
                db(file).lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.first() == Some(&name))
                        .then(|| f.get(col).and_then(|v| v.parse().ok()))
                        .flatten()
                })
            })
        };
        let uid = lookup(u, "etc/passwd", 2)
            .ok_or_else(|| self.err(line, format!("--chown: no user {u:?} in the image")))?;
        let gid = match g {
            Some(g) => lookup(g, "etc/group", 2)
                .ok_or_else(|| self.err(line, format!("--chown: no group {g:?} in the image")))?,
            None => {
                // the user's primary group, else the same number
                db("etc/passwd")
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.get(2).and_then(|v| v.parse::<u32>().ok()) == Some(uid))
                            .then(|| f.get(3).and_then(|v| v.parse().ok()))
                            .flatten()
                    })
                    .unwrap_or(uid)
            }
        };
        Ok((uid, gid))
    }

    /// ADD of a local archive: extracted (gzip, bzip2? no: gzip, zstd or plain tar) into `to`.
    fn extract(
        &self,
        f: std::fs::File,
        src: &Path,
        to: &Path,
        line: usize,
    ) -> Result<(), BuildError> {
        let scratch = self.scratch()?;
        let out = scratch.0.join("x");
        crate::fsutil::create_dir_mode(&out, 0o755)?;
        let mut r = std::io::BufReader::new(f);
        let magic = {
            use std::io::BufRead;
            r.fill_buf()
                .map_err(|e| PathError::new("read", src, e))?
                .get(..4)
                .unwrap_or_default()
                .to_vec()
        };
        let reader: Box<dyn std::io::Read> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(r))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                zstd::stream::read::Decoder::new(r).map_err(|e| PathError::new("read", src, e))?,
            )
        } else {
            Box::new(r)
        };
        crate::store::unpack::unpack_layer(
            reader,
            &out,
            &crate::reconcile::unpack_options(&self.host.state, &self.host.config),
        )
        .map_err(|e| self.err(line, format!("ADD {}: {e}", src.display())))?;
        merge_layer(&out, to, "").map_err(|e| self.err(line, format!("ADD {}: {e}", src.display())))
    }

    /// ADD of a URL: downloaded to `to` (mode 0600, as docker). With network none (the
    /// default) only public addresses are fetched, at every redirect too: a Containerfile
    /// from a repository cannot put the host's loopback services or a cloud metadata
    /// endpoint into an image. Bounded in size, with a connect and an idle timeout.
    fn download(&self, url: &str, to: &Path, line: usize) -> Result<(), BuildError> {
        // a build on a network of berth's may reach what that network reaches
        let host_net = self.opts.network != Network::None;
        let check = move |u: &reqwest::Url| -> Result<(), String> {
            if !matches!(u.scheme(), "http" | "https") {
                return Err(format!("{u}: only http and https are fetched"));
            }
            if host_net {
                return Ok(());
            }
            let host = u.host_str().unwrap_or_default();
            let port = u.port_or_known_default().unwrap_or(80);
            let addrs: Vec<std::net::IpAddr> = match host.trim_matches(['[', ']']).parse() {
                Ok(ip) => vec![ip],
                Err(_) => std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
                    .map_err(|e| format!("{host}: {e}"))?
                    .map(|a| a.ip())
                    .collect(),
            };
            match addrs.iter().find(|ip| !public(ip)) {
                Some(ip) => Err(format!(
                    "{u}: {ip} is not a public address; a build with --network none (network = \"none\") fetches only public ones"
                )),
                None => Ok(()),
            }
        };
        let parsed =
            reqwest::Url::parse(url).map_err(|e| self.err(line, format!("ADD {url}: {e}")))?;
        check(&parsed).map_err(|e| self.err(line, format!("ADD {e}")))?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .timeout(self.host.config.pull.max_time.as_std())
            .redirect(reqwest::redirect::Policy::custom(move |a| {
                if a.previous().len() >= 10 {
                    return a.error("more than 10 redirects");
                }
                match check(a.url()) {
                    Ok(()) => a.follow(),
                    Err(e) => a.error(e),
                }
            }))
            .build()
            .map_err(|e| self.err(line, format!("ADD {url}: {e}")))?;
        let to2 = to.to_path_buf();
        let min_free = self.store.min_free;
        self.host.handle.block_on(async {
            use futures::StreamExt;
            let resp = client
                .get(url)
                .send()
                .await
                .map_err(|e| self.err(line, format!("ADD {url}: {}", crate::apply::error_chain(&e))))?;
            if !resp.status().is_success() {
                return Err(self.err(line, format!("ADD {url}: {}", resp.status())));
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&to2)
                .map_err(|e| PathError::new("create", &to2, e))?;
            let mut body = resp.bytes_stream();
            let mut total = 0u64;
            loop {
                let next = tokio::time::timeout(Duration::from_secs(60), body.next())
                    .await
                    .map_err(|_| self.err(line, format!("ADD {url}: no data for 60 s")))?;
                let Some(chunk) = next else { break };
                let chunk = chunk.map_err(|e| self.err(line, format!("ADD {url}: {e}")))?;
                total += chunk.len() as u64;
                if total > MAX_DOWNLOAD {
                    return Err(self.err(line, format!("ADD {url}: larger than {} GiB", MAX_DOWNLOAD >> 30)));
                }
                if min_free > 0
                    && let Ok(v) = nix::sys::statvfs::statvfs(to2.as_path())
                    && v.blocks_available().saturating_mul(v.fragment_size()) < min_free
                {
                    return Err(self.err(line, format!("ADD {url}: the state directory's file system is down to its reserve ([store] min_free)")));
                }
                f.write_all(&chunk).map_err(|e| PathError::new("write", &to2, e))?;
            }
            {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| PathError::new("chmod", &to2, e))?;
            }
            Ok(())
        })
    }

    /// The image: config and manifest stored, the tag set. Returns the manifest digest.
    fn commit(&self, st: &StageState) -> Result<String, BuildError> {
        let mut config = st.config.clone();
        config["config"] = Value::Object(st.run.clone());
        config["rootfs"] = json!({"type": "layers", "diff_ids": st.diff_ids});
        config["created"] = json!(st.created);
        let cbytes = serde_json::to_vec(&config).map_err(|e| BuildError::Invalid(e.to_string()))?;
        if cbytes.len() > MAX_CONFIG {
            return Err(BuildError::Invalid(format!(
                "the image config would be {} bytes (at most {MAX_CONFIG})",
                cbytes.len()
            )));
        }
        let cdigest = self.store.put_bytes(&cbytes)?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            config: Descriptor {
                media_type: CONFIG_MEDIA_TYPE.into(),
                digest: cdigest,
                size: cbytes.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
                urls: vec![],
            },
            layers: st.layers.clone(),
            annotations: BTreeMap::new(),
        };
        let mbytes =
            serde_json::to_vec(&manifest).map_err(|e| BuildError::Invalid(e.to_string()))?;
        let mdigest = self.store.put_bytes(&mbytes)?;
        let r: crate::registry::reference::Reference = self
            .opts
            .tag
            .parse()
            .map_err(|e: String| BuildError::Invalid(format!("-t {}: {e}", self.opts.tag)))?;
        self.store.tag(
            &r.to_string(),
            &Descriptor {
                media_type: MANIFEST_MEDIA_TYPE.into(),
                digest: mdigest.clone(),
                size: mbytes.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
                urls: vec![],
            },
        )?;
        Ok(mdigest)
    }
}

/// What the last build of an image declared in the manifests was built from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuildRecord {
    pub reference: String,
    pub inputs: crate::manifest::spec::BuildInputs,
    pub digest: String,
}

fn records_dir(state_root: &Path) -> PathBuf {
    state_root.join("build").join("records")
}

/// Remember that `reference` was built from `inputs`.
pub fn write_record(state_root: &Path, r: &BuildRecord) -> Result<(), PathError> {
    let name = hex::encode(Sha256::digest(r.reference.as_bytes()));
    crate::fsutil::write_json(&records_dir(state_root).join(format!("{name}.json")), r)
}

/// Every build record, by reference (unreadable ones are skipped: the image is then built
/// again).
pub fn read_records(state_root: &Path) -> BTreeMap<String, BuildRecord> {
    let Ok(rd) = std::fs::read_dir(records_dir(state_root)) else {
        return BTreeMap::new();
    };
    rd.flatten()
        .filter_map(|e| {
            crate::fsutil::read_json::<BuildRecord>(&e.path())
                .ok()
                .flatten()
        })
        .map(|r| (r.reference.clone(), r))
        .collect()
}

fn verb(add: bool) -> &'static str {
    if add { "ADD" } else { "COPY" }
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

fn target_is_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// The open file back, rewound, if ADD extracts it: gzip or zstd compressed, or a plain tar
/// (ustar magic).
fn archive(mut f: std::fs::File, p: &Path) -> Result<Option<std::fs::File>, BuildError> {
    use std::io::{Read, Seek};
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(PathError::new("read", p, e).into()),
        }
    }
    let yes = head[..n].starts_with(&[0x1f, 0x8b])
        || head[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (n >= 262 && &head[257..262] == b"ustar");
    f.rewind().map_err(|e| PathError::new("read", p, e))?;
    Ok(yes.then_some(f))
}

/// The snapshot directories of a stage's layers, bottom first.
fn st_layers(store: &Store, st: &StageState) -> Result<Vec<PathBuf>, BuildError> {
    st.chain_ids()
        .iter()
        .map(|c| Ok(store.snapshot_dir(c)?.join("fs")))
        .collect()
}

/// Merge what one unpacked layer (overlay format: whiteouts are 0/0 character devices,
/// opaque directories carry `trusted.overlay.opaque`) has at `prefix` (relative, "" for
/// everything) onto `root`, as overlayfs would show it. Symlinks are copied as symlinks,
/// never followed; every directory written to in `root` was made here, so nothing is
/// written through a link.
fn merge_layer(layer: &Path, root: &Path, prefix: &str) -> Result<(), String> {
    let parts: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
    let mut rel = PathBuf::new();
    let mut stack: Vec<PathBuf> = vec![];
    for (i, c) in parts.iter().enumerate() {
        rel.push(c);
        let src = layer.join(&rel);
        let Ok(m) = std::fs::symlink_metadata(&src) else {
            // this layer has nothing there
            return Ok(());
        };
        if i + 1 == parts.len() {
            merge_entry(layer, root, &rel, &mut stack)?;
            break;
        }
        // an ancestor deleted or replaced by a non-directory here hides what was below it
        if is_whiteout(&m) || !m.is_dir() {
            remove_path(&root.join(&rel));
            return Ok(());
        }
        merge_dir(&src, &root.join(&rel), &m)?;
    }
    if parts.is_empty() {
        stack.push(PathBuf::new());
    }
    while let Some(dir_rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(layer.join(&dir_rel)) else {
            continue;
        };
        for e in rd.flatten() {
            merge_entry(layer, root, &dir_rel.join(e.file_name()), &mut stack)?;
        }
    }
    Ok(())
}

fn is_whiteout(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    m.file_type().is_char_device() && m.rdev() == 0
}

/// A directory of a layer onto `dst`: made if missing (replacing a non-directory), emptied
/// first when the layer marks it opaque, given the layer's mode and owner.
fn merge_dir(src: &Path, dst: &Path, m: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let opaque = xattr::get(src, "trusted.overlay.opaque")
        .ok()
        .flatten()
        .as_deref()
        == Some(b"y");
    if opaque || !std::fs::symlink_metadata(dst).is_ok_and(|x| x.is_dir()) {
        remove_path(dst);
    }
    if std::fs::symlink_metadata(dst).is_err() {
        std::fs::create_dir(dst).map_err(|e| format!("{}: {e}", dst.display()))?;
    }
    let _ = std::fs::set_permissions(
        dst,
        std::os::unix::fs::PermissionsExt::from_mode(m.mode() & 0o7777),
    );
    let _ = std::os::unix::fs::lchown(dst, Some(m.uid()), Some(m.gid()));
    Ok(())
}

/// One entry of a layer onto `root`; a directory's children are left on `stack`.
fn merge_entry(
    layer: &Path,
    root: &Path,
    r: &Path,
    stack: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let src = layer.join(r);
    let dst = root.join(r);
    let m = std::fs::symlink_metadata(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let ft = m.file_type();
    if is_whiteout(&m) {
        remove_path(&dst);
        return Ok(());
    }
    if ft.is_dir() {
        merge_dir(&src, &dst, &m)?;
        stack.push(r.to_path_buf());
        return Ok(());
    }
    remove_path(&dst);
    // devices and FIFOs of an image are not copied by COPY --from (as docker)
    if !(ft.is_file() || ft.is_symlink()) {
        return Ok(());
    }
    let Some(rs) = r.to_str() else {
        return Err(format!(
            "{}: a name that is not UTF-8 is not copied",
            crate::text::printable_bytes(r.as_os_str().as_encoded_bytes(), 200)
        ));
    };
    context::copy_tree(layer, rs, &dst, &context::Ignore::default(), None)
}

fn remove_path(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Remove from a RUN's upper directory the mount points the runtime made for it (`/proc`,
/// `/sys`, `/dev`, `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`) where the image had
/// none and they are still empty: they are the runtime's, not the step's. Everything is
/// looked up inside `upper` through no symlink (the step may have planted some).
fn prune_mount_points(upper: &Path, lower: &[PathBuf]) -> Result<(), BuildError> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    for p in [
        "proc",
        "sys",
        "dev",
        "etc/hosts",
        "etc/hostname",
        "etc/resolv.conf",
    ] {
        if lower
            .iter()
            .any(|l| std::fs::symlink_metadata(l.join(p)).is_ok())
        {
            continue;
        }
        let (parent, name) = match p.rsplit_once('/') {
            Some((a, b)) => (a, b),
            None => (".", p),
        };
        let root = match nix::fcntl::open(
            upper,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(_) => return Ok(()),
        };
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        let Ok(dir) = nix::fcntl::openat2(&root, parent, how) else {
            continue;
        };
        let Ok(st) = nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        else {
            continue;
        };
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFREG && st.st_size == 0 {
            let _ = nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
        } else if kind == libc::S_IFDIR {
            // removes only an empty directory
            let _ = nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::RemoveDir);
        }
    }
    Ok(())
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = crate::store::remove_tree(&self.0);
    }
}

struct FromRoot {
    path: PathBuf,
    _scratch: Scratch,
}

/// A build container's address, released when dropped (under the state lock when the build
/// does not hold it already).
struct Lease {
    path: PathBuf,
    name: String,
    state: Option<crate::state::StateDir>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _lock = self.state.as_ref().and_then(|s| s.lock(true).ok());
        if let Ok(Some(mut ipam)) = crate::net::ipam::Ipam::load(&self.path) {
            ipam.release(&self.name);
            let _ = ipam.save(&self.path);
        }
    }
}

/// Whether a lease named `name` belongs to a build that is still running (an apply keeps
/// those when it releases the leases of containers it has no record of).
pub fn lease_in_use(state_root: &Path, name: &str) -> bool {
    name.strip_prefix("build-").is_some_and(|rest| {
        owner_alive(
            &state_root.join("build").join("owners"),
            rest.split('-').next().unwrap_or_default(),
        )
    })
}

/// Whether the build `id` still runs: its owner lock (in `owners`) is held.
fn owner_alive(owners: &Path, id: &str) -> bool {
    match std::fs::File::open(owners.join(format!("{id}.lock"))) {
        Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err(),
        Err(_) => false,
    }
}

/// Removes a build container when dropped, whatever happened.
struct Remove<'a>(&'a Runtime, String);

impl Drop for Remove<'_> {
    fn drop(&mut self) {
        let _ = self.0.remove(&self.1, "SIGKILL", Duration::from_secs(5));
    }
}

fn now_rfc3339() -> String {
    crate::runtime::logs::rfc3339(std::time::SystemTime::now())
}

/// Whether an address is on the public internet (not loopback, private, link-local — cloud
/// metadata lives there —, unspecified, multicast, documentation or shared space).
fn public(ip: &std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v) => {
            let o = v.octets();
            !(v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_broadcast()
                || v.is_multicast()
                || v.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        std::net::IpAddr::V6(v) => {
            let s = v.segments();
            !(v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || v.to_ipv4_mapped()
                    .is_some_and(|m| !public(&std::net::IpAddr::V4(m))))
        }
    }
}

/// This build's claim on what it makes: `STATE/build/owners/ID.lock`, locked for the build's
/// life. Its containers are `build-ID-…` and its scratch directories `ID-…`.
struct Owner {
    id: String,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Owner {
    fn claim(build_dir: &Path) -> Result<Owner, BuildError> {
        let owners = build_dir.join("owners");
        std::fs::create_dir_all(&owners).map_err(|e| PathError::new("create", &owners, e))?;
        let id = crate::fsutil::random_hex();
        let p = owners.join(format!("{id}.lock"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|e| PathError::new("create", &p, e))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| PathError::new("lock", &p, e.into()))?;
        Ok(Owner { id, _lock: lock })
    }
}

/// Remove what builds that are no longer running left behind (killed before they could
/// clean up): their build containers (killed first), scratch directories and locks. A
/// build is running while its owner lock is held.
pub fn reap(host: &Host) {
    let build = host.state.root.join("build");
    let owners = build.join("owners");
    let alive = |id: &str| owner_alive(&owners, id);
    let owner_of = |name: &str| name.split('-').next().unwrap_or_default().to_string();
    let rt = Runtime::new(
        build.join("containers"),
        host.exe.clone(),
        host.config.cgroup_parent.clone(),
    );
    for name in rt.names() {
        let id = owner_of(name.strip_prefix("build-").unwrap_or(&name));
        if !alive(&id) {
            tracing::info!(container = %name, "removing a build container a killed build left");
            // its files even when the removal failed (then its name, a symlink, too)
            let real = rt.real_dir(&name).0;
            let _ = rt.remove(&name, "SIGKILL", Duration::from_secs(5));
            let _ = crate::store::remove_tree(&real);
            let _ = std::fs::remove_file(rt.dir(&name).0);
        }
    }
    if let Ok(rd) = std::fs::read_dir(build.join("tmp")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !alive(&owner_of(&name)) {
                let _ = crate::store::remove_tree(&e.path());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(&owners) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".lock")
                && !alive(id)
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
