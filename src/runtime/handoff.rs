//! Handing published ports from one container's shim to another's, for a replacement that
//! never refuses a connection (`update = "start-first"`).
//!
//! Each shim holding published ports (or waiting for them) listens on a unix socket in its
//! container's directory (`ports.sock`; the directory is root's alone, and only root peers
//! are answered). One request per connection, a line, answered by a line:
//! - `give`: `ok tcp 0.0.0.0:8080 udp 127.0.0.1:53` with the listening sockets attached
//!   (`SCM_RIGHTS`), in that order. The giver keeps serving them.
//! - `take`, with sockets attached: the taker serves its published ports from them (a port
//!   no socket came for is bound afresh) and keeps them for its restarts. `ok`.
//! - `release`: the giver's proxy stops accepting, finishes the connections it has and
//!   exits; the shim drops its sockets. `ok PID` (the proxy's, to wait for) or `ok`.
//!
//! Throughout, every listening socket stays open in at least one process, so the kernel
//! keeps queueing connections: none is refused while the ports change hands.

use crate::net::proxy::{Bound, PortMap, Proto};
use std::io::Write;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// The socket's name in the container's directory.
pub const SOCKET: &str = "ports.sock";

/// How long berth waits for a shim's answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// How long a shim waits for a request's line, or to send its answer: it captures the
/// container's output meanwhile (the request is sent as soon as berth connects).
const SHIM_TIMEOUT: Duration = Duration::from_millis(500);

/// The longest request or reply line.
const MAX_LINE: usize = 4096;

/// A path to `name` in `dir` short enough for a socket address whatever `dir` is
/// (`/proc/self/fd/N/name`), valid while the returned descriptor is open.
fn short_path(dir: &Path, name: &str) -> std::io::Result<(OwnedFd, String)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let d: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?
        .into();
    let p = format!("/proc/self/fd/{}/{name}", d.as_raw_fd());
    Ok((d, p))
}

