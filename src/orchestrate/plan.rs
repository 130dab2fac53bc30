//! The plan file of `app orchestrate --plan`: its format (JSON, or TOML for a `.toml` file,
//! read into the same [`PlanSpec`]), whole validation before anything is created, and the
//! schedule in waves.
//!
//! Invariants:
//! - `Plan::parse` checks everything (syntax, unknown fields, ids, dependencies,
//!   cycles, branch names, duplicate branches, the base ref, durations) and returns the first
//!   problem as bad input naming the file and line; it writes nothing.
//! - The tasks of a valid plan form a DAG; `waves` orders them so that every task comes after
//!   everything it depends on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use git2::Repository;
use serde::{Deserialize, Serialize};

use crate::db::runs::RunRow;

use crate::error::{Error, Result, RunError};
use crate::ids::RunId;
use crate::time::parse_duration;
use crate::worktree;

/// A task's command: an argv array, or a string run by `sh -c`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommandSpec {
    /// `["cargo", "test"]`.
    Argv(Vec<String>),
    /// `"cargo test && cargo clippy"`.
    Shell(String),
}

impl CommandSpec {
    /// The argv to run.
    pub fn argv(&self) -> Vec<String> {
        match self {
            CommandSpec::Argv(argv) => argv.clone(),
            CommandSpec::Shell(script) => vec!["sh".into(), "-c".into(), script.clone()],
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            CommandSpec::Argv(argv) => argv.is_empty() || argv[0].is_empty(),
            CommandSpec::Shell(script) => script.trim().is_empty(),
        }
    }
}

/// The integration branch setting: a name, or `false`/`"off"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Integration {
    /// `false` (off).
    Flag(bool),
    /// A branch name, or `"off"`.
    Branch(String),
}

/// One task as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Unique id, `[a-z0-9][a-z0-9_-]{0,31}`.
    pub id: String,
    /// Free text for the reader of the plan (JSON has no comments).
    #[serde(default)]
    pub description: Option<String>,
    /// What to run.
    pub command: CommandSpec,
    /// Branch (default `app/<run>/<id>`).
    #[serde(default)]
    pub branch: Option<String>,
    /// Tasks that must succeed first; their branches are merged into this task's start.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Time limit (`30s`, `10m`); SIGTERM then SIGKILL.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Extra attempts after a failure.
    #[serde(default)]
    pub retries: u32,
    /// Named locks held while it runs.
    #[serde(default)]
    pub locks: Vec<String>,
    /// Path globs reserved while it runs.
    #[serde(default)]
    pub reserve: Vec<String>,
    /// Labels a fleet host must have to run it (`{"gpu": "1"}`); a local run ignores them.
    #[serde(default)]
    pub on: BTreeMap<String, String>,
}

/// The file as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// The plan's name, `[a-z0-9][a-z0-9_-]{0,31}`; runs are named after it.
    pub name: String,
    /// Free text for the reader of the plan (JSON has no comments).
    #[serde(default)]
    pub description: Option<String>,
    /// Ref every task starts from (default HEAD).
    #[serde(default)]
    pub base: Option<String>,
    /// Most tasks running at once (default 4).
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// Branch every successful task is merged into at the end (default off).
    #[serde(default)]
    pub integration: Option<Integration>,
    /// The tasks.
    pub tasks: Vec<TaskSpec>,
}

/// A validated task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Its id.
    pub id: String,
    /// The argv to run.
    pub argv: Vec<String>,
    /// Its branch.
    pub branch: String,
    /// Its dependencies, in file order.
    pub depends_on: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Time limit.
    pub timeout: Option<Duration>,
    /// Extra attempts after a failure.
    pub retries: u32,
    /// Named locks held while it runs.
    pub locks: Vec<String>,
    /// Path globs reserved while it runs.
    pub reserve: Vec<String>,
    /// Labels a fleet host must have to run it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub on: BTreeMap<String, String>,
}

/// A validated plan, bound to a run id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The plan's name.
    pub name: String,
    /// The run this plan is executed as.
    pub run: RunId,
    /// The base commit (resolved).
    pub base: String,
    /// Most tasks at once.
    pub max_concurrent: usize,
    /// The integration branch, if any.
    pub integration: Option<String>,
    /// The tasks, in file order.
    pub tasks: Vec<Task>,
}

/// Default cap on tasks running at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 4;

/// The longest command argument or `KEY=VALUE` environment entry, in bytes: the kernel's
/// limit per string (`MAX_ARG_STRLEN`, 128 KiB) less its terminating NUL.
pub const MAX_ARG_BYTES: usize = 128 * 1024 - 1;

/// The most bytes a task's arguments and environment entries may take together (each with its
/// NUL): well under the kernel's usual 2 MiB for everything `exec` passes, since the task's
/// `app run` also inherits the orchestrator's environment.
pub const MAX_EXEC_BYTES: usize = 1024 * 1024;

