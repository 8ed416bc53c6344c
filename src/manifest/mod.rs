//! TOML manifests → validated [`Desired`] state.
//!
//! Every `*.toml` file below the directory is read (hidden files and folders skipped); all
//! problems are collected and reported at once, each with `file:line:col`.

pub mod spec;
pub mod units;

use crate::registry::reference::Reference;
use spec::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use toml_edit::{Item, TableLike};
use units::*;

/// One problem in a manifest, with its location.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("manifest directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest directory {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{} error(s) in manifests:\n{}", .0.len(), .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

/// The resource name rule: `[a-z0-9][a-z0-9_.-]{0,62}`.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
        })
}

/// Largest manifest file berth reads.
pub const MAX_FILE: u64 = 4 << 20;

/// List the manifest files below `dir`: `*.toml`, hidden entries skipped, sorted. Symlinks
/// are followed, but each directory is read once (by device and inode), so a symlink loop
/// ends. A `*.toml` entry that is not a regular file is listed all the same: reading it
/// reports it.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let meta = std::fs::metadata(dir).map_err(|source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(LoadError::NotADirectory(dir.to_path_buf()));
    }
    let mut out = vec![];
    let mut seen = HashSet::from([(meta.dev(), meta.ino())]);
    walk(dir, 0, &mut seen, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(
    dir: &Path,
    depth: usize,
    seen: &mut HashSet<(u64, u64)>,
    out: &mut Vec<PathBuf>,
) -> Result<(), LoadError> {
    if depth > 32 {
        return Ok(());
    }
    let io = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    // in name order, entries themselves before symlinks: a directory is read under its own
    // path rather than a link's, whatever order the file system lists them in
    let mut entries = vec![];
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let link = entry.file_type().map_err(io)?.is_symlink();
        entries.push((link, entry.file_name(), entry.path()));
    }
    entries.sort();
    for (_, name, path) in entries {
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let toml = name.ends_with(".toml");
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                // read already (a link to it, or a loop): not again
                if !seen.insert((meta.dev(), meta.ino())) {
                    continue;
                }
                walk(&path, depth + 1, seen, out)?;
            }
            // anything else named *.toml (a FIFO, a device, a dangling link) is reported
            // when it is read
            _ if toml => out.push(path),
            _ => {}
        }
    }
    Ok(())
}

/// A manifest file's text: a regular file of at most [`MAX_FILE`] bytes, not on a kernel
/// pseudo file system; opened without blocking (a FIFO) or following into a terminal.
fn read_manifest(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    // checked to be a regular file before it is opened for reading: opening a device or a
    // FIFO can have effects of its own
    let f = crate::fsutil::open_regular(path, None).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidInput {
            format!("not a manifest: {e}")
        } else {
            format!("cannot read file: {e}")
        }
    })?;
    let meta = f.metadata().map_err(|e| format!("cannot read file: {e}"))?;
    if let Ok(fs) = nix::sys::statfs::fstatfs(&f) {
        use nix::sys::statfs::*;
        let t = fs.filesystem_type();
        if [
            PROC_SUPER_MAGIC,
            SYSFS_MAGIC,
            DEBUGFS_MAGIC,
            SECURITYFS_MAGIC,
            TRACEFS_MAGIC,
        ]
        .contains(&t)
        {
            return Err(
                "not a manifest: a kernel pseudo-file (procfs, sysfs…); only regular files are read"
                    .into(),
            );
        }
    }
    if meta.len() > MAX_FILE {
        return Err(format!(
            "file is {} bytes; manifests are at most {MAX_FILE} bytes",
            meta.len()
        ));
    }
    let mut text = Vec::new();
    f.take(MAX_FILE + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read file: {e}"))?;
    if text.len() as u64 > MAX_FILE {
        return Err(format!("file is larger than {MAX_FILE} bytes"));
    }
    Ok(text)
}

type Span = Option<Range<usize>>;
type Fail = (Span, String);

/// A place in a file, kept for cross-reference checks after all files are read.
#[derive(Debug, Clone)]
struct Pos {
    file: PathBuf,
    line: usize,
    col: usize,
}

/// Locations of a container's references, for the cross-checks.
#[derive(Default)]
struct ContainerRefs {
    image: Option<Pos>,
    volumes: Vec<Pos>,
    networks: Vec<Pos>,
    depends: BTreeMap<String, Pos>,
    ports: Vec<Pos>,
}

struct Loader {
    dir: PathBuf,
    diags: Vec<Diagnostic>,
    desired: Desired,
    defined: HashMap<(Kind, String), (PathBuf, usize)>,
    crefs: BTreeMap<String, ContainerRefs>,
    net_pos: BTreeMap<String, Pos>,
    /// See [`Loader::hint`].
    hints_left: std::cell::Cell<usize>,
}

/// The longest `stop_timeout`: a stop holds the state directory's lock while it waits.
pub const MAX_STOP_TIMEOUT: Duration = Duration(3_600_000);

/// The most characters of a diagnostic's message (the rest is cut, with the length given).
const MAX_MESSAGE: usize = 400;

/// How many undeclared names get a did-you-mean hint.
const HINTS: usize = 100;

struct FileCtx<'a> {
    display: PathBuf,
    rel: PathBuf,
    text: &'a str,
    /// Where each line starts (byte offsets), so that a position costs a binary search, not
    /// a count from the file's start (10,000 diagnostics in a large file were quadratic).
    line_starts: Vec<usize>,
    /// The last position computed: (line, offset, column).
    last: std::cell::Cell<(usize, usize, usize)>,
}

impl<'a> FileCtx<'a> {
    fn new(display: PathBuf, rel: PathBuf, text: &'a str) -> FileCtx<'a> {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        FileCtx {
            display,
            rel,
            text,
            line_starts,
            last: std::cell::Cell::new((0, 0, 0)),
        }
    }

    fn pos(&self, span: &Option<Range<usize>>) -> Pos {
        let mut off = span
            .as_ref()
            .map(|s| s.start)
            .unwrap_or(0)
            .min(self.text.len());
        while !self.text.is_char_boundary(off) {
            off -= 1;
        }
        let line = self.line_starts.partition_point(|&s| s <= off);
        // columns count characters: from the last position asked on this line when it is
        // before this one (positions come mostly in order: one long line stays linear)
        let (mline, moff, mcol) = self.last.get();
        let (from, base) = if mline == line && moff <= off {
            (moff, mcol)
        } else {
            (self.line_starts[line - 1], 1)
        };
        let col = base + self.text[from..off].chars().count();
        self.last.set((line, off, col));
        Pos {
            file: self.display.clone(),
            line,
            col,
        }
    }
}

impl Loader {
    /// A did-you-mean hint for an undeclared name among `names`, for the first
    /// [`HINTS`] undeclared names only: each costs a pass over the declared names, and
    /// 100,000 undeclared references against as many names would be quadratic.
    fn hint<'n>(&self, word: &str, names: impl Iterator<Item = &'n String>) -> String {
        let left = self.hints_left.get();
        if left == 0 {
            return String::new();
        }
        self.hints_left.set(left - 1);
        let names: Vec<&str> = names.map(|s| s.as_str()).collect();
        did_you_mean(word, &names)
    }

