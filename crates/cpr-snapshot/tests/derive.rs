// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `#[derive(State)]` writes exactly what `versionize_derive` wrote for the same type and
//! attributes, so every state file written before the derive existed still reads, and one
//! written now reads in an older build. The versionize items here are the test's own
//! yardstick; no embedder names them.

use cpr_snapshot::__private::versionize::{VersionMap, Versionize};

mod ours {
    use cpr_snapshot::State;

    #[derive(Clone, Debug, PartialEq, State)]
    pub struct Regs {
        pub a: u32,
        pub name: String,
        #[state(since = 2, default = "b_default")]
        pub b: u64,
        #[state(since = 3)]
        pub c: Vec<u16>,
        #[state(until = 3)]
        pub old: u8,
        pub mode: Mode,
        pub inner: Option<Inner>,
    }

    impl Regs {
        fn b_default(version: u16) -> u64 {
            0xb000 + u64::from(version)
        }
    }

    #[derive(Clone, Debug, PartialEq, State)]
    pub enum Mode {
        Off,
        On(u8, u32),
        Fast,
    }

    #[derive(Clone, Debug, PartialEq, State)]
    pub struct Inner {
        pub x: i64,
        #[state(since = 2)]
        pub y: bool,
    }
}

mod theirs {
    #[allow(unused_imports)]
    use cpr_snapshot::__private::versionize::{
        self, VersionMap, Versionize, VersionizeError, VersionizeResult,
    };
    use versionize_derive::Versionize;

    #[derive(Clone, Debug, PartialEq, Versionize)]
    pub struct Regs {
        pub a: u32,
        pub name: String,
        #[version(start = 2, default_fn = "b_default")]
        pub b: u64,
        #[version(start = 3)]
        pub c: Vec<u16>,
        #[version(end = 3)]
        pub old: u8,
        pub mode: Mode,
        pub inner: Option<Inner>,
    }

    impl Regs {
        fn b_default(version: u16) -> u64 {
            0xb000 + u64::from(version)
        }
    }

    #[derive(Clone, Debug, PartialEq, Versionize)]
    pub enum Mode {
        Off,
        On(u8, u32),
        Fast,
    }

    #[derive(Clone, Debug, PartialEq, Versionize)]
    pub struct Inner {
        pub x: i64,
        #[version(start = 2)]
        pub y: bool,
    }
}

fn sample() -> (ours::Regs, theirs::Regs) {
    let o = ours::Regs {
        a: 0xdead_beef,
        name: "uart0".into(),
        b: 7,
        c: vec![1, 2, 3],
        old: 9,
        mode: ours::Mode::On(4, 0x1234_5678),
        inner: Some(ours::Inner { x: -5, y: true }),
    };
    let t = theirs::Regs {
        a: 0xdead_beef,
        name: "uart0".into(),
        b: 7,
        c: vec![1, 2, 3],
        old: 9,
        mode: theirs::Mode::On(4, 0x1234_5678),
        inner: Some(theirs::Inner { x: -5, y: true }),
    };
    (o, t)
}

/// A version map whose app version `regs`/`inner` pairs give each pair of types the same
/// version: app version 1 is (1, 1), then one version map entry per pair.
fn map(versions: &[(u16, u16)]) -> VersionMap {
    let mut vm = VersionMap::new();
    for (i, &(regs, inner)) in versions.iter().enumerate() {
        if i > 0 {
            vm.new_version();
        }
        vm.set_type_version(ours::Regs::type_id(), regs)
            .set_type_version(theirs::Regs::type_id(), regs)
            .set_type_version(ours::Inner::type_id(), inner)
            .set_type_version(theirs::Inner::type_id(), inner);
    }
    vm
}

fn encode<T: Versionize>(t: &T, vm: &VersionMap, app: u16) -> Vec<u8> {
    let mut out = Vec::new();
    t.serialize(&mut out, vm, app).unwrap();
    out
}

