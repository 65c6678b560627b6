// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! COM1 (16550, vm-superio) with a backend that keeps its fd across a restart.
//!
//! Input (from a terminal on stdin, or the socket client) moves into the UART only as fast as
//! the guest reads it: never more than the receive FIFO has room for, so nothing is dropped
//! when the FIFO is full, and nothing at all while an update holds the device
//! ([`SerialDevice::hold`]), so whatever the captured state does not hold is still in the
//! kernel for the next image. A socket client that stops reading output for
//! [`WRITE_TIMEOUT`] is disconnected rather than allowed to stall the vCPU that writes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpr_fd::{FdKind, FdRegistry};
use cpr_snapshot::prelude::*;
use cpr_snapshot::Blob;
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::gate::{lock, Gate};

use crate::error::{Error, Result};

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

/// How long guest output may wait for a socket client that does not read; the client is
/// then disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the guest's serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's stdout (and stdin, when it is a terminal).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
    /// A UNIX socket the VMM listens on; one client at a time reads output and sends input.
    Unix(PathBuf),
    /// Discarded.
    Null,
    /// A new pseudo-terminal, whose path is printed (as QEMU's `-serial pty`); kept across
    /// restart and transfer, so a terminal attached to it stays attached.
    Pty,
}

impl std::str::FromStr for SerialConfig {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "stdout" | "stdio" => Ok(SerialConfig::Stdout),
            "null" | "none" => Ok(SerialConfig::Null),
            "pty" => Ok(SerialConfig::Pty),
            _ => match s.split_once(':') {
                Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File(p.into())),
                Some(("unix", p)) if !p.is_empty() => Ok(SerialConfig::Unix(p.into())),
                _ => Err(format!(
                    "serial backend `{s}`: use stdout, null, pty, file:PATH or unix:PATH"
                )),
            },
        }
    }
}

/// Serial register state, saved as section `serial`.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct SerialSection {
    /// Divisor latch, low byte.
    pub divisor_low: u8,
    /// Divisor latch, high byte.
    pub divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Blob,
    /// Lines the guest has printed (the `next` build's new field, type version 2; an older
    /// state gives 0).
    #[cfg(feature = "next")]
    #[state(since = 2, default = "no_lines")]
    pub lines_out: u64,
}

#[cfg(feature = "next")]
impl SerialSection {
    fn no_lines(_: u16) -> u64 {
        0
    }
}

impl Section for SerialSection {
    const NAME: &'static str = "serial";
}

impl From<&SerialState> for SerialSection {
    fn from(s: &SerialState) -> Self {
        SerialSection {
            divisor_low: s.baud_divisor_low,
            divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: Blob(s.in_buffer.clone()),
            #[cfg(feature = "next")]
            lines_out: 0,
        }
    }
}

impl From<&SerialSection> for SerialState {
    fn from(s: &SerialSection) -> Self {
        SerialState {
            baud_divisor_low: s.divisor_low,
            baud_divisor_high: s.divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.0.clone(),
        }
    }
}

/// Checks saved UART state before it is used: the receive FIFO within its capacity.
pub fn check_state(s: &SerialSection) -> Result<()> {
    // vm-superio's receive FIFO holds 64 bytes.
    if s.in_buffer.len() > 64 {
        return Err(Error::State(format!(
            "serial state has {} bytes in a 64-byte FIFO",
            s.in_buffer.len()
        )));
    }
    Ok(())
}

/// Raises COM1's interrupt through an irqfd, or, while the line is held, remembers that it
/// would have (see [`SerialDevice::release_irq`]).
#[derive(Debug)]
pub struct IrqTrigger {
    line: EventFd,
    hold: Arc<IrqHold>,
}

/// Whether COM1's line is held, and whether the UART raised it meanwhile. Both change only
/// under the UART's lock (the UART raises the line from inside its own methods, or as it is
/// built), so a release never misses a raise and relaxed atomics suffice.
#[derive(Debug)]
struct IrqHold {
    held: AtomicBool,
    pending: AtomicBool,
}

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        if self.hold.held.load(Ordering::Relaxed) {
            self.hold.pending.store(true, Ordering::Relaxed);
            return Ok(());
        }
        self.line.write(1)
    }
}

