//! Verification. Quick: every object is present with its recorded size and stored SHA-256,
//! and the stored manifest matches the registry. Deep: additionally decrypts and decodes each
//! object, checks the plain SHA-256, and walks every tar entry against the index.

use std::io::{BufRead, Read};
use std::sync::Arc;

use serde::Serialize;

use crate::cancel::Cancel;
use crate::crypto::Identities;
use crate::format::index::{EntryType, IndexEntry, RawPath};
use crate::format::{Manifest, ObjectKey, ObjectName};
use crate::pipeline::{Decoder, Hasher};
use crate::registry::{BackupRecord, Verification};
use crate::repo::Repo;
use crate::restore::open_object;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub backup_id: String,
    pub deep: bool,
    pub ok: bool,
    pub objects: u32,
    pub bytes_read: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries_checked: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<&'static str>,
}

/// Verifies one backup and records the outcome in the registry.
pub async fn verify(
    repo: &Repo,
    record: &BackupRecord,
    identities: Option<Arc<Identities>>,
    cancel: &Cancel,
) -> Result<VerifyReport> {
    let deep = identities.is_some();
    let outcome = check(repo, record, identities, cancel).await;
    let (ok, detail) = match &outcome {
        Ok(r) => (
            true,
            format!("{} objects, {} bytes read", r.objects, r.bytes_read),
        ),
        Err(e) => (false, e.message().to_owned()),
    };
    if !matches!(&outcome, Err(e) if e.kind() == crate::ErrorKind::Cancelled) {
        let v = Verification {
            at: chrono::Utc::now(),
            deep,
            ok,
            detail,
        };
        repo.registry
            .set_verification(&record.backup_id, &v)
            .await?;
    }
    outcome
}

async fn check(
    repo: &Repo,
    record: &BackupRecord,
    identities: Option<Arc<Identities>>,
    cancel: &Cancel,
) -> Result<VerifyReport> {
    let id = &record.backup_id;
    let manifest = record.manifest()?;
    let key_of =
        |name: &ObjectName| ObjectKey::object(&manifest.environment, &manifest.policy, id, name);

    // The stored manifest must exist and say exactly what the registry says.
    let manifest_key = key_of(&ObjectName::Manifest);
    let stored = repo
        .store
        .get_bytes(&manifest_key, 16 << 20)
        .await
        .map_err(|e| missing(e, id, &manifest_key))?;
    let stored = Manifest::from_json(&stored)
        .map_err(|e| e.context(format!("backup {id}: {manifest_key}")))?;
    if &stored != manifest {
        return Err(Error::integrity(format!(
            "backup {id}: {manifest_key} differs from the registry record"
        )));
    }

    let mut report = VerifyReport {
        backup_id: id.to_string(),
        deep: identities.is_some(),
        ok: true,
        objects: 0,
        bytes_read: 0,
        entries_checked: None,
        error: None,
        error_kind: None,
    };
    for object in &manifest.objects {
        cancel.check()?;
        let key = key_of(&object.object_name()?);
        let what = format!("backup {id} object {key}");
        match repo.store.head(&key).await? {
            None => return Err(Error::integrity(format!("{what} is missing"))),
            Some(meta) if meta.size != object.stored_size => {
                return Err(Error::integrity(format!(
                    "{what} has {} bytes, the manifest says {}",
                    meta.size, object.stored_size
                )))
            }
            Some(_) => {}
        }
        if identities.is_none() {
            let mut stream = open_object(&repo.store, &key, id).await?;
            let mut hasher = Hasher::default();
            while let Some(chunk) = stream.next().await {
                cancel.check()?;
                hasher.update(&chunk?);
            }
            let stored = hasher.finish();
            if stored.size != object.stored_size || stored.sha256 != object.stored_sha256 {
                return Err(Error::integrity(format!(
                    "{what}: stored SHA-256 does not match the manifest"
                )));
            }
            report.bytes_read += stored.size;
        }
        report.objects += 1;
    }
    crate::restore::postgres::verify_wal(repo, record).await?;

    if let Some(identities) = identities {
        let data = manifest.data()?.clone();
        let data_key = key_of(&data.object_name()?);
        let is_tar = data.name == "data.tar.zst.age";
        let data_stream = open_object(&repo.store, &data_key, id).await?;
        let index = match manifest.index() {
            Some(info) if is_tar => {
                let key = key_of(&info.object_name()?);
                Some((
                    open_object(&repo.store, &key, id).await?,
                    info.clone(),
                    format!("backup {id} object {key}"),
                ))
            }
            _ => None,
        };
        let recipients = manifest.encryption.recipients.clone();
        let what = format!("backup {id} object {data_key}");
        let cancel = cancel.clone();
        let (bytes, entries) =
            tokio::task::spawn_blocking(move || -> Result<(u64, Option<u64>)> {
                let mut decoder =
                    Decoder::open(data_stream, &identities, data, &recipients, what.clone())?;
                let entries = match index {
                    Some((stream, info, index_what)) => {
                        let mut index =
                            Decoder::open(stream, &identities, info, &recipients, index_what)?;
                        let n = check_tar_against_index(&mut decoder, &mut index, &what, &cancel)?;
                        index.finish()?;
                        Some(n)
                    }
                    None if is_tar => Some(check_tar_against_index(
                        &mut decoder,
                        &mut std::io::empty(),
                        &what,
                        &cancel,
                    )?),
                    None => None,
                };
                let plain = decoder.finish()?;
                Ok((plain.size, entries))
            })
            .await
            .map_err(|e| Error::failure(format!("verify thread failed: {e}")))??;
        report.bytes_read += bytes;
        report.entries_checked = entries;
    }
    Ok(report)
}

