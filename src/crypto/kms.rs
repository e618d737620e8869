//! The KMS envelope: each backup's age file key is also wrapped by AWS KMS keys, so a restore
//! can decrypt with KMS alone.
//!
//! [`KmsRecipient`] emits, next to the X25519 stanzas, one stanza per key:
//!
//! ```text
//! -> aws-kms arn:aws:kms:us-east-1:111122223333:key/mrk-1234abcd…
//! <base64 of the KMS Encrypt ciphertext of the 16-byte file key>
//! ```
//!
//! Stock `age` skips stanza types it does not know, so the X25519 and break-glass identities
//! keep working. The ciphertext is bound to the encryption context `drctl=age-file-key`, which
//! IAM policies can require. Wrapping needs only `kms:Encrypt`; [`KmsIdentity`] unwraps with
//! `kms:Decrypt`. For a multi-region key (`mrk-…`) it asks the replica in the configured
//! region first (same key ID, that region in the ARN), so a restore in the DR region never
//! needs the primary region, and falls back to the key's own region.
//!
//! age calls recipients and identities synchronously: they run on a blocking thread (the
//! pipeline's encrypt thread, or `spawn_blocking`) and await the KMS calls through the runtime
//! handle captured when [`Kms`] was made. The plaintext file key never leaves memory and is
//! never logged.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use age::secrecy::zeroize::Zeroize;
use age::secrecy::ExposeSecret;
use age_core::format::{FileKey, Stanza, FILE_KEY_BYTES};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::Client;
use serde::Deserialize;

use crate::config::settings::valid_region;
use crate::{Error, ErrorKind, Result};

/// The stanza type of a KMS-wrapped file key.
pub const STANZA_TAG: &str = "aws-kms";
const CONTEXT_KEY: &str = "drctl";
const CONTEXT_VALUE: &str = "age-file-key";

/// The `kms` section of `drctl.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KmsSettings {
    /// Keys every new backup's file key is wrapped with: key ARNs, alias ARNs, or (with
    /// `region`) `alias/NAME` and key IDs. Empty on a host that only restores.
    #[serde(default)]
    pub keys: Vec<String>,
    /// The region this host works in: keys given without an ARN are there, and multi-region
    /// keys are decrypted through their replica there first.
    pub region: Option<String>,
    /// An endpoint per region (VPC endpoints, emulators); other regions use AWS's.
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
}

impl KmsSettings {
    /// Every problem with the section, as (field below `kms`, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, key) in self.keys.iter().enumerate() {
            let field = format!("keys[{i}]");
            if key.starts_with("arn:") {
                if Arn::parse(key).is_none() {
                    out.push((
                        field,
                        format!("{key:?} is not a KMS key or alias ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)"),
                    ));
                }
            } else if key.is_empty() || key.contains(char::is_whitespace) {
                out.push((field, format!("{key:?} is not a KMS key ID or alias")));
            } else if self.region.is_none() {
                out.push((
                    field,
                    format!("{key:?} is not an ARN: set kms.region to say where the key is"),
                ));
            }
        }
        if let Some(region) = &self.region {
            if !valid_region(region) {
                out.push(("region".into(), format!("{region:?} is not an AWS region")));
            }
        }
        for (region, endpoint) in &self.endpoints {
            let field = format!("endpoints.{region}");
            if !valid_region(region) {
                out.push((field.clone(), format!("{region:?} is not an AWS region")));
            }
            match url::Url::parse(endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => out.push((field, format!("{endpoint:?} is not an http(s) URL"))),
            }
        }
        out
    }
}

/// A KMS ARN: `arn:PARTITION:kms:REGION:ACCOUNT:RESOURCE` (`key/ID` or `alias/NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Arn<'a> {
    partition: &'a str,
    region: &'a str,
    account: &'a str,
    resource: &'a str,
}

impl<'a> Arn<'a> {
    fn parse(s: &'a str) -> Option<Arn<'a>> {
        let mut parts = s.splitn(6, ':');
        let (
            Some("arn"),
            Some(partition),
            Some("kms"),
            Some(region),
            Some(account),
            Some(resource),
        ) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        )
        else {
            return None;
        };
        let ok = !partition.is_empty()
            && valid_region(region)
            && !account.is_empty()
            && account.bytes().all(|b| b.is_ascii_digit())
            && (resource
                .strip_prefix("key/")
                .is_some_and(|id| !id.is_empty())
                || resource
                    .strip_prefix("alias/")
                    .is_some_and(|n| !n.is_empty()));
        ok.then_some(Arn {
            partition,
            region,
            account,
            resource,
        })
    }

    fn is_multi_region(&self) -> bool {
        self.resource.starts_with("key/mrk-")
    }

    /// The same key in `region` (for a multi-region key: its replica there).
    fn in_region(&self, region: &str) -> String {
        format!(
            "arn:{}:kms:{region}:{}:{}",
            self.partition, self.account, self.resource
        )
    }
}

