// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the reference VMM's virtio devices share: the virtio-mmio (version 2) register
//! file with any number of queues and an interrupt line, its saved form, and the worker
//! thread that parks with the vCPUs.
//!
//! A device ([`Blk`](crate::virtio_blk::Blk), [`Net`](crate::virtio_net::Net)) keeps a
//! [`Transport`] behind its own lock and a [`Worker`] for its thread. `QueueNotify` never
//! takes that lock: it only wakes the worker, so a vCPU's MMIO exit never waits for I/O.
//!
//! **Interrupts.** When a device puts a buffer in a used ring it sets bit 0 of the
//! interrupt status and signals the device's interrupt eventfd, which the machine
//! registers with KVM as an irqfd on the device's GSI. The interrupt status is saved; a
//! restored device whose status still had a notification the driver had not acknowledged
//! signals its new line as soon as it has one ([`Transport::set_irq`]), or, when the
//! machine holds the line while it restores the vCPUs, when it releases it
//! ([`Transport::release_irq`]), so an interrupt that was due before the update is
//! delivered after it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use cpr_snapshot::prelude::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::gate::lock;

/// Bytes of MMIO space a device decodes.
pub const MMIO_SIZE: u64 = 0x200;
/// Offset of `QueueNotify`.
pub const QUEUE_NOTIFY: u64 = 0x050;
/// Offset of the device-specific configuration space.
pub const CONFIG: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x554d_4551;
/// `VIRTIO_F_VERSION_1`: the only transport feature the devices offer.
pub const F_VERSION_1: u64 = 1 << 32;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const INT_USED_RING: u32 = 1;

/// virtio-queue's queue state, as saved.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct QueueSection {
    /// Queue size the driver chose.
    pub size: u16,
    /// Queue ready.
    pub ready: bool,
    /// Descriptor table.
    pub desc_table: u64,
    /// Available ring.
    pub avail_ring: u64,
    /// Used ring.
    pub used_ring: u64,
    /// Next available index to take.
    pub next_avail: u16,
    /// Next used index to fill.
    pub next_used: u16,
}

