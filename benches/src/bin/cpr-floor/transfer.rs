// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cpr-floor --transfer`: what any transfer of a KVM guest to another process must pay on
//! this host inside the pause, with nothing else around. Everything a transfer can do before
//! the pause is done before it, as the reference VMM does it: the new process has the guest
//! memory (its memfds, sent over the socket), its own VM with the memory slots, irqchip and
//! PIT, and its vCPUs with their CPUID, and its vCPU threads are polling for their state.
//! Then, timed:
//!
//! 1. the old process kicks its two vCPU threads out of `KVM_RUN` (a guest spinning on
//!    a loop that counts in memory); each completes pending I/O with the immediate-exit `KVM_RUN` that hands back
//!    its registers, system registers and events, reads the rest of its state (XSAVE, XCRs,
//!    debug registers, mp_state, LAPIC, MSRs) and parks (`cpr_kvm::complete_and_capture`);
//! 2. its main thread reads the VM's state (irqchip, PIT, clock), encodes it and the vCPUs'
//!    as cpr-snapshot sections (~20 KB) into a writer made before the pause, and writes
//!    them to the socket;
//! 3. the new process reads and decodes them, restores the VM's state, hands each vCPU's to
//!    its thread, which restores it (`cpr_kvm::restore_vcpu_fast`) and, once every vCPU
//!    is restored, enters `KVM_RUN`.
//!
//! The guest's counter must move before the pause and again after it (a restore that left
//! the guest unable to run would fail here, not measure well), and any exit of the loop is
//! an error.
//!
//! The blackout is measured as the reference VMM measures its own: from the last vCPU out
//! of `KVM_RUN` (`stop`) to the first one back in (`first-entry`). What the VMM adds on top
//! is everything else a safe update needs and this program leaves out: the devices' state
//! and fds (serial port, monitor, virtio), the guest-ownership claim, the monitor's events,
//! the handover's checks.
//!
//! With `--state-fds N` the state also carries N fds, sent as the reference VMM sends its
//! devices' (`cpr_fd::FdRegistry::send_after`).
//!
//! Prints one JSON line of microseconds after `stop`: `captured` (every vCPU parked with its
//! state), `encoded`, `sent`, `received` (the new side has the whole frame, and the fds), `decoded`,
//! `vm-restored` (and the vCPU jobs handed out), `vcpu-state` (the last vCPU restored),
//! `first-entry`, and `total` (= `first-entry`).

use std::io::{IoSlice, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpr_fd::FdRegistry;
use cpr_kvm::run::{arm_kick, install_kick_handler, kick, prefault_thread, PauseControl, Resume};
use cpr_kvm::{
    capture_vm, complete_and_capture, monotonic_ns, restore_vcpu_fast, restore_vm, ClockPolicy,
    HostCaps, VcpuConfig, VcpuState, VmState,
};
use cpr_memory::{GuestRam, MemoryLayout, MemoryOptions};
use cpr_snapshot::{Schema, Snapshot, SnapshotWriter};
use kvm_bindings::{kvm_mp_state, kvm_regs, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

/// Where the guest's code sits, in real mode: `inc word [COUNTER]; jmp short $-4`.
const CODE: u64 = 0x1000;
const GUEST_CODE: [u8; 6] = [0xff, 0x06, 0x00, 0x20, 0xeb, 0xfa];
/// The guest's loop counter, which both vCPUs increment: read to see that the guest runs.
const COUNTER: u64 = 0x2000;
/// Every wait here ends within milliseconds; the deadline only catches a peer that died.
const DEADLINE: Duration = Duration::from_secs(60);

fn schema() -> Schema {
    Schema::builder()
        .types_at_current(cpr_kvm::section_types())
        .types_at_current(cpr_memory::section_types())
        .build()
        .expect("schema")
}

/// A VM with the memory slots, irqchip and PIT of `ram`, and `vcpus` vCPUs with the host's
/// CPUID: what both sides build before the pause.
fn build_vm(kvm: &Kvm, ram: &GuestRam, vcpus: u64) -> (VmFd, Vec<(VcpuFd, VcpuConfig)>) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    crate::register_slots(&vm, ram);
    crate::create_irqchip(&vm);
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    let fds = (0..vcpus)
        .map(|i| {
            let fd = vm.create_vcpu(i).expect("KVM_CREATE_VCPU");
            let config = VcpuConfig::configure(&fd, &cpuid).expect("KVM_SET_CPUID2");
            (fd, config)
        })
        .collect();
    (vm, fds)
}

/// Writes every byte of `bufs` to `sock`.
fn write_all(sock: &UnixStream, bufs: &[&[u8]]) {
    let mut slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = (&mut &*sock).write_vectored(slices).expect("write");
        assert!(n > 0, "the peer stopped reading");
        IoSlice::advance_slices(&mut slices, n);
    }
}

