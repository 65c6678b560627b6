// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A QMP monitor on a UNIX socket: greeting, capabilities negotiation, commands answered with
//! `return` or `error`, timestamped events. Clients and the listening socket are handed to
//! the next image on restart, so a connected client stays connected and negotiated.
//!
//! Nothing a client sends is lost across a restart or transfer: [`Monitor::hold`] parks
//! every monitor thread (input not yet read stays in the socket for the next image), and
//! [`Monitor::carry`] packs what was read but not yet executed into a [`MonitorSection`],
//! which the next image replays before reading more ([`Monitor::start`]).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cpr_fd::{FdKind, FdRegistry};
use cpr_snapshot::prelude::*;
use cpr_snapshot::Blob;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::gate::{lock, Gate};
use crate::ControlMsg;

/// Largest single QMP message accepted, in bytes.
pub const MAX_MESSAGE: usize = 64 << 10;

/// How long a reply or event may wait for a client that does not read; the client is then
/// disconnected, so it cannot stall the VMM.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A command for the VMM's control loop.
#[derive(Debug)]
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

#[derive(Debug)]
struct Client {
    id: u64,
    stream: UnixStream,
    negotiated: bool,
    /// While the monitor is held: input this client's thread read but had not completed
    /// into a message ([`Splitter::save`]).
    held_input: Option<(bool, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct Clients {
    list: Vec<Client>,
    /// Connections handed over by the previous image, not yet served ([`Monitor::start`]).
    idle: Vec<(u64, UnixStream)>,
}

/// Input a client sent that the previous image read but did not execute.
#[derive(Clone, Debug, Default, PartialEq, Eq, Versionize)]
pub struct CarriedInput {
    /// The client.
    pub client: u64,
    /// Complete commands, as QMP text, in the order they arrived.
    pub replay: Blob,
    /// Whether the client's reader was discarding the rest of a malformed line.
    pub skipping: bool,
    /// The start of an incomplete message.
    pub partial: Blob,
}

/// Monitor input carried across a restart or transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Versionize)]
pub struct MonitorSection {
    /// One entry per client with carried input.
    pub clients: Vec<CarriedInput>,
}

impl Section for MonitorSection {
    const NAME: &'static str = "monitor";
    // An image that does not know it still serves the clients; it only misses their
    // commands that were in flight.
    const SKIPPABLE: bool = true;
}

/// The monitor.
#[derive(Debug, Clone)]
pub struct Monitor {
    listener: Arc<UnixListener>,
    clients: Arc<Mutex<Clients>>,
    next_id: Arc<AtomicU64>,
    tx: Sender<ControlMsg>,
    gate: Arc<Gate>,
    started: Arc<AtomicBool>,
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

fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

fn greeting() -> Value {
    json!({"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0},
        "package": concat!("vmm-reference ", env!("CARGO_PKG_VERSION"))}, "capabilities": []}})
}

fn send(stream: &UnixStream, msg: &Value) -> bool {
    let mut text = msg.to_string();
    text.push_str("\r\n");
    if (&*stream).write_all(text.as_bytes()).is_err() {
        // Gone, or not reading for WRITE_TIMEOUT: disconnect it rather than stall the VMM.
        // Its reader thread then sees the end of input and removes it.
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return false;
    }
    true
}

/// A queued command as QMP text, for replay by the next image.
fn request_text(r: &Request) -> String {
    let mut v = json!({"execute": r.command, "arguments": r.arguments});
    if let Some(id) = &r.id {
        v["id"] = id.clone();
    }
    let mut text = v.to_string();
    text.push('\n');
    text
}

/// Splits a byte stream into top-level JSON objects (QMP needs no newlines between them).
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Discarding the rest of a line that did not start an object.
    skipping: bool,
}

/// One item from [`Splitter::push`].
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// A complete top-level JSON value's text.
    Message(Vec<u8>),
    /// Input that is not a JSON object, or too long; the splitter has reset.
    Garbage(String),
}

