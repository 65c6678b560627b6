// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What a VMM implements ([`Pausable`], [`Updatable`]) and what the sequence hands it
//! ([`Saver`], [`Loader`]), reports ([`Progress`], [`Report`]) and returns.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use cpr_fd::{FdKind, FdRegistry};
use cpr_snapshot::{Schema, Section, Snapshot, SnapshotHeader, SnapshotWriter};

use crate::clock::{monotonic_ns, Elapsed, StopTime};
use crate::error::{BoxError, Error};
use crate::info::BuildInfo;
use crate::section::{Ids, UpdateInfo};
use crate::Mode;

/// Stopping and starting the guest's vCPUs (as Cloud Hypervisor's `Pausable`).
pub trait Pausable {
    /// Whether the vCPUs run now.
    fn is_running(&self) -> bool;

    /// Stops every vCPU (pending I/O completed, each vCPU's state ready to save) and returns
    /// the `CLOCK_MONOTONIC` nanoseconds at which the last one left the guest.
    fn pause(&mut self) -> Result<u64, BoxError>;

    /// Runs the vCPUs again: in the old process after a failed update, in the new one after
    /// a successful one (only if the guest ran before).
    fn resume(&mut self) -> Result<(), BoxError>;

    /// When a vCPU first entered the guest after [`resume`](Self::resume), waiting up to
    /// `timeout` (`CLOCK_MONOTONIC` ns). Without it the blackout is not measured.
    fn first_entry(&self, _timeout: Duration) -> Option<u64> {
        None
    }
}

/// What the update sequence needs from a VMM, on the side that hands a guest over (old) and
/// the side that takes it (new). Only the memory and state hooks are required; the rest
/// have defaults that do nothing.
///
/// The old side runs, in order: [`check`](Self::check) (refuse early), and for a transfer
/// [`save_memory`](Self::save_memory) while the guest runs, then
/// [`hold_input`](Self::hold_input), [`pause`](Pausable::pause), [`save`](Self::save)
/// (and `save_memory` here for restart and reboot). If anything fails before the new side
/// owns the guest: [`abandon`](Self::abandon), [`resume`](Pausable::resume) (if it ran),
/// [`release_input`](Self::release_input).
///
/// The new side runs [`prepare`](Self::prepare) (map memory, build the VM: for a transfer
/// while the guest still runs in the old process), [`restore`](Self::restore),
/// [`commit`](Self::commit) once it owns the guest, then `resume`. If it fails before owning
/// it: [`discard`](Self::discard).
pub trait Updatable: Pausable {
    /// Who this build is and which state versions it reads and writes.
    fn build_info(&self) -> BuildInfo;

    /// The schema of this build's state. It must declare the crate's sections
    /// ([`section_types`](crate::section_types)).
    fn schema(&self) -> &Schema;

    /// Refuses, before anything stops, an update this VMM cannot do in `mode` (memory that
    /// would not survive, a device that cannot follow).
    fn check(&self, _mode: Mode) -> Result<(), BoxError> {
        Ok(())
    }

    /// Stops taking client input (monitor commands, console bytes) that the next image
    /// would not see; what is already taken goes into the state in [`save`](Self::save).
    fn hold_input(&mut self) -> Result<(), BoxError> {
        Ok(())
    }

    /// Takes client input again after a failed update.
    fn release_input(&mut self) {}

