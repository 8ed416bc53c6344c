//! Per-network nftables rules, sent over netlink (no `nft` command, no C library): one table
//! `ip <bridge>` holding
//! - `postrouting` (nat): `ip saddr SUBNET oifname != BRIDGE masquerade`, unless internal;
//! - `forward` (filter):
//!   - traffic from this bridge to any other berth bridge is dropped (so containers on
//!     different networks cannot reach each other);
//!   - a connection into this bridge from anything but the bridge itself is dropped unless it
//!     belongs to a connection the containers made (`ct state != established,related`): with
//!     `ip_forward` on, a host on the LAN that routes the subnet via this host must not reach
//!     unpublished container ports (published ports go through the shim's proxy, which is
//!     local traffic, not forwarded);
//!   - for internal networks, everything between the bridge and anything else.
//!
//! Installing replaces the whole table in one atomic batch; removing deletes it.
//!
//! The messages are nf_tables' netlink format (`linux/netfilter/nf_tables.h`), encoded here:
//! a dozen attributes do not justify a build step that needs libclang.

use super::{BRIDGE_PREFIX, NetError, Subnet};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use std::os::fd::AsFd;

fn err(step: &'static str, bridge: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Nft {
        step,
        bridge: bridge.into(),
        message: e.to_string(),
    }
}

// netlink and nfnetlink
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_IPV4: u8 = 2;
// nf_tables messages
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
// attributes
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
// hooks, verdicts, registers, keys
const NF_INET_FORWARD: u32 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_CT_STATE: u32 = 0;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
/// `ct state` bits (host byte order): established and related.
const CT_ESTABLISHED_RELATED: u32 = (1 << 1) | (1 << 2);

/// Netlink attributes (type-length-value, 4-byte aligned) being written.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn raw(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }
    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.raw(kind, &v)
    }
    /// nf_tables numbers are big-endian.
    fn u32(&mut self, kind: u16, n: u32) -> &mut Self {
        self.raw(kind, &n.to_be_bytes())
    }
    fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut inner = Attrs::default();
        f(&mut inner);
        self.raw(kind | NLA_F_NESTED, &inner.0)
    }
    fn data(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        self.nest(kind, |a| {
            a.raw(NFTA_DATA_VALUE, value);
        })
    }
}

/// One expression of a rule.
enum Expr {
    /// Load `len` bytes of the IPv4 header at `offset` into register 1.
    Payload {
        offset: u32,
        len: u32,
    },
    Meta(u32),
    CtState,
    /// Register 1 = (register 1 & mask) ^ 0.
    Bitwise(Vec<u8>),
    Cmp(u32, Vec<u8>),
    Masquerade,
    Verdict(u32),
}

impl Expr {
    fn encode(&self, a: &mut Attrs) {
        let (name, data): (&str, Attrs) = match self {
            Expr::Payload { offset, len } => {
                let mut d = Attrs::default();
                d.u32(1, NFT_REG_1)
                    .u32(2, NFT_PAYLOAD_NETWORK_HEADER)
                    .u32(3, *offset)
                    .u32(4, *len);
                ("payload", d)
            }
            Expr::Meta(key) => {
                let mut d = Attrs::default();
                d.u32(1, NFT_REG_1).u32(2, *key);
                ("meta", d)
            }
            Expr::CtState => {
                let mut d = Attrs::default();
                d.u32(1, NFT_REG_1).u32(2, NFT_CT_STATE);
                ("ct", d)
            }
            Expr::Bitwise(mask) => {
                let mut d = Attrs::default();
                d.u32(1, NFT_REG_1)
                    .u32(2, NFT_REG_1)
                    .u32(3, mask.len() as u32)
                    .data(4, mask)
                    .data(5, &vec![0; mask.len()]);
                ("bitwise", d)
            }
            Expr::Cmp(op, value) => {
                let mut d = Attrs::default();
                d.u32(1, NFT_REG_1).u32(2, *op).data(3, value);
                ("cmp", d)
            }
            Expr::Masquerade => ("masq", Attrs::default()),
            Expr::Verdict(code) => {
                let mut d = Attrs::default();
                d.u32(1, NFT_REG_VERDICT).nest(2, |v| {
                    v.nest(NFTA_DATA_VERDICT, |v| {
                        v.u32(NFTA_VERDICT_CODE, *code);
                    });
                });
                ("immediate", d)
            }
        };
        a.nest(NFTA_LIST_ELEM, |e| {
            e.str(NFTA_EXPR_NAME, name);
            if !data.0.is_empty() {
                e.raw(NFTA_EXPR_DATA | NLA_F_NESTED, &data.0);
            }
        });
    }
}

/// An interface name as `meta iifname`/`oifname` compares it: NUL-terminated.
fn ifname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

/// A netlink batch of nf_tables messages.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// Sequence numbers whose acknowledgement we wait for.
    acks: Vec<u32>,
}

