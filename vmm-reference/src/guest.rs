// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The built-in demo guest: a few hundred bytes of 64-bit code that exercise what a live
//! update can break, written for an emulated `/dev/kvm` (~0.4 M loop iterations/s).
//!
//! The bootstrap processor loops forever over *generations*: it verifies every word of a
//! span of guest RAM against what the previous generation wrote (so a restore that lost or
//! corrupted memory is caught by the guest itself), rewrites the span for the next
//! generation with a checksum, bumps a counter for every word written, and prints a numbered
//! line on the serial port. Every vCPU runs a periodic LAPIC timer and counts its
//! interrupts; the application processors just halt between them. A status page at
//! [`STATUS_ADDR`] lets the host read all of it back.

use std::arch::global_asm;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

/// Guest physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest physical address of the IDT.
pub const IDT_ADDR: u64 = 0x2000;
/// Guest physical address of the top-level page table.
pub const PML4_ADDR: u64 = 0x3000;
const PDPT_ADDR: u64 = 0x4000;
const PD_ADDR: u64 = 0x6000;
/// Guest physical address of the status page the host reads back.
pub const STATUS_ADDR: u64 = 0x5000;
/// Where the guest code is copied.
pub const CODE_ADDR: u64 = 0x10000;
/// Default start of the span the guest rewrites and checks.
pub const SPAN_ADDR: u64 = 0x10_0000;
const STACK_TOP: u64 = 0x8_0000;
/// "CPRDEMO1".
pub const STATUS_MAGIC: u64 = u64::from_le_bytes(*b"CPRDEMO1");

// Offsets in the status page (u64 each); the assembly below uses the same numbers.
const ST_MAGIC: u64 = 0x00;
const ST_SPAN_ADDR: u64 = 0x08;
const ST_SPAN_WORDS: u64 = 0x10;
const ST_COUNTER: u64 = 0x18;
const ST_GENERATION: u64 = 0x28;
const ST_LINES: u64 = 0x30;
const ST_ERRORS: u64 = 0x38;
const ST_CHECKSUM: u64 = 0x40;
const ST_TSC: u64 = 0x48;
const ST_TIMER_COUNT: u64 = 0x50;
const ST_BAD_WORDS: u64 = 0x70;
const ST_FAULTS: u64 = 0x78;
const ST_MAX_GAP: u64 = 0x80;
const ST_GAP_RESET: u64 = 0x88;
const ST_BLK_DONE: u64 = 0x90;
const ST_BLK_VERIFIED: u64 = 0x98;
const ST_BLK_ERRORS: u64 = 0xA0;
const ST_BLK_PRESENT: u64 = 0xA8;
const ST_NET_PRESENT: u64 = 0xB8;
const ST_NET_SENT: u64 = 0xC0;
const ST_NET_RECEIVED: u64 = 0xC8;
const ST_NET_SUM: u64 = 0xD0;
const ST_NET_REPEATS: u64 = 0xD8;
const ST_NET_BAD: u64 = 0xE0;
const ST_NET_OTHER: u64 = 0xE8;
const ST_DEVICES_IDLE: u64 = 0x58;
const ST_TICKS: u64 = 0x100;

