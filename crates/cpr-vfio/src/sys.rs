// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`RealKernel`]: the VFIO and iommufd ioctls, as thin checked wrappers on vfio-bindings and
//! iommufd-bindings. vfio-ioctls has no constructor of a container from an inherited fd and
//! none of the VADDR flags, so the handoff uses these.
//!
//! Not exercised on this project's CI host, which has no `/dev/vfio` or `/dev/iommu`; see
//! the crate README for how to run `tests/real.rs` on a machine that has them.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use iommufd_bindings::iommufd::{
    iommu_ioas_alloc, iommu_ioas_change_process, iommu_ioas_map, iommu_ioas_map_file,
    iommu_ioas_unmap, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as MAP_FIXED,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as MAP_READ,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as MAP_WRITE, IOMMUFD_TYPE,
};
use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_group_status,
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_VADDR, VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_VADDR, VFIO_GROUP_FLAGS_VIABLE, VFIO_TYPE,
};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_io_nr;

use crate::kernel::{IommufdFds, LegacyFds, VfioKernel};

ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE as u32, 100);
ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE as u32, 101);
ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE as u32, 102);
ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE as u32, 103);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE as u32, 104);
ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE as u32, 106);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, 111);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, 113);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, 114);
ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_TYPE as u32, 118);
ioctl_io_nr!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_TYPE as u32, 119);
ioctl_io_nr!(IOMMU_IOAS_ALLOC, IOMMUFD_TYPE as u32, 0x81);
ioctl_io_nr!(IOMMU_IOAS_MAP, IOMMUFD_TYPE as u32, 0x85);
ioctl_io_nr!(IOMMU_IOAS_UNMAP, IOMMUFD_TYPE as u32, 0x86);
ioctl_io_nr!(IOMMU_IOAS_MAP_FILE, IOMMUFD_TYPE as u32, 0x8f);
ioctl_io_nr!(IOMMU_IOAS_CHANGE_PROCESS, IOMMUFD_TYPE as u32, 0x92);

/// The real kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealKernel;

fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `VFIO_IOMMU_MAP_DMA` with `flags` (a new mapping, or a new host address for one).
fn dma_map(
    container: BorrowedFd<'_>,
    flags: u32,
    iova: u64,
    size: u64,
    vaddr: u64,
) -> io::Result<()> {
    let m = vfio_iommu_type1_dma_map {
        argsz: sz::<vfio_iommu_type1_dma_map>(),
        flags,
        vaddr,
        iova,
        size,
    };
    // SAFETY: the kernel reads the struct of the declared size; the caller keeps
    // `vaddr..vaddr+size` mapped while the mapping uses it.
    check(unsafe { ioctl_with_ref(&container, VFIO_IOMMU_MAP_DMA(), &m) }).map(drop)
}

