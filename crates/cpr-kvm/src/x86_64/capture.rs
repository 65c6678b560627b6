// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Capturing and restoring vCPU and VM state.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE, KVM_SYNC_X86_EVENTS,
    KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SHADOW, KVM_VCPUEVENT_VALID_SIPI_VECTOR, KVM_VCPUEVENT_VALID_SMM,
};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuFd, VmFd};

use crate::error::{kvm, Error, Result};
use crate::state::{from_blob, to_blob, CpuidEntry, FpuState, VcpuState, VmState};
use cpr_snapshot::Blob;

/// `MSR_IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `MSR_IA32_TSC_DEADLINE`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// What the host offers for state capture, probed once per process.
#[derive(Clone, Debug)]
pub struct HostCaps {
    /// MSRs from `KVM_GET_MSR_INDEX_LIST`.
    pub msr_index_list: Vec<u32>,
    /// `KVM_CAP_XSAVE`.
    pub xsave: bool,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// `KVM_CAP_DEBUGREGS`.
    pub debugregs: bool,
    /// `KVM_CAP_VCPU_EVENTS`.
    pub vcpu_events: bool,
    /// `KVM_CAP_SYNC_REGS` with registers, system registers and events: `KVM_RUN` can hand
    /// them back in `kvm_run` (see [`complete_and_capture`]).
    pub sync_regs: bool,
}

impl HostCaps {
    /// Probes `kvm`.
    pub fn probe(kvm: &Kvm) -> Result<Self> {
        let list = kvm
            .get_msr_index_list()
            .map_err(crate::error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(HostCaps {
            msr_index_list: list.as_slice().to_vec(),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debugregs: kvm.check_extension(Cap::Debugregs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            sync_regs: {
                let want = (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS) as i32;
                kvm.check_extension_int(Cap::SyncRegs) & want == want
            },
        })
    }
}

/// How guest time moves across the pause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClockPolicy {
    /// kvmclock and the TSC resume from the values they had when the vCPUs stopped: the
    /// downtime is hidden from the guest, which sees no time pass and never sees time run
    /// backwards (as QEMU does across stop/cont and migration). The default.
    #[default]
    Frozen,
    /// kvmclock is advanced by the host's real time elapsed since capture
    /// (`KVM_CLOCK_REALTIME`) and the TSC by the same amount: the guest sees the downtime.
    Advance,
}

/// What a capture or restore could not carry, for the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// MSRs the kernel refused to read or write.
    pub refused_msrs: Vec<u32>,
    /// Restore ([`restore_vcpu_fast`]): the ioctls left out because the vCPU already held
    /// that part (`KVM_SET_MP_STATE`, `KVM_SET_XCRS`, `KVM_SET_DEBUGREGS`), or because the
    /// part goes with the next `KVM_RUN` (`KVM_SET_REGS`, `KVM_SET_VCPU_EVENTS`).
    pub skipped_ioctls: Vec<&'static str>,
}

/// What a vCPU was configured with outside its saved state: the CPUID the VMM set and the
/// TSC frequency it runs at. Neither changes once the vCPU has run (KVM refuses a different
/// CPUID after the first `KVM_RUN`), so a VMM that records them here lets
/// [`capture_vcpu_with`] and [`restore_vcpu_with`] skip the ioctls that would only read or
/// rewrite them: on a restore into a vCPU [`configure`](Self::configure)d before the pause,
/// `KVM_SET_CPUID2` (one of the dearest vCPU ioctls) leaves the blackout.
///
/// The saved state always wins: a restore whose state holds another CPUID or frequency sets
/// it and updates the record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuConfig {
    /// The CPUID set with `KVM_SET_CPUID2`, if known.
    pub cpuid: Option<Vec<CpuidEntry>>,
    /// The TSC frequency (`KVM_GET_TSC_KHZ`), if known.
    pub tsc_khz: Option<u32>,
    /// What the vCPU holds, before it ever ran, in the parts [`restore_vcpu_fast`] sets only
    /// where the state differs ([`read_initial`](Self::read_initial)). The next restore
    /// consumes it: once a vCPU ran, these parts are the guest's.
    pub initial: Option<InitialState>,
}

/// A vCPU's mp_state, XCRs and debug registers as `KVM_GET_*` read them before it ever ran.
/// A restore whose saved state holds the same values needs no ioctl for them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InitialState {
    /// `KVM_GET_MP_STATE`.
    pub mp_state: Blob,
    /// `KVM_GET_XCRS` (empty without `KVM_CAP_XCRS`).
    pub xcrs: Blob,
    /// `KVM_GET_DEBUGREGS` (empty without `KVM_CAP_DEBUGREGS`).
    pub debugregs: Blob,
}

