// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Memory the VMM mapped itself, with its own bitmap type, adopted and reattached.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use cpr_memory::cpr_fd::{FdKind, FdRegistry};
use cpr_memory::vm_memory::bitmap::{AtomicBitmap, Bitmap};
use cpr_memory::vm_memory::mmap::MmapRegionBuilder;
use cpr_memory::vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};
use cpr_memory::{
    BackendKind, Error, GuestRam, MemoryOptions, ReattachArgs, RegionProblem, UpdateMode,
};
use cpr_snapshot::Persist;

const MIB: u64 = 1 << 20;

/// A memfd as a VMM makes one (Cloud Hypervisor and Firecracker do much the same).
fn memfd(name: &str, size: u64, sealable: bool) -> File {
    let c = CString::new(name).unwrap();
    let flags = libc::MFD_CLOEXEC | if sealable { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new fd that nothing else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size).unwrap();
    f
}

/// Two regions, below and above a hole, both in one memfd (at offsets 0 and 8 MiB).
fn vmm_memory(file: &File) -> GuestMemoryMmap<AtomicBitmap> {
    let f = std::sync::Arc::new(file.try_clone().unwrap());
    GuestMemoryMmap::<AtomicBitmap>::from_ranges_with_files([
        (
            GuestAddress(0),
            8 << 20,
            Some(FileOffset::from_arc(f.clone(), 0)),
        ),
        (
            GuestAddress(1 << 32),
            4 << 20,
            Some(FileOffset::from_arc(f, 8 * MIB)),
        ),
    ])
    .unwrap()
}

#[test]
fn atomic_bitmap_memory_is_adopted_handed_over_and_reattached_with_its_data() {
    let file = memfd("vmm-ram", 12 * MIB, true);
    let mem = vmm_memory(&file);
    mem.write_obj(0x1122_3344_u32, GuestAddress(0x1000))
        .unwrap();
    mem.write_obj(0x5566_7788_u32, GuestAddress((1 << 32) + 0x2000))
        .unwrap();

    let ram = GuestRam::adopt(mem, &["vmm-ram", "vmm-ram"]).unwrap();
    let layout = ram.layout().clone();
    assert_eq!(layout.regions.len(), 2);
    assert!(layout.regions.iter().all(|r| r.kind == BackendKind::Memfd));
    assert_eq!(
        (layout.regions[1].guest_addr, layout.regions[1].offset),
        (1 << 32, 8 * MIB)
    );
    assert_eq!(layout.regions[0].backing_size, 12 * MIB);
    assert!(ram.check_mode(UpdateMode::Restart).is_ok());
    assert!(ram.check_mode(UpdateMode::Reboot).is_err());
    // Adopting sealed the memfd against resizing, which reattach insists on.
    // SAFETY: F_GET_SEALS reads nothing of ours.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    assert_eq!(
        seals & (libc::F_SEAL_GROW | libc::F_SEAL_SHRINK),
        libc::F_SEAL_GROW | libc::F_SEAL_SHRINK
    );

    // One call puts the backing in the registry (once, though two regions use it).
    let mut reg = FdRegistry::new();
    ram.register_fds(&mut reg).unwrap();
    assert_eq!(reg.len(), 1);
    assert_eq!(reg.get("vmm-ram").unwrap().kind(), FdKind::MEMORY);
    // The VMM's own memory stays the VMM's type.
    let mem: GuestMemoryMmap<AtomicBitmap> = ram.into_memory();
    mem.write_obj(0x99u8, GuestAddress(0x3000)).unwrap();
    drop(mem);
    drop(file);

    // The next image: back as GuestMemoryMmap<AtomicBitmap>, straight from the registry.
    let again =
        GuestRam::<AtomicBitmap>::reattach_from(&layout, &mut reg, &MemoryOptions::default())
            .unwrap();
    assert!(reg.is_empty(), "the memfd was taken from the registry");
    let m = again.memory();
    assert_eq!(
        m.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
        0x1122_3344
    );
    assert_eq!(
        m.read_obj::<u32>(GuestAddress((1 << 32) + 0x2000)).unwrap(),
        0x5566_7788
    );
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0x99);
    // And its bitmap tracks writes, as the VMM's dirty logging expects.
    let region = m.find_region(GuestAddress(1 << 32)).unwrap();
    assert!(!region.bitmap().dirty_at(0x5000));
    m.write_obj(1u64, GuestAddress((1 << 32) + 0x5000)).unwrap();
    assert!(region.bitmap().dirty_at(0x5000));
}