    fn err_at(&mut self, pos: &Pos, message: String) {
        self.diags.push(Diagnostic {
            file: pos.file.clone(),
            line: pos.line,
            col: pos.col,
            // messages quote the manifest's values, which may be any length
            message: crate::text::printable(&message, MAX_MESSAGE),
        });
    }

    fn err(&mut self, f: &FileCtx, span: &Option<Range<usize>>, message: String) {
        let p = f.pos(span);
        self.err_at(&p, message);
    }

    fn load_file(&mut self, path: &Path) {
        let rel = path.strip_prefix(&self.dir).unwrap_or(path).to_path_buf();
        let text = match read_manifest(path) {
            Ok(b) => match String::from_utf8(b) {
                Ok(t) => t,
                Err(_) => {
                    self.diags.push(Diagnostic {
                        file: path.to_path_buf(),
                        line: 1,
                        col: 1,
                        message: "file is not valid UTF-8".into(),
                    });
                    return;
                }
            },
            Err(message) => {
                self.diags.push(Diagnostic {
                    file: path.to_path_buf(),
                    line: 1,
                    col: 1,
                    message,
                });
                return;
            }
        };
        let f = FileCtx::new(path.to_path_buf(), rel, &text);
        let doc = match toml_edit::Document::parse(text.as_str()) {
            Ok(d) => d,
            Err(e) => {
                let msg = e.message().lines().next().unwrap_or("syntax error").trim();
                self.err(&f, &e.span(), format!("TOML syntax error: {msg}"));
                return;
            }
        };
        let root = doc.as_table();
        for (kind_key, item) in root.iter() {
            let kspan = root.key(kind_key).and_then(|k| k.span());
            let kind = match kind_key {
                "image" => Kind::Image,
                "volume" => Kind::Volume,
                "network" => Kind::Network,
                "container" => Kind::Container,
                other => {
                    self.err(
                        &f,
                        &kspan,
                        format!(
                            "unknown resource kind {other:?}: expected [image.NAME], [volume.NAME], [network.NAME] or [container.NAME]{}",
                            did_you_mean(other, &["image", "volume", "network", "container"])
                        ),
                    );
                    continue;
                }
            };
            let Some(tbl) = item.as_table_like() else {
                self.err(
                    &f,
                    &kspan,
                    format!(
                        "`{kind_key}` must be a table of named resources, e.g. [{kind_key}.NAME]"
                    ),
                );
                continue;
            };
            for (name, res) in tbl.iter() {
                let nspan = tbl.key(name).and_then(|k| k.span()).or_else(|| res.span());
                self.load_resource(&f, kind, name, res, &nspan);
            }
        }
    }

    fn load_resource(
        &mut self,
        f: &FileCtx,
        kind: Kind,
        name: &str,
        item: &Item,
        nspan: &Option<Range<usize>>,
    ) {
        let pos = f.pos(nspan);
        if !valid_name(name) {
            self.err_at(
                &pos,
                format!(
                    "invalid {kind} name {name:?}: names are 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
                ),
            );
            return;
        }
        if kind == Kind::Network && (name == NET_HOST || name == NET_NONE) {
            self.err_at(
                &pos,
                format!(
                    "network name {name:?} is reserved: containers use it without declaring it"
                ),
            );
            return;
        }
        if let Some((file, line)) = self.defined.get(&(kind, name.to_string())) {
            let msg = format!(
                "{kind} {name:?} is defined twice: here and in {}:{line}",
                file.display()
            );
            self.err_at(&pos, msg);
            return;
        }
        self.defined
            .insert((kind, name.to_string()), (pos.file.clone(), pos.line));
        let Some(tbl) = item.as_table_like() else {
            self.err_at(
                &pos,
                format!(
                    "[{kind}.{name}] must be a table, found {}",
                    item.type_name()
                ),
            );
            return;
        };
        let source = Source {
            file: f.rel.clone(),
            line: pos.line,
        };
        match kind {
            Kind::Image => {
                if let Some(spec) = self.image(f, name, tbl, &pos) {
                    self.desired.images.insert(
                        name.into(),
                        Declared {
                            name: name.into(),
                            source,
                            spec,
                        },
                    );
                }
            }
            Kind::Volume => {
                let spec = self.volume(f, tbl);
                self.desired.volumes.insert(
                    name.into(),
                    Declared {
                        name: name.into(),
                        source,
                        spec,
                    },
                );
            }
            Kind::Network => {
                let spec = self.network(f, tbl);
                self.net_pos.insert(name.into(), pos.clone());
                self.desired.networks.insert(
                    name.into(),
                    Declared {
                        name: name.into(),
                        source,
                        spec,
                    },
                );
            }
            Kind::Container => {
                if let Some((spec, refs)) = self.container(f, name, tbl, &pos) {
                    self.crefs.insert(name.into(), refs);
                    self.desired.containers.insert(
                        name.into(),
                        Declared {
                            name: name.into(),
                            source,
                            spec,
                        },
                    );
                }
            }
        }
    }

    /// Report keys not in `known`, with a did-you-mean.
    fn check_keys(&mut self, f: &FileCtx, what: &str, tbl: &dyn TableLike, known: &[&str]) {
        for (k, _) in tbl.iter() {
            if !known.contains(&k) {
                let span = tbl.key(k).and_then(|x| x.span());
                self.err(
                    f,
                    &span,
                    format!("unknown key {k:?} in {what}{}", did_you_mean(k, known)),
                );
            }
        }
    }

    /// Run a field parser; report its failure and return None.
    fn field<T>(
        &mut self,
        f: &FileCtx,
        tbl: &dyn TableLike,
        key: &str,
        parse: impl FnOnce(&Item) -> Result<T, Fail>,
    ) -> Option<T> {
        let item = tbl.get(key)?;
        match parse(item) {
            Ok(v) => Some(v),
            Err((span, msg)) => {
                let span = span.or_else(|| item.span());
                self.err(f, &span, format!("{key}: {msg}"));
                None
            }
        }
    }

    fn image(
        &mut self,
        f: &FileCtx,
        name: &str,
        tbl: &dyn TableLike,
        pos: &Pos,
    ) -> Option<ImageSpec> {
        self.check_keys(
            f,
            &format!("[image.{name}]"),
            tbl,
            &["ref", "pull", "build"],
        );
        let build = self.field(f, tbl, "build", |i| build_spec(i, &f.display));
        let reference = self.field(f, tbl, "ref", |i| {
            string(i)?.parse::<Reference>().map_err(|e| (None, e))
        });
        let pull = self
            .field(f, tbl, "pull", |i| match string(i)?.as_str() {
                "missing" => Ok(PullPolicy::Missing),
                "always" => Ok(PullPolicy::Always),
                "never" => Ok(PullPolicy::Never),
                other => Err((
                    None,
                    format!(
                        "expected \"missing\", \"always\" or \"never\", found {other:?}{}",
                        did_you_mean(other, &["missing", "always", "never"])
                    ),
                )),
            })
            .unwrap_or_default();
        if tbl.get("ref").is_none() {
            self.err_at(
                pos,
                format!(
                    "[image.{name}] needs `ref`, e.g. ref = \"docker.io/library/busybox:1.36\""
                ),
            );
        }
        Some(ImageSpec {
            reference: reference?,
            pull,
            implicit: false,
            build,
        })
    }

