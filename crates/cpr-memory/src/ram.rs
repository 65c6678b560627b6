// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Creating guest RAM and reattaching it after an exec or a reboot.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::bitmap::{Bitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::error::{Error, RegionProblem, Result, StampProblem, Warning};
use crate::layout::{BackendKind, MemoryLayout, RegionLayout, UpdateMode};
use crate::stamp::{check_stamp_room, NO_STAMP};
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
        create: bool,
    },
}

/// How to set up one region.
///
/// Regions may share a backing: give them the same memfd name or file path and different
/// [`offset`](Self::offset)s (e.g. RAM below the 32-bit PCI hole at offset 0 and RAM above
/// 4 GiB right after it). The layout records each region's backing name and offset, and
/// reattach checks that regions sharing a backing do not overlap in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    guest_addr: u64,
    size: u64,
    offset: u64,
    backend: SpecBackend,
}

impl RegionSpec {
    /// A region backed by a sealed memfd; `name` is how its fd is handed over (e.g.
    /// `guest-ram`). Regions with the same name share one memfd.
    pub fn memfd(name: &str, guest_addr: u64, size: u64) -> Self {
        RegionSpec {
            guest_addr,
            size,
            offset: 0,
            backend: SpecBackend::Memfd {
                name: name.to_string(),
                huge: None,
            },
        }
    }

    /// A region backed by a file at an absolute `path` (tmpfs, hugetlbfs, a disk file) that
    /// is created exclusively with mode 0600, or by an existing DAX device or file when
    /// [`existing`](Self::existing) is used. No component of the path may be a symbolic
    /// link.
    pub fn file(path: impl Into<PathBuf>, guest_addr: u64, size: u64) -> Self {
        RegionSpec {
            guest_addr,
            size,
            offset: 0,
            backend: SpecBackend::File {
                path: path.into(),
                create: true,
            },
        }
    }

    /// Private anonymous memory: runs, but no update mode can keep it.
    pub fn anonymous(guest_addr: u64, size: u64) -> Self {
        RegionSpec {
            guest_addr,
            size,
            offset: 0,
            backend: SpecBackend::Anonymous,
        }
    }

    /// Uses huge pages for a memfd region (ignored for other backends; a file on hugetlbfs
    /// has huge pages by itself).
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

    /// The offset of the region in its backing (memfd or file).
    pub fn offset(mut self, value: u64) -> Self {
        self.offset = value;
        self
    }

    /// Guest physical address.
    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Offset in the backing.
    pub fn backing_offset(&self) -> u64 {
        self.offset
    }

    /// The backing's name as the layout records it: the memfd name or the file path
    /// (`None` for anonymous memory).
    pub fn backing_name(&self) -> Option<String> {
        match &self.backend {
            SpecBackend::Anonymous => None,
            SpecBackend::Memfd { name, .. } => Some(name.clone()),
            SpecBackend::File { path, .. } => path.to_str().map(str::to_string),
        }
    }
}

/// Guest RAM: vm-memory regions plus the backing of each, and the layout to reattach them.
///
/// `B` is the vm-memory dirty bitmap of the regions (`()` for none, `AtomicBitmap`,
/// `Option<AtomicBitmap>`, ...), so a VMM keeps the `GuestMemoryMmap<B>` type it already
/// uses: see [`build_with_bitmap`](GuestRamBuilder::build_with_bitmap),
/// [`reattach_with_bitmap`](GuestRam::reattach_with_bitmap) and
/// [`adopt`](GuestRam::adopt).
pub struct GuestRam<B: Bitmap = ()> {
    pub(crate) memory: GuestMemoryMmap<B>,
    pub(crate) layout: MemoryLayout,
    pub(crate) files: Vec<Option<Arc<File>>>,
    pub(crate) stamp_page: Option<vm_memory::mmap::MmapRegion>,
}

