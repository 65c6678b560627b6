// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The new side of an update: decode, prepare, restore, commit, resume; for a restart, exec
//! back into the previous binary if the restore fails; for a transfer, the protocol.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cpr_fd::{FdEntry, FdKind, FdRegistry};
use cpr_snapshot::{Schema, Snapshot, SnapshotHeader};

use crate::api::{Loader, Marks, Phase, Progress, Report, Updatable};
use crate::clock::{monotonic_ns, Elapsed};
use crate::error::{hook, io, Error, Result, Step};
use crate::handover::{Record, FD_HANDOVER, FD_OLD_MM, FD_PREVIOUS_EXE, FD_STATE};
use crate::outgoing::{check_hello, Timeouts};
use crate::owner::{OwnerWord, FD_OWNER_WORD};
use crate::protocol::{Channel, Hello, Message, ProtocolError, Role, PROTOCOL_VERSION};
use crate::section::{Ids, UpdateInfo, UpdateSection};
use crate::{fault, Mode};

/// How the new side runs.
#[derive(Clone, Copy, Debug)]
pub struct Incoming {
    /// When this process image started (`CLOCK_MONOTONIC` ns), for the report's `start`
    /// phase; take it first thing in `main`.
    pub started_ns: u64,
    /// Waits (transfer).
    pub timeouts: Timeouts,
    /// How long to wait for the first vCPU entry after resuming, for the blackout.
    pub first_entry_timeout: Duration,
}

impl Default for Incoming {
    fn default() -> Self {
        Incoming {
            started_ns: monotonic_ns(),
            timeouts: Timeouts::default(),
            first_entry_timeout: Duration::from_secs(10),
        }
    }
}

/// A guest taken over by this process.
#[derive(Debug)]
pub struct Resumed {
    /// How it went.
    pub report: Report,
    /// The guest's identities (keep them for its next update).
    pub ids: Ids,
    /// Who wrote the state.
    pub source: SnapshotHeader,
    /// Restart: this process is the previous binary, exec'd back into because the new one
    /// could not restore the state, for this reason. The update failed; the guest runs on.
    pub fallback: Option<String>,
    /// Transfer: the old process died after the pause without aborting, and this process
    /// took the guest over.
    pub took_over: bool,
    /// Names of handed-over fds the VMM did not take.
    pub unused_fds: Vec<String>,
}

struct Loaded {
    info: UpdateInfo,
    header: SnapshotHeader,
    bytes: usize,
}

/// Decodes `bytes` and runs `prepare` (unless done already) and `restore`.
fn load<V: Updatable + ?Sized>(
    vmm: &mut V,
    schema: &Schema,
    bytes: &[u8],
    mode: Mode,
    fds: &mut FdRegistry,
    prepare: bool,
    marks: &mut Marks,
) -> Result<Loaded> {
    let mut snap = Snapshot::read_from(bytes, schema)?;
    marks.mark("decoded");
    let header = snap.header().clone();
    vmm.progress(Progress::Decoded { header: &header });
    let section: UpdateSection = snap.take(0)?;
    let info = section.info(mode)?;
    let mut loader = Loader {
        snapshot: &mut snap,
        fds,
        mode,
        ids: info.ids,
        info: Some(&info),
        marks,
    };
    if prepare {
        vmm.prepare(&mut loader).map_err(hook(Step::Prepare))?;
        loader.marks.mark("prepared");
        vmm.progress(Progress::Prepared);
    }
    vmm.restore(&mut loader).map_err(hook(Step::Restore))?;
    marks.mark("restored");
    vmm.progress(Progress::Restored);
    Ok(Loaded {
        info,
        header,
        bytes: bytes.len(),
    })
}