global_asm!(
    ".pushsection .rodata.cpr_demo_guest,\"a\"",
    ".balign 16",
    ".globl cpr_demo_guest_start",
    ".globl cpr_demo_guest_end",
    ".globl cpr_demo_isr_timer",
    ".globl cpr_demo_isr_fault",
    ".globl cpr_demo_isr_spurious",
    ".code64",
    "cpr_demo_guest_start:",
    // rdi = vCPU index; rsp set by the host.
    "mov r15, rdi",
    // Mask the legacy PICs: their reset vector base is 0, so a device line (the virtio
    // devices' GSIs 5 and 6 reach the PIC as well) would arrive as an exception vector.
    "mov al, 0xFF",
    "out 0x21, al",
    "out 0xA1, al",
    "mov r14, 0xFEE00000",
    "mov dword ptr [r14 + 0xF0], 0x1FF", // enable the LAPIC, spurious vector 0xFF
    "mov dword ptr [r14 + 0x3E0], 0x3",  // timer divide by 16
    "mov dword ptr [r14 + 0x320], 0x20020", // periodic, vector 0x20
    "mov eax, dword ptr [0x5050]",
    "mov dword ptr [r14 + 0x380], eax", // initial count
    "sti",
    "test r15, r15",
    "jnz 20f",
    "mov rbx, qword ptr [0x5028]",
    "rdtsc",
    "shl rdx, 32",
    "or rax, rdx",
    "mov r12, rax",
    "mov r13, qword ptr [0x5080]",
    "call 80f",
    "call 100f",
    "10:",
    "test rbx, rbx",
    "jz 11f",
    "call 30f",
    "11:",
    "inc rbx",
    "mov qword ptr [0x5028], rbx",
    "call 40f",
    "call 50f",
    "call 82f",
    "call 102f",
    // Publish the largest gap; start over if the host asked.
    "mov qword ptr [0x5080], r13",
    "cmp qword ptr [0x5088], 0",
    "je 12f",
    "xor r13, r13",
    "mov qword ptr [0x5080], 0",
    "mov qword ptr [0x5088], 0",
    "12:",
    // The serial line is not a loop iteration: the next gap starts after it.
    "rdtsc",
    "shl rdx, 32",
    "or rax, rdx",
    "mov r12, rax",
    "jmp 10b",
    // Application processors: halt between timer interrupts.
    "20:",
    "hlt",
    "jmp 20b",
    // verify: every word must be (i * K) ^ generation, and their sum the stored checksum.
    "30:",
    "mov rsi, qword ptr [0x5008]",
    "mov rcx, qword ptr [0x5010]",
    "xor rdx, rdx",
    "xor r8, r8",
    "xor r10, r10",
    "mov r9, 0x9E3779B97F4A7C15",
    "31:",
    "cmp rdx, rcx",
    "jae 33f",
    // The largest gap between two iterations (TSC): r12 the last, r13 the largest.
    "mov rdi, rdx",
    "rdtsc",
    "shl rdx, 32",
    "or rax, rdx",
    "mov rbp, rax",
    "sub rbp, r12",
    "mov r12, rax",
    "cmp rbp, r13",
    "jbe 36f",
    "mov r13, rbp",
    "36:",
    "mov rdx, rdi",
    "mov rax, qword ptr [rsi + rdx*8]",
    "add r8, rax",
    "mov r11, rdx",
    "imul r11, r9",
    "xor r11, rbx",
    "cmp rax, r11",
    "je 32f",
    "inc r10",
    "32:",
    "inc rdx",
    "jmp 31b",
    "33:",
    "cmp r8, qword ptr [0x5040]",
    "je 34f",
    "inc r10",
    "34:",
    "test r10, r10",
    "jz 35f",
    "inc qword ptr [0x5038]",
    "mov qword ptr [0x5070], r10",
    "35:",
    "ret",
    // fill: write the next generation and its checksum; count every word.
    "40:",
    "mov rsi, qword ptr [0x5008]",
    "mov rcx, qword ptr [0x5010]",
    "xor rdx, rdx",
    "xor r8, r8",
    "mov r9, 0x9E3779B97F4A7C15",
    "41:",
    "cmp rdx, rcx",
    "jae 42f",
    // The largest gap between two iterations (TSC): r12 the last, r13 the largest.
    "mov rdi, rdx",
    "rdtsc",
    "shl rdx, 32",
    "or rax, rdx",
    "mov rbp, rax",
    "sub rbp, r12",
    "mov r12, rax",
    "cmp rbp, r13",
    "jbe 46f",
    "mov r13, rbp",
    "46:",
    "mov rdx, rdi",
    "mov rax, rdx",
    "imul rax, r9",
    "xor rax, rbx",
    "mov qword ptr [rsi + rdx*8], rax",
    "add r8, rax",
    "inc qword ptr [0x5018]",
    "inc rdx",
    "jmp 41b",
    "42:",
    "mov qword ptr [0x5040], r8",
    "ret",
    // print "L <line> G <generation> T <ticks>\n" and record the TSC.
    "50:",
    "inc qword ptr [0x5030]",
    "mov al, 0x4C",
    "call 70f",
    "mov al, 0x20",
    "call 70f",
    "mov rax, qword ptr [0x5030]",
    "call 60f",
    "mov al, 0x20",
    "call 70f",
    "mov al, 0x47",
    "call 70f",
    "mov al, 0x20",
    "call 70f",
    "mov rax, rbx",
    "call 60f",
    "mov al, 0x20",
    "call 70f",
    "mov al, 0x54",
    "call 70f",
    "mov al, 0x20",
    "call 70f",
    "mov rax, qword ptr [0x5100]",
    "call 60f",
    "mov al, 0x0A",
    "call 70f",
    "rdtsc",
    "shl rdx, 32",
    "or rax, rdx",
    "mov qword ptr [0x5048], rax",
    "ret",
    // print rax in decimal.
    "60:",
    "push rbx",
    "sub rsp, 32",
    "lea rsi, [rsp + 31]",
    "mov rbx, 10",
    "xor r8, r8",
    "61:",
    "xor rdx, rdx",
    "div rbx",
    "add dl, 0x30",
    "mov byte ptr [rsi], dl",
    "dec rsi",
    "inc r8",
    "test rax, rax",
    "jnz 61b",
    "62:",
    "inc rsi",
    "mov al, byte ptr [rsi]",
    "call 70f",
    "dec r8",
    "jnz 62b",
    "add rsp, 32",
    "pop rbx",
    "ret",
    // putc al on COM1.
    "70:",
    "push rdx",
    "mov dx, 0x3F8",
    "out dx, al",
    "pop rdx",
    "ret",
    // virtio-blk (MMIO at 0xD0000000): set up once at boot, if the device is there.
    "80:",
    "cmp qword ptr [0x5058], 0",
    "jne 81f",
    "mov rsi, 0xD0000000",
    "cmp dword ptr [rsi], 0x74726976",
    "jne 81f",
    "cmp dword ptr [rsi + 8], 2",
    "jne 81f",
    "mov dword ptr [rsi + 0x70], 0",
    "mov dword ptr [rsi + 0x70], 3",
    "mov dword ptr [rsi + 0x24], 1",
    "mov dword ptr [rsi + 0x20], 1",
    "mov dword ptr [rsi + 0x70], 11",
    "mov dword ptr [rsi + 0x30], 0",
    "mov dword ptr [rsi + 0x38], 16",
    "mov dword ptr [rsi + 0x80], 0xA000",
    "mov dword ptr [rsi + 0x84], 0",
    "mov dword ptr [rsi + 0x90], 0xA400",
    "mov dword ptr [rsi + 0x94], 0",
    "mov dword ptr [rsi + 0xA0], 0xA800",
    "mov dword ptr [rsi + 0xA4], 0",
    "mov dword ptr [rsi + 0x44], 1",
    "mov dword ptr [rsi + 0x70], 15",
    "mov qword ptr [0x50A8], 1",
    "81:",
    "ret",
    // virtio-blk, each generation: write four numbered 4 KiB blocks (all four in flight at
    // once), then read them back into cleared buffers and check every word. Block
    // b = (generation * 4 + k) % 64; word i holds generation << 32 | b << 16 | i.
    "82:",
    "cmp qword ptr [0x50A8], 1",
    "jne 89f",
    "mov r11, 1",
    "83:",
    "xor r10, r10",
    "84:",
    "mov r9, rbx",
    "shl r9, 2",
    "add r9, r10",
    "and r9, 63",
    "mov rdi, r10",
    "shl rdi, 12",
    "add rdi, 0x20000",
    "xor rcx, rcx",
    "85:",
    "xor rax, rax",
    "test r11, r11",
    "jz 86f",
    "mov rax, rbx",
    "shl rax, 32",
    "mov rdx, r9",
    "shl rdx, 16",
    "or rax, rdx",
    "or rax, rcx",
    "86:",
    "mov qword ptr [rdi + rcx*8], rax",
    "inc rcx",
    "cmp rcx, 512",
    "jb 85b",
    "mov rsi, r10",
    "shl rsi, 5",
    "add rsi, 0xB000",
    "mov dword ptr [rsi], r11d",
    "mov dword ptr [rsi + 4], 0",
    "mov rax, r9",
    "shl rax, 3",
    "mov qword ptr [rsi + 8], rax",
    "mov byte ptr [rsi + 16], 0xFF",
    "mov rdx, r10",
    "imul rdx, rdx, 48",
    "add rdx, 0xA000",
    "mov qword ptr [rdx], rsi",
    "mov dword ptr [rdx + 8], 16",
    "mov word ptr [rdx + 12], 1",
    "mov rax, r10",
    "imul rax, rax, 3",
    "inc rax",
    "mov word ptr [rdx + 14], ax",
    "mov qword ptr [rdx + 16], rdi",
    "mov dword ptr [rdx + 24], 4096",
    "mov eax, 3",
    "test r11, r11",
    "jz 87f",
    "mov eax, 1",
    "87:",
    "mov word ptr [rdx + 28], ax",
    "mov rax, r10",
    "imul rax, rax, 3",
    "add rax, 2",
    "mov word ptr [rdx + 30], ax",
    "lea rax, [rsi + 16]",
    "mov qword ptr [rdx + 32], rax",
    "mov dword ptr [rdx + 40], 1",
    "mov word ptr [rdx + 44], 2",
    "mov word ptr [rdx + 46], 0",
    "movzx eax, word ptr [0xA402]",
    "mov ecx, eax",
    "and ecx, 15",
    "mov rdx, r10",
    "imul rdx, rdx, 3",
    "mov word ptr [0xA404 + rcx*2], dx",
    "inc eax",
    "mov word ptr [0xA402], ax",
    "inc r10",
    "cmp r10, 4",
    "jb 84b",
    "mov rsi, 0xD0000000",
    "mov dword ptr [rsi + 0x50], 0",
    "mov rcx, qword ptr [0x50B0]",
    "add rcx, 4",
    "88:",
    "pause",
    "movzx eax, word ptr [0xA802]",
    "cmp ax, cx",
    "jne 88b",
    "mov qword ptr [0x50B0], rcx",
    "add qword ptr [0x5090], 4",
    "xor r10, r10",
    "90:",
    "mov rsi, r10",
    "shl rsi, 5",
    "add rsi, 0xB000",
    "cmp byte ptr [rsi + 16], 0",
    "jne 93f",
    "test r11, r11",
    "jnz 92f",
    "mov r9, rbx",
    "shl r9, 2",
    "add r9, r10",
    "and r9, 63",
    "mov rdi, r10",
    "shl rdi, 12",
    "add rdi, 0x20000",
    "xor rcx, rcx",
    "91:",
    "mov rax, rbx",
    "shl rax, 32",
    "mov rdx, r9",
    "shl rdx, 16",
    "or rax, rdx",
    "or rax, rcx",
    "cmp qword ptr [rdi + rcx*8], rax",
    "jne 93f",
    "inc rcx",
    "cmp rcx, 512",
    "jb 91b",
    "inc qword ptr [0x5098]",
    "92:",
    "inc r10",
    "cmp r10, 4",
    "jb 90b",
    "jmp 94f",
    "93:",
    "inc qword ptr [0x50A0]",
    "jmp 92b",
    "94:",
    "test r11, r11",
    "jz 89f",
    "xor r11, r11",
    "jmp 83b",
    "89:",
    "ret",
    // virtio-net (MMIO at 0xD0001000): set up once at boot, if the device is there.
    // Queue 0 receives into eight 2 KiB buffers at 0x30000 (rings at 0xC000/0xC400/0xC800),
    // queue 1 sends from eight slots at 0x34000 (rings at 0xD000/0xD400/0xD800). Each slot
    // holds a 12-byte virtio header and a 60-byte frame: broadcast, from the device's MAC,
    // EtherType 0x88B5, "CPRNET01", the frame's number, its complement.
    "100:",
    "cmp qword ptr [0x5058], 0",
    "jne 109f",
    "mov rsi, 0xD0001000",
    "cmp dword ptr [rsi], 0x74726976",
    "jne 109f",
    "cmp dword ptr [rsi + 8], 1",
    "jne 109f",
    "mov dword ptr [rsi + 0x70], 0",
    "mov dword ptr [rsi + 0x70], 3",
    "mov dword ptr [rsi + 0x24], 1",
    "mov dword ptr [rsi + 0x20], 1",
    "mov dword ptr [rsi + 0x24], 0",
    "mov dword ptr [rsi + 0x20], 0x20",
    "mov dword ptr [rsi + 0x70], 11",
    "mov dword ptr [rsi + 0x30], 0",
    "mov dword ptr [rsi + 0x38], 8",
    "mov dword ptr [rsi + 0x80], 0xC000",
    "mov dword ptr [rsi + 0x84], 0",
    "mov dword ptr [rsi + 0x90], 0xC400",
    "mov dword ptr [rsi + 0x94], 0",
    "mov dword ptr [rsi + 0xA0], 0xC800",
    "mov dword ptr [rsi + 0xA4], 0",
    "mov dword ptr [rsi + 0x44], 1",
    "mov dword ptr [rsi + 0x30], 1",
    "mov dword ptr [rsi + 0x38], 8",
    "mov dword ptr [rsi + 0x80], 0xD000",
    "mov dword ptr [rsi + 0x84], 0",
    "mov dword ptr [rsi + 0x90], 0xD400",
    "mov dword ptr [rsi + 0x94], 0",
    "mov dword ptr [rsi + 0xA0], 0xD800",
    "mov dword ptr [rsi + 0xA4], 0",
    "mov dword ptr [rsi + 0x44], 1",
    "mov dword ptr [rsi + 0x70], 15",
    "mov r8d, dword ptr [rsi + 0x100]",
    "movzx r9d, word ptr [rsi + 0x104]",
    "mov r10, 0x313054454E525043",
    "xor ecx, ecx",
    "101:",
    // Receive buffer and descriptor i; transmit slot i's fixed part.
    "mov rax, rcx",
    "shl rax, 11",
    "lea rdi, [rax + 0x34000]",
    "add rax, 0x30000",
    "mov rdx, rcx",
    "shl rdx, 4",
    "mov qword ptr [0xC000 + rdx], rax",
    "mov dword ptr [0xC008 + rdx], 0x800",
    "mov dword ptr [0xC00C + rdx], 2",
    "mov word ptr [0xC404 + rcx*2], cx",
    "mov dword ptr [rdi + 12], 0xFFFFFFFF",
    "mov word ptr [rdi + 16], 0xFFFF",
    "mov dword ptr [rdi + 18], r8d",
    "mov word ptr [rdi + 22], r9w",
    "mov word ptr [rdi + 24], 0xB588",
    "mov qword ptr [rdi + 26], r10",
    "inc ecx",
    "cmp ecx, 8",
    "jb 101b",
    "mov word ptr [0xC402], 8",
    "mov dword ptr [rsi + 0x50], 0",
    "mov qword ptr [0x50B8], 1",
    "109:",
    "ret",
    // virtio-net, each generation: send two numbered frames (and wait until the device
    // took them), then take every frame received: count the numbered echoes, their sum,
    // any number not above the last one (a repeat), malformed ones and others; give each
    // buffer back.
    "102:",
    "cmp qword ptr [0x50B8], 1",
    "jne 119f",
    "xor r10, r10",
    "103:",
    "mov rax, qword ptr [0x50C0]",
    "mov rcx, rax",
    "and ecx, 7",
    "mov rdi, rcx",
    "shl rdi, 11",
    "add rdi, 0x34000",
    "mov qword ptr [rdi + 34], rax",
    "not rax",
    "mov qword ptr [rdi + 42], rax",
    "mov rdx, rcx",
    "shl rdx, 4",
    "mov qword ptr [0xD000 + rdx], rdi",
    "mov dword ptr [0xD008 + rdx], 72",
    "mov dword ptr [0xD00C + rdx], 0",
    "movzx edx, word ptr [0xD402]",
    "mov r8d, edx",
    "and r8d, 7",
    "mov word ptr [0xD404 + r8*2], cx",
    "inc edx",
    "mov word ptr [0xD402], dx",
    "inc qword ptr [0x50C0]",
    "inc r10",
    "cmp r10, 2",
    "jb 103b",
    "mov rsi, 0xD0001000",
    "mov dword ptr [rsi + 0x50], 1",
    "mov rcx, qword ptr [0x50C0]",
    "104:",
    "pause",
    "movzx eax, word ptr [0xD802]",
    "cmp ax, cx",
    "jne 104b",
    "xor r11, r11",
    "105:",
    "movzx eax, word ptr [0xC802]",
    "mov rcx, qword ptr [0x50F8]",
    "cmp ax, cx",
    "je 118f",
    "mov edx, ecx",
    "and edx, 7",
    "mov r8d, dword ptr [0xC804 + rdx*8]",
    "mov r9d, dword ptr [0xC808 + rdx*8]",
    "and r8d, 7",
    "mov rdi, r8",
    "shl rdi, 11",
    "add rdi, 0x30000",
    "cmp word ptr [rdi + 24], 0xB588",
    "jne 110f",
    "cmp r9d, 50",
    "jb 111f",
    "mov rax, 0x313054454E525043",
    "cmp qword ptr [rdi + 26], rax",
    "jne 111f",
    "mov rax, qword ptr [rdi + 34]",
    "mov rdx, qword ptr [rdi + 42]",
    "not rdx",
    "cmp rax, rdx",
    "jne 111f",
    "cmp qword ptr [0x50C8], 0",
    "je 106f",
    "cmp rax, qword ptr [0x50F0]",
    "ja 106f",
    "inc qword ptr [0x50D8]",
    "jmp 112f",
    "106:",
    "mov qword ptr [0x50F0], rax",
    "add qword ptr [0x50D0], rax",
    "inc qword ptr [0x50C8]",
    "jmp 112f",
    "110:",
    "inc qword ptr [0x50E8]",
    "jmp 112f",
    "111:",
    "inc qword ptr [0x50E0]",
    "112:",
    "movzx edx, word ptr [0xC402]",
    "mov eax, edx",
    "and eax, 7",
    "mov word ptr [0xC404 + rax*2], r8w",
    "inc edx",
    "mov word ptr [0xC402], dx",
    "inc qword ptr [0x50F8]",
    "mov r11, 1",
    "jmp 105b",
    "118:",
    "test r11, r11",
    "jz 119f",
    "mov rsi, 0xD0001000",
    "mov dword ptr [rsi + 0x50], 0",
    "119:",
    "ret",
    // LAPIC timer: count per vCPU (by LAPIC id), EOI.
    "cpr_demo_isr_timer:",
    "push rax",
    "push rcx",
    "mov rcx, 0xFEE00000",
    "mov eax, dword ptr [rcx + 0x20]",
    "shr eax, 24",
    "inc qword ptr [0x5100 + rax*8]",
    "mov dword ptr [rcx + 0xB0], 0",
    "pop rcx",
    "pop rax",
    "iretq",
    // Any exception: record it and stop this vCPU.
    "cpr_demo_isr_fault:",
    "mov qword ptr [0x5078], 1",
    "cli",
    "hlt",
    "jmp cpr_demo_isr_fault",
    "cpr_demo_isr_spurious:",
    "iretq",
    "cpr_demo_guest_end:",
    ".popsection",
);

