// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A virtio-net device on the virtio-mmio transport (version 2) on a tap device, built on
//! rust-vmm's virtio-queue, whose frames may be in flight when an update pauses.
//!
//! Queue 0 receives, queue 1 transmits; no offloads are offered, so every buffer starts
//! with the 12-byte `virtio_net_hdr_v1` and the device writes it zeroed (one buffer per
//! frame). The tap is opened `IFF_TAP | IFF_NO_PI`, non-blocking.
//!
//! A worker thread serves both queues: the driver's `QueueNotify` wakes it, and so does a
//! frame arriving at the tap while the driver has receive buffers. **In-flight rules**:
//! - *Transmit*: [`Net::pause`] makes the worker send every frame the driver made
//!   available, then park; the captured queue indices say which frames were sent, and
//!   none is sent twice.
//! - *Receive*: a frame is read from the tap only when a receive buffer is there for it,
//!   and read, written into the buffer and put in the used ring in one step of the worker,
//!   so at a pause no frame is held in the VMM: frames not yet received stay queued in the
//!   tap, whose fd is kept across restart and transfer, for the next image to read.
//! - *Reboot*: the tap's queue does not outlive its last fd, so a reboot's save first reads
//!   every frame queued there (at most [`MAX_HELD`]) into the state, and the new image
//!   delivers those before anything it reads itself.
//!
//! Hostile drivers: chains are walked by virtio-queue (bounded, loops cut), every guest
//! address goes through vm-memory, a frame to send is at most [`MAX_FRAME`] bytes, and a
//! receive buffer too small or outside guest memory is returned with length 0 and the
//! frame counted as dropped.
//!
//! The reference VMM attaches it with `--net tap=NAME` or `--net fd=N` at
//! [`NET_BASE`](crate::machine::NET_BASE).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpr_snapshot::prelude::*;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::gate::lock;
use crate::virtio_mmio::{
    MmioDevice, QueueSection, Transport, TransportState, Worker, F_VERSION_1, QUEUE_NOTIFY,
};