    fn volume(&mut self, f: &FileCtx, tbl: &dyn TableLike) -> VolumeSpec {
        self.check_keys(f, "a volume", tbl, &["labels"]);
        VolumeSpec {
            labels: self.field(f, tbl, "labels", string_map).unwrap_or_default(),
        }
    }

    fn network(&mut self, f: &FileCtx, tbl: &dyn TableLike) -> NetworkSpec {
        self.check_keys(f, "a network", tbl, &["subnet", "internal"]);
        NetworkSpec {
            subnet: self.field(f, tbl, "subnet", |i| {
                string(i)?.parse::<Cidr>().map_err(|e| (None, e))
            }),
            internal: self.field(f, tbl, "internal", boolean).unwrap_or(false),
        }
    }

    fn container(
        &mut self,
        f: &FileCtx,
        name: &str,
        tbl: &dyn TableLike,
        pos: &Pos,
    ) -> Option<(ContainerSpec, ContainerRefs)> {
        const KEYS: &[&str] = &[
            "image",
            "entrypoint",
            "command",
            "env",
            "working_dir",
            "user",
            "hostname",
            "ports",
            "volumes",
            "tmpfs",
            "networks",
            "restart",
            "memory",
            "cpus",
            "pids",
            "read_only",
            "cap_add",
            "cap_drop",
            "seccomp",
            "stop_signal",
            "stop_timeout",
            "depends_on",
            "labels",
            "health",
            "backoff",
            "update",
            "rollback",
            "rollout",
        ];
        self.check_keys(f, &format!("[container.{name}]"), tbl, KEYS);
        let mut refs = ContainerRefs::default();
        let Some(image_item) = tbl.get("image") else {
            self.err_at(
                pos,
                format!("[container.{name}] needs `image`: an [image.*] name or a reference"),
            );
            return None;
        };
        refs.image = Some(f.pos(&image_item.span()));
        let image = self.field(f, tbl, "image", string)?;
        // A bare word may name an [image.*] resource; that is checked once all files are read.
        let image_ref = if is_bare_word(&image) {
            // placeholder until the cross-check resolves it
            image.parse::<Reference>().ok()?
        } else {
            self.field(f, tbl, "image", |i| {
                string(i)?.parse::<Reference>().map_err(|e| (None, e))
            })?
        };
        let mut c = ContainerSpec::with_image(&image, image_ref);
        c.entrypoint = self.field(f, tbl, "entrypoint", string_array);
        c.command = self.field(f, tbl, "command", string_array);
        c.env = self.field(f, tbl, "env", env_map).unwrap_or_default();
        c.working_dir = self.field(f, tbl, "working_dir", |i| {
            let s = string(i)?;
            if s.starts_with('/') {
                Ok(s)
            } else {
                Err((None, format!("{s:?} must be an absolute path")))
            }
        });
        c.user = self.field(f, tbl, "user", |i| {
            let s = string(i)?;
            let ok = !s.is_empty()
                && s.split(':').count() <= 2
                && s.split(':').all(|p| {
                    !p.is_empty()
                        && p.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                });
            if ok {
                Ok(s)
            } else {
                Err((None, format!("{s:?} is not uid[:gid] or name[:group]")))
            }
        });
        c.hostname = self.field(f, tbl, "hostname", |i| {
            let s = string(i)?;
            let ok = !s.is_empty()
                && s.len() <= 63
                && !s.starts_with('-')
                && !s.ends_with('-')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if ok {
                Ok(s)
            } else {
                Err((
                    None,
                    format!("{s:?} is not a valid hostname (1-63 letters, digits and '-')"),
                ))
            }
        });
        if let Some(item) = tbl.get("ports") {
            for (v, span) in self
                .field(f, tbl, "ports", string_array_spans)
                .unwrap_or_default()
            {
                match v.parse::<PortSpec>() {
                    Ok(p) => {
                        c.ports.push(p);
                        refs.ports.push(f.pos(&span));
                    }
                    Err(e) => self.err(f, &span.or_else(|| item.span()), format!("ports: {e}")),
                }
            }
        }
        for (v, span) in self
            .field(f, tbl, "volumes", string_array_spans)
            .unwrap_or_default()
        {
            match v.parse::<VolumeMount>() {
                Ok(m) => {
                    c.volumes.push(m);
                    refs.volumes.push(f.pos(&span));
                }
                Err(e) => self.err(f, &span, format!("volumes: {e}")),
            }
        }
        for (v, span) in self
            .field(f, tbl, "tmpfs", string_array_spans)
            .unwrap_or_default()
        {
            match v.parse::<TmpfsMount>() {
                Ok(m) => c.tmpfs.push(m),
                Err(e) => self.err(f, &span, format!("tmpfs: {e}")),
            }
        }
        let mut targets: BTreeMap<PathBuf, ()> = BTreeMap::new();
        let all_targets: Vec<PathBuf> = c
            .volumes
            .iter()
            .map(|v| v.target.clone())
            .chain(c.tmpfs.iter().map(|t| t.target.clone()))
            .collect();
        for t in all_targets {
            if targets.insert(t.clone(), ()).is_some() {
                self.err_at(
                    pos,
                    format!("[container.{name}]: two mounts target {}", t.display()),
                );
            }
        }
        if let Some(nets) = self.field(f, tbl, "networks", string_array_spans) {
            if nets.is_empty() {
                self.err(
                    f,
                    &tbl.get("networks").and_then(|i| i.span()),
                    "networks: must not be empty; use [\"none\"] for no network".into(),
                );
            }
            let special = nets.iter().any(|(n, _)| n == NET_HOST || n == NET_NONE);
            if special && nets.len() > 1 {
                self.err(
                    f,
                    &tbl.get("networks").and_then(|i| i.span()),
                    "networks: \"host\" and \"none\" cannot be combined with other networks".into(),
                );
            }
            c.networks = vec![];
            let mut listed = HashSet::new();
            for (n, span) in nets {
                if !listed.insert(n.clone()) {
                    self.err(f, &span, format!("networks: {n:?} is listed twice"));
                    continue;
                }
                refs.networks.push(f.pos(&span));
                c.networks.push(n);
            }
        } else {
            refs.networks.push(pos.clone());
        }
        if let Some(r) = self.field(f, tbl, "restart", |i| {
            string(i)?.parse::<Restart>().map_err(|e| (None, e))
        }) {
            c.restart = r;
        }
        c.memory = self.field(f, tbl, "memory", |i| {
            let s = size(i)?;
            if s.0 < 6 << 20 {
                Err((None, format!("{s} is below the minimum of 6MiB")))
            } else {
                Ok(s)
            }
        });
        c.cpus = self.field(f, tbl, "cpus", |i| {
            let v = match (i.as_float(), i.as_integer()) {
                (Some(v), _) => v,
                (_, Some(v)) => v as f64,
                _ => return Err((None, format!("expected a number, found {}", i.type_name()))),
            };
            // the kernel's least CFS quota is 1 ms of a 100 ms period
            if (0.01..=1024.0).contains(&v) {
                Ok(v)
            } else {
                Err((
                    None,
                    format!("{v} is out of range (at least 0.01, at most 1024)"),
                ))
            }
        });
        c.pids = self.field(f, tbl, "pids", |i| {
            let v = integer(i)?;
            if v >= 1 {
                Ok(v as u64)
            } else {
                Err((None, format!("{v} must be at least 1")))
            }
        });
        c.read_only = self.field(f, tbl, "read_only", boolean).unwrap_or(false);
        for key in ["cap_add", "cap_drop"] {
            let mut caps = vec![];
            for (v, span) in self
                .field(f, tbl, key, string_array_spans)
                .unwrap_or_default()
            {
                match parse_capability(&v) {
                    Ok(cap) => caps.push(cap),
                    Err(e) => self.err(f, &span, format!("{key}: {e}")),
                }
            }
            caps.sort();
            caps.dedup();
            if key == "cap_add" {
                c.cap_add = caps;
            } else {
                c.cap_drop = caps;
            }
        }
        if let Some(s) = self.field(f, tbl, "seccomp", |i| match string(i)?.as_str() {
            "default" => Ok(spec::Seccomp::Default),
            "unconfined" => Ok(spec::Seccomp::Unconfined),
            other => Err((
                None,
                format!("{other:?} is not a seccomp profile: \"default\" or \"unconfined\""),
            )),
        }) {
            c.seccomp = s;
        }
        if let Some(s) = self.field(f, tbl, "stop_signal", |i| {
            parse_signal(&string(i)?).map_err(|e| (None, e))
        }) {
            c.stop_signal = s;
        }
        if let Some(d) = self.field(f, tbl, "stop_timeout", |i| {
            duration_between(i, Duration(0), MAX_STOP_TIMEOUT)
        }) {
            c.stop_timeout = d;
        }
        if let Some(item) = tbl.get("depends_on") {
            match item.as_table_like() {
                Some(dt) => {
                    for (dep, v) in dt.iter() {
                        let kspan = dt.key(dep).and_then(|k| k.span());
                        // `db = "healthy"`, or `db = { condition = "healthy", restart = true }`
                        let (cv, restart) = match v.as_table_like() {
                            Some(t) => {
                                self.check_keys(
                                    f,
                                    &format!("depends_on.{dep}"),
                                    t,
                                    &["condition", "restart"],
                                );
                                let restart = self.field(f, t, "restart", boolean).unwrap_or(false);
                                match t.get("condition") {
                                    Some(c) => (c, restart),
                                    None => {
                                        self.err(f, &v.span(), format!("depends_on.{dep}: needs `condition`, e.g. {{ condition = \"healthy\", restart = true }}"));
                                        continue;
                                    }
                                }
                            }
                            None => (v, false),
                        };
                        let cond = match cv.as_str() {
                            Some("started") => DependCondition::Started,
                            Some("healthy") => DependCondition::Healthy,
                            Some("completed") => DependCondition::Completed,
                            _ => {
                                let shown = cv
                                    .as_str()
                                    .map(|s| format!("{s:?}"))
                                    .unwrap_or_else(|| cv.type_name().to_string());
                                self.err(f, &cv.span(), format!("depends_on.{dep}: expected \"started\", \"healthy\" or \"completed\", found {shown}"));
                                continue;
                            }
                        };
                        refs.depends.insert(dep.to_string(), f.pos(&kspan));
                        c.depends_on.insert(dep.to_string(), cond);
                        if restart {
                            c.restart_with.insert(dep.to_string());
                        }
                    }
                }
                None => self.err(
                    f,
                    &item.span(),
                    format!(
                        "depends_on: expected a table such as {{ db = \"healthy\" }}, found {}",
                        item.type_name()
                    ),
                ),
            }
        }
        c.labels = self.field(f, tbl, "labels", string_map).unwrap_or_default();
        if let Some(item) = tbl.get("health") {
            match item.as_table_like() {
                Some(h) => c.health = self.health(f, name, h, pos),
                None => self.err(
                    f,
                    &item.span(),
                    format!(
                        "health: expected a table ([container.{name}.health]), found {}",
                        item.type_name()
                    ),
                ),
            }
        }
        if let Some(r) = self.field(f, tbl, "rollback", |i| {
            i.as_bool().ok_or((
                None,
                format!("expected true or false, found {}", i.type_name()),
            ))
        }) {
            c.rollback = r;
        }
        if let Some(item) = tbl.get("rollout") {
            match item.as_table_like() {
                Some(r) => {
                    self.check_keys(
                        f,
                        &format!("[container.{name}.rollout]"),
                        r,
                        &["timeout", "min_ready"],
                    );
                    let d = RolloutSpec::default();
                    // a wait of at least a second, at most an hour (the state lock is held)
                    let ranged =
                        |i: &Item| duration_between(i, Duration(1000), Duration::from_secs(3600));
                    c.rollout = Some(RolloutSpec {
                        timeout: self.field(f, r, "timeout", ranged).unwrap_or(d.timeout),
                        min_ready: self.field(f, r, "min_ready", ranged).unwrap_or(d.min_ready),
                    });
                }
                None => self.err(
                    f,
                    &item.span(),
                    format!(
                        "rollout: expected a table ([container.{name}.rollout]), found {}",
                        item.type_name()
                    ),
                ),
            }
        }
        if let Some(item) = tbl.get("update") {
            let strategy = |i: &Item| match string(i)?.as_str() {
                "stop-first" => Ok(spec::UpdateStrategy::StopFirst),
                "start-first" => Ok(spec::UpdateStrategy::StartFirst),
                other => Err((
                    None,
                    format!(
                        "{other:?} is not an update strategy: \"stop-first\" or \"start-first\""
                    ),
                )),
            };
            match item.as_table_like() {
                Some(u) => {
                    self.check_keys(
                        f,
                        &format!("[container.{name}.update]"),
                        u,
                        &["lock_deadline", "strategy"],
                    );
                    let d = UpdateSpec::default();
                    c.update = Some(UpdateSpec {
                        lock_deadline: self
                            .field(f, u, "lock_deadline", |i| {
                                duration_between(i, Duration(0), Duration::from_secs(7 * 86_400))
                            })
                            .unwrap_or(d.lock_deadline),
                        strategy: self
                            .field(f, u, "strategy", strategy)
                            .unwrap_or(d.strategy),
                        locks: true,
                    });
                }
                None if item.as_str().is_some() => {
                    if let Some(s) = self.field(f, tbl, "update", strategy) {
                        c.update = Some(UpdateSpec {
                            strategy: s,
                            locks: false,
                            ..UpdateSpec::default()
                        });
                    }
                }
                None => self.err(
                    f,
                    &item.span(),
                    format!(
                        "update: expected \"start-first\", \"stop-first\" or a table ([container.{name}.update]), found {}",
                        item.type_name()
                    ),
                ),
            }
            if c.update
                .is_some_and(|u| u.strategy == spec::UpdateStrategy::StartFirst)
                && c.networks.iter().any(|n| n == NET_HOST)
            {
                self.err(
                    f,
                    &item.span(),
                    "update: start-first needs a network of its own: on the host's network the new container could not bind what the old one holds".into(),
                );
            }
        }
        if let Some(item) = tbl.get("backoff") {
            match item.as_table_like() {
                Some(b) => c.backoff = Some(self.backoff(f, name, b)),
                None => self.err(
                    f,
                    &item.span(),
                    format!(
                        "backoff: expected a table ([container.{name}.backoff]), found {}",
                        item.type_name()
                    ),
                ),
            }
        }
        Some((c, refs))
    }

