// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A virtio-blk device on the virtio-mmio transport (version 2), on a raw image file,
//! built on rust-vmm's virtio-queue, whose requests may be in flight when an update pauses.
//!
//! A worker thread serves the queue: the driver's `QueueNotify` wakes it, it takes every
//! available request, does it on the image (`pread`/`pwrite`/`fdatasync`) and puts it in the
//! used ring. **In-flight rule**: [`Blk::pause`] makes the worker finish every request the
//! driver made available, then park; only then is the state captured (queue indices
//! included). So a request is completed exactly once, by the old image, and none is left
//! half-done; the time it took is returned, to be reported as its own phase. The new image
//! starts with an empty queue position to serve from: what the driver adds later.
//!
//! Hostile drivers: descriptor chains are walked by virtio-queue (bounded by the queue
//! size, loops cut), every guest address goes through vm-memory (out of range is an I/O
//! error for that request, never host memory), a request moves at most [`MAX_REQUEST`]
//! bytes, and a request beyond the image's end fails with `VIRTIO_BLK_S_IOERR`.
//!
//! The reference VMM attaches it with `--disk PATH[,ro]` at [`BLK_BASE`](crate::machine::BLK_BASE);
//! the demo guest drives it (polling: it raises no interrupt the guest waits for; the
//! interrupt status register is kept and saved).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpr_snapshot::prelude::*;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::gate::lock;
use crate::virtio_mmio::{MmioDevice, Transport, TransportState, Worker, F_VERSION_1};
pub use crate::virtio_mmio::{QueueSection, MMIO_SIZE};

/// Largest queue.
pub const QUEUE_MAX: u16 = 64;
/// Most bytes one request moves.
pub const MAX_REQUEST: u32 = 1 << 20;
const SECTOR: u64 = 512;

