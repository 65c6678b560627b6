// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest RAM as the command line describes it, and the check that a saved layout is exactly
//! that.
//!
//! The memory map is a function of the backend and the size alone: RAM up to 3 GiB sits at
//! guest address 0; beyond that, 3 GiB stay below the 32-bit PCI hole and the rest starts
//! at 4 GiB. Both regions live in one backing (one memfd, or one file), the second at offset
//! 3 GiB, so one `--memory` path (or one fd) covers all of it. A restore takes memory paths
//! only from its own command line (or the fds handed over) and refuses a saved layout that
//! differs from the one that command line gives, before anything is opened read-write.

use cpr_memory::{HugePageSize, MemoryLayout, RegionSpec};

use crate::config::MemoryConfig;

/// End of RAM below the 32-bit PCI hole.
pub const LOW_RAM_END: u64 = 3 << 30;
/// Where RAM continues above the hole.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// Largest guest RAM.
pub const MAX_MEMORY: u64 = 1 << 40;
/// The memfd name guest RAM is handed over under.
pub const MEMFD_NAME: &str = "guest-ram";

/// The regions of `size` bytes of guest RAM on `backend`.
pub fn specs(backend: &MemoryConfig, size: u64, huge: Option<HugePageSize>) -> Vec<RegionSpec> {
    let pieces: Vec<(u64, u64, u64)> = if size <= LOW_RAM_END {
        vec![(0, size, 0)]
    } else {
        vec![
            (0, LOW_RAM_END, 0),
            (HIGH_RAM_START, size - LOW_RAM_END, LOW_RAM_END),
        ]
    };
    pieces
        .into_iter()
        .map(|(addr, len, offset)| {
            let spec = match backend {
                MemoryConfig::Memfd => {
                    let s = RegionSpec::memfd(MEMFD_NAME, addr, len);
                    match huge {
                        Some(h) => s.huge_pages(h),
                        None => s,
                    }
                }
                MemoryConfig::File(p) => RegionSpec::file(p, addr, len),
                MemoryConfig::Dax(p) => RegionSpec::file(p, addr, len).existing(),
                MemoryConfig::Anonymous => RegionSpec::anonymous(addr, len),
            };
            spec.offset(offset)
        })
        .collect()
}

/// Checks a size from the command line or a state.
pub fn check_size(size: u64, huge: Option<HugePageSize>) -> Result<(), String> {
    let align = huge.map_or(2 << 20, HugePageSize::bytes).max(2 << 20);
    if size == 0 || size > MAX_MEMORY || !size.is_multiple_of(align) {
        return Err(format!(
            "memory size {size} must be a multiple of {} MiB up to {} GiB",
            align >> 20,
            MAX_MEMORY >> 30
        ));
    }
    if size > LOW_RAM_END && !LOW_RAM_END.is_multiple_of(align) {
        return Err(format!("memory above 3 GiB with {} MiB pages", align >> 20));
    }
    Ok(())
}

/// Compares a saved layout with the command line's regions: every difference, one per line;
/// empty if they are the same guest memory map on the same backings.
pub fn differences(saved: &MemoryLayout, expected: &[RegionSpec]) -> Vec<String> {
    let mut d = Vec::new();
    if saved.regions.len() != expected.len() {
        d.push(format!(
            "the state has {} memory regions, the command line {}",
            saved.regions.len(),
            expected.len()
        ));
        return d;
    }
    for (i, (r, e)) in saved.regions.iter().zip(expected).enumerate() {
        let mut diff = |what: &str, state: String, cmd: String| {
            if state != cmd {
                d.push(format!(
                    "region {i}: {what} is {state} in the state, {cmd} on the command line"
                ));
            }
        };
        diff(
            "the guest address",
            format!("{:#x}", r.guest_addr),
            format!("{:#x}", e.guest_addr()),
        );
        diff("the size", r.size.to_string(), e.size().to_string());
        diff(
            "the backing",
            format!("`{}`", r.name),
            format!("`{}`", e.backing_name().unwrap_or_default()),
        );
        diff(
            "the offset in the backing",
            format!("{:#x}", r.offset),
            format!("{:#x}", e.backing_offset()),
        );
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_above_3g_continues_at_4g_in_the_same_backing() {
        let s = specs(&MemoryConfig::Memfd, 1 << 30, None);
        assert_eq!(s.len(), 1);
        let s = specs(&MemoryConfig::File("/dev/shm/x".into()), 64 << 30, None);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[1].guest_addr(), s[1].size(), s[1].backing_offset()),
            (4 << 30, 61 << 30, 3 << 30)
        );
        assert_eq!(s[0].backing_name(), s[1].backing_name());
        assert!(check_size(64 << 30, None).is_ok());
        assert!(check_size(0, None).is_err());
        assert!(check_size((1 << 30) + 4096, None).is_err());
        assert!(check_size(4 << 30, Some(HugePageSize::Size1G)).is_ok());
        assert!(check_size(2 << 40, None).is_err());
    }

    #[test]
    fn every_difference_from_the_command_line_is_named() {
        let ram = cpr_memory::GuestRam::builder()
            .region(RegionSpec::memfd(MEMFD_NAME, 0, 4 << 20))
            .build()
            .unwrap();
        let ok = specs(&MemoryConfig::Memfd, 4 << 20, None);
        assert!(differences(ram.layout(), &ok).is_empty());
        let mut l = ram.layout().clone();
        l.regions[0].guest_addr = 4 << 30;
        l.regions[0].size = 1 << 20;
        l.regions[0].name = "/dev/shm/victim".into();
        let d = differences(&l, &ok);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[2].contains("/dev/shm/victim"), "{d:?}");
        l.regions.push(l.regions[0].clone());
        assert!(differences(&l, &ok)[0].contains("2 memory regions"));
    }
}
