// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What an application's state looks like: its section types, their versions over time, and
//! the limits a reader enforces.

use std::any::TypeId;
use std::collections::HashMap;
use std::ops::RangeInclusive;

use versionize::VersionMap;

use crate::__private::Encoding;

use crate::error::{Error, Result, SchemaError};

/// Longest section name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// A type saved in snapshots: a section or a type nested in one. Derive it
/// (`#[derive(State)]`, or `#[derive(Section)]` for a section); the encoding behind it is
/// not part of the API.
pub trait State: Encoding + 'static {}

/// A piece of device state stored as one section of a snapshot. Derive it with its name
/// (or derive [`State`] and implement this by hand):
///
/// ```
/// use cpr_snapshot::prelude::*;
///
/// #[derive(Clone, Debug, Section)]
/// #[section(name = "serial")]
/// struct SerialState {
///     divisor: u16,
///     #[state(since = 2, default = "default_fifo")]
///     fifo: Vec<u8>,
/// }
///
/// impl SerialState {
///     fn default_fifo(_source_version: u16) -> Vec<u8> {
///         Vec::new()
///     }
/// }
/// assert_eq!(<SerialState as Section>::NAME, "serial");
/// ```
pub trait Section: State + Clone {
    /// Section name in the file (1 to 64 bytes of `a-z`, `0-9`, `_`, `-`, `.`).
    const NAME: &'static str;
    /// Whether a reader that does not know this section may skip it. Use it for state that an
    /// older VMM can safely do without (statistics, an optional feature's cache); leave it
    /// `false` for anything the guest depends on.
    const SKIPPABLE: bool = false;
}

/// A versioned type as a schema sees it: its identity, name and current version. Libraries
/// export the types they save (see [`SchemaBuilder::types`]) so an application declares
/// them all and [`SchemaBuilder::build`] can check that none was bumped behind its back.
#[derive(Clone, Copy, Debug)]
pub struct TypeEntry {
    type_id: TypeId,
    type_name: &'static str,
    version: u16,
    /// `Some(name)` for a section type, `None` for a type nested inside sections.
    section: Option<(&'static str, bool)>,
}

impl TypeEntry {
    /// A section type.
    pub fn section<T: Section>() -> Self {
        TypeEntry {
            type_id: TypeId::of::<T>(),
            type_name: std::any::type_name::<T>(),
            version: T::version(),
            section: Some((T::NAME, T::SKIPPABLE)),
        }
    }

    /// A versioned type used inside section types (a field's type), whose version matters
    /// as much as theirs.
    pub fn nested<T: State>() -> Self {
        TypeEntry {
            type_id: TypeId::of::<T>(),
            type_name: std::any::type_name::<T>(),
            version: T::version(),
            section: None,
        }
    }

    /// The type's Rust name.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// The type's current (newest) version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The section name, for a section type.
    pub fn section_name(&self) -> Option<&'static str> {
        self.section.map(|(n, _)| n)
    }
}

/// One version step in a library type's history, for its documentation and for embedders'
/// schemas: from `crate_version` of the library on, the type is at `version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeHistory {
    /// Section name, or the Rust type name for a nested type.
    pub name: &'static str,
    /// The type version.
    pub version: u16,
    /// The library release that introduced this version.
    pub crate_version: &'static str,
    /// What changed.
    pub change: &'static str,
}

/// Caps a reader enforces before allocating anything for an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole container, in bytes.
    pub max_total: u64,
    /// Largest single section payload, in bytes.
    pub max_section: u64,
    /// Most sections in one container.
    pub max_sections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total: 64 << 20,
            max_section: 16 << 20,
            max_sections: 4096,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Declared {
    name: &'static str,
    introduced: u16,
}

/// An application's snapshot schema: the state versions it knows, the section types it reads,
/// and its limits. Build one with [`Schema::builder`].
///
/// State versions are numbered from 1. Each new state version may raise the version of any
/// number of types (never lower it). Writing at state version *N* encodes every type at the
/// version it had at *N*; that is how a newer VMM writes state an older one can load. A
/// schema may drop support for its oldest state versions ([`SchemaBuilder::oldest_version`]):
/// it then neither reads nor writes them.
#[derive(Clone, Debug)]
pub struct Schema {
    map: VersionMap,
    /// Section types by name, with the state version that introduced them.
    sections: HashMap<&'static str, Declared>,
    /// Section name of each declared section type.
    by_type: HashMap<TypeId, &'static str>,
    oldest: u16,
    limits: Limits,
}

impl Schema {
    /// Starts a schema at state version 1, in which every type is at its version 1.
    pub fn builder() -> SchemaBuilder {
        SchemaBuilder {
            map: VersionMap::new(),
            sections: HashMap::new(),
            by_type: HashMap::new(),
            checked: Vec::new(),
            latest: HashMap::new(),
            oldest: 1,
            limits: Limits::default(),
            error: None,
        }
    }

