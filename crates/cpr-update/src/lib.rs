// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The live-update sequence and handover protocol, for any VMM.
//!
//! A VMM implements [`Pausable`] (stop and start its vCPUs) and [`Updatable`] (save and
//! restore its memory description and device state as cpr-snapshot sections, hand its fds
//! over, and optionally park client input); this crate drives the three modes of QEMU's CPR
//! on both sides:
//!
//! - **restart** (exec in place): [`update`] with [`Target::Restart`] asks the target
//!   binary which state versions it reads ([`STATE_VERSIONS_FLAG`]) while the guest runs,
//!   pauses, saves into a sealed memfd and execs; the new image calls
//!   [`resume_after_exec`]. If the new image cannot restore, it execs back into the previous
//!   binary, which resumes the guest and reports why.
//! - **transfer** (to a new process): [`update`] with [`Target::Transfer`] runs the
//!   [`protocol`] over a UNIX socket: hellos (versions, features), guest memory while the
//!   guest runs (the new side builds its VM before the pause), then the state, restore,
//!   commit. The new side calls [`receive_transfer`]. Until the commit the old process can
//!   resume the guest; after it, it never does.
//! - **reboot** (state file, new process, possibly after a host kexec): [`update`] with
//!   [`Target::Reboot`] writes the state atomically; the new process calls
//!   [`restore_saved`]. A target state version lets an older build read the file.
//!
//! Every step is timed ([`Report`]: blackout and phases) and reported to
//! [`Updatable::progress`]. On the old side any failure before the new side owns the guest
//! undoes what was done and resumes the guest ([`Failure`] says where it is).
//!
//! What cannot be caught: a restart's new image that dies hard before it can exec back
//! (the guest is lost; the state memfd dies with it); a transfer's new process killed after
//! it took the commit (the old process has let go); the old process killed while the guest
//! is paused and before its state left it. `docs/DESIGN.md` lists what the operator then
//! has.
//!
//! A toy VMM whose "guest" is a counter, saved to a state file and restored:
//!
//! ```
//! use cpr_snapshot::prelude::*;
//! use cpr_snapshot::Schema;
//! use cpr_update::{BoxError, BuildInfo, Ids, Incoming, Loader, Pausable, Saver, Target, Updatable};
//!
//! #[derive(Clone, Debug, Default, PartialEq, State)]
//! struct Counter { value: u64 }
//! impl Section for Counter { const NAME: &'static str = "counter"; }
//!
//! struct Toy { schema: Schema, running: bool, value: u64 }
//!
//! impl Pausable for Toy {
//!     fn is_running(&self) -> bool { self.running }
//!     fn pause(&mut self) -> Result<u64, BoxError> { self.running = false; Ok(cpr_update::monotonic_ns()) }
//!     fn resume(&mut self) -> Result<(), BoxError> { self.running = true; Ok(()) }
//! }
//!
//! impl Updatable for Toy {
//!     fn build_info(&self) -> BuildInfo { BuildInfo::new("toy", "1.0", &self.schema) }
//!     fn schema(&self) -> &Schema { &self.schema }
//!     fn save_memory(&mut self, _out: &mut Saver<'_>) -> Result<(), BoxError> { Ok(()) }
//!     fn save(&mut self, out: &mut Saver<'_>) -> Result<(), BoxError> {
//!         Ok(out.write(0, &Counter { value: self.value })?)
//!     }
//!     fn prepare(&mut self, _input: &mut Loader<'_, '_>) -> Result<(), BoxError> { Ok(()) }
//!     fn restore(&mut self, input: &mut Loader<'_, '_>) -> Result<(), BoxError> {
//!         self.value = input.take::<Counter>(0)?.value;
//!         Ok(())
//!     }
//! }
//!
//! let schema = || Schema::builder()
//!     .section::<Counter>()
//!     .types(cpr_update::section_types())
//!     .build()
//!     .unwrap();
//! # let dir_path = std::env::temp_dir().join(format!("cpr-update-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir_path).unwrap();
//! let dir = std::fs::File::open(&dir_path)?;
//! let mut old = Toy { schema: schema(), running: true, value: 42 };
//! let target = Target::Reboot { dir, name: "vm.state".into(), version: None };
//! cpr_update::update(&mut old, &Ids::new_vm()?, target, &Default::default())?;
//!
//! // Later, in a new process:
//! let bytes = std::fs::read(dir_path.join("vm.state"))?;
//! let mut new = Toy { schema: schema(), running: false, value: 0 };
//! let resumed = cpr_update::restore_saved(&mut new, &bytes, &Incoming::default())?;
//! assert_eq!((new.value, new.running), (42, true));
//! assert_eq!(resumed.ids.generation, 1);
//! # std::fs::remove_dir_all(&dir_path).unwrap();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod api;
pub mod clock;
mod error;
pub mod fault;
pub mod handover;
mod incoming;
mod info;
mod outgoing;
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
