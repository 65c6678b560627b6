// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The virtio-net device through a driver written here (what a guest's driver does, in the
//! guest's memory), on a real tap in a network namespace this test creates (and which goes
//! with it), with an echo peer on the tap: frames go out and come back, a pause sends every
//! frame offered before it returns, a reboot's state carries the frames queued in the tap,
//! a restore takes only its own tap and sane state, and a hostile driver's buffers are
//! dropped, never followed outside guest memory. Skips, saying so, without root or
//! `/dev/net/tun`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_reference::netlab::{available, frame_number, EchoPeer, NetNs, ETHERTYPE, FRAME_MAGIC};
use vmm_reference::virtio_net::{open_tap, Net, NetError, NetSection, DEFAULT_MAC, HDR};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const RX: u64 = 0x1000;
const TX: u64 = 0x2000;
const RXBUF: u64 = 0x10000;
const TXBUF: u64 = 0x20000;
const QSIZE: u16 = 8;
const WRITE: u16 = 2;
const T: Duration = Duration::from_secs(60);

fn w32(dev: &Net, off: u64, v: u32) {
    dev.mmio_write(off, &v.to_le_bytes());
}

fn r32(dev: &Net, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.mmio_read(off, &mut b);
    u32::from_le_bytes(b)
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

/// A namespace with a persistent, up tap and an echo peer on it, or `None` after saying
/// why the test skips.
fn lab(tap: &str) -> Option<(NetNs, EchoPeer)> {
    if let Err(why) = available() {
        vmm_reference::demo::skipped(format!("virtio-net on a tap: {why}"));
        return None;
    }
    let ns = NetNs::new().unwrap();
    ns.add_tap(tap).unwrap();
    let peer = EchoPeer::start(&ns, tap).unwrap();
    Some((ns, peer))
}

fn tap_in(ns: &NetNs, name: &str) -> std::fs::File {
    let n = name.to_string();
    ns.run(move || open_tap(&n)).unwrap().unwrap()
}

struct Driver {
    mem: GuestMemoryMmap,
    dev: Arc<Net>,
    rx_avail: u16,
    rx_seen: u16,
    tx_avail: u16,
}

impl Driver {
    fn init(mem: GuestMemoryMmap, dev: Arc<Net>) -> Driver {
        assert_eq!(r32(&dev, 0), 0x7472_6976, "magic");
        assert_eq!(r32(&dev, 8), 1, "a network device");
        w32(&dev, 0x70, 0);
        w32(&dev, 0x70, 1 | 2);
        w32(&dev, 0x14, 0);
        assert_ne!(r32(&dev, 0x10) & (1 << 5), 0, "MAC offered");
        w32(&dev, 0x24, 1);
        w32(&dev, 0x20, 1);
        w32(&dev, 0x24, 0);
        w32(&dev, 0x20, 1 << 5);
        w32(&dev, 0x70, 1 | 2 | 8);
        assert_eq!(r32(&dev, 0x70) & 8, 8, "FEATURES_OK kept");
        for (q, base) in [(0, RX), (1, TX)] {
            w32(&dev, 0x30, q);
            w32(&dev, 0x38, u32::from(QSIZE));
            for (off, addr) in [(0x80, base), (0x90, base + 0x400), (0xa0, base + 0x800)] {
                w32(&dev, off, addr as u32);
                w32(&dev, off + 4, 0);
            }
            w32(&dev, 0x44, 1);
        }
        w32(&dev, 0x70, 1 | 2 | 8 | 4);
        Driver::attach(mem, dev, (0, 0, 0))
    }

    fn attach(mem: GuestMemoryMmap, dev: Arc<Net>, idx: (u16, u16, u16)) -> Driver {
        Driver {
            mem,
            dev,
            rx_avail: idx.0,
            rx_seen: idx.1,
            tx_avail: idx.2,
        }
    }

    fn desc(&self, base: u64, i: u16, addr: u64, len: u32, flags: u16) {
        let d = base + u64::from(i % QSIZE) * 16;
        self.mem.write_obj(addr, GuestAddress(d)).unwrap();
        self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
    }

    fn push(&self, base: u64, idx: &mut u16, head: u16) {
        let at = base + 0x400 + 4 + u64::from(*idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(at)).unwrap();
        *idx = idx.wrapping_add(1);
        self.mem
            .write_obj(*idx, GuestAddress(base + 0x402))
            .unwrap();
    }

    /// Gives the device `n` receive buffers of `len` bytes.
    fn post(&mut self, n: u16, len: u32) {
        for _ in 0..n {
            let slot = self.rx_avail % QSIZE;
            self.desc(RX, slot, RXBUF + u64::from(slot) * 0x800, len, WRITE);
            let mut idx = self.rx_avail;
            self.push(RX, &mut idx, slot);
            self.rx_avail = idx;
        }
    }

    /// Offers demo frame `number` for sending (no notify).
    fn offer(&mut self, number: u64) {
        let slot = self.tx_avail % QSIZE;
        let mut f = vec![0u8; HDR];
        f.extend([0xff; 6]);
        f.extend(DEFAULT_MAC);
        f.extend(ETHERTYPE.to_be_bytes());
        f.extend(FRAME_MAGIC);
        f.extend(number.to_le_bytes());
        f.extend((!number).to_le_bytes());
        f.resize(HDR + 60, 0);
        let at = TXBUF + u64::from(slot) * 0x800;
        self.mem.write_slice(&f, GuestAddress(at)).unwrap();
        self.desc(TX, slot, at, f.len() as u32, 0);
        let mut idx = self.tx_avail;
        self.push(TX, &mut idx, slot);
        self.tx_avail = idx;
    }

    fn used_idx(&self, base: u64) -> u16 {
        self.mem.read_obj(GuestAddress(base + 0x802)).unwrap()
    }

    /// The frames received since the last call: (length written, frame number if a demo
    /// frame, header's num_buffers).
    fn take(&mut self) -> Vec<(u32, Option<u64>, u16)> {
        let mut out = vec![];
        while self.rx_seen != self.used_idx(RX) {
            let e = RX + 0x800 + 4 + u64::from(self.rx_seen % QSIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            let mut buf = vec![0u8; len as usize];
            let at = RXBUF + u64::from(id) * 0x800;
            self.mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
            let nb = if buf.len() >= HDR {
                u16::from_le_bytes([buf[10], buf[11]])
            } else {
                0
            };
            out.push((len, buf.get(HDR..).and_then(frame_number), nb));
            self.rx_seen = self.rx_seen.wrapping_add(1);
        }
        out
    }

    /// Receives until `n` demo frames came (the tap delivers asynchronously).
    fn receive_numbers(&mut self, n: usize) -> Vec<u64> {
        let start = Instant::now();
        let mut got = vec![];
        while got.len() < n {
            self.dev.receive();
            got.extend(self.take().into_iter().filter_map(|(_, num, _)| num));
            assert!(start.elapsed() < T, "{n} frames, got {got:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
        got
    }
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < T, "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn frames_go_out_and_their_echoes_come_back_with_an_interrupt() {
    let Some((ns, peer)) = lab("cprnt0") else {
        return;
    };
    let mem = memory();
    let dev = Net::new(tap_in(&ns, "cprnt0"), DEFAULT_MAC, mem.clone()).unwrap();
    assert_eq!(dev.tap_name(), "cprnt0");
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    dev.set_irq(irq.try_clone().unwrap());
    let mut d = Driver::init(mem, dev.clone());
    let mut mac = [0u8; 6];
    dev.mmio_read(0x100, &mut mac);
    assert_eq!(mac, DEFAULT_MAC, "config space holds the MAC");
    d.post(8, 0x800);
    for n in 0..3 {
        d.offer(n);
    }
    assert_eq!(dev.transmit(), 3);
    assert_eq!(d.used_idx(TX), 3);
    assert!(irq.read().is_ok(), "a used buffer raises the line");
    assert_eq!(r32(&dev, 0x60) & 1, 1, "and sets the interrupt status");
    wait("the peer echoes 3", || peer.stats().sent == 3);
    assert_eq!(d.receive_numbers(3), [0, 1, 2], "in order, each once");
    let c = dev.counters();
    assert_eq!((c.tx, c.tx_dropped, c.rx_dropped), (3, 0, 0));
    assert!(c.rx >= 3);
    // The header is written whole: num_buffers 1, and the frame after it.
    d.offer(3);
    dev.transmit();
    wait("the peer echoes 4", || peer.stats().sent == 4);
    let start = Instant::now();
    let mut seen = vec![];
    while !seen.iter().any(|(_, n, _)| *n == Some(3)) {
        dev.receive();
        seen.extend(d.take());
        assert!(start.elapsed() < T);
    }
    let (len, _, nb) = seen.into_iter().find(|(_, n, _)| *n == Some(3)).unwrap();
    assert_eq!((len as usize, nb), (HDR + 60, 1));
    drop(ns);
}

#[test]
fn a_pause_sends_every_frame_offered_before_it_returns() {
    let Some((ns, peer)) = lab("cprnt1") else {
        return;
    };
    let mem = memory();
    let dev = Net::new(tap_in(&ns, "cprnt1"), DEFAULT_MAC, mem.clone()).unwrap();
    let worker = dev.spawn_worker();
    let mut d = Driver::init(mem, dev.clone());
    for n in 0..5 {
        d.offer(n);
    }
    let drain = dev.pause(T).unwrap();
    assert_eq!(d.used_idx(TX), 5, "all five sent before the pause returned");
    assert_eq!(dev.counters().tx, 5);
    // Parked: a frame offered now waits for the resume, even with a notify.
    d.offer(5);
    w32(&dev, 0x50, 1);
    let save = dev.save();
    assert_eq!(
        save.queues[1].next_avail, 5,
        "the state says what was taken"
    );
    dev.resume();
    wait("sent after the resume", || d.used_idx(TX) == 6);
    wait("the peer got six", || peer.stats().received == 6);
    assert!(drain < T);
    dev.stop();
    worker.join().unwrap();
}

#[test]
fn a_reboot_state_carries_the_frames_queued_in_the_tap() {
    let Some((ns, peer)) = lab("cprnt2") else {
        return;
    };
    let mem = memory();
    let dev = Net::new(tap_in(&ns, "cprnt2"), DEFAULT_MAC, mem.clone()).unwrap();
    let mut d = Driver::init(mem.clone(), dev.clone());
    // No receive buffers: the echoes queue in the tap.
    for n in 0..5 {
        d.offer(n);
    }
    dev.transmit();
    wait("the peer echoes 5", || peer.stats().sent == 5);
    assert_eq!(dev.receive(), 0, "nowhere to put them");
    let mut held = 0;
    wait("five queued in the tap", || {
        held += dev.hold_queued();
        held >= 5
    });
    // Closed to new frames now: echoes of two more are refused, and the peer knows.
    d.offer(5);
    d.offer(6);
    dev.transmit();
    wait("two refused", || peer.stats().send_errors == 2);
    assert_eq!(peer.stats().sent, 5);
    assert_eq!(dev.hold_queued(), 0);
    let state = dev.save();
    assert_eq!(state.held.len(), 5);
    let idx = (d.rx_avail, d.rx_seen, d.tx_avail);
    drop(d);
    drop(dev);

    // The new image, on the same (persistent) tap found by name.
    let dev = Net::restore(&state, tap_in(&ns, "cprnt2"), mem.clone()).unwrap();
    assert_eq!(dev.held(), 5);
    let mut d = Driver::attach(mem, dev.clone(), idx);
    d.post(8, 0x800);
    assert_eq!(
        d.receive_numbers(5),
        [0, 1, 2, 3, 4],
        "none lost, none twice"
    );
    assert_eq!(dev.held(), 0);
    // The new device opened the tap again: traffic goes on from there.
    d.offer(7);
    dev.transmit();
    assert_eq!(d.receive_numbers(1), [7]);
    assert_eq!(peer.stats().sent, 6);
}

#[test]
fn a_restore_takes_only_its_own_tap_and_sane_state() {
    let Some((ns, _peer)) = lab("cprnt3") else {
        return;
    };
    ns.add_tap("cprnt3b").unwrap();
    let mem = memory();
    let dev = Net::new(tap_in(&ns, "cprnt3"), DEFAULT_MAC, mem.clone()).unwrap();
    let _d = Driver::init(mem.clone(), dev.clone());
    let good = dev.save();
    drop(_d);
    drop(dev);
    let err = Net::restore(&good, tap_in(&ns, "cprnt3b"), mem.clone()).unwrap_err();
    assert!(matches!(err, NetError::Tap(_)), "{err}");
    let err = Net::restore(&good, tempfile::tempfile().unwrap(), mem.clone()).unwrap_err();
    assert!(matches!(err, NetError::Tap(_)), "not a tap at all: {err}");
    let mangle: [fn(&mut NetSection); 7] = [
        |s| {
            s.mac.pop();
        },
        |s| s.counters.push(1),
        |s| s.held = vec![vec![0; 65_537]],
        |s| s.held = vec![vec![]; 1025],
        |s| s.queues.truncate(1),
        |s| s.queues[0].desc_table = 1 << 40,
        |s| s.driver_features |= 1 << 40,
    ];
    for m in mangle {
        let mut s = good.clone();
        m(&mut s);
        let err = Net::restore(&s, tap_in(&ns, "cprnt3"), mem.clone()).unwrap_err();
        assert!(matches!(err, NetError::State(_)), "{s:?}: {err}");
    }
    Net::restore(&good, tap_in(&ns, "cprnt3"), mem).unwrap();
}

#[test]
fn a_hostile_drivers_buffers_are_dropped_not_followed() {
    let Some((ns, peer)) = lab("cprnt4") else {
        return;
    };
    let mem = memory();
    let dev = Net::new(tap_in(&ns, "cprnt4"), DEFAULT_MAC, mem.clone()).unwrap();
    let mut d = Driver::init(mem, dev.clone());
    // A frame to send that the device may not read: write-only; and one outside memory.
    d.offer(0);
    d.desc(TX, 0, TXBUF, 72, WRITE);
    d.offer(1);
    d.desc(TX, 1, (1 << 20) - 16, 72, 0);
    d.offer(2);
    assert_eq!(dev.transmit(), 3, "every chain is given back");
    let c = dev.counters();
    assert_eq!((c.tx, c.tx_dropped), (1, 2));
    wait("the good one echoed", || peer.stats().sent == 1);
    // Receive buffers too small for the echo, then one outside memory, then a good one.
    d.post(1, 20);
    let slot = d.rx_avail % QSIZE;
    d.post(1, 0x800);
    d.desc(RX, slot, (1 << 20) - 16, 0x800, WRITE);
    d.post(1, 0x800);
    let start = Instant::now();
    let mut got = vec![];
    while got.len() < 3 {
        dev.receive();
        got.extend(d.take());
        assert!(start.elapsed() < T, "{got:?}");
        if got.len() < 3 {
            // More frames for the remaining buffers.
            d.offer(9);
            dev.transmit();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(got[0].0, 0, "too small: returned empty");
    assert_eq!(got[1].0, 0, "outside memory: returned empty");
    assert!(
        got[2].0 as usize > HDR,
        "a good buffer gets a frame: {got:?}"
    );
    assert!(dev.counters().rx_dropped >= 2);
}
