// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The kernel boundary: fd flags, fstat, sealed memfds, execve.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};

use crate::FdIdentity;

/// Seals that make a memfd immutable.
pub const MANIFEST_SEALS: i32 =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// The fd's descriptor flags, or `None` if it is not open.
pub fn fd_flags(fd: RawFd) -> Option<i32> {
    // SAFETY: F_GETFD reads the descriptor flags of any fd number; a closed one gives EBADF.
    let r = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    (r >= 0).then_some(r)
}

/// Sets or clears close-on-exec.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = fd_flags(fd).ok_or_else(io::Error::last_os_error)?;
    let new = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    if new != flags {
        // SAFETY: F_SETFD only changes descriptor flags.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, new) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Identity of an open fd number, or the error of `fstat` (EBADF if closed).
pub fn identity_raw(fd: RawFd) -> io::Result<FdIdentity> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: st is writable memory of the right size; a bad fd number only gives EBADF.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded and the struct was zeroed before.
    let st = unsafe { st.assume_init() };
    Ok(FdIdentity {
        dev: st.st_dev,
        ino: st.st_ino,
        file_type: st.st_mode & libc::S_IFMT,
    })
}

/// Identity of an fd we hold.
pub fn identity(fd: BorrowedFd<'_>) -> io::Result<FdIdentity> {
    identity_raw(fd.as_raw_fd())
}

/// Creates a memfd (close-on-exec, sealable) holding `data`, sealed against any change.
pub fn sealed_memfd(name: &CStr, data: &[u8]) -> io::Result<File> {
    // SAFETY: name is a valid C string that outlives the call.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    std::os::unix::fs::FileExt::write_all_at(&file, data, 0)?;
    // SAFETY: F_ADD_SEALS takes an int argument and touches no memory.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, MANIFEST_SEALS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Seals on an fd number, or `None` if it does not support sealing.
pub fn seals(fd: RawFd) -> Option<i32> {
    // SAFETY: F_GET_SEALS takes no argument; a non-memfd gives EINVAL.
    let r = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    (r >= 0).then_some(r)
}

/// `execve(path, argv, envp)`; returns only on failure.
pub fn execve(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: path and every array element are NUL-terminated strings kept alive by the
    // caller's borrows for the duration of the call; both arrays end with NULL.
    unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    io::Error::last_os_error()
}