/// Owns the guest from here: `commit`, then `resume` if it ran; measures the blackout.
/// `fault` is the fault point right after the commit hook.
fn run<V: Updatable + ?Sized>(
    vmm: &mut V,
    loaded: &Loaded,
    marks: &mut Marks,
    opts: &Incoming,
    fault: Option<&'static str>,
) -> Result<Report> {
    vmm.commit().map_err(hook(Step::Commit))?;
    marks.mark("committed");
    if let Some(point) = fault {
        let _ = fault::hit(point);
    }
    let info = &loaded.info;
    let mut blackout = None;
    if info.was_running {
        vmm.resume().map_err(hook(Step::Resume))?;
        if let Some(t) = vmm.first_entry(opts.first_entry_timeout) {
            marks.at("first-entry", t);
            blackout = Some(info.stop.until(t));
        }
    }
    let mut phases = vec![Phase {
        name: "stop".into(),
        since_stop: Elapsed::SameBoot(0),
    }];
    // Both taken on the old side's boot.
    phases.push(Phase {
        name: "encoded".into(),
        since_stop: Elapsed::SameBoot(info.encoded_mono_ns.saturating_sub(info.stop.mono_ns)),
    });
    phases.extend(marks.relative_to(&info.stop));
    let report = Report {
        mode: info.mode,
        was_running: info.was_running,
        state_version: loaded.header.state_version,
        state_bytes: loaded.bytes,
        blackout,
        phases,
    };
    vmm.progress(Progress::Resumed { report: &report });
    Ok(report)
}

fn read_memfd(fd: OwnedFd, limit: u64, what: &'static str) -> Result<(File, Vec<u8>)> {
    let file = File::from(fd);
    let len = file.metadata().map_err(io(what))?.len();
    if len > limit {
        return Err(Error::Snapshot(cpr_snapshot::Error::TooLarge {
            offset: 0,
            what,
            len,
            limit,
        }));
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0).map_err(io(what))?;
    Ok((file, bytes))
}

/// Restart, in the new image: resumes the guest the previous image handed over by exec.
/// `fds` is what [`cpr_fd::reclaim`] returned (call it first thing in `main`).
///
/// If the state cannot be restored here (this build rejects it, a device fails), the
/// VMM's work is [`discard`](Updatable::discard)ed and this process execs back into the
/// previous binary (the very file it ran, even if an upgrade replaced its path) with the
/// same fds and state; that image restores the guest and its [`Resumed::fallback`] says
/// why the update failed. This returns only if the previous binary is the one failing, or
/// the exec back fails: the guest is then lost, and the error says so.
pub fn resume_after_exec<V: Updatable + ?Sized>(
    vmm: &mut V,
    mut fds: FdRegistry,
    opts: &Incoming,
) -> Result<Resumed> {
    let schema = vmm.schema().clone();
    let state = fds
        .take(FD_STATE)
        .ok_or(Error::NotAnUpdate("no `cpr.state` fd"))?;
    let record = fds
        .take(FD_HANDOVER)
        .ok_or(Error::NotAnUpdate("no `cpr.handover` fd"))?;
    let previous = fds.take(FD_PREVIOUS_EXE);
    // The previous image's address space, still held: let it go once the guest runs here
    // (its teardown then overlaps the guest instead of delaying it), or before going back.
    let old_mm = fds.take(FD_OLD_MM).map(OldMm::from_entry);
    let (_, record) = read_memfd(
        record.into_fd(),
        crate::handover::MAX_RECORD as u64,
        "handover record",
    )?;
    let record = Record::decode(&record)?;
    let (state_file, bytes) = read_memfd(state.into_fd(), schema.limits().max_total, "state")?;

    let mut marks = Marks::default();
    if record.exec_ns != 0 {
        marks.at("exec", record.exec_ns);
    }
    marks.at("start", opts.started_ns);
    // Everything the previous image handed over, intact, in case we must go back.
    let backup = match (&previous, record.attempt) {
        (Some(_), 0) => Some(fds.try_clone()?),
        _ => None,
    };
    let loaded = fault::hit("restart.new.restore").and_then(|()| {
        load(
            vmm,
            &schema,
            &bytes,
            Mode::Restart,
            &mut fds,
            true,
            &mut marks,
        )
    });
    match loaded {
        Ok(loaded) => {
            drop(backup);
            drop(previous);
            let ran = run(vmm, &loaded, &mut marks, opts, None);
            if let Some(m) = old_mm {
                m.release_in_background();
            }
            let report = ran?;
            Ok(Resumed {
                report,
                ids: loaded.info.ids,
                source: loaded.header,
                fallback: record.error,
                took_over: false,
                unused_fds: fds.iter().map(|e| e.name().to_string()).collect(),
            })
        }
        Err(e) => {
            vmm.discard();
            drop(fds);
            // Before going back: the previous image finds no child of this one.
            drop(old_mm);
            let (Some(backup), Some(previous)) = (backup, previous) else {
                return Err(e);
            };
            vmm.progress(Progress::FallingBack { error: &e });
            let exec = fall_back(backup, state_file, previous, &record, &e);
            Err(Error::FallbackFailed {
                restore: Box::new(e),
                exec: Box::new(exec),
            })
        }
    }
}

