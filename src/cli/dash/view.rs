//! What `app dash` shows and how keys move through it: the screen state ([`Dash`]), drawn from
//! one [`Overview`] and the event timeline, and nothing else. Drawing reads only that state, so
//! a frame costs no I/O; the source replaces the overview when something changed.
//!
//! Layout, top to bottom: a header (source, repository, age of the data), the attention strip
//! (always, whatever the tab), the tabs, the selected tab's body, a line of keys. Enter on a
//! task opens its log tail over the body; Esc closes it.

use std::collections::VecDeque;
use std::time::Duration;

use ratatui::Frame;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Cell, Clear, List, ListItem, ListState, Paragraph, Row, Table, TableState, Tabs, Wrap,
};

use crate::activity::AgentState;
use crate::overview::{InstanceView, Overview, RunView, TaskView};
use crate::time::{Timestamp, format_age};

/// Events kept in the timeline.
const TIMELINE: usize = 500;
/// Attention items shown before "and N more".
const ATTENTION_ROWS: usize = 5;

/// The tabs, in key order (`1` to `6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tab {
    Instances,
    Runs,
    Locks,
    Messages,
    Events,
    Host,
}

impl Tab {
    pub(crate) const ALL: [Tab; 6] = [
        Tab::Instances,
        Tab::Runs,
        Tab::Locks,
        Tab::Messages,
        Tab::Events,
        Tab::Host,
    ];

    fn index(self) -> usize {
        Tab::ALL.iter().position(|tab| *tab == self).unwrap_or(0)
    }

    fn title(self) -> &'static str {
        match self {
            Tab::Instances => "Instances",
            Tab::Runs => "Runs",
            Tab::Locks => "Locks & reservations",
            Tab::Messages => "Messages",
            Tab::Events => "Events",
            Tab::Host => "Host",
        }
    }
}

/// One line of the event timeline, from the database event log or the API's stream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EventLine {
    /// The event log's row id, when the event has one.
    pub id: Option<i64>,
    /// When (RFC 3339).
    pub at: String,
    /// What happened.
    pub kind: String,
    /// The instance it concerns.
    pub instance: Option<String>,
    /// Its details, as one line of JSON.
    pub detail: String,
}

/// What a key asks the loop to do besides redrawing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing beyond a redraw.
    None,
    /// End the dashboard.
    Quit,
    /// Read the log of this run's task and show it ([`Dash::show_log`]).
    OpenLog { run: String, task: String },
}

/// A log shown over the body.
#[derive(Debug, Clone)]
struct LogPane {
    title: String,
    text: String,
}

/// The screen's state.
#[derive(Debug)]
pub(crate) struct Dash {
    source: String,
    overview: Option<Overview>,
    events: VecDeque<EventLine>,
    tab: Tab,
    selected: [usize; 6],
    log: Option<LogPane>,
    status: Option<String>,
}

impl Dash {
    /// An empty screen for data from `source` (shown in the header).
    pub(crate) fn new(source: String) -> Dash {
        Dash {
            source,
            overview: None,
            events: VecDeque::new(),
            tab: Tab::Instances,
            selected: [0; 6],
            log: None,
            status: None,
        }
    }

    /// Replaces what is shown with a newer read.
    pub(crate) fn set_overview(&mut self, overview: Overview) {
        self.overview = Some(overview);
        self.status = None;
    }

    /// Appends an event to the timeline (dropping the oldest past [`TIMELINE`]); one already
    /// there (same row id, after a reconnect) is not shown twice.
    pub(crate) fn push_event(&mut self, event: EventLine) {
        if event.id.is_some() && self.events.iter().any(|seen| seen.id == event.id) {
            return;
        }
        self.events.push_back(event);
        while self.events.len() > TIMELINE {
            self.events.pop_front();
        }
    }

    /// A line about the source (reconnecting, a failed read), shown in the header until the
    /// next overview arrives.
    pub(crate) fn set_status(&mut self, status: String) {
        self.status = Some(status);
    }

    /// Shows a log (or why there is none) over the body.
    pub(crate) fn show_log(&mut self, title: String, text: String) {
        self.log = Some(LogPane { title, text });
    }

