// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Memory the VMM mapped itself, and the bridge to cpr-fd's registry.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use cpr_fd::{FdKind, FdRegistry};
use vm_memory::bitmap::{Bitmap, NewBitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, RegionProblem, Result};
use crate::layout::{BackendKind, MemoryLayout, RegionLayout};
use crate::ram::{check_backing_overlaps, kind_of, open_path, os_err, GuestRam, MemoryOptions};
use crate::stamp::NO_STAMP;
use crate::sys::{self, RESIZE_SEALS};

/// A memfd for guest RAM as [`GuestRam::adopt`] takes it: close-on-exec, sealable,
/// `size` bytes (untouched pages cost nothing), on huge pages if asked. For a VMM that maps
/// its own memory; [`GuestRam::builder`] creates its memfds itself.
pub fn create_memfd(name: &str, size: u64, huge: Option<crate::HugePageSize>) -> Result<File> {
    let err = |op| os_err(0, name, op);
    let file = sys::memfd_create(name, huge.map(crate::HugePageSize::bytes))
        .map_err(err("memfd_create"))?;
    file.set_len(size).map_err(err("ftruncate"))?;
    Ok(file)
}

impl<B: Bitmap> GuestRam<B> {
    /// Takes over guest memory the VMM mapped itself, of any vm-memory bitmap type, and
    /// describes it as a [`MemoryLayout`] to save and reattach.
    ///
    /// `names` gives, for each region of `memory` in guest address order, the name its
    /// backing goes by: for a memfd the name it is handed over under (its
    /// [`FdRegistry`] name), for a file its absolute path, which is opened (without
    /// following symbolic links) and must be the very file mapped. Regions in one file
    /// share a name; regions in different files may not.
    ///
    /// Each file region must be a shared mapping (`MAP_SHARED`): writes to a private one
    /// never reach the file, so nothing would survive. Memfds are sealed against growing
    /// and shrinking here if they are not yet (reattach requires it, so that a resize can
    /// never make the guest fault); a memfd created without `MFD_ALLOW_SEALING` is refused.
    /// Anonymous regions are described as such, and [`check_mode`](Self::check_mode)
    /// refuses every update for them. Adopted memory has no stamp page.
    ///
    /// Nothing about the mappings changes; on error the memory is dropped with the error
    /// (its regions unmapped, the VMM's files left as they were, apart from seals added).
    pub fn adopt<S: AsRef<str>>(memory: GuestMemoryMmap<B>, names: &[S]) -> Result<GuestRam<B>> {
        let count = memory.num_regions();
        if names.len() != count {
            return Err(Error::NameCount {
                regions: count,
                names: names.len(),
            });
        }
        let base = sys::base_page_size();
        let mut regions = Vec::with_capacity(count);
        let mut files: Vec<Option<Arc<File>>> = Vec::with_capacity(count);
        // (dev, ino) of each named backing, to hold "one file, one name".
        let mut seen: Vec<(String, u64, u64, usize)> = Vec::new();
        for (index, (region, name)) in memory.iter().zip(names).enumerate() {
            let name = name.as_ref().to_string();
            let invalid = |reason| Error::InvalidRegion {
                index,
                name: name.clone(),
                reason,
            };
            let size = region.len();
            let guest_addr = region.start_addr().0;
            let Some(fo) = region.file_offset() else {
                regions.push(RegionLayout {
                    guest_addr,
                    size,
                    kind: BackendKind::Anonymous,
                    name,
                    offset: 0,
                    page_size: base,
                    backing_size: 0,
                });
                files.push(None);
                continue;
            };
            if region.flags() & libc::MAP_SHARED == 0 {
                return Err(invalid(RegionProblem::PrivateMapping));
            }
            let file = fo.arc().clone();
            let found = sys::inspect(file.as_fd()).map_err(os_err(index, &name, "fstat"))?;
            let kind = kind_of(found.kind).ok_or_else(|| Error::WrongKind {
                index,
                name: name.clone(),
                expected: None,
                found: None,
            })?;
            match seen
                .iter()
                .find(|s| s.0 == name || (s.1, s.2) == (found.dev, found.ino))
            {
                Some(s) if s.0 != name || (s.1, s.2) != (found.dev, found.ino) => {
                    return Err(invalid(RegionProblem::SharedBackingMismatch(s.3)));
                }
                Some(_) => {}
                None => seen.push((name.clone(), found.dev, found.ino, index)),
            }
            if kind.has_path() {
                let path = Path::new(&name);
                if !path.is_absolute() {
                    return Err(Error::BadPath {
                        path: path.to_path_buf(),
                        reason: "must be absolute (it is looked up again by a new process)",
                    });
                }
                let named = open_path(index, &name, libc::O_RDONLY, 0, "open")?;
                let at = sys::inspect(named.as_fd()).map_err(os_err(index, &name, "fstat"))?;
                if (at.dev, at.ino) != (found.dev, found.ino) {
                    return Err(invalid(RegionProblem::NotTheMappedFile));
                }
            }
            if kind == BackendKind::Memfd {
                let seals = sys::get_seals(file.as_fd()).unwrap_or(0);
                if seals & RESIZE_SEALS != RESIZE_SEALS
                    && sys::add_seals(&file, RESIZE_SEALS).is_err()
                {
                    return Err(Error::NotSealed { index, name, seals });
                }
            }
            let offset = fo.start();
            let need = offset
                .checked_add(size)
                .ok_or(invalid(RegionProblem::Overflow))?;
            if found.size < need {
                return Err(Error::TooSmall {
                    index,
                    name,
                    need,
                    have: found.size,
                });
            }
            regions.push(RegionLayout {
                guest_addr,
                size,
                kind,
                name,
                offset,
                page_size: found.page_size,
                backing_size: found.size,
            });
            files.push(Some(file));
        }
        let layout = MemoryLayout {
            regions,
            stamp_offset: NO_STAMP,
        };
        layout.validate()?;
        check_backing_overlaps(&layout)?;
        Ok(GuestRam {
            memory,
            layout,
            files,
            stamp_page: None,
        })
    }

