// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! An in-memory model of the kernel's VFIO and iommufd rules, for testing the handoff where
//! there is no `/dev/vfio` (this project's CI). Objects are stand-in memfds, told apart by
//! inode, so the fds themselves can cross a real exec; the model's state can be saved and
//! loaded around the exec as the kernel would keep it.
//!
//! Rules modelled: DMA mappings are keyed by exact iova and size and may not overlap;
//! `VFIO_UPDATE_VADDR` is an extension the container may lack; VADDR invalidation needs it,
//! blocks translation of the mapping until a VADDR update with the same iova and size; a
//! device records every reset; `IOMMU_IOAS_CHANGE_PROCESS` fails if any mapping of the iommufd
//! is not file-based, and otherwise moves the mappings' accounting to the calling process.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use cpr_snapshot::prelude::*;
use cpr_snapshot::{Schema, Snapshot, SnapshotWriter};

use crate::kernel::{IommufdFds, LegacyFds, VfioKernel};

/// One DMA mapping in the model.
#[derive(Clone, Debug, PartialEq, Eq, State)]
pub struct ModelMapping {
    /// Mapping size.
    pub size: u64,
    /// Host address, or 0 while invalidated.
    pub vaddr: u64,
    /// Whether the host address is invalidated (translation blocked).
    pub invalidated: bool,
    /// Whether it was mapped from a file (iommufd).
    pub file: bool,
}

/// An object of the model, keyed by the inode of its stand-in fd.
#[derive(Clone, Debug, PartialEq, Eq, State)]
pub enum ModelObject {
    /// A type1 container: mappings by iova.
    Container(Vec<(u64, ModelMapping)>),
    /// A group.
    Group,
    /// A device and how often it was reset.
    Device(u32),
    /// An iommufd: mappings by iova, and how many times a new process took them over.
    Iommufd(Vec<(u64, ModelMapping)>, u32),
}

/// The whole model, as saved across an exec.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct ModelState {
    /// Objects by inode.
    pub objects: Vec<(u64, ModelObject)>,
    /// Whether containers offer `VFIO_UPDATE_VADDR`.
    pub update_vaddr: bool,
    /// Make the n-th VADDR invalidation from now fail (0 = never), to test rollback.
    pub fail_invalidation_at: u32,
}

impl Section for ModelState {
    const NAME: &'static str = "vfio-model";
}

/// The model kernel.
#[derive(Clone, Debug, Default)]
pub struct Model {
    state: Arc<Mutex<ModelState>>,
}

fn einval<T>(what: &str) -> io::Result<T> {
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        what.to_string(),
    ))
}

fn stand_in(name: &str) -> io::Result<OwnedFd> {
    cpr_fd::sealed_memfd(name, name.as_bytes())
        .map(OwnedFd::from)
        .map_err(io::Error::other)
}

fn ino(fd: BorrowedFd<'_>) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::File::from(fd.try_clone_to_owned()?)
        .metadata()?
        .ino())
}

fn schema() -> Schema {
    Schema::builder()
        .section::<ModelState>()
        .build()
        .expect("static schema")
}

impl Model {
    /// A model whose containers do (or do not) offer `VFIO_UPDATE_VADDR`.
    pub fn new(update_vaddr: bool) -> Model {
        let m = Model::default();
        m.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update_vaddr = update_vaddr;
        m
    }

    /// Saves the model (the kernel's memory, which survives an exec).
    pub fn save(&self) -> Vec<u8> {
        let schema = schema();
        let st = self.lock().clone();
        let mut w =
            SnapshotWriter::new(Vec::new(), &schema, "cpr-vfio-model", "1", 1).expect("schema");
        w.write_section(0, &st).expect("encode");
        w.finish().expect("finish")
    }

