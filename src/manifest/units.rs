//! Parsers for the small value languages inside manifests: durations, sizes, ports, CIDRs,
//! signals, capabilities, restart policies, mounts. Each returns a message (no location):
//! the caller attaches `file:line:col`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

/// A duration in milliseconds, written `"10s"`, `"1m30s"`, `"500ms"`, `"2h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(try_from = "String", into = "String")]
pub struct Duration(pub u64);

impl Duration {
    pub fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
    pub fn from_secs(s: u64) -> Self {
        Duration(s * 1000)
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid duration {s:?}: expected a number with a unit, e.g. \"500ms\", \"10s\", \"1m30s\", \"2h\""
            )
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(bad());
        }
        let mut total: u64 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .ok_or_else(|| format!("invalid duration {s:?}: missing unit (ms, s, m or h)"))?;
            if num_len == 0 {
                return Err(bad());
            }
            let num: f64 = rest[..num_len].parse().map_err(|_| bad())?;
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let factor = match &rest[..unit_len] {
                "ms" => 1.0,
                "s" => 1000.0,
                "m" => 60_000.0,
                "h" => 3_600_000.0,
                "d" => 86_400_000.0,
                u => {
                    return Err(format!(
                        "invalid duration {s:?}: unknown unit {u:?} (use ms, s, m, h or d)"
                    ));
                }
            };
            rest = &rest[unit_len..];
            let add = num * factor;
            if !add.is_finite() || add > 1e15 {
                return Err(format!("invalid duration {s:?}: too large"));
            }
            total = total.saturating_add(add.round() as u64);
        }
        Ok(Duration(total))
    }
}

impl TryFrom<String> for Duration {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}
impl From<Duration> for String {
    fn from(d: Duration) -> String {
        d.to_string()
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms == 0 {
            return write!(f, "0s");
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let mut s = ms / 1000;
        let h = s / 3600;
        s %= 3600;
        let m = s / 60;
        s %= 60;
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        Ok(())
    }
}

/// A size in bytes, written `"64MiB"`, `"64m"`, `"1g"`, `"512KiB"` or a plain integer of bytes.
/// Like docker, k/m/g are binary multiples (1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(try_from = "String", into = "String")]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            format!(
                "invalid size {s:?}: expected a number with an optional unit, e.g. \"64MiB\", \"512k\", \"1g\""
            )
        };
        if num.is_empty() {
            return Err(bad());
        }
        let n: f64 = num.parse().map_err(|_| bad())?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            u => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB or TiB)"
                ));
            }
        };
        let v = n * factor as f64;
        if !v.is_finite() || v > u64::MAX as f64 / 2.0 {
            return Err(format!("invalid size {s:?}: too large"));
        }
        Ok(Size(v.round() as u64))
    }
}

impl TryFrom<String> for Size {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}
impl From<Size> for String {
    fn from(d: Size) -> String {
        d.to_string()
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if b >= 1 << shift && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}B")
    }
}

