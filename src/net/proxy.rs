//! Published ports: the shim binds each host address before the container starts (so a port
//! in use is an error at apply time), then a forked child of the shim forwards connections
//! (TCP) and datagrams (UDP) to the container's address. It dies with the shim.
//!
//! SIGUSR1 tells the proxy its ports were handed to a successor (see
//! [`crate::runtime::handoff`]): it stops accepting, lets the connections it carries finish,
//! and exits.

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

impl Bound {
    pub fn proto(&self) -> Proto {
        match self {
            Bound::Tcp(..) => Proto::Tcp,
            Bound::Udp(..) => Proto::Udp,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Bound::Tcp(l, _) => l.local_addr(),
            Bound::Udp(u, _) => u.local_addr(),
        }
    }
}

impl std::os::fd::AsFd for Bound {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Bound::Tcp(l, _) => l.as_fd(),
            Bound::Udp(u, _) => u.as_fd(),
        }
    }
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

/// Forward until killed, or until SIGUSR1 and the last connection is done. Runs in the
/// proxy process (single-threaded runtime).
pub fn serve(bound: Vec<Bound>, target: Ipv4Addr) -> ! {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => std::process::exit(1),
    };
    // a LocalSet: the UDP forwarders share their client table without locks
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        // before the sockets are served: a release must not find the default action (death,
        // which would reset the connections in flight)
        let usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok();
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = vec![];
        for b in bound {
            match b {
                Bound::Tcp(l, port) => {
                    if l.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if let Ok(l) = tokio::net::TcpListener::from_std(l) {
                        tasks.push(tokio::task::spawn_local(tcp(
                            l,
                            SocketAddr::from((target, port)),
                            active.clone(),
                        )));
                    }
                }
                Bound::Udp(s, port) => {
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if let Ok(s) = tokio::net::UdpSocket::from_std(s) {
                        tasks.push(tokio::task::spawn_local(udp(
                            s,
                            SocketAddr::from((target, port)),
                        )));
                    }
                }
            }
        }
        let Some(mut usr1) = usr1 else {
            for t in tasks {
                let _ = t.await;
            }
            return;
        };
        usr1.recv().await;
        // released: the listeners go (the successor holds the sockets), the connections
        // under way are carried to their end
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        while active.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    std::process::exit(0)
}

/// Counts a connection for as long as it lives.
struct Active(Arc<std::sync::atomic::AtomicUsize>);

impl Active {
    fn new(n: &Arc<std::sync::atomic::AtomicUsize>) -> Active {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Active(n.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn tcp(
    l: tokio::net::TcpListener,
    to: SocketAddr,
    active: Arc<std::sync::atomic::AtomicUsize>,
) {
    loop {
        let mut inbound = match l.accept().await {
            Ok((c, _)) => c,
            Err(_) => {
                // out of descriptors or memory: back off rather than spin
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let live = Active::new(&active);
        tokio::spawn(async move {
            let _live = live;
            if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}

/// How long a UDP client may stay silent, both ways, before its socket towards the container
/// is closed (the kernel's conntrack keeps a replied UDP flow for 120 s).
const UDP_IDLE: std::time::Duration = std::time::Duration::from_secs(120);

/// At most this many UDP clients at once (each holds a socket and a 64 KiB buffer);
/// datagrams from further clients are dropped until some go idle.
const UDP_MAX_PEERS: usize = 512;

/// The UDP clients being forwarded: for each, its socket towards the container and when it
/// was last heard of, either way.
type Peers = std::rc::Rc<
    std::cell::RefCell<HashMap<SocketAddr, (Arc<tokio::net::UdpSocket>, std::time::Instant)>>,
>;

async fn udp(s: tokio::net::UdpSocket, to: SocketAddr) {
    udp_with(s, to, UDP_IDLE, Peers::default()).await
}

/// Forward datagrams from clients of `s` to `to`, one socket towards the container per
/// client so replies find their way back; a client idle for `idle` is forgotten.
async fn udp_with(
    s: tokio::net::UdpSocket,
    to: SocketAddr,
    idle: std::time::Duration,
    peers: Peers,
) {
    let s = Arc::new(s);
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, from)) = s.recv_from(&mut buf).await else {
            continue;
        };
        let known = peers.borrow_mut().get_mut(&from).map(|(u, seen)| {
            *seen = std::time::Instant::now();
            u.clone()
        });
        let up = match known {
            Some(u) => u,
            None => {
                if peers.borrow().len() >= UDP_MAX_PEERS {
                    continue;
                }
                let Ok(u) = tokio::net::UdpSocket::bind("0.0.0.0:0").await else {
                    continue;
                };
                if u.connect(to).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                peers
                    .borrow_mut()
                    .insert(from, (u.clone(), std::time::Instant::now()));
                tokio::task::spawn_local(replies(s.clone(), u.clone(), from, idle, peers.clone()));
                u
            }
        };
        let _ = up.send(&buf[..n]).await;
    }
}

/// Carry the container's replies back to `client` until the flow has been idle for `idle`.
async fn replies(
    back: Arc<tokio::net::UdpSocket>,
    from_container: Arc<tokio::net::UdpSocket>,
    client: SocketAddr,
    idle: std::time::Duration,
    peers: Peers,
) {
    let mut b = vec![0u8; 65536];
    loop {
        match tokio::time::timeout(idle, from_container.recv(&mut b)).await {
            Ok(Ok(n)) => {
                if let Some((_, seen)) = peers.borrow_mut().get_mut(&client) {
                    *seen = std::time::Instant::now();
                }
                let _ = back.send_to(&b[..n], client).await;
            }
            Ok(Err(_)) => break,
            Err(_) => {
                let last = peers.borrow().get(&client).map(|(_, seen)| *seen);
                if last.is_none_or(|t| t.elapsed() >= idle) {
                    break;
                }
            }
        }
    }
    peers.borrow_mut().remove(&client);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_clients_are_forwarded_and_forgotten_when_idle() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            // the "container": an echo server
            let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let to = echo.local_addr().unwrap();
            tokio::task::spawn_local(async move {
                let mut b = [0u8; 64];
                while let Ok((n, from)) = echo.recv_from(&mut b).await {
                    let _ = echo.send_to(&b[..n], from).await;
                }
            });
            let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let front_addr = front.local_addr().unwrap();
            let peers = Peers::default();
            let idle = std::time::Duration::from_millis(50);
            tokio::task::spawn_local(udp_with(front, to, idle, peers.clone()));
            let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            client.send_to(b"ping", front_addr).await.unwrap();
            let mut b = [0u8; 64];
            let (n, _) = client.recv_from(&mut b).await.unwrap();
            assert_eq!(&b[..n], b"ping");
            assert_eq!(peers.borrow().len(), 1);
            // silent from now on: forgotten (waits for it, up to 10 s)
            for _ in 0..1000 {
                if peers.borrow().is_empty() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(peers.borrow().is_empty(), "idle client still held");
            // and a new datagram starts a new flow
            client.send_to(b"again", front_addr).await.unwrap();
            let (n, _) = client.recv_from(&mut b).await.unwrap();
            assert_eq!(&b[..n], b"again");
        });
    }
}
