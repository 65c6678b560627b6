// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A toy VMM for the sequence tests: its "guest RAM" is a memfd (or a file) whose first 16
//! bytes hold a stamp (the saved state's id, or `LIVE`), its "device" a counter and an fd.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cpr_fd::FdKind;
use cpr_snapshot::prelude::*;
use cpr_snapshot::Schema;
use cpr_update::{BoxError, BuildInfo, Loader, Pausable, Progress, Saver, Updatable};

pub const RAM_SIZE: u64 = 64 << 10;
pub const LIVE: [u8; 16] = *b"LIVE............";

/// The toy's memory section.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct ToyMemory {
    pub size: u64,
}
impl Section for ToyMemory {
    const NAME: &'static str = "toy-memory";
}

/// The toy's device section.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct ToyDevice {
    pub value: u64,
}
impl Section for ToyDevice {
    const NAME: &'static str = "toy-device";
}

pub fn schema() -> Schema {
    Schema::builder()
        .section::<ToyMemory>()
        .section::<ToyDevice>()
        .types(cpr_update::section_types())
        .next_version()
        .oldest_version(1)
        .build()
        .unwrap()
}

#[derive(Debug, Default)]
pub struct Toy {
    pub schema: Option<Schema>,
    pub build: Option<BuildInfo>,
    pub running: bool,
    pub value: u64,
    pub ram: Option<File>,
    /// For reboot: where guest RAM lives (the "command line").
    pub ram_path: Option<PathBuf>,
    pub device: Option<OwnedFd>,
    pub pauses: u32,
    pub resumes: u32,
    /// A hook that fails: `pause`, `save`, `prepare`, `restore`, `commit`, `hold`.
    pub fail: Option<&'static str>,
    pub events: Vec<String>,
    pub committed: bool,
    pub discarded: bool,
    /// Set when the toy resumes its guest.
    pub resumed_flag: Option<Arc<AtomicBool>>,
    /// `restore` waits (up to a minute) until this is set.
    pub restore_waits_for: Option<Arc<AtomicBool>>,
}

impl Toy {
    pub fn new(running: bool) -> Toy {
        Toy {
            schema: Some(schema()),
            running,
            ..Default::default()
        }
    }

    /// A toy with guest RAM in a new memfd holding `pattern` after the stamp.
    pub fn with_ram(mut self, pattern: &[u8]) -> Toy {
        let name = std::ffi::CString::new("toy-ram").unwrap();
        // SAFETY: memfd_create with a valid name returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(RAM_SIZE).unwrap();
        f.write_all_at(&LIVE, 0).unwrap();
        f.write_all_at(pattern, 16).unwrap();
        self.ram = Some(f);
        self
    }

    pub fn with_device(mut self) -> Toy {
        let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        ev.write(3).unwrap();
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the EventFd owns this fd for the borrow, which only duplicates it.
        let fd = unsafe { BorrowedFd::borrow_raw(ev.as_raw_fd()) };
        self.device = Some(fd.try_clone_to_owned().unwrap());
        self
    }

    pub fn stamp(&self) -> [u8; 16] {
        let mut s = [0u8; 16];
        self.ram.as_ref().unwrap().read_exact_at(&mut s, 0).unwrap();
        s
    }

    pub fn ram_bytes(&self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.ram
            .as_ref()
            .unwrap()
            .read_exact_at(&mut b, 16)
            .unwrap();
        b
    }

    fn failing(&self, hook: &str) -> Result<(), BoxError> {
        if self.fail == Some(hook) {
            return Err(format!("the toy's {hook} failed").into());
        }
        Ok(())
    }
}