/// Human-readable byte count for reports ("1.5 MiB").
pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// An IPv4 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    pub fn network(self) -> u32 {
        u32::from(self.addr) & self.mask()
    }
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.network()
    }
    pub fn overlaps(self, other: Cidr) -> bool {
        let p = self.prefix.min(other.prefix);
        let m = if p == 0 { 0 } else { u32::MAX << (32 - p) };
        self.network() & m == other.network() & m
    }
    /// The address with host part `n` (1 = the gateway by berth's convention).
    pub fn host(self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.network() | n)
    }
    pub fn size(self) -> u64 {
        1u64 << (32 - self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').ok_or_else(|| {
            format!("invalid subnet {s:?}: expected CIDR notation, e.g. \"10.89.0.0/24\"")
        })?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("invalid subnet {s:?}: {a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("invalid subnet {s:?}: prefix length must be 0 to 32"))?;
        let c = Cidr { addr, prefix };
        if u32::from(addr) != c.network() {
            return Err(format!(
                "invalid subnet {s:?}: host bits are set; did you mean \"{}/{prefix}\"?",
                Ipv4Addr::from(c.network())
            ));
        }
        if !(8..=30).contains(&prefix) {
            return Err(format!(
                "invalid subnet {s:?}: a bridge subnet needs a prefix length from /8 to /30"
            ));
        }
        Ok(c)
    }
}
impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}
impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}
impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A published port: `[host_ip:]host_port:container_port[/tcp|/udp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(try_from = "String", into = "String")]
pub struct PortSpec {
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

impl PortSpec {
    /// Two publications collide when they share protocol and port and their addresses
    /// overlap (equal, or either is 0.0.0.0).
    pub fn collides(&self, o: &PortSpec) -> bool {
        self.proto == o.proto
            && self.host_port == o.host_port
            && (self.host_ip == o.host_ip
                || self.host_ip.is_unspecified()
                || o.host_ip.is_unspecified())
    }
}

impl FromStr for PortSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (body, proto) = match s.rsplit_once('/') {
            Some((b, "tcp")) => (b, Proto::Tcp),
            Some((b, "udp")) => (b, Proto::Udp),
            Some((_, p)) => {
                return Err(format!(
                    "invalid port {s:?}: unknown protocol {p:?} (use tcp or udp)"
                ));
            }
            None => (s, Proto::Tcp),
        };
        let parts: Vec<&str> = body.split(':').collect();
        let (ip, hp, cp) = match parts.as_slice() {
            [hp, cp] => (None, *hp, *cp),
            [ip, hp, cp] => (Some(*ip), *hp, *cp),
            _ => {
                return Err(format!(
                    "invalid port {s:?}: expected [host_ip:]host_port:container_port[/tcp|/udp], e.g. \"127.0.0.1:8080:80/tcp\""
                ));
            }
        };
        let port = |p: &str, what: &str| -> Result<u16, String> {
            p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                format!("invalid port {s:?}: {what} {p:?} is not a port number (1-65535)")
            })
        };
        let host_ip = match ip {
            None => Ipv4Addr::UNSPECIFIED,
            Some(ip) => ip
                .parse()
                .map_err(|_| format!("invalid port {s:?}: {ip:?} is not an IPv4 address"))?,
        };
        Ok(PortSpec {
            host_ip,
            host_port: port(hp, "host port")?,
            container_port: port(cp, "container port")?,
            proto,
        })
    }
}
impl TryFrom<String> for PortSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}
impl From<PortSpec> for String {
    fn from(p: PortSpec) -> String {
        p.to_string()
    }
}
impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}/{}",
            self.host_ip, self.host_port, self.container_port, self.proto
        )
    }
}

/// Restart policy, as docker spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, Default)]
#[serde(try_from = "String", into = "String")]
pub enum Restart {
    #[default]
    No,
    OnFailure(Option<u32>),
    Always,
    UnlessStopped,
}

impl FromStr for Restart {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "no" => Restart::No,
            "always" => Restart::Always,
            "unless-stopped" => Restart::UnlessStopped,
            "on-failure" => Restart::OnFailure(None),
            _ => match s.strip_prefix("on-failure:") {
                Some(n) => Restart::OnFailure(Some(n.parse().map_err(|_| {
                    format!("invalid restart policy {s:?}: {n:?} is not a retry count")
                })?)),
                None => {
                    return Err(format!(
                        "invalid restart policy {s:?}: expected \"no\", \"on-failure[:N]\", \"always\" or \"unless-stopped\"{}",
                        did_you_mean(s, &["no", "on-failure", "always", "unless-stopped"])
                    ));
                }
            },
        })
    }
}
impl TryFrom<String> for Restart {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}
impl From<Restart> for String {
    fn from(r: Restart) -> String {
        r.to_string()
    }
}
impl fmt::Display for Restart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Restart::No => f.write_str("no"),
            Restart::Always => f.write_str("always"),
            Restart::UnlessStopped => f.write_str("unless-stopped"),
            Restart::OnFailure(None) => f.write_str("on-failure"),
            Restart::OnFailure(Some(n)) => write!(f, "on-failure:{n}"),
        }
    }
}

/// Parse a signal name ("SIGTERM", "TERM", "sigterm") into its canonical "SIGTERM" form.
pub fn parse_signal(s: &str) -> Result<String, String> {
    let up = s.trim().to_ascii_uppercase();
    let full = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    match nix::sys::signal::Signal::from_str(&full) {
        Ok(sig) if !matches!(sig, nix::sys::signal::Signal::SIGSTOP) => Ok(full),
        Ok(_) => Err(format!(
            "invalid signal {s:?}: SIGSTOP cannot stop a container"
        )),
        Err(_) => Err(format!(
            "invalid signal {s:?}: not a signal name (e.g. \"SIGTERM\", \"SIGINT\", \"SIGQUIT\")"
        )),
    }
}

/// All Linux capability names, without the `CAP_` prefix, in number order.
pub const CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Docker's default capability set.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Canonicalise a capability name: case-insensitive, `CAP_` prefix optional; `ALL` allowed.
/// Returns the name in `CAP_XXX` form (or `ALL`).
pub fn parse_capability(s: &str) -> Result<String, String> {
    let up = s.trim().to_ascii_uppercase();
    if up == "ALL" {
        return Ok(up);
    }
    let bare = up.strip_prefix("CAP_").unwrap_or(&up);
    if CAPABILITIES.contains(&bare) {
        Ok(format!("CAP_{bare}"))
    } else {
        Err(format!(
            "unknown capability {s:?}{}",
            did_you_mean(bare, CAPABILITIES)
        ))
    }
}

/// The capability number of a `CAP_XXX` name.
pub fn capability_number(name: &str) -> Option<u32> {
    let bare = name.strip_prefix("CAP_").unwrap_or(name);
    CAPABILITIES
        .iter()
        .position(|c| *c == bare)
        .map(|i| i as u32)
}

/// Source of a mount: a named volume or an absolute host path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MountSource {
    Volume(String),
    Bind(PathBuf),
}

/// `volumes = ["site:/www", "/srv/conf:/conf:ro"]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeMount {
    pub source: MountSource,
    pub target: PathBuf,
    pub read_only: bool,
}

