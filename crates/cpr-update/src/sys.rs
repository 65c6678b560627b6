// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The kernel boundary: the peer of a UNIX socket, and watching a process end.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The process id of the peer of `sock`, as it was when it connected (`SO_PEERCRED`).
pub fn peer_pid(sock: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which lives for the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(cred.pid).map_err(|_| io::Error::other("no peer process"))
}

/// A pidfd for `pid` (Linux 5.3): it refers to that process even after its number is reused.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this fd for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits up to `timeout` for the process behind `pidfd` to end; returns whether it did.
pub fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd that lives for the call; the fd is owned by `pidfd`.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return r > 0 && p.revents & libc::POLLIN != 0;
    }
}

/// A child process that shares this process's address space (`CLONE_VM`, nothing else) and
/// so keeps it alive across this process's `execve`: the exec then does not tear the old
/// address space down (guest RAM's page tables, the KVM VM's mappings, the heap), which
/// costs a restart's blackout several hundred µs on the hosts measured (docs/BENCHMARKS.md).
/// The kernel frees it when the child exits, which it does when the pipe's write end
/// ([`keep`](Self::keep), handed to the next image) is closed everywhere.
///
/// The child blocks every signal, closes every fd but the pipe's read end, reads until end
/// of file and exits. It never returns to Rust code: until the exec it shares the address
/// space with a running process, so it makes raw system calls only (no lock, no heap, and
/// none that can fail with its arguments, so it never writes `errno` into this process).
///
/// Dropping the holder (the exec failed) closes the write end, waits for the child and
/// frees its stack.
#[derive(Debug)]
pub struct MmHolder {
    pid: libc::pid_t,
    keep: Option<OwnedFd>,
    stack: *mut libc::c_void,
}

const HOLDER_STACK: usize = 64 * 1024;

/// The child's whole life. `arg` packs the pipe's read end (low 32 bits) and write end.
extern "C" fn holder_main(arg: *mut libc::c_void) -> libc::c_int {
    let packed = arg as usize as u64;
    let rfd = (packed & 0xffff_ffff) as libc::c_int;
    let wfd = (packed >> 32) as libc::c_int;
    let all: u64 = !0;
    // SAFETY: raw system calls on this child's own fd table and signal mask; the mask is a
    // local the kernel only reads.
    unsafe {
        // Blocked already (inherited from the clone); again, in case a caller changes that.
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            &all as *const u64,
            std::ptr::null_mut::<u64>(),
            std::mem::size_of::<u64>(),
        );
        // The write end first and by name: the pipe must end when the next image closes it.
        libc::syscall(libc::SYS_close, wfd);
        if rfd > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, (rfd - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (rfd + 1) as u32, u32::MAX, 0u32);
        let mut byte = 0u8;
        while libc::syscall(libc::SYS_read, rfd, &mut byte as *mut u8, 1usize) > 0 {}
        libc::syscall(libc::SYS_exit, 0);
    }
    0
}

