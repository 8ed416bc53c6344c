//! Bridge networking: Linux bridges and veth pairs over rtnetlink, IPAM persisted in the
//! state directory, masquerading and isolation through nftables (rustables, over netlink),
//! managed /etc/hosts for name resolution, and the port proxy the shim runs for published
//! ports. Knows nothing about manifests: callers hand it names, subnets and addresses.

pub mod hosts;
pub mod ipam;
pub mod link;
pub mod nat;
pub mod proxy;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{step} {what}: {message}")]
    Netlink {
        step: &'static str,
        what: String,
        message: String,
    },
    #[error("nftables {step} for {bridge}: {message}")]
    Nft {
        step: &'static str,
        bridge: String,
        message: String,
    },
    #[error(transparent)]
    Io(#[from] crate::fsutil::PathError),
    #[error(
        "no free /24 left for network {0:?} in 10.89.0.0/16 – 10.99.0.0/16: declare a `subnet`"
    )]
    NoSubnet(String),
    #[error("network {network:?}: subnet {subnet} is full")]
    Exhausted { network: String, subnet: Subnet },
    #[error(
        "network {network:?}: subnet {subnet} overlaps {other} (a route or address on this host, or another network)"
    )]
    Overlap {
        network: String,
        subnet: Subnet,
        other: Subnet,
    },
}

pub(crate) fn nl(step: &'static str, what: impl fmt::Display, e: impl fmt::Display) -> NetError {
    NetError::Netlink {
        step,
        what: what.to_string(),
        message: e.to_string(),
    }
}

/// An IPv4 network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Subnet {
        let s = Subnet { addr, prefix };
        Subnet {
            addr: Ipv4Addr::from(s.network()),
            prefix,
        }
    }
    pub fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix.min(32))
        }
    }
    pub fn network(self) -> u32 {
        u32::from(self.addr) & self.mask()
    }
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.network()
    }
    pub fn overlaps(self, o: Subnet) -> bool {
        let p = self.prefix.min(o.prefix);
        let m = if p == 0 { 0 } else { u32::MAX << (32 - p) };
        u32::from(self.addr) & m == u32::from(o.addr) & m
    }
    /// The first host address: berth puts the gateway (the bridge's address) there.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(self.network() + 1)
    }
    /// Usable host addresses after the gateway, in order.
    pub fn hosts(self) -> impl Iterator<Item = Ipv4Addr> {
        let size = 1u64 << (32 - self.prefix.min(32) as u64);
        let base = self.network() as u64;
        (2..size.saturating_sub(1)).map(move |i| Ipv4Addr::from((base + i) as u32))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Prefix of every bridge berth creates (used by the isolation rules).
pub const BRIDGE_PREFIX: &str = "brth";

/// The bridge for `network` in the state directory `state_root`: `brth` + 10 hex digits, so
/// two state directories never collide and the name fits in 15 characters.
pub fn bridge_name(state_root: &Path, network: &str) -> String {
    let root = crate::fsutil::canonical(state_root);
    format!(
        "{BRIDGE_PREFIX}{}",
        crate::fsutil::short_hash(&[root.as_os_str().as_encoded_bytes(), network.as_bytes()])
    )
}

/// The host side of a container's veth on its `index`th network: `bv` + 10 hex digits.
pub fn veth_name(state_root: &Path, container: &str, index: usize) -> String {
    let root = crate::fsutil::canonical(state_root);
    format!(
        "bv{}",
        crate::fsutil::short_hash(&[
            root.as_os_str().as_encoded_bytes(),
            container.as_bytes(),
            index.to_string().as_bytes()
        ])
    )
}

/// Host IPv4 networks in use: every route's destination (connected subnets included) from
/// /proc/net/route.
pub fn host_routes() -> Vec<Subnet> {
    let Ok(t) = std::fs::read_to_string("/proc/net/route") else {
        return vec![];
    };
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // little-endian hex of network-order bytes
            let dest = Ipv4Addr::from(dest.to_le_bytes());
            let mask = u32::from_be_bytes(mask.to_le_bytes());
            if mask == 0 {
                return None; // the default route overlaps everything; ignore it
            }
            Some(Subnet::new(dest, mask.count_ones() as u8))
        })
        .collect()
}

/// Choose a free /24 from 10.89.0.0/16 – 10.99.0.0/16 that overlaps none of `taken`.
pub fn choose_subnet(network: &str, taken: &[Subnet]) -> Result<Subnet, NetError> {
    for b in 89u8..=99 {
        for c in 0u8..=255 {
            let s = Subnet::new(Ipv4Addr::new(10, b, c, 0), 24);
            if !taken.iter().any(|t| t.overlaps(s)) {
                return Ok(s);
            }
        }
    }
    Err(NetError::NoSubnet(network.into()))
}

/// Where berth keeps a network's IPAM file.
pub fn ipam_path(state_root: &Path, network: &str) -> PathBuf {
    state_root.join("net").join(format!("{network}.json"))
}

/// Turn on IPv4 forwarding (needed for masqueraded networks to reach outside).
pub fn enable_forwarding() -> Result<(), NetError> {
    let p = Path::new("/proc/sys/net/ipv4/ip_forward");
    if std::fs::read_to_string(p)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(p, "1").map_err(crate::fsutil::at("write", p))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_math() {
        let s = Subnet::new(Ipv4Addr::new(10, 89, 3, 77), 24);
        assert_eq!(s.to_string(), "10.89.3.0/24");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 89, 3, 1));
        let h: Vec<_> = s.hosts().collect();
        assert_eq!(h.first(), Some(&Ipv4Addr::new(10, 89, 3, 2)));
        assert_eq!(h.last(), Some(&Ipv4Addr::new(10, 89, 3, 254)));
        assert!(s.overlaps(Subnet::new(Ipv4Addr::new(10, 0, 0, 0), 8)));
        assert!(!s.overlaps(Subnet::new(Ipv4Addr::new(10, 89, 4, 0), 24)));
    }

    #[test]
    fn choose_skips_taken() {
        let taken = [
            Subnet::new(Ipv4Addr::new(10, 89, 0, 0), 24),
            Subnet::new(Ipv4Addr::new(10, 89, 1, 0), 25),
        ];
        assert_eq!(
            choose_subnet("n", &taken).unwrap().to_string(),
            "10.89.2.0/24"
        );
        let all = [Subnet::new(Ipv4Addr::new(10, 0, 0, 0), 8)];
        assert!(matches!(
            choose_subnet("n", &all),
            Err(NetError::NoSubnet(_))
        ));
    }

    #[test]
    fn names_fit_and_differ_by_state_dir() {
        let a = bridge_name(Path::new("/var/lib/berth"), "default");
        let b = bridge_name(Path::new("/tmp/other"), "default");
        assert!(a.len() <= 15 && a.starts_with(BRIDGE_PREFIX), "{a}");
        assert_ne!(a, b);
        let v = veth_name(Path::new("/var/lib/berth"), "web", 0);
        assert!(v.len() <= 15);
        assert_ne!(v, veth_name(Path::new("/var/lib/berth"), "web", 1));
    }
}
