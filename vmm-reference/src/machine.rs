// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The KVM virtual machine: guest memory slots, in-kernel irqchip and PIT, vCPU threads,
//! COM1; pausing, capturing and restoring it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use cpr_kvm::run::{arm_kick, install_kick_handler, kick, prefault_thread, PauseControl, Resume};
use cpr_kvm::{
    capture_vm, complete_and_capture, monotonic_ns, reconcile_ioapic, restore_vcpu_fast,
    restore_vm, ClockPolicy, HostCaps, VcpuConfig, VcpuState, VmState,
};
use cpr_memory::{BackendKind, GuestRam};
use kvm_bindings::{
    kvm_mp_state, kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{kvm as kvm_err, Error, Result};
use crate::serial::{SerialDevice, Uart, COM1_BASE, COM1_IRQ};
use crate::virtio_blk::Blk;
use crate::virtio_mmio::MmioDevice;
use crate::virtio_net::Net;

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
    gate: Gate,
    /// The virtio-blk device at [`BLK_BASE`], once attached.
    blk: std::sync::OnceLock<Arc<Blk>>,
    /// The virtio-net device at [`NET_BASE`], once attached.
    net: std::sync::OnceLock<Arc<Net>>,
    /// How long the last pause waited for the devices' I/O in flight, ns.
    last_drain_ns: AtomicU64,
    /// The devices' worker threads.
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Threads started before a pause to run device workers later (see [`Spares`]).
    spares: Spares,
}

/// A device worker's loop, handed to a thread.
type Work = Box<dyn FnOnce() + Send + 'static>;

/// Threads started ahead, each waiting for one piece of [`Work`], so that attaching a device
/// inside a blackout hands its worker to a running thread (a channel send, ~2 µs here)
/// instead of creating one (~40 µs here, on the thread that restores the guest). A spare
/// that is never given work exits when the spares are [closed](Spares::close).
#[derive(Debug, Default)]
struct Spares(Mutex<Vec<(std::sync::mpsc::Sender<Work>, JoinHandle<()>)>>);

impl Spares {
    /// Starts `n` more spare threads.
    fn start(&self, n: usize) -> std::io::Result<()> {
        for _ in 0..n {
            let (tx, rx) = std::sync::mpsc::channel::<Work>();
            let h = std::thread::Builder::new()
                .name("device-worker".into())
                .spawn(move || {
                    if let Ok(work) = rx.recv() {
                        work();
                    }
                })?;
            lock(&self.0).push((tx, h));
        }
        Ok(())
    }

    /// Runs `work` on a spare thread, or on a new one if none is left.
    fn run(&self, work: Work) -> std::io::Result<JoinHandle<()>> {
        let spare = lock(&self.0).pop();
        let work = match spare {
            Some((tx, h)) => match tx.send(work) {
                Ok(()) => return Ok(h),
                // The spare is gone (it cannot be, short of a panic): a new thread then.
                Err(std::sync::mpsc::SendError(work)) => {
                    let _ = h.join();
                    work
                }
            },
            None => work,
        };
        std::thread::Builder::new()
            .name("device-worker".into())
            .spawn(work)
    }

    /// Ends the spares not given work, and waits for them.
    fn close(&self) {
        let spares = std::mem::take(&mut *lock(&self.0));
        for (tx, h) in spares {
            drop(tx);
            let _ = h.join();
        }
    }

    fn len(&self) -> usize {
        lock(&self.0).len()
    }
}

impl Shared {
    /// The attached virtio devices.
    fn devices(&self) -> impl Iterator<Item = &dyn MmioDevice> {
        let blk = self.blk.get().map(|b| &**b as &dyn MmioDevice);
        let net = self.net.get().map(|n| &**n as &dyn MmioDevice);
        blk.into_iter().chain(net)
    }

    /// The device whose MMIO window holds `addr`, and the offset in it.
    fn device_at(&self, addr: u64) -> Option<(&dyn MmioDevice, u64)> {
        let off = |base: u64| {
            addr.checked_sub(base)
                .filter(|o| *o < crate::virtio_mmio::MMIO_SIZE)
        };
        if let (Some(b), Some(o)) = (self.blk.get(), off(BLK_BASE)) {
            return Some((&**b, o));
        }
        if let (Some(n), Some(o)) = (self.net.get(), off(NET_BASE)) {
            return Some((&**n, o));
        }
        None
    }
}

/// Guest physical address of the virtio-blk device's MMIO window (in the 32-bit hole).
pub const BLK_BASE: u64 = 0xd000_0000;
/// Its interrupt (IOAPIC pin / GSI).
pub const BLK_GSI: u32 = 5;
/// Guest physical address of the virtio-net device's MMIO window.
pub const NET_BASE: u64 = 0xd000_1000;
/// Its interrupt.
pub const NET_GSI: u32 = 6;

