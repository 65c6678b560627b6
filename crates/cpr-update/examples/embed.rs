// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VMM of its own (KVM, memory it maps itself with an `AtomicBitmap`, adopted by cpr-memory)
//! that restarts into itself under a running guest with cpr-update (`cargo run -p cpr-update
//! --example embed`; `cargo test` runs it): the guest counts, the new image checks it goes on.

use cpr_kvm::kvm_bindings::{kvm_regs, kvm_userspace_memory_region as Slot};
use cpr_kvm::kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use cpr_kvm::ClockPolicy::Frozen;
use cpr_memory::vm_memory::{bitmap::AtomicBitmap, Bytes, FileOffset, GuestAddress};
use cpr_memory::vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use cpr_memory::{GuestRam, ReattachArgs};
use cpr_snapshot::{Persist, Schema, Section};
use cpr_update::{BoxError, BuildInfo, Ids, Incoming, Loader, Pausable, Saver, Updatable};

/// `inc word [0x2000]; out 0x10, al; jmp -8`, at 0x1000 in real mode.
const CODE: [u8; 8] = [0xff, 0x06, 0x00, 0x20, 0xe6, 0x10, 0xeb, 0xf8];

/// The VMM's own section: the count at the pause, to check the memory came back.
#[derive(Clone, Debug, PartialEq, Section)]
#[section(name = "embed-counter")]
struct AtPause {
    count: u16,
}

struct Embed {
    schema: Schema,
    ram: Option<GuestRam<AtomicBitmap>>,
    vm: Option<(VmFd, VcpuFd)>,
    running: bool,
}

impl Embed {
    fn count(&self) -> u16 {
        self.ram.as_ref().expect("memory").memory().read_obj(GuestAddress(0x2000)).unwrap()
    }
    /// A VM on the memory, as any KVM VMM builds one.
    fn build_vm(&mut self) -> Result<(), BoxError> {
        let vm = Kvm::new()?.create_vm()?;
        for (slot, r) in self.ram.as_ref().ok_or("no memory")?.memory().iter().enumerate() {
            let host = r.get_host_address(Default::default())? as u64;
            let (slot, guest_phys_addr, memory_size) = (slot as u32, r.start_addr().0, r.len());
            let region =
                Slot { slot, guest_phys_addr, memory_size, userspace_addr: host, flags: 0 };
            // SAFETY: the mapping lives in `self.ram` as long as the VM, which is dropped first.
            unsafe { vm.set_user_memory_region(region)? };
        }
        vm.create_irq_chip()?;
        let vcpu = vm.create_vcpu(0)?;
        self.vm = Some((vm, vcpu));
        Ok(())
    }
    /// Runs the guest for `exits` port writes, checking the count moves by one each time.
    fn run(&mut self, exits: u32) -> Result<u16, BoxError> {
        let mut last = self.count();
        for _ in 0..exits {
            match self.vm.as_mut().ok_or("no VM")?.1.run()? {
                VcpuExit::IoOut(0x10, _) => {}
                other => return Err(format!("after {last}: {other:?}").into()),
            }
            if self.count() != last.wrapping_add(1) {
                return Err(format!("count {} after {last}", self.count()).into());
            }
            last += 1;
        }
        Ok(last)
    }
}

impl Pausable for Embed {
    fn is_running(&self) -> bool {
        self.running
    }
    fn pause(&mut self) -> Result<u64, BoxError> {
        self.running = false; // single-threaded: the vCPU is outside KVM_RUN already
        Ok(cpr_update::monotonic_ns())
    }
    fn resume(&mut self) -> Result<(), BoxError> {
        self.running = true;
        Ok(())
    }
}