/// The output side of the backend.
#[derive(Debug, Clone)]
pub enum SerialOut {
    /// fd 1.
    Stdout,
    /// A file.
    File(Arc<File>),
    /// The current socket client, if any.
    Socket(Arc<Mutex<Option<UnixStream>>>),
    /// A pty's master side (non-blocking: output nobody reads is dropped, never waited for).
    Pty(Arc<File>),
    /// Nowhere.
    Null,
}

/// Lines the guest printed (counted by the `next` build).
#[cfg(feature = "next")]
pub static LINES_OUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        #[cfg(feature = "next")]
        LINES_OUT.fetch_add(
            buf.iter().filter(|&&b| b == b'\n').count() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        match self {
            SerialOut::Stdout => std::io::stdout().write(buf),
            SerialOut::File(f) => (&**f).write(buf),
            SerialOut::Socket(s) => {
                let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(stream) = guard.as_mut() {
                    if stream.write_all(buf).is_err() {
                        // Gone, or not reading: disconnect it (its input reader then sees
                        // the end and accepts the next client) and drop output until then.
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                        *guard = None;
                    }
                }
                Ok(buf.len())
            }
            SerialOut::Pty(m) => {
                let _ = (&**m).write(buf);
                Ok(buf.len())
            }
            SerialOut::Null => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SerialOut::Stdout => std::io::stdout().flush(),
            _ => Ok(()),
        }
    }
}

/// Signals the input thread when the guest has emptied the receive FIFO.
#[derive(Debug, Clone)]
pub struct InputRoom(Arc<EventFd>);

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// The emulated UART.
pub type Uart = Serial<IrqTrigger, InputRoom, SerialOut>;

/// COM1 and its backend.
#[derive(Debug)]
pub struct SerialDevice {
    /// The UART, shared with the vCPU threads.
    pub uart: Arc<Mutex<Uart>>,
    backend: Backend,
    terminal: Option<Terminal>,
    room: Arc<EventFd>,
    gate: Arc<Gate>,
    started: AtomicBool,
    irq_hold: Arc<IrqHold>,
}

#[derive(Debug)]
enum Backend {
    Stdout,
    File(Arc<File>),
    Unix {
        listener: Arc<UnixListener>,
        client: Arc<Mutex<Option<UnixStream>>>,
    },
    /// The master, and the slave kept open so the pty stays up with no terminal attached.
    Pty {
        master: Arc<File>,
        slave: Arc<File>,
    },
    Null,
}

/// A new pty with a raw slave (no echo, no line editing: the guest's bytes pass as they
/// are), its master non-blocking.
fn open_pty() -> Result<(File, File)> {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new fds into the ints; null name, termios and winsize are
    // allowed.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(Error::Io(format!(
            "openpty: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both fds are new and owned by nothing else.
    let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    for fd in [master.as_raw_fd(), slave.as_raw_fd()] {
        // SAFETY: F_SETFD on an fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // The console is the owner's alone, whatever devpts was mounted with (`mode=620` lets
    // the tty group write to it).
    use std::os::unix::fs::PermissionsExt;
    slave
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::Io(format!("pty permissions: {e}")))?;
    let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
    // SAFETY: tcgetattr fills the termios we pass; cfmakeraw and tcsetattr edit and read it.
    unsafe {
        if libc::tcgetattr(slave.as_raw_fd(), t.as_mut_ptr()) == 0 {
            let mut t = t.assume_init();
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    unsafe {
        let fl = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(master.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok((master, slave))
}

/// The path of a pty's slave.
fn pty_path(slave: &File) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "an unknown pty".into())
}

/// Says where the console is, as QEMU does.
fn announce_pty(slave: &File, kept: bool) {
    let path = pty_path(slave);
    if kept {
        log::info!("serial: the pty {path} stays the console");
    } else {
        eprintln!("char device redirected to {path} (label serial0)");
        log::info!("serial: console on {path}");
    }
}

/// A terminal on stdin put into raw mode, and how to put it back.
#[derive(Debug)]
struct Terminal {
    original: libc::termios,
}

impl Terminal {
    fn raw() -> Option<Terminal> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: tcgetattr fills the termios we pass.
        if unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: tcgetattr succeeded, so the struct is initialised.
        let original = unsafe { t.assume_init() };
        let mut raw = original;
        // SAFETY: cfmakeraw edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_oflag = original.c_oflag; // keep output post-processing (\n -> \r\n)
                                        // SAFETY: tcsetattr reads the termios we pass.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) };
        Some(Terminal { original })
    }

    fn restore(&self) {
        // SAFETY: tcsetattr reads the termios we pass; fd 0 is the terminal we changed.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &self.original) };
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.restore();
    }
}

fn io<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::Io(format!("{op} `{}`: {e}", path.display()))
}

