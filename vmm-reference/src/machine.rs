// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The KVM virtual machine: guest memory slots, in-kernel irqchip and PIT, vCPU threads,
//! COM1; pausing, capturing and restoring it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use cpr_kvm::run::{arm_kick, install_kick_handler, kick, PauseControl, Resume};
use cpr_kvm::{
    capture_vcpu, capture_vm, complete_pending_io, monotonic_ns, restore_vcpu, restore_vm,
    ClockPolicy, HostCaps, VcpuState, VmState,
};
use cpr_memory::{BackendKind, GuestRam};
use kvm_bindings::{
    kvm_mp_state, kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{kvm as kvm_err, Error, Result};
use crate::serial::{SerialDevice, COM1_BASE, COM1_IRQ};

/// Most vCPUs the reference VMM runs (the demo guest counts ticks for 8).
pub const MAX_VCPUS: usize = 8;
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// What vCPU threads report to the control loop.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The guest did something the VMM cannot continue from (triple fault, failed entry).
    Fatal {
        /// vCPU index.
        index: usize,
        /// What happened.
        reason: String,
    },
}

/// Where vCPU threads report: a channel, and an eventfd that wakes the control loop.
#[derive(Debug, Clone)]
pub struct Events {
    /// The channel.
    pub tx: Sender<VcpuEvent>,
    /// Readable when something was sent.
    pub wake: Arc<EventFd>,
}

impl Events {
    fn send(&self, e: VcpuEvent) {
        let _ = self.tx.send(e);
        let _ = self.wake.write(1);
    }
}

#[derive(Debug)]
struct Shared {
    pause: PauseControl,
    caps: HostCaps,
    states: Mutex<Vec<Option<std::result::Result<VcpuState, String>>>>,
    first_entry_ns: AtomicU64,
    /// A thread waiting for the first entry, unparked by the vCPU that makes it.
    first_entry_waiter: Mutex<Option<Thread>>,
}

/// A running (or paused) VM.
#[derive(Debug)]
pub struct Machine {
    kvm: Kvm,
    vm: VmFd,
    /// Guest RAM.
    pub ram: GuestRam,
    /// COM1.
    pub serial: SerialDevice,
    vcpu_count: usize,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    pending: Vec<VcpuFd>,
    tsc_khz: Option<u32>,
    _serial_irq: EventFd,
}

fn cpuid_for(kvm: &Kvm, index: u32) -> Result<kvm_bindings::CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            // Initial APIC id, and the hypervisor bit.
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    Ok(cpuid)
}

