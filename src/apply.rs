//! Executing a [`Plan`]: exactly its steps, in dependency order, independent container steps
//! in parallel (bounded), reporting each step as it completes. `apply` decides nothing: the
//! plan did.

use crate::config::Config;
use crate::image::ImageError;
use crate::image::pull::Puller;
use crate::manifest::spec::{ContainerSpec, Declared, Desired, Kind, NET_HOST, NET_NONE};
use crate::manifest::units::MountSource;
use crate::net;
use crate::plan::{Action, Op, Plan, Step};
use crate::runtime::config::{
    self as rc, Limits, MountKind, MountSpec, NetMode, ProcessSpec, RuntimeConfig,
};
use crate::runtime::{Runtime, RuntimeError};
use crate::state::{ContainerRecord, StateDir, StateError, VolumeRecord};
use crate::store::{Store, StoreError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
}

/// What happened to one step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepOutcome {
    pub address: String,
    pub action: Action,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub millis: u64,
}

pub struct Executor<'a> {
    pub state: &'a StateDir,
    pub store: &'a Store,
    pub runtime: &'a Runtime,
    /// Built only when the plan pulls (building a TLS client reads every CA certificate).
    pub puller: Option<&'a Puller>,
    pub desired: &'a Desired,
    pub config: &'a Config,
    /// Container steps run at once.
    pub parallel: usize,
    /// How long a container's start waits for its `depends_on` conditions.
    pub wait_timeout: Duration,
    /// Serialises IPAM and hosts-file updates between parallel container steps, and holds
    /// the IPAM files written without fsync since the wave began (made durable after it).
    pub net_lock: std::sync::Mutex<std::collections::BTreeSet<std::path::PathBuf>>,
}

