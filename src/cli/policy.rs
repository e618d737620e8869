//! `drctl policy`: check and show policies.

use super::Ctx;
use crate::config::{policy, Policy, Settings};
use crate::Result;

/// Check and show backup policies.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check the settings file and every policy; report every problem with file and field.
    Validate,
    /// Print the effective policy, with every default filled in.
    Show {
        /// Policy name.
        name: String,
    },
}

pub async fn run(ctx: &Ctx, cmd: Command) -> Result<()> {
    match cmd {
        Command::Validate => {
            let (settings, mut problems) = Settings::check(&ctx.global.config);
            let mut names = Vec::new();
            if let Some(settings) = &settings {
                let (policies, found) = policy::check_dir(settings);
                problems.extend(found);
                names = policies.iter().map(|p| p.name.to_string()).collect();
            }
            if ctx.global.json {
                ctx.emit("validate", &serde_json::json!({ "ok": problems.is_empty(), "policies": names, "problems": problems }), String::new);
            } else if problems.is_empty() {
                super::print_line(&format!(
                    "ok: {} and {} policies ({})",
                    ctx.global.config.display(),
                    names.len(),
                    names.join(", ")
                ));
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(crate::config::problems_error(&problems))
            }
        }
        Command::Show { name } => {
            let settings = ctx.settings()?;
            let policy = Policy::load(&settings, &name)?;
            if ctx.global.json {
                ctx.emit("policy", &policy, String::new);
            } else {
                let yaml = serde_yaml_ng::to_string(&policy)
                    .map_err(|e| crate::Error::failure(e.to_string()))?;
                print!("# {}\n{yaml}", policy.file.display());
            }
            Ok(())
        }
    }
}
