// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Streaming snapshot reader and inspection.

use std::collections::HashSet;
use std::io::Read;

use crate::error::{Error, Result};
use crate::format::{
    validate_app_string, CrcReader, SectionInfo, SnapshotHeader, FORMAT_VERSION, MAGIC,
    SECTION_FLAG_SKIPPABLE, TAG_END, TAG_SECTION,
};
use crate::schema::{validate_name, Limits, Schema, Section};

/// Whether the input must end right after the checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The whole input is one snapshot: extra bytes are an error.
    Eof,
    /// The snapshot is embedded in a longer stream: stop after the checksum.
    Stop,
}

struct Parsed {
    header: SnapshotHeader,
    sections: Vec<(SectionInfo, Option<Vec<u8>>)>,
    len: u64,
}

/// Parses and verifies a container. Structural problems (bad magic or format, a length over
/// a cap, an early end) are reported as soon as they are seen, because reading cannot go on;
/// everything that depends on the content's meaning is checked only after the checksum
/// matched, so corruption is reported as corruption.
fn parse<R: Read>(input: R, limits: &Limits, keep_payloads: bool, end: End) -> Result<Parsed> {
    let mut r = CrcReader::new(input);
    let magic: [u8; 8] = r.take("magic")?;
    if magic != MAGIC {
        return Err(Error::BadMagic { found: magic });
    }
    let format = r.u16("format version")?;
    if format != FORMAT_VERSION {
        return Err(Error::UnsupportedFormat {
            found: format,
            supported: FORMAT_VERSION,
        });
    }
    let flags_offset = r.offset;
    let flags = r.u16("header flags")?;
    if flags != 0 {
        return Err(Error::InvalidField {
            offset: flags_offset,
            what: "header flags",
            value: flags.into(),
        });
    }
    let state_version = r.u16("state version")?;
    let mut app = [String::new(), String::new()];
    for (slot, what) in app
        .iter_mut()
        .zip(["application name", "application version"])
    {
        let offset = r.offset;
        let len = r.u8(what)?;
        let bytes = r.bytes(len.into(), what)?;
        validate_app_string(&bytes).map_err(|reason| Error::InvalidString {
            offset,
            what,
            reason,
        })?;
        // Validated as UTF-8 just above.
        *slot = String::from_utf8(bytes).unwrap_or_default();
    }
    let [app_name, app_version] = app;

    let mut sections = Vec::new();
    loop {
        let offset = r.offset;
        let tag = r.u8("section tag or end marker")?;
        if tag == TAG_END {
            let count_offset = r.offset;
            let count = r.u32("section count")?;
            if count as usize != sections.len() {
                return Err(Error::InvalidField {
                    offset: count_offset,
                    what: "section count",
                    value: count.into(),
                });
            }
            break;
        }
        if tag != TAG_SECTION {
            return Err(Error::InvalidField {
                offset,
                what: "section tag",
                value: tag.into(),
            });
        }
        if sections.len() >= limits.max_sections {
            return Err(Error::TooManySections {
                offset,
                limit: limits.max_sections,
            });
        }
        let name_offset = r.offset;
        let name_len = r.u8("section name length")?;
        let name = r.bytes(name_len.into(), "section name")?;
        validate_name(&name).map_err(|reason| Error::InvalidString {
            offset: name_offset,
            what: "section name",
            reason,
        })?;
        // validate_name admits ASCII only.
        let name = String::from_utf8(name).unwrap_or_default();
        let instance = r.u32("section instance")?;
        let version = r.u16("section version")?;
        let flags_offset = r.offset;
        let flags = r.u8("section flags")?;
        if flags & !SECTION_FLAG_SKIPPABLE != 0 {
            return Err(Error::InvalidField {
                offset: flags_offset,
                what: "section flags",
                value: flags.into(),
            });
        }
        let len_offset = r.offset;
        let len = r.u32("section length")?;
        let over_total = r.offset + u64::from(len) + 13 > limits.max_total;
        if u64::from(len) > limits.max_section || over_total {
            return Err(Error::TooLarge {
                offset: len_offset,
                what: if over_total {
                    "snapshot"
                } else {
                    "section payload"
                },
                len: len.into(),
                limit: if over_total {
                    limits.max_total
                } else {
                    limits.max_section
                },
            });
        }
        let payload_offset = r.offset;
        let payload = if keep_payloads {
            Some(r.bytes(len as usize, "section payload")?)
        } else {
            r.skip(len as usize, "section payload")?;
            None
        };
        let info = SectionInfo {
            name,
            instance,
            version,
            skippable: flags & SECTION_FLAG_SKIPPABLE != 0,
            offset,
            payload_offset,
            len,
        };
        sections.push((info, payload));
    }
    r.verify_trailer()?;
    if end == End::Eof {
        r.expect_eof()?;
    }

    // The bytes are intact: now check what they mean.
    let mut seen = HashSet::new();
    for (s, _) in &sections {
        if !seen.insert((s.name.as_str(), s.instance)) {
            return Err(Error::DuplicateSection {
                name: s.name.clone(),
                instance: s.instance,
                offset: s.offset,
            });
        }
    }
    Ok(Parsed {
        header: SnapshotHeader {
            app_name,
            app_version,
            state_version,
        },
        sections,
        len: r.offset,
    })
}

/// What [`inspect`] finds in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    /// The header.
    pub header: SnapshotHeader,
    /// Every section, in file order.
    pub sections: Vec<SectionInfo>,
    /// Container length in bytes, checksum included.
    pub total_len: u64,
}

