// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Round trips across versions and every error a reader can give.

use cpr_snapshot::fuzzing::{sample_snapshot, v1, v3, with_fixed_crc};
use cpr_snapshot::prelude::*;
use cpr_snapshot::{inspect, Blob, Error, Limits, Schema, Snapshot, SnapshotWriter, MAGIC};

/// Offset of the first section header in `sample_snapshot` (header: 8+2+2+2+1+6+1+5).
const FIRST_SECTION: usize = 27;

fn read_v3(bytes: &[u8]) -> Result<Snapshot<'static>, Error> {
    let schema: &'static Schema = Box::leak(Box::new(v3::schema()));
    Snapshot::read_from(bytes, schema)
}

#[test]
fn v3_round_trip_keeps_every_field() {
    let bytes = sample_snapshot(3);
    let mut snap = read_v3(&bytes).unwrap();
    assert_eq!(snap.header().app_name, "sample");
    assert_eq!(snap.header().app_version, "3.0.0");
    assert_eq!(snap.header().state_version, 3);
    assert_eq!(snap.total_len(), bytes.len() as u64);
    assert_eq!(snap.instances::<v3::DeviceState>(), vec![0, 1]);
    assert_eq!(snap.take::<v3::DeviceState>(1).unwrap(), v3::sample(1));
    assert_eq!(snap.take::<v3::DeviceState>(0).unwrap(), v3::sample(0));
    assert_eq!(snap.take::<v3::Stats>(0).unwrap(), v3::Stats { exits: 42 });
    assert!(snap.skipped().is_empty());
    // Taking twice is a missing section, not a panic.
    assert!(matches!(
        snap.take::<v3::DeviceState>(0),
        Err(Error::MissingSection { instance: 0, .. })
    ));
}

#[test]
fn v1_written_is_read_by_v3_with_defaults() {
    let schema1 = v1::schema();
    let mut w = SnapshotWriter::new(Vec::new(), &schema1, "old", "1.0", 1).unwrap();
    let old = v1::DeviceState {
        id: 7,
        regs: [9; 8],
    };
    w.write_section(0, &old).unwrap();
    let bytes = w.finish().unwrap();

    let mut snap = read_v3(&bytes).unwrap();
    let new = snap.take::<v3::DeviceState>(0).unwrap();
    assert_eq!(new.id, 7);
    assert_eq!(new.regs, [9; 8]);
    assert_eq!(new.irq, 4, "default_fn of version 2");
    assert_eq!(new.fifo, Blob::default(), "default_fn of version 3");
}

#[test]
fn a_prepared_writer_writes_the_same_bytes() {
    // Sections larger and smaller than the prepared room: preparing changes no byte.
    let schema = v3::schema();
    let write = |prepare: Option<usize>| {
        let mut w = SnapshotWriter::new(Vec::new(), &schema, "sample", "3.0.0", 3).unwrap();
        if let Some(n) = prepare {
            w.prepare_payload(n);
        }
        for i in 0..2 {
            w.write_section(i, &v3::sample(i)).unwrap();
        }
        w.write_section(0, &v3::Stats { exits: 42 }).unwrap();
        w.finish().unwrap()
    };
    let plain = write(None);
    assert_eq!(write(Some(16 << 10)), plain);
    assert_eq!(write(Some(1)), plain);
    assert_eq!(write(Some(0)), plain);
}

#[test]
fn v2_written_is_read_by_v3() {
    let bytes = sample_snapshot(2);
    let mut snap = read_v3(&bytes).unwrap();
    let s = snap.take::<v3::DeviceState>(0).unwrap();
    assert_eq!(s.irq, 9, "irq exists at version 2");
    assert_eq!(s.fifo, Blob::default(), "fifo did not exist at version 2");
    assert_eq!(
        snap.sections()
            .find(|s| s.name == "device")
            .unwrap()
            .version,
        1 + 1
    );
}

