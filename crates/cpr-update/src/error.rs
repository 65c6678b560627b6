// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Errors of the update sequence.

use std::ops::RangeInclusive;
use std::path::PathBuf;

use crate::protocol::ProtocolError;
use crate::Mode;

/// An error from a VMM's own hooks ([`Updatable`](crate::Updatable) and
/// [`Pausable`](crate::Pausable) methods).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The VMM hook that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Step {
    /// [`Updatable::hold_input`](crate::Updatable::hold_input).
    HoldInput,
    /// [`Pausable::pause`](crate::Pausable::pause).
    Pause,
    /// [`Updatable::save_memory`](crate::Updatable::save_memory).
    SaveMemory,
    /// [`Updatable::save`](crate::Updatable::save).
    Save,
    /// [`Updatable::prepare`](crate::Updatable::prepare).
    Prepare,
    /// [`Updatable::restore`](crate::Updatable::restore).
    Restore,
    /// [`Updatable::commit`](crate::Updatable::commit).
    Commit,
    /// [`Pausable::resume`](crate::Pausable::resume).
    Resume,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::HoldInput => "holding client input",
            Step::Pause => "pausing the vCPUs",
            Step::SaveMemory => "saving guest memory",
            Step::Save => "saving the device state",
            Step::Prepare => "preparing the VM",
            Step::Restore => "restoring the device state",
            Step::Commit => "taking the guest over",
            Step::Resume => "resuming the vCPUs",
        })
    }
}

/// Why two builds cannot hand a guest to each other.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Incompatibility {
    /// Different applications.
    OtherApplication {
        /// This build's application.
        ours: String,
        /// The other's.
        theirs: String,
    },
    /// No state version the writer writes is one the reader reads.
    NoCommonVersion {
        /// What the writer writes.
        writes: RangeInclusive<u16>,
        /// What the reader reads.
        reads: RangeInclusive<u16>,
    },
}

impl std::fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incompatibility::OtherApplication { ours, theirs } => {
                write!(f, "it is `{theirs}`, not `{ours}`")
            }
            Incompatibility::NoCommonVersion { writes, reads } => write!(
                f,
                "it reads state versions {}..={}, this build writes {}..={}",
                reads.start(),
                reads.end(),
                writes.start(),
                writes.end()
            ),
        }
    }
}

/// Errors of an update, on either side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The VMM refused the mode before anything stopped.
    #[error("{mode} update is not possible: {source}")]
    Refused {
        /// The mode.
        mode: Mode,
        /// Why, from [`Updatable::check`](crate::Updatable::check).
        #[source]
        source: BoxError,
    },
    /// The target build cannot read any state version this one writes (or is another
    /// application).
    #[error("the target ({target}) cannot take this guest: {reason}")]
    Incompatible {
        /// The target's application and version.
        target: String,
        /// Why.
        reason: Incompatibility,
    },
    /// The target binary did not say which state versions it reads.
    #[error("cannot ask `{}` which state versions it reads: {reason}", program.display())]
    Probe {
        /// The binary.
        program: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A state version that this build cannot write was asked for.
    #[error("state version {requested} cannot be written: this build writes {}..={}", writes.start(), writes.end())]
    InvalidVersion {
        /// The version asked for.
        requested: u16,
        /// What this build writes.
        writes: RangeInclusive<u16>,
    },
    /// A VMM hook failed.
    #[error("{step}: {source}")]
    Vmm {
        /// Which hook.
        step: Step,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The state container.
    #[error(transparent)]
    Snapshot(#[from] cpr_snapshot::Error),
    /// fd preservation or transfer.
    #[error(transparent)]
    Fd(#[from] cpr_fd::Error),
    /// The transfer protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A system call.
    #[error("{op}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The fds an earlier image handed over are not an update by this crate.
    #[error("the handed-over fds are not a live update: {0}")]
    NotAnUpdate(&'static str),
    /// The restart handover record is corrupt.
    #[error("restart handover record: {0}")]
    Handover(&'static str),
    /// The state's update section says another mode, or holds bad identities.
    #[error("the state is not usable for this {expected} update: {reason}")]
    BadUpdateSection {
        /// The mode of the incoming update.
        expected: Mode,
        /// What is wrong.
        reason: String,
    },
    /// An fd was registered in reboot mode, where no fd survives.
    #[error("fd `{name}` cannot be carried: a reboot keeps no fds")]
    NoFdsInReboot {
        /// Its name.
        name: String,
    },
    /// The new image could not restore the state and could not exec back into the previous
    /// binary either: the guest is lost.
    #[error(
        "restore failed ({restore}), and so did the exec back into the previous binary: {exec}"
    )]
    FallbackFailed {
        /// Why the restore failed.
        restore: Box<Error>,
        /// Why the exec back failed.
        exec: Box<Error>,
    },
    /// The old process went away after the guest was paused and before it was committed,
    /// and this (new) process could not take the guest over.
    #[error(
        "the old process ended in state {state} and the guest could not be taken over: {reason}"
    )]
    Orphaned {
        /// The protocol state.
        state: crate::protocol::State,
        /// Why it could not be taken over.
        reason: String,
    },
    /// The owner word the old process sent with `MEMORY` is missing or unusable
    /// ([`owner`](crate::owner)).
    #[error("the transfer's owner word is unusable: {0}")]
    OwnerWord(String),
    /// New side of a transfer: the old process took the guest back (it reclaimed the owner
    /// word) before this one could claim it. The guest runs in the old process.
    #[error("the old process took the guest back before this one could claim it")]
    Reclaimed,
    /// A fault injected by a test (only with the `fault-injection` feature).
    #[error("injected fault at {0}")]
    Fault(&'static str),
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, source }
}

pub(crate) fn hook(step: Step) -> impl FnOnce(BoxError) -> Error {
    move |source| Error::Vmm { step, source }
}