    /// The tab shown.
    #[cfg(test)]
    pub(crate) fn tab(&self) -> Tab {
        self.tab
    }

    /// Applies a key.
    pub(crate) fn key(&mut self, key: KeyEvent) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if self.log.is_some() {
            if matches!(key.code, KeyCode::Esc | KeyCode::Enter | KeyCode::Char('q')) {
                self.log = None;
            }
            return Action::None;
        }
        let tab = self.tab.index();
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Tab => self.tab = Tab::ALL[(tab + 1) % Tab::ALL.len()],
            KeyCode::BackTab => self.tab = Tab::ALL[(tab + Tab::ALL.len() - 1) % Tab::ALL.len()],
            KeyCode::Char(digit @ '1'..='6') => {
                self.tab = Tab::ALL[usize::from(digit as u8 - b'1')];
            }
            KeyCode::Char('j') | KeyCode::Down => self.move_by(1),
            KeyCode::Char('k') | KeyCode::Up => self.move_by(-1),
            KeyCode::Enter => return self.open(),
            _ => {}
        }
        Action::None
    }

    fn move_by(&mut self, step: isize) {
        let len = self.rows(self.tab);
        let selected = &mut self.selected[self.tab.index()];
        *selected = selected
            .saturating_add_signed(step)
            .min(len.saturating_sub(1));
    }

    /// How many selectable rows a tab has.
    fn rows(&self, tab: Tab) -> usize {
        let Some(overview) = &self.overview else {
            return 0;
        };
        match tab {
            Tab::Instances => overview.instances.len(),
            Tab::Runs => overview.runs.iter().map(|run| run.tasks.len()).sum(),
            Tab::Locks => overview.locks.len() + overview.reservations.len(),
            Tab::Messages => overview.messages.len(),
            Tab::Events => self.events.len(),
            Tab::Host => overview.findings.len(),
        }
    }

    /// The selected row of a tab, kept inside its rows as they change.
    fn selection(&self, tab: Tab) -> usize {
        self.selected[tab.index()].min(self.rows(tab).saturating_sub(1))
    }

    fn open(&self) -> Action {
        if self.tab != Tab::Runs {
            return Action::None;
        }
        let Some(overview) = &self.overview else {
            return Action::None;
        };
        match task_rows(&overview.runs).nth(self.selection(Tab::Runs)) {
            Some((run, _, task)) => Action::OpenLog {
                run: run.id.clone(),
                task: task.id.clone(),
            },
            None => Action::None,
        }
    }

    /// Draws the whole screen.
    pub(crate) fn draw(&self, frame: &mut Frame<'_>) {
        let attention = self
            .overview
            .as_ref()
            .map_or(1, |o| o.attention.len().clamp(1, ATTENTION_ROWS + 1));
        let [header, strip, tabs, body, keys] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(attention as u16 + 2),
            Constraint::Length(1),
            Constraint::Min(0),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(Paragraph::new(self.header_line()), header);
        frame.render_widget(self.attention_strip(), strip);
        let titles = Tab::ALL
            .iter()
            .enumerate()
            .map(|(i, tab)| format!("{} {}", i + 1, tab.title()));
        frame.render_widget(
            Tabs::new(titles)
                .select(self.tab.index())
                .highlight_style(Style::new().add_modifier(Modifier::REVERSED)),
            tabs,
        );
        match &self.overview {
            Some(overview) => self.draw_body(frame, overview, body),
            None => frame.render_widget(Paragraph::new("reading..."), body),
        }
        frame.render_widget(
            Paragraph::new("Tab/1-6 switch  j/k move  Enter task log  Esc close  q quit")
                .style(Style::new().add_modifier(Modifier::DIM)),
            keys,
        );
        if let Some(log) = &self.log {
            draw_log(frame, log, body);
        }
    }

    fn header_line(&self) -> Line<'_> {
        let mut spans = vec![
            Span::styled("app dash", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!("  {}", self.source)),
        ];
        if let Some(overview) = &self.overview {
            spans.push(Span::raw(format!(
                "  {}  read {} ago",
                overview.repo_root,
                format_age(overview.generated_at.age())
            )));
        }
        if let Some(status) = &self.status {
            spans.push(Span::styled(
                format!("  {status}"),
                Style::new().fg(Color::Yellow),
            ));
        }
        Line::from(spans)
    }

    fn attention_strip(&self) -> Paragraph<'_> {
        let block = Block::bordered().title("Attention");
        let Some(overview) = &self.overview else {
            return Paragraph::new("").block(block);
        };
        if overview.attention.is_empty() {
            return Paragraph::new("nothing needs you").block(block);
        }
        let mut lines: Vec<Line<'_>> = overview
            .attention
            .iter()
            .take(ATTENTION_ROWS)
            .map(|item| {
                let since = item
                    .since
                    .map(|at| format!(" ({} ago)", format_age(at.age())))
                    .unwrap_or_default();
                Line::from(vec![
                    Span::styled(
                        format!("{:<13} ", item.kind),
                        Style::new().fg(attention_color(&item.kind)),
                    ),
                    Span::raw(format!("{}: {}{since}", item.subject, item.text)),
                ])
            })
            .collect();
        if overview.attention.len() > ATTENTION_ROWS {
            lines.push(Line::from(format!(
                "and {} more",
                overview.attention.len() - ATTENTION_ROWS
            )));
        }
        Paragraph::new(lines).block(block)
    }

    fn draw_body(&self, frame: &mut Frame<'_>, overview: &Overview, area: Rect) {
        let selected = self.selection(self.tab);
        match self.tab {
            Tab::Instances => draw_instances(frame, overview, selected, area),
            Tab::Runs => draw_runs(frame, overview, selected, area),
            Tab::Locks => draw_locks(frame, overview, selected, area),
            Tab::Messages => draw_messages(frame, overview, selected, area),
            Tab::Events => self.draw_events(frame, selected, area),
            Tab::Host => draw_host(frame, overview, selected, area),
        }
    }

    fn draw_events(&self, frame: &mut Frame<'_>, selected: usize, area: Rect) {
        // Newest first.
        let items: Vec<ListItem<'_>> = self
            .events
            .iter()
            .rev()
            .map(|event| {
                ListItem::new(format!(
                    "{}  {:<22} {:<10} {}",
                    event.at,
                    event.kind,
                    event.instance.as_deref().unwrap_or("-"),
                    event.detail
                ))
            })
            .collect();
        let list = List::new(items)
            .block(Block::bordered().title(format!("Events ({})", self.events.len())))
            .highlight_style(highlight());
        let mut state = ListState::default().with_selected(Some(selected));
        frame.render_stateful_widget(list, area, &mut state);
    }
}