impl Updatable for Embed {
    fn build_info(&self) -> BuildInfo {
        BuildInfo::new("cpr-embed-example", "1.0.0", &self.schema)
    }
    fn schema(&self) -> &Schema {
        &self.schema
    }
    fn save_memory(&mut self, out: &mut Saver<'_>) -> Result<(), BoxError> {
        let ram = self.ram.as_ref().ok_or("no memory")?;
        out.write(0, &ram.save())?;
        Ok(ram.register_fds(out.fds().ok_or("this example only restarts")?)?)
    }
    fn save(&mut self, out: &mut Saver<'_>) -> Result<(), BoxError> {
        let count = self.count();
        let (vm, vcpu) = self.vm.as_mut().ok_or("no VM")?;
        let caps = cpr_kvm::HostCaps::probe(&Kvm::new()?)?;
        let (cpu, _) = cpr_kvm::complete_and_capture(vcpu, 0, &caps, &Default::default())?;
        let mut chips = cpr_kvm::capture_vm(vm, false)?;
        // vCPUs first, then the VM: an interrupt a device delivers in between can leave a
        // level-triggered IOAPIC pin waiting for an EOI no saved LAPIC will send. This VMM
        // has no devices, but one that has must repair the state before it saves it.
        cpr_kvm::reconcile_ioapic(&mut chips, std::slice::from_ref(&cpu))?;
        out.write(0, &cpu)?;
        out.write(0, &chips)?;
        Ok(out.write(0, &AtPause { count })?)
    }
    fn prepare(&mut self, input: &mut Loader<'_, '_>) -> Result<(), BoxError> {
        let layout = input.take(0)?;
        let args = ReattachArgs { fds: input.fds(), options: Default::default() };
        self.ram = Some(GuestRam::restore(args, &layout)?);
        self.build_vm()
    }
    fn restore(&mut self, input: &mut Loader<'_, '_>) -> Result<(), BoxError> {
        let (vm, vcpu) = self.vm.as_ref().ok_or("no VM")?;
        cpr_kvm::restore_vm(vm, &input.take(0)?, Frozen, 0)?;
        cpr_kvm::restore_vcpu(vcpu, &input.take(0)?, Frozen, 0)?;
        let saved: AtPause = input.take(0)?;
        (saved.count == self.count()).then_some(()).ok_or("memory and state disagree".into())
    }
}

/// A fresh guest: the VMM's own memfd and `GuestMemoryMmap<AtomicBitmap>`, adopted.
fn boot(vmm: &mut Embed) -> Result<(), BoxError> {
    let file = cpr_memory::create_memfd("embed-ram", 1 << 20, None)?;
    let range = (GuestAddress(0), 1 << 20, Some(FileOffset::new(file, 0)));
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges_with_files([range])?;
    mem.write_slice(&CODE, GuestAddress(0x1000))?;
    vmm.ram = Some(GuestRam::adopt(mem, &["embed-ram"])?);
    vmm.build_vm()?;
    let vcpu = &vmm.vm.as_ref().ok_or("no VM")?.1;
    let mut sregs = vcpu.get_sregs()?;
    (sregs.cs.base, sregs.cs.selector) = (0, 0);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() })?;
    vmm.running = true;
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let types =
        [cpr_memory::section_types(), cpr_kvm::section_types(), cpr_update::section_types()];
    let schema = Schema::builder().section::<AtPause>().types_at_current(types.concat()).build()?;
    let mut vmm = Embed { schema, ram: None, vm: None, running: false };
    if cpr_update::answer_probe(&vmm.build_info()) {
        return Ok(()); // a restart asks the binary which state versions it reads
    }
    let Some(fds) = cpr_update::cpr_fd::reclaim()? else {
        boot(&mut vmm)?;
        println!("old image (pid {}): count {}, restarting", std::process::id(), vmm.run(300)?);
        let target =
            cpr_update::Target::Restart { program: std::env::current_exe()?, args: vec![] };
        let failed = cpr_update::update(&mut vmm, &Ids::new_vm()?, target, &Default::default());
        return Err(failed.unwrap_err().into()); // a restart returns only when it failed
    };
    let resumed = cpr_update::resume_after_exec(&mut vmm, fds, &Incoming::default())?;
    let (from, to) = (vmm.count(), vmm.run(300)?);
    println!("new image: count {from} -> {to}, every step seen; {:?}", resumed.report.phases);
    Ok(())
}
