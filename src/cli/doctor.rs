//! `app doctor`.

use std::collections::BTreeMap;

use clap::Args;

use super::context::Context;
use super::output::{self, outln};
use crate::doctor::{self, Finding, Fixed, Options};
use crate::error::{EXIT_FAILURE, Error, Result};

/// Arguments of `app doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Reclaim what was found (work is saved first, never lost).
    #[arg(long, visible_alias = "cleanup-stale")]
    fix: bool,
    /// With --fix: discard uncommitted work and unmerged app branches instead of saving them.
    #[arg(long)]
    force: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(ctx: &Context, args: DoctorArgs) -> Result<u8> {
    if args.force && !args.fix {
        return Err(Error::bad_input(
            "--force only changes what --fix does; add --fix (and know that it discards work)",
        ));
    }
    let options = Options {
        settings: ctx.settings.clone(),
        force: args.force,
        db: ctx.db.clone(),
    };
    let repo = ctx.repo()?;
    let (fixed, diagnosis) = if args.fix {
        doctor::fix(&repo.paths, &repo.keys, &options)?
    } else {
        (
            Vec::new(),
            doctor::diagnose(&repo.paths, &repo.keys, &options)?,
        )
    };
    let left = diagnosis.findings();
    if args.json {
        output::json(&serde_json::json!({
            "findings": if args.fix { Vec::new() } else { left.clone() },
            "fixed": fixed,
            "remaining": if args.fix { left.clone() } else { Vec::new() },
            "notices": diagnosis.notices,
        }));
    } else {
        print_fixed(&fixed);
        if args.fix && !left.is_empty() {
            outln!("left after --fix:");
        }
        print_grouped(&left, !args.fix);
        for notice in &diagnosis.notices {
            outln!("note: {notice}");
        }
        if left.is_empty() && fixed.iter().any(|f| f.outcome.is_err()) {
            outln!("app doctor: some fixes failed (see FAILED above)");
        } else if left.is_empty() {
            outln!(
                "{}",
                if fixed.is_empty() {
                    "app doctor: nothing to reclaim"
                } else {
                    "app doctor: all reclaimed"
                }
            );
        } else if !args.fix {
            outln!(
                "app doctor: {} problem(s); 'app doctor --fix' reclaims the fixable ones without losing work",
                left.len()
            );
        }
    }
    let failed = fixed.iter().any(|f| f.outcome.is_err());
    Ok(if left.is_empty() && !failed {
        0
    } else {
        EXIT_FAILURE
    })
}

fn print_grouped(findings: &[Finding], with_fix: bool) {
    let mut groups: BTreeMap<&str, Vec<&Finding>> = BTreeMap::new();
    for finding in findings {
        groups.entry(finding.kind).or_default().push(finding);
    }
    for (kind, group) in groups {
        outln!("{kind} ({})", group.len());
        for finding in group {
            outln!("  {}: {}", finding.subject, finding.problem);
            if with_fix || !finding.fixable {
                outln!("    fix: {}", finding.fix);
            }
        }
    }
}

fn print_fixed(fixed: &[Fixed]) {
    for entry in fixed {
        match &entry.outcome {
            Ok(done) => outln!(
                "fixed {} {}: {done}",
                entry.finding.kind,
                entry.finding.subject
            ),
            Err(err) => outln!(
                "FAILED {} {}: {err}",
                entry.finding.kind,
                entry.finding.subject
            ),
        }
    }
}