fn highlight() -> Style {
    Style::new().add_modifier(Modifier::REVERSED)
}

fn attention_color(kind: &str) -> Color {
    match kind {
        "needs-input" => Color::Yellow,
        "stuck" | "failed-task" | "dead-instance" => Color::Red,
        _ => Color::Magenta,
    }
}

/// A state's name as the API spells it.
pub(crate) fn state_name(state: AgentState) -> &'static str {
    match state {
        AgentState::Working => "working",
        AgentState::Idle => "idle",
        AgentState::NeedsInput => "needs-input",
        AgentState::Stuck => "stuck",
        AgentState::Exited => "exited",
    }
}

fn state_color(state: AgentState) -> Color {
    match state {
        AgentState::Working => Color::Green,
        AgentState::Idle => Color::Gray,
        AgentState::NeedsInput => Color::Yellow,
        AgentState::Stuck => Color::Red,
        AgentState::Exited => Color::DarkGray,
    }
}

/// A table in a titled border with the selected row highlighted.
fn draw_table(
    frame: &mut Frame<'_>,
    area: Rect,
    (title, header): (String, &[&'static str]),
    (rows, widths): (Vec<Row<'_>>, &[Constraint]),
    selected: Option<usize>,
) {
    let table = Table::new(rows, widths.to_vec())
        .header(Row::new(header.to_vec()).style(Style::new().add_modifier(Modifier::BOLD)))
        .block(Block::bordered().title(title))
        .row_highlight_style(highlight());
    let mut state = TableState::default().with_selected(selected);
    frame.render_stateful_widget(table, area, &mut state);
}

fn instance_row(view: &InstanceView) -> Row<'_> {
    let record = &view.record;
    let (state, since, reason) = match &view.agent {
        Some(agent) => (
            Span::styled(
                state_name(agent.state),
                Style::new().fg(state_color(agent.state)),
            ),
            format_age(agent.since.age()),
            agent.reason.clone(),
        ),
        None => (Span::raw(view.liveness.clone()), "-".into(), String::new()),
    };
    let reason = match &view.reason {
        Some(stale) if view.liveness != "live" => format!("{} {stale}", view.liveness),
        _ => reason,
    };
    let (changes, ahead) = match &view.progress {
        Some(p) => (
            format!(
                "{}f +{} -{}",
                p.committed.files + p.uncommitted.files,
                p.committed.insertions + p.uncommitted.insertions,
                p.committed.deletions + p.uncommitted.deletions
            ),
            format!("{}/{}", p.ahead, p.behind),
        ),
        None => ("-".into(), "-".into()),
    };
    let task = match (&view.run, &view.task) {
        (Some(run), Some(task)) => format!("{run}/{task}"),
        (Some(run), None) => run.clone(),
        _ => "-".into(),
    };
    let ports: Vec<String> = record.ports.iter().map(u16::to_string).collect();
    Row::new(vec![
        Cell::from(record.id.to_string()),
        Cell::from(state),
        Cell::from(since),
        Cell::from(record.branch.clone().unwrap_or_else(|| "-".into())),
        Cell::from(changes),
        Cell::from(ahead),
        Cell::from(if ports.is_empty() {
            "-".into()
        } else {
            ports.join(",")
        }),
        Cell::from(task),
        Cell::from(record.host.clone()),
        Cell::from(reason),
    ])
}

fn draw_instances(frame: &mut Frame<'_>, overview: &Overview, selected: usize, area: Rect) {
    let rows = overview.instances.iter().map(instance_row).collect();
    let widths = [
        Constraint::Length(10),
        Constraint::Length(11),
        Constraint::Length(6),
        Constraint::Length(16),
        Constraint::Length(14),
        Constraint::Length(7),
        Constraint::Length(11),
        Constraint::Length(18),
        Constraint::Length(12),
        Constraint::Min(10),
    ];
    let header = [
        "ID", "STATE", "SINCE", "BRANCH", "CHANGES", "AHD/BHD", "PORTS", "RUN/TASK", "HOST", "WHY",
    ];
    let title = format!("Instances ({})", overview.instances.len());
    draw_table(
        frame,
        area,
        (title, &header),
        (rows, &widths),
        Some(selected),
    );
}

/// Each task's dependency wave: 1 for a task that waits for nothing, else one more than the
/// latest wave it waits for. A dependency that is not in the run (or a cycle, which a plan
/// refuses) counts as wave 0.
pub(crate) fn waves(tasks: &[TaskView]) -> Vec<usize> {
    fn wave(
        tasks: &[TaskView],
        index: usize,
        memo: &mut Vec<Option<usize>>,
        depth: usize,
    ) -> usize {
        if let Some(known) = memo[index] {
            return known;
        }
        if depth > tasks.len() {
            return 0;
        }
        let deepest = tasks[index]
            .depends_on
            .iter()
            .filter_map(|dep| tasks.iter().position(|task| task.id == *dep))
            .map(|dep| wave(tasks, dep, memo, depth + 1))
            .max()
            .unwrap_or(0);
        memo[index] = Some(deepest + 1);
        deepest + 1
    }
    let mut memo = vec![None; tasks.len()];
    (0..tasks.len())
        .map(|index| wave(tasks, index, &mut memo, 0))
        .collect()
}

/// Every task of every run, in order, with its run and wave: the rows Runs selects among.
fn task_rows(runs: &[RunView]) -> impl Iterator<Item = (&RunView, usize, &TaskView)> {
    runs.iter().flat_map(|run| {
        let waves = waves(&run.tasks);
        run.tasks
            .iter()
            .zip(waves)
            .map(move |(task, wave)| (run, wave, task))
    })
}

/// How long a task ran (or has run so far), from its RFC 3339 times.
fn elapsed(task: &TaskView) -> String {
    let Some(started) = task.started_at.as_deref().and_then(|s| s.parse().ok()) else {
        return "-".into();
    };
    let started: Timestamp = started;
    let end = task
        .finished_at
        .as_deref()
        .and_then(|s| s.parse::<Timestamp>().ok())
        .map_or_else(std::time::SystemTime::now, Timestamp::system_time);
    format_age(
        end.duration_since(started.system_time())
            .unwrap_or(Duration::ZERO),
    )
}

fn task_color(status: &str) -> Color {
    match status {
        "succeeded" => Color::Green,
        "running" => Color::Cyan,
        "failed" | "lost" => Color::Red,
        "skipped" | "cancelled" => Color::DarkGray,
        _ => Color::Gray,
    }
}

fn draw_runs(frame: &mut Frame<'_>, overview: &Overview, selected: usize, area: Rect) {
    let mut items = Vec::new();
    let mut selected_item = None;
    let mut index = 0;
    for run in &overview.runs {
        items.push(ListItem::new(Line::from(vec![
            Span::styled(
                format!("run {} {}", run.id, run.name),
                Style::new().add_modifier(Modifier::BOLD),
            ),
            Span::styled(
                format!("  {}", run.status),
                Style::new().fg(task_color(&run.status)),
            ),
            Span::raw(format!("  on {}  started {}", run.host, run.started_at)),
        ])));
        for (task, wave) in run.tasks.iter().zip(waves(&run.tasks)) {
            if index == selected {
                selected_item = Some(items.len());
            }
            index += 1;
            items.push(ListItem::new(task_line(task, wave)));
        }
    }
    let list = List::new(items)
        .block(Block::bordered().title(format!("Runs ({})", overview.runs.len())))
        .highlight_style(highlight());
    let mut state = ListState::default().with_selected(selected_item);
    frame.render_stateful_widget(list, area, &mut state);
}

fn task_line(task: &TaskView, wave: usize) -> Line<'_> {
    let after = if task.depends_on.is_empty() {
        String::new()
    } else {
        format!("  after {}", task.depends_on.join(","))
    };
    let detail = task
        .detail
        .as_deref()
        .map(|d| format!("  {d}"))
        .unwrap_or_default();
    Line::from(vec![
        Span::raw(format!("  wave {wave}  {:<16} ", task.id)),
        Span::styled(
            format!("{:<10}", task.status),
            Style::new().fg(task_color(&task.status)),
        ),
        Span::raw(format!(
            " tries {}  {:>5}  {}{after}{detail}",
            task.attempts,
            elapsed(task),
            task.instance.as_deref().unwrap_or("-"),
        )),
    ])
}

fn draw_locks(frame: &mut Frame<'_>, overview: &Overview, selected: usize, area: Rect) {
    let [locks, reservations] =
        Layout::vertical([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
    let age = |at: Option<Timestamp>| at.map_or("-".into(), |at| format_age(at.age()));
    let lock_rows = overview
        .locks
        .iter()
        .map(|view| {
            let lock = &view.lock;
            Row::new(vec![
                lock.name.to_string(),
                lock.token.to_string(),
                lock.holder.as_ref().map_or("-".into(), ToString::to_string),
                age(lock.acquired_at),
                lock.expires_at.map_or("-".into(), |at| at.to_string()),
                view.waiters.join(","),
                view.scope.clone(),
                view.lapsed.clone().unwrap_or_default(),
            ])
        })
        .collect();
    let lock_widths = [
        Constraint::Length(16),
        Constraint::Length(6),
        Constraint::Length(28),
        Constraint::Length(6),
        Constraint::Length(25),
        Constraint::Length(16),
        Constraint::Length(6),
        Constraint::Min(8),
    ];
    let lock_header = [
        "NAME", "TOKEN", "HOLDER", "HELD", "EXPIRES", "WAITERS", "SCOPE", "LAPSED",
    ];
    draw_table(
        frame,
        locks,
        (format!("Locks ({})", overview.locks.len()), &lock_header),
        (lock_rows, &lock_widths),
        (selected < overview.locks.len()).then_some(selected),
    );
    let reservation_rows = overview
        .reservations
        .iter()
        .map(|view| {
            let r = &view.reservation;
            Row::new(vec![
                r.id.clone(),
                r.holder.to_string(),
                r.patterns.join(" "),
                if r.shared { "shared" } else { "exclusive" }.to_string(),
                r.expires_at.map_or("-".into(), |at| at.to_string()),
                view.scope.clone(),
                view.lapsed
                    .clone()
                    .or_else(|| r.reason.clone())
                    .unwrap_or_default(),
            ])
        })
        .collect();
    let reservation_widths = [
        Constraint::Length(9),
        Constraint::Length(28),
        Constraint::Length(24),
        Constraint::Length(9),
        Constraint::Length(25),
        Constraint::Length(6),
        Constraint::Min(8),
    ];
    let reservation_header = [
        "ID", "HOLDER", "PATTERNS", "MODE", "EXPIRES", "SCOPE", "WHY",
    ];
    let title = format!("Reservations ({})", overview.reservations.len());
    draw_table(
        frame,
        reservations,
        (title, &reservation_header),
        (reservation_rows, &reservation_widths),
        selected.checked_sub(overview.locks.len()),
    );
}

fn draw_messages(frame: &mut Frame<'_>, overview: &Overview, selected: usize, area: Rect) {
    let rows = overview
        .messages
        .iter()
        .map(|view| {
            let m = &view.message;
            Row::new(vec![
                m.id.clone(),
                m.from.to_string(),
                m.recipient.to_string(),
                m.kind.clone(),
                view.state.clone(),
                format_age(m.timestamp.age()),
                m.payload.to_string(),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(21),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(12),
        Constraint::Length(8),
        Constraint::Length(5),
        Constraint::Min(10),
    ];
    let header = ["ID", "FROM", "TO", "TYPE", "STATE", "AGE", "PAYLOAD"];
    let title = format!("Messages ({})", overview.messages.len());
    draw_table(
        frame,
        area,
        (title, &header),
        (rows, &widths),
        Some(selected),
    );
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

fn draw_host(frame: &mut Frame<'_>, overview: &Overview, selected: usize, area: Rect) {
    let host = &overview.host;
    let [health, findings] =
        Layout::vertical([Constraint::Length(7), Constraint::Min(0)]).areas(area);
    let latency = host
        .db_latency_ms
        .map_or("-".into(), |ms| format!("{ms:.1} ms"));
    let lines = vec![
        Line::from(format!("host      {}", host.name)),
        Line::from(format!(
            "load      {:.2} {:.2} {:.2}",
            host.load[0], host.load[1], host.load[2]
        )),
        Line::from(format!(
            "memory    {} free of {}",
            gib(host.mem_available_bytes),
            gib(host.mem_total_bytes)
        )),
        Line::from(format!(
            "disk      {} free of {}",
            gib(host.disk_free_bytes),
            gib(host.disk_total_bytes)
        )),
        Line::from(format!("database  {} ({latency})", host.db_kind)),
    ];
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title("Host")),
        health,
    );
    let items: Vec<ListItem<'_>> = overview
        .findings
        .iter()
        .map(|f| {
            ListItem::new(format!(
                "{:<14} {}: {}  (fix: {})",
                f.kind, f.subject, f.problem, f.fix
            ))
        })
        .collect();
    let title = format!("Doctor's findings ({})", overview.findings.len());
    let list = List::new(items)
        .block(Block::bordered().title(title))
        .highlight_style(highlight());
    let mut state = ListState::default().with_selected(Some(selected));
    frame.render_stateful_widget(list, findings, &mut state);
}

fn draw_log(frame: &mut Frame<'_>, log: &LogPane, body: Rect) {
    let area = Rect {
        x: body.x + body.width / 20,
        y: body.y,
        width: body.width - body.width / 10,
        height: body.height,
    };
    // The tail: as many last lines as fit inside the border.
    let fit = usize::from(area.height.saturating_sub(2));
    let lines: Vec<&str> = log.text.lines().collect();
    let tail = lines[lines.len().saturating_sub(fit)..].join("\n");
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(tail)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(format!("{} (Esc closes)", log.title))),
        area,
    );
}

#[cfg(test)]
mod tests;