    /// `[container.NAME.backoff]`: each of `initial`, `max`, `reset_after` optional (kubelet's
    /// defaults), `initial` at least 100ms and at most `max`, all at most a day.
    fn backoff(&mut self, f: &FileCtx, name: &str, b: &dyn TableLike) -> BackoffSpec {
        self.check_keys(
            f,
            &format!("[container.{name}.backoff]"),
            b,
            &["initial", "max", "reset_after"],
        );
        let d = BackoffSpec::default();
        let ranged = |i: &Item| duration_between(i, Duration(100), Duration::from_secs(86_400));
        let spec = BackoffSpec {
            initial: self.field(f, b, "initial", ranged).unwrap_or(d.initial),
            max: self.field(f, b, "max", ranged).unwrap_or(d.max),
            reset_after: self
                .field(f, b, "reset_after", ranged)
                .unwrap_or(d.reset_after),
        };
        if spec.initial > spec.max {
            self.err(
                f,
                &b.get("initial")
                    .or_else(|| b.get("max"))
                    .and_then(|i| i.span()),
                format!(
                    "backoff: initial \"{}\" is longer than max \"{}\"",
                    spec.initial, spec.max
                ),
            );
        }
        spec
    }

    fn health(
        &mut self,
        f: &FileCtx,
        name: &str,
        h: &dyn TableLike,
        pos: &Pos,
    ) -> Option<HealthSpec> {
        self.check_keys(
            f,
            &format!("[container.{name}.health]"),
            h,
            &[
                "cmd",
                "interval",
                "timeout",
                "retries",
                "start_period",
                "on_unhealthy",
            ],
        );
        let cmd = self.field(f, h, "cmd", string_array);
        if h.get("cmd").is_none() {
            self.err_at(pos, format!("[container.{name}.health] needs `cmd`, e.g. cmd = [\"wget\", \"-q\", \"-O\", \"/dev/null\", \"http://127.0.0.1/\"]"));
        }
        let cmd = cmd?;
        if cmd.is_empty() {
            self.err(
                f,
                &h.get("cmd").and_then(|i| i.span()),
                "health.cmd: must not be empty".into(),
            );
            return None;
        }
        // each check is a process on the host too: not more often than every 100ms
        let ranged = |i: &Item| duration_between(i, Duration(100), Duration::from_secs(86_400));
        Some(HealthSpec {
            cmd,
            interval: self
                .field(f, h, "interval", ranged)
                .unwrap_or(Duration::from_secs(30)),
            timeout: self
                .field(f, h, "timeout", ranged)
                .unwrap_or(Duration::from_secs(30)),
            retries: self
                .field(f, h, "retries", |i| {
                    let v = integer(i)?;
                    u32::try_from(v)
                        .ok()
                        .filter(|v| *v >= 1)
                        .ok_or((None, format!("{v} must be at least 1")))
                })
                .unwrap_or(3),
            start_period: self
                .field(f, h, "start_period", duration)
                .unwrap_or(Duration(0)),
            on_unhealthy: self
                .field(f, h, "on_unhealthy", |i| match string(i)?.as_str() {
                    "restart" => Ok(OnUnhealthy::Restart),
                    "none" => Ok(OnUnhealthy::None),
                    other => Err((
                        None,
                        format!(
                            "{other:?} is not \"restart\" or \"none\"{}",
                            did_you_mean(other, &["restart", "none"])
                        ),
                    )),
                })
                .unwrap_or_default(),
        })
    }