impl<B: Bitmap> std::fmt::Debug for GuestRam<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("layout", &self.layout)
            .field("stamp_page", &self.stamp_page.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds [`GuestRam`]; see [`GuestRam::builder`].
#[derive(Debug, Default)]
pub struct GuestRamBuilder {
    regions: Vec<RegionSpec>,
    options: MemoryOptions,
    stamp: bool,
}

/// The backings of a build, each once, with the regions in it.
struct Plan {
    name: String,
    spec: SpecBackend,
    regions: Vec<usize>,
    /// Bytes the backing needs.
    end: u64,
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

    /// Reserves one page after the first region's data in its backing for a
    /// [`Stamp`](crate::Stamp): where an update records which saved state the memory belongs
    /// to, outside anything the guest can see.
    pub fn with_stamp(mut self) -> Self {
        self.stamp = true;
        self
    }

    /// Creates the backings and maps them. On error nothing is left behind: files this call
    /// created are removed.
    pub fn build(self) -> Result<GuestRam> {
        self.build_with_bitmap()
    }

    /// [`build`](Self::build), with a dirty bitmap of type `B` on every region (as a VMM
    /// that tracks dirty pages, Cloud Hypervisor's `AtomicBitmap` say, keeps them).
    pub fn build_with_bitmap<B: NewBitmap>(self) -> Result<GuestRam<B>> {
        let base = sys::base_page_size();
        // First the geometry, before anything is created.
        let mut layout = MemoryLayout {
            regions: self
                .regions
                .iter()
                .enumerate()
                .map(|(i, s)| provisional_layout(i, s, base))
                .collect::<Result<_>>()?,
            stamp_offset: NO_STAMP,
        };
        layout.validate()?;
        let mut plans: Vec<Plan> = Vec::new();
        for (i, (spec, r)) in self.regions.iter().zip(&layout.regions).enumerate() {
            let end = r.offset + r.size; // overflow excluded by validate()
            if spec.backend == SpecBackend::Anonymous {
                plans.push(Plan {
                    name: r.name.clone(),
                    spec: spec.backend.clone(),
                    regions: vec![i],
                    end,
                });
                continue;
            }
            match plans.iter_mut().find(|p| p.name == r.name) {
                Some(p) if p.spec != spec.backend => {
                    return Err(Error::InvalidRegion {
                        index: i,
                        name: r.name.clone(),
                        reason: RegionProblem::SharedBackingMismatch(p.regions[0]),
                    })
                }
                Some(p) => {
                    p.regions.push(i);
                    p.end = p.end.max(end);
                }
                None => plans.push(Plan {
                    name: r.name.clone(),
                    spec: spec.backend.clone(),
                    regions: vec![i],
                    end,
                }),
            }
        }
        check_backing_overlaps(&layout)?;

        let mut created = CreatedFiles(Vec::new());
        let mut files: Vec<Option<Arc<File>>> = vec![None; layout.regions.len()];
        for plan in &mut plans {
            let stamped = self.stamp && plan.regions.contains(&0);
            let (file, found) = create_backing(plan, stamped, &self.options, &mut created)?;
            if stamped && file.is_some() {
                // The last page of the backing, after every region in it.
                layout.stamp_offset = plan.end - found.page_size;
            }
            for &i in &plan.regions {
                let r = &mut layout.regions[i];
                if let Some(kind) = kind_of(found.kind) {
                    r.kind = kind;
                }
                r.page_size = found.page_size.max(r.page_size);
                r.backing_size = found.size;
                files[i] = file.clone();
            }
        }
        layout.validate()?;
        let memory = map_all(&layout, &files, &self.options)?;
        let stamp_page = crate::stamp::map_stamp(&layout, files.first().and_then(Option::as_ref))?;
        created.0.clear();
        Ok(GuestRam {
            memory,
            layout,
            files,
            stamp_page,
        })
    }
}

fn align_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to.max(1)) * to.max(1)
}