/// `VFIO_IOMMU_UNMAP_DMA` with `flags` (remove a mapping, or only its host address).
fn dma_unmap(container: BorrowedFd<'_>, flags: u32, iova: u64, size: u64) -> io::Result<()> {
    let mut u = vfio_iommu_type1_dma_unmap {
        argsz: sz::<vfio_iommu_type1_dma_unmap>(),
        flags,
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: the kernel reads and updates the struct of the declared size.
    check(unsafe { ioctl_with_mut_ref(&container, VFIO_IOMMU_UNMAP_DMA(), &mut u) }).map(drop)
}
fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

fn sz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

impl VfioKernel for RealKernel {
    fn open_legacy(&self, sysfs: &Path) -> io::Result<LegacyFds> {
        let name = sysfs.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "sysfs path has no device name")
        })?;
        let group_link = std::fs::read_link(sysfs.join("iommu_group"))?;
        let group_id: u32 = group_link
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad iommu_group link"))?;
        let container = open_rw(Path::new("/dev/vfio/vfio"))?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        if check(unsafe { ioctl(&container, VFIO_GET_API_VERSION()) })? != VFIO_API_VERSION as i32 {
            return Err(io::Error::other("unsupported VFIO API version"));
        }
        let group = open_rw(&Path::new("/dev/vfio").join(group_id.to_string()))?;
        let mut status = vfio_group_status {
            argsz: sz::<vfio_group_status>(),
            flags: 0,
        };
        // SAFETY: the kernel writes a vfio_group_status of the size we declare.
        check(unsafe { ioctl_with_mut_ref(&group, VFIO_GROUP_GET_STATUS(), &mut status) })?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(io::Error::other(
                "IOMMU group is not viable (bind every device in it to vfio-pci)",
            ));
        }
        let cfd = container.as_raw_fd();
        // SAFETY: the argument is a pointer to the container fd number, read by the kernel.
        check(unsafe { ioctl_with_ref(&group, VFIO_GROUP_SET_CONTAINER(), &cfd) })?;
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        check(unsafe { ioctl_with_val(&container, VFIO_SET_IOMMU(), VFIO_TYPE1v2_IOMMU.into()) })?;
        let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the argument is a NUL-terminated device name the kernel only reads.
        let dfd = check(unsafe {
            libc::ioctl(
                group.as_raw_fd(),
                VFIO_GROUP_GET_DEVICE_FD() as _,
                cname.as_ptr(),
            )
        })?;
        // SAFETY: the ioctl returned a new fd that nobody else owns.
        let device = unsafe { OwnedFd::from_raw_fd(dfd) };
        Ok(LegacyFds {
            container: container.into(),
            group: group.into(),
            device,
            group_id,
        })
    }

    fn check_extension(&self, container: BorrowedFd<'_>, extension: u32) -> io::Result<bool> {
        // SAFETY: VFIO_CHECK_EXTENSION takes the extension number by value.
        Ok(
            check(unsafe { ioctl_with_val(&container, VFIO_CHECK_EXTENSION(), extension.into()) })?
                > 0,
        )
    }

    fn map_dma(
        &self,
        container: BorrowedFd<'_>,
        iova: u64,
        size: u64,
        vaddr: u64,
    ) -> io::Result<()> {
        dma_map(
            container,
            VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            iova,
            size,
            vaddr,
        )
    }

    fn unmap_dma(&self, container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()> {
        dma_unmap(container, 0, iova, size)
    }

    fn invalidate_vaddr(&self, container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()> {
        dma_unmap(container, VFIO_DMA_UNMAP_FLAG_VADDR, iova, size)
    }

    fn update_vaddr(
        &self,
        container: BorrowedFd<'_>,
        iova: u64,
        size: u64,
        vaddr: u64,
    ) -> io::Result<()> {
        dma_map(container, VFIO_DMA_MAP_FLAG_VADDR, iova, size, vaddr)
    }

    fn reset_device(&self, device: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        check(unsafe { ioctl(&device, VFIO_DEVICE_RESET()) }).map(drop)
    }

    fn open_iommufd(&self, sysfs: &Path) -> io::Result<IommufdFds> {
        let cdev_dir = std::fs::read_dir(sysfs.join("vfio-dev"))?
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("vfio"))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "device has no VFIO cdev (vfio-dev/vfioN)",
                )
            })?;
        let iommufd = open_rw(Path::new("/dev/iommu"))?;
        let device = open_rw(&Path::new("/dev/vfio/devices").join(cdev_dir.file_name()))?;
        let bind = vfio_device_bind_iommufd {
            argsz: sz::<vfio_device_bind_iommufd>(),
            iommufd: iommufd.as_raw_fd(),
            ..Default::default()
        };
        // SAFETY: the kernel reads and updates the struct of the declared size.
        check(unsafe { ioctl_with_ref(&device, VFIO_DEVICE_BIND_IOMMUFD(), &bind) })?;
        let mut alloc = iommu_ioas_alloc {
            size: sz::<iommu_ioas_alloc>(),
            ..Default::default()
        };
        // SAFETY: the kernel reads and updates the struct of the declared size.
        check(unsafe { ioctl_with_mut_ref(&iommufd, IOMMU_IOAS_ALLOC(), &mut alloc) })?;
        let attach = vfio_device_attach_iommufd_pt {
            argsz: sz::<vfio_device_attach_iommufd_pt>(),
            pt_id: alloc.out_ioas_id,
            ..Default::default()
        };
        // SAFETY: the kernel reads the struct of the declared size.
        check(unsafe { ioctl_with_ref(&device, VFIO_DEVICE_ATTACH_IOMMUFD_PT(), &attach) })?;
        Ok(IommufdFds {
            iommufd: iommufd.into(),
            device: device.into(),
            ioas: alloc.out_ioas_id,
        })
    }

    fn ioas_map_file(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        file: BorrowedFd<'_>,
        start: u64,
        length: u64,
        iova: u64,
    ) -> io::Result<()> {
        let m = iommu_ioas_map_file {
            size: sz::<iommu_ioas_map_file>(),
            flags: MAP_FIXED | MAP_READ | MAP_WRITE,
            ioas_id: ioas,
            fd: file.as_raw_fd(),
            start,
            length,
            iova,
        };
        // SAFETY: the kernel reads the struct of the declared size.
        check(unsafe { ioctl_with_ref(&iommufd, IOMMU_IOAS_MAP_FILE(), &m) }).map(drop)
    }

    fn ioas_map(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        vaddr: u64,
        length: u64,
        iova: u64,
    ) -> io::Result<()> {
        let m = iommu_ioas_map {
            size: sz::<iommu_ioas_map>(),
            flags: MAP_FIXED | MAP_READ | MAP_WRITE,
            ioas_id: ioas,
            user_va: vaddr,
            length,
            iova,
            ..Default::default()
        };
        // SAFETY: the kernel reads the struct; the caller keeps the range mapped.
        check(unsafe { ioctl_with_ref(&iommufd, IOMMU_IOAS_MAP(), &m) }).map(drop)
    }

    fn ioas_unmap(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        length: u64,
    ) -> io::Result<()> {
        let mut u = iommu_ioas_unmap {
            size: sz::<iommu_ioas_unmap>(),
            ioas_id: ioas,
            iova,
            length,
        };
        // SAFETY: the kernel reads and updates the struct of the declared size.
        check(unsafe { ioctl_with_mut_ref(&iommufd, IOMMU_IOAS_UNMAP(), &mut u) }).map(drop)
    }

    fn change_process(&self, iommufd: BorrowedFd<'_>) -> io::Result<()> {
        let c = iommu_ioas_change_process {
            size: sz::<iommu_ioas_change_process>(),
            __reserved: 0,
        };
        // SAFETY: the kernel reads the struct of the declared size.
        check(unsafe { ioctl_with_ref(&iommufd, IOMMU_IOAS_CHANGE_PROCESS(), &c) }).map(drop)
    }
}
