// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The control loop: starts or restores the VM, serves the monitor, runs its commands. The
//! live update itself is cpr-update's; this VMM's part of it is in [`crate::update`].

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

use cpr_memory::{GuestRam, MemoryOptions};
use cpr_snapshot::Schema;
use cpr_update::{monotonic_ns, Ids};
use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{Incoming, MemoryConfig, RunConfig};
use crate::error::{Error, Result};
use crate::guest::{DemoConfig, DemoStatus};
use crate::machine::{Events, Machine, VcpuEvent};
use crate::monitor::{check_arguments, Monitor, MonitorSection, QmpError, Request};
use crate::passthrough::Passthrough;
use crate::policy::Policy;
use crate::serial::SerialDevice;
use crate::update::ReplySection;

/// How long vCPUs get to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an update waits for the console's reader thread to park: longer than a write
/// can be stuck on a client that does not read.
pub const HOLD_TIMEOUT: Duration =
    crate::serial::WRITE_TIMEOUT.saturating_add(Duration::from_secs(5));

/// The monitor's token for the vCPU event fd.
const TOKEN_EVENTS: u64 = 1;

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// Whether SIGTERM, SIGINT or SIGHUP arrived.
pub fn terminating() -> bool {
    TERMINATE.load(Ordering::SeqCst)
}

/// How the VMM process should end.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `quit`, or a signal.
    Quit,
    /// The state was saved for a reboot; the guest continues in a new process.
    SavedForReboot,
    /// The VM was handed to another process, which runs it now.
    Transferred,
}

/// Where the guest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
    /// Waiting for `cpr-load`.
    Incoming,
    /// The guest went to another process (or into a state file) by `migrate`; waiting for
    /// `quit`, as QEMU's source does.
    Postmigrate,
}

/// What the new side of an update learned in `restore`, acted on once the guest is ours.
#[derive(Debug, Default)]
pub struct Arrived {
    /// The client waiting for the `cpr-save` answer.
    pub reply: Option<ReplySection>,
    /// Monitor input and output carried over.
    pub monitor: Option<MonitorSection>,
    /// The previous image's VM fd, closed once the guest runs.
    pub retired_vm: Option<OwnedFd>,
    /// The old image's serial backend, as on its command line.
    pub serial: String,
    /// Whether the monitor came with the update (and goes if it fails).
    pub monitor_from_fds: bool,
    /// Whether the guest comes by a transfer (a new process, so a new main PID).
    pub by_transfer: bool,
}

/// The VMM.
#[derive(Debug)]
pub struct Vmm {
    pub(crate) config: RunConfig,
    pub(crate) policy: Policy,
    pub(crate) schema: Schema,
    pub(crate) machine: Option<Machine>,
    pub(crate) monitor: Option<Monitor>,
    pub(crate) events: Events,
    events_rx: Receiver<VcpuEvent>,
    pub(crate) state: RunState,
    pub(crate) paused_at_ns: u64,
    pub(crate) guest: String,
    pub(crate) remove_on_quit: Vec<PathBuf>,
    pub(crate) last_update: Option<Value>,
    pub(crate) passthrough: Option<Passthrough>,
    /// The guest's identities (VM id, last update).
    pub(crate) ids: Ids,
    /// Old side: the client waiting for the `cpr-save` answer.
    pub(crate) waiting: Option<ReplySection>,
    /// The mode of the update under way, if any.
    pub(crate) updating: Option<cpr_update::Mode>,
    /// Old side: the identities of the state being saved.
    pub(crate) saving: Option<Ids>,
    /// New side: what the update brought.
    pub(crate) arrived: Arrived,
    /// Updates this VMM took part in (`next` builds carry it across).
    pub(crate) update_count: u64,
    /// QEMU's migration parameters and status.
    pub(crate) migration: crate::qemu::Migration,
}

