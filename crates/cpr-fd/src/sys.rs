// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The kernel boundary: fd flags, fstat, sealed memfds, execve.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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

/// `fexecve(fd, argv, envp)` (an `execveat` of the open file with `AT_EMPTY_PATH`);
/// returns only on failure.
pub fn fexecve(fd: BorrowedFd<'_>, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: fd is open for the duration of the call (borrowed); every array element is a
    // NUL-terminated string kept alive by the caller's borrows; both arrays end with NULL.
    unsafe { libc::fexecve(fd.as_raw_fd(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    io::Error::last_os_error()
}

/// What one [`recv_fds`] call got.
#[derive(Debug)]
pub struct Received {
    /// Bytes of data read into the buffer.
    pub len: usize,
    /// The fds of the `SCM_RIGHTS` control messages, in order.
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped control data (`MSG_CTRUNC`): some fds were lost.
    pub truncated: bool,
}

/// One `recvmsg` on the socket `sock` into `data`, with room for `max_fds` fds. The fds are
/// close-on-exec from the moment they exist (`MSG_CMSG_CLOEXEC`), so a concurrent
/// `fork`+`exec` elsewhere in the process cannot leak them.
pub fn recv_fds(sock: BorrowedFd<'_>, data: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let fd_bytes = max_fds
        .checked_mul(std::mem::size_of::<libc::c_int>())
        .and_then(|b| u32::try_from(b).ok())
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    // u64 elements: the control buffer must be aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // `socklen_t` on musl, `size_t` on glibc; `space` came from a u32 and fits either.
    msg.msg_controllen = space as _;
    let len = loop {
        // SAFETY: msg points at one iovec over `data` and at `control` (`space` bytes), all
        // writable and alive for the call.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR only reads its control fields.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return null or a header inside `control`.
        let hdr = unsafe { std::ptr::read_unaligned(cmsg) };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN is arithmetic on its argument.
            let payload = hdr.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: the header is inside `control`; its data follows it.
            let first = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            for i in 0..payload / std::mem::size_of::<libc::c_int>() {
                // SAFETY: `i` indexes the header's payload, which the kernel wrote, and
                // the fd it names was just installed for us and has no other owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(std::ptr::read_unaligned(first.add(i))) });
            }
        }
        // SAFETY: msg and cmsg are valid as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        len,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}
