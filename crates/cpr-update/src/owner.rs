// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The owner word of a transfer: one 32-bit word in a sealed memfd page that both processes
//! map, and which decides with one compare-and-swap who runs the guest after the pause.
//!
//! The old process creates it before the pause and sends it with `MEMORY`; it starts
//! *undecided*. Once the new side has restored everything it **claims** the word
//! (undecided → new) and, if that succeeded, runs the guest at once: no `RESTORED` and
//! `COMMIT` round trip between the processes while the guest is paused. The old side, on
//! any failure after the pause (an `ABORT`, a timeout, the connection ending), **reclaims**
//! it (undecided → old) before it resumes the guest. Exactly one of the two swaps succeeds,
//! so the guest never runs in both processes, whatever either of them sees on the socket.
//!
//! Used only when both builds announce [`FEATURE_OWNER_WORD`] in their `HELLO`; with an
//! older peer the transfer keeps the `RESTORED`/`COMMIT` messages (docs/DESIGN.md).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// The feature a build announces (every build of this crate does, through
/// [`BuildInfo::new`](crate::BuildInfo::new)) when its transfers decide the guest's owner
/// with the owner word instead of `RESTORED` and `COMMIT`.
pub const FEATURE_OWNER_WORD: &str = "cpr.owner-word";
/// fd name of the owner word's memfd, sent with `MEMORY` (so the name is reserved there).
pub const FD_OWNER_WORD: &str = "cpr.owner-word";

/// Whether a transfer between builds `a` and `b` decides the owner with the word: both
/// must announce [`FEATURE_OWNER_WORD`].
pub(crate) fn agreed(a: &crate::BuildInfo, b: &crate::BuildInfo) -> bool {
    a.has_feature(FEATURE_OWNER_WORD) && b.has_feature(FEATURE_OWNER_WORD)
}

/// The page's size: the memfd is exactly this long, and sealed so.
const LEN: usize = 4096;
/// Neither process has decided yet: the old one keeps the paused guest.
const UNDECIDED: u32 = 0;
/// The new process claimed the guest.
const NEW: u32 = 0x4e45_5731;
/// The old process took the guest back.
const OLD: u32 = 0x4f4c_4431;
/// What the receiver requires: the page cannot shrink (an access would fault) or grow, and
/// the seals cannot change.
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Who holds the guest according to the word, after a swap that lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    /// The new process.
    New,
    /// The old process.
    Old,
}

/// One mapped owner word.
#[derive(Debug)]
pub(crate) struct OwnerWord {
    page: NonNull<u8>,
    fd: OwnedFd,
}

// SAFETY: the mapping is only ever accessed through an AtomicU32, which may be shared and
// sent between threads; the fd is an ordinary owned fd.
unsafe impl Send for OwnerWord {}

impl OwnerWord {
    /// A fresh, undecided word (old side, before the pause).
    pub(crate) fn create() -> io::Result<OwnerWord> {
        // SAFETY: a NUL-terminated name and flags; returns a new fd or -1.
        let fd = unsafe {
            libc::memfd_create(
                c"cpr-owner-word".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just created this fd for us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone()?).set_len(LEN as u64)?;
        // SAFETY: F_ADD_SEALS takes an int argument and touches no memory.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnerWord::map(fd)
    }

    /// The word a peer sent (new side, before the pause). It is untrusted: it must be a
    /// memfd page sealed against shrinking (so that no access can fault), and undecided.
    pub(crate) fn open(fd: OwnedFd) -> Result<OwnerWord, String> {
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot stat it: {e}"))?;
        if !meta.file_type().is_file() || meta.len() != LEN as u64 {
            return Err(format!(
                "not a {LEN}-byte file ({} bytes, {:?})",
                meta.len(),
                meta.file_type()
            ));
        }
        // SAFETY: F_GET_SEALS takes no argument and touches no memory.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SEALS != SEALS {
            return Err("not sealed against resizing".into());
        }
        let word = OwnerWord::map(file.into()).map_err(|e| format!("cannot map it: {e}"))?;
        match word.atomic().load(Ordering::Acquire) {
            UNDECIDED => Ok(word),
            v => Err(format!("already decided ({v:#x})")),
        }
    }