fn q(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

impl Vmm {
    fn new(config: RunConfig, policy: Policy) -> Result<Vmm> {
        let (tx, events_rx) = channel();
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io(format!("eventfd: {e}")))?;
        Ok(Vmm {
            config,
            policy,
            schema: crate::update::schema(),
            machine: None,
            monitor: None,
            events: Events {
                tx,
                wake: Arc::new(wake),
            },
            events_rx,
            state: RunState::Paused,
            paused_at_ns: 0,
            guest: "demo".into(),
            remove_on_quit: Vec::new(),
            last_update: None,
            passthrough: None,
            ids: Ids::new_vm().map_err(Error::Update)?,
            waiting: None,
            updating: None,
            saving: None,
            arrived: Arrived::default(),
            update_count: 0,
            migration: Default::default(),
        })
    }

    /// Starts the VMM: resumes a VM handed over by exec if there is one, restores one from
    /// `--incoming`, or boots a new one.
    pub fn start(config: RunConfig) -> Result<Vmm> {
        let started_ns = monotonic_ns();
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
                .map_err(|e| Error::Io(format!("signal handler: {e}")))?;
        }
        // Before any thread starts: reclaim edits the environment.
        let handed_over = cpr_fd::reclaim()?;
        let policy = Policy::from_config(&config)?;
        let mut vmm = Vmm::new(config, policy)?;
        let opts = cpr_update::Incoming {
            started_ns,
            ..Default::default()
        };
        match (handed_over, vmm.config.incoming.clone()) {
            (Some(fds), _) => {
                let r = cpr_update::resume_after_exec(&mut vmm, fds, &opts)?;
                vmm.after_update(r)?;
            }
            (None, Some(Incoming::File(path))) => {
                vmm.bind_monitor()?;
                let bytes = crate::update::read_state_file(&path, &vmm.schema)?;
                let r = cpr_update::restore_saved(&mut vmm, &bytes, &opts)?;
                vmm.after_update(r)?;
            }
            (None, Some(Incoming::Transfer(path))) => {
                let stream = accept_transfer(&path, &vmm.policy)?;
                let r = cpr_update::receive_transfer(&mut vmm, stream, &opts)?;
                vmm.after_update(r)?;
            }
            (None, Some(Incoming::Defer)) => {
                vmm.bind_monitor()?;
                vmm.state = RunState::Incoming;
                log::info!("waiting for cpr-load on the monitor");
            }
            (None, None) => {
                // Monitor last: once it answers, the VM and its devices exist.
                vmm.boot()?;
                vmm.bind_monitor()?;
            }
        }
        // A transfer's new process said it (with MAINPID=) when it took the guest.
        if !vmm.arrived.by_transfer {
            crate::notify::send("READY=1");
        }
        Ok(vmm)
    }

    pub(crate) fn bind_monitor(&mut self) -> Result<()> {
        if let Some(p) = &self.config.monitor {
            self.monitor = Some(Monitor::bind(
                p,
                self.policy.access,
                self.config.max_clients,
            )?);
        }
        Ok(())
    }

    fn boot(&mut self) -> Result<()> {
        let cfg = &self.config;
        let size = cfg.boot_memory_size();
        let huge = cfg.huge_pages.map(|h| h.0);
        crate::memory::check_size(size, huge).map_err(Error::Config)?;
        let mut b = GuestRam::builder().options(MemoryOptions::default());
        for spec in crate::memory::specs(&cfg.memory, size, huge) {
            b = b.region(spec);
        }
        if cfg.memory != MemoryConfig::Anonymous {
            b = b.with_stamp();
        }
        let ram = b.build()?;
        if let MemoryConfig::File(p) = &cfg.memory {
            self.remove_on_quit.push(p.clone());
        }
        if ram.layout().has_stamp() {
            ram.write_stamp(&cpr_memory::Stamp::live(self.ids.vm, 0))?;
        }
        let serial_cfg = cfg.serial.clone();
        let access = self.policy.access;
        let mut machine = Machine::create(
            ram,
            cfg.boot_vcpus(),
            self.events.clone(),
            true,
            |irq| SerialDevice::new(&serial_cfg, None, irq, access),
            &mut |_| {},
        )?;
        if let Some(kernel) = &cfg.kernel {
            // The guest finds the virtio-mmio devices through the command line.
            let devices = crate::machine::virtio_cmdline(cfg.disk.is_some(), cfg.net.is_some());
            let cmdline = if devices.is_empty() {
                cfg.cmdline.clone()
            } else {
                format!("{} {devices}", cfg.cmdline)
            };
            crate::linux::load(&mut machine, kernel, &cmdline, cfg.initrd.as_deref())?;
            self.guest = "linux".into();
        } else {
            let demo = DemoConfig {
                span_bytes: cfg.demo_span,
                idle_devices: cfg.demo_idle_devices,
                ..Default::default()
            };
            crate::guest::load(machine.ram.memory(), &demo).map_err(Error::Guest)?;
            machine.boot_demo()?;
        }
        if let Some(dev) = &cfg.vfio_device {
            self.passthrough = Some(Passthrough::open(
                dev,
                cfg.vfio_iommufd,
                cfg.vfio_model.as_deref(),
                &machine.ram,
            )?);
        }
        if let Some(disk) = &cfg.disk {
            let image = crate::virtio_blk::open_image(&disk.path, disk.read_only)
                .map_err(|e| Error::Config(e.to_string()))?;
            let blk =
                crate::virtio_blk::Blk::new(image, disk.read_only, machine.ram.memory().clone())
                    .map_err(|e| Error::Config(e.to_string()))?
                    .with_delay(crate::virtio_blk::test_delay());
            machine.attach_blk(blk)?;
        }
        if let Some(net) = &cfg.net {
            let tap = open_net_backend(net).map_err(|e| Error::Config(e.to_string()))?;
            let mac = net.mac.unwrap_or(crate::virtio_net::DEFAULT_MAC);
            let dev = crate::virtio_net::Net::new(tap, mac, machine.ram.memory().clone())
                .map_err(|e| Error::Config(e.to_string()))?
                .with_delay(crate::virtio_net::test_delay());
            log::info!("virtio-net on tap {}", dev.tap_name());
            machine.attach_net(dev)?;
        }
        machine.start()?;
        machine.serial.start_input();
        log::info!(
            "booted {} guest: {} MiB {}, {} vCPUs",
            self.guest,
            size >> 20,
            cfg.memory,
            machine.vcpu_count()
        );
        self.machine = Some(machine);
        self.state = RunState::Running;
        Ok(())
    }

    /// Runs the control loop until `quit`, a signal, or a finished update.
    pub fn run(mut self) -> Result<Outcome> {
        let wake = self.events.wake.clone();
        if let Some(m) = &mut self.monitor {
            m.watch(wake.as_raw_fd(), TOKEN_EVENTS)?;
        }
        loop {
            if terminating() {
                log::info!("terminating on signal");
                self.shutdown();
                return Ok(Outcome::Quit);
            }
            let request = match &mut self.monitor {
                Some(m) => m.poll(Duration::from_millis(100))?.request,
                None => {
                    wait_readable(wake.as_raw_fd(), Duration::from_millis(100));
                    None
                }
            };
            let _ = wake.read();
            if let Ok(VcpuEvent::Fatal { index, reason }) = self.events_rx.try_recv() {
                self.event(
                    "SHUTDOWN",
                    Some(json!({"guest": true, "reason": reason, "vcpu": index})),
                );
                if let Some(m) = &mut self.monitor {
                    m.flush_for(Duration::from_secs(1));
                }
                self.shutdown();
                return Err(Error::Guest(format!("vCPU {index}: {reason}")));
            }
            if let Some(req) = request {
                if let Some(outcome) = self.command(req) {
                    if let Some(m) = self.machine.take() {
                        m.retire();
                    }
                    return Ok(outcome);
                }
            }
        }
    }

    /// Stops the vCPUs, puts the terminal back, removes what `quit` should remove.
    pub(crate) fn shutdown(&mut self) {
        if let Some(m) = &mut self.machine {
            m.shutdown();
            m.serial.restore_terminal();
        }
        for p in &self.remove_on_quit {
            let _ = std::fs::remove_file(p);
        }
    }

    pub(crate) fn reply(
        &mut self,
        client: u64,
        id: Option<Value>,
        r: std::result::Result<Value, QmpError>,
    ) {
        if let Some(m) = &mut self.monitor {
            m.reply(client, id, r);
        }
    }

    pub(crate) fn event(&mut self, name: &str, data: Option<Value>) {
        if let Some(m) = &mut self.monitor {
            m.event(name, data);
            m.flush_for(Duration::ZERO);
        }
    }

    fn command(&mut self, req: Request) -> Option<Outcome> {
        log::debug!("qmp: {} {:?}", req.command, req.arguments);
        let args = |allowed: &[&str]| check_arguments(&req.arguments, allowed);
        let result = match req.command.as_str() {
            "query-status" => args(&[]).map(|()| self.query_status()),
            "stop" => args(&[]).and_then(|()| self.stop()),
            "cont" => args(&[]).and_then(|()| self.cont()),
            "quit" => match args(&[]) {
                Ok(()) => {
                    self.reply(req.client, req.id.clone(), Ok(json!({})));
                    if let Some(m) = &mut self.monitor {
                        m.flush_for(Duration::from_secs(1));
                    }
                    self.shutdown();
                    return Some(Outcome::Quit);
                }
                Err(e) => Err(e),
            },
            "cpr-info" => args(&[]).map(|()| self.cpr_info()),
            "cpr-save" => return self.cpr_save(req),
            "cpr-load" => args(&["path"]).and_then(|()| self.cpr_load(&req.arguments)),
            "x-demo-status" => args(&[]).and_then(|()| self.demo_status()),
            "x-demo-reset-gap" => args(&[]).and_then(|()| self.demo_reset_gap()),
            "x-guest-read" => {
                args(&["addr", "size"]).and_then(|()| self.guest_read(&req.arguments))
            }
            "x-vfio-status" => args(&[]).and_then(|()| {
                self.passthrough
                    .as_ref()
                    .and_then(Passthrough::model_status)
                    .ok_or_else(|| q("no VFIO device on the model kernel"))
            }),
            "migrate-set-parameters" => self.migrate_set_parameters(&req.arguments),
            "query-migrate-parameters" => args(&[]).map(|()| self.query_migrate_parameters()),
            "migrate" => return self.migrate(req),
            "migrate-incoming" => self.migrate_incoming(&req.arguments),
            "query-migrate" => args(&[]).map(|()| self.query_migrate()),
            "migrate_cancel" => args(&[]).map(|()| json!({})),
            "query-commands" => args(&[]).map(|()| {
                json!(COMMANDS
                    .iter()
                    .map(|n| json!({ "name": n }))
                    .collect::<Vec<_>>())
            }),
            other => Err(QmpError {
                class: "CommandNotFound",
                desc: format!("The command {other} has not been found"),
            }),
        };
        self.reply(req.client, req.id, result);
        None
    }

    fn query_status(&self) -> Value {
        let status = match self.state {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Incoming => "inmigrate",
            RunState::Postmigrate => "postmigrate",
        };
        json!({"status": status, "running": self.state == RunState::Running})
    }

    pub(crate) fn machine(&self) -> std::result::Result<&Machine, QmpError> {
        self.machine
            .as_ref()
            .ok_or_else(|| q("no VM yet: waiting for cpr-load"))
    }

    fn stop(&mut self) -> std::result::Result<Value, QmpError> {
        if self.state == RunState::Running {
            let ns = self.machine()?.pause(PAUSE_TIMEOUT).map_err(q)?;
            self.paused_at_ns = ns;
            self.state = RunState::Paused;
            self.stop_event(ns);
        }
        Ok(json!({}))
    }

    fn cont(&mut self) -> std::result::Result<Value, QmpError> {
        match self.state {
            RunState::Paused => {
                self.machine()?.resume();
                self.state = RunState::Running;
                self.resume_event();
                Ok(json!({}))
            }
            RunState::Running => Ok(json!({})),
            RunState::Incoming => Err(q("no VM yet: waiting for cpr-load")),
            RunState::Postmigrate => Err(q(
                "the guest was migrated away from this VMM: it runs (or will) elsewhere; quit",
            )),
        }
    }

    /// `STOP`, stamped when the last vCPU left the guest.
    ///
    /// In the pause of a restart or a transfer it is queued, not written: the next image
    /// is handed the monitor's pending output and writes it, before `RESUME`, once the
    /// guest runs again (or this process does, with `RESUME`, if the update fails). The
    /// write, and the client it wakes, stay out of the blackout; the stamp is the stop's
    /// either way.
    pub(crate) fn stop_event(&mut self, stop_mono_ns: u64) {
        let at = cpr_update::StopTime::at(stop_mono_ns).realtime_ns;
        let carried = matches!(
            self.updating,
            Some(cpr_update::Mode::Restart | cpr_update::Mode::Transfer)
        );
        if let Some(m) = &mut self.monitor {
            if carried {
                m.queue_event_at("STOP", None, at);
            } else {
                m.event_at("STOP", None, at);
                m.flush_for(Duration::ZERO);
            }
        }
    }

    /// `RESUME`, stamped when the first vCPU entered the guest again.
    pub(crate) fn resume_event(&mut self) {
        let first = self
            .machine
            .as_ref()
            .and_then(|m| m.wait_first_entry(Duration::from_secs(10)))
            .unwrap_or_else(monotonic_ns);
        let at = cpr_update::StopTime::at(first).realtime_ns;
        if let Some(m) = &mut self.monitor {
            m.event_at("RESUME", None, at);
            m.flush_for(Duration::ZERO);
        }
    }

    fn cpr_info(&self) -> Value {
        let Some(m) = &self.machine else {
            return json!({"modes": {}, "reason": "no VM yet: waiting for cpr-load"});
        };
        let mut modes = Map::new();
        for mode in cpr_update::Mode::ALL {
            let entry = match cpr_update::Updatable::check(self, mode) {
                Ok(()) => json!({"supported": true, "warnings": self.memory_warnings(mode)}),
                Err(e) => json!({"supported": false, "reason": e.to_string()}),
            };
            modes.insert(mode.to_string(), entry);
        }
        let memory: Vec<Value> = m
            .ram
            .layout()
            .regions
            .iter()
            .map(|r| json!({"kind": r.kind.as_str(), "name": r.name, "guest-addr": r.guest_addr, "size": r.size, "offset": r.offset, "page-size": r.page_size}))
            .collect();
        let vfio = self.passthrough.as_ref().map(Passthrough::info);
        let info = cpr_update::Updatable::build_info(self);
        json!({
            "modes": modes, "memory": memory, "vcpus": m.vcpu_count(),
            "last-update": self.last_update, "vfio": vfio,
            "state-versions": {"reads": [info.reads.start(), info.reads.end()],
                               "writes": [info.writes.start(), info.writes.end()]},
            "build": info.version, "generation": self.ids.generation,
        })
    }

    fn demo_status(&self) -> std::result::Result<Value, QmpError> {
        let m = self.machine()?;
        let s =
            DemoStatus::read(m.ram.memory()).ok_or_else(|| q("the guest is not the demo guest"))?;
        #[cfg(feature = "next")]
        let serial_lines: Option<u64> =
            Some(crate::serial::LINES_OUT.load(std::sync::atomic::Ordering::Relaxed));
        #[cfg(not(feature = "next"))]
        let serial_lines: Option<u64> = None;
        Ok(json!({
            "serial-lines-out": serial_lines,
            "counter": s.counter, "generation": s.generation, "lines": s.lines,
            "errors": s.errors, "bad-words": s.bad_words, "faults": s.faults,
            "checksum": s.checksum, "tsc": s.tsc, "tsc-khz": m.tsc_khz(),
            "ticks": &s.ticks[..m.vcpu_count()], "pid": std::process::id(),
            "kvmclock-ns": m.kvmclock_ns(), "updates": self.update_count,
            "max-gap-tsc": s.max_gap_tsc,
            "blk": if s.blk_present { json!({
                "done": s.blk_done, "verified": s.blk_verified, "errors": s.blk_errors,
                "device-completed": m.blk().map(|b| b.completed()),
                "last-drain-us": m.last_drain().as_micros() as u64,
            }) } else { Value::Null },
            "net": if s.net_present { let c = m.net().map(|n| n.counters()).unwrap_or_default(); json!({
                "sent": s.net_sent, "received": s.net_received, "sum": s.net_sum,
                "repeats": s.net_repeats, "bad": s.net_bad, "other": s.net_other,
                "device-tx": c.tx, "device-tx-dropped": c.tx_dropped,
                "device-rx": c.rx, "device-rx-dropped": c.rx_dropped,
                "device-held": m.net().map(|n| n.held()),
            }) } else { Value::Null },
            "max-gap-us": m.tsc_khz().filter(|k| *k > 0).map(|k| s.max_gap_tsc * 1000 / u64::from(k)),
        }))
    }

    /// Up to 4 KiB of guest memory at a guest physical address, as hex (as QEMU's `xp`):
    /// for checking from outside that memory is where it was.
    fn guest_read(&self, args: &Map<String, Value>) -> std::result::Result<Value, QmpError> {
        let num = |k: &str| {
            args.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| q(format!("`{k}` must be a non-negative integer")))
        };
        let (addr, size) = (num("addr")?, num("size")?);
        if size == 0 || size > 4096 {
            return Err(q("`size` must be 1 to 4096"));
        }
        let mut buf = vec![0u8; size as usize];
        self.machine()?
            .ram
            .memory()
            .read_slice(&mut buf, GuestAddress(addr))
            .map_err(|_| q(format!("{size} bytes at {addr:#x} are not all guest RAM")))?;
        let hex: String = buf.iter().map(|b| format!("{b:02x}")).collect();
        Ok(json!({ "data": hex }))
    }

    fn demo_reset_gap(&self) -> std::result::Result<Value, QmpError> {
        DemoStatus::reset_gap(self.machine()?.ram.memory()).map_err(q)?;
        Ok(json!({}))
    }

    pub(crate) fn cpr_load(
        &mut self,
        args: &Map<String, Value>,
    ) -> std::result::Result<Value, QmpError> {
        if self.state != RunState::Incoming {
            return Err(q("cpr-load needs a VMM started with --incoming defer"));
        }
        let path = match args.get("path") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(q("Parameter 'path' is missing or not a string")),
        };
        let (dir, name) = self.policy.state_file(&path).map_err(q)?;
        let bytes = dir.read(&name, self.schema.limits().max_total).map_err(q)?;
        let opts = cpr_update::Incoming::default();
        let r = cpr_update::restore_saved(self, &bytes, &opts).map_err(q)?;
        self.after_update(r).map_err(q)?;
        Ok(json!({}))
    }
}

