// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Who a build is and which state versions it reads and writes; choosing the version an
//! update writes; asking a binary before exec'ing into it.

use std::io::Read;
use std::ops::RangeInclusive;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cpr_snapshot::Schema;
use serde_json::{json, Value};

use crate::error::{Error, Incompatibility};
use crate::protocol::{put_str8, Cursor, ProtocolError, PROTOCOL_VERSION};

/// The command-line flag a VMM binary answers with its [`BuildInfo`] as JSON (see
/// [`BuildInfo::to_json`]) and exit status 0, before doing anything else. The old image of a
/// restart runs the target binary with it to choose the state version it writes, and
/// refuses the update while the guest still runs if there is none.
pub const STATE_VERSIONS_FLAG: &str = "--cpr-state-versions";

/// Most features a build may announce, and their longest name.
const MAX_FEATURES: usize = 32;

/// A build of a VMM as an update sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    /// The application, e.g. `vmm-reference`. State moves only between builds of one
    /// application.
    pub app: String,
    /// Its version, e.g. `0.2.0` (informational).
    pub version: String,
    /// State versions it reads.
    pub reads: RangeInclusive<u16>,
    /// State versions it can write.
    pub writes: RangeInclusive<u16>,
    /// Optional abilities, by name; unknown names are ignored.
    pub features: Vec<String>,
}

impl BuildInfo {
    /// A build that reads and writes every state version of `schema`.
    pub fn new(app: &str, version: &str, schema: &Schema) -> Self {
        // This crate's restart path releases the old address space's holder, and its
        // transfers decide the owner with the owner word.
        let mut features = vec![
            crate::handover::FEATURE_OLD_MM.to_string(),
            crate::owner::FEATURE_OWNER_WORD.to_string(),
        ];
        crate::fault::drop_features(&mut features);
        BuildInfo {
            app: app.to_string(),
            version: version.to_string(),
            reads: schema.versions(),
            writes: schema.versions(),
            features,
        }
    }

    /// Adds a feature name.
    pub fn with_feature(mut self, name: &str) -> Self {
        if !self.features.iter().any(|f| f == name) {
            self.features.push(name.to_string());
        }
        self
    }

    /// Whether the build announced `name`.
    pub fn has_feature(&self, name: &str) -> bool {
        self.features.iter().any(|f| f == name)
    }

    /// The state version this build (the writer) should write for `target` (the reader): the
    /// newest both understand, or why there is none.
    pub fn version_for(&self, target: &BuildInfo) -> Result<u16, Error> {
        let refuse = |reason| Error::Incompatible {
            target: format!("{} {}", target.app, target.version),
            reason,
        };
        if self.app != target.app {
            return Err(refuse(Incompatibility::OtherApplication {
                ours: self.app.clone(),
                theirs: target.app.clone(),
            }));
        }
        let low = (*self.writes.start()).max(*target.reads.start());
        let high = (*self.writes.end()).min(*target.reads.end());
        if low > high || high == 0 {
            return Err(refuse(Incompatibility::NoCommonVersion {
                writes: self.writes.clone(),
                reads: target.reads.clone(),
            }));
        }
        Ok(high)
    }

    /// The JSON a binary prints for [`STATE_VERSIONS_FLAG`]:
    /// `{"protocol": 1, "app": "...", "version": "...", "reads": [1, 3], "writes": [1, 3],
    /// "features": [...]}`.
    pub fn to_json(&self) -> String {
        json!({
            "protocol": PROTOCOL_VERSION,
            "app": self.app,
            "version": self.version,
            "reads": [self.reads.start(), self.reads.end()],
            "writes": [self.writes.start(), self.writes.end()],
            "features": self.features,
        })
        .to_string()
    }

