// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The crate's own section in every state, and the identities it carries.

use cpr_snapshot::prelude::*;
use cpr_snapshot::{Blob, TypeEntry, TypeHistory};

use crate::clock::StopTime;
use crate::error::{io, Error, Result};
use crate::Mode;

/// Who a state belongs to: the VM (random, fixed at its first boot), this update (random,
/// new at every update) and how many updates the VM went through.
///
/// A VMM records the state id where the guest's memory can show it (cpr-memory's stamp) so
/// a state is restored at most once, into the memory it was saved from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ids {
    /// The VM.
    pub vm: [u8; 16],
    /// This update's state.
    pub state: [u8; 16],
    /// Updates so far (1 for the first update's state).
    pub generation: u64,
}

impl Ids {
    /// Identities for a VM that just booted: a fresh VM id, no update yet.
    pub fn new_vm() -> Result<Ids> {
        Ok(Ids {
            vm: random()?,
            state: [0; 16],
            generation: 0,
        })
    }

    /// The identities of the next update of the same VM: a fresh state id, the next
    /// generation.
    pub fn next(&self) -> Result<Ids> {
        Ok(Ids {
            vm: self.vm,
            state: random()?,
            generation: self.generation.saturating_add(1),
        })
    }
}

/// 16 bytes from the kernel's random number generator.
pub fn random() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer we pass, which lives
        // for the call.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io("getrandom")(e));
        }
        got += n as usize;
    }
    Ok(b)
}

/// The update in progress: section `cpr-update`, written last by the old side.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct UpdateSection {
    /// 1 restart, 2 transfer, 3 reboot.
    pub mode: u8,
    /// Whether the guest ran before the update (and must run after it).
    pub was_running: bool,
    /// `CLOCK_MONOTONIC` ns when the last vCPU left the guest.
    pub stop_mono_ns: u64,
    /// The same instant in `CLOCK_REALTIME` ns.
    pub stop_realtime_ns: u64,
    /// The boot the stop happened in.
    pub boot_id: String,
    /// The VM id (16 bytes).
    pub vm_id: Blob,
    /// The state id (16 bytes).
    pub state_id: Blob,
    /// Updates so far.
    pub generation: u64,
    /// `CLOCK_MONOTONIC` ns when the old side finished encoding the other sections.
    pub encoded_mono_ns: u64,
}

impl Section for UpdateSection {
    const NAME: &'static str = "cpr-update";
}

/// The versioned types this crate saves, for an application's
/// [`SchemaBuilder::types`](cpr_snapshot::SchemaBuilder::types).
pub fn section_types() -> Vec<TypeEntry> {
    vec![TypeEntry::section::<UpdateSection>()]
}

/// How this crate's types changed, release by release.
pub const HISTORY: &[TypeHistory] = &[TypeHistory {
    name: "cpr-update",
    version: 1,
    crate_version: "0.2.0",
    change: "mode, stop time (monotonic, real time, boot id), VM and state ids, generation",
}];

/// What the new side learns from a state's update section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateInfo {
    /// The mode.
    pub mode: Mode,
    /// Whether the guest ran before the update.
    pub was_running: bool,
    /// When it stopped.
    pub stop: StopTime,
    /// The identities.
    pub ids: Ids,
    /// When the old side finished encoding (`CLOCK_MONOTONIC` of the stop's boot).
    pub encoded_mono_ns: u64,
}

impl UpdateSection {
    pub(crate) fn new(
        mode: Mode,
        was_running: bool,
        stop: &StopTime,
        ids: &Ids,
        encoded_mono_ns: u64,
    ) -> Self {
        UpdateSection {
            mode: mode.code(),
            was_running,
            stop_mono_ns: stop.mono_ns,
            stop_realtime_ns: stop.realtime_ns,
            boot_id: stop.boot_id.clone(),
            vm_id: Blob(ids.vm.to_vec()),
            state_id: Blob(ids.state.to_vec()),
            generation: ids.generation,
            encoded_mono_ns,
        }
    }

    /// Checks the section against the mode of the incoming update.
    pub fn info(&self, expected: Mode) -> Result<UpdateInfo> {
        let bad = |reason: String| Error::BadUpdateSection { expected, reason };
        let mode =
            Mode::from_code(self.mode).ok_or_else(|| bad(format!("unknown mode {}", self.mode)))?;
        if mode != expected {
            return Err(bad(format!("it was saved for a {mode} update")));
        }
        let id = |b: &Blob, what: &str| -> Result<[u8; 16]> {
            b.as_ref()
                .try_into()
                .map_err(|_| bad(format!("{what} id of {} bytes", b.len())))
        };
        Ok(UpdateInfo {
            mode,
            was_running: self.was_running,
            stop: StopTime {
                mono_ns: self.stop_mono_ns,
                realtime_ns: self.stop_realtime_ns,
                boot_id: self.boot_id.clone(),
            },
            ids: Ids {
                vm: id(&self.vm_id, "VM")?,
                state: id(&self.state_id, "state")?,
                generation: self.generation,
            },
            encoded_mono_ns: self.encoded_mono_ns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fresh_per_update_and_keep_the_vm() {
        let vm = Ids::new_vm().unwrap();
        let a = vm.next().unwrap();
        let b = a.next().unwrap();
        assert_eq!((a.vm, b.vm), (vm.vm, vm.vm));
        assert_ne!(a.state, b.state);
        assert_eq!((a.generation, b.generation), (1, 2));
        assert_ne!(Ids::new_vm().unwrap().vm, vm.vm);
    }

    #[test]
    fn the_section_is_checked_against_the_mode() {
        let ids = Ids::new_vm().unwrap().next().unwrap();
        let stop = StopTime::at(crate::clock::monotonic_ns());
        let s = UpdateSection::new(Mode::Reboot, true, &stop, &ids, 7);
        let info = s.info(Mode::Reboot).unwrap();
        assert_eq!((info.ids, info.was_running, info.stop), (ids, true, stop));
        assert!(s
            .info(Mode::Restart)
            .unwrap_err()
            .to_string()
            .contains("reboot"));
        let mut bad = s.clone();
        bad.state_id = Blob(vec![1; 3]);
        assert!(bad.info(Mode::Reboot).is_err());
        bad = s;
        bad.mode = 9;
        assert!(bad.info(Mode::Reboot).is_err());
    }
}
