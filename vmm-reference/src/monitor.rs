// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A QMP monitor on a UNIX socket: greeting, capabilities negotiation, commands answered with
//! `return` or `error`, timestamped events. Clients and the listening socket are handed to
//! the next image on restart, so a connected client stays connected and negotiated.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use cpr_fd::{FdKind, FdRegistry};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::ControlMsg;

/// Largest single QMP message accepted, in bytes.
pub const MAX_MESSAGE: usize = 64 << 10;

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
}

#[derive(Debug, Default)]
struct Clients {
    list: Vec<Client>,
}

/// The monitor.
#[derive(Debug, Clone)]
pub struct Monitor {
    listener: Arc<UnixListener>,
    clients: Arc<Mutex<Clients>>,
    next_id: Arc<AtomicU64>,
    tx: Sender<ControlMsg>,
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
    (&*stream).write_all(text.as_bytes()).is_ok()
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
#[doc(hidden)]
pub fn fuzz_input(data: &[u8]) -> usize {
    let mut splitter = Splitter::default();
    let mut commands = 0;
    // Feed in uneven pieces, as a socket would deliver them.
    for chunk in data.chunks(7) {
        for piece in splitter.push(chunk) {
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
    /// Listens on `path` (replacing a stale socket, refusing to replace anything else).
    pub fn bind(path: &Path, tx: Sender<ControlMsg>) -> Result<Monitor> {
        let listener = crate::unix::listen(path)
            .map_err(|e| Error::Io(format!("bind monitor `{}`: {e}", path.display())))?;
        let m = Monitor {
            listener: Arc::new(listener),
            clients: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            tx,
        };
        m.start_accepting();
        Ok(m)
    }

    /// Rebuilds the monitor from fds handed over by the previous image: the listener and
    /// every client, which keep their negotiated state and get no new greeting.
    pub fn from_fds(fds: &mut FdRegistry, tx: Sender<ControlMsg>) -> Result<Option<Monitor>> {
        let Some(listener) = fds.take("monitor.listener") else {
            return Ok(None);
        };
        let m = Monitor {
            listener: Arc::new(UnixListener::from(listener.into_fd())),
            clients: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            tx,
        };
        let mut max_id = 0;
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
            m.add_client(id, UnixStream::from(e.into_fd()), negotiated, false);
        }
        m.next_id.store(max_id + 1, Ordering::SeqCst);
        m.start_accepting();
        Ok(Some(m))
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
        for c in &self.clients.lock().unwrap_or_else(|p| p.into_inner()).list {
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

    fn start_accepting(&self) {
        let m = self.clone();
        std::thread::spawn(move || {
            for stream in m.listener.incoming() {
                let Ok(stream) = stream else { continue };
                let id = m.next_id.fetch_add(1, Ordering::SeqCst);
                m.add_client(id, stream, false, true);
            }
        });
    }

    fn add_client(&self, id: u64, stream: UnixStream, negotiated: bool, greet: bool) {
        let Ok(reader) = stream.try_clone() else {
            return;
        };
        if greet && !send(&stream, &greeting()) {
            return;
        }
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .list
            .push(Client {
                id,
                stream,
                negotiated,
            });
        let m = self.clone();
        std::thread::spawn(move || m.serve(id, reader));
    }

    fn serve(&self, id: u64, mut reader: UnixStream) {
        let mut splitter = Splitter::default();
        let mut buf = [0u8; 4096];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for piece in splitter.push(&buf[..n]) {
                match piece {
                    Piece::Garbage(desc) => self.reply(id, None, Err(QmpError::generic(desc))),
                    Piece::Message(text) => self.handle(id, &text),
                }
            }
        }
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .list
            .retain(|c| c.id != id);
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
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .list
            .iter()
            .any(|c| c.id == client && c.negotiated)
    }

    fn set_negotiated(&self, client: u64) {
        for c in &mut self.clients.lock().unwrap_or_else(|p| p.into_inner()).list {
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
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
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
        for c in &self.clients.lock().unwrap_or_else(|p| p.into_inner()).list {
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
