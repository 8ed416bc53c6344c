//! Network provisioning for an apply: bridges, addresses and rules for a network; a
//! container's addresses (leased under the executor's network lock, made durable once per
//! wave); /etc/hosts of every container on a network; and the release of leases no container
//! holds (what a killed apply leaves).

use super::{ApplyError, Executor};
use crate::manifest::spec::{ContainerSpec, Kind, NET_HOST, NET_NONE};
use crate::net;
use crate::runtime::config::{self as rc, NetMode};
use crate::state::{ContainerRecord, StateDir, StateError};
use std::collections::BTreeMap;

/// The lease of a container started beside its predecessor of the same name (`web@next`:
/// no resource name has an `@`), until the name passes to it.
pub(super) fn next_key(name: &str) -> String {
    format!("{name}@{}", crate::runtime::NEXT)
}

/// The lease of a container whose name passed to its successor, until it is removed.
pub(super) fn prev_key(name: &str) -> String {
    format!("{name}@{}", crate::runtime::PREV)
}

/// The published ports of a container of `spec`, as its shim's proxy takes them.
pub(super) fn port_maps(spec: &ContainerSpec) -> Vec<net::proxy::PortMap> {
    spec.ports
        .iter()
        .map(|p| net::proxy::PortMap {
            host_ip: p.host_ip,
            host_port: p.host_port,
            container_port: p.container_port,
            proto: match p.proto {
                crate::manifest::units::Proto::Tcp => net::proxy::Proto::Tcp,
                crate::manifest::units::Proto::Udp => net::proxy::Proto::Udp,
            },
        })
        .collect()
}

/// The directory of the container holding lease `key` (see [`next_key`], [`prev_key`]).
fn lease_dir(state: &StateDir, key: &str) -> std::path::PathBuf {
    let containers = state.containers_dir();
    match key.split_once('@') {
        Some((name, area)) => containers.join(format!(".{area}")).join(name),
        None => containers.join(key),
    }
}