    /// Checks that need every file: references, cycles, port clashes, subnet overlaps.
    fn cross_check(&mut self) {
        // an image built on a network names a declared one
        let builds: Vec<(String, String, Source)> = self
            .desired
            .images
            .iter()
            .filter_map(|(n, i)| {
                let b = i.spec.build.as_ref()?;
                Some((n.clone(), b.network.clone(), i.source.clone()))
            })
            .collect();
        for (name, net, source) in builds {
            if net == NET_NONE || net == NET_HOST || self.desired.networks.contains_key(&net) {
                continue;
            }
            self.diags.push(Diagnostic {
                file: source.file.clone(),
                line: source.line,
                col: 1,
                message: format!(
                    "[image.{name}] build network {net:?} is not declared: use \"none\", \"host\" or add [network.{net}]"
                ),
            });
        }
        let crefs = std::mem::take(&mut self.crefs);
        let names: Vec<String> = self.desired.containers.keys().cloned().collect();
        for cname in &names {
            let Some(refs) = crefs.get(cname) else {
                continue;
            };
            let c = self.desired.containers[cname].spec.clone();
            // image: a bare word must be a declared [image.*]
            if is_bare_word(&c.image) {
                match self.desired.images.get(&c.image) {
                    Some(img) => {
                        let r = img.spec.reference.clone();
                        if let Some(cc) = self.desired.containers.get_mut(cname) {
                            cc.spec.image_ref = r;
                        }
                    }
                    None => {
                        let msg = format!(
                            "image {:?} is not declared: add [image.{}] or write a full reference such as \"docker.io/library/{}:latest\"{}",
                            c.image,
                            c.image,
                            c.image,
                            self.hint(&c.image, self.desired.images.keys())
                        );
                        if let Some(p) = &refs.image {
                            self.err_at(p, msg);
                        }
                    }
                }
            }
            for (m, p) in c.volumes.iter().zip(&refs.volumes) {
                if let MountSource::Volume(v) = &m.source
                    && !self.desired.volumes.contains_key(v)
                {
                    let msg = format!(
                        "volume {v:?} is not declared: add [volume.{v}]{}",
                        self.hint(v, self.desired.volumes.keys())
                    );
                    self.err_at(p, msg);
                }
            }
            for (n, p) in c.networks.iter().zip(&refs.networks) {
                if n == NET_HOST
                    || n == NET_NONE
                    || n == NET_DEFAULT
                    || self.desired.networks.contains_key(n)
                {
                    continue;
                }
                let builtin = ["default", "host", "none"].map(String::from);
                let msg = format!(
                    "network {n:?} is not declared: add [network.{n}]{}",
                    self.hint(n, self.desired.networks.keys().chain(&builtin))
                );
                self.err_at(p, msg);
            }
            if (c.networks.iter().any(|n| n == NET_HOST || n == NET_NONE))
                && !c.ports.is_empty()
                && let Some(p) = refs.ports.first()
            {
                let msg = format!(
                    "ports: cannot publish ports with network {:?}",
                    c.networks[0]
                );
                self.err_at(p, msg);
            }
            for (dep, p) in &refs.depends {
                if dep == cname {
                    self.err_at(
                        p,
                        format!("depends_on: container {cname:?} cannot depend on itself"),
                    );
                    continue;
                }
                match self.desired.containers.get(dep) {
                    None => {
                        let msg = format!(
                            "depends_on: container {dep:?} is not declared{}",
                            self.hint(dep, self.desired.containers.keys())
                        );
                        self.err_at(p, msg);
                    }
                    Some(d) => {
                        if c.depends_on.get(dep) == Some(&DependCondition::Healthy)
                            && d.spec.health.is_none()
                        {
                            let msg = format!(
                                "depends_on: {dep} = \"healthy\" but container {dep:?} has no [container.{dep}.health] check"
                            );
                            self.err_at(p, msg);
                        }
                    }
                }
            }
        }
        // dependency cycles
        for cycle in find_cycles(&self.desired.containers) {
            let first = &cycle[0];
            let next = &cycle[1 % cycle.len()];
            if let Some(p) = crefs.get(first).and_then(|r| r.depends.get(next)) {
                let p = p.clone();
                let mut path = cycle.clone();
                path.push(first.clone());
                // a long cycle is shown by its ends
                let shown = if path.len() > 12 {
                    format!(
                        "{} → … ({} containers) → {}",
                        path[..8].join(" → "),
                        cycle.len(),
                        path[path.len() - 3..].join(" → ")
                    )
                } else {
                    path.join(" → ")
                };
                self.err_at(&p, format!("depends_on: dependency cycle: {shown}"));
            }
        }
        // port clashes between containers (and within one)
        let mut published: Vec<(String, PortSpec, Pos)> = vec![];
        // by protocol and port: the first publication on 0.0.0.0 and the first on each address
        // (the first that collides is named, found without a pass over all of them)
        #[derive(Default)]
        struct Bucket {
            first: Option<usize>,
            any: Option<usize>,
            by_ip: HashMap<std::net::Ipv4Addr, usize>,
        }
        let mut buckets: HashMap<(Proto, u16), Bucket> = HashMap::new();
        for cname in &names {
            let Some(refs) = crefs.get(cname) else {
                continue;
            };
            let ports = self.desired.containers[cname].spec.ports.clone();
            for (p, pos) in ports.iter().zip(&refs.ports) {
                let b = buckets.entry((p.proto, p.host_port)).or_default();
                let clash = if p.host_ip.is_unspecified() {
                    b.first
                } else {
                    match (b.by_ip.get(&p.host_ip).copied(), b.any) {
                        (Some(x), Some(y)) => Some(x.min(y)),
                        (x, y) => x.or(y),
                    }
                };
                if let Some((other, op, opos)) = clash.map(|i| &published[i]) {
                    let msg = format!(
                        "ports: {p} clashes with {op} published by container {other:?} at {}:{}:{}",
                        opos.file.display(),
                        opos.line,
                        opos.col
                    );
                    let pos = pos.clone();
                    self.err_at(&pos, msg);
                } else {
                    let i = published.len();
                    b.first.get_or_insert(i);
                    if p.host_ip.is_unspecified() {
                        b.any.get_or_insert(i);
                    } else {
                        b.by_ip.entry(p.host_ip).or_insert(i);
                    }
                    published.push((cname.clone(), *p, pos.clone()));
                }
            }
        }
        // overlapping subnets
        let nets: Vec<(String, Cidr)> = self
            .desired
            .networks
            .iter()
            .filter_map(|(n, d)| d.spec.subnet.map(|s| (n.clone(), s)))
            .collect();
        // CIDRs overlap only by one containing the other: swept in address order, the ones
        // still open at a subnet's start are a chain of at most 33, each overlapping it
        let mut order: Vec<usize> = (0..nets.len()).collect();
        order.sort_by_key(|&i| (nets[i].1.network(), nets[i].1.prefix));
        let mut open: Vec<usize> = vec![];
        let mut pairs: Vec<(usize, usize)> = vec![];
        for i in order {
            let start = u64::from(nets[i].1.network());
            open.retain(|&j| u64::from(nets[j].1.network()) + nets[j].1.size() > start);
            for &j in &open {
                // reported at the later network (by name), naming the earlier
                pairs.push((i.max(j), i.min(j)));
            }
            open.push(i);
        }
        pairs.sort();
        for (i, j) in pairs {
            let ((a, sa), (b, sb)) = (&nets[i], &nets[j]);
            if let Some(p) = self.net_pos.get(a).cloned() {
                self.err_at(
                    &p,
                    format!("subnet {sa} of network {a:?} overlaps {sb} of network {b:?}"),
                );
            }
        }
        // implicit images and the default network
        let containers: Vec<ContainerSpec> = self
            .desired
            .containers
            .values()
            .map(|c| c.spec.clone())
            .collect();
        for c in &containers {
            if !is_bare_word(&c.image) {
                let key = c.image_ref.to_string();
                self.desired.images.entry(key.clone()).or_insert(Declared {
                    name: key,
                    source: Source::default(),
                    spec: ImageSpec {
                        reference: c.image_ref.clone(),
                        pull: PullPolicy::Missing,
                        implicit: true,
                        build: None,
                    },
                });
            }
            if c.networks.iter().any(|n| n == NET_DEFAULT) {
                self.desired
                    .networks
                    .entry(NET_DEFAULT.into())
                    .or_insert(Declared {
                        name: NET_DEFAULT.into(),
                        source: Source::default(),
                        spec: NetworkSpec::default(),
                    });
            }
        }
    }
}

