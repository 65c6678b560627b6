// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Saves a two-device state atomically, inspects it, reads it back, and shows a rollback
//! (state written by a newer release at an older target version, read by the older release).

use std::process::ExitCode;

use cpr_snapshot::fuzzing::{v1, v3};
use cpr_snapshot::{inspect, save_to_path, Limits, Snapshot, SnapshotWriter};

fn run() -> cpr_snapshot::Result<()> {
    let dir = std::env::temp_dir().join(format!("cpr-snapshot-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| cpr_snapshot::Error::Path {
        op: "create directory",
        path: dir.clone(),
        source,
    })?;
    let path = dir.join("vm.state");
    let schema = v3::schema();

    for target in [schema.latest_version(), 1] {
        save_to_path(&path, |out| {
            let mut w = SnapshotWriter::new(out, &schema, "demo", "3.0.0", target)?;
            w.write_section(0, &v3::sample(0))?;
            w.write_section(1, &v3::sample(1))?;
            w.write_section(0, &v3::Stats { exits: 42 })?;
            w.finish().map(drop)
        })?;
        let bytes = std::fs::read(&path).map_err(|source| cpr_snapshot::Error::Path {
            op: "read",
            path: path.clone(),
            source,
        })?;
        let info = inspect(bytes.as_slice(), &Limits::default())?;
        print!("{}: {info}", path.display());
        if target == schema.latest_version() {
            let mut snap = Snapshot::read_from(bytes.as_slice(), &schema)?;
            let dev = snap.take::<v3::DeviceState>(1)?;
            println!("  v3 reader: device 1 = {dev:?}");
        } else {
            let old = v1::schema();
            let mut snap = Snapshot::read_from(bytes.as_slice(), &old)?;
            let dev = snap.take::<v1::DeviceState>(1)?;
            println!("  v1 reader (rollback): device 1 = {dev:?}");
            for s in snap.skipped() {
                println!(
                    "  v1 reader skipped unknown section `{}` {}",
                    s.name, s.instance
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
