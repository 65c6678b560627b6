// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Errors of fd preservation and transfer.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::FdIdentity;

/// Errors from the registry, exec, reclaim and transfer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name is already registered.
    #[error("fd name `{0}` is already registered")]
    DuplicateName(String),
    /// A name is empty, too long, or has a NUL or control character.
    #[error("invalid fd name {0:?}: 1 to 128 bytes of printable UTF-8")]
    InvalidName(String),
    /// Metadata attached to an fd is over the cap.
    #[error("metadata of fd `{name}` is {len} bytes, more than {max}")]
    MetadataTooLarge {
        /// Entry name.
        name: String,
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `execve` failed; every fd is back to close-on-exec and the registry is intact.
    #[error("exec of `{}` failed: {source}", path.display())]
    Exec {
        /// The program.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An argument or environment string for exec contains a NUL byte.
    #[error("exec argument or environment entry {0:?} contains a NUL byte")]
    NulInArgument(OsString),
    /// The manifest environment variable does not hold an fd number we could own.
    #[error("environment variable {var}={value:?} is not a valid manifest fd number")]
    BadVariable {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: OsString,
    },
    /// The manifest fd is closed or is not a sealed cpr-fd manifest memfd.
    #[error("fd {fd} named by {var} is not a cpr-fd manifest: {reason}")]
    NotManifest {
        /// The variable.
        var: &'static str,
        /// The fd number.
        fd: i32,
        /// Why it was refused.
        reason: NotManifest,
    },
    /// The manifest is larger than the cap.
    #[error("fd manifest of {len} bytes exceeds the cap of {max} bytes")]
    ManifestTooLarge {
        /// Its length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// The manifest is malformed or inconsistent.
    #[error("fd manifest is invalid at byte {offset}: {problem}")]
    ManifestInvalid {
        /// Where in the manifest (0 for what concerns it as a whole).
        offset: usize,
        /// What is wrong.
        problem: ManifestProblem,
    },
    /// An fd the manifest lists is not open.
    #[error("fd `{name}` (number {fd}) listed in the manifest is not open")]
    FdMissing {
        /// Entry name.
        name: String,
        /// The fd number.
        fd: i32,
    },
    /// An fd is open but is not the file that was registered.
    #[error("fd `{name}` (number {fd}) is {found}, but {expected} was registered")]
    IdentityMismatch {
        /// Entry name.
        name: String,
        /// The fd number.
        fd: i32,
        /// Identity recorded by the sender.
        expected: FdIdentity,
        /// Identity found.
        found: FdIdentity,
    },
    /// The peer closed the socket, or sent less than the protocol requires.
    #[error("fd transfer truncated while reading {0}")]
    TransferTruncated(&'static str),
    /// The first bytes on the socket are not a cpr-fd transfer.
    #[error("not a cpr-fd transfer (bad header magic)")]
    BadTransferHeader,
    /// The kernel dropped fds from a control message (`MSG_CTRUNC`), e.g. because the
    /// receiver hit its fd limit.
    #[error("control message truncated in chunk {chunk}: fds were dropped by the kernel")]
    ControlTruncated {
        /// Chunk index.
        chunk: u32,
    },
    /// A chunk did not carry what the manifest announced.
    #[error("chunk {chunk}: expected {expected} fds, received {received}")]
    ChunkMismatch {
        /// Chunk index.
        chunk: u32,
        /// fds expected.
        expected: usize,
        /// fds received.
        received: usize,
    },
    /// More fds than the transfer protocol allows.
    #[error("{count} fds exceed the transfer limit of {max}")]
    TooManyFds {
        /// The count.
        count: usize,
        /// The cap.
        max: usize,
    },
}

/// Why an fd named as the manifest is not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotManifest {
    /// The fd is not open.
    #[error("it is not open")]
    Closed,
    /// It is not a memfd.
    #[error("it is not a memfd")]
    NotMemfd,
    /// It is a memfd of another name.
    #[error("it is the memfd `{0}`")]
    WrongName(String),
    /// Its seals do not forbid writing, growing and shrinking.
    #[error("it is not sealed against writes and resizing (seals {0:#x})")]
    NotSealed(u32),
}

/// What is wrong with a manifest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestProblem {
    /// It does not start with the manifest magic.
    #[error("not a cpr-fd manifest (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("format version {0}, this build reads 1")]
    UnsupportedVersion(u16),
    /// It ends inside a record.
    #[error("truncated")]
    Truncated,
    /// Bytes follow the last record.
    #[error("trailing bytes")]
    TrailingBytes,
    /// More records than fds can be held.
    #[error("{0} records, more than {max}", max = crate::registry::MAX_RECORDS)]
    TooManyRecords(u32),
    /// A record's name is not a valid fd name.
    #[error("invalid name {0:?}")]
    InvalidName(String),
    /// Two records have one name.
    #[error("name `{0}` appears twice")]
    DuplicateName(String),
    /// Two records have one fd number (or position).
    #[error("fd {0} appears twice")]
    DuplicateFd(i32),
    /// A record's metadata is over the cap.
    #[error("metadata of `{0}` is too large")]
    MetadataTooLarge(String),
    /// A record claims an fd the process must not give away (stdio, the manifest itself).
    #[error("`{name}` claims fd {fd}")]
    ReservedFd {
        /// The entry.
        name: String,
        /// The fd.
        fd: i32,
    },
    /// A transfer's records do not match the fds it announced.
    #[error("{records} records for {fds} fds, or records out of order")]
    CountMismatch {
        /// Records in the manifest.
        records: usize,
        /// fds announced.
        fds: usize,
    },
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn os(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Os { op, source }
}
