// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What a restart hands to the new image besides the VMM's own fds: the state, the binary
//! it came from, and a record of how to go back to it.
//!
//! The record has its own small format, independent of any state version, so that a new
//! image that cannot read the state can still read the record and exec back:
//!
//! ```text
//! magic "CPRUHO01" (8) | attempt u8 | argc u16 | argc × (len u16, bytes) | error len u32 | error
//! [| exec_ns u64]
//! ```
//!
//! `exec_ns` (optional: records without it are read too) is the `CLOCK_MONOTONIC` time
//! just before the `execve`, for the report's `exec` phase.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use crate::error::{Error, Result};

/// fd name of the sealed memfd holding the state container.
pub const FD_STATE: &str = "cpr.state";
/// fd name of the sealed memfd holding the handover record.
pub const FD_HANDOVER: &str = "cpr.handover";
/// fd name of the previous image's executable (`/proc/self/exe`, opened before the exec).
pub const FD_PREVIOUS_EXE: &str = "cpr.previous-exe";
/// fd name of the write end of a pipe whose reader, a child of the process, holds the
/// previous image's address space so the exec did not have to tear it down; its metadata
/// is the child's pid (i32, little-endian). The new image closes it and reaps the child once
/// the guest runs. Sent only to a build that announces [`FEATURE_OLD_MM`].
pub const FD_OLD_MM: &str = "cpr.old-mm";
/// The feature a build announces (every build of this crate does, through
/// [`BuildInfo::new`](crate::BuildInfo::new)) when its restart path releases
/// [`FD_OLD_MM`]; an older build would leave the holder for its exit. A VMM whose seccomp
/// filter kills on `clone(CLONE_VM)` removes it from its `BuildInfo`, and its restarts then
/// start no holder (docs/DESIGN.md lists the system calls).
pub const FEATURE_OLD_MM: &str = "cpr.old-mm";

const MAGIC: &[u8; 8] = b"CPRUHO01";
/// Largest record accepted.
pub const MAX_RECORD: usize = 1 << 20;

/// How the new image of a restart goes back to the previous one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// 0 in the image the update exec'd; 1 in the previous binary, exec'd back into after
    /// the new one failed (which does not fall back again).
    pub attempt: u8,
    /// The previous image's command line, `argv[0]` first.
    pub argv: Vec<OsString>,
    /// Why the new image failed (in a fallback).
    pub error: Option<String>,
    /// `CLOCK_MONOTONIC` ns just before the `execve` (0: not recorded).
    pub exec_ns: u64,
}

impl Record {
    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(self.attempt);
        let argv: Vec<&OsString> = self
            .argv
            .iter()
            .filter(|a| a.len() <= usize::from(u16::MAX))
            .take(usize::from(u16::MAX))
            .collect();
        out.extend_from_slice(&(argv.len() as u16).to_le_bytes());
        for a in argv {
            out.extend_from_slice(&(a.len() as u16).to_le_bytes());
            out.extend_from_slice(a.as_bytes());
        }
        let e = self.error.as_deref().unwrap_or("").as_bytes();
        let e = &e[..e.len().min(64 << 10)];
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
        if self.exec_ns != 0 {
            out.extend_from_slice(&self.exec_ns.to_le_bytes());
        }
        out
    }

    /// Parses a record, refusing anything malformed or over [`MAX_RECORD`].
    pub fn decode(b: &[u8]) -> Result<Record> {
        let bad = Error::Handover;
        if b.len() > MAX_RECORD {
            return Err(bad("too large"));
        }
        let mut c = b;
        let mut take = |n: usize| -> Result<&[u8]> { take_from(&mut c, n) };
        if take(8)? != MAGIC {
            return Err(bad("bad magic"));
        }
        let attempt = take(1)?[0];
        if attempt > 1 {
            return Err(bad("bad attempt"));
        }
        let argc = u16::from_le_bytes([take(1)?[0], take(1)?[0]]);
        let mut argv = Vec::with_capacity(usize::from(argc).min(1024));
        for _ in 0..argc {
            let n = u16::from_le_bytes([take(1)?[0], take(1)?[0]]);
            argv.push(OsString::from_vec(take(usize::from(n))?.to_vec()));
        }
        if argv.is_empty() || argv.iter().any(|a| a.as_bytes().contains(&0)) {
            return Err(bad("bad command line"));
        }
        let n = take(4)?;
        let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
        let e = take(n)?;
        let error = (!e.is_empty()).then(|| String::from_utf8_lossy(e).into_owned());
        let exec_ns = match c.len() {
            0 => 0,
            8 => u64::from_le_bytes(c.try_into().map_err(|_| bad("truncated"))?),
            _ => return Err(bad("trailing bytes")),
        };
        Ok(Record {
            attempt,
            argv,
            error,
            exec_ns,
        })
    }
}

fn take_from<'a>(c: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if c.len() < n {
        return Err(Error::Handover("truncated"));
    }
    let (h, t) = c.split_at(n);
    *c = t;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let r = Record {
            attempt: 1,
            argv: vec!["/usr/bin/vmm".into(), "run".into(), "--x=é".into()],
            error: Some("state version 9 is not supported".into()),
            exec_ns: 0,
        };
        let b = r.encode();
        assert_eq!(Record::decode(&b).unwrap(), r);
        for cut in 0..b.len() {
            assert!(Record::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        // With the exec time: read back; cut inside it, refused.
        let timed = Record {
            exec_ns: 0x1234_5678_9abc,
            ..r.clone()
        };
        let t = timed.encode();
        assert_eq!(t.len(), b.len() + 8);
        assert_eq!(Record::decode(&t).unwrap(), timed);
        for cut in b.len() + 1..t.len() {
            assert!(Record::decode(&t[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(Record::decode(&extra).is_err());
        let mut two = b;
        two[8] = 2;
        assert!(Record::decode(&two).is_err());
        let empty = Record {
            attempt: 0,
            argv: vec![],
            error: None,
            exec_ns: 0,
        };
        assert!(Record::decode(&empty.encode()).is_err());
    }
}
