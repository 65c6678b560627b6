// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The transfer sequence between two toy VMMs in one process (two threads and a socket
//! pair), and against scripted peers that misbehave. Multi-process cases (a side killed at
//! each step) are in the reference VMM's end-to-end tests.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::{eventfd_count, Toy, LIVE};
use cpr_update::owner::FEATURE_OWNER_WORD;
use cpr_update::protocol::{read_message, Hello, Message, Role, PROTOCOL_VERSION};
use cpr_update::{
    receive_transfer, update, BuildInfo, Error, Guest, Ids, Incoming, Outcome, Resumed, Target,
    Timeouts,
};

fn short() -> Timeouts {
    Timeouts {
        hello: Duration::from_secs(5),
        prepare: Duration::from_secs(5),
        state: Duration::from_secs(5),
        restore: Duration::from_secs(5),
        commit: Duration::from_secs(5),
        started: Duration::from_secs(5),
        write: Duration::from_secs(5),
        peer_exit: Duration::from_secs(1),
        probe: Duration::from_secs(5),
    }
}

fn new_side(mut toy: Toy, sock: UnixStream) -> JoinHandle<(Toy, cpr_update::Result<Resumed>)> {
    std::thread::spawn(move || {
        let opts = Incoming {
            timeouts: short(),
            ..Incoming::default()
        };
        let r = receive_transfer(&mut toy, sock, &opts);
        (toy, r)
    })
}

#[test]
fn the_guest_moves_with_its_memory_state_and_fds() {
    let mut old = Toy::new(true).with_ram(b"guest data").with_device();
    old.value = 7;
    let (a, b) = UnixStream::pair().unwrap();
    let new = new_side(Toy::new(false), b);
    let ids = Ids::new_vm().unwrap();
    let out = update(&mut old, &ids, Target::Transfer(a), &short()).unwrap();
    assert_eq!(out, Outcome::Transferred { started: true });
    let (new, r) = new.join().unwrap();
    let r = r.unwrap();
    assert_eq!((new.value, new.running, new.committed), (7, true, true));
    assert_eq!(new.ram_bytes(10), b"guest data");
    assert_eq!(
        new.stamp(),
        LIVE,
        "the new side marked the guest as its own"
    );
    assert_eq!(eventfd_count(new.device.as_ref().unwrap()), 3);
    assert_eq!((old.pauses, old.resumes, old.running), (1, 0, false));
    assert_eq!(r.ids.vm, ids.vm);
    assert_eq!(r.ids.generation, 1);
    assert!(r.report.blackout.and_then(|b| b.ns()).is_some());
    let names: Vec<&str> = r.report.phases.iter().map(|p| p.name.as_str()).collect();
    for n in [
        "stop",
        "encoded",
        "prepared",
        "state-received",
        "restored",
        "committed",
        "first-entry",
    ] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    assert_eq!(
        old.events,
        [
            "Negotiated",
            "MemorySent",
            "PeerReady",
            "Paused",
            "Saved",
            "StateSent",
            "PeerRestored",
            "Committed",
            "PeerStarted"
        ]
    );
}

#[test]
fn a_paused_guest_moves_and_stays_paused() {
    let mut old = Toy::new(false).with_ram(b"x");
    let (a, b) = UnixStream::pair().unwrap();
    let new = new_side(Toy::new(false), b);
    update(
        &mut old,
        &Ids::new_vm().unwrap(),
        Target::Transfer(a),
        &short(),
    )
    .unwrap();
    let (new, r) = new.join().unwrap();
    let r = r.unwrap();
    assert!(!new.running && new.committed);
    assert_eq!((old.pauses, new.resumes), (0, 0));
    assert!(!r.report.was_running);
    assert_eq!(r.report.blackout, None);
}

#[test]
fn a_target_that_reads_no_version_we_write_is_refused_before_the_pause() {
    let mut old = Toy::new(true).with_ram(b"x");
    let mut future = Toy::new(false);
    future.build = Some(BuildInfo {
        app: "toy".into(),
        version: "9".into(),
        reads: 5..=9,
        writes: 5..=9,
        features: vec![],
    });
    let (a, b) = UnixStream::pair().unwrap();
    let new = new_side(future, b);
    let f = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        Target::Transfer(a),
        &short(),
    )
    .unwrap_err();
    assert_eq!(f.guest, Guest::Running);
    assert!(f.to_string().contains("reads state versions 5..=9"), "{f}");
    assert_eq!((old.pauses, old.running), (0, true));
    let (_, r) = new.join().unwrap();
    assert!(matches!(r, Err(Error::Incompatible { .. })), "{r:?}");
}