impl VcpuConfig {
    /// Sets `cpuid` on `vcpu` (which has not run yet) and records it with the vCPU's TSC
    /// frequency.
    pub fn configure(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<VcpuConfig> {
        vcpu.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        Ok(VcpuConfig {
            cpuid: Some(cpuid.as_slice().iter().map(CpuidEntry::from_kvm).collect()),
            tsc_khz: vcpu.get_tsc_khz().ok().filter(|k| *k != 0),
            initial: None,
        })
    }

    /// Records what `vcpu` holds in the parts of [`InitialState`]: three ioctls, worth it
    /// only where they run before the pause (a transfer's new side builds its vCPUs while
    /// the guest still runs in the old process) and the restore then skips up to three.
    /// `vcpu` must not have run, nor had those parts set, since its creation.
    pub fn read_initial(&mut self, vcpu: &VcpuFd, caps: &HostCaps) -> Result<()> {
        self.initial = Some(InitialState {
            mp_state: to_blob(&vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?),
            xcrs: optional(caps.xcrs, "KVM_GET_XCRS", || vcpu.get_xcrs())?,
            debugregs: optional(caps.debugregs, "KVM_GET_DEBUGREGS", || {
                vcpu.get_debug_regs()
            })?,
        });
        Ok(())
    }
}

/// Reads `indices` in one ioctl, dropping any the kernel refuses (reported in `refused`).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32], refused: &mut Vec<u32>) -> Result<Vec<(u32, u64)>> {
    let mut left: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = left
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::TooMany {
            what: "MSRs",
            found: entries.len(),
            max: kvm_bindings::KVM_MAX_MSR_ENTRIES,
        })?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if n >= left.len() {
            return Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect());
        }
        // The kernel stops at the first MSR it refuses.
        refused.push(left.remove(n));
    }
}

/// Writes `msrs`, skipping (and reporting) any the kernel refuses.
fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)], refused: &mut Vec<u32>) -> Result<()> {
    let mut left: Vec<(u32, u64)> = msrs.to_vec();
    while !left.is_empty() {
        let entries: Vec<kvm_msr_entry> = left
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let batch = Msrs::from_entries(&entries).map_err(|_| Error::TooMany {
            what: "MSRs",
            found: entries.len(),
            max: kvm_bindings::KVM_MAX_MSR_ENTRIES,
        })?;
        let n = vcpu.set_msrs(&batch).map_err(kvm("KVM_SET_MSRS"))?;
        if n >= left.len() {
            break;
        }
        refused.push(left[n].0);
        left.drain(..=n);
    }
    Ok(())
}

/// Captures everything KVM holds for `vcpu` (which must not be running: stop it first, and
/// complete any pending I/O with [`crate::complete_pending_io`]).
pub fn capture_vcpu(vcpu: &VcpuFd, id: u32, caps: &HostCaps) -> Result<(VcpuState, Report)> {
    capture_vcpu_with(vcpu, id, caps, &VcpuConfig::default())
}

/// [`capture_vcpu`], taking the CPUID and TSC frequency from `known` where it has them
/// instead of asking KVM.
pub fn capture_vcpu_with(
    vcpu: &VcpuFd,
    id: u32,
    caps: &HostCaps,
    known: &VcpuConfig,
) -> Result<(VcpuState, Report)> {
    capture(vcpu, id, caps, known, None)
}

/// What the host is asked for, in one pause: completes pending I/O as
/// [`complete_pending_io`](crate::complete_pending_io) does, then captures as
/// [`capture_vcpu_with`]. Where the host has `KVM_CAP_SYNC_REGS` the I/O-completing
/// `KVM_RUN` hands back the registers, system registers and events in `kvm_run` (the same
/// kernel functions fill them as their ioctls), sparing three ioctls per vCPU inside the
/// blackout.
pub fn complete_and_capture(
    vcpu: &mut VcpuFd,
    id: u32,
    caps: &HostCaps,
    known: &VcpuConfig,
) -> Result<(VcpuState, Report)> {
    if !caps.sync_regs {
        crate::complete_pending_io(vcpu)?;
        return capture(vcpu, id, caps, known, None);
    }
    vcpu.set_sync_valid_reg(SyncReg::Register);
    vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
    vcpu.set_sync_valid_reg(SyncReg::VcpuEvents);
    let ran = crate::complete_pending_io(vcpu);
    let synced = vcpu.sync_regs();
    // Ordinary exits do not pay for the copy.
    vcpu.clear_sync_valid_reg(SyncReg::Register);
    vcpu.clear_sync_valid_reg(SyncReg::SystemRegister);
    vcpu.clear_sync_valid_reg(SyncReg::VcpuEvents);
    ran?;
    capture(vcpu, id, caps, known, Some(&synced))
}

