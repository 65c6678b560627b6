// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The old side of an update: refuse early, negotiate, (transfer: memory first), park
//! input, pause, save, hand over; on any failure before the new side owns the guest, undo
//! and resume.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_fd::{FdKind, FdRegistry};
use cpr_snapshot::{Schema, Snapshot, SnapshotWriter};

use crate::api::{Failure, Guest, Progress, Saver, Updatable};
use crate::clock::{monotonic_ns, StopTime};
use crate::error::{hook, io, Error, Result, Step};
use crate::handover::{Record, FD_HANDOVER, FD_OLD_MM, FD_PREVIOUS_EXE, FD_STATE, FEATURE_OLD_MM};
use crate::info::{probe, BuildInfo};
use crate::owner::{OwnerWord, FD_OWNER_WORD};
use crate::protocol::{Channel, Hello, Memory, Message, ProtocolError, Role, PROTOCOL_VERSION};
use crate::section::{Ids, UpdateSection};
use crate::sys::MmHolder;
use crate::{fault, Mode};

/// Where the guest goes.
#[derive(Debug)]
pub enum Target {
    /// Exec `program` with `args` (`argv[1..]`) in place.
    Restart {
        /// The binary (the operator's choice, checked by the VMM).
        program: PathBuf,
        /// Its arguments.
        args: Vec<OsString>,
    },
    /// Hand the guest to the process at the other end of a connected UNIX socket.
    Transfer(UnixStream),
    /// Write the state to `name` in the directory `dir` (opened by the VMM) and let the
    /// process exit.
    Reboot {
        /// The state directory.
        dir: File,
        /// The file name in it.
        name: OsString,
        /// The state version to write (for an older build); the latest if `None`.
        version: Option<u16>,
    },
}

impl Target {
    /// The mode.
    pub fn mode(&self) -> Mode {
        match self {
            Target::Restart { .. } => Mode::Restart,
            Target::Transfer(_) => Mode::Transfer,
            Target::Reboot { .. } => Mode::Reboot,
        }
    }
}

/// How long each wait of an update may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// The target binary's `--cpr-state-versions` answer (restart).
    pub probe: Duration,
    /// The peer's `HELLO`.
    pub hello: Duration,
    /// The new side building its VM (`READY`).
    pub prepare: Duration,
    /// The old side's `STATE` (the new side waits while the old one pauses).
    pub state: Duration,
    /// The new side restoring (`RESTORED`).
    pub restore: Duration,
    /// The `COMMIT` (new side).
    pub commit: Duration,
    /// The new side's `STARTED` (old side, after the commit: only for reporting).
    pub started: Duration,
    /// Any write to a peer that does not read.
    pub write: Duration,
    /// The old process to end after it went away without aborting (new side).
    pub peer_exit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            probe: Duration::from_secs(10),
            hello: Duration::from_secs(30),
            prepare: Duration::from_secs(60),
            state: Duration::from_secs(60),
            restore: Duration::from_secs(60),
            commit: Duration::from_secs(30),
            started: Duration::from_secs(30),
            write: Duration::from_secs(10),
            peer_exit: Duration::from_secs(5),
        }
    }
}

/// A successful update on the old side. (A restart has none: the process became the new
/// image.) The caller must exit without touching the guest again.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The new process owns the guest. `started` says whether it confirmed that the guest
    /// runs (it owns it either way).
    Transferred {
        /// Whether `STARTED` arrived.
        started: bool,
    },
    /// The state file is complete under its final name.
    Saved {
        /// Its size.
        bytes: usize,
        /// The state version written.
        version: u16,
    },
}

