// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A network for the demo and the tests to run the virtio-net device in, kept off the
//! host's: a network namespace of its own ([`NetNs`]), a persistent tap in it, and an echo
//! peer ([`EchoPeer`]) on that tap that sends every numbered demo frame back to the guest
//! and counts what it received and sent, so a test can tell a frame the network dropped
//! from one the VMM lost.
//!
//! Needs root (`CAP_NET_ADMIN`) and `/dev/net/tun`; [`available`] says whether this host has
//! them. The namespace lives while a [`NetNs`] or a process inside it does, and takes its
//! tap with it when it goes.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::gate::lock;

/// The demo frames' EtherType (IEEE local experimental).
pub const ETHERTYPE: u16 = 0x88B5;
/// The demo frames' magic, after the Ethernet header.
pub const FRAME_MAGIC: &[u8; 8] = b"CPRNET01";
/// The MAC address the echo peer sends from.
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn os_err(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Whether this host can run the network part: root and `/dev/net/tun`, or why not.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: a tap and a network namespace need CAP_NET_ADMIN".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun".into());
    }
    Ok(())
}

/// A network namespace of this process's own, not entered by any of its threads until
/// asked ([`run`](Self::run), [`command`](Self::command)).
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// Creates a namespace (on a short-lived thread, so no thread of the caller moves).
    pub fn new() -> std::io::Result<NetNs> {
        std::thread::spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) moves only the calling thread, which ends below.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(os_err("unshare(CLONE_NEWNET)"));
            }
            let f = std::fs::File::open("/proc/thread-self/ns/net")?;
            Ok(NetNs { fd: f.into() })
        })
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))?
    }

    fn enter(&self) -> std::io::Result<()> {
        // SAFETY: setns on a namespace fd this struct owns; it moves the calling thread.
        if unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(os_err("setns"));
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let fd = self.fd.try_clone()?;
        std::thread::spawn(move || {
            NetNs { fd }.enter()?;
            Ok(f())
        })
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))?
    }

    /// Makes `cmd` start inside the namespace.
    pub fn command(&self, cmd: &mut Command) -> std::io::Result<()> {
        use std::os::unix::process::CommandExt;
        let raw = self.fd.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // setns, which is async-signal-safe, on an fd the child inherited from this one.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Creates the persistent tap `name` in the namespace and brings it up, with IPv6 off
    /// on it so the host sends nothing of its own (router solicitations, MLD) through it.
    pub fn add_tap(&self, name: &str) -> std::io::Result<()> {
        let name = name.to_string();
        self.run(move || {
            crate::virtio_net::create_persistent_tap(&name).map_err(std::io::Error::other)?;
            // Per namespace: /proc/sys/net is the opening thread's. A kernel without IPv6
            // has no such file, and nothing to turn off.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
            link_up(&name)
        })?
    }
}

fn ifreq_name(name: &str) -> std::io::Result<[libc::c_char; 16]> {
    let mut out = [0 as libc::c_char; 16];
    if name.len() >= 16 {
        return Err(std::io::Error::other(format!("`{name}`: name too long")));
    }
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

/// Sets `IFF_UP` on interface `name` (in the calling thread's namespace).
fn link_up(name: &str) -> std::io::Result<()> {
    // SAFETY: a new socket, owned below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(os_err("socket"));
    }
    // SAFETY: `s` is a new fd nothing else owns.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: zeroed ifreq is a valid value of a plain C struct.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_name = ifreq_name(name)?;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq, which lives for the calls.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) < 0 {
            return Err(os_err("SIOCGIFFLAGS"));
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr) < 0 {
            return Err(os_err("SIOCSIFFLAGS"));
        }
    }
    Ok(())
}

/// What the echo peer counted (numbers are the frames' own).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EchoStats {
    /// Demo frames received.
    pub received: u64,
    /// The sum of their numbers.
    pub received_sum: u64,
    /// Echoes sent (the socket took them whole).
    pub sent: u64,
    /// The sum of their numbers.
    pub sent_sum: u64,
    /// Echoes the socket refused (never sent).
    pub send_errors: u64,
    /// Frames held back while holding.
    pub backlog: usize,
}

#[derive(Debug, Default)]
struct Shared {
    stats: EchoStats,
    hold: bool,
    backlog: Vec<Vec<u8>>,
}

