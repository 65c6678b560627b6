// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A QMP monitor on a UNIX socket: greeting, capabilities negotiation, commands answered with
//! `return` or `error`, timestamped events.
//!
//! The monitor is privileged, as QEMU's QMP is: a client can stop, save and restart the VM.
//! Its socket is mode 0600 whatever the umask (see [`crate::unix`]).
//!
//! One thread serves every client from an epoll loop ([`Monitor::poll`], called by the VMM's
//! control loop, which runs each command before it asks for the next):
//!
//! - sockets are non-blocking; each client's output waits in a buffer of at most
//!   [`MAX_OUTPUT`] bytes, written as the socket takes it. A client that does not read is
//!   disconnected when its buffer would overflow, without delaying anyone else.
//! - a client's socket is read only once every command already read from it has run, so
//!   the kernel's socket buffer is the queue: a flood of commands costs the VMM no memory,
//!   and needs no "queue full" answer.
//! - at most `max_clients` clients ([`DEFAULT_MAX_CLIENTS`]); one more gets a QMP error and
//!   is closed.
//!
//! Nothing a client sends is lost across a restart or transfer: the listener and every
//! client are handed to the next image ([`Monitor::register_fds`]), and what was read but not
//! run, with output not yet written, goes into the state ([`Monitor::carry`], section
//! `monitor`); the next image writes that output, answers the update, runs the carried
//! commands, then reads the sockets again.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cpr_fd::{FdKind, FdRegistry};
use cpr_snapshot::prelude::*;
use cpr_snapshot::Blob;
use serde_json::{json, Map, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::error::{Error, Result};
use crate::unix::Access;

/// Largest single QMP message accepted, in bytes.
pub const MAX_MESSAGE: usize = 64 << 10;
/// Largest output waiting for one client; a client that lets more pile up is disconnected.
pub const MAX_OUTPUT: usize = 1 << 20;
/// Default for `--max-clients`.
pub const DEFAULT_MAX_CLIENTS: usize = 16;
/// fd names of the listener and the clients in a handover.
const LISTENER_FD: &str = "monitor.listener";
/// fd kind of the listener.
pub const LISTENER_KIND: FdKind = FdKind(0x101);

const TOKEN_LISTENER: u64 = 0;
const TOKEN_CLIENT: u64 = 1 << 32;

/// A command for the VMM's control loop.
#[derive(Debug, Clone)]
pub struct Request {
    /// Client that sent it.
    pub client: u64,
    /// The client's `id`, echoed in the answer.
    pub id: Option<Value>,
    /// `execute`.
    pub command: String,
    /// `arguments` (empty if absent).
    pub arguments: Map<String, Value>,
}

/// Input a client sent that the previous image read but did not run.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct CarriedInput {
    /// The client.
    pub client: u64,
    /// Complete messages, as QMP text, in the order they arrived.
    pub replay: Blob,
    /// Whether the client's reader was discarding a bad run of input.
    pub skipping: bool,
    /// The start of an incomplete message.
    pub partial: Blob,
}

/// Output the previous image had not yet written to a client.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct CarriedOutput {
    /// The client.
    pub client: u64,
    /// The bytes, in order.
    pub bytes: Blob,
}

/// Monitor input and output carried across a restart or transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct MonitorSection {
    /// One entry per client with carried input.
    pub clients: Vec<CarriedInput>,
    /// One entry per client with pending output (added in version 2).
    #[state(since = 2, default = "no_output")]
    pub output: Vec<CarriedOutput>,
}

impl MonitorSection {
    fn no_output(_: u16) -> Vec<CarriedOutput> {
        Vec::new()
    }
}

impl Section for MonitorSection {
    const NAME: &'static str = "monitor";
    // An image that does not know it still serves the clients; it only misses their
    // commands that were in flight.
    const SKIPPABLE: bool = true;
}

/// A QMP error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpError {
    /// `class`: GenericError, CommandNotFound, ...
    pub class: &'static str,
    /// `desc`.
    pub desc: String,
}

impl QmpError {
    /// A GenericError.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

/// A QMP timestamp of `CLOCK_REALTIME` nanoseconds.
pub fn timestamp_of(realtime_ns: u64) -> Value {
    json!({"seconds": realtime_ns / 1_000_000_000, "microseconds": (realtime_ns % 1_000_000_000) / 1000})
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

fn greeting() -> Value {
    json!({"QMP": {"version": {"qemu": {"major": 0, "minor": 2, "micro": 0},
        "package": concat!("vmm-reference ", env!("CARGO_PKG_VERSION"))}, "capabilities": []}})
}

/// A queued command as QMP text, for replay by the next image.
fn message_text(m: &Queued) -> Vec<u8> {
    match m {
        Queued::Text(t) => {
            let mut t = t.clone();
            t.push(b'\n');
            t
        }
        Queued::Garbage(_) => Vec::new(),
    }
}

/// Splits a byte stream into top-level JSON values (QMP needs no newlines between them).
///
/// A value is an object or an array (the latter is answered as not an object). Anything
/// else outside a value is a bad run of input, which ends at white space or at the start of
/// a value, and gets one error: every input gets an answer.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Inside a bad run of input.
    skipping: bool,
}

/// One item from [`Splitter::push`].
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// A complete top-level JSON value's text.
    Message(Vec<u8>),
    /// Input that is not a JSON value, or too long; the splitter has reset.
    Garbage(String),
}

