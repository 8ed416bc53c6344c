//! Published ports: the shim binds each host address before the container starts (so a port
//! in use is an error at apply time), then a forked child of the shim forwards connections
//! (TCP) and datagrams (UDP) to the container's address. It dies with the shim.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

impl std::fmt::Display for PortMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(f, "{}:{}/{p}", self.host_ip, self.host_port)
    }
}

/// A bound host socket, waiting for the proxy.
pub enum Bound {
    Tcp(std::net::TcpListener, u16),
    Udp(std::net::UdpSocket, u16),
}

/// Bind every published port; the first that fails is an error naming it.
pub fn bind(ports: &[PortMap]) -> Result<Vec<Bound>, String> {
    ports
        .iter()
        .map(|p| {
            let addr = SocketAddrV4::new(p.host_ip, p.host_port);
            let r = match p.proto {
                Proto::Tcp => {
                    std::net::TcpListener::bind(addr).map(|l| Bound::Tcp(l, p.container_port))
                }
                Proto::Udp => {
                    std::net::UdpSocket::bind(addr).map(|s| Bound::Udp(s, p.container_port))
                }
            };
            r.map_err(|e| {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    format!("published port {p} is already in use on this host")
                } else {
                    format!("publish port {p}: {e}")
                }
            })
        })
        .collect()
}

/// Forward until killed. Runs in the proxy process (single-threaded runtime).
pub fn serve(bound: Vec<Bound>, target: Ipv4Addr) -> ! {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => std::process::exit(1),
    };
    rt.block_on(async move {
        let mut tasks = vec![];
        for b in bound {
            match b {
                Bound::Tcp(l, port) => {
                    if l.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if let Ok(l) = tokio::net::TcpListener::from_std(l) {
                        tasks.push(tokio::spawn(tcp(l, SocketAddr::from((target, port)))));
                    }
                }
                Bound::Udp(s, port) => {
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if let Ok(s) = tokio::net::UdpSocket::from_std(s) {
                        tasks.push(tokio::spawn(udp(s, SocketAddr::from((target, port)))));
                    }
                }
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    std::process::exit(0)
}

async fn tcp(l: tokio::net::TcpListener, to: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}

async fn udp(s: tokio::net::UdpSocket, to: SocketAddr) {
    let s = Arc::new(s);
    // one socket towards the container per client, so replies find their way back
    let mut peers: HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, from)) = s.recv_from(&mut buf).await else {
            continue;
        };
        let up = match peers.get(&from) {
            Some(u) => u.clone(),
            None => {
                let Ok(u) = tokio::net::UdpSocket::bind("0.0.0.0:0").await else {
                    continue;
                };
                if u.connect(to).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                let (back, reply) = (s.clone(), u.clone());
                tokio::spawn(async move {
                    let mut b = vec![0u8; 65536];
                    while let Ok(n) = reply.recv(&mut b).await {
                        let _ = back.send_to(&b[..n], from).await;
                    }
                });
                peers.insert(from, u.clone());
                u
            }
        };
        let _ = up.send(&buf[..n]).await;
    }
}