/// The echo peer: a thread in the namespace with a packet socket on the tap.
#[derive(Debug)]
pub struct EchoPeer {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn packet_socket(tap: &str) -> std::io::Result<OwnedFd> {
    let proto = ETHERTYPE.to_be();
    // SAFETY: a new socket, owned below.
    let s = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            i32::from(proto),
        )
    };
    if s < 0 {
        return Err(os_err("socket(AF_PACKET)"));
    }
    // SAFETY: `s` is a new fd nothing else owns.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // Straight to the tap's driver, past the queueing discipline: a frame the tap drops
    // (no reader attached, or its filter) fails the send, so "sent" means "queued in the
    // tap", and none is dropped silently while the tap's qdisc is still being set up.
    const PACKET_QDISC_BYPASS: libc::c_int = 20;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int that lives for the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_QDISC_BYPASS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        return Err(os_err("PACKET_QDISC_BYPASS"));
    }
    let cname = std::ffi::CString::new(tap).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name that lives for the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(os_err(&format!("interface `{tap}`")));
    }
    // SAFETY: zeroed sockaddr_ll is a valid value of a plain C struct.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: bind reads one sockaddr_ll of the given size, which lives for the call.
    let rc = unsafe {
        libc::bind(
            s.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(os_err("bind(AF_PACKET)"));
    }
    Ok(s)
}

/// The number of a demo frame, if it is one.
pub fn frame_number(frame: &[u8]) -> Option<u64> {
    let body = frame.get(14..38)?;
    if frame[12..14] != ETHERTYPE.to_be_bytes() || &body[..8] != FRAME_MAGIC {
        return None;
    }
    let n = u64::from_le_bytes(body[8..16].try_into().ok()?);
    let check = u64::from_le_bytes(body[16..24].try_into().ok()?);
    (n == !check).then_some(n)
}

impl EchoPeer {
    /// Starts echoing on `tap` (which must exist in `ns` and be up).
    pub fn start(ns: &NetNs, tap: &str) -> std::io::Result<EchoPeer> {
        let t = tap.to_string();
        let sock = ns.run(move || packet_socket(&t))??;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, st) = (shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || echo_loop(sock, sh, st));
        Ok(EchoPeer {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Holds echoes back (keeps them) or, released, sends what it held and goes on.
    pub fn hold(&self, on: bool) {
        lock(&self.shared).hold = on;
    }

    /// Starts counting from zero and forgets what it held back: for a new guest, whose
    /// frame numbers start again (call it with no VM on the tap).
    pub fn reset(&self) {
        let mut s = lock(&self.shared);
        s.stats = EchoStats::default();
        s.backlog.clear();
    }

    /// The counts so far.
    pub fn stats(&self) -> EchoStats {
        let s = lock(&self.shared);
        EchoStats {
            backlog: s.backlog.len(),
            ..s.stats.clone()
        }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn send(sock: &OwnedFd, frame: &[u8]) -> bool {
    // SAFETY: send reads `frame.len()` bytes of a live slice.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    n == frame.len() as isize
}

fn echo_loop(sock: OwnedFd, shared: Arc<Mutex<Shared>>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd that lives for the call.
        unsafe { libc::poll(&mut p, 1, 20) };
        {
            let mut s = lock(&shared);
            if !s.hold && !s.backlog.is_empty() {
                for f in std::mem::take(&mut s.backlog) {
                    echo(&sock, &mut s.stats, &f);
                }
            }
        }
        loop {
            // SAFETY: zeroed sockaddr_ll is a valid value of a plain C struct.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: recvfrom writes at most `buf.len()` bytes and one sockaddr_ll, both
            // live for the call.
            let n = unsafe {
                libc::recvfrom(
                    sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n <= 0 {
                break;
            }
            // Our own echoes come back to a packet socket as outgoing: not the guest's.
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..n as usize];
            let Some(number) = frame_number(frame) else {
                continue;
            };
            let mut s = lock(&shared);
            s.stats.received += 1;
            s.stats.received_sum = s.stats.received_sum.wrapping_add(number);
            if s.hold {
                s.backlog.push(frame.to_vec());
            } else {
                echo(&sock, &mut s.stats, frame);
            }
        }
    }
}

fn echo(sock: &OwnedFd, stats: &mut EchoStats, frame: &[u8]) {
    let mut out = frame.to_vec();
    out.copy_within(6..12, 0);
    out[6..12].copy_from_slice(&PEER_MAC);
    let number = frame_number(frame).unwrap_or(0);
    if send(sock, &out) {
        stats.sent += 1;
        stats.sent_sum = stats.sent_sum.wrapping_add(number);
    } else {
        stats.send_errors += 1;
    }
}

/// Waits until `f` holds, polling every 10 ms, for at most `timeout`.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_numbers_are_checked() {
        let mut f = vec![0xffu8; 6];
        f.extend([2, 0, 0, 0, 0, 1]);
        f.extend(ETHERTYPE.to_be_bytes());
        f.extend(FRAME_MAGIC);
        f.extend(41u64.to_le_bytes());
        f.extend((!41u64).to_le_bytes());
        f.resize(60, 0);
        assert_eq!(frame_number(&f), Some(41));
        let mut bad = f.clone();
        bad[30] ^= 1;
        assert_eq!(frame_number(&bad), None);
        let mut other = f.clone();
        other[12] = 0x08;
        assert_eq!(frame_number(&other), None);
        assert_eq!(frame_number(&f[..30]), None);
    }
}
