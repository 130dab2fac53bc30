//! `app reserve`, `app reservations`, `app release`, `app check-paths`, `app hooks install`.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::context::{Context, RepoContext};
use super::output::{self, outln};
use crate::error::{EXIT_FAILURE, Error, GitContext, Result};
use crate::glob::Glob;
use crate::paths;
use crate::registry::Snapshot;
use crate::reserve::ReservationStore;
use crate::state;

/// Arguments of `app reserve`.
#[derive(Debug, Args)]
pub struct ReserveArgs {
    /// Paths or globs relative to the repository root (`src/db/**`, `Cargo.lock`, `docs/`).
    #[arg(value_name = "GLOB", required = true)]
    patterns: Vec<String>,
    /// Shared: other shared reservations may overlap; exclusive ones may not.
    #[arg(long)]
    shared: bool,
    /// Let the reservation run out by itself after DUR (at most 365d).
    #[arg(long, value_name = "DUR", value_parser = super::instance::parse_ttl)]
    ttl: Option<Duration>,
    /// Why, for the others.
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    /// Reserve in the fleet's database, seen by every host (needs APP_DB_URL).
    #[arg(long)]
    fleet: bool,
}

/// Subcommands of `app hooks`.
#[derive(Debug, Subcommand)]
pub enum HooksCommand {
    /// Install a pre-commit hook that refuses commits touching files another live instance
    /// reserved exclusively. Never overwrites a hook of your own.
    Install,
}

/// What the reservation commands work with.
struct Reserving<'a> {
    repo: RepoContext<'a>,
    snapshot: Snapshot,
    reservations: Box<dyn ReservationStore>,
    /// Whether `reservations` are the fleet's.
    fleet: bool,
}

impl Reserving<'_> {
    /// Who calls: an instance or a process, named by this host's fleet name in the fleet.
    fn caller(&self) -> Result<crate::lock::Holder> {
        let mut holder = self.repo.caller_holder(&self.snapshot)?;
        if self.fleet {
            holder.host = self.repo.settings.fleet_host.clone();
        }
        Ok(holder)
    }
}

/// The reservations of this repository, or with `fleet` the fleet's (bad input without a
/// server database).
fn reserving(ctx: &Context, fleet: bool) -> Result<Reserving<'_>> {
    let repo = ctx.repo()?;
    let in_fleet = fleet;
    let fleet = fleet.then(|| ctx.fleet()).transpose()?;
    let snapshot = repo.snapshot()?;
    let reservations = repo.coordination_in(fleet).reservations()?;
    Ok(Reserving {
        repo,
        snapshot,
        reservations,
        fleet: in_fleet,
    })
}

pub(super) fn reserve(ctx: &Context, args: ReserveArgs) -> Result<u8> {
    let globs = args
        .patterns
        .iter()
        .map(|p| Glob::parse(p))
        .collect::<Result<Vec<_>>>()?;
    let here = reserving(ctx, args.fleet)?;
    let holder = here.caller()?;
    let reservation =
        here.reservations
            .reserve(&holder, &globs, args.shared, args.ttl, args.reason)?;
    eprintln!(
        "app: reserved {} ({}) for {holder}",
        reservation.patterns.join(" "),
        if reservation.shared {
            "shared"
        } else {
            "exclusive"
        }
    );
    outln!("{}", reservation.id);
    Ok(0)
}

pub(super) fn list(ctx: &Context, json: bool, fleet: bool) -> Result<u8> {
    let here = reserving(ctx, fleet)?;
    let all = here.reservations.list()?;
    if json {
        let values: Vec<serde_json::Value> = all
            .iter()
            .map(|entry| match entry {
                Ok((r, lapsed)) => {
                    let mut value = serde_json::to_value(r).expect("reservations serialize");
                    value["lapsed"] = serde_json::json!(lapsed);
                    value
                }
                Err((id, reason)) => serde_json::json!({"id": id, "forged": reason}),
            })
            .collect();
        output::json(&values);
        return Ok(0);
    }
    for entry in all {
        match entry {
            Ok((r, lapsed)) => outln!(
                "{} {} {} by {} since {}{}{}",
                r.id,
                if r.shared { "shared" } else { "exclusive" },
                r.patterns.join(" "),
                r.holder,
                r.created_at,
                r.reason.map_or_else(String::new, |why| format!(" ({why})")),
                lapsed.map_or_else(String::new, |why| format!(" [lapsed: {why}]"))
            ),
            Err((id, reason)) => outln!("{id} forged ({reason})"),
        }
    }
    Ok(0)
}

