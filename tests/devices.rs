//! The cgroup v2 device filter (an eBPF program) loaded into the real kernel, on any host: the
//! unified hierarchy runs device programs whichever controllers v1 hierarchies hold, and the
//! test mounts it where the host has not (a v1-only host). As root.

mod common;
use common::Cgroup2;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh cgroup below the test's own on the unified hierarchy (mounted for the test if the
/// host has it nowhere), removed on drop (then the mount, if the test made it).
struct V2Cgroup(PathBuf, #[allow(dead_code)] Cgroup2);

impl V2Cgroup {
    fn new() -> V2Cgroup {
        let v2 = Cgroup2::new();
        let dir = v2
            .of("self")
            .join(format!("berth-devtest-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        V2Cgroup(dir, v2)
    }

    /// Run a shell script inside the cgroup; its combined output.
    fn sh(&self, script: &str) -> String {
        let procs = self.0.join("cgroup.procs");
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {} && {script}", procs.display()))
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
}

impl Drop for V2Cgroup {
    fn drop(&mut self) {
        // the shells have exited: the cgroup is empty
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn mknod(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let st = Command::new("mknod").arg(&p).args(args).status().unwrap();
    assert!(st.success());
    p
}

#[test]
fn v2_device_program_denies_all_but_dockers_devices() {
    let cg = V2Cgroup::new();
    let nodes = tempfile::tempdir().unwrap();
    let disk = mknod(nodes.path(), "loop", &["b", "7", "0"]);
    let null = mknod(nodes.path(), "null", &["c", "1", "3"]);
    let script = format!(
        "(exec 3<{}) 2>/dev/null && echo disk-open || echo disk-denied; echo x > {} && echo null-ok",
        disk.display(),
        null.display()
    );
    // without the program, root here can open the block device: the check below means something
    assert_eq!(cg.sh(&script), "disk-open\nnull-ok\n");
    berth::runtime::devices::restrict_v2(&cg.0).expect("load and attach the device program");
    assert_eq!(cg.sh(&script), "disk-denied\nnull-ok\n");
    // making a node is still allowed (CAP_MKNOD, as docker)
    let made = cg.sh(&format!(
        "mknod {}/made b 7 1 && echo made",
        nodes.path().display()
    ));
    assert_eq!(made, "made\n");
}
