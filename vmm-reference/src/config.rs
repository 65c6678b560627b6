// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::serial::SerialConfig;

/// Reference VMM for live update (CPR) with the cpr-rs crates.
#[derive(Debug, Parser)]
#[command(name = "vmm-reference", version, about)]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Print the state versions this build reads and writes, as JSON, and exit (what an
    /// older build asks before it restarts into this one).
    #[arg(long = "cpr-state-versions", exclusive = true)]
    pub cpr_state_versions: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a VM.
    Run(Box<RunConfig>),
    /// Run the built-in demo: boot the demo guest, restart the VMM in place, reboot it through
    /// a state file, and check the guest's continuity after each step.
    Demo(DemoConfig),
    /// List the sections of a state file.
    Inspect {
        /// The state file.
        file: PathBuf,
    },
    /// Update a running VMM through its monitor: check, pause, hand over, report.
    Update(UpdateArgs),
    /// A human monitor on a VMM's QMP socket (`info status`, `cprsave`, `cprload`, ...).
    Monitor {
        /// The VMM's QMP monitor socket.
        socket: PathBuf,
    },
}

/// `vmm-reference update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The running VMM's QMP monitor socket.
    #[arg(long)]
    pub monitor: PathBuf,
    /// restart (exec in place), transfer (to a new process this command starts) or reboot
    /// (a state file; the VMM exits).
    #[arg(long, value_parser = ["restart", "transfer", "reboot"])]
    pub mode: String,
    /// The new binary (restart: one the VMM allows, `--allow-update-binary`; transfer: the
    /// one started). Default: the first the VMM allows, which is its own binary unless it
    /// was started with `--allow-update-binary` (restart); this binary (transfer).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// The state file, in the VMM's state directory (reboot).
    #[arg(long, required_if_eq("mode", "reboot"))]
    pub state: Option<String>,
    /// JSON lines instead of text: each event, then the outcome.
    #[arg(long)]
    pub json: bool,
    /// Where the new process of a transfer logs (default: nowhere).
    #[arg(long)]
    pub new_log: Option<PathBuf>,
}

/// Where guest RAM lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryConfig {
    /// A sealed memfd (restart and transfer).
    Memfd,
    /// A file on tmpfs or hugetlbfs, created if absent (restart, transfer, reboot).
    File(PathBuf),
    /// An existing DAX device (every mode, kexec-safe).
    Dax(PathBuf),
    /// Anonymous memory (no update mode).
    Anonymous,
}

impl std::str::FromStr for MemoryConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memfd" => Ok(MemoryConfig::Memfd),
            "anon" | "anonymous" => Ok(MemoryConfig::Anonymous),
            _ => match s.split_once(':') {
                Some(("shm" | "file", p)) if p.starts_with('/') => Ok(MemoryConfig::File(p.into())),
                Some(("dax", p)) if p.starts_with('/') => Ok(MemoryConfig::Dax(p.into())),
                _ => Err(format!(
                    "memory backend `{s}`: use memfd, anon, shm:/ABSOLUTE/PATH or dax:/dev/daxX.Y"
                )),
            },
        }
    }
}

impl std::fmt::Display for MemoryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryConfig::Memfd => write!(f, "memfd"),
            MemoryConfig::Anonymous => write!(f, "anon"),
            MemoryConfig::File(p) => write!(f, "shm:{}", p.display()),
            MemoryConfig::Dax(p) => write!(f, "dax:{}", p.display()),
        }
    }
}

/// Parses `1G`, `512M`, `64K`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size `{s}`: a number with K, M or G"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image.
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, read_only) = match s.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (s, false),
        };
        if path.is_empty() {
            return Err("--disk needs a path (PATH or PATH,ro)".into());
        }
        Ok(DiskConfig {
            path: path.into(),
            read_only,
        })
    }
}

/// `--net`: a virtio-net device's backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// The tap interface of this name (opened, or created if absent, at boot and reboot).
    Tap(String),
    /// A tap fd this process inherited, already attached.
    Fd(i32),
}

/// `--net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Where frames go.
    pub backend: NetBackend,
    /// The MAC address the guest sees; [`DEFAULT_MAC`](crate::virtio_net::DEFAULT_MAC)
    /// when not given.
    pub mac: Option<[u8; 6]>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const USAGE: &str = "--net needs tap=NAME or fd=N, optionally followed by ,mac=MAC";
        let mut backend = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) if backend.is_none() => {
                    crate::virtio_net::check_name(name).map_err(|e| e.to_string())?;
                    backend = Some(NetBackend::Tap(name.to_string()));
                }
                Some(("fd", n)) if backend.is_none() => {
                    let fd: i32 = n
                        .parse()
                        .ok()
                        .filter(|fd| *fd > 2)
                        .ok_or_else(|| format!("--net fd=`{n}`: not an fd number above 2"))?;
                    backend = Some(NetBackend::Fd(fd));
                }
                Some(("mac", m)) if mac.is_none() => mac = Some(crate::virtio_net::parse_mac(m)?),
                _ => return Err(format!("`{part}`: {USAGE}")),
            }
        }
        Ok(NetConfig {
            backend: backend.ok_or(USAGE)?,
            mac,
        })
    }
}

