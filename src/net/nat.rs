//! Per-network nftables rules, sent over netlink with rustables (no `nft` command): one
//! table `ip <bridge>` holding
//! - `postrouting` (nat): `ip saddr SUBNET oifname != BRIDGE masquerade`, unless internal;
//! - `forward` (filter): traffic from this bridge to any other berth bridge is dropped (so
//!   containers on different networks cannot reach each other), and for internal networks
//!   everything between the bridge and anything else.
//!
//! Installing replaces the whole table in one atomic batch; removing deletes it.

use super::{BRIDGE_PREFIX, NetError, Subnet};
use rustables::expr::{
    Bitwise, Cmp, CmpOp, HighLevelPayload, IPv4HeaderField, Meta, MetaType, NetworkHeaderField,
};
use rustables::{
    Batch, Chain, ChainPolicy, ChainType, Hook, HookClass, MsgType, ProtocolFamily, Rule, Table,
};

fn err(step: &'static str, bridge: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Nft {
        step,
        bridge: bridge.into(),
        message: e.to_string(),
    }
}

fn ifname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

fn table(bridge: &str) -> Table {
    Table::new(ProtocolFamily::Ipv4).with_name(bridge)
}

/// Install (or replace) the rules for the network on `bridge`.
pub fn install(bridge: &str, subnet: Subnet, internal: bool) -> Result<(), NetError> {
    let b = |e: rustables::error::BuilderError| err("build rule", bridge, e);
    let t = table(bridge);
    let mut batch = Batch::new();
    // add-then-delete makes the delete succeed whether or not the table existed
    batch.add(&t, MsgType::Add);
    batch.add(&t, MsgType::Del);
    batch.add(&t, MsgType::Add);
    let post = Chain::new(&t)
        .with_name("postrouting")
        .with_hook(Hook::new(HookClass::PostRouting, 100))
        .with_type(ChainType::Nat)
        .with_policy(ChainPolicy::Accept)
        .add_to_batch(&mut batch);
    let fwd = Chain::new(&t)
        .with_name("forward")
        .with_hook(Hook::new(HookClass::Forward, 0))
        .with_type(ChainType::Filter)
        .with_policy(ChainPolicy::Accept)
        .add_to_batch(&mut batch);
    if !internal {
        // ip saddr SUBNET (the table is `ip`: no protocol check needed, and `nft list`
        // decodes exactly this shape)
        Rule::new(&post)
            .map_err(b)?
            .with_expr(
                HighLevelPayload::Network(NetworkHeaderField::IPv4(IPv4HeaderField::Saddr)).build(),
            )
            .with_expr(Bitwise::new(subnet.mask().to_be_bytes(), [0u8; 4]).map_err(b)?)
            .with_expr(Cmp::new(CmpOp::Eq, subnet.addr.octets()))
            .with_expr(Meta::new(MetaType::OifName))
            .with_expr(Cmp::new(CmpOp::Neq, ifname(bridge)))
            .masquerade()
            .add_to_batch(&mut batch);
    }
    // to another berth bridge: dropped
    Rule::new(&fwd)
        .map_err(b)?
        .iiface(bridge)
        .map_err(b)?
        .with_expr(Meta::new(MetaType::OifName))
        .with_expr(Cmp::new(CmpOp::Neq, ifname(bridge)))
        .with_expr(Meta::new(MetaType::OifName))
        .with_expr(Cmp::new(CmpOp::Eq, BRIDGE_PREFIX.as_bytes().to_vec()))
        .drop()
        .add_to_batch(&mut batch);
    if internal {
        Rule::new(&fwd)
            .map_err(b)?
            .iiface(bridge)
            .map_err(b)?
            .with_expr(Meta::new(MetaType::OifName))
            .with_expr(Cmp::new(CmpOp::Neq, ifname(bridge)))
            .drop()
            .add_to_batch(&mut batch);
        Rule::new(&fwd)
            .map_err(b)?
            .oiface(bridge)
            .map_err(b)?
            .with_expr(Meta::new(MetaType::IifName))
            .with_expr(Cmp::new(CmpOp::Neq, ifname(bridge)))
            .drop()
            .add_to_batch(&mut batch);
    }
    batch.send().map_err(|e| err("install rules", bridge, e))
}

/// Remove the network's table (nothing happens when it is absent).
pub fn remove(bridge: &str) -> Result<(), NetError> {
    let t = table(bridge);
    let mut batch = Batch::new();
    batch.add(&t, MsgType::Add);
    batch.add(&t, MsgType::Del);
    batch.send().map_err(|e| err("remove rules", bridge, e))
}

/// Whether the network's table is present.
pub fn present(bridge: &str) -> bool {
    rustables::list_tables()
        .map(|ts| {
            ts.iter()
                .any(|t| t.get_name().map(|n| n.as_str()) == Some(bridge))
        })
        .unwrap_or(false)
}