/// KMS clients per region and the runtime that drives them.
pub struct Kms {
    settings: KmsSettings,
    runtime: tokio::runtime::Handle,
    clients: Mutex<HashMap<String, Client>>,
    /// ARNs of the keys that wrapped a file key so far, as KMS reported them.
    used: Mutex<BTreeSet<String>>,
}

impl Kms {
    /// Must be called inside the runtime (it keeps a handle to it).
    pub fn new(settings: KmsSettings) -> Result<Arc<Kms>> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::failure("KMS needs the async runtime"))?;
        Ok(Arc::new(Kms {
            settings,
            runtime,
            clients: Mutex::new(HashMap::new()),
            used: Mutex::new(BTreeSet::new()),
        }))
    }

    /// age recipients for the configured keys.
    pub fn recipients(self: &Arc<Self>) -> Vec<KmsRecipient> {
        self.settings
            .keys
            .iter()
            .map(|key| KmsRecipient {
                kms: self.clone(),
                key: key.clone(),
            })
            .collect()
    }

    /// The age identity that unwraps `aws-kms` stanzas.
    pub fn identity(self: &Arc<Self>) -> KmsIdentity {
        KmsIdentity { kms: self.clone() }
    }

    /// ARNs of the keys that wrapped file keys through this instance.
    pub fn used_keys(&self) -> Vec<String> {
        self.used
            .lock()
            .expect("kms lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Where restores ask KMS, for messages.
    pub fn describe(&self) -> String {
        match &self.settings.region {
            Some(r) => format!("KMS (multi-region keys through their replica in {r} first)"),
            None => "KMS (in each key's region)".to_owned(),
        }
    }

    fn client(&self, region: &str) -> Client {
        let mut clients = self.clients.lock().expect("kms lock");
        clients
            .entry(region.to_owned())
            .or_insert_with(|| {
                let endpoint = self.settings.endpoints.get(region).map(String::as_str);
                Client::new(
                    &self
                        .runtime
                        .block_on(crate::aws::sdk_config(region, endpoint)),
                )
            })
            .clone()
    }

    /// The region a configured key is in.
    fn region_of<'a>(&'a self, key: &'a str) -> Result<&'a str> {
        match Arn::parse(key) {
            Some(arn) => Ok(arn.region),
            None => self.settings.region.as_deref().ok_or_else(|| {
                Error::invalid(format!(
                    "KMS key {key:?} is not an ARN and kms.region is not set"
                ))
            }),
        }
    }

    /// Wraps a file key with `key`; returns the key's ARN and the ciphertext.
    fn encrypt(&self, key: &str, file_key: &FileKey) -> Result<(String, Vec<u8>)> {
        let region = self.region_of(key)?;
        let client = self.client(region);
        let out = self
            .runtime
            .block_on(
                client
                    .encrypt()
                    .key_id(key)
                    .plaintext(Blob::new(file_key.expose_secret().to_vec()))
                    .encryption_context(CONTEXT_KEY, CONTEXT_VALUE)
                    .send(),
            )
            .map_err(|e| crate::aws::sdk_error(format!("KMS Encrypt with {key} in {region}"), e))?;
        let arn = out.key_id().unwrap_or(key).to_owned();
        let ciphertext = out
            .ciphertext_blob
            .map(Blob::into_inner)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                Error::failure(format!("KMS Encrypt with {key} returned no ciphertext"))
            })?;
        self.used.lock().expect("kms lock").insert(arn.clone());
        Ok((arn, ciphertext))
    }

    /// Unwraps a file key wrapped with `arn`: through the replica in the configured region
    /// first for a multi-region key, then in the key's own region.
    fn decrypt(&self, arn: &str, ciphertext: &[u8]) -> Result<FileKey> {
        let parsed = Arn::parse(arn).ok_or_else(|| {
            Error::integrity(format!(
                "the aws-kms stanza names {arn:?}, not a KMS key ARN"
            ))
        })?;
        let mut attempts = Vec::new();
        if let Some(local) = &self.settings.region {
            if parsed.is_multi_region() && local != parsed.region {
                attempts.push((local.as_str(), parsed.in_region(local)));
            }
        }
        attempts.push((parsed.region, arn.to_owned()));
        let mut failures = Vec::new();
        let mut retryable = false;
        for (region, key) in attempts {
            let client = self.client(region);
            let res = self.runtime.block_on(
                client
                    .decrypt()
                    .key_id(&key)
                    .ciphertext_blob(Blob::new(ciphertext.to_vec()))
                    .encryption_context(CONTEXT_KEY, CONTEXT_VALUE)
                    .send(),
            );
            match res {
                Ok(out) => {
                    let mut plain = out.plaintext.map(Blob::into_inner).unwrap_or_default();
                    let file_key = FileKey::try_init_with_mut(|k| {
                        if plain.len() == FILE_KEY_BYTES {
                            k.copy_from_slice(&plain);
                            Ok(())
                        } else {
                            Err(())
                        }
                    });
                    plain.zeroize();
                    return file_key.map_err(|_| {
                        Error::integrity(format!(
                            "KMS Decrypt with {key} returned a plaintext that is not an age file key"
                        ))
                    });
                }
                Err(e) => {
                    let err = crate::aws::sdk_error(format!("{key} in {region}"), e);
                    retryable |= err.is_retryable();
                    failures.push(err.message().to_owned());
                }
            }
        }
        let err = Error::new(
            if retryable {
                ErrorKind::Failure
            } else {
                ErrorKind::WrongKey
            },
            format!(
                "KMS could not unwrap the file key: {}",
                failures.join("; ")
            ),
        )
        .hint("check that this role may kms:Decrypt with the key (or its replica in kms.region), or restore with an age identity (--identity)");
        Err(if retryable { err.retryable() } else { err })
    }
}