extern "C" {
    static cpr_demo_guest_start: u8;
    static cpr_demo_guest_end: u8;
    static cpr_demo_isr_timer: u8;
    static cpr_demo_isr_fault: u8;
    static cpr_demo_isr_spurious: u8;
}

struct Image {
    code: &'static [u8],
    timer: u64,
    fault: u64,
    spurious: u64,
}

fn image() -> Image {
    // SAFETY: every symbol is defined by the global_asm! above, in one read-only section
    // that lives as long as the program, with the entry first and the end last.
    unsafe {
        let start = std::ptr::addr_of!(cpr_demo_guest_start);
        let end = std::ptr::addr_of!(cpr_demo_guest_end);
        let off = |p: *const u8| p.offset_from(start) as u64;
        Image {
            code: std::slice::from_raw_parts(start, end.offset_from(start) as usize),
            timer: off(std::ptr::addr_of!(cpr_demo_isr_timer)),
            fault: off(std::ptr::addr_of!(cpr_demo_isr_fault)),
            spurious: off(std::ptr::addr_of!(cpr_demo_isr_spurious)),
        }
    }
}

/// Demo guest settings.
#[derive(Clone, Copy, Debug)]
pub struct DemoConfig {
    /// Bytes of guest RAM the guest rewrites and verifies each generation.
    pub span_bytes: u64,
    /// LAPIC timer initial count (divide by 16; KVM counts 1 ns per bus cycle, so 62500 is
    /// about 1 kHz).
    pub timer_count: u32,
    /// Leave the virtio devices alone: never set them up.
    pub idle_devices: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            span_bytes: 64 << 10,
            timer_count: 62_500,
            idle_devices: false,
        }
    }
}