impl Splitter {
    /// Feeds bytes; returns complete messages and errors in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.skipping {
                self.skipping = b != b'\n';
                continue;
            }
            if self.depth == 0 {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => continue,
                    b'{' => {}
                    _ => {
                        // One error per bad line, not per byte.
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
                *self = Splitter::default();
                out.push(Piece::Garbage(format!(
                    "message longer than {MAX_MESSAGE} bytes"
                )));
            }
        }
        out
    }

    /// What a reader that takes over needs: whether this splitter is discarding the rest of
    /// a bad line, and the bytes of the message it has started.
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

impl Monitor {
    /// Listens on `path` (replacing a stale socket, refusing to replace anything else) and
    /// serves clients right away.
    pub fn bind(path: &Path, tx: Sender<ControlMsg>) -> Result<Monitor> {
        let listener = crate::unix::listen(path)
            .map_err(|e| Error::Io(format!("bind monitor `{}`: {e}", path.display())))?;
        let m = Monitor::new(listener, tx)?;
        m.start(None);
        Ok(m)
    }

    fn new(listener: UnixListener, tx: Sender<ControlMsg>) -> Result<Monitor> {
        // The acceptor polls before it accepts; non-blocking, a connection that another
        // image holding the same listener took first cannot block it.
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Io(format!("monitor listener: {e}")))?;
        Ok(Monitor {
            listener: Arc::new(listener),
            clients: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            tx,
            gate: Arc::new(Gate::new("monitor")?),
            started: Arc::default(),
        })
    }

    /// Rebuilds the monitor from fds handed over by the previous image: the listener and
    /// every client, which keep their negotiated state and get no new greeting. It can
    /// answer and send events at once, but reads nothing until [`start`](Self::start).
    pub fn from_fds(fds: &mut FdRegistry, tx: Sender<ControlMsg>) -> Result<Option<Monitor>> {
        let Some(listener) = fds.take("monitor.listener") else {
            return Ok(None);
        };
        let m = Monitor::new(UnixListener::from(listener.into_fd()), tx)?;
        let mut max_id = 0;
        let mut clients = lock(&m.clients);
        for e in fds.take_kind(FdKind::MONITOR) {
            let meta = e.metadata();
            if meta.len() != 9 {
                return Err(Error::State(format!(
                    "monitor client `{}` has bad metadata",
                    e.name()
                )));
            }
            let id = u64::from_le_bytes(meta[1..9].try_into().unwrap_or_default());
            let negotiated = meta[0] == 1;
            max_id = max_id.max(id);
            let stream = UnixStream::from(e.into_fd());
            let reader = stream
                .try_clone()
                .and_then(|r| stream.set_write_timeout(Some(WRITE_TIMEOUT)).map(|()| r))
                .map_err(|e| Error::Io(format!("monitor client {id}: {e}")))?;
            clients.list.push(Client {
                id,
                stream,
                negotiated,
                held_input: None,
            });
            clients.idle.push((id, reader));
        }
        drop(clients);
        m.next_id.store(max_id.saturating_add(1), Ordering::SeqCst);
        Ok(Some(m))
    }

    /// Starts serving (once): handed-over clients first replay the input `carried` from the
    /// previous image, then read their sockets; new connections are accepted.
    pub fn start(&self, carried: Option<MonitorSection>) {
        let mut carried = carried.map(|c| c.clients).unwrap_or_default();
        if self.started.swap(true, Ordering::SeqCst) {
            if !carried.is_empty() {
                log::warn!("monitor: already serving; carried input is dropped");
            }
            return;
        }
        let idle = std::mem::take(&mut lock(&self.clients).idle);
        for (id, reader) in idle {
            let input = carried
                .iter()
                .position(|c| c.client == id)
                .map(|i| carried.swap_remove(i));
            self.spawn_reader(id, reader, input);
        }
        for c in carried {
            log::warn!(
                "monitor: dropping carried input of client {}, which is gone",
                c.client
            );
        }
        self.start_accepting();
    }

    /// Registers duplicates of the listener and client fds for the next image.
    pub fn register_fds(&self, reg: &mut FdRegistry) -> Result<()> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<OwnedFd> {
            fd.try_clone_to_owned()
                .map_err(|e| Error::Io(format!("dup monitor fd: {e}")))
        };
        reg.register(
            "monitor.listener",
            FdKind(0x101),
            dup(self.listener.as_fd())?,
            b"",
        )?;
        for c in &lock(&self.clients).list {
            let mut meta = vec![u8::from(c.negotiated)];
            meta.extend_from_slice(&c.id.to_le_bytes());
            reg.register(
                &format!("monitor.client.{}", c.id),
                FdKind::MONITOR,
                dup(c.stream.as_fd())?,
                &meta,
            )?;
        }
        Ok(())
    }

    /// Parks every monitor thread before a live update. Input not yet read stays in the
    /// sockets, for whichever image reads next; input read but not yet a command is kept
    /// for [`carry`](Self::carry); commands already sent stay in the control loop's queue.
    /// No connection is accepted while held. Fails, and releases again, if a thread does
    /// not park within `timeout` (one writing to a client that does not read is stuck for
    /// up to [`WRITE_TIMEOUT`]).
    pub fn hold(&self, timeout: Duration) -> Result<()> {
        self.gate.hold(timeout)
    }

    /// Lets the threads run again after [`hold`](Self::hold) (the update failed).
    pub fn release(&self) {
        for c in &mut lock(&self.clients).list {
            c.held_input = None;
        }
        self.gate.release();
    }

    /// Packs the input of a held monitor for the next image: per client, the commands
    /// `queued` for the control loop (in order), then what its reader had started.
    pub fn carry<'a>(&self, queued: impl IntoIterator<Item = &'a Request>) -> MonitorSection {
        let queued: Vec<&Request> = queued.into_iter().collect();
        let clients = lock(&self.clients);
        let mut out = Vec::new();
        for c in &clients.list {
            let replay: String = queued
                .iter()
                .filter(|r| r.client == c.id)
                .map(|r| request_text(r))
                .collect();
            let (skipping, partial) = c.held_input.clone().unwrap_or_default();
            if !replay.is_empty() || skipping || !partial.is_empty() {
                out.push(CarriedInput {
                    client: c.id,
                    replay: Blob(replay.into_bytes()),
                    skipping,
                    partial: Blob(partial),
                });
            }
        }
        MonitorSection { clients: out }
    }

    fn start_accepting(&self) {
        let m = self.clone();
        self.gate.thread_started();
        std::thread::spawn(move || loop {
            m.gate.until_readable(m.listener.as_fd(), || {});
            match m.listener.accept() {
                Ok((stream, _)) => {
                    let id = m.next_id.fetch_add(1, Ordering::SeqCst);
                    m.add_client(id, stream);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // Out of fds, for instance: back off instead of spinning.
                    log::error!("monitor: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
    }

    fn add_client(&self, id: u64, stream: UnixStream) {
        let Ok(reader) = stream.try_clone() else {
            return;
        };
        if stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() || !send(&stream, &greeting()) {
            return;
        }
        lock(&self.clients).list.push(Client {
            id,
            stream,
            negotiated: false,
            held_input: None,
        });
        self.spawn_reader(id, reader, None);
    }

    fn spawn_reader(&self, id: u64, reader: UnixStream, carried: Option<CarriedInput>) {
        let m = self.clone();
        self.gate.thread_started();
        std::thread::spawn(move || {
            m.serve(id, reader, carried);
            lock(&m.clients).list.retain(|c| c.id != id);
            m.gate.thread_ended();
        });
    }

    fn serve(&self, id: u64, mut reader: UnixStream, carried: Option<CarriedInput>) {
        let mut splitter = Splitter::default();
        if let Some(c) = carried {
            let replayed = splitter.push(&c.replay);
            self.handle_pieces(id, replayed);
            let (resumed, pieces) = Splitter::resume(c.skipping, &c.partial);
            splitter = resumed;
            self.handle_pieces(id, pieces);
        }
        let mut buf = [0u8; 4096];
        loop {
            self.gate.until_readable(reader.as_fd(), || {
                if let Some(c) = lock(&self.clients).list.iter_mut().find(|c| c.id == id) {
                    c.held_input = Some(splitter.save());
                }
            });
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let pieces = splitter.push(&buf[..n]);
            self.handle_pieces(id, pieces);
        }
    }

    fn handle_pieces(&self, client: u64, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Garbage(desc) => self.reply(client, None, Err(QmpError::generic(desc))),
                Piece::Message(text) => self.handle(client, &text),
            }
        }
    }

    fn handle(&self, client: u64, text: &[u8]) {
        let value: Value = match serde_json::from_slice(text) {
            Ok(v) => v,
            Err(e) => {
                return self.reply(
                    client,
                    None,
                    Err(QmpError::generic(format!("JSON parse error: {e}"))),
                )
            }
        };
        let (command, arguments, id) = match parse_command(value) {
            Ok(c) => c,
            Err((e, id)) => return self.reply(client, id, Err(e)),
        };
        let negotiated = self.is_negotiated(client);
        if command == "qmp_capabilities" {
            if negotiated {
                return self.reply(
                    client,
                    id,
                    Err(QmpError {
                        class: "CommandNotFound",
                        desc: "Capabilities negotiation is already complete, command ignored"
                            .into(),
                    }),
                );
            }
            self.set_negotiated(client);
            return self.reply(client, id, Ok(json!({})));
        }
        if !negotiated {
            return self.reply(
                client,
                id,
                Err(QmpError {
                    class: "CommandNotFound",
                    desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
                }),
            );
        }
        let _ = self.tx.send(ControlMsg::Qmp(Request {
            client,
            id,
            command,
            arguments,
        }));
    }

    fn is_negotiated(&self, client: u64) -> bool {
        lock(&self.clients)
            .list
            .iter()
            .any(|c| c.id == client && c.negotiated)
    }

    fn set_negotiated(&self, client: u64) {
        for c in &mut lock(&self.clients).list {
            if c.id == client {
                c.negotiated = true;
            }
        }
    }

    /// Answers a command.
    pub fn reply(
        &self,
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
        let clients = lock(&self.clients);
        if let Some(c) = clients.list.iter().find(|c| c.id == client) {
            send(&c.stream, &msg);
        }
    }

    /// Sends an event to every negotiated client.
    pub fn event(&self, name: &str, data: Option<Value>) {
        let mut msg = json!({"event": name, "timestamp": timestamp()});
        if let Some(d) = data {
            msg["data"] = d;
        }
        log::info!(
            "event {name} {}",
            msg.get("data").map(Value::to_string).unwrap_or_default()
        );
        for c in &lock(&self.clients).list {
            if c.negotiated {
                send(&c.stream, &msg);
            }
        }
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

    #[test]
    fn splitter_reports_garbage_and_caps_size() {
        let mut s = Splitter::default();
        let out = s.push(b"xy{}\n[1, {2}]\n{}");
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(matches!(out[0], Piece::Garbage(_)));
        assert!(matches!(out[1], Piece::Garbage(_)));
        assert_eq!(out[2], Piece::Message(b"{}".to_vec()));
        let mut big = b"{\"a\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_MESSAGE + 10));
        let out = s.push(&big);
        assert!(out
            .iter()
            .any(|p| matches!(p, Piece::Garbage(m) if m.contains("longer"))));
    }

    #[test]
    fn command_shape_is_checked() {
        assert!(parse_command(json!({"execute": "stop", "id": 1})).is_ok());
        let (e, id) = parse_command(json!({"execute": 3, "id": "x"})).unwrap_err();
        assert_eq!(id, Some(json!("x")));
        assert!(e.desc.contains("string"));
        assert!(parse_command(json!({"arguments": {}})).is_err());
        assert!(parse_command(json!({"execute": "a", "arguments": []})).is_err());
        assert!(parse_command(json!({"execute": "a", "bogus": 1})).is_err());
        assert!(parse_command(json!([1])).is_err());
    }
}

#[cfg(test)]
mod hold_tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc::{channel, Receiver};
    use std::time::Instant;

    struct Fixture {
        dir: std::path::PathBuf,
        monitor: Monitor,
        rx: Receiver<ControlMsg>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(tag: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("cpr-mon-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let (tx, rx) = channel();
        let monitor = Monitor::bind(&dir.join("m.sock"), tx).unwrap();
        Fixture { dir, monitor, rx }
    }

    /// A connected, negotiated client.
    fn client(f: &Fixture) -> (UnixStream, BufReader<UnixStream>) {
        let s = UnixStream::connect(f.dir.join("m.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("QMP"), "{line}");
        (&s).write_all(br#"{"execute":"qmp_capabilities"}"#)
            .unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("return"), "{line}");
        (s, r)
    }

    fn next_command(rx: &Receiver<ControlMsg>) -> Request {
        match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
            ControlMsg::Qmp(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_held_monitor_reads_nothing_and_carries_what_it_had_read() {
        let f = fixture("hold");
        let (s, _r) = client(&f);
        (&s).write_all(br#"{"execute":"a","id":1} {"execute":"b","#)
            .unwrap();
        let a = next_command(&f.rx);
        assert_eq!((a.command.as_str(), &a.id), ("a", &Some(json!(1))));

        f.monitor.hold(Duration::from_secs(60)).unwrap();
        (&s).write_all(br#""id":2}{"execute":"c"}"#).unwrap();
        // A connection made while held waits in the backlog; it is greeted after release.
        let late = UnixStream::connect(f.dir.join("m.sock")).unwrap();
        let carried = f.monitor.carry([&a]);
        assert_eq!(carried.clients.len(), 1);
        let c = &carried.clients[0];
        assert_eq!(
            c.replay.as_ref(),
            br#"{"arguments":{},"execute":"a","id":1}
"#
        );
        assert!(!c.skipping);
        assert_eq!(c.partial.as_ref(), br#"{"execute":"b","#);
        assert!(
            f.rx.try_recv().is_err(),
            "nothing is read while the monitor is held"
        );

        // The update failed: reading resumes where it stopped.
        f.monitor.release();
        let b = next_command(&f.rx);
        assert_eq!((b.command.as_str(), b.id), ("b", Some(json!(2))));
        assert_eq!(next_command(&f.rx).command, "c");
        late.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(late).read_line(&mut line).unwrap();
        assert!(line.contains("QMP"), "greeted after release: {line}");
    }

    #[test]
    fn carried_input_is_replayed_before_the_socket_is_read() {
        let f = fixture("replay");
        let (s, _r) = client(&f);
        // Hand this client over to a second monitor, as an exec would.
        f.monitor.hold(Duration::from_secs(60)).unwrap();
        let mut reg = FdRegistry::new();
        f.monitor.register_fds(&mut reg).unwrap();
        let (tx, rx) = channel();
        let next = Monitor::from_fds(&mut reg, tx).unwrap().unwrap();
        (&s).write_all(br#"6}"#).unwrap();
        assert!(rx.try_recv().is_err(), "not serving before start");
        let id = next.clients.lock().unwrap().list[0].id;
        next.start(Some(MonitorSection {
            clients: vec![CarriedInput {
                client: id,
                replay: Blob(br#"{"execute":"x","id":5}"#.to_vec()),
                skipping: false,
                partial: Blob(br#"{"execute":"y","id":"#.to_vec()),
            }],
        }));
        let x = next_command(&rx);
        assert_eq!((x.command.as_str(), x.id), ("x", Some(json!(5))));
        let y = next_command(&rx);
        assert_eq!((y.command.as_str(), y.id), ("y", Some(json!(6))));
    }

    #[test]
    fn a_client_that_does_not_read_is_dropped_and_cannot_block_an_update() {
        let f = fixture("stuck");
        let (s, _r) = client(&f);
        let (other, mut other_r) = client(&f);
        // Each bad line earns an error answer this client never reads, until the socket
        // buffer is full and the monitor gives up on it.
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let junk = b"x\n".repeat(4096);
        let deadline = Instant::now() + Duration::from_secs(120);
        while (&s).write_all(&junk).is_ok() {
            assert!(Instant::now() < deadline, "never disconnected");
        }
        f.monitor.hold(HOLD).unwrap();
        f.monitor.release();
        (&other).write_all(br#"{"execute":"z"}"#).unwrap();
        assert_eq!(next_command(&f.rx).command, "z");
        f.monitor.event("E", None);
        let mut line = String::new();
        other_r.read_line(&mut line).unwrap();
        assert!(line.contains("\"E\""), "{line}");
    }

    const HOLD: Duration = Duration::from_secs(60);

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
        assert!(u.push(b"yz\n").is_empty(), "the rest of the bad line");
        assert_eq!(u.push(b"{}"), vec![Piece::Message(b"{}".to_vec())]);
    }
}
