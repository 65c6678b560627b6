// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The stamp: a page the guest never sees, in the backing of the first region, where a live
//! update records which saved state the memory belongs to.
//!
//! When a VMM saves state for an update it writes [`StampState::Saved`] with the state's
//! id; the new side reads the stamp *before mapping anything writable* and refuses a state
//! whose id is not there; once the guest runs again the stamp says
//! [`StampState::Live`]. So a state file is restored at most once, and only into the memory
//! it was saved from: after the guest ran on, the memory is newer than the state, and
//! restoring that state again would run old CPU state over it.
//!
//! Layout of the first 64 bytes of the stamp page (little-endian):
//!
//! ```text
//! magic "CPRSTAMP" (8) | state u8 (1 saved, 2 live) | 7 zero | VM id (16) | state id (16)
//! | generation u64 | 8 zero
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{FileOffset, VolatileMemory};

use crate::error::{Error, RegionProblem, Result, StampProblem};
use crate::layout::{BackendKind, MemoryLayout};
use crate::ram::GuestRam;
use crate::sys;

/// `MemoryLayout::stamp_offset` when the layout has no stamp.
pub const NO_STAMP: u64 = u64::MAX;
/// Bytes of the stamp page that are used.
pub const STAMP_LEN: usize = 64;
const MAGIC: &[u8; 8] = b"CPRSTAMP";

/// What the memory says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StampState {
    /// A state was saved from this memory and not restored yet.
    Saved,
    /// The guest runs (or ran) on this memory since any saved state.
    Live,
}

/// The content of a stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Saved or live.
    pub state: StampState,
    /// The VM.
    pub vm: [u8; 16],
    /// The saved state's id (zero when live).
    pub state_id: [u8; 16],
    /// The update generation.
    pub generation: u64,
}

impl Stamp {
    /// A stamp saying the state `state_id` was saved from this memory.
    pub fn saved(vm: [u8; 16], state_id: [u8; 16], generation: u64) -> Stamp {
        Stamp {
            state: StampState::Saved,
            vm,
            state_id,
            generation,
        }
    }

    /// A stamp saying the guest runs on this memory.
    pub fn live(vm: [u8; 16], generation: u64) -> Stamp {
        Stamp {
            state: StampState::Live,
            vm,
            state_id: [0; 16],
            generation,
        }
    }

    /// Whether this stamp says the memory holds exactly the saved state `state_id`.
    pub fn holds(&self, state_id: &[u8; 16]) -> bool {
        self.state == StampState::Saved && &self.state_id == state_id
    }

