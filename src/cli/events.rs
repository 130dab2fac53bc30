//! `app events`.

use std::time::Duration;

use clap::Args;

use super::context::Context;
use super::output::{self, outln};
use crate::db::events::{self, Event, EventFilter};
use crate::error::Result;
use crate::paths::AppPaths;
use crate::time::{self, Timestamp};

/// How often `--follow` looks for new events.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);
/// Events read per query.
const PAGE: u32 = 1000;

/// Arguments of `app events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events of the last DUR (e.g. 10m, 2h).
    #[arg(long, value_name = "DUR", value_parser = super::instance::parse_duration)]
    since: Option<Duration>,
    /// Only events of this instance.
    #[arg(long, value_name = "ID")]
    instance: Option<String>,
    /// Events of every repository, not only the current one.
    #[arg(long)]
    everywhere: bool,
    /// Keep printing new events as they arrive.
    #[arg(long)]
    follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(ctx: &Context, args: EventsArgs) -> Result<u8> {
    let repo_root = if args.everywhere {
        None
    } else {
        let cwd = super::current_dir()?;
        AppPaths::discover(&cwd)
            .ok()
            .map(|paths| paths.repo_root().display().to_string())
    };
    let mut filter = EventFilter {
        since: args
            .since
            .map(|age| time::time_ago(age, "--since").map(Timestamp::from))
            .transpose()?,
        instance: args.instance,
        repo_root,
        after_id: 0,
    };
    ctx.with_db(async |db| {
        loop {
            let page = events::query(db, &filter, PAGE).await?;
            for event in &page {
                print_event(event, args.json);
            }
            if let Some(last) = page.last() {
                filter.after_id = last.id;
            }
            if page.len() as u32 == PAGE {
                continue;
            }
            if !args.follow {
                return Ok(0);
            }
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        }
    })
}

fn print_event(event: &Event, json: bool) {
    if json {
        output::json_line(event);
    } else {
        outln!(
            "{} {} {} {}",
            event.at,
            event.instance.as_deref().unwrap_or("-"),
            event.kind,
            event.payload
        );
    }
}
