//! The control socket of a running instance: `.app/run/<id>.sock`, served by the instance's
//! supervisor, through which `app instance exec` runs commands inside the instance and
//! `app instance stop` asks it to stop.
//!
//! Invariants:
//! - The socket is created 0600 in a 0700 directory, and every connection's peer credentials
//!   are checked: a peer with another uid is refused before anything is read.
//! - `exec` runs the command as a child of the supervisor, in the instance's directory, with the
//!   supervisor's environment plus the instance's `APP_*` variables: what the agent itself got.
//! - The socket is removed when the instance ends; one whose instance is not live is stale
//!   (`doctor` reports it).
//! - Commands started through the socket never outlive the instance: `ControlServer::shutdown`
//!   stops taking connections, SIGTERMs the running ones and SIGKILLs what is left after the
//!   grace period (at once when forced). They are [`process::Child`]ren, so a recycled pid is
//!   never signalled.
//!
//! Protocol: the client sends one JSON line. `"stop"` asks the supervisor to SIGTERM its
//! command and is answered with one `EXIT` frame. `{"exec": ["cmd", "arg", ...]}`: both sides
//! send frames, `[kind: u8][len: u32 big-endian][bytes]`: the client `STDIN` frames and an
//! empty `STDIN` frame at end of input; the server `STDOUT` and `STDERR` frames and finally one
//! `EXIT` frame whose 1-byte body is the exit code (128+N for signal N; 127 or 126 when it
//! could not be started), or an `ERROR` frame with a message for a request it cannot serve.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use serde::{Deserialize, Serialize};

use crate::error::{ControlError, IoContext, Result};
use crate::process;
use crate::state;
use crate::stop::{StopToken, Stopper};

/// Frame kinds.
pub const STDIN: u8 = 0;
/// Output of the command.
pub const STDOUT: u8 = 1;
/// Error output of the command.
pub const STDERR: u8 = 2;
/// The command ended; the body is its exit code.
pub const EXIT: u8 = 3;
/// The request cannot be served; the body is the reason.
pub const ERROR: u8 = 4;

/// Largest frame body accepted.
const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Request {
    /// Run a command: `{"exec": ["cmd", ...]}`.
    Exec(Vec<String>),
    /// Stop the instance's command (SIGTERM): `"stop"`.
    Stop,
}

/// Writes one frame.
pub fn write_frame(out: &mut impl Write, kind: u8, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut header = [0u8; 5];
    header[0] = kind;
    header[1..].copy_from_slice(&len.to_be_bytes());
    out.write_all(&header)?;
    out.write_all(body)
}

/// Reads one frame; `None` at a clean end of stream.
pub fn read_frame(input: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut header = [0u8; 5];
    match input.read_exact(&mut header) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = u32::from_be_bytes(header[1..].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit"),
        ));
    }
    let mut body = vec![0; len];
    input.read_exact(&mut body)?;
    Ok(Some((header[0], body)))
}

/// Whether a peer with `peer_uid` may use the socket of a process running as `own_uid`.
pub fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == own_uid
}

/// Records what happened in the instance (an event kind and its details).
pub type EventSink = Arc<dyn Fn(&str, serde_json::Value) + Send + Sync>;

/// What the socket serves: how commands run inside the instance, and how it is stopped.
#[derive(Clone)]
pub struct ExecContext {
    /// Directory commands run in.
    pub cwd: PathBuf,
    /// Variables added to the supervisor's own environment.
    pub env: Vec<(String, OsString)>,
    /// Asks the instance's command to stop (SIGTERM through the supervisor).
    pub stop: Arc<dyn Fn() + Send + Sync>,
    /// Told of every exec (`instance.exec`) and its end (`instance.exec_exited`).
    pub events: EventSink,
}

/// The state the listener, its connections and the owner share.
struct Shared {
    /// Stopped when the server closes: the listener ends and no command starts.
    closing: StopToken,
    next_key: AtomicU64,
    /// Exec connections in progress, with their command (which leads a process group of its
    /// own); a connection counts until its exit frame is sent.
    children: Mutex<HashMap<u64, Arc<process::Child>>>,
}

impl Shared {
    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<process::Child>>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Signals every running command's whole process group (a pipeline, a shell's children);
    /// one already reaped is left alone.
    fn signal_children(&self, signal: Signal) {
        for child in self.children().values() {
            child.signal(signal);
        }
    }
}

