//! The command line: parse flags into settings, call the library, print, choose the exit code.
//!
//! Exit codes: 0 success (and, with `--detailed-exitcode`, no changes); 1 error;
//! 2 changes present (only with `--detailed-exitcode`).

use crate::config::{Config, DEFAULT_CONFIG};
use crate::manifest::{self, LoadError, spec::Desired};
use crate::plan::render;
use crate::state::StateDir;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub mod containers;
pub mod image;

#[derive(Parser, Debug)]
#[command(
    name = "berth",
    version,
    about = "Declarative containers for one Linux host",
    long_about = "berth makes a Linux host match a directory of TOML manifests: images, volumes, \
networks and containers. `berth validate DIR` checks the manifests, `berth plan DIR` shows what \
would change and why, `berth apply DIR` converges the host.\n\n\
Exit codes: 0 success; 1 error; 2 changes present (plan --detailed-exitcode)."
)]
pub struct Cli {
    /// Where berth keeps its records, images and container state.
    #[arg(
        long,
        global = true,
        env = "BERTH_STATE_DIR",
        default_value = "/var/lib/berth"
    )]
    pub state_dir: PathBuf,
    /// Host configuration file (registries, mirrors, cgroup parent). Optional.
    #[arg(long, global = true, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check a manifest directory; report every error as file:line:col.
    Validate {
        /// The manifest directory.
        dir: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what `apply` would change, and why, without changing anything.
    Plan(PlanArgs),
    /// Converge the host to the manifests: execute exactly the plan `berth plan` shows.
    Apply {
        #[command(flatten)]
        plan: PlanArgs,
        /// Container steps run at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// How long a container waits for its `depends_on` conditions (a dependency healthy,
        /// completed, started) before it fails; e.g. "30s", "5m".
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        wait_timeout: crate::manifest::units::Duration,
        /// Try again the replacement of container NAME that was rolled back (repeatable).
        #[arg(long, value_name = "NAME")]
        retry: Vec<String>,
    },
    /// Manage images in berth's store: pull, ls, inspect, tag, rm, push, import, prune.
    Image {
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// List containers: name, image, state, uptime or exit status, restarts, pid.
    Ps {
        /// Include containers that are not running.
        #[arg(short, long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show a container's output (CRI log format underneath).
    Logs {
        name: String,
        /// Keep printing new output until the container stops.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Only lines newer than this (e.g. 10m, 1h).
        #[arg(long, value_name = "DURATION")]
        since: Option<crate::manifest::units::Duration>,
        /// Prefix each line with its timestamp.
        #[arg(short, long)]
        timestamps: bool,
    },
    /// Run a command in a running container (all its namespaces, cgroup, user, env, caps).
    Exec {
        /// Keep stdin open.
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a pseudo-terminal.
        #[arg(short, long)]
        tty: bool,
        /// NAME is the container's directory under STATE/containers/.slots (the health
        /// prober's way to reach the container it watches, whatever its name is).
        #[arg(long, hide = true)]
        slot: bool,
        /// The container.
        name: String,
        /// The command and its arguments (after --).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop a container; it stays stopped (not drift) until start, restart or a new config.
    Stop {
        /// The container.
        name: String,
    },
    /// Start a stopped or exited container.
    Start {
        /// The container.
        name: String,
    },
    /// Stop, then start a container.
    Restart {
        /// The container.
        name: String,
    },
    /// Processes inside a container, as seen from the host.
    Top {
        /// The container.
        name: String,
    },
    /// CPU %, memory usage/limit and pids of containers (all when none named).
    Stats {
        /// The containers (all when none is named).
        names: Vec<String>,
        /// One sample, then exit.
        #[arg(long)]
        no_stream: bool,
        /// One JSON array per sample: name, cpu_percent, memory, memory_limit, pids,
        /// pids_limit (limits null when unlimited).
        #[arg(long)]
        json: bool,
    },
    /// A container as JSON: config, state, mounts, pid, cgroup path.
    Inspect {
        /// The container.
        name: String,
    },
    /// Keep the host converged to a manifest directory, unattended (run it as a service).
    ///
    /// Watches DIR (recursively; a burst of changes is one reconcile), re-checks the host
    /// every --resync for drift, and converges exactly as `apply` does. An invalid directory
    /// changes nothing: the agent keeps the last valid state and reports the errors until
    /// the directory is valid again. A failing resource is retried on its own, backing off,
    /// without holding up the others. `berth status` shows what the agent does; SIGHUP
    /// re-reads the host configuration and rescans; SIGTERM/SIGINT end the current step
    /// safely and exit, leaving the containers running (the next agent adopts them). One
    /// agent per state directory; `berth apply` is refused while it runs.
    Agent {
        /// The manifest directory.
        dir: PathBuf,
        /// Re-check the host this often when nothing changes (e.g. "30s", "5m").
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        resync: crate::manifest::units::Duration,
        /// Wait until the directory has been quiet this long before reconciling a change.
        #[arg(long, default_value = "100ms", value_parser = parse_duration)]
        debounce: crate::manifest::units::Duration,
        /// Allow a missing or empty directory to remove everything berth created.
        #[arg(long)]
        allow_empty: bool,
        /// Refuse a plan that destroys more than N resources (the agent then changes nothing
        /// and reports it).
        #[arg(long, default_value_t = 10, value_name = "N")]
        max_deletions: usize,
        /// Container steps run at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// How long a container waits for its `depends_on` conditions.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        wait_timeout: crate::manifest::units::Duration,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464), at /metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// A failing resource is retried after this long, doubling on each failure...
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        retry_initial: crate::manifest::units::Duration,
        /// ...up to this long.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        retry_max: crate::manifest::units::Duration,
    },
    /// What the agent on this state directory is doing: its revision, last reconcile, each
    /// resource's state, validation errors; then the containers. Without an agent, says so
    /// and shows the containers.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Internal: the per-container supervisor started by berth.
    #[command(hide = true)]
    Shim { dir: PathBuf },
}

#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// The manifest directory.
    pub dir: PathBuf,
    /// Allow a missing or empty directory (which would destroy everything berth created).
    #[arg(long)]
    pub allow_empty: bool,
    /// Refuse a plan that destroys more than N resources.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub max_deletions: usize,
    /// Print JSON instead of text: the plan (format_version 1, documented in the README); apply
    /// adds `ok` and each step's outcome.
    #[arg(long)]
    pub json: bool,
    /// Exit 0 when there are no changes, 2 when there are, 1 on error.
    #[arg(long)]
    pub detailed_exitcode: bool,
}

fn parse_duration(s: &str) -> Result<crate::manifest::units::Duration, String> {
    s.parse()
}

pub fn main() -> ExitCode {
    crate::sys::reset_sigpipe();
    crate::sys::tune_malloc();
    // private by default, in berth and in the shim (a re-exec of this binary)
    crate::sys::set_umask(crate::fsutil::UMASK);
    // `berth shim DIR` runs on every container start, started by berth itself: it needs
    // neither the argument parser (building it is a fifth of a start-up) nor the config
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(std::ffi::OsStr::new("shim"))
        && let (Some(dir), None) = (args.next(), args.next())
    {
        crate::runtime::shim::main(Path::new(&dir))
    }
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", crate::apply::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

fn init_logging(verbose: u8, format: LogFormat) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
}

pub struct Ctx {
    pub state: StateDir,
    pub config: Config,
}

fn ctx(cli: &Cli) -> Result<Ctx> {
    let (path, required) = config_path(&cli.config);
    // absolute: the runtime links layers and mounts from the container's directory, and
    // gc compares snapshot paths (a relative --state-dir broke both)
    let root = std::path::absolute(&cli.state_dir)
        .with_context(|| format!("state directory {}", cli.state_dir.display()))?;
    let state = StateDir::new(root);
    state.make_private()?;
    Ok(Ctx {
        state,
        config: Config::load(&path, required)?,
    })
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let c = ctx(&cli)?;
    let cli_config = cli.config.clone();
    match cli.command {
        Command::Validate { dir, json } => validate(&dir, json),
        Command::Plan(args) => plan_cmd(&c, &args),
        Command::Image { command } => image::run(&c, command),
        Command::Apply {
            plan,
            parallel,
            wait_timeout,
            retry,
        } => {
            for name in &retry {
                c.state.remove_rollback(name)?;
            }
            containers::apply_cmd(&c, &plan, parallel, wait_timeout.as_std())
        }
        Command::Ps { all, json } => containers::ps(&c, all, json),
        Command::Logs {
            name,
            follow,
            tail,
            since,
            timestamps,
        } => containers::logs_cmd(
            &c,
            &containers::LogsArgs {
                name,
                follow,
                tail,
                since,
                timestamps,
            },
        ),
        Command::Exec {
            interactive,
            tty,
            slot,
            name,
            command,
        } => {
            let rt = containers::runtime(&c)?;
            let rt = if slot { rt.by_slot() } else { rt };
            crate::runtime::exec::reexec_unwritable(&rt)?;
            let code = crate::runtime::exec::exec(&rt, &name, command, interactive, tty)?;
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Command::Stop { name } => containers::stop_cmd(&c, &name),
        Command::Start { name } => containers::start_cmd(&c, &name, false),
        Command::Restart { name } => containers::start_cmd(&c, &name, true),
        Command::Top { name } => containers::top_cmd(&c, &name),
        Command::Stats {
            names,
            no_stream,
            json,
        } => containers::stats_cmd(&c, &names, no_stream, json),
        Command::Inspect { name } => containers::inspect_cmd(&c, &name),
        Command::Agent {
            dir,
            resync,
            debounce,
            allow_empty,
            max_deletions,
            parallel,
            wait_timeout,
            metrics_addr,
            retry_initial,
            retry_max,
        } => {
            let (config_path, config_required) = config_path(&cli_config);
            // absolute: the agent watches it and compares paths under it
            let dir = std::path::absolute(&dir)
                .with_context(|| format!("manifest directory {}", dir.display()))?;
            crate::agent::run(
                c.state,
                c.config,
                crate::agent::Options {
                    dir,
                    resync: resync.as_std().max(std::time::Duration::from_secs(1)),
                    debounce: debounce.as_std(),
                    allow_empty,
                    max_deletions,
                    parallel,
                    wait_timeout: wait_timeout.as_std(),
                    metrics_addr,
                    config_path,
                    config_required,
                    retry_initial: retry_initial
                        .as_std()
                        .max(std::time::Duration::from_millis(100)),
                    retry_max: retry_max.as_std(),
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => status_cmd(&c, json),
        Command::Shim { dir } => crate::runtime::shim::main(&dir),
    }
}

/// The host configuration file and whether it must exist (named on the command line).
fn config_path(arg: &Option<PathBuf>) -> (PathBuf, bool) {
    match arg {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    }
}

fn status_cmd(c: &Ctx, json: bool) -> Result<ExitCode> {
    let agent = crate::agent::status::query(&c.state.root)?;
    let rows = containers::ps_rows(c, true)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"agent": agent, "containers": rows}))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    match &agent {
        None => println!(
            "no berth agent runs on {} (berth agent DIR starts one)\n",
            c.state.root.display()
        ),
        Some(a) => print!("{}", crate::agent::status::to_text(a)),
    }
    containers::print_ps(&rows);
    Ok(ExitCode::SUCCESS)
}

fn print_diagnostics(e: &LoadError) {
    match e {
        LoadError::Invalid(ds) => {
            for d in ds {
                eprintln!("{d}");
            }
            eprintln!("error: {} problem(s) found", ds.len());
        }
        other => eprintln!("error: {other}"),
    }
}

fn describe(d: &Desired) -> String {
    let images = d.images.values().filter(|i| !i.spec.implicit).count();
    let nets = d
        .networks
        .values()
        .filter(|n| !n.source.file.as_os_str().is_empty())
        .count();
    let files: std::collections::BTreeSet<_> = d
        .containers
        .values()
        .map(|c| &c.source.file)
        .chain(d.volumes.values().map(|v| &v.source.file))
        .chain(
            d.images
                .values()
                .filter(|i| !i.spec.implicit)
                .map(|i| &i.source.file),
        )
        .chain(
            d.networks
                .values()
                .map(|n| &n.source.file)
                .filter(|f| !f.as_os_str().is_empty()),
        )
        .collect();
    format!(
        "{} container(s), {} image(s), {} volume(s), {} network(s) in {} file(s)",
        d.containers.len(),
        images,
        d.volumes.len(),
        nets,
        files.len()
    )
}

fn validate(dir: &Path, json: bool) -> Result<ExitCode> {
    match manifest::load_dir(dir) {
        Ok(d) if d.declared_count() == 0 => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"valid": false, "errors": [{"message": format!("{} declares no resources", dir.display())}]})
                );
            } else {
                eprintln!("error: {} declares no resources", dir.display());
            }
            Ok(ExitCode::from(1))
        }
        Ok(d) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"valid": true, "containers": d.containers.len(), "images": d.images.len(), "volumes": d.volumes.len(), "networks": d.networks.len()})
                );
            } else {
                println!("{}: valid: {}", dir.display(), describe(&d));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json {
                let errors = match &e {
                    LoadError::Invalid(ds) => serde_json::to_value(ds)?,
                    other => serde_json::json!([{"message": other.to_string()}]),
                };
                println!("{}", serde_json::json!({"valid": false, "errors": errors}));
            } else {
                print_diagnostics(&e);
            }
            Ok(ExitCode::from(1))
        }
    }
}

