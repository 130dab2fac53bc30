//! `app orchestrate` and `app runs`.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use clap::{Args, Subcommand, ValueEnum};

use super::context::Context;
use super::output::{self, Table, outln};
use crate::db::runs::{self, RunRow, TaskRow, TaskStatus};
use crate::error::{Error, IoContext, Result, RunError};
use crate::ids::RunId;
use crate::orchestrate::plan::Plan;
use crate::orchestrate::{self, Options, Progress, StopFlag, Summary};
use crate::stop::Stopper;
use crate::time::{Timestamp, format_age};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A live display on a terminal (outside CI), plain lines otherwise.
    Auto,
    /// Timestamped lines on stderr.
    Plain,
    /// Nothing until the summary.
    None,
}

/// Arguments of `app orchestrate`.
#[derive(Debug, Args)]
pub struct OrchestrateArgs {
    /// The plan file (JSON, or TOML when it ends in .toml; docs/ORCHESTRATE.md).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "resume",
        conflicts_with = "resume"
    )]
    plan: Option<PathBuf>,
    /// Continue run RUN after its orchestrator died: what succeeded is not run again.
    #[arg(long, value_name = "RUN")]
    resume: Option<String>,
    /// Override the plan's max_concurrent.
    #[arg(long, value_name = "N")]
    max_concurrent: Option<usize>,
    /// Stop every task at the first failure.
    #[arg(long)]
    fail_fast: bool,
    /// How progress is shown.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressMode,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Validate the plan and print its schedule (waves); run nothing.
    #[arg(long, conflicts_with = "resume")]
    dry_run: bool,
    /// Run the tasks on the fleet: 'app worker's on any host sharing APP_DB_URL and
    /// APP_SHARED_SECRET take them (docs/FLEET.md).
    #[arg(long, conflicts_with = "resume")]
    fleet: bool,
    /// The git remote the fleet's hosts share (default origin).
    #[arg(long, value_name = "NAME")]
    remote: Option<String>,
}

pub(super) fn orchestrate(ctx: &Context, args: OrchestrateArgs) -> Result<u8> {
    let cwd = super::current_dir()?;
    let options = Options {
        max_concurrent: args.max_concurrent,
        fail_fast: args.fail_fast,
        db: ctx.db.clone(),
        settings: ctx.settings.clone(),
        fleet: match (args.fleet, args.remote) {
            (true, remote) => {
                Some(remote.unwrap_or_else(|| orchestrate::fleet::DEFAULT_REMOTE.into()))
            }
            (false, Some(remote)) if args.resume.is_some() => Some(remote),
            (false, Some(_)) => {
                return Err(Error::bad_input(
                    "--remote is for fleet runs: add --fleet (or --resume a fleet run)",
                ));
            }
            (false, None) => None,
        },
    };
    let prepared = match &args.plan {
        Some(file) => Some(orchestrate::prepare(&cwd, file, &options)?),
        None => None,
    };
    if args.dry_run {
        let (_, plan) = prepared.expect("--dry-run needs --plan");
        outln!(
            "run {} (dry run): {} tasks, at most {} at once, base {}, integration {}",
            plan.run,
            plan.tasks.len(),
            plan.max_concurrent,
            &plan.base[..12.min(plan.base.len())],
            plan.integration.as_deref().unwrap_or("off")
        );
        for (n, wave) in plan.waves().iter().enumerate() {
            outln!("wave {}: {}", n + 1, wave.join(", "));
        }
        return Ok(0);
    }

    let stop = StopFlag::default();
    let (handle, watcher) = super::fleet::count_signals(&stop)?;
    let live = args.progress == ProgressMode::Auto
        && std::io::stderr().is_terminal()
        && std::env::var_os("CI").is_none();
    let display = live.then(Live::start);
    let mut report = |progress: Progress| match (&display, args.progress) {
        (Some(display), _) => display.show(&progress),
        (None, ProgressMode::None) => {}
        (None, _) => eprintln!("[{}] {}", Timestamp::now(), describe(&progress)),
    };
    let result = match (prepared, &args.resume) {
        (Some((paths, plan)), _) => orchestrate::start(&paths, plan, &options, &stop, &mut report),
        (None, Some(run)) => orchestrate::resume(&cwd, run, &options, &stop, &mut report),
        (None, None) => unreachable!("clap requires --plan or --resume"),
    };
    handle.close();
    let _ = watcher.join();
    if let Some(display) = display {
        display.finish();
    }
    let summary = result?;
    if args.json {
        output::json(&serde_json::json!({ "run": summary.run, "tasks": summary.tasks }));
    } else {
        print_summary(&summary);
    }
    Ok(summary.exit_code(stop.signal()))
}

