//! Links, addresses and routes through rtnetlink. Callers are synchronous: apply's steps run
//! on threads of their own, the shim and the container's first process must stay
//! single-threaded. A process with an async runtime (apply, the agent) registers it with
//! [`use_runtime`] and every call runs on it; otherwise (the shim) each call runs on a
//! current-thread runtime of its own.

use super::{NetError, nl};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};

static RUNTIME: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();

/// Run netlink calls on this runtime from now on (from threads outside it: the calls block).
pub fn use_runtime(h: tokio::runtime::Handle) {
    let _ = RUNTIME.set(h);
}

fn block_on<T>(
    what: &str,
    f: impl AsyncFnOnce(Handle) -> Result<T, NetError>,
) -> Result<T, NetError> {
    let call = async {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| nl("open a netlink socket for", what, e))?;
        let task = tokio::spawn(conn);
        let r = f(handle).await;
        task.abort();
        r
    };
    if let Some(h) = RUNTIME.get() {
        return h.block_on(call);
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| nl("start a runtime for", what, e))?
        .block_on(call)
}

async fn index(h: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such link
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl("look up link", name, e)),
    }
}

async fn must_index(h: &Handle, name: &str) -> Result<u32, NetError> {
    index(h, name)
        .await?
        .ok_or_else(|| nl("look up link", name, "no such interface"))
}

async fn step(
    step: &'static str,
    what: &str,
    f: impl Future<Output = Result<(), rtnetlink::Error>>,
) -> Result<(), NetError> {
    f.await.map_err(|e| nl(step, what, e))
}

/// Whether an interface of this name exists in the host's namespace.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Create the bridge `name` with `gateway/prefix` on it, up. Idempotent.
pub fn ensure_bridge(name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    block_on(name, async |h| {
        let idx = match index(&h, name).await? {
            Some(i) => i,
            None => {
                step(
                    "create bridge",
                    name,
                    h.link().add(LinkBridge::new(name).build()).execute(),
                )
                .await?;
                must_index(&h, name).await?
            }
        };
        step(
            "add address to",
            name,
            h.address()
                .add(idx, IpAddr::V4(gateway), prefix)
                .replace()
                .execute(),
        )
        .await?;
        pin_mac(&h, name, idx, gateway).await?;
        step(
            "bring up",
            name,
            h.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute(),
        )
        .await
    })
}

/// Fix `bridge`'s MAC (see [`pin_mac`]) if it is not yet: bridges made before berth did so.
pub fn pin_bridge_mac(bridge: &str, gateway: Ipv4Addr) -> Result<(), NetError> {
    block_on(bridge, async |h| {
        let idx = must_index(&h, bridge).await?;
        pin_mac(&h, bridge, idx, gateway).await
    })
}

/// Give bridge `idx` its own MAC (from its gateway address), unless it has it: a bridge
/// without one takes the lowest of its ports', so a container's veth joining or leaving
/// would change it under the others, whose neighbour entries for the gateway would then
/// lead nowhere until they expire (a container started beside another, start-first, would
/// cut the other's replies). A change is announced (`arp_notify`), so the containers
/// already attached learn it at once.
async fn pin_mac(h: &Handle, bridge: &str, idx: u32, gateway: Ipv4Addr) -> Result<(), NetError> {
    let want = mac_for(gateway).to_vec();
    let mut links = h.link().get().match_index(idx).execute();
    let has = match links.try_next().await {
        Ok(Some(m)) => m.attributes.iter().any(
            |a| matches!(a, rtnetlink::packet_route::link::LinkAttribute::Address(x) if *x == want),
        ),
        Ok(None) => false,
        Err(e) => return Err(nl("look up link", bridge, e)),
    };
    if has {
        return Ok(());
    }
    let notify = format!("/proc/sys/net/ipv4/conf/{bridge}/arp_notify");
    if let Err(e) = std::fs::write(&notify, b"1") {
        tracing::debug!("{notify}: {e}");
    }
    step(
        "set the MAC of",
        bridge,
        h.link()
            .set(LinkUnspec::new_with_index(idx).address(want).build())
            .execute(),
    )
    .await
}