impl Pausable for Toy {
    fn is_running(&self) -> bool {
        self.running
    }
    fn pause(&mut self) -> Result<u64, BoxError> {
        self.failing("pause")?;
        self.running = false;
        self.pauses += 1;
        Ok(cpr_update::monotonic_ns())
    }
    fn resume(&mut self) -> Result<(), BoxError> {
        self.running = true;
        self.resumes += 1;
        if let Some(f) = &self.resumed_flag {
            f.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn first_entry(&self, _timeout: Duration) -> Option<u64> {
        Some(cpr_update::monotonic_ns())
    }
}

impl Updatable for Toy {
    fn build_info(&self) -> BuildInfo {
        self.build
            .clone()
            .unwrap_or_else(|| BuildInfo::new("toy", "1.0", self.schema()))
    }
    fn schema(&self) -> &Schema {
        self.schema.as_ref().unwrap()
    }
    fn hold_input(&mut self) -> Result<(), BoxError> {
        self.failing("hold")
    }
    fn save_memory(&mut self, out: &mut Saver<'_>) -> Result<(), BoxError> {
        let ram = self.ram.as_ref().ok_or("no RAM")?;
        out.write(0, &ToyMemory { size: RAM_SIZE })?;
        // The stamp: this state belongs to this memory, once.
        ram.write_all_at(&out.ids().state, 0)?;
        if out.carries_fds() {
            out.register("toy.ram", FdKind::MEMORY, ram.try_clone()?, b"")?;
        }
        Ok(())
    }
    fn save(&mut self, out: &mut Saver<'_>) -> Result<(), BoxError> {
        self.failing("save")?;
        out.write(0, &ToyDevice { value: self.value })?;
        if let (Some(d), true) = (&self.device, out.carries_fds()) {
            out.register("toy.dev", FdKind::EVENTFD, d.try_clone()?, b"")?;
        }
        Ok(())
    }
    fn abandon(&mut self) {
        if let Some(r) = &self.ram {
            let _ = r.write_all_at(&LIVE, 0);
        }
    }
    fn prepare(&mut self, input: &mut Loader<'_, '_>) -> Result<(), BoxError> {
        self.failing("prepare")?;
        let m: ToyMemory = input.take(0)?;
        let ram = match input.fds().take("toy.ram") {
            Some(e) => File::from(e.into_fd()),
            None => {
                let p = self.ram_path.as_ref().ok_or("no RAM fd and no path")?;
                File::options().read(true).write(true).open(p)?
            }
        };
        if ram.metadata()?.len() != m.size {
            return Err("RAM size differs".into());
        }
        let mut stamp = [0u8; 16];
        ram.read_exact_at(&mut stamp, 0)?;
        if stamp != input.ids().state {
            return Err("stale state: the memory is not the one this state was saved from".into());
        }
        self.ram = Some(ram);
        Ok(())
    }
    fn restore(&mut self, input: &mut Loader<'_, '_>) -> Result<(), BoxError> {
        self.failing("restore")?;
        if let Some(f) = &self.restore_waits_for {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !f.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let d: ToyDevice = input.take(0)?;
        self.value = d.value;
        self.device = input.fds().take("toy.dev").map(|e| e.into_fd());
        Ok(())
    }
    fn commit(&mut self) -> Result<(), BoxError> {
        self.failing("commit")?;
        self.committed = true;
        if let Some(r) = &self.ram {
            r.write_all_at(&LIVE, 0)?;
        }
        Ok(())
    }
    fn discard(&mut self) {
        self.discarded = true;
        self.ram = None;
        self.device = None;
    }
    fn peer_took_over(&self) -> Option<bool> {
        Some(self.stamp() == LIVE)
    }
    fn progress(&mut self, event: Progress<'_>) {
        let name = format!("{event:?}");
        let name = name.split([' ', '{', '(']).next().unwrap_or("").to_string();
        self.events.push(name);
    }
}

/// Reads the count an eventfd holds.
pub fn eventfd_count(fd: &OwnedFd) -> u64 {
    let mut f = File::from(fd.try_clone().unwrap());
    let mut b = [0u8; 8];
    f.read_exact(&mut b).unwrap();
    // Put it back for the next reader.
    f.write_all(&b).unwrap();
    let _ = f.seek(SeekFrom::Start(0));
    u64::from_ne_bytes(b)
}
