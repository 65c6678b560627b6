// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Plain-data KVM state, saved as cpr-snapshot sections.
//!
//! Kernel structures whose layout is the kernel's ABI (and so stable) are kept as their raw
//! bytes in a [`Blob`], checked for size when decoded; the rest are versioned fields.

use cpr_snapshot::prelude::*;
use cpr_snapshot::Blob;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::error::{Error, Result};

/// The raw bytes of a kernel structure.
pub(crate) fn to_blob<T: IntoBytes + Immutable>(v: &T) -> Blob {
    Blob(v.as_bytes().to_vec())
}

/// A kernel structure from saved bytes, which must have exactly its size.
pub(crate) fn from_blob<T: FromBytes>(b: &Blob, what: &'static str) -> Result<T> {
    T::read_from_bytes(&b.0).map_err(|_| Error::BadBlob {
        what,
        found: b.0.len(),
        expected: std::mem::size_of::<T>(),
    })
}

/// One CPUID leaf as set with `KVM_SET_CPUID2`.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Sub-leaf (ECX input).
    pub index: u32,
    /// `KVM_CPUID_FLAG_*`.
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

impl CpuidEntry {
    /// The entry of a `kvm_cpuid_entry2`.
    pub fn from_kvm(e: &kvm_bindings::kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

/// The legacy FPU state (`kvm_fpu`), field by field (kvm-bindings gives it no byte view).
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct FpuState {
    /// ST0-ST7 / MM0-MM7, 16 bytes each.
    pub fpr: Blob,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15, 16 bytes each.
    pub xmm: Blob,
    /// MXCSR.
    pub mxcsr: u32,
}

impl FpuState {
    pub(crate) fn from_kvm(f: &kvm_bindings::kvm_fpu) -> Self {
        FpuState {
            fpr: Blob(f.fpr.concat()),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: Blob(f.xmm.concat()),
            mxcsr: f.mxcsr,
        }
    }

    /// The legacy FPU state inside an XSAVE image (its first 512 bytes are the FXSAVE
    /// layout that `KVM_GET_FPU` reads too), sparing the `KVM_GET_FPU` ioctl. `None` if the
    /// image is shorter than that. It is the better copy: it has MXCSR, which `KVM_GET_FPU`
    /// leaves 0, and the reset values of components the guest has not used.
    pub(crate) fn from_xsave(x: &[u8]) -> Option<Self> {
        let b = x.get(..512)?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        Some(FpuState {
            fpr: Blob(b[32..160].to_vec()),
            fcw: u16_at(0),
            fsw: u16_at(2),
            ftwx: b[4],
            last_opcode: u16_at(6),
            last_ip: u64_at(8),
            last_dp: u64_at(16),
            xmm: Blob(b[160..416].to_vec()),
            mxcsr: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    pub(crate) fn to_kvm(&self) -> Result<kvm_bindings::kvm_fpu> {
        let mut f = kvm_bindings::kvm_fpu::default();
        let fill = |dst: &mut [[u8; 16]], src: &Blob, what| {
            if src.len() != dst.len() * 16 {
                return Err(Error::BadBlob {
                    what,
                    found: src.len(),
                    expected: dst.len() * 16,
                });
            }
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(16)) {
                d.copy_from_slice(s);
            }
            Ok(())
        };
        fill(&mut f.fpr, &self.fpr, "fpu registers")?;
        fill(&mut f.xmm, &self.xmm, "xmm registers")?;
        f.fcw = self.fcw;
        f.fsw = self.fsw;
        f.ftwx = self.ftwx;
        f.last_opcode = self.last_opcode;
        f.last_ip = self.last_ip;
        f.last_dp = self.last_dp;
        f.mxcsr = self.mxcsr;
        Ok(f)
    }
}

/// Everything KVM holds for one vCPU, as needed to rebuild it in a fresh VM.
/// Saved as section `kvm-vcpu`, instance = vCPU index.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct VcpuState {
    /// vCPU id (APIC id).
    pub id: u32,
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<CpuidEntry>,
    /// `kvm_mp_state`.
    pub mp_state: Blob,
    /// `kvm_regs`.
    pub regs: Blob,
    /// `kvm_sregs`.
    pub sregs: Blob,
    /// Legacy FPU (superseded by XSAVE where present).
    pub fpu: FpuState,
    /// `kvm_xsave` (empty if the host lacks `KVM_CAP_XSAVE`).
    pub xsave: Blob,
    /// `kvm_xcrs` (empty if the host lacks `KVM_CAP_XCRS`).
    pub xcrs: Blob,
    /// `kvm_debugregs`.
    pub debugregs: Blob,
    /// `kvm_lapic_state`.
    pub lapic: Blob,
    /// MSRs (index, value) that the kernel let us read.
    pub msrs: Vec<(u32, u64)>,
    /// `kvm_vcpu_events`: pending exceptions, interrupts, NMI, SMI.
    pub events: Blob,
    /// TSC frequency in kHz, if the kernel reports it.
    pub tsc_khz: Option<u32>,
}

impl Section for VcpuState {
    const NAME: &'static str = "kvm-vcpu";
}

/// VM-wide KVM state: in-kernel irqchip, PIT and kvmclock. Saved as section `kvm-vm`.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct VmState {
    /// `kvm_irqchip` of the master PIC.
    pub pic_master: Blob,
    /// `kvm_irqchip` of the slave PIC.
    pub pic_slave: Blob,
    /// `kvm_irqchip` of the IOAPIC.
    pub ioapic: Blob,
    /// `kvm_pit_state2` (empty if the VM has no in-kernel PIT).
    pub pit2: Blob,
    /// `kvm_clock_data`.
    pub clock: Blob,
}

impl Section for VmState {
    const NAME: &'static str = "kvm-vm";
}

/// Well-formed states of a VM with `vcpus` vCPUs, every kernel structure zeroed (and each
/// irqchip naming its chip): what [`VmState::validate`] and [`VcpuState::validate`] accept.
/// For tests and fuzz seeds; not a state a guest can run from.
#[doc(hidden)]
pub fn blank_states(vcpus: u32) -> (VmState, Vec<VcpuState>) {
    use kvm_bindings::*;
    let chip = |chip_id| {
        to_blob(&kvm_irqchip {
            chip_id,
            ..Default::default()
        })
    };
    let vm = VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
        ioapic: chip(KVM_IRQCHIP_IOAPIC),
        pit2: to_blob(&kvm_pit_state2::default()),
        clock: to_blob(&kvm_clock_data::default()),
    };
    let vcpu = |id| VcpuState {
        id,
        mp_state: to_blob(&kvm_mp_state::default()),
        regs: to_blob(&kvm_regs::default()),
        sregs: to_blob(&kvm_sregs::default()),
        fpu: FpuState::from_kvm(&kvm_fpu::default()),
        lapic: to_blob(&kvm_lapic_state::default()),
        events: to_blob(&kvm_vcpu_events::default()),
        msrs: vec![(0x10, 1)],
        tsc_khz: Some(1_000_000),
        ..Default::default()
    };
    (vm, (0..vcpus).map(vcpu).collect())
}

/// Most MSRs a saved vCPU may carry.
pub const MAX_MSRS: usize = 1024;

/// Checks that a blob is the kernel structure's size, or empty if `optional`.
fn check_blob<T>(b: &Blob, what: &'static str, optional: bool) -> Result<()> {
    let expected = std::mem::size_of::<T>();
    if b.len() == expected || (optional && b.is_empty()) {
        return Ok(());
    }
    Err(Error::BadBlob {
        what,
        found: b.len(),
        expected,
    })
}

impl VcpuState {
    /// Checks everything that can be checked without a vCPU: every kernel structure's size,
    /// the size of the FPU registers, and the CPUID and MSR tables against the kernel's
    /// limits. [`restore_vcpu`](crate::restore_vcpu) checks it again; call it early to refuse
    /// a bad state before building anything.
    pub fn validate(&self) -> Result<()> {
        use kvm_bindings::*;
        check_blob::<kvm_mp_state>(&self.mp_state, "mp_state", false)?;
        check_blob::<kvm_regs>(&self.regs, "regs", false)?;
        check_blob::<kvm_sregs>(&self.sregs, "sregs", false)?;
        check_blob::<kvm_xsave>(&self.xsave, "xsave", true)?;
        check_blob::<kvm_xcrs>(&self.xcrs, "xcrs", true)?;
        check_blob::<kvm_debugregs>(&self.debugregs, "debugregs", true)?;
        check_blob::<kvm_lapic_state>(&self.lapic, "lapic", false)?;
        check_blob::<kvm_vcpu_events>(&self.events, "vcpu events", true)?;
        self.fpu.to_kvm()?;
        if self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(Error::TooMany {
                what: "CPUID",
                found: self.cpuid.len(),
                max: KVM_MAX_CPUID_ENTRIES,
            });
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(Error::TooMany {
                what: "MSR list",
                found: self.msrs.len(),
                max: MAX_MSRS,
            });
        }
        Ok(())
    }
}