    /// Writes the sections that describe guest memory, and registers the fds behind it.
    /// A transfer calls it before the pause and sends the result first, so the new side
    /// maps memory and builds its VM while the guest still runs.
    fn save_memory(&mut self, out: &mut Saver<'_>) -> Result<(), BoxError>;

    /// Writes every other section and registers every other fd, with the vCPUs paused.
    fn save(&mut self, out: &mut Saver<'_>) -> Result<(), BoxError>;

    /// Undoes what [`save_memory`](Self::save_memory) and [`save`](Self::save) changed,
    /// after a failed update, before the guest resumes here.
    fn abandon(&mut self) {}

    /// Maps guest memory and builds the VM from what `save_memory` wrote (fds in
    /// [`Loader::fds`]).
    fn prepare(&mut self, input: &mut Loader<'_, '_>) -> Result<(), BoxError>;

    /// Restores the rest into the prepared VM. The vCPUs must not run yet.
    fn restore(&mut self, input: &mut Loader<'_, '_>) -> Result<(), BoxError>;

    /// The guest is this process's now: the old process will never resume it.
    fn commit(&mut self) -> Result<(), BoxError> {
        Ok(())
    }

    /// Drops what `prepare` and `restore` built, after the new side failed: the old
    /// process (or the previous binary) runs the guest.
    fn discard(&mut self) {}

    /// Old side of a transfer, after the commit, when the new process ended without a word:
    /// whether it had begun to own the guest. A VMM that marks ownership where both
    /// processes see it (cpr-memory's stamp in guest memory, which the new side's
    /// [`commit`](Self::commit) retires before any vCPU runs) answers `Some(false)` if the
    /// mark is still this update's, and the guest then resumes here. `None` (the default:
    /// cannot tell) never resumes it, since the new process may have run it.
    fn peer_took_over(&self) -> Option<bool> {
        None
    }

    /// A step of the update happened (for events, logs, a progress line).
    fn progress(&mut self, _event: Progress<'_>) {}
}

/// Where the sequence stands, reported to [`Updatable::progress`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Progress<'a> {
    /// The state version to write is chosen (`target`: the build that will read it, if
    /// known).
    Negotiated {
        /// The mode.
        mode: Mode,
        /// The state version.
        version: u16,
        /// The target build.
        target: Option<&'a BuildInfo>,
    },
    /// Transfer: memory sent while the guest runs.
    MemorySent,
    /// Transfer: the new side built its VM.
    PeerReady,
    /// The vCPUs stopped (`stop_ns`, `CLOCK_MONOTONIC`), or were already paused.
    Paused {
        /// When.
        stop_ns: u64,
        /// Whether they ran until now.
        was_running: bool,
    },
    /// The state is encoded.
    Saved {
        /// Its size.
        bytes: usize,
    },
    /// Restart: about to exec.
    Executing {
        /// The program.
        program: &'a Path,
    },
    /// Transfer: state and fds sent.
    StateSent,
    /// Transfer: the new side restored everything.
    PeerRestored,
    /// Transfer: the new process owns the guest (both sides report it).
    Committed,
    /// Transfer, old side: the guest runs in the new process.
    PeerStarted,
    /// The update failed on the old side; the guest is as `guest` says.
    Failed {
        /// Why.
        error: &'a Error,
        /// Where the guest is.
        guest: &'a Guest,
    },
    /// New side: the state is decoded.
    Decoded {
        /// Who wrote it.
        header: &'a SnapshotHeader,
    },
    /// New side: memory mapped and VM built.
    Prepared,
    /// New side: everything restored.
    Restored,
    /// Transfer, new side: the old process died after the pause without aborting, so this
    /// one takes the guest over.
    TookOver,
    /// Restart, new side: the restore failed; exec'ing back into the previous binary.
    FallingBack {
        /// Why.
        error: &'a Error,
    },
    /// New side: the guest runs again (or stays paused, as it was).
    Resumed {
        /// The report.
        report: &'a Report,
    },
}

/// Where the guest is after an update failed on the old side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guest {
    /// Running in this process.
    Running,
    /// Paused in this process, as it was before the update.
    Paused,
    /// In this process, but resuming it failed: the VMM should stop.
    NotResumed(String),
}

/// A failed update on the old side.
#[derive(Debug)]
pub struct Failure {
    /// Why.
    pub error: Error,
    /// Where the guest is.
    pub guest: Guest,
    /// Whether the update had stopped the guest (and so resumed it), or failed before.
    pub stopped: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.guest {
            Guest::Running if self.stopped => {
                write!(f, "{}; the guest resumed in this process", self.error)
            }
            Guest::Running => write!(
                f,
                "{}; the guest was not stopped and runs on in this process",
                self.error
            ),
            Guest::Paused => write!(f, "{}; the guest stays paused in this process", self.error),
            Guest::NotResumed(e) => write!(
                f,
                "{}; the guest is in this process but could not be resumed: {e}",
                self.error
            ),
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// A timing point of an update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Phase {
    /// What had just finished (`stop`, `encoded`, `start`, `decoded`, `prepared`,
    /// `restored`, `committed`, `first-entry`, or a VMM's own [`Loader::mark`]).
    pub name: String,
    /// Time since the vCPUs stopped.
    pub since_stop: Elapsed,
}

/// How an update went, as the new side measured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The mode.
    pub mode: Mode,
    /// Whether the guest ran before (and so after) the update.
    pub was_running: bool,
    /// The state version of the state.
    pub state_version: u16,
    /// Its size.
    pub state_bytes: usize,
    /// From the last vCPU leaving the guest to the first entering it again; `None` for a
    /// paused guest, or if the VMM does not report [`Pausable::first_entry`].
    pub blackout: Option<Elapsed>,
    /// Timing points, in order.
    pub phases: Vec<Phase>,
}

/// The timing points being collected on the new side.
#[derive(Debug, Default)]
pub(crate) struct Marks(pub(crate) Vec<(String, u64)>);

impl Marks {
    pub(crate) fn mark(&mut self, name: &str) {
        self.0.push((name.to_string(), monotonic_ns()));
    }

    pub(crate) fn at(&mut self, name: &str, mono_ns: u64) {
        self.0.push((name.to_string(), mono_ns));
    }

