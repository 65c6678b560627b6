// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The transfer protocol: typed, framed messages over a connected UNIX stream socket, and
//! the state machine both sides run, which says at every step which process owns the guest.
//!
//! Every frame is an 8-byte header and a payload (all integers little-endian):
//!
//! ```text
//! type u16 | reserved u16 (0) | payload length u32 | payload
//! ```
//!
//! | type | message | from | payload |
//! | --- | --- | --- | --- |
//! | 1 | `HELLO` | both, old first | magic `CPR-UPDT`, protocol u16, role u8, pid u32, the build ([`BuildInfo`]) |
//! | 2 | `MEMORY` | old | state version u16, VM id 16, state id 16, generation u64, a snapshot container; then one cpr-fd transfer |
//! | 3 | `READY` | new | empty |
//! | 4 | `STATE` | old | a snapshot container; then one cpr-fd transfer |
//! | 5 | `RESTORED` | new | empty |
//! | 6 | `COMMIT` | old | empty |
//! | 7 | `STARTED` | new | empty |
//! | 255 | `ABORT` | both | UTF-8 reason |
//!
//! The order, and who owns the guest in each [`State`], is fixed; anything else is refused
//! with [`ProtocolError::Unexpected`] naming the message and the state, and an unknown type
//! with [`ProtocolError::UnknownMessage`]. See `docs/DESIGN.md` for the full description.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cpr_fd::FdRegistry;

use crate::info::BuildInfo;
use crate::Ids;

/// The protocol version this crate speaks, sent in `HELLO`.
pub const PROTOCOL_VERSION: u16 = 1;
/// The first bytes of a `HELLO` payload.
pub const HELLO_MAGIC: [u8; 8] = *b"CPR-UPDT";
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 8;
/// Largest `HELLO` or `ABORT` payload.
pub const MAX_SMALL_PAYLOAD: u32 = 4096;

/// Which side of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The process that runs the guest now and hands it over.
    Old,
    /// The process that receives it.
    New,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Old => "old",
            Role::New => "new",
        })
    }
}

/// A message type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// Who the sender is and what it reads and writes.
    Hello,
    /// Guest memory (layout and fds), while the guest runs.
    Memory,
    /// The new side built its VM.
    Ready,
    /// The rest of the state and fds, with the guest paused.
    State,
    /// The new side restored everything.
    Restored,
    /// The old side gives the guest up.
    Commit,
    /// The guest runs in the new process.
    Started,
    /// The sender gives up; the old process keeps (or resumes) the guest.
    Abort,
}

impl Kind {
    /// The type number on the wire.
    pub fn code(self) -> u16 {
        match self {
            Kind::Hello => 1,
            Kind::Memory => 2,
            Kind::Ready => 3,
            Kind::State => 4,
            Kind::Restored => 5,
            Kind::Commit => 6,
            Kind::Started => 7,
            Kind::Abort => 255,
        }
    }

    /// The kind of a type number, if it is one.
    pub fn from_code(code: u16) -> Option<Kind> {
        Some(match code {
            1 => Kind::Hello,
            2 => Kind::Memory,
            3 => Kind::Ready,
            4 => Kind::State,
            5 => Kind::Restored,
            6 => Kind::Commit,
            7 => Kind::Started,
            255 => Kind::Abort,
            _ => return None,
        })
    }

    /// Upper-case name, as in the documentation.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "HELLO",
            Kind::Memory => "MEMORY",
            Kind::Ready => "READY",
            Kind::State => "STATE",
            Kind::Restored => "RESTORED",
            Kind::Commit => "COMMIT",
            Kind::Started => "STARTED",
            Kind::Abort => "ABORT",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `HELLO`: who the sender is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's protocol version.
    pub protocol: u16,
    /// The sender's role.
    pub role: Role,
    /// The sender's process id.
    pub pid: u32,
    /// The sender's build: application, version, state versions read and written, features.
    pub build: BuildInfo,
}

/// `MEMORY`: the guest's memory, sent while it still runs, so the new side builds its VM
/// before the pause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Memory {
    /// The state version the old side writes, chosen from both hellos.
    pub state_version: u16,
    /// The VM's and this update's identity.
    pub ids: Ids,
    /// A snapshot container with the memory sections.
    pub container: Vec<u8>,
}

/// A protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Kind::Hello`].
    Hello(Hello),
    /// See [`Kind::Memory`].
    Memory(Memory),
    /// See [`Kind::Ready`].
    Ready,
    /// See [`Kind::State`]: a snapshot container.
    State(Vec<u8>),
    /// See [`Kind::Restored`].
    Restored,
    /// See [`Kind::Commit`].
    Commit,
    /// See [`Kind::Started`].
    Started,
    /// See [`Kind::Abort`]: why.
    Abort(String),
}

