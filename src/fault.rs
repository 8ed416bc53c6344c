//! Fault injection for the crash-safety tests: with `BERTH_FAULT=NAME` in the environment,
//! berth kills itself with SIGKILL when it reaches the point of that name, as a power cut or
//! an OOM kill would stop it there. Without the variable a point costs one environment
//! lookup. The points are listed in [`POINTS`]; the test kills an apply at each of them.

/// Every fault point, in the order an apply that creates everything meets them.
pub const POINTS: &[&str] = &[
    "after-pull",
    "after-volume",
    "after-network",
    "after-attach",
    "after-record",
    "after-prepare",
    "after-start",
    "after-stop",
    "after-remove",
    "after-release",
];

/// The points of a start-first replacement, in order (killed at each, the next apply
/// finishes or undoes it without refusing a connection: `networks::start_first…`).
pub const START_FIRST_POINTS: &[&str] = &[
    "after-start-next",
    "after-switch",
    "after-hand-over",
    "after-release-ports",
];

/// Die here if `BERTH_FAULT` names this point.
pub fn point(name: &str) {
    if std::env::var_os("BERTH_FAULT").is_some_and(|v| v == name) {
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}
