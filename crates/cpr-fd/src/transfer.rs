// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sending the registry to another process over a connected UNIX stream socket.
//!
//! Wire format: a header (`CPRFDTX1`, fd count u32, manifest length u32, little-endian), the
//! manifest (a cpr-snapshot container whose records number the fds by position), then the
//! fds in chunks of at most [`MAX_FDS_PER_MESSAGE`], each chunk one `sendmsg` whose data is
//! (chunk index u32, fd count u32) and whose `SCM_RIGHTS` control message carries the fds.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::error::{os, Error, Result};
use crate::registry::{FdEntry, FdKind, FdManifest, FdRegistry, MAX_MANIFEST_LEN};
use crate::sys;

/// The kernel's limit of fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;
/// Most fds one transfer may carry.
pub const MAX_TRANSFER_FDS: usize = 65536;

const MAGIC: [u8; 8] = *b"CPRFDTX1";

/// Writes every byte of `bufs`, in as few `writev` calls as the socket takes.
fn write_all_vectored(sock: &UnixStream, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match (&mut &*sock).write_vectored(bufs) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_exact(sock: &mut &UnixStream, buf: &mut [u8], what: &'static str) -> Result<()> {
    sock.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => Error::TransferTruncated(what),
        _ => os("read from socket")(e),
    })
}

impl FdRegistry {
    /// Sends every entry (fd, name, kind, metadata, identity) over `sock`. The registry keeps
    /// its fds: the receiver gets duplicates, and the sender can still resume the guest if
    /// the receiver refuses. Set a write timeout on `sock` to bound the wait for a stuck peer.
    pub fn send(&self, sock: &UnixStream) -> Result<()> {
        self.send_after(sock, &[])
    }

    /// Like [`send`](Self::send), but writes the `prefix` slices first, in the same write
    /// (`writev`, nothing copied) as the header and manifest. A protocol that sends a frame
    /// of its own just before the registry (a state container, say) saves a write, and the
    /// wake-up of a reader that was waiting for that frame, without changing what is on the
    /// wire: the receiver reads the prefix its own way, then calls
    /// [`receive`](Self::receive) as before. The fds still travel on the chunks' own bytes,
    /// never on the prefix, so a reader with plain `read` cannot drop them.
    ///
    /// Nothing is written when the registry is too large or its manifest cannot be built.
    pub fn send_after(&self, sock: &UnixStream, prefix: &[&[u8]]) -> Result<()> {
        if self.len() > MAX_TRANSFER_FDS {
            return Err(Error::TooManyFds {
                count: self.len(),
                max: MAX_TRANSFER_FDS,
            });
        }
        let manifest = FdManifest::of(self, |i, _| i as i32)?.encode()?;
        let mut header = Vec::with_capacity(16 + manifest.len());
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&(self.len() as u32).to_le_bytes());
        header.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
        header.extend_from_slice(&manifest);
        let mut bufs: Vec<IoSlice<'_>> = prefix.iter().map(|p| IoSlice::new(p)).collect();
        bufs.push(IoSlice::new(&header));
        write_all_vectored(sock, &mut bufs).map_err(os("write to socket"))?;
        for (i, chunk) in self.entries.chunks(MAX_FDS_PER_MESSAGE).enumerate() {
            let fds: Vec<RawFd> = chunk.iter().map(|e| e.fd().as_raw_fd()).collect();
            let mut data = [0u8; 8];
            data[..4].copy_from_slice(&(i as u32).to_le_bytes());
            data[4..].copy_from_slice(&(fds.len() as u32).to_le_bytes());
            let sent = sock
                .send_with_fds(&[&data[..]], &fds)
                .map_err(|e| os("sendmsg")(std::io::Error::from_raw_os_error(e.errno())))?;
            if sent < data.len() {
                // The fds went with the first byte; the rest is plain data.
                (&mut &*sock)
                    .write_all(&data[sent..])
                    .map_err(os("write to socket"))?;
            }
        }
        Ok(())
    }

    /// Receives a registry sent by [`send`](Self::send). Truncated control messages, short
    /// reads, a chunk that does not match the manifest, and fds whose identity differs from
    /// what the sender recorded are errors; any fd received before an error is closed.
    /// Received fds are close-on-exec. Set a read timeout on `sock` to bound the wait.
    pub fn receive(sock: &UnixStream) -> Result<FdRegistry> {
        let mut s = sock;
        let mut head = [0u8; 16];
        read_exact(&mut s, &mut head, "header")?;
        if head[..8] != MAGIC {
            return Err(Error::BadTransferHeader);
        }
        let count = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default()) as usize;
        let len = u32::from_le_bytes(head[12..16].try_into().unwrap_or_default()) as u64;
        if count > MAX_TRANSFER_FDS {
            return Err(Error::TooManyFds {
                count,
                max: MAX_TRANSFER_FDS,
            });
        }
        if len > MAX_MANIFEST_LEN {
            return Err(Error::ManifestTooLarge {
                len,
                max: MAX_MANIFEST_LEN,
            });
        }
        let mut manifest = vec![0u8; len as usize];
        read_exact(&mut s, &mut manifest, "manifest")?;
        let m = FdManifest::decode(&manifest)?;
        if m.records.len() != count || m.records.iter().enumerate().any(|(i, r)| r.fd != i as i32) {
            return Err(Error::ManifestInvalid {
                offset: 0,
                problem: crate::error::ManifestProblem::CountMismatch {
                    records: m.records.len(),
                    fds: count,
                },
            });
        }

        let mut received: Vec<OwnedFd> = Vec::with_capacity(count);
        let chunks = count.div_ceil(MAX_FDS_PER_MESSAGE);
        for chunk in 0..chunks {
            let expected = (count - chunk * MAX_FDS_PER_MESSAGE).min(MAX_FDS_PER_MESSAGE);
            let mut data = [0u8; 8];
            let got = sys::recv_fds(
                std::os::fd::AsFd::as_fd(sock),
                &mut data,
                MAX_FDS_PER_MESSAGE,
            )
            .map_err(os("recvmsg"))?;
            let (n, nfds) = (got.len, got.fds.len());
            received.extend(got.fds);
            if got.truncated {
                return Err(Error::ControlTruncated {
                    chunk: chunk as u32,
                });
            }
            if n == 0 {
                return Err(Error::TransferTruncated("fd chunk"));
            }
            if n < data.len() {
                read_exact(&mut s, &mut data[n..], "fd chunk")?;
            }
            let idx = u32::from_le_bytes(data[..4].try_into().unwrap_or_default());
            let announced = u32::from_le_bytes(data[4..].try_into().unwrap_or_default()) as usize;
            if idx as usize != chunk || announced != expected || nfds != expected {
                return Err(Error::ChunkMismatch {
                    chunk: chunk as u32,
                    expected,
                    received: nfds,
                });
            }
        }

        let mut registry = FdRegistry::new();
        for (r, fd) in m.records.into_iter().zip(received) {
            let found =
                sys::identity(std::os::fd::AsFd::as_fd(&fd)).map_err(os("fstat received fd"))?;
            if found != r.identity() {
                return Err(Error::IdentityMismatch {
                    expected: r.identity(),
                    name: r.name,
                    fd: fd.as_raw_fd(),
                    found,
                });
            }
            registry
                .entries
                .push(FdEntry::new(r.name, FdKind(r.kind), r.metadata, fd));
        }
        Ok(registry)
    }
}
