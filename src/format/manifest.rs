//! The manifest: a plain JSON description of one backup, stored next to its data. It holds
//! enough to rebuild the registry from the bucket alone, and never secrets or file names.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{BackupId, Name, ObjectName};
use crate::{Error, Result};

/// Bumped on any incompatible change; readers refuse versions they do not know.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    Full,
    Incremental,
}

impl BackupType {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Incremental => "incremental",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub backup_id: BackupId,
    pub environment: Name,
    pub policy: Name,
    pub source: SourceInfo,
    #[serde(rename = "type")]
    pub backup_type: BackupType,
    pub parent_id: Option<BackupId>,
    pub chain_base_id: BackupId,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub point_in_time: PointInTime,
    pub objects: Vec<ObjectInfo>,
    pub encryption: EncryptionInfo,
    pub drctl_version: String,
}

/// Which source produced the backup, with a descriptor free of secrets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    pub kind: String,
    pub descriptor: serde_json::Value,
    /// Counters reported by the source (files, directories, bytes, ...).
    #[serde(default)]
    pub stats: serde_json::Map<String, serde_json::Value>,
}

/// The moment the backup represents.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointInTime {
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binlog: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectRole {
    Data,
    Index,
}

/// One stored object and the checksums of both its plain and stored bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectInfo {
    pub role: ObjectRole,
    /// The object's file name inside the backup's directory.
    pub name: String,
    pub plain_size: u64,
    pub plain_sha256: String,
    pub stored_size: u64,
    pub stored_sha256: String,
}

impl ObjectInfo {
    pub fn object_name(&self) -> Result<ObjectName> {
        ObjectName::parse(&self.name).ok_or_else(|| {
            Error::integrity(format!("manifest names an unknown object {:?}", self.name))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionInfo {
    /// age X25519 recipients (public keys) the file key was wrapped for.
    pub recipients: Vec<String>,
    /// KMS key ARNs the file key was wrapped with.
    #[serde(default)]
    pub kms_keys: Vec<String>,
}

impl Manifest {
    pub fn data(&self) -> Result<&ObjectInfo> {
        self.object(ObjectRole::Data).ok_or_else(|| {
            Error::integrity(format!(
                "manifest of {} lists no data object",
                self.backup_id
            ))
        })
    }

    pub fn index(&self) -> Option<&ObjectInfo> {
        self.object(ObjectRole::Index)
    }

    fn object(&self, role: ObjectRole) -> Option<&ObjectInfo> {
        self.objects.iter().find(|o| o.role == role)
    }

    pub fn plain_size(&self) -> u64 {
        self.objects.iter().map(|o| o.plain_size).sum()
    }

    pub fn stored_size(&self) -> u64 {
        self.objects.iter().map(|o| o.stored_size).sum()
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serialises");
        v.push(b'\n');
        v
    }

    /// Parses and checks a manifest read from the store.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| Error::integrity(format!("manifest is not valid: {e}")))?;
        if m.format_version != FORMAT_VERSION {
            return Err(Error::integrity(format!(
                "manifest format_version {} is not supported (this drctl reads {FORMAT_VERSION})",
                m.format_version
            ))
            .hint("upgrade drctl"));
        }
        Ok(m)
    }
}