const VIRTIO_ID_BLOCK: u32 = 2;
const F_BLK_RO: u64 = 1 << 5;
const F_BLK_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// The device's state, saved as section `virtio-blk`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Section)]
#[section(name = "virtio-blk")]
pub struct BlkSection {
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`, `DriverFeaturesSel`, `QueueSel`.
    pub selectors: Vec<u32>,
    /// Interrupt status (used-ring notifications not yet acknowledged).
    pub interrupt_status: u32,
    /// The queue: size, ready, descriptor / driver / device area, next avail, next used.
    pub queue: QueueSection,
    /// Image size in sectors when saved.
    pub capacity: u64,
    /// Read-only device.
    pub read_only: bool,
    /// Requests completed since the device was created (carried across updates).
    pub completed: u64,
    /// Identity of the image (`st_dev`, `st_ino`), checked when the image is found again.
    pub image_dev: u64,
    /// See `image_dev`.
    pub image_ino: u64,
}

/// Why a device cannot be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image's size or identity.
    #[error("disk image: {0}")]
    Image(String),
    /// A saved state that this device cannot take.
    #[error("virtio-blk state: {0}")]
    State(String),
    /// A system call.
    #[error("virtio-blk: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug)]
struct Regs {
    t: Transport,
    completed: u64,
}

/// The device, shared by the vCPUs (MMIO) and its worker.
#[derive(Debug)]
pub struct Blk {
    regs: Mutex<Regs>,
    mem: GuestMemoryMmap,
    image: File,
    capacity: u64,
    read_only: bool,
    worker: Worker,
}

fn identity(f: &File) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

fn features(read_only: bool) -> u64 {
    F_VERSION_1 | F_BLK_FLUSH | if read_only { F_BLK_RO } else { 0 }
}

impl Blk {
    /// A device on `image` (its size, rounded down to sectors, is the capacity).
    pub fn new(image: File, read_only: bool, mem: GuestMemoryMmap) -> Result<Arc<Blk>, BlkError> {
        let len = image.metadata()?.len();
        if len < SECTOR {
            return Err(BlkError::Image(format!(
                "{len} bytes: smaller than one sector"
            )));
        }
        let t = Transport::new(VIRTIO_ID_BLOCK, features(read_only), 1, QUEUE_MAX)
            .map_err(BlkError::State)?;
        Ok(Arc::new(Blk {
            regs: Mutex::new(Regs { t, completed: 0 }),
            mem,
            image,
            capacity: len / SECTOR,
            read_only,
            worker: Worker::new()?,
        }))
    }

    /// The same device with each request taking `delay` (tests keep requests in flight).
    pub fn with_delay(self: Arc<Self>, delay: Duration) -> Arc<Blk> {
        self.worker.set_delay(delay);
        self
    }

    /// A driver's read of `data.len()` bytes at `offset` in the MMIO window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let config = self.capacity.to_le_bytes();
        lock(&self.regs).t.read(offset, data, &config);
    }

    /// A driver's write at `offset`.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset == crate::virtio_mmio::QUEUE_NOTIFY {
            // The worker's, without the registers.
            self.worker.kick();
            return;
        }
        lock(&self.regs).t.write(offset, data);
    }

    /// Serves every available request; returns how many were completed.
    ///
    /// The registers are locked only to take a chain and to put it in the used ring, not
    /// during the I/O, so a vCPU reading or writing them never waits for the disk.
    pub fn process(&self) -> usize {
        let mut done = 0;
        loop {
            let (head, descs) = {
                let mut r = lock(&self.regs);
                let Some(q) = r.t.ready_queue(0, &self.mem) else {
                    return done;
                };
                match q.pop_descriptor_chain(&self.mem) {
                    Some(chain) => (chain.head_index(), chain.collect::<Vec<_>>()),
                    None => return done,
                }
            };
            self.worker.throttle();
            let len = self.request(&descs);
            let mut r = lock(&self.regs);
            let Some(q) = r.t.ready_queue(0, &self.mem) else {
                return done;
            };
            if q.add_used(&self.mem, head, len).is_err() {
                return done;
            }
            r.completed += 1;
            r.t.signal_used();
            self.worker.count();
            done += 1;
        }
    }

    /// Does one request; returns the bytes written into guest memory.
    fn request(&self, descs: &[virtio_queue::desc::split::Descriptor]) -> u32 {
        let (Some(head), Some(status)) = (descs.first(), descs.last()) else {
            return 0;
        };
        if descs.len() < 2 || status.len() < 1 || !status.is_write_only() || head.len() < 16 {
            return 0;
        }
        let mut hdr = [0u8; 16];
        if self.mem.read_slice(&mut hdr, head.addr()).is_err() {
            return 0;
        }
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let data = &descs[1..descs.len() - 1];
        let mut written = 0u32;
        let code = match kind {
            T_IN | T_OUT => self.transfer(kind, sector, data, &mut written),
            T_FLUSH => match self.image.sync_data() {
                Ok(()) => S_OK,
                Err(_) => S_IOERR,
            },
            _ => S_UNSUPP,
        };
        if self.mem.write_obj(code, status.addr()).is_err() {
            return written;
        }
        written.saturating_add(1)
    }

    fn transfer(
        &self,
        kind: u32,
        sector: u64,
        data: &[virtio_queue::desc::split::Descriptor],
        written: &mut u32,
    ) -> u8 {
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let Some(start) = sector.checked_mul(SECTOR) else {
            return S_IOERR;
        };
        if total > u64::from(MAX_REQUEST)
            || start
                .checked_add(total)
                .is_none_or(|end| end > self.capacity * SECTOR)
            || (kind == T_OUT && self.read_only)
        {
            return S_IOERR;
        }
        let mut at = start;
        for d in data {
            let mut buf = vec![0u8; d.len() as usize];
            let ok = if kind == T_IN {
                d.is_write_only()
                    && self.image.read_exact_at(&mut buf, at).is_ok()
                    && self.mem.write_slice(&buf, d.addr()).is_ok()
            } else {
                !d.is_write_only()
                    && self.mem.read_slice(&mut buf, d.addr()).is_ok()
                    && self.image.write_all_at(&buf, at).is_ok()
            };
            if !ok {
                return S_IOERR;
            }
            if kind == T_IN {
                *written = written.saturating_add(d.len());
            }
            at += u64::from(d.len());
        }
        S_OK
    }

    /// Starts the worker on a new thread.
    pub fn spawn_worker(self: &Arc<Self>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(self.worker())
    }

    /// The worker's loop, for a thread of its own.
    pub fn worker(self: &Arc<Self>) -> Box<dyn FnOnce() + Send + 'static> {
        let b = self.clone();
        Box::new(move || {
            let wait = || {
                crate::vmm::wait_readable(b.worker.wake_fd(), Duration::from_millis(50));
                b.worker.take_wake();
            };
            // In-flight rule: everything the driver offered is done before parking.
            b.worker.run(
                wait,
                || {
                    b.process();
                },
                || b.process(),
            );
        })
    }

    /// Drains and parks the worker: every request the driver made available is completed.
    /// Returns how long that took; fails (and leaves the worker running) past `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<Duration, BlkError> {
        self.worker.pause(timeout).map_err(BlkError::State)
    }

