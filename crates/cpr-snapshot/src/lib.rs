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
//! Payloads are encoded with `versionize`; derive it from [`prelude`], which is the only
//! place this crate exposes the encoder.
//!
//! ```
//! use cpr_snapshot::prelude::*;
//! use cpr_snapshot::{Schema, Snapshot, SnapshotWriter};
//!
//! #[derive(Clone, Debug, PartialEq, Versionize)]
//! struct Uart {
//!     lcr: u8,
//!     #[version(start = 2, default_fn = "default_scratch")]
//!     scratch: u8,
//! }
//! impl Uart {
//!     fn default_scratch(_: u16) -> u8 { 0 }
//! }
//! impl Section for Uart {
//!     const NAME: &'static str = "uart";
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
mod reader;
mod schema;
mod writer;

pub use atomic::{remove_stale_temporaries, save_in_dir, save_to_path};
pub use blob::{Blob, MAX_BLOB_LEN};
pub use error::{Error, Result, SchemaError};
pub use format::{crc64, SectionInfo, SnapshotHeader, FORMAT_VERSION, MAGIC, MAX_APP_STRING};
pub use reader::{inspect, Inspection, Snapshot};
pub use schema::{Limits, Schema, SchemaBuilder, Section, TypeEntry, TypeHistory, MAX_NAME_LEN};
pub use writer::SnapshotWriter;

/// What a state type needs in scope to derive its encoding:
/// `use cpr_snapshot::prelude::*;` then `#[derive(Clone, Versionize)]` and `impl Section`.
///
/// The derive's generated code names `Versionize`, `VersionMap`, `VersionizeResult` and
/// `VersionizeError` unqualified, so they are re-exported here; treat them as opaque.
pub mod prelude {
    pub use crate::schema::Section;
    pub use versionize::{VersionMap, Versionize, VersionizeError, VersionizeResult};
    pub use versionize_derive::Versionize;
}