fn capture(
    vcpu: &VcpuFd,
    id: u32,
    caps: &HostCaps,
    known: &VcpuConfig,
    synced: Option<&kvm_bindings::kvm_sync_regs>,
) -> Result<(VcpuState, Report)> {
    let mut report = Report::default();
    let cpuid = match &known.cpuid {
        Some(c) => c.clone(),
        None => vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .iter()
            .map(CpuidEntry::from_kvm)
            .collect(),
    };
    let xsave = optional(caps.xsave, "KVM_GET_XSAVE", || vcpu.get_xsave())?;
    let xcrs = optional(caps.xcrs, "KVM_GET_XCRS", || vcpu.get_xcrs())?;
    let debugregs = optional(caps.debugregs, "KVM_GET_DEBUGREGS", || {
        vcpu.get_debug_regs()
    })?;
    let events = match synced {
        Some(s) if caps.vcpu_events => to_blob(&s.events),
        _ => optional(caps.vcpu_events, "KVM_GET_VCPU_EVENTS", || {
            vcpu.get_vcpu_events()
        })?,
    };
    // XSAVE holds the legacy FPU image too.
    let fpu = match FpuState::from_xsave(&xsave) {
        Some(f) => f,
        None => FpuState::from_kvm(&vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?),
    };
    let (regs, sregs) = match synced {
        Some(s) => (to_blob(&s.regs), to_blob(&s.sregs)),
        None => (
            to_blob(&vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?),
            to_blob(&vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?),
        ),
    };
    let state = VcpuState {
        id,
        cpuid,
        mp_state: to_blob(&vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?),
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debugregs,
        lapic: to_blob(&vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?),
        msrs: read_msrs(vcpu, &caps.msr_index_list, &mut report.refused_msrs)?,
        events,
        tsc_khz: match known.tsc_khz {
            Some(k) => Some(k),
            None => vcpu.get_tsc_khz().ok().filter(|k| *k != 0),
        },
    };
    Ok((state, report))
}

/// Restores `state` into a freshly created `vcpu` of a VM whose VM-wide state was restored
/// with [`restore_vm`]. `elapsed_ns` is the host time since capture, used only by
/// [`ClockPolicy::Advance`].
///
/// The order matters, and follows what KVM validates against what:
/// 1. TSC frequency, then CPUID: KVM checks MSR writes and XSAVE features against the guest's
///    CPUID, so it must be in place before either.
/// 2. mp_state, regs, sregs: `KVM_SET_SREGS` also writes the APIC base and may reset the
///    LAPIC, and it can queue an interrupt from its bitmap, so it comes before the LAPIC and
///    the events.
/// 3. FPU, then XSAVE (which supersedes the FPU image), then XCRs, then debug registers.
/// 4. LAPIC: after sregs (APIC base) and before MSRs, because `MSR_IA32_TSC_DEADLINE` is only
///    accepted while the LAPIC timer is in TSC-deadline mode.
/// 5. MSRs, including `MSR_IA32_TSC`.
/// 6. vCPU events last: pending exceptions, interrupts, NMI and SMI state, which earlier
///    calls may have disturbed. Nothing pending is lost.
pub fn restore_vcpu(
    vcpu: &VcpuFd,
    state: &VcpuState,
    policy: ClockPolicy,
    elapsed_ns: u64,
) -> Result<Report> {
    restore_vcpu_with(vcpu, state, policy, elapsed_ns, &mut VcpuConfig::default())
}

/// [`restore_vcpu`] into a vCPU configured as `known` says: the CPUID and TSC frequency are
/// set only where the state differs from it, and `known` then records what was set.
pub fn restore_vcpu_with(
    vcpu: &VcpuFd,
    state: &VcpuState,
    policy: ClockPolicy,
    elapsed_ns: u64,
    known: &mut VcpuConfig,
) -> Result<Report> {
    set_tsc_and_cpuid(vcpu, state, known)?;
    restore_parts(vcpu, state, policy, elapsed_ns, None, false)
}