    /// Lets the worker serve again.
    pub fn resume(&self) {
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

    /// The state (call it paused).
    pub fn save(&self) -> Result<BlkSection, BlkError> {
        let r = lock(&self.regs);
        let t = r.t.save();
        let (image_dev, image_ino) = identity(&self.image)?;
        Ok(BlkSection {
            status: t.status,
            driver_features: t.driver_features,
            selectors: t.selectors,
            interrupt_status: t.interrupt_status,
            queue: t.queues.into_iter().next().unwrap_or_default(),
            capacity: self.capacity,
            read_only: self.read_only,
            completed: r.completed,
            image_dev,
            image_ino,
        })
    }

    /// The device again from `state`, on `image`, which must be the very file saved
    /// (device and inode) of the same size, in guest memory `mem`.
    pub fn restore(
        state: &BlkSection,
        image: File,
        mem: GuestMemoryMmap,
    ) -> Result<Arc<Blk>, BlkError> {
        let (dev, ino) = identity(&image)?;
        if (dev, ino) != (state.image_dev, state.image_ino) {
            return Err(BlkError::Image(format!(
                "not the image the state was saved with (dev {dev:#x} inode {ino}, saved dev \
                 {:#x} inode {})",
                state.image_dev, state.image_ino
            )));
        }
        let b = Blk::new(image, state.read_only, mem)?;
        if b.capacity != state.capacity {
            return Err(BlkError::Image(format!(
                "{} sectors, saved with {}",
                b.capacity, state.capacity
            )));
        }
        {
            let mut r = lock(&b.regs);
            let t = TransportState {
                status: state.status,
                driver_features: state.driver_features,
                selectors: state.selectors.clone(),
                interrupt_status: state.interrupt_status,
                queues: vec![state.queue.clone()],
            };
            r.t.restore(&t, &b.mem).map_err(BlkError::State)?;
            r.completed = state.completed;
        }
        Ok(b)
    }

    /// A duplicate of the image's fd, to hand over.
    pub fn image_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.image.as_fd().try_clone_to_owned()
    }

    /// Requests completed since the device was first created.
    pub fn completed(&self) -> u64 {
        lock(&self.regs).completed
    }

    /// The next used-ring index the device fills.
    pub fn next_used(&self) -> u16 {
        lock(&self.regs).t.queue(0).map_or(0, |q| q.next_used())
    }

    /// Gives the device its interrupt line (raised at once if a notification is pending).
    pub fn set_irq(&self, irq: EventFd) {
        lock(&self.regs).t.set_irq(irq);
    }

    /// Interrupt status register.
    pub fn interrupt_status(&self) -> u32 {
        lock(&self.regs).t.interrupt_status()
    }
}

impl MmioDevice for Blk {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        Blk::mmio_read(self, offset, data)
    }
    fn mmio_write(&self, offset: u64, data: &[u8]) {
        Blk::mmio_write(self, offset, data)
    }
    fn pause(&self, timeout: Duration) -> Result<Duration, String> {
        Blk::pause(self, timeout).map_err(|e| e.to_string())
    }
    fn resume(&self) {
        Blk::resume(self)
    }
    fn stop(&self) {
        Blk::stop(self)
    }
    fn set_irq(&self, irq: EventFd) {
        Blk::set_irq(self, irq)
    }
    fn hold_irq(&self) {
        lock(&self.regs).t.hold_irq();
    }
    fn release_irq(&self) {
        lock(&self.regs).t.release_irq();
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        self.worker.stop();
    }
}

/// Opens the image `--disk` names (read-write unless `read_only`), without creating it; a
/// regular file or a block device.
pub fn open_image(path: &std::path::Path, read_only: bool) -> Result<File, BlkError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| BlkError::Image(format!("`{}`: {e}", path.display())))?;
    let t = f.metadata()?.file_type();
    if !t.is_file() && !t.is_block_device() {
        return Err(BlkError::Image(format!(
            "`{}` is neither a regular file nor a block device",
            path.display()
        )));
    }
    Ok(f)
}

/// Test builds (`fault-injection`): `CPR_BLK_DELAY_US` makes each request take that long,
/// at most 100 ms, so that requests are in flight when an update pauses.
pub fn test_delay() -> Duration {
    crate::virtio_mmio::test_delay("CPR_BLK_DELAY_US")
}

/// The `virtio_blk` fuzz target: a hostile driver. The first bytes choose the queue set-up
/// (size, the three areas anywhere in a 64 KiB guest, the available index), the rest fill
/// guest memory (descriptors, rings, headers); then every available request is served, on
/// a 32 KiB image. Returns the requests completed. Guest memory is all there is to touch.
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
    let Ok(image) = cpr_memory::create_memfd("fuzz-disk", 32 << 10, None) else {
        return 0;
    };
    let Ok(dev) = Blk::new(image, h[15] & 1 == 1, mem.clone()) else {
        return 0;
    };
    let area = |i: usize| u32::from(u16::from_le_bytes([h[i], h[i + 1]]));
    for (off, v) in [(0x70, 0), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 11)] {
        dev.mmio_write(off, &u32::to_le_bytes(v));
    }
    let regs = [
        (0x38, u32::from(h[0]) + 1),
        (0x80, area(2)),
        (0x90, area(4)),
        (0xa0, area(6)),
        (0x44, 1),
        (0x70, 15),
    ];
    for (off, v) in regs {
        dev.mmio_write(off, &v.to_le_bytes());
    }
    let _ = mem.write_obj(
        u16::from_le_bytes([h[8], h[9]]),
        vm_memory::GuestAddress(u64::from(area(4)) + 2),
    );
    let done = dev.process();
    dev.stop();
    done
}