impl Batch {
    fn new() -> Self {
        let mut b = Batch {
            buf: vec![],
            seq: 0,
            acks: vec![],
        };
        b.push(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        b
    }

    fn push(&mut self, kind: u16, flags: u16, family: u8, res_id: u16, attrs: &[u8]) {
        self.seq += 1;
        let len = 16 + 4 + attrs.len();
        self.buf.extend_from_slice(&(len as u32).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, resource id (big-endian)
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.buf.extend_from_slice(attrs);
        if flags & NLM_F_ACK != 0 {
            self.acks.push(self.seq);
        }
    }

    fn msg(&mut self, msg: u16, extra: u16, attrs: &Attrs) {
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        self.push(
            kind,
            NLM_F_REQUEST | NLM_F_ACK | extra,
            NFPROTO_IPV4,
            0,
            &attrs.0,
        );
    }

    fn table(&mut self, msg: u16, name: &str) {
        let mut a = Attrs::default();
        a.str(NFTA_TABLE_NAME, name);
        self.msg(
            msg,
            if msg == NFT_MSG_NEWTABLE {
                NLM_F_CREATE
            } else {
                0
            },
            &a,
        );
    }

    fn chain(&mut self, table: &str, name: &str, kind: &str, hook: u32, priority: i32) {
        let mut a = Attrs::default();
        a.str(NFTA_CHAIN_TABLE, table)
            .str(NFTA_CHAIN_NAME, name)
            .nest(NFTA_CHAIN_HOOK, |h| {
                h.u32(NFTA_HOOK_HOOKNUM, hook)
                    .u32(NFTA_HOOK_PRIORITY, priority as u32);
            })
            .u32(NFTA_CHAIN_POLICY, NF_ACCEPT)
            .str(NFTA_CHAIN_TYPE, kind);
        self.msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, &a);
    }

    fn rule(&mut self, table: &str, chain: &str, exprs: &[Expr]) {
        let mut a = Attrs::default();
        a.str(NFTA_RULE_TABLE, table)
            .str(NFTA_RULE_CHAIN, chain)
            .nest(NFTA_RULE_EXPRESSIONS, |l| {
                for e in exprs {
                    e.encode(l);
                }
            });
        self.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, &a);
    }

    fn finish(mut self) -> (Vec<u8>, Vec<u32>) {
        self.push(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        (self.buf, self.acks)
    }
}

/// Send `buf` and wait for an acknowledgement of every sequence number in `acks`: `Ok` when
/// all succeeded, the first error otherwise.
fn transact(buf: &[u8], mut acks: Vec<u32>) -> std::io::Result<()> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    nix::sys::socket::setsockopt(
        &sock.as_fd(),
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(10, 0),
    )?;
    sock.send(buf, 0)?;
    let mut rx: Vec<u8> = Vec::with_capacity(64 * 1024);
    while !acks.is_empty() {
        rx.clear();
        let n = sock.recv(&mut rx, 0)?;
        let mut msg = &rx[..n.min(rx.len())];
        while msg.len() >= 16 {
            let len = u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize;
            let kind = u16::from_ne_bytes([msg[4], msg[5]]);
            let seq = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
            if len < 16 || len > msg.len() {
                return Err(std::io::Error::other("malformed netlink reply"));
            }
            match kind {
                NLMSG_ERROR if len >= 20 => {
                    let code = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
                    if code != 0 {
                        return Err(std::io::Error::from_raw_os_error(-code));
                    }
                    acks.retain(|s| *s != seq);
                }
                NLMSG_DONE => acks.retain(|s| *s != seq),
                _ => {}
            }
            msg = &msg[len.next_multiple_of(4).min(msg.len())..];
        }
    }
    Ok(())
}