/// Errors of the protocol: I/O, framing, and order.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The socket failed.
    #[error("transfer socket: {0}")]
    Io(#[source] std::io::Error),
    /// Nothing arrived in time.
    #[error("no {waiting_for} from the {peer} process within {after:?}")]
    Timeout {
        /// What was expected.
        waiting_for: &'static str,
        /// Who was to send it.
        peer: Role,
        /// How long we waited.
        after: Duration,
    },
    /// The peer closed the connection (possibly in the middle of a frame).
    #[error("the {peer} process closed the connection in state {state}")]
    PeerClosed {
        /// The peer.
        peer: Role,
        /// Our state when it happened.
        state: State,
    },
    /// A frame with a type number no version of the protocol has.
    #[error("unknown message type {code}")]
    UnknownMessage {
        /// The type number.
        code: u16,
    },
    /// A header field that must be zero is not.
    #[error("bad frame header: reserved field {reserved:#x}")]
    BadHeader {
        /// Its value.
        reserved: u16,
    },
    /// A payload longer than its type allows; nothing was allocated for it.
    #[error("{kind} payload of {len} bytes exceeds {max}")]
    TooLarge {
        /// The message type.
        kind: Kind,
        /// Its announced length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// A payload that does not parse.
    #[error("malformed {kind}: {reason}")]
    Malformed {
        /// The message type.
        kind: Kind,
        /// What is wrong.
        reason: &'static str,
    },
    /// A message that is valid but not now.
    #[error("unexpected {message} {direction} in state {state} (as the {role} side)")]
    Unexpected {
        /// The message.
        message: Kind,
        /// `sent` or `received`.
        direction: &'static str,
        /// Our state.
        state: State,
        /// Our role.
        role: Role,
    },
    /// The peer speaks another protocol version.
    #[error("the peer speaks protocol version {found}, this side {ours}")]
    ProtocolVersion {
        /// Theirs.
        found: u16,
        /// Ours.
        ours: u16,
    },
    /// The peer gave up.
    #[error("the {peer} process aborted: {reason}")]
    Aborted {
        /// Who.
        peer: Role,
        /// Why.
        reason: String,
    },
    /// The fds that follow `MEMORY` or `STATE` could not be moved.
    #[error("fd transfer: {0}")]
    Fds(#[source] cpr_fd::Error),
}

/// Where a transfer stands. Both sides pass through the same states, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Nothing exchanged. The old process owns the guest.
    Start,
    /// One `HELLO` exchanged, the other awaited. The old process owns the guest.
    Hello,
    /// Both hellos exchanged. The old process owns the guest.
    Greeted,
    /// `MEMORY` sent; the new side maps memory and builds its VM. The old process owns the
    /// guest, which runs.
    Preparing,
    /// The new side's VM exists. The old process owns the guest, which runs.
    Ready,
    /// `STATE` sent: the guest is paused in the old process, the new side restores. The old
    /// process owns the guest.
    Restoring,
    /// The new side restored everything and waits for the commit. The old process owns the
    /// (paused) guest.
    Restored,
    /// Old side only: `COMMIT` sent, the answer awaited. The new process owns the guest,
    /// unless its `ABORT` crossed the `COMMIT` (it gave up before reading it): then the old
    /// process owns it again.
    Committing,
    /// New side: `COMMIT` received: the new process owns the guest. The old one never
    /// touches it again.
    Committed,
    /// The guest runs in the new process.
    Started,
    /// Either side aborted before the commit: the old process owns the guest and resumes it.
    Aborted,
}

impl State {
    /// Which process owns the guest in this state.
    pub fn owner(self) -> Role {
        match self {
            State::Committing | State::Committed | State::Started => Role::New,
            _ => Role::Old,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// One side's view of the protocol: which messages it may send and receive next. It does no
/// I/O, so it can be tested (and fuzzed) on its own.
#[derive(Clone, Debug)]
pub struct Session {
    role: Role,
    state: State,
    owner_word: bool,
}

impl Session {
    /// A session for `role`, in [`State::Start`].
    pub fn new(role: Role) -> Self {
        Session {
            role,
            state: State::Start,
            owner_word: false,
        }
    }

    /// Both builds decide the owner with the owner word (`cpr.owner-word`, agreed in the
    /// `HELLO`s): after `STATE` the new side sends `STARTED` once it claimed the word and
    /// runs the guest, and `RESTORED`/`COMMIT` are refused. From [`State::Restoring`] on,
    /// the word, not [`owner`](Self::owner), says who owns the guest.
    pub fn use_owner_word(&mut self) {
        self.owner_word = true;
    }

    /// Whether [`use_owner_word`](Self::use_owner_word) was called.
    pub fn owner_word(&self) -> bool {
        self.owner_word
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Who owns the guest now.
    pub fn owner(&self) -> Role {
        self.state.owner()
    }

    fn next(&self, sending: bool, kind: Kind) -> Option<State> {
        use State::*;
        // Whether `kind` travels from this side (sending) or to it.
        let from_old = sending == (self.role == Role::Old);
        if kind == Kind::Abort {
            // An ABORT that crossed our COMMIT: the new side never took the guest.
            if self.state == Committing && !sending {
                return Some(Aborted);
            }
            return (self.state.owner() == Role::Old && self.state != Aborted).then_some(Aborted);
        }
        let (want, from_old_expected, to) = match (self.state, kind) {
            (Start, Kind::Hello) => (Start, true, Hello),
            (Hello, Kind::Hello) => (Hello, false, Greeted),
            (Greeted, Kind::Memory) => (Greeted, true, Preparing),
            (Preparing, Kind::Ready) => (Preparing, false, Ready),
            (Ready, Kind::State) => (Ready, true, Restoring),
            (Restoring, Kind::Started) if self.owner_word => (Restoring, false, Started),
            (Restoring, Kind::Restored) if !self.owner_word => (Restoring, false, Restored),
            (Restored, Kind::Commit) if self.role == Role::Old => (Restored, true, Committing),
            (Restored, Kind::Commit) => (Restored, true, Committed),
            (Committing | Committed, Kind::Started) => (self.state, false, Started),
            _ => return None,
        };
        (want == self.state && from_old == from_old_expected).then_some(to)
    }

    fn step(&mut self, sending: bool, kind: Kind) -> Result<State, ProtocolError> {
        match self.next(sending, kind) {
            Some(s) => {
                self.state = s;
                Ok(s)
            }
            None => Err(ProtocolError::Unexpected {
                message: kind,
                direction: if sending { "sent" } else { "received" },
                state: self.state,
                role: self.role,
            }),
        }
    }

    /// Records that this side sends `kind`, or refuses it in this state.
    pub fn on_send(&mut self, kind: Kind) -> Result<State, ProtocolError> {
        self.step(true, kind)
    }

    /// Records that this side received `kind`, or refuses it in this state.
    pub fn on_receive(&mut self, kind: Kind) -> Result<State, ProtocolError> {
        self.step(false, kind)
    }
}

impl Message {
    /// Its type.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Memory(_) => Kind::Memory,
            Message::Ready => Kind::Ready,
            Message::State(_) => Kind::State,
            Message::Restored => Kind::Restored,
            Message::Commit => Kind::Commit,
            Message::Started => Kind::Started,
            Message::Abort(_) => Kind::Abort,
        }
    }

    /// The frame: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let (head, payload) = self.encode_parts();
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.extend_from_slice(&head);
        frame.extend_from_slice(&payload);
        frame
    }

    /// The frame as its header and its payload, the payload borrowed where the message holds
    /// it as it goes on the wire (`STATE`'s container), so that a sender can write both with
    /// one `writev` and copy nothing.
    pub(crate) fn encode_parts(&self) -> ([u8; HEADER_LEN], std::borrow::Cow<'_, [u8]>) {
        use std::borrow::Cow;
        let payload: Cow<'_, [u8]> = match self {
            Message::State(c) => Cow::Borrowed(c),
            _ => Cow::Owned(self.owned_payload()),
        };
        let mut head = [0u8; HEADER_LEN];
        head[..2].copy_from_slice(&self.kind().code().to_le_bytes());
        head[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        (head, payload)
    }

    fn owned_payload(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Message::Hello(h) => {
                p.extend_from_slice(&HELLO_MAGIC);
                p.extend_from_slice(&h.protocol.to_le_bytes());
                p.push(match h.role {
                    Role::Old => 1,
                    Role::New => 2,
                });
                p.extend_from_slice(&h.pid.to_le_bytes());
                h.build.encode(&mut p);
            }
            Message::Memory(m) => {
                p.extend_from_slice(&m.state_version.to_le_bytes());
                p.extend_from_slice(&m.ids.vm);
                p.extend_from_slice(&m.ids.state);
                p.extend_from_slice(&m.ids.generation.to_le_bytes());
                p.extend_from_slice(&m.container);
            }
            Message::State(c) => p.extend_from_slice(c),
            Message::Abort(reason) => {
                let mut end = reason.len().min(MAX_SMALL_PAYLOAD as usize);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                p.extend_from_slice(&reason.as_bytes()[..end]);
            }
            Message::Ready | Message::Restored | Message::Commit | Message::Started => {}
        }
        p
    }

    /// Decodes a payload of type `kind`.
    pub fn decode(kind: Kind, payload: &[u8]) -> Result<Message, ProtocolError> {
        let mut c = Cursor { b: payload, kind };
        let m = match kind {
            Kind::Hello => {
                if c.take(8)? != HELLO_MAGIC {
                    return Err(c.bad("bad magic"));
                }
                let protocol = c.u16()?;
                let role = match c.u8()? {
                    1 => Role::Old,
                    2 => Role::New,
                    _ => return Err(c.bad("bad role")),
                };
                let pid = c.u32()?;
                let build = BuildInfo::decode(&mut c)?;
                Message::Hello(Hello {
                    protocol,
                    role,
                    pid,
                    build,
                })
            }
            Kind::Memory => {
                let state_version = c.u16()?;
                let vm = c.array()?;
                let state = c.array()?;
                let generation = c.u64()?;
                Message::Memory(Memory {
                    state_version,
                    ids: Ids {
                        vm,
                        state,
                        generation,
                    },
                    container: c.rest().to_vec(),
                })
            }
            Kind::State => Message::State(c.rest().to_vec()),
            Kind::Abort => Message::Abort(String::from_utf8_lossy(c.rest()).into_owned()),
            Kind::Ready => Message::Ready,
            Kind::Restored => Message::Restored,
            Kind::Commit => Message::Commit,
            Kind::Started => Message::Started,
        };
        c.end()?;
        Ok(m)
    }
}

/// The largest payload a `kind` may have, given the largest container accepted.
fn max_payload(kind: Kind, max_container: u64) -> u64 {
    match kind {
        Kind::Hello | Kind::Abort => u64::from(MAX_SMALL_PAYLOAD),
        Kind::Memory => max_container + 2 + 16 + 16 + 8,
        Kind::State => max_container,
        _ => 0,
    }
}

/// Reads one frame from `r`. The payload is allocated only once its length passed the cap
/// for its type (`max_container` for the containers in `MEMORY` and `STATE`): at once up to
/// 1 MiB (so a state arrives in one read), beyond that growing with the bytes actually
/// received.
pub fn read_message<R: Read>(r: &mut R, max_container: u64) -> Result<Message, ProtocolError> {
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head).map_err(ProtocolError::Io)?;
    let code = u16::from_le_bytes([head[0], head[1]]);
    let reserved = u16::from_le_bytes([head[2], head[3]]);
    let len = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
    let kind = Kind::from_code(code).ok_or(ProtocolError::UnknownMessage { code })?;
    if reserved != 0 {
        return Err(ProtocolError::BadHeader { reserved });
    }
    let max = max_payload(kind, max_container);
    if len > max {
        return Err(ProtocolError::TooLarge { kind, len, max });
    }
    let mut payload = Vec::with_capacity(len.min(1 << 20) as usize);
    let got = r
        .take(len)
        .read_to_end(&mut payload)
        .map_err(ProtocolError::Io)?;
    if (got as u64) < len {
        return Err(ProtocolError::Io(ErrorKind::UnexpectedEof.into()));
    }
    Message::decode(kind, &payload)
}