    pub(crate) fn relative_to(&self, stop: &StopTime) -> Vec<Phase> {
        self.0
            .iter()
            .map(|(name, t)| Phase {
                name: name.clone(),
                since_stop: stop.until(*t),
            })
            .collect()
    }
}

/// The old side's view of the state being written: sections through
/// [`write`](Self::write), fds through [`register`](Self::register).
#[derive(Debug)]
pub struct Saver<'a> {
    pub(crate) writer: SnapshotWriter<'a, Vec<u8>>,
    pub(crate) fds: Option<&'a mut FdRegistry>,
    pub(crate) mode: Mode,
    pub(crate) ids: Ids,
}

impl<'a> Saver<'a> {
    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The VM's and this update's identities (record the state id with the memory).
    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    /// The state version being written (an older one for a rollback).
    pub fn target_version(&self) -> u16 {
        self.writer.target_version()
    }

    /// Whether `T` exists at the target version (a section added later does not, and an
    /// older reader would refuse it).
    pub fn can_write<T: Section>(&self) -> bool {
        self.writer.can_write::<T>()
    }

    /// Writes `state` as section `T::NAME`, instance `instance`.
    pub fn write<T: Section>(&mut self, instance: u32, state: &T) -> Result<(), Error> {
        self.writer
            .write_section(instance, state)
            .map_err(Error::from)
    }

    /// Whether fds reach the next image (restart and transfer: yes; reboot: no).
    pub fn carries_fds(&self) -> bool {
        self.fds.is_some()
    }

    /// The registry of fds for the next image, to hand to a component that registers its
    /// own (`GuestRam::register_fds`, say); `None` in reboot mode, where no fd survives.
    pub fn fds(&mut self) -> Option<&mut FdRegistry> {
        self.fds.as_deref_mut()
    }

    /// Hands `fd` (anything `Into<OwnedFd>`) to the next image under `name`. Refused in
    /// reboot mode, where no fd survives.
    pub fn register(
        &mut self,
        name: &str,
        kind: FdKind,
        fd: impl Into<OwnedFd>,
        metadata: &[u8],
    ) -> Result<(), Error> {
        match self.fds.as_deref_mut() {
            Some(r) => r.register(name, kind, fd, metadata).map_err(Error::from),
            None => Err(Error::NoFdsInReboot {
                name: name.to_string(),
            }),
        }
    }
}

/// The new side's view of the incoming state: sections through [`take`](Self::take), fds
/// through [`fds`](Self::fds).
#[derive(Debug)]
pub struct Loader<'a, 's> {
    pub(crate) snapshot: &'a mut Snapshot<'s>,
    pub(crate) fds: &'a mut FdRegistry,
    pub(crate) mode: Mode,
    pub(crate) ids: Ids,
    pub(crate) info: Option<&'a UpdateInfo>,
    pub(crate) marks: &'a mut Marks,
}

impl<'a, 's> Loader<'a, 's> {
    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The VM's and this update's identities.
    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    /// Who wrote the state, and at which state version.
    pub fn header(&self) -> &SnapshotHeader {
        self.snapshot.header()
    }

    /// Decodes and removes section `T::NAME` instance `instance`.
    pub fn take<T: Section>(&mut self, instance: u32) -> Result<T, Error> {
        self.snapshot.take(instance).map_err(Error::from)
    }

    /// Like [`take`](Self::take), `None` if the section is absent.
    pub fn take_optional<T: Section>(&mut self, instance: u32) -> Result<Option<T>, Error> {
        self.snapshot.take_optional(instance).map_err(Error::from)
    }

    /// Instances of section `T` present, in order.
    pub fn instances<T: Section>(&self) -> Vec<u32> {
        self.snapshot.instances::<T>()
    }

    /// Whether section `T` instance `instance` is present.
    pub fn contains<T: Section>(&self, instance: u32) -> bool {
        self.snapshot.contains::<T>(instance)
    }

    /// Unknown sections the writer marked skippable, which were dropped.
    pub fn skipped(&self) -> &[cpr_snapshot::SectionInfo] {
        self.snapshot.skipped()
    }

    /// The fds handed over (empty after a reboot).
    pub fn fds(&mut self) -> &mut FdRegistry {
        self.fds
    }

    /// Whether the guest ran before the update; `None` in a transfer's `prepare`, before
    /// the old side paused.
    pub fn was_running(&self) -> Option<bool> {
        self.info.map(|i| i.was_running)
    }

    /// When the vCPUs stopped; `None` in a transfer's `prepare`.
    pub fn stop(&self) -> Option<&StopTime> {
        self.info.map(|i| &i.stop)
    }

    /// Time since the vCPUs stopped (for a guest clock that shows the downtime);
    /// [`Elapsed::Unknown`] in a transfer's `prepare`.
    pub fn elapsed(&self) -> Elapsed {
        self.info.map_or(Elapsed::Unknown, |i| i.stop.elapsed())
    }

    /// Records a timing point of the VMM's own (e.g. `memory-slots`) in the report.
    pub fn mark(&mut self, name: &str) {
        self.marks.mark(name);
    }
}