#[test]
fn versions_match_versionize_derive() {
    assert_eq!(ours::Regs::version(), theirs::Regs::version());
    assert_eq!(ours::Regs::version(), 3);
    assert_eq!(ours::Inner::version(), theirs::Inner::version());
    assert_eq!(ours::Mode::version(), theirs::Mode::version());
}

#[test]
fn every_version_encodes_byte_for_byte_as_versionize_derive_did() {
    let pairs = [(1, 1), (2, 1), (2, 2), (3, 2)];
    let vm = map(&pairs);
    let (o, t) = sample();
    for app in 1..=pairs.len() as u16 {
        let ours = encode(&o, &vm, app);
        let theirs = encode(&t, &vm, app);
        assert_eq!(
            ours,
            theirs,
            "app version {app} ({:?})",
            pairs[app as usize - 1]
        );
        assert!(!ours.is_empty());
    }
    // Each enum variant, too.
    for (om, tm) in [
        (ours::Mode::Off, theirs::Mode::Off),
        (ours::Mode::Fast, theirs::Mode::Fast),
    ] {
        assert_eq!(encode(&om, &vm, 1), encode(&tm, &vm, 1));
    }
}

#[test]
fn states_written_by_versionize_derive_read_back_with_the_right_defaults() {
    let pairs = [(1, 1), (2, 2), (3, 2)];
    let vm = map(&pairs);
    let (_, t) = sample();

    // Version 1: b and c absent (b from its default function, c Default), old present.
    let bytes = encode(&t, &vm, 1);
    let r = ours::Regs::deserialize(&mut bytes.as_slice(), &vm, 1).unwrap();
    assert_eq!(r.b, 0xb001, "the default function gets the version written");
    assert!(r.c.is_empty());
    assert_eq!(r.old, 9);
    assert_eq!(r.inner.as_ref().map(|i| i.y), Some(false));

    // Version 2: b present, c not yet.
    let bytes = encode(&t, &vm, 2);
    let r = ours::Regs::deserialize(&mut bytes.as_slice(), &vm, 2).unwrap();
    assert_eq!((r.b, r.c.len(), r.old), (7, 0, 9));
    assert_eq!(r.inner.as_ref().map(|i| i.y), Some(true));

    // Version 3: old dropped.
    let bytes = encode(&t, &vm, 3);
    let r = ours::Regs::deserialize(&mut bytes.as_slice(), &vm, 3).unwrap();
    assert_eq!((r.b, r.c.clone(), r.old), (7, vec![1, 2, 3], 0));
    assert_eq!(r.mode, ours::Mode::On(4, 0x1234_5678));

    // And the other way: what we write, versionize_derive's reader takes.
    let (o, _) = sample();
    let bytes = encode(&o, &vm, 3);
    let back = theirs::Regs::deserialize(&mut bytes.as_slice(), &vm, 3).unwrap();
    assert_eq!(back.c, vec![1, 2, 3]);
    assert_eq!(back.mode, theirs::Mode::On(4, 0x1234_5678));
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let vm = map(&[(3, 2)]);
    let (o, _) = sample();
    let bytes = encode(&o, &vm, 1);
    // Every truncation.
    for n in 0..bytes.len() {
        assert!(
            ours::Regs::deserialize(&mut &bytes[..n], &vm, 1).is_err(),
            "{n} bytes"
        );
    }
    // An enum variant that does not exist.
    let bad = 7u32.to_le_bytes();
    let e = ours::Mode::deserialize(&mut bad.as_slice(), &vm, 1).unwrap_err();
    assert!(format!("{e:?}").contains("no variant 7"), "{e:?}");
    // A type version the type never had (a newer writer's): refused, not misread.
    let mut vm9 = VersionMap::new();
    vm9.set_type_version(ours::Regs::type_id(), 9);
    assert!(ours::Regs::deserialize(&mut bytes.as_slice(), &vm9, 1).is_err());
    let mut sink = Vec::new();
    assert!(o.serialize(&mut sink, &vm9, 1).is_err());
}
