//! `berth apply` and the container commands: ps, logs, exec, stop, start, restart, top,
//! stats, inspect.

use super::{Ctx, PlanArgs, image, load_desired};
use crate::apply::StepOutcome;
use crate::manifest::spec::Kind;
use crate::manifest::units::human_bytes;
use crate::observe::{self, ContainerStatus};
use crate::plan::render;
use crate::runtime::Runtime;
use crate::runtime::logs;
use crate::state::{ContainerRecord, StateLock};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

pub fn runtime(c: &Ctx) -> Result<Runtime> {
    let exe = crate::reconcile::berth_exe().context("finding berth's own executable")?;
    Ok(Runtime::new(
        c.state.containers_dir(),
        exe,
        c.config.cgroup_parent.clone(),
    ))
}

/// Take the state lock, waiting (with a word) if another berth process holds it.
pub fn lock(c: &Ctx) -> Result<StateLock, crate::state::StateError> {
    match c.state.lock(false) {
        Ok(l) => Ok(l),
        Err(crate::state::StateError::Locked(p)) => {
            eprintln!(
                "waiting for another berth process to finish with {}…",
                p.display()
            );
            c.state.lock(true)
        }
        Err(e) => Err(e),
    }
}

/// Write to stdout, flushed; a closed or full stdout is not an error of the apply (nor a
/// panic in the middle of it).
fn out(args: std::fmt::Arguments) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_fmt(args).and_then(|()| o.flush());
}

/// Says what an apply does on stdout (text), or nothing (JSON, printed at the end).
struct ApplyEvents {
    json: bool,
    /// every outcome, failed and skipped ones included, for --json whatever the result
    seen: std::sync::Mutex<Vec<StepOutcome>>,
}

impl crate::reconcile::Events for ApplyEvents {
    fn released(&self, names: &[String]) {
        if !self.json {
            let _ = writeln!(
                std::io::stderr(),
                "released the addresses of {} (no container of that name: an apply was interrupted)",
                names.join(", ")
            );
        }
    }
    fn planned(&self, plan: &crate::plan::Plan) {
        if !self.json {
            out(format_args!("{}", render::to_text(plan)));
            if !plan.is_empty() {
                out(format_args!("\n"));
            }
        }
    }
    fn replanned(&self, plan: &crate::plan::Plan) {
        if !self.json {
            out(format_args!(
                "\nThe host changed while images were pulled; the plan is now:\n\n"
            ));
            self.planned(plan);
        }
    }
    fn step(&self, o: &StepOutcome) {
        if let Ok(mut v) = self.seen.lock() {
            v.push(o.clone());
        }
        if !self.json {
            match &o.error {
                None => out(format_args!(
                    "{:>3} {}: done ({} ms)\n",
                    o.action.symbol(),
                    o.address,
                    o.millis
                )),
                Some(e) => out(format_args!(
                    "{:>3} {}: FAILED: {e}\n",
                    o.action.symbol(),
                    o.address
                )),
            }
        }
    }
    fn notice(&self, message: &str) {
        let _ = writeln!(std::io::stderr(), "{message}");
    }
}

pub fn apply_cmd(
    c: &Ctx,
    args: &PlanArgs,
    parallel: usize,
    wait_timeout: Duration,
) -> Result<ExitCode> {
    // held for the run: an agent on this state directory refuses to start meanwhile
    let _agent = match c.state.agent_lock(false) {
        Ok(l) => l,
        Err(crate::state::StateError::AgentLocked { pid, .. }) => {
            return Err(crate::reconcile::ReconcileError::AgentRunning {
                pid: pid.unwrap_or(0),
                state: c.state.root.clone(),
            }
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    let tokio = image::runtime()?;
    let host = super::host(c, &tokio)?;
    let desired = load_desired(&args.dir, args.allow_empty)?;
    let settings = crate::reconcile::Settings {
        max_deletions: args.max_deletions,
        parallel,
        wait_timeout,
        progress: !args.json,
        cancel: Default::default(),
    };
    let events = ApplyEvents {
        json: args.json,
        seen: Default::default(),
    };
    let pass = crate::reconcile::converge(
        &host,
        &desired,
        &settings,
        &Default::default(),
        &events,
        &|| lock(c),
    )?;
    let plan_json = || -> Result<serde_json::Value> {
        Ok(serde_json::from_str::<serde_json::Value>(
            &render::to_json(&pass.plan),
        )?)
    };
    let s = pass.plan.summary();
    match &pass.result {
        Ok(()) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"plan": plan_json()?, "outcomes": pass.outcomes, "ok": true})
                );
            } else if !pass.plan.is_empty() {
                println!(
                    "\nApply complete: {} added, {} changed, {} replaced, {} destroyed.",
                    s.add, s.change, s.replace, s.destroy
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if args.json {
                let outcomes = events.seen.lock().map(|v| v.clone()).unwrap_or_default();
                println!(
                    "{}",
                    serde_json::json!({"plan": plan_json()?, "outcomes": outcomes, "ok": false, "error": e.to_string()})
                );
            }
            bail!("apply failed: {e}")
        }
    }
}

