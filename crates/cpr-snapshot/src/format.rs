// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Byte layout of the container; see docs/DESIGN.md for the full description.
//!
//! All integers are little-endian.
//!
//! ```text
//! header   magic "CPR-SNAP" (8) | format u16 | flags u16 (0) | state_version u16
//!          | app_name_len u8 | app_name | app_version_len u8 | app_version
//! section  tag u8 (1) | name_len u8 | name | instance u32 | version u16 | flags u8
//!          | payload_len u32 | payload
//! end      tag u8 (0) | section_count u32
//! trailer  crc64 u64  (CRC-64/XZ of every byte before it)
//! ```

use std::io::{ErrorKind, Read, Write};

use crc::{Crc, Digest, Table, CRC_64_XZ};

use crate::error::{Error, Result};

/// The eight bytes every snapshot starts with.
pub const MAGIC: [u8; 8] = *b"CPR-SNAP";
/// The container format version this library writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Longest application name or version string, in bytes.
pub const MAX_APP_STRING: usize = 64;

pub(crate) const TAG_END: u8 = 0;
pub(crate) const TAG_SECTION: u8 = 1;
pub(crate) const SECTION_FLAG_SKIPPABLE: u8 = 1;

/// CRC-64/XZ (ECMA-182 polynomial, reflected), the checksum `xz` uses. The crc crate's
/// slice-by-16 table keeps verification of a 64 KiB state in the low microseconds, where a
/// byte-at-a-time table would cost several times more.
static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_XZ);

/// CRC-64/XZ of `data`, as stored in the trailer.
pub fn crc64(data: &[u8]) -> u64 {
    CRC64.checksum(data)
}

/// Identity of the program that wrote a snapshot, and the state version it wrote at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Producing application, e.g. `vmm-reference`.
    pub app_name: String,
    /// Producing application's version, e.g. `0.1.0`.
    pub app_version: String,
    /// State version the sections were encoded at.
    pub state_version: u16,
}

/// Where a section sits in a snapshot, without its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionInfo {
    /// Section name.
    pub name: String,
    /// Instance id (e.g. the vCPU index).
    pub instance: u32,
    /// Version of the section's type.
    pub version: u16,
    /// Whether a reader that does not know the section may skip it.
    pub skippable: bool,
    /// Offset of the section header in the container.
    pub offset: u64,
    /// Offset of the payload in the container.
    pub payload_offset: u64,
    /// Payload length in bytes.
    pub len: u32,
}

/// Checks an application name or version string.
pub(crate) fn validate_app_string(s: &[u8]) -> std::result::Result<(), &'static str> {
    if s.len() > MAX_APP_STRING {
        return Err("longer than 64 bytes");
    }
    let s = std::str::from_utf8(s).map_err(|_| "not UTF-8")?;
    if s.chars().any(char::is_control) {
        return Err("contains control characters");
    }
    Ok(())
}

/// A writer that counts bytes and checksums them.
pub(crate) struct CrcWriter<W> {
    pub inner: W,
    pub offset: u64,
    digest: Digest<'static, u64, Table<16>>,
}

impl<W: Write> CrcWriter<W> {
    pub fn new(inner: W) -> Self {
        CrcWriter {
            inner,
            offset: 0,
            digest: CRC64.digest(),
        }
    }

    pub fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner.write_all(bytes).map_err(|source| Error::Io {
            offset: self.offset,
            source,
        })?;
        self.digest.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Writes the checksum of everything so far (not itself checksummed) and flushes.
    pub fn finish(mut self) -> Result<W> {
        let crc = self.digest.finalize();
        let offset = self.offset;
        let io = |source| Error::Io { offset, source };
        self.inner.write_all(&crc.to_le_bytes()).map_err(io)?;
        self.inner.flush().map_err(io)?;
        Ok(self.inner)
    }
}

/// A reader that counts bytes, checksums them, and turns an early end into
/// [`Error::Truncated`].
pub(crate) struct CrcReader<R> {
    inner: R,
    pub offset: u64,
    digest: Digest<'static, u64, Table<16>>,
}

impl<R: Read> CrcReader<R> {
    pub fn new(inner: R) -> Self {
        CrcReader {
            inner,
            offset: 0,
            digest: CRC64.digest(),
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        let offset = self.offset;
        self.inner.read_exact(buf).map_err(|source| {
            if source.kind() == ErrorKind::UnexpectedEof {
                Error::Truncated { offset, what }
            } else {
                Error::Io { offset, source }
            }
        })
    }

    pub fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        self.digest.update(&buf);
        self.offset += N as u64;
        Ok(buf)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(what)?))
    }

    /// Reads `len` bytes; memory grows with the data actually received, so a false length
    /// on a short input never allocates more than the input holds.
    pub fn bytes(&mut self, len: usize, what: &'static str) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(len.min(1 << 20));
        let offset = self.offset;
        (&mut self.inner)
            .take(len as u64)
            .read_to_end(&mut buf)
            .map_err(|source| Error::Io { offset, source })?;
        if buf.len() < len {
            return Err(Error::Truncated {
                offset: offset + buf.len() as u64,
                what,
            });
        }
        self.digest.update(&buf);
        self.offset += len as u64;
        Ok(buf)
    }

    /// Reads and checksums `len` bytes without keeping them.
    pub fn skip(&mut self, len: usize, what: &'static str) -> Result<()> {
        let mut chunk = [0u8; 8192];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            self.fill(&mut chunk[..n], what)?;
            self.digest.update(&chunk[..n]);
            self.offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    /// Reads the stored checksum and compares it with the one computed so far.
    pub fn verify_trailer(&mut self) -> Result<()> {
        let computed = self.digest.clone().finalize();
        let offset = self.offset;
        let mut buf = [0u8; 8];
        self.fill(&mut buf, "checksum")?;
        self.offset += 8;
        let stored = u64::from_le_bytes(buf);
        if stored != computed {
            return Err(Error::ChecksumMismatch {
                offset,
                stored,
                computed,
            });
        }
        Ok(())
    }

    /// Fails with [`Error::TrailingData`] unless the input has ended.
    pub fn expect_eof(&mut self) -> Result<()> {
        let mut b = [0u8; 1];
        loop {
            match self.inner.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(Error::TrailingData {
                        offset: self.offset,
                    })
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Io {
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_standard_check_value() {
        // The catalogue check value of CRC-64/XZ over "123456789".
        assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa);
    }

    #[test]
    fn app_strings_are_checked() {
        assert!(validate_app_string(b"vmm-reference 1.2").is_ok());
        assert!(validate_app_string(b"").is_ok());
        assert!(validate_app_string(&[b'x'; 65]).is_err());
        assert!(validate_app_string(b"a\nb").is_err());
        assert!(validate_app_string(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn bytes_does_not_trust_the_length() {
        let data = [1u8, 2, 3];
        let mut r = CrcReader::new(&data[..]);
        match r.bytes(usize::MAX / 2, "payload") {
            Err(Error::Truncated { offset: 3, .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