/// The write end of the pipe that keeps the previous image's address space alive (see
/// [`FD_OLD_MM`]), and the holder's pid from its metadata (none if the metadata is not a
/// positive pid: the fd is still closed, and only a child of this process is ever reaped).
/// Dropped on any path, it closes the pipe and waits for the holder, so no zombie is left.
#[derive(Debug)]
struct OldMm {
    keep: Option<OwnedFd>,
    pid: Option<i32>,
}

impl OldMm {
    fn from_entry(e: FdEntry) -> OldMm {
        let pid = <[u8; 4]>::try_from(e.metadata())
            .ok()
            .map(i32::from_le_bytes)
            .filter(|p| *p > 0);
        OldMm {
            keep: Some(e.into_fd()),
            pid,
        }
    }

    /// Closes the pipe, so the holder exits and the kernel frees the old address space,
    /// and waits for it on a thread of its own: the guest runs meanwhile.
    fn release_in_background(mut self) {
        self.keep = None;
        if let Some(pid) = self.pid.take() {
            let spawned = std::thread::Builder::new()
                .name("cpr-old-mm".into())
                .spawn(move || crate::sys::reap(pid));
            if spawned.is_err() {
                crate::sys::reap(pid);
            }
        }
    }
}

impl Drop for OldMm {
    fn drop(&mut self) {
        self.keep = None;
        if let Some(pid) = self.pid.take() {
            crate::sys::reap(pid);
        }
    }
}

/// Execs back into the previous binary with `reg` (the fds as they were handed over), the
/// state, and a record saying why. Returns only on failure.
fn fall_back(
    mut reg: FdRegistry,
    state: File,
    previous: FdEntry,
    record: &Record,
    error: &Error,
) -> Error {
    (|| -> Result<Error> {
        reg.register(FD_STATE, FdKind::STATE, state, b"")?;
        let back = Record {
            attempt: 1,
            argv: record.argv.clone(),
            error: Some(error.to_string()),
            exec_ns: monotonic_ns(),
        };
        let memfd = cpr_fd::sealed_memfd("cpr-update-handover", &back.encode())?;
        reg.register(FD_HANDOVER, FdKind::STATE, memfd, b"")?;
        let exe = previous.into_fd();
        let keep = exe.try_clone().map_err(io("dup the previous executable"))?;
        reg.register(FD_PREVIOUS_EXE, FdKind::OTHER, keep, b"")?;
        let (argv0, args) = back.argv.split_first().ok_or(Error::Handover("no argv"))?;
        let prepared = reg.prepare()?;
        Ok(Error::Fd(prepared.exec_fd(exe.as_fd(), argv0, args)))
    })()
    .unwrap_or_else(|e| e)
}

/// Reboot (or any state file), in the new process: restores the guest from `bytes`, a
/// state the old process saved. Guest memory is found from the command line (the VMM's
/// [`prepare`](Updatable::prepare)); no fd comes with it.
pub fn restore_saved<V: Updatable + ?Sized>(
    vmm: &mut V,
    bytes: &[u8],
    opts: &Incoming,
) -> Result<Resumed> {
    let schema = vmm.schema().clone();
    let mut marks = Marks::default();
    marks.at("start", opts.started_ns);
    let mut fds = FdRegistry::new();
    let loaded = fault::hit("reboot.new.restore").and_then(|()| {
        load(
            vmm,
            &schema,
            bytes,
            Mode::Reboot,
            &mut fds,
            true,
            &mut marks,
        )
    });
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            vmm.discard();
            return Err(e);
        }
    };
    let report = run(vmm, &loaded, &mut marks, opts, None)?;
    Ok(Resumed {
        report,
        ids: loaded.info.ids,
        source: loaded.header,
        fallback: None,
        took_over: false,
        unused_fds: Vec::new(),
    })
}

