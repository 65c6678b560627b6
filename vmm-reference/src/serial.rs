// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! COM1 (16550, vm-superio) with a backend that keeps its fd across a restart.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cpr_fd::{FdKind, FdRegistry};
use cpr_snapshot::prelude::*;
use cpr_snapshot::Blob;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

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
}

impl std::str::FromStr for SerialConfig {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "stdout" | "stdio" => Ok(SerialConfig::Stdout),
            "null" | "none" => Ok(SerialConfig::Null),
            _ => match s.split_once(':') {
                Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File(p.into())),
                Some(("unix", p)) if !p.is_empty() => Ok(SerialConfig::Unix(p.into())),
                _ => Err(format!(
                    "serial backend `{s}`: use stdout, null, file:PATH or unix:PATH"
                )),
            },
        }
    }
}

/// Serial register state, saved as section `serial`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Versionize)]
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

/// Raises COM1's interrupt through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
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
    /// Nowhere.
    Null,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SerialOut::Stdout => std::io::stdout().write(buf),
            SerialOut::File(f) => (&**f).write(buf),
            SerialOut::Socket(s) => {
                let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(stream) = guard.as_mut() {
                    if stream.write_all(buf).is_err() {
                        // The client went away: drop output until another connects.
                        *guard = None;
                    }
                }
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

/// The emulated UART.
pub type Uart = Serial<IrqTrigger, NoEvents, SerialOut>;

/// COM1 and its backend.
#[derive(Debug)]
pub struct SerialDevice {
    /// The UART, shared with the vCPU threads.
    pub uart: Arc<Mutex<Uart>>,
    backend: Backend,
    terminal: Option<Terminal>,
}

#[derive(Debug)]
enum Backend {
    Stdout,
    File(Arc<File>),
    Unix {
        listener: Arc<UnixListener>,
        client: Arc<Mutex<Option<UnixStream>>>,
    },
    Null,
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
    /// Opens the backend and creates the UART (from saved `state`, if restoring).
    pub fn new(cfg: &SerialConfig, state: Option<&SerialSection>, irq: EventFd) -> Result<Self> {
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
                listener: Arc::new(crate::unix::listen(p).map_err(io("bind serial socket", p))?),
                client: Arc::new(Mutex::new(None)),
            },
        };
        Self::with_backend(backend, state, irq)
    }

    fn with_backend(backend: Backend, state: Option<&SerialSection>, irq: EventFd) -> Result<Self> {
        let out = match &backend {
            Backend::Stdout => SerialOut::Stdout,
            Backend::File(f) => SerialOut::File(f.clone()),
            Backend::Unix { client, .. } => SerialOut::Socket(client.clone()),
            Backend::Null => SerialOut::Null,
        };
        let trigger = IrqTrigger(irq);
        let uart = match state {
            Some(s) => Serial::from_state(&SerialState::from(s), trigger, NoEvents, out)
                .map_err(|e| Error::State(format!("serial state: {e:?}")))?,
            None => Serial::new(trigger, out),
        };
        let terminal = match backend {
            Backend::Stdout => Terminal::raw(),
            _ => None,
        };
        let dev = SerialDevice {
            uart: Arc::new(Mutex::new(uart)),
            backend,
            terminal,
        };
        dev.start_input();
        Ok(dev)
    }

    /// Rebuilds the device from fds handed over by the previous image (taken from `fds`).
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
        };
        Self::with_backend(backend, Some(state), irq)
    }

    /// Registers duplicates of the backend's fds for the next image.
    pub fn register_fds(&self, reg: &mut FdRegistry) -> Result<()> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<OwnedFd> {
            fd.try_clone_to_owned()
                .map_err(|e| Error::Io(format!("dup serial fd: {e}")))
        };
        use std::os::fd::AsFd;
        match &self.backend {
            Backend::File(f) => {
                reg.register("serial.file", FdKind::CONSOLE, dup(f.as_fd())?, b"")?
            }
            Backend::Unix { listener, client } => {
                reg.register(
                    "serial.listener",
                    FdKind::CONSOLE,
                    dup(listener.as_fd())?,
                    b"",
                )?;
                if let Some(c) = client.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    reg.register("serial.client", FdKind::CONSOLE, dup(c.as_fd())?, b"")?;
                }
            }
            Backend::Stdout | Backend::Null => {}
        }
        Ok(())
    }

    /// Saved register state.
    pub fn state(&self) -> SerialSection {
        SerialSection::from(&self.uart.lock().unwrap_or_else(|p| p.into_inner()).state())
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

    /// Starts the input thread for the backend, if it has input.
    fn start_input(&self) {
        let uart = self.uart.clone();
        let feed = move |bytes: &[u8]| {
            let _ = uart
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue_raw_bytes(bytes);
        };
        match &self.backend {
            Backend::Stdout if self.terminal.is_some() => {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = std::io::stdin().read(&mut buf) {
                        feed(&buf[..n]);
                    }
                });
            }
            Backend::Unix { listener, client } => {
                let listener = listener.clone();
                let client = client.clone();
                let existing = client
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .and_then(|c| c.try_clone().ok());
                std::thread::spawn(move || {
                    let serve = |mut s: UnixStream| {
                        let mut buf = [0u8; 64];
                        while let Ok(n @ 1..) = s.read(&mut buf) {
                            feed(&buf[..n]);
                        }
                    };
                    if let Some(s) = existing {
                        serve(s);
                    }
                    for s in listener.incoming().flatten() {
                        let Ok(reader) = s.try_clone() else { continue };
                        *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                        serve(reader);
                    }
                });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        )
        .unwrap();
        for b in b"hi\n" {
            dev.uart.lock().unwrap().write(0, *b).unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        std::fs::remove_file(&path).unwrap();
    }
}