fn records(c: &Ctx) -> Result<BTreeMap<String, ContainerRecord>> {
    Ok(c.state.read_records(Kind::Container)?)
}

fn record(c: &Ctx, name: &str) -> Result<ContainerRecord> {
    records(c)?
        .remove(name)
        .ok_or_else(|| anyhow::anyhow!("no container named {name:?} (berth ps -a lists them)"))
}

fn ago(secs: u64) -> String {
    let d = crate::fsutil::now_unix().saturating_sub(secs);
    match d {
        0..=59 => format!("{d}s"),
        60..=3599 => format!("{}m", d / 60),
        3600..=86_399 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86_400),
    }
}

/// How a container ended: `code 1`, `signal 9`, `OOM killed`.
fn how(oom: bool, code: Option<i32>, signal: Option<i32>) -> String {
    match (oom, code, signal) {
        (true, _, _) => "OOM killed".to_string(),
        (_, Some(c), _) => format!("code {c}"),
        (_, _, Some(s)) => format!("signal {s}"),
        _ => "?".into(),
    }
}

pub fn describe_status(s: &ContainerStatus) -> (String, String) {
    match s {
        ContainerStatus::Created => ("created".into(), "-".into()),
        ContainerStatus::Running { started_at, .. } => {
            ("running".into(), format!("up {}", ago(*started_at)))
        }
        ContainerStatus::Exited {
            code,
            signal,
            oom,
            finished_at,
            ..
        } => (
            "exited".into(),
            format!("{}, {} ago", how(*oom, *code, *signal), ago(*finished_at)),
        ),
        ContainerStatus::Restarting {
            code,
            signal,
            oom,
            restarts,
            restart_at_ms,
            ..
        } => {
            let secs = restart_at_ms
                .saturating_sub(crate::fsutil::now_unix_ms())
                .div_ceil(1000);
            (
                "restarting".into(),
                format!(
                    "in {secs}s, {restarts} restart{}; last {}",
                    if *restarts == 1 { "" } else { "s" },
                    how(*oom, *code, *signal)
                ),
            )
        }
        ContainerStatus::StoppedByUser => ("stopped by user".into(), "-".into()),
        ContainerStatus::Lost { reason } => ("lost".into(), reason.clone()),
    }
}

pub fn ps(c: &Ctx, all: bool, json: bool) -> Result<ExitCode> {
    let rows = ps_rows(c, all)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_ps(&rows);
    Ok(ExitCode::SUCCESS)
}

/// `ps --json`'s rows: every container (`all`) or the running and restarting ones.
pub fn ps_rows(c: &Ctx, all: bool) -> Result<Vec<serde_json::Value>> {
    let rt = runtime(c)?;
    let rollbacks = c.state.read_rollbacks();
    let o = observe::observe(&c.state, &image::store(c), &rt)?;
    let mut rows = vec![];
    for (name, oc) in &o.containers {
        // as docker's ps: running containers and those about to run again
        let live = matches!(
            oc.status,
            ContainerStatus::Running { .. } | ContainerStatus::Restarting { .. }
        );
        if !all && !live {
            continue;
        }
        let st = rt.state(name);
        let (mut state, detail) = describe_status(&oc.status);
        // the health check's verdict, while the container runs
        let health = live
            .then(|| crate::runtime::health::read(&rt.dir(name)))
            .flatten();
        if let (Some(h), ContainerStatus::Running { .. }) = (&health, &oc.status) {
            state = format!("{state} ({})", h.status);
        }
        let rolled_back = rollbacks.get(name);
        if rolled_back.is_some() {
            state = format!("{state} (rolled back)");
        }
        rows.push(serde_json::json!({
            "name": name, "image": oc.record.spec.image_ref.to_string(), "state": state, "status": detail,
            "health": health,
            "restarts": st.as_ref().map(|s| s.restarts).unwrap_or(0),
            "pid": match oc.status { ContainerStatus::Running { pid, .. } => Some(pid), _ => None },
            "detail": oc.status,
            "rolled_back": rolled_back.map(|r| &r.reason),
        }));
    }
    Ok(rows)
}