/// The transport's registers as saved (each device puts them in its own section).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportState {
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`, `DriverFeaturesSel`, `QueueSel`.
    pub selectors: Vec<u32>,
    /// Interrupt status (used-ring notifications not yet acknowledged).
    pub interrupt_status: u32,
    /// The queues, in index order.
    pub queues: Vec<QueueSection>,
}

/// A virtio-mmio register file: identity, features, status, queues, interrupt status.
#[derive(Debug)]
pub struct Transport {
    device_id: u32,
    device_features: u64,
    max: u16,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    queues: Vec<Queue>,
    irq: Option<EventFd>,
    /// Set between [`hold_irq`](Transport::hold_irq) and
    /// [`release_irq`](Transport::release_irq): notifications only set the status.
    irq_held: bool,
}

fn le32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl Transport {
    /// A reset device of type `device_id` offering `features`, with `queues` queues of at
    /// most `max` entries.
    pub fn new(device_id: u32, features: u64, queues: usize, max: u16) -> Result<Self, String> {
        let queues = (0..queues)
            .map(|_| Queue::new(max).map_err(|e| format!("queue of {max}: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Transport {
            device_id,
            device_features: features,
            max,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            queues,
            irq: None,
            irq_held: false,
        })
    }

    /// A driver's read at `offset`; `config` is the device's configuration space.
    pub fn read(&self, offset: u64, data: &mut [u8], config: &[u8]) {
        if offset >= CONFIG {
            // Byte-granular: drivers read fields of 1, 2, 4 or 8 bytes.
            let start = (offset - CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = start
                    .checked_add(i)
                    .and_then(|at| config.get(at))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device_id,
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x034 if q.is_some() => u32::from(self.max),
            0x044 => u32::from(q.is_some_and(|q| q.ready())),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    /// A driver's write at `offset` (not `QueueNotify`, which the device handles without
    /// this lock).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let v = le32(data);
        let offered = self.device_features;
        let sel = self.queue_sel as usize;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x070 => {
                if v == 0 {
                    for q in &mut self.queues {
                        q.reset();
                    }
                    self.status = 0;
                    self.driver_features = 0;
                    self.interrupt_status = 0;
                } else {
                    let mut v = v;
                    // FEATURES_OK only for features the device offered.
                    if v & STATUS_FEATURES_OK != 0 && self.driver_features & !offered != 0 {
                        v &= !STATUS_FEATURES_OK;
                    }
                    self.status = v;
                }
            }
            0x064 => self.interrupt_status &= !v,
            _ => {
                let Some(q) = self.queues.get_mut(sel) else {
                    return;
                };
                match offset {
                    0x038 => q.set_size(v.min(u32::from(u16::MAX)) as u16),
                    0x044 => q.set_ready(v == 1),
                    0x080 => q.set_desc_table_address(Some(v), None),
                    0x084 => q.set_desc_table_address(None, Some(v)),
                    0x090 => q.set_avail_ring_address(Some(v), None),
                    0x094 => q.set_avail_ring_address(None, Some(v)),
                    0x0a0 => q.set_used_ring_address(Some(v), None),
                    0x0a4 => q.set_used_ring_address(None, Some(v)),
                    _ => {}
                }
            }
        }
    }

    /// The driver set `DRIVER_OK`.
    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Queue `i`, if it is ready and lies inside `mem`.
    pub fn ready_queue(&mut self, i: usize, mem: &GuestMemoryMmap) -> Option<&mut Queue> {
        let ok = self.driver_ok();
        self.queues
            .get_mut(i)
            .filter(|q| ok && q.ready() && q.is_valid(mem))
    }

    /// Queue `i` (ready or not).
    pub fn queue(&self, i: usize) -> Option<&Queue> {
        self.queues.get(i)
    }

    /// A used buffer was added: set the interrupt status and raise the line (unless it is
    /// held).
    pub fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        if !self.irq_held {
            self.raise();
        }
    }

    fn raise(&self) {
        if let Some(irq) = &self.irq {
            let _ = irq.write(1);
        }
    }

    /// Interrupt status (bit 0: used buffer notification not yet acknowledged).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// The device's interrupt line (an irqfd). Raises it at once if a notification is
    /// still pending, as after a restore, unless the line is held.
    pub fn set_irq(&mut self, irq: EventFd) {
        self.irq = Some(irq);
        if self.interrupt_status != 0 && !self.irq_held {
            self.raise();
        }
    }

    /// Holds the line: until [`release_irq`](Self::release_irq), a notification sets the
    /// interrupt status and nothing more. A restore holds it while the vCPUs' LAPICs are
    /// being set: an interrupt delivered to a LAPIC before its `KVM_SET_LAPIC` would be
    /// overwritten, and on a level-triggered pin would leave the IOAPIC's remote IRR set
    /// with no vector to EOI.
    pub fn hold_irq(&mut self) {
        self.irq_held = true;
    }

    /// Ends a [`hold_irq`](Self::hold_irq): raises the line if a notification is pending
    /// (one from before the update, or one made while held). Does nothing if not held.
    pub fn release_irq(&mut self) {
        if std::mem::take(&mut self.irq_held) && self.interrupt_status != 0 {
            self.raise();
        }
    }

    /// The registers, to save (the device is paused).
    pub fn save(&self) -> TransportState {
        TransportState {
            status: self.status,
            driver_features: self.driver_features,
            selectors: vec![
                self.device_features_sel,
                self.driver_features_sel,
                self.queue_sel,
            ],
            interrupt_status: self.interrupt_status,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSection {
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                    }
                })
                .collect(),
        }
    }

    /// Takes saved registers, checking them against what this device offers and against
    /// `mem`: untrusted input, refused with a reason rather than run.
    pub fn restore(&mut self, s: &TransportState, mem: &GuestMemoryMmap) -> Result<(), String> {
        if s.driver_features & !self.device_features != 0 {
            return Err(format!(
                "driver features {:#x} the device never offered",
                s.driver_features
            ));
        }
        let [dsel, drsel, qsel] = s.selectors[..] else {
            return Err(format!("{} selectors, not 3", s.selectors.len()));
        };
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.iter().enumerate() {
            if q.size > self.max || (q.ready && !q.size.is_power_of_two()) {
                return Err(format!("queue {i}: size {}", q.size));
            }
            let vq = virtio_queue::QueueState {
                max_size: self.max,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: false,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            let queue = Queue::try_from(vq).map_err(|e| format!("queue {i}: {e:?}"))?;
            if queue.ready() && !queue.is_valid(mem) {
                return Err(format!("queue {i}: areas outside guest memory"));
            }
            queues.push(queue);
        }
        self.status = s.status;
        self.driver_features = s.driver_features;
        (
            self.device_features_sel,
            self.driver_features_sel,
            self.queue_sel,
        ) = (dsel, drsel, qsel);
        self.interrupt_status = s.interrupt_status;
        self.queues = queues;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Ctl {
    pause: bool,
    parked: bool,
    exit: bool,
}

/// A device's worker thread control: woken by `QueueNotify`, parked around an update
/// after finishing what the device must finish first (its in-flight rule).
#[derive(Debug)]
pub struct Worker {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    wake: EventFd,
    /// Requests (frames) the device completed, ever; see [`Worker::count`].
    completions: AtomicU64,
    /// What the last pause completed between its request and the park.
    drained: AtomicU64,
    /// Test builds: how long each request (frame) takes, ns, to keep some in flight.
    delay_ns: AtomicU64,
}

impl Worker {
    /// A worker control, not yet running.
    pub fn new() -> std::io::Result<Worker> {
        Ok(Worker {
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
            completions: AtomicU64::new(0),
            drained: AtomicU64::new(0),
            delay_ns: AtomicU64::new(0),
        })
    }

    /// Makes each request (frame) take `delay` ([`throttle`](Self::throttle)): tests keep
    /// I/O in flight with it.
    pub fn set_delay(&self, delay: Duration) {
        let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.delay_ns.store(ns, Ordering::Relaxed);
    }

    /// Waits the delay [`set_delay`](Self::set_delay) asked for, if any.
    pub fn throttle(&self) {
        let ns = self.delay_ns.load(Ordering::Relaxed);
        if ns != 0 {
            std::thread::sleep(Duration::from_nanos(ns));
        }
    }

    /// The device completed a request (sent a frame): counted, so a pause can say how many
    /// were in flight when it was asked for.
    pub fn count(&self) {
        self.completions.fetch_add(1, Ordering::SeqCst);
    }

    /// How many requests (frames) the device completed between the last pause's request
    /// and its park: those that were in flight.
    pub fn last_drained(&self) -> u64 {
        self.drained.load(Ordering::SeqCst)
    }

    /// Wakes the worker (the driver's `QueueNotify`).
    pub fn kick(&self) {
        let _ = self.wake.write(1);
    }

    /// The eventfd the worker waits on.
    pub fn wake_fd(&self) -> i32 {
        self.wake.as_raw_fd()
    }

    /// Consumes a pending wake-up.
    pub fn take_wake(&self) {
        let _ = self.wake.read();
    }

    /// The worker's loop, on its own thread: `wait` blocks until there may be work (the
    /// wake eventfd, or the device's own fds), `step` does what there is, `drain` is the
    /// in-flight rule run before parking (returns how much it did; repeated until 0).
    pub fn run(
        &self,
        mut wait: impl FnMut(),
        mut step: impl FnMut(),
        mut drain: impl FnMut() -> usize,
    ) {
        loop {
            {
                let c = lock(&self.ctl);
                if c.exit {
                    return;
                }
                if c.pause {
                    drop(c);
                    while drain() > 0 {}
                    let mut c = lock(&self.ctl);
                    c.parked = true;
                    self.cv.notify_all();
                    while c.pause && !c.exit {
                        c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
                    }
                    c.parked = false;
                    continue;
                }
            }
            wait();
            step();
        }
    }

    /// Asks the worker to drain and park; returns how long that took, or fails (and
    /// leaves the worker running) past `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<Duration, String> {
        use std::sync::atomic::Ordering::SeqCst;
        let start = Instant::now();
        let before = self.completions.load(SeqCst);
        let mut c = lock(&self.ctl);
        c.pause = true;
        self.kick();
        while !c.parked {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                c.pause = false;
                self.cv.notify_all();
                return Err(format!("the worker did not drain within {timeout:?}"));
            }
            c = self
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let done = self.completions.load(SeqCst).wrapping_sub(before);
        self.drained.store(done, SeqCst);
        Ok(start.elapsed())
    }

    /// Lets the worker serve again.
    pub fn resume(&self) {
        lock(&self.ctl).pause = false;
        self.cv.notify_all();
        self.kick();
    }

    /// Ends the worker.
    pub fn stop(&self) {
        lock(&self.ctl).exit = true;
        self.cv.notify_all();
        self.kick();
    }
}