fn gdt_entry(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

fn segment(selector: u16, flags: u64) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

const CODE_FLAGS: u64 = 0xa09b;
const DATA_FLAGS: u64 = 0xc093;
const TSS_FLAGS: u64 = 0x808b;

/// Writes the GDT (null, code, data, TSS) and an identity map of the first 4 GiB with 2 MiB
/// pages (uncached above 0xFE000000, where the LAPIC and IOAPIC live).
pub fn write_tables<M: GuestMemory>(mem: &M) -> Result<(), String> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| format!("guest memory at {addr:#x}: {e}"))
    };
    w(GDT_ADDR, 0)?;
    w(GDT_ADDR + 8, gdt_entry(CODE_FLAGS, 0, 0xfffff))?;
    w(GDT_ADDR + 16, gdt_entry(DATA_FLAGS, 0, 0xfffff))?;
    w(GDT_ADDR + 24, gdt_entry(TSS_FLAGS, 0, 0x67))?;
    w(GDT_ADDR + 32, 0)?;
    w(PML4_ADDR, PDPT_ADDR | 3)?;
    for i in 0..4u64 {
        w(PDPT_ADDR + i * 8, (PD_ADDR + i * 0x1000) | 3)?;
        for j in 0..512u64 {
            let addr = (i * 512 + j) << 21;
            let uncached = if addr >= 0xfe00_0000 { 0x18 } else { 0 };
            w(PD_ADDR + i * 0x1000 + j * 8, addr | 0x83 | uncached)?;
        }
    }
    Ok(())
}