/// Reads one frame written as a little-endian u32 length and the bytes.
fn read_frame(sock: &UnixStream, buf: &mut Vec<u8>) {
    let mut len = [0u8; 4];
    (&mut &*sock).read_exact(&mut len).expect("frame length");
    buf.resize(u32::from_le_bytes(len) as usize, 0);
    (&mut &*sock).read_exact(buf).expect("frame");
}

/// The old side: runs the guest, then pauses it and hands it over, timed.
pub fn old_side(ram: GuestRam, vcpus: u64, state_fds: usize) {
    ram.memory()
        .write_slice(&GUEST_CODE, GuestAddress(CODE))
        .expect("guest code");
    let kvm = Kvm::new().expect("/dev/kvm");
    let caps = HostCaps::probe(&kvm).expect("caps");
    let (vm, fds) = build_vm(&kvm, &ram, vcpus);
    for (fd, _) in &fds {
        let mut sregs = fd.get_sregs().expect("KVM_GET_SREGS");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).expect("KVM_SET_SREGS");
        let regs = kvm_regs {
            rip: CODE,
            rflags: 2,
            ..Default::default()
        };
        fd.set_regs(&regs).expect("KVM_SET_REGS");
        // The APs too: they run the loop rather than wait for a SIPI.
        fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .expect("KVM_SET_MP_STATE");
    }

    // The new process, started and given the memory before the pause.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("floor.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .arg("--transfer-new")
        .arg(&path)
        .args(["--vcpus", &vcpus.to_string()])
        .args(["--state-fds", &state_fds.to_string()])
        .spawn()
        .expect("the new process");
    let (sock, _) = listener.accept().expect("accept");
    let schema = schema();
    let mut w = SnapshotWriter::new(
        Vec::new(),
        &schema,
        "cpr-floor",
        "0",
        schema.latest_version(),
    )
    .expect("writer");
    w.write_section(0, ram.layout()).expect("layout");
    let layout = w.finish().expect("layout frame");
    let mut registry = FdRegistry::new();
    ram.register_fds(&mut registry).expect("memfds");
    registry
        .send_after(&sock, &[&(layout.len() as u32).to_le_bytes(), &layout])
        .expect("send the memory");

    install_kick_handler().expect("kick handler");
    let ctl = Arc::new(PauseControl::new(fds.len()));
    let captured: Arc<Mutex<Vec<Option<VcpuState>>>> = Arc::new(Mutex::new(vec![None; fds.len()]));
    let entered = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = fds
        .into_iter()
        .enumerate()
        .map(|(i, (mut fd, config))| {
            let (ctl, captured, entered, caps) =
                (ctl.clone(), captured.clone(), entered.clone(), caps.clone());
            std::thread::spawn(move || {
                prefault_thread();
                arm_kick(&mut fd);
                entered.fetch_add(1, Ordering::SeqCst);
                loop {
                    // The loop never exits on its own: only a kick ends a KVM_RUN.
                    run_or_fail(&mut fd);
                    if !ctl.pause_requested() {
                        continue;
                    }
                    let exit_ns = monotonic_ns();
                    let (state, _) =
                        complete_and_capture(&mut fd, i as u32, &caps, &config).expect("capture");
                    captured.lock().expect("lock")[i] = Some(state);
                    if ctl.park(exit_ns) == Resume::Exit {
                        return;
                    }
                }
            })
        })
        .collect();

    // The new side says when its VM is built; by then the guest has run for milliseconds.
    let mut ready = [0u8; 1];
    (&sock).read_exact(&mut ready).expect("READY");
    let before = counter(&ram);
    poll(|| entered.load(Ordering::SeqCst) == threads.len() as u64 && counter(&ram) != before);
    let mut w = SnapshotWriter::new(
        Vec::with_capacity(64 << 10),
        &schema,
        "cpr-floor",
        "0",
        schema.latest_version(),
    )
    .expect("writer");
    w.prepare_payload(32 << 10);

    // The pause.
    ctl.request_pause();
    for t in &threads {
        kick(t).expect("kick");
    }
    let stop = ctl.wait_parked(DEADLINE).expect("vCPUs parked");
    let captured_ns = monotonic_ns();
    let vm_state = capture_vm(&vm, true).expect("capture the VM");
    w.write_section(0, &vm_state).expect("encode");
    for (i, s) in captured.lock().expect("lock").iter().enumerate() {
        w.write_section(i as u32, s.as_ref().expect("captured"))
            .expect("encode");
    }
    let frame = w.finish().expect("encode");
    let len = (frame.len() as u32).to_le_bytes();
    let encoded_ns = monotonic_ns();
    if state_fds == 0 {
        write_all(&sock, &[&len, &frame]);
    } else {
        // As the reference VMM sends its devices' fds: duplicated in the pause, their
        // manifest in the frame's write, the fds in a `sendmsg` of their own.
        let mut reg = FdRegistry::new();
        for i in 0..state_fds {
            let dup = sock.try_clone().expect("dup");
            reg.register(&format!("fd{i}"), cpr_fd::FdKind::CONSOLE, dup, b"")
                .expect("register");
        }
        reg.send_after(&sock, &[&len, &frame]).expect("send");
    }
    let sent_ns = monotonic_ns();

    let mut marks = String::new();
    (&sock)
        .read_to_string(&mut marks)
        .expect("the new side's marks");
    let theirs: serde_json::Value = serde_json::from_str(&marks).expect("marks");
    let after = |ns: u64| ns.saturating_sub(stop) / 1000;
    let mark = |k: &str| after(theirs[k].as_u64().expect("a mark"));
    let total = mark("first-entry");
    println!(
        "{{\"captured\":{},\"encoded\":{},\"sent\":{},\"received\":{},\"decoded\":{},\"vm-restored\":{},\"vcpu-state\":{},\"first-entry\":{total},\"total\":{total},\"state-bytes\":{}}}",
        after(captured_ns),
        after(encoded_ns),
        after(sent_ns),
        mark("received"),
        mark("decoded"),
        mark("vm-restored"),
        mark("vcpu-state"),
        frame.len()
    );
    ctl.release(Resume::Exit);
    for t in threads {
        t.join().expect("vCPU thread");
    }
    let status = child.wait().expect("the new process");
    assert!(status.success(), "the new process failed: {status}");
    drop(vm);
    drop(ram);
}