#[test]
fn persist_saves_the_layout_and_restores_from_the_registry() {
    let file = memfd("p-ram", 8 * MIB, true);
    let f = std::sync::Arc::new(file);
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges_with_files([(
        GuestAddress(0),
        8 << 20,
        Some(FileOffset::from_arc(f, 0)),
    )])
    .unwrap();
    mem.write_obj(7u64, GuestAddress(0x100)).unwrap();
    let ram = GuestRam::adopt(mem, &["p-ram"]).unwrap();
    let state = ram.save();
    let mut reg = FdRegistry::new();
    ram.register_fds(&mut reg).unwrap();
    drop(ram);
    let args = ReattachArgs {
        fds: &mut reg,
        options: MemoryOptions::default(),
    };
    let back: GuestRam<AtomicBitmap> = GuestRam::restore(args, &state).unwrap();
    assert_eq!(
        back.memory().read_obj::<u64>(GuestAddress(0x100)).unwrap(),
        7
    );
    assert_eq!(back.save(), state);
}

#[test]
fn a_failed_reattach_from_the_registry_leaves_it_as_it_was() {
    let file = memfd("r-ram", 8 * MIB, true);
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        8 << 20,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let ram = GuestRam::adopt(mem, &["r-ram"]).unwrap();
    let mut layout = ram.layout().clone();
    let mut reg = FdRegistry::new();
    ram.register_fds(&mut reg).unwrap();
    // Registering again: refused as a duplicate, and nothing half-added.
    assert!(matches!(ram.register_fds(&mut reg), Err(Error::Fd(_))));
    assert_eq!(reg.len(), 1);
    // A layout that wants more than the memfd holds.
    layout.regions[0].size = 16 * MIB;
    layout.regions[0].backing_size = 16 * MIB;
    let e =
        GuestRam::<()>::reattach_from(&layout, &mut reg, &MemoryOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::TooSmall { .. } | Error::SealedSizeMismatch { .. }),
        "{e}"
    );
    let entry = reg.get("r-ram").expect("still registered");
    let ino = |fd: std::os::fd::BorrowedFd<'_>| {
        File::from(fd.try_clone_to_owned().unwrap())
            .metadata()
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            })
    };
    assert_eq!(ino(entry.fd()).unwrap(), ino(file.as_fd()).unwrap());
    // An entry of another kind under the name is not taken for memory.
    let mut other = FdRegistry::new();
    other
        .register("r-ram", FdKind::OTHER, file.try_clone().unwrap(), b"")
        .unwrap();
    let e = GuestRam::<()>::reattach_from(ram.layout(), &mut other, &MemoryOptions::default())
        .unwrap_err();
    assert!(matches!(e, Error::MissingBacking { .. }), "{e}");
    assert_eq!(other.len(), 1);
}