fn missing(e: Error, id: &crate::format::BackupId, key: &ObjectKey) -> Error {
    if e.kind() == crate::ErrorKind::NotFound {
        Error::integrity(format!("backup {id}: object {key} is missing"))
    } else {
        e
    }
}

/// Reads every tar entry (and its content) and compares it with the next index line. An empty
/// index reader only checks that the archive parses.
fn check_tar_against_index(
    data: &mut impl Read,
    index: &mut impl Read,
    what: &str,
    cancel: &Cancel,
) -> Result<u64> {
    let mut lines = std::io::BufReader::new(index).lines();
    let mut archive = tar::Archive::new(data);
    let mut count = 0u64;
    let mut use_index: Option<bool> = None;
    let damaged = |e| crate::pipeline::damaged(what, e);
    for entry in archive.entries().map_err(damaged)? {
        cancel.check()?;
        let mut entry = entry.map_err(damaged)?;
        let path = RawPath::from_bytes(&entry.path_bytes());
        let kind = EntryType::from_tar(entry.header().entry_type());
        let size = entry.size();
        std::io::copy(&mut entry, &mut std::io::sink()).map_err(damaged)?;
        count += 1;
        let line = match lines.next() {
            Some(line) => Some(line.map_err(damaged)?),
            None => None,
        };
        let expected = match (use_index, line) {
            (None, None) => {
                use_index = Some(false);
                None
            }
            (_, Some(line)) => {
                use_index = Some(true);
                Some(serde_json::from_str::<IndexEntry>(&line).map_err(|e| {
                    Error::integrity(format!("{what}: index line {count} is not valid: {e}"))
                })?)
            }
            (Some(true), None) => {
                return Err(Error::integrity(format!(
                    "{what}: archive has more entries than the index ({count}+)"
                )))
            }
            (Some(false), None) => None,
        };
        if let Some(exp) = expected {
            if exp.path != path || Some(exp.entry_type) != kind || exp.size != size {
                return Err(Error::integrity(format!(
                    "{what}: archive entry {count} ({:?}, {size} bytes) does not match the index ({:?}, {} bytes)",
                    String::from_utf8_lossy(&path.to_bytes()),
                    String::from_utf8_lossy(&exp.path.to_bytes()),
                    exp.size
                )));
            }
        }
    }
    if use_index == Some(true) {
        if let Some(extra) = lines.next() {
            extra.map_err(damaged)?;
            return Err(Error::integrity(format!(
                "{what}: index lists more entries than the archive ({count})"
            )));
        }
    }
    Ok(count)
}