/// The shim's listening socket (non-blocking, close-on-exec), replacing a stale one.
pub fn listen(dir: &Path) -> std::io::Result<UnixListener> {
    let (_d, p) = short_path(dir, SOCKET)?;
    match std::fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(&p)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// One request as the shim received it: its word and the sockets that came with it.
pub struct Request {
    pub stream: UnixStream,
    pub word: String,
    pub fds: Vec<OwnedFd>,
}

/// Accept one request, if a root peer sent a well-formed one in time.
pub fn accept(l: &UnixListener) -> Option<Request> {
    let (stream, _) = match l.accept() {
        Ok(a) => a,
        Err(e) => {
            // out of descriptors: the listener stays readable; do not spin on it
            if e.kind() != std::io::ErrorKind::WouldBlock {
                std::thread::sleep(Duration::from_millis(50));
            }
            return None;
        }
    };
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(SHIM_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(SHIM_TIMEOUT)).ok()?;
    let cred =
        nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    if cred.uid() != 0 {
        return None;
    }
    let mut buf = vec![0u8; MAX_LINE];
    let (n, fds) = crate::sys::recv_with_fds(stream.as_fd(), &mut buf).ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    let word = line.strip_suffix('\n')?.to_string();
    Some(Request { stream, word, fds })
}

/// Answer a request: `ok …` or `error …` and any sockets.
pub fn reply(stream: &UnixStream, line: &str, fds: &[BorrowedFd<'_>]) {
    let mut l = crate::text::printable(line, MAX_LINE - 1).replace('\n', " ");
    l.push('\n');
    let _ = crate::sys::send_with_fds(stream.as_fd(), l.as_bytes(), fds);
}

/// The `give` reply for the shim's sockets: each described (`tcp 0.0.0.0:8080`) and attached.
pub fn give_reply(stream: &UnixStream, ports: &[Bound]) {
    let words: Vec<String> = ports
        .iter()
        .map(|b| {
            let proto = match b.proto() {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            format!("{proto} {}", addr(b.local_addr()))
        })
        .collect();
    let fds: Vec<BorrowedFd<'_>> = ports.iter().map(|b| b.as_fd()).collect();
    reply(stream, &format!("ok {}", words.join(" ")), &fds);
}

fn addr(a: std::io::Result<std::net::SocketAddr>) -> String {
    a.map_or_else(|_| "?".into(), |a| a.to_string())
}

/// The sockets a `take` brought, matched to `ports` by their address and kind; a port none
/// came for is bound afresh. Sockets that match nothing are closed. The first port that
/// can be neither taken nor bound is an error.
pub fn take(ports: &[PortMap], fds: Vec<OwnedFd>) -> Result<Vec<Bound>, String> {
    let mut offered: Vec<(SocketAddrV4, Bound)> = fds
        .into_iter()
        .filter_map(|fd| {
            use nix::sys::socket::{SockType, getsockopt, sockopt};
            let b = match getsockopt(&fd, sockopt::SockType).ok()? {
                // a listening socket, not a connection
                SockType::Stream if getsockopt(&fd, sockopt::AcceptConn).ok()? => {
                    Bound::Tcp(fd.into(), 0)
                }
                SockType::Datagram => Bound::Udp(fd.into(), 0),
                _ => return None,
            };
            match b.local_addr().ok()? {
                std::net::SocketAddr::V4(a) => Some((a, b)),
                std::net::SocketAddr::V6(_) => None,
            }
        })
        .collect();
    ports
        .iter()
        .map(|p| {
            let want = SocketAddrV4::new(p.host_ip, p.host_port);
            match offered
                .iter()
                .position(|(a, b)| *a == want && b.proto() == p.proto)
            {
                Some(i) => Ok(match offered.swap_remove(i).1 {
                    Bound::Tcp(l, _) => Bound::Tcp(l, p.container_port),
                    Bound::Udp(u, _) => Bound::Udp(u, p.container_port),
                }),
                None => crate::net::proxy::bind(std::slice::from_ref(p)).map(|mut v| v.remove(0)),
            }
        })
        .collect()
}

/// A request to the shim of the container in `dir`: its reply line (without `ok `) and
/// the sockets that came with it, or why it failed.
pub fn request(
    dir: &Path,
    word: &str,
    fds: &[BorrowedFd<'_>],
) -> Result<(String, Vec<OwnedFd>), String> {
    let (_d, p) = short_path(dir, SOCKET).map_err(|e| format!("{}: {e}", dir.display()))?;
    let s = UnixStream::connect(&p).map_err(|e| format!("{}: {e}", dir.join(SOCKET).display()))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    if fds.is_empty() {
        (&s).write_all(format!("{word}\n").as_bytes())
            .map_err(|e| format!("{word}: {e}"))?;
    } else {
        crate::sys::send_with_fds(s.as_fd(), format!("{word}\n").as_bytes(), fds)
            .map_err(|e| format!("{word}: {e}"))?;
    }
    let mut buf = vec![0u8; MAX_LINE];
    let (n, got) = crate::sys::recv_with_fds(s.as_fd(), &mut buf)
        .map_err(|e| format!("{word}: no answer: {e}"))?;
    let line = String::from_utf8_lossy(&buf[..n]);
    let line = line.trim_end();
    if let Some(rest) = line.strip_prefix("ok") {
        Ok((rest.trim_start().to_string(), got))
    } else if let Some(e) = line.strip_prefix("error ") {
        Err(format!("{word}: {e}"))
    } else {
        Err(format!("{word}: no answer"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn map(port: u16, proto: Proto) -> PortMap {
        PortMap {
            host_ip: Ipv4Addr::LOCALHOST,
            host_port: port,
            container_port: 80,
            proto,
        }
    }

    #[test]
    fn sockets_pass_between_processes_and_match_their_ports() {
        let dir = tempfile::tempdir().unwrap();
        let l = listen(dir.path()).unwrap();
        // a listening socket to hand over, and a connected one that must not pass for it
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let d = dir.path().to_path_buf();
        let t = std::thread::spawn(move || {
            let r = loop {
                if let Some(r) = accept(&l) {
                    break r;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            assert_eq!(r.word, "take");
            assert_eq!(r.fds.len(), 2);
            let taken = take(&[map(port, Proto::Tcp)], r.fds);
            reply(&r.stream, "ok", &[]);
            taken
        });
        let (rest, got) = request(&d, "take", &[client.as_fd(), tcp.as_fd()]).unwrap();
        assert_eq!(rest, "");
        assert!(got.is_empty());
        let taken = t.join().unwrap().unwrap();
        drop(tcp);
        // the taken socket is the same listening socket: a connection made now is queued on
        // it and accepted through the copy
        let Bound::Tcp(l2, 80) = &taken[0] else {
            panic!("not a TCP listener")
        };
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(l2.accept().is_ok());
    }

    #[test]
    fn a_port_no_socket_came_for_is_bound_and_a_taken_one_in_use_fails() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let got = take(&[map(port, Proto::Tcp)], vec![]).unwrap();
        assert_eq!(got.len(), 1);
        // the same port again, with nothing offered: in use
        let e = match take(&[map(port, Proto::Tcp)], vec![]) {
            Err(e) => e,
            Ok(_) => panic!("bound a port in use"),
        };
        assert!(e.contains("already in use"), "{e}");
    }
}