impl FromStr for VolumeMount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (src, target, mode) = match parts.as_slice() {
            [src, target] => (*src, *target, None),
            [src, target, mode] => (*src, *target, Some(*mode)),
            _ => {
                return Err(format!(
                    "invalid volume {s:?}: expected SOURCE:TARGET[:ro|rw], e.g. \"site:/www\" or \"/srv/conf:/conf:ro\""
                ));
            }
        };
        let read_only = match mode {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(m) => {
                return Err(format!(
                    "invalid volume {s:?}: unknown mode {m:?} (use ro or rw)"
                ));
            }
        };
        if !target.starts_with('/') {
            return Err(format!(
                "invalid volume {s:?}: the target {target:?} must be an absolute path in the container"
            ));
        }
        if target.split('/').any(|c| c == "..") {
            return Err(format!(
                "invalid volume {s:?}: the target may not contain \"..\""
            ));
        }
        if let Some(why) = reserved_target(target) {
            return Err(format!("invalid volume {s:?}: {why}"));
        }
        let source = if src.starts_with('/') {
            MountSource::Bind(PathBuf::from(src))
        } else if src.starts_with('.') || src.contains('/') || src.starts_with('~') {
            return Err(format!(
                "invalid volume {s:?}: host path {src:?} is relative; write an absolute path such as \"/srv/data\""
            ));
        } else if src.is_empty() {
            return Err(format!("invalid volume {s:?}: the source is empty"));
        } else {
            MountSource::Volume(src.to_string())
        };
        Ok(VolumeMount {
            source,
            target: PathBuf::from(target),
            read_only,
        })
    }
}
impl TryFrom<String> for VolumeMount {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}
impl From<VolumeMount> for String {
    fn from(v: VolumeMount) -> String {
        v.to_string()
    }
}
impl fmt::Display for VolumeMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            MountSource::Volume(v) => write!(f, "{v}")?,
            MountSource::Bind(p) => write!(f, "{}", p.display())?,
        }
        write!(f, ":{}", self.target.display())?;
        if self.read_only {
            write!(f, ":ro")?;
        }
        Ok(())
    }
}