impl SerialDevice {
    /// Opens the backend and creates the UART (from saved `state`, if restoring). Input is
    /// read from [`start_input`](Self::start_input) on.
    pub fn new(
        cfg: &SerialConfig,
        state: Option<&SerialSection>,
        irq: EventFd,
        access: crate::unix::Access,
    ) -> Result<Self> {
        let backend = match cfg {
            SerialConfig::Stdout => Backend::Stdout,
            SerialConfig::Null => Backend::Null,
            SerialConfig::File(p) => Backend::File(Arc::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(p)
                    .map_err(io("open serial file", p))?,
            )),
            SerialConfig::Unix(p) => Backend::Unix {
                listener: Arc::new(
                    crate::unix::listen(p, access).map_err(io("bind serial socket", p))?,
                ),
                client: Arc::new(Mutex::new(None)),
            },
            SerialConfig::Pty => {
                let (master, slave) = open_pty()?;
                announce_pty(&slave, false);
                Backend::Pty {
                    master: Arc::new(master),
                    slave: Arc::new(slave),
                }
            }
        };
        Self::with_backend(backend, state, irq)
    }

    fn with_backend(backend: Backend, state: Option<&SerialSection>, irq: EventFd) -> Result<Self> {
        let out = match &backend {
            Backend::Stdout => SerialOut::Stdout,
            Backend::File(f) => SerialOut::File(f.clone()),
            Backend::Unix { client, .. } => SerialOut::Socket(client.clone()),
            Backend::Pty { master, .. } => SerialOut::Pty(master.clone()),
            Backend::Null => SerialOut::Null,
        };
        if let Backend::Unix { client, .. } = &backend {
            if let Some(c) = lock(client).as_ref() {
                c.set_write_timeout(Some(WRITE_TIMEOUT))
                    .map_err(|e| Error::Io(format!("serial socket client: {e}")))?;
            }
        }
        // A restored UART re-raises a pending THR or RDA interrupt as it is built. That
        // happens inside a restore, before the vCPUs' LAPICs are set, where `KVM_SET_LAPIC`
        // would overwrite it; the line stays held until `release_irq`.
        let irq_hold = Arc::new(IrqHold {
            held: AtomicBool::new(state.is_some()),
            pending: AtomicBool::new(false),
        });
        let trigger = IrqTrigger {
            line: irq,
            hold: irq_hold.clone(),
        };
        let room = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io(format!("serial eventfd: {e}")))?,
        );
        let events = InputRoom(room.clone());
        #[cfg(feature = "next")]
        if let Some(s) = state {
            LINES_OUT.store(s.lines_out, std::sync::atomic::Ordering::Relaxed);
        }
        let uart = match state {
            Some(s) => Serial::from_state(&SerialState::from(s), trigger, events, out)
                .map_err(|e| Error::State(format!("serial state: {e:?}")))?,
            None => Serial::with_events(trigger, events, out),
        };
        let terminal = match backend {
            Backend::Stdout => Terminal::raw(),
            _ => None,
        };
        Ok(SerialDevice {
            uart: Arc::new(Mutex::new(uart)),
            backend,
            terminal,
            room,
            gate: Arc::new(Gate::new("serial input")?),
            started: AtomicBool::new(false),
            irq_hold,
        })
    }

    /// Ends the hold a restored UART starts with: raises COM1's line if the UART raised it
    /// since it was built (a THR or RDA interrupt pending at the update, or one raised
    /// while held). Call it once every vCPU's LAPIC is set. An interrupt the saved LAPIC
    /// already carries comes again at most once, which drivers take as spurious; one the
    /// old VM received after its LAPICs were captured (an irqfd is injected
    /// asynchronously) is not lost. Does nothing on a UART that was not restored, or twice.
    pub fn release_irq(&self) -> Result<()> {
        let uart = lock(&self.uart);
        if self.irq_hold.held.swap(false, Ordering::Relaxed)
            && self.irq_hold.pending.swap(false, Ordering::Relaxed)
        {
            uart.interrupt_evt()
                .line
                .write(1)
                .map_err(|e| Error::Io(format!("COM1 interrupt: {e}")))?;
        }
        Ok(())
    }

    /// Rebuilds the device from fds handed over by the previous image (taken from `fds`).
    /// Input is read from [`start_input`](Self::start_input) on.
    pub fn from_fds(
        cfg: &SerialConfig,
        fds: &mut FdRegistry,
        state: &SerialSection,
        irq: EventFd,
    ) -> Result<Self> {
        let missing = |n: &str| Error::State(format!("serial fd `{n}` was not handed over"));
        let backend = match cfg {
            SerialConfig::Stdout => Backend::Stdout,
            SerialConfig::Null => Backend::Null,
            SerialConfig::File(_) => {
                let fd = fds
                    .take("serial.file")
                    .ok_or_else(|| missing("serial.file"))?;
                Backend::File(Arc::new(File::from(fd.into_fd())))
            }
            SerialConfig::Unix(_) => {
                let l = fds
                    .take("serial.listener")
                    .ok_or_else(|| missing("serial.listener"))?;
                let client = fds
                    .take("serial.client")
                    .map(|e| UnixStream::from(e.into_fd()));
                Backend::Unix {
                    listener: Arc::new(UnixListener::from(l.into_fd())),
                    client: Arc::new(Mutex::new(client)),
                }
            }
            SerialConfig::Pty => {
                let master = fds
                    .take("serial.pty")
                    .ok_or_else(|| missing("serial.pty"))?;
                let slave = fds
                    .take("serial.pty-slave")
                    .ok_or_else(|| missing("serial.pty-slave"))?;
                let slave = File::from(slave);
                announce_pty(&slave, true);
                Backend::Pty {
                    master: Arc::new(File::from(master)),
                    slave: Arc::new(slave),
                }
            }
        };
        Self::with_backend(backend, Some(state), irq)
    }

    /// Registers duplicates of the backend's fds for the next image.
    pub fn register_fds(
        &self,
        mut reg: impl FnMut(&str, FdKind, OwnedFd, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<OwnedFd> {
            fd.try_clone_to_owned()
                .map_err(|e| Error::Io(format!("dup serial fd: {e}")))
        };
        match &self.backend {
            Backend::File(f) => reg("serial.file", FdKind::CONSOLE, dup(f.as_fd())?, b"")?,
            Backend::Unix { listener, client } => {
                reg(
                    "serial.listener",
                    FdKind::CONSOLE,
                    dup(listener.as_fd())?,
                    b"",
                )?;
                if let Some(c) = client.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    reg("serial.client", FdKind::CONSOLE, dup(c.as_fd())?, b"")?;
                }
            }
            Backend::Pty { master, slave } => {
                reg("serial.pty", FdKind::CONSOLE, dup(master.as_fd())?, b"")?;
                reg(
                    "serial.pty-slave",
                    FdKind::CONSOLE,
                    dup(slave.as_fd())?,
                    b"",
                )?;
            }
            Backend::Stdout | Backend::Null => {}
        }
        Ok(())
    }

    /// Saved register state (what `Persist::save` returns).
    pub fn state(&self) -> SerialSection {
        #[allow(unused_mut)]
        let mut s =
            SerialSection::from(&self.uart.lock().unwrap_or_else(|p| p.into_inner()).state());
        #[cfg(feature = "next")]
        {
            s.lines_out = LINES_OUT.load(std::sync::atomic::Ordering::Relaxed);
        }
        s
    }

    /// Puts a terminal back into the mode it had (before exec or exit); the next image or
    /// [`reenter_raw_mode`](Self::reenter_raw_mode) sets raw mode again.
    pub fn restore_terminal(&self) {
        if let Some(t) = &self.terminal {
            t.restore();
        }
    }

    /// Raw mode again after an abandoned update.
    pub fn reenter_raw_mode(&mut self) {
        if self.terminal.is_some() {
            self.terminal = Terminal::raw();
        }
    }

    /// Starts reading input (once), if the backend has any.
    pub fn start_input(&self) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let pump = Pump {
            uart: self.uart.clone(),
            room: self.room.clone(),
            gate: self.gate.clone(),
        };
        match &self.backend {
            Backend::Stdout if self.terminal.is_some() => {
                // A duplicate of fd 0, read directly: std's stdin buffers ahead, and what it
                // buffered would be lost at exec.
                let Ok(stdin) = std::io::stdin().as_fd().try_clone_to_owned() else {
                    log::warn!("serial: cannot duplicate stdin; no console input");
                    return;
                };
                self.gate.thread_started();
                std::thread::spawn(move || {
                    pump.run(&mut File::from(stdin));
                    pump.gate.thread_ended();
                });
            }
            Backend::Pty { master, .. } => {
                let Ok(master) = master.try_clone() else {
                    log::warn!("serial: cannot duplicate the pty; no console input");
                    return;
                };
                self.gate.thread_started();
                std::thread::spawn(move || {
                    pump.run(&mut { master });
                    pump.gate.thread_ended();
                });
            }
            Backend::Unix { listener, client } => {
                let listener = listener.clone();
                let client = client.clone();
                let existing = lock(&client).as_ref().and_then(|c| c.try_clone().ok());
                self.gate.thread_started();
                std::thread::spawn(move || {
                    if let Some(mut s) = existing {
                        pump.run(&mut s);
                    }
                    loop {
                        pump.gate.until_readable(listener.as_fd(), || {});
                        let Ok((s, _)) = listener.accept() else {
                            continue;
                        };
                        let Ok(mut reader) = s.try_clone() else {
                            continue;
                        };
                        if s.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
                            continue;
                        }
                        *lock(&client) = Some(s);
                        pump.run(&mut reader);
                    }
                });
            }
            _ => {}
        }
    }

    /// Stops moving input into the UART, before its state is captured for an update: bytes
    /// not yet moved stay in the kernel for the next image. Fails, and carries on, if the
    /// input thread does not stop within `timeout`.
    pub fn hold(&self, timeout: Duration) -> Result<()> {
        self.gate.hold(timeout)
    }

    /// Moves input again after a failed update.
    pub fn release(&self) {
        self.gate.release();
    }
}

