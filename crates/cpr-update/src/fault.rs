// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fault injection for tests: with the `fault-injection` feature, the environment variable
//! [`FAULT_ENV`] = `POINT:ACTION` makes the process fail (`fail`: the step returns
//! [`Error::Fault`](crate::Error::Fault)) or die (`kill`: SIGKILL) when it reaches `POINT`.
//! The fault fires once: the variable is removed when it does, so an image exec'd
//! afterwards does not repeat it. Without the feature every point is a no-op.
//!
//! Points, by mode and side:
//!
//! | point | where |
//! | --- | --- |
//! | `restart.old.before-exec` | the state is saved, the exec is next |
//! | `restart.new.restore` | the new image restores the state (a failure makes it exec back) |
//! | `transfer.old.before-ready` | `MEMORY` sent, `READY` awaited |
//! | `transfer.new.before-ready` | the VM is built, `READY` is next |
//! | `transfer.new.restore` | the new side restores the state; the claim (or `RESTORED`) is next |
//! | `transfer.old.before-state` | owner word: the guest is paused, `STATE` is next |
//! | `transfer.old.after-state` | owner word: `STATE` sent, `STARTED` awaited (a `fail` here reclaims the word, which the new side may have claimed already) |
//! | `transfer.new.before-claim` | owner word: everything restored, the claim is next |
//! | `transfer.new.claimed` | owner word: claimed, the guest not yet marked as this process's ([`Updatable::commit`](crate::Updatable::commit)) |
//! | `transfer.old.before-commit` | without the word: `RESTORED` received, `COMMIT` is next |
//! | `transfer.new.before-commit` | without the word: `RESTORED` sent, `COMMIT` awaited |
//! | `transfer.old.after-commit` | without the word: `COMMIT` sent |
//! | `transfer.new.commit-received` | without the word: `COMMIT` received, the guest not yet marked as this process's |
//! | `transfer.new.after-commit` | the commit hook ran (the guest is this process's), the vCPUs are not running yet |
//! | `reboot.old.before-rename` | the state file is written under its temporary name |
//! | `reboot.new.restore` | the new process restores the state file |

/// The variable that selects a fault (`POINT:fail` or `POINT:kill`).
pub const FAULT_ENV: &str = "CPR_UPDATE_FAULT";

/// With the `fault-injection` feature, a comma-separated list of features that
/// [`BuildInfo::new`](crate::BuildInfo::new) leaves out, so that a test can run a build as
/// an older one that lacks them (`cpr.owner-word`: the transfer's `RESTORED`/`COMMIT`
/// messages instead of the owner word). Unlike a fault it stays set for later images.
pub const WITHOUT_FEATURES_ENV: &str = "CPR_UPDATE_TEST_WITHOUT_FEATURES";

/// Removes the features [`WITHOUT_FEATURES_ENV`] names.
pub(crate) fn drop_features(features: &mut Vec<String>) {
    if !cfg!(feature = "fault-injection") {
        return;
    }
    if let Some(v) = std::env::var_os(WITHOUT_FEATURES_ENV) {
        let v = v.to_string_lossy();
        features.retain(|f| !v.split(',').any(|w| w == f));
    }
}

/// Reaches `point`: a no-op unless a test asked for a fault there.
#[cfg(feature = "fault-injection")]
pub(crate) fn hit(point: &'static str) -> crate::Result<()> {
    let Some(v) = std::env::var_os(FAULT_ENV) else {
        return Ok(());
    };
    let v = v.to_string_lossy().into_owned();
    let (p, action) = v.split_once(':').unwrap_or((v.as_str(), "fail"));
    if p != point {
        return Ok(());
    }
    // Test builds only: the VMM's other threads do not read the environment.
    std::env::remove_var(FAULT_ENV);
    match action {
        "kill" => {
            // SAFETY: kill with our own pid and SIGKILL has no memory effects.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            Err(crate::Error::Fault(point))
        }
        _ => Err(crate::Error::Fault(point)),
    }
}

/// Reaches `point`: a no-op unless a test asked for a fault there.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn hit(_point: &'static str) -> crate::Result<()> {
    Ok(())
}
