// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sample state types in three versions and a reader driver, shared by the unit tests, the
//! fuzz target and the seed-replay test. Enabled by the `fuzzing` feature; not part of the
//! stable API.

use crate::{inspect, Limits, Snapshot, SnapshotWriter};

/// The sample device as the first release (state version 1) defined it.
pub mod v1 {
    use crate::prelude::*;
    use crate::Schema;

    /// A device with an id and eight registers.
    #[derive(Clone, Debug, PartialEq, Eq, State)]
    pub struct DeviceState {
        /// Device id.
        pub id: u32,
        /// Register file.
        pub regs: [u32; 8],
    }

    impl Section for DeviceState {
        const NAME: &'static str = "device";
    }

    /// The first release's schema: one state version.
    pub fn schema() -> Schema {
        Schema::builder()
            .section::<DeviceState>()
            .build()
            .expect("valid schema")
    }
}

/// The sample device as the third release defines it: `irq` added in version 2, `fifo` in 3.
pub mod v3 {
    use crate::prelude::*;
    use crate::Blob;
    use crate::Schema;

    /// A device with an id, registers, an interrupt line and a FIFO.
    #[derive(Clone, Debug, PartialEq, Eq, State)]
    pub struct DeviceState {
        /// Device id.
        pub id: u32,
        /// Register file.
        pub regs: [u32; 8],
        /// Interrupt line (added in version 2; older state gets line 4).
        #[state(since = 2, default = "default_irq")]
        pub irq: u8,
        /// Pending FIFO bytes (added in version 3; older state has an empty FIFO).
        #[state(since = 3, default = "default_fifo")]
        pub fifo: Blob,
    }

    impl DeviceState {
        fn default_irq(_: u16) -> u8 {
            4
        }
        fn default_fifo(_: u16) -> Blob {
            Blob::default()
        }
    }

    impl Section for DeviceState {
        const NAME: &'static str = "device";
    }

    /// Statistics an older reader may skip.
    #[derive(Clone, Debug, PartialEq, Eq, State)]
    pub struct Stats {
        /// Exits counted.
        pub exits: u64,
    }

    impl Section for Stats {
        const NAME: &'static str = "stats";
        const SKIPPABLE: bool = true;
    }

    /// The third release's schema: state versions 1 to 3.
    pub fn schema() -> Schema {
        schema_with(crate::Limits::default())
    }

    /// [`schema`] with other reader limits.
    pub fn schema_with(limits: crate::Limits) -> Schema {
        Schema::builder()
            .section::<DeviceState>()
            .section::<Stats>()
            .next_version()
            .type_version::<DeviceState>(2)
            .next_version()
            .type_version::<DeviceState>(3)
            .limits(limits)
            .build()
            .expect("valid schema")
    }

    /// A sample device.
    pub fn sample(id: u32) -> DeviceState {
        DeviceState {
            id,
            regs: [id, 1, 2, 3, 4, 5, 6, 0xdead_beef],
            irq: 9,
            fifo: Blob(b"hello fifo".to_vec()),
        }
    }
}

/// A valid snapshot with two devices and a stats section, written by the v3 schema at
/// `target`.
pub fn sample_snapshot(target: u16) -> Vec<u8> {
    let schema = v3::schema();
    let mut w =
        SnapshotWriter::new(Vec::new(), &schema, "sample", "3.0.0", target).expect("valid target");
    w.write_section(0, &v3::sample(0)).expect("encode");
    w.write_section(1, &v3::sample(1)).expect("encode");
    w.write_section(0, &v3::Stats { exits: 42 })
        .expect("encode");
    w.finish().expect("finish")
}

