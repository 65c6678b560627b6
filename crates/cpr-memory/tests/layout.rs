// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Regions sharing a backing (RAM above 4 GiB), the stamp, symbolic links, huge pages.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use cpr_memory::{
    Error, GuestRam, HugePageSize, MemoryOptions, RegionSpec, Stamp, StampState, NO_STAMP,
};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn fds_of(ram: &GuestRam) -> HashMap<String, OwnedFd> {
    ram.memfds()
        .into_iter()
        .map(|(n, fd)| (n.to_string(), fd.try_clone_to_owned().unwrap()))
        .collect()
}

struct Tmp(PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

fn shm(tag: &str) -> Tmp {
    Tmp(PathBuf::from(format!(
        "/dev/shm/cpr-memory-layout-{}-{tag}",
        std::process::id()
    )))
}

/// RAM below the PCI hole and above 4 GiB, in one memfd at two offsets: one fd to hand
/// over, and reattach finds both regions in it.
#[test]
fn two_regions_in_one_memfd_reattach_from_one_fd() {
    let ram = GuestRam::builder()
        .region(RegionSpec::memfd("guest-ram", 0, 2 * MIB))
        .region(RegionSpec::memfd("guest-ram", 4 * GIB, 2 * MIB).offset(2 * MIB))
        .with_stamp()
        .build()
        .unwrap();
    assert_eq!(ram.memfds().len(), 1);
    let l = ram.layout();
    assert_eq!(l.regions[1].offset, 2 * MIB);
    assert_eq!(l.stamp_offset, 4 * MIB, "after both regions' data");
    assert_eq!(l.regions[0].backing_size, 4 * MIB + 4096);
    ram.memory().write_obj(1u64, GuestAddress(0x1000)).unwrap();
    ram.memory()
        .write_obj(2u64, GuestAddress(4 * GIB + 8))
        .unwrap();
    let mut fds = fds_of(&ram);
    let again = GuestRam::reattach(l, &mut fds, &MemoryOptions::default()).unwrap();
    assert_eq!(
        again
            .memory()
            .read_obj::<u64>(GuestAddress(0x1000))
            .unwrap(),
        1
    );
    assert_eq!(
        again
            .memory()
            .read_obj::<u64>(GuestAddress(4 * GIB + 8))
            .unwrap(),
        2
    );
    assert!(fds.is_empty(), "the shared fd was taken once");

    // A layout whose second region overlaps the first in the backing is refused.
    let mut bad = l.clone();
    bad.regions[1].offset = MIB;
    let e = GuestRam::reattach(&bad, &mut fds_of(&ram), &MemoryOptions::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("overlaps region 0 in their shared backing"),
        "{e}"
    );
}

#[test]
fn sizes_of_tens_of_gigabytes_cost_nothing_until_touched() {
    let ram = GuestRam::builder()
        .region(RegionSpec::memfd("big", 0, 3 * GIB))
        .region(RegionSpec::memfd("big", 4 * GIB, 61 * GIB).offset(3 * GIB))
        .with_stamp()
        .build()
        .unwrap();
    assert_eq!(ram.layout().total_size(), 64 * GIB);
    ram.memory().write_obj(7u8, GuestAddress(64 * GIB)).unwrap();
    let again =
        GuestRam::reattach(ram.layout(), &mut fds_of(&ram), &MemoryOptions::default()).unwrap();
    assert_eq!(
        again
            .memory()
            .read_obj::<u8>(GuestAddress(64 * GIB))
            .unwrap(),
        7
    );
}

#[test]
fn the_stamp_is_read_before_mapping_and_written_outside_guest_memory() {
    let ram = GuestRam::builder()
        .region(RegionSpec::memfd("ram", 0, 4 * MIB))
        .with_stamp()
        .build()
        .unwrap();
    let fds = fds_of(&ram);
    assert_eq!(ram.layout().read_stamp(&fds).unwrap(), None, "fresh memory");
    let saved = Stamp::saved([1; 16], [2; 16], 3);
    ram.write_stamp(&saved).unwrap();
    let read = ram.layout().read_stamp(&fds).unwrap().unwrap();
    assert!(read.holds(&[2; 16]));
    // The guest cannot see it: all of guest memory is still zero.
    let mut buf = vec![0u8; 4 * MIB as usize];
    ram.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    ram.write_stamp(&Stamp::live([1; 16], 3)).unwrap();
    assert_eq!(ram.read_stamp().unwrap().unwrap().state, StampState::Live);

    // A layout that puts the stamp inside guest memory, or beyond the backing, is refused.
    for off in [0, 64 * MIB, 100] {
        let mut bad = ram.layout().clone();
        bad.stamp_offset = off;
        assert!(bad.read_stamp(&fds).is_err(), "stamp at {off:#x}");
        assert!(GuestRam::reattach(&bad, &mut fds_of(&ram), &MemoryOptions::default()).is_err());
    }
    // Without a stamp page there is none to read or write.
    let plain = GuestRam::builder()
        .region(RegionSpec::memfd("p", 0, MIB))
        .build()
        .unwrap();
    assert_eq!(plain.layout().stamp_offset, NO_STAMP);
    assert!(matches!(plain.write_stamp(&saved), Err(Error::NoStamp)));
}

#[test]
fn a_file_stamp_is_read_without_opening_the_file_for_writing() {
    let f = shm("stampfile");
    let ram = GuestRam::builder()
        .region(RegionSpec::file(&f.0, 0, 2 * MIB))
        .with_stamp()
        .build()
        .unwrap();
    ram.write_stamp(&Stamp::saved([9; 16], [8; 16], 1)).unwrap();
    let layout = ram.layout().clone();
    drop(ram);
    // Read-only: it works on a file we may not write.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&f.0, std::fs::Permissions::from_mode(0o400)).unwrap();
    let s = layout.read_stamp(&HashMap::new()).unwrap().unwrap();
    assert!(s.holds(&[8; 16]));
}

/// A symbolic link anywhere in a backing's path is refused, never followed: not in the
/// last component, not in a directory on the way.
#[test]
fn no_symbolic_link_is_followed_in_a_backing_path() {
    let dir = shm("dir");
    std::fs::create_dir(&dir.0).unwrap();
    let victim = dir.0.join("victim");
    std::fs::write(&victim, vec![0x5a; 2 * MIB as usize]).unwrap();
    let linkdir = shm("linkdir");
    std::os::unix::fs::symlink(&dir.0, &linkdir.0).unwrap();
    std::os::unix::fs::symlink(&victim, dir.0.join("last")).unwrap();
    for path in [linkdir.0.join("victim"), dir.0.join("last")] {
        let e = GuestRam::builder()
            .region(RegionSpec::file(&path, 0, 2 * MIB).existing())
            .build()
            .unwrap_err();
        assert!(
            matches!(e, Error::BadPath { .. }) && e.to_string().contains("symbolic link"),
            "{}: {e}",
            path.display()
        );
    }
    // Reattach refuses the same, before mapping anything.
    let good = GuestRam::builder()
        .region(RegionSpec::file(dir.0.join("ram"), 0, 2 * MIB))
        .build()
        .unwrap();
    let mut layout = good.layout().clone();
    layout.regions[0].name = linkdir.0.join("ram").to_string_lossy().into_owned();
    let e =
        GuestRam::reattach(&layout, &mut HashMap::new(), &MemoryOptions::default()).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        vec![0x5a; 2 * MIB as usize]
    );
}