/// The language a plan file is written in: TOML for a `.toml` file, JSON otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON.
    Json,
    /// TOML: the same fields, tasks as `[[tasks]]` tables.
    Toml,
}

impl Format {
    /// The format of the file at `path`, by its extension.
    pub fn of(path: &Path) -> Format {
        match path.extension() {
            Some(ext) if ext.eq_ignore_ascii_case("toml") => Format::Toml,
            _ => Format::Json,
        }
    }

    /// Reads `text` as a plan, or says where and why it cannot (`origin:line:column: why`).
    fn read(self, text: &str, origin: &str) -> Result<PlanSpec> {
        match self {
            Format::Json => serde_json::from_str(text).map_err(|err| {
                let top = text.trim_start().chars().next();
                let why = if err.is_data() && top.is_some_and(|c| c != '{') {
                    let what = if top == Some('[') { "an array" } else { "not an object" };
                    format!(
                        "a plan is an object with a \"tasks\" array; this file's top level is {what}: write {{\"name\": \"...\", \"tasks\": [...]}}"
                    )
                } else {
                    strip_position(&err.to_string()).to_string()
                };
                Error::bad_input(format!("{origin}:{}:{}: {why}", err.line(), err.column()))
            }),
            Format::Toml => toml::from_str(text).map_err(|err| {
                let place = match err.span() {
                    Some(span) => {
                        let before = text.get(..span.start).unwrap_or(text);
                        let line = before.matches('\n').count() + 1;
                        let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
                        format!("{origin}:{line}:{column}")
                    }
                    None => origin.to_string(),
                };
                Error::bad_input(format!("{place}: {}", err.message().trim_end()))
            }),
        }
    }

    /// The line where `key` is set.
    fn key_line(self, text: &str, key: &str) -> Option<usize> {
        match self {
            Format::Json => line_of(text, &format!("\"{key}\"")),
            Format::Toml => text
                .lines()
                .position(|line| {
                    line.trim_start()
                        .strip_prefix(key)
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
                })
                .map(|index| index + 1),
        }
    }

    /// The line where the string `value` is first written.
    fn value_line(self, text: &str, value: &str) -> Option<usize> {
        line_of(text, &format!("\"{value}\"")).or_else(|| match self {
            Format::Json => None,
            Format::Toml => line_of(text, &format!("'{value}'")),
        })
    }
}

/// `text` without a leading UTF-8 byte order mark, which some editors write; neither JSON nor
/// TOML allows one, and it is not part of the plan.
fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// The `name` a plan file gives itself, if it can be read that far.
pub fn name_in(text: &str, format: Format) -> Option<String> {
    let text = without_bom(text);
    match format {
        Format::Json => serde_json::from_str::<serde_json::Value>(text)
            .ok()?
            .get("name")?
            .as_str()
            .map(str::to_string),
        Format::Toml => toml::from_str::<toml::Table>(text)
            .ok()?
            .get("name")?
            .as_str()
            .map(str::to_string),
    }
}

impl Plan {
    /// The plan a run recorded in the database (validated when the run began).
    pub fn of_run(run: &RunRow) -> Result<Plan> {
        serde_json::from_value(run.plan.clone()).map_err(|source| {
            RunError::PlanOfRun {
                id: run.id.to_string(),
                source,
            }
            .into()
        })
    }

