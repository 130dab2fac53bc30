//! The database as doctor sees it: whether it passes its quick check, whether its schema is
//! one this app knows, and whether every live instance is mirrored in it. A database that does
//! not exist yet is only noticed. A server's fleet is judged by `fleet`.

use std::path::Path;
use std::time::Duration;

use super::problem::Problem;
use super::{Diagnosis, Options, fleet};
use crate::db::{self, Blocking, Db, DbSettings, Location, instances};
use crate::error::Result;
use crate::paths::AppPaths;
use crate::registry::{Liveness, Snapshot};

/// The database's problems, or the one that it cannot be checked.
pub(super) fn problems(
    paths: &AppPaths,
    snapshot: &Snapshot,
    options: &Options,
    found: &mut Diagnosis,
) {
    let location = match Location::resolve(options.db.as_deref()) {
        Ok(location) => location,
        Err(err) => {
            found.problems.push(Problem::Database {
                reason: err.to_string(),
            });
            return;
        }
    };
    if let Location::Local(path) = &location
        && !path.exists()
    {
        found
            .notices
            .push(format!("no database at {} yet", path.display()));
        return;
    }
    let stale_after = options.settings.timing.stale_after;
    let checked =
        Blocking::open(location.clone(), DbSettings::from(&options.settings)).and_then(|db| {
            let problems =
                db.run(async |db| check(db, paths.repo_root(), snapshot, stale_after).await)?;
            Ok((db, problems))
        });
    match checked {
        Ok((db, problems)) => {
            found.problems.extend(problems);
            // Only a server holds a fleet: a local database is asked nothing more.
            if !db.is_local() {
                fleet::problems(paths, &db, options, found);
            }
        }
        Err(err) => found.problems.push(Problem::Database {
            reason: format!("cannot check the database: {err}"),
        }),
    }
}

/// Checks the database: its integrity, its schema version, and a
/// row for every live instance of repository `repo_root`.
async fn check(
    database: &Db,
    repo_root: &Path,
    snapshot: &Snapshot,
    stale_after: Duration,
) -> Result<Vec<Problem>> {
    let location = database.location();
    let mut problems = Vec::new();
    let check = database.check(false).await?;
    if check != "ok" {
        problems.push(Problem::Database {
            reason: format!("quick_check of {location}: {check}"),
        });
    }
    let version = db::schema::version(database).await?;
    if version > db::schema::LATEST {
        problems.push(Problem::Database {
            reason: format!(
                "schema version {version} is newer than this app's ({}); upgrade app",
                db::schema::LATEST
            ),
        });
    }
    for record in snapshot.valid_instances() {
        if record.liveness(stale_after) == Liveness::Live
            && instances::history(database, repo_root, &record.id)
                .await?
                .is_empty()
        {
            problems.push(Problem::Unmirrored {
                record: record.clone(),
            });
        }
    }
    Ok(problems)
}