/// Writes code, descriptor tables, page tables and the status page into fresh guest memory.
pub fn load<M: GuestMemory + GuestMemoryBackend>(mem: &M, cfg: &DemoConfig) -> Result<(), String> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| format!("guest memory at {addr:#x}: {e}"))
    };
    let img = image();
    mem.write_slice(img.code, GuestAddress(CODE_ADDR))
        .map_err(|e| format!("guest code: {e}"))?;
    write_tables(mem)?;
    // IDT: exceptions fault, 0x20 is the timer, the rest spurious.
    for vector in 0..256u64 {
        let handler = CODE_ADDR
            + match vector {
                0..=31 => img.fault,
                0x20 => img.timer,
                _ => img.spurious,
            };
        let low =
            (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((handler >> 16) & 0xffff) << 48;
        w(IDT_ADDR + vector * 16, low)?;
        w(IDT_ADDR + vector * 16 + 8, handler >> 32)?;
    }
    let span_words = cfg.span_bytes / 8;
    let last = GuestAddress(SPAN_ADDR + cfg.span_bytes.saturating_sub(1));
    if span_words == 0 || !mem.address_in_range(last) {
        return Err(format!(
            "demo span of {} bytes at {SPAN_ADDR:#x} does not fit guest memory",
            cfg.span_bytes
        ));
    }
    for (off, v) in [
        (ST_MAGIC, STATUS_MAGIC),
        (ST_SPAN_ADDR, SPAN_ADDR),
        (ST_SPAN_WORDS, span_words),
        (ST_TIMER_COUNT, u64::from(cfg.timer_count)),
        (ST_DEVICES_IDLE, u64::from(cfg.idle_devices)),
    ] {
        w(STATUS_ADDR + off, v)?;
    }
    Ok(())
}