impl Splitter {
    /// Feeds bytes; returns complete messages and errors in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.depth == 0 {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {
                        self.skipping = false;
                        continue;
                    }
                    b'{' | b'[' => self.skipping = false,
                    _ if self.skipping => continue,
                    _ => {
                        // One error per bad run, not per byte.
                        out.push(Piece::Garbage(format!(
                            "JSON parse error: expected an object, found {:?}",
                            char::from(b)
                        )));
                        self.skipping = true;
                        continue;
                    }
                }
            }
            self.buf.push(b);
            if self.in_string {
                match (self.escape, b) {
                    (true, _) => self.escape = false,
                    (false, b'\\') => self.escape = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
            } else {
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            out.push(Piece::Message(std::mem::take(&mut self.buf)));
                        }
                    }
                    _ => {}
                }
            }
            if self.buf.len() > MAX_MESSAGE {
                *self = Splitter {
                    skipping: true,
                    ..Splitter::default()
                };
                out.push(Piece::Garbage(format!(
                    "message longer than {MAX_MESSAGE} bytes"
                )));
            }
        }
        out
    }

    /// What a reader that takes over needs: whether this splitter is in a bad run of input,
    /// and the bytes of the message it has started.
    pub fn save(&self) -> (bool, Vec<u8>) {
        (self.skipping, self.buf.clone())
    }

    /// A splitter that continues from [`save`](Self::save)d state. The saved bytes are fed
    /// again like any input, so whatever they contain is handled the same way; what that
    /// produced is returned (nothing, for state a splitter really saved).
    pub fn resume(skipping: bool, partial: &[u8]) -> (Splitter, Vec<Piece>) {
        let mut s = Splitter {
            skipping,
            ..Splitter::default()
        };
        let out = s.push(partial);
        (s, out)
    }
}

/// `execute`, `arguments` and `id` of a well-formed command.
pub type ParsedCommand = (String, Map<String, Value>, Option<Value>);

/// Checks a parsed message's shape: an object with a string `execute`, an optional object
/// `arguments`, an optional `id`, and nothing else.
pub fn parse_command(v: Value) -> std::result::Result<ParsedCommand, (QmpError, Option<Value>)> {
    let Value::Object(mut obj) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let bad = |d: String| (QmpError::generic(d), id.clone());
    let command = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad("QMP input member 'execute' must be a string".into())),
        None => return Err(bad("QMP input lacks member 'execute'".into())),
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad("QMP input member 'arguments' must be an object".into())),
    };
    if let Some(k) = obj.keys().next() {
        return Err(bad(format!("QMP input member '{k}' is unexpected")));
    }
    Ok((command, arguments, id))
}

/// Refuses any argument not in `allowed`, as QEMU does.
pub fn check_arguments(
    args: &Map<String, Value>,
    allowed: &[&str],
) -> std::result::Result<(), QmpError> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

/// Runs monitor input through the same splitting, JSON parsing and command checks as a
/// connection does, without a VMM (for the fuzzer and its seed replay). Returns the number of
/// well-formed commands.
///
/// It also checks that handing a reader over mid-stream is invisible: a second splitter is
/// saved and resumed ([`Splitter::save`], [`Splitter::resume`]) after every piece, as at an
/// update, and must produce exactly what the first one does; it panics if not.
#[doc(hidden)]
pub fn fuzz_input(data: &[u8]) -> usize {
    let mut splitter = Splitter::default();
    let mut handed_over = Splitter::default();
    let mut commands = 0;
    // Feed in uneven pieces, as a socket would deliver them.
    for chunk in data.chunks(7) {
        let pieces = splitter.push(chunk);
        let (skipping, partial) = handed_over.save();
        let (resumed, replayed) = Splitter::resume(skipping, &partial);
        assert!(
            replayed.is_empty(),
            "resuming saved state produced {replayed:?}"
        );
        handed_over = resumed;
        assert_eq!(
            handed_over.push(chunk),
            pieces,
            "a handed-over reader diverged"
        );
        for piece in pieces {
            if let Piece::Message(text) = piece {
                if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                    commands += usize::from(parse_command(v).is_ok());
                }
            }
        }
    }
    commands
}