/// `tmpfs = ["/tmp:size=16m,mode=1777"]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(try_from = "String", into = "String")]
pub struct TmpfsMount {
    pub target: PathBuf,
    pub size: Option<Size>,
    pub mode: Option<u32>,
}

impl FromStr for TmpfsMount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (target, opts) = match s.split_once(':') {
            Some((t, o)) => (t, Some(o)),
            None => (s, None),
        };
        if !target.starts_with('/') || target.split('/').any(|c| c == "..") {
            return Err(format!(
                "invalid tmpfs {s:?}: the target {target:?} must be an absolute path without \"..\""
            ));
        }
        if let Some(why) = reserved_target(target) {
            return Err(format!("invalid tmpfs {s:?}: {why}"));
        }
        let mut m = TmpfsMount {
            target: PathBuf::from(target),
            size: None,
            mode: None,
        };
        for opt in opts.into_iter().flat_map(|o| o.split(',')) {
            match opt.split_once('=') {
                Some(("size", v)) => {
                    m.size = Some(v.parse().map_err(|e| format!("invalid tmpfs {s:?}: {e}"))?)
                }
                Some(("mode", v)) => {
                    m.mode = Some(u32::from_str_radix(v, 8).ok().filter(|m| *m <= 0o7777).ok_or_else(
                        || format!("invalid tmpfs {s:?}: mode {v:?} is not an octal permission such as 1777"),
                    )?)
                }
                _ => {
                    return Err(format!(
                        "invalid tmpfs {s:?}: unknown option {opt:?} (use size=SIZE and mode=OCTAL)"
                    ));
                }
            }
        }
        Ok(m)
    }
}
impl TryFrom<String> for TmpfsMount {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}
impl From<TmpfsMount> for String {
    fn from(v: TmpfsMount) -> String {
        v.to_string()
    }
}
impl fmt::Display for TmpfsMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.target.display())?;
        let mut opts = vec![];
        if let Some(s) = self.size {
            opts.push(format!("size={s}"));
        }
        if let Some(m) = self.mode {
            opts.push(format!("mode={m:o}"));
        }
        if !opts.is_empty() {
            write!(f, ":{}", opts.join(","))?;
        }
        Ok(())
    }
}

/// Why a mount target is not allowed, if it is not: the container's root, and the kernel file
/// systems berth mounts itself (a mount there would hide them, or be hidden by them).
pub fn reserved_target(target: &str) -> Option<String> {
    let parts: Vec<&str> = target
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    match parts.as_slice() {
        [] => Some("the target \"/\" is the container's root file system".into()),
        ["proc" | "sys", ..] | ["dev"] => Some(format!(
            "the target {target:?} is where berth mounts /{} itself; use another path",
            parts[0]
        )),
        _ => None,
    }
}

/// Levenshtein distance, for did-you-mean hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// How many edits still look like a typo of a word this long.
fn max_typo_distance(len: usize) -> usize {
    match len {
        0..=2 => 0,
        3..=5 => 1,
        _ => 2 + (len - 6) / 4,
    }
}

