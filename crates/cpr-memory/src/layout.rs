// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The memory layout descriptor saved in a snapshot, and what update modes it allows.

use cpr_snapshot::prelude::*;

use crate::error::{Error, ModeProblem, RegionProblem, Result, Warning};

/// What backs a guest memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, State)]
pub enum BackendKind {
    /// Private anonymous memory: fine for running, lost on exit or exec.
    Anonymous,
    /// A sealed memfd, found again through an inherited or transferred fd.
    Memfd,
    /// A file on tmpfs (`/dev/shm`), found again by path; survives a VMM exit, not a kexec.
    Tmpfs,
    /// A file on hugetlbfs, found again by path; survives a VMM exit, not a kexec.
    Hugetlbfs,
    /// A DAX character device (`/dev/daxX.Y`): persistent memory, survives a kexec.
    Dax,
    /// A regular file on a disk file system: survives everything, slow for guest RAM.
    DiskFile,
}

impl BackendKind {
    /// Whether the region is found again by a path (as opposed to an fd, or not at all).
    pub fn has_path(self) -> bool {
        matches!(
            self,
            BackendKind::Tmpfs | BackendKind::Hugetlbfs | BackendKind::Dax | BackendKind::DiskFile
        )
    }

    /// Short lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Anonymous => "anonymous memory",
            BackendKind::Memfd => "a memfd",
            BackendKind::Tmpfs => "a tmpfs file",
            BackendKind::Hugetlbfs => "a hugetlbfs file",
            BackendKind::Dax => "a DAX device",
            BackendKind::DiskFile => "a disk file",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One region of guest RAM as recorded for reattach.
#[derive(Clone, Debug, PartialEq, Eq, State)]
pub struct RegionLayout {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What backs it.
    pub kind: BackendKind,
    /// For a memfd, the name its fd is handed over under; for a file, its absolute path;
    /// for anonymous memory, a label.
    pub name: String,
    /// Offset of the region in the backing.
    pub offset: u64,
    /// Page size of the backing (4096, 2 MiB, 1 GiB, or a DAX device's alignment).
    pub page_size: u64,
    /// Size of the backing when the layout was recorded (a sealed memfd must still have it).
    pub backing_size: u64,
}

impl RegionLayout {
    /// One past the last guest physical address, if it does not overflow.
    pub fn guest_end(&self) -> Option<u64> {
        self.guest_addr.checked_add(self.size)
    }
}

/// The whole guest RAM layout, saved as the `memory-layout` snapshot section.
///
/// Regions may share a backing (same name, different offsets); reattach checks that they
/// do not overlap in it.
#[derive(Clone, Debug, PartialEq, Eq, State)]
pub struct MemoryLayout {
    /// Regions, sorted by guest address.
    pub regions: Vec<RegionLayout>,
    /// Offset of the [stamp](crate::Stamp) page in the first region's backing, or
    /// [`NO_STAMP`](crate::NO_STAMP). Added in version 2.
    #[state(since = 2, default = "default_stamp")]
    pub stamp_offset: u64,
}

impl Default for MemoryLayout {
    fn default() -> Self {
        MemoryLayout {
            regions: Vec::new(),
            stamp_offset: crate::NO_STAMP,
        }
    }
}

impl MemoryLayout {
    fn default_stamp(_: u16) -> u64 {
        crate::NO_STAMP
    }
}

impl Section for MemoryLayout {
    const NAME: &'static str = "memory-layout";
}

/// A live-update mode (see the project README).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpdateMode {
    /// Save state to a file and exit; a new process (possibly after a host kexec) maps the
    /// same memory by path.
    Reboot,
    /// exec in place with the memory fds inherited.
    Restart,
    /// Hand the memory fds to a new process over a UNIX socket.
    Transfer,
}

impl UpdateMode {
    /// All modes.
    pub const ALL: [UpdateMode; 3] = [
        UpdateMode::Reboot,
        UpdateMode::Restart,
        UpdateMode::Transfer,
    ];
}

impl std::fmt::Display for UpdateMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpdateMode::Reboot => "reboot",
            UpdateMode::Restart => "restart",
            UpdateMode::Transfer => "transfer",
        })
    }
}

impl std::str::FromStr for UpdateMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "reboot" => Ok(UpdateMode::Reboot),
            "restart" => Ok(UpdateMode::Restart),
            "transfer" => Ok(UpdateMode::Transfer),
            other => Err(format!(
                "unknown mode `{other}` (reboot, restart, transfer)"
            )),
        }
    }
}

impl MemoryLayout {
    /// Checks that `mode` can keep this memory: `Ok` with warnings worth telling the operator,
    /// or [`Error::ModeUnsupported`] naming the first region that prevents it. Call it before
    /// stopping anything.
    pub fn check_mode(&self, mode: UpdateMode) -> Result<Vec<Warning>> {
        if self.regions.is_empty() {
            return Err(Error::Empty);
        }
        let mut warnings = Vec::new();
        for (index, r) in self.regions.iter().enumerate() {
            let refuse = |reason: ModeProblem| Error::ModeUnsupported {
                mode,
                index,
                name: r.name.clone(),
                reason,
            };
            match (r.kind, mode) {
                (BackendKind::Anonymous, _) => return Err(refuse(ModeProblem::Anonymous)),
                (BackendKind::Memfd, UpdateMode::Reboot) => {
                    return Err(refuse(ModeProblem::MemfdForReboot))
                }
                (BackendKind::Tmpfs | BackendKind::Hugetlbfs, UpdateMode::Reboot) => {
                    warnings.push(Warning::LostOnKexec {
                        index,
                        name: r.name.clone(),
                        kind: r.kind,
                    });
                }
                _ => {}
            }
        }
        Ok(warnings)
    }