/// A piece waiting for its turn.
#[derive(Debug)]
enum Queued {
    Text(Vec<u8>),
    Garbage(String),
}

#[derive(Debug)]
struct Client {
    stream: UnixStream,
    negotiated: bool,
    splitter: Splitter,
    queue: VecDeque<Queued>,
    out: Vec<u8>,
    /// The peer closed its side: run what is queued, then drop it.
    eof: bool,
    /// Watching for writability.
    want_out: bool,
}

/// What [`Monitor::poll`] found.
#[derive(Debug, Default)]
pub struct Polled {
    /// The next command to run. One at a time: what is not run yet stays queued in the
    /// monitor, where [`Monitor::carry`] finds it if this command is an update.
    pub request: Option<Request>,
    /// Tokens of the extra fds ([`Monitor::watch`]) that became readable.
    pub woken: Vec<u64>,
}

/// The monitor. See the [module documentation](self).
#[derive(Debug)]
pub struct Monitor {
    listener: UnixListener,
    epoll: Epoll,
    clients: BTreeMap<u64, Client>,
    next_id: u64,
    max_clients: usize,
    serving: bool,
    /// Whose turn it is to run a command first (round robin).
    turn: u64,
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is touched.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io(format!("monitor: {what}: {e}"))
}

impl Monitor {
    fn new(listener: UnixListener, max_clients: usize) -> Result<Monitor> {
        listener.set_nonblocking(true).map_err(io("listener"))?;
        let epoll = Epoll::new().map_err(io("epoll"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(io("epoll"))?;
        Ok(Monitor {
            listener,
            epoll,
            clients: BTreeMap::new(),
            next_id: 1,
            max_clients: max_clients.max(1),
            serving: false,
            turn: 0,
        })
    }

    /// Listens on `path` (a stale socket is replaced, anything else refused) and serves
    /// clients right away.
    pub fn bind(path: &Path, access: Access, max_clients: usize) -> Result<Monitor> {
        let listener = crate::unix::listen(path, access)
            .map_err(|e| Error::Io(format!("bind monitor `{}`: {e}", path.display())))?;
        let mut m = Monitor::new(listener, max_clients)?;
        m.start();
        Ok(m)
    }

    /// Rebuilds the monitor from fds handed over by the previous image: the listener and
    /// every client, which keep their negotiated state and get no new greeting, with the
    /// input and output `carried` in the state. It can answer and send events at once, but
    /// reads and accepts nothing until [`start`](Self::start).
    pub fn from_fds(
        fds: &mut FdRegistry,
        carried: Option<MonitorSection>,
        max_clients: usize,
    ) -> Result<Option<Monitor>> {
        let Some(listener) = fds.take(LISTENER_FD) else {
            return Ok(None);
        };
        let mut m = Monitor::new(UnixListener::from(listener.into_fd()), max_clients)?;
        let carried = carried.unwrap_or_default();
        for e in fds.take_kind(FdKind::MONITOR) {
            let meta = e.metadata();
            if meta.len() != 9 || meta[0] > 1 {
                return Err(Error::State(format!(
                    "monitor client `{}` has bad metadata",
                    e.name()
                )));
            }
            let mut idb = [0u8; 8];
            idb.copy_from_slice(&meta[1..9]);
            let id = u64::from_le_bytes(idb);
            if id == 0 || id >= u64::MAX / 2 || m.clients.contains_key(&id) {
                return Err(Error::State(format!("monitor client id {id} is not valid")));
            }
            let negotiated = meta[0] == 1;
            let stream = UnixStream::from(e.into_fd());
            let mut client = m.client(stream, negotiated)?;
            if let Some(c) = carried.clients.iter().find(|c| c.client == id) {
                for p in client.splitter.push(&c.replay) {
                    client.queue.push_back(Queued::from(p));
                }
                let (s, pieces) = Splitter::resume(c.skipping, &c.partial);
                client.splitter = s;
                client.queue.extend(pieces.into_iter().map(Queued::from));
            }
            if let Some(o) = carried.output.iter().find(|o| o.client == id) {
                client.out = o.bytes.0.clone();
            }
            m.add(id, client)?;
            m.next_id = m.next_id.max(id + 1);
        }
        Ok(Some(m))
    }

    fn client(&self, stream: UnixStream, negotiated: bool) -> Result<Client> {
        set_nonblocking(stream.as_raw_fd()).map_err(io("client"))?;
        Ok(Client {
            stream,
            negotiated,
            splitter: Splitter::default(),
            queue: VecDeque::new(),
            out: Vec::new(),
            eof: false,
            want_out: false,
        })
    }

    fn add(&mut self, id: u64, client: Client) -> Result<()> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                client.stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, TOKEN_CLIENT + id),
            )
            .map_err(io("epoll"))?;
        self.clients.insert(id, client);
        self.update_interest(id);
        Ok(())
    }

    /// Starts accepting and reading (the new side of an update calls it once the guest is
    /// its own).
    pub fn start(&mut self) {
        self.serving = true;
    }

    /// Watches another fd from the same loop: [`poll`](Self::poll) returns `token` in
    /// [`Polled::woken`] when it is readable.
    pub fn watch(&mut self, fd: RawFd, token: u64) -> Result<()> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(io("epoll"))
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    fn has_work(&self) -> bool {
        self.serving && self.clients.values().any(|c| !c.queue.is_empty() || c.eof)
    }

    /// Waits up to `timeout` for something to do (not at all if a command is queued), then
    /// returns the next command to run, taking clients in turn. Negotiation and malformed
    /// input are answered here.
    pub fn poll(&mut self, timeout: Duration) -> Result<Polled> {
        let mut polled = Polled::default();
        let wait = if self.has_work() {
            0
        } else {
            timeout.as_millis().min(i32::MAX as u128) as i32
        };
        let mut events = vec![EpollEvent::default(); 64];
        let n = match self.epoll.wait(wait, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => 0,
            Err(e) => return Err(io("epoll_wait")(e)),
        };
        for ev in &events[..n] {
            let token = ev.data();
            let set = ev.event_set();
            if token == TOKEN_LISTENER {
                if self.serving {
                    self.accept_all();
                }
            } else if token >= TOKEN_CLIENT {
                let id = token - TOKEN_CLIENT;
                if set.contains(EventSet::OUT) {
                    self.write_out(id);
                }
                if set.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                ) {
                    self.read_in(id);
                }
            } else {
                polled.woken.push(token);
            }
        }
        if self.serving {
            polled.request = self.next_request();
        }
        Ok(polled)
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= self.max_clients {
                        // Best effort: the error, then the end.
                        let _ = set_nonblocking(stream.as_raw_fd());
                        let msg = json!({"error": {"class": "GenericError",
                            "desc": format!("too many monitor clients ({} allowed)", self.max_clients)}});
                        let _ = (&stream).write_all(format!("{msg}\r\n").as_bytes());
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let Ok(mut c) = self.client(stream, false) else {
                        continue;
                    };
                    c.out = line(&greeting());
                    if self.add(id, c).is_ok() {
                        self.write_out(id);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // WouldBlock: done. Anything else (out of fds, say): try at the next event.
                Err(_) => return,
            }
        }
    }

    /// Reads a client's socket, but only once every command already read from it has run.
    fn read_in(&mut self, id: u64) {
        if !self.serving {
            return;
        }
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if !c.queue.is_empty() || c.eof {
            return;
        }
        let mut buf = [0u8; 4096];
        match (&c.stream).read(&mut buf) {
            Ok(0) => c.eof = true,
            Ok(n) => {
                let pieces = c.splitter.push(&buf[..n]);
                c.queue.extend(pieces.into_iter().map(Queued::from));
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => c.eof = true,
        }
        self.update_interest(id);
    }

    /// Stops reading a client with queued commands (level-triggered epoll would wake us for
    /// nothing); watches writability while output waits.
    fn update_interest(&mut self, id: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let mut set = EventSet::empty();
        if c.queue.is_empty() && !c.eof {
            set |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if !c.out.is_empty() {
            set |= EventSet::OUT;
        }
        c.want_out = !c.out.is_empty();
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            c.stream.as_raw_fd(),
            EpollEvent::new(set, TOKEN_CLIENT + id),
        );
    }

    /// The next command, from the next client in turn that has one; answers negotiation and
    /// errors on the way, and drops clients that are done.
    fn next_request(&mut self) -> Option<Request> {
        let ids: Vec<u64> = self
            .clients
            .range(self.turn..)
            .chain(self.clients.range(..self.turn))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            while let Some(piece) = self.clients.get_mut(&id).and_then(|c| c.queue.pop_front()) {
                if let Some(r) = self.handle(id, piece) {
                    self.turn = id + 1;
                    self.update_interest(id);
                    return Some(r);
                }
            }
            if self.clients.get(&id).is_some_and(|c| c.eof) {
                self.drop_client(id);
            } else {
                self.update_interest(id);
            }
        }
        None
    }

    fn handle(&mut self, client: u64, piece: Queued) -> Option<Request> {
        let text = match piece {
            Queued::Garbage(desc) => {
                self.reply(client, None, Err(QmpError::generic(desc)));
                return None;
            }
            Queued::Text(t) => t,
        };
        let value: Value = match serde_json::from_slice(&text) {
            Ok(v) => v,
            Err(e) => {
                self.reply(
                    client,
                    None,
                    Err(QmpError::generic(format!("JSON parse error: {e}"))),
                );
                return None;
            }
        };
        let (command, arguments, id) = match parse_command(value) {
            Ok(c) => c,
            Err((e, id)) => {
                self.reply(client, id, Err(e));
                return None;
            }
        };
        let negotiated = self.clients.get(&client).is_some_and(|c| c.negotiated);
        if command == "qmp_capabilities" {
            let r = if negotiated {
                Err(QmpError {
                    class: "CommandNotFound",
                    desc: "Capabilities negotiation is already complete, command ignored".into(),
                })
            } else {
                negotiate(&arguments)
            };
            if r.is_ok() {
                if let Some(c) = self.clients.get_mut(&client) {
                    c.negotiated = true;
                }
            }
            self.reply(client, id, r);
            return None;
        }
        if !negotiated {
            self.reply(
                client,
                id,
                Err(QmpError {
                    class: "CommandNotFound",
                    desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
                }),
            );
            return None;
        }
        Some(Request {
            client,
            id,
            command,
            arguments,
        })
    }

    fn drop_client(&mut self, id: u64) {
        if let Some(c) = self.clients.remove(&id) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Writes what the socket takes now; a client whose peer is gone is dropped.
    fn write_out(&mut self, id: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        while !c.out.is_empty() {
            match (&c.stream).write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.drop_client(id);
                    return;
                }
            }
        }
        if c.out.is_empty() == c.want_out {
            self.update_interest(id);
        }
    }

    fn queue_out(&mut self, id: u64, bytes: &[u8]) {
        if self.append_out(id, bytes) {
            self.write_out(id);
        }
    }

    /// Appends to a client's output without writing it; false if the client is gone (or
    /// was just dropped for not reading).
    fn append_out(&mut self, id: u64, bytes: &[u8]) -> bool {
        let Some(c) = self.clients.get_mut(&id) else {
            return false;
        };
        if c.out.len() + bytes.len() > MAX_OUTPUT {
            // It does not read: disconnect it rather than let it hold anyone up.
            log::warn!("monitor: client {id} does not read its answers; disconnected");
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            self.drop_client(id);
            return false;
        }
        c.out.extend_from_slice(bytes);
        true
    }

    /// Answers a command.
    pub fn reply(
        &mut self,
        client: u64,
        id: Option<Value>,
        result: std::result::Result<Value, QmpError>,
    ) {
        let mut msg = match result {
            Ok(v) => json!({ "return": v }),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        };
        if let Some(id) = id {
            msg["id"] = id;
        }
        self.queue_out(client, &line(&msg));
    }

    /// Sends an event to every negotiated client, timestamped now.
    pub fn event(&mut self, name: &str, data: Option<Value>) {
        self.event_at(name, data, now_ns());
    }

    /// Sends an event stamped with `realtime_ns` (the moment it describes, e.g. when the
    /// last vCPU stopped).
    pub fn event_at(&mut self, name: &str, data: Option<Value>, realtime_ns: u64) {
        for id in self.queue_event_at(name, data, realtime_ns) {
            self.write_out(id);
        }
    }

    /// Queues an event as [`event_at`](Self::event_at) does, without writing it: it goes
    /// out with the next write to each client (the next event or answer), or, in a restart
    /// or transfer, with the output the next image is handed. Returns the clients queued
    /// to.
    pub fn queue_event_at(
        &mut self,
        name: &str,
        data: Option<Value>,
        realtime_ns: u64,
    ) -> Vec<u64> {
        let mut msg = json!({"event": name, "timestamp": timestamp_of(realtime_ns)});
        if let Some(d) = data {
            msg["data"] = d;
        }
        log::info!(
            "event {name} {}",
            msg.get("data").map(Value::to_string).unwrap_or_default()
        );
        let bytes = line(&msg);
        let ids: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| c.negotiated)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter(|&id| self.append_out(id, &bytes))
            .collect()
    }

    /// Writes pending output for up to `time` (before the process exits).
    pub fn flush_for(&mut self, time: Duration) {
        let deadline = Instant::now() + time;
        loop {
            let ids: Vec<u64> = self.clients.keys().copied().collect();
            for id in ids {
                self.write_out(id);
            }
            let pending: Vec<libc::pollfd> = self
                .clients
                .values()
                .filter(|c| !c.out.is_empty())
                .map(|c| libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                })
                .collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if pending.is_empty() || left.is_zero() {
                return;
            }
            let mut fds = pending;
            // SAFETY: a valid array of pollfds that lives for the call.
            unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    left.as_millis().min(100) as i32,
                )
            };
        }
    }

    /// Registers duplicates of the listener and client fds for the next image.
    pub fn register_fds(
        &self,
        mut reg: impl FnMut(&str, FdKind, OwnedFd, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<OwnedFd> {
            fd.try_clone_to_owned().map_err(io("dup"))
        };
        reg(LISTENER_FD, LISTENER_KIND, dup(self.listener.as_fd())?, b"")?;
        for (id, c) in &self.clients {
            let mut meta = vec![u8::from(c.negotiated)];
            meta.extend_from_slice(&id.to_le_bytes());
            reg(
                &format!("monitor.client.{id}"),
                FdKind::MONITOR,
                dup(c.stream.as_fd())?,
                &meta,
            )?;
        }
        Ok(())
    }

    /// What the next image needs to carry on: per client, the messages read but not run
    /// and the start of an incomplete one, and the output not yet written.
    pub fn carry(&self) -> MonitorSection {
        let mut out = MonitorSection::default();
        for (id, c) in &self.clients {
            let replay: Vec<u8> = c.queue.iter().flat_map(message_text).collect();
            let (skipping, partial) = c.splitter.save();
            if !replay.is_empty() || skipping || !partial.is_empty() {
                out.clients.push(CarriedInput {
                    client: *id,
                    replay: Blob(replay),
                    skipping,
                    partial: Blob(partial),
                });
            }
            if !c.out.is_empty() {
                out.output.push(CarriedOutput {
                    client: *id,
                    bytes: Blob(c.out.clone()),
                });
            }
        }
        out
    }
}