/// Transfer, in the new process: takes the guest from the old process at the other end of
/// `stream` (accepted on the VMM's transfer socket).
///
/// Until the commit the old process owns the guest: any failure here is sent to it as
/// `ABORT` and it resumes the guest; this returns the error and the VMM exits. If the old
/// process dies after the pause without aborting (it never resumes the guest without
/// sending `ABORT` first), this one takes the guest over ([`Resumed::took_over`]).
pub fn receive_transfer<V: Updatable + ?Sized>(
    vmm: &mut V,
    stream: UnixStream,
    opts: &Incoming,
) -> Result<Resumed> {
    let schema = vmm.schema().clone();
    let me = vmm.build_info();
    let t = &opts.timeouts;
    let old = crate::sys::peer_pid(&stream)
        .and_then(crate::sys::pidfd_open)
        .ok();
    let mut ch = Channel::new(stream, Role::New, schema.limits().max_total);
    let mut marks = Marks::default();
    marks.at("start", opts.started_ns);

    // Before the pause: the guest runs in the old process whatever happens here.
    let prepared = (|| -> Result<(Ids, u16, Option<OwnerWord>)> {
        let Message::Hello(peer) = ch.recv("HELLO", t.hello)? else {
            unreachable!("the session admits only HELLO here")
        };
        check_hello(&peer, Role::Old)?;
        // Refuse now, with our reason, what the old side would find out anyway.
        peer.build.version_for(&me)?;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::New,
            pid: std::process::id(),
            build: me.clone(),
        };
        ch.send(&Message::Hello(hello), t.write)?;
        let Message::Memory(memory) = ch.recv("MEMORY", t.hello)? else {
            unreachable!("the session admits only MEMORY here")
        };
        let mut mem_fds = ch.recv_fds(t.write)?;
        marks.mark("memory-received");
        // Both builds decide the owner with the word: the old side sent it with the memory.
        let word = if crate::owner::agreed(&me, &peer.build) {
            let entry = mem_fds
                .take(FD_OWNER_WORD)
                .ok_or_else(|| Error::OwnerWord("MEMORY came without it".into()))?;
            ch.use_owner_word();
            Some(OwnerWord::open(entry.into_fd()).map_err(Error::OwnerWord)?)
        } else {
            None
        };
        if !me.reads.contains(&memory.state_version) {
            return Err(Error::InvalidVersion {
                requested: memory.state_version,
                writes: me.reads.clone(),
            });
        }
        let mut snap = Snapshot::read_from(memory.container.as_slice(), &schema)?;
        if snap.header().state_version != memory.state_version {
            return Err(Error::BadUpdateSection {
                expected: Mode::Transfer,
                reason: "the memory container's state version differs from MEMORY's".into(),
            });
        }
        let mut loader = Loader {
            snapshot: &mut snap,
            fds: &mut mem_fds,
            mode: Mode::Transfer,
            ids: memory.ids,
            info: None,
            marks: &mut marks,
        };
        vmm.prepare(&mut loader).map_err(hook(Step::Prepare))?;
        marks.mark("prepared");
        vmm.progress(Progress::Prepared);
        fault::hit("transfer.new.before-ready")?;
        ch.send(&Message::Ready, t.write)?;
        Ok((memory.ids, memory.state_version, word))
    })();
    let (ids, version, word) = match prepared {
        Ok(v) => v,
        Err(e) => return Err(give_up(vmm, &mut ch, e)),
    };

    // The old process pauses, then sends the rest.
    let loaded = (|| -> Result<Loaded> {
        let Message::State(bytes) = ch.recv("STATE", t.state)? else {
            unreachable!("the session admits only STATE here")
        };
        let mut fds = ch.recv_fds(t.write)?;
        marks.mark("state-received");
        let loaded = load(
            vmm,
            &schema,
            &bytes,
            Mode::Transfer,
            &mut fds,
            false,
            &mut marks,
        )?;
        if loaded.info.ids != ids || loaded.header.state_version != version {
            return Err(Error::BadUpdateSection {
                expected: Mode::Transfer,
                reason: "the state is not the one MEMORY announced".into(),
            });
        }
        fault::hit("transfer.new.restore")?;
        Ok(loaded)
    })();
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => return Err(give_up(vmm, &mut ch, e)),
    };

    if let Some(word) = word {
        return run_by_word(vmm, ch, &word, loaded, marks, opts);
    }
    let committed = ch
        .send(&Message::Restored, t.write)
        .map_err(Error::from)
        .and_then(|()| fault::hit("transfer.new.before-commit"))
        .and_then(|()| ch.recv("COMMIT", t.commit).map(drop).map_err(Error::from));
    let took_over = match committed {
        Ok(()) => false,
        Err(Error::Protocol(ProtocolError::PeerClosed { state, .. })) => {
            // The old process never resumes the guest without sending ABORT first; if it is
            // gone without one, nobody runs the guest but us.
            let gone = old
                .as_ref()
                .is_some_and(|p| crate::sys::wait_exit(p, t.peer_exit));
            if !gone {
                vmm.discard();
                return Err(Error::Orphaned {
                    state,
                    reason: "the old process closed the connection but still runs".into(),
                });
            }
            vmm.progress(Progress::TookOver);
            true
        }
        Err(e) => return Err(give_up(vmm, &mut ch, e)),
    };
    if !took_over {
        vmm.progress(Progress::Committed);
    }
    marks.mark("commit-received");
    let _ = fault::hit("transfer.new.commit-received");
    start_owned(vmm, &mut ch, &loaded, &mut marks, opts, took_over)
}