impl Executor<'_> {
    /// Run the plan. `report` is called as each step completes. A failed step does not stop
    /// the others: what depends on it (a container on its image, volume, network or a
    /// container it depends on) is skipped and reported so, everything else is carried out;
    /// the error then names every failed step.
    pub fn execute(
        &self,
        plan: &Plan,
        report: &(dyn Fn(&StepOutcome) + Sync),
    ) -> Result<Vec<StepOutcome>, ApplyError> {
        self.preflight(plan)?;
        let mut outcomes: Vec<StepOutcome> = vec![];
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let destroy_levels = self.destroy_levels(plan);
        for wave in waves(plan, self.desired, &destroy_levels) {
            let touches_containers = wave.iter().any(|s| s.kind == Kind::Container);
            let mut runnable = vec![];
            for st in wave {
                match self.blocked_by(st, &failed) {
                    Some(dep) => {
                        let o = StepOutcome {
                            address: st.address.clone(),
                            action: st.action,
                            ok: false,
                            error: Some(format!("skipped: {dep} failed")),
                            millis: 0,
                        };
                        report(&o);
                        outcomes.push(o);
                    }
                    None => runnable.push(st),
                }
            }
            let results: Vec<StepOutcome> =
                if runnable.len() > 1 && runnable.iter().all(|s| s.kind == Kind::Image) {
                    self.pull_all(&runnable, report)
                } else if runnable.len() > 1 && runnable.iter().all(|s| s.kind == Kind::Container) {
                    // stops mostly wait: destroys of independent containers go many at a time
                    let bound = if runnable.iter().all(|s| s.action == Action::Destroy) {
                        self.parallel.max(DESTROY_PARALLEL)
                    } else {
                        self.parallel
                    };
                    self.parallel_steps(&runnable, bound, report)
                } else {
                    runnable
                        .iter()
                        .map(|st| {
                            let o = self.timed(st);
                            report(&o);
                            o
                        })
                        .collect()
                };
            outcomes.extend(results);
            for o in outcomes.iter().filter(|o| !o.ok) {
                failed
                    .entry(o.address.clone())
                    .or_insert_with(|| o.error.clone().unwrap_or_default());
            }
            // the wave's leases durable; names of containers that came or went, everywhere
            if touches_containers
                && let Err(e) = self
                    .sync_leases()
                    .and_then(|()| refresh_hosts(self.state, None))
            {
                failed.insert("hosts files".into(), e.to_string());
            }
        }
        if failed.is_empty() {
            return Ok(outcomes);
        }
        let skipped = failed
            .values()
            .filter(|e| e.starts_with("skipped: "))
            .count();
        let errors: Vec<String> = failed
            .iter()
            .filter(|(_, e)| !e.starts_with("skipped: "))
            .map(|(a, e)| format!("{a}: {e}"))
            .collect();
        Err(ApplyError::Invalid(format!(
            "{}{}",
            errors.join("\n"),
            if skipped > 0 {
                format!("\n{skipped} step(s) that depend on them skipped")
            } else {
                String::new()
            }
        )))
    }

    /// For the containers the plan destroys: 0 for those no other destroyed container depends
    /// on (by their records), then one more than the highest of their dependents: a
    /// dependent goes before what it depends on, independent ones together.
    fn destroy_levels(&self, plan: &Plan) -> BTreeMap<String, usize> {
        let gone: Vec<&str> = plan
            .steps
            .iter()
            .filter(|s| s.kind == Kind::Container && s.action == Action::Destroy)
            .map(|s| s.name.as_str())
            .collect();
        let records: BTreeMap<String, ContainerRecord> =
            self.state.read_records(Kind::Container).unwrap_or_default();
        let deps = |n: &str| -> Vec<&str> {
            records.get(n).map_or_else(Vec::new, |r| {
                r.spec
                    .depends_on
                    .keys()
                    .map(String::as_str)
                    .filter(|d| gone.contains(d))
                    .collect()
            })
        };
        let mut level: BTreeMap<String, usize> = gone.iter().map(|n| (n.to_string(), 0)).collect();
        // relax: a dependency is one level after its dependents (bounded: a cycle in old
        // records stops at the number of containers)
        for _ in 0..gone.len() {
            let mut changed = false;
            for n in &gone {
                let l = level[*n];
                for d in deps(n) {
                    if level[d] < l + 1 {
                        level.insert(d.to_string(), l + 1);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        level
    }

    /// The failed step, if any, this step needs: a container's image, networks, volumes and
    /// the containers it depends on.
    fn blocked_by(&self, st: &Step, failed: &BTreeMap<String, String>) -> Option<String> {
        if failed.is_empty() || st.kind != Kind::Container || st.action == Action::Destroy {
            return None;
        }
        let c = self.desired.containers.get(&st.name)?;
        let mut needs = vec![
            format!("image.{}", c.spec.image),
            format!("image.{}", c.spec.image_ref),
        ];
        needs.extend(c.spec.networks.iter().map(|n| format!("network.{n}")));
        needs.extend(c.spec.volumes.iter().filter_map(|m| match &m.source {
            MountSource::Volume(v) => Some(format!("volume.{v}")),
            _ => None,
        }));
        needs.extend(c.spec.depends_on.keys().map(|d| format!("container.{d}")));
        needs.into_iter().find(|a| failed.contains_key(a))
    }

    fn timed(&self, st: &Step) -> StepOutcome {
        let t = Instant::now();
        let r = self.run_step(st);
        StepOutcome {
            address: st.address.clone(),
            action: st.action,
            ok: r.is_ok(),
            error: r.err().map(|e| error_chain(&e)),
            millis: t.elapsed().as_millis() as u64,
        }
    }

    fn parallel_steps(
        &self,
        wave: &[&Step],
        bound: usize,
        report: &(dyn Fn(&StepOutcome) + Sync),
    ) -> Vec<StepOutcome> {
        let mut out = vec![];
        for chunk in wave.chunks(bound.max(1)) {
            let results: Vec<StepOutcome> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|st| {
                        s.spawn(move || {
                            let o = self.timed(st);
                            report(&o);
                            o
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| StepOutcome {
                            address: "?".into(),
                            action: Action::Create,
                            ok: false,
                            error: Some("step panicked".into()),
                            millis: 0,
                        })
                    })
                    .collect()
            });
            out.extend(results);
        }
        out
    }

    /// What can be known to fail before anything is changed: a bind mount whose host path is
    /// missing, for any container the plan creates.
    fn preflight(&self, plan: &Plan) -> Result<(), ApplyError> {
        for st in plan
            .steps
            .iter()
            .filter(|s| s.ops.contains(&Op::CreateContainer))
        {
            let Some(c) = self.desired.containers.get(&st.name) else {
                continue;
            };
            if let Some(p) = missing_bind_source(&c.spec) {
                return Err(ApplyError::Invalid(format!(
                    "{}: bind mount source {} does not exist (declared in {}); nothing was changed",
                    st.address,
                    p.display(),
                    c.source
                )));
            }
        }
        Ok(())
    }

    fn pull_all(&self, wave: &[&Step], report: &(dyn Fn(&StepOutcome) + Sync)) -> Vec<StepOutcome> {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                return vec![StepOutcome {
                    address: "image".into(),
                    action: Action::Create,
                    ok: false,
                    error: Some(e.to_string()),
                    millis: 0,
                }];
            }
        };
        rt.block_on(async {
            let jobs = wave.iter().map(|st| async move {
                let t = Instant::now();
                let r = match self.image_ref(st) {
                    Ok(r) => match self.puller() {
                        Ok(p) => p.pull(&r).await.map(|_| ()).map_err(|e| error_chain(&e)),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                let o = StepOutcome {
                    address: st.address.clone(),
                    action: st.action,
                    ok: r.is_ok(),
                    error: r.err(),
                    millis: t.elapsed().as_millis() as u64,
                };
                report(&o);
                o
            });
            futures::future::join_all(jobs).await
        })
    }

    fn puller(&self) -> Result<&Puller, ApplyError> {
        self.puller
            .ok_or_else(|| ApplyError::Invalid("no registry client for this plan".into()))
    }

    fn image_ref(&self, st: &Step) -> Result<crate::registry::reference::Reference, ApplyError> {
        self.desired
            .images
            .get(&st.name)
            .map(|i| i.spec.reference.clone())
            .ok_or_else(|| ApplyError::Invalid(format!("{}: not in the manifests", st.address)))
    }

    fn run_step(&self, st: &Step) -> Result<(), ApplyError> {
        if st.kind == Kind::Container && st.ops.contains(&Op::StartContainer) {
            self.wait_for_dependencies(&st.name)?;
        }
        for op in &st.ops {
            self.run_op(st, *op).map_err(|e| {
                ApplyError::Invalid(format!("{}: {}", op_name(*op), error_chain(&e)))
            })?;
        }
        Ok(())
    }

    fn run_op(&self, st: &Step, op: Op) -> Result<(), ApplyError> {
        let name = st.name.as_str();
        match op {
            Op::PullImage => {
                let r = self.image_ref(st)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| ApplyError::Invalid(e.to_string()))?;
                rt.block_on(self.puller()?.pull(&r))?;
                crate::fault::point("after-pull");
            }
            Op::CreateVolume => {
                let v = self
                    .desired
                    .volumes
                    .get(name)
                    .ok_or_else(|| ApplyError::Invalid("not declared".into()))?;
                let data = rc::volume_data(&self.state.volumes_dir(), name);
                // docker's mode for a volume's data; the volumes directory above stays private
                crate::fsutil::create_dir_mode(&data, 0o755).map_err(StateError::Io)?;
                let rec = VolumeRecord {
                    name: name.into(),
                    source: v.source.clone(),
                    spec: v.spec.clone(),
                    created_at: crate::fsutil::now_unix(),
                };
                self.state.write_record(Kind::Volume, name, &rec)?;
                crate::fault::point("after-volume");
            }
            Op::CreateNetwork => {
                self.create_network(name)?;
                crate::fault::point("after-network");
            }
            Op::RemoveNetwork => self.remove_network(name, st.action == Action::Destroy)?,
            Op::CreateContainer => self.create_container(name)?,
            Op::StartContainer => {
                match self.runtime.start(name) {
                    // its supervisor got there first: it starts it after the backoff
                    Ok(_) | Err(crate::runtime::RuntimeError::Restarting { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                crate::fault::point("after-start");
                if let Some(mut rec) = self.record(name)?
                    && rec.stopped_by_user
                {
                    rec.stopped_by_user = false;
                    self.state.write_record(Kind::Container, name, &rec)?;
                }
            }
            Op::StopContainer => {
                let (sig, timeout) = self.stop_settings(name)?;
                self.runtime.stop(name, &sig, timeout)?;
                crate::fault::point("after-stop");
            }
            Op::RemoveContainer => {
                let (sig, timeout) = self.stop_settings(name)?;
                self.runtime.remove(name, &sig, timeout)?;
                crate::fault::point("after-remove");
                self.release_addresses(name)?;
                crate::fault::point("after-release");
                self.state.remove_record(Kind::Container, name)?;
            }
            Op::UpdateContainer => {
                let c = self
                    .desired
                    .containers
                    .get(name)
                    .ok_or_else(|| ApplyError::Invalid("not declared".into()))?;
                let mut rec = self
                    .record(name)?
                    .ok_or_else(|| ApplyError::Invalid("no record".into()))?;
                if self.runtime.exists(name) {
                    self.runtime.update_limits(name, &limits(&c.spec))?;
                    self.runtime.update_supervision(
                        name,
                        restart_policy(&c.spec),
                        backoff(&c.spec),
                        health(&c.spec),
                    )?;
                }
                rec.spec = c.spec.clone();
                rec.source = c.source.clone();
                self.state.write_record(Kind::Container, name, &rec)?;
            }
        }
        Ok(())
    }

    /// Wait until each of `name`'s dependencies meets its condition (started, healthy,
    /// completed), saying what it waits for; fail, naming the dependency and its state, when
    /// one cannot meet it any more or the wait timeout passes.
    fn wait_for_dependencies(&self, name: &str) -> Result<(), ApplyError> {
        let Some(c) = self.desired.containers.get(name) else {
            return Ok(());
        };
        let deadline = Instant::now() + self.wait_timeout;
        for (dep, cond) in &c.spec.depends_on {
            let mut said = false;
            loop {
                let status = self.runtime.status(dep)?;
                let health = crate::runtime::health::read(&self.runtime.dir(dep));
                let why = match dependency_met(*cond, &status, health.as_ref()) {
                    Ok(true) => break,
                    Ok(false) => describe_dependency(&status, health.as_ref()),
                    Err(never) => {
                        return Err(ApplyError::Invalid(format!(
                            "depends_on: {dep} cannot become {cond}: {never}"
                        )));
                    }
                };
                if Instant::now() >= deadline {
                    return Err(ApplyError::Invalid(format!(
                        "depends_on: {dep} did not become {cond} within {} ({why})",
                        crate::manifest::units::Duration(self.wait_timeout.as_millis() as u64)
                    )));
                }
                if !said {
                    eprintln!("container.{name}: waiting for {dep} to be {cond} ({why})");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    fn record(&self, name: &str) -> Result<Option<ContainerRecord>, ApplyError> {
        Ok(
            crate::fsutil::read_json(&self.state.record_path(Kind::Container, name))
                .map_err(StateError::Io)?,
        )
    }

    fn stop_settings(&self, name: &str) -> Result<(String, Duration), ApplyError> {
        let spec = match self.record(name)? {
            Some(r) => r.spec,
            None => match self.desired.containers.get(name) {
                Some(c) => c.spec.clone(),
                // neither record nor declaration (its record was removed outside berth): the
                // settings the container was started with, else docker's defaults
                None => {
                    return Ok(match self.runtime.config(name) {
                        Ok(c) => (c.stop_signal, Duration::from_millis(c.stop_timeout_ms)),
                        Err(_) => ("SIGTERM".into(), Duration::from_secs(10)),
                    });
                }
            },
        };
        Ok((spec.stop_signal.clone(), spec.stop_timeout.as_std()))
    }

    fn create_container(&self, name: &str) -> Result<(), ApplyError> {
        let c: &Declared<ContainerSpec> = self
            .desired
            .containers
            .get(name)
            .ok_or_else(|| ApplyError::Invalid("not declared".into()))?;
        let r = c.spec.image_ref.to_string();
        let img = self.store.get(&r)?;
        let net = self.attach(name, &c.spec)?;
        crate::fault::point("after-attach");
        let cfg = runtime_config(
            self.store,
            self.state,
            self.config,
            name,
            &c.spec,
            &img,
            net,
        )?;
        let rec = ContainerRecord {
            name: name.into(),
            source: c.source.clone(),
            spec: c.spec.clone(),
            image_digest: Some(img.digest().to_string()),
            created_at: crate::fsutil::now_unix(),
            stopped_by_user: false,
        };
        // the record first: a crash after it shows up as drift and is repaired
        self.state.write_record(Kind::Container, name, &rec)?;
        crate::fault::point("after-record");
        self.runtime.prepare(&cfg)?;
        crate::fault::point("after-prepare");
        if matches!(cfg.net, NetMode::Bridge { .. }) {
            // its own hosts file now; its peers' after the wave (refresh_hosts in execute)
            let _g = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
            refresh_hosts(self.state, Some(name))?;
        }
        Ok(())
    }

    fn ipam_dir(&self) -> std::path::PathBuf {
        self.state.root.join("net")
    }

    /// Bridge, addresses and rules for a network; the IPAM file keeps its leases when the
    /// network is recreated (drift repair).
    fn create_network(&self, name: &str) -> Result<(), ApplyError> {
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
                let veth = net::veth_name(&self.state.root, c, i);
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
    fn remove_network(&self, name: &str, destroy: bool) -> Result<(), ApplyError> {
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
    fn attach(
        &self,
        name: &str,
        spec: &ContainerSpec,
    ) -> Result<(NetMode, Vec<net::proxy::PortMap>), ApplyError> {
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
            let host_veth = net::veth_name(&self.state.root, name, i);
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
        let ports = spec
            .ports
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
            .collect();
        Ok((NetMode::Bridge { ifaces, gateway }, ports))
    }

    /// fsync the IPAM files this wave wrote without it.
    fn sync_leases(&self) -> Result<(), ApplyError> {
        let mut unsynced = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
        for path in std::mem::take(&mut *unsynced) {
            crate::fsutil::sync_file(&path).map_err(StateError::Io)?;
        }
        Ok(())
    }

    /// Free the container's addresses (its peers' hosts files follow after the wave).
    fn release_addresses(&self, name: &str) -> Result<(), ApplyError> {
        let _g = self.net_lock.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (path, mut ipam)) in net::ipam::all(&self.ipam_dir())? {
            if ipam.release(name) {
                ipam.save(&path)?;
            }
        }
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
    let mut released = vec![];
    for (_, (path, mut ipam)) in net::ipam::all(&state.root.join("net"))? {
        let orphans: Vec<String> = ipam
            .leases
            .keys()
            .filter(|n| !records.contains_key(*n))
            .cloned()
            .collect();
        for n in &orphans {
            ipam.release(n);
        }
        if !orphans.is_empty() {
            ipam.save(&path)?;
            released.extend(orphans);
        }
    }
    if !released.is_empty() {
        refresh_hosts(state, None)?;
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
            let e = per.entry(c.clone()).or_default();
            for (peer, addr) in &ipam.leases {
                e.insert(*addr, ipam.names(peer));
            }
        }
    }
    for (c, entries) in per {
        let dir = state.containers_dir().join(&c);
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
fn complete_hostnames(state: &StateDir, ipam: &mut net::ipam::Ipam) -> Result<(), ApplyError> {
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

/// An error and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::PullImage => "pull image",
        Op::CreateVolume => "create volume",
        Op::CreateNetwork => "create network",
        Op::RemoveNetwork => "remove network",
        Op::CreateContainer => "create container",
        Op::StartContainer => "start container",
        Op::StopContainer => "stop container",
        Op::RemoveContainer => "remove container",
        Op::UpdateContainer => "update container",
    }
}

pub fn limits(spec: &ContainerSpec) -> Limits {
    Limits {
        memory: spec.memory.map(|m| m.0),
        cpus: spec.cpus,
        pids: spec.pids,
    }
}

/// The first host path a container bind-mounts that does not exist.
fn missing_bind_source(spec: &ContainerSpec) -> Option<&std::path::Path> {
    spec.volumes.iter().find_map(|v| match &v.source {
        MountSource::Bind(p) if !p.exists() => Some(p.as_path()),
        _ => None,
    })
}

/// Compute what the shim needs for a container.
pub fn runtime_config(
    store: &Store,
    state: &StateDir,
    config: &Config,
    name: &str,
    spec: &ContainerSpec,
    img: &crate::store::StoredImage,
    (net, ports): (NetMode, Vec<net::proxy::PortMap>),
) -> Result<RuntimeConfig, ApplyError> {
    let mut layers = vec![];
    for c in img.chain_ids() {
        if !store.has_snapshot(&c) {
            return Err(ApplyError::Invalid(format!(
                "image {}: layer {c} is not unpacked; pull the image again",
                img.reference
            )));
        }
        layers.push(store.snapshot_dir(&c)?.join("fs"));
    }
    let hostname = spec
        .hostname
        .clone()
        .unwrap_or_else(|| name.chars().take(63).collect());
    // checked before the apply began too (preflight); here for a path removed meanwhile
    if let Some(p) = missing_bind_source(spec) {
        return Err(ApplyError::Invalid(format!(
            "bind mount source {} does not exist",
            p.display()
        )));
    }
    let mut mounts = vec![];
    for v in &spec.volumes {
        let kind = match &v.source {
            MountSource::Bind(p) => MountKind::Bind {
                source: p.clone(),
                read_only: v.read_only,
            },
            MountSource::Volume(n) => MountKind::Volume {
                source: rc::volume_data(&state.volumes_dir(), n),
                read_only: v.read_only,
                populate_marker: state.volumes_dir().join(n).join(".populated"),
            },
        };
        mounts.push(MountSpec {
            target: v.target.clone(),
            kind,
        });
    }
    for t in &spec.tmpfs {
        mounts.push(MountSpec {
            target: t.target.clone(),
            kind: MountKind::Tmpfs {
                size: t.size.map(|s| s.0),
                mode: t.mode,
            },
        });
    }
    let args = rc::merge_args(spec, &img.config);
    if args.is_empty() {
        return Err(ApplyError::Invalid(format!(
            "image {} has no CMD or ENTRYPOINT: set `command`",
            img.reference
        )));
    }
    Ok(RuntimeConfig {
        name: name.into(),
        layers,
        read_only: spec.read_only,
        hostname: hostname.clone(),
        net,
        ports,
        process: ProcessSpec {
            args,
            env: rc::merge_env(spec, &img.config, &hostname),
            cwd: rc::working_dir(spec, &img.config),
            user: rc::user(spec, &img.config),
            capabilities: rc::capabilities(spec),
            seccomp: spec.seccomp.is_default(),
        },
        mounts,
        limits: limits(spec),
        cgroup_parent: config.cgroup_parent.clone(),
        log_max_size: rc::LOG_MAX_SIZE,
        log_max_files: rc::LOG_MAX_FILES,
        stop_signal: spec.stop_signal.clone(),
        stop_timeout_ms: spec.stop_timeout.0,
        restart: restart_policy(spec),
        backoff: backoff(spec),
        health: health(spec),
    })
}

/// The manifest's health check as the runtime's prober runs it.
pub fn health(spec: &ContainerSpec) -> Option<crate::runtime::health::HealthConfig> {
    spec.health
        .as_ref()
        .map(|h| crate::runtime::health::HealthConfig {
            cmd: h.cmd.clone(),
            interval_ms: h.interval.0,
            timeout_ms: h.timeout.0,
            retries: h.retries,
            start_period_ms: h.start_period.0,
            restart_on_unhealthy: h.on_unhealthy == crate::manifest::spec::OnUnhealthy::Restart,
        })
}

/// Whether a dependency in `status` meets `cond` now (`Ok(true)`), may still (`Ok(false)`),
/// or cannot any more (`Err`, why).
pub fn dependency_met(
    cond: crate::manifest::spec::DependCondition,
    status: &crate::observe::ContainerStatus,
    health: Option<&crate::runtime::health::Health>,
) -> Result<bool, String> {
    use crate::manifest::spec::DependCondition as C;
    use crate::observe::ContainerStatus as S;
    use crate::runtime::health::HealthStatus as H;
    match (cond, status) {
        (C::Started, S::Running { .. } | S::Restarting { .. } | S::Exited { .. }) => Ok(true),
        (C::Healthy, S::Running { .. }) => Ok(health.is_some_and(|h| h.status == H::Healthy)),
        (C::Healthy | C::Started, S::Restarting { .. } | S::Created) => Ok(false),
        (C::Completed, S::Exited { code: Some(0), .. }) => Ok(true),
        (C::Completed, S::Running { .. } | S::Restarting { .. } | S::Created) => Ok(false),
        (_, S::Exited { code, signal, .. }) => Err(match (code, signal) {
            (Some(c), _) => format!("it exited with code {c}"),
            (_, Some(s)) => format!("it was killed by signal {s}"),
            _ => "it exited".into(),
        }),
        (_, S::StoppedByUser) => Err("it is stopped by the user".into()),
        (_, S::Lost { reason }) => Err(format!("it is lost: {reason}")),
    }
}

/// A dependency's state in a waiting message.
fn describe_dependency(
    status: &crate::observe::ContainerStatus,
    health: Option<&crate::runtime::health::Health>,
) -> String {
    use crate::observe::ContainerStatus as S;
    match (status, health) {
        (S::Running { .. }, Some(h)) => {
            let last = h.log.last().map_or(String::new(), |p| {
                format!(", last check exit {}", p.exit_code)
            });
            format!("it is running, {}{last}", h.status)
        }
        (S::Running { .. }, None) => "it is running".into(),
        (S::Restarting { restarts, .. }, _) => {
            format!("it is restarting after {restarts} restarts")
        }
        (S::Created, _) => "it is created, not started".into(),
        (s, _) => format!("{s:?}"),
    }
}

/// The manifest's restart policy as the runtime's supervisor carries it.
pub fn restart_policy(spec: &ContainerSpec) -> crate::runtime::supervise::RestartPolicy {
    use crate::manifest::units::Restart;
    use crate::runtime::supervise::RestartPolicy;
    match spec.restart {
        Restart::No => RestartPolicy::No,
        Restart::OnFailure(max) => RestartPolicy::OnFailure { max },
        Restart::Always => RestartPolicy::Always,
        Restart::UnlessStopped => RestartPolicy::UnlessStopped,
    }
}

/// The manifest's backoff (kubelet's defaults when not declared).
pub fn backoff(spec: &ContainerSpec) -> crate::runtime::supervise::Backoff {
    let b = spec.backoff.unwrap_or_default();
    crate::runtime::supervise::Backoff {
        initial_ms: b.initial.0,
        max_ms: b.max.0,
        reset_after_ms: b.reset_after.0,
    }
}

/// Destroys of independent containers run this many at a time (at least).
const DESTROY_PARALLEL: usize = 32;

/// Group the plan's steps into waves that must run one after another; steps within a wave
/// are independent. Container destroys go by reverse dependency level (dependents first,
/// independent ones together); image pulls form one wave; containers go by dependency level.
fn waves<'p>(
    plan: &'p Plan,
    desired: &Desired,
    destroy_levels: &BTreeMap<String, usize>,
) -> Vec<Vec<&'p Step>> {
    let mut level: BTreeMap<String, usize> = BTreeMap::new();
    for c in desired.containers_in_order() {
        let l = c
            .spec
            .depends_on
            .keys()
            .filter_map(|d| level.get(d))
            .max()
            .map(|m| m + 1)
            .unwrap_or(0);
        level.insert(c.name.clone(), l);
    }
    let mut keyed: Vec<((u8, usize), &Step)> = plan
        .steps
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let key = match (st.kind, st.action) {
                (Kind::Container, Action::Destroy) => {
                    (0, destroy_levels.get(&st.name).copied().unwrap_or(i))
                }
                (Kind::Image, _) => (1, 0),
                (Kind::Volume, _) => (2, i),
                (Kind::Network, Action::Destroy) => (5, i),
                (Kind::Network, _) => (3, i),
                (Kind::Container, _) => (4, level.get(&st.name).copied().unwrap_or(0)),
            };
            (key, st)
        })
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    let mut out: Vec<Vec<&Step>> = vec![];
    let mut last = None;
    for (k, st) in keyed {
        match out.last_mut() {
            Some(w) if last == Some(k) => w.push(st),
            _ => out.push(vec![st]),
        }
        last = Some(k);
    }
    out
}