    /// Loads a saved model.
    pub fn load(bytes: &[u8]) -> cpr_snapshot::Result<Model> {
        let schema = schema();
        let mut snap = Snapshot::read_from(bytes, &schema)?;
        Ok(Model {
            state: Arc::new(Mutex::new(snap.take(0)?)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ModelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the `n`-th VADDR invalidation from now fail (1 = the next one).
    pub fn fail_invalidation_at(&self, n: u32) {
        self.lock().fail_invalidation_at = n;
    }

    fn with<T>(
        &self,
        fd: BorrowedFd<'_>,
        f: impl FnOnce(&mut ModelObject, &mut ModelState) -> io::Result<T>,
    ) -> io::Result<T> {
        let key = ino(fd)?;
        let mut st = self.lock();
        let pos = st.objects.iter().position(|(k, _)| *k == key);
        let Some(pos) = pos else {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        };
        let mut obj = st.objects[pos].1.clone();
        let r = f(&mut obj, &mut st);
        st.objects[pos].1 = obj;
        r
    }

    /// An iommufd mapping of `size` bytes at `iova` in IOAS `ioas` (the model has IOAS 1),
    /// by host address `vaddr` or by file.
    fn ioas_insert(
        &self,
        fd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        size: u64,
        vaddr: u64,
        file: bool,
    ) -> io::Result<()> {
        if ioas != 1 {
            return einval("no such IOAS");
        }
        self.with(fd, |o, _| {
            insert(
                iommufd(o)?.0,
                iova,
                ModelMapping {
                    size,
                    vaddr,
                    invalidated: false,
                    file,
                },
            )
        })
    }

    fn add(&self, fd: &OwnedFd, obj: ModelObject) -> io::Result<()> {
        let key = ino(fd.as_fd())?;
        self.lock().objects.push((key, obj));
        Ok(())
    }

    /// How often the device behind `fd` was reset.
    pub fn resets(&self, device: BorrowedFd<'_>) -> io::Result<u32> {
        self.with(device, |o, _| match o {
            ModelObject::Device(n) => Ok(*n),
            _ => einval("not a device"),
        })
    }

    /// Translates an iova through the container or iommufd behind `fd`, as device DMA that
    /// needs the host address would: an invalidated mapping blocks (`EAGAIN`).
    pub fn translate(&self, fd: BorrowedFd<'_>, iova: u64) -> io::Result<u64> {
        self.with(fd, |o, _| {
            let maps = match o {
                ModelObject::Container(m) | ModelObject::Iommufd(m, _) => m,
                _ => return einval("no mappings"),
            };
            let (base, m) = maps
                .iter()
                .find(|(b, m)| iova >= *b && iova < b + m.size)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
            if m.invalidated {
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
            Ok(m.vaddr + (iova - base))
        })
    }

    /// How many times `IOMMU_IOAS_CHANGE_PROCESS` moved the iommufd's mappings to a new
    /// process.
    pub fn takeovers(&self, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        self.with(iommufd, |o, _| match o {
            ModelObject::Iommufd(_, n) => Ok(*n),
            _ => einval("not an iommufd"),
        })
    }

    /// Number of mappings of a container or iommufd.
    pub fn mapping_count(&self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.with(fd, |o, _| match o {
            ModelObject::Container(m) | ModelObject::Iommufd(m, _) => Ok(m.len()),
            _ => einval("no mappings"),
        })
    }
}

fn insert(maps: &mut Vec<(u64, ModelMapping)>, iova: u64, m: ModelMapping) -> io::Result<()> {
    if m.size == 0
        || !iova.is_multiple_of(4096)
        || !m.size.is_multiple_of(4096)
        || iova.checked_add(m.size).is_none()
    {
        return einval("bad iova or size");
    }
    if maps
        .iter()
        .any(|(b, x)| iova < b + x.size && *b < iova + m.size)
    {
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    maps.push((iova, m));
    Ok(())
}

fn exact(maps: &mut [(u64, ModelMapping)], iova: u64, size: u64) -> io::Result<&mut ModelMapping> {
    maps.iter_mut()
        .find(|(b, m)| *b == iova && m.size == size)
        .map(|(_, m)| m)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "no mapping with exactly this iova and size",
            )
        })
}

fn container(o: &mut ModelObject) -> io::Result<&mut Vec<(u64, ModelMapping)>> {
    match o {
        ModelObject::Container(m) => Ok(m),
        _ => einval("not a container"),
    }
}

fn iommufd(o: &mut ModelObject) -> io::Result<(&mut Vec<(u64, ModelMapping)>, &mut u32)> {
    match o {
        ModelObject::Iommufd(m, pid) => Ok((m, pid)),
        _ => einval("not an iommufd"),
    }
}

impl VfioKernel for Model {
    fn open_legacy(&self, sysfs: &Path) -> io::Result<LegacyFds> {
        if !sysfs.starts_with("/sys/") {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let fds = LegacyFds {
            container: stand_in("model-container")?,
            group: stand_in("model-group")?,
            device: stand_in("model-device")?,
            group_id: 7,
        };
        self.add(&fds.container, ModelObject::Container(Vec::new()))?;
        self.add(&fds.group, ModelObject::Group)?;
        self.add(&fds.device, ModelObject::Device(0))?;
        Ok(fds)
    }

    fn check_extension(&self, c: BorrowedFd<'_>, extension: u32) -> io::Result<bool> {
        self.with(c, |o, st| {
            container(o)?;
            Ok(
                extension == vfio_bindings::bindings::vfio::VFIO_UPDATE_VADDR && st.update_vaddr
                    || extension == vfio_bindings::bindings::vfio::VFIO_TYPE1v2_IOMMU,
            )
        })
    }

    fn map_dma(&self, c: BorrowedFd<'_>, iova: u64, size: u64, vaddr: u64) -> io::Result<()> {
        self.with(c, |o, _| {
            insert(
                container(o)?,
                iova,
                ModelMapping {
                    size,
                    vaddr,
                    invalidated: false,
                    file: false,
                },
            )
        })
    }

    fn unmap_dma(&self, c: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()> {
        self.with(c, |o, _| {
            let maps = container(o)?;
            exact(maps, iova, size)?;
            maps.retain(|(b, _)| *b != iova);
            Ok(())
        })
    }

    fn invalidate_vaddr(&self, c: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()> {
        self.with(c, |o, st| {
            if !st.update_vaddr {
                return einval("VFIO_UPDATE_VADDR is not supported");
            }
            if st.fail_invalidation_at > 0 {
                st.fail_invalidation_at -= 1;
                if st.fail_invalidation_at == 0 {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            }
            let m = exact(container(o)?, iova, size)?;
            if m.invalidated {
                return einval("host address already invalidated");
            }
            m.invalidated = true;
            m.vaddr = 0;
            Ok(())
        })
    }

    fn update_vaddr(&self, c: BorrowedFd<'_>, iova: u64, size: u64, vaddr: u64) -> io::Result<()> {
        self.with(c, |o, st| {
            if !st.update_vaddr {
                return einval("VFIO_UPDATE_VADDR is not supported");
            }
            let m = exact(container(o)?, iova, size)?;
            if !m.invalidated {
                return einval("the mapping's host address was not invalidated");
            }
            m.invalidated = false;
            m.vaddr = vaddr;
            Ok(())
        })
    }

    fn reset_device(&self, d: BorrowedFd<'_>) -> io::Result<()> {
        self.with(d, |o, _| match o {
            ModelObject::Device(n) => {
                *n += 1;
                Ok(())
            }
            _ => einval("not a device"),
        })
    }

    fn open_iommufd(&self, sysfs: &Path) -> io::Result<IommufdFds> {
        if !sysfs.starts_with("/sys/") {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let fds = IommufdFds {
            iommufd: stand_in("model-iommufd")?,
            device: stand_in("model-cdev")?,
            ioas: 1,
        };
        self.add(&fds.iommufd, ModelObject::Iommufd(Vec::new(), 0))?;
        self.add(&fds.device, ModelObject::Device(0))?;
        Ok(fds)
    }

    fn ioas_map_file(
        &self,
        fd: BorrowedFd<'_>,
        ioas: u32,
        _file: BorrowedFd<'_>,
        _start: u64,
        length: u64,
        iova: u64,
    ) -> io::Result<()> {
        self.ioas_insert(fd, ioas, iova, length, 0, true)
    }

    fn ioas_map(
        &self,
        fd: BorrowedFd<'_>,
        ioas: u32,
        vaddr: u64,
        length: u64,
        iova: u64,
    ) -> io::Result<()> {
        self.ioas_insert(fd, ioas, iova, length, vaddr, false)
    }

    fn ioas_unmap(&self, fd: BorrowedFd<'_>, _ioas: u32, iova: u64, length: u64) -> io::Result<()> {
        self.with(fd, |o, _| {
            let maps = iommufd(o)?.0;
            exact(maps, iova, length)?;
            maps.retain(|(b, _)| *b != iova);
            Ok(())
        })
    }

    fn change_process(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.with(fd, |o, _| {
            let (maps, takeovers) = iommufd(o)?;
            if maps.iter().any(|(_, m)| !m.file) {
                return einval("a mapping is not file-based");
            }
            *takeovers += 1;
            Ok(())
        })
    }
}
