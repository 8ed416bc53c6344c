//! What a container's supervisor (its shim) does when the container exits: start it again
//! or not, by its restart policy, and when: exponential backoff with jitter between restarts
//! (kubelet's defaults: 10 s doubling to 5 min, reset after 10 min running). Pure decisions,
//! so that the timing is tested without a clock.

use super::state::ExitRecord;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Docker's restart policies, as the runtime carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    No,
    /// Restart after a failure (a non-zero exit, a signal, a failed start), at most `max`
    /// times if given.
    OnFailure {
        max: Option<u32>,
    },
    Always,
    /// As `always` for the supervisor; a container stopped by hand stays stopped.
    UnlessStopped,
}

/// Delays between restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    /// A run at least this long resets the delay to `initial_ms`.
    pub reset_after_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_ms: 10_000,
            max_ms: 300_000,
            reset_after_ms: 600_000,
        }
    }
}

impl Backoff {
    /// The delay before the restart that follows `failures` consecutive short runs (0 for the
    /// first), `jitter` in [0, 1) taking up to a fifth off: `initial`, doubling, at most `max`.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let base = self
            .initial_ms
            .saturating_mul(1u64 << failures.min(32))
            .min(self.max_ms);
        let jitter = jitter.clamp(0.0, 1.0);
        Duration::from_millis(base - (base as f64 * 0.2 * jitter) as u64)
    }

    /// The consecutive-failure count after a run of `ran_ms`: reset by a long run, else one
    /// more.
    pub fn next_failures(&self, failures: u32, ran_ms: u64) -> u32 {
        if ran_ms >= self.reset_after_ms {
            0
        } else {
            failures.saturating_add(1)
        }
    }
}

/// Whether an exit calls for a restart under `policy`, `restarts` having been made already.
pub fn should_restart(policy: RestartPolicy, exit: &ExitRecord, restarts: u32) -> bool {
    match policy {
        RestartPolicy::No => false,
        RestartPolicy::Always | RestartPolicy::UnlessStopped => true,
        RestartPolicy::OnFailure { max } => {
            exit.code != Some(0) && max.is_none_or(|m| restarts < m)
        }
    }
}

/// A jitter value in [0, 1) from the clock's nanoseconds (not for anything but spreading
/// restarts).
pub fn clock_jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: Option<i32>) -> ExitRecord {
        ExitRecord {
            code,
            signal: code.is_none().then_some(9),
            oom: false,
            started_at: 0,
            finished_at: 0,
            error: None,
            restart_at_ms: None,
        }
    }

    #[test]
    fn policies_follow_docker() {
        let on_failure = |max| RestartPolicy::OnFailure { max };
        assert!(!should_restart(RestartPolicy::No, &exit(Some(1)), 0));
        assert!(should_restart(RestartPolicy::Always, &exit(Some(0)), 99));
        assert!(should_restart(
            RestartPolicy::UnlessStopped,
            &exit(Some(0)),
            99
        ));
        assert!(!should_restart(on_failure(None), &exit(Some(0)), 0));
        assert!(should_restart(on_failure(None), &exit(Some(2)), 1000));
        assert!(should_restart(on_failure(None), &exit(None), 0), "killed");
        assert!(should_restart(on_failure(Some(2)), &exit(Some(1)), 1));
        assert!(!should_restart(on_failure(Some(2)), &exit(Some(1)), 2));
    }

    #[test]
    fn delays_double_to_the_cap_and_reset_after_a_long_run() {
        let b = Backoff::default();
        let secs = |f: u32| b.delay(f, 0.0).as_secs();
        assert_eq!(
            (0..7).map(secs).collect::<Vec<_>>(),
            [10, 20, 40, 80, 160, 300, 300]
        );
        assert_eq!(b.delay(1000, 0.0), Duration::from_secs(300), "no overflow");
        // jitter takes at most a fifth off, never adds
        assert_eq!(b.delay(0, 0.999).as_millis(), 8002);
        assert!((0..10).all(|i| b.delay(i, 0.5) <= b.delay(i, 0.0)));
        // a crash loop counts up; ten minutes running resets
        let mut f = 0;
        for _ in 0..3 {
            f = b.next_failures(f, 1_000);
        }
        assert_eq!(f, 3);
        assert_eq!(b.next_failures(f, 600_000), 0);
        let custom = Backoff {
            initial_ms: 100,
            max_ms: 250,
            reset_after_ms: 1_000,
        };
        assert_eq!(custom.delay(0, 0.0).as_millis(), 100);
        assert_eq!(custom.delay(1, 0.0).as_millis(), 200);
        assert_eq!(custom.delay(2, 0.0).as_millis(), 250);
    }
}
