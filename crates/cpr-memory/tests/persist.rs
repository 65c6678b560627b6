// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest memory written in one process image is read back intact after exec (memfd) and in
//! a new process (a /dev/shm file by path); every reattach failure is a typed error.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cpr_memory::{
    BackendKind, Error, GuestRam, MemoryLayout, MemoryOptions, RegionSpec, UpdateMode,
};
use cpr_snapshot::{Schema, Snapshot, SnapshotWriter};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

fn schema() -> Schema {
    Schema::builder()
        .types(cpr_memory::section_types())
        .next_version()
        .type_version::<MemoryLayout>(2)
        .build()
        .unwrap()
}

fn save_layout(layout: &MemoryLayout, path: &Path) {
    let schema = schema();
    let mut w = SnapshotWriter::new(Vec::new(), &schema, "test", "1", 2).unwrap();
    w.write_section(0, layout).unwrap();
    std::fs::write(path, w.finish().unwrap()).unwrap();
}

fn load_layout(path: &Path) -> MemoryLayout {
    let bytes = std::fs::read(path).unwrap();
    let schema = schema();
    let mut snap = Snapshot::read_from(bytes.as_slice(), &schema).unwrap();
    snap.take(0).unwrap()
}

/// A value for every 8-byte word, different per region and position.
fn word(gpa: u64, seed: u64) -> u64 {
    (gpa ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn write_pattern(ram: &GuestRam, seed: u64) {
    for r in &ram.layout().regions {
        let words: Vec<u8> = (0..r.size / 8)
            .flat_map(|i| word(r.guest_addr + i * 8, seed).to_le_bytes())
            .collect();
        ram.memory()
            .write_slice(&words, GuestAddress(r.guest_addr))
            .unwrap();
    }
}

fn check_pattern(ram: &GuestRam, seed: u64) -> usize {
    let mut bad = 0;
    for r in &ram.layout().regions {
        let mut buf = vec![0u8; r.size as usize];
        ram.memory()
            .read_slice(&mut buf, GuestAddress(r.guest_addr))
            .unwrap();
        for (i, chunk) in buf.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(chunk.try_into().unwrap());
            if v != word(r.guest_addr + i as u64 * 8, seed) {
                bad += 1;
            }
        }
    }
    bad
}

fn clear_cloexec(fd: i32) {
    // SAFETY: F_SETFD with 0 changes only the fd's flags; fd is open and ours.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    assert_eq!(r, 0);
}

/// Removes a path when dropped, so no test leaves files in /dev/shm.
struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn shm_path(tag: &str) -> Cleanup {
    Cleanup(PathBuf::from(format!(
        "/dev/shm/cpr-memory-test-{}-{tag}",
        std::process::id()
    )))
}

#[test]
fn memfd_pattern_survives_exec_in_place() {
    const STAGE: &str = "CPR_MEMORY_EXEC_STAGE";
    const TEST: &str = "memfd_pattern_survives_exec_in_place";
    let state = std::env::var("CPR_MEMORY_EXEC_STATE").map(PathBuf::from);
    match std::env::var(STAGE).as_deref() {
        Ok("before") => {
            // First image: create, fill, keep the memfds open across exec.
            let ram = GuestRam::builder()
                .region(RegionSpec::memfd("ram.low", 0, 32 * MIB))
                .region(RegionSpec::memfd("ram.high", 4096 * MIB, 16 * MIB))
                .build()
                .unwrap();
            write_pattern(&ram, 0x5eed);
            save_layout(ram.layout(), &state.unwrap());
            let mut fd_env = String::new();
            for (name, fd) in ram.memfds() {
                clear_cloexec(fd.as_raw_fd());
                fd_env.push_str(&format!("{name}={},", fd.as_raw_fd()));
            }
            println!("pid before exec {}", std::process::id());
            let err = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
                .env(STAGE, "after")
                .env("CPR_MEMORY_EXEC_FDS", fd_env)
                .exec();
            panic!("exec failed: {err}");
        }
        Ok("after") => {
            // Second image, same pid: reattach from the inherited fds and check every word.
            let layout = load_layout(&state.unwrap());
            let mut fds: HashMap<String, OwnedFd> = HashMap::new();
            for item in std::env::var("CPR_MEMORY_EXEC_FDS").unwrap().split(',') {
                if let Some((name, fd)) = item.split_once('=') {
                    let raw: i32 = fd.parse().unwrap();
                    // SAFETY: the first image left this memfd open for us and nothing else owns it.
                    fds.insert(name.to_string(), unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            let ram = GuestRam::reattach(&layout, &mut fds, &MemoryOptions::default()).unwrap();
            assert!(fds.is_empty(), "reattach takes the fds it uses");
            assert_eq!(check_pattern(&ram, 0x5eed), 0);
            println!("pid after exec {}", std::process::id());
            println!("PATTERN INTACT");
        }
        _ => {
            let dir = std::env::temp_dir().join(format!("cpr-memory-exec-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let out = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
                .env(STAGE, "before")
                .env("CPR_MEMORY_EXEC_STATE", dir.join("layout"))
                .output()
                .unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "child failed: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("PATTERN INTACT"), "{stdout}");
            let pid = |prefix: &str| {
                stdout
                    .lines()
                    .find_map(|l| l.split_once(prefix).map(|(_, pid)| pid))
                    .map(str::to_string)
                    .unwrap()
            };
            assert_eq!(
                pid("pid before exec "),
                pid("pid after exec "),
                "exec kept the pid"
            );
        }
    }
}

#[test]
fn shm_file_is_reattached_by_path_in_a_new_process() {
    const TEST: &str = "shm_file_is_reattached_by_path_in_a_new_process";
    if let Ok(state) = std::env::var("CPR_MEMORY_SHM_STATE") {
        // The new process: only the saved layout tells it where memory is.
        let layout = load_layout(Path::new(&state));
        assert_eq!(layout.regions[0].kind, BackendKind::Tmpfs);
        let ram =
            GuestRam::reattach(&layout, &mut HashMap::new(), &MemoryOptions::default()).unwrap();
        assert_eq!(check_pattern(&ram, 0xf11e), 0);
        println!("PATTERN INTACT");
        return;
    }
    let file = shm_path("reboot");
    let state = shm_path("reboot-state");
    {
        let ram = GuestRam::builder()
            .region(RegionSpec::file(&file.0, 0, 8 * MIB))
            .build()
            .unwrap();
        assert_eq!(ram.layout().regions[0].kind, BackendKind::Tmpfs);
        let warnings = ram.check_mode(UpdateMode::Reboot).unwrap();
        assert!(warnings[0].to_string().contains("kexec"));
        write_pattern(&ram, 0xf11e);
        save_layout(ram.layout(), &state.0);
    } // The old process's mapping and fd are gone.
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env("CPR_MEMORY_SHM_STATE", &state.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PATTERN INTACT"));
}

#[test]
fn created_file_is_exclusive_and_private() {
    use std::os::unix::fs::MetadataExt;
    let file = shm_path("exclusive");
    let ram = GuestRam::builder()
        .region(RegionSpec::file(&file.0, 0, MIB))
        .build()
        .unwrap();
    assert_eq!(std::fs::metadata(&file.0).unwrap().mode() & 0o777, 0o600);
    // A second create of the same path fails instead of sharing someone's memory.
    let again = GuestRam::builder()
        .region(RegionSpec::file(&file.0, 0, MIB))
        .build();
    assert!(
        matches!(again, Err(Error::Os { op: "create", .. })),
        "{again:?}"
    );
    // A symlink at the path is not followed.
    let link = shm_path("exclusive-link");
    std::os::unix::fs::symlink(&file.0, &link.0).unwrap();
    let via_link = GuestRam::builder()
        .region(RegionSpec::file(&link.0, 0, MIB).existing())
        .build();
    assert!(
        matches!(via_link, Err(Error::BadPath { .. })),
        "{via_link:?}"
    );
    drop(ram);
}

#[test]
fn failed_build_removes_the_files_it_created() {
    let a = shm_path("partial-a");
    let b = shm_path("partial-b");
    std::fs::write(&b.0, b"someone else's").unwrap();
    let r = GuestRam::builder()
        .region(RegionSpec::file(&a.0, 0, MIB))
        .region(RegionSpec::file(&b.0, MIB, MIB))
        .build();
    assert!(r.is_err());
    assert!(!a.0.exists(), "the file this build created is removed");
    assert_eq!(
        std::fs::read(&b.0).unwrap(),
        b"someone else's",
        "the other is untouched"
    );
}

fn memfd_ram(size: u64) -> (GuestRam, HashMap<String, OwnedFd>) {
    let ram = GuestRam::builder()
        .region(RegionSpec::memfd("ram", 0, size))
        .build()
        .unwrap();
    let fds = ram
        .memfds()
        .into_iter()
        .map(|(n, fd)| (n.to_string(), fd.try_clone_to_owned().unwrap()))
        .collect();
    (ram, fds)
}

#[test]
fn reattach_missing_backing() {
    let (ram, _) = memfd_ram(MIB);
    let mut none = HashMap::new();
    let e = GuestRam::reattach(ram.layout(), &mut none, &MemoryOptions::default()).unwrap_err();
    assert!(
        matches!(&e, Error::MissingBacking { index: 0, name } if name == "ram"),
        "{e}"
    );

    let gone = shm_path("missing");
    let mut layout = ram.layout().clone();
    layout.regions[0].kind = BackendKind::Tmpfs;
    layout.regions[0].name = gone.0.to_str().unwrap().to_string();
    let e = GuestRam::reattach(&layout, &mut none, &MemoryOptions::default()).unwrap_err();
    assert!(matches!(e, Error::MissingBacking { index: 0, .. }), "{e}");
}

#[test]
fn reattach_too_small() {
    let file = shm_path("small");
    let ram = GuestRam::builder()
        .region(RegionSpec::file(&file.0, 0, 2 * MIB))
        .build()
        .unwrap();
    let layout = ram.layout().clone();
    drop(ram);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file.0)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let e =
        GuestRam::reattach(&layout, &mut HashMap::new(), &MemoryOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::TooSmall { index: 0, need, have, .. } if need == 2 * MIB && have == MIB),
        "{e}"
    );
}

#[test]
fn reattach_wrong_page_size() {
    let (ram, mut fds) = memfd_ram(4 * MIB);
    let mut layout = ram.layout().clone();
    layout.regions[0].page_size = 2 * MIB;
    let e = GuestRam::reattach(&layout, &mut fds, &MemoryOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::PageSizeMismatch { index: 0, expected, found: 4096, .. } if expected == 2 * MIB),
        "{e}"
    );
    assert!(fds.contains_key("ram"), "nothing is taken on error");
}

#[test]
fn reattach_overlap() {
    let (ram, mut fds) = memfd_ram(4 * MIB);
    let mut layout = ram.layout().clone();
    let mut second = layout.regions[0].clone();
    second.guest_addr = 2 * MIB;
    second.offset = 0;
    layout.regions.push(second);
    let e = GuestRam::reattach(&layout, &mut fds, &MemoryOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Overlap {
                first: 0,
                second: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn reattach_sealed_size_mismatch() {
    let (ram, mut fds) = memfd_ram(4 * MIB);
    let mut layout = ram.layout().clone();
    // The layout claims the memfd was sealed at 8 MiB; it is 4 MiB (and the region fits).
    layout.regions[0].backing_size = 8 * MIB;
    let e = GuestRam::reattach(&layout, &mut fds, &MemoryOptions::default()).unwrap_err();
    assert!(
        matches!(e, Error::SealedSizeMismatch { index: 0, expected, found, .. } if expected == 8 * MIB && found == 4 * MIB),
        "{e}"
    );
}

#[test]
fn reattach_refuses_unsealed_and_wrong_kind() {
    let (ram, _) = memfd_ram(MIB);
    // A tmpfs file handed in under a memfd name is the wrong kind.
    let file = shm_path("wrongkind");
    let f = std::fs::File::create(&file.0).unwrap();
    f.set_len(MIB).unwrap();
    let mut fds = HashMap::from([("ram".to_string(), OwnedFd::from(f))]);
    let e = GuestRam::reattach(ram.layout(), &mut fds, &MemoryOptions::default()).unwrap_err();
    assert!(matches!(e, Error::WrongKind { index: 0, .. }), "{e}");
    // A /dev/null "memory" is the wrong kind too.
    let null = std::fs::File::open("/dev/null").unwrap();
    let mut fds = HashMap::from([("ram".to_string(), OwnedFd::from(null))]);
    let e = GuestRam::reattach(ram.layout(), &mut fds, &MemoryOptions::default()).unwrap_err();
    assert!(matches!(e, Error::WrongKind { .. }), "{e}");
}

#[test]
fn sealed_memfd_cannot_be_resized() {
    let (ram, _) = memfd_ram(2 * MIB);
    let (fd, _) = ram.region_backing(0).unwrap();
    let f = std::fs::File::from(fd.try_clone_to_owned().unwrap());
    assert!(f.set_len(MIB).is_err(), "shrink refused by F_SEAL_SHRINK");
    assert!(f.set_len(4 * MIB).is_err(), "grow refused by F_SEAL_GROW");
}

#[test]
fn volatile_memory_is_refused_for_every_mode() {
    let ram = GuestRam::builder()
        .region(RegionSpec::anonymous(0, 4 * MIB))
        .build()
        .unwrap();
    ram.memory().write_obj(7u8, GuestAddress(0)).unwrap();
    assert!(ram.region_backing(0).is_none());
    for mode in UpdateMode::ALL {
        let e = ram.check_mode(mode).unwrap_err();
        assert!(matches!(e, Error::ModeUnsupported { index: 0, .. }));
        assert!(e.to_string().contains("volatile"), "{e}");
    }
    let e = GuestRam::reattach(ram.layout(), &mut HashMap::new(), &MemoryOptions::default())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidRegion { .. }));
}

#[test]
fn build_refuses_bad_specs() {
    let relative = GuestRam::builder()
        .region(RegionSpec::file("relative/path", 0, MIB))
        .build();
    assert!(matches!(relative, Err(Error::BadPath { .. })));
    let misaligned = GuestRam::builder()
        .region(RegionSpec::memfd("x", 100, MIB))
        .build();
    assert!(matches!(misaligned, Err(Error::InvalidRegion { .. })));
    let dup = GuestRam::builder()
        .region(RegionSpec::memfd("x", 0, MIB))
        .region(RegionSpec::memfd("x", MIB, MIB))
        .build();
    assert!(matches!(dup, Err(Error::InvalidRegion { index: 1, .. })));
    let overlap = GuestRam::builder()
        .region(RegionSpec::memfd("a", 0, 2 * MIB))
        .region(RegionSpec::memfd("b", MIB, MIB))
        .build();
    assert!(matches!(overlap, Err(Error::Overlap { .. })));
    let huge_noreserve = GuestRam::builder()
        .region(RegionSpec::memfd("h", 0, 2 * MIB).huge_pages(cpr_memory::HugePageSize::Size2M))
        .options(MemoryOptions {
            noreserve: true,
            ..Default::default()
        })
        .build();
    assert!(matches!(huge_noreserve, Err(Error::InvalidRegion { .. })));
    assert!(matches!(GuestRam::builder().build(), Err(Error::Empty)));
}

#[test]
fn prefault_and_thp_options_work() {
    for prefault in [
        cpr_memory::Prefault::MapPopulate,
        cpr_memory::Prefault::PopulateWrite,
    ] {
        let ram = GuestRam::builder()
            .region(RegionSpec::memfd("p", 0, 4 * MIB))
            .options(MemoryOptions {
                noreserve: false,
                prefault,
                transparent_huge_pages: true,
            })
            .build()
            .unwrap();
        write_pattern(&ram, 1);
        assert_eq!(check_pattern(&ram, 1), 0);
    }
}