/// Test builds (`fault-injection`): the delay environment variable `var` asks for, in µs,
/// at most 100 ms; zero otherwise and in every other build.
pub fn test_delay(var: &str) -> Duration {
    #[cfg(feature = "fault-injection")]
    if let Some(us) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) {
        return Duration::from_micros(us.min(100_000));
    }
    let _ = var;
    Duration::ZERO
}

/// What the machine needs of a virtio-mmio device: its registers and its worker.
pub trait MmioDevice: Send + Sync {
    /// A driver's read of `data.len()` bytes at `offset` in the device's window.
    fn mmio_read(&self, offset: u64, data: &mut [u8]);
    /// A driver's write at `offset`.
    fn mmio_write(&self, offset: u64, data: &[u8]);
    /// Drains what is in flight and parks the worker; how long that took.
    fn pause(&self, timeout: Duration) -> Result<Duration, String>;
    /// Lets the worker go on.
    fn resume(&self);
    /// Ends the worker.
    fn stop(&self);
    /// Gives the device its interrupt line.
    fn set_irq(&self, irq: EventFd);
    /// [`Transport::hold_irq`].
    fn hold_irq(&self);
    /// [`Transport::release_irq`].
    fn release_irq(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn set_up(t: &mut Transport, queues: u32) {
        for (off, v) in [(0x70, 0u32), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 11)] {
            t.write(off, &v.to_le_bytes());
        }
        for i in 0..queues {
            let base = 0x1000 * (i + 1);
            for (off, v) in [
                (0x30, i),
                (0x38, 8),
                (0x80, base),
                (0x90, base + 0x400),
                (0xa0, base + 0x800),
                (0x44, 1),
            ] {
                t.write(off, &v.to_le_bytes());
            }
        }
        t.write(0x70, &15u32.to_le_bytes());
    }

