// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Streaming snapshot writer.

use std::collections::HashSet;
use std::io::Write;

use crate::error::{Error, Result};
use crate::format::{
    validate_app_string, CrcWriter, FORMAT_VERSION, MAGIC, SECTION_FLAG_SKIPPABLE, TAG_END,
    TAG_SECTION,
};
use crate::schema::{validate_name, Schema, Section};

/// Writes a snapshot to any [`Write`]: a file, a memfd, a UNIX socket.
///
/// Sections are encoded at the writer's *target* state version, which may be older than the
/// schema's latest to let an older VMM read the result (rollback). Nothing is buffered beyond
/// one section's payload; call [`finish`](Self::finish) to write the end marker and checksum.
/// A writer dropped without `finish` leaves an incomplete container that every reader refuses.
#[derive(Debug)]
pub struct SnapshotWriter<'s, W: Write> {
    out: CrcWriterDebug<W>,
    schema: &'s Schema,
    target: u16,
    seen: HashSet<(String, u32)>,
    payload: Vec<u8>,
}

/// `CrcWriter` has no useful `Debug`; this keeps the writer's derive simple.
struct CrcWriterDebug<W>(CrcWriter<W>);

impl<W> std::fmt::Debug for CrcWriterDebug<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CrcWriter {{ offset: {} }}", self.0.offset)
    }
}

impl<'s, W: Write> SnapshotWriter<'s, W> {
    /// Starts a snapshot written by `app_name` `app_version` at state version `target`
    /// (use `schema.latest_version()` unless an older reader must load it).
    pub fn new(
        out: W,
        schema: &'s Schema,
        app_name: &str,
        app_version: &str,
        target: u16,
    ) -> Result<Self> {
        if !schema.versions().contains(&target) {
            return Err(Error::InvalidTargetVersion {
                target,
                oldest: schema.oldest_version(),
                latest: schema.latest_version(),
            });
        }
        for (what, s) in [
            ("application name", app_name),
            ("application version", app_version),
        ] {
            validate_app_string(s.as_bytes()).map_err(|reason| Error::InvalidString {
                offset: 0,
                what,
                reason,
            })?;
        }
        let mut out = CrcWriter::new(out);
        out.put(&MAGIC)?;
        out.put(&FORMAT_VERSION.to_le_bytes())?;
        out.put(&0u16.to_le_bytes())?;
        out.put(&target.to_le_bytes())?;
        for s in [app_name, app_version] {
            // Length checked by validate_app_string above.
            out.put(&[s.len() as u8])?;
            out.put(s.as_bytes())?;
        }
        Ok(SnapshotWriter {
            out: CrcWriterDebug(out),
            schema,
            target,
            seen: HashSet::new(),
            payload: Vec::new(),
        })
    }

    /// Reserves `bytes` for a section's payload and touches that memory now, so that
    /// encoding sections up to that size later neither grows the buffer nor takes a page
    /// fault on it: for a writer made before a pause and filled inside it.
    pub fn prepare_payload(&mut self, bytes: usize) {
        self.payload.clear();
        self.payload.resize(bytes, 1);
        std::hint::black_box(&mut self.payload);
        self.payload.clear();
    }

    /// The state version sections are encoded at.
    pub fn target_version(&self) -> u16 {
        self.target
    }

    /// Whether section type `T` exists at the target version (declared in the schema, and
    /// introduced at or before the target), so that [`write_section`](Self::write_section)
    /// accepts it. Use it to leave out an optional section an older reader never knew.
    pub fn can_write<T: Section>(&self) -> bool {
        self.schema.has_section::<T>(self.target)
    }

    /// Appends `state` as section `T::NAME`, instance `instance`, skippable per
    /// `T::SKIPPABLE`. The type must be declared in the schema and exist at the target
    /// version ([`can_write`](Self::can_write)).
    pub fn write_section<T: Section>(&mut self, instance: u32, state: &T) -> Result<()> {
        self.write_section_with(instance, state, T::SKIPPABLE)
    }

    /// Appends `state` as section `T::NAME`, instance `instance`, with an explicit
    /// skippable flag.
    pub fn write_section_with<T: Section>(
        &mut self,
        instance: u32,
        state: &T,
        skippable: bool,
    ) -> Result<()> {
        let name = T::NAME;
        validate_name(name.as_bytes())
            .map_err(|reason| Error::Schema(crate::SchemaError::InvalidName { name, reason }))?;
        match self.schema.introduced_of::<T>() {
            None => return Err(Error::UndeclaredSection { name }),
            Some(introduced) if introduced > self.target => {
                return Err(Error::SectionNotInVersion {
                    name,
                    introduced,
                    state_version: self.target,
                })
            }
            Some(_) => {}
        }
        if !self.seen.insert((name.to_string(), instance)) {
            return Err(Error::DuplicateSection {
                name: name.to_string(),
                instance,
                offset: self.out.0.offset,
            });
        }
        if self.seen.len() > self.schema.limits().max_sections {
            return Err(Error::TooManySections {
                offset: self.out.0.offset,
                limit: self.schema.limits().max_sections,
            });
        }
        let version = self.schema.type_version::<T>(self.target);
        self.payload.clear();
        state
            .serialize(&mut self.payload, self.schema.map(), self.target)
            .map_err(|e| Error::Encode {
                name: name.to_string(),
                reason: e.into(),
            })?;
        let limits = self.schema.limits();
        let len = self.payload.len() as u64;
        // The writer refuses what its own schema's readers would refuse.
        let end = self.out.0.offset + 1 + 1 + name.len() as u64 + 4 + 2 + 1 + 4 + len;
        if len > limits.max_section || end + 5 + 8 > limits.max_total {
            return Err(Error::TooLarge {
                offset: self.out.0.offset,
                what: "section payload",
                len,
                limit: limits.max_section.min(limits.max_total),
            });
        }
        let flags = if skippable { SECTION_FLAG_SKIPPABLE } else { 0 };
        let o = &mut self.out.0;
        o.put(&[TAG_SECTION, name.len() as u8])?;
        o.put(name.as_bytes())?;
        o.put(&instance.to_le_bytes())?;
        o.put(&version.to_le_bytes())?;
        o.put(&[flags])?;
        o.put(&(len as u32).to_le_bytes())?;
        o.put(&self.payload)?;
        Ok(())
    }

    /// Writes the end marker and checksum, flushes, and returns the inner writer.
    pub fn finish(self) -> Result<W> {
        let mut out = self.out.0;
        out.put(&[TAG_END])?;
        // Bounded by max_sections, which is a usize checked above.
        out.put(&(self.seen.len() as u32).to_le_bytes())?;
        out.finish()
    }
}
