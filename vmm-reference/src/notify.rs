// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The service manager's notification protocol (`sd_notify`): datagrams to the socket
//! `NOTIFY_SOCKET` names, a path or (`@...`) an abstract name.
//!
//! The VMM says `READY=1` once its monitor answers and the guest runs (or waits for
//! `cpr-load`). After a transfer the new process says `MAINPID=<its pid>` and `READY=1`
//! when it owns the guest, before it tells the old process it runs, and the old process
//! says `STATUS=...` just before it exits: so a `Type=notify` unit follows the guest to the
//! new process without a gap. systemd takes `MAINPID=` from a process that is not yet the
//! main one only with `NotifyAccess=all`, and only from the unit's own processes: start
//! the new VMM from the unit (`ExecReload=vmm-reference update --mode transfer ...`, which
//! starts it itself); `docs/vmm-reference.service` is an example.

use std::os::unix::net::UnixDatagram;

/// Sends `message` if `NOTIFY_SOCKET` is set; a failure is logged, never fatal.
pub fn send(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let r = UnixDatagram::unbound().and_then(|s| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            s.send_to_addr(message.as_bytes(), &addr)
        } else {
            s.send_to(message.as_bytes(), &path)
        }
    });
    if let Err(e) = r {
        log::warn!("NOTIFY_SOCKET: {e}");
    }
}