/// Regions that share a backing must not overlap in it.
pub(crate) fn check_backing_overlaps(layout: &MemoryLayout) -> Result<()> {
    for (i, a) in layout.regions.iter().enumerate() {
        for (j, b) in layout.regions.iter().enumerate().skip(i + 1) {
            if a.kind != BackendKind::Anonymous
                && a.name == b.name
                && a.offset < b.offset + b.size
                && b.offset < a.offset + a.size
            {
                return Err(Error::InvalidRegion {
                    index: j,
                    name: b.name.clone(),
                    reason: RegionProblem::OverlapsInBacking(i),
                });
            }
        }
    }
    Ok(())
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
    let (kind, name, page_size) = match &spec.backend {
        SpecBackend::Anonymous => (BackendKind::Anonymous, format!("anonymous.{index}"), base),
        SpecBackend::Memfd { name, huge } => {
            if name.is_empty() || name.len() > 249 || name.contains(['\0', '/']) {
                return Err(Error::InvalidRegion {
                    index,
                    name: name.clone(),
                    reason: RegionProblem::BadMemfdName,
                });
            }
            let page = huge.map_or(base, HugePageSize::bytes);
            (BackendKind::Memfd, name.clone(), page)
        }
        SpecBackend::File { path, .. } => {
            let name = path_name(path)?;
            // The real kind and page size are known once the file is open.
            (BackendKind::DiskFile, name, base)
        }
    };
    Ok(RegionLayout {
        guest_addr: spec.guest_addr,
        size: spec.size,
        kind,
        name,
        offset: if spec.backend == SpecBackend::Anonymous {
            0
        } else {
            spec.offset
        },
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

pub(crate) fn os_err(
    index: usize,
    name: &str,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> Error {
    let name = name.to_string();
    move |source| Error::Os {
        index,
        name,
        op,
        source,
    }
}

pub(crate) fn kind_of(found: Found) -> Option<BackendKind> {
    Some(match found {
        Found::Memfd => BackendKind::Memfd,
        Found::Tmpfs => BackendKind::Tmpfs,
        Found::Hugetlbfs => BackendKind::Hugetlbfs,
        Found::Dax => BackendKind::Dax,
        Found::DiskFile => BackendKind::DiskFile,
        Found::Other => return None,
    })
}

/// Opens a backing file by an absolute path with no symbolic link in it; a symlink
/// anywhere on the way is [`Error::BadPath`], not followed.
pub(crate) fn open_path(
    index: usize,
    name: &str,
    flags: i32,
    mode: u32,
    op: &'static str,
) -> Result<File> {
    sys::open_no_symlinks(Path::new(name), flags, mode).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => Error::MissingBacking {
            index,
            name: name.to_string(),
        },
        Some(libc::ELOOP) => Error::BadPath {
            path: PathBuf::from(name),
            reason: "has a symbolic link in it, which is not followed",
        },
        _ => os_err(index, name, op)(e),
    })
}

/// Refuses a huge page backing the host cannot fill: without it, the mapping fails with a
/// bare ENOMEM, or a fault later kills the guest.
fn check_huge_pages(index: usize, name: &str, page: u64, bytes: u64) -> Result<()> {
    let needed = bytes.div_ceil(page);
    let available = sys::available_huge_pages(page).unwrap_or(0);
    if available < needed {
        return Err(Error::NoHugePages {
            index,
            name: name.to_string(),
            page_size: page,
            needed,
            available,
        });
    }
    Ok(())
}

/// Creates or opens one backing, sized for its regions (and the stamp page).
fn create_backing(
    plan: &mut Plan,
    stamped: bool,
    options: &MemoryOptions,
    created: &mut CreatedFiles,
) -> Result<(Option<Arc<File>>, sys::Backing)> {
    let index = plan.regions[0];
    let name = plan.name.clone();
    let huge_noreserve = || Error::InvalidRegion {
        index,
        name: name.clone(),
        reason: RegionProblem::HugeNoReserve,
    };
    let file =
        match &plan.spec {
            SpecBackend::Anonymous => {
                let base = sys::base_page_size();
                return Ok((
                    None,
                    sys::Backing {
                        kind: Found::Other,
                        size: 0,
                        page_size: base,
                        dev: 0,
                        ino: 0,
                    },
                ));
            }
            SpecBackend::Memfd { huge, .. } => {
                if huge.is_some() && options.noreserve {
                    return Err(huge_noreserve());
                }
                let page = huge.map_or_else(sys::base_page_size, HugePageSize::bytes);
                if stamped {
                    plan.end = align_up(plan.end, page) + page;
                }
                if let Some(h) = huge {
                    check_huge_pages(index, &name, h.bytes(), plan.end)?;
                }
                let file = sys::memfd_create(&name, huge.map(HugePageSize::bytes))
                    .map_err(os_err(index, &name, "memfd_create"))?;
                file.set_len(plan.end)
                    .map_err(os_err(index, &name, "ftruncate"))?;
                sys::add_seals(&file, RESIZE_SEALS | libc::F_SEAL_SEAL as u32)
                    .map_err(os_err(index, &name, "seal"))?;
                file
            }
            SpecBackend::File { path, create } => {
                let mut flags = libc::O_RDWR;
                if *create {
                    flags |= libc::O_CREAT | libc::O_EXCL;
                }
                let op = if *create { "create" } else { "open" };
                let file = open_path(index, &name, flags, 0o600, op)?;
                if *create {
                    created.0.push(path.clone());
                }
                let found = sys::inspect(file.as_fd()).map_err(os_err(index, &name, "fstat"))?;
                if found.kind == Found::Hugetlbfs && options.noreserve {
                    return Err(huge_noreserve());
                }
                if stamped {
                    plan.end = align_up(plan.end, found.page_size) + found.page_size;
                }
                if *create {
                    if found.kind == Found::Hugetlbfs {
                        check_huge_pages(index, &name, found.page_size, plan.end)?;
                    }
                    file.set_len(plan.end)
                        .map_err(os_err(index, &name, "ftruncate"))?;
                }
                file
            }
        };
    let found = sys::inspect(file.as_fd()).map_err(os_err(index, &name, "fstat"))?;
    if kind_of(found.kind).is_none() {
        return Err(Error::WrongKind {
            index,
            name,
            expected: None,
            found: None,
        });
    }
    if found.size < plan.end {
        return Err(Error::TooSmall {
            index,
            name,
            need: plan.end,
            have: found.size,
        });
    }
    Ok((Some(Arc::new(file)), found))
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
            expected: Some(r.kind),
            found: kind_of(found.kind),
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

fn map_all<B: NewBitmap>(
    layout: &MemoryLayout,
    files: &[Option<Arc<File>>],
    options: &MemoryOptions,
) -> Result<GuestMemoryMmap<B>> {
    let mut regions = Vec::with_capacity(files.len());
    for (index, (r, file)) in layout.regions.iter().zip(files).enumerate() {
        regions.push(map_region(index, r, file.clone(), options)?);
    }
    regions.sort_by_key(|r| {
        use vm_memory::GuestMemoryRegion;
        r.start_addr().0
    });
    GuestMemoryMmap::from_regions(regions).map_err(Error::GuestMemory)
}

fn map_region<B: NewBitmap>(
    index: usize,
    r: &RegionLayout,
    file: Option<Arc<File>>,
    options: &MemoryOptions,
) -> Result<GuestRegionMmap<B>> {
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
    let mut builder = MmapRegionBuilder::new_with_bitmap(size, B::with_len(size))
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
        reason: RegionProblem::Overflow,
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
        GuestRam::reattach_with_bitmap(layout, fds, options)
    }
}

impl<B: NewBitmap> GuestRam<B> {
    /// [`reattach`](GuestRam::reattach), with a dirty bitmap of type `B` on every region:
    /// the memory comes back as the `GuestMemoryMmap<B>` the VMM uses.
    pub fn reattach_with_bitmap(
        layout: &MemoryLayout,
        fds: &mut HashMap<String, OwnedFd>,
        options: &MemoryOptions,
    ) -> Result<GuestRam<B>> {
        layout.validate()?;
        check_backing_overlaps(layout)?;
        let mut opened: Vec<Option<Arc<File>>> = Vec::with_capacity(layout.regions.len());
        let mut opened_paths: HashMap<&str, Arc<File>> = HashMap::new();
        for (index, r) in layout.regions.iter().enumerate() {
            let file = match r.kind {
                BackendKind::Anonymous => {
                    return Err(Error::InvalidRegion {
                        index,
                        name: r.name.clone(),
                        reason: RegionProblem::Anonymous,
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
                            reason: RegionProblem::HugeNoReserve,
                        });
                    }
                    let file = match opened_paths.get(r.name.as_str()) {
                        Some(f) => f.clone(),
                        None => {
                            let f = Arc::new(open_path(index, &r.name, libc::O_RDWR, 0, "open")?);
                            opened_paths.insert(&r.name, f.clone());
                            f
                        }
                    };
                    let found =
                        sys::inspect(file.as_fd()).map_err(os_err(index, &r.name, "fstat"))?;
                    check_backing(index, r, file.as_fd(), &found)?;
                    Some(file)
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
        if layout.stamp_offset != NO_STAMP {
            let r = &layout.regions[0];
            let file = opened[0].as_ref().ok_or(Error::InvalidRegion {
                index: 0,
                name: r.name.clone(),
                reason: RegionProblem::Stamp {
                    offset: layout.stamp_offset,
                    problem: StampProblem::Anonymous,
                },
            })?;
            check_stamp_room(layout, file.metadata().map_or(0, |m| m.len()))?;
        }
        let memory = map_all(layout, &opened, options)?;
        let stamp_page = crate::stamp::map_stamp(layout, opened.first().and_then(Option::as_ref))?;
        for name in taken.keys() {
            fds.remove(*name);
        }
        Ok(GuestRam {
            memory,
            layout: layout.clone(),
            files: opened,
            stamp_page,
        })
    }
}

impl<B: Bitmap> GuestRam<B> {
    /// The vm-memory view, for device emulation and KVM memory slots.
    pub fn memory(&self) -> &GuestMemoryMmap<B> {
        &self.memory
    }

    /// The vm-memory regions, to keep in the VMM's own memory manager (each region holds
    /// its backing file open). The stamp page, if any, is unmapped: write the stamp before
    /// this, or keep the `GuestRam`.
    pub fn into_memory(self) -> GuestMemoryMmap<B> {
        self.memory
    }

    /// The layout to save (as the `memory-layout` section) for reattach.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Shorthand for `self.layout().check_mode(mode)`.
    pub fn check_mode(&self, mode: UpdateMode) -> Result<Vec<Warning>> {
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
    /// Every mapping this `GuestRam` holds: the regions and the stamp page, as (host
    /// address, length). For a process that must drop them without running destructors
    /// (a forked child, say).
    pub fn mappings(&self) -> Vec<(*mut u8, usize)> {
        let mut m: Vec<(*mut u8, usize)> = (0..self.layout.regions.len())
            .filter_map(|i| self.host_range(i))
            .collect();
        if let Some(page) = &self.stamp_page {
            m.push((page.as_ptr(), page.size()));
        }
        m
    }
}