/// [`restore_vcpu_with`] with fewer ioctls inside the blackout, for a vCPU whose next
/// `KVM_RUN` is the one that enters the guest (or that is next read through
/// [`complete_and_capture`]):
///
/// - mp_state, XCRs and debug registers are not set where the state holds what
///   `known.initial` recorded ([`VcpuConfig::read_initial`]); the record is consumed.
/// - Where the host syncs registers in `kvm_run` (`caps.sync_regs`), the vCPU is runnable or
///   halted, and its events pass the checks `KVM_SET_VCPU_EVENTS` makes (checked here, more
///   strictly: flags of the classic four only, no exception vector above 31 or NMI's, no
///   SMM), the general registers and the events go into `kvm_run`'s sync area, marked
///   dirty, instead of `KVM_SET_REGS` and `KVM_SET_VCPU_EVENTS`. The next `KVM_RUN` applies
///   them before anything else, registers then events: the order of the ioctls, last, as
///   step 6 of [`restore_vcpu`] wants (setting the registers clears a pending exception, so
///   they may not follow the events). Anything else is restored by ioctl, as
///   [`restore_vcpu_with`] does.
///
/// Until that `KVM_RUN`, `KVM_GET_REGS` and `KVM_GET_VCPU_EVENTS` read the fresh vCPU's
/// values, not the restored ones: read the vCPU through [`complete_and_capture`], whose
/// immediate-exit `KVM_RUN` applies them first. What the kernel refuses is refused by an
/// ioctl here, before the caller commits to the state, except what a newer kernel might
/// check beyond the checks above; that would fail the first `KVM_RUN`.
///
/// [`Report::skipped_ioctls`] names the ioctls left out.
pub fn restore_vcpu_fast(
    vcpu: &mut VcpuFd,
    state: &VcpuState,
    policy: ClockPolicy,
    elapsed_ns: u64,
    known: &mut VcpuConfig,
    caps: &HostCaps,
) -> Result<Report> {
    set_tsc_and_cpuid(vcpu, state, known)?;
    let initial = known.initial.take();
    let deferred = if caps.sync_regs {
        deferrable(state)?
    } else {
        None
    };
    let mut report = restore_parts(
        vcpu,
        state,
        policy,
        elapsed_ns,
        initial.as_ref(),
        deferred.is_some(),
    )?;
    if let Some((regs, events)) = deferred {
        let sync = vcpu.sync_regs_mut();
        sync.regs = regs;
        sync.events = events;
        vcpu.set_sync_dirty_reg(SyncReg::Register);
        vcpu.set_sync_dirty_reg(SyncReg::VcpuEvents);
        report
            .skipped_ioctls
            .extend(["KVM_SET_REGS", "KVM_SET_VCPU_EVENTS"]);
    }
    Ok(report)
}

/// The registers and events to hand to the next `KVM_RUN`, if that is safe for `state`.
fn deferrable(state: &VcpuState) -> Result<Option<(kvm_regs, kvm_vcpu_events)>> {
    if state.events.is_empty() {
        return Ok(None);
    }
    let mp: kvm_mp_state = from_blob(&state.mp_state, "mp_state")?;
    // An uninitialized vCPU's KVM_RUN returns before it applies the sync area, which would
    // then wait for the SIPI and overwrite what the SIPI set.
    if mp.mp_state != KVM_MP_STATE_RUNNABLE && mp.mp_state != KVM_MP_STATE_HALTED {
        return Ok(None);
    }
    let events: kvm_vcpu_events = from_blob(&state.events, "vcpu events")?;
    if !events_pass_kvm_checks(&events) {
        return Ok(None);
    }
    Ok(Some((from_blob(&state.regs, "regs")?, events)))
}

/// Whether `KVM_SET_VCPU_EVENTS` accepts `e` on any kernel with the classic event flags,
/// checked more strictly than the kernel does (so that what passes here cannot fail there).
fn events_pass_kvm_checks(e: &kvm_vcpu_events) -> bool {
    const CLASSIC: u32 = KVM_VCPUEVENT_VALID_NMI_PENDING
        | KVM_VCPUEVENT_VALID_SIPI_VECTOR
        | KVM_VCPUEVENT_VALID_SHADOW
        | KVM_VCPUEVENT_VALID_SMM;
    let exception = e.exception.injected != 0 || e.exception.pending != 0;
    e.flags & !CLASSIC == 0
        && e.exception.pending == 0
        && !(exception && (e.exception.nr > 31 || u32::from(e.exception.nr) == NMI_VECTOR))
        && e.smi.smm == 0
        && e.smi.pending == 0
        && e.smi.smm_inside_nmi == 0
}

