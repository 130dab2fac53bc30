//! The stdio transport of `app mcp`: one JSON-RPC message per line in, one per line out.
//!
//! rmcp's own line transport drops a line that is not JSON, or is over the limit, without a
//! word, so a client waits forever for an answer. This one answers both with a JSON-RPC parse
//! error (`-32700`, id `null`), answers JSON that is no JSON-RPC message with an invalid
//! request (`-32600`, with its id when it has one; a notification gets no answer, as JSON-RPC
//! wants), and goes on with the next line.
//!
//! Invariants:
//! - A line is never buffered past [`MAX_REQUEST_BYTES`](super::MAX_REQUEST_BYTES): the rest of
//!   an oversized line is skipped as it arrives.
//! - `receive` is cancel-safe (rmcp polls it in a `select!`): a partial line stays in the
//!   buffer, and an error reply waits in `pending` until it is queued.
//! - Everything written goes through one writer task, a whole line at a time, so replies never
//!   interleave; [`Writer::finish`] waits for it to flush.

use std::borrow::Cow;

use rmcp::RoleServer;
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Lines waiting for the writer before senders wait.
const QUEUE: usize = 64;

/// A JSON-RPC 2.0 error object with `id`.
pub fn error_reply(id: Value, code: i64, message: &str) -> Vec<u8> {
    let mut line = json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
        .to_string()
        .into_bytes();
    line.push(b'\n');
    line
}

/// What the writer task was handed, to wait for it at the end.
pub struct Writer {
    done: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Waits until every queued line is written and flushed (all senders are gone).
    pub async fn finish(self) {
        let _ = self.done.await;
    }
}

/// The transport over `read` and `write`, and the writer task's handle.
pub fn transport<R, W>(read: R, write: W, max_line: usize) -> (LineTransport<R>, Writer)
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let (lines, mut queued) = mpsc::channel::<Vec<u8>>(QUEUE);
    let done = tokio::spawn(async move {
        let mut write = write;
        while let Some(line) = queued.recv().await {
            if write.write_all(&line).await.is_err() || write.flush().await.is_err() {
                tracing::warn!("MCP: cannot write to stdout; the client is gone");
                return;
            }
        }
    });
    let transport = LineTransport {
        read: BufReader::new(read),
        line: Vec::new(),
        max_line,
        discarding: false,
        pending: None,
        lines,
    };
    (transport, Writer { done })
}

/// The server side of the stdio transport.
pub struct LineTransport<R> {
    read: BufReader<R>,
    /// The line read so far.
    line: Vec<u8>,
    max_line: usize,
    /// Skipping the rest of an oversized line, up to its newline.
    discarding: bool,
    /// An error reply not yet queued.
    pending: Option<Vec<u8>>,
    lines: mpsc::Sender<Vec<u8>>,
}

/// One bounded read.
enum Read {
    /// A whole line is in `line`.
    Line,
    /// The line is over the limit; what was read of it is gone.
    Oversized,
    /// The client closed its end (or reading failed).
    End,
}

impl<R: AsyncRead + Unpin> LineTransport<R> {
    /// Reads up to a newline without letting `line` grow past the limit. Cancel-safe: bytes
    /// are moved from the reader's buffer to `line` with no await in between.
    async fn read_line(&mut self) -> Read {
        loop {
            let (taken, found) = {
                let available = match self.read.fill_buf().await {
                    Ok(available) => available,
                    Err(err) => {
                        tracing::warn!(%err, "MCP: cannot read stdin");
                        return Read::End;
                    }
                };
                if available.is_empty() {
                    return Read::End;
                }
                let newline = available.iter().position(|b| *b == b'\n');
                let taken = newline.map_or(available.len(), |at| at + 1);
                if !self.discarding {
                    if self.line.len() + taken > self.max_line {
                        self.line.clear();
                        self.discarding = true;
                        // Reported now; the next call skips the rest, these bytes first.
                        return Read::Oversized;
                    }
                    self.line.extend_from_slice(&available[..taken]);
                }
                (taken, newline.is_some())
            };
            self.read.consume(taken);
            if found {
                if self.discarding {
                    self.discarding = false;
                    continue;
                }
                return Read::Line;
            }
        }
    }

    /// What to do with one whole line: a message to hand on, a reply to send back, or nothing.
    fn parse(&self, line: &[u8]) -> Result<Option<RxJsonRpcMessage<RoleServer>>, Vec<u8>> {
        let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        let value: Value = serde_json::from_slice(line).map_err(|err| {
            error_reply(
                Value::Null,
                -32700,
                &format!(
                    "Parse error: the line is not JSON ({err}); send one JSON-RPC message per line"
                ),
            )
        })?;
        match serde_json::from_value::<RxJsonRpcMessage<RoleServer>>(value.clone()) {
            Ok(message) => Ok(Some(message)),
            // A notification (no id) is never answered, not even with an error.
            Err(_) if value.get("method").is_some() && value.get("id").is_none() => {
                tracing::debug!("MCP: ignoring a notification that is not one of MCP's");
                Ok(None)
            }
            Err(err) => {
                let id = match value.get("id") {
                    Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
                    _ => Value::Null,
                };
                Err(error_reply(
                    id,
                    -32600,
                    &format!("Invalid Request: not a JSON-RPC 2.0 message ({err})"),
                ))
            }
        }
    }
}

impl<R: AsyncRead + Send + Unpin> Transport<RoleServer> for LineTransport<R> {
    type Error = std::io::Error;

    fn name() -> Cow<'static, str> {
        "app-stdio".into()
    }

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let lines = self.lines.clone();
        async move {
            let mut line = serde_json::to_vec(&item).map_err(std::io::Error::other)?;
            line.push(b'\n');
            lines.send(line).await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdout is closed")
            })
        }
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        loop {
            if self.pending.is_some() {
                let permit = self.lines.reserve().await.ok()?;
                if let Some(reply) = self.pending.take() {
                    permit.send(reply);
                }
            }
            match self.read_line().await {
                Read::Line => {}
                Read::Oversized => {
                    tracing::warn!(
                        limit = self.max_line,
                        "MCP: a message over the limit was dropped"
                    );
                    self.pending = Some(error_reply(
                        Value::Null,
                        -32700,
                        &format!(
                            "Parse error: the message is over the limit of {} bytes and was dropped unread; send smaller messages, one per line",
                            self.max_line
                        ),
                    ));
                    continue;
                }
                Read::End => return None,
            }
            let line = std::mem::take(&mut self.line);
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.iter().all(u8::is_ascii_whitespace) {
                self.line = line;
                self.line.clear();
                continue;
            }
            let parsed = self.parse(text);
            // Keep the allocation for the next line.
            self.line = line;
            self.line.clear();
            match parsed {
                Ok(Some(message)) => return Some(message),
                Ok(None) => {}
                Err(reply) => self.pending = Some(reply),
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_json_rpc_errors() {
        let line = error_reply(Value::Null, -32700, "Parse error");
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            value,
            json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "Parse error"}})
        );
        assert!(line.ends_with(b"\n"));
    }
}
