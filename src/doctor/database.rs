//! The database as doctor sees it: whether it passes its quick check, whether its schema is
//! one this app knows, and whether every live instance is mirrored in it. A database that does
//! not exist yet is only noticed.

use std::path::Path;
use std::time::Duration;

use super::problem::Problem;
use super::{Diagnosis, Options};
use crate::db::{self, Db, DbSettings, Location, instances};
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
    let stale_after = options.timing.stale_after;
    let checked = db::runtime().and_then(|runtime| {
        runtime.block_on(check(&location, paths.repo_root(), snapshot, stale_after))
    });
    match checked {
        Ok(problems) => found.problems.extend(problems),
        Err(err) => found.problems.push(Problem::Database {
            reason: format!("cannot check the database: {err}"),
        }),
    }
}

/// Opens the database at `location` and checks it: its integrity, its schema version, and a
/// row for every live instance of repository `repo_root`.
async fn check(
    location: &Location,
    repo_root: &Path,
    snapshot: &Snapshot,
    stale_after: Duration,
) -> Result<Vec<Problem>> {
    let db = Db::open(location.clone(), DbSettings::from_env()?).await?;
    let mut problems = Vec::new();
    let check = db.check(false).await?;
    if check != "ok" {
        problems.push(Problem::Database {
            reason: format!("quick_check of {location}: {check}"),
        });
    }
    let version = db::schema::version(&db).await?;
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
            && instances::history(&db, repo_root, &record.id)
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