    /// Parses [`to_json`](Self::to_json)'s output.
    pub fn from_json(text: &str) -> Result<BuildInfo, String> {
        let v: Value = serde_json::from_str(text.trim()).map_err(|e| format!("not JSON: {e}"))?;
        let string = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .filter(|s| s.len() <= 255 && !s.chars().any(char::is_control))
                .map(str::to_string)
                .ok_or_else(|| format!("`{k}` is missing or not a short string"))
        };
        let range = |k: &str| -> Result<RangeInclusive<u16>, String> {
            let a = v.get(k).and_then(Value::as_array);
            let n = |i: usize| {
                a.and_then(|a| a.get(i))
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
            };
            match (a.map(Vec::len), n(0), n(1)) {
                (Some(2), Some(lo), Some(hi)) if lo >= 1 && lo <= hi => Ok(lo..=hi),
                _ => Err(format!("`{k}` must be [first, last] state versions")),
            }
        };
        let features = match v.get("features") {
            None => Vec::new(),
            Some(Value::Array(a)) if a.len() <= MAX_FEATURES => a
                .iter()
                .map(|f| {
                    f.as_str()
                        .filter(|s| s.len() <= 64)
                        .map(str::to_string)
                        .ok_or_else(|| "a feature is not a short string".to_string())
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("`features` must be a list of names".into()),
        };
        Ok(BuildInfo {
            app: string("app")?,
            version: string("version")?,
            reads: range("reads")?,
            writes: range("writes")?,
            features,
        })
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_str8(out, &self.app);
        put_str8(out, &self.version);
        for r in [&self.reads, &self.writes] {
            out.extend_from_slice(&r.start().to_le_bytes());
            out.extend_from_slice(&r.end().to_le_bytes());
        }
        let n = self.features.len().min(MAX_FEATURES);
        out.push(n as u8);
        for f in &self.features[..n] {
            put_str8(out, f);
        }
    }

    pub(crate) fn decode(c: &mut Cursor<'_>) -> Result<BuildInfo, ProtocolError> {
        let app = c.str8()?;
        let version = c.str8()?;
        let mut range = || -> Result<RangeInclusive<u16>, ProtocolError> {
            let (lo, hi) = (c.u16()?, c.u16()?);
            if lo == 0 || lo > hi {
                return Err(c.bad("bad state version range"));
            }
            Ok(lo..=hi)
        };
        let reads = range()?;
        let writes = range()?;
        let n = c.u8()? as usize;
        if n > MAX_FEATURES {
            return Err(c.bad("too many features"));
        }
        let features = (0..n).map(|_| c.str8()).collect::<Result<_, _>>()?;
        Ok(BuildInfo {
            app,
            version,
            reads,
            writes,
            features,
        })
    }
}

/// Answers a restart's [`probe`]: if this process was started with
/// [`STATE_VERSIONS_FLAG`], prints `info` as the probe expects and returns `true` (exit
/// then, doing nothing else). Call it first thing in `main`.
pub fn answer_probe(info: &BuildInfo) -> bool {
    if !std::env::args_os()
        .skip(1)
        .any(|a| a == STATE_VERSIONS_FLAG)
    {
        return false;
    }
    println!("{}", info.to_json());
    true
}

/// Asks `program` which state versions it reads: runs `program --cpr-state-versions` (no
/// stdin, no inherited fds beyond stdio, at most `timeout`, at most 64 KiB of output) and
/// parses its answer.
pub fn probe(program: &Path, timeout: Duration) -> Result<BuildInfo, Error> {
    let fail = |reason: String| Error::Probe {
        program: program.to_path_buf(),
        reason,
    };
    let mut child = Command::new(program)
        .arg(STATE_VERSIONS_FLAG)
        .env_remove(cpr_fd::MANIFEST_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail("no stdout".into()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let r = (&mut stdout).take(64 << 10).read_to_end(&mut out);
        let _ = tx.send(r.map(|_| out));
    });
    let deadline = Instant::now() + timeout;
    let out = match rx.recv_timeout(timeout) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!("reading its answer: {e}")));
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!("no answer within {timeout:?}")));
        }
    };
    // The output ended: the child is exiting; give it the rest of the time to do so.
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("did not exit within {timeout:?}")));
            }
            Err(e) => return Err(fail(format!("waiting for it: {e}"))),
        }
    };
    if !status.success() {
        return Err(fail(format!(
            "`{STATE_VERSIONS_FLAG}` failed ({status}): the binary may be too old to be updated into"
        )));
    }
    let text = String::from_utf8(out).map_err(|_| fail("its answer is not UTF-8".into()))?;
    BuildInfo::from_json(&text).map_err(|e| fail(format!("its answer is unusable: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(app: &str, reads: RangeInclusive<u16>, writes: RangeInclusive<u16>) -> BuildInfo {
        BuildInfo {
            app: app.into(),
            version: "1".into(),
            reads,
            writes,
            features: vec!["x".into()],
        }
    }

    #[test]
    fn the_newest_common_version_is_chosen() {
        let old = build("vmm", 2..=2, 2..=2);
        let new = build("vmm", 2..=3, 2..=3);
        assert_eq!(
            old.version_for(&new).unwrap(),
            2,
            "upgrade writes what the old writes"
        );
        assert_eq!(
            new.version_for(&old).unwrap(),
            2,
            "rollback writes what the old reads"
        );
        assert_eq!(new.version_for(&new).unwrap(), 3);
        let future = build("vmm", 5..=9, 5..=9);
        assert!(matches!(
            new.version_for(&future),
            Err(Error::Incompatible {
                reason: Incompatibility::NoCommonVersion { .. },
                ..
            })
        ));
        assert!(matches!(
            new.version_for(&build("other", 2..=3, 2..=3)),
            Err(Error::Incompatible {
                reason: Incompatibility::OtherApplication { .. },
                ..
            })
        ));
    }

    #[test]
    fn json_round_trips_and_bad_answers_are_refused() {
        let b = build("vmm-reference", 2..=3, 1..=3);
        assert_eq!(BuildInfo::from_json(&b.to_json()).unwrap(), b);
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"app":"a","version":"1","reads":[2],"writes":[1,1]}"#,
            r#"{"app":"a","version":"1","reads":[3,2],"writes":[1,1]}"#,
            r#"{"app":"a","version":"1","reads":[0,2],"writes":[1,1]}"#,
            r#"{"app":"a","version":"1","reads":[1,70000],"writes":[1,1]}"#,
            r#"{"app":"a\n","version":"1","reads":[1,1],"writes":[1,1]}"#,
            r#"{"app":"a","version":"1","reads":[1,1],"writes":[1,1],"features":[1]}"#,
        ] {
            assert!(BuildInfo::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn probing_a_program_that_is_not_a_vmm_fails_clearly() {
        let e = probe(Path::new("/bin/false"), Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("too old"), "{e}");
        let e = probe(Path::new("/nonexistent/vmm"), Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("cannot run"), "{e}");
        // `echo` answers, but not with a build.
        let e = probe(Path::new("/bin/echo"), Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("unusable"), "{e}");
    }
}
