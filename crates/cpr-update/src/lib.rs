// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod api;
pub mod clock;
mod error;
pub mod fault;
pub mod handover;
mod incoming;
mod info;
mod outgoing;
pub mod owner;
pub mod protocol;
mod section;
mod sys;

/// The cpr-fd this crate hands fds over with (`reclaim` at the start of `main`).
pub use cpr_fd;
/// The cpr-snapshot its state is written with.
pub use cpr_snapshot;

pub use api::{Failure, Guest, Loader, Pausable, Phase, Progress, Report, Saver, Updatable};
pub use clock::{monotonic_ns, realtime_ns, Elapsed, StopTime};
pub use error::{BoxError, Error, Incompatibility, Result, Step};
pub use incoming::{
    read_state, receive_transfer, restore_saved, resume_after_exec, Incoming, Resumed,
};
pub use info::{answer_probe, probe, BuildInfo, STATE_VERSIONS_FLAG};
pub use outgoing::{update, Outcome, Target, Timeouts};
pub use section::{section_types, Ids, UpdateInfo, UpdateSection, HISTORY};

/// A live-update mode (QEMU's CPR modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// exec in place, fds inherited (QEMU `cpr-exec`).
    Restart,
    /// hand over to a new process over a UNIX socket (QEMU `cpr-transfer`).
    Transfer,
    /// state file, new process, possibly after a host reboot (QEMU `cpr-reboot`).
    Reboot,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 3] = [Mode::Restart, Mode::Transfer, Mode::Reboot];

    pub(crate) fn code(self) -> u8 {
        match self {
            Mode::Restart => 1,
            Mode::Transfer => 2,
            Mode::Reboot => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Mode> {
        Some(match c {
            1 => Mode::Restart,
            2 => Mode::Transfer,
            3 => Mode::Reboot,
            _ => return None,
        })
    }

    /// `restart`, `transfer` or `reboot`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Restart => "restart",
            Mode::Transfer => "transfer",
            Mode::Reboot => "reboot",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown mode `{s}` (restart, transfer, reboot)"))
    }
}