    /// Checks the geometry: non-empty, sizes and addresses aligned to the page size, no
    /// overflow, no overlap in guest physical address space.
    pub fn validate(&self) -> Result<()> {
        if self.regions.is_empty() {
            return Err(Error::Empty);
        }
        for (index, r) in self.regions.iter().enumerate() {
            let invalid = |reason: RegionProblem| Error::InvalidRegion {
                index,
                name: r.name.clone(),
                reason,
            };
            if r.size == 0 {
                return Err(invalid(RegionProblem::ZeroSize));
            }
            if !r.page_size.is_power_of_two() || r.page_size < 4096 {
                return Err(invalid(RegionProblem::BadPageSize(r.page_size)));
            }
            for (what, v) in [
                ("size", r.size),
                ("guest address", r.guest_addr),
                ("offset", r.offset),
            ] {
                if v % r.page_size != 0 {
                    return Err(invalid(RegionProblem::Misaligned {
                        what,
                        value: v,
                        page_size: r.page_size,
                    }));
                }
            }
            if r.guest_end().is_none() || r.offset.checked_add(r.size).is_none() {
                return Err(invalid(RegionProblem::Overflow));
            }
            if usize::try_from(r.size).is_err() {
                return Err(invalid(RegionProblem::TooLarge));
            }
        }
        let mut order: Vec<usize> = (0..self.regions.len()).collect();
        order.sort_by_key(|&i| self.regions[i].guest_addr);
        for w in order.windows(2) {
            let (a, b) = (&self.regions[w[0]], &self.regions[w[1]]);
            // guest_end checked above.
            if a.guest_end().unwrap_or(u64::MAX) > b.guest_addr {
                return Err(Error::Overlap {
                    first: w[0].min(w[1]),
                    second: w[0].max(w[1]),
                    addr: b.guest_addr,
                });
            }
        }
        Ok(())
    }

    /// Total guest RAM in bytes.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(kind: BackendKind, gpa: u64, size: u64) -> RegionLayout {
        RegionLayout {
            guest_addr: gpa,
            size,
            kind,
            name: format!("r{gpa:x}"),
            offset: 0,
            page_size: 4096,
            backing_size: size,
        }
    }

    #[test]
    fn modes_per_backend() {
        use BackendKind::*;
        use UpdateMode::*;
        let layout = |k| MemoryLayout {
            regions: vec![region(k, 0, 1 << 20)],
            ..Default::default()
        };
        for mode in UpdateMode::ALL {
            let e = layout(Anonymous).check_mode(mode).unwrap_err();
            assert!(e.to_string().contains("volatile"), "{e}");
        }
        assert!(layout(Memfd).check_mode(Restart).unwrap().is_empty());
        assert!(layout(Memfd).check_mode(Transfer).unwrap().is_empty());
        let e = layout(Memfd).check_mode(Reboot).unwrap_err();
        assert!(matches!(
            e,
            Error::ModeUnsupported {
                mode: Reboot,
                index: 0,
                ..
            }
        ));
        let w = layout(Tmpfs).check_mode(Reboot).unwrap();
        assert!(matches!(&w[0], Warning::LostOnKexec { index: 0, .. }));
        assert!(w[0].to_string().contains("kexec"));
        assert!(layout(Dax).check_mode(Reboot).unwrap().is_empty());
        assert!(layout(Tmpfs).check_mode(Restart).unwrap().is_empty());
        // One volatile region spoils the whole layout, and is named.
        let mixed = MemoryLayout {
            regions: vec![region(Memfd, 0, 4096), region(Anonymous, 4096, 4096)],
            ..Default::default()
        };
        assert!(matches!(
            mixed.check_mode(Restart),
            Err(Error::ModeUnsupported { index: 1, .. })
        ));
        assert!(matches!(
            MemoryLayout::default().check_mode(Restart),
            Err(Error::Empty)
        ));
    }

    #[test]
    fn geometry_is_checked() {
        let ok = MemoryLayout {
            regions: vec![
                region(BackendKind::Memfd, 1 << 20, 1 << 20),
                region(BackendKind::Memfd, 0, 1 << 20),
            ],
            ..Default::default()
        };
        ok.validate().unwrap();
        let overlap = MemoryLayout {
            regions: vec![
                region(BackendKind::Memfd, 0, 2 << 20),
                region(BackendKind::Memfd, 1 << 20, 1 << 20),
            ],
            ..Default::default()
        };
        assert!(matches!(
            overlap.validate(),
            Err(Error::Overlap {
                first: 0,
                second: 1,
                addr: 0x100000
            })
        ));
        let mut bad = region(BackendKind::Memfd, 0, 4095);
        assert!(MemoryLayout {
            regions: vec![bad.clone()],
            ..Default::default()
        }
        .validate()
        .is_err());
        bad.size = 0;
        assert!(MemoryLayout {
            regions: vec![bad.clone()],
            ..Default::default()
        }
        .validate()
        .is_err());
        let mut wrap = region(BackendKind::Memfd, u64::MAX - 4095, 8192);
        assert!(MemoryLayout {
            regions: vec![wrap.clone()],
            ..Default::default()
        }
        .validate()
        .is_err());
        wrap.guest_addr = 0;
        wrap.page_size = 3000;
        assert!(MemoryLayout {
            regions: vec![wrap],
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(matches!(
            MemoryLayout::default().validate(),
            Err(Error::Empty)
        ));
    }

    #[test]
    fn mode_names_parse() {
        for m in UpdateMode::ALL {
            assert_eq!(m.to_string().parse::<UpdateMode>().unwrap(), m);
        }
        assert!("live".parse::<UpdateMode>().is_err());
    }
}
