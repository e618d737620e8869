//! `drctl show`: one backup's record and manifest.

use super::{human_bytes, short_time, Ctx};
use crate::format::BackupId;
use crate::{Error, Result};

/// Show one backup: status, manifest, checksums, locations, last verification.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup ID (YYYYMMDDTHHMMSSZ-xxxxxxxx).
    pub id: String,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<()> {
    let id = BackupId::parse(&args.id)?;
    let repo = ctx.repo().await?;
    let r = repo.registry.get(&id).await?.ok_or_else(|| {
        Error::not_found(format!("backup {id} not found in the registry"))
            .hint("`drctl list` shows what exists")
    })?;
    ctx.emit("backup", &r, || {
        let mut t = format!(
            "backup      {}\nenvironment {}\npolicy      {}\nstatus      {}\ntype        {}\nsource      {}\nstarted     {}\n",
            r.backup_id,
            r.environment,
            r.policy,
            r.status.as_str(),
            r.backup_type.as_str(),
            r.source_kind,
            short_time(&r.started_at)
        );
        if let Some(f) = &r.finished_at {
            t.push_str(&format!("finished    {}\n", short_time(f)));
        }
        if let Some(e) = &r.error {
            t.push_str(&format!("error       {e}\n"));
        }
        if let Some(m) = &r.manifest {
            t.push_str(&format!("recipients  {}\n", m.encryption.recipients.join(", ")));
            for o in &m.objects {
                t.push_str(&format!(
                    "object      {} ({} plain, {} stored)\n  plain sha256  {}\n  stored sha256 {}\n",
                    o.name,
                    human_bytes(o.plain_size),
                    human_bytes(o.stored_size),
                    o.plain_sha256,
                    o.stored_sha256
                ));
            }
            if !m.source.stats.is_empty() {
                let stats: Vec<String> = m.source.stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
                t.push_str(&format!("stats       {}\n", stats.join(" ")));
            }
        }
        for l in &r.locations {
            t.push_str(&format!("location    {} {}{}\n", l.region, l.store, l.prefix));
        }
        if let Some(v) = &r.last_verification {
            t.push_str(&format!(
                "verified    {} {} ({}) {}\n",
                if v.ok { "ok" } else { "FAILED" },
                short_time(&v.at),
                if v.deep { "deep" } else { "quick" },
                v.detail
            ));
        }
        t.trim_end().to_owned()
    });
    Ok(())
}