/// A listening control socket; removes its file when dropped.
pub struct ControlServer {
    path: PathBuf,
    shared: Arc<Shared>,
    stopper: Stopper,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish()
    }
}

impl ControlServer {
    /// How many exec commands are running.
    pub fn running(&self) -> usize {
        self.shared.children().len()
    }

    /// Stops taking connections and ends the running exec commands: SIGTERM, then SIGKILL
    /// after `grace`, or as soon as `forced()` turns true. Returns how many had to be killed.
    pub fn shutdown(self, grace: Duration, forced: &dyn Fn() -> bool) -> usize {
        self.close();
        if self.running() == 0 {
            return 0;
        }
        self.shared.signal_children(Signal::SIGTERM);
        // A grace past what an Instant can hold never runs out.
        let deadline = Instant::now().checked_add(grace);
        while self.running() > 0
            && deadline.is_none_or(|deadline| Instant::now() < deadline)
            && !forced()
        {
            thread::sleep(Duration::from_millis(20));
        }
        let left = self.running();
        if left > 0 {
            self.shared.signal_children(Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.running() > 0 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
        left
    }

    /// Stops the listener and removes the socket file.
    fn close(&self) {
        if self.stopper.stop() {
            // Wakes the accept loop (blocked in accept) so it sees the stop and ends.
            let _ = UnixStream::connect(&self.path);
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// Listens on `path` and serves every connection on a thread of its own.
#[tracing::instrument(skip_all, fields(socket = %path.display()))]
pub fn serve(path: &Path, context: ExecContext) -> Result<ControlServer> {
    let dir = path.parent().expect("sockets live in .app/run");
    state::create_private_dir_all(dir)?;
    // A socket left by a crashed instance of the same id would make bind fail.
    state::remove_if_present(path)?;
    let listener = UnixListener::bind(path).io_context("listening on", path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .io_context("restricting", path)?;
    let context = Arc::new(context);
    let stopper = Stopper::new();
    let shared = Arc::new(Shared {
        closing: stopper.token(),
        next_key: AtomicU64::new(0),
        children: Mutex::default(),
    });
    let own_uid = nix::unistd::getuid().as_raw();
    {
        let shared = Arc::clone(&shared);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if shared.closing.is_stopped() {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let context = Arc::clone(&context);
                let shared = Arc::clone(&shared);
                thread::spawn(move || {
                    if let Err(err) = handle(stream, &context, &shared, own_uid) {
                        tracing::debug!(%err, "control connection ended with an error");
                    }
                });
            }
        });
    }
    Ok(ControlServer {
        path: path.to_path_buf(),
        shared,
        stopper,
    })
}

fn handle(
    stream: UnixStream,
    context: &ExecContext,
    shared: &Shared,
    own_uid: u32,
) -> io::Result<()> {
    if !peer_is_allowed(&stream, own_uid)? {
        return Ok(());
    }
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.by_ref().take(64 * 1024).read_line(&mut line)?;
    let writer = Writer(Arc::new(Mutex::new(stream)));
    let argv = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Exec(argv)) if !argv.is_empty() => argv,
        Ok(Request::Stop) => {
            (context.stop)();
            return writer.send(EXIT, &[0]);
        }
        _ => {
            return writer.send(
                ERROR,
                b"bad request: expected {\"exec\": [\"cmd\", ...]} or \"stop\"",
            );
        }
    };
    let (key, child) = match start_command(&argv, context, shared) {
        Started::Running(key, child) => (key, child),
        Started::Stopping => {
            return writer.send(
                ERROR,
                b"the instance is stopping; it takes no more commands",
            );
        }
        Started::Failed(err) => {
            writer.send(
                STDERR,
                format!("app: cannot run {:?}: {err}\n", argv[0]).as_bytes(),
            )?;
            return writer.send(EXIT, &[process::spawn_failure_code(&err)]);
        }
    };
    let (stdin, stdout, stderr) = child.take_pipes();
    forward_input(reader, stdin);
    let out = writer.pump(stdout.map(|s| Box::new(s) as Box<dyn Read + Send>), STDOUT);
    let err = writer.pump(stderr.map(|s| Box::new(s) as Box<dyn Read + Send>), STDERR);
    (context.events)("instance.exec", serde_json::json!({ "command": argv }));
    let waited = child.wait();
    // However this connection ends from here on, it stops counting as running.
    let _done = Done(shared, key);
    let status = waited?;
    let _ = out.join();
    let _ = err.join();
    let code = process::exit_code(status);
    (context.events)(
        "instance.exec_exited",
        serde_json::json!({ "command": argv, "exit_code": code }),
    );
    writer.send(EXIT, &[code])?;
    // Ends the input thread's read too, so nothing of this connection outlives the command.
    writer.stream().shutdown(std::net::Shutdown::Both)
}

/// Checks the peer's credentials; one of another user is refused (and logged) before
/// anything is read.
fn peer_is_allowed(stream: &UnixStream, own_uid: u32) -> io::Result<bool> {
    let peer = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    if !peer_allowed(peer.uid(), own_uid) {
        tracing::warn!(
            peer_uid = peer.uid(),
            "refused a control connection from another user"
        );
        return Ok(false);
    }
    Ok(true)
}

/// The connection's write side, shared by the output pumps and the handler: frames never
/// interleave.
struct Writer(Arc<Mutex<UnixStream>>);

impl Writer {
    fn stream(&self) -> std::sync::MutexGuard<'_, UnixStream> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, kind: u8, body: &[u8]) -> io::Result<()> {
        write_frame(&mut *self.stream(), kind, body)
    }

    /// Copies `source` into frames of `kind` on a thread of its own, until its end or a write
    /// fails.
    fn pump(&self, source: Option<Box<dyn Read + Send>>, kind: u8) -> thread::JoinHandle<()> {
        let writer = Arc::clone(&self.0);
        thread::spawn(move || {
            let Some(mut source) = source else { return };
            let mut buffer = vec![0u8; 64 * 1024];
            while let Ok(n) = source.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                let mut stream = writer.lock().unwrap_or_else(|p| p.into_inner());
                if write_frame(&mut *stream, kind, &buffer[..n]).is_err() {
                    break;
                }
            }
        })
    }
}