/// The live display: an overall bar, and a line per running task with its elapsed time and the
/// last line of its log.
struct Live {
    multi: MultiProgress,
    overall: ProgressBar,
    running: Arc<Mutex<HashMap<String, (ProgressBar, PathBuf)>>>,
    /// Ends the ticker.
    done: Stopper,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl Live {
    fn start() -> Live {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(
            ProgressBar::new(0).with_style(
                ProgressStyle::with_template("{bar:32.cyan/blue} {pos}/{len} tasks  {elapsed}")
                    .expect("the template is valid"),
            ),
        );
        let running: Arc<Mutex<HashMap<String, (ProgressBar, PathBuf)>>> = Arc::default();
        let done = Stopper::new();
        let ticker = {
            let (running, done) = (Arc::clone(&running), done.token());
            std::thread::spawn(move || {
                while !done.is_stopped() {
                    for (bar, log) in running.lock().unwrap_or_else(|p| p.into_inner()).values() {
                        if let Some(line) = last_line(log) {
                            bar.set_message(line);
                        }
                    }
                    done.wait_timeout(Duration::from_millis(250));
                }
            })
        };
        Live {
            multi,
            overall,
            running,
            done,
            ticker: Some(ticker),
        }
    }

    fn show(&self, progress: &Progress) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match progress {
            Progress::Began { tasks, done, .. } => {
                self.overall.set_length(*tasks as u64);
                self.overall.set_position(*done as u64);
            }
            Progress::Started { task, log, .. } => {
                let bar = self.multi.insert_before(
                    &self.overall,
                    ProgressBar::new_spinner().with_style(
                        ProgressStyle::with_template(
                            "{spinner} {prefix:16} {elapsed:>4}  {wide_msg}",
                        )
                        .expect("the template is valid"),
                    ),
                );
                bar.set_prefix(task.clone());
                bar.enable_steady_tick(Duration::from_millis(200));
                running.insert(task.clone(), (bar, log.clone()));
            }
            Progress::Finished { task, status, .. } => {
                if let Some((bar, _)) = running.remove(task) {
                    bar.finish_and_clear();
                }
                let _ = self.multi.println(describe(progress));
                if status.is_some() {
                    self.overall.inc(1);
                }
            }
            Progress::Skipped { .. } => {
                let _ = self.multi.println(describe(progress));
                self.overall.inc(1);
            }
            Progress::Moved { task, .. } => {
                if let Some((bar, _)) = running.remove(task) {
                    bar.finish_and_clear();
                }
                let _ = self.multi.println(describe(progress));
            }
            Progress::Reclaimed { .. }
            | Progress::Conflict { .. }
            | Progress::Integrated { .. } => {
                let _ = self.multi.println(describe(progress));
            }
        }
    }

    fn finish(mut self) {
        self.done.stop();
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
        for (bar, _) in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            bar.finish_and_clear();
        }
        self.overall.finish_and_clear();
    }
}