/// The kernel command-line words that tell a Linux guest where the attached virtio-mmio
/// devices are (`virtio_mmio.device=SIZE@BASE:GSI`).
pub fn virtio_cmdline(blk: bool, net: bool) -> String {
    let size = crate::virtio_mmio::MMIO_SIZE;
    [(blk, BLK_BASE, BLK_GSI), (net, NET_BASE, NET_GSI)]
        .iter()
        .filter(|d| d.0)
        .map(|(_, base, gsi)| format!("virtio_mmio.device={size}@{base:#x}:{gsi}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A vCPU and what it was configured with. Its thread holds the lock from the moment it
/// first runs; before that (at the gate) whoever restores it takes the lock.
#[derive(Debug)]
struct Vcpu {
    fd: VcpuFd,
    config: VcpuConfig,
}

/// Where new vCPU threads wait before they first run, and where a restore hands out the
/// vCPUs' states: the restoring thread takes them in order and each vCPU thread takes its
/// own if it wakes first, so a restore is never slower than a serial one (waking a thread
/// on an idle CPU can cost more than restoring a vCPU) and spreads over the CPUs that are
/// awake.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    /// Set when the gate opens (as `GateState::open`), for threads that poll.
    opened: AtomicBool,
    /// Set when the restore jobs are handed out, for threads that poll.
    restoring: AtomicBool,
}

#[derive(Debug, Default)]
struct GateState {
    jobs: Vec<Option<Box<Job>>>,
    done: Vec<Option<std::result::Result<Vec<u32>, String>>>,
    open: Option<(Resume, Arc<Mutex<Uart>>)>,
}

#[derive(Debug)]
struct Job {
    state: VcpuState,
    policy: ClockPolicy,
    elapsed_ns: u64,
}

enum AtGate {
    Restore(Box<Job>),
    Open(Resume, Arc<Mutex<Uart>>),
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job of vCPU `index`, if nobody took it yet.
    fn claim(&self, index: usize) -> Option<Box<Job>> {
        self.lock().jobs.get_mut(index).and_then(Option::take)
    }

    /// A vCPU thread's next instruction. `poll`: how long to look for it, yielding the CPU,
    /// before sleeping, where it is due soon (a sleeping thread's wake-up costs tens of
    /// microseconds on a host whose idle CPUs halt, inside the blackout).
    fn wait(&self, index: usize, poll: Duration) -> AtGate {
        let start = Instant::now();
        while !self.opened.load(Ordering::Acquire)
            && !self.restoring.load(Ordering::Acquire)
            && start.elapsed() < poll
        {
            std::thread::yield_now();
        }
        let mut s = self.lock();
        loop {
            if let Some(job) = s.jobs.get_mut(index).and_then(Option::take) {
                return AtGate::Restore(job);
            }
            if let Some((what, uart)) = &s.open {
                return AtGate::Open(*what, uart.clone());
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finish(&self, index: usize, result: std::result::Result<Vec<u32>, String>) {
        let mut s = self.lock();
        if let Some(slot) = s.done.get_mut(index) {
            *slot = Some(result);
        }
        self.cv.notify_all();
    }
}

/// How long a vCPU thread that restored its vCPU polls for the gate to open.
const GATE_POLL_RESTORED: Duration = Duration::from_millis(1);
/// How long a vCPU thread started before a pause polls for its restore job. The old process
/// pauses as soon as it hears the VM is built; yielding, the poll takes little from the
/// guest still running there.
const GATE_POLL_PREPARED: Duration = Duration::from_millis(20);

/// A running (or paused) VM.
#[derive(Debug)]
pub struct Machine {
    vm: VmFd,
    /// Guest RAM.
    pub ram: GuestRam,
    /// COM1.
    pub serial: SerialDevice,
    vcpu_count: usize,
    shared: Arc<Shared>,
    events: Events,
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    /// Whether the threads passed the gate (ran, or parked after running).
    opened: bool,
    /// A restore is begun and not ended.
    restoring: bool,
    tsc_khz: Option<u32>,
    _serial_irq: EventFd,
}

/// vCPU `index`'s CPUID, from what the host supports (`KVM_GET_SUPPORTED_CPUID`, asked once
/// per VM: it is one of KVM's slowest ioctls).
fn cpuid_for(supported: &kvm_bindings::CpuId, index: u32) -> kvm_bindings::CpuId {
    let mut cpuid = supported.clone();
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
    cpuid
}

impl Machine {
    /// Creates the VM, its memory slots, irqchip, PIT, COM1's irqfd and `vcpus` vCPUs (not
    /// running yet: boot or restore them, then [`start`](Self::start)). vCPU threads report
    /// to `events`. With `cpuid`, the vCPUs get this VMM's CPUID now (a boot needs it; a
    /// transfer sets it before the pause, and the restore skips it when the state agrees);
    /// without, the restore sets the state's (a restart or reboot has the state already, and
    /// `KVM_GET_SUPPORTED_CPUID` is one of KVM's slowest ioctls).
    ///
    /// The memory slots are registered before the irqchip exists: on this order the first
    /// `KVM_SET_USER_MEMORY_REGION` costs what the slot's size costs, where after
    /// `KVM_CREATE_IRQCHIP` it also waits several milliseconds for the kernel (measured in
    /// docs/BENCHMARKS.md), inside the blackout of every restart and reboot.
    pub fn create(
        ram: GuestRam,
        vcpus: usize,
        events: Events,
        cpuid: bool,
        make_serial: impl FnOnce(EventFd) -> Result<SerialDevice>,
        mark: &mut dyn FnMut(&'static str),
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
        mark("memory-slots");
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io(format!("eventfd: {e}")))?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let serial = make_serial(
            irq.try_clone()
                .map_err(|e| Error::Io(format!("eventfd: {e}")))?,
        )?;
        let supported = if cpuid {
            Some(
                kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?,
            )
        } else {
            None
        };
        let created = (0..vcpus)
            .map(|i| {
                let fd = vm
                    .create_vcpu(i as u64)
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?;
                let config = match &supported {
                    Some(s) => VcpuConfig::configure(&fd, &cpuid_for(s, i as u32))?,
                    None => VcpuConfig {
                        cpuid: None,
                        tsc_khz: fd.get_tsc_khz().ok().filter(|k| *k != 0),
                        initial: None,
                    },
                };
                Ok(Vcpu { fd, config })
            })
            .collect::<Result<Vec<_>>>()?;
        mark("vcpus-created");
        let tsc_khz = created.first().and_then(|v| v.config.tsc_khz);
        Ok(Machine {
            tsc_khz,
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
                gate: Gate::default(),
                blk: std::sync::OnceLock::new(),
                net: std::sync::OnceLock::new(),
                last_drain_ns: AtomicU64::new(0),
                workers: Mutex::new(Vec::new()),
                spares: Spares::default(),
            }),
            events,
            threads: Vec::new(),
            vcpus: created
                .into_iter()
                .map(|v| Arc::new(Mutex::new(v)))
                .collect(),
            opened: false,
            restoring: false,
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
        for (i, v) in self.vcpus.iter().enumerate() {
            let vcpu = &lock(v).fd;
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
        for (i, v) in self.vcpus.iter().enumerate() {
            let vcpu = &lock(v).fd;
            if i == 0 {
                let s = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                vcpu.set_sregs(&sregs(s))
                    .map_err(kvm_err("KVM_SET_SREGS"))?;
                vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            }
        }
        Ok(())
    }

    /// Starts restoring saved VM and vCPU state into the fresh VM: the VM-wide state here,
    /// then each vCPU's on its own thread (started at the gate if
    /// [`spawn_at_gate`](Self::spawn_at_gate) did not already), while the caller goes on
    /// with the devices. [`end_restore`](Self::end_restore) waits for them; until it
    /// returned, no vCPU runs. If the caller fails in between, [`shutdown`](Self::shutdown)
    /// lets the threads finish their jobs and exit.
    pub fn begin_restore(
        &mut self,
        vm_state: &VmState,
        vcpus: Vec<VcpuState>,
        policy: ClockPolicy,
        elapsed_ns: u64,
    ) -> Result<()> {
        if self.opened || vcpus.len() != self.vcpu_count || self.restoring {
            return Err(Error::State(format!(
                "state has {} vCPUs for a VM of {}{}",
                vcpus.len(),
                self.vcpu_count,
                if self.opened || self.restoring {
                    " that already ran or is being restored"
                } else {
                    ""
                }
            )));
        }
        restore_vm(&self.vm, vm_state, policy, elapsed_ns)?;
        // Only if the VMM did not start them before: then this is inside the blackout.
        self.spawn_at_gate(false)?;
        let gate = &self.shared.gate;
        let mut s = gate.lock();
        s.done = vec![None; self.vcpu_count];
        gate.restoring.store(true, Ordering::Release);
        s.jobs = vcpus
            .into_iter()
            .map(|state| {
                Some(Box::new(Job {
                    state,
                    policy,
                    elapsed_ns,
                }))
            })
            .collect();
        gate.cv.notify_all();
        self.restoring = true;
        Ok(())
    }

    /// Finishes what [`begin_restore`](Self::begin_restore) started: restores here any vCPU
    /// whose thread has not taken its job yet (waking a thread on an idle CPU can cost more
    /// than the restore), waits for the others, and returns MSRs the kernel refused.
    pub fn end_restore(&mut self) -> Result<Vec<u32>> {
        if !self.restoring {
            return Err(Error::State("no restore was begun".into()));
        }
        self.restoring = false;
        let gate = &self.shared.gate;
        for (i, v) in self.vcpus.iter().enumerate() {
            if let Some(job) = gate.claim(i) {
                let r = job.run(&mut lock(v), &self.shared.caps);
                gate.finish(i, r);
            }
        }
        let mut s = gate.lock();
        // A restore is a dozen ioctls per vCPU; the deadline only catches a thread that died.
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.done.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::State(
                    "a vCPU thread did not restore its state".into(),
                ));
            }
            s = gate
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut refused = Vec::new();
        for (i, r) in s.done.drain(..).enumerate() {
            match r {
                Some(Ok(msrs)) => refused.extend(msrs),
                Some(Err(e)) => return Err(Error::State(format!("vCPU {i}: {e}"))),
                None => unreachable!("every vCPU reported"),
            }
        }
        refused.sort_unstable();
        refused.dedup();
        drop(s);
        // Every LAPIC is set: a device's interrupt (one due from before the update, or one
        // its worker made since it was attached) now reaches a LAPIC that keeps it.
        for d in self.shared.devices() {
            d.release_irq();
        }
        self.serial.release_irq()?;
        Ok(refused)
    }

    /// Whether the vCPU threads ran (they may be parked now).
    pub fn started(&self) -> bool {
        self.opened
    }

    /// Starts a thread per vCPU that waits at the gate: to restore its vCPU's state, then
    /// to run. A transfer does it before the pause, so neither thread creation nor the
    /// restore's hand-off costs a thread start inside the blackout. Does nothing if the
    /// threads exist.
    ///
    /// `before_pause`: the threads start while no guest waits (a boot, a transfer's new side
    /// before the pause), so they prefault what a restore and a capture touch now; otherwise
    /// (a restart or reboot, inside the blackout) they do it once the guest runs.
    pub fn spawn_at_gate(&mut self, before_pause: bool) -> Result<()> {
        for index in self.threads.len()..self.vcpus.len() {
            let vcpu = self.vcpus[index].clone();
            let shared = self.shared.clone();
            let events = self.events.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_thread(index, vcpu, shared, events, before_pause))
                .map_err(|e| Error::Io(format!("spawn vCPU thread: {e}")))?;
            self.threads.push(t);
        }
        Ok(())
    }

    fn open_gate(&mut self, what: Resume) {
        let gate = &self.shared.gate;
        let mut s = gate.lock();
        s.open = Some((what, self.serial.uart.clone()));
        gate.opened.store(true, Ordering::Release);
        gate.cv.notify_all();
        drop(s);
        self.opened = true;
    }

    /// Records what each fresh vCPU holds in the parts a restore then sets only where they
    /// differ (`VcpuConfig::read_initial`): three ioctls per vCPU, for a VM built before the
    /// pause (a transfer's new side), so that up to three leave the blackout.
    pub fn read_initial_vcpu_state(&self) -> Result<()> {
        if self.opened {
            return Err(Error::State("the vCPUs ran already".into()));
        }
        for v in &self.vcpus {
            let mut v = lock(v);
            let Vcpu { fd, config } = &mut *v;
            config.read_initial(fd, &self.shared.caps)?;
        }
        Ok(())
    }

    /// Runs the vCPUs.
    pub fn start(&mut self) -> Result<()> {
        self.shared.first_entry_ns.store(u64::MAX, Ordering::SeqCst);
        self.spawn_at_gate(true)?;
        self.open_gate(Resume::Run);
        Ok(())
    }

    /// Starts the vCPUs parked, as after [`pause`](Self::pause): a restored guest that was
    /// paused before its update. [`resume`](Self::resume) runs them.
    pub fn start_paused(&mut self, timeout: Duration) -> Result<u64> {
        self.shared.pause.request_pause();
        self.start()?;
        Ok(self.shared.pause.wait_parked(timeout)?)
    }

    /// Stops the vCPU threads for good and waits for them, so the VM is torn down with no
    /// vCPU in the guest.
    pub fn shutdown(&mut self) {
        self.stop_devices();
        if self.threads.is_empty() {
            return;
        }
        if !self.opened {
            self.open_gate(Resume::Exit);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
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
                Ok(ns) => {
                    // Then the devices: what the guest offered completes first (each
                    // device's in-flight rule).
                    let drain = Instant::now();
                    for d in self.shared.devices() {
                        if let Err(e) = d.pause(timeout.saturating_sub(start.elapsed())) {
                            self.resume();
                            return Err(Error::State(e));
                        }
                    }
                    self.shared
                        .last_drain_ns
                        .store(drain.elapsed().as_nanos() as u64, Ordering::SeqCst);
                    return Ok(ns);
                }
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

    /// An interrupt line for a device: an eventfd registered as KVM irqfd on `gsi`.
    fn irq_line(&self, gsi: u32) -> Result<EventFd> {
        let irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io(format!("eventfd: {e}")))?;
        self.vm
            .register_irqfd(&irq, gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        Ok(irq)
    }

    /// Attaches the virtio-blk device at [`BLK_BASE`] (interrupt [`BLK_GSI`]) and starts its
    /// worker (once).
    pub fn attach_blk(&self, blk: Arc<Blk>) -> Result<()> {
        if self.shared.blk.get().is_some() {
            return Err(Error::State("a disk is attached already".into()));
        }
        if self.restoring {
            // Until the vCPUs' LAPICs are set: see `end_restore`.
            MmioDevice::hold_irq(&*blk);
        }
        blk.set_irq(self.irq_line(BLK_GSI)?);
        let worker = self
            .shared
            .spares
            .run(blk.worker())
            .map_err(|e| Error::Io(format!("start the virtio-blk worker: {e}")))?;
        let _ = self.shared.blk.set(blk);
        lock(&self.shared.workers).push(worker);
        Ok(())
    }

    /// Attaches the virtio-net device at [`NET_BASE`] (interrupt [`NET_GSI`]) and starts its
    /// worker (once).
    pub fn attach_net(&self, net: Arc<Net>) -> Result<()> {
        if self.shared.net.get().is_some() {
            return Err(Error::State("a network device is attached already".into()));
        }
        if self.restoring {
            // Until the vCPUs' LAPICs are set: see `end_restore`.
            MmioDevice::hold_irq(&*net);
        }
        net.set_irq(self.irq_line(NET_GSI)?);
        let worker = self
            .shared
            .spares
            .run(net.worker())
            .map_err(|e| Error::Io(format!("start the virtio-net worker: {e}")))?;
        let _ = self.shared.net.set(net);
        lock(&self.shared.workers).push(worker);
        Ok(())
    }

    /// The network device, if attached.
    pub fn net(&self) -> Option<&Arc<Net>> {
        self.shared.net.get()
    }

    /// The disk, if attached.
    pub fn blk(&self) -> Option<&Arc<Blk>> {
        self.shared.blk.get()
    }

    /// How long the last pause waited for the devices' I/O in flight.
    pub fn last_drain(&self) -> Duration {
        Duration::from_nanos(self.shared.last_drain_ns.load(Ordering::SeqCst))
    }

    fn stop_devices(&self) {
        for d in self.shared.devices() {
            d.stop();
        }
        for t in lock(&self.shared.workers).drain(..) {
            let _ = t.join();
        }
        self.shared.spares.close();
    }

    /// Starts a thread for each device worker a restore may attach ([`attach_blk`],
    /// [`attach_net`]: one each), for a VM built before the pause (a transfer's new side):
    /// attaching then hands the worker to a running thread instead of creating one inside
    /// the blackout. Threads not used end at
    /// [`close_spare_workers`](Self::close_spare_workers), or with the machine.
    ///
    /// [`attach_blk`]: Self::attach_blk
    /// [`attach_net`]: Self::attach_net
    pub fn start_spare_workers(&self) -> Result<()> {
        const DEVICE_KINDS: usize = 2;
        let have = self.shared.spares.len();
        self.shared
            .spares
            .start(DEVICE_KINDS.saturating_sub(have))
            .map_err(|e| Error::Io(format!("start a spare device worker: {e}")))
    }

    /// Ends the spare threads [`start_spare_workers`](Self::start_spare_workers) started
    /// that no device took (after a restore, outside the blackout).
    pub fn close_spare_workers(&self) {
        self.shared.spares.close();
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        for d in self.shared.devices() {
            d.resume();
        }
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

    /// The state of a paused VM: VM-wide, then each vCPU's (captured by its own thread at
    /// this pause, and taken: moved, not copied into fresh memory inside the blackout; the
    /// next pause captures again).
    pub fn capture(&self) -> Result<(VmState, Vec<VcpuState>)> {
        let mut vm = capture_vm(&self.vm, true)?;
        let mut states = self.shared.states.lock().unwrap_or_else(|p| p.into_inner());
        let vcpus = states
            .iter_mut()
            .enumerate()
            .map(|(i, s)| match s.take() {
                Some(Ok(s)) => Ok(s),
                Some(Err(e)) => Err(Error::State(format!("vCPU {i}: {e}"))),
                None => Err(Error::State(format!("vCPU {i} has not been captured"))),
            })
            .collect::<Result<Vec<_>>>()?;
        drop(states);
        // An interrupt delivered after a vCPU thread captured its LAPIC is in the IOAPIC
        // captured just now and in no saved LAPIC; a level-triggered pin would stay blocked.
        let cleared = reconcile_ioapic(&mut vm, &vcpus)?;
        if !cleared.is_empty() {
            log::debug!(
                "IOAPIC pins whose interrupt no LAPIC held (remote IRR cleared): {cleared:?}"
            );
        }
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

/// A vCPU thread: at the gate until it opens (restoring its vCPU's state if it gets there
/// first), then the run loop, holding its vCPU for good.
fn vcpu_thread(
    index: usize,
    vcpu: Arc<Mutex<Vcpu>>,
    shared: Arc<Shared>,
    events: Events,
    prefault: bool,
) {
    if prefault {
        // What a restore here and a capture at the next pause touch, resident before either.
        prefault_thread();
    }
    // Started before a pause (a transfer's new side): the state is due within
    // milliseconds. Restored: the gate opens within tens of microseconds.
    let mut poll = if prefault {
        GATE_POLL_PREPARED
    } else {
        Duration::ZERO
    };
    loop {
        match shared.gate.wait(index, poll) {
            AtGate::Restore(job) => {
                let r = job.run(&mut lock(&vcpu), &shared.caps);
                poll = if r.is_ok() {
                    GATE_POLL_RESTORED
                } else {
                    Duration::ZERO
                };
                shared.gate.finish(index, r);
            }
            AtGate::Open(Resume::Exit, _) => return,
            AtGate::Open(Resume::Run, uart) => {
                let mut v = lock(&vcpu);
                let Vcpu { fd, config } = &mut *v;
                return vcpu_loop(index, fd, config, shared, uart, events);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Job {
    /// Restores with the fewest ioctls: this vCPU's next `KVM_RUN` enters the guest, or is
    /// the next pause's `complete_and_capture`, as `restore_vcpu_fast` requires.
    fn run(&self, v: &mut Vcpu, caps: &HostCaps) -> std::result::Result<Vec<u32>, String> {
        let Vcpu { fd, config } = v;
        restore_vcpu_fast(fd, &self.state, self.policy, self.elapsed_ns, config, caps)
            .map(|r| r.refused_msrs)
            .map_err(|e| e.to_string())
    }
}

impl Machine {
    /// Stops the vCPUs and lets the VM go without waiting for KVM to tear it down: a
    /// forked child (which unmaps guest RAM at once) holds the VM's last references and
    /// closes them, while this process goes on to exit. For a process about to exit only:
    /// its own guest RAM mappings stay until the exit. With an in-kernel irqchip, destroying a VM waits for the kernel's
    /// grace periods (about 20 ms on this host), which would otherwise delay the exit that
    /// a reboot's next process, or a service manager, waits for.
    pub fn retire(mut self) {
        use std::os::fd::AsRawFd;
        self.shutdown();
        // Guest RAM is unmapped and every other fd closed in the child before this process
        // goes on, so its memory (huge pages, a file) is free the moment this process
        // exits, as without the child.
        let ram: Vec<(usize, usize)> = self
            .ram
            .mappings()
            .into_iter()
            .map(|(p, len)| (p as usize, len))
            .collect();
        let mut slow: Vec<i32> = vec![self.vm.as_raw_fd()];
        slow.extend(self.vcpus.iter().map(|v| lock(v).fd.as_raw_fd()));
        // `ready`: the child says it let go of everything but the VM. `gone`: the child
        // learns this process exited (its write end, kept here, closes).
        let mut ready = [-1i32; 2];
        let mut gone = [-1i32; 2];
        // SAFETY: pipe2 writes two fds into each array we pass.
        unsafe {
            if libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return;
            }
            if libc::pipe2(gone.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                libc::close(ready[0]);
                libc::close(ready[1]);
                return;
            }
        }
        slow.extend([ready[1], gone[0]]);
        slow.sort_unstable();
        // SAFETY: fork in a multi-threaded process: the child calls only async-signal-safe
        // functions (munmap, close_range, close, write, _exit) before it exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: the child unmaps its copies of the guest RAM mappings (nothing in it
            // uses them), closes its copies of every fd but the VM's, says so, waits for the
            // parent to exit, closes the VM's (the last references: KVM tears it down here)
            // and exits. It touches nothing of the parent.
            unsafe {
                for (addr, len) in &ram {
                    libc::munmap(*addr as *mut libc::c_void, *len);
                }
                let mut from = 0i32;
                for &keep in &slow {
                    if keep > from {
                        close_fds(from, keep - 1);
                    }
                    from = keep + 1;
                }
                close_fds(from, i32::MAX);
                libc::write(ready[1], [1u8].as_ptr().cast(), 1);
                let mut b = 0u8;
                while libc::read(gone[0], (&mut b as *mut u8).cast(), 1) < 0 {}
                close_fds(0, i32::MAX);
                libc::_exit(0);
            }
        }
        // SAFETY: our ends of the pipes: `gone[1]` stays open until this process exits.
        unsafe {
            libc::close(ready[1]);
            libc::close(gone[0]);
            if pid > 0 {
                let mut p = libc::pollfd {
                    fd: ready[0],
                    events: libc::POLLIN,
                    revents: 0,
                };
                libc::poll(&mut p, 1, 1000);
            } else {
                log::debug!("fork for the VM's teardown failed; tearing it down here");
                libc::close(gone[1]);
            }
            libc::close(ready[0]);
        }
        // The parent's references go now; the VM itself goes with the child's.
        // Guest RAM stays mapped here until the exit, which frees it fast: an exit first
        // unhooks KVM's MMU notifier from this address space, where a munmap before it
        // makes KVM invalidate the whole range (O(size) under shadow paging: 20 ms at
        // 64 GiB on the host measured, on the path of every process waiting for this exit).
        // The leaked reference is one clone of the region list; nothing maps anew.
        std::mem::forget(self.ram.memory().clone());
    }
}

/// Closes fds `from..=to` (`close_range`, or one by one on kernels without it).
///
/// # Safety
/// Only for fds nothing in the process uses any more (here: a forked child's).
unsafe fn close_fds(from: i32, to: i32) {
    // SAFETY: the caller owns the range.
    unsafe {
        if libc::syscall(libc::SYS_close_range, from as u32, to as u32, 0u32) != 0 {
            for fd in from..=to.min(4095) {
                libc::close(fd);
            }
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // No vCPU thread outlives its VM, at the gate or in the guest.
        self.shutdown();
    }
}

fn vcpu_loop(
    index: usize,
    vcpu: &mut VcpuFd,
    config: &VcpuConfig,
    shared: Arc<Shared>,
    uart: Arc<Mutex<Uart>>,
    events: Events,
) {
    arm_kick(vcpu);
    let mut entered = false;
    let mut warmed = false;
    let mut last_exit_ns = monotonic_ns();
    loop {
        if shared.pause.pause_requested() {
            let captured = complete_and_capture(vcpu, index as u32, &shared.caps, config)
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
        if entered && !warmed {
            // The guest runs: the thread's stack and arena for the next pause's capture
            // (a no-op if the thread prefaulted when it started, before a pause).
            prefault_thread();
            warmed = true;
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
            Ok(VcpuExit::MmioRead(addr, data)) => {
                match shared.device_at(addr) {
                    Some((d, off)) => d.mmio_read(off, data),
                    None => data.fill(0xff),
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some((d, off)) = shared.device_at(addr) {
                    d.mmio_write(off, data);
                }
                None
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// The id of the thread `spares` runs a piece of work on.
    fn run_on(spares: &Spares) -> (std::thread::ThreadId, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let h = spares
            .run(Box::new(move || {
                tx.send(std::thread::current().id()).unwrap();
            }))
            .unwrap();
        let id = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        (id, h)
    }

    #[test]
    fn spare_threads_take_work_and_the_rest_end_when_closed() {
        let spares = Spares::default();
        spares.start(2).unwrap();
        let started: Vec<_> = lock(&spares.0)
            .iter()
            .map(|(_, h)| h.thread().id())
            .collect();
        assert_eq!(started.len(), 2);

        // Work goes to a thread that was already running, and its handle is that thread's.
        let (id, h) = run_on(&spares);
        assert!(started.contains(&id));
        assert_eq!(h.thread().id(), id);
        h.join().unwrap();
        assert_eq!(spares.len(), 1);

        // Closing ends the one left without work (join returns).
        spares.close();
        assert_eq!(spares.len(), 0);

        // With none left, work gets a new thread.
        let (id, h) = run_on(&spares);
        assert!(!started.contains(&id));
        h.join().unwrap();
    }
}

/// A device attached while the vCPUs are being restored raises a due interrupt only once
/// their LAPICs are set: raised before, it would land in a LAPIC that `KVM_SET_LAPIC` then
/// overwrites, and the guest would never see it.
#[cfg(test)]
mod irq_tests {
    use super::*;
    use cpr_memory::RegionSpec;
    use cpr_snapshot::Persist as _;
    use std::io::Write as _;

    const VECTOR: u8 = 0x45;

    /// The saved IOAPIC's pin `gsi`: edge, unmasked, vector 0x45, physical APIC id 0.
    fn route(vm: &mut VmState, gsi: u32) {
        let at = 32 + gsi as usize * 8;
        vm.ioapic.0[at..at + 8].copy_from_slice(&u64::from(VECTOR).to_ne_bytes());
    }

    fn requested(vcpu: &VcpuFd) -> bool {
        let regs: Vec<u8> = vcpu
            .get_lapic()
            .unwrap()
            .regs
            .iter()
            .map(|&b| b as u8)
            .collect();
        let at = 0x200 + usize::from(VECTOR / 32) * 0x10;
        u32::from_le_bytes(regs[at..at + 4].try_into().unwrap()) & (1 << (VECTOR % 32)) != 0
    }

    fn ram() -> GuestRam {
        GuestRam::builder()
            .region(RegionSpec::memfd("irq-test", 0, 1 << 20))
            .build()
            .unwrap()
    }

    fn events() -> Events {
        let (tx, _rx) = std::sync::mpsc::channel();
        Events {
            tx,
            wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        }
    }

    fn null_serial(irq: EventFd) -> Result<SerialDevice> {
        SerialDevice::new(
            &crate::serial::SerialConfig::Null,
            None,
            irq,
            crate::unix::Access::OWNER,
        )
    }

    /// A state to restore: a booted vCPU's, its LAPIC software-enabled, pin `gsi` routed to
    /// it. `None` (the test skips, saying so) without a usable /dev/kvm.
    fn saved(gsi: u32) -> Option<(VmState, VcpuState)> {
        if let Err(e) = Kvm::new() {
            crate::demo::skipped(format!("/dev/kvm is not usable here ({e})"));
            return None;
        }
        let src = Machine::create(ram(), 1, events(), true, null_serial, &mut |_| {}).unwrap();
        let caps = cpr_kvm::HostCaps::probe(&Kvm::new().unwrap()).unwrap();
        let v = lock(&src.vcpus[0]);
        let mut lapic = v.fd.get_lapic().unwrap();
        lapic.regs[0xf0] = 0xff_u8 as std::os::raw::c_char;
        lapic.regs[0xf1] = 0x01;
        v.fd.set_lapic(&lapic).unwrap();
        let (vcpu, _) = cpr_kvm::capture_vcpu(&v.fd, 0, &caps).unwrap();
        let mut vm = capture_vm(&src.vm, true).unwrap();
        route(&mut vm, gsi);
        Some((vm, vcpu))
    }

    /// Waits (KVM injects an irqfd's interrupt from a kernel worker) for the vector to reach
    /// the restored LAPIC.
    fn wait_requested(m: &Machine, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !requested(&lock(&m.vcpus[0]).fd) {
            assert!(
                Instant::now() < deadline,
                "{what}'s due interrupt never reached the restored LAPIC"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_due_device_interrupt_reaches_the_restored_lapic() {
        let Some((vm_state, vcpu)) = saved(BLK_GSI) else {
            return;
        };
        // A disk whose driver had not acknowledged a used buffer when it was saved.
        let mut image = tempfile::tempfile().unwrap();
        image.write_all(&[0u8; 4096]).unwrap();
        let m = ram();
        let blk = Blk::new(image.try_clone().unwrap(), false, m.memory().clone()).unwrap();
        let mut saved = blk.save().unwrap();
        drop(blk);
        saved.interrupt_status = 1;

        let mut new = Machine::create(m, 1, events(), true, null_serial, &mut |_| {}).unwrap();
        new.begin_restore(&vm_state, vec![vcpu], ClockPolicy::Frozen, 0)
            .unwrap();
        let blk = Blk::restore(&saved, image, new.ram.memory().clone()).unwrap();
        new.attach_blk(blk).unwrap();
        new.end_restore().unwrap();
        wait_requested(&new, "the disk");
    }

    #[test]
    fn a_due_uart_interrupt_reaches_the_restored_lapic() {
        let Some((vm_state, vcpu)) = saved(COM1_IRQ) else {
            return;
        };
        // A UART whose transmit-empty interrupt was enabled and pending (IER bit 1; IIR
        // 0x02, the driver had not read it) when it was saved.
        let mut state = null_serial(EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .unwrap()
            .state();
        state.interrupt_enable = 0x02;
        state.interrupt_identification = 0x02;

        let mut new = Machine::create(ram(), 1, events(), true, null_serial, &mut |_| {}).unwrap();
        new.begin_restore(&vm_state, vec![vcpu], ClockPolicy::Frozen, 0)
            .unwrap();
        new.replace_serial(|irq| {
            let args = crate::serial::SerialArgs {
                config: &crate::serial::SerialConfig::Null,
                fds: None,
                irq,
                access: crate::unix::Access::OWNER,
            };
            SerialDevice::restore(args, &state)
        })
        .unwrap();
        new.end_restore().unwrap();
        wait_requested(&new, "the UART");
    }
}
