//! Name resolution: each container on a bridge network gets a managed /etc/hosts listing
//! every container it shares a network with (by name and hostname), rewritten in place (the
//! file is bind-mounted, so its inode must stay) as containers come and go.
//! /etc/resolv.conf carries the host's resolvers, minus loopback ones, which a container's
//! namespace cannot reach.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

/// The hosts file for one container: localhost lines, then `addr name [hostname]` for each
/// peer (itself included), sorted by address.
pub fn render(entries: &BTreeMap<Ipv4Addr, Vec<String>>) -> String {
    let mut s = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n# managed by berth: containers on the same networks\n",
    );
    for (a, names) in entries {
        s.push_str(&format!("{a}\t{}\n", names.join(" ")));
    }
    s
}

/// Replace the file's contents without replacing the file (a bind mount pins the inode).
/// Does nothing when the contents are already right.
pub fn write_in_place(path: &Path, contents: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|c| c == contents) {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    // read by the container's users through a bind mount; berth's umask would make it 0600
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.write_all(contents.as_bytes())
}

/// resolv.conf for a container in its own network namespace: the host's, without
/// nameservers on loopback; Google's public resolvers if none are left (as docker does).
pub fn resolv_conf(host: &str) -> String {
    let mut out = String::new();
    let mut servers = 0;
    for l in host.lines() {
        let t = l.trim();
        if let Some(ns) = t.strip_prefix("nameserver") {
            let ns = ns.trim();
            let lo = ns
                .parse::<std::net::IpAddr>()
                .map(|a| a.is_loopback())
                .unwrap_or(false);
            if lo {
                continue;
            }
            servers += 1;
        }
        out.push_str(l);
        out.push('\n');
    }
    if servers == 0 {
        out.push_str("nameserver 8.8.8.8\nnameserver 8.8.4.4\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_peers_by_address() {
        let mut m = BTreeMap::new();
        m.insert(Ipv4Addr::new(10, 89, 0, 3), vec!["db".to_string()]);
        m.insert(
            Ipv4Addr::new(10, 89, 0, 2),
            vec!["web".to_string(), "www".to_string()],
        );
        let s = render(&m);
        assert!(s.ends_with("10.89.0.2\tweb www\n10.89.0.3\tdb\n"), "{s}");
    }

    #[test]
    fn loopback_resolvers_are_dropped() {
        let r = resolv_conf("search x\nnameserver 127.0.0.53\nnameserver 192.0.2.1\n");
        assert_eq!(r, "search x\nnameserver 192.0.2.1\n");
        let r = resolv_conf("nameserver 127.0.0.53\n");
        assert!(r.contains("8.8.8.8"));
    }

    #[test]
    fn in_place_keeps_the_inode() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts");
        write_in_place(&p, "a\n").unwrap();
        let ino = std::fs::metadata(&p).unwrap().ino();
        write_in_place(&p, "bb\n").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "bb\n");
    }
}
