//! The example container's program: says hello, then one line a minute until stopped.
//! Built static (`rustc -C target-feature=+crt-static`), so the image needs nothing else.

fn main() {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    println!(
        "hello from berth: pid {} in container {}",
        std::process::id(),
        host.trim()
    );
    let mut minutes = 0u64;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
        minutes += 1;
        println!("still here after {minutes} minute(s)");
    }
}
