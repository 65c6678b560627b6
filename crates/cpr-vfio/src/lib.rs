// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod device;
mod error;
mod iommufd;
mod kernel;
mod legacy;
pub mod model;
mod sys;

pub use device::{
    attach_irqfds, MsixEntry, VectorRoute, VfioDeviceState, FIRST_MSI_GSI, MAX_CONFIG, MAX_VECTORS,
};
pub use error::{Error, Refusal, Result, StateProblem};
pub use iommufd::{IoasMapping, IommufdDevice, IommufdState};
pub use kernel::{IommufdFds, LegacyFds, VfioKernel};
pub use legacy::{Backing, DmaMapping, LegacyDevice, LegacyState};
pub use sys::RealKernel;

/// The versioned types this crate saves (sections and the types inside them), for an
/// application's [`SchemaBuilder::types`](cpr_snapshot::SchemaBuilder::types).
pub fn section_types() -> Vec<cpr_snapshot::TypeEntry> {
    use cpr_snapshot::TypeEntry;
    vec![
        TypeEntry::section::<LegacyState>(),
        TypeEntry::section::<IommufdState>(),
        TypeEntry::section::<VfioDeviceState>(),
        TypeEntry::nested::<DmaMapping>(),
        TypeEntry::nested::<Backing>(),
        TypeEntry::nested::<IoasMapping>(),
        TypeEntry::nested::<MsixEntry>(),
        TypeEntry::nested::<VectorRoute>(),
    ]
}

/// How this crate's types changed, release by release.
pub const HISTORY: &[cpr_snapshot::TypeHistory] = &[cpr_snapshot::TypeHistory {
    name: "vfio-container, vfio-iommufd, vfio-device",
    version: 1,
    crate_version: "0.1.0",
    change: "first version",
}];

/// Which VFIO path a device uses and whether an update can take it along.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateSupport {
    /// `legacy-type1` or `iommufd`.
    pub path: &'static str,
    /// `Ok` if restart (exec) can keep the device, or why not.
    pub restart: std::result::Result<(), String>,
    /// `Ok` if transfer to a new process can keep the device, or why not.
    pub transfer: std::result::Result<(), String>,
}

impl LegacyDevice {
    /// The capability report (`cpr-info`).
    pub fn update_support(&self, k: &dyn VfioKernel) -> UpdateSupport {
        let r = self.check_update(k).map_err(|e| e.to_string());
        UpdateSupport {
            path: "legacy-type1",
            restart: r.clone(),
            transfer: r,
        }
    }
}

impl IommufdDevice {
    /// The capability report (`cpr-info`).
    pub fn update_support(&self) -> UpdateSupport {
        let r = self.check_update().map_err(|e| e.to_string());
        UpdateSupport {
            path: "iommufd",
            restart: r.clone(),
            transfer: r,
        }
    }
}