impl Executor<'_> {
    pub(super) fn ipam_dir(&self) -> std::path::PathBuf {
        self.state.root.join("net")
    }

    /// Bridge, addresses and rules for a network; the IPAM file keeps its leases when the
    /// network is recreated (drift repair).
    pub(super) fn create_network(&self, name: &str) -> Result<(), ApplyError> {
        let n = self
            .desired
            .networks
            .get(name)
            .ok_or_else(|| ApplyError::Invalid("not declared".into()))?;
        let _g = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = net::ipam_path(&self.state.root, name);
        let bridge = net::bridge_name(&self.state.root, name);
        let others: Vec<net::Subnet> = net::ipam::all(&self.ipam_dir())?
            .into_values()
            .filter(|(_, i)| i.network != name)
            .map(|(_, i)| i.subnet)
            .collect();
        let mut taken: Vec<net::Subnet> = net::host_routes();
        let existing = net::ipam::Ipam::load(&path)?;
        if let Some(e) = &existing {
            // our own bridge's route, if the bridge survived
            taken.retain(|r| *r != e.subnet);
        }
        taken.extend(others.iter().copied());
        let subnet = match (n.spec.subnet, &existing) {
            (Some(c), _) => {
                let s = net::Subnet::new(c.addr, c.prefix);
                if let Some(o) = taken.iter().find(|t| t.overlaps(s)) {
                    return Err(net::NetError::Overlap {
                        network: name.into(),
                        subnet: s,
                        other: *o,
                    }
                    .into());
                }
                s
            }
            (None, Some(e)) => e.subnet,
            (None, None) => net::choose_subnet(name, &taken)?,
        };
        let mut ipam = existing.unwrap_or(net::ipam::Ipam {
            network: name.into(),
            bridge: bridge.clone(),
            subnet,
            internal: n.spec.internal,
            leases: BTreeMap::new(),
            hostnames: BTreeMap::new(),
            hostnames_complete: true,
        });
        complete_hostnames(self.state, &mut ipam)?;
        ipam.subnet = subnet;
        ipam.internal = n.spec.internal;
        ipam.bridge = bridge.clone();
        net::link::ensure_bridge(&bridge, subnet.gateway(), subnet.prefix)?;
        // after a bridge was recreated: put the running containers' veths back on it
        let records: BTreeMap<String, ContainerRecord> =
            self.state.read_records(Kind::Container)?;
        for (c, r) in &records {
            if let Some(i) = r.spec.networks.iter().position(|x| x == name) {
                // as its config names it (a container started beside a predecessor has veths
                // of its own), else as berth names them
                let veth = match self.runtime.config(c).map(|c| c.net) {
                    Ok(NetMode::Bridge { ifaces, .. }) => ifaces
                        .into_iter()
                        .find(|f| f.network == *name)
                        .map(|f| f.host_veth),
                    _ => None,
                }
                .unwrap_or_else(|| net::veth_name(&self.state.root, c, i));
                if net::link::exists(&veth) {
                    net::link::attach(&veth, &bridge)?;
                }
            }
        }
        net::nat::install(&bridge, subnet, n.spec.internal)?;
        if !n.spec.internal {
            net::enable_forwarding()?;
        }
        ipam.save(&path)?;
        let mut spec = n.spec.clone();
        spec.subnet = Some(crate::manifest::units::Cidr {
            addr: subnet.addr,
            prefix: subnet.prefix,
        });
        let rec = crate::state::NetworkRecord {
            name: name.into(),
            source: n.source.clone(),
            spec,
            created_at: crate::fsutil::now_unix(),
        };
        self.state.write_record(Kind::Network, name, &rec)?;
        Ok(())
    }

    /// Rules, bridge, IPAM file and record. When the network is destroyed (not replaced),
    /// refuses while a container still holds an address.
    pub(super) fn remove_network(&self, name: &str, destroy: bool) -> Result<(), ApplyError> {
        let _g = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = net::ipam_path(&self.state.root, name);
        let bridge = match net::ipam::Ipam::load(&path)? {
            Some(i) => {
                let attached: Vec<&String> = i
                    .leases
                    .keys()
                    .filter(|c| self.state.record_path(Kind::Container, c).exists())
                    .collect();
                if destroy && !attached.is_empty() {
                    return Err(ApplyError::Invalid(format!(
                        "containers {attached:?} are still attached"
                    )));
                }
                i.bridge
            }
            None => net::bridge_name(&self.state.root, name),
        };
        net::nat::remove(&bridge)?;
        net::link::delete(&bridge)?;
        if path.exists() {
            std::fs::remove_file(&path)
                .map_err(|e| StateError::Io(crate::fsutil::PathError::new("remove", &path, e)))?;
        }
        self.state.remove_record(Kind::Network, name)?;
        Ok(())
    }

    /// The container's network mode and published ports; leases its addresses.
    pub(super) fn attach(
        &self,
        name: &str,
        spec: &ContainerSpec,
    ) -> Result<(NetMode, Vec<net::proxy::PortMap>), ApplyError> {
        self.attach_as(name, name, spec)
    }

    /// [`Executor::attach`] for a container whose leases are under `key` and whose veths
    /// are named after `veth_key` (a container started beside its predecessor).
    pub(super) fn attach_as(
        &self,
        key: &str,
        veth_key: &str,
        spec: &ContainerSpec,
    ) -> Result<(NetMode, Vec<net::proxy::PortMap>), ApplyError> {
        let name = key;
        match spec.networks.as_slice() {
            [n] if n == NET_HOST => return Ok((NetMode::Host, vec![])),
            [n] if n == NET_NONE => return Ok((NetMode::None, vec![])),
            _ => {}
        }
        let mut unsynced = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut ifaces = vec![];
        for (i, n) in spec.networks.iter().enumerate() {
            let path = net::ipam_path(&self.state.root, n);
            let mut ipam = net::ipam::Ipam::load(&path)?.ok_or_else(|| {
                ApplyError::Invalid(format!("network {n:?} has not been created"))
            })?;
            complete_hostnames(self.state, &mut ipam)?;
            let addr = ipam.lease(name)?;
            match spec.hostname.as_deref() {
                Some(h) if h != name => ipam.hostnames.insert(name.into(), h.into()),
                _ => ipam.hostnames.remove(name),
            };
            // durable after the wave (sync_leases): one fsync per network, not per container
            ipam.save_volatile(&path)?;
            unsynced.insert(path.clone());
            let host_veth = net::veth_name(&self.state.root, veth_key, i);
            ifaces.push(rc::BridgeIface {
                network: n.clone(),
                bridge: ipam.bridge.clone(),
                peer: format!("bp{}", &host_veth[2..]),
                host_veth,
                name: format!("eth{i}"),
                addr,
                prefix: ipam.subnet.prefix,
            });
        }
        let gateway = match ifaces.first() {
            Some(f) => net::Subnet::new(f.addr, f.prefix).gateway(),
            None => return Err(ApplyError::Invalid("no network".into())),
        };
        Ok((NetMode::Bridge { ifaces, gateway }, port_maps(spec)))
    }

    /// fsync the IPAM files this wave wrote without it.
    pub(super) fn sync_leases(&self) -> Result<(), ApplyError> {
        let mut unsynced = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
        for path in std::mem::take(&mut *unsynced) {
            crate::fsutil::sync_file(&path).map_err(StateError::Io)?;
        }
        Ok(())
    }

    /// Pass the name `name`'s addresses from the container that has them to the one started
    /// beside it (`name@next` → `name`; `name` → `name@prev` until that one is removed), in
    /// every network's IPAM file, durably. Done again, it changes nothing.
    /// The caller holds the network lock.
    pub(super) fn hand_over_leases(&self, name: &str) -> Result<(), ApplyError> {
        let (next, prev) = (next_key(name), prev_key(name));
        let all = net::ipam::all(&self.ipam_dir())?;
        if !all.values().any(|(_, i)| i.leases.contains_key(&next)) {
            // done already (or nothing to do)
            return Ok(());
        }
        for (network, (path, mut ipam)) in all {
            let has = |i: &net::ipam::Ipam, k: &str| i.leases.contains_key(k);
            if has(&ipam, &next) {
                if has(&ipam, name) && !ipam.rename(name, &prev) {
                    return Err(ApplyError::Invalid(format!(
                        "network {network}: {prev} still holds an address (a container being retired)"
                    )));
                }
                ipam.rename(&next, name);
            } else if has(&ipam, name) && !has(&ipam, &prev) {
                // a network the new container left: the old one's address goes with it
                ipam.rename(name, &prev);
            } else {
                continue;
            }
            ipam.save(&path)?;
        }
        Ok(())
    }

    /// Free the container's addresses (its peers' hosts files follow after the wave).
    pub(super) fn release_addresses(&self, name: &str) -> Result<(), ApplyError> {
        let _g = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
        release_leases(&self.ipam_dir(), |n| n != name)?;
        Ok(())
    }
}