/// Delete an interface if it exists (a bridge, or the host side of a veth).
pub fn delete(name: &str) -> Result<(), NetError> {
    block_on(name, async |h| {
        if let Some(idx) = index(&h, name).await? {
            step("delete link", name, h.link().del(idx).execute()).await?;
        }
        Ok(())
    })
}

/// The MAC address of a container's interface with address `addr`: derived from it, as
/// docker does (`02:42:` and the four bytes; locally administered, unicast). An address that
/// passes from one container to another (a replacement) keeps its MAC, so the host's
/// neighbour entry for it stays right and no connection waits out a stale one.
pub fn mac_for(addr: Ipv4Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// Create a veth pair: `host` attached to `bridge` and up, `peer` (with `addr`'s MAC, see
/// [`mac_for`]) created directly in the network namespace of process `pid`. One request:
/// creating the peer where it belongs, rather than moving it there afterwards, spares the
/// kernel a network-namespace move (an RCU grace period under the rtnl lock), which
/// dominated a container's start.
pub fn create_veth(
    host: &str,
    peer: &str,
    bridge: &str,
    pid: i32,
    addr: Ipv4Addr,
) -> Result<(), NetError> {
    block_on(host, async |h| {
        if let Some(old) = index(&h, host).await? {
            // left over from a container whose namespace is gone
            step("delete stale veth", host, h.link().del(old).execute()).await?;
        }
        let br = must_index(&h, bridge).await?;
        let inside = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .address(mac_for(addr).to_vec())
            .setns_by_pid(pid as u32)
            .build();
        step(
            "create veth",
            host,
            h.link()
                .add(
                    LinkVeth::new(host, peer)
                        .set_info_data(InfoData::Veth(InfoVeth::Peer(inside)))
                        .controller(br)
                        .up()
                        .build(),
                )
                .execute(),
        )
        .await
    })
}

/// Put an existing interface on `bridge` (again).
pub fn attach(iface: &str, bridge: &str) -> Result<(), NetError> {
    block_on(iface, async |h| {
        let br = must_index(&h, bridge).await?;
        let i = must_index(&h, iface).await?;
        step(
            "attach to bridge",
            iface,
            h.link()
                .set(LinkUnspec::new_with_index(i).controller(br).up().build())
                .execute(),
        )
        .await
    })
}

/// One interface to configure inside a container.
#[derive(Debug, Clone)]
pub struct InsideIface {
    /// The name it arrived with.
    pub from: String,
    /// The name it gets: eth0, eth1, …
    pub name: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// In the current network namespace (the container's): loopback up, each interface renamed,
/// addressed and up, and a default route via `gateway`.
pub fn configure_inside(ifaces: &[InsideIface], gateway: Option<Ipv4Addr>) -> Result<(), NetError> {
    block_on("container network", async |h| {
        step(
            "bring up",
            "lo",
            h.link()
                .set(LinkUnspec::new_with_index(1).up().build())
                .execute(),
        )
        .await?;
        for i in ifaces {
            let idx = must_index(&h, &i.from).await?;
            step(
                "rename",
                &i.from,
                h.link()
                    .set(LinkUnspec::new_with_index(idx).name(i.name.clone()).build())
                    .execute(),
            )
            .await?;
            step(
                "add address to",
                &i.name,
                h.address().add(idx, IpAddr::V4(i.addr), i.prefix).execute(),
            )
            .await?;
            step(
                "bring up",
                &i.name,
                h.link()
                    .set(LinkUnspec::new_with_index(idx).up().build())
                    .execute(),
            )
            .await?;
        }
        if let Some(gw) = gateway {
            step(
                "add default route via",
                &gw.to_string(),
                h.route()
                    .add(RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build())
                    .execute(),
            )
            .await?;
        }
        Ok(())
    })
}
