//! `drctl gc`: remove what failed or crashed runs left behind.

use super::{human_bytes, Ctx};
use crate::gc::GcPlan;
use crate::Result;

/// Find and remove garbage: objects no completed backup owns, records of failed or abandoned
/// (crashed) runs, and interrupted writes.
///
/// Completed backups are never touched. A run in progress (its set's lease is held by a live
/// process) is left alone. Use --dry-run to see the plan first.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print what would be removed and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Confirm removal in a production environment.
    #[arg(long)]
    pub confirm: bool,
}

fn describe(plan: &GcPlan, verb: &str) -> String {
    if plan.is_empty() {
        return "nothing to collect".into();
    }
    let mut t = String::new();
    for item in &plan.items {
        t.push_str(&format!(
            "{verb} {} ({}, {}): {} object(s), {}{}\n",
            item.backup_id,
            item.policy,
            item.reason.as_str(),
            item.objects.len(),
            human_bytes(item.bytes),
            if item.record { ", registry record" } else { "" }
        ));
        for o in &item.objects {
            t.push_str(&format!("    {o}\n"));
        }
    }
    for l in &plan.leftovers {
        t.push_str(&format!("{verb} interrupted write {l}\n"));
    }
    for s in &plan.busy_sets {
        t.push_str(&format!("skipped {s}: a run holds its lease\n"));
    }
    t.trim_end().to_owned()
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<()> {
    let repo = ctx.repo().await?;
    let plan = crate::gc::plan(&repo).await?;
    if args.dry_run {
        ctx.emit("gc_plan", &plan, || describe(&plan, "would remove"));
        return Ok(());
    }
    ctx.require_confirm(&repo.settings, args.confirm, "gc")?;
    let done = crate::gc::apply(&repo, plan, &ctx.cancel).await?;
    ctx.emit("gc", &done, || describe(&done, "removed"));
    Ok(())
}