#[test]
fn a_new_side_that_cannot_prepare_leaves_the_guest_running_untouched() {
    let mut old = Toy::new(true).with_ram(b"x");
    let mut broken = Toy::new(false);
    broken.fail = Some("prepare");
    let (a, b) = UnixStream::pair().unwrap();
    let new = new_side(broken, b);
    let f = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        Target::Transfer(a),
        &short(),
    )
    .unwrap_err();
    assert!(f.to_string().contains("the toy's prepare failed"), "{f}");
    assert_eq!((f.guest, old.pauses), (Guest::Running, 0));
    assert_eq!(old.stamp(), LIVE, "abandon retired the stamp");
    let (new, r) = new.join().unwrap();
    assert!(r.is_err() && new.discarded);
}

#[test]
fn a_failed_restore_resumes_the_guest_in_the_old_process() {
    let mut old = Toy::new(true).with_ram(b"x");
    old.value = 5;
    let mut broken = Toy::new(false);
    broken.fail = Some("restore");
    let (a, b) = UnixStream::pair().unwrap();
    let new = new_side(broken, b);
    let f = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        Target::Transfer(a),
        &short(),
    )
    .unwrap_err();
    assert!(f.to_string().contains("the toy's restore failed"), "{f}");
    assert_eq!(f.guest, Guest::Running);
    assert_eq!(
        (old.pauses, old.resumes, old.running, old.value),
        (1, 1, true, 5)
    );
    let (new, r) = new.join().unwrap();
    assert!(r.is_err() && new.discarded && !new.running);
}

#[test]
fn a_failed_save_aborts_and_resumes() {
    let mut old = Toy::new(true).with_ram(b"x");
    old.fail = Some("save");
    let (a, b) = UnixStream::pair().unwrap();
    let new = new_side(Toy::new(false), b);
    let f = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        Target::Transfer(a),
        &short(),
    )
    .unwrap_err();
    assert_eq!((f.guest, old.resumes), (Guest::Running, 1));
    let (new, r) = new.join().unwrap();
    let e = r.unwrap_err();
    assert!(e.to_string().contains("aborted"), "{e}");
    assert!(new.discarded);
}

/// Runs a scripted new side: reads a frame and answers with what `script` returns.
fn scripted(
    sock: UnixStream,
    mut script: impl FnMut(&Message, &UnixStream) -> Option<Vec<u8>> + Send + 'static,
) -> JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        use std::io::Write;
        let mut seen = Vec::new();
        loop {
            let m = match read_message(&mut &sock, 1 << 30) {
                Ok(m) => m,
                Err(_) => return seen,
            };
            seen.push(m.kind().name().to_string());
            if matches!(m, Message::Memory(_) | Message::State(_))
                && cpr_fd::FdRegistry::receive(&sock).is_err()
            {
                return seen;
            }
            match script(&m, &sock) {
                Some(bytes) => {
                    if (&sock).write_all(&bytes).is_err() {
                        return seen;
                    }
                }
                None => return seen,
            }
        }
    })
}

/// The toy's build as one from before the owner word: its transfers use `RESTORED` and
/// `COMMIT`.
fn legacy_build() -> BuildInfo {
    let mut b = BuildInfo::new("toy", "1", &common::schema());
    b.features.retain(|f| f != FEATURE_OWNER_WORD);
    b
}

fn hello(build: BuildInfo) -> Vec<u8> {
    Message::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::New,
        pid: 1,
        build,
    })
    .encode()
}

#[test]
fn out_of_order_and_unknown_answers_are_refused_by_name_with_the_guest_untouched() {
    let toy_build = || BuildInfo::new("toy", "1", &common::schema());
    // READY where HELLO belongs.
    let mut old = Toy::new(true).with_ram(b"x");
    let (a, b) = UnixStream::pair().unwrap();
    let peer = scripted(b, |_, _| Some(Message::Ready.encode()));
    let f = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        Target::Transfer(a),
        &short(),
    )
    .unwrap_err();
    assert!(
        f.to_string()
            .contains("unexpected READY received in state Hello"),
        "{f}"
    );
    assert_eq!((f.guest, old.pauses), (Guest::Running, 0));
    assert_eq!(peer.join().unwrap(), ["HELLO", "ABORT"]);

    // A type number no protocol has.
    let mut old = Toy::new(true).with_ram(b"x");
    let (a, b) = UnixStream::pair().unwrap();
    let peer = scripted(b, move |m, _| match m {
        Message::Hello(_) => Some(hello(toy_build())),
        _ => Some(vec![9, 0, 0, 0, 0, 0, 0, 0]),
    });
    let f = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        Target::Transfer(a),
        &short(),
    )
    .unwrap_err();
    assert!(f.to_string().contains("unknown message type 9"), "{f}");
    assert_eq!((f.guest, old.pauses), (Guest::Running, 0));
    assert_eq!(peer.join().unwrap(), ["HELLO", "MEMORY", "ABORT"]);

    // Another application.
    let mut old = Toy::new(true).with_ram(b"x");
    let (a, b) = UnixStream::pair().unwrap();
    let peer = scripted(b, |_, _| {
        let mut other = BuildInfo::new("toy", "1", &common::schema());
        other.app = "not-a-toy".into();
        Some(hello(other))
    });
    let f = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        Target::Transfer(a),
        &short(),
    )
    .unwrap_err();
    assert!(f.to_string().contains("not-a-toy"), "{f}");
    assert_eq!(f.guest, Guest::Running);
    peer.join().unwrap();
}