/// How starting an exec's command went.
enum Started {
    /// Running, and counted under `key` among the shared children.
    Running(u64, Arc<process::Child>),
    /// The server is closing: nothing was started.
    Stopping,
    /// The command could not be started.
    Failed(io::Error),
}

/// Starts `argv` in the instance's directory and environment, registered under the lock a
/// shutdown signals under, so no command starts unseen.
fn start_command(argv: &[String], context: &ExecContext, shared: &Shared) -> Started {
    let mut children = shared.children();
    if shared.closing.is_stopped() {
        return Started::Stopping;
    }
    let spawned = process::Child::spawn_group(
        Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(&context.cwd)
            .envs(context.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .map(Arc::new);
    let key = shared.next_key.fetch_add(1, Ordering::Relaxed);
    match spawned {
        Ok(child) => {
            children.insert(key, Arc::clone(&child));
            Started::Running(key, child)
        }
        Err(err) => Started::Failed(err),
    }
}

/// Input: frames from the client into the command's stdin, until an empty frame (on a thread
/// of its own).
fn forward_input(mut reader: BufReader<UnixStream>, mut stdin: Option<std::process::ChildStdin>) {
    thread::spawn(move || {
        while let Ok(Some((STDIN, body))) = read_frame(&mut reader) {
            let Some(pipe) = stdin.as_mut() else { break };
            if body.is_empty() || pipe.write_all(&body).is_err() {
                break;
            }
        }
        drop(stdin);
    });
}

/// Removes an exec's command from the running ones when dropped.
struct Done<'a>(&'a Shared, u64);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.children().remove(&self.1);
    }
}

/// Asks the instance listening on `socket` to stop its command; `Ok` once it took the request.
pub fn request_stop(socket: &Path) -> Result<()> {
    let mut stream = UnixStream::connect(socket).io_context("connecting to", socket)?;
    stream
        .write_all(b"\"stop\"\n")
        .io_context("writing to", socket)?;
    match read_frame(&mut stream).io_context("reading from", socket)? {
        Some((EXIT, _)) => Ok(()),
        other => Err(ControlError::StopNotTaken {
            answer: format!("{other:?}"),
        }
        .into()),
    }
}

