//! `app notes add | search | list`, and the short forms `app remember` / `app recall`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::context::Context;
use super::output::{self, outln};
use crate::db::notes::{self, Note};
use crate::error::Result;
use crate::ids::Namespace;
use crate::paths::AppPaths;

/// Subcommands of `app notes`.
#[derive(Debug, Subcommand)]
pub enum NotesCommand {
    /// Add a note to a namespace.
    Add(AddArgs),
    /// Find the notes of a namespace that contain every word of a query, best first.
    Search(SearchArgs),
    /// The newest notes of a namespace, newest first.
    List(ListArgs),
}

/// Arguments of `app notes add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Namespace, e.g. project:myapp or global.
    #[arg(short, long, value_name = "NS")]
    namespace: String,
    /// The note's text.
    #[arg(value_name = "TEXT")]
    text: String,
    /// Print the stored note as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `app remember`.
#[derive(Debug, Args)]
pub struct RememberArgs {
    /// Namespace, e.g. project:myapp or global.
    #[arg(short, long, value_name = "NS")]
    namespace: String,
    /// The note's text.
    #[arg(short, long, value_name = "TEXT")]
    content: String,
    /// Print the stored note as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `app notes search` and `app recall`.
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Namespace to search.
    #[arg(short, long, value_name = "NS")]
    namespace: String,
    /// Words to look for (every one must occur).
    #[arg(value_name = "QUERY", required = true, num_args = 1..)]
    query: Vec<String>,
    /// Most notes to show.
    #[arg(long, default_value_t = 10)]
    limit: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `app notes list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Namespace to list.
    #[arg(short, long, value_name = "NS")]
    namespace: String,
    /// Most notes to show.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(ctx: &Context, command: NotesCommand) -> Result<u8> {
    match command {
        NotesCommand::Add(args) => add(ctx, &args.namespace, &args.text, args.json),
        NotesCommand::Search(args) => search(ctx, args),
        NotesCommand::List(args) => {
            let namespace = Namespace::parse(&args.namespace)?;
            notes::validate_limit(args.limit)?;
            let found = ctx.with_db(async |db| notes::list(db, &namespace, args.limit).await)?;
            print_notes(&found, args.json);
            Ok(0)
        }
    }
}

pub(super) fn remember(ctx: &Context, args: RememberArgs) -> Result<u8> {
    add(ctx, &args.namespace, &args.content, args.json)
}

pub(super) fn search(ctx: &Context, args: SearchArgs) -> Result<u8> {
    let query = args.query.join(" ");
    let namespace = Namespace::parse(&args.namespace)?;
    notes::validate_limit(args.limit)?;
    notes::fts_query(&query)?;
    let found = ctx.with_db(async |db| notes::search(db, &namespace, &query, args.limit).await)?;
    print_notes(&found, args.json);
    // Like grep: nothing found is exit 1.
    Ok(if found.is_empty() { 1 } else { 0 })
}

fn add(ctx: &Context, namespace: &str, text: &str, json: bool) -> Result<u8> {
    let namespace = Namespace::parse(namespace)?;
    notes::validate_content(text)?;
    let author = ctx
        .settings
        .caller
        .instance_id
        .clone()
        .filter(|id| !id.is_empty());
    let repo_root = repo_root();
    let note = ctx.with_db(async |db| {
        notes::add(
            db,
            &namespace,
            text,
            author.as_deref(),
            repo_root.as_deref(),
        )
        .await
    })?;
    if json {
        output::json(&note);
    } else {
        outln!("note {} added to {}", note.id, note.namespace);
    }
    Ok(0)
}

/// The repository the current directory is in, when it is in one.
fn repo_root() -> Option<PathBuf> {
    let cwd = super::current_dir().ok()?;
    AppPaths::discover(&cwd)
        .ok()
        .map(|paths| paths.repo_root().to_path_buf())
}

fn print_notes(found: &[Note], json: bool) {
    if json {
        output::json(&found);
        return;
    }
    for note in found {
        let author = note.author.as_deref().unwrap_or("-");
        outln!(
            "#{} {} {author}: {}",
            note.id,
            note.created_at,
            note.content
        );
    }
}