/// One `KVM_RUN`: returns when a signal ended it, exits the process on anything else (the
/// guest's loop has no exits).
fn run_or_fail(fd: &mut VcpuFd) {
    let failed = match fd.run() {
        Ok(exit) => format!("unexpected exit {exit:?}"),
        Err(e) if e.errno() == libc::EINTR => return,
        Err(e) => format!("KVM_RUN: {e}"),
    };
    eprintln!("cpr-floor: {failed}");
    std::process::exit(1);
}

/// Whether every vCPU thread has set its mark.
fn all_set(marks: &[AtomicU64]) -> bool {
    marks.iter().all(|t| t.load(Ordering::Acquire) != 0)
}

/// The guest's loop counter.
fn counter(ram: &GuestRam) -> u16 {
    ram.memory()
        .read_obj(GuestAddress(COUNTER))
        .expect("the counter")
}

/// A vCPU's state for its thread, handed over once.
#[derive(Default)]
struct Jobs {
    posted: AtomicBool,
    states: Mutex<Vec<Option<VcpuState>>>,
    restored: Vec<AtomicU64>,
    entered: Vec<AtomicU64>,
}

/// Polls (yielding, as the reference VMM's threads do) until `done` or the deadline.
fn poll(done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out");
        std::thread::yield_now();
    }
}