/// Initial registers of vCPU `index` (entry point, stack, `rdi` = index).
pub fn initial_regs(index: u64) -> kvm_regs {
    kvm_regs {
        rip: CODE_ADDR,
        rsp: STACK_TOP - index * 0x4000,
        rdi: index,
        rflags: 2,
        ..Default::default()
    }
}

/// Special registers for 64-bit mode with the tables written by [`load`].
pub fn initial_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(0x08, CODE_FLAGS);
    let data = segment(0x10, DATA_FLAGS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        ..segment(0x18, TSS_FLAGS)
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 0x20 | 0x600; // PAE, OSFXSR, OSXMMEXCPT
    sregs.cr0 = 0x8005_0033; // PG, WP, NE, ET, MP, PE
    sregs.efer = 0x500; // LME, LMA
    sregs
}

/// What the demo guest reports in its status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DemoStatus {
    /// Words written since boot.
    pub counter: u64,
    /// Generations completed.
    pub generation: u64,
    /// Serial lines printed.
    pub lines: u64,
    /// Verification failures (must stay 0).
    pub errors: u64,
    /// Words found wrong in the last failed verification.
    pub bad_words: u64,
    /// Exceptions taken (must stay 0).
    pub faults: u64,
    /// Checksum of the current generation.
    pub checksum: u64,
    /// Guest TSC at the last line.
    pub tsc: u64,
    /// LAPIC timer interrupts of each vCPU.
    pub ticks: [u64; 8],
    /// The largest gap the boot CPU saw between two iterations of its loops (TSC ticks),
    /// as of its last serial line: a pause as the guest sees it.
    pub max_gap_tsc: u64,
    /// The guest found the virtio-blk device and drives it.
    pub blk_present: bool,
    /// Disk requests the guest saw completed.
    pub blk_done: u64,
    /// 4 KiB blocks it read back correct.
    pub blk_verified: u64,
    /// Requests that failed, or blocks that read back wrong (must stay 0).
    pub blk_errors: u64,
    /// The guest found the virtio-net device and drives it.
    pub net_present: bool,
    /// Numbered frames it sent (numbered from 0).
    pub net_sent: u64,
    /// Numbered echoes it received, each with a number above the last one's.
    pub net_received: u64,
    /// The sum of those numbers.
    pub net_sum: u64,
    /// Echoes whose number was not above the last one's: repeated (must stay 0).
    pub net_repeats: u64,
    /// Frames of the demo's EtherType that were malformed (must stay 0).
    pub net_bad: u64,
    /// Other frames (the host's own traffic on the tap), ignored.
    pub net_other: u64,
}