    /// The newest state version this schema knows.
    pub fn latest_version(&self) -> u16 {
        self.map.latest_version()
    }

    /// The oldest state version this schema reads and writes.
    pub fn oldest_version(&self) -> u16 {
        self.oldest
    }

    /// Every state version this schema reads and can write.
    pub fn versions(&self) -> RangeInclusive<u16> {
        self.oldest..=self.latest_version()
    }

    /// The reader limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether `name` is a section this schema reads.
    pub fn knows_section(&self, name: &str) -> bool {
        self.sections.contains_key(name)
    }

    /// The state version that introduced section `name`, if the schema declares it.
    pub fn section_introduced(&self, name: &str) -> Option<u16> {
        self.sections.get(name).map(|d| d.introduced)
    }

    /// Whether section type `T` exists at `state_version`: declared, and introduced at or
    /// before it.
    pub fn has_section<T: Section>(&self, state_version: u16) -> bool {
        self.by_type
            .get(&TypeId::of::<T>())
            .and_then(|n| self.section_introduced(n))
            .is_some_and(|v| v <= state_version)
    }

    /// Version of type `T` at `state_version`.
    pub fn type_version<T: State>(&self, state_version: u16) -> u16 {
        self.map.get_type_version(state_version, TypeId::of::<T>())
    }

    pub(crate) fn map(&self) -> &VersionMap {
        &self.map
    }

    pub(crate) fn check_state_version(&self, version: u16) -> Result<()> {
        if version < self.oldest || version > self.latest_version() {
            return Err(Error::UnsupportedStateVersion {
                found: version,
                oldest: self.oldest,
                latest: self.latest_version(),
            });
        }
        Ok(())
    }

    /// The section name `T` is declared under, checking that it is declared at all.
    pub(crate) fn declared<T: Section>(&self) -> Option<&Declared> {
        let name = self.by_type.get(&TypeId::of::<T>())?;
        self.sections.get(name)
    }

    pub(crate) fn introduced_of<T: Section>(&self) -> Option<u16> {
        self.declared::<T>().map(|d| d.introduced)
    }

    #[allow(dead_code)]
    pub(crate) fn declared_name<T: Section>(&self) -> Option<&'static str> {
        self.declared::<T>().map(|d| d.name)
    }
}

/// Builds a [`Schema`]; errors are collected and reported by [`SchemaBuilder::build`].
#[derive(Debug)]
pub struct SchemaBuilder {
    map: VersionMap,
    sections: HashMap<&'static str, Declared>,
    by_type: HashMap<TypeId, &'static str>,
    /// Every declared type, for the version check in `build`.
    checked: Vec<TypeEntry>,
    latest: HashMap<TypeId, u16>,
    oldest: u16,
    limits: Limits,
    error: Option<SchemaError>,
}

impl SchemaBuilder {
    /// Declares a section type this application reads, as existing from the current state
    /// version on (declare a section added by a later release after the
    /// [`next_version`](Self::next_version) that introduced it: writers then refuse to write
    /// it at older state versions). Sections in a snapshot whose name was not declared are
    /// skipped if the writer marked them skippable, and refused otherwise.
    pub fn section<T: Section>(self) -> Self {
        self.declare(TypeEntry::section::<T>())
    }

    /// Declares a versioned type used inside section types, so that [`build`](Self::build)
    /// checks its version too.
    pub fn nested<T: State>(self) -> Self {
        self.declare(TypeEntry::nested::<T>())
    }

    /// Declares every type of `entries` (sections and nested types), e.g. the list a library
    /// exports for the types it saves.
    pub fn types(mut self, entries: impl IntoIterator<Item = TypeEntry>) -> Self {
        for e in entries {
            self = self.declare(e);
        }
        self
    }

    /// [`types`](Self::types), each at its current version from the current state version
    /// on: for an application's first state version, or for library types it starts to
    /// save in this one. (`types` leaves a type at version 1 until a
    /// [`type_version`](Self::type_version) says otherwise, which is what an application
    /// needs whose earlier releases wrote the older versions.)
    pub fn types_at_current(mut self, entries: impl IntoIterator<Item = TypeEntry>) -> Self {
        for e in entries {
            let (id, version) = (e.type_id, e.version);
            let previous = self.latest.get(&id).copied().unwrap_or(1);
            self = self.declare(e);
            if version > previous {
                self.latest.insert(id, version);
                self.map.set_type_version(id, version);
            }
        }
        self
    }