/// A listing: a line with the size, producer and state version, then a line per section
/// (name, instance, version, length, offset, and whether it is skippable).
impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} bytes, written by {} {} at state version {}",
            self.total_len,
            self.header.app_name,
            self.header.app_version,
            self.header.state_version
        )?;
        for s in &self.sections {
            writeln!(
                f,
                "  {:<14} instance {:<3} version {:<3} {:>8} bytes at offset {}{}",
                s.name,
                s.instance,
                s.version,
                s.len,
                s.offset,
                if s.skippable { " (skippable)" } else { "" }
            )?;
        }
        Ok(())
    }
}

/// Lists a snapshot's sections without decoding payloads (and without holding them in
/// memory). The checksum is verified; no schema is needed.
pub fn inspect<R: Read>(input: R, limits: &Limits) -> Result<Inspection> {
    let parsed = parse(input, limits, false, End::Eof)?;
    Ok(Inspection {
        header: parsed.header,
        sections: parsed.sections.into_iter().map(|(s, _)| s).collect(),
        total_len: parsed.len,
    })
}

/// A verified snapshot whose sections can be decoded one by one.
///
/// Reading checks everything that does not need the section types: structure, limits,
/// checksum, duplicates, the state version against the schema, and that every section is
/// either known to the schema or marked skippable. Unknown skippable sections are dropped and
/// listed in [`skipped`](Self::skipped).
#[derive(Debug)]
pub struct Snapshot<'s> {
    schema: &'s Schema,
    header: SnapshotHeader,
    sections: Vec<(SectionInfo, Option<Vec<u8>>)>,
    skipped: Vec<SectionInfo>,
    total_len: u64,
}

impl<'s> Snapshot<'s> {
    /// Reads a snapshot that is the whole of `input` (anything after the checksum is an
    /// error). Wrap unbuffered inputs such as a `File` in a `BufReader`.
    pub fn read_from<R: Read>(input: R, schema: &'s Schema) -> Result<Self> {
        Self::read(input, schema, End::Eof)
    }

    /// Reads a snapshot embedded in a longer stream, e.g. a socket that carries more
    /// messages after it: stops right after the checksum.
    pub fn read_embedded<R: Read>(input: R, schema: &'s Schema) -> Result<Self> {
        Self::read(input, schema, End::Stop)
    }

    fn read<R: Read>(input: R, schema: &'s Schema, end: End) -> Result<Self> {
        let parsed = parse(input, schema.limits(), true, end)?;
        schema.check_state_version(parsed.header.state_version)?;
        let mut sections = Vec::with_capacity(parsed.sections.len());
        let mut skipped = Vec::new();
        for (info, payload) in parsed.sections {
            if schema.knows_section(&info.name) {
                sections.push((info, payload));
            } else if info.skippable {
                skipped.push(info);
            } else {
                return Err(Error::UnknownRequiredSection {
                    name: info.name,
                    instance: info.instance,
                    version: info.version,
                    offset: info.offset,
                });
            }
        }
        Ok(Snapshot {
            schema,
            header: parsed.header,
            sections,
            skipped,
            total_len: parsed.len,
        })
    }

    /// The header.
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// Container length in bytes, checksum included.
    pub fn total_len(&self) -> u64 {
        self.total_len
    }

    /// Unknown sections that were skipped because the writer allowed it.
    pub fn skipped(&self) -> &[SectionInfo] {
        &self.skipped
    }

    /// Known sections still held (not yet taken).
    pub fn sections(&self) -> impl Iterator<Item = &SectionInfo> {
        self.sections
            .iter()
            .filter(|(_, p)| p.is_some())
            .map(|(i, _)| i)
    }

    /// Instance ids present for section type `T`, in file order.
    pub fn instances<T: Section>(&self) -> Vec<u32> {
        self.sections()
            .filter(|s| s.name == T::NAME)
            .map(|s| s.instance)
            .collect()
    }

    /// Whether section `T::NAME` instance `instance` is present and not yet taken.
    pub fn contains<T: Section>(&self, instance: u32) -> bool {
        self.sections()
            .any(|s| s.name == T::NAME && s.instance == instance)
    }

    /// Decodes and removes section `T::NAME` instance `instance`.
    pub fn take<T: Section>(&mut self, instance: u32) -> Result<T> {
        let missing = || Error::MissingSection {
            name: T::NAME.to_string(),
            instance,
        };
        let (info, payload) = self
            .sections
            .iter_mut()
            .find(|(s, p)| s.name == T::NAME && s.instance == instance && p.is_some())
            .ok_or_else(missing)?;
        let payload = payload.take().ok_or_else(missing)?;
        let state_version = self.header.state_version;
        if let Some(introduced) = self.schema.introduced_of::<T>() {
            if introduced > state_version {
                return Err(Error::SectionNotInVersion {
                    name: T::NAME,
                    introduced,
                    state_version,
                });
            }
        }
        let expected = self.schema.type_version::<T>(state_version);
        if info.version != expected {
            return Err(Error::SectionVersionMismatch {
                name: info.name.clone(),
                instance,
                found: info.version,
                expected,
                state_version,
            });
        }
        let decode_err = |reason: crate::PayloadError| Error::Decode {
            name: info.name.clone(),
            instance,
            offset: info.payload_offset,
            reason,
        };
        let mut rest = payload.as_slice();
        let value = T::deserialize(&mut rest, self.schema.map(), state_version)
            .map_err(|e| decode_err(e.into()))?;
        if !rest.is_empty() {
            return Err(Error::PayloadTrailingBytes {
                name: info.name.clone(),
                instance,
                offset: info.payload_offset,
                unused: rest.len(),
            });
        }
        Ok(value)
    }

    /// Decodes and removes section `T::NAME` instance `instance` if it is present.
    pub fn take_optional<T: Section>(&mut self, instance: u32) -> Result<Option<T>> {
        if self.contains::<T>(instance) {
            self.take(instance).map(Some)
        } else {
            Ok(None)
        }
    }
}
