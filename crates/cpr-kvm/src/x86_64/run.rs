// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Stopping vCPU threads cleanly: kick them out of `KVM_RUN`, complete pending I/O, park.
//!
//! A vCPU thread calls [`arm_kick`] once with its `VcpuFd`. The controller then
//! [`PauseControl::request_pause`]s and [`kick`]s every vCPU thread with [`kick_signal`]. The
//! signal handler sets `immediate_exit` in the thread's `kvm_run`, so a kick that lands just
//! before the thread enters `KVM_RUN` is not lost: the next `KVM_RUN` returns `EINTR` at once.
//! The thread then calls [`complete_pending_io`] (so an `OUT` or MMIO write that exited to
//! userspace is finished by the kernel and not replayed after restore), and
//! [`PauseControl::park`]s until resumed.

use std::cell::Cell;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::error::{Error, Result};

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads (`SIGRTMIN + 2`).
pub fn kick_signal() -> c_int {
    SIGRTMIN() + 2
}

extern "C" fn on_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by arm_kick on this very thread to its vCPU's kvm_run
        // mapping, which lives as long as the VcpuFd that arm_kick's caller keeps for the
        // thread's lifetime (see its contract). A volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(|source| Error::Signal {
            op: "install the vCPU kick signal handler",
            source,
        });
    });
    result
}

/// Stack a vCPU thread's capture may use, touched by [`prefault_thread`].
pub const PREFAULT_STACK: usize = 64 << 10;
/// Allocator memory a vCPU thread's capture may use, touched by [`prefault_thread`].
pub const PREFAULT_HEAP: usize = 32 << 10;

/// Touches [`PREFAULT_STACK`] bytes of the calling thread's stack and [`PREFAULT_HEAP`] of
/// its allocator's memory, once, so that what a capture inside a pause uses is resident.
/// Capturing a vCPU copies its XSAVE area, LAPIC page and MSRs through the stack and into
/// new allocations. On the hosts measured each first touch of a page cost a fault of
/// several µs, about seven per vCPU thread inside the blackout. Call it on a vCPU thread
/// where the time is not a guest's: before a pause (a transfer's new side at its gate), or
/// once the guest runs again. It costs those faults there, and it needs that much stack.
/// Later calls on the same thread do nothing.
pub fn prefault_thread() {
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if DONE.with(|d| d.replace(true)) {
        return;
    }
    #[inline(never)]
    fn touch_stack() {
        let mut area = [0u8; PREFAULT_STACK];
        std::hint::black_box(&mut area);
    }
    touch_stack();
    // Freed to this thread's arena, which keeps it (far below glibc's trim threshold) for
    // the capture's allocations.
    let mut heap: Vec<u8> = Vec::with_capacity(PREFAULT_HEAP);
    heap.resize(PREFAULT_HEAP, 1);
    std::hint::black_box(&mut heap);
}

/// Makes kicks of the calling thread set `immediate_exit` in `vcpu`'s `kvm_run`. Call it on
/// the vCPU's own thread, and keep `vcpu` alive and on this thread until [`disarm_kick`] or
/// the thread ends.
pub fn arm_kick(vcpu: &mut VcpuFd) {
    let run: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|c| c.set(run));
}

/// Undoes [`arm_kick`] for the calling thread.
pub fn disarm_kick() {
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

/// Sends the kick signal to a vCPU thread.
pub fn kick<T>(thread: &JoinHandle<T>) -> Result<()> {
    thread.kill(kick_signal()).map_err(|source| Error::Signal {
        op: "pthread_kill (vCPU kick)",
        source,
    })
}

/// Lets the kernel finish an I/O or MMIO exit without running guest code (`KVM_RUN` with
/// `immediate_exit`), so saved state does not replay it; then clears `immediate_exit`.
pub fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<()> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ()).or_else(|e| match e.errno() {
        libc::EINTR | libc::EAGAIN => Ok(()),
        _ => Err(Error::Kvm {
            op: "KVM_RUN (immediate exit)",
            source: e,
        }),
    });
    vcpu.set_kvm_immediate_exit(0);
    r
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of one boot, so times
/// taken before an exec and after it can be subtracted.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long [`PauseControl::wait_parked`] polls before it sleeps.
pub const PARK_POLL: Duration = Duration::from_millis(2);

/// What a parked vCPU should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Run the guest again.
    Run,
    /// Leave the run loop (the VM is being torn down or handed over).
    Exit,
}

#[derive(Debug, Default)]
struct PauseState {
    parked: usize,
    last_exit_ns: u64,
    release: Option<Resume>,
    epoch: u64,
}