    fn declare(mut self, entry: TypeEntry) -> Self {
        if let Some((name, _)) = entry.section {
            if let Err(reason) = validate_name(name.as_bytes()) {
                self.fail(SchemaError::InvalidName { name, reason });
                return self;
            }
            if self.sections.contains_key(name) {
                self.fail(SchemaError::DuplicateSection { name });
                return self;
            }
            self.sections.insert(
                name,
                Declared {
                    name,
                    introduced: self.map.latest_version(),
                },
            );
            self.by_type.insert(entry.type_id, name);
        }
        if !self.checked.iter().any(|c| c.type_id == entry.type_id) {
            self.checked.push(entry);
        }
        self
    }

    /// Starts the next state version; following [`type_version`](Self::type_version) calls
    /// apply from it on.
    pub fn next_version(mut self) -> Self {
        if self.map.latest_version() == u16::MAX {
            self.fail(SchemaError::TooManyVersions);
        } else {
            self.map.new_version();
        }
        self
    }

    /// Sets the version of type `T` from the current state version on. `version` must be at
    /// least 1, at most `T::version()`, and not lower than the type's version in an earlier
    /// state version.
    pub fn type_version<T: State>(mut self, version: u16) -> Self {
        let type_name = std::any::type_name::<T>();
        let previous = self.latest.get(&TypeId::of::<T>()).copied().unwrap_or(1);
        if version == 0 || version > T::version() {
            self.fail(SchemaError::TypeVersionOutOfRange {
                type_name,
                version,
                max: T::version(),
            });
        } else if version < previous {
            self.fail(SchemaError::TypeVersionLowered {
                type_name,
                version,
                previous,
            });
        } else {
            self.latest.insert(TypeId::of::<T>(), version);
            self.map.set_type_version(TypeId::of::<T>(), version);
        }
        self
    }

    /// Stops reading and writing state versions older than `version` (their section types
    /// are gone from this build). Readers refuse them with
    /// [`Error::UnsupportedStateVersion`].
    pub fn oldest_version(mut self, version: u16) -> Self {
        self.oldest = version;
        self
    }

    /// Replaces the reader limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        if limits.max_section > limits.max_total || limits.max_section > u64::from(u32::MAX) {
            self.fail(SchemaError::InvalidLimits {
                max_section: limits.max_section,
                max_total: limits.max_total,
            });
        }
        self.limits = limits;
        self
    }

    /// Finishes the schema, or reports the first inconsistency found while building it.
    ///
    /// Besides the errors collected on the way, this checks that every declared type is, at
    /// the latest state version, at its current version: a type that gained a field without
    /// a matching [`type_version`](Self::type_version) would otherwise be written without it.
    pub fn build(self) -> Result<Schema> {
        if let Some(e) = self.error {
            return Err(Error::Schema(e));
        }
        let latest = self.map.latest_version();
        if self.oldest == 0 || self.oldest > latest {
            return Err(Error::Schema(SchemaError::OldestVersion {
                oldest: self.oldest,
                latest,
            }));
        }
        for t in &self.checked {
            let declared = self.map.get_type_version(latest, t.type_id);
            if declared != t.version {
                return Err(Error::Schema(SchemaError::TypeVersionBehind {
                    type_name: t.type_name,
                    declared,
                    current: t.version,
                    state_version: latest,
                }));
            }
        }
        Ok(Schema {
            map: self.map,
            sections: self.sections,
            by_type: self.by_type,
            oldest: self.oldest,
            limits: self.limits,
        })
    }

    fn fail(&mut self, e: SchemaError) {
        self.error.get_or_insert(e);
    }
}

