// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! When the guest stopped, in a form that still means something after a host reboot.
//!
//! `CLOCK_MONOTONIC` is the right clock for a blackout measured on one boot (restart,
//! transfer, a reboot mode update without a host reboot), and it restarts from zero when the
//! host reboots (kexec included), where only `CLOCK_REALTIME` relates the two sides. So the
//! stop is recorded with both clocks and the kernel's boot id; the monotonic difference is
//! used only when the boot id is unchanged.

/// The test override of the boot id (only with the `fault-injection` feature).
pub const TEST_BOOT_ID_ENV: &str = "CPR_UPDATE_TEST_BOOT_ID";

fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    unsafe { libc::clock_gettime(id, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// `CLOCK_MONOTONIC`, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_REALTIME`, in nanoseconds since the epoch.
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), which changes at every boot;
/// empty if it cannot be read. Read once per process (a process never outlives its boot),
/// so taking a [`StopTime`] inside the blackout costs no file I/O. Test builds may fake it
/// with [`TEST_BOOT_ID_ENV`].
pub fn boot_id() -> String {
    #[cfg(feature = "fault-injection")]
    if let Some(v) = std::env::var_os(TEST_BOOT_ID_ENV) {
        return v.to_string_lossy().into_owned();
    }
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        })
        .clone()
}

/// When the vCPUs stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopTime {
    /// `CLOCK_MONOTONIC` ns when the last vCPU left the guest.
    pub mono_ns: u64,
    /// The same instant in `CLOCK_REALTIME` ns.
    pub realtime_ns: u64,
    /// The boot it happened in.
    pub boot_id: String,
}

impl StopTime {
    /// The instant `mono_ns` (a `CLOCK_MONOTONIC` time of this boot, in the past).
    pub fn at(mono_ns: u64) -> StopTime {
        let (mono, real) = (monotonic_ns(), realtime_ns());
        StopTime {
            mono_ns,
            realtime_ns: real.saturating_sub(mono.saturating_sub(mono_ns)),
            boot_id: boot_id(),
        }
    }

    /// Whether this instant was on the current boot.
    pub fn same_boot(&self) -> bool {
        !self.boot_id.is_empty() && self.boot_id == boot_id()
    }

    /// Time from this stop to `mono_ns`, a `CLOCK_MONOTONIC` time of the current boot.
    pub fn until(&self, mono_ns: u64) -> Elapsed {
        if self.same_boot() {
            return Elapsed::SameBoot(mono_ns.saturating_sub(self.mono_ns));
        }
        let real = realtime_ns().saturating_sub(monotonic_ns().saturating_sub(mono_ns));
        match real.checked_sub(self.realtime_ns) {
            Some(ns) => Elapsed::OtherBoot(ns),
            None => Elapsed::Unknown,
        }
    }

    /// Time from this stop to now.
    pub fn elapsed(&self) -> Elapsed {
        self.until(monotonic_ns())
    }
}

/// A duration across an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elapsed {
    /// Measured with `CLOCK_MONOTONIC` on one boot: exact.
    SameBoot(u64),
    /// The host rebooted in between: measured with `CLOCK_REALTIME`, as good as the host's
    /// clock (NTP steps included).
    OtherBoot(u64),
    /// The host rebooted and its real-time clock is behind the stop: unknown.
    Unknown,
}

impl Elapsed {
    /// Nanoseconds, if known.
    pub fn ns(self) -> Option<u64> {
        match self {
            Elapsed::SameBoot(ns) | Elapsed::OtherBoot(ns) => Some(ns),
            Elapsed::Unknown => None,
        }
    }

    /// `monotonic`, `realtime` or `unknown`: what the figure is based on.
    pub fn basis(self) -> &'static str {
        match self {
            Elapsed::SameBoot(_) => "monotonic",
            Elapsed::OtherBoot(_) => "realtime",
            Elapsed::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_on_this_boot_is_measured_with_the_monotonic_clock() {
        let t = StopTime::at(monotonic_ns());
        assert!(t.same_boot(), "boot id {:?}", t.boot_id);
        let later = t.mono_ns + 5_000_000;
        assert_eq!(t.until(later), Elapsed::SameBoot(5_000_000));
        assert!(
            t.realtime_ns > 1_600_000_000_000_000_000,
            "a plausible real time"
        );
    }

    #[test]
    fn a_stop_on_another_boot_uses_real_time() {
        // As after a kexec: a monotonic value that means nothing here, another boot id.
        let now_real = realtime_ns();
        let t = StopTime {
            mono_ns: u64::MAX / 2,
            realtime_ns: now_real - 40 * 60 * 1_000_000_000,
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
        };
        assert!(!t.same_boot());
        match t.elapsed() {
            Elapsed::OtherBoot(ns) => {
                let min = ns / 60_000_000_000;
                assert!((40..=41).contains(&min), "{ns}");
            }
            other => panic!("{other:?}"),
        }
        let future = StopTime {
            realtime_ns: now_real + 3_600_000_000_000,
            ..t
        };
        assert_eq!(future.elapsed(), Elapsed::Unknown);
        assert_eq!(Elapsed::Unknown.basis(), "unknown");
    }
}