/// The new side (`--transfer-new SOCKET`): builds its VM before the pause, then restores
/// what arrives and enters the guest.
pub fn new_side(path: &str, vcpus: u64, state_fds: usize) {
    let sock = UnixStream::connect(path).expect("connect");
    let schema = schema();
    let mut buf = Vec::new();
    read_frame(&sock, &mut buf);
    let layout: MemoryLayout = Snapshot::read_from(&buf[..], &schema)
        .and_then(|mut s| s.take(0))
        .expect("layout");
    let mut registry = FdRegistry::receive(&sock).expect("memfds");
    let ram: GuestRam =
        GuestRam::reattach_from(&layout, &mut registry, &MemoryOptions::default()).expect("map");
    let kvm = Kvm::new().expect("/dev/kvm");
    let caps = HostCaps::probe(&kvm).expect("caps");
    let (vm, fds) = build_vm(&kvm, &ram, vcpus);

    let jobs = Arc::new(Jobs {
        states: Mutex::new(vec![None; fds.len()]),
        restored: (0..fds.len()).map(|_| AtomicU64::new(0)).collect(),
        entered: (0..fds.len()).map(|_| AtomicU64::new(0)).collect(),
        ..Default::default()
    });
    let _threads: Vec<_> = fds
        .into_iter()
        .enumerate()
        .map(|(i, (mut fd, mut config))| {
            config.read_initial(&fd, &caps).expect("initial state");
            let (jobs, caps) = (jobs.clone(), caps.clone());
            std::thread::spawn(move || {
                prefault_thread();
                poll(|| jobs.posted.load(Ordering::Acquire));
                let state = jobs.states.lock().expect("lock")[i].take().expect("a job");
                restore_vcpu_fast(&mut fd, &state, ClockPolicy::Frozen, 0, &mut config, &caps)
                    .expect("restore");
                jobs.restored[i].store(monotonic_ns(), Ordering::Release);
                // No vCPU runs before every one is restored (one could send another an
                // interrupt that the other's restore then overwrote).
                poll(|| all_set(&jobs.restored));
                jobs.entered[i].store(monotonic_ns(), Ordering::Release);
                loop {
                    // In the guest until the process exits.
                    run_or_fail(&mut fd);
                }
            })
        })
        .collect();
    // What the pause reads and decodes into, resident before it (as in the reference VMM).
    buf.resize(64 << 10, 0);
    prefault_thread();
    (&sock).write_all(b"R").expect("READY");

    // The pause, from here on.
    read_frame(&sock, &mut buf);
    if state_fds > 0 {
        let fds = FdRegistry::receive(&sock).expect("the state's fds");
        assert_eq!(fds.len(), state_fds);
    }
    let received = monotonic_ns();
    let mut snap = Snapshot::read_from(&buf[..], &schema).expect("decode");
    let vm_state: VmState = snap.take(0).expect("VM state");
    let states: Vec<VcpuState> = (0..vcpus as u32)
        .map(|i| snap.take(i).expect("vCPU state"))
        .collect();
    let decoded = monotonic_ns();
    restore_vm(&vm, &vm_state, ClockPolicy::Frozen, 0).expect("restore the VM");
    *jobs.states.lock().expect("lock") = states.into_iter().map(Some).collect();
    jobs.posted.store(true, Ordering::Release);
    let vm_restored = monotonic_ns();
    // Napping, not yielding: this thread's marks are not the blackout's, and it must not
    // take a CPU from the vCPU threads.
    let paused_at = counter(&ram);
    let start = Instant::now();
    while !(all_set(&jobs.entered) && counter(&ram) != paused_at) {
        assert!(start.elapsed() < DEADLINE, "the guest did not run again");
        std::thread::sleep(Duration::from_micros(100));
    }
    let load =
        |v: &[AtomicU64]| -> Vec<u64> { v.iter().map(|t| t.load(Ordering::Acquire)).collect() };
    let restored = load(&jobs.restored).into_iter().max().unwrap_or(0);
    let first_entry = load(&jobs.entered).into_iter().min().unwrap_or(0);
    let marks = serde_json::json!({
        "received": received, "decoded": decoded, "vm-restored": vm_restored,
        "vcpu-state": restored, "first-entry": first_entry,
    });
    (&sock)
        .write_all(marks.to_string().as_bytes())
        .expect("marks");
    drop(sock);
    // The vCPU threads are in KVM_RUN for good; the exit ends them.
    std::process::exit(0);
}