/// The new side owns the guest: commit and run it, tell the old side (`STARTED`).
fn start_owned<V: Updatable + ?Sized>(
    vmm: &mut V,
    ch: &mut Channel,
    loaded: &Loaded,
    marks: &mut Marks,
    opts: &Incoming,
    took_over: bool,
) -> Result<Resumed> {
    let report = run(vmm, loaded, marks, opts, Some("transfer.new.after-commit"))?;
    let _ = ch.send(&Message::Started, opts.timeouts.write);
    Ok(Resumed {
        report,
        ids: loaded.info.ids,
        source: loaded.header.clone(),
        fallback: None,
        took_over,
        unused_fds: Vec::new(),
    })
}

/// The end of a transfer whose owner the word decides: claim it, and if that succeeded run
/// the guest at once, then tell the old side (`STARTED`). If the old side reclaimed it first
/// (it gave up waiting, or failed), the guest is the old process's: drop what was built.
fn run_by_word<V: Updatable + ?Sized>(
    vmm: &mut V,
    mut ch: Channel,
    word: &OwnerWord,
    loaded: Loaded,
    mut marks: Marks,
    opts: &Incoming,
) -> Result<Resumed> {
    if let Err(e) = fault::hit("transfer.new.before-claim") {
        return Err(give_up(vmm, &mut ch, e));
    }
    if word.claim().is_err() {
        return Err(give_up(vmm, &mut ch, Error::Reclaimed));
    }
    marks.mark("claimed");
    vmm.progress(Progress::Committed);
    let _ = fault::hit("transfer.new.claimed");
    start_owned(vmm, &mut ch, &loaded, &mut marks, opts, false)
}

/// The new side fails before owning the guest: drop what was built and tell the old side.
fn give_up<V: Updatable + ?Sized>(vmm: &mut V, ch: &mut Channel, e: Error) -> Error {
    vmm.discard();
    ch.abort(&e.to_string());
    e
}

/// Reads a whole state from `r`, refusing more than `limit` bytes.
pub fn read_state<R: Read>(r: R, limit: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    r.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read the state"))?;
    if bytes.len() as u64 > limit {
        return Err(Error::Snapshot(cpr_snapshot::Error::TooLarge {
            offset: 0,
            what: "state",
            len: bytes.len() as u64,
            limit,
        }));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn old_mm(fd: impl Into<OwnedFd>, metadata: &[u8]) -> OldMm {
        let mut reg = FdRegistry::new();
        reg.register(FD_OLD_MM, FdKind::OTHER, fd, metadata)
            .unwrap();
        OldMm::from_entry(reg.take(FD_OLD_MM).unwrap())
    }

    #[test]
    fn a_holder_pipe_with_a_bad_pid_is_closed_and_nothing_is_reaped() {
        let zero = 0i32.to_le_bytes();
        let negative = (-5i32).to_le_bytes();
        for meta in [&b""[..], b"abc", &zero, &negative, &[1, 2, 3, 4, 5]] {
            let (mut ours, theirs) = UnixStream::pair().unwrap();
            let m = old_mm(theirs, meta);
            assert_eq!(m.pid, None, "{meta:?}");
            drop(m);
            let mut b = [0u8; 1];
            assert_eq!(ours.read(&mut b).unwrap(), 0, "closed");
        }
    }

    #[test]
    fn a_holder_is_reaped_once_its_pipe_is_closed() {
        // A child that, like the holder, exits when its pipe ends.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read x"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let m = old_mm(child.stdin.take().unwrap(), &pid.to_le_bytes());
        assert_eq!(m.pid, Some(pid));
        drop(m);
        // Reaped already: waiting for it again finds no such child.
        let e = child.try_wait().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECHILD), "{e}");
    }
}