impl VmState {
    /// Checks every kernel structure's size and that each irqchip holds the chip its field
    /// names, without a VM; [`restore_vm`](crate::restore_vm) checks it again.
    pub fn validate(&self) -> Result<()> {
        use kvm_bindings::*;
        for (blob, what, id) in [
            (&self.pic_master, "PIC master", KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, "PIC slave", KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, "IOAPIC", KVM_IRQCHIP_IOAPIC),
        ] {
            let chip: kvm_irqchip = from_blob(blob, what)?;
            if chip.chip_id != id {
                return Err(Error::WrongChip {
                    what,
                    found: chip.chip_id,
                    expected: id,
                });
            }
        }
        check_blob::<kvm_pit_state2>(&self.pit2, "pit2", true)?;
        check_blob::<kvm_clock_data>(&self.clock, "clock", false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_size_checked() {
        let regs = kvm_bindings::kvm_regs {
            rax: 7,
            rip: 0x1000,
            ..Default::default()
        };
        let b = to_blob(&regs);
        let back: kvm_bindings::kvm_regs = from_blob(&b, "regs").unwrap();
        assert_eq!(back.rax, 7);
        assert_eq!(back.rip, 0x1000);
        let short = Blob(b.0[..10].to_vec());
        assert!(matches!(
            from_blob::<kvm_bindings::kvm_regs>(&short, "regs"),
            Err(Error::BadBlob { found: 10, .. })
        ));
    }

    #[test]
    fn whole_states_are_validated_without_kvm() {
        let mut v = VcpuState {
            mp_state: to_blob(&kvm_bindings::kvm_mp_state::default()),
            regs: to_blob(&kvm_bindings::kvm_regs::default()),
            sregs: to_blob(&kvm_bindings::kvm_sregs::default()),
            fpu: FpuState::from_kvm(&kvm_bindings::kvm_fpu::default()),
            lapic: to_blob(&kvm_bindings::kvm_lapic_state::default()),
            ..Default::default()
        };
        v.validate().unwrap();
        v.sregs = Blob(vec![0; 3]);
        assert!(matches!(
            v.validate(),
            Err(Error::BadBlob { what: "sregs", .. })
        ));
        v.sregs = to_blob(&kvm_bindings::kvm_sregs::default());
        v.msrs = vec![(0, 0); MAX_MSRS + 1];
        assert!(matches!(v.validate(), Err(Error::TooMany { .. })));
        assert!(VcpuState::default().validate().is_err());
        let chip = |id| {
            to_blob(&kvm_bindings::kvm_irqchip {
                chip_id: id,
                ..Default::default()
            })
        };
        let mut vm = VmState {
            pic_master: chip(0),
            pic_slave: chip(1),
            ioapic: chip(2),
            pit2: Blob::default(),
            clock: to_blob(&kvm_bindings::kvm_clock_data::default()),
        };
        vm.validate().unwrap();
        vm.ioapic = chip(0);
        assert!(matches!(vm.validate(), Err(Error::WrongChip { .. })));
    }

    #[test]
    fn fpu_round_trip_and_checks() {
        let mut f = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.xmm[3][5] = 9;
        f.fpr[7][15] = 1;
        let s = FpuState::from_kvm(&f);
        let back = s.to_kvm().unwrap();
        assert_eq!(back.xmm[3][5], 9);
        assert_eq!(back.fpr[7][15], 1);
        assert_eq!(back.fcw, 0x37f);
        let mut bad = s.clone();
        bad.xmm = Blob(vec![0; 3]);
        assert!(bad.to_kvm().is_err());
    }
}
