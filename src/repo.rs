//! The backends a command works with, opened from the settings.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Settings;
use crate::registry::Registry;
use crate::store::ObjectStore;
use crate::Result;

pub struct Repo {
    pub settings: Settings,
    pub store: Arc<dyn ObjectStore>,
    pub registry: Arc<dyn Registry>,
    /// The region of drctl.yaml's `regions:` this was opened for; `None` for the primary.
    pub region: Option<String>,
}

impl Repo {
    /// Opens the store and registry without checking that they exist (for `drctl init`).
    pub async fn connect(settings: Settings) -> Result<Repo> {
        let store = crate::store::open(&settings.repository).await?;
        let registry = crate::registry::open(&settings.registry).await?;
        Ok(Repo {
            settings,
            store,
            registry,
            region: None,
        })
    }

    /// Opens the store and registry that drctl.yaml names for `region` (`regions:`), and
    /// nothing else: for restores while the primary region is unavailable.
    /// KMS too: multi-region keys are decrypted through their replica in `region`.
    pub async fn open_region(mut settings: Settings, region: &str) -> Result<Repo> {
        if let Some(kms) = &mut settings.kms {
            kms.region = Some(region.to_owned());
        }
        let Some(r) = settings.regions.get(region).cloned() else {
            return Err(crate::Error::invalid(format!(
                "{} has no region {region:?} (known: {})",
                settings.file.display(),
                settings
                    .regions
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .hint(format!(
                "add regions: {{{region}: {{registry: URL, repository: URL}}}} to drctl.yaml"
            )));
        };
        let repo = Repo {
            store: crate::store::open(&r.repository).await?,
            registry: crate::registry::open(&r.registry).await?,
            settings,
            region: Some(region.to_owned()),
        };
        repo.store.check().await?;
        repo.registry.check().await?;
        Ok(repo)
    }

    /// Opens the store and registry, failing with `NotFound` unless both were initialised.
    pub async fn open(settings: Settings) -> Result<Repo> {
        let repo = Self::connect(settings).await?;
        repo.store.check().await?;
        repo.registry.check().await?;
        Ok(repo)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.settings.lease_ttl_seconds)
    }

    /// The lease that serialises work on one backup set.
    pub fn set_lease_name(&self, policy: &crate::format::Name) -> String {
        format!("set/{}/{}", self.settings.environment, policy)
    }

    /// The lease `drctl wal push` holds for a policy's WAL archive. WAL is archived while a
    /// base backup holds the set's lease (pg_basebackup waits for it), so pushes serialise
    /// on a lease of their own.
    pub fn wal_lease_name(&self, policy: &crate::format::Name) -> String {
        format!("wal/{}/{}", self.settings.environment, policy)
    }
}