/// The expressions of the rules for the network on `bridge`, by chain.
fn rules(bridge: &str, subnet: Subnet, internal: bool) -> Vec<(&'static str, Vec<Expr>)> {
    let name = ifname(bridge);
    let mut rules = vec![];
    if !internal {
        // ip saddr SUBNET oifname != BRIDGE masquerade (the table is `ip`: no protocol
        // check needed, and `nft list` decodes exactly this shape)
        rules.push((
            "postrouting",
            vec![
                Expr::Payload { offset: 12, len: 4 },
                Expr::Bitwise(subnet.mask().to_be_bytes().to_vec()),
                Expr::Cmp(NFT_CMP_EQ, subnet.addr.octets().to_vec()),
                Expr::Meta(NFT_META_OIFNAME),
                Expr::Cmp(NFT_CMP_NEQ, name.clone()),
                Expr::Masquerade,
            ],
        ));
    }
    // iifname BRIDGE oifname != BRIDGE oifname "brth*" drop: to another berth bridge
    rules.push((
        "forward",
        vec![
            Expr::Meta(NFT_META_IIFNAME),
            Expr::Cmp(NFT_CMP_EQ, name.clone()),
            Expr::Meta(NFT_META_OIFNAME),
            Expr::Cmp(NFT_CMP_NEQ, name.clone()),
            Expr::Meta(NFT_META_OIFNAME),
            Expr::Cmp(NFT_CMP_EQ, BRIDGE_PREFIX.as_bytes().to_vec()),
            Expr::Verdict(NF_DROP),
        ],
    ));
    // oifname BRIDGE iifname != BRIDGE ct state != established,related drop: nothing from
    // outside opens a connection to a container
    rules.push((
        "forward",
        vec![
            Expr::Meta(NFT_META_OIFNAME),
            Expr::Cmp(NFT_CMP_EQ, name.clone()),
            Expr::Meta(NFT_META_IIFNAME),
            Expr::Cmp(NFT_CMP_NEQ, name.clone()),
            Expr::CtState,
            Expr::Bitwise(CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec()),
            Expr::Cmp(NFT_CMP_EQ, vec![0; 4]),
            Expr::Verdict(NF_DROP),
        ],
    ));
    if internal {
        for (this, other) in [
            (NFT_META_IIFNAME, NFT_META_OIFNAME),
            (NFT_META_OIFNAME, NFT_META_IIFNAME),
        ] {
            rules.push((
                "forward",
                vec![
                    Expr::Meta(this),
                    Expr::Cmp(NFT_CMP_EQ, name.clone()),
                    Expr::Meta(other),
                    Expr::Cmp(NFT_CMP_NEQ, name.clone()),
                    Expr::Verdict(NF_DROP),
                ],
            ));
        }
    }
    rules
}

fn install_batch(bridge: &str, subnet: Subnet, internal: bool) -> (Vec<u8>, Vec<u32>) {
    let mut batch = Batch::new();
    // add-then-delete makes the delete succeed whether or not the table existed
    batch.table(NFT_MSG_NEWTABLE, bridge);
    batch.table(NFT_MSG_DELTABLE, bridge);
    batch.table(NFT_MSG_NEWTABLE, bridge);
    batch.chain(bridge, "postrouting", "nat", NF_INET_POST_ROUTING, 100);
    batch.chain(bridge, "forward", "filter", NF_INET_FORWARD, 0);
    for (chain, exprs) in rules(bridge, subnet, internal) {
        batch.rule(bridge, chain, &exprs);
    }
    batch.finish()
}

/// Install (or replace) the rules for the network on `bridge`.
pub fn install(bridge: &str, subnet: Subnet, internal: bool) -> Result<(), NetError> {
    let (buf, acks) = install_batch(bridge, subnet, internal);
    transact(&buf, acks).map_err(|e| err("install rules", bridge, e))
}

/// Remove the network's table (nothing happens when it is absent).
pub fn remove(bridge: &str) -> Result<(), NetError> {
    let mut batch = Batch::new();
    batch.table(NFT_MSG_NEWTABLE, bridge);
    batch.table(NFT_MSG_DELTABLE, bridge);
    let (buf, acks) = batch.finish();
    transact(&buf, acks).map_err(|e| err("remove rules", bridge, e))
}

/// Whether the network's table is present.
pub fn present(bridge: &str) -> bool {
    let mut a = Attrs::default();
    a.str(NFTA_TABLE_NAME, bridge);
    let mut b = Batch {
        buf: vec![],
        seq: 0,
        acks: vec![],
    };
    b.msg(NFT_MSG_GETTABLE, 0, &a);
    transact(&b.buf, b.acks).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_nested() {
        let mut a = Attrs::default();
        a.str(1, "ab").nest(4, |n| {
            n.u32(1, 7);
        });
        assert_eq!(
            a.0,
            [
                7, 0, 1, 0, b'a', b'b', 0, 0, // "ab\0" padded to 8
                12, 0, 4, 0x80, 8, 0, 1, 0, 0, 0, 0, 7, // nested u32, big-endian
            ]
        );
    }

    #[test]
    fn a_batch_is_framed_and_asks_for_every_ack() {
        let subnet = Subnet {
            addr: std::net::Ipv4Addr::new(10, 89, 0, 0),
            prefix: 24,
        };
        let (buf, acks) = install_batch("brthx", subnet, false);
        // begin, 3 table messages, 2 chains, 3 rules, end
        let mut kinds = vec![];
        let mut rest = &buf[..];
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
            kinds.push(u16::from_ne_bytes([rest[4], rest[5]]));
            assert_eq!(len % 4, 0);
            rest = &rest[len..];
        }
        let nft = |m: u16| (NFNL_SUBSYS_NFTABLES << 8) | m;
        assert_eq!(
            kinds,
            [
                NFNL_MSG_BATCH_BEGIN,
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_DELTABLE),
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_NEWCHAIN),
                nft(NFT_MSG_NEWCHAIN),
                nft(NFT_MSG_NEWRULE),
                nft(NFT_MSG_NEWRULE),
                nft(NFT_MSG_NEWRULE),
                NFNL_MSG_BATCH_END,
            ]
        );
        assert_eq!(acks, (2..=9).collect::<Vec<u32>>());
        assert_eq!(rules("brthx", subnet, true).len(), 4);
    }
}