#[test]
fn v3_written_at_target_1_is_read_by_v1() {
    let bytes = sample_snapshot(1);
    let schema1 = v1::schema();
    let mut snap = Snapshot::read_from(bytes.as_slice(), &schema1).unwrap();
    assert_eq!(snap.header().state_version, 1);
    let s = snap.take::<v1::DeviceState>(1).unwrap();
    assert_eq!(
        s,
        v1::DeviceState {
            id: 1,
            regs: v3::sample(1).regs
        }
    );
    // v1 does not know the skippable stats section: skipped and reported.
    let skipped: Vec<_> = snap.skipped().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(skipped, vec!["stats"]);
}

#[test]
fn v3_written_at_latest_is_refused_by_v1() {
    let bytes = sample_snapshot(3);
    let schema1 = v1::schema();
    assert!(matches!(
        Snapshot::read_from(bytes.as_slice(), &schema1),
        Err(Error::UnsupportedStateVersion {
            found: 3,
            oldest: 1,
            latest: 1
        })
    ));
}

#[test]
fn writer_refuses_unknown_target_versions() {
    let schema = v3::schema();
    for target in [0, 4] {
        assert!(matches!(
            SnapshotWriter::new(Vec::new(), &schema, "a", "b", target),
            Err(Error::InvalidTargetVersion { latest: 3, .. })
        ));
    }
    assert!(matches!(
        SnapshotWriter::new(Vec::new(), &schema, "bad\nname", "b", 1),
        Err(Error::InvalidString { .. })
    ));
}

#[test]
fn writer_refuses_duplicates_and_oversize() {
    let schema = v3::schema();
    let mut w = SnapshotWriter::new(Vec::new(), &schema, "a", "b", 3).unwrap();
    w.write_section(0, &v3::sample(0)).unwrap();
    assert!(matches!(
        w.write_section(0, &v3::sample(0)),
        Err(Error::DuplicateSection { instance: 0, .. })
    ));
    let small = v3::schema_with(Limits {
        max_total: 200,
        max_section: 64,
        max_sections: 2,
    });
    let mut w = SnapshotWriter::new(Vec::new(), &small, "a", "b", 1).unwrap();
    let mut big = v3::sample(0);
    big.fifo = Blob(vec![0; 100]);
    // At state version 1 the fifo is not encoded, so this fits.
    w.write_section(0, &big).unwrap();
    w.write_section(1, &big).unwrap();
    assert!(matches!(
        w.write_section(2, &big),
        Err(Error::TooManySections { limit: 2, .. })
    ));
}

#[test]
fn unknown_required_section_is_named() {
    #[derive(Clone, Debug, State)]
    struct Gpu {
        x: u32,
    }
    impl Section for Gpu {
        const NAME: &'static str = "gpu";
    }
    let schema = Schema::builder().section::<Gpu>().build().unwrap();
    let mut w = SnapshotWriter::new(Vec::new(), &schema, "a", "b", 1).unwrap();
    w.write_section(3, &Gpu { x: 1 }).unwrap();
    let bytes = w.finish().unwrap();
    match read_v3(&bytes) {
        Err(Error::UnknownRequiredSection {
            name,
            instance: 3,
            version: 1,
            offset,
        }) => {
            assert_eq!(name, "gpu");
            assert_eq!(offset, 18, "header of 14 bytes plus two one-byte strings");
        }
        other => panic!("unexpected {other:?}"),
    }
    // The same section marked skippable is skipped and reported.
    let mut w = SnapshotWriter::new(Vec::new(), &schema, "a", "b", 1).unwrap();
    w.write_section_with(3, &Gpu { x: 1 }, true).unwrap();
    let bytes = w.finish().unwrap();
    let snap = read_v3(&bytes).unwrap();
    assert_eq!(snap.skipped().len(), 1);
    assert_eq!(snap.skipped()[0].name, "gpu");
}