    fn map(fd: OwnedFd) -> io::Result<OwnerWord> {
        // SAFETY: a new shared mapping of LEN bytes of a file that is LEN bytes long and
        // sealed against shrinking; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned 0"))?;
        Ok(OwnerWord { page, fd })
    }

    fn atomic(&self) -> &AtomicU32 {
        // SAFETY: the page is mapped, page-aligned (so aligned for a u32) and at least 4
        // bytes long for as long as `self` lives, and only ever accessed atomically.
        unsafe { AtomicU32::from_ptr(self.page.as_ptr().cast()) }
    }

    fn swap(&self, to: u32) -> Result<(), Holder> {
        match self
            .atomic()
            .compare_exchange(UNDECIDED, to, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(()),
            Err(NEW) => Err(Holder::New),
            // Anything else than NEW means the new side did not claim it.
            Err(_) => Err(Holder::Old),
        }
    }

    /// New side: takes the guest, unless the old process took it back first.
    pub(crate) fn claim(&self) -> Result<(), Holder> {
        self.swap(NEW)
    }

    /// Old side: takes the guest back, unless the new process claimed it first.
    pub(crate) fn reclaim(&self) -> Result<(), Holder> {
        match self.swap(OLD) {
            Err(Holder::Old) => Ok(()),
            r => r,
        }
    }

    /// A duplicate of its fd, to send.
    pub(crate) fn fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

impl Drop for OwnerWord {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing uses any more.
        unsafe { libc::munmap(self.page.as_ptr().cast(), LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(w: &OwnerWord) -> OwnerWord {
        OwnerWord::open(w.fd().unwrap()).unwrap()
    }

    #[test]
    fn exactly_one_side_wins_whichever_swaps_first() {
        let old = OwnerWord::create().unwrap();
        let new = peer(&old);
        assert_eq!(new.claim(), Ok(()));
        assert_eq!(old.reclaim(), Err(Holder::New));
        assert_eq!(
            new.claim(),
            Err(Holder::New),
            "a second claim does not win again"
        );

        let old = OwnerWord::create().unwrap();
        let new = peer(&old);
        assert_eq!(old.reclaim(), Ok(()));
        assert_eq!(new.claim(), Err(Holder::Old));
        assert_eq!(
            old.reclaim(),
            Ok(()),
            "the old side may ask again: still its own"
        );
    }

    #[test]
    fn racing_threads_never_both_win() {
        for _ in 0..200 {
            let old = OwnerWord::create().unwrap();
            let new = peer(&old);
            let t = std::thread::spawn(move || new.claim().is_ok());
            let old_won = old.reclaim().is_ok();
            let new_won = t.join().unwrap();
            assert!(old_won != new_won, "old {old_won}, new {new_won}");
        }
    }

    fn memfd(len: u64, seals: libc::c_int) -> OwnedFd {
        // SAFETY: as in `create`.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: just created.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().unwrap()).set_len(len).unwrap();
        if seals != 0 {
            // SAFETY: as in `create`.
            let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            assert_eq!(r, 0);
        }
        fd
    }

    #[test]
    fn a_peer_cannot_send_a_word_that_could_fault_or_is_decided() {
        let e = OwnerWord::open(memfd(4096, 0)).unwrap_err();
        assert!(e.contains("not sealed"), "{e}");
        let e = OwnerWord::open(memfd(0, SEALS)).unwrap_err();
        assert!(e.contains("4096-byte"), "{e}");
        let e = OwnerWord::open(memfd(1 << 20, SEALS)).unwrap_err();
        assert!(e.contains("4096-byte"), "{e}");
        let dir = File::open("/").unwrap();
        assert!(OwnerWord::open(dir.into()).is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(OwnerWord::open(a.into()).is_err());

        let old = OwnerWord::create().unwrap();
        old.reclaim().unwrap();
        let e = OwnerWord::open(old.fd().unwrap()).unwrap_err();
        assert!(e.contains("already decided"), "{e}");
    }
}