    #[test]
    fn queues_are_selected_and_saved_each_on_its_own() {
        let m = mem();
        let mut t = Transport::new(1, F_VERSION_1, 2, 16).unwrap();
        set_up(&mut t, 2);
        assert!(t.driver_ok());
        assert!(t.ready_queue(0, &m).is_some() && t.ready_queue(1, &m).is_some());
        assert!(t.ready_queue(2, &m).is_none());
        let s = t.save();
        assert_eq!(s.queues.len(), 2);
        assert_eq!(s.queues[1].desc_table, 0x2000);
        assert_eq!(s.queues[0].avail_ring, 0x1400);
        // A selector past the last queue reads as absent and its writes go nowhere.
        t.write(0x30, &5u32.to_le_bytes());
        let mut b = [0u8; 4];
        t.read(0x034, &mut b, &[]);
        assert_eq!(u32::from_le_bytes(b), 0);
        t.write(0x38, &4u32.to_le_bytes());
        assert_eq!(t.save().queues, s.queues);

        let mut back = Transport::new(1, F_VERSION_1, 2, 16).unwrap();
        back.restore(&s, &m).unwrap();
        assert_eq!(back.save(), s);
    }

    #[test]
    fn restore_refuses_what_the_device_cannot_be() {
        let m = mem();
        let mut t = Transport::new(1, F_VERSION_1, 2, 16).unwrap();
        set_up(&mut t, 2);
        let good = t.save();
        let mut bad = vec![];
        let mut s = good.clone();
        s.driver_features |= 1 << 7;
        bad.push(s);
        let mut s = good.clone();
        s.selectors.pop();
        bad.push(s);
        let mut s = good.clone();
        s.queues.pop();
        bad.push(s);
        let mut s = good.clone();
        s.queues[1].size = 12;
        bad.push(s);
        let mut s = good.clone();
        s.queues[0].used_ring = (1 << 20) - 8;
        bad.push(s);
        for s in bad {
            let mut t = Transport::new(1, F_VERSION_1, 2, 16).unwrap();
            assert!(t.restore(&s, &m).is_err(), "{s:?}");
            assert_eq!(t.save().status, 0, "a refused state changes nothing");
        }
    }