pub(super) fn release(ctx: &Context, patterns: Vec<String>, fleet: bool) -> Result<u8> {
    let here = reserving(ctx, fleet)?;
    let holder = here.caller()?;
    let released = here.reservations.release(&holder, &patterns)?;
    eprintln!("app: released {released} reserved pattern(s)");
    Ok(0)
}

pub(super) fn check_paths(ctx: &Context, files: Vec<String>) -> Result<u8> {
    let here = reserving(ctx, false)?;
    let me = here.repo.caller_holder(&here.snapshot)?;
    // Paths are relative to the worktree the caller is in: its instance's, or the main one.
    let root = here
        .repo
        .caller(&here.snapshot)
        .and_then(|record| record.worktree)
        .unwrap_or_else(|| here.repo.paths.repo_root().to_path_buf());
    let relative = files
        .iter()
        .map(|file| paths::relative_to(&root, &here.repo.cwd, file))
        .collect::<Result<Vec<_>>>()?;
    let mut conflicts = here.reservations.conflicts(Some(&me), &relative)?;
    // With a server database the fleet's reservations count too; a file costs nothing here.
    if let Some(fleet) = ctx.fleet_if_server()?
        && let Some(reservations) = here
            .repo
            .coordination()
            .in_fleet(fleet)
            .fleet_reservations()
    {
        let me = crate::lock::Holder {
            host: ctx.settings.fleet_host.clone(),
            ..me.clone()
        };
        conflicts.extend(reservations.conflicts(Some(&me), &relative)?);
    }
    for (file, r) in &conflicts {
        eprintln!(
            "app: {file} is reserved exclusively by {} since {} ({}){}",
            r.holder,
            r.created_at,
            r.patterns.join(" "),
            r.reason
                .as_ref()
                .map_or_else(String::new, |why| format!(": {why}"))
        );
    }
    Ok(if conflicts.is_empty() {
        0
    } else {
        EXIT_FAILURE
    })
}

/// The first line after the shebang marks a hook as ours.
const HOOK_MARKER: &str = "# app: pre-commit check of path reservations";

pub(super) fn hooks(ctx: &Context, command: HooksCommand) -> Result<u8> {
    let HooksCommand::Install = command;
    let paths = ctx.repo()?.paths;
    let repo = git2::Repository::open(paths.repo_root())
        .git_context(|| format!("opening {}", paths.repo_root().display()))?;
    let hooks_dir = match repo.config().and_then(|c| c.get_path("core.hooksPath")) {
        Ok(dir) if dir.is_absolute() => dir,
        Ok(dir) => paths.repo_root().join(dir),
        Err(_) => paths.git_common_dir().join("hooks"),
    };
    let hook = hooks_dir.join("pre-commit");
    if let Some(existing) = state::read_optional(&hook)?
        && !String::from_utf8_lossy(&existing).contains(HOOK_MARKER)
    {
        return Err(Error::Failed(format!(
            "{} is a hook of your own; app leaves it alone. Add this line to it instead:\n  git diff --cached --name-only -z | xargs -0 -r app check-paths --",
            hook.display()
        )));
    }
    let app = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "app".into());
    let script = format!(
        "#!/bin/sh\n{HOOK_MARKER} (installed by 'app hooks install'; delete this file to remove it)\n\
         app_bin='{}'\n\
         [ -x \"$app_bin\" ] || app_bin=app\n\
         git diff --cached --name-only -z | xargs -0 -r \"$app_bin\" check-paths --\n",
        app.replace('\'', "'\\''")
    );
    std::fs::create_dir_all(&hooks_dir).map_err(|err| Error::io("creating", &hooks_dir, err))?;
    state::write_atomic(&hook, script.as_bytes())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
        .map_err(|err| Error::io("making executable", &hook, err))?;
    eprintln!("app: installed {}", hook.display());
    Ok(0)
}