/// Wraps the file key with one KMS key (`kms:Encrypt` only).
pub struct KmsRecipient {
    kms: Arc<Kms>,
    key: String,
}

impl age::Recipient for KmsRecipient {
    fn wrap_file_key(
        &self,
        file_key: &FileKey,
    ) -> std::result::Result<(Vec<Stanza>, HashSet<String>), age::EncryptError> {
        let (arn, body) = self
            .kms
            .encrypt(&self.key, file_key)
            .map_err(|e| age::EncryptError::Io(e.into_io()))?;
        Ok((
            vec![Stanza {
                tag: STANZA_TAG.to_owned(),
                args: vec![arn],
                body,
            }],
            HashSet::new(),
        ))
    }
}

/// Unwraps `aws-kms` stanzas with KMS Decrypt.
pub struct KmsIdentity {
    kms: Arc<Kms>,
}

impl age::Identity for KmsIdentity {
    fn unwrap_stanza(
        &self,
        stanza: &Stanza,
    ) -> Option<std::result::Result<FileKey, age::DecryptError>> {
        if stanza.tag != STANZA_TAG {
            return None;
        }
        let [arn] = stanza.args.as_slice() else {
            return Some(Err(age::DecryptError::InvalidHeader));
        };
        Some(
            self.kms
                .decrypt(arn, &stanza.body)
                .map_err(|e| age::DecryptError::Io(e.into_io())),
        )
    }

    /// Tries every KMS stanza until one unwraps; reports all failures otherwise.
    fn unwrap_stanzas(
        &self,
        stanzas: &[Stanza],
    ) -> Option<std::result::Result<FileKey, age::DecryptError>> {
        let mut last = None;
        for stanza in stanzas {
            match self.unwrap_stanza(stanza) {
                Some(Ok(key)) => return Some(Ok(key)),
                Some(Err(e)) => last = Some(Err(e)),
                None => {}
            }
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns_parse_and_move_to_another_region() {
        let arn = Arn::parse(
            "arn:aws:kms:us-east-1:111122223333:key/mrk-0123456789abcdef0123456789abcdef",
        )
        .unwrap();
        assert_eq!(arn.region, "us-east-1");
        assert!(arn.is_multi_region());
        assert_eq!(
            arn.in_region("us-west-2"),
            "arn:aws:kms:us-west-2:111122223333:key/mrk-0123456789abcdef0123456789abcdef"
        );
        let single = Arn::parse(
            "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        )
        .unwrap();
        assert!(!single.is_multi_region());
        assert!(Arn::parse("arn:aws:kms:eu-west-1:111122223333:alias/backups").is_some());
        for bad in [
            "arn:aws:s3:::bucket",
            "arn:aws:kms:us-east-1:111122223333:key/",
            "arn:aws:kms:us-east-1:acct:key/x",
            "arn:aws:kms::111122223333:key/x",
            "arn:aws:kms:us-east-1:111122223333:secret/x",
        ] {
            assert_eq!(Arn::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn settings_problems_name_each_bad_field() {
        let settings = KmsSettings {
            keys: vec![
                "arn:aws:kms:us-east-1:111122223333:key/ok".into(),
                "arn:aws:kms:us-east-1:nope".into(),
                "alias/backups".into(),
            ],
            region: None,
            endpoints: BTreeMap::from([("us-east-1".into(), "ftp://x".into())]),
        };
        let fields: Vec<String> = settings.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["keys[1]", "keys[2]", "endpoints.us-east-1"]);
        let fine = KmsSettings {
            keys: vec!["alias/backups".into()],
            region: Some("us-west-2".into()),
            endpoints: BTreeMap::from([("us-west-2".into(), "http://127.0.0.1:5000".into())]),
        };
        assert_eq!(fine.problems(), Vec::new());
    }
}