/// The x86 NMI vector, which KVM refuses as an exception.
const NMI_VECTOR: u32 = 2;

fn set_tsc_and_cpuid(vcpu: &VcpuFd, state: &VcpuState, known: &mut VcpuConfig) -> Result<()> {
    if let Some(khz) = state.tsc_khz {
        let current = match known.tsc_khz {
            Some(k) => Some(k),
            None => vcpu.get_tsc_khz().ok(),
        };
        if current != Some(khz) {
            vcpu.set_tsc_khz(khz).map_err(kvm("KVM_SET_TSC_KHZ"))?;
        }
        known.tsc_khz = Some(khz);
    }
    if known.cpuid.as_ref() != Some(&state.cpuid) {
        set_cpuid(vcpu, &state.cpuid)?;
        known.cpuid = Some(state.cpuid.clone());
    }
    Ok(())
}

fn set_cpuid(vcpu: &VcpuFd, cpuid: &[CpuidEntry]) -> Result<()> {
    let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = cpuid
        .iter()
        .map(|e| kvm_bindings::kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    let cpuid = CpuId::from_entries(&entries).map_err(|_| Error::TooMany {
        what: "CPUID entries",
        found: entries.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))
}

/// Everything after the CPUID, in [`restore_vcpu`]'s order. `initial`: what the vCPU holds
/// (those parts are set only where they differ). `deferred`: the registers and events go
/// with the next `KVM_RUN`, so their ioctls are left out.
fn restore_parts(
    vcpu: &VcpuFd,
    state: &VcpuState,
    policy: ClockPolicy,
    elapsed_ns: u64,
    initial: Option<&InitialState>,
    deferred: bool,
) -> Result<Report> {
    let mut report = Report::default();
    let mut held = |part: fn(&InitialState) -> &Blob, saved: &Blob, ioctl: &'static str| {
        let same = initial.is_some_and(|i| part(i) == saved);
        if same {
            report.skipped_ioctls.push(ioctl);
        }
        same
    };
    let skip_mp_state = held(|i| &i.mp_state, &state.mp_state, "KVM_SET_MP_STATE");
    let skip_xcrs = held(|i| &i.xcrs, &state.xcrs, "KVM_SET_XCRS");
    let skip_debugregs = held(|i| &i.debugregs, &state.debugregs, "KVM_SET_DEBUGREGS");
    // Parsed whatever is skipped: a malformed part is refused all the same.
    let mp_state = from_blob::<kvm_mp_state>(&state.mp_state, "mp_state")?;
    if !skip_mp_state {
        vcpu.set_mp_state(mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
    }
    let regs = from_blob::<kvm_regs>(&state.regs, "regs")?;
    if !deferred {
        vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    }
    vcpu.set_sregs(&from_blob::<kvm_sregs>(&state.sregs, "sregs")?)
        .map_err(kvm("KVM_SET_SREGS"))?;
    // XSAVE supersedes the legacy FPU image; only without it is the FPU set on its own.
    if state.xsave.is_empty() {
        vcpu.set_fpu(&state.fpu.to_kvm()?)
            .map_err(kvm("KVM_SET_FPU"))?;
    } else {
        state.fpu.to_kvm()?;
        let xsave: kvm_xsave = from_blob(&state.xsave, "xsave")?;
        // SAFETY: `xsave` is a complete 4 KiB kvm_xsave; KVM_SET_XSAVE reads only that much
        // because we never enabled KVM_CAP_XSAVE2 on this VM.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    }
    if !state.xcrs.is_empty() {
        let xcrs = from_blob::<kvm_xcrs>(&state.xcrs, "xcrs")?;
        if !skip_xcrs {
            vcpu.set_xcrs(&xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        }
    }
    if !state.debugregs.is_empty() {
        let debugregs = from_blob::<kvm_debugregs>(&state.debugregs, "debugregs")?;
        if !skip_debugregs {
            vcpu.set_debug_regs(&debugregs)
                .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        }
    }
    vcpu.set_lapic(&from_blob::<kvm_lapic_state>(&state.lapic, "lapic")?)
        .map_err(kvm("KVM_SET_LAPIC"))?;
    let mut msrs = state.msrs.clone();
    if policy == ClockPolicy::Advance {
        let khz = u128::from(state.tsc_khz.unwrap_or(0));
        let ticks = (u128::from(elapsed_ns) * khz / 1_000_000) as u64;
        for (index, value) in msrs.iter_mut() {
            if *index == MSR_IA32_TSC {
                *value = value.wrapping_add(ticks);
            }
        }
    }
    write_msrs(vcpu, &msrs, &mut report.refused_msrs)?;
    if !state.events.is_empty() {
        let events = from_blob::<kvm_vcpu_events>(&state.events, "vcpu events")?;
        if !deferred {
            vcpu.set_vcpu_events(&events)
                .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        }
    }
    Ok(report)
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<Blob> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(to_blob(&chip))
}

fn set_chip(vm: &VmFd, blob: &Blob, chip_id: u32, what: &'static str) -> Result<()> {
    let chip: kvm_irqchip = from_blob(blob, what)?;
    if chip.chip_id != chip_id {
        return Err(Error::WrongChip {
            what,
            found: chip.chip_id,
            expected: chip_id,
        });
    }
    vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))
}

/// Captures the in-kernel irqchip (PIC master, PIC slave, IOAPIC), the PIT (if `has_pit`),
/// and kvmclock.
///
/// A VMM that captures its vCPUs first (on their threads) and devices may still raise
/// interrupts meanwhile should pass this state and the vCPUs' through
/// [`reconcile_ioapic`](crate::reconcile_ioapic) before saving them.
///
/// The in-kernel PIT keeps counting while the vCPUs are stopped. A tick it delivers through
/// the IOAPIC after a vCPU's LAPIC was captured and before this capture is in neither
/// state (the PIT's moved past it; the LAPIC's was taken before it came), and KVM's count
/// of ticks waiting to be reinjected is not in `KVM_GET_PIT2` at all. A guest that keeps
/// time by counting PIT ticks can lose one; a tick through the PIC is in the PIC's IRR,
/// which this captures.
pub fn capture_vm(vm: &VmFd, has_pit: bool) -> Result<VmState> {
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit2: if has_pit {
            to_blob(&vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?)
        } else {
            Blob::default()
        },
        clock: to_blob(&vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?),
    })
}