pub fn print_ps(rows: &[serde_json::Value]) {
    println!(
        "{:<20} {:<40} {:<16} {:<28} {:>8} {:>8}",
        "NAME", "IMAGE", "STATE", "STATUS", "RESTARTS", "PID"
    );
    for r in rows {
        println!(
            "{:<20} {:<40} {:<16} {:<28} {:>8} {:>8}",
            r["name"].as_str().unwrap_or(""),
            r["image"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["restarts"],
            r["pid"]
                .as_i64()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
}

pub struct LogsArgs {
    pub name: String,
    pub follow: bool,
    pub tail: Option<usize>,
    pub since: Option<crate::manifest::units::Duration>,
    pub timestamps: bool,
}

/// Print one record to stdout or, for the container's stderr, to stderr (as `docker logs`).
fn print_record(r: &logs::Record, timestamps: bool) -> std::io::Result<()> {
    if r.stream == "stderr" {
        let mut err = std::io::stderr().lock();
        write_record(r, timestamps, &mut err)?;
        return err.flush();
    }
    write_record(r, timestamps, &mut std::io::stdout().lock())
}

fn write_record(r: &logs::Record, timestamps: bool, out: &mut impl Write) -> std::io::Result<()> {
    if timestamps {
        write!(out, "{} ", r.time)?;
    }
    if r.full {
        writeln!(out, "{}", r.content)
    } else {
        write!(out, "{}", r.content)
    }
}

pub fn logs_cmd(c: &Ctx, a: &LogsArgs) -> Result<ExitCode> {
    record(c, &a.name)?;
    let rt = runtime(c)?;
    let path = rt.log_path(&a.name);
    let cfg = rt.config(&a.name)?;
    let min_time = a.since.map(|d| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        now - d.0 as i128 * 1_000_000
    });
    // following: the current file is held open from before anything is read
    let mut follower = if a.follow {
        Some(
            logs::Follower::open(&path, cfg.log_max_files)
                .with_context(|| format!("opening {}", path.display()))?,
        )
    } else {
        None
    };
    let mut recs = match follower.as_mut() {
        Some(f) => {
            let mut r = f.older()?;
            r.extend(f.poll()?);
            r
        }
        None => logs::read_all(&path, cfg.log_max_files)
            .with_context(|| format!("reading {}", path.display()))?,
    };
    if let Some(t) = min_time {
        recs.retain(|r| logs::parse_rfc3339(&r.time).is_some_and(|x| x >= t));
    }
    if let Some(n) = a.tail {
        let skip = recs.len().saturating_sub(n);
        recs.drain(..skip);
    }
    for r in &recs {
        print_record(r, a.timestamps)?;
    }
    std::io::stdout().flush()?;
    let Some(mut follower) = follower else {
        return Ok(ExitCode::SUCCESS);
    };
    // then each line as it is written, until the container is no longer running (and what
    // it wrote last has been read)
    loop {
        let running = matches!(rt.status(&a.name)?, ContainerStatus::Running { .. });
        let recs = follower
            .poll()
            .with_context(|| format!("reading {}", path.display()))?;
        for r in &recs {
            print_record(r, a.timestamps)?;
        }
        std::io::stdout().flush()?;
        if !running {
            return Ok(ExitCode::SUCCESS);
        }
        if recs.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn stop_cmd(c: &Ctx, name: &str) -> Result<ExitCode> {
    let _lock = lock(c)?;
    let mut rec = record(c, name)?;
    rec.stopped_by_user = true;
    c.state.write_record(Kind::Container, name, &rec)?;
    runtime(c)?.stop(name, &rec.spec.stop_signal, rec.spec.stop_timeout.as_std())?;
    println!("{name}: stopped");
    Ok(ExitCode::SUCCESS)
}

pub fn start_cmd(c: &Ctx, name: &str, restart: bool) -> Result<ExitCode> {
    let _lock = lock(c)?;
    let mut rec = record(c, name)?;
    let rt = runtime(c)?;
    if restart {
        rt.stop(name, &rec.spec.stop_signal, rec.spec.stop_timeout.as_std())?;
    }
    let started = rt.start(name);
    if rec.stopped_by_user {
        rec.stopped_by_user = false;
        c.state.write_record(Kind::Container, name, &rec)?;
    }
    match started {
        Ok(pid) => println!("{name}: running, pid {pid}"),
        // backing off: its supervisor starts it when the delay is over
        Err(e @ crate::runtime::RuntimeError::Restarting { .. }) => println!("{e}"),
        Err(e) => return Err(e.into()),
    }
    Ok(ExitCode::SUCCESS)
}

fn running_pid(rt: &Runtime, name: &str) -> Result<i32> {
    match rt.status(name)? {
        ContainerStatus::Running { pid, .. } => Ok(pid),
        s => bail!(
            "container {name} is not running ({})",
            describe_status(&s).0
        ),
    }
}

pub fn top_cmd(c: &Ctx, name: &str) -> Result<ExitCode> {
    record(c, name)?;
    let rt = runtime(c)?;
    running_pid(&rt, name)?;
    let st = rt.state(name).context("no state")?;
    println!("{:>8} {:>8} {:>6} CMD", "PID", "PPID", "UID");
    let mut pids = st.cgroup.open().procs();
    pids.sort();
    for p in pids {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split(' ').nth(1))
            .unwrap_or("?")
            .to_string();
        let uid = std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("Uid:")
                        .map(|v| v.split_whitespace().next().unwrap_or("?").to_string())
                })
            })
            .unwrap_or_else(|| "?".into());
        let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .replace('\0', " ")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        println!("{p:>8} {ppid:>8} {uid:>6} {cmd}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stats_cmd(c: &Ctx, names: &[String], no_stream: bool, json: bool) -> Result<ExitCode> {
    let rt = runtime(c)?;
    let names: Vec<String> = if names.is_empty() {
        records(c)?.into_keys().collect()
    } else {
        names.to_vec()
    };
    loop {
        let sample = |n: &str| rt.state(n).map(|s| s.cgroup.open()).filter(|g| g.exists());
        let before: Vec<(String, u64)> = names
            .iter()
            .map(|n| (n.clone(), sample(n).map(|g| g.cpu_usage_ns()).unwrap_or(0)))
            .collect();
        let t = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        let secs = t.elapsed().as_secs_f64();
        let mut rows = vec![];
        for (n, b) in before {
            let Some(g) = sample(&n) else { continue };
            let cpu = (g.cpu_usage_ns().saturating_sub(b)) as f64 / (secs * 1e9) * 100.0;
            let lim = g.read_limits();
            rows.push(serde_json::json!({"name": n, "cpu_percent": (cpu * 100.0).round() / 100.0, "memory": g.memory_usage(), "memory_limit": lim.memory, "pids": g.pids_current(), "pids_limit": lim.pids}));
        }
        if json {
            println!("{}", serde_json::to_string(&rows)?);
        } else {
            println!(
                "{:<20} {:>8} {:>24} {:>10}",
                "NAME", "CPU %", "MEM USAGE / LIMIT", "PIDS"
            );
            for r in &rows {
                let lim = r["memory_limit"]
                    .as_u64()
                    .map(human_bytes)
                    .unwrap_or_else(|| "unlimited".into());
                println!(
                    "{:<20} {:>7.2}% {:>24} {:>10}",
                    r["name"].as_str().unwrap_or(""),
                    r["cpu_percent"].as_f64().unwrap_or(0.0),
                    format!("{} / {lim}", human_bytes(r["memory"].as_u64().unwrap_or(0))),
                    // a number, not the JSON value, whose Display ignores the width
                    r["pids"].as_u64().unwrap_or(0)
                );
            }
        }
        if no_stream {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

pub fn inspect_cmd(c: &Ctx, name: &str) -> Result<ExitCode> {
    let rec = record(c, name)?;
    let rt = runtime(c)?;
    let status = rt.status(name)?;
    let st = rt.state(name);
    let dirs: Vec<String> = st
        .as_ref()
        .map(|s| {
            s.cgroup
                .open()
                .dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    let config = rt.config(name).ok();
    let pid = match status {
        ContainerStatus::Running { pid, .. } => Some(pid),
        _ => None,
    };
    let v = serde_json::json!({
        "name": name,
        "pid": pid,
        "mounts": config.as_ref().map(|c| &c.mounts),
        "cgroup_path": st.as_ref().map(|s| &s.cgroup.path),
        "cgroup_dirs": dirs,
        "record": rec,
        "status": status,
        "state": st,
        "exit": rt.exit(name),
        "health": crate::runtime::health::read(&rt.dir(name)),
        "config": config,
        "directory": rt.dir(name).0,
        "log": rt.log_path(name),
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}