/// Where to load state from at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Load this file now.
    File(PathBuf),
    /// Start paused and wait for `cpr-load` on the monitor.
    Defer,
    /// Listen on this UNIX socket for a VM handed over by `cpr-save` mode transfer.
    Transfer(PathBuf),
}

impl std::str::FromStr for Incoming {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "defer" => Ok(Incoming::Defer),
            "" => Err("--incoming needs a file, `defer` or `transfer:SOCKET`".into()),
            t if t.starts_with("transfer:") => match &t["transfer:".len()..] {
                "" => Err("--incoming transfer: needs a socket path".into()),
                p => Ok(Incoming::Transfer(p.into())),
            },
            p => Ok(Incoming::File(p.into())),
        }
    }
}

/// Huge pages for guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugePages(pub cpr_memory::HugePageSize);

impl std::str::FromStr for HugePages {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "2M" | "2m" => Ok(HugePages(cpr_memory::HugePageSize::Size2M)),
            "1G" | "1g" => Ok(HugePages(cpr_memory::HugePageSize::Size1G)),
            _ => Err(format!("huge page size `{s}`: use 2M or 1G")),
        }
    }
}

/// How guest time moves across an update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestClock {
    /// The guest sees no time pass (kvmclock resumes where it stopped).
    #[default]
    Frozen,
    /// The guest sees the downtime (measured with the real-time clock across a host reboot).
    Advance,
}

/// `run` options.
#[derive(Clone, Debug, Args)]
pub struct RunConfig {
    /// Guest RAM backend: memfd, shm:/dev/shm/NAME (or a hugetlbfs path), dax:/dev/daxX.Y,
    /// or anon.
    #[arg(long, default_value = "memfd")]
    pub memory: MemoryConfig,
    /// Guest RAM size, up to 1024G: RAM below 3 GiB, the rest above 4 GiB (default 1G; on
    /// an incoming update, the saved size, which must match if given).
    #[arg(long, value_parser = parse_size)]
    pub memory_size: Option<u64>,
    /// Huge pages for a memfd backend: 2M or 1G (the host needs free huge pages).
    #[arg(long)]
    pub huge_pages: Option<HugePages>,
    /// Number of vCPUs, 1 to 8 (default 2; on an incoming update, the saved count, which must
    /// match if given).
    #[arg(long)]
    pub vcpus: Option<usize>,
    /// Serial backend: stdout, null, pty (a new pseudo-terminal, its path printed), file:PATH
    /// or unix:PATH.
    #[arg(long, default_value = "stdout")]
    pub serial: SerialConfig,
    /// QMP monitor socket path.
    #[arg(long)]
    pub monitor: Option<PathBuf>,
    /// A raw disk image as a virtio-blk device (virtio-mmio at 0xd0000000): `PATH`, or
    /// `PATH,ro` read-only. Kept open across restart and transfer; after a reboot the same
    /// path must name the same file.
    #[arg(long)]
    pub disk: Option<DiskConfig>,
    /// A virtio-net device (virtio-mmio at 0xd0001000) on a tap: `tap=NAME` (opened, or
    /// created if absent) or `fd=N` (an inherited tap fd), then optionally `,mac=MAC`. The
    /// tap fd is kept across restart and transfer; after a reboot `tap=NAME` must name the
    /// same interface (make it persistent, `ip tuntap add`, so it outlives the process).
    #[arg(long)]
    pub net: Option<NetConfig>,
    /// Restore from a state file written by `cpr-save` mode reboot, `defer` to wait for
    /// `cpr-load`, or `transfer:SOCKET` to receive a running VM from `cpr-save` mode transfer.
    #[arg(long)]
    pub incoming: Option<Incoming>,
    /// Bytes of guest RAM the demo guest rewrites and verifies each generation.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub demo_span: u64,
    /// The demo guest leaves its virtio devices alone (attached, never set up): for
    /// measuring what attached, idle devices add to an update.
    #[arg(long)]
    pub demo_idle_devices: bool,
    /// Boot this Linux kernel (vmlinux via PVH, or bzImage) instead of the demo guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(
        long,
        default_value = "console=ttyS0 noapic noacpi reboot=k panic=1 nokaslr"
    )]
    pub cmdline: String,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// A VFIO device to keep open and DMA-mapped across restarts
    /// (`/sys/bus/pci/devices/DDDD:BB:DD.F`, bound to vfio-pci).
    #[arg(long)]
    pub vfio_device: Option<PathBuf>,
    /// Open the VFIO device through iommufd (VFIO cdev) instead of a legacy container.
    #[arg(long)]
    pub vfio_iommufd: bool,
    /// Tests only: an in-memory model of the VFIO kernel interface instead of /dev/vfio,
    /// `full` or `no-update-vaddr` (a kernel without VFIO_UPDATE_VADDR).
    #[arg(long, hide = true, value_parser = ["full", "no-update-vaddr"])]
    pub vfio_model: Option<String>,
    /// A binary `cpr-save` mode restart may exec (repeatable; the first is what a restart
    /// that names none execs). Default: the binary this VMM was started from. Each must be
    /// owned by root or this user and writable by nobody else, as must its directory.
    #[arg(long = "allow-update-binary")]
    pub allow_update_binary: Vec<PathBuf>,
    /// The directory `cpr-save` mode reboot and `cpr-load` use for state files; without it,
    /// they are refused. Must be owned by root or this user and writable by nobody else.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Also let this group (name or number) use the monitor and serial sockets (mode 0660
    /// instead of 0600).
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Most monitor clients at once; more are refused with a QMP error.
    #[arg(long, default_value_t = crate::monitor::DEFAULT_MAX_CLIENTS)]
    pub max_clients: usize,
    /// Guest clock across an update.
    #[arg(long, value_enum, default_value_t = GuestClock::Frozen)]
    pub guest_clock: GuestClock,
}

