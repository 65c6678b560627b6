// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A versioned, self-describing, integrity-checked container for device state.
//!
//! A VMM that live-updates itself saves each device's state as a *section* (a name, an
//! instance id, a version and an encoded payload) inside one snapshot, which ends with a
//! CRC-64 over everything before it. The container lets a newer VMM read state written by an
//! older one, lets a newer VMM write state at an older *target version* for a rollback, and
//! lets a reader skip sections it does not know when the writer marked them skippable.
//! Every length is capped and checked before anything is allocated, so a corrupt or hostile
//! input gives a typed [`Error`] with the offset of the problem, never a panic or a huge
//! allocation.
//!
//! A state type derives its encoding: [`State`](derive@State) for types nested in sections,
//! [`Section`](derive@Section) for a section. The encoding behind them (versionize's, today)
//! is not part of the API: no embedder names it.
//!
//! ```
//! use cpr_snapshot::{Schema, Section, Snapshot, SnapshotWriter};
//!
//! #[derive(Clone, Debug, PartialEq, Section)]
//! #[section(name = "uart")]
//! struct Uart {
//!     lcr: u8,
//!     #[state(since = 2, default = "default_scratch")]
//!     scratch: u8,
//! }
//! impl Uart {
//!     fn default_scratch(_: u16) -> u8 { 0 }
//! }
//!
//! // State version 1 had Uart v1; state version 2 introduced Uart v2.
//! let schema = Schema::builder()
//!     .section::<Uart>()
//!     .next_version()
//!     .type_version::<Uart>(2)
//!     .build()?;
//!
//! let mut w = SnapshotWriter::new(Vec::new(), &schema, "my-vmm", "2.0", schema.latest_version())?;
//! w.write_section(0, &Uart { lcr: 3, scratch: 7 })?;
//! let bytes = w.finish()?;
//!
//! let mut snap = Snapshot::read_from(bytes.as_slice(), &schema)?;
//! assert_eq!(snap.take::<Uart>(0)?, Uart { lcr: 3, scratch: 7 });
//! # Ok::<(), cpr_snapshot::Error>(())
//! ```
#![deny(missing_docs)]

mod atomic;
mod blob;
mod error;
mod format;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod persist;
mod reader;
mod schema;
mod writer;

pub use atomic::{remove_stale_temporaries, save_in_dir, save_to_path};
pub use blob::{Blob, MAX_BLOB_LEN};
pub use error::{Error, PayloadError, Result, SchemaError};
pub use format::{crc64, SectionInfo, SnapshotHeader, FORMAT_VERSION, MAGIC, MAX_APP_STRING};
pub use persist::Persist;
pub use reader::{inspect, Inspection, Snapshot};
pub use schema::{
    Limits, Schema, SchemaBuilder, Section, State, TypeEntry, TypeHistory, MAX_NAME_LEN,
};
pub use writer::SnapshotWriter;

/// What a state type needs in scope: `use cpr_snapshot::prelude::*;`, then
/// `#[derive(State)]` (types nested in sections) or `#[derive(Section)]` with
/// `#[section(name = "...")]`, or `#[derive(State)]` and a hand-written `impl Section`.
pub mod prelude {
    pub use crate::persist::Persist;
    pub use crate::schema::{Section, State};
    pub use cpr_snapshot_derive::{Section, State};
}

pub use cpr_snapshot_derive::{Section, State};

/// Not part of the API: what the derives' generated code names.
#[doc(hidden)]
pub mod __private {
    pub use versionize;

    /// The payload encoding behind [`State`](crate::State). Implemented by the derives; the
    /// encoding may change without a change in any user's source.
    pub trait Encoding: versionize::Versionize {}
    impl<T: versionize::Versionize> Encoding for T {}
}

// The derives name `::cpr_snapshot`; this crate uses them too.
extern crate self as cpr_snapshot;