/// A bounds-checked reader of a payload.
pub(crate) struct Cursor<'a> {
    b: &'a [u8],
    kind: Kind,
}

impl<'a> Cursor<'a> {
    pub(crate) fn bad(&self, reason: &'static str) -> ProtocolError {
        ProtocolError::Malformed {
            kind: self.kind,
            reason,
        }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.b.len() < n {
            return Err(self.bad("truncated"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A string of at most 255 bytes: length u8, then UTF-8 without control characters.
    pub(crate) fn str8(&mut self) -> Result<String, ProtocolError> {
        let n = self.u8()? as usize;
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| self.bad("string is not UTF-8"))?;
        if s.chars().any(char::is_control) {
            return Err(self.bad("control character in a string"));
        }
        Ok(s.to_string())
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes"))
        }
    }
}

/// Writes a string of at most 255 bytes (cut at a character boundary).
pub(crate) fn put_str8(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.push(end as u8);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// The protocol over a connected socket: frames, fds, timeouts, and the [`Session`] that
/// checks the order.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
    session: Session,
    max_container: u64,
}

impl Channel {
    /// A channel for `role` on `stream`, accepting containers up to `max_container` bytes.
    pub fn new(stream: UnixStream, role: Role, max_container: u64) -> Self {
        Channel {
            stream,
            session: Session::new(role),
            max_container,
        }
    }

    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Decides the owner with the owner word ([`Session::use_owner_word`]).
    pub fn use_owner_word(&mut self) {
        self.session.use_owner_word();
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn peer(&self) -> Role {
        match self.session.role() {
            Role::Old => Role::New,
            Role::New => Role::Old,
        }
    }

    /// Checks that the protocol allows sending `kind` now (nothing is written otherwise),
    /// and bounds the writes that follow by `timeout`.
    fn may_send(&self, kind: Kind, timeout: Duration) -> Result<(), ProtocolError> {
        self.session
            .next(true, kind)
            .ok_or(ProtocolError::Unexpected {
                message: kind,
                direction: "sent",
                state: self.session.state(),
                role: self.session.role(),
            })?;
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(ProtocolError::Io)
    }

    /// Sends `msg`, if the protocol allows it now. `timeout` bounds a peer that does not read.
    pub fn send(&mut self, msg: &Message, timeout: Duration) -> Result<(), ProtocolError> {
        self.may_send(msg.kind(), timeout)?;
        (&self.stream)
            .write_all(&msg.encode())
            .map_err(|e| self.io_error(e, "a write", timeout))?;
        self.session.on_send(msg.kind())?;
        Ok(())
    }

    /// Waits up to `timeout` for the next message (`waiting_for` names it in errors). An
    /// `ABORT` is returned as [`ProtocolError::Aborted`]; a message the protocol does not allow
    /// now as [`ProtocolError::Unexpected`].
    pub fn recv(
        &mut self,
        waiting_for: &'static str,
        timeout: Duration,
    ) -> Result<Message, ProtocolError> {
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(ProtocolError::Io)?;
        let msg = read_message(&mut &self.stream, self.max_container)
            .map_err(|e| self.recv_error(e, waiting_for, timeout))?;
        self.session.on_receive(msg.kind())?;
        if let Message::Abort(reason) = msg {
            return Err(ProtocolError::Aborted {
                peer: self.peer(),
                reason,
            });
        }
        Ok(msg)
    }

    fn recv_error(
        &self,
        e: ProtocolError,
        waiting_for: &'static str,
        t: Duration,
    ) -> ProtocolError {
        match e {
            ProtocolError::Io(io) => self.io_error(io, waiting_for, t),
            other => other,
        }
    }

    fn io_error(&self, e: std::io::Error, waiting_for: &'static str, t: Duration) -> ProtocolError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ProtocolError::Timeout {
                waiting_for,
                peer: self.peer(),
                after: t,
            },
            ErrorKind::UnexpectedEof
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted => ProtocolError::PeerClosed {
                peer: self.peer(),
                state: self.session.state(),
            },
            _ => ProtocolError::Io(e),
        }
    }

    /// Sends the fds that follow `MEMORY` or `STATE`.
    pub fn send_fds(&self, fds: &FdRegistry, timeout: Duration) -> Result<(), ProtocolError> {
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(ProtocolError::Io)?;
        fds.send(&self.stream).map_err(ProtocolError::Fds)
    }

    /// Sends `msg` (`MEMORY` or `STATE`) and the fds that follow it, if the protocol allows
    /// `msg` now: the same bytes as [`send`](Self::send) then [`send_fds`](Self::send_fds),
    /// but the frame goes in one write with the registry's header and manifest. The peer is
    /// woken once for both instead of twice, which is a write and a context switch less
    /// inside a transfer's blackout; a peer that reads them apart (an older build, after a
    /// rollback) sees nothing new. A refused message writes nothing.
    pub fn send_with_fds(
        &mut self,
        msg: &Message,
        fds: &FdRegistry,
        timeout: Duration,
    ) -> Result<(), ProtocolError> {
        self.may_send(msg.kind(), timeout)?;
        let (head, payload) = msg.encode_parts();
        fds.send_after(&self.stream, &[&head, &payload])
            .map_err(|e| match e {
                // A peer that is gone or stuck is reported as for any frame.
                cpr_fd::Error::Os { source, .. } if peer_trouble(source.kind()) => {
                    self.io_error(source, "a write", timeout)
                }
                e => ProtocolError::Fds(e),
            })?;
        self.session.on_send(msg.kind())?;
        Ok(())
    }

    /// Receives the fds that follow `MEMORY` or `STATE`.
    pub fn recv_fds(&self, timeout: Duration) -> Result<FdRegistry, ProtocolError> {
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(ProtocolError::Io)?;
        FdRegistry::receive(&self.stream).map_err(ProtocolError::Fds)
    }

    /// Gives up before the commit, if that is still possible: sends `ABORT` (best effort,
    /// with a short timeout) and shuts the socket down, so the peer sees the reason, then the
    /// end. Returns whether the session is now aborted (false after the commit).
    pub fn abort(&mut self, reason: &str) -> bool {
        if self.session.next(true, Kind::Abort).is_none() {
            return self.session.state() == State::Aborted;
        }
        let _ = self.send(&Message::Abort(reason.to_string()), Duration::from_secs(1));
        // Whether or not the peer got it, this side is done.
        self.session.state = State::Aborted;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        true
    }
}

/// Whether a failed read or write means the peer is gone or stuck (reported as such, not as
/// a bare I/O error).
fn peer_trouble(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::WouldBlock
            | ErrorKind::TimedOut
            | ErrorKind::UnexpectedEof
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
    )
}