    /// Validates plan `text` written in `format`; `origin` names it in errors.
    pub fn parse(
        text: &str,
        format: Format,
        origin: &str,
        run: &RunId,
        repo: &Repository,
    ) -> Result<Plan> {
        // The mark is one character on the first line: lines and columns stay the same.
        let text = without_bom(text);
        let spec = format.read(text, origin)?;
        let places = Places {
            text,
            format,
            origin,
        };
        let top = places.at("name");
        validate_id(&spec.name)
            .map_err(|why| Error::bad_input(format!("{top}: plan name {:?} {why}", spec.name)))?;
        if spec.tasks.is_empty() {
            return Err(Error::bad_input(format!(
                "{}: the plan has no tasks; add some to \"tasks\"",
                places.at("tasks")
            )));
        }
        let max_concurrent = spec.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT);
        if max_concurrent == 0 {
            return Err(Error::bad_input(format!(
                "{}: max_concurrent must be at least 1",
                places.at("max_concurrent")
            )));
        }
        let base = worktree::resolve_base(repo, spec.base.as_deref())
            .map_err(|err| Error::bad_input(format!("{}: base: {err}", places.at("base"))))?
            .to_string();
        let integration = integration_of(&spec, run.as_str(), &places)?;
        let tasks = tasks_of(&spec.tasks, run.as_str(), integration.as_deref(), &places)?;
        let plan = Plan {
            name: spec.name,
            run: run.clone(),
            base,
            max_concurrent,
            integration,
            tasks,
        };
        if let Some(cycle) = plan.cycle() {
            return Err(Error::bad_input(format!(
                "{}: the tasks depend on each other in a cycle: {}",
                places.at_task(&cycle[0]),
                cycle.join(" -> ")
            )));
        }
        Ok(plan)
    }

    /// The task with `id`.
    pub fn task(&self, id: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.id == id)
    }

    /// A dependency cycle, as ids with the first repeated at the end, if there is one.
    fn cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Open,
            Done,
        }
        let index = self.positions();
        let mut marks = vec![Mark::New; self.tasks.len()];
        for start in 0..self.tasks.len() {
            if marks[start] != Mark::New {
                continue;
            }
            // Depth-first, with the path kept so a back edge can be printed as the cycle.
            let mut path: Vec<(usize, usize)> = vec![(start, 0)];
            marks[start] = Mark::Open;
            while let Some(&mut (node, ref mut next)) = path.last_mut() {
                let deps = &self.tasks[node].depends_on;
                if *next == deps.len() {
                    marks[node] = Mark::Done;
                    path.pop();
                    continue;
                }
                let dep = index[deps[*next].as_str()];
                *next += 1;
                match marks[dep] {
                    Mark::Open => {
                        let from = path.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        let mut cycle: Vec<String> = path[from..]
                            .iter()
                            .map(|(n, _)| self.tasks[*n].id.clone())
                            .collect();
                        cycle.push(self.tasks[dep].id.clone());
                        return Some(cycle);
                    }
                    Mark::New => {
                        marks[dep] = Mark::Open;
                        path.push((dep, 0));
                    }
                    Mark::Done => {}
                }
            }
        }
        None
    }

    /// Each task's position in the plan, by id.
    fn positions(&self) -> HashMap<&str, usize> {
        self.tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.as_str(), i))
            .collect()
    }

    /// The tasks in waves: every task in the wave after its last dependency's, each wave in
    /// file order. Linear in tasks plus dependencies (Kahn's order); should a plan not built by
    /// [`Plan::parse`] hold a cycle, its tasks come in one last wave, and an unknown dependency
    /// is ignored.
    pub fn waves(&self) -> Vec<Vec<String>> {
        let index = self.positions();
        let mut waiting = vec![0usize; self.tasks.len()];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); self.tasks.len()];
        for (i, task) in self.tasks.iter().enumerate() {
            for dep in &task.depends_on {
                if let Some(&d) = index.get(dep.as_str()) {
                    waiting[i] += 1;
                    dependents[d].push(i);
                }
            }
        }
        let mut depth: Vec<Option<usize>> = vec![None; self.tasks.len()];
        let mut ready: Vec<usize> = (0..self.tasks.len()).filter(|&i| waiting[i] == 0).collect();
        for &i in &ready {
            depth[i] = Some(0);
        }
        while let Some(i) = ready.pop() {
            let next = depth[i].unwrap_or(0) + 1;
            for &j in &dependents[i] {
                depth[j] = Some(depth[j].map_or(next, |d| d.max(next)));
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.push(j);
                }
            }
        }
        let deepest = depth.iter().flatten().max().map_or(0, |d| d + 1);
        let mut waves: Vec<Vec<String>> = Vec::new();
        for (task, depth) in self.tasks.iter().zip(depth) {
            let d = depth.unwrap_or(deepest);
            if waves.len() <= d {
                waves.resize(d + 1, Vec::new());
            }
            waves[d].push(task.id.clone());
        }
        waves
    }
}

/// Where in the plan's text something is, for error messages: `<origin>:<line>`.
struct Places<'a> {
    text: &'a str,
    format: Format,
    origin: &'a str,
}

impl Places<'_> {
    fn place(&self, line: Option<usize>) -> String {
        match line {
            Some(line) => format!("{}:{line}", self.origin),
            None => self.origin.to_string(),
        }
    }

    /// Where top-level `key` is.
    fn at(&self, key: &str) -> String {
        self.place(self.format.key_line(self.text, key))
    }

    /// Where task `id` is (looked up only for an error: finding it scans the text).
    fn at_task(&self, id: &str) -> String {
        self.place(self.format.value_line(self.text, id))
    }
}

/// The integration branch `spec` asks for (`true`: `app/<run>/integration`), checked.
fn integration_of(spec: &PlanSpec, run: &str, places: &Places<'_>) -> Result<Option<String>> {
    let integration = match &spec.integration {
        None | Some(Integration::Flag(false)) => None,
        Some(Integration::Branch(name)) if name == "off" => None,
        Some(Integration::Flag(true)) => Some(format!("app/{run}/integration")),
        Some(Integration::Branch(name)) => Some(name.clone()),
    };
    if let Some(name) = &integration {
        worktree::validate_branch_name(name).map_err(|err| {
            Error::bad_input(format!("{}: integration: {err}", places.at("integration")))
        })?;
    }
    Ok(integration)
}