/// A bare word (no `/`, `:` or `@`) names an `[image.*]` resource.
pub fn is_bare_word(image: &str) -> bool {
    !image.contains(['/', ':', '@'])
}

/// The cycles a depth-first search meets (each back edge's), each reported once, rotated to
/// start at its least name. Iterative, with the path's positions in a map: a dependency chain
/// of any length costs linear time and no call stack.
fn find_cycles(containers: &BTreeMap<String, Declared<ContainerSpec>>) -> Vec<Vec<String>> {
    let deps = |n: &str| -> Vec<&str> {
        containers.get(n).map_or_else(Vec::new, |c| {
            c.spec
                .depends_on
                .keys()
                .map(String::as_str)
                .filter(|d| *d != n && containers.contains_key(*d))
                .collect()
        })
    };
    let mut out = vec![];
    let mut reported: HashSet<Vec<String>> = HashSet::new();
    let mut done: HashSet<&str> = HashSet::new();
    for root in containers.keys() {
        if done.contains(root.as_str()) {
            continue;
        }
        // the path: (name, its dependencies, the next one to visit); positions by name
        let mut path: Vec<(&str, Vec<&str>, usize)> = vec![(root, deps(root), 0)];
        let mut on_path: HashMap<&str, usize> = HashMap::from([(root.as_str(), 0)]);
        while let Some((n, ds, next)) = path.last_mut() {
            let Some(&d) = ds.get(*next) else {
                let n = *n;
                path.pop();
                on_path.remove(n);
                done.insert(n);
                continue;
            };
            *next += 1;
            if let Some(&i) = on_path.get(d) {
                let mut cyc: Vec<String> = path[i..].iter().map(|(n, ..)| n.to_string()).collect();
                let min = cyc
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.as_str())
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                cyc.rotate_left(min);
                if reported.insert(cyc.clone()) {
                    out.push(cyc);
                }
            } else if !done.contains(d) {
                on_path.insert(d, path.len());
                path.push((d, deps(d), 0));
            }
        }
    }
    out
}

/// A duration within `[min, max]`; out of it, an error giving the range as written
/// (`"99999d" is out of range (at most "1h")`, `(100ms to 24h)`).
fn duration_between(i: &Item, min: Duration, max: Duration) -> Result<Duration, Fail> {
    let v = duration(i)?;
    if v < min || v > max {
        let range = if min == Duration(0) {
            format!("at most \"{max}\"")
        } else {
            format!("{min} to {max}")
        };
        return Err((
            None,
            format!(
                "{:?} is out of range ({range})",
                i.as_str().unwrap_or_default()
            ),
        ));
    }
    Ok(v)
}

