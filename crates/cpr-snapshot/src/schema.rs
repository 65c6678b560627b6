// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What an application's state looks like: its section types, their versions over time, and
//! the limits a reader enforces.

use std::any::TypeId;
use std::collections::{BTreeSet, HashMap};

use versionize::{VersionMap, Versionize};

use crate::error::{Error, Result};

/// Longest section name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// A piece of device state stored as one section of a snapshot.
///
/// Implement it on a plain-data state type that derives
/// [`Versionize`](crate::prelude::Versionize) from [`prelude`](crate::prelude):
///
/// ```
/// use cpr_snapshot::prelude::*;
///
/// #[derive(Clone, Debug, Versionize)]
/// struct SerialState {
///     divisor: u16,
///     #[version(start = 2, default_fn = "default_fifo")]
///     fifo: Vec<u8>,
/// }
///
/// impl SerialState {
///     fn default_fifo(_source_version: u16) -> Vec<u8> {
///         Vec::new()
///     }
/// }
///
/// impl Section for SerialState {
///     const NAME: &'static str = "serial";
/// }
/// ```
pub trait Section: Versionize + Clone + 'static {
    /// Section name in the file (1 to 64 bytes of `a-z`, `0-9`, `_`, `-`, `.`).
    const NAME: &'static str;
    /// Whether a reader that does not know this section may skip it. Use it for state that an
    /// older VMM can safely do without (statistics, an optional feature's cache); leave it
    /// `false` for anything the guest depends on.
    const SKIPPABLE: bool = false;
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

/// An application's snapshot schema: the state versions it knows, the section types it reads,
/// and its limits. Build one with [`Schema::builder`].
///
/// State versions are numbered from 1. Each new state version may raise the version of any
/// number of types (never lower it). Writing at state version *N* encodes every type at the
/// version it had at *N*; that is how a newer VMM writes state an older one can load.
#[derive(Clone, Debug)]
pub struct Schema {
    map: VersionMap,
    known: BTreeSet<&'static str>,
    limits: Limits,
}

impl Schema {
    /// Starts a schema at state version 1, in which every type is at its version 1.
    pub fn builder() -> SchemaBuilder {
        SchemaBuilder {
            map: VersionMap::new(),
            known: BTreeSet::new(),
            latest: HashMap::new(),
            limits: Limits::default(),
            error: None,
        }
    }

    /// The newest state version this schema knows.
    pub fn latest_version(&self) -> u16 {
        self.map.latest_version()
    }

    /// The reader limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether `name` is a section this schema reads.
    pub fn knows_section(&self, name: &str) -> bool {
        self.known.contains(name)
    }

    /// Version of type `T` at `state_version`.
    pub fn type_version<T: Versionize + 'static>(&self, state_version: u16) -> u16 {
        self.map.get_type_version(state_version, TypeId::of::<T>())
    }

    pub(crate) fn map(&self) -> &VersionMap {
        &self.map
    }

    pub(crate) fn check_state_version(&self, version: u16) -> Result<()> {
        if version == 0 || version > self.latest_version() {
            return Err(Error::UnsupportedStateVersion {
                found: version,
                latest: self.latest_version(),
            });
        }
        Ok(())
    }
}

/// Builds a [`Schema`]; errors are collected and reported by [`SchemaBuilder::build`].
#[derive(Debug)]
pub struct SchemaBuilder {
    map: VersionMap,
    known: BTreeSet<&'static str>,
    latest: HashMap<TypeId, u16>,
    limits: Limits,
    error: Option<String>,
}

impl SchemaBuilder {
    /// Declares a section type this application reads. Sections in a snapshot whose name was
    /// not declared are skipped if the writer marked them skippable, and refused otherwise.
    pub fn section<T: Section>(mut self) -> Self {
        if let Err(reason) = validate_name(T::NAME.as_bytes()) {
            self.fail(format!("section name `{}`: {reason}", T::NAME));
        } else if !self.known.insert(T::NAME) {
            self.fail(format!("section name `{}` declared twice", T::NAME));
        }
        self
    }

    /// Starts the next state version; following [`type_version`](Self::type_version) calls
    /// apply from it on.
    pub fn next_version(mut self) -> Self {
        if self.map.latest_version() == u16::MAX {
            self.fail("too many state versions".to_string());
        } else {
            self.map.new_version();
        }
        self
    }

    /// Sets the version of type `T` from the current state version on. `version` must be at
    /// least 1, at most `T::version()`, and not lower than the type's version in an earlier
    /// state version.
    pub fn type_version<T: Versionize + 'static>(mut self, version: u16) -> Self {
        let name = std::any::type_name::<T>();
        let prev = self.latest.get(&TypeId::of::<T>()).copied().unwrap_or(1);
        if version == 0 || version > T::version() {
            self.fail(format!(
                "type {name} version {version} is outside 1..={}",
                T::version()
            ));
        } else if version < prev {
            self.fail(format!(
                "type {name} version {version} is lower than its earlier version {prev}"
            ));
        } else {
            self.latest.insert(TypeId::of::<T>(), version);
            self.map.set_type_version(TypeId::of::<T>(), version);
        }
        self
    }

    /// Replaces the reader limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        if limits.max_section > limits.max_total || limits.max_section > u64::from(u32::MAX) {
            self.fail(format!(
                "max_section {} must be at most max_total {} and 4 GiB",
                limits.max_section, limits.max_total
            ));
        }
        self.limits = limits;
        self
    }

    /// Finishes the schema, or reports the first inconsistency found while building it.
    pub fn build(self) -> Result<Schema> {
        if let Some(e) = self.error {
            return Err(Error::Schema(e));
        }
        Ok(Schema {
            map: self.map,
            known: self.known,
            limits: self.limits,
        })
    }

    fn fail(&mut self, msg: String) {
        self.error.get_or_insert(msg);
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

    #[derive(Clone, Debug, Versionize)]
    struct Two {
        a: u8,
        #[version(start = 2)]
        b: u8,
    }
    impl Section for Two {
        const NAME: &'static str = "two";
    }

    #[derive(Clone, Debug, Versionize)]
    struct BadName {
        x: u8,
    }
    impl Section for BadName {
        const NAME: &'static str = "Bad Name";
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
        assert!(matches!(too_new, Err(Error::Schema(m)) if m.contains("outside 1..=2")));
        let downgrade = Schema::builder()
            .type_version::<Two>(2)
            .next_version()
            .type_version::<Two>(1)
            .build();
        assert!(matches!(downgrade, Err(Error::Schema(m)) if m.contains("lower")));
        let dup = Schema::builder().section::<Two>().section::<Two>().build();
        assert!(matches!(dup, Err(Error::Schema(m)) if m.contains("twice")));
        let bad = Schema::builder().section::<BadName>().build();
        assert!(matches!(bad, Err(Error::Schema(m)) if m.contains("Bad Name")));
        let limits = Limits {
            max_total: 10,
            max_section: 11,
            max_sections: 1,
        };
        assert!(Schema::builder().limits(limits).build().is_err());
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