/// Runs the protocol reader and both state machines over arbitrary bytes, for the fuzzer:
/// frames are read one after the other and fed to a new-side and an old-side [`Session`] as
/// received messages. Must never panic, and a new side that received the commit must never
/// accept an `ABORT` (the guest would have two owners).
#[doc(hidden)]
pub fn fuzz_reader(data: &[u8]) {
    let mut input = data;
    let mut new = Session::new(Role::New);
    let mut old = Session::new(Role::Old);
    for _ in 0..64 {
        let msg = match read_message(&mut input, 1 << 20) {
            Ok(m) => m,
            Err(_) => return,
        };
        // Decoding is deterministic: the frame we would write decodes to the same message.
        let again = read_message(&mut msg.encode().as_slice(), 1 << 20);
        assert!(
            matches!(&again, Ok(m) if *m == msg),
            "re-encoding changed {msg:?}"
        );
        for s in [&mut new, &mut old] {
            let committed = matches!(s.state(), State::Committed | State::Started);
            if s.on_receive(msg.kind()).is_ok() && committed {
                assert_ne!(
                    s.owner(),
                    Role::Old,
                    "an ABORT after the commit was accepted"
                );
            }
            // The side may answer; whatever it may send is valid only in this order.
            for k in [Kind::Hello, Kind::Ready, Kind::Restored, Kind::Started] {
                if s.role() == Role::New && s.on_send(k).is_ok() {
                    break;
                }
            }
            for k in [Kind::Hello, Kind::Memory, Kind::State, Kind::Commit] {
                if s.role() == Role::Old && s.on_send(k).is_ok() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages up to `STATE`, each with whether the old side sends it.
    const TO_STATE: [(Kind, bool); 5] = [
        (Kind::Hello, true),
        (Kind::Hello, false),
        (Kind::Memory, true),
        (Kind::Ready, false),
        (Kind::State, true),
    ];
    /// Then, without the owner word, up to the commit.
    const TO_COMMIT: [(Kind, bool); 2] = [(Kind::Restored, false), (Kind::Commit, true)];

    /// Plays `steps` (a message, whether the old side sends it) on one side's session.
    fn play(s: &mut Session, steps: &[(Kind, bool)]) {
        for &(kind, old_sends) in steps {
            if old_sends == (s.role() == Role::Old) {
                s.on_send(kind).unwrap();
            } else {
                s.on_receive(kind).unwrap();
            }
        }
    }

    fn build() -> BuildInfo {
        BuildInfo {
            app: "vmm".into(),
            version: "2.0".into(),
            reads: 2..=3,
            writes: 2..=3,
            features: vec!["fallback".into()],
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                role: Role::Old,
                pid: 77,
                build: build(),
            }),
            memory_of(b"CPR-SNAP...".to_vec()),
            Message::Ready,
            Message::State(vec![9; 100]),
            Message::Restored,
            Message::Commit,
            Message::Started,
            Message::Abort("no thanks".into()),
        ]
    }

    #[test]
    fn every_message_round_trips_and_every_truncation_is_an_error() {
        for m in samples() {
            let frame = m.encode();
            assert_eq!(read_message(&mut frame.as_slice(), 1 << 20).unwrap(), m);
            for cut in 0..frame.len() {
                assert!(
                    read_message(&mut &frame[..cut], 1 << 20).is_err(),
                    "{} cut at {cut}",
                    m.kind()
                );
            }
        }
    }

    #[test]
    fn malformed_frames_are_refused_by_name() {
        let mut unknown = Message::Ready.encode();
        unknown[0] = 42;
        assert!(matches!(
            read_message(&mut unknown.as_slice(), 1 << 20),
            Err(ProtocolError::UnknownMessage { code: 42 })
        ));
        let mut reserved = Message::Ready.encode();
        reserved[2] = 1;
        assert!(matches!(
            read_message(&mut reserved.as_slice(), 1 << 20),
            Err(ProtocolError::BadHeader { reserved: 1 })
        ));
        // A length that lies is refused before anything is allocated for it.
        let mut huge = Message::State(vec![]).encode();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_message(&mut huge.as_slice(), 1 << 20),
            Err(ProtocolError::TooLarge {
                kind: Kind::State,
                ..
            })
        ));
        // A READY with a payload, a HELLO without the magic, a bad role.
        let mut ready = Message::Ready.encode();
        ready[4] = 1;
        ready.push(0);
        let e = read_message(&mut ready.as_slice(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("READY"), "{e}");
        let Message::Hello(h) = &samples()[0] else {
            unreachable!()
        };
        let mut hello = Message::Hello(h.clone()).encode();
        hello[HEADER_LEN] = b'X';
        let e = read_message(&mut hello.as_slice(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        let mut hello = Message::Hello(h.clone()).encode();
        hello[HEADER_LEN + 10] = 9;
        assert!(read_message(&mut hello.as_slice(), 1 << 20).is_err());
    }

    /// Drives both sides through the whole protocol; says who owns the guest at each step.
    #[test]
    fn the_state_machine_follows_the_protocol_and_says_who_owns_the_guest() {
        let mut old = Session::new(Role::Old);
        let mut new = Session::new(Role::New);
        let steps: [(Kind, bool, State, Role); 8] = [
            (Kind::Hello, true, State::Hello, Role::Old),
            (Kind::Hello, false, State::Greeted, Role::Old),
            (Kind::Memory, true, State::Preparing, Role::Old),
            (Kind::Ready, false, State::Ready, Role::Old),
            (Kind::State, true, State::Restoring, Role::Old),
            (Kind::Restored, false, State::Restored, Role::Old),
            (Kind::Commit, true, State::Committed, Role::New),
            (Kind::Started, false, State::Started, Role::New),
        ];
        for (kind, old_sends, state, owner) in steps {
            let (sender, receiver) = if old_sends {
                (&mut old, &mut new)
            } else {
                (&mut new, &mut old)
            };
            sender.on_send(kind).unwrap();
            receiver.on_receive(kind).unwrap();
            assert_eq!(new.state(), state, "after {kind}");
            assert_eq!(new.owner(), owner, "after {kind}");
        }
        assert_eq!(old.state(), State::Started);
    }

    #[test]
    fn with_the_owner_word_started_follows_the_state_and_the_commit_messages_are_refused() {
        let mut old = Session::new(Role::Old);
        let mut new = Session::new(Role::New);
        old.use_owner_word();
        new.use_owner_word();
        play(&mut old, &TO_STATE);
        play(&mut new, &TO_STATE);
        assert!(new.on_send(Kind::Restored).is_err());
        assert!(old.on_send(Kind::Commit).is_err());
        // Either side may still abort: the word, not a message, decides from here.
        let mut aborting = new.clone();
        aborting.on_send(Kind::Abort).unwrap();
        new.on_send(Kind::Started).unwrap();
        old.on_receive(Kind::Started).unwrap();
        assert_eq!((old.state(), new.state()), (State::Started, State::Started));
        assert!(new.on_send(Kind::Abort).is_err());
        // Without the word, STARTED right after STATE is out of order.
        let mut legacy = Session::new(Role::Old);
        play(&mut legacy, &TO_STATE);
        assert!(legacy.on_receive(Kind::Started).is_err());
    }

    #[test]
    fn out_of_order_messages_are_refused_with_their_names() {
        let mut new = Session::new(Role::New);
        let e = new.on_receive(Kind::State).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unexpected STATE received in state Start (as the new side)"
        );
        assert_eq!(
            new.state(),
            State::Start,
            "a refused message changes nothing"
        );
        // The new side never sends what the old side sends, and vice versa.
        let mut old = Session::new(Role::Old);
        assert!(old.on_send(Kind::Ready).is_err());
        assert!(new.on_send(Kind::Memory).is_err());
        // A second HELLO, a commit before the state.
        old.on_send(Kind::Hello).unwrap();
        assert!(old.on_send(Kind::Hello).is_err());
        old.on_receive(Kind::Hello).unwrap();
        assert!(old.on_send(Kind::Commit).is_err());
    }

    #[test]
    fn abort_is_possible_until_the_commit_and_never_after() {
        for n in 0..7 {
            let mut old = Session::new(Role::Old);
            let mut new = Session::new(Role::New);
            let kinds = [
                Kind::Hello,
                Kind::Hello,
                Kind::Memory,
                Kind::Ready,
                Kind::State,
                Kind::Restored,
                Kind::Commit,
            ];
            for (i, k) in kinds.iter().take(n).enumerate() {
                let old_sends = !matches!(i, 1 | 3 | 5);
                if old_sends {
                    old.on_send(*k).unwrap();
                    new.on_receive(*k).unwrap();
                } else {
                    new.on_send(*k).unwrap();
                    old.on_receive(*k).unwrap();
                }
            }
            let before_commit = n < 7;
            assert_eq!(new.on_send(Kind::Abort).is_ok(), before_commit, "step {n}");
            assert_eq!(
                old.on_receive(Kind::Abort).is_ok(),
                before_commit,
                "step {n}"
            );
            if before_commit {
                assert_eq!((old.owner(), new.owner()), (Role::Old, Role::Old));
            }
        }
        // The new side, once committed, can neither send nor accept an ABORT.
        let mut new = Session::new(Role::New);
        play(&mut new, &TO_STATE);
        play(&mut new, &TO_COMMIT);
        assert!(new.on_send(Kind::Abort).is_err());
        assert!(new.on_receive(Kind::Abort).is_err());
        assert_eq!(new.owner(), Role::New);
    }

    /// The new side may give up while the old side's COMMIT is on its way: the old side,
    /// in `Committing`, accepts that ABORT and owns the guest again.
    #[test]
    fn an_abort_crossing_the_commit_gives_the_guest_back_to_the_old_side() {
        let mut old = Session::new(Role::Old);
        play(&mut old, &TO_STATE);
        play(&mut old, &TO_COMMIT);
        assert_eq!((old.state(), old.owner()), (State::Committing, Role::New));
        assert!(old.on_send(Kind::Abort).is_err(), "it gave the guest away");
        old.on_receive(Kind::Abort).unwrap();
        assert_eq!((old.state(), old.owner()), (State::Aborted, Role::Old));
    }

    /// Two channels on a socket pair, greeted: the old side may send `MEMORY` next.
    fn greeted() -> (Channel, Channel) {
        let (a, b) = UnixStream::pair().unwrap();
        let mut old = Channel::new(a, Role::Old, 1 << 20);
        let mut new = Channel::new(b, Role::New, 1 << 20);
        let t = Duration::from_secs(30);
        let hello = |role| {
            Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                role,
                pid: 1,
                build: build(),
            })
        };
        old.send(&hello(Role::Old), t).unwrap();
        new.recv("HELLO", t).unwrap();
        new.send(&hello(Role::New), t).unwrap();
        old.recv("HELLO", t).unwrap();
        (old, new)
    }

    fn registry(tags: &[&str]) -> FdRegistry {
        let mut reg = FdRegistry::new();
        for tag in tags {
            let (x, _y) = UnixStream::pair().unwrap();
            reg.register(tag, cpr_fd::FdKind(7), x, tag.as_bytes())
                .unwrap();
        }
        reg
    }

    /// A `MEMORY` message carrying `container`.
    fn memory_of(container: Vec<u8>) -> Message {
        Message::Memory(Memory {
            state_version: 3,
            ids: Ids {
                vm: [1; 16],
                state: [2; 16],
                generation: 5,
            },
            container,
        })
    }

    #[test]
    fn a_frame_and_its_fds_in_one_write_read_as_two() {
        let (mut old, mut new) = greeted();
        let t = Duration::from_secs(30);
        let memory = memory_of(vec![0x5a; 20_000]);
        let reg = registry(&["mem.0", "mem.1"]);
        old.send_with_fds(&memory, &reg, t).unwrap();
        assert_eq!(old.session().state(), State::Preparing);
        // The receiver reads them apart, as an older build does.
        assert_eq!(new.recv("MEMORY", t).unwrap(), memory);
        let got = new.recv_fds(t).unwrap();
        let names: Vec<_> = got.iter().map(|e| e.name().to_string()).collect();
        assert_eq!(names, ["mem.0", "mem.1"]);
        for (e, want) in got.iter().zip(reg.iter()) {
            assert_eq!(e.metadata(), want.metadata());
        }
        // Out of order (no READY yet): refused, and nothing reaches the peer.
        let state = Message::State(vec![1, 2, 3]);
        let e = old.send_with_fds(&state, &reg, t).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::Unexpected {
                    message: Kind::State,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(old.session().state(), State::Preparing);
        new.stream().set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let r = new.stream().read(&mut byte);
        assert_eq!(
            r.map_err(|e| e.kind()).unwrap_err(),
            ErrorKind::WouldBlock,
            "a refused message wrote nothing"
        );
    }

    #[test]
    fn a_peer_gone_before_the_state_is_reported_as_gone() {
        let (mut old, new) = greeted();
        drop(new);
        let memory = memory_of(vec![0; 64]);
        let e = old
            .send_with_fds(&memory, &registry(&["mem.0"]), Duration::from_secs(30))
            .unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::PeerClosed {
                    peer: Role::New,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn the_fuzz_driver_survives_its_seeds() {
        let mut all = Vec::new();
        for m in samples() {
            all.extend(m.encode());
        }
        fuzz_reader(&all);
        fuzz_reader(&all[..all.len() / 2]);
        fuzz_reader(b"");
        fuzz_reader(&[0xff; 64]);
    }
}