/// Moves input into the UART as the guest makes room for it.
struct Pump {
    uart: Arc<Mutex<Uart>>,
    room: Arc<EventFd>,
    gate: Arc<Gate>,
}

impl Pump {
    /// Until `src` ends or fails.
    fn run<S: Read + AsFd>(&self, src: &mut S) {
        let mut buf = [0u8; 64];
        loop {
            // Read the signal before looking at the FIFO, so that a guest emptying it in
            // between leaves the eventfd readable and the wait below returns.
            let _ = self.room.read();
            let free = lock(&self.uart).fifo_capacity().min(buf.len());
            if free == 0 {
                // SAFETY: the eventfd is owned by `self.room`, which outlives the borrow.
                let room = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.room.as_raw_fd()) };
                self.gate.until_readable(room, || {});
                continue;
            }
            self.gate.until_readable(src.as_fd(), || {});
            let n = match src.read(&mut buf[..free]) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue
                }
                Err(_) => return,
            };
            // Only this thread adds input, so the room seen above is still there.
            if let Err(e) = lock(&self.uart).enqueue_raw_bytes(&buf[..n]) {
                log::warn!("serial: input dropped: {e:?}");
            }
        }
    }
}

/// What [`SerialDevice`]'s `Persist::restore` needs
/// besides the UART registers.
#[derive(Debug)]
pub struct SerialArgs<'a> {
    /// The backend, as the saving image had it (restart, transfer) or as the command line
    /// says (reboot).
    pub config: &'a SerialConfig,
    /// The fds handed over, for restart and transfer (the backend's are taken from it);
    /// `None` after a reboot, when the backend is opened again from `config`.
    pub fds: Option<&'a mut FdRegistry>,
    /// The interrupt line.
    pub irq: EventFd,
    /// Who may connect to a socket backend that is created anew.
    pub access: crate::unix::Access,
}

