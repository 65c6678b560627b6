// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared helpers of the cpr-vfio tests.

/// Says that a test skipped, visibly: libtest captures what passing tests print (even
/// through `io::stderr()`), so this writes to a duplicate of fd 2, which shares its file
/// offset and escapes the capture.
pub fn skipped(msg: impl std::fmt::Display) {
    use std::io::Write as _;
    let msg = format!("SKIPPED: {msg}\n");
    match std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        Ok(fd) => {
            let _ = std::fs::File::from(fd).write_all(msg.as_bytes());
        }
        Err(_) => eprint!("{msg}"),
    }
}
