//! Link the `berth` binary as a position-dependent executable unless `BERTH_PIE` is set.
//!
//! berth starts two processes of its own per container start (the CLI and the shim). As a
//! PIE, each start-up has the dynamic loader apply ~30,000 relative relocations, writing
//! every page of `.data.rel.ro` (~130 copy-on-write faults): about a third of the binary's
//! start-up time. Linked at a fixed address, the loader has nothing to relocate. The cost is
//! ASLR for the binary's own image (libraries, heap, stacks and mmaps stay randomised): a
//! hardening measure, not a safety one, for a program in safe Rust but for `src/sys.rs`. runc
//! and Debian's packages build PIE; builds that must, set `BERTH_PIE=1`.

fn main() {
    println!("cargo:rerun-if-env-changed=BERTH_PIE");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("BERTH_PIE").is_none() {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
