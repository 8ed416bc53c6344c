//! The bad-manifest corpus: every case under tests/fixtures/bad/ is a manifest directory with
//! an `expected` file holding the exact diagnostics `berth validate` must print, one a line.
//! Set BERTH_BLESS=1 to rewrite the expected files after reviewing a deliberate change.

use std::path::Path;
use std::process::Command;

fn berth() -> Command {
    Command::new(env!("CARGO_BIN_EXE_berth"))
}

#[test]
fn bad_manifest_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 25, "the corpus must keep at least 25 cases");
    let bless = std::env::var_os("BERTH_BLESS").is_some();
    let mut failures = vec![];
    for case in &cases {
        let out = berth()
            .arg("validate")
            .arg(".")
            .current_dir(case)
            .output()
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            !stderr.contains("panicked"),
            "{}: panicked:\n{stderr}",
            case.display()
        );
        assert_eq!(out.status.code(), Some(1), "{}: exit code", case.display());
        let got: String = stderr
            .lines()
            .filter(|l| !l.starts_with("error: "))
            .map(|l| format!("{l}\n"))
            .collect();
        let exp_path = case.join("expected");
        if bless {
            std::fs::write(&exp_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&exp_path)
            .unwrap_or_else(|_| panic!("{} has no expected file", case.display()));
        assert!(
            !expected.trim().is_empty(),
            "{}: empty expectation",
            case.display()
        );
        for line in expected.lines() {
            // every expected line names file:line:col
            let loc = line.split(": ").next().unwrap();
            assert_eq!(
                loc.matches(':').count(),
                2,
                "{}: {line} lacks file:line:col",
                case.display()
            );
        }
        if got != expected {
            failures.push(format!(
                "{}:\n--- expected\n{expected}--- got\n{got}",
                case.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn valid_examples_pass() {
    for dir in ["examples/webapp", "examples/hello", "manifests"] {
        let out = berth()
            .arg("validate")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
    }
}

#[test]
fn missing_empty_and_json() {
    let d = tempfile::tempdir().unwrap();
    // empty directory: an error
    let out = berth().arg("validate").arg(d.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("declares no resources"));
    // missing directory: an error naming it
    let missing = d.path().join("nope");
    let out = berth().arg("validate").arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    // --json lists every error with its location
    std::fs::write(
        d.path().join("a.toml"),
        "[container.x]\nimage = 1\nfoo = 2\n",
    )
    .unwrap();
    let out = berth()
        .args(["validate", "--json"])
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    let errs = v["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0]["line"], 2);
    assert_eq!(errs[1]["line"], 3);
}

#[test]
fn garbage_never_panics() {
    // a few hostile inputs: binary junk, deep nesting, huge numbers, odd unicode
    let inputs: Vec<Vec<u8>> = vec![
        vec![0xff, 0xfe, 0x00, 0x41],
        "[[container.web]]\nimage = \"x/y\"\n".into(),
        "container.web.image = \"x/y\"\ncontainer.web.memory = 99999999999999999999\n".into(),
        "[container.web]\nimage = \"x/y\"\ncpus = nan\nmemory = \"1e400\"\n".into(),
        "[container.web]\nimage = \"x/y\"\nports = [\"::::\", \"\u{202e}80:80\"]\n".into(),
        "a = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n".into(),
        "[container.web]\nimage = \"x/y\"\nstop_timeout = \"99999999999999999999h\"\nenv = { \"\" = \"x\" }\n".into(),
    ];
    for (i, input) in inputs.iter().enumerate() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.toml"), input).unwrap();
        let out = berth().arg("validate").arg(d.path()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "input {i} panicked: {stderr}");
        assert_eq!(out.status.code(), Some(1), "input {i}: {stderr}");
        assert!(
            stderr.contains("a.toml:"),
            "input {i}: no location: {stderr}"
        );
    }
}
