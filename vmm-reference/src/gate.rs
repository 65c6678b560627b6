// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Parking the threads that read client input (monitor, serial console) around a live
//! update, so that no input is read by an image that will not act on it.
//!
//! Each reader waits for input with [`Gate::until_readable`], which also watches an eventfd
//! that is readable while the gate is closed. [`Gate::hold`] closes the gate and waits
//! until every reader is parked (input not yet read stays in the kernel, for whichever image
//! reads next); [`Gate::release`] opens it again after a failed update.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};

/// Locks `m`, also after another thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// See the [module documentation](self).
#[derive(Debug)]
pub struct Gate {
    what: &'static str,
    state: Mutex<GateState>,
    cv: Condvar,
    /// Readable while the gate is closed, so readers waiting in `poll` notice.
    wake: EventFd,
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    /// Live reader threads.
    threads: usize,
    /// Readers parked at the closed gate.
    parked: usize,
}

impl Gate {
    /// A gate for the readers of `what` (for messages).
    pub fn new(what: &'static str) -> Result<Gate> {
        Ok(Gate {
            what,
            state: Mutex::default(),
            cv: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)
                .map_err(|e| Error::Io(format!("{what}: eventfd: {e}")))?,
        })
    }

    /// Blocks until `fd` has input, an error or a hangup (the caller's read then says
    /// which). While the gate is closed the reader parks instead, after `on_park` published
    /// whatever it holds.
    pub fn until_readable(&self, fd: BorrowedFd<'_>, mut on_park: impl FnMut()) {
        loop {
            {
                let mut st = lock(&self.state);
                if st.closed {
                    on_park();
                    st.parked += 1;
                    self.cv.notify_all();
                    while st.closed {
                        st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    st.parked -= 1;
                    continue;
                }
            }
            let mut fds = [
                libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd structures that outlives the
            // call, and both descriptors stay open during it (one is borrowed, the other
            // is owned by `self`).
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[0].revents != 0 && !lock(&self.state).closed {
                return;
            }
        }
    }

    /// Counts a reader thread; call before spawning it.
    pub fn thread_started(&self) {
        lock(&self.state).threads += 1;
    }

    /// Uncounts a reader thread that is done; call as its last act.
    pub fn thread_ended(&self) {
        lock(&self.state).threads -= 1;
        self.cv.notify_all();
    }

    /// Closes the gate and waits until every reader is parked. Fails, and opens the gate
    /// again, if one is not parked within `timeout`.
    pub fn hold(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        st.closed = true;
        let _ = self.wake.write(1);
        while st.parked < st.threads {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let stuck = st.threads - st.parked;
                drop(st);
                self.release();
                return Err(Error::Io(format!(
                    "{}: {stuck} reader thread(s) did not stop within {timeout:?}",
                    self.what
                )));
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Opens the gate: parked readers carry on.
    pub fn release(&self) {
        let mut st = lock(&self.state);
        st.closed = false;
        let _ = self.wake.read();
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::channel;
    use std::sync::Arc;

    #[test]
    fn a_held_reader_parks_and_leaves_input_unread_until_released() {
        let gate = Arc::new(Gate::new("test").unwrap());
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let (tx, rx) = channel();
        gate.thread_started();
        let reader = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let mut theirs = theirs;
                let mut parks = 0;
                loop {
                    gate.until_readable(theirs.as_fd(), || parks += 1);
                    let mut b = [0u8; 1];
                    if theirs.read(&mut b).unwrap() == 0 {
                        break;
                    }
                    tx.send(b[0]).unwrap();
                }
                gate.thread_ended();
                parks
            })
        };
        ours.write_all(b"a").unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), b'a');
        gate.hold(Duration::from_secs(60)).unwrap();
        ours.write_all(b"b").unwrap();
        assert!(rx.try_recv().is_err(), "a parked reader reads nothing");
        gate.release();
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), b'b');
        drop(ours);
        assert_eq!(reader.join().unwrap(), 1);
        // No reader left: holding succeeds at once.
        gate.hold(Duration::ZERO).unwrap();
    }

    #[test]
    fn a_reader_that_does_not_park_fails_the_hold_and_reopens_the_gate() {
        let gate = Gate::new("test").unwrap();
        gate.thread_started(); // counted, but never waits at the gate
        let e = gate.hold(Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("1 reader thread(s)"), "{e}");
        assert!(!lock(&gate.state).closed);
    }
}
