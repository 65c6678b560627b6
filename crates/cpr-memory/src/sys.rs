// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The kernel boundary: memfd creation and sealing, fstat/fstatfs, madvise.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};

/// `F_SEAL_SHRINK | F_SEAL_GROW`: what guest RAM must be sealed with.
pub const RESIZE_SEALS: u32 = (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) as u32;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// What `fstat` and friends say about an fd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    pub kind: Found,
    /// Bytes available in the backing.
    pub size: u64,
    /// Page size the backing is mapped with.
    pub page_size: u64,
    pub dev: u64,
    pub ino: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Memfd,
    Tmpfs,
    Hugetlbfs,
    Dax,
    DiskFile,
    Other,
}

pub fn base_page_size() -> u64 {
    // SAFETY: sysconf reads a constant and touches no memory of ours.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).unwrap_or(4096)
}

/// Creates a close-on-exec memfd that allows sealing, optionally on huge pages.
pub fn memfd_create(name: &str, huge_page: Option<u64>) -> io::Result<File> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if let Some(size) = huge_page {
        flags |= libc::MFD_HUGETLB | (size.trailing_zeros() << libc::MFD_HUGE_SHIFT);
    }
    // SAFETY: cname is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn add_seals(file: &File, seals: u32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument and touches no memory.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals on `fd`, or `None` if the fd does not support sealing.
pub fn get_seals(fd: BorrowedFd<'_>) -> Option<u32> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    u32::try_from(r).ok()
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: st points to writable memory of the right size for the kernel to fill.
    let r = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so the struct is initialised (it was zeroed anyway).
    Ok(unsafe { st.assume_init() })
}

fn fstatfs(fd: BorrowedFd<'_>) -> io::Result<libc::statfs> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: st points to writable memory of the right size for the kernel to fill.
    let r = unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so the struct is initialised (it was zeroed anyway).
    Ok(unsafe { st.assume_init() })
}

fn read_sysfs_u64(path: &str) -> io::Result<u64> {
    let s = std::fs::read_to_string(path)?;
    let s = s.trim();
    let v = if let Some(hex) = s.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        s.parse()
    };
    v.map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: `{s}`")))
}

/// Identifies what `fd` is and how large it is.
pub fn inspect(fd: BorrowedFd<'_>) -> io::Result<Backing> {
    let st = fstat(fd)?;
    let mode = st.st_mode & libc::S_IFMT;
    let (dev, ino) = (st.st_dev, st.st_ino);
    if mode == libc::S_IFCHR {
        let (maj, min) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
        let base = format!("/sys/dev/char/{maj}:{min}");
        let is_dax = std::fs::read_link(format!("{base}/subsystem"))
            .map(|p| p.ends_with("dax"))
            .unwrap_or(false);
        if !is_dax {
            return Ok(Backing {
                kind: Found::Other,
                size: 0,
                page_size: 0,
                dev,
                ino,
            });
        }
        let size = read_sysfs_u64(&format!("{base}/size"))?;
        let page_size = read_sysfs_u64(&format!("{base}/align")).unwrap_or(2 << 20);
        return Ok(Backing {
            kind: Found::Dax,
            size,
            page_size,
            dev,
            ino,
        });
    }
    if mode != libc::S_IFREG {
        return Ok(Backing {
            kind: Found::Other,
            size: 0,
            page_size: 0,
            dev,
            ino,
        });
    }
    let fs = fstatfs(fd)?;
    let size = u64::try_from(st.st_size).unwrap_or(0);
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs.
    let fs_type = fs.f_type as i64;
    let huge = fs_type == HUGETLBFS_MAGIC;
    let page_size = if huge {
        u64::try_from(fs.f_bsize).unwrap_or(0)
    } else {
        base_page_size()
    };
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default();
    let kind = if link.to_string_lossy().starts_with("/memfd:") {
        Found::Memfd
    } else if huge {
        Found::Hugetlbfs
    } else if fs_type == TMPFS_MAGIC {
        Found::Tmpfs
    } else {
        Found::DiskFile
    };
    Ok(Backing {
        kind,
        size,
        page_size,
        dev,
        ino,
    })
}

/// `struct open_how` of `openat2(2)`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_SYMLINKS: u64 = 0x04;

/// Opens an absolute `path` with `openat2(RESOLVE_NO_SYMLINKS)`: no component of it may be
/// a symbolic link (`ELOOP` otherwise). `flags` get `O_CLOEXEC` added.
pub fn open_no_symlinks(path: &std::path::Path, flags: i32, mode: u32) -> io::Result<File> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: if flags & libc::O_CREAT != 0 {
            u64::from(mode)
        } else {
            0
        },
        resolve: RESOLVE_NO_SYMLINKS,
    };
    // SAFETY: openat2 reads the NUL-terminated path and `how` (of the size we pass), both
    // alive for the call, and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// Huge pages of `size` bytes the host can still hand out (`free - reserved`), or `None`
/// if it has no pool of that size.
pub fn available_huge_pages(size: u64) -> Option<u64> {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", size >> 10);
    let free = read_sysfs_u64(&format!("{dir}/free_hugepages")).ok()?;
    let resv = read_sysfs_u64(&format!("{dir}/resv_hugepages")).unwrap_or(0);
    Some(free.saturating_sub(resv))
}

/// Copies `buf.len()` bytes at `offset` of `fd` into `buf` (`write == false`) or from it
/// into the file (`write == true`) through a temporary shared mapping of the `page` bytes at
/// `offset` (page-aligned): hugetlbfs files and DAX devices have no `pread`/`pwrite`.
pub fn through_mapping(
    fd: BorrowedFd<'_>,
    offset: u64,
    page: u64,
    buf: &mut [u8],
    write: bool,
) -> io::Result<()> {
    let len = usize::try_from(page).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if buf.len() > len {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let prot = if write {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a new shared mapping of `len` bytes of the file at a page-aligned offset; it
    // aliases nothing of ours and is unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `p` maps at least `buf.len()` readable (and, if writing, writable) bytes that
    // nothing else in this process references; `buf` is a distinct Rust buffer.
    unsafe {
        if write {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), p.cast::<u8>(), buf.len());
        } else {
            std::ptr::copy_nonoverlapping(p.cast::<u8>(), buf.as_mut_ptr(), buf.len());
        }
    }
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(p, len) };
    Ok(())
}

/// `madvise` over a mapping.
pub fn madvise(addr: *mut u8, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: the caller passes a mapping it owns; the advice values used here
    // (MADV_POPULATE_WRITE, MADV_HUGEPAGE) do not change its contents.
    let r = unsafe { libc::madvise(addr.cast(), len, advice) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