/// Largest queue.
pub const QUEUE_MAX: u16 = 256;
/// Largest frame sent or received, without the virtio header.
pub const MAX_FRAME: usize = 65_536;
/// Most frames a reboot carries from the tap's queue in the state.
pub const MAX_HELD: usize = 1024;
/// Bytes of `virtio_net_hdr_v1`.
pub const HDR: usize = 12;
const RX: usize = 0;
const TX: usize = 1;
const VIRTIO_ID_NET: u32 = 1;
const F_NET_MAC: u64 = 1 << 5;
const FEATURES: u64 = F_VERSION_1 | F_NET_MAC;
/// The MAC address a device gets when the command line names none.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The device's state, saved as section `virtio-net`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Section)]
#[section(name = "virtio-net")]
pub struct NetSection {
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`, `DriverFeaturesSel`, `QueueSel`.
    pub selectors: Vec<u32>,
    /// Interrupt status (used-ring notifications not yet acknowledged).
    pub interrupt_status: u32,
    /// Receive queue, transmit queue.
    pub queues: Vec<QueueSection>,
    /// The MAC address in the config space.
    pub mac: Vec<u8>,
    /// The tap's interface name: compared with the tap found again, never opened from here.
    pub tap: String,
    /// Frames sent, received, and dropped each way since the device was created.
    pub counters: Vec<u64>,
    /// Frames read from the tap and not yet received by the driver (carried by a reboot).
    pub held: Vec<Vec<u8>>,
}

/// Why a device cannot be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap device.
    #[error("tap: {0}")]
    Tap(String),
    /// A saved state that this device cannot take.
    #[error("virtio-net state: {0}")]
    State(String),
    /// A system call.
    #[error("virtio-net: {0}")]
    Io(#[from] std::io::Error),
}

/// Frame counters, carried across updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames sent to the tap.
    pub tx: u64,
    /// Frames the driver offered that could not be sent (malformed, or the tap refused).
    pub tx_dropped: u64,
    /// Frames put in the driver's receive buffers.
    pub rx: u64,
    /// Frames read from the tap that no buffer could take.
    pub rx_dropped: u64,
}

#[derive(Debug)]
struct Regs {
    t: Transport,
    counters: NetCounters,
    held: VecDeque<Vec<u8>>,
    /// The last receive pass stopped for want of buffers (so the tap is not polled).
    starved: bool,
    /// Where frames are read from the tap, allocated once ([`MAX_FRAME`] bytes).
    scratch: Vec<u8>,
}

/// The device, shared by the vCPUs (MMIO) and its worker.
#[derive(Debug)]
pub struct Net {
    regs: Mutex<Regs>,
    mem: GuestMemoryMmap,
    tap: File,
    name: String,
    mac: [u8; 6],
    worker: Worker,
}

/// Test builds (`fault-injection`): `CPR_NET_DELAY_US` makes sending each frame take that
/// long, at most 100 ms, so that frames are in flight when an update pauses.
pub fn test_delay() -> Duration {
    crate::virtio_mmio::test_delay("CPR_NET_DELAY_US")
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETTXFILTER: libc::c_ulong = 0x4004_54d1;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_PERSIST: libc::c_short = 0x0800;

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name and the flags.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> IfReq {
        let mut r = IfReq {
            name: [0; 16],
            flags,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Checks an interface name as the kernel would take it: 1 to 15 bytes, none of them
/// `/`, `:`, whitespace or NUL, and not `.` or `..`.
pub fn check_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(NetError::Tap(format!(
            "`{name}` is not an interface name (1-15 printable bytes, no `/` or `:`)"
        )))
    }
}

fn ioctl_ifreq(fd: BorrowedFd<'_>, req: libc::c_ulong, ifr: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: `ifr` is a valid, writable `struct ifreq`-sized buffer for the call; the tun
    // ioctls read and write no more than that.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, ifr as *mut IfReq) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens (or creates, if it does not exist) the tap interface `name` in this process's
/// network namespace, non-blocking and close-on-exec.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    check_name(name)?;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| NetError::Tap(format!("/dev/net/tun: {e}")))?;
    let mut ifr = IfReq::new(name, IFF_TAP | IFF_NO_PI);
    ioctl_ifreq(f.as_fd(), TUNSETIFF, &mut ifr)
        .map_err(|e| NetError::Tap(format!("attach to `{name}`: {e}")))?;
    Ok(f)
}

/// The interface a tap fd is attached to and whether it is a persistent one; fails if the
/// fd is not an attached tap (`IFF_TAP`, `IFF_NO_PI`).
pub fn tap_info(f: impl AsFd) -> Result<(String, bool), NetError> {
    let mut ifr = IfReq::new("", 0);
    ioctl_ifreq(f.as_fd(), TUNGETIFF, &mut ifr)
        .map_err(|e| NetError::Tap(format!("not an attached tun/tap fd: {e}")))?;
    if ifr.flags & IFF_TAP == 0 || ifr.flags & IFF_NO_PI == 0 {
        return Err(NetError::Tap(format!(
            "`{}` is not a tap opened IFF_TAP|IFF_NO_PI (flags {:#x})",
            ifr.name(),
            ifr.flags
        )));
    }
    Ok((ifr.name(), ifr.flags & IFF_PERSIST != 0))
}

/// Takes the tap fd number `fd` this process inherited (`--net fd=N`): checks, without
/// taking it, that it is an attached tap, then owns it (close-on-exec, non-blocking).
/// Anything else (not open, not a tap) is refused and left alone, so a wrong number can
/// never close or claim an fd of this process's own.
pub fn tap_from_inherited(fd: RawFd) -> Result<File, NetError> {
    // SAFETY: F_GETFD only asks whether the number is an open fd.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(NetError::Tap(format!("--net fd={fd}: not an open fd")));
    }
    // SAFETY: `fd` is open (checked above); it is only borrowed for the check, within this
    // call, and not closed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    tap_info(borrowed).map_err(|e| NetError::Tap(format!("--net fd={fd}: {e}")))?;
    // SAFETY: `fd` is an attached tap (checked above). This process attaches taps only
    // through `open_tap`, whose fds are not taken from numbers, so this one is the fd the
    // operator passed in, and it is taken once.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: F_SETFD/F_GETFL/F_SETFL on the fd now owned here. Close-on-exec: a restart
    // hands it over itself.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0
            || fl < 0
            || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0
        {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(f)
}

/// `struct tun_filter` with room for one address.
#[repr(C)]
struct TunFilter {
    flags: u16,
    count: u16,
    addr: [u8; 6],
}

/// Sets the tap's transmit filter: `closed`, frames the host sends towards the guest are
/// dropped by the tap itself (one exact address, 00:00:00:00:00:00, that no frame is for;
/// the sender sees the drop), or, open, none are.
fn set_intake(tap: &File, closed: bool) -> std::io::Result<()> {
    let f = TunFilter {
        flags: 0,
        count: u16::from(closed),
        addr: [0; 6],
    };
    // SAFETY: TUNSETTXFILTER reads a tun_filter header and `count` addresses from this
    // struct, which holds that many and lives for the call.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETTXFILTER as _, &f as *const TunFilter) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the persistent tap `name` (as `ip tuntap add mode tap` does) in the calling
/// thread's network namespace, for the tests and the demo, which then own its removal.
pub fn create_persistent_tap(name: &str) -> Result<(), NetError> {
    let f = open_tap(name)?;
    // SAFETY: TUNSETPERSIST takes an integer argument, not a pointer.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
        return Err(NetError::Tap(format!(
            "make `{name}` persistent: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("`{s}` is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!("`{s}` is not a MAC address (aa:bb:cc:dd:ee:ff)"));
        }
        *m = u8::from_str_radix(p, 16)
            .map_err(|_| format!("`{s}` is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("`{s}` is a multicast address"));
    }
    Ok(mac)
}

impl Net {
    /// A device on the tap `tap` (an attached, non-blocking tap fd) with MAC `mac`.
    pub fn new(tap: File, mac: [u8; 6], mem: GuestMemoryMmap) -> Result<Arc<Net>, NetError> {
        let (name, _) = tap_info(&tap)?;
        // The device owns the tap's filter: a reboot's save closed it (see hold_queued).
        set_intake(&tap, false).map_err(|e| NetError::Tap(format!("TUNSETTXFILTER: {e}")))?;
        let t = Transport::new(VIRTIO_ID_NET, FEATURES, 2, QUEUE_MAX).map_err(NetError::State)?;
        Ok(Arc::new(Net {
            regs: Mutex::new(Regs {
                t,
                counters: NetCounters::default(),
                held: VecDeque::new(),
                starved: false,
                scratch: vec![0; MAX_FRAME],
            }),
            mem,
            tap,
            name,
            mac,
            worker: Worker::new()?,
        }))
    }

    /// The same device with sending each frame taking `delay` (tests keep frames in flight).
    pub fn with_delay(self: Arc<Self>, delay: Duration) -> Arc<Net> {
        self.worker.set_delay(delay);
        self
    }

    /// A driver's read at `offset` in the MMIO window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.regs).t.read(offset, data, &self.mac);
    }

    /// A driver's write at `offset`.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset == QUEUE_NOTIFY {
            self.worker.kick();
            return;
        }
        lock(&self.regs).t.write(offset, data);
    }

    /// Sends every frame the driver made available; returns how many chains were used.
    pub fn transmit(&self) -> usize {
        let mut done = 0;
        loop {
            let (head, descs) = {
                let mut r = lock(&self.regs);
                let Some(q) = r.t.ready_queue(TX, &self.mem) else {
                    return done;
                };
                match q.pop_descriptor_chain(&self.mem) {
                    Some(chain) => (chain.head_index(), chain.collect::<Vec<_>>()),
                    None => return done,
                }
            };
            self.worker.throttle();
            let sent = self.gather(&descs).is_some_and(|frame| {
                frame.len() > HDR
                    && (&self.tap)
                        .write(&frame[HDR..])
                        .is_ok_and(|n| n == frame.len() - HDR)
            });
            let mut r = lock(&self.regs);
            if sent {
                r.counters.tx += 1;
            } else {
                r.counters.tx_dropped += 1;
            }
            let Some(q) = r.t.ready_queue(TX, &self.mem) else {
                return done;
            };
            if q.add_used(&self.mem, head, 0).is_err() {
                return done;
            }
            r.t.signal_used();
            self.worker.count();
            done += 1;
        }
    }

    /// The bytes of a transmit chain (header included), or `None` if it is not one.
    fn gather(&self, descs: &[virtio_queue::desc::split::Descriptor]) -> Option<Vec<u8>> {
        let mut frame = Vec::new();
        for d in descs {
            let len = d.len() as usize;
            if d.is_write_only() || frame.len() + len > HDR + MAX_FRAME {
                return None;
            }
            let at = frame.len();
            frame.resize(at + len, 0);
            self.mem.read_slice(&mut frame[at..], d.addr()).ok()?;
        }
        Some(frame)
    }

    /// Puts frames (held ones first, then the tap's) into the driver's receive buffers
    /// while there are both; returns how many buffers were used.
    pub fn receive(&self) -> usize {
        let mut done = 0;
        loop {
            let mut guard = lock(&self.regs);
            let r = &mut *guard;
            let Some(q) = r.t.ready_queue(RX, &self.mem) else {
                return done;
            };
            let avail = q.avail_idx(&self.mem, Ordering::Acquire).map(|a| a.0);
            if avail.is_err() || avail.is_ok_and(|a| a == q.next_avail()) {
                r.starved = true;
                return done;
            }
            r.starved = false;
            let frame = match r.held.pop_front() {
                Some(f) => f,
                None => match self.read_frame(&mut r.scratch) {
                    Some(f) => f,
                    None => return done,
                },
            };
            let Some(chain) = q.pop_descriptor_chain(&self.mem) else {
                // An available index the ring cannot back (hostile): the frame goes back.
                r.held.push_front(frame);
                r.starved = true;
                return done;
            };
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let len = self.scatter(&descs, &frame);
            if len == 0 {
                r.counters.rx_dropped += 1;
            } else {
                r.counters.rx += 1;
            }
            let Some(q) = r.t.ready_queue(RX, &self.mem) else {
                return done;
            };
            if q.add_used(&self.mem, head, len).is_err() {
                return done;
            }
            r.t.signal_used();
            done += 1;
        }
    }

    /// Writes a zeroed header and `frame` into a receive chain; the bytes written, or 0 if
    /// the chain cannot take all of it.
    fn scatter(&self, descs: &[virtio_queue::desc::split::Descriptor], frame: &[u8]) -> u32 {
        let room: u64 = descs
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        if descs.iter().any(|d| !d.is_write_only()) || room < (HDR + frame.len()) as u64 {
            return 0;
        }
        // virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
        // num_buffers = 1.
        let mut hdr = [0u8; HDR];
        hdr[10] = 1;
        let mut bytes = hdr.iter().chain(frame).copied();
        let mut total = 0u32;
        for d in descs {
            let chunk: Vec<u8> = bytes.by_ref().take(d.len() as usize).collect();
            if chunk.is_empty() {
                break;
            }
            if self.mem.write_slice(&chunk, d.addr()).is_err() {
                return 0;
            }
            total += chunk.len() as u32;
        }
        total
    }

    /// Starts the worker on a new thread.
    pub fn spawn_worker(self: &Arc<Self>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(self.worker())
    }

    /// The worker's loop, for a thread of its own.
    pub fn worker(self: &Arc<Self>) -> Box<dyn FnOnce() + Send + 'static> {
        let n = self.clone();
        Box::new(move || {
            let wait = || {
                let starved = lock(&n.regs).starved;
                let mut fds = [
                    libc::pollfd {
                        fd: n.worker.wake_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: n.tap.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                let count = if starved { 1 } else { 2 };
                // SAFETY: `count` valid pollfds that live for the call.
                unsafe { libc::poll(fds.as_mut_ptr(), count, 50) };
                n.worker.take_wake();
            };
            let step = || {
                n.transmit();
                n.receive();
            };
            // In-flight rule: every frame offered for sending is sent before parking.
            n.worker.run(wait, step, || n.transmit());
        })
    }

    /// Sends what the driver offered and parks the worker; how long that took.
    pub fn pause(&self, timeout: Duration) -> Result<Duration, NetError> {
        self.worker.pause(timeout).map_err(NetError::State)
    }

    /// Lets the worker serve again (and the tap take frames again, if a reboot's save that
    /// then failed had closed it).
    pub fn resume(&self) {
        if let Err(e) = set_intake(&self.tap, false) {
            log::warn!("virtio-net: reopening the tap: {e}");
        }
        self.worker.resume();
    }

    /// Ends the worker.
    pub fn stop(&self) {
        self.worker.stop();
    }

    /// What the last pause's drain completed: the requests (frames) in flight then.
    pub fn last_drained(&self) -> u64 {
        self.worker.last_drained()
    }

    /// For a reboot (call it paused): closes the tap to new frames (its filter drops them,
    /// and a sender on the host sees each one refused) and reads every frame already queued
    /// there into the state to be saved, since the tap's queue ends with its last fd. So
    /// no frame the host handed to the tap is lost: each is either refused or carried.
    /// Returns how many were carried; past [`MAX_HELD`] the rest stay in the tap and are
    /// lost with it. [`resume`](Self::resume) (a failed update) and the next image's
    /// device open the tap again.
    pub fn hold_queued(&self) -> usize {
        if let Err(e) = set_intake(&self.tap, true) {
            log::warn!("virtio-net: closing the tap to new frames: {e}");
        }
        let mut guard = lock(&self.regs);
        let r = &mut *guard;
        let mut n = 0;
        while r.held.len() < MAX_HELD {
            let Some(frame) = self.read_frame(&mut r.scratch) else {
                break;
            };
            r.held.push_back(frame);
            n += 1;
        }
        n
    }

    /// The next frame queued in the tap, read through `scratch`; `None` when there is none.
    fn read_frame(&self, scratch: &mut [u8]) -> Option<Vec<u8>> {
        match (&self.tap).read(scratch) {
            Ok(n) if n > 0 => Some(scratch[..n].to_vec()),
            _ => None,
        }
    }

    /// The state (call it paused).
    pub fn save(&self) -> NetSection {
        let r = lock(&self.regs);
        let t = r.t.save();
        let c = r.counters;
        NetSection {
            status: t.status,
            driver_features: t.driver_features,
            selectors: t.selectors,
            interrupt_status: t.interrupt_status,
            queues: t.queues,
            mac: self.mac.to_vec(),
            tap: self.name.clone(),
            counters: vec![c.tx, c.tx_dropped, c.rx, c.rx_dropped],
            held: r.held.iter().cloned().collect(),
        }
    }

    /// The device again from `state` on `tap`, which must be attached to the interface
    /// the state was saved with, in guest memory `mem`.
    pub fn restore(
        state: &NetSection,
        tap: File,
        mem: GuestMemoryMmap,
    ) -> Result<Arc<Net>, NetError> {
        let (name, _) = tap_info(&tap)?;
        if name != state.tap {
            return Err(NetError::Tap(format!(
                "attached to `{name}`, but the state was saved on `{}`",
                state.tap
            )));
        }
        let mac: [u8; 6] = state
            .mac
            .as_slice()
            .try_into()
            .map_err(|_| NetError::State(format!("a MAC of {} bytes", state.mac.len())))?;
        let [tx, tx_dropped, rx, rx_dropped] = state.counters[..] else {
            return Err(NetError::State(format!(
                "{} counters, not 4",
                state.counters.len()
            )));
        };
        if state.held.len() > MAX_HELD || state.held.iter().any(|f| f.len() > MAX_FRAME) {
            return Err(NetError::State(format!(
                "{} held frames (at most {MAX_HELD} of at most {MAX_FRAME} bytes)",
                state.held.len()
            )));
        }
        let n = Net::new(tap, mac, mem)?;
        {
            let mut r = lock(&n.regs);
            let t = TransportState {
                status: state.status,
                driver_features: state.driver_features,
                selectors: state.selectors.clone(),
                interrupt_status: state.interrupt_status,
                queues: state.queues.clone(),
            };
            r.t.restore(&t, &n.mem).map_err(NetError::State)?;
            r.counters = NetCounters {
                tx,
                tx_dropped,
                rx,
                rx_dropped,
            };
            r.held = state.held.iter().cloned().collect();
        }
        Ok(n)
    }

    /// A duplicate of the tap fd, to hand over.
    pub fn tap_fd(&self) -> std::io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.tap.as_fd().try_clone_to_owned()
    }

    /// The interface name.
    pub fn tap_name(&self) -> &str {
        &self.name
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Frame counters since the device was first created.
    pub fn counters(&self) -> NetCounters {
        lock(&self.regs).counters
    }

    /// Frames held for the driver (from a reboot's state).
    pub fn held(&self) -> usize {
        lock(&self.regs).held.len()
    }

    /// Gives the device its interrupt line (raised at once if a notification is pending).
    pub fn set_irq(&self, irq: EventFd) {
        lock(&self.regs).t.set_irq(irq);
    }
}

impl MmioDevice for Net {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        Net::mmio_read(self, offset, data)
    }
    fn mmio_write(&self, offset: u64, data: &[u8]) {
        Net::mmio_write(self, offset, data)
    }
    fn pause(&self, timeout: Duration) -> Result<Duration, String> {
        Net::pause(self, timeout).map_err(|e| e.to_string())
    }
    fn resume(&self) {
        Net::resume(self)
    }
    fn stop(&self) {
        Net::stop(self)
    }
    fn set_irq(&self, irq: EventFd) {
        Net::set_irq(self, irq)
    }
    fn hold_irq(&self) {
        lock(&self.regs).t.hold_irq();
    }
    fn release_irq(&self) {
        lock(&self.regs).t.release_irq();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.worker.stop();
    }
}

/// The `virtio_net` fuzz target: a hostile driver on both queues. The first 16 bytes
/// choose each queue's size and areas in a 64 KiB guest and its available index, the
/// rest fill guest memory; then every offered frame is sent, and as many frames as the
/// receive queue takes are received, over a socket pair standing in for the tap (its
/// checks skipped). Returns the chains used. Guest memory is all there is to touch.
pub fn fuzz_driver(data: &[u8]) -> usize {
    const MEM: usize = 64 << 10;
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), MEM)]) else {
        return 0;
    };
    let (head, body) = data.split_at(data.len().min(16));
    let mut h = [0u8; 16];
    h[..head.len()].copy_from_slice(head);
    let n = body.len().min(MEM);
    let _ = mem.write_slice(&body[..n], vm_memory::GuestAddress(0));
    let Ok((ours, peer)) = std::os::unix::net::UnixDatagram::pair() else {
        return 0;
    };
    let _ = ours.set_nonblocking(true);
    let _ = peer.set_nonblocking(true);
    for i in 0..4u8 {
        let _ = peer.send(&[i; 64]);
    }
    let Ok(t) = Transport::new(VIRTIO_ID_NET, FEATURES, 2, QUEUE_MAX) else {
        return 0;
    };
    let Ok(worker) = Worker::new() else {
        return 0;
    };
    let dev = Net {
        regs: Mutex::new(Regs {
            t,
            counters: NetCounters::default(),
            held: VecDeque::new(),
            starved: false,
            scratch: vec![0; MAX_FRAME],
        }),
        mem: mem.clone(),
        tap: File::from(OwnedFd::from(ours)),
        name: "fuzz".into(),
        mac: DEFAULT_MAC,
        worker,
    };
    let area = |i: usize| u32::from(u16::from_le_bytes([h[i], h[i + 1]])) & 0xfffe;
    for (off, v) in [(0x70, 0), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 11)] {
        dev.mmio_write(off, &u32::to_le_bytes(v));
    }
    for q in 0..2u32 {
        let b = 1 + 7 * q as usize;
        let regs = [
            (0x30, q),
            (0x38, 1 << (h[b] % 9)),
            (0x80, area(b + 1)),
            (0x90, area(b + 3)),
            (0xa0, area(b + 5)),
            (0x44, 1),
        ];
        for (off, v) in regs {
            dev.mmio_write(off, &v.to_le_bytes());
        }
    }
    dev.mmio_write(0x70, &15u32.to_le_bytes());
    let _ = mem.write_obj(
        u16::from(h[0]),
        vm_memory::GuestAddress(u64::from(area(11)) + 2),
    );
    dev.transmit() + dev.receive()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_macs_are_checked() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "sixteen-bytes-xx",
            "sp ace",
            "t\u{e9}",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("tap0").unwrap();
        check_name("fifteen-bytes-x").unwrap();
        assert_eq!(
            parse_mac("02:00:00:aa:bb:cc").unwrap(),
            [2, 0, 0, 0xaa, 0xbb, 0xcc]
        );
        for bad in [
            "02:00:00:aa:bb",
            "02:00:00:aa:bb:cc:dd",
            "0g:00:00:00:00:00",
            "01:00:00:00:00:00",
            "2:00:00:00:00:000",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_file_that_is_not_a_tap_is_refused() {
        let f = tempfile::tempfile().unwrap();
        assert!(matches!(tap_info(&f), Err(NetError::Tap(_))));
        // Refused, and left open: the number is not taken.
        let raw = f.as_raw_fd();
        assert!(tap_from_inherited(raw).is_err());
        assert!(f.metadata().is_ok(), "still open");
        assert!(tap_from_inherited(1 << 20).is_err());
    }
}
