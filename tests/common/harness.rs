//! The test list of a target built with `harness = false` (libtest-mimic, which prints and
//! filters like `cargo test`'s own harness): a test that cannot run on this host is reported
//! `ignored`, with the reason in brackets, instead of passing without having checked anything.

use libtest_mimic::{Arguments, Failed, Trial};

/// One test: a function that panics on failure, and why it cannot run here, if it cannot.
pub struct Test {
    name: &'static str,
    f: fn(),
    cannot: Option<String>,
}

pub fn test(name: &'static str, f: fn()) -> Test {
    Test {
        name,
        f,
        cannot: None,
    }
}

impl Test {
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Skip the test, reporting `reason`, when `reason` is given (it cannot run on this host).
    pub fn unless(mut self, reason: Option<String>) -> Test {
        self.cannot = reason;
        self
    }
}

/// Run the tests the command line selects and exit with the harness's status.
pub fn run(tests: Vec<Test>) -> ! {
    let args = Arguments::from_args();
    let trials = tests
        .into_iter()
        .map(|t| {
            let (f, cannot) = (t.f, t.cannot.clone());
            // Run anyway (`--include-ignored`), a skipped test fails with its reason: it
            // cannot pass here.
            let trial = Trial::test(t.name, move || match cannot {
                Some(r) => Err(Failed::from(format!("cannot run on this host: {r}"))),
                None => {
                    f();
                    Ok(())
                }
            });
            match t.cannot {
                Some(r) => trial
                    .with_kind(format!("skipped: {r}"))
                    .with_ignored_flag(true),
                None => trial,
            }
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

/// `tests![a, b]`: [`test`]s named after the functions.
#[allow(unused_macros)]
macro_rules! tests {
    ($($f:ident),* $(,)?) => {
        vec![$($crate::common::harness::test(stringify!($f), $f)),*]
    };
}
#[allow(unused_imports)]
pub(crate) use tests;