/// Validates every task of the plan, each whole in plan order, then their dependencies.
fn tasks_of(
    specs: &[TaskSpec],
    run: &str,
    integration: Option<&str>,
    places: &Places<'_>,
) -> Result<Vec<Task>> {
    let mut ids = HashSet::new();
    let mut branches: HashMap<String, String> = HashMap::new();
    let mut tasks = Vec::new();
    for spec in specs {
        // The line is looked up only for an error: finding it scans the text.
        let fail = |what: String| {
            Error::bad_input(format!(
                "{}: task {:?}: {what}",
                places.at_task(&spec.id),
                spec.id
            ))
        };
        validate_id(&spec.id).map_err(|why| fail(format!("the id {why}")))?;
        if !ids.insert(spec.id.clone()) {
            return Err(fail("a second task has this id; ids must be unique".into()));
        }
        if spec.command.is_empty() {
            return Err(fail("the command is empty".into()));
        }
        let branch = spec
            .branch
            .clone()
            .unwrap_or_else(|| format!("app/{run}/{}", spec.id));
        worktree::validate_branch_name(&branch).map_err(|err| fail(err.to_string()))?;
        if let Some(other) = branches.insert(branch.clone(), spec.id.clone()) {
            return Err(fail(format!("branch {branch:?} is also task {other:?}'s")));
        }
        if integration == Some(branch.as_str()) {
            return Err(fail(format!("branch {branch:?} is the integration branch")));
        }
        tasks.push(task_of(spec, branch).map_err(fail)?);
    }
    check_dependencies(&tasks, &ids, places)?;
    Ok(tasks)
}

/// The rest of a task's checks (its timeout, locks, globs, environment, and what exec takes),
/// and the task; `Err` says what is wrong.
fn task_of(spec: &TaskSpec, branch: String) -> std::result::Result<Task, String> {
    let timeout = spec
        .timeout
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|err| format!("timeout: {err}"))?;
    for name in &spec.locks {
        crate::ids::LockName::parse(name).map_err(|err| err.to_string())?;
    }
    for pattern in &spec.reserve {
        crate::glob::Glob::parse(pattern).map_err(|err| err.to_string())?;
    }
    for (key, value) in &spec.on {
        crate::ids::validate_label(key, value).map_err(|err| format!("on: {err}"))?;
    }
    for key in spec.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(format!("env: {key:?} is not a variable name"));
        }
    }
    check_exec_strings(&spec.command, &spec.env)?;
    Ok(Task {
        id: spec.id.clone(),
        argv: spec.command.argv(),
        branch,
        depends_on: spec.depends_on.clone(),
        env: spec.env.clone(),
        timeout,
        retries: spec.retries,
        locks: spec.locks.clone(),
        reserve: spec.reserve.clone(),
        on: spec.on.clone(),
    })
}

/// Every dependency names another task of the plan.
fn check_dependencies(tasks: &[Task], ids: &HashSet<String>, places: &Places<'_>) -> Result<()> {
    for task in tasks {
        for dependency in &task.depends_on {
            if !ids.contains(dependency) {
                return Err(Error::bad_input(format!(
                    "{}: task {:?} depends on {dependency:?}, which is not a task of this plan",
                    places.at_task(&task.id),
                    task.id
                )));
            }
            if dependency == &task.id {
                return Err(Error::bad_input(format!(
                    "{}: task {:?} depends on itself",
                    places.at_task(&task.id),
                    task.id
                )));
            }
        }
    }
    Ok(())
}

/// Checks that `exec` can pass a task's command and environment: no NUL byte (a C string ends
/// there, so spawning fails), no string over [`MAX_ARG_BYTES`], all of it within
/// [`MAX_EXEC_BYTES`]. The error names the field.
fn check_exec_strings(
    command: &CommandSpec,
    env: &BTreeMap<String, String>,
) -> std::result::Result<(), String> {
    let check = |field: &str, text: &str, len: usize| {
        if text.contains('\0') {
            return Err(format!(
                "{field} contains a NUL byte, which no program can be given; remove it"
            ));
        }
        if len > MAX_ARG_BYTES {
            return Err(format!(
                "{field} is {len} bytes; an argument or environment entry may be at most {MAX_ARG_BYTES} bytes (the kernel's limit); pass large input through a file"
            ));
        }
        Ok(len + 1)
    };
    let mut total = 0;
    match command {
        CommandSpec::Argv(argv) => {
            for (n, arg) in argv.iter().enumerate() {
                total += check(&format!("command[{n}]"), arg, arg.len())?;
            }
        }
        CommandSpec::Shell(script) => total += check("command", script, script.len())?,
    }
    for (key, value) in env {
        // The kernel sees `KEY=VALUE`.
        total += check(&format!("env {key:?}"), value, key.len() + 1 + value.len())?;
    }
    if total > MAX_EXEC_BYTES {
        return Err(format!(
            "the command and env take {total} bytes together; at most {MAX_EXEC_BYTES} can be passed to a task; pass large input through a file"
        ));
    }
    Ok(())
}