/// The last non-empty line of a log (read from its last 4 KiB).
fn last_line(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(std::io::SeekFrom::Start(len.saturating_sub(4096)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    text.lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with("== app orchestrate:"))
        .map(|line| line.chars().take(120).collect())
}

fn describe(progress: &Progress) -> String {
    match progress {
        Progress::Began { run, tasks, done } if *done > 0 => {
            format!("run {run}: resuming, {done} of {tasks} tasks already succeeded")
        }
        Progress::Began { run, tasks, .. } => format!("run {run}: {tasks} tasks"),
        Progress::Started { task, attempt, log } => {
            format!("{task}: started (attempt {attempt}), log {}", log.display())
        }
        Progress::Finished {
            task,
            status,
            exit_code,
            elapsed,
            detail,
        } => {
            let status = status.map_or("retrying", TaskStatus::as_str);
            let mut line = format!("{task}: {status} after {}", format_age(*elapsed));
            if let Some(code) = exit_code {
                line.push_str(&format!(", exit {code}"));
            }
            if let Some(detail) = detail {
                line.push_str(&format!(" ({detail})"));
            }
            line
        }
        Progress::Reclaimed {
            task,
            instance,
            done,
        } => format!("{task}: reclaimed its dead attempt {instance}: {done}"),
        Progress::Skipped { task, because } => format!("{task}: skipped ({because})"),
        Progress::Moved { task, because } => format!("{task}: {because}"),
        Progress::Conflict { a, b, files } => format!(
            "warning: tasks {a} and {b} both finished and would conflict in {}",
            files.join(", ")
        ),
        Progress::Integrated {
            branch,
            merged,
            left_out,
        } => {
            let mut line = format!("integration {branch}: merged {}", list_or_none(merged));
            for (task, why) in left_out {
                line.push_str(&format!("; left out {task} ({why})"));
            }
            line
        }
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".into()
    } else {
        items.join(", ")
    }
}

fn print_summary(summary: &Summary) {
    outln!("run {}: {}", summary.run.id, summary.run.status);
    print_tasks(&summary.tasks);
}

fn print_tasks(tasks: &[TaskRow]) {
    let mut table = Table::new(&[
        "TASK", "STATUS", "ATTEMPTS", "TIME", "EXIT", "BRANCH", "DETAIL",
    ]);
    for task in tasks {
        let time = match (&task.started_at, &task.finished_at) {
            (Some(start), Some(end)) => {
                match (start.parse::<Timestamp>(), end.parse::<Timestamp>()) {
                    (Ok(start), Ok(end)) => format_age(
                        end.system_time()
                            .duration_since(start.system_time())
                            .unwrap_or_default(),
                    ),
                    _ => "-".into(),
                }
            }
            _ => "-".into(),
        };
        table.row(vec![
            task.task_id.clone(),
            task.status.to_string(),
            task.attempts.to_string(),
            time,
            task.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
            task.branch.clone(),
            task.detail.clone().unwrap_or_default(),
        ]);
    }
    table.print();
}

/// `app runs`.
#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// The runs of this repository, newest first.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One run: its status, report and tasks.
    Show {
        /// The run id.
        run: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A task's output.
    Logs {
        /// The run id.
        run: String,
        /// The task id.
        task: String,
        /// Keep printing what is appended until the task ends.
        #[arg(long)]
        follow: bool,
    },
}

pub(super) fn runs(ctx: &Context, command: RunsCommand) -> Result<u8> {
    let paths = ctx.repo()?.paths;
    let repo_root = paths.repo_root().display().to_string();
    match command {
        RunsCommand::List { json } => {
            let rows = ctx.with_db(async |db| runs::list(db, &repo_root, 100).await)?;
            if json {
                output::json(&rows);
            } else {
                let mut table = Table::new(&["RUN", "STATUS", "STARTED", "FINISHED"]);
                for row in &rows {
                    table.row(vec![
                        row.id.to_string(),
                        row.status.to_string(),
                        row.started_at.clone(),
                        row.finished_at.clone().unwrap_or_else(|| "-".into()),
                    ]);
                }
                table.print();
            }
            Ok(0)
        }
        RunsCommand::Show { run, json } => {
            let (row, tasks) = load(ctx, &run)?;
            if json {
                output::json(&serde_json::json!({ "run": row, "tasks": tasks }));
            } else {
                outln!(
                    "run {}: {} (started {})",
                    row.id,
                    row.status,
                    row.started_at
                );
                if row.report != serde_json::json!({}) {
                    outln!("report: {}", row.report);
                }
                print_tasks(&tasks);
            }
            Ok(0)
        }
        RunsCommand::Logs { run, task, follow } => {
            let (_, tasks) = load(ctx, &run)?;
            let row = tasks
                .iter()
                .find(|t| t.task_id == task)
                .ok_or_else(|| RunError::NoTask {
                    run: run.clone(),
                    task: task.clone(),
                })?;
            let path = paths.task_log(&run, &task);
            print_log(
                &path,
                follow.then_some((ctx, run.as_str(), row.task_id.as_str())),
            )
        }
    }
}

fn load(ctx: &Context, run: &str) -> Result<(RunRow, Vec<TaskRow>)> {
    // A text that is no run id names no run.
    let (row, mut tasks) = ctx.with_db(async |db| match RunId::parse(run) {
        Some(id) => Ok((runs::get(db, &id).await?, runs::tasks(db, &id).await?)),
        None => Ok((None, Vec::new())),
    })?;
    let row = row.ok_or_else(|| RunError::Unknown {
        id: run.to_string(),
    })?;
    // Plan order, as the plan listed them.
    let order: Vec<String> = Plan::of_run(&row)
        .map(|plan| plan.tasks.into_iter().map(|task| task.id).collect())
        .unwrap_or_default();
    tasks.sort_by_key(|t| {
        order
            .iter()
            .position(|id| *id == t.task_id)
            .unwrap_or(usize::MAX)
    });
    Ok((row, tasks))
}

/// Prints a log; with `follow`, keeps printing what is appended until the task is no longer
/// pending or running.
fn print_log(path: &Path, follow: Option<(&Context, &str, &str)>) -> Result<u8> {
    if follow.is_none() && !path.exists() {
        return Err(RunError::NoLog {
            path: path.to_path_buf(),
        }
        .into());
    }
    let mut offset = 0u64;
    loop {
        // Asked before reading, so the last read sees everything written before the end.
        let active = match follow {
            Some((ctx, run, task)) => load(ctx, run)?.1.iter().any(|t| {
                t.task_id == task
                    && (t.status == TaskStatus::Running || t.status == TaskStatus::Pending)
            }),
            None => false,
        };
        if let Ok(mut file) = std::fs::File::open(path) {
            file.seek(std::io::SeekFrom::Start(offset))
                .io_context("reading", path)?;
            let mut chunk = Vec::new();
            file.read_to_end(&mut chunk).io_context("reading", path)?;
            offset += chunk.len() as u64;
            output::bytes(&chunk).io_context("writing", "stdout")?;
        }
        if !active {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