impl MmHolder {
    /// Starts the child. Fails (and starts nothing) where `close_range` (Linux 5.9) is
    /// missing, since the child must not fail a call.
    pub fn start() -> io::Result<MmHolder> {
        // SAFETY: close_range over fds no process can have: a probe, it closes nothing.
        if unsafe { libc::syscall(libc::SYS_close_range, u32::MAX, u32::MAX, 0u32) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut p = [-1i32; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created for us and are owned from here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        // SAFETY: a new anonymous private mapping, ours alone.
        let stack = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HOLDER_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if stack == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let packed = (r.as_raw_fd() as u32 as u64) | ((w.as_raw_fd() as u32 as u64) << 32);
        // The child starts with every signal blocked (it inherits this thread's mask), so
        // no handler of this process ever runs in it; this thread's mask is put back after.
        // SAFETY: sigset_t is plain data that sigfillset and pthread_sigmask only write.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both sets live for the calls.
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        }
        // SAFETY: the child runs `holder_main` on the top of its own stack mapping and makes
        // raw system calls only (see the type's documentation); CLONE_VM shares the address
        // space and nothing else, SIGCHLD makes it an ordinary child to wait for.
        let pid = unsafe {
            libc::clone(
                holder_main,
                stack.cast::<u8>().add(HOLDER_STACK).cast(),
                libc::CLONE_VM | libc::SIGCHLD,
                packed as usize as *mut libc::c_void,
            )
        };
        // SAFETY: puts back the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        if pid < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: our mapping, which no one used.
            unsafe { libc::munmap(stack, HOLDER_STACK) };
            return Err(e);
        }
        drop(r);
        Ok(MmHolder {
            pid,
            keep: Some(w),
            stack,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// A duplicate of the pipe's write end, for the next image (close-on-exec like every
    /// fd here: hand it over through the fd registry).
    pub fn keep(&self) -> io::Result<OwnedFd> {
        match &self.keep {
            Some(k) => k.try_clone(),
            None => Err(io::Error::other("the holder was released")),
        }
    }
}

impl Drop for MmHolder {
    fn drop(&mut self) {
        // This process did not exec: the child has nothing to keep. It holds no lock and
        // shares nothing but memory it never writes, so killing it is safe, and it does not
        // wait for a duplicate of the write end someone may still hold.
        self.keep = None;
        // SAFETY: signals our own child, which has not been reaped (so the pid is its own).
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        reap(self.pid);
        // SAFETY: the child, the only other user of the stack, has exited.
        unsafe { libc::munmap(self.stack, HOLDER_STACK) };
    }
}

/// Waits for child `pid` to exit and reaps it. A pid that is not a child of this process
/// (`ECHILD`) is left alone.
pub fn reap(pid: libc::pid_t) {
    if pid <= 0 {
        return;
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local; a specific pid, never -1.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_reports_the_end_of_its_process() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read x"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        assert!(!wait_exit(&fd, Duration::from_millis(10)), "still running");
        drop(child.stdin.take());
        assert!(wait_exit(&fd, Duration::from_secs(60)));
        child.wait().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_pid(&a).unwrap(), std::process::id());
    }

    /// The fds open in process `pid`.
    fn fds_of(pid: i32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    }

    #[test]
    fn the_holder_shares_this_address_space_and_keeps_one_fd() {
        let h = MmHolder::start().unwrap();
        let pid = h.pid();
        // A mapping made after the clone: a copy (fork) would not have it, a sharer does.
        let len = 7 * 4096 + 4096 * 131;
        // SAFETY: a new anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let start = format!("{:x}-", p as usize);
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        assert!(maps.lines().any(|l| l.starts_with(&start)), "{maps}");
        // It closes everything but the pipe's read end (asynchronously: wait for it).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while fds_of(pid) != 1 {
            assert!(std::time::Instant::now() < deadline, "{} fds", fds_of(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        // Every signal blocked (but SIGKILL and SIGSTOP, which cannot be).
        let want: u64 = !(1 << (libc::SIGKILL - 1)) & !(1 << (libc::SIGSTOP - 1));
        let blocked = || {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
            u64::from_str_radix(line["SigBlk:".len()..].trim(), 16).unwrap()
        };
        while blocked() != want {
            assert!(std::time::Instant::now() < deadline, "{:x}", blocked());
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child, without blocking.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) }, 0);
        // Dropped (no exec happened): killed and reaped, not left as a zombie.
        drop(h);
        // SAFETY: waitpid on a pid that is no longer our child.
        let again = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert_eq!(again, -1, "already reaped");
        // SAFETY: our mapping.
        unsafe { libc::munmap(p, len) };
    }

    #[test]
    fn the_holder_ends_when_the_pipe_closes() {
        // What the next image does: it has only the handed-over write end, and closes it.
        let h = MmHolder::start().unwrap();
        let pid = h.pid();
        let keep = h.keep().unwrap();
        // Take the holder's own write end away without killing the child.
        let mut h = std::mem::ManuallyDrop::new(h);
        h.keep = None;
        let fd = pidfd_open(pid as u32).unwrap();
        assert!(
            !wait_exit(&fd, Duration::from_millis(20)),
            "alive while the pipe is open"
        );
        drop(keep);
        assert!(
            wait_exit(&fd, Duration::from_secs(60)),
            "gone once it is closed"
        );
        reap(pid);
        // SAFETY: the child exited; its stack is free.
        unsafe { libc::munmap(h.stack, HOLDER_STACK) };
        reap(12345678); // not a child: left alone, no error
    }
}
