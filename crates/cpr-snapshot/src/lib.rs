// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

#![doc = include_str!("../README.md")]
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