/// Release the leases of containers berth has no record of: left by a berth killed between
/// leasing an address and writing the container's record, or between removing a container
/// and releasing its address. Run by `apply` (under the state directory's lock) before it
/// plans, so that no name stays in peers' /etc/hosts and no address is held for good.
/// Returns the names released.
pub fn release_orphan_leases(state: &StateDir) -> Result<Vec<String>, ApplyError> {
    let records: BTreeMap<String, ContainerRecord> = state.read_records(Kind::Container)?;
    let released = release_leases(&state.root.join("net"), |n| {
        records.contains_key(n)
            || crate::build::lease_in_use(&state.root, n)
            // a container beside its predecessor (one an interrupted apply left is removed
            // by the next, see Executor::resume_hand_overs)
            || (n.contains('@') && lease_dir(state, n).exists())
    })?;
    if !released.is_empty() {
        refresh_hosts(state, None)?;
    }
    Ok(released)
}

/// Release, in every network's IPAM file under `net_dir`, the leases of the containers
/// `keep` does not keep; the names released (once per network).
fn release_leases(
    net_dir: &std::path::Path,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<String>, ApplyError> {
    let mut released = vec![];
    for (_, (path, mut ipam)) in net::ipam::all(net_dir)? {
        let gone: Vec<String> = ipam.leases.keys().filter(|n| !keep(n)).cloned().collect();
        for n in &gone {
            ipam.release(n);
        }
        if !gone.is_empty() {
            ipam.save(&path)?;
            released.extend(gone);
        }
    }
    Ok(released)
}

/// Rewrite, in place, the /etc/hosts of every container on a bridge network (or only of
/// `only`) so it lists every container it shares a network with, by name and hostname.
pub fn refresh_hosts(state: &StateDir, only: Option<&str>) -> Result<(), ApplyError> {
    let mut ipams = net::ipam::all(&state.root.join("net"))?;
    for (_, ipam) in ipams.values_mut() {
        complete_hostnames(state, ipam)?;
    }
    let mut per: BTreeMap<String, BTreeMap<std::net::Ipv4Addr, Vec<String>>> = BTreeMap::new();
    for (_, ipam) in ipams.values() {
        for c in ipam.leases.keys() {
            if only.is_some_and(|o| o != c) {
                continue;
            }
            // a container beside its predecessor is known to its peers only once the name
            // passes to it; it knows itself by the name it will have
            let own = c.split_once('@').map(|(n, _)| n);
            let e = per.entry(c.clone()).or_default();
            for (peer, addr) in &ipam.leases {
                if peer == c
                    && let Some(n) = own
                {
                    let mut names = ipam.names(peer);
                    names[0] = n.to_string();
                    e.insert(*addr, names);
                } else if !peer.contains('@') && Some(peer.as_str()) != own {
                    e.insert(*addr, ipam.names(peer));
                }
            }
        }
    }
    for (c, entries) in per {
        let dir = lease_dir(state, &c);
        if !dir.exists() {
            continue;
        }
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc)
            .map_err(|e| StateError::Io(crate::fsutil::PathError::new("create", &etc, e)))?;
        let p = etc.join("hosts");
        net::hosts::write_in_place(&p, &net::hosts::render(&entries))
            .map_err(|e| StateError::Io(crate::fsutil::PathError::new("write", &p, e)))?;
    }
    Ok(())
}

/// IPAM files written before berth kept hostnames in them: take the hostnames of their
/// leases from the container records (in memory; the next save keeps them).
pub(super) fn complete_hostnames(
    state: &StateDir,
    ipam: &mut net::ipam::Ipam,
) -> Result<(), ApplyError> {
    if ipam.hostnames_complete {
        return Ok(());
    }
    let records: BTreeMap<String, ContainerRecord> = state.read_records(Kind::Container)?;
    for c in ipam.leases.keys() {
        if let Some(h) = records
            .get(c)
            .and_then(|r| r.spec.hostname.clone())
            .filter(|h| h != c)
        {
            ipam.hostnames.insert(c.clone(), h);
        }
    }
    ipam.hostnames_complete = true;
    Ok(())
}