/// Runs an update of `vmm`'s guest to `target`. `current` are the guest's identities so far
/// (from the incoming side's [`Resumed`](crate::Resumed), or [`Ids::new_vm`] for a guest
/// that booted here).
///
/// A restart returns only on failure. On any failure the guest is back as it was (running
/// or paused) in this process, as [`Failure::guest`] says, and the VMM carries on.
pub fn update<V: Updatable + ?Sized>(
    vmm: &mut V,
    current: &Ids,
    target: Target,
    timeouts: &Timeouts,
) -> std::result::Result<Outcome, Failure> {
    let mode = target.mode();
    // The stop's timestamp carries the boot id, read once per process. A process that booted
    // its guest (rather than receiving it) has not read it yet: read it now, not inside the
    // pause (profiled: an open, a stat and two reads of procfs in the blackout of its first
    // update).
    let _ = crate::clock::boot_id();
    let schema = vmm.schema().clone();
    let me = vmm.build_info();
    let ids = current.next().map_err(|e| untouched(vmm, e))?;
    if let Err(source) = vmm.check(mode) {
        return Err(untouched(vmm, Error::Refused { mode, source }));
    }
    let ctx = Ctx {
        schema: &schema,
        me: &me,
        ids,
        mode,
        timeouts,
    };
    match target {
        Target::Restart { program, args } => ctx.restart(vmm, &program, &args).map(|n| match n {}),
        Target::Transfer(stream) => ctx.transfer(vmm, stream),
        Target::Reboot { dir, name, version } => ctx.reboot(vmm, &dir, &name, version),
    }
}

/// The guest was never stopped: a failure leaves it as it is.
fn untouched<V: Updatable + ?Sized>(vmm: &mut V, error: Error) -> Failure {
    let guest = if vmm.is_running() {
        Guest::Running
    } else {
        Guest::Paused
    };
    vmm.progress(Progress::Failed {
        error: &error,
        guest: &guest,
    });
    Failure {
        error,
        guest,
        stopped: false,
    }
}

struct Stopped {
    was_running: bool,
    stop: StopTime,
}

/// Room for the encoded state of a small VM; a larger one grows it (paying those faults).
const STATE_BUFFER: usize = 64 << 10;
/// Room for one section's payload (a vCPU's is ~8 KiB).
const SECTION_BUFFER: usize = 16 << 10;

/// A buffer of [`STATE_BUFFER`] bytes' capacity whose pages are resident.
fn warm_buffer() -> Vec<u8> {
    let mut v = Vec::with_capacity(STATE_BUFFER);
    // Written, not just allocated: a fresh allocation maps its pages on first touch.
    v.resize(STATE_BUFFER, 1u8);
    std::hint::black_box(&mut v);
    v.clear();
    v
}

struct Ctx<'a> {
    schema: &'a Schema,
    me: &'a BuildInfo,
    ids: Ids,
    mode: Mode,
    timeouts: &'a Timeouts,
}