    /// Registers a duplicate of each memfd backing (each once, under its layout name, as
    /// [`FdKind::MEMORY`]) in `registry`, for the next image. All or nothing: on error
    /// the registry is as it was.
    pub fn register_fds(&self, registry: &mut FdRegistry) -> Result<()> {
        let mut dups = Vec::new();
        for (name, fd) in self.memfds() {
            let dup = fd.try_clone_to_owned().map_err(|source| Error::Os {
                index: self.region_index(name),
                name: name.to_string(),
                op: "dup",
                source,
            })?;
            dups.push((name, dup));
        }
        let mut added: Vec<&str> = Vec::new();
        for (name, fd) in dups {
            if let Err(e) = registry.register(name, FdKind::MEMORY, fd, b"") {
                for n in added {
                    registry.take(n);
                }
                return Err(Error::Fd(e));
            }
            added.push(name);
        }
        Ok(())
    }

    fn region_index(&self, name: &str) -> usize {
        self.layout
            .regions
            .iter()
            .position(|r| r.name == name)
            .unwrap_or(0)
    }
}

impl<B: NewBitmap> GuestRam<B> {
    /// [`reattach_with_bitmap`](Self::reattach_with_bitmap) with the memfds taken from an
    /// [`FdRegistry`] (as [`cpr_fd::reclaim`] and the transfer give it): entries of kind
    /// [`FdKind::MEMORY`] named as the layout's memfd regions. On success those entries
    /// are removed from the registry; on error it is as it was.
    pub fn reattach_from(
        layout: &MemoryLayout,
        registry: &mut FdRegistry,
        options: &MemoryOptions,
    ) -> Result<GuestRam<B>> {
        let mut fds: HashMap<String, OwnedFd> = HashMap::new();
        for (index, r) in layout.regions.iter().enumerate() {
            if r.kind != BackendKind::Memfd || fds.contains_key(&r.name) {
                continue;
            }
            let Some(entry) = registry.get(&r.name).filter(|e| e.kind() == FdKind::MEMORY) else {
                continue; // reattach names it missing
            };
            let dup = entry
                .fd()
                .try_clone_to_owned()
                .map_err(os_err(index, &r.name, "dup"))?;
            fds.insert(r.name.clone(), dup);
        }
        let names: Vec<String> = fds.keys().cloned().collect();
        let ram = GuestRam::reattach_with_bitmap(layout, &mut fds, options)?;
        for n in names.iter().filter(|n| !fds.contains_key(*n)) {
            registry.take(n);
        }
        Ok(ram)
    }
}

/// What [`GuestRam`]'s [`Persist::restore`](cpr_snapshot::Persist::restore) needs
/// besides the layout: where the memfds are, and how to map.
#[derive(Debug)]
pub struct ReattachArgs<'a> {
    /// The fds handed over (memfds are taken from it on success).
    pub fds: &'a mut FdRegistry,
    /// Mapping options.
    pub options: MemoryOptions,
}

impl<'a, B: NewBitmap> cpr_snapshot::Persist<'a> for GuestRam<B> {
    type State = MemoryLayout;
    type ConstructorArgs = ReattachArgs<'a>;
    type Error = Error;

    /// The layout, the `memory-layout` section.
    fn save(&self) -> MemoryLayout {
        self.layout.clone()
    }

    /// [`reattach_from`](GuestRam::reattach_from).
    fn restore(args: ReattachArgs<'a>, state: &MemoryLayout) -> Result<GuestRam<B>> {
        GuestRam::reattach_from(state, args.fds, &args.options)
    }
}