impl DemoStatus {
    /// Reads the status page, or `None` if it does not hold the demo guest's magic.
    pub fn read<M: GuestMemory>(mem: &M) -> Option<DemoStatus> {
        let r = |off: u64| mem.read_obj::<u64>(GuestAddress(STATUS_ADDR + off)).ok();
        if r(ST_MAGIC)? != STATUS_MAGIC {
            return None;
        }
        let mut ticks = [0u64; 8];
        for (i, t) in ticks.iter_mut().enumerate() {
            *t = r(ST_TICKS + 8 * i as u64)?;
        }
        Some(DemoStatus {
            counter: r(ST_COUNTER)?,
            generation: r(ST_GENERATION)?,
            lines: r(ST_LINES)?,
            errors: r(ST_ERRORS)?,
            bad_words: r(ST_BAD_WORDS)?,
            faults: r(ST_FAULTS)?,
            checksum: r(ST_CHECKSUM)?,
            tsc: r(ST_TSC)?,
            blk_present: r(ST_BLK_PRESENT)? == 1,
            blk_done: r(ST_BLK_DONE)?,
            blk_verified: r(ST_BLK_VERIFIED)?,
            blk_errors: r(ST_BLK_ERRORS)?,
            net_present: r(ST_NET_PRESENT)? == 1,
            net_sent: r(ST_NET_SENT)?,
            net_received: r(ST_NET_RECEIVED)?,
            net_sum: r(ST_NET_SUM)?,
            net_repeats: r(ST_NET_REPEATS)?,
            net_bad: r(ST_NET_BAD)?,
            net_other: r(ST_NET_OTHER)?,
            ticks,
            max_gap_tsc: r(ST_MAX_GAP)?,
        })
    }

