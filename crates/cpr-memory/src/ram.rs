// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Creating guest RAM and reattaching it after an exec or a reboot.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::error::{Error, Result};
use crate::layout::{BackendKind, MemoryLayout, RegionLayout, UpdateMode};
use crate::sys::{self, Backing, Found, RESIZE_SEALS};

/// Huge page sizes for memfd regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePageSize {
    /// 2 MiB pages.
    Size2M,
    /// 1 GiB pages.
    Size1G,
}

impl HugePageSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }
}

/// How pages are faulted in when a region is set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefault {
    /// Touch nothing: set-up cost does not grow with the size (the default).
    #[default]
    None,
    /// `MAP_POPULATE` at mmap time.
    MapPopulate,
    /// `madvise(MADV_POPULATE_WRITE)` after mapping (Linux 5.14): faults pages in writable,
    /// and reports failure (e.g. no memory) as an error instead of a later SIGBUS.
    PopulateWrite,
}

/// Mapping options for every region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// `MAP_NORESERVE`: do not reserve swap for the mapping. Refused for huge pages, where it
    /// would turn an exhausted pool into a SIGBUS at guest run time.
    pub noreserve: bool,
    /// Prefault policy.
    pub prefault: Prefault,
    /// `madvise(MADV_HUGEPAGE)`: ask for transparent huge pages (advice only).
    pub transparent_huge_pages: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SpecBackend {
    Anonymous,
    Memfd {
        name: String,
        huge: Option<HugePageSize>,
    },
    File {
        path: PathBuf,
        offset: u64,
        create: bool,
    },
}

/// How to set up one region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    guest_addr: u64,
    size: u64,
    backend: SpecBackend,
}

impl RegionSpec {
    /// A region backed by a new sealed memfd; `name` is how its fd is handed over (e.g.
    /// `guest-ram.0`) and must be unique.
    pub fn memfd(name: &str, guest_addr: u64, size: u64) -> Self {
        RegionSpec {
            guest_addr,
            size,
            backend: SpecBackend::Memfd {
                name: name.to_string(),
                huge: None,
            },
        }
    }

    /// A region backed by a file at an absolute `path` (tmpfs, hugetlbfs, a disk file) that
    /// is created exclusively with mode 0600, or by an existing DAX device or file when
    /// [`existing`](Self::existing) is used.
    pub fn file(path: impl Into<PathBuf>, guest_addr: u64, size: u64) -> Self {
        RegionSpec {
            guest_addr,
            size,
            backend: SpecBackend::File {
                path: path.into(),
                offset: 0,
                create: true,
            },
        }
    }

    /// Private anonymous memory: runs, but no update mode can keep it.
    pub fn anonymous(guest_addr: u64, size: u64) -> Self {
        RegionSpec {
            guest_addr,
            size,
            backend: SpecBackend::Anonymous,
        }
    }

    /// Uses huge pages for a memfd region (ignored for other backends).
    pub fn huge_pages(mut self, size: HugePageSize) -> Self {
        if let SpecBackend::Memfd { huge, .. } = &mut self.backend {
            *huge = Some(size);
        }
        self
    }

    /// For a file region: open an existing file or DAX device instead of creating one.
    pub fn existing(mut self) -> Self {
        if let SpecBackend::File { create, .. } = &mut self.backend {
            *create = false;
        }
        self
    }

    /// For a file region: the offset of the region in the file.
    pub fn offset(mut self, value: u64) -> Self {
        if let SpecBackend::File { offset, .. } = &mut self.backend {
            *offset = value;
        }
        self
    }
}

/// Guest RAM: vm-memory regions plus the backing of each, and the layout to reattach them.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    layout: MemoryLayout,
    files: Vec<Option<Arc<File>>>,
}

/// Builds [`GuestRam`]; see [`GuestRam::builder`].
#[derive(Debug, Default)]
pub struct GuestRamBuilder {
    regions: Vec<RegionSpec>,
    options: MemoryOptions,
}