impl Ctx<'_> {
    /// Parks input and pauses; on failure nothing stays stopped.
    fn stop<V: Updatable + ?Sized>(&self, vmm: &mut V) -> std::result::Result<Stopped, Failure> {
        if let Err(e) = vmm.hold_input() {
            vmm.abandon();
            return Err(untouched(vmm, vmm_error(Step::HoldInput, e)));
        }
        let was_running = vmm.is_running();
        let stop_ns = if was_running {
            match vmm.pause() {
                Ok(ns) => ns,
                Err(e) => {
                    vmm.abandon();
                    vmm.release_input();
                    return Err(untouched(vmm, vmm_error(Step::Pause, e)));
                }
            }
        } else {
            monotonic_ns()
        };
        vmm.progress(Progress::Paused {
            stop_ns,
            was_running,
        });
        Ok(Stopped {
            was_running,
            stop: StopTime::at(stop_ns),
        })
    }

    /// The update failed after the pause: undo, resume if it ran, take input again.
    fn undo<V: Updatable + ?Sized>(&self, vmm: &mut V, stopped: &Stopped, error: Error) -> Failure {
        vmm.abandon();
        let guest = if stopped.was_running {
            match vmm.resume() {
                Ok(()) => Guest::Running,
                Err(e) => Guest::NotResumed(e.to_string()),
            }
        } else {
            Guest::Paused
        };
        vmm.release_input();
        vmm.progress(Progress::Failed {
            error: &error,
            guest: &guest,
        });
        Failure {
            error,
            guest,
            stopped: true,
        }
    }

    fn writer(&self, version: u16) -> Result<SnapshotWriter<'_, Vec<u8>>> {
        self.writer_into(Vec::with_capacity(STATE_BUFFER), version)
    }

    fn writer_into(&self, out: Vec<u8>, version: u16) -> Result<SnapshotWriter<'_, Vec<u8>>> {
        Ok(SnapshotWriter::new(
            out,
            self.schema,
            &self.me.app,
            &self.me.version,
            version,
        )?)
    }

    /// The writer the state is encoded with, made before the pause with its buffers' pages
    /// touched: on the hosts measured a page's first touch costs a fault of several µs, and
    /// encoding into fresh memory took a few dozen of them inside the blackout.
    fn ready_writer(&self, version: u16) -> Result<SnapshotWriter<'_, Vec<u8>>> {
        let mut w = self.writer_into(warm_buffer(), version)?;
        w.prepare_payload(SECTION_BUFFER);
        Ok(w)
    }

    /// Encodes the state: memory sections (unless sent already), the VMM's sections, then
    /// this crate's; checks that it reads back.
    fn encode<V: Updatable + ?Sized>(
        &self,
        vmm: &mut V,
        writer: SnapshotWriter<'_, Vec<u8>>,
        stopped: &Stopped,
        fds: Option<&mut FdRegistry>,
        with_memory: bool,
    ) -> Result<Vec<u8>> {
        let mut saver = Saver {
            writer,
            fds,
            mode: self.mode,
            ids: self.ids,
        };
        if with_memory {
            vmm.save_memory(&mut saver)
                .map_err(hook(Step::SaveMemory))?;
        }
        vmm.save(&mut saver).map_err(hook(Step::Save))?;
        let section = UpdateSection::new(
            self.mode,
            stopped.was_running,
            &stopped.stop,
            &self.ids,
            monotonic_ns(),
        );
        saver.writer.write_section(0, &section)?;
        let bytes = saver.writer.finish()?;
        // What the next image will read must read back here first: after an exec or on
        // disk there is no one to say it cannot. A transfer's new side decodes it while this
        // process still owns the guest and aborts if it cannot, so the check would only
        // lengthen the blackout.
        if self.mode != Mode::Transfer {
            Snapshot::read_from(bytes.as_slice(), self.schema)?;
        }
        vmm.progress(Progress::Saved { bytes: bytes.len() });
        Ok(bytes)
    }

    fn restart<V: Updatable + ?Sized>(
        &self,
        vmm: &mut V,
        program: &Path,
        args: &[OsString],
    ) -> std::result::Result<std::convert::Infallible, Failure> {
        // Ask the target what it reads, while the guest runs on.
        let (version, holds) = probe(program, self.timeouts.probe)
            .and_then(|peer| {
                let v = self.me.version_for(&peer)?;
                vmm.progress(Progress::Negotiated {
                    mode: self.mode,
                    version: v,
                    target: Some(&peer),
                });
                Ok((v, peer.has_feature(FEATURE_OLD_MM)))
            })
            .map_err(|e| untouched(vmm, e))?;
        // Before the pause: the child that keeps this address space from being torn down
        // inside the exec. Without it (a target that would not release it, or no
        // close_range) the exec pays for the teardown, as before. Declared before `reg`, so
        // dropped after it when the exec fails.
        let holder = if holds { MmHolder::start().ok() } else { None };
        let writer = self.ready_writer(version).map_err(|e| untouched(vmm, e))?;
        let stopped = self.stop(vmm)?;
        let mut reg = FdRegistry::new();
        let error = (|| -> Result<Error> {
            let bytes = self.encode(vmm, writer, &stopped, Some(&mut reg), true)?;
            let state = cpr_fd::sealed_memfd("cpr-update-state", &bytes)?;
            reg.register(FD_STATE, FdKind::STATE, state, b"")?;
            // The running binary, whatever its path names by now: the way back.
            let exe = File::open("/proc/self/exe").map_err(io("open /proc/self/exe"))?;
            reg.register(FD_PREVIOUS_EXE, FdKind::OTHER, exe, b"")?;
            fault::hit("restart.old.before-exec")?;
            vmm.progress(Progress::Executing { program });
            // Last, so its time is the exec's.
            let record = Record {
                attempt: 0,
                argv: std::env::args_os().collect(),
                error: None,
                exec_ns: monotonic_ns(),
            };
            let record = cpr_fd::sealed_memfd("cpr-update-handover", &record.encode())?;
            reg.register(FD_HANDOVER, FdKind::STATE, record, b"")?;
            if let Some(h) = &holder {
                let keep = h
                    .keep()
                    .map_err(io("dup the address space holder's pipe"))?;
                reg.register(FD_OLD_MM, FdKind::OTHER, keep, &h.pid().to_le_bytes())?;
            }
            let prepared = reg.prepare()?;
            Ok(Error::Fd(prepared.exec(program, args)))
        })()
        .unwrap_or_else(|e| e);
        drop(reg);
        Err(self.undo(vmm, &stopped, error))
    }

    fn transfer<V: Updatable + ?Sized>(
        &self,
        vmm: &mut V,
        stream: UnixStream,
    ) -> std::result::Result<Outcome, Failure> {
        let t = self.timeouts;
        // The new process, to tell later whether it is gone.
        let peer = crate::sys::peer_pid(&stream)
            .and_then(crate::sys::pidfd_open)
            .ok();
        let mut ch = Channel::new(stream, Role::Old, self.schema.limits().max_total);
        // Before the pause: a failure leaves the guest running here.
        let before = (|| -> Result<(u16, Option<OwnerWord>)> {
            let hello = Hello {
                protocol: PROTOCOL_VERSION,
                role: Role::Old,
                pid: std::process::id(),
                build: self.me.clone(),
            };
            ch.send(&Message::Hello(hello), t.write)?;
            let Message::Hello(peer) = ch.recv("HELLO", t.hello)? else {
                unreachable!("the session admits only HELLO here")
            };
            check_hello(&peer, Role::New)?;
            let version = self.me.version_for(&peer.build)?;
            vmm.progress(Progress::Negotiated {
                mode: self.mode,
                version,
                target: Some(&peer.build),
            });
            let mut mem = FdRegistry::new();
            let mut saver = Saver {
                writer: self.writer(version)?,
                fds: Some(&mut mem),
                mode: self.mode,
                ids: self.ids,
            };
            vmm.save_memory(&mut saver)
                .map_err(hook(Step::SaveMemory))?;
            let container = saver.writer.finish()?;
            // Both builds decide the owner with the word: it goes with the memory.
            let word = if crate::owner::agreed(self.me, &peer.build) {
                let w = OwnerWord::create().map_err(io("create the owner word"))?;
                let fd = w.fd().map_err(io("dup the owner word"))?;
                mem.register(FD_OWNER_WORD, FdKind::OTHER, fd, b"")?;
                ch.use_owner_word();
                Some(w)
            } else {
                None
            };
            let memory = Memory {
                state_version: version,
                ids: self.ids,
                container,
            };
            ch.send_with_fds(&Message::Memory(memory), &mem, t.write)?;
            vmm.progress(Progress::MemorySent);
            fault::hit("transfer.old.before-ready")?;
            ch.recv("READY", t.prepare)?;
            vmm.progress(Progress::PeerReady);
            Ok((version, word))
        })();
        let (version, word) = match before {
            Ok(v) => v,
            Err(e) => {
                ch.abort(&e.to_string());
                vmm.abandon();
                return Err(untouched(vmm, e));
            }
        };

        let writer = match self.ready_writer(version) {
            Ok(w) => w,
            Err(e) => {
                ch.abort(&e.to_string());
                vmm.abandon();
                return Err(untouched(vmm, e));
            }
        };
        let stopped = match self.stop(vmm) {
            Ok(s) => s,
            Err(f) => {
                ch.abort(&f.error.to_string());
                return Err(f);
            }
        };
        if let Some(word) = word {
            return self.hand_over_by_word(vmm, ch, writer, stopped, &word, peer);
        }
        let handed = (|| -> Result<()> {
            let mut reg = FdRegistry::new();
            let bytes = self.encode(vmm, writer, &stopped, Some(&mut reg), false)?;
            ch.send_with_fds(&Message::State(bytes), &reg, t.write)?;
            vmm.progress(Progress::StateSent);
            ch.recv("RESTORED", t.restore)?;
            vmm.progress(Progress::PeerRestored);
            fault::hit("transfer.old.before-commit")?;
            // The commit. If this write fails, the new side did not get a whole COMMIT: it
            // sees the connection end while this process lives, and never runs the guest.
            ch.send(&Message::Commit, t.write)?;
            Ok(())
        })();
        if let Err(e) = handed {
            // ABORT reaches the new side before this process resumes the guest.
            ch.abort(&e.to_string());
            return Err(self.undo(vmm, &stopped, e));
        }
        vmm.progress(Progress::Committed);
        let _ = fault::hit("transfer.old.after-commit");
        match ch.recv("STARTED", t.started).map_err(Error::from) {
            Ok(_) => {
                vmm.progress(Progress::PeerStarted);
                Ok(Outcome::Transferred { started: true })
            }
            // It gave up before it read the COMMIT: the guest is still ours.
            Err(e @ Error::Protocol(ProtocolError::Aborted { .. })) => {
                Err(self.undo(vmm, &stopped, e))
            }
            // It is gone without a word. Only if it had not begun to own the guest (its
            // mark untouched) and is really dead may the guest resume here.
            Err(e) => match self.orphaned(
                vmm,
                peer.as_ref(),
                e,
                "the new process died after the commit, before it took the guest over",
            ) {
                Some(e) => Err(self.undo(vmm, &stopped, e)),
                // Otherwise the guest is the new process's, whatever happens to it now.
                None => Ok(Outcome::Transferred { started: false }),
            },
        }
    }

    /// After the new process took the guest: `Some` (the error to resume the guest with) if
    /// `e` says the connection ended, the process is dead, and its mark on the guest is
    /// untouched (`peer_took_over() == Some(false)`): then it never ran the guest.
    fn orphaned<V: Updatable + ?Sized>(
        &self,
        vmm: &V,
        peer: Option<&std::os::fd::OwnedFd>,
        e: Error,
        reason: &str,
    ) -> Option<Error> {
        let Error::Protocol(ProtocolError::PeerClosed { state, .. }) = e else {
            return None;
        };
        let dead = peer.is_some_and(|p| crate::sys::wait_exit(p, self.timeouts.peer_exit));
        (dead && vmm.peer_took_over() == Some(false)).then(|| Error::Orphaned {
            state,
            reason: reason.into(),
        })
    }

    /// The rest of a transfer whose owner the word decides: `STATE` out, then `STARTED`
    /// awaited. No message of ours is needed for the new side to run the guest: it claims
    /// the word. On any failure this side reclaims the word first, and resumes the guest
    /// only if that succeeded (or if the new side claimed it and then died without running
    /// it, which `peer_took_over` tells).
    fn hand_over_by_word<V: Updatable + ?Sized>(
        &self,
        vmm: &mut V,
        mut ch: Channel,
        writer: SnapshotWriter<'_, Vec<u8>>,
        stopped: Stopped,
        word: &OwnerWord,
        peer: Option<std::os::fd::OwnedFd>,
    ) -> std::result::Result<Outcome, Failure> {
        let t = self.timeouts;
        let handed = (|| -> Result<()> {
            fault::hit("transfer.old.before-state")?;
            let mut reg = FdRegistry::new();
            let bytes = self.encode(vmm, writer, &stopped, Some(&mut reg), false)?;
            ch.send_with_fds(&Message::State(bytes), &reg, t.write)?;
            vmm.progress(Progress::StateSent);
            fault::hit("transfer.old.after-state")?;
            ch.recv("STARTED", t.restore.saturating_add(t.started))?;
            Ok(())
        })();
        let e = match handed {
            Ok(()) => {
                vmm.progress(Progress::PeerRestored);
                vmm.progress(Progress::Committed);
                vmm.progress(Progress::PeerStarted);
                return Ok(Outcome::Transferred { started: true });
            }
            Err(e) => e,
        };
        if word.reclaim().is_ok() {
            // The new side can no longer claim it. ABORT tells it why before the guest
            // resumes here.
            ch.abort(&e.to_string());
            return Err(self.undo(vmm, &stopped, e));
        }
        // The new process claimed the guest. Only if it is gone without a word, really dead,
        // and had not begun to run it (its mark untouched) may the guest resume here.
        match self.orphaned(
            vmm,
            peer.as_ref(),
            e,
            "the new process died after it claimed the guest, before it ran it",
        ) {
            Some(e) => Err(self.undo(vmm, &stopped, e)),
            None => {
                vmm.progress(Progress::Committed);
                Ok(Outcome::Transferred { started: false })
            }
        }
    }

    fn reboot<V: Updatable + ?Sized>(
        &self,
        vmm: &mut V,
        dir: &File,
        name: &OsStr,
        version: Option<u16>,
    ) -> std::result::Result<Outcome, Failure> {
        let version = match version {
            None => self.schema.latest_version(),
            Some(v) if self.me.writes.contains(&v) && self.schema.versions().contains(&v) => v,
            Some(v) => {
                return Err(untouched(
                    vmm,
                    Error::InvalidVersion {
                        requested: v,
                        writes: self.me.writes.clone(),
                    },
                ))
            }
        };
        vmm.progress(Progress::Negotiated {
            mode: self.mode,
            version,
            target: None,
        });
        let writer = self.ready_writer(version).map_err(|e| untouched(vmm, e))?;
        let stopped = self.stop(vmm)?;
        let saved = (|| -> Result<usize> {
            let bytes = self.encode(vmm, writer, &stopped, None, true)?;
            cpr_snapshot::save_in_dir(dir, name, |out| {
                out.write_all(&bytes)
                    .map_err(|source| cpr_snapshot::Error::Io { offset: 0, source })?;
                fault::hit("reboot.old.before-rename").map_err(|_| cpr_snapshot::Error::Io {
                    offset: 0,
                    source: std::io::Error::other("injected fault at reboot.old.before-rename"),
                })
            })?;
            Ok(bytes.len())
        })();
        match saved {
            Ok(bytes) => Ok(Outcome::Saved { bytes, version }),
            Err(e) => Err(self.undo(vmm, &stopped, e)),
        }
    }
}

fn vmm_error(step: Step, source: crate::BoxError) -> Error {
    Error::Vmm { step, source }
}

/// Checks a peer's `HELLO`: our protocol, the role we expect.
pub(crate) fn check_hello(h: &Hello, role: Role) -> Result<()> {
    if h.protocol != PROTOCOL_VERSION {
        return Err(crate::protocol::ProtocolError::ProtocolVersion {
            found: h.protocol,
            ours: PROTOCOL_VERSION,
        }
        .into());
    }
    if h.role != role {
        return Err(crate::protocol::ProtocolError::Malformed {
            kind: crate::protocol::Kind::Hello,
            reason: "the peer claims our role",
        }
        .into());
    }
    Ok(())
}
