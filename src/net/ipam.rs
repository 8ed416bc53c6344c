//! IP address management for one network, persisted as `STATE/net/NETWORK.json`: the subnet,
//! the bridge and a lease per container. Callers hold the state directory lock, so a
//! read-modify-write is safe; writes are atomic. An address is never handed out twice and
//! is freed only when its container is removed.

use super::{NetError, Subnet};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ipam {
    pub network: String,
    pub bridge: String,
    pub subnet: Subnet,
    pub internal: bool,
    /// Container name → its address on this network.
    #[serde(default)]
    pub leases: BTreeMap<String, Ipv4Addr>,
    /// Container name → a hostname it also answers to (when it differs from the name).
    #[serde(default)]
    pub hostnames: BTreeMap<String, String>,
    /// Whether `hostnames` covers every lease: false in files written before berth kept
    /// hostnames here, whose hostnames are then taken from the container records once.
    #[serde(default)]
    pub hostnames_complete: bool,
}

impl Ipam {
    pub fn load(path: &Path) -> Result<Option<Ipam>, NetError> {
        Ok(fsutil::read_json(path)?)
    }

    /// Atomic and durable: the file also holds the network's subnet and bridge, and a
    /// half-written one after a power cut would stop every apply.
    pub fn save(&self, path: &Path) -> Result<(), NetError> {
        fsutil::write_json(path, self)?;
        Ok(())
    }

    /// Atomic only: for the leases of a wave of containers, one after the other; the caller
    /// makes the file durable with [`fsutil::sync_file`] once the wave is through.
    pub fn save_volatile(&self, path: &Path) -> Result<(), NetError> {
        fsutil::write_json_volatile(path, self)?;
        Ok(())
    }

    /// Names a container answers to on this network.
    pub fn names(&self, container: &str) -> Vec<String> {
        let mut v = vec![container.to_string()];
        if let Some(h) = self.hostnames.get(container).filter(|h| *h != container) {
            v.push(h.clone());
        }
        v
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.gateway()
    }

    /// The container's address: its existing lease, or the lowest free one.
    pub fn lease(&mut self, container: &str) -> Result<Ipv4Addr, NetError> {
        if let Some(a) = self.leases.get(container) {
            return Ok(*a);
        }
        let used: std::collections::BTreeSet<Ipv4Addr> = self.leases.values().copied().collect();
        let addr = self
            .subnet
            .hosts()
            .find(|a| !used.contains(a))
            .ok_or_else(|| NetError::Exhausted {
                network: self.network.clone(),
                subnet: self.subnet,
            })?;
        self.leases.insert(container.to_string(), addr);
        Ok(addr)
    }

    /// Give `from`'s address (and hostname) to `to`, which must hold none. Whether it did.
    pub fn rename(&mut self, from: &str, to: &str) -> bool {
        if self.leases.contains_key(to) {
            return false;
        }
        let Some(a) = self.leases.remove(from) else {
            return false;
        };
        self.leases.insert(to.to_string(), a);
        if let Some(h) = self.hostnames.remove(from) {
            self.hostnames.insert(to.to_string(), h);
        }
        true
    }

    pub fn release(&mut self, container: &str) -> bool {
        self.hostnames.remove(container);
        self.leases.remove(container).is_some()
    }
}

/// All IPAM files of a state directory, by network name.
pub fn all(dir: &Path) -> Result<BTreeMap<String, (PathBuf, Ipam)>, NetError> {
    let mut out = BTreeMap::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(fsutil::PathError::new("read directory", dir, e).into()),
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json")
            && let Some(i) = Ipam::load(&p)?
        {
            out.insert(i.network.clone(), (p, i));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(prefix: u8) -> Ipam {
        Ipam {
            network: "n".into(),
            bridge: "brthx".into(),
            subnet: Subnet::new(Ipv4Addr::new(10, 89, 0, 0), prefix),
            internal: false,
            leases: BTreeMap::new(),
            hostnames: BTreeMap::new(),
            hostnames_complete: true,
        }
    }

    #[test]
    fn leases_are_stable_unique_and_reused_after_release() {
        let mut i = ipam(24);
        let a = i.lease("a").unwrap();
        let b = i.lease("b").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 89, 0, 2));
        assert_eq!(b, Ipv4Addr::new(10, 89, 0, 3));
        assert_eq!(i.lease("a").unwrap(), a, "same container, same address");
        assert!(i.release("a"));
        assert_eq!(i.lease("c").unwrap(), a);
    }

    #[test]
    fn full_subnet_is_an_error() {
        let mut i = ipam(30); // .1 gateway, .2 the only host
        i.lease("a").unwrap();
        assert!(matches!(i.lease("b"), Err(NetError::Exhausted { .. })));
    }

    #[test]
    fn survives_a_round_trip_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("n.json");
        let mut i = ipam(24);
        i.lease("a").unwrap();
        i.save(&p).unwrap();
        assert_eq!(Ipam::load(&p).unwrap(), Some(i));
        assert_eq!(all(d.path()).unwrap().len(), 1);
    }
}