/// A peer that takes the state and never answers: the old side gives up after its timeout
/// (waiting for `RESTORED` from an older build, for `STARTED` from one with the owner word,
/// which it then takes back) and resumes the guest.
#[test]
fn a_peer_that_goes_silent_after_the_state_times_out_and_the_guest_resumes() {
    for (build, awaited) in [
        (legacy_build(), "RESTORED"),
        (BuildInfo::new("toy", "1", &common::schema()), "STARTED"),
    ] {
        let mut old = Toy::new(true).with_ram(b"x");
        let (a, b) = UnixStream::pair().unwrap();
        let peer = scripted(b, move |m, _| match m {
            Message::Hello(_) => Some(hello(build.clone())),
            Message::Memory(_) => Some(Message::Ready.encode()),
            // Takes the state, then says nothing until the old side gives up.
            Message::State(_) => Some(Vec::new()),
            _ => None,
        });
        let mut t = short();
        t.restore = Duration::from_millis(200);
        t.started = Duration::from_millis(100);
        let f = update(&mut old, &Ids::new_vm().unwrap(), Target::Transfer(a), &t).unwrap_err();
        let want = format!("no {awaited} from the new process within");
        assert!(f.to_string().contains(&want), "{f}");
        assert_eq!((f.guest, old.pauses, old.resumes), (Guest::Running, 1, 1));
        assert_eq!(peer.join().unwrap(), ["HELLO", "MEMORY", "STATE", "ABORT"]);
    }
}

/// The new side gives up while the COMMIT is on its way: its ABORT crosses the COMMIT,
/// and the old side, which had let go, takes the guest back.
#[test]
fn an_abort_crossing_the_commit_resumes_the_guest_in_the_old_process() {
    let mut old = Toy::new(true).with_ram(b"x");
    let (a, b) = UnixStream::pair().unwrap();
    let toy_build = legacy_build();
    let peer = scripted(b, move |m, _| match m {
        Message::Hello(_) => Some(hello(toy_build.clone())),
        Message::Memory(_) => Some(Message::Ready.encode()),
        Message::State(_) => {
            let mut both = Message::Restored.encode();
            both.extend(Message::Abort("changed my mind".into()).encode());
            Some(both)
        }
        _ => None,
    });
    let f = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        Target::Transfer(a),
        &short(),
    )
    .unwrap_err();
    assert!(f.to_string().contains("changed my mind"), "{f}");
    assert_eq!((f.guest, old.resumes), (Guest::Running, 1));
    let seen = peer.join().unwrap();
    assert_eq!(&seen[..3], ["HELLO", "MEMORY", "STATE"]);
}

/// The phases that tell which protocol decided the owner on the new side.
fn decided_by(r: &Resumed) -> &'static str {
    let has = |n: &str| r.report.phases.iter().any(|p| p.name == n);
    match (has("claimed"), has("commit-received")) {
        (true, false) => "word",
        (false, true) => "messages",
        _ => "unclear",
    }
}

/// Upgrades and rollbacks between a build with the owner word and one without: the two
/// agree on `RESTORED`/`COMMIT` whichever side is the older, and the guest moves.
#[test]
fn builds_with_and_without_the_owner_word_transfer_both_ways() {
    for (old_build, new_build, expect) in [
        (None, None, "word"),
        (Some(legacy_build()), None, "messages"),
        (None, Some(legacy_build()), "messages"),
        (Some(legacy_build()), Some(legacy_build()), "messages"),
    ] {
        let mut old = Toy::new(true).with_ram(b"guest data");
        old.build = old_build;
        old.value = 11;
        let mut new = Toy::new(false);
        new.build = new_build;
        let (a, b) = UnixStream::pair().unwrap();
        let new = new_side(new, b);
        let out = update(
            &mut old,
            &Ids::new_vm().unwrap(),
            Target::Transfer(a),
            &short(),
        );
        assert_eq!(
            out.unwrap(),
            Outcome::Transferred { started: true },
            "{expect}"
        );
        let (new, r) = new.join().unwrap();
        let r = r.unwrap();
        assert_eq!(decided_by(&r), expect);
        assert_eq!((new.value, new.running, new.committed), (11, true, true));
        assert_eq!(new.ram_bytes(10), b"guest data");
        assert_eq!((old.pauses, old.resumes, old.running), (1, 0, false));
    }
}