/// Checks a plan or task id; the error completes "the id ...".
fn validate_id(id: &str) -> std::result::Result<(), String> {
    if crate::ids::is_plan_id(id) {
        Ok(())
    } else {
        Err("must be 1-32 of a-z, 0-9, '-' and '_', starting with a letter or digit".into())
    }
}

/// The 1-based line of the first occurrence of `needle`.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    let at = text.find(needle)?;
    Some(text[..at].matches('\n').count() + 1)
}

/// serde_json's message without its trailing " at line L column C".
fn strip_position(message: &str) -> &str {
    message
        .rfind(" at line ")
        .map_or(message, |at| &message[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repository with one commit, for resolving `base`.
    pub(super) fn repo() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let sig = git2::Signature::now("t", "t@example.invalid").unwrap();
        let tree = repo.treebuilder(None).unwrap().write().unwrap();
        let tree = repo.find_tree(tree).unwrap();
        repo.commit(Some("HEAD"), &sig, &sig, "first", &tree, &[])
            .unwrap();
        drop(tree);
        (dir, repo)
    }

    fn parse(text: &str) -> Result<Plan> {
        let (_dir, repo) = repo();
        Plan::parse(
            text,
            Format::Json,
            "plan.json",
            &RunId::stored("r1".into()),
            &repo,
        )
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Err(Error::BadInput(message)) => message,
            other => panic!("expected bad input, got {other:?}"),
        }
    }

    #[test]
    fn a_plan_resolves_defaults_and_waves() {
        let plan = parse(
            r#"{"name": "demo", "integration": "merged", "tasks": [
                {"id": "a", "command": "echo a"},
                {"id": "b", "command": ["echo", "b"], "depends_on": ["a"], "timeout": "2s"},
                {"id": "c", "command": "true", "depends_on": ["a"]},
                {"id": "d", "command": "true", "depends_on": ["b", "c"], "branch": "feature/d"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(plan.max_concurrent, DEFAULT_MAX_CONCURRENT);
        assert_eq!(plan.integration.as_deref(), Some("merged"));
        assert_eq!(plan.tasks[0].argv, ["sh", "-c", "echo a"]);
        assert_eq!(plan.tasks[0].branch, "app/r1/a");
        assert_eq!(plan.tasks[1].timeout, Some(Duration::from_secs(2)));
        assert_eq!(plan.tasks[3].branch, "feature/d");
        assert_eq!(plan.waves(), [vec!["a"], vec!["b", "c"], vec!["d"]]);
    }

    #[test]
    fn waves_are_linear_and_never_panic_on_a_hand_built_plan() {
        let task = |id: &str, deps: &[&str]| Task {
            id: id.into(),
            argv: vec!["true".into()],
            branch: format!("b/{id}"),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            env: BTreeMap::new(),
            timeout: None,
            retries: 0,
            locks: Vec::new(),
            reserve: Vec::new(),
            on: BTreeMap::new(),
        };
        let mut plan = Plan {
            name: "x".into(),
            run: RunId::stored("x-1".into()),
            base: String::new(),
            max_concurrent: 1,
            integration: None,
            tasks: vec![task("a", &[])],
        };
        for i in 1..10_000 {
            let previous = plan.tasks[i - 1].id.clone();
            plan.tasks.push(task(&format!("t{i}"), &[&previous]));
        }
        let waves = plan.waves();
        assert_eq!(waves.len(), 10_000);
        assert_eq!(waves[9_999], ["t9999"]);
        // Not something parse lets through: a cycle and an unknown dependency.
        plan.tasks = vec![
            task("a", &["b"]),
            task("b", &["a"]),
            task("c", &["nobody"]),
            task("d", &["c"]),
        ];
        assert_eq!(plan.waves(), [vec!["c"], vec!["d"], vec!["a", "b"]]);
    }

    fn parse_toml(text: &str) -> Result<Plan> {
        let (_dir, repo) = repo();
        Plan::parse(
            text,
            Format::Toml,
            "plan.toml",
            &RunId::stored("r1".into()),
            &repo,
        )
    }

    #[test]
    fn a_byte_order_mark_is_skipped_in_both_formats() {
        let json = "\u{feff}{\"name\": \"x\", \"tasks\": [{\"id\": \"a\", \"command\": \"true\"}]}";
        assert_eq!(parse(json).unwrap().name, "x");
        assert_eq!(name_in(json, Format::Json).as_deref(), Some("x"));
        let toml = "\u{feff}name = \"x\"\n[[tasks]]\nid = \"a\"\ncommand = \"true\"\n";
        assert_eq!(parse_toml(toml).unwrap().name, "x");
        assert_eq!(name_in(toml, Format::Toml).as_deref(), Some("x"));
    }

    #[test]
    fn a_toml_plan_is_the_same_plan_as_its_json() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let (_tmp, repo) = repo();
        let load = |name: &str| {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).unwrap();
            let format = Format::of(&path);
            assert_eq!(name_in(&text, format).as_deref(), Some("hello"));
            Plan::parse(&text, format, name, &RunId::stored("r1".into()), &repo).unwrap()
        };
        assert_eq!(load("hello-plan.toml"), load("hello-plan.json"));
        assert_eq!(Format::of(Path::new("p.TOML")), Format::Toml);
        assert_eq!(Format::of(Path::new("p")), Format::Json);
    }

    #[test]
    fn a_bad_toml_plan_is_refused_with_its_place() {
        for (text, want) in [
            (
                "name = \"x\"\n\n[[tasks]]\nid = \"a\"\ncommand = \"true\"\nbogus = 1\n",
                "plan.toml:6:1: unknown field `bogus`",
            ),
            (
                "name = \"x\"\n[[tasks]]\nid = \"a\"\ncommand = [\"true\"\n",
                "plan.toml:4:",
            ),
            (
                "name = \"x\"\nmax_concurrent = 0\n[[tasks]]\nid = \"a\"\ncommand = \"true\"\n",
                "plan.toml:2: max_concurrent must be at least 1",
            ),
            (
                "name = \"x\"\n[[tasks]]\nid = 'a'\ncommand = \"true\"\ndepends_on = [\"z\"]\n",
                "plan.toml:3: task \"a\" depends on \"z\"",
            ),
        ] {
            let message = match parse_toml(text) {
                Err(Error::BadInput(message)) => message,
                other => panic!("expected bad input, got {other:?}"),
            };
            assert!(
                message.contains(want),
                "{text}\n  gave: {message}\n  want: {want}"
            );
        }
    }

    #[test]
    fn a_task_whose_command_and_env_exceed_what_exec_takes_is_refused() {
        let arg = "x".repeat(120 * 1024);
        let argv: Vec<&str> = std::iter::repeat_n(arg.as_str(), 9).collect();
        let plan = serde_json::json!({"name": "x", "tasks": [{"id": "a", "command": argv}]});
        let message = error(&plan.to_string());
        assert!(message.contains("take 1105929 bytes together"), "{message}");
        let fits: Vec<&str> = std::iter::repeat_n(arg.as_str(), 8).collect();
        let plan = serde_json::json!({"name": "x", "tasks": [{"id": "a", "command": fits}]});
        parse(&plan.to_string()).unwrap();
    }

    #[test]
    fn every_kind_of_bad_plan_is_refused_with_its_place() {
        let cycle = error(
            "{\"name\": \"x\", \"tasks\": [\n {\"id\": \"a\", \"command\": \"true\", \"depends_on\": [\"c\"]},\n {\"id\": \"b\", \"command\": \"true\", \"depends_on\": [\"a\"]},\n {\"id\": \"c\", \"command\": \"true\", \"depends_on\": [\"b\"]}\n]}",
        );
        assert!(cycle.contains("a -> c -> b -> a"), "{cycle}");
        assert!(cycle.starts_with("plan.json:2:"), "{cycle}");
        for (text, want) in [
            (
                r#"{"name": "x", "tasks": [{"id": "a", "command": "true", "bogus": 1}]}"#,
                "unknown field `bogus`",
            ),
            (
                r#"{"name": "x", "tasks": [{"id": "a", "command": "true", "depends_on": ["z"]}]}"#,
                "\"z\", which is not a task",
            ),
            (
                r#"{"name": "x", "tasks": [{"id": "a", "command": "true"}, {"id": "a", "command": "true"}]}"#,
                "a second task has this id",
            ),
            (
                r#"{"name": "x", "tasks": [{"id": "a", "command": "true", "branch": "same"}, {"id": "b", "command": "true", "branch": "same"}]}"#,
                "also task \"a\"'s",
            ),
            (
                r#"{"name": "x", "tasks": [{"id": "a", "command": "true", "branch": "bad..name"}]}"#,
                "not a valid branch name",
            ),
            (
                r#"{"name": "x", "base": "no-such-ref", "tasks": [{"id": "a", "command": "true"}]}"#,
                "unknown ref",
            ),
            (
                r#"{"name": "x", "tasks": [{"id": "A!", "command": "true"}]}"#,
                "the id must be",
            ),
            (
                r#"{"name": "x", "tasks": [{"id": "a", "command": []}]}"#,
                "command is empty",
            ),
            (
                r#"{"name": "x", "tasks": [{"id": "a", "command": "true", "timeout": "soon"}]}"#,
                "invalid duration",
            ),
            (
                r#"{"name": "x", "max_concurrent": 0, "tasks": [{"id": "a", "command": "true"}]}"#,
                "at least 1",
            ),
            (r#"{"name": "x", "tasks": []}"#, "no tasks"),
            (
                r#" [{"id": "a", "command": "true"}]"#,
                "plan.json:1:2: a plan is an object with a \"tasks\" array; this file's top level is an array",
            ),
            (r#""x""#, "this file's top level is not an object"),
            ("\u{feff}{\"name\": \"x\"", "plan.json:1:"),
            (
                r#"{"name": "x", "tasks": [{"id": "a", "command": "true"}"#,
                "plan.json:1:",
            ),
            (
                r#"{"name": "x", "tasks": [{"id": "a", "command": "true", "depends_on": ["a"]}]}"#,
                "depends on itself",
            ),
        ] {
            let message = error(text);
            assert!(
                message.contains(want),
                "{text}\n  gave: {message}\n  want: {want}"
            );
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::tests::repo;
    use super::*;
    use proptest::prelude::*;

    /// A TOML basic string: every character TOML does not allow raw is escaped.
    fn toml_string(text: &str) -> String {
        let mut out = String::from("\"");
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 || c == '\u{7f}' => {
                    out.push_str(&format!("\\u{:04X}", c as u32));
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    fn toml_array(items: &[String]) -> String {
        let items: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
        format!("[{}]", items.join(", "))
    }

    /// `spec` written as TOML, the way the docs show it.
    fn to_toml(spec: &PlanSpec) -> String {
        let mut out = format!("name = {}\n", toml_string(&spec.name));
        let mut line = |key: &str, value: String| out.push_str(&format!("{key} = {value}\n"));
        if let Some(text) = &spec.description {
            line("description", toml_string(text));
        }
        if let Some(base) = &spec.base {
            line("base", toml_string(base));
        }
        if let Some(max) = spec.max_concurrent {
            line("max_concurrent", max.to_string());
        }
        match &spec.integration {
            None => {}
            Some(Integration::Flag(flag)) => line("integration", flag.to_string()),
            Some(Integration::Branch(name)) => line("integration", toml_string(name)),
        }
        if spec.tasks.is_empty() {
            line("tasks", "[]".into());
        }
        for task in &spec.tasks {
            out.push_str("\n[[tasks]]\n");
            let mut line = |key: &str, value: String| out.push_str(&format!("{key} = {value}\n"));
            line("id", toml_string(&task.id));
            if let Some(text) = &task.description {
                line("description", toml_string(text));
            }
            line(
                "command",
                match &task.command {
                    CommandSpec::Argv(argv) => toml_array(argv),
                    CommandSpec::Shell(script) => toml_string(script),
                },
            );
            if let Some(branch) = &task.branch {
                line("branch", toml_string(branch));
            }
            line("depends_on", toml_array(&task.depends_on));
            let env: Vec<String> = task
                .env
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_string(k), toml_string(v)))
                .collect();
            line("env", format!("{{ {} }}", env.join(", ")));
            if let Some(timeout) = &task.timeout {
                line("timeout", toml_string(timeout));
            }
            line("retries", task.retries.to_string());
            line("locks", toml_array(&task.locks));
            line("reserve", toml_array(&task.reserve));
        }
        out
    }

    /// Text that is sometimes a valid value and often not.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9][a-z0-9_-]{0,6}",
            "[ -~]{0,12}",
            any::<String>(),
            Just("x\0y".to_string()),
        ]
    }

    /// Any plan the format can express, valid or not.
    fn any_spec() -> impl Strategy<Value = PlanSpec> {
        let task = (
            (text(), proptest::option::of(text())),
            prop_oneof![
                proptest::collection::vec(text(), 0..4).prop_map(CommandSpec::Argv),
                text().prop_map(CommandSpec::Shell),
            ],
            (
                proptest::option::of(text()),
                proptest::collection::vec(text(), 0..3),
                proptest::collection::btree_map(text(), text(), 0..3),
            ),
            (
                proptest::option::of(prop_oneof!["[0-9]{1,4}(ms|s|m|h|d)", text()]),
                0u32..4,
                proptest::collection::vec(text(), 0..2),
                proptest::collection::vec(text(), 0..2),
            ),
        )
            .prop_map(
                |(
                    (id, description),
                    command,
                    (branch, depends_on, env),
                    (timeout, retries, locks, reserve),
                )| {
                    TaskSpec {
                        id,
                        description,
                        command,
                        branch,
                        depends_on,
                        env,
                        timeout,
                        retries,
                        locks,
                        reserve,
                        on: BTreeMap::new(),
                    }
                },
            );
        (
            (text(), proptest::option::of(text())),
            proptest::option::of(prop_oneof![Just("HEAD".to_string()), text()]),
            proptest::option::of(0usize..6),
            proptest::option::of(prop_oneof![
                any::<bool>().prop_map(Integration::Flag),
                text().prop_map(Integration::Branch),
            ]),
            proptest::collection::vec(task, 0..6),
        )
            .prop_map(
                |((name, description), base, max_concurrent, integration, tasks)| PlanSpec {
                    name,
                    description,
                    base,
                    max_concurrent,
                    integration,
                    tasks,
                },
            )
    }

    /// A valid plan: tasks `t0`..`tN`, each depending only on earlier ones.
    fn dag_spec() -> impl Strategy<Value = PlanSpec> {
        proptest::collection::vec(
            (
                proptest::collection::vec(any::<proptest::sample::Index>(), 0..3),
                "[!-~][ -~]{0,15}",
                proptest::collection::btree_map("[A-Z][A-Z0-9_]{0,5}", "[ -~]{0,8}", 0..3),
                proptest::option::of("[1-9][0-9]{0,2}(ms|s|m|h)"),
            ),
            1..12,
        )
        .prop_map(|tasks| PlanSpec {
            name: "dag".into(),
            description: None,
            base: None,
            max_concurrent: Some(2),
            integration: Some(Integration::Flag(true)),
            tasks: tasks
                .into_iter()
                .enumerate()
                .map(|(i, (deps, script, env, timeout))| {
                    let mut depends_on: Vec<String> = if i == 0 {
                        Vec::new()
                    } else {
                        deps.iter().map(|d| format!("t{}", d.index(i))).collect()
                    };
                    depends_on.dedup();
                    TaskSpec {
                        id: format!("t{i}"),
                        description: None,
                        command: CommandSpec::Shell(script),
                        branch: None,
                        depends_on,
                        env,
                        timeout,
                        retries: 0,
                        locks: Vec::new(),
                        reserve: Vec::new(),
                        on: BTreeMap::new(),
                    }
                })
                .collect(),
        })
    }

    #[test]
    fn any_text_parses_or_is_refused_without_a_panic() {
        let (_dir, repo) = repo();
        proptest!(ProptestConfig::with_cases(256), |(text in prop_oneof![
            any::<String>(),
            "[\\[\\]{}\",:= a-z0-9\\n\u{feff}]{0,80}",
        ])| {
            for format in [Format::Json, Format::Toml] {
                let _ = name_in(&text, format);
                let _ = Plan::parse(&text, format, "p", &RunId::stored("r1".into()), &repo);
            }
        });
    }

    #[test]
    fn any_plan_round_trips_through_both_formats_and_validates_without_a_panic() {
        let (_dir, repo) = repo();
        proptest!(ProptestConfig::with_cases(256), |(spec in any_spec())| {
            let json = serde_json::to_string_pretty(&spec).unwrap();
            prop_assert_eq!(&Format::Json.read(&json, "p.json").unwrap(), &spec);
            let toml = to_toml(&spec);
            let read = Format::Toml.read(&toml, "p.toml");
            prop_assert!(read.is_ok(), "{}\n{:?}", toml, read);
            prop_assert_eq!(&read.unwrap(), &spec);
            let from_json = Plan::parse(&json, Format::Json, "p.json", &RunId::stored("r1".into()), &repo);
            let from_toml = Plan::parse(&toml, Format::Toml, "p.toml", &RunId::stored("r1".into()), &repo);
            // Both formats agree on whether the plan is valid, and on the plan.
            match (from_json, from_toml) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(Error::BadInput(_)), Err(Error::BadInput(_))) => {}
                (a, b) => prop_assert!(false, "json: {:?}\ntoml: {:?}", a, b),
            }
        });
    }

    #[test]
    fn a_valid_plan_is_accepted_and_its_waves_respect_every_dependency() {
        let (_dir, repo) = repo();
        proptest!(ProptestConfig::with_cases(256), |(spec in dag_spec())| {
            let json = serde_json::to_string(&spec).unwrap();
            let plan = Plan::parse(&json, Format::Json, "p.json", &RunId::stored("r1".into()), &repo);
            prop_assert!(plan.is_ok(), "{}: {:?}", json, plan);
            let plan = plan.unwrap();
            let waves = plan.waves();
            let wave_of: HashMap<&str, usize> = waves
                .iter()
                .enumerate()
                .flat_map(|(n, wave)| wave.iter().map(move |id| (id.as_str(), n)))
                .collect();
            prop_assert_eq!(wave_of.len(), plan.tasks.len(), "every task in one wave");
            for task in &plan.tasks {
                let here = wave_of[task.id.as_str()];
                for dep in &task.depends_on {
                    prop_assert!(wave_of[dep.as_str()] < here, "{} before {}", dep, task.id);
                }
                // And no later than it must be: right after its last dependency.
                let want = task
                    .depends_on
                    .iter()
                    .map(|dep| wave_of[dep.as_str()] + 1)
                    .max()
                    .unwrap_or(0);
                prop_assert_eq!(here, want, "{}", task.id);
            }
            // The first and the last task depending on each other is a cycle (a task depending
            // on itself, when there is one), which is refused.
            let mut cyclic = spec.clone();
            let last = cyclic.tasks.len() - 1;
            cyclic.tasks[0].depends_on.push(format!("t{last}"));
            cyclic.tasks[last].depends_on.push("t0".into());
            let refused = Plan::parse(&serde_json::to_string(&cyclic).unwrap(), Format::Json, "p.json", &RunId::stored("r1".into()), &repo);
            prop_assert!(
                matches!(&refused, Err(Error::BadInput(m)) if m.contains("cycle") || m.contains("depends on itself")),
                "{:?}",
                refused
            );
        });
    }
}