    #[test]
    fn a_pending_interrupt_is_raised_again_on_the_new_line() {
        let m = mem();
        let mut t = Transport::new(2, F_VERSION_1, 1, 16).unwrap();
        set_up(&mut t, 1);
        let line = EventFd::new(EFD_NONBLOCK).unwrap();
        t.set_irq(line.try_clone().unwrap());
        assert!(line.read().is_err(), "nothing pending yet");
        t.signal_used();
        assert_eq!(line.read().unwrap(), 1);
        let s = t.save();
        assert_eq!(s.interrupt_status, 1);

        let mut back = Transport::new(2, F_VERSION_1, 1, 16).unwrap();
        back.restore(&s, &m).unwrap();
        let new_line = EventFd::new(EFD_NONBLOCK).unwrap();
        back.set_irq(new_line.try_clone().unwrap());
        assert_eq!(
            new_line.read().unwrap(),
            1,
            "the due interrupt is delivered"
        );
        // Acknowledged: a later restore raises nothing.
        back.write(0x64, &1u32.to_le_bytes());
        let mut again = Transport::new(2, F_VERSION_1, 1, 16).unwrap();
        again.restore(&back.save(), &m).unwrap();
        let third = EventFd::new(EFD_NONBLOCK).unwrap();
        again.set_irq(third.try_clone().unwrap());
        assert!(third.read().is_err());
    }

    #[test]
    fn a_held_line_is_raised_only_when_released() {
        let m = mem();
        let mut t = Transport::new(2, F_VERSION_1, 1, 16).unwrap();
        set_up(&mut t, 1);
        t.signal_used();
        let s = t.save();

        // A restore with a notification due, the line held while the vCPUs are restored.
        let mut back = Transport::new(2, F_VERSION_1, 1, 16).unwrap();
        back.restore(&s, &m).unwrap();
        back.hold_irq();
        let line = EventFd::new(EFD_NONBLOCK).unwrap();
        back.set_irq(line.try_clone().unwrap());
        assert!(line.read().is_err(), "held: the due interrupt waits");
        back.signal_used();
        assert!(line.read().is_err(), "held: a new notification waits too");
        assert_eq!(back.interrupt_status(), 1, "but the status says it");
        back.release_irq();
        assert_eq!(line.read().unwrap(), 1, "released: raised once");
        back.release_irq();
        assert!(line.read().is_err(), "a second release raises nothing");
        back.signal_used();
        assert_eq!(line.read().unwrap(), 1, "no longer held");

        // Held with nothing pending: the release raises nothing.
        back.write(0x64, &1u32.to_le_bytes());
        back.hold_irq();
        back.release_irq();
        assert!(line.read().is_err());
    }

    #[test]
    fn config_space_reads_are_byte_granular() {
        let t = Transport::new(1, F_VERSION_1, 2, 16).unwrap();
        let cfg = [1u8, 2, 3, 4, 5, 6];
        let mut b = [0u8; 2];
        t.read(CONFIG + 4, &mut b, &cfg);
        assert_eq!(b, [5, 6]);
        let mut b = [0xffu8; 4];
        t.read(CONFIG + 5, &mut b, &cfg);
        assert_eq!(b, [6, 0, 0, 0]);
        let mut b = [0u8; 4];
        t.read(0x008, &mut b, &cfg);
        assert_eq!(u32::from_le_bytes(b), 1);
    }
}