/// `"; did you mean \"x\"?"` when one candidate is close, else empty.
/// Candidates too long or too far in length to be a typo are not compared, and a word longer
/// than any name gets no hint: the cost stays linear in the candidates.
pub fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    let len = word.chars().count();
    if len > 128 {
        return String::new();
    }
    let max = max_typo_distance(len);
    let lw = word.to_ascii_lowercase();
    let best = candidates
        .iter()
        .filter(|c| c.len().abs_diff(word.len()) <= max.max(1) * 4 && c.len() <= 256)
        .map(|c| (edit_distance(&lw, &c.to_ascii_lowercase()), *c))
        .min();
    match best {
        Some((d, c)) if d <= max => format!("; did you mean {c:?}?"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("10s".parse::<Duration>().unwrap(), Duration(10_000));
        assert_eq!("1m30s".parse::<Duration>().unwrap(), Duration(90_000));
        assert_eq!("500ms".parse::<Duration>().unwrap(), Duration(500));
        assert_eq!("1.5s".parse::<Duration>().unwrap(), Duration(1500));
        assert!("10".parse::<Duration>().is_err());
        assert!("ten s".parse::<Duration>().is_err());
        assert!("10y".parse::<Duration>().is_err());
        assert_eq!(Duration(90_000).to_string(), "1m30s");
        assert_eq!(Duration(250).to_string(), "250ms");
    }

    #[test]
    fn sizes() {
        assert_eq!("64MiB".parse::<Size>().unwrap(), Size(64 << 20));
        assert_eq!("64m".parse::<Size>().unwrap(), Size(64 << 20));
        assert_eq!("1g".parse::<Size>().unwrap(), Size(1 << 30));
        assert_eq!("100".parse::<Size>().unwrap(), Size(100));
        assert!("lots".parse::<Size>().is_err());
        assert!("12XB".parse::<Size>().is_err());
        assert_eq!(Size(64 << 20).to_string(), "64MiB");
    }

    #[test]
    fn ports() {
        let p: PortSpec = "127.0.0.1:8080:80/tcp".parse().unwrap();
        assert_eq!(p.host_port, 8080);
        assert_eq!(p.container_port, 80);
        let q: PortSpec = "8080:80".parse().unwrap();
        assert!(p.collides(&q));
        let u: PortSpec = "8080:80/udp".parse().unwrap();
        assert!(!u.collides(&q));
        assert!("80".parse::<PortSpec>().is_err());
        assert!("0:80".parse::<PortSpec>().is_err());
        assert!("70000:80".parse::<PortSpec>().is_err());
        assert!("1:2/sctp".parse::<PortSpec>().is_err());
    }

    #[test]
    fn cidrs() {
        let a: Cidr = "10.89.0.0/24".parse().unwrap();
        let b: Cidr = "10.89.0.0/16".parse().unwrap();
        let c: Cidr = "10.90.0.0/24".parse().unwrap();
        assert!(a.overlaps(b));
        assert!(!a.overlaps(c));
        assert!("10.89.0.1/24".parse::<Cidr>().is_err());
        assert!("10.89.0.0/33".parse::<Cidr>().is_err());
        assert_eq!(a.host(1).to_string(), "10.89.0.1");
    }

    #[test]
    fn restart_signal_caps() {
        assert_eq!(
            "on-failure:3".parse::<Restart>().unwrap(),
            Restart::OnFailure(Some(3))
        );
        assert!("sometimes".parse::<Restart>().is_err());
        assert!("alway".parse::<Restart>().unwrap_err().contains("always"));
        assert_eq!(parse_signal("term").unwrap(), "SIGTERM");
        assert!(parse_signal("SIGFOO").is_err());
        assert_eq!(parse_capability("net_admin").unwrap(), "CAP_NET_ADMIN");
        assert!(
            parse_capability("NET_ADMN")
                .unwrap_err()
                .contains("NET_ADMIN")
        );
        assert_eq!(capability_number("CAP_CHOWN"), Some(0));
        assert_eq!(capability_number("CAP_SYS_ADMIN"), Some(21));
    }

    #[test]
    fn mounts() {
        let v: VolumeMount = "site:/www".parse().unwrap();
        assert_eq!(v.source, MountSource::Volume("site".into()));
        let b: VolumeMount = "/srv/conf:/conf:ro".parse().unwrap();
        assert!(b.read_only);
        assert!("./conf:/conf".parse::<VolumeMount>().is_err());
        assert!("site:www".parse::<VolumeMount>().is_err());
        let t: TmpfsMount = "/tmp:size=16m,mode=1777".parse().unwrap();
        assert_eq!(t.size, Some(Size(16 << 20)));
        assert_eq!(t.mode, Some(0o1777));
        assert_eq!(t.to_string(), "/tmp:size=16MiB,mode=1777");
    }
}
