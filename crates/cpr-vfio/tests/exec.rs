// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The fd plumbing across a real exec: container, group, device and iommufd fds (stand-ins
//! of the kernel model) registered with cpr-fd under stable names, the test binary execs
//! itself, and the new image rebuilds both devices from the inherited fds, completes the
//! handoff without a reset, and has no other fd open. The model's state is carried in a
//! file, as the kernel would keep it across the exec.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use cpr_fd::{reclaim, FdKind, FdRegistry};
use cpr_snapshot::{Schema, Snapshot, SnapshotWriter};
use cpr_vfio::model::Model;
use cpr_vfio::{Backing, DmaMapping, IommufdDevice, IommufdState, LegacyDevice, LegacyState};

const TEST: &str = "devices_survive_a_real_exec";
const SYSFS: &str = "/sys/bus/pci/devices/0000:02:00.0";

fn schema() -> Schema {
    Schema::builder()
        .section::<LegacyState>()
        .section::<IommufdState>()
        .build()
        .unwrap()
}

#[test]
fn devices_survive_a_real_exec() {
    let dir = std::env::var("CPR_VFIO_EXEC_DIR").map(PathBuf::from);
    match std::env::var("CPR_VFIO_STAGE").as_deref() {
        Ok("before") => before(&dir.unwrap()),
        Ok("after") => after(&dir.unwrap()),
        _ => {
            let dir = std::env::temp_dir().join(format!("cpr-vfio-exec-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let out = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
                .env("CPR_VFIO_STAGE", "before")
                .env("CPR_VFIO_EXEC_DIR", &dir)
                .output()
                .unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("HANDOFF COMPLETE"), "{text}");
        }
    }
}

fn before(dir: &Path) {
    let k = Model::new(true);
    let ram = cpr_fd::sealed_memfd("guest-ram.0", &[0u8; 64]).unwrap();
    let mut legacy = LegacyDevice::open(&k, Path::new(SYSFS)).unwrap();
    legacy
        .map(
            &k,
            DmaMapping {
                iova: 0,
                size: 1 << 21,
                vaddr: 0x7f00_0000_0000,
                backing: Backing {
                    name: "guest-ram.0".into(),
                    offset: 0,
                },
            },
        )
        .unwrap();
    let mut iommufd =
        IommufdDevice::open(&k, Path::new("/sys/bus/pci/devices/0000:03:00.0")).unwrap();
    iommufd
        .map_file(
            &k,
            0,
            1 << 21,
            ram.as_fd(),
            Backing {
                name: "guest-ram.0".into(),
                offset: 0,
            },
        )
        .unwrap();

    legacy.check_update(&k).unwrap();
    iommufd.check_update().unwrap();
    legacy.invalidate(&k).unwrap();

    let mut reg = FdRegistry::new();
    legacy.register_fds(&mut reg).unwrap();
    iommufd.register_fds(&mut reg).unwrap();
    reg.register("guest-ram.0", FdKind::MEMORY, ram, b"")
        .unwrap();
    let schema = schema();
    let mut w = SnapshotWriter::new(Vec::new(), &schema, "test", "1", 1).unwrap();
    w.write_section(0, legacy.state()).unwrap();
    w.write_section(0, iommufd.state()).unwrap();
    std::fs::write(dir.join("state"), w.finish().unwrap()).unwrap();
    std::fs::write(dir.join("model"), k.save()).unwrap();
    drop(legacy);
    drop(iommufd);

    std::env::set_var("CPR_VFIO_STAGE", "after");
    let args = ["--exact", TEST, "--nocapture", "--test-threads=1"].map(Into::into);
    let err = reg.prepare().unwrap().exec_self(&args);
    panic!("exec failed: {err}");
}

fn after(dir: &Path) {
    let mut reg = reclaim().unwrap().expect("fds handed over");
    let k = Model::load(&std::fs::read(dir.join("model")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("state")).unwrap();
    let schema = schema();
    let mut snap = Snapshot::read_from(bytes.as_slice(), &schema).unwrap();
    let legacy_state: LegacyState = snap.take(0).unwrap();
    let iommufd_state: IommufdState = snap.take(0).unwrap();
    assert!(legacy_state.invalidated);

    let mut legacy = LegacyDevice::reclaim(&mut reg, legacy_state).unwrap();
    let iommufd = IommufdDevice::reclaim(&k, &mut reg, iommufd_state).unwrap();
    let ram = reg.take("guest-ram.0").unwrap();
    assert!(reg.is_empty(), "every handed-over fd was claimed");

    let new_base = 0x6000_0000_0000u64;
    legacy
        .complete(&k, |m| Some(new_base + m.backing.offset))
        .unwrap();
    assert_eq!(
        k.translate(legacy.container_fd(), 0x40).unwrap(),
        new_base + 0x40
    );
    assert_eq!(
        k.resets(legacy.device_fd()).unwrap(),
        0,
        "legacy device never reset"
    );
    assert_eq!(
        k.resets(iommufd.device_fd()).unwrap(),
        0,
        "iommufd device never reset"
    );
    assert_eq!(
        k.takeovers(iommufd.iommufd()).unwrap(),
        1,
        "the new process took the IOAS over"
    );

    let leaks = reg.unregistered_open_fds().unwrap();
    let mine = [
        legacy.container_fd(),
        legacy.device_fd(),
        iommufd.iommufd(),
        iommufd.device_fd(),
        ram.fd(),
    ]
    .map(|f| std::os::fd::AsRawFd::as_raw_fd(&f));
    let unexpected: Vec<_> = leaks
        .iter()
        .filter(|(fd, t)| !mine.contains(fd) && !t.to_string_lossy().contains("model-group"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected fds after exec: {unexpected:?}"
    );
    println!("HANDOFF COMPLETE");
}
