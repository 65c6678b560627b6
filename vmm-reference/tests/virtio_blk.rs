// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The virtio-blk device through a driver written here (what a guest's driver does, in the
//! guest's memory): requests in flight at the pause are completed exactly once before the
//! state is captured, the device comes back from its state on the same image, and a hostile
//! driver gets errors, never a hang or a touch outside its memory.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_reference::virtio_blk::{Blk, BlkSection};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x4000;
const DATA: u64 = 0x10000;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

struct Driver {
    mem: GuestMemoryMmap,
    dev: Arc<Blk>,
    avail: u16,
    seen: u16,
}

fn w32(dev: &Blk, off: u64, v: u32) {
    dev.mmio_write(off, &v.to_le_bytes());
}

fn r32(dev: &Blk, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.mmio_read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Driver {
    fn init(mem: GuestMemoryMmap, dev: Arc<Blk>) -> Driver {
        assert_eq!(r32(&dev, 0), 0x7472_6976, "magic");
        assert_eq!(r32(&dev, 8), 2, "a block device");
        w32(&dev, 0x70, 0);
        w32(&dev, 0x70, 1 | 2);
        w32(&dev, 0x14, 1);
        assert_eq!(r32(&dev, 0x10) & 1, 1, "VERSION_1 offered");
        w32(&dev, 0x24, 1);
        w32(&dev, 0x20, 1);
        w32(&dev, 0x70, 1 | 2 | 8);
        assert_eq!(r32(&dev, 0x70) & 8, 8, "FEATURES_OK kept");
        w32(&dev, 0x30, 0);
        assert!(r32(&dev, 0x34) >= u32::from(QSIZE));
        w32(&dev, 0x38, u32::from(QSIZE));
        for (off, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
            w32(&dev, off, addr as u32);
            w32(&dev, off + 4, 0);
        }
        w32(&dev, 0x44, 1);
        w32(&dev, 0x70, 1 | 2 | 8 | 4);
        Driver {
            mem,
            dev,
            avail: 0,
            seen: 0,
        }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = DESC + u64::from(i) * 16;
        self.mem.write_obj(addr, GuestAddress(d)).unwrap();
        self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Offers request `slot` (0..5): header, one data buffer of `len`, status.
    fn offer(&mut self, slot: u16, kind: u32, sector: u64, len: u32) {
        let hdr = HDR + u64::from(slot) * 32;
        self.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(hdr + 16)).unwrap();
        let head = slot * 3;
        let data_flags = if kind == 0 { WRITE | NEXT } else { NEXT };
        self.desc(head, hdr, 16, NEXT, head + 1);
        self.desc(
            head + 1,
            DATA + u64::from(slot) * 0x2000,
            len,
            data_flags,
            head + 2,
        );
        self.desc(head + 2, hdr + 16, 1, WRITE, 0);
        self.push(head);
    }

    fn push(&mut self, head: u16) {
        let at = AVAIL + 4 + u64::from(self.avail % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(at)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .unwrap();
        w32(&self.dev, 0x50, 0);
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Waits until `n` more requests are used.
    fn wait(&mut self, n: u16) {
        let t = Instant::now();
        while self.used_idx().wrapping_sub(self.seen) < n {
            assert!(t.elapsed() < Duration::from_secs(60), "{n} completions");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.seen = self.seen.wrapping_add(n);
    }

    fn status(&self, slot: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(HDR + u64::from(slot) * 32 + 16))
            .unwrap()
    }

    fn data(&self, slot: u16) -> GuestAddress {
        GuestAddress(DATA + u64::from(slot) * 0x2000)
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn image(dir: &tempfile::TempDir, name: &str, sectors: u64) -> (std::path::PathBuf, std::fs::File) {
    let p = dir.path().join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(sectors * 512).unwrap();
    (p, f)
}

fn block(n: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (i * 31 + n * 7) as u8).collect()
}

#[test]
fn requests_in_flight_at_the_pause_complete_once_and_the_device_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (path, img) = image(&dir, "disk.img", 1024);
    let mem = memory();
    let dev = Blk::new(img, false, mem.clone())
        .unwrap()
        .with_delay(Duration::from_millis(20));
    let worker = dev.spawn_worker();
    let mut d = Driver::init(mem.clone(), dev.clone());
    for slot in 0..4u16 {
        mem.write_slice(&block(u64::from(slot)), d.data(slot))
            .unwrap();
        d.offer(slot, 1, u64::from(slot) * 8, 4096);
    }
    // Paused with (very likely) most of the four still in flight: all are done first.
    let drained = dev.pause(Duration::from_secs(60)).unwrap();
    eprintln!("drained in {drained:?}");
    assert_eq!(
        d.used_idx(),
        4,
        "every offered request completed before the capture"
    );
    assert_eq!(dev.completed(), 4);
    assert!(drained > Duration::ZERO);
    let state: BlkSection = dev.save().unwrap();
    assert_eq!((state.queue.next_avail, state.queue.next_used), (4, 4));
    dev.stop();
    worker.join().unwrap();
    drop(d);
    drop(dev);

    // The next image: the image found again by path (a reboot) or handed over (an fd).
    let again = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let dev = Blk::restore(&state, again, mem.clone()).unwrap();
    let worker = dev.spawn_worker();
    let mut d = Driver {
        mem: mem.clone(),
        dev: dev.clone(),
        avail: 4,
        seen: 0,
    };
    d.wait(4);
    for slot in 0..4u16 {
        assert_eq!(d.status(slot), 0, "write {slot} OK");
        mem.write_slice(&[0u8; 4096], d.data(slot)).unwrap();
        d.offer(slot, 0, u64::from(slot) * 8, 4096);
    }
    d.wait(4);
    for slot in 0..4u16 {
        assert_eq!(d.status(slot), 0, "read {slot} OK");
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, d.data(slot)).unwrap();
        assert_eq!(got, block(u64::from(slot)), "block {slot} reads back");
    }
    // Exactly eight requests, none twice.
    assert_eq!((dev.completed(), dev.next_used(), d.used_idx()), (8, 8, 8));
    // Flush, and the image holds what was written.
    d.offer(0, 4, 0, 0);
    d.wait(1);
    let img = std::fs::File::open(&path).unwrap();
    let mut b = vec![0u8; 4096];
    img.read_exact_at(&mut b, 3 * 8 * 512).unwrap();
    assert_eq!(b, block(3));
    dev.stop();
    worker.join().unwrap();
}

#[test]
fn a_state_restores_only_on_its_own_image_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (_, img) = image(&dir, "a.img", 64);
    let (_, other) = image(&dir, "b.img", 64);
    let mem = memory();
    let dev = Blk::new(img.try_clone().unwrap(), false, mem.clone()).unwrap();
    let _d = Driver::init(mem.clone(), dev.clone());
    let state = dev.save().unwrap();
    let e = Blk::restore(&state, other, mem.clone()).unwrap_err();
    assert!(e.to_string().contains("not the image"), "{e}");
    let mut bad = state.clone();
    bad.queue.used_ring = 1 << 40;
    assert!(Blk::restore(&bad, img.try_clone().unwrap(), mem.clone()).is_err());
    let mut bad = state.clone();
    bad.queue.size = 1000;
    assert!(Blk::restore(&bad, img.try_clone().unwrap(), mem.clone()).is_err());
    let mut bad = state.clone();
    bad.capacity = 65;
    assert!(Blk::restore(&bad, img.try_clone().unwrap(), mem.clone()).is_err());
    let mut bad = state;
    bad.driver_features |= 1 << 40;
    assert!(Blk::restore(&bad, img, mem).is_err());
}

#[test]
fn a_hostile_driver_gets_errors_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let (_, img) = image(&dir, "h.img", 64);
    let mem = memory();
    let dev = Blk::new(img, true, mem.clone()).unwrap();
    let mut d = Driver::init(mem.clone(), dev.clone());
    // Beyond the end; a write to a read-only disk; a buffer outside guest memory; a huge
    // length; an unknown type.
    d.offer(0, 0, 64, 512);
    d.offer(1, 1, 0, 512);
    d.offer(2, 0, 0, 512);
    d.offer(3, 0, 0, 0x1000_0000);
    d.offer(4, 99, 0, 512);
    assert_eq!(dev.process(), 5, "every request is answered");
    for (slot, want) in [(0, 1), (1, 1), (2, 0), (3, 1), (4, 2)] {
        assert_eq!(d.status(slot), want, "request {slot}");
    }
    // Slot 2 was fine; now point its data outside memory.
    d.desc(7, 1 << 40, 512, WRITE | NEXT, 8);
    mem.write_obj(0u32, GuestAddress(HDR + 2 * 32)).unwrap();
    d.desc(6, HDR + 2 * 32, 16, NEXT, 7);
    d.desc(8, HDR + 2 * 32 + 16, 1, WRITE, 0);
    mem.write_obj(0xffu8, GuestAddress(HDR + 2 * 32 + 16))
        .unwrap();
    d.push(6);
    assert_eq!(dev.process(), 1);
    assert_eq!(
        d.status(2),
        1,
        "an address outside guest memory is an I/O error"
    );
    // A descriptor loop: the chain is cut, the request answered, nothing hangs.
    d.desc(9, HDR, 16, NEXT, 10);
    d.desc(10, HDR, 16, NEXT, 9);
    d.push(9);
    assert_eq!(dev.process(), 1);
    // A head index beyond the queue.
    d.push(500);
    dev.process();
    assert!(d.used_idx() >= 7);
}