/// Runs every reader entry point over `data`. It must return (with an error or not) and
/// never panic, abort or allocate beyond the limits.
pub fn exercise_reader(data: &[u8]) {
    let limits = Limits {
        max_total: 1 << 20,
        max_section: 256 << 10,
        max_sections: 64,
    };
    let _ = inspect(data, &limits);
    for schema in [v1::schema(), v3::schema()] {
        if let Ok(mut snap) = Snapshot::read_from(data, &schema) {
            let ids: Vec<u32> = snap.sections().map(|s| s.instance).collect();
            for id in ids {
                let _ = snap.take::<v3::DeviceState>(id);
                let _ = snap.take::<v1::DeviceState>(id);
                let _ = snap.take::<v3::Stats>(id);
            }
        }
        let _ = Snapshot::read_embedded(data, &schema);
    }
    // Also decode payloads even when the checksum is wrong, so the fuzzer reaches the
    // versionize decoders without having to forge a CRC.
    let fixed = with_fixed_crc(data);
    let schema = v3::schema();
    if let Ok(mut snap) = Snapshot::read_from(fixed.as_slice(), &schema) {
        let ids: Vec<u32> = snap.sections().map(|s| s.instance).collect();
        for id in ids {
            let _ = snap.take::<v3::DeviceState>(id);
            let _ = snap.take::<v3::Stats>(id);
        }
    }
}

/// `data` with its last eight bytes replaced by the checksum of the rest.
pub fn with_fixed_crc(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    if v.len() >= 8 {
        let n = v.len() - 8;
        let crc = crate::crc64(&v[..n]);
        v[n..].copy_from_slice(&crc.to_le_bytes());
    }
    v
}

/// Seed inputs for the fuzzer: valid snapshots at each version and a few damaged ones.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for target in 1..=3 {
        out.push((format!("valid-v{target}"), sample_snapshot(target)));
    }
    let good = sample_snapshot(3);
    out.push(("truncated".into(), good[..good.len() / 2].to_vec()));
    let mut flipped = good.clone();
    flipped[40] ^= 0x10;
    out.push(("bitflip".into(), flipped));
    let mut garbage = good.clone();
    garbage.extend_from_slice(b"garbage");
    out.push(("trailing".into(), garbage));
    let empty = SnapshotWriter::new(Vec::new(), &v3::schema(), "", "", 1)
        .and_then(|w| w.finish())
        .expect("empty snapshot");
    out.push(("empty".into(), empty));
    out
}

/// One section for [`container`]: name, instance, version, skippable, payload.
pub type RawSection<'a> = (&'a str, u32, u16, bool, &'a [u8]);

/// A container with a valid structure and checksum around arbitrary payloads, for fuzzing
/// what decodes and validates the sections (the container parser has its own target).
/// Section names are not checked here; a bad one makes a container readers refuse.
pub fn container(
    app: &str,
    version: &str,
    state_version: u16,
    sections: &[RawSection<'_>],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&crate::MAGIC);
    out.extend_from_slice(&crate::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&state_version.to_le_bytes());
    for s in [app, version] {
        out.push(s.len().min(64) as u8);
        out.extend_from_slice(&s.as_bytes()[..s.len().min(64)]);
    }
    for (name, instance, version, skippable, payload) in sections {
        out.push(1);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&instance.to_le_bytes());
        out.extend_from_slice(&version.to_le_bytes());
        out.push(u8::from(*skippable));
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
    }
    out.push(0);
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    let crc = crate::crc64(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[cfg(test)]
mod container_tests {
    use super::*;
    use crate::Snapshot;

    #[test]
    fn a_framed_container_reads_back_section_by_section() {
        let schema = v3::schema();
        let mut w = SnapshotWriter::new(Vec::new(), &schema, "a", "1", 3).unwrap();
        w.write_section(0, &v3::sample(0)).unwrap();
        let real = w.finish().unwrap();
        let info = inspect(real.as_slice(), &Limits::default()).unwrap();
        let s = &info.sections[0];
        let start = s.payload_offset as usize;
        let payload = &real[start..start + s.len as usize];
        let framed = container("a", "1", 3, &[("device", 0, s.version, false, payload)]);
        assert_eq!(framed, real);
        let mut snap = Snapshot::read_from(framed.as_slice(), &schema).unwrap();
        assert_eq!(snap.take::<v3::DeviceState>(0).unwrap(), v3::sample(0));
    }
}
