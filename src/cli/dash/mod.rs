//! `app dash`: the fleet on one terminal screen, from the repository's `.app/` or from an
//! instance's API (`--api URL`).
//!
//! Threads: the main one owns the terminal and the screen state and blocks on one channel
//! ([`Msg`]); keys, signals, the source's follower and its refresher only send to it. The
//! screen is drawn after each message, from memory.
//!
//! Invariant: the terminal is restored (raw mode off, main screen back, cursor shown) on every
//! way out: `q`/Esc/Ctrl-C, SIGINT/SIGTERM/SIGHUP, an error, and a panic (the panic hook
//! restores it before the message is printed).

mod source;
mod view;

use std::io::{self, IsTerminal, Stdout};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};

use clap::Args;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event};
use ratatui::crossterm::{cursor, execute, terminal};

use self::source::{Api, Local, Msg, Source};
use self::view::{Action, Dash};
use super::context::Context;
use crate::db::{DbSettings, Location};
use crate::error::{DashError, Result};
use crate::overview;

/// Arguments of `app dash`.
#[derive(Debug, Args)]
pub struct DashArgs {
    /// Read an instance's HTTP API (e.g. http://127.0.0.1:3000) instead of this repository's
    /// `.app/`.
    #[arg(long, value_name = "URL")]
    api: Option<String>,
    /// The API's bearer token (default: APP_API_TOKEN).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
}

pub(super) fn run(ctx: &Context, args: DashArgs) -> Result<u8> {
    let source = open(ctx, args)?;
    // The first read happens before the screen is taken, so a source out of reach is a plain
    // error message on the normal screen (and is told first: it is what to fix).
    let first = source.overview()?;
    if !io::stdout().is_terminal() {
        return Err(DashError::NotATerminal.into());
    }
    let (updates, messages) = mpsc::channel();
    start_threads(&source, &updates);
    let mut dash = Dash::new(source.describe());
    dash.set_overview(first);
    let mut screen = Screen::enter()?;
    loop {
        screen.draw(&dash)?;
        crate::fault::panic_point("dash.draw");
        let Ok(msg) = messages.recv() else {
            return Ok(0);
        };
        match msg {
            Msg::Key(key) => match dash.key(key) {
                Action::Quit => return Ok(0),
                Action::OpenLog { run, task } => {
                    let text = source.log_tail(&run, &task);
                    dash.show_log(format!("log of {run}/{task}"), text);
                }
                Action::None => {}
            },
            Msg::Redraw => {}
            Msg::Overview(overview) => dash.set_overview(*overview),
            Msg::Event(event) => dash.push_event(event),
            Msg::Status(status) => dash.set_status(status),
            Msg::Quit => return Ok(0),
        }
    }
}

/// The source `args` name: the API at `--api`, else this repository.
fn open(ctx: &Context, args: DashArgs) -> Result<Arc<dyn Source>> {
    if let Some(url) = args.api {
        let token = args.token.or_else(|| ctx.settings.api_token.clone());
        return Ok(Arc::new(Api::new(&url, token)?));
    }
    let paths = ctx.repo()?.paths;
    let database = (
        Location::resolve(ctx.db_flag())?,
        DbSettings::from(&ctx.settings),
    );
    let reader = overview::Source::new(&paths, &ctx.settings, database.clone());
    Ok(Arc::new(Local::new(reader, paths, database)))
}

/// Starts the threads that feed the loop: keys, signals, the source's follower and refresher.
/// None is joined: each ends when its next send finds the loop gone, and the process ends
/// with the loop anyway.
fn start_threads(source: &Arc<dyn Source>, updates: &Sender<Msg>) {
    let (pokes, poked) = mpsc::channel();
    let (follower, sender) = (Arc::clone(source), updates.clone());
    std::thread::spawn(move || follower.follow(&pokes, &sender));
    let (refresher, sender) = (Arc::clone(source), updates.clone());
    std::thread::spawn(move || source::refresh(&*refresher, &poked, &sender));
    let sender = updates.clone();
    std::thread::spawn(move || {
        while let Ok(event) = event::read() {
            let msg = match event {
                Event::Key(key) => Msg::Key(key),
                Event::Resize(..) => Msg::Redraw,
                _ => continue,
            };
            if sender.send(msg).is_err() {
                return;
            }
        }
    });
    let sender = updates.clone();
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ]) {
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                let _ = sender.send(Msg::Quit);
            }
        });
    }
}

/// The terminal in raw mode on the alternate screen; dropping it restores the terminal.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    fn enter() -> Result<Screen> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        TAKEN.store(true, Ordering::SeqCst);
        let entered = terminal::enable_raw_mode()
            .and_then(|()| execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide))
            .and_then(|()| Terminal::new(CrosstermBackend::new(io::stdout())));
        match entered {
            Ok(terminal) => Ok(Screen { terminal }),
            Err(source) => {
                restore();
                Err(DashError::Terminal { source }.into())
            }
        }
    }

    fn draw(&mut self, dash: &Dash) -> Result<()> {
        self.terminal
            .draw(|frame| dash.draw(frame))
            .map(drop)
            .map_err(|source| DashError::Terminal { source }.into())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Whether the screen is taken (raw mode, alternate screen) and not yet given back.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Puts the terminal back as it was, once: a panic restores it in its hook and again when the
/// unwinding drops the [`Screen`], and leaving the alternate screen a second time would move
/// the cursor back to where it was when the screen was taken, over the panic's message.
fn restore() {
    if !TAKEN.swap(false, Ordering::SeqCst) {
        return;
    }
    let _ = terminal::disable_raw_mode();
    let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
}