    /// Asks the guest to forget the largest gap it saw (it does at its next serial line).
    pub fn reset_gap<M: GuestMemory>(mem: &M) -> Result<(), String> {
        mem.write_obj(1u64, GuestAddress(STATUS_ADDR + ST_GAP_RESET))
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_has_its_handlers_inside() {
        let img = image();
        assert!(img.code.len() > 100);
        for off in [img.timer, img.fault, img.spurious] {
            assert!(off > 0 && off < img.code.len() as u64);
        }
        // The timer handler ends in iretq (48 cf) somewhere after its start.
        let tail = &img.code[img.timer as usize..];
        assert!(tail.windows(2).any(|w| w == [0x48, 0xcf]));
    }

    #[test]
    fn gdt_entries_match_the_usual_encoding() {
        assert_eq!(gdt_entry(CODE_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let cs = segment(0x08, CODE_FLAGS);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.type_, cs.s, cs.g),
            (1, 0, 1, 0xb, 1, 1)
        );
    }

    #[test]
    fn load_refuses_a_span_beyond_memory() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let ok = DemoConfig {
            span_bytes: 64 << 10,
            timer_count: 1,
            idle_devices: false,
        };
        load(&mem, &ok).unwrap();
        assert_eq!(DemoStatus::read(&mem).unwrap().generation, 0);
        let too_big = DemoConfig {
            span_bytes: 2 << 20,
            timer_count: 1,
            idle_devices: false,
        };
        assert!(load(&mem, &too_big).is_err());
    }
}