impl RunConfig {
    /// Guest RAM size when booting: the command line's, or 1 GiB.
    pub fn boot_memory_size(&self) -> u64 {
        self.memory_size.unwrap_or(1 << 30)
    }

    /// vCPUs when booting: the command line's, or 2.
    pub fn boot_vcpus(&self) -> usize {
        self.vcpus.unwrap_or(2)
    }
}

/// `demo` options.
#[derive(Clone, Debug, Args)]
pub struct DemoConfig {
    /// Number of in-place restarts.
    #[arg(long, default_value_t = 10)]
    pub restarts: usize,
    /// Bytes of guest RAM the demo guest rewrites and verifies each generation.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub span: u64,
    /// Working directory for sockets, serial log and state (default: a new temporary one,
    /// removed at the end).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("").is_err());
        assert!(parse_size("x1").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn memory_backends_parse() {
        assert_eq!(
            "memfd".parse::<MemoryConfig>().unwrap(),
            MemoryConfig::Memfd
        );
        assert_eq!(
            "shm:/dev/shm/vm".parse::<MemoryConfig>().unwrap(),
            MemoryConfig::File("/dev/shm/vm".into())
        );
        assert!("shm:relative".parse::<MemoryConfig>().is_err());
        assert!("tmpfs".parse::<MemoryConfig>().is_err());
        let round = MemoryConfig::Dax("/dev/dax0.0".into());
        assert_eq!(round.to_string().parse::<MemoryConfig>().unwrap(), round);
    }

    #[test]
    fn net_backends_parse() {
        assert_eq!(
            "tap=tap0".parse::<NetConfig>().unwrap(),
            NetConfig {
                backend: NetBackend::Tap("tap0".into()),
                mac: None
            }
        );
        assert_eq!(
            "fd=7,mac=02:00:00:00:00:09".parse::<NetConfig>().unwrap(),
            NetConfig {
                backend: NetBackend::Fd(7),
                mac: Some([2, 0, 0, 0, 0, 9])
            }
        );
        for bad in [
            "",
            "tap0",
            "tap=",
            "tap=a/b",
            "fd=2",
            "fd=x",
            "tap=a,fd=4",
            "tap=a,mac=01:00:00:00:00:00",
            "tap=a,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02",
            "tap=a,queues=2",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cli_parses_a_run_line() {
        let cli = Cli::try_parse_from([
            "vmm-reference",
            "run",
            "--memory",
            "shm:/dev/shm/x",
            "--vcpus",
            "1",
            "--serial",
            "file:/tmp/s",
            "--incoming",
            "defer",
        ])
        .unwrap();
        let Some(Command::Run(r)) = cli.command else {
            panic!()
        };
        assert_eq!(r.incoming, Some(Incoming::Defer));
        assert_eq!(r.vcpus, Some(1));
        assert_eq!(r.memory_size, None);
        assert!(Cli::try_parse_from(["vmm-reference", "run", "--memory", "bogus"]).is_err());
    }
}