impl GuestRamBuilder {
    /// Adds a region.
    pub fn region(mut self, spec: RegionSpec) -> Self {
        self.regions.push(spec);
        self
    }

    /// Sets the mapping options.
    pub fn options(mut self, options: MemoryOptions) -> Self {
        self.options = options;
        self
    }

    /// Creates the backings and maps them. On error nothing is left behind: files this call
    /// created are removed.
    pub fn build(self) -> Result<GuestRam> {
        let base = sys::base_page_size();
        // First the geometry, before anything is created.
        let provisional = MemoryLayout {
            regions: self
                .regions
                .iter()
                .enumerate()
                .map(|(i, s)| provisional_layout(i, s, base))
                .collect::<Result<_>>()?,
        };
        provisional.validate()?;
        let mut names = HashMap::new();
        for (i, r) in provisional.regions.iter().enumerate() {
            if r.kind != BackendKind::Anonymous {
                if let Some(first) = names.insert(r.name.clone(), i) {
                    return Err(Error::InvalidRegion {
                        index: i,
                        name: r.name.clone(),
                        reason: format!("backing name already used by region {first}"),
                    });
                }
            }
        }

        let mut created = CreatedFiles(Vec::new());
        let mut layout = MemoryLayout::default();
        let mut files = Vec::new();
        for (index, (spec, prov)) in self.regions.iter().zip(provisional.regions).enumerate() {
            let (region, file) = create_backing(index, spec, prov, &self.options, &mut created)?;
            layout.regions.push(region);
            files.push(file);
        }
        layout.validate()?;
        let memory = map_all(&layout, &files, &self.options)?;
        created.0.clear();
        Ok(GuestRam {
            memory,
            layout,
            files,
        })
    }
}

/// Removes the files a failed build created.
struct CreatedFiles(Vec<PathBuf>);

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn provisional_layout(index: usize, spec: &RegionSpec, base: u64) -> Result<RegionLayout> {
    let (kind, name, offset, page_size) = match &spec.backend {
        SpecBackend::Anonymous => (
            BackendKind::Anonymous,
            format!("anonymous.{index}"),
            0,
            base,
        ),
        SpecBackend::Memfd { name, huge } => {
            if name.is_empty() || name.len() > 249 || name.contains(['\0', '/']) {
                return Err(Error::InvalidRegion {
                    index,
                    name: name.clone(),
                    reason: "memfd name must be 1 to 249 bytes without '/' or NUL".into(),
                });
            }
            let page = huge.map_or(base, HugePageSize::bytes);
            (BackendKind::Memfd, name.clone(), 0, page)
        }
        SpecBackend::File { path, offset, .. } => {
            let name = path_name(path)?;
            // The real kind and page size are known once the file is open.
            (BackendKind::DiskFile, name, *offset, base)
        }
    };
    Ok(RegionLayout {
        guest_addr: spec.guest_addr,
        size: spec.size,
        kind,
        name,
        offset,
        page_size,
        backing_size: 0,
    })
}

fn path_name(path: &Path) -> Result<String> {
    if !path.is_absolute() {
        return Err(Error::BadPath {
            path: path.to_path_buf(),
            reason: "must be absolute (it is looked up again by a new process)",
        });
    }
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::BadPath {
            path: path.to_path_buf(),
            reason: "is not UTF-8",
        })
}

fn os_err(index: usize, name: &str, op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    let name = name.to_string();
    move |source| Error::Os {
        index,
        name,
        op,
        source,
    }
}

fn kind_of(found: Found) -> Option<BackendKind> {
    Some(match found {
        Found::Memfd => BackendKind::Memfd,
        Found::Tmpfs => BackendKind::Tmpfs,
        Found::Hugetlbfs => BackendKind::Hugetlbfs,
        Found::Dax => BackendKind::Dax,
        Found::DiskFile => BackendKind::DiskFile,
        Found::Other => return None,
    })
}