/// Coordinates pausing a set of vCPU threads.
#[derive(Debug)]
pub struct PauseControl {
    total: usize,
    requested: AtomicBool,
    /// `state.parked`, readable without the lock, for the poll in `wait_parked`.
    parked: AtomicUsize,
    state: Mutex<PauseState>,
    cv: Condvar,
}

impl PauseControl {
    /// Control for `total` vCPU threads.
    pub fn new(total: usize) -> Self {
        PauseControl {
            total,
            requested: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            state: Mutex::new(PauseState::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every vCPU to park; follow with [`kick`] of each thread.
    pub fn request_pause(&self) {
        let mut s = self.lock();
        s.release = None;
        s.last_exit_ns = 0;
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Whether a pause was requested (checked by vCPU threads after each exit).
    pub fn pause_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Waits until every vCPU parked; returns the time the last one left `KVM_RUN`.
    ///
    /// It polls for the first [`PARK_POLL`], yielding the CPU between looks, then sleeps: a
    /// pause normally completes within that, and polling spares the blackout the wake-up of
    /// a sleeping thread, which on a virtualized host whose idle CPUs halt costs from tens
    /// of microseconds to more than the pause itself.
    pub fn wait_parked(&self, timeout: Duration) -> Result<u64> {
        let start = Instant::now();
        let poll = PARK_POLL.min(timeout);
        while self.parked.load(Ordering::Acquire) < self.total && start.elapsed() < poll {
            std::thread::yield_now();
        }
        let mut s = self.lock();
        while s.parked < self.total {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::PauseTimeout {
                    parked: s.parked,
                    total: self.total,
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(s.last_exit_ns)
    }

    /// Releases parked vCPUs (and those about to park) with `what`.
    pub fn release(&self, what: Resume) {
        let mut s = self.lock();
        self.requested.store(false, Ordering::SeqCst);
        s.release = Some(what);
        s.epoch += 1;
        self.cv.notify_all();
    }

    /// Called by a vCPU thread after it left `KVM_RUN` for the last time (at `exit_ns`) and
    /// completed pending I/O: blocks until released.
    pub fn park(&self, exit_ns: u64) -> Resume {
        let mut s = self.lock();
        let epoch = s.epoch;
        s.parked += 1;
        s.last_exit_ns = s.last_exit_ns.max(exit_ns);
        self.parked.store(s.parked, Ordering::Release);
        self.cv.notify_all();
        while s.epoch == epoch {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
        self.parked.store(s.parked, Ordering::Release);
        s.release.unwrap_or(Resume::Run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_every_thread_and_releases_them() {
        let ctl = Arc::new(PauseControl::new(3));
        ctl.request_pause();
        let threads: Vec<_> = (0..3u64)
            .map(|i| {
                let ctl = ctl.clone();
                std::thread::spawn(move || {
                    while !ctl.pause_requested() {
                        std::thread::yield_now();
                    }
                    ctl.park(100 + i)
                })
            })
            .collect();
        assert_eq!(ctl.wait_parked(Duration::from_secs(60)).unwrap(), 102);
        ctl.release(Resume::Exit);
        for t in threads {
            assert_eq!(t.join().unwrap(), Resume::Exit);
        }
        assert!(!ctl.pause_requested());
    }

    #[test]
    fn pause_times_out_with_a_count() {
        let ctl = PauseControl::new(2);
        ctl.request_pause();
        match ctl.wait_parked(Duration::from_millis(10)) {
            Err(Error::PauseTimeout {
                parked: 0,
                total: 2,
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Minor page faults of the calling thread so far.
    fn thread_faults() -> i64 {
        // SAFETY: getrusage writes the struct we pass.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; RUSAGE_THREAD is the calling thread.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
        u.ru_minflt
    }

    #[test]
    fn a_prefaulted_thread_takes_no_fault_on_what_it_touched() {
        std::thread::spawn(|| {
            let a = thread_faults();
            prefault_thread();
            let b = thread_faults();
            // Once per thread: the second call does nothing, and what the first touched is
            // resident when used again.
            prefault_thread();
            let mut area = [0u8; PREFAULT_STACK / 2];
            std::hint::black_box(&mut area);
            let heap = vec![1u8; PREFAULT_HEAP / 2];
            std::hint::black_box(&heap);
            let c = thread_faults();
            // A fresh thread's stack and arena fault in on the first call (with 4 KiB pages:
            // transparent huge pages set to `always` may have mapped them already)...
            let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
                .unwrap_or_default();
            if !thp.contains("[always]") {
                assert!(b - a >= 8, "{} faults on a fresh thread", b - a);
            }
            // ...and are resident for the second.
            assert!(c - b <= 2, "{} faults the second time", c - b);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