/// Load the desired state with the deletion guard: a missing, unreadable or empty directory
/// is an error unless `allow_empty`. Diagnostics go to stderr, one per line.
pub fn load_desired(dir: &Path, allow_empty: bool) -> Result<Desired> {
    match crate::reconcile::load(dir, allow_empty) {
        Ok(d) => Ok(d),
        Err(e) => {
            if let crate::reconcile::ReconcileError::Invalid { diagnostics, .. } = &e {
                print_diagnostics(&LoadError::Invalid(diagnostics.clone()));
            }
            Err(e.into())
        }
    }
}

/// The host for a reconcile pass, on this process's async runtime.
pub fn host(c: &Ctx, tokio: &tokio::runtime::Runtime) -> Result<crate::reconcile::Host> {
    crate::reconcile::Host::new(c.state.clone(), c.config.clone(), tokio.handle().clone())
        .context("finding berth's own executable")
}

fn plan_cmd(c: &Ctx, args: &PlanArgs) -> Result<ExitCode> {
    let desired = load_desired(&args.dir, args.allow_empty)?;
    let tokio = image::runtime()?;
    let settings = crate::reconcile::Settings {
        max_deletions: args.max_deletions,
        parallel: 1,
        wait_timeout: std::time::Duration::ZERO,
        progress: false,
        cancel: Default::default(),
    };
    let plan = crate::reconcile::plan(&host(c, &tokio)?, &desired, &settings)?;
    if args.json {
        println!("{}", render::to_json(&plan));
    } else {
        print!("{}", render::to_text(&plan));
    }
    Ok(if args.detailed_exitcode && !plan.is_empty() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use crate::apply::error_chain;

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::from_raw_os_error(28);
        let e = crate::fsutil::PathError::new("write", std::path::Path::new("/s/x"), io);
        let e = anyhow::Error::new(e).context("pull example.com/a:1");
        assert_eq!(
            error_chain(e.as_ref()),
            "pull example.com/a:1: write /s/x: No space left on device (os error 28)"
        );
    }
}