fn create_backing(
    index: usize,
    spec: &RegionSpec,
    mut region: RegionLayout,
    options: &MemoryOptions,
    created: &mut CreatedFiles,
) -> Result<(RegionLayout, Option<Arc<File>>)> {
    let name = region.name.clone();
    let need = region.offset + region.size; // overflow excluded by validate()
    let file =
        match &spec.backend {
            SpecBackend::Anonymous => return Ok((region, None)),
            SpecBackend::Memfd { huge, .. } => {
                if huge.is_some() && options.noreserve {
                    return Err(Error::InvalidRegion {
                        index,
                        name,
                        reason: "MAP_NORESERVE with huge pages would SIGBUS when the pool runs out"
                            .into(),
                    });
                }
                let file = sys::memfd_create(&name, huge.map(HugePageSize::bytes))
                    .map_err(os_err(index, &name, "memfd_create"))?;
                file.set_len(need)
                    .map_err(os_err(index, &name, "ftruncate"))?;
                sys::add_seals(&file, RESIZE_SEALS | libc::F_SEAL_SEAL as u32)
                    .map_err(os_err(index, &name, "seal"))?;
                file
            }
            SpecBackend::File { path, create, .. } => {
                let mut oo = OpenOptions::new();
                oo.read(true)
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
                if *create {
                    oo.create_new(true).mode(0o600);
                }
                let file = oo.open(path).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Error::MissingBacking {
                            index,
                            name: name.clone(),
                        }
                    } else {
                        os_err(index, &name, if *create { "create" } else { "open" })(e)
                    }
                })?;
                if *create {
                    created.0.push(path.clone());
                    file.set_len(need)
                        .map_err(os_err(index, &name, "ftruncate"))?;
                }
                file
            }
        };
    let found = sys::inspect(file.as_fd()).map_err(os_err(index, &name, "fstat"))?;
    region.kind = kind_of(found.kind).ok_or_else(|| Error::WrongKind {
        index,
        name: name.clone(),
        expected: "a memfd, a regular file or a DAX device".into(),
        found: found.kind.describe().into(),
    })?;
    region.page_size = found.page_size;
    region.backing_size = found.size;
    if found.kind == Found::Hugetlbfs && options.noreserve {
        return Err(Error::InvalidRegion {
            index,
            name,
            reason: "MAP_NORESERVE with huge pages would SIGBUS when the pool runs out".into(),
        });
    }
    if found.size < need {
        return Err(Error::TooSmall {
            index,
            name,
            need,
            have: found.size,
        });
    }
    Ok((region, Some(Arc::new(file))))
}

/// Checks a backing against its recorded layout: kind, page size, size, seals.
fn check_backing(
    index: usize,
    r: &RegionLayout,
    fd: BorrowedFd<'_>,
    found: &Backing,
) -> Result<()> {
    let name = || r.name.clone();
    if kind_of(found.kind) != Some(r.kind) {
        return Err(Error::WrongKind {
            index,
            name: name(),
            expected: r.kind.as_str().into(),
            found: found.kind.describe().into(),
        });
    }
    if found.page_size != r.page_size {
        return Err(Error::PageSizeMismatch {
            index,
            name: name(),
            expected: r.page_size,
            found: found.page_size,
        });
    }
    let need = r.offset + r.size; // overflow excluded by validate()
    if found.size < need {
        return Err(Error::TooSmall {
            index,
            name: name(),
            need,
            have: found.size,
        });
    }
    if r.kind == BackendKind::Memfd {
        let seals = sys::get_seals(fd).unwrap_or(0);
        if seals & RESIZE_SEALS != RESIZE_SEALS {
            return Err(Error::NotSealed {
                index,
                name: name(),
                seals,
            });
        }
        if found.size != r.backing_size {
            return Err(Error::SealedSizeMismatch {
                index,
                name: name(),
                expected: r.backing_size,
                found: found.size,
            });
        }
    }
    Ok(())
}

fn map_all(
    layout: &MemoryLayout,
    files: &[Option<Arc<File>>],
    options: &MemoryOptions,
) -> Result<GuestMemoryMmap> {
    let mut regions = Vec::with_capacity(files.len());
    for (index, (r, file)) in layout.regions.iter().zip(files).enumerate() {
        regions.push(map_region(index, r, file.clone(), options)?);
    }
    regions.sort_by_key(|r| r.start_addr_raw());
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::GuestMemory(e.to_string()))
}