impl Machine {
    /// Creates the VM, its memory slots, irqchip, PIT, COM1's irqfd and `vcpus` vCPUs (not
    /// running yet: boot or restore them, then [`start`](Self::start)).
    pub fn create(
        ram: GuestRam,
        vcpus: usize,
        make_serial: impl FnOnce(EventFd) -> Result<SerialDevice>,
    ) -> Result<Machine> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "{vcpus} vCPUs: use 1 to {MAX_VCPUS}"
            )));
        }
        install_kick_handler()?;
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let caps = HostCaps::probe(&kvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        for (slot, r) in ram.layout().regions.iter().enumerate() {
            let (ptr, len) = ram
                .host_range(slot)
                .ok_or_else(|| Error::Guest(format!("region {slot} is not mapped")))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: r.guest_addr,
                memory_size: len as u64,
                userspace_addr: ptr as u64,
                flags: 0,
            };
            // SAFETY: the mapping belongs to `ram`, which the Machine owns and drops after
            // the VM (field order), so the guest never sees unmapped memory.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io(format!("eventfd: {e}")))?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial = make_serial(
            irq.try_clone()
                .map_err(|e| Error::Io(format!("eventfd: {e}")))?,
        )?;
        let pending = (0..vcpus)
            .map(|i| vm.create_vcpu(i as u64).map_err(kvm_err("KVM_CREATE_VCPU")))
            .collect::<Result<Vec<_>>>()?;
        let tsc_khz = pending.first().and_then(|v| v.get_tsc_khz().ok());
        Ok(Machine {
            tsc_khz,
            kvm,
            vm,
            ram,
            serial,
            vcpu_count: vcpus,
            shared: Arc::new(Shared {
                pause: PauseControl::new(vcpus),
                caps,
                states: Mutex::new(vec![None; vcpus]),
                first_entry_ns: AtomicU64::new(u64::MAX),
                first_entry_waiter: Mutex::new(None),
            }),
            threads: Vec::new(),
            pending,
            _serial_irq: irq,
        })
    }

    /// Replaces COM1 (before [`start`](Self::start)), e.g. when its fds arrive after the VM
    /// was built.
    pub fn replace_serial(
        &mut self,
        make_serial: impl FnOnce(EventFd) -> Result<SerialDevice>,
    ) -> Result<()> {
        let irq = self
            ._serial_irq
            .try_clone()
            .map_err(|e| Error::Io(format!("eventfd: {e}")))?;
        self.serial = make_serial(irq)?;
        Ok(())
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpu_count
    }

    /// Host TSC frequency the vCPUs run at, if KVM reports it.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.tsc_khz
    }

    /// Sets up fresh vCPUs for the demo guest (already loaded into memory).
    pub fn boot_demo(&mut self) -> Result<()> {
        for (i, vcpu) in self.pending.iter().enumerate() {
            vcpu.set_cpuid2(&cpuid_for(&self.kvm, i as u32)?)
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            vcpu.set_sregs(&crate::guest::initial_sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            vcpu.set_regs(&crate::guest::initial_regs(i as u64))
                .map_err(kvm_err("KVM_SET_REGS"))?;
            // Application processors start running too, instead of waiting for INIT/SIPI.
            vcpu.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// Sets up fresh vCPUs for a Linux kernel (entry registers from the loader).
    pub fn boot_linux(
        &mut self,
        regs: kvm_bindings::kvm_regs,
        sregs: impl Fn(kvm_bindings::kvm_sregs) -> kvm_bindings::kvm_sregs,
    ) -> Result<()> {
        for (i, vcpu) in self.pending.iter().enumerate() {
            vcpu.set_cpuid2(&cpuid_for(&self.kvm, i as u32)?)
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            if i == 0 {
                let s = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                vcpu.set_sregs(&sregs(s))
                    .map_err(kvm_err("KVM_SET_SREGS"))?;
                vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            }
        }
        Ok(())
    }

    /// Restores saved VM and vCPU state into the fresh VM. Returns MSRs the kernel refused.
    pub fn restore(
        &mut self,
        vm_state: &VmState,
        vcpus: &[VcpuState],
        policy: ClockPolicy,
        elapsed_ns: u64,
    ) -> Result<Vec<u32>> {
        if vcpus.len() != self.pending.len() {
            return Err(Error::State(format!(
                "state has {} vCPUs, the VM {}",
                vcpus.len(),
                self.pending.len()
            )));
        }
        restore_vm(&self.vm, vm_state, policy, elapsed_ns)?;
        let mut refused = Vec::new();
        for (vcpu, state) in self.pending.iter().zip(vcpus) {
            let r = restore_vcpu(vcpu, state, policy, elapsed_ns)?;
            refused.extend(r.refused_msrs);
        }
        refused.sort_unstable();
        refused.dedup();
        Ok(refused)
    }

    /// Whether the vCPU threads exist (started running or parked).
    pub fn started(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Starts the vCPU threads, running.
    pub fn start(&mut self, events: Events) -> Result<()> {
        self.spawn(events)
    }

    /// Starts the vCPU threads parked, as after [`pause`](Self::pause): a restored guest
    /// that was paused before its update. [`resume`](Self::resume) runs them.
    pub fn start_paused(&mut self, events: Events, timeout: Duration) -> Result<u64> {
        self.shared.pause.request_pause();
        self.spawn(events)?;
        Ok(self.shared.pause.wait_parked(timeout)?)
    }

    /// Stops the vCPU threads for good and waits for them, so the VM is torn down with no
    /// vCPU in the guest.
    pub fn shutdown(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.shared.pause.request_pause();
        for t in &self.threads {
            let _ = kick(t);
        }
        let start = Instant::now();
        while self
            .shared
            .pause
            .wait_parked(Duration::from_millis(50))
            .is_err()
        {
            if start.elapsed() > Duration::from_secs(10) {
                log::error!("vCPUs did not stop within 10 s; exiting with them running");
                return;
            }
            for t in &self.threads {
                let _ = kick(t);
            }
        }
        self.shared.pause.release(Resume::Exit);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn spawn(&mut self, events: Events) -> Result<()> {
        self.shared.first_entry_ns.store(u64::MAX, Ordering::SeqCst);
        for (index, vcpu) in self.pending.drain(..).enumerate() {
            let shared = self.shared.clone();
            let uart = self.serial.uart.clone();
            let events = events.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_loop(index, vcpu, shared, uart, events))
                .map_err(|e| Error::Io(format!("spawn vCPU thread: {e}")))?;
            self.threads.push(t);
        }
        Ok(())
    }

    /// Stops every vCPU (kicked out of `KVM_RUN`, pending I/O completed, state captured) and
    /// returns when the last one leaves `KVM_RUN`, in `CLOCK_MONOTONIC` nanoseconds.
    pub fn pause(&self, timeout: Duration) -> Result<u64> {
        self.shared.pause.request_pause();
        for t in &self.threads {
            kick(t)?;
        }
        // A kick can race with a vCPU thread that is between checks; repeat until all park.
        let start = Instant::now();
        loop {
            match self.shared.pause.wait_parked(Duration::from_millis(50)) {
                Ok(ns) => return Ok(ns),
                Err(e) if start.elapsed() >= timeout => {
                    self.resume();
                    return Err(e.into());
                }
                Err(_) => {
                    for t in &self.threads {
                        kick(t)?;
                    }
                }
            }
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.shared.first_entry_ns.store(u64::MAX, Ordering::SeqCst);
        self.shared.pause.release(Resume::Run);
    }

    /// The first time a vCPU entered `KVM_RUN` since start or the last resume.
    pub fn first_entry_ns(&self) -> Option<u64> {
        Some(self.shared.first_entry_ns.load(Ordering::SeqCst)).filter(|v| *v != u64::MAX)
    }

    /// Waits for [`first_entry_ns`](Self::first_entry_ns); the vCPU that enters first
    /// wakes this thread.
    pub fn wait_first_entry(&self, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        *self
            .shared
            .first_entry_waiter
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::thread::current());
        let r = loop {
            if let Some(ns) = self.first_entry_ns() {
                break Some(ns);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            std::thread::park_timeout(left);
        };
        self.shared
            .first_entry_waiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        r
    }

    /// The state of a paused VM: VM-wide, then each vCPU's (captured by its own thread).
    pub fn capture(&self) -> Result<(VmState, Vec<VcpuState>)> {
        let vm = capture_vm(&self.vm, true)?;
        let states = self.shared.states.lock().unwrap_or_else(|p| p.into_inner());
        let vcpus = states
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(Ok(s)) => Ok(s.clone()),
                Some(Err(e)) => Err(Error::State(format!("vCPU {i}: {e}"))),
                None => Err(Error::State(format!("vCPU {i} has not been captured"))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((vm, vcpus))
    }

    /// A duplicate of the VM fd. Handed to the next image and closed there after the guest
    /// resumed, it keeps the old VM's teardown (which KVM otherwise does inside `execve`,
    /// on the blackout's critical path) out of the blackout.
    pub fn retire_vm_fd(&self) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the VmFd owns this fd and outlives the borrow, which only duplicates it.
        let fd = unsafe { BorrowedFd::borrow_raw(self.vm.as_raw_fd()) };
        fd.try_clone_to_owned()
            .map_err(|e| Error::Io(format!("dup VM fd: {e}")))
    }

    /// kvmclock (`KVM_GET_CLOCK`), the guest-visible clock of Linux guests, in ns.
    pub fn kvmclock_ns(&self) -> Option<u64> {
        self.vm.get_clock().ok().map(|c| c.clock)
    }

    /// Whether guest RAM is backed by something other than anonymous memory.
    pub fn memory_is_persistent(&self) -> bool {
        self.ram
            .layout()
            .regions
            .iter()
            .all(|r| r.kind != BackendKind::Anonymous)
    }
}

fn vcpu_loop(
    index: usize,
    mut vcpu: VcpuFd,
    shared: Arc<Shared>,
    uart: Arc<Mutex<crate::serial::Uart>>,
    events: Events,
) {
    arm_kick(&mut vcpu);
    let mut entered = false;
    let mut last_exit_ns = monotonic_ns();
    loop {
        if shared.pause.pause_requested() {
            if let Err(e) = complete_pending_io(&mut vcpu) {
                log::warn!("vCPU {index}: completing pending I/O: {e}");
            }
            let captured = capture_vcpu(&vcpu, index as u32, &shared.caps)
                .map(|(s, report)| {
                    if !report.refused_msrs.is_empty() {
                        log::debug!(
                            "vCPU {index}: MSRs not readable: {:x?}",
                            report.refused_msrs
                        );
                    }
                    s
                })
                .map_err(|e| e.to_string());
            shared.states.lock().unwrap_or_else(|p| p.into_inner())[index] = Some(captured);
            match shared.pause.park(last_exit_ns) {
                Resume::Run => {
                    entered = false;
                    continue;
                }
                Resume::Exit => break,
            }
        }
        if !entered {
            let before = shared
                .first_entry_ns
                .fetch_min(monotonic_ns(), Ordering::SeqCst);
            if before == u64::MAX {
                if let Some(t) = shared
                    .first_entry_waiter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                {
                    t.unpark();
                }
            }
            entered = true;
        }
        let exit = vcpu.run();
        last_exit_ns = monotonic_ns();
        let fatal = match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                if (COM1_BASE..COM1_BASE + 8).contains(&port) && !data.is_empty() {
                    let mut u = uart.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = u.write((port - COM1_BASE) as u8, data[0]) {
                        log::warn!("serial write: {e:?}");
                    }
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if (COM1_BASE..COM1_BASE + 8).contains(&port) && !data.is_empty() {
                    data[0] = uart
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .read((port - COM1_BASE) as u8);
                } else {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                None
            }
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(VcpuExit::Shutdown) => Some("the guest shut down (triple fault)".to_string()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Some(format!("VM entry failed: reason {reason:#x} on cpu {cpu}"))
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the run structure's exit union holds
                // `internal`, a plain-data struct.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Some(format!("KVM internal error, suberror {suberror}"))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(format!("system event {kind}")),
            Ok(other) => {
                log::debug!("vCPU {index}: unhandled exit {other:?}");
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(format!("KVM_RUN: {e}")),
        };
        if let Some(mut reason) = fatal {
            if let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) {
                reason.push_str(&format!(
                    " (rip {:#x}, rsp {:#x}, cr0 {:#x}, cr3 {:#x}, cr4 {:#x}, efer {:#x})",
                    r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer
                ));
            }
            log::error!("vCPU {index}: {reason}");
            events.send(VcpuEvent::Fatal { index, reason });
            // Stay parkable so the VMM can still stop and tear down.
            loop {
                while !shared.pause.pause_requested() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                shared.states.lock().unwrap_or_else(|p| p.into_inner())[index] =
                    Some(Err("the vCPU stopped on a fatal exit".into()));
                if shared.pause.park(last_exit_ns) == Resume::Exit {
                    return;
                }
            }
        }
    }
}