/// Checks a section name: 1 to 64 bytes of `a-z`, `0-9`, `_`, `-`, `.`.
pub(crate) fn validate_name(name: &[u8]) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 64 bytes");
    }
    if !name
        .iter()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.'))
    {
        return Err("only a-z, 0-9, '_', '-' and '.' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    #[derive(Clone, Debug, State)]
    struct Two {
        a: u8,
        #[state(since = 2)]
        b: u8,
    }
    impl Section for Two {
        const NAME: &'static str = "two";
    }

    #[derive(Clone, Debug, State)]
    struct BadName {
        x: u8,
    }
    impl Section for BadName {
        const NAME: &'static str = "Bad Name";
    }

    #[test]
    fn types_at_current_declares_the_current_versions_from_here_on() {
        // Plain `types` leaves Two at version 1, behind its current 2: refused.
        let e = Schema::builder()
            .types([TypeEntry::section::<Two>()])
            .build()
            .unwrap_err();
        assert!(matches!(
            e,
            Error::Schema(SchemaError::TypeVersionBehind { current: 2, .. })
        ));
        let s = Schema::builder()
            .types_at_current([TypeEntry::section::<Two>()])
            .build()
            .unwrap();
        assert_eq!(s.type_version::<Two>(1), 2);
        // Started in a later state version: introduced there, at its current version.
        let s = Schema::builder()
            .next_version()
            .types_at_current([TypeEntry::section::<Two>()])
            .build()
            .unwrap();
        assert_eq!(s.type_version::<Two>(2), 2);
        assert!(!s.has_section::<Two>(1) && s.has_section::<Two>(2));
    }

    #[test]
    fn type_versions_follow_state_versions() {
        let s = Schema::builder()
            .section::<Two>()
            .next_version()
            .next_version()
            .type_version::<Two>(2)
            .build()
            .unwrap();
        assert_eq!(s.latest_version(), 3);
        assert_eq!(s.type_version::<Two>(1), 1);
        assert_eq!(s.type_version::<Two>(2), 1);
        assert_eq!(s.type_version::<Two>(3), 2);
        assert!(s.knows_section("two"));
        assert!(!s.knows_section("three"));
        assert!(s.check_state_version(0).is_err());
        assert!(s.check_state_version(4).is_err());
        assert!(s.check_state_version(3).is_ok());
    }

    #[test]
    fn builder_refuses_inconsistent_schemas() {
        let too_new = Schema::builder().type_version::<Two>(3).build();
        assert!(matches!(
            too_new,
            Err(Error::Schema(SchemaError::TypeVersionOutOfRange {
                version: 3,
                max: 2,
                ..
            }))
        ));
        let downgrade = Schema::builder()
            .type_version::<Two>(2)
            .next_version()
            .type_version::<Two>(1)
            .build();
        assert!(matches!(
            downgrade,
            Err(Error::Schema(SchemaError::TypeVersionLowered {
                version: 1,
                previous: 2,
                ..
            }))
        ));
        let dup = Schema::builder()
            .section::<Two>()
            .section::<Two>()
            .type_version::<Two>(2)
            .build();
        assert!(matches!(
            dup,
            Err(Error::Schema(SchemaError::DuplicateSection { name: "two" }))
        ));
        let bad = Schema::builder().section::<BadName>().build();
        assert!(matches!(
            bad,
            Err(Error::Schema(SchemaError::InvalidName {
                name: "Bad Name",
                ..
            }))
        ));
        let limits = Limits {
            max_total: 10,
            max_section: 11,
            max_sections: 1,
        };
        assert!(matches!(
            Schema::builder().limits(limits).build(),
            Err(Error::Schema(SchemaError::InvalidLimits { .. }))
        ));
        for oldest in [0, 2] {
            assert!(matches!(
                Schema::builder().oldest_version(oldest).build(),
                Err(Error::Schema(SchemaError::OldestVersion { .. }))
            ));
        }
    }

    /// A type that gained a field (version 2) but whose schema never said so would be
    /// written at version 1, dropping the field: refused at build time, naming the fix.
    #[test]
    fn a_bumped_type_without_a_state_version_is_refused() {
        let e = Schema::builder().section::<Two>().build().unwrap_err();
        match e {
            Error::Schema(SchemaError::TypeVersionBehind {
                declared: 1,
                current: 2,
                state_version: 1,
                ..
            }) => assert!(e.to_string().contains("type_version::<"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Nested types are checked when declared.
        let e = Schema::builder().nested::<Two>().build().unwrap_err();
        assert!(matches!(
            e,
            Error::Schema(SchemaError::TypeVersionBehind { .. })
        ));
        assert!(Schema::builder()
            .section::<Two>()
            .next_version()
            .type_version::<Two>(2)
            .build()
            .is_ok());
    }

    #[test]
    fn sections_exist_from_the_version_that_introduced_them() {
        #[derive(Clone, Debug, State)]
        struct Later {
            x: u8,
        }
        impl Section for Later {
            const NAME: &'static str = "later";
        }
        let s = Schema::builder()
            .section::<Two>()
            .next_version()
            .type_version::<Two>(2)
            .section::<Later>()
            .oldest_version(2)
            .next_version()
            .build()
            .unwrap();
        assert_eq!(s.versions(), 2..=3);
        assert_eq!(s.section_introduced("two"), Some(1));
        assert_eq!(s.section_introduced("later"), Some(2));
        assert!(s.has_section::<Later>(2) && !s.has_section::<Later>(1));
        assert!(matches!(
            s.check_state_version(1),
            Err(Error::UnsupportedStateVersion {
                found: 1,
                oldest: 2,
                latest: 3
            })
        ));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name(b"vcpu").is_ok());
        assert!(validate_name(b"pci.0-bar_2").is_ok());
        assert!(validate_name(b"").is_err());
        assert!(validate_name(&[b'a'; 65]).is_err());
        assert!(validate_name(b"a/b").is_err());
        assert!(validate_name("é".as_bytes()).is_err());
    }
}