trait StartRaw {
    fn start_addr_raw(&self) -> u64;
}

impl StartRaw for GuestRegionMmap {
    fn start_addr_raw(&self) -> u64 {
        use vm_memory::GuestMemoryRegion;
        self.start_addr().0
    }
}

fn map_region(
    index: usize,
    r: &RegionLayout,
    file: Option<Arc<File>>,
    options: &MemoryOptions,
) -> Result<GuestRegionMmap> {
    // validate() checked that the size fits a usize.
    let size = r.size as usize;
    let huge = r.kind == BackendKind::Hugetlbfs
        || (r.kind == BackendKind::Memfd && r.page_size > sys::base_page_size());
    let mut flags = if file.is_some() {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
    };
    if options.noreserve {
        flags |= libc::MAP_NORESERVE;
    }
    if options.prefault == Prefault::MapPopulate {
        flags |= libc::MAP_POPULATE;
    }
    let mut builder = MmapRegionBuilder::new(size)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(huge);
    if let Some(f) = file {
        builder = builder.with_file_offset(FileOffset::from_arc(f, r.offset));
    }
    let mapping = builder.build().map_err(|e| Error::Os {
        index,
        name: r.name.clone(),
        op: "mmap",
        source: std::io::Error::other(e.to_string()),
    })?;
    if options.transparent_huge_pages && !huge {
        sys::madvise(mapping.as_ptr(), size, libc::MADV_HUGEPAGE).map_err(os_err(
            index,
            &r.name,
            "madvise(MADV_HUGEPAGE)",
        ))?;
    }
    if options.prefault == Prefault::PopulateWrite {
        sys::madvise(mapping.as_ptr(), size, libc::MADV_POPULATE_WRITE).map_err(os_err(
            index,
            &r.name,
            "madvise(MADV_POPULATE_WRITE)",
        ))?;
    }
    GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| Error::InvalidRegion {
        index,
        name: r.name.clone(),
        reason: "guest address range overflows".into(),
    })
}

impl GuestRam {
    /// Starts describing new guest RAM.
    ///
    /// ```
    /// use cpr_memory::{GuestRam, RegionSpec, UpdateMode};
    /// use vm_memory::{Bytes, GuestAddress};
    ///
    /// let ram = GuestRam::builder()
    ///     .region(RegionSpec::memfd("guest-ram.0", 0, 16 << 20))
    ///     .build()?;
    /// ram.memory().write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
    /// assert!(ram.layout().check_mode(UpdateMode::Restart).is_ok());
    /// assert!(ram.layout().check_mode(UpdateMode::Reboot).is_err()); // a memfd has no path
    /// # Ok::<(), cpr_memory::Error>(())
    /// ```
    pub fn builder() -> GuestRamBuilder {
        GuestRamBuilder::default()
    }