fn string(i: &Item) -> Result<String, Fail> {
    i.as_str()
        .map(str::to_string)
        .ok_or_else(|| (None, format!("expected a string, found {}", i.type_name())))
}

fn boolean(i: &Item) -> Result<bool, Fail> {
    i.as_bool().ok_or_else(|| {
        (
            None,
            format!("expected true or false, found {}", i.type_name()),
        )
    })
}

fn integer(i: &Item) -> Result<i64, Fail> {
    i.as_integer().ok_or_else(|| {
        (
            None,
            format!("expected an integer, found {}", i.type_name()),
        )
    })
}

fn duration(i: &Item) -> Result<Duration, Fail> {
    match i.as_str() {
        Some(s) => s.parse().map_err(|e| (None, e)),
        None => Err((
            None,
            format!(
                "expected a duration string such as \"10s\", found {}",
                i.type_name()
            ),
        )),
    }
}

fn size(i: &Item) -> Result<Size, Fail> {
    if let Some(n) = i.as_integer() {
        return u64::try_from(n)
            .map(Size)
            .map_err(|_| (None, format!("{n} is negative")));
    }
    match i.as_str() {
        Some(s) => s.parse().map_err(|e| (None, e)),
        None => Err((
            None,
            format!("expected a size such as \"64MiB\", found {}", i.type_name()),
        )),
    }
}

fn string_array_spans(i: &Item) -> Result<Vec<(String, Span)>, Fail> {
    let arr = i.as_array().ok_or_else(|| {
        (
            None,
            format!("expected an array of strings, found {}", i.type_name()),
        )
    })?;
    arr.iter()
        .map(|v| match v.as_str() {
            Some(s) => Ok((s.to_string(), v.span())),
            None => Err((
                v.span(),
                format!("expected a string, found {}", v.type_name()),
            )),
        })
        .collect()
}

fn string_array(i: &Item) -> Result<Vec<String>, Fail> {
    if i.is_str() {
        return Err((
            None,
            "expected an array of strings, e.g. [\"sh\", \"-c\", \"echo hi\"], found string".into(),
        ));
    }
    Ok(string_array_spans(i)?.into_iter().map(|(s, _)| s).collect())
}

fn table_entries(i: &Item) -> Result<Vec<(String, &Item, Span)>, Fail> {
    let t = i.as_table_like().ok_or_else(|| {
        (
            None,
            format!(
                "expected a table such as {{ KEY = \"value\" }}, found {}",
                i.type_name()
            ),
        )
    })?;
    Ok(t.iter()
        .map(|(k, v)| (k.to_string(), v, t.key(k).and_then(|k| k.span())))
        .collect())
}

fn string_map(i: &Item) -> Result<BTreeMap<String, String>, Fail> {
    table_entries(i)?
        .into_iter()
        .map(|(k, v, _)| match v.as_str() {
            Some(s) => Ok((k, s.to_string())),
            None => Err((
                v.span(),
                format!("{k}: expected a string, found {}", v.type_name()),
            )),
        })
        .collect()
}

/// Environment values: strings, integers, floats and booleans (written out as text).
fn env_map(i: &Item) -> Result<BTreeMap<String, String>, Fail> {
    table_entries(i)?
        .into_iter()
        .map(|(k, v, kspan)| {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err((kspan, format!("{k:?} is not a valid variable name")));
            }
            let s = if let Some(s) = v.as_str() {
                s.to_string()
            } else if let Some(n) = v.as_integer() {
                n.to_string()
            } else if let Some(b) = v.as_bool() {
                b.to_string()
            } else if let Some(x) = v.as_float() {
                x.to_string()
            } else {
                return Err((
                    v.span(),
                    format!("{k}: expected a string, found {}", v.type_name()),
                ));
            };
            if s.contains('\0') {
                return Err((v.span(), format!("{k}: value contains a NUL byte")));
            }
            Ok((k, s))
        })
        .collect()
}

/// Load and validate a manifest directory.
pub fn load_dir(dir: &Path) -> Result<Desired, LoadError> {
    let files = manifest_files(dir)?;
    let mut l = Loader {
        dir: dir.to_path_buf(),
        diags: vec![],
        desired: Desired {
            dir: dir.to_path_buf(),
            ..Default::default()
        },
        defined: HashMap::new(),
        crefs: BTreeMap::new(),
        net_pos: BTreeMap::new(),
        hints_left: std::cell::Cell::new(HINTS),
    };
    for f in &files {
        l.load_file(f);
    }
    l.cross_check();
    if l.diags.is_empty() {
        Ok(l.desired)
    } else {
        l.diags.sort();
        l.diags.dedup();
        Err(LoadError::Invalid(l.diags))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> Result<Desired, Vec<String>> {
        let d = tempfile::tempdir().unwrap();
        for (n, t) in files {
            let p = d.path().join(n);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, t).unwrap();
        }
        match load_dir(d.path()) {
            Ok(x) => Ok(x),
            Err(LoadError::Invalid(ds)) => Err(ds
                .iter()
                .map(|x| {
                    let f = x.file.strip_prefix(d.path()).unwrap().display().to_string();
                    format!("{f}:{}:{}: {}", x.line, x.col, x.message)
                })
                .collect()),
            Err(e) => Err(vec![e.to_string()]),
        }
    }

    #[test]
    fn full_example_loads() {
        let d = load(&[(
            "a.toml",
            r#"
[image.busybox]
ref = "127.0.0.1:5000/busybox:1.36"
[volume.site]
[network.front]
subnet = "10.89.0.0/24"
[container.db]
image = "busybox"
[container.db.health]
cmd = ["true"]
[container.web]
image = "busybox"
env = { GREETING = "hello", N = 5 }
ports = ["127.0.0.1:8080:80/tcp"]
volumes = ["site:/www", "/srv/conf:/conf:ro"]
networks = ["front"]
depends_on = { db = "healthy" }
memory = "64MiB"
cpus = 0.5
"#,
        )])
        .unwrap();
        let web = &d.containers["web"].spec;
        assert_eq!(web.image_ref.to_string(), "127.0.0.1:5000/busybox:1.36");
        assert_eq!(web.env["N"], "5");
        assert_eq!(d.containers["web"].source.line, 11);
        assert!(d.networks.contains_key("default"));
        let order: Vec<&str> = d
            .containers_in_order()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(order, ["db", "web"]);
    }

    #[test]
    fn update_strategies_in_both_forms() {
        let img = "[image.bb]\nref = \"x/bb:1\"\n[network.n]\n";
        let d = load(&[(
            "a.toml",
            &format!("{img}[container.a]\nimage = \"bb\"\nnetworks = [\"n\"]\nupdate = \"start-first\"\n[container.b]\nimage = \"bb\"\n[container.b.update]\nstrategy = \"start-first\"\nlock_deadline = \"5m\"\n[container.c]\nimage = \"bb\"\n"),
        )])
        .unwrap();
        let a = d.containers["a"].spec.update.unwrap();
        assert_eq!(a.strategy, spec::UpdateStrategy::StartFirst);
        // the short form does not give the container /run/berth (its update lock)
        assert!(!a.locks);
        let b = d.containers["b"].spec.update.unwrap();
        assert_eq!(b.strategy, spec::UpdateStrategy::StartFirst);
        assert!(b.locks);
        assert_eq!(b.lock_deadline, Duration::from_secs(300));
        assert!(d.containers["c"].spec.update.is_none());
        let e = load(&[(
            "a.toml",
            &format!("{img}[container.a]\nimage = \"bb\"\nupdate = \"sideways\"\n[container.b]\nimage = \"bb\"\nnetworks = [\"host\"]\nupdate = \"start-first\"\n[container.c]\nimage = \"bb\"\nupdate = 3\n"),
        )])
        .unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].contains("a.toml:6:10: update: \"sideways\" is not an update strategy"),
            "{e:?}"
        );
        assert!(
            e[1].contains("start-first needs a network of its own"),
            "{e:?}"
        );
        assert!(e[2].contains("update: expected \"start-first\""), "{e:?}");
    }

    #[test]
    fn reports_all_errors() {
        let e = load(&[(
            "a.toml",
            "[container.web]\nimage = \"busybx\"\nmemroy = \"1g\"\nports = [\"x\"]\n",
        )])
        .unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with("a.toml:2:9: image \"busybx\" is not declared"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("a.toml:3:1: unknown key \"memroy\""),
            "{e:?}"
        );
        assert!(e[1].contains("did you mean \"memory\""), "{e:?}");
        assert!(e[2].starts_with("a.toml:4:10: ports:"), "{e:?}");
    }

    #[test]
    fn ignores_hidden_and_backups() {
        let d = load(&[
            ("a.toml", "[volume.v]\n"),
            ("a.toml~", "garbage ["),
            ("a.toml.bak", "garbage ["),
            (".hidden/b.toml", "garbage ["),
            (".c.toml", "garbage ["),
            ("sub/d.toml", "[volume.w]\n"),
        ])
        .unwrap();
        assert_eq!(d.volumes.len(), 2);
    }
}