/// A new side still restoring when the old side gives up: the old side has taken the word
/// back and resumed, so the new side's claim fails and it drops what it built.
#[test]
fn a_new_side_too_slow_to_claim_the_word_leaves_the_guest_to_the_old_process() {
    let resumed = Arc::new(AtomicBool::new(false));
    let mut old = Toy::new(true).with_ram(b"x");
    old.resumed_flag = Some(resumed.clone());
    let mut slow = Toy::new(false);
    // Its restore ends only once the old process resumed the guest.
    slow.restore_waits_for = Some(resumed);
    let (a, b) = UnixStream::pair().unwrap();
    let new = new_side(slow, b);
    let mut t = short();
    t.restore = Duration::from_millis(200);
    t.started = Duration::ZERO;
    let f = update(&mut old, &Ids::new_vm().unwrap(), Target::Transfer(a), &t).unwrap_err();
    assert_eq!(
        (f.guest, old.resumes, old.running),
        (Guest::Running, 1, true)
    );
    let (new, r) = new.join().unwrap();
    assert!(matches!(r, Err(Error::Reclaimed)), "{r:?}");
    assert!(new.discarded && !new.running && !new.committed);
}

/// Once the new side claimed the word the guest is never resumed by the old process, even
/// if the new side fails right after (its commit hook) and the connection ends without
/// `STARTED`, as long as the new process lives (here: the same process).
#[test]
fn a_claimed_word_keeps_the_old_process_from_resuming_the_guest() {
    let mut old = Toy::new(true).with_ram(b"x");
    let mut broken = Toy::new(false);
    broken.fail = Some("commit");
    let (a, b) = UnixStream::pair().unwrap();
    let new = new_side(broken, b);
    let out = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        Target::Transfer(a),
        &short(),
    );
    assert_eq!(out.unwrap(), Outcome::Transferred { started: false });
    assert_eq!((old.pauses, old.resumes, old.running), (1, 0, false));
    let (new, r) = new.join().unwrap();
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("the toy's commit failed"));
    assert!(!new.running);
}

/// A peer announcing the owner word but sending `MEMORY` without it, or with an fd that
/// is not a sealed page, is refused before the pause.
#[test]
fn a_missing_or_bad_owner_word_is_refused_before_the_pause() {
    use cpr_update::protocol::{Channel, Memory};
    for bad in [None, Some("unsealed")] {
        let (a, b) = UnixStream::pair().unwrap();
        let new = new_side(Toy::new(false), b);
        let mut ch = Channel::new(a, Role::Old, 1 << 20);
        let t = Duration::from_secs(5);
        let me = BuildInfo::new("toy", "1", &common::schema());
        ch.send(
            &Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                role: Role::Old,
                pid: std::process::id(),
                build: me,
            }),
            t,
        )
        .unwrap();
        ch.recv("HELLO", t).unwrap();
        ch.use_owner_word();
        let mut reg = cpr_fd::FdRegistry::new();
        let ram = Toy::new(true).with_ram(b"x").ram.unwrap();
        reg.register(
            "toy.ram",
            cpr_fd::FdKind::MEMORY,
            std::os::fd::OwnedFd::from(ram.try_clone().unwrap()),
            b"",
        )
        .unwrap();
        if bad.is_some() {
            // The guest RAM's memfd: not sealed, not a page.
            reg.register(
                cpr_update::owner::FD_OWNER_WORD,
                cpr_fd::FdKind::OTHER,
                std::os::fd::OwnedFd::from(ram),
                b"",
            )
            .unwrap();
        }
        let schema = common::schema();
        let version = schema.latest_version();
        let mut w =
            cpr_snapshot::SnapshotWriter::new(Vec::new(), &schema, "toy", "1", version).unwrap();
        w.write_section(
            0,
            &common::ToyMemory {
                size: common::RAM_SIZE,
            },
        )
        .unwrap();
        let memory = Memory {
            state_version: version,
            ids: Ids::new_vm().unwrap(),
            container: w.finish().unwrap(),
        };
        ch.send_with_fds(&Message::Memory(memory), &reg, t).unwrap();
        let e = ch.recv("READY", t).unwrap_err();
        let (new, r) = new.join().unwrap();
        let r = r.unwrap_err();
        assert!(matches!(r, Error::OwnerWord(_)), "{r:?}");
        assert!(e.to_string().contains("owner word"), "{e}");
        assert!(new.discarded);
    }
}