/// How long a client waits for the socket of an instance that is still starting.
pub const START_PATIENCE: Duration = Duration::from_secs(10);
/// How often it looks again meanwhile.
const START_POLL: Duration = Duration::from_millis(50);

/// Connects to `socket`. An instance registers (status `starting`) before it serves its
/// socket, so while the socket is not there (or not listening yet) and `starting()` says the
/// instance is still starting, this tries again every [`START_POLL`], for up to
/// [`START_PATIENCE`].
fn connect(socket: &Path, starting: &mut dyn FnMut() -> bool) -> Result<UnixStream> {
    let deadline = Instant::now() + START_PATIENCE;
    loop {
        let err = match UnixStream::connect(socket) {
            Ok(stream) => return Ok(stream),
            Err(err) => err,
        };
        let absent = matches!(
            err.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        );
        if !(absent && starting()) {
            return Err(ControlError::Unreachable {
                socket: socket.to_path_buf(),
                source: err,
            }
            .into());
        }
        if Instant::now() >= deadline {
            return Err(ControlError::StillStarting {
                patience: START_PATIENCE,
                socket: socket.to_path_buf(),
            }
            .into());
        }
        thread::sleep(START_POLL);
    }
}

/// Runs `argv` in the instance listening on `socket`, streaming this process's stdin to it and
/// its output to this process's stdout and stderr; returns its exit code. `starting` tells
/// whether the instance is still starting (see [`run_in`]).
pub fn exec(socket: &Path, argv: &[String], starting: &mut dyn FnMut() -> bool) -> Result<u8> {
    run_in(
        socket,
        argv,
        true,
        &mut io::stdout().lock(),
        &mut io::stderr(),
        starting,
    )
}

/// Runs `argv` in the instance listening on `socket`, writing its output to `out` and `err`;
/// with `forward_stdin` this process's stdin becomes its input, else it gets none. Returns its
/// exit code. While the socket cannot be reached and `starting()` is true (the instance is
/// live and still `starting`), waits for it, up to [`START_PATIENCE`].
pub fn run_in(
    socket: &Path,
    argv: &[String],
    forward_stdin: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
    starting: &mut dyn FnMut() -> bool,
) -> Result<u8> {
    let stream = connect(socket, starting)?;
    let mut writer = stream.try_clone().io_context("using", socket)?;
    let request = serde_json::to_string(&Request::Exec(argv.to_vec())).expect("requests serialize");
    writer
        .write_all(format!("{request}\n").as_bytes())
        .io_context("writing to", socket)?;
    if forward_stdin {
        // Input is forwarded on a thread that may still block reading our stdin when the
        // command ends; the process exits without waiting for it.
        thread::spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) | Err(_) => {
                        let _ = write_frame(&mut writer, STDIN, &[]);
                        break;
                    }
                    Ok(n) => {
                        if write_frame(&mut writer, STDIN, &buffer[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        write_frame(&mut writer, STDIN, &[]).io_context("writing to", socket)?;
    }
    let mut reader = BufReader::new(stream);
    loop {
        match read_frame(&mut reader).io_context("reading from", socket)? {
            Some((STDOUT, body)) => out.write_all(&body).io_context("writing", "stdout")?,
            Some((STDERR, body)) => {
                let _ = out.flush();
                err.write_all(&body).io_context("writing", "stderr")?;
            }
            Some((EXIT, body)) => {
                out.flush().io_context("writing", "stdout")?;
                return Ok(body.first().copied().unwrap_or(1));
            }
            Some((ERROR, body)) => {
                return Err(
                    ControlError::Refused(String::from_utf8_lossy(&body).into_owned()).into(),
                );
            }
            Some(_) => {}
            None => {
                return Err(ControlError::Closed.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bounded() {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, STDOUT, b"hello").unwrap();
        write_frame(&mut buffer, EXIT, &[7]).unwrap();
        let mut input = &buffer[..];
        assert_eq!(
            read_frame(&mut input).unwrap(),
            Some((STDOUT, b"hello".to_vec()))
        );
        assert_eq!(read_frame(&mut input).unwrap(), Some((EXIT, vec![7])));
        assert_eq!(read_frame(&mut input).unwrap(), None);
        let huge = [STDOUT, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut &huge[..]).is_err());
    }

    #[test]
    fn only_the_same_user_gets_in() {
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
    }
}
