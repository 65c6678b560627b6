// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Booting a Linux kernel (ELF vmlinux or bzImage) with linux-loader, through the 64-bit
//! boot protocol: zero page, command line, E820 map, optional initrd.
//!
//! On this project's CI host `/dev/kvm` emulates guest instructions, so a kernel can be shown
//! to start (its first console lines through our COM1), not to finish booting; see the
//! crate README.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, Error as ElfError};
use linux_loader::loader::{load_cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::error::{Error, Result};
use crate::machine::Machine;

const HIMEM_START: u64 = 0x10_0000;
const ZERO_PAGE: u64 = 0xa000;
const CMDLINE_ADDR: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 4096;
const BOOT_STACK: u64 = 0x8ff0;
const E820_RAM: u32 = 1;
const EBDA_START: u64 = 0x9fc00;

fn guest(e: impl std::fmt::Display) -> Error {
    Error::Guest(e.to_string())
}

/// Loads `kernel` (and `initrd`) into the machine's memory and sets up the boot vCPU.
pub fn load(
    machine: &mut Machine,
    kernel: &Path,
    cmdline: &str,
    initrd: Option<&Path>,
) -> Result<()> {
    let mem = machine.ram.memory();
    let open =
        |p: &Path| File::open(p).map_err(|e| Error::Io(format!("open `{}`: {e}", p.display())));
    let mut image = open(kernel)?;
    let loaded: KernelLoaderResult =
        match Elf::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => r,
            Err(linux_loader::loader::Error::Elf(ElfError::InvalidElfMagicNumber)) => {
                BzImage::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START)))
                    .map_err(guest)?
            }
            Err(e) => return Err(guest(format!("loading `{}`: {e}", kernel.display()))),
        };
    let entry = match loaded.setup_header {
        // bzImage: the 64-bit entry is 0x200 past the protected-mode kernel.
        Some(_) => loaded.kernel_load.0 + 0x200,
        None => loaded.kernel_load.0,
    };

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(guest)?;
    cl.insert_str(cmdline).map_err(guest)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(guest)?;

    let mem_end = mem.last_addr().0 + 1;
    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x100_0000;

    if let Some(path) = initrd {
        let data = std::fs::read(path)
            .map_err(|e| Error::Io(format!("read `{}`: {e}", path.display())))?;
        let size = data.len() as u64;
        let top = mem_end.min(0x3800_0000); // below 896 MiB, where every kernel can reach it
        let addr = top
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= loaded.kernel_end)
            .ok_or_else(|| guest(format!("initrd of {size} bytes does not fit guest memory")))?;
        mem.write_slice(&data, GuestAddress(addr)).map_err(guest)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let ranges = [(0u64, EBDA_START), (HIMEM_START, mem_end - HIMEM_START)];
    for (i, (addr, size)) in ranges.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = E820_RAM;
    }
    params.e820_entries = ranges.len() as u8;
    LinuxBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(guest)?;

    crate::guest::write_tables(mem).map_err(Error::Guest)?;
    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        rflags: 2,
        ..Default::default()
    };
    log::info!(
        "loaded `{}`: entry {entry:#x}, end {:#x}",
        kernel.display(),
        loaded.kernel_end
    );
    machine.boot_linux(regs, crate::guest::initial_sregs)
}