/// Reads a sysctl; writes it back when dropped.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: u64) -> Option<Sysctl> {
        let old = std::fs::read_to_string(path).ok()?;
        std::fs::write(path, value.to_string()).ok()?;
        Some(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

fn free_2m() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn huge_pages_are_checked_before_anything_is_created() {
    let want = 8 * MIB;
    if free_2m() * 2 * MIB < 2 * want {
        // Not enough (this machine starts with none): a clear error, not an ENOMEM or a
        // SIGBUS later.
        let e = GuestRam::builder()
            .region(RegionSpec::memfd("h", 0, 1024 * GIB).huge_pages(HugePageSize::Size2M))
            .build()
            .unwrap_err();
        assert!(matches!(e, Error::NoHugePages { .. }), "{e}");
        assert!(e.to_string().contains("nr_hugepages"), "{e}");
    }
    // With a pool (root raises it here and puts the old value back), a hugetlb memfd with
    // a stamp works and reattaches.
    let nr = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let Some(_pool) = nr.and_then(|n| Sysctl::set("/proc/sys/vm/nr_hugepages", n + 8)) else {
        cpr_memory_skipped("cannot raise /proc/sys/vm/nr_hugepages (not root?)");
        return;
    };
    if free_2m() < 5 {
        cpr_memory_skipped("the kernel did not grow the huge page pool");
        return;
    }
    let ram = GuestRam::builder()
        .region(RegionSpec::memfd("h", 0, want).huge_pages(HugePageSize::Size2M))
        .with_stamp()
        .build()
        .unwrap();
    assert_eq!(ram.layout().regions[0].page_size, 2 * MIB);
    assert_eq!(
        ram.layout().stamp_offset,
        want,
        "a whole huge page for the stamp"
    );
    ram.memory().write_obj(5u32, GuestAddress(MIB)).unwrap();
    ram.write_stamp(&Stamp::live([1; 16], 1)).unwrap();
    let again =
        GuestRam::reattach(ram.layout(), &mut fds_of(&ram), &MemoryOptions::default()).unwrap();
    assert_eq!(
        again.memory().read_obj::<u32>(GuestAddress(MIB)).unwrap(),
        5
    );
    drop((ram, again));
}

fn cpr_memory_skipped(msg: &str) {
    use std::io::Write as _;
    let fd = std::os::fd::AsFd::as_fd(&std::io::stderr())
        .try_clone_to_owned()
        .unwrap();
    let _ = std::fs::File::from(fd).write_all(format!("SKIPPED: {msg}\n").as_bytes());
}