impl<'a> cpr_snapshot::Persist<'a> for SerialDevice {
    type State = SerialSection;
    type ConstructorArgs = SerialArgs<'a>;
    type Error = Error;

    fn save(&self) -> SerialSection {
        self.state()
    }

    /// Checks the registers ([`check_state`]) and rebuilds the device on the handed-over
    /// backend, or on a new one after a reboot.
    fn restore(args: SerialArgs<'a>, state: &SerialSection) -> Result<Self> {
        check_state(state)?;
        match args.fds {
            Some(fds) => SerialDevice::from_fds(args.config, fds, state, args.irq),
            None => SerialDevice::new(args.config, Some(state), args.irq, args.access),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unix::Access;

    #[test]
    fn backends_parse() {
        assert_eq!(
            "stdout".parse::<SerialConfig>().unwrap(),
            SerialConfig::Stdout
        );
        assert_eq!(
            "file:/tmp/x".parse::<SerialConfig>().unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert_eq!(
            "unix:/tmp/s".parse::<SerialConfig>().unwrap(),
            SerialConfig::Unix("/tmp/s".into())
        );
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tcp:1".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn state_round_trips_through_the_section() {
        let s = SerialState {
            scratch: 0x5a,
            in_buffer: b"abc".to_vec(),
            ..Default::default()
        };
        let sec = SerialSection::from(&s);
        assert_eq!(SerialState::from(&sec), s);
    }

    #[test]
    fn file_backend_appends_guest_output() {
        let path = std::env::temp_dir().join(format!("cpr-serial-{}", std::process::id()));
        let dev = SerialDevice::new(
            &SerialConfig::File(path.clone()),
            None,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            crate::unix::Access::OWNER,
        )
        .unwrap();
        for b in b"hi\n" {
            dev.uart.lock().unwrap().write(0, *b).unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        std::fs::remove_file(&path).unwrap();
    }

    struct SocketDir(PathBuf);

    impl SocketDir {
        fn new(tag: &str) -> SocketDir {
            let d = std::env::temp_dir().join(format!("cpr-serial-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir(&d).unwrap();
            SocketDir(d)
        }
        fn config(&self) -> SerialConfig {
            SerialConfig::Unix(self.0.join("s.sock"))
        }
    }

    impl Drop for SocketDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn irq() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn a_restored_uart_holds_its_line_until_released() {
        let line = irq();
        let null = || SerialConfig::Null;
        let fresh =
            SerialDevice::new(&null(), None, line.try_clone().unwrap(), Access::OWNER).unwrap();
        // A fresh UART raises at once: the guest enables the transmit-empty interrupt and
        // writes a byte, and does not read IIR.
        lock(&fresh.uart).write(1, 0x02).unwrap();
        lock(&fresh.uart).write(0, b'x').unwrap();
        assert!(line.read().unwrap() >= 1, "a fresh UART's line is not held");
        let state = fresh.state();
        assert_eq!(
            state.interrupt_identification & 0x03,
            0x02,
            "THR empty is pending"
        );
        drop(fresh);

        let args = SerialArgs {
            config: &null(),
            fds: None,
            irq: line.try_clone().unwrap(),
            access: Access::OWNER,
        };
        let back = SerialDevice::restore(args, &state).unwrap();
        assert!(line.read().is_err(), "held: the pending interrupt waits");
        lock(&back.uart).write(0, b'y').unwrap();
        assert!(
            line.read().is_err(),
            "held: what the guest does meanwhile waits too"
        );
        back.release_irq().unwrap();
        assert_eq!(line.read().unwrap(), 1, "released: raised once");
        back.release_irq().unwrap();
        assert!(line.read().is_err(), "a second release raises nothing");
        // No longer held: the guest reads IIR (acknowledging) and writes, and it is raised.
        lock(&back.uart).read(2);
        lock(&back.uart).write(0, b'z').unwrap();
        assert_eq!(line.read().unwrap(), 1);
    }

    /// Reads the receive register as a guest driver would, until `got` holds `want` bytes.
    fn guest_reads(dev: &SerialDevice, want: usize, got: &mut Vec<u8>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while got.len() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {want} bytes arrived",
                got.len()
            );
            let mut uart = dev.uart.lock().unwrap();
            if uart.read(5) & 1 != 0 {
                got.push(uart.read(0));
            } else {
                drop(uart);
                std::thread::yield_now();
            }
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn input_waits_for_room_in_the_fifo_and_nothing_is_dropped() {
        let dir = SocketDir::new("room");
        let dev =
            SerialDevice::new(&dir.config(), None, irq(), crate::unix::Access::OWNER).unwrap();
        dev.start_input();
        let mut client = UnixStream::connect(dir.0.join("s.sock")).unwrap();
        let sent = pattern(1000); // the FIFO holds 64
        client.write_all(&sent).unwrap();
        let mut got = Vec::new();
        guest_reads(&dev, sent.len(), &mut got);
        assert_eq!(got, sent);
    }

    #[test]
    fn held_input_stays_in_the_kernel_for_the_next_device() {
        let dir = SocketDir::new("hold");
        let old =
            SerialDevice::new(&dir.config(), None, irq(), crate::unix::Access::OWNER).unwrap();
        old.start_input();
        let mut client = UnixStream::connect(dir.0.join("s.sock")).unwrap();
        let sent = pattern(300);
        client.write_all(&sent).unwrap();
        let mut got = Vec::new();
        // Empty the FIFO once, so the input thread is busy refilling it.
        guest_reads(&old, 64, &mut got);
        // An update: hold, capture, hand the fds over, build the next device.
        old.hold(Duration::from_secs(60)).unwrap();
        let state = old.save();
        // While held, nothing more moves into the old UART, even once it is empty.
        let mut captured = Vec::new();
        guest_reads(&old, state.in_buffer.len(), &mut captured);
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(200) {
            assert_eq!(
                old.uart.lock().unwrap().read(5) & 1,
                0,
                "input moved while held"
            );
            std::thread::yield_now();
        }
        let mut reg = FdRegistry::new();
        old.register_fds(|n, k, fd, m| Ok(reg.register(n, k, fd, m)?))
            .unwrap();
        let args = SerialArgs {
            config: &dir.config(),
            fds: Some(&mut reg),
            irq: irq(),
            access: crate::unix::Access::OWNER,
        };
        let new = SerialDevice::restore(args, &state).unwrap();
        assert!(reg.is_empty(), "the backend's fds were taken");
        new.start_input();
        guest_reads(&new, sent.len(), &mut got);
        assert_eq!(got, sent, "every byte once, in order");
    }

    #[test]
    fn persist_restores_registers_on_a_reopened_backend_and_refuses_a_bad_state() {
        let dir = SocketDir::new("persist");
        let cfg = SerialConfig::File(dir.0.join("out.log"));
        let old = SerialDevice::new(&cfg, None, irq(), crate::unix::Access::OWNER).unwrap();
        old.uart.lock().unwrap().write(3, 0x1b).unwrap(); // LCR
        old.uart.lock().unwrap().write(7, 0x5a).unwrap(); // scratch
        let state = old.save();
        drop(old);
        // After a reboot no fd is handed over: the backend opens again from the config.
        let args = || SerialArgs {
            config: &cfg,
            fds: None,
            irq: irq(),
            access: crate::unix::Access::OWNER,
        };
        let new = SerialDevice::restore(args(), &state).unwrap();
        assert_eq!(new.save(), state);
        assert_eq!(new.uart.lock().unwrap().read(7), 0x5a);
        let mut bad = state.clone();
        bad.in_buffer = vec![0u8; 65].into();
        assert!(matches!(
            SerialDevice::restore(args(), &bad),
            Err(Error::State(_))
        ));
        // With fds expected but none handed over, a file backend is an error, not a new file.
        let mut empty = FdRegistry::new();
        let args = SerialArgs {
            config: &cfg,
            fds: Some(&mut empty),
            irq: irq(),
            access: crate::unix::Access::OWNER,
        };
        assert!(SerialDevice::restore(args, &state).is_err());
    }
}