impl From<Piece> for Queued {
    fn from(p: Piece) -> Queued {
        match p {
            Piece::Message(t) => Queued::Text(t),
            Piece::Garbage(g) => Queued::Garbage(g),
        }
    }
}

fn line(v: &Value) -> Vec<u8> {
    let mut t = v.to_string().into_bytes();
    t.extend_from_slice(b"\r\n");
    t
}

/// `qmp_capabilities`: this monitor offers no capability (no out-of-band execution).
fn negotiate(args: &Map<String, Value>) -> std::result::Result<Value, QmpError> {
    check_arguments(args, &["enable"])?;
    match args.get("enable") {
        None => Ok(json!({})),
        Some(Value::Array(caps)) => match caps.first() {
            None => Ok(json!({})),
            Some(Value::String(c)) => Err(QmpError::generic(format!(
                "Capability '{c}' is not available on this monitor"
            ))),
            Some(_) => Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array of strings",
            )),
        },
        Some(_) => Err(QmpError::generic(
            "Invalid parameter type for 'enable', expected: array of strings",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_finds_objects_without_newlines() {
        let mut s = Splitter::default();
        let out = s.push(br#"{"execute":"a"}{"execute":"b","arguments":{"x":"}{"}}"#);
        assert_eq!(out.len(), 2);
        let out = s.push(br#"  {"execute": "c", "arguments": {"s": "\"}"#);
        assert!(out.is_empty(), "incomplete");
        let out = s.push(b"\"}}\r\n");
        assert_eq!(
            out,
            vec![Piece::Message(
                br#"{"execute": "c", "arguments": {"s": "\"}"}}"#.to_vec()
            )]
        );
    }

    /// Every input gets an answer: a bad run is one error, and what follows it on the same
    /// line is still read.
    #[test]
    fn splitter_answers_every_input_and_caps_size() {
        let mut s = Splitter::default();
        let out = s.push(b"xy{}\n[1, {2}] nonsense {\"execute\":\"q\"}\n");
        assert_eq!(out.len(), 5, "{out:?}");
        assert!(matches!(out[0], Piece::Garbage(_)));
        assert_eq!(out[1], Piece::Message(b"{}".to_vec()));
        assert_eq!(out[2], Piece::Message(b"[1, {2}]".to_vec()));
        assert!(matches!(out[3], Piece::Garbage(_)));
        assert_eq!(out[4], Piece::Message(br#"{"execute":"q"}"#.to_vec()));
        assert_eq!(s.push(b"x").len(), 1);
        let mut big = b"{\"a\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_MESSAGE + 10));
        let out = s.push(&big);
        assert!(out
            .iter()
            .any(|p| matches!(p, Piece::Garbage(m) if m.contains("longer"))));
    }

    #[test]
    fn command_shape_and_arguments_are_checked() {
        assert!(parse_command(json!({"execute": "stop", "id": 1})).is_ok());
        let (e, id) = parse_command(json!({"execute": 3, "id": "x"})).unwrap_err();
        assert_eq!(id, Some(json!("x")));
        assert!(e.desc.contains("string"));
        assert!(parse_command(json!({"arguments": {}})).is_err());
        assert!(parse_command(json!({"execute": "a", "arguments": []})).is_err());
        assert!(parse_command(json!({"execute": "a", "bogus": 1})).is_err());
        assert!(parse_command(json!([1])).is_err());
        let args = json!({"x": 1}).as_object().unwrap().clone();
        assert_eq!(
            check_arguments(&args, &[]).unwrap_err().desc,
            "Parameter 'x' is unexpected"
        );
        assert!(check_arguments(&args, &["x"]).is_ok());
        let oob = json!({"enable": ["oob"]}).as_object().unwrap().clone();
        assert!(negotiate(&oob)
            .unwrap_err()
            .desc
            .contains("'oob' is not available"));
        assert!(negotiate(&Map::new()).is_ok());
        let none = json!({"enable": []}).as_object().unwrap().clone();
        assert!(negotiate(&none).is_ok());
    }

    #[test]
    fn splitter_state_survives_save_and_resume() {
        let mut s = Splitter::default();
        assert!(s.push(br#"{"a": "}\"{", "b": [1, {"#).is_empty());
        let (skipping, partial) = s.save();
        let (mut t, out) = Splitter::resume(skipping, &partial);
        assert!(out.is_empty());
        assert_eq!(
            t.push(b"}]} x"),
            vec![
                Piece::Message(br#"{"a": "}\"{", "b": [1, {}]}"#.to_vec()),
                Piece::Garbage("JSON parse error: expected an object, found 'x'".into())
            ]
        );
        let (skipping, partial) = t.save();
        assert!(skipping && partial.is_empty());
        let (mut u, _) = Splitter::resume(skipping, &partial);
        assert!(u.push(b"yz\n").is_empty(), "the rest of the bad run");
        assert_eq!(u.push(b"{}"), vec![Piece::Message(b"{}".to_vec())]);
    }
}

#[cfg(test)]
mod loop_tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    struct Fixture {
        dir: tempfile::TempDir,
        monitor: Monitor,
    }

    fn fixture(max_clients: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let monitor =
            Monitor::bind(&dir.path().join("m.sock"), Access::OWNER, max_clients).unwrap();
        Fixture { dir, monitor }
    }

    impl Fixture {
        fn connect(&self) -> (UnixStream, BufReader<UnixStream>) {
            let s = UnixStream::connect(self.dir.path().join("m.sock")).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let r = BufReader::new(s.try_clone().unwrap());
            (s, r)
        }

        /// Polls until `n` requests arrived (answering negotiation on the way).
        fn requests(&mut self, n: usize) -> Vec<Request> {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut got = Vec::new();
            while got.len() < n {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} requests",
                    got.len()
                );
                got.extend(
                    self.monitor
                        .poll(Duration::from_millis(50))
                        .unwrap()
                        .request,
                );
            }
            got
        }

        /// Polls until `r` has a line to read, and reads it.
        fn line(&mut self, r: &mut BufReader<UnixStream>) -> String {
            r.get_ref().set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut l = String::new();
            loop {
                match r.read_line(&mut l) {
                    Ok(_) if l.ends_with('\n') => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
                assert!(Instant::now() < deadline, "no line");
                self.monitor.poll(Duration::from_millis(10)).unwrap();
            }
            r.get_ref().set_nonblocking(false).unwrap();
            l
        }

        fn negotiated(&mut self) -> (UnixStream, BufReader<UnixStream>) {
            let (s, mut r) = self.connect();
            assert!(self.line(&mut r).contains("QMP"));
            (&s).write_all(br#"{"execute":"qmp_capabilities"}"#)
                .unwrap();
            assert!(self.line(&mut r).contains("return"));
            (s, r)
        }
    }

    /// A queued event is not written until the next write to the client, and then goes
    /// first, with its own stamp.
    #[test]
    fn a_queued_event_goes_out_before_the_next_one() {
        let mut f = fixture(4);
        let (_s, mut r) = f.negotiated();
        let queued = f.monitor.queue_event_at("STOP", None, 1_000_000_000);
        assert_eq!(queued.len(), 1);
        r.get_ref().set_nonblocking(true).unwrap();
        let mut l = String::new();
        // Polled, the monitor writes nothing: the event waits for the next write.
        f.monitor.poll(Duration::from_millis(10)).unwrap();
        assert_eq!(
            r.read_line(&mut l).unwrap_err().kind(),
            ErrorKind::WouldBlock,
            "{l}"
        );
        r.get_ref().set_nonblocking(false).unwrap();
        f.monitor.event_at("RESUME", None, 2_000_000_000);
        let stop: Value = serde_json::from_str(&f.line(&mut r)).unwrap();
        let resume: Value = serde_json::from_str(&f.line(&mut r)).unwrap();
        assert_eq!(
            (&stop["event"], &stop["timestamp"]["seconds"]),
            (&json!("STOP"), &json!(1))
        );
        assert_eq!(
            (&resume["event"], &resume["timestamp"]["seconds"]),
            (&json!("RESUME"), &json!(2))
        );
    }

    #[test]
    fn a_client_that_does_not_read_is_dropped_without_delaying_another() {
        let mut f = fixture(16);
        let (stuck, _stuck_r) = f.negotiated();
        let (other, mut other_r) = f.negotiated();
        // Flood with junk lines whose error answers `stuck` never reads.
        let junk = b"x\n".repeat(8192);
        stuck.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while f.monitor.client_count() == 2 {
            let _ = (&stuck).write(&junk);
            f.monitor.poll(Duration::from_millis(1)).unwrap();
            assert!(Instant::now() < deadline, "never disconnected");
        }
        (&other).write_all(br#"{"execute":"z","id":1}"#).unwrap();
        let r = f.requests(1);
        assert_eq!(r[0].command, "z");
        f.monitor.reply(r[0].client, r[0].id.clone(), Ok(json!({})));
        assert!(f.line(&mut other_r).contains("return"));
    }

    #[test]
    fn clients_over_the_limit_get_an_error_and_the_rest_are_served() {
        let mut f = fixture(2);
        let (_a, _ra) = f.negotiated();
        let (_b, _rb) = f.negotiated();
        let (_c, mut rc) = f.connect();
        let l = f.line(&mut rc);
        assert!(l.contains("too many monitor clients (2 allowed)"), "{l}");
        assert_eq!(f.monitor.client_count(), 2);
    }

    #[test]
    fn a_flood_of_commands_stays_in_the_socket_until_the_previous_ones_ran() {
        let mut f = fixture(4);
        let (s, _r) = f.negotiated();
        let many = br#"{"execute":"a"}"#.repeat(5000);
        s.set_nonblocking(true).unwrap();
        let _ = (&s).write(&many);
        f.requests(1);
        // One chunk was read (at most 4096 bytes: ~270 commands), not the flood.
        let queued: usize = f.monitor.clients.values().map(|c| c.queue.len()).sum();
        assert!(queued <= 4096 / 15, "read only one chunk: {queued} queued");
        let more = f.requests(10);
        assert!(more.iter().all(|r| r.command == "a"));
    }

    /// The state a restart carries: queued commands, a started one, unwritten output;
    /// a second monitor built from it replays them in order before reading the socket.
    #[test]
    fn every_state_this_build_writes_carries_the_monitor_output() {
        // Output pending at a restart or transfer reaches its client only through the
        // carried output (the old image no longer flushes it before the exec): a state
        // version without it (monitor 1) would lose it.
        let schema = crate::update::schema();
        for v in schema.versions() {
            assert!(
                schema.type_version::<MonitorSection>(v) >= 2,
                "state version {v} has monitor {}",
                schema.type_version::<MonitorSection>(v)
            );
        }
    }

    #[test]
    fn input_and_output_are_carried_to_the_next_monitor() {
        let mut f = fixture(4);
        let (s, mut r) = f.negotiated();
        (&s).write_all(br#"{"execute":"a","id":1}{"execute":"b","id":2}{"execute":"c","#)
            .unwrap();
        // "a" is handed out (a cpr-save, say); "b" stays queued in the monitor.
        let a = f.requests(1);
        assert_eq!(a[0].command, "a");
        f.monitor.event("CPR", None);
        // The event is unwritten in the old monitor: pretend the socket was full.
        let carried = {
            let mut c = f.monitor.carry();
            if c.output.is_empty() {
                c.output.push(CarriedOutput {
                    client: 1,
                    bytes: Blob(b"{\"event\":\"X\"}\r\n".to_vec()),
                });
            }
            c
        };
        assert_eq!(carried.clients.len(), 1);
        let mut reg = FdRegistry::new();
        f.monitor
            .register_fds(|n, k, fd, m| Ok(reg.register(n, k, fd, m)?))
            .unwrap();
        let mut next = Monitor::from_fds(&mut reg, Some(carried), 4)
            .unwrap()
            .unwrap();
        (&s).write_all(br#""id":3}"#).unwrap();
        next.start();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(next.poll(Duration::from_millis(10)).unwrap().request);
            assert!(Instant::now() < deadline);
        }
        assert_eq!(
            got.iter()
                .map(|r| (r.command.as_str(), r.id.clone()))
                .collect::<Vec<_>>(),
            [("b", Some(json!(2))), ("c", Some(json!(3)))]
        );
        // Carried output reaches the client from the new monitor.
        next.flush_for(Duration::from_secs(10));
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("event"), "{l}");
    }
}
