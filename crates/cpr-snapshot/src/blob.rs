// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A byte string that encodes in one copy.

use std::io::{Read, Write};

use versionize::{VersionMap, Versionize, VersionizeError, VersionizeResult};

/// Largest [`Blob`] accepted when decoding, in bytes (as the default section cap).
pub const MAX_BLOB_LEN: usize = 16 << 20;

/// Opaque bytes inside a section (a LAPIC register page, an XSAVE area, a FIFO).
///
/// `Vec<u8>` works too, but versionize encodes it one element at a time; a `Blob` is a
/// length followed by the bytes, copied in one go, which is what keeps decoding a 64 KiB
/// state in the microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Self {
        Blob(v)
    }
}

impl From<&[u8]> for Blob {
    fn from(v: &[u8]) -> Self {
        Blob(v.to_vec())
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl crate::State for Blob {}

impl Versionize for Blob {
    fn serialize<W: Write>(&self, w: &mut W, _: &VersionMap, _: u16) -> VersionizeResult<()> {
        if self.0.len() > MAX_BLOB_LEN {
            return Err(VersionizeError::VecLength(self.0.len()));
        }
        // Bounded by MAX_BLOB_LEN above.
        w.write_all(&(self.0.len() as u32).to_le_bytes())
            .and_then(|_| w.write_all(&self.0))
            .map_err(|e| VersionizeError::Serialize(e.to_string()))
    }

    fn deserialize<R: Read>(r: &mut R, _: &VersionMap, _: u16) -> VersionizeResult<Self> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)
            .map_err(|e| VersionizeError::Deserialize(format!("blob length: {e}")))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_BLOB_LEN {
            return Err(VersionizeError::VecLength(len));
        }
        // Grows with the data actually present, never with the claimed length alone.
        let mut buf = Vec::with_capacity(len.min(1 << 16));
        r.take(len as u64)
            .read_to_end(&mut buf)
            .map_err(|e| VersionizeError::Deserialize(e.to_string()))?;
        if buf.len() != len {
            return Err(VersionizeError::Deserialize(format!(
                "blob of {len} bytes truncated after {}",
                buf.len()
            )));
        }
        Ok(Blob(buf))
    }

    fn version() -> u16 {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hostile_lengths() {
        let vm = VersionMap::new();
        let b = Blob((0..=255u8).collect());
        let mut out = Vec::new();
        b.serialize(&mut out, &vm, 1).unwrap();
        assert_eq!(out.len(), 4 + 256);
        assert_eq!(Blob::deserialize(&mut out.as_slice(), &vm, 1).unwrap(), b);

        let short = &out[..100];
        assert!(Blob::deserialize(&mut &short[..], &vm, 1).is_err());
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(
            Blob::deserialize(&mut &huge[..], &vm, 1),
            Err(VersionizeError::VecLength(_))
        ));
        assert!(Blob::deserialize(&mut &[1u8][..], &vm, 1).is_err());
    }
}