/// Commands the monitor knows (`query-commands`).
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "stop",
    "cont",
    "quit",
    "cpr-info",
    "cpr-save",
    "cpr-load",
    "x-demo-status",
    "x-demo-reset-gap",
    "x-guest-read",
    "x-vfio-status",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate",
    "migrate-incoming",
    "query-migrate",
    "migrate_cancel",
    "query-commands",
];

/// The tap `--net` names: the interface opened (or created) by name, or the inherited fd,
/// checked to be an attached tap.
pub(crate) fn open_net_backend(
    net: &crate::config::NetConfig,
) -> std::result::Result<std::fs::File, crate::virtio_net::NetError> {
    use crate::config::NetBackend;
    match &net.backend {
        NetBackend::Tap(name) => crate::virtio_net::open_tap(name),
        NetBackend::Fd(fd) => crate::virtio_net::tap_from_inherited(*fd),
    }
}

pub(crate) fn wait_readable(fd: i32, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that lives for the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
}

/// The new side of a transfer: listens on `path` (owner-only), accepts one connection from a
/// process of this user, and removes the socket.
fn accept_transfer(path: &Path, policy: &Policy) -> Result<UnixStream> {
    let listener = crate::unix::listen(path, policy.access)
        .map_err(|e| Error::Io(format!("bind transfer socket `{}`: {e}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Io(format!("transfer socket: {e}")))?;
    log::info!("waiting for a transfer on {}", path.display());
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let stream = loop {
        if terminating() {
            let _ = std::fs::remove_file(path);
            return Err(Error::Io("terminated while waiting for a transfer".into()));
        }
        wait_readable(listener.as_raw_fd(), Duration::from_millis(100));
        match listener.accept() {
            Ok((s, _)) => match peer_uid(&s) {
                Some(uid) if uid == me || uid == 0 => break s,
                other => log::warn!("transfer: refused a connection from uid {other:?}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::Io(format!("accept transfer: {e}"))),
        }
    };
    let _ = std::fs::remove_file(path);
    stream
        .set_nonblocking(false)
        .map_err(|e| Error::Io(format!("transfer socket: {e}")))?;
    Ok(stream)
}

fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, alive for the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// `inspect FILE`: the sections of a state file, one per line.
pub fn inspect(path: &Path) -> Result<String> {
    let schema = crate::update::schema();
    let bytes = crate::update::read_state_file(path, &schema)?;
    let info = cpr_snapshot::inspect(bytes.as_slice(), schema.limits())?;
    Ok(format!("{}: {info}", path.display()))
}