    fn encode(&self) -> [u8; STAMP_LEN] {
        let mut b = [0u8; STAMP_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = match self.state {
            StampState::Saved => 1,
            StampState::Live => 2,
        };
        b[16..32].copy_from_slice(&self.vm);
        b[32..48].copy_from_slice(&self.state_id);
        b[48..56].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    fn decode(b: &[u8; STAMP_LEN]) -> Option<Stamp> {
        if &b[..8] != MAGIC || b[9..16].iter().any(|&x| x != 0) {
            return None;
        }
        let state = match b[8] {
            1 => StampState::Saved,
            2 => StampState::Live,
            _ => return None,
        };
        let mut vm = [0u8; 16];
        vm.copy_from_slice(&b[16..32]);
        let mut state_id = [0u8; 16];
        state_id.copy_from_slice(&b[32..48]);
        let mut g = [0u8; 8];
        g.copy_from_slice(&b[48..56]);
        Some(Stamp {
            state,
            vm,
            state_id,
            generation: u64::from_le_bytes(g),
        })
    }
}

/// Checks that the stamp page lies inside the first region's backing of `len` bytes, on a
/// page boundary, and outside every region that shares that backing.
pub(crate) fn check_stamp_room(layout: &MemoryLayout, len: u64) -> Result<()> {
    let first = layout.regions.first().ok_or(Error::Empty)?;
    let page = first.page_size;
    let off = layout.stamp_offset;
    let bad = |problem: StampProblem| Error::InvalidRegion {
        index: 0,
        name: first.name.clone(),
        reason: RegionProblem::Stamp {
            offset: off,
            problem,
        },
    };
    if !off.is_multiple_of(page) {
        return Err(bad(StampProblem::Misaligned));
    }
    if off.checked_add(page).is_none_or(|end| end > len) {
        return Err(bad(StampProblem::BeyondBacking));
    }
    for r in layout.regions.iter().filter(|r| r.name == first.name) {
        if off < r.offset + r.size && r.offset < off + page {
            return Err(bad(StampProblem::InsideGuestMemory));
        }
    }
    Ok(())
}

fn read_at(file: &File, off: u64, page: u64, what: &str) -> Result<Option<Stamp>> {
    let mut b = [0u8; STAMP_LEN];
    sys::through_mapping(file.as_fd(), off, page, &mut b, false).map_err(|source| Error::Os {
        index: 0,
        name: what.to_string(),
        op: "read the stamp",
        source,
    })?;
    Ok(Stamp::decode(&b))
}

impl MemoryLayout {
    /// Whether the layout has a stamp page.
    pub fn has_stamp(&self) -> bool {
        self.stamp_offset != NO_STAMP
    }

    /// Reads the stamp before anything is mapped: from the memfd named by the first region
    /// in `fds`, or from its file, opened read-only (no symbolic link on the way). `None` if
    /// the page holds no stamp; [`Error::NoStamp`] if the layout has none.
    pub fn read_stamp(&self, fds: &HashMap<String, OwnedFd>) -> Result<Option<Stamp>> {
        if !self.has_stamp() {
            return Err(Error::NoStamp);
        }
        let r = self.regions.first().ok_or(Error::Empty)?;
        let file =
            match r.kind {
                BackendKind::Memfd => {
                    let fd = fds.get(&r.name).ok_or_else(|| Error::MissingBacking {
                        index: 0,
                        name: r.name.clone(),
                    })?;
                    File::from(fd.try_clone().map_err(|source| Error::Os {
                        index: 0,
                        name: r.name.clone(),
                        op: "dup",
                        source,
                    })?)
                }
                BackendKind::Anonymous => return Err(Error::NoStamp),
                _ => sys::open_no_symlinks(Path::new(&r.name), libc::O_RDONLY, 0).map_err(|e| {
                    match e.raw_os_error() {
                        Some(libc::ENOENT) => Error::MissingBacking {
                            index: 0,
                            name: r.name.clone(),
                        },
                        Some(libc::ELOOP) => Error::BadPath {
                            path: r.name.clone().into(),
                            reason: "has a symbolic link in it, which is not followed",
                        },
                        _ => Error::Os {
                            index: 0,
                            name: r.name.clone(),
                            op: "open",
                            source: e,
                        },
                    }
                })?,
            };
        let found = sys::inspect(file.as_fd()).map_err(|source| Error::Os {
            index: 0,
            name: r.name.clone(),
            op: "fstat",
            source,
        })?;
        if found.page_size != r.page_size {
            return Err(Error::PageSizeMismatch {
                index: 0,
                name: r.name.clone(),
                expected: r.page_size,
                found: found.page_size,
            });
        }
        check_stamp_room(self, found.size)?;
        read_at(&file, self.stamp_offset, r.page_size, &r.name)
    }
}

/// Maps the stamp page of `layout` (in `file`, the first region's backing) shared, for the
/// life of a [`GuestRam`]: reading and writing the stamp during an update is then a memory
/// copy, not an `mmap` and `munmap` inside the blackout.
pub(crate) fn map_stamp(
    layout: &MemoryLayout,
    file: Option<&Arc<File>>,
) -> Result<Option<MmapRegion>> {
    if layout.stamp_offset == NO_STAMP {
        return Ok(None);
    }
    let r = layout.regions.first().ok_or(Error::Empty)?;
    let file = file.ok_or(Error::NoStamp)?;
    let page = usize::try_from(r.page_size).map_err(|_| Error::NoStamp)?;
    let huge = r.kind == BackendKind::Hugetlbfs
        || (r.kind == BackendKind::Memfd && r.page_size > sys::base_page_size());
    MmapRegionBuilder::new(page)
        .with_file_offset(FileOffset::from_arc(file.clone(), layout.stamp_offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .with_hugetlbfs(huge)
        .build()
        .map(Some)
        .map_err(|e| Error::Os {
            index: 0,
            name: r.name.clone(),
            op: "map the stamp page",
            source: std::io::Error::other(e.to_string()),
        })
}

impl<B: vm_memory::bitmap::Bitmap> GuestRam<B> {
    fn stamp_page(&self) -> Result<vm_memory::VolatileSlice<'_>> {
        let page = self.stamp_page.as_ref().ok_or(Error::NoStamp)?;
        page.get_slice(0, STAMP_LEN).map_err(|e| Error::Os {
            index: 0,
            name: self.layout().regions[0].name.clone(),
            op: "reach the stamp",
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Writes `stamp` into the stamp page (a copy into memory mapped since the build or
    /// reattach).
    pub fn write_stamp(&self, stamp: &Stamp) -> Result<()> {
        self.stamp_page()?.copy_from(&stamp.encode());
        Ok(())
    }

    /// Reads the stamp page (`None` if it holds no stamp).
    pub fn read_stamp(&self) -> Result<Option<Stamp>> {
        let mut b = [0u8; STAMP_LEN];
        self.stamp_page()?.copy_to(&mut b[..]);
        Ok(Stamp::decode(&b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_garbage_is_no_stamp() {
        for s in [Stamp::saved([1; 16], [2; 16], 3), Stamp::live([1; 16], 4)] {
            assert_eq!(Stamp::decode(&s.encode()), Some(s));
        }
        let mut b = Stamp::live([1; 16], 4).encode();
        b[8] = 7;
        assert_eq!(Stamp::decode(&b), None);
        assert_eq!(Stamp::decode(&[0; STAMP_LEN]), None);
        assert!(Stamp::saved([0; 16], [5; 16], 1).holds(&[5; 16]));
        assert!(!Stamp::saved([0; 16], [5; 16], 1).holds(&[6; 16]));
        assert!(!Stamp::live([0; 16], 1).holds(&[0; 16]));
    }
}
