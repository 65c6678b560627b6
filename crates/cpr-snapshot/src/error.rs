// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Errors of the snapshot container.

use std::path::PathBuf;

/// Errors returned while writing, reading or decoding a snapshot.
///
/// Every error that comes from the input names the byte offset (from the start of the
/// container) at which the problem was found, so a corrupt file can be diagnosed with a hex
/// dump.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The underlying reader or writer failed (other than by ending early).
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        /// Container offset at which the operation failed.
        offset: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file system operation on a named path failed.
    #[error("{op} `{path}`: {source}")]
    Path {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The input ended before the container did.
    #[error("snapshot truncated at offset {offset}: expected {what}")]
    Truncated {
        /// Offset at which more data was expected.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// The input does not start with the snapshot magic. The message does not show the
    /// bytes found (the input may be any file); the field has them for a caller that wants
    /// them.
    #[error("not a cpr snapshot: bad magic at offset 0")]
    BadMagic {
        /// The bytes found instead.
        found: [u8; 8],
    },
    /// The container format version is not one this library reads.
    #[error(
        "unsupported snapshot container format version {found} (this library reads {supported})"
    )]
    UnsupportedFormat {
        /// Version found in the file.
        found: u16,
        /// Version this library reads.
        supported: u16,
    },
    /// The state version in the file is newer than the reader's schema knows, older than the
    /// oldest it still reads, or zero.
    #[error(
        "snapshot state version {found} is not supported (reader knows versions {oldest}..={latest})"
    )]
    UnsupportedStateVersion {
        /// State version found in the file.
        found: u16,
        /// Oldest state version the reader's schema reads.
        oldest: u16,
        /// Latest state version the reader's schema knows.
        latest: u16,
    },
    /// A writer was asked to write at a state version its schema does not have.
    #[error("cannot write at state version {target}: schema knows versions {oldest}..={latest}")]
    InvalidTargetVersion {
        /// Requested target version.
        target: u16,
        /// Oldest version of the writer's schema.
        oldest: u16,
        /// Latest version of the writer's schema.
        latest: u16,
    },
    /// A section type is not declared in the writer's schema.
    #[error("section `{name}` is not declared in the schema")]
    UndeclaredSection {
        /// Section name.
        name: &'static str,
    },
    /// A section does not exist at the state version being written or read: it was
    /// introduced later.
    #[error(
        "section `{name}` was introduced at state version {introduced}, after {state_version}"
    )]
    SectionNotInVersion {
        /// Section name.
        name: &'static str,
        /// The state version that introduced it.
        introduced: u16,
        /// The state version being written or read.
        state_version: u16,
    },
    /// A field that must be zero, or a tag with a fixed set of values, holds something else.
    #[error("invalid {what} {value:#x} at offset {offset}")]
    InvalidField {
        /// Offset of the field.
        offset: u64,
        /// Which field.
        what: &'static str,
        /// The value found.
        value: u64,
    },
    /// A name or identifier string is empty, too long, not UTF-8 or uses forbidden characters.
    #[error("invalid {what} at offset {offset}: {reason}")]
    InvalidString {
        /// Offset of the string's length byte.
        offset: u64,
        /// Which string.
        what: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A length is larger than the configured cap; nothing was allocated for it.
    #[error("{what} of {len} bytes at offset {offset} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Offset of the length field.
        offset: u64,
        /// What the length is for.
        what: &'static str,
        /// The length requested.
        len: u64,
        /// The configured cap.
        limit: u64,
    },
    /// More sections than the configured cap.
    #[error("more than {limit} sections (at offset {offset})")]
    TooManySections {
        /// Offset of the first section beyond the cap.
        offset: u64,
        /// The configured cap.
        limit: usize,
    },
    /// The same (name, instance) pair appears twice.
    #[error("duplicate section `{name}` instance {instance} at offset {offset}")]
    DuplicateSection {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
        /// Offset of the second occurrence.
        offset: u64,
    },
    /// The stored checksum does not match the content.
    #[error(
        "checksum mismatch at offset {offset}: stored {stored:#018x}, computed {computed:#018x}"
    )]
    ChecksumMismatch {
        /// Offset of the stored checksum.
        offset: u64,
        /// Checksum stored in the file.
        stored: u64,
        /// Checksum computed over the content.
        computed: u64,
    },
    /// Bytes follow the checksum.
    #[error("trailing data after the snapshot end at offset {offset}")]
    TrailingData {
        /// Offset of the first extra byte.
        offset: u64,
    },
    /// A section the reader does not know, and that the writer marked as required.
    #[error("unknown required section `{name}` instance {instance} (version {version}) at offset {offset}")]
    UnknownRequiredSection {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
        /// Section version.
        version: u16,
        /// Offset of the section header.
        offset: u64,
    },
    /// A section the caller asked for is not in the snapshot (or was already taken).
    #[error("section `{name}` instance {instance} is missing from the snapshot")]
    MissingSection {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
    },
    /// The section's recorded version is not the version the reader's schema gives its type
    /// at the snapshot's state version: the two schemas disagree and decoding would be wrong.
    #[error(
        "section `{name}` instance {instance} has version {found}, but the reader's schema \
         expects version {expected} at state version {state_version}"
    )]
    SectionVersionMismatch {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
        /// Version recorded in the section header.
        found: u16,
        /// Version the reader's schema expects.
        expected: u16,
        /// State version of the snapshot.
        state_version: u16,
    },
    /// A section payload could not be decoded.
    #[error("cannot decode section `{name}` instance {instance} at offset {offset}: {reason}")]
    Decode {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
        /// Offset of the payload.
        offset: u64,
        /// What the decoder found.
        reason: PayloadError,
    },
    /// A section payload decoded without consuming all of its bytes.
    #[error(
        "section `{name}` instance {instance} at offset {offset} has {unused} unused payload bytes"
    )]
    PayloadTrailingBytes {
        /// Section name.
        name: String,
        /// Instance id.
        instance: u32,
        /// Offset of the payload.
        offset: u64,
        /// Number of bytes left over.
        unused: usize,
    },
    /// A section could not be encoded.
    #[error("cannot encode section `{name}`: {reason}")]
    Encode {
        /// Section name.
        name: String,
        /// What the encoder found.
        reason: PayloadError,
    },
    /// The schema description is inconsistent.
    #[error("invalid schema: {0}")]
    Schema(SchemaError),
}