#[test]
fn adoption_refuses_what_would_not_survive_or_would_lie() {
    let opts = || (GuestAddress(0), 4usize << 20);
    // Names do not match the regions.
    let file = memfd("n-ram", 4 * MIB, true);
    let mem = || {
        GuestMemoryMmap::<()>::from_ranges_with_files([(
            opts().0,
            opts().1,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap()
    };
    let e = GuestRam::adopt(mem(), &["a", "b"]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NameCount {
                regions: 1,
                names: 2
            }
        ),
        "{e}"
    );

    // A private file mapping: the guest's writes would never reach the file.
    let private = MmapRegionBuilder::<()>::new(4 << 20)
        .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE)
        .build()
        .unwrap();
    let region = GuestRegionMmap::new(private, GuestAddress(0)).unwrap();
    let m = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    let e = GuestRam::adopt(m, &["n-ram"]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidRegion {
                reason: RegionProblem::PrivateMapping,
                ..
            }
        ),
        "{e}"
    );

    // A memfd that cannot be sealed.
    let unsealable = memfd("u-ram", 4 * MIB, false);
    let m = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        4 << 20,
        Some(FileOffset::new(unsealable, 0)),
    )])
    .unwrap();
    assert!(matches!(
        GuestRam::adopt(m, &["u-ram"]),
        Err(Error::NotSealed { .. })
    ));

    // One file under two names, and two files under one name.
    let f2 = memfd("n2-ram", 4 * MIB, true);
    let two = |a: &File, b: &File| {
        GuestMemoryMmap::<()>::from_ranges_with_files([
            (
                GuestAddress(0),
                4 << 20,
                Some(FileOffset::new(a.try_clone().unwrap(), 0)),
            ),
            (
                GuestAddress(1 << 32),
                4 << 20,
                Some(FileOffset::new(b.try_clone().unwrap(), 0)),
            ),
        ])
        .unwrap()
    };
    let e = GuestRam::adopt(two(&file, &file), &["x", "y"]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidRegion {
                index: 1,
                reason: RegionProblem::SharedBackingMismatch(0),
                ..
            }
        ),
        "{e}"
    );
    let e = GuestRam::adopt(two(&file, &f2), &["x", "x"]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidRegion {
                index: 1,
                reason: RegionProblem::SharedBackingMismatch(0),
                ..
            }
        ),
        "{e}"
    );
    // The same file twice at overlapping offsets.
    let e = GuestRam::adopt(two(&file, &file), &["x", "x"]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidRegion {
                reason: RegionProblem::OverlapsInBacking(0),
                ..
            }
        ),
        "{e}"
    );

    // Anonymous memory is described, and no update is offered for it.
    let anon = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let ram = GuestRam::adopt(anon, &["anon"]).unwrap();
    assert_eq!(ram.layout().regions[0].kind, BackendKind::Anonymous);
    assert!(ram.check_mode(UpdateMode::Restart).is_err());
}

#[test]
fn a_file_region_must_be_named_by_its_own_path() {
    let dir = std::env::temp_dir().join(format!("cpr-adopt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("ram-a");
    let b = dir.join("ram-b");
    for p in [&a, &b] {
        File::create(p).unwrap().set_len(4 * MIB).unwrap();
    }
    let open = |p: &std::path::Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    };
    let mem = |f: File| {
        GuestMemoryMmap::<AtomicBitmap>::from_ranges_with_files([(
            GuestAddress(0),
            4 << 20,
            Some(FileOffset::new(f, 0)),
        )])
        .unwrap()
    };
    // Mapped a, named b: refused before anything is recorded.
    let e = GuestRam::adopt(mem(open(&a)), &[b.to_str().unwrap()]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidRegion {
                reason: RegionProblem::NotTheMappedFile,
                ..
            }
        ),
        "{e}"
    );
    // A relative name is refused.
    let e = GuestRam::adopt(mem(open(&a)), &["ram-a"]).unwrap_err();
    assert!(matches!(e, Error::BadPath { .. }), "{e}");
    // Named right: described as a file found by path.
    let ram = GuestRam::adopt(mem(open(&a)), &[a.to_str().unwrap()]).unwrap();
    assert!(ram.layout().regions[0].kind.has_path());
    ram.memory().write_obj(0xabu8, GuestAddress(4095)).unwrap();
    let layout = ram.layout().clone();
    drop(ram);
    let again = GuestRam::<AtomicBitmap>::reattach_with_bitmap(
        &layout,
        &mut Default::default(),
        &MemoryOptions::default(),
    )
    .unwrap();
    assert_eq!(
        again.memory().read_obj::<u8>(GuestAddress(4095)).unwrap(),
        0xab
    );
    drop(again);
    std::fs::remove_dir_all(&dir).unwrap();
}