#[test]
fn missing_section_is_an_error() {
    let bytes = sample_snapshot(3);
    let mut snap = read_v3(&bytes).unwrap();
    assert!(matches!(
        snap.take::<v3::DeviceState>(5),
        Err(Error::MissingSection { instance: 5, .. })
    ));
    assert!(snap.take_optional::<v3::DeviceState>(5).unwrap().is_none());
    assert!(snap.take_optional::<v3::DeviceState>(0).unwrap().is_some());
}

#[test]
fn every_truncation_is_reported_as_truncated() {
    let bytes = sample_snapshot(3);
    for len in 0..bytes.len() {
        match read_v3(&bytes[..len]) {
            Err(Error::Truncated { offset, .. }) => assert!(offset <= len as u64),
            other => panic!("length {len}: unexpected {other:?}"),
        }
    }
}

#[test]
fn every_bit_flip_is_detected() {
    let bytes = sample_snapshot(3);
    for byte in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[byte] ^= 1 << bit;
            assert!(
                read_v3(&b).is_err(),
                "flip of bit {bit} of byte {byte} went unnoticed"
            );
        }
    }
    // A flip inside a payload is a checksum mismatch at the trailer.
    let mut b = bytes.clone();
    b[FIRST_SECTION + 20] ^= 1;
    match read_v3(&b) {
        Err(Error::ChecksumMismatch { offset, .. }) => assert_eq!(offset, bytes.len() as u64 - 8),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn wrong_magic_and_format_version() {
    let mut b = sample_snapshot(3);
    b[0] = b'X';
    assert!(matches!(read_v3(&b), Err(Error::BadMagic { found }) if found[0] == b'X'));
    let mut b = sample_snapshot(3);
    b[8] = 2;
    assert!(matches!(
        read_v3(&b),
        Err(Error::UnsupportedFormat {
            found: 2,
            supported: 1
        })
    ));
    assert_eq!(&sample_snapshot(1)[..8], &MAGIC);
}

#[test]
fn wrong_state_version_with_valid_checksum() {
    let mut b = sample_snapshot(3);
    b[12] = 9;
    let b = with_fixed_crc(&b);
    assert!(matches!(
        read_v3(&b),
        Err(Error::UnsupportedStateVersion {
            found: 9,
            oldest: 1,
            latest: 3
        })
    ));
    let mut b = sample_snapshot(3);
    b[12] = 0;
    assert!(matches!(
        read_v3(&with_fixed_crc(&b)),
        Err(Error::UnsupportedStateVersion { found: 0, .. })
    ));
}

#[test]
fn section_version_disagreeing_with_schema() {
    // Claim version 1 for a device section at state version 3 (where the schema says 3).
    let mut b = sample_snapshot(3);
    let version_at = FIRST_SECTION + 2 + "device".len() + 4;
    assert_eq!(b[version_at], 3);
    b[version_at] = 1;
    let mut snap = read_v3(&with_fixed_crc(&b)).unwrap();
    assert!(matches!(
        snap.take::<v3::DeviceState>(0),
        Err(Error::SectionVersionMismatch {
            found: 1,
            expected: 3,
            state_version: 3,
            ..
        })
    ));
}

#[test]
fn oversized_lengths_are_refused_before_allocation() {
    let mut b = sample_snapshot(3);
    let len_at = FIRST_SECTION + 2 + "device".len() + 4 + 2 + 1;
    b[len_at..len_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    match read_v3(&b) {
        Err(Error::TooLarge { offset, len, .. }) => {
            assert_eq!(offset, len_at as u64);
            assert_eq!(len, u64::from(u32::MAX));
        }
        other => panic!("unexpected {other:?}"),
    }
    // A total cap smaller than the snapshot.
    let schema = v3::schema_with(Limits {
        max_total: 100,
        max_section: 100,
        max_sections: 10,
    });
    let bytes = sample_snapshot(3);
    assert!(matches!(
        Snapshot::read_from(bytes.as_slice(), &schema),
        Err(Error::TooLarge {
            what: "snapshot",
            limit: 100,
            ..
        })
    ));
    let limits = Limits {
        max_total: 1 << 20,
        max_section: 1 << 20,
        max_sections: 2,
    };
    assert!(matches!(
        inspect(bytes.as_slice(), &limits),
        Err(Error::TooManySections { limit: 2, .. })
    ));
}

#[test]
fn duplicate_sections_in_the_input() {
    // Rename instance 1 to instance 0.
    let mut b = sample_snapshot(3);
    let first_len_at = FIRST_SECTION + 2 + 6 + 4 + 2 + 1;
    let first_len = u32::from_le_bytes(b[first_len_at..first_len_at + 4].try_into().unwrap());
    let second = first_len_at + 4 + first_len as usize;
    let inst_at = second + 2 + 6;
    assert_eq!(b[inst_at], 1);
    b[inst_at] = 0;
    match read_v3(&with_fixed_crc(&b)) {
        Err(Error::DuplicateSection {
            name,
            instance: 0,
            offset,
        }) => {
            assert_eq!(name, "device");
            assert_eq!(offset, second as u64);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn trailing_garbage_and_embedded_reads() {
    let mut b = sample_snapshot(3);
    let len = b.len() as u64;
    b.extend_from_slice(b"more");
    assert!(matches!(read_v3(&b), Err(Error::TrailingData { offset }) if offset == len));
    // Embedded: stops after the checksum and leaves the rest for the caller.
    let schema = v3::schema();
    let mut cursor = std::io::Cursor::new(&b);
    let snap = Snapshot::read_embedded(&mut cursor, &schema).unwrap();
    assert_eq!(snap.total_len(), len);
    assert_eq!(cursor.position(), len);
}

#[test]
fn bad_fields_are_reported_with_offsets() {
    let base = sample_snapshot(3);
    let cases: [(usize, u8, &str); 4] = [
        (10, 1, "header flags"),
        (FIRST_SECTION, 7, "section tag"),
        (FIRST_SECTION + 2 + 6 + 4 + 2, 0x80, "section flags"),
        (base.len() - 12, 9, "section count"),
    ];
    for (at, value, what) in cases {
        let mut b = base.clone();
        b[at] = value;
        match read_v3(&b) {
            Err(Error::InvalidField {
                offset, what: w, ..
            }) => {
                assert_eq!(w, what);
                assert_eq!(offset, at as u64);
            }
            other => panic!("{what}: unexpected {other:?}"),
        }
    }
    // Section name with a forbidden character.
    let mut b = base.clone();
    b[FIRST_SECTION + 2] = b'D';
    assert!(matches!(
        read_v3(&b),
        Err(Error::InvalidString {
            what: "section name",
            ..
        })
    ));
    // Application name that is not UTF-8.
    let mut b = base.clone();
    b[15] = 0xff;
    assert!(matches!(
        read_v3(&b),
        Err(Error::InvalidString {
            what: "application name",
            offset: 14,
            ..
        })
    ));
}

#[test]
fn corrupt_payload_with_valid_checksum_is_a_decode_error() {
    // Shrink the fifo blob's declared length so bytes are left over.
    let bytes = sample_snapshot(3);
    let payload_at = FIRST_SECTION + 2 + 6 + 4 + 2 + 1 + 4;
    let blob_len_at = payload_at + 4 + 32 + 1;
    let mut b = bytes.clone();
    assert_eq!(b[blob_len_at], 10);
    b[blob_len_at] = 4;
    let mut snap = read_v3(&with_fixed_crc(&b)).unwrap();
    assert!(matches!(
        snap.take::<v3::DeviceState>(0),
        Err(Error::PayloadTrailingBytes { unused: 6, .. })
    ));
    // Grow it past the payload: the decoder runs out of input.
    let mut b = bytes.clone();
    b[blob_len_at] = 200;
    let mut snap = read_v3(&with_fixed_crc(&b)).unwrap();
    match snap.take::<v3::DeviceState>(0) {
        Err(Error::Decode { name, offset, .. }) => {
            assert_eq!(name, "device");
            assert_eq!(offset, payload_at as u64);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn inspect_lists_sections_without_a_schema() {
    let bytes = sample_snapshot(2);
    let i = inspect(bytes.as_slice(), &Limits::default()).unwrap();
    assert_eq!(i.header.state_version, 2);
    assert_eq!(i.total_len, bytes.len() as u64);
    let list: Vec<_> = i
        .sections
        .iter()
        .map(|s| (s.name.as_str(), s.instance, s.version, s.skippable))
        .collect();
    assert_eq!(
        list,
        vec![
            ("device", 0, 2, false),
            ("device", 1, 2, false),
            ("stats", 0, 1, true)
        ]
    );
    assert_eq!(i.sections[0].offset, FIRST_SECTION as u64);
    // The listing: a header line, then one line per section.
    let text = i.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with(&format!("{} bytes, written by ", bytes.len())));
    assert!(lines[0].ends_with("at state version 2"), "{text}");
    assert!(
        lines[1].contains("device") && lines[1].contains(&format!("at offset {FIRST_SECTION}")),
        "{text}"
    );
    assert!(
        lines[3].contains("stats") && lines[3].ends_with("(skippable)"),
        "{text}"
    );
    assert!(!lines[1].ends_with("(skippable)"), "{text}");
    let mut b = bytes.clone();
    b[FIRST_SECTION + 20] ^= 4;
    assert!(matches!(
        inspect(b.as_slice(), &Limits::default()),
        Err(Error::ChecksumMismatch { .. })
    ));
}

#[test]
fn errors_read_well() {
    let e = Error::SectionVersionMismatch {
        name: "serial0".into(),
        instance: 0,
        found: 4,
        expected: 3,
        state_version: 2,
    };
    assert_eq!(
        e.to_string(),
        "section `serial0` instance 0 has version 4, but the reader's schema expects version 3 at state version 2"
    );
}

/// A section added by a later release is not written at a state version before it
/// existed (an older reader would not know it), and a type the schema does not declare is
/// not written at all.
#[test]
fn writer_refuses_sections_the_target_version_lacks() {
    use cpr_snapshot::prelude::*;
    #[derive(Clone, Debug, PartialEq, State)]
    struct Added {
        x: u32,
    }
    impl Section for Added {
        const NAME: &'static str = "added";
    }
    #[derive(Clone, Debug, PartialEq, State)]
    struct Undeclared {
        x: u32,
    }
    impl Section for Undeclared {
        const NAME: &'static str = "undeclared";
    }
    let schema = Schema::builder()
        .section::<v1::DeviceState>()
        .next_version()
        .section::<Added>()
        .build()
        .unwrap();
    let mut old = SnapshotWriter::new(Vec::new(), &schema, "a", "b", 1).unwrap();
    assert!(!old.can_write::<Added>());
    assert!(matches!(
        old.write_section(0, &Added { x: 1 }),
        Err(Error::SectionNotInVersion {
            name: "added",
            introduced: 2,
            state_version: 1
        })
    ));
    assert!(matches!(
        old.write_section(0, &Undeclared { x: 1 }),
        Err(Error::UndeclaredSection { name: "undeclared" })
    ));
    let mut new = SnapshotWriter::new(Vec::new(), &schema, "a", "b", 2).unwrap();
    assert!(new.can_write::<Added>());
    new.write_section(0, &Added { x: 7 }).unwrap();
    let bytes = new.finish().unwrap();
    let mut snap = Snapshot::read_from(bytes.as_slice(), &schema).unwrap();
    assert_eq!(snap.take::<Added>(0).unwrap(), Added { x: 7 });
}

/// An error never shows the bytes of what it was given: a file that is not a snapshot may
/// be anything (a password file, say).
#[test]
fn errors_do_not_echo_the_input() {
    let secret = b"SECRET:x:1:2:3::\n";
    let e = read_v3(secret).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("bad magic"), "{text}");
    assert!(
        !text.contains("SECRET") && !text.contains("53, 45"),
        "{text}"
    );
    assert!(!text.contains("0x53"), "{text}");
}