/// Why a section payload could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The payload ends inside a value.
    #[error("the payload ends inside a value")]
    Truncated,
    /// A string is longer than the encoding allows.
    #[error("a string of {0} bytes is longer than the encoding allows")]
    StringTooLong(usize),
    /// A sequence is longer than the encoding allows.
    #[error("a sequence of {0} elements is longer than the encoding allows")]
    SequenceTooLong(usize),
    /// A value the type does not have (an enum variant, a version, an invalid `bool` or
    /// UTF-8), or a check of the type's own: as the type said it.
    #[error("{0}")]
    Invalid(String),
    /// Writing the payload failed (errno).
    #[error("I/O error (errno {0})")]
    Io(i32),
}

impl From<versionize::VersionizeError> for PayloadError {
    fn from(e: versionize::VersionizeError) -> Self {
        use versionize::VersionizeError as V;
        match e {
            // Reading past the end of a slice has no errno.
            V::Io(0) => PayloadError::Truncated,
            V::Io(n) => PayloadError::Io(n),
            V::StringLength(n) => PayloadError::StringTooLong(n),
            V::VecLength(n) => PayloadError::SequenceTooLong(n),
            V::Deserialize(m) if m.contains("unexpected end") || m.contains("UnexpectedEof") => {
                PayloadError::Truncated
            }
            V::Serialize(m) | V::Deserialize(m) | V::Semantic(m) => PayloadError::Invalid(m),
        }
    }
}

/// Why a schema could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// A section name breaks the naming rules.
    #[error("section name `{name}`: {reason}")]
    InvalidName {
        /// The name.
        name: &'static str,
        /// Which rule.
        reason: &'static str,
    },
    /// Two section types use one name.
    #[error("section name `{name}` declared twice")]
    DuplicateSection {
        /// The name.
        name: &'static str,
    },
    /// More than 65535 state versions.
    #[error("too many state versions")]
    TooManyVersions,
    /// A type version outside `1..=` the type's current version.
    #[error("type {type_name} version {version} is outside 1..={max}")]
    TypeVersionOutOfRange {
        /// The Rust type.
        type_name: &'static str,
        /// The version asked for.
        version: u16,
        /// The type's current version.
        max: u16,
    },
    /// A later state version gives a type a lower version than an earlier one did.
    #[error("type {type_name} version {version} is lower than its earlier version {previous}")]
    TypeVersionLowered {
        /// The Rust type.
        type_name: &'static str,
        /// The version asked for.
        version: u16,
        /// The version it had before.
        previous: u16,
    },
    /// A declared type is at a newer version than the latest state version says: writing
    /// would silently drop its newer fields.
    #[error(
        "type {type_name} is at version {current}, but state version {state_version} declares \
         version {declared}: add a state version with type_version::<{type_name}>({current})"
    )]
    TypeVersionBehind {
        /// The Rust type.
        type_name: &'static str,
        /// Its version at the latest state version.
        declared: u16,
        /// Its current version.
        current: u16,
        /// The latest state version.
        state_version: u16,
    },
    /// The oldest supported state version is zero or newer than the latest.
    #[error("oldest state version {oldest} is outside 1..={latest}")]
    OldestVersion {
        /// The oldest version asked for.
        oldest: u16,
        /// The latest state version.
        latest: u16,
    },
    /// Inconsistent limits.
    #[error("max_section {max_section} must be at most max_total {max_total} and 4 GiB")]
    InvalidLimits {
        /// The per-section cap.
        max_section: u64,
        /// The total cap.
        max_total: u64,
    },
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