/// Restores VM-wide state into a fresh VM that already has its in-kernel irqchip (and PIT,
/// if one was saved). Call it before restoring the vCPUs, and let no device raise an
/// interrupt into the VM until every vCPU is restored: one delivered to a LAPIC before
/// `KVM_SET_LAPIC` is overwritten by it. `elapsed_ns` (host time since
/// capture) is used by [`ClockPolicy::Advance`] when the host did not record real time with
/// the clock.
pub fn restore_vm(vm: &VmFd, state: &VmState, policy: ClockPolicy, elapsed_ns: u64) -> Result<()> {
    set_chip(vm, &state.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master")?;
    set_chip(vm, &state.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave")?;
    set_chip(vm, &state.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC")?;
    if !state.pit2.is_empty() {
        vm.set_pit2(&from_blob::<kvm_pit_state2>(&state.pit2, "pit2")?)
            .map_err(kvm("KVM_SET_PIT2"))?;
    }
    let saved: kvm_clock_data = from_blob(&state.clock, "clock")?;
    let clock = match policy {
        // The guest's clock continues from where it stopped.
        ClockPolicy::Frozen => kvm_clock_data {
            clock: saved.clock,
            ..Default::default()
        },
        // KVM adds the real time elapsed since `saved.realtime` (if the host recorded it).
        ClockPolicy::Advance if saved.flags & KVM_CLOCK_REALTIME != 0 => kvm_clock_data {
            clock: saved.clock,
            flags: KVM_CLOCK_REALTIME,
            realtime: saved.realtime,
            ..Default::default()
        },
        ClockPolicy::Advance => kvm_clock_data {
            clock: saved.clock.saturating_add(elapsed_ns),
            ..Default::default()
        },
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
}

/// State the host may lack: its bytes, or an empty blob where the host lacks it.
fn optional<T: zerocopy::IntoBytes + zerocopy::Immutable>(
    supported: bool,
    op: &'static str,
    get: impl FnOnce() -> std::result::Result<T, kvm_ioctls::Error>,
) -> Result<Blob> {
    Ok(if supported {
        to_blob(&get().map_err(kvm(op))?)
    } else {
        Blob::default()
    })
}