    /// Maps the memory recorded in `layout` again: memfd regions from `fds` (by name, e.g.
    /// inherited across exec or received over a socket), file regions from their paths.
    ///
    /// Everything is validated before anything is mapped: the backing exists, is of the
    /// recorded kind, has the recorded page size, is large enough for offset + size (so the
    /// guest can never hit a SIGBUS), memfds are still sealed at the recorded size, and the
    /// regions do not overlap. On success the memfds used are removed from `fds`; on error
    /// `fds` is left as it was, so nothing is closed.
    pub fn reattach(
        layout: &MemoryLayout,
        fds: &mut HashMap<String, OwnedFd>,
        options: &MemoryOptions,
    ) -> Result<GuestRam> {
        layout.validate()?;
        let mut opened: Vec<Option<Arc<File>>> = Vec::with_capacity(layout.regions.len());
        for (index, r) in layout.regions.iter().enumerate() {
            let file = match r.kind {
                BackendKind::Anonymous => {
                    return Err(Error::InvalidRegion {
                        index,
                        name: r.name.clone(),
                        reason: "anonymous memory does not survive; there is nothing to reattach"
                            .into(),
                    })
                }
                BackendKind::Memfd => {
                    let fd = fds.get(&r.name).ok_or_else(|| Error::MissingBacking {
                        index,
                        name: r.name.clone(),
                    })?;
                    let found =
                        sys::inspect(fd.as_fd()).map_err(os_err(index, &r.name, "fstat"))?;
                    check_backing(index, r, fd.as_fd(), &found)?;
                    None
                }
                _ => {
                    if options.noreserve && r.kind == BackendKind::Hugetlbfs {
                        return Err(Error::InvalidRegion {
                            index,
                            name: r.name.clone(),
                            reason: "MAP_NORESERVE with huge pages would SIGBUS".into(),
                        });
                    }
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                        .open(&r.name)
                        .map_err(|e| match e.kind() {
                            std::io::ErrorKind::NotFound => Error::MissingBacking {
                                index,
                                name: r.name.clone(),
                            },
                            _ => os_err(index, &r.name, "open")(e),
                        })?;
                    let found =
                        sys::inspect(file.as_fd()).map_err(os_err(index, &r.name, "fstat"))?;
                    check_backing(index, r, file.as_fd(), &found)?;
                    Some(Arc::new(file))
                }
            };
            opened.push(file);
        }
        // Validated: take the memfds (a name used by several regions shares one file).
        let mut taken: HashMap<&str, Arc<File>> = HashMap::new();
        for (r, slot) in layout.regions.iter().zip(opened.iter_mut()) {
            if r.kind == BackendKind::Memfd {
                let file = match taken.get(r.name.as_str()) {
                    Some(f) => f.clone(),
                    None => {
                        let fd = fds.get(&r.name).and_then(|fd| fd.try_clone().ok());
                        let f = Arc::new(File::from(fd.ok_or_else(|| Error::MissingBacking {
                            index: 0,
                            name: r.name.clone(),
                        })?));
                        taken.insert(&r.name, f.clone());
                        f
                    }
                };
                *slot = Some(file);
            }
        }
        let memory = map_all(layout, &opened, options)?;
        for name in taken.keys() {
            fds.remove(*name);
        }
        Ok(GuestRam {
            memory,
            layout: layout.clone(),
            files: opened,
        })
    }

    /// The vm-memory view, for device emulation and KVM memory slots.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The layout to save (as the `memory-layout` section) for reattach.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Shorthand for `self.layout().check_mode(mode)`.
    pub fn check_mode(&self, mode: UpdateMode) -> Result<Vec<String>> {
        self.layout.check_mode(mode)
    }

    /// The fd and offset backing region `index` (in layout order), for mapping guest RAM by
    /// file (VFIO/iommufd) or handing it over; `None` for anonymous memory.
    pub fn region_backing(&self, index: usize) -> Option<(BorrowedFd<'_>, u64)> {
        let file = self.files.get(index)?.as_ref()?;
        Some((file.as_fd(), self.layout.regions[index].offset))
    }

    /// The memfds to preserve across an update, by name (each once).
    pub fn memfds(&self) -> Vec<(&str, BorrowedFd<'_>)> {
        let mut out: Vec<(&str, BorrowedFd<'_>)> = Vec::new();
        for (r, f) in self.layout.regions.iter().zip(&self.files) {
            if let (BackendKind::Memfd, Some(f)) = (r.kind, f) {
                if !out.iter().any(|(n, _)| *n == r.name) {
                    out.push((r.name.as_str(), f.as_fd()));
                }
            }
        }
        out
    }

    /// Host address of region `index`'s mapping and its length.
    pub fn host_range(&self, index: usize) -> Option<(*mut u8, usize)> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let r = self.layout.regions.get(index)?;
        let region = self.memory.find_region(GuestAddress(r.guest_addr))?;
        let ptr = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .ok()?;
        Some((ptr, region.len() as usize))
    }
}
