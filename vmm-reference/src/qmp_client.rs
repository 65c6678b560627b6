// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A small blocking QMP client, for the demo and the tests.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A connected, negotiated QMP client.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
    next_id: u64,
}

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket trouble or a deadline.
    #[error("{0}")]
    Io(String),
    /// The server answered with an error.
    #[error("{class}: {desc}")]
    Qmp {
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
}

fn io(e: impl std::fmt::Display) -> ClientError {
    ClientError::Io(e.to_string())
}

impl QmpClient {
    /// Connects (retrying until `timeout` while the socket does not exist yet), reads the
    /// greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, ClientError> {
        let mut c = Self::connect_raw(path, timeout)?;
        let greeting = c.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(io(format!("unexpected greeting {greeting}")));
        }
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    /// Connects without reading anything.
    pub fn connect_raw(path: &Path, timeout: Duration) -> Result<QmpClient, ClientError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > timeout => {
                    return Err(io(format!("connect {}: {e}", path.display())))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(io)?;
        Ok(QmpClient {
            reader: BufReader::new(stream.try_clone().map_err(io)?),
            writer: stream,
            events: VecDeque::new(),
            next_id: 1,
        })
    }

    /// Sets how long a read may block.
    pub fn set_timeout(&self, t: Duration) -> Result<(), ClientError> {
        self.writer.set_read_timeout(Some(t)).map_err(io)
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer.write_all(bytes).map_err(io)
    }

    /// Reads the next message (answer, event or greeting).
    pub fn read_message(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).map_err(io)?;
            if n == 0 {
                return Err(io("monitor closed the connection"));
            }
            if !line.trim().is_empty() {
                return serde_json::from_str(line.trim()).map_err(io);
            }
        }
    }

    /// Reads until the answer with `id`, keeping events for later.
    pub fn read_answer(&mut self, id: &Value) -> Result<Value, ClientError> {
        let mut kept = Vec::new();
        let r = self.answer_watching(id, |e| kept.push(e.clone()));
        self.events.extend(kept);
        r
    }

    /// Reads until the answer with `id`, handing each event to `on_event` as it arrives.
    fn answer_watching(
        &mut self,
        id: &Value,
        mut on_event: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        loop {
            let msg = self.read_message()?;
            if msg.get("event").is_some() {
                on_event(&msg);
                continue;
            }
            if msg.get("id") != Some(id) {
                continue;
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            let err = msg.get("error").cloned().unwrap_or(Value::Null);
            return Err(ClientError::Qmp {
                class: err["class"].as_str().unwrap_or("?").to_string(),
                desc: err["desc"].as_str().unwrap_or("?").to_string(),
            });
        }
    }

    fn send_command(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        let id = json!(self.next_id);
        self.next_id += 1;
        let mut text = json!({"execute": command, "arguments": arguments, "id": id}).to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).map_err(io)?;
        Ok(id)
    }

    /// Runs a command and waits for its answer.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        let id = self.send_command(command, arguments)?;
        self.read_answer(&id)
    }

    /// [`execute`](Self::execute), handing every event that arrives before the answer to
    /// `on_event` as it arrives (an update's progress).
    pub fn execute_watching(
        &mut self,
        command: &str,
        arguments: Value,
        on_event: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        let id = self.send_command(command, arguments)?;
        self.answer_watching(&id, on_event)
    }

    /// Waits for an event named `name` (events already received count).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, ClientError> {
        let start = Instant::now();
        loop {
            if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(pos).unwrap_or_default());
            }
            if start.elapsed() > timeout {
                return Err(io(format!("no {name} event within {timeout:?}")));
            }
            let msg = self.read_message()?;
            if msg.get("event").is_some() {
                self.events.push_back(msg);
            }
        }
    }

    /// Events received so far and not yet consumed.
    pub fn events(&self) -> impl Iterator<Item = &Value> {
        self.events.iter()
    }

    /// Forgets the events received so far.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }
}