/// `build = { context = "app/", file = "Containerfile", args = { K = "V" }, network = "none" }`:
/// paths relative to the manifest file `manifest`; the inputs read now.
fn build_spec(item: &Item, manifest: &Path) -> Result<BuildSpec, Fail> {
    let tbl = item
        .as_table_like()
        .ok_or((None, "expected a table: { context = \"app/\" }".to_string()))?;
    let known = ["context", "file", "args", "network"];
    for (k, _) in tbl.iter() {
        if !known.contains(&k) {
            return Err((
                tbl.key(k).and_then(|x| x.span()),
                format!("unknown key {k:?}{}", did_you_mean(k, &known)),
            ));
        }
    }
    let base = manifest.parent().unwrap_or(Path::new("."));
    let at = |p: &str| std::path::absolute(base.join(p)).unwrap_or_else(|_| base.join(p));
    let context = match tbl.get("context") {
        Some(i) => at(&string(i)?),
        None => return Err((None, "needs `context`, the build context directory".into())),
    };
    if !context.is_dir() {
        return Err((
            tbl.get("context").and_then(|i| i.span()),
            format!("context {} is not a directory", context.display()),
        ));
    }
    // the Containerfile lies in the context (it is read through no symlink, see below)
    let file = match tbl.get("file") {
        Some(i) => {
            let f = string(i)?;
            let p = Path::new(&f);
            if p.is_absolute()
                || p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err((
                    i.span(),
                    format!("file {f:?}: give a path inside the context"),
                ));
            }
            Some(context.join(p))
        }
        None => None,
    };
    let args = match tbl.get("args") {
        Some(i) => string_map(i)?,
        None => BTreeMap::new(),
    };
    // "none", "host" or a declared network (checked with the other references)
    let network = match tbl.get("network") {
        None => NET_NONE.to_string(),
        Some(i) => string(i)?,
    };
    let containerfile = crate::build::containerfile_path(&context, file.as_deref());
    let cf_bytes = crate::build::read_containerfile(&context, &containerfile).map_err(|e| {
        (
            tbl.get("file")
                .or(tbl.get("context"))
                .and_then(|i| i.span()),
            format!("{}: {e}", containerfile.display()),
        )
    })?;
    let files = crate::build::context::file_digests(&context).map_err(|e| (None, e))?;
    let mut h = sha2::Sha256::new();
    use sha2::Digest;
    h.update(&cf_bytes);
    h.update(format!("\0{args:?}\0{network}\0").as_bytes());
    for (k, v) in &files {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    Ok(BuildSpec {
        context,
        file,
        args,
        network,
        inputs: BuildInputs {
            digest: hex::encode(h.finalize()),
            files,
        },
    })
}

#[cfg(test)]
mod directory_tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A huge value is quoted cut, with its length, never in full.
    #[test]
    fn messages_quote_values_bounded() {
        let d = tempfile::tempdir().unwrap();
        let host = "a".repeat(1 << 20);
        std::fs::write(
            d.path().join("a.toml"),
            format!(
                "[container.a]\nimage = \"docker.io/library/busybox:1\"\nhostname = \"{host}\"\n"
            ),
        )
        .unwrap();
        let Err(LoadError::Invalid(diags)) = load_dir(d.path()) else {
            panic!("must fail");
        };
        assert_eq!(diags.len(), 1, "{diags:?}");
        let m = &diags[0].message;
        assert!(m.starts_with("hostname: \"aaa"), "{m}");
        assert!(m.len() < 600 && m.ends_with("bytes in all)"), "{m}");
    }

    /// Symlink loops end (each directory read once); files that are not regular, on /proc,
    /// or too large are each a diagnostic naming the file, and nothing blocks.
    #[test]
    fn loops_pseudo_files_fifos_and_large_files_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("a.toml"), "[volume.v]\n").unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/b.toml"), "[volume.w]\n").unwrap();
        symlink(".", root.join("loop")).unwrap();
        symlink("..", root.join("sub/up")).unwrap();
        symlink("sub", root.join("again")).unwrap();
        let files = manifest_files(root).unwrap();
        assert_eq!(
            files,
            vec![root.join("a.toml"), root.join("sub/b.toml")],
            "each directory once"
        );
        assert_eq!(load_dir(root).unwrap().volumes.len(), 2);

        symlink("/proc/self/pagemap", root.join("pagemap.toml")).unwrap();
        symlink("/proc/kmsg", root.join("kmsg.toml")).unwrap();
        symlink("/nonexistent", root.join("dangling.toml")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo.toml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(root.join("big.toml"), vec![b'#'; (MAX_FILE + 1) as usize]).unwrap();
        let Err(LoadError::Invalid(diags)) = load_dir(root) else {
            panic!("must fail");
        };
        let msg = |name: &str| {
            diags
                .iter()
                .find(|d| d.file == root.join(name))
                .map(|d| d.message.clone())
                .unwrap_or_else(|| panic!("no diagnostic for {name}: {diags:?}"))
        };
        assert!(msg("pagemap.toml").contains("kernel pseudo-file"));
        assert!(msg("kmsg.toml").contains("kernel pseudo-file"));
        assert!(msg("dangling.toml").contains("cannot read file"));
        assert!(msg("fifo.toml").contains("a FIFO"));
        assert!(msg("big.toml").contains("manifests are at most 4194304 bytes"));
        assert_eq!(diags.len(), 5, "{diags:?}");
    }
}
