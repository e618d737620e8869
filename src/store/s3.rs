//! An S3 bucket (or an S3-compatible store) under a key prefix as an object store.
//!
//! Writes buffer at most one part per upload slot: objects up to one part go up in a single
//! PutObject, larger ones as a multipart upload with `concurrency` parts in flight and a
//! SHA-256 checksum per part. A failed, aborted or dropped writer aborts its multipart upload,
//! so no object and (barring a crash) no upload is left behind; in-flight parts are cancelled
//! first, so nothing keeps writing after a cancelled run. Reads are ranged GETs of one part
//! size each, `concurrency` at a time, delivered in order and pinned to the object's ETag.
//!
//! Retries: every request body is an in-memory buffer, so the SDK's retry policy (throttling,
//! 5xx, dropped connections, with exponential backoff) can replay any request. A response body
//! that breaks while being read cannot be replayed by the SDK: ranged GETs retry it here.
//! Permanent errors (access denied, missing bucket) fail at once with what to check.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as Body;
use aws_sdk_s3::types::{
    BucketLocationConstraint, ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart,
    CreateBucketConfiguration, ObjectLockMode, ServerSideEncryption, StorageClass,
};
use aws_sdk_s3::Client;
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};

use super::{ByteStream, Leftover, ObjectMeta, ObjectStore, ObjectWriter, PutOptions, CHUNK_SIZE};
use crate::config::policy::LockMode;
use crate::config::S3Url;
use crate::format::ObjectKey;
use crate::{Error, Result};

/// The object that marks a prefix as a drctl repository.
const MARKER: &str = ".drctl-repository";
/// Attempts per request (the first try included), for the SDK and for ranged GET bodies.
const MAX_ATTEMPTS: u32 = 5;
/// Separates the object key from the upload ID in a leftover's description.
const UPLOAD_SEP: &str = "?uploadId=";

/// Applies the per-object options to a PutObject or CreateMultipartUpload request.
macro_rules! with_options {
    ($req:expr, $opts:expr) => {{
        let opts: &PutOptions = $opts;
        let mut req = $req.checksum_algorithm(ChecksumAlgorithm::Sha256);
        if let Some(class) = &opts.storage_class {
            req = req.storage_class(StorageClass::from(class.as_str()));
        }
        if let Some(key_id) = &opts.sse_kms_key_id {
            req = req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .ssekms_key_id(key_id);
        }
        if let Some(r) = &opts.retention {
            req = req
                .object_lock_mode(lock_mode(r.mode))
                .object_lock_retain_until_date(aws_sdk_s3::primitives::DateTime::from_secs(
                    r.retain_until.timestamp(),
                ));
        }
        req
    }};
}

#[derive(Clone)]
pub struct S3Store {
    client: Client,
    url: S3Url,
    part_size: usize,
    concurrency: usize,
}

impl S3Store {
    /// Builds a client for the URL's region (and endpoint) with credentials from the standard
    /// AWS chain. Does not contact S3.
    pub async fn open(url: &S3Url) -> Result<S3Store> {
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(url.region.clone()))
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(60))
                    .build(),
            )
            .load()
            .await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            // Checksums are computed here (SHA-256), never by the SDK.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
        if let Some(endpoint) = &url.endpoint {
            config = config.endpoint_url(endpoint).force_path_style(true);
        }
        Ok(S3Store {
            client: Client::from_conf(config.build()),
            url: url.clone(),
            part_size: url.part_size_mib as usize * (1 << 20),
            concurrency: url.concurrency as usize,
        })
    }

    /// The full S3 key of a repository-relative key.
    fn full_key(&self, rel: &str) -> String {
        full_key(&self.url, rel)
    }

    /// Copies `key` from the repository at `source` into this store, inside S3 (CopyObject),
    /// when both are reached through the same endpoint and the object is at most 5 GiB;
    /// returns false (and copies nothing) otherwise.
    pub async fn copy_within_s3(
        &self,
        source: &S3Url,
        key: &ObjectKey,
        size: u64,
        opts: &PutOptions,
    ) -> Result<bool> {
        if source.endpoint != self.url.endpoint || size > MAX_COPY_OBJECT {
            return Ok(false);
        }
        let req = self
            .client
            .copy_object()
            .copy_source(format!(
                "{}/{}",
                source.bucket,
                full_key(source, key.as_str())
            ))
            .bucket(&self.url.bucket)
            .key(self.full_key(key.as_str()));
        with_options!(req, opts)
            .send()
            .await
            .map_err(|e| self.err(format!("copy {key} from {source}"), e))?;
        Ok(true)
    }

    fn rel_key<'a>(&self, full: &'a str) -> Option<&'a str> {
        if self.url.prefix.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(&self.url.prefix)?.strip_prefix('/')
        }
    }

    fn err<E>(&self, what: impl std::fmt::Display, e: SdkError<E, HttpResponse>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        sdk_error(&self.describe(), what, e)
    }

    async fn marker_exists(&self) -> Result<bool> {
        let marker = self.full_key(MARKER);
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.url.bucket)
            .prefix(&marker)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| self.err("check the repository", e))?;
        Ok(out.contents().iter().any(|o| o.key() == Some(&marker)))
    }

    async fn list_versions(&self, full: &str) -> Result<Vec<String>> {
        let mut versions = Vec::new();
        let (mut key_marker, mut version_marker) = (None::<String>, None::<String>);
        loop {
            let out = self
                .client
                .list_object_versions()
                .bucket(&self.url.bucket)
                .prefix(full)
                .set_key_marker(key_marker.take())
                .set_version_id_marker(version_marker.take())
                .send()
                .await
                .map_err(|e| self.err(format!("list the versions of {full}"), e))?;
            let ids = out
                .versions()
                .iter()
                .filter(|v| v.key() == Some(full))
                .filter_map(|v| v.version_id())
                .chain(
                    out.delete_markers()
                        .iter()
                        .filter(|m| m.key() == Some(full))
                        .filter_map(|m| m.version_id()),
                );
            versions.extend(ids.map(str::to_owned));
            if out.is_truncated() != Some(true) {
                return Ok(versions);
            }
            key_marker = out.next_key_marker().map(str::to_owned);
            version_marker = out.next_version_id_marker().map(str::to_owned);
        }
    }
}

/// The most parts a multipart upload can have.
const MAX_PARTS: usize = 10_000;

/// The largest object one CopyObject request can copy.
const MAX_COPY_OBJECT: u64 = 5 << 30;

/// The full S3 key of a repository-relative key. Object keys use only characters that need
/// no escaping (`format::layout`).
fn full_key(url: &S3Url, rel: &str) -> String {
    if url.prefix.is_empty() {
        rel.to_owned()
    } else {
        format!("{}/{rel}", url.prefix)
    }
}

type HttpResponse = aws_sdk_s3::config::http::HttpResponse;

/// Turns an SDK error into one that says what failed, whether retrying can help, and what to
/// check. `store` is the store's description (bucket and prefix).
pub fn sdk_error<E>(
    store: &str,
    what: impl std::fmt::Display,
    e: SdkError<E, HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let what = format!("{store}: {what}");
    match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            return Error::failure(format!(
                "{what}: S3 did not answer after {MAX_ATTEMPTS} attempts: {}",
                DisplayErrorContext(&e)
            ))
            .retryable()
            .hint("check the endpoint, the network and the region; run the command again");
        }
        SdkError::ConstructionFailure(_) => {
            return Error::failure(format!("{what}: {}", DisplayErrorContext(&e))).hint(
                "check the AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID, an instance role)",
            );
        }
        _ => {}
    }
    let status = e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
    let code = e.code().unwrap_or("").to_owned();
    let message = e.message().map(|m| format!(": {m}")).unwrap_or_default();
    match (code.as_str(), status) {
        ("NoSuchBucket", _) => Error::not_found(format!("{what}: the bucket does not exist"))
            .hint("run `drctl init` to create it, or check the repository URL and region"),
        ("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch", _) | (_, 403) => {
            Error::failure(format!("{what}: access denied ({code}{message})")).hint(
                "check the IAM policy of the credentials in use (README, section S3) and the bucket policy",
            )
        }
        ("SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout", _) | (_, 500..) => {
            Error::failure(format!(
                "{what}: S3 kept failing after {MAX_ATTEMPTS} attempts ({code} {status}{message})"
            ))
            .retryable()
            .hint("S3 is throttling or unavailable; run the command again later")
        }
        ("", _) => Error::failure(format!("{what}: {}", DisplayErrorContext(&e))),
        _ => Error::failure(format!("{what}: {code} (HTTP {status}){message}")),
    }
}

fn sha256_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

fn lock_mode(mode: LockMode) -> ObjectLockMode {
    match mode {
        LockMode::Governance => ObjectLockMode::Governance,
        LockMode::Compliance => ObjectLockMode::Compliance,
    }
}

fn to_chrono(t: &aws_sdk_s3::primitives::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        self.url.to_string()
    }

    fn region(&self) -> String {
        self.url.region.clone()
    }

    async fn create(&self) -> Result<()> {
        let mut req = self.client.create_bucket().bucket(&self.url.bucket);
        if self.url.region != "us-east-1" {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.url.region.as_str()))
                    .build(),
            );
        }
        if let Err(e) = req.send().await {
            if e.code() != Some("BucketAlreadyOwnedByYou") {
                let err = self.err("create the bucket", e);
                return Err(if err.message().contains("BucketAlreadyExists") {
                    err.hint("bucket names are global: this one belongs to another account; pick another")
                } else {
                    err
                });
            }
        }
        if !self.marker_exists().await? {
            self.client
                .put_object()
                .bucket(&self.url.bucket)
                .key(self.full_key(MARKER))
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .checksum_sha256(sha256_b64(b"drctl repository, format 1\n"))
                .body(Body::from_static(b"drctl repository, format 1\n"))
                .send()
                .await
                .map_err(|e| self.err("write the repository marker", e))?;
        }
        Ok(())
    }

    async fn check(&self) -> Result<()> {
        if self.marker_exists().await? {
            Ok(())
        } else {
            Err(
                Error::not_found(format!("no drctl repository at {}", self.describe()))
                    .hint("run `drctl init`"),
            )
        }
    }

    async fn put(&self, key: &ObjectKey, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(S3Writer {
            store: self.clone(),
            key: key.clone(),
            full: self.full_key(key.as_str()),
            opts: opts.clone(),
            buf: BytesMut::new(),
            spare: Vec::new(),
            upload_id: None,
            in_flight: tokio::task::JoinSet::new(),
            parts: Vec::new(),
            size: 0,
            failed: false,
            done: false,
        }))
    }

    async fn get(&self, key: &ObjectKey) -> Result<ByteStream> {
        let full = self.full_key(key.as_str());
        let head = self
            .client
            .head_object()
            .bucket(&self.url.bucket)
            .key(&full)
            .send()
            .await;
        let head = match head {
            Ok(h) => h,
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                return Err(Error::not_found(format!(
                    "object {key} not found in {}",
                    self.describe()
                )))
            }
            Err(e) => return Err(self.err(format!("read {key}"), e)),
        };
        let size = head.content_length().unwrap_or(0).max(0) as u64;
        let range = Ranged {
            store: self.clone(),
            full,
            etag: head.e_tag().map(str::to_owned),
        };
        let (tx, stream) = ByteStream::channel(key.clone());
        let (part, concurrency) = (self.part_size as u64, self.concurrency);
        tokio::spawn(async move {
            let mut pending: VecDeque<AbortOnDrop<Result<Vec<Bytes>>>> = VecDeque::new();
            let mut next = 0u64;
            loop {
                while pending.len() < concurrency && next < size {
                    let end = (next + part).min(size);
                    let r = range.clone();
                    pending.push_back(AbortOnDrop(tokio::spawn(async move {
                        r.fetch(next, end).await
                    })));
                    next = end;
                }
                let Some(mut task) = pending.pop_front() else {
                    return;
                };
                let fetched = match (&mut task.0).await {
                    Ok(r) => r,
                    Err(e) => Err(Error::failure(format!("download task failed: {e}"))),
                };
                match fetched {
                    Ok(segments) => {
                        for mut data in segments {
                            while !data.is_empty() {
                                let chunk = data.split_to(data.len().min(CHUNK_SIZE));
                                if tx.send(Ok(chunk)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(stream)
    }

    async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>> {
        let out = self
            .client
            .head_object()
            .bucket(&self.url.bucket)
            .key(self.full_key(key.as_str()))
            .send()
            .await;
        match out {
            Ok(h) => Ok(Some(ObjectMeta {
                key: key.clone(),
                size: h.content_length().unwrap_or(0).max(0) as u64,
                modified: h.last_modified().and_then(to_chrono),
            })),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(self.err(format!("head {key}"), e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let marker = self.full_key(MARKER);
        let mut out = Vec::new();
        let mut token = None::<String>;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.url.bucket)
                .prefix(self.full_key(prefix))
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.err(format!("list {prefix:?}"), e))?;
            for o in page.contents() {
                let Some(full) = o.key() else { continue };
                if full == marker {
                    continue;
                }
                let Some(rel) = self.rel_key(full) else {
                    continue;
                };
                out.push(ObjectMeta {
                    key: ObjectKey::from_listing(rel)?,
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified: o.last_modified().and_then(to_chrono),
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &ObjectKey) -> Result<()> {
        let full = self.full_key(key.as_str());
        let versions = self.list_versions(&full).await?;
        let mut protected = Vec::new();
        for version in versions {
            let res = self
                .client
                .delete_object()
                .bucket(&self.url.bucket)
                .key(&full)
                .version_id(&version)
                .send()
                .await;
            match res {
                Ok(_) => {}
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 403) => {
                    protected.push(version)
                }
                Err(e) => return Err(self.err(format!("delete {key} version {version}"), e)),
            }
        }
        if protected.is_empty() {
            Ok(())
        } else {
            Err(Error::failure(format!(
                "{}: object {key}: {} version(s) could not be deleted, Object Lock retention (or the bucket policy) protects them: {}",
                self.describe(),
                protected.len(),
                protected.join(", ")
            ))
            .hint("they can be deleted once their retain-until date has passed; retention in governance mode can be bypassed by a role with s3:BypassGovernanceRetention"))
        }
    }

    async fn leftovers(&self, older_than: chrono::DateTime<chrono::Utc>) -> Result<Vec<Leftover>> {
        let prefix = if self.url.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.url.prefix)
        };
        let mut uploads = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.url.bucket)
                .prefix(&prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| self.err("list unfinished multipart uploads", e))?;
            for u in page.uploads() {
                let (Some(full), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                let old = u
                    .initiated()
                    .and_then(to_chrono)
                    .is_none_or(|t| t < older_than);
                if let (true, Some(rel)) = (old, self.rel_key(full)) {
                    uploads.push((rel.to_owned(), id.to_owned()));
                }
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
        }
        // Sizes would take a ListParts request per upload: reported as 0.
        let mut out: Vec<Leftover> = uploads
            .into_iter()
            .map(|(rel, id)| Leftover {
                what: format!("{rel}{UPLOAD_SEP}{id}"),
                size: 0,
            })
            .collect();
        out.sort_by(|a, b| a.what.cmp(&b.what));
        Ok(out)
    }

    async fn remove_leftover(&self, leftover: &Leftover) -> Result<()> {
        let parsed = leftover
            .what
            .split_once(UPLOAD_SEP)
            .filter(|(_, id)| !id.is_empty())
            .filter(|(rel, _)| ObjectKey::parse(rel).is_some())
            .and_then(|(rel, id)| Some((ObjectKey::from_listing(rel).ok()?, id)));
        let Some((key, upload_id)) = parsed else {
            return Err(Error::invalid(format!(
                "not a leftover of this store: {} (expected KEY{UPLOAD_SEP}ID)",
                leftover.what
            )));
        };
        abort_upload(self, &self.full_key(key.as_str()), upload_id).await
    }
}

async fn abort_upload(store: &S3Store, full: &str, upload_id: &str) -> Result<()> {
    match store
        .client
        .abort_multipart_upload()
        .bucket(&store.url.bucket)
        .key(full)
        .upload_id(upload_id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
        Err(e) => Err(store.err(format!("abort the upload {upload_id} of {full}"), e)),
    }
}

/// Aborts a task when dropped, so an abandoned download stops at once.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One object being read in ranges.
#[derive(Clone)]
struct Ranged {
    store: S3Store,
    full: String,
    etag: Option<String>,
}

impl Ranged {
    /// Bytes `start..end` as received (not copied into one buffer), retrying a response body
    /// that breaks part-way.
    async fn fetch(&self, start: u64, end: u64) -> Result<Vec<Bytes>> {
        let mut attempt = 1;
        loop {
            let res = self
                .store
                .client
                .get_object()
                .bucket(&self.store.url.bucket)
                .key(&self.full)
                .range(format!("bytes={start}-{}", end - 1))
                .set_if_match(self.etag.clone())
                .send()
                .await;
            let out = match res {
                Ok(out) => out,
                Err(e) if e.code() == Some("PreconditionFailed") => {
                    return Err(Error::integrity(format!(
                        "{}: {} changed while it was being read",
                        self.store.describe(),
                        self.full
                    )))
                }
                Err(e) => return Err(self.store.err(format!("read {}", self.full), e)),
            };
            match out.body.collect().await {
                Ok(data) if data.remaining() as u64 == end - start => {
                    return Ok(data.into_segments().collect())
                }
                Ok(data) => {
                    return Err(Error::integrity(format!(
                        "{}: {} bytes {start}..{end}: got {} bytes",
                        self.store.describe(),
                        self.full,
                        data.remaining()
                    )))
                }
                Err(e) if attempt < MAX_ATTEMPTS => {
                    tracing::warn!(key = %self.full, attempt, error = %e, "ranged GET broke; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(Error::failure(format!(
                        "{}: read {}: {e} (after {MAX_ATTEMPTS} attempts)",
                        self.store.describe(),
                        self.full
                    ))
                    .retryable())
                }
            }
        }
    }
}

struct S3Writer {
    store: S3Store,
    key: ObjectKey,
    full: String,
    opts: PutOptions,
    /// The part being filled.
    buf: BytesMut,
    /// Buffers of uploaded parts, reused for the next parts: a writer allocates at most
    /// `concurrency + 1` part buffers, however large the object.
    spare: Vec<BytesMut>,
    upload_id: Option<String>,
    /// Each part's upload returns its buffer.
    in_flight: tokio::task::JoinSet<Result<(CompletedPart, Bytes)>>,
    parts: Vec<CompletedPart>,
    size: u64,
    failed: bool,
    /// Finished or aborted: nothing for `drop` to clean up.
    done: bool,
}

impl S3Writer {
    fn fail(&mut self, e: Error) -> Error {
        self.failed = true;
        e
    }

    /// Waits for one in-flight part.
    async fn join_one(&mut self) -> Result<()> {
        match self.in_flight.join_next().await {
            Some(joined) => self.part_done(joined),
            None => Ok(()),
        }
    }

    /// Records an uploaded part and keeps its buffer for the next one.
    fn part_done(
        &mut self,
        joined: std::result::Result<Result<(CompletedPart, Bytes)>, tokio::task::JoinError>,
    ) -> Result<()> {
        let part = joined
            .map_err(|e| Error::failure(format!("upload task failed: {e}")))
            .and_then(|r| r);
        match part {
            Ok((p, data)) => {
                self.parts.push(p);
                if let Ok(mut buf) = data.try_into_mut() {
                    buf.clear();
                    self.spare.push(buf);
                }
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Starts uploading the buffered part, after waiting for a free upload slot.
    async fn send_part(&mut self) -> Result<()> {
        if self.upload_id.is_none() {
            let req = self
                .store
                .client
                .create_multipart_upload()
                .bucket(&self.store.url.bucket)
                .key(&self.full);
            let out = with_options!(req, &self.opts).send().await.map_err(|e| {
                self.store
                    .err(format!("start the upload of {}", self.key), e)
            });
            match out.map(|o| o.upload_id().map(str::to_owned)) {
                Ok(Some(id)) => self.upload_id = Some(id),
                Ok(None) => {
                    return Err(self.fail(Error::failure(format!(
                        "{}: S3 returned no upload ID for {}",
                        self.store.describe(),
                        self.key
                    ))))
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        while self.in_flight.len() >= self.store.concurrency {
            self.join_one().await?;
        }
        let number = self.parts.len() + self.in_flight.len() + 1;
        if number > MAX_PARTS {
            return Err(self.fail(
                Error::failure(format!(
                    "{}: {} is larger than {MAX_PARTS} parts of {} MiB",
                    self.store.describe(),
                    self.key,
                    self.store.part_size >> 20
                ))
                .hint("raise part-size-mib in the repository URL (S3 allows at most 10000 parts)"),
            ));
        }
        let number = number as i32;
        let data = std::mem::take(&mut self.buf).freeze();
        let (store, full, key) = (self.store.clone(), self.full.clone(), self.key.clone());
        let upload_id = self.upload_id.clone().expect("started above");
        self.in_flight.spawn(async move {
            let checksum = sha256_b64(&data);
            let out = store
                .client
                .upload_part()
                .bucket(&store.url.bucket)
                .key(&full)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(data.len() as i64)
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .checksum_sha256(&checksum)
                .body(Body::from(data.clone()))
                .send()
                .await
                .map_err(|e| store.err(format!("upload part {number} of {key}"), e))?;
            let part = CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .checksum_sha256(out.checksum_sha256().unwrap_or(&checksum))
                .build();
            Ok((part, data))
        });
        Ok(())
    }

    async fn complete(&mut self) -> Result<()> {
        let Some(upload_id) = self.upload_id.clone() else {
            let data = std::mem::take(&mut self.buf).freeze();
            let req = self
                .store
                .client
                .put_object()
                .bucket(&self.store.url.bucket)
                .key(&self.full);
            with_options!(req, &self.opts)
                .checksum_sha256(sha256_b64(&data))
                .content_length(data.len() as i64)
                .body(Body::from(data))
                .send()
                .await
                .map_err(|e| self.store.err(format!("write {}", self.key), e))?;
            return Ok(());
        };
        if !self.buf.is_empty() {
            self.send_part().await?;
        }
        while !self.in_flight.is_empty() {
            self.join_one().await?;
        }
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number());
        self.store
            .client
            .complete_multipart_upload()
            .bucket(&self.store.url.bucket)
            .key(&self.full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                self.store
                    .err(format!("complete the upload of {}", self.key), e)
            })?;
        Ok(())
    }

    /// Cancels in-flight parts and aborts the multipart upload, if one was started.
    async fn discard(&mut self) -> Result<()> {
        self.done = true;
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        self.buf = BytesMut::new();
        self.spare.clear();
        match self.upload_id.take() {
            Some(id) => abort_upload(&self.store, &self.full, &id).await,
            None => Ok(()),
        }
    }
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, mut chunk: Bytes) -> Result<()> {
        if self.failed {
            return Err(Error::failure(format!(
                "write to {} after a failure",
                self.key
            )));
        }
        self.size += chunk.len() as u64;
        let part_size = self.store.part_size;
        while !chunk.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf = self
                    .spare
                    .pop()
                    .unwrap_or_else(|| BytesMut::with_capacity(part_size));
            }
            let take = (part_size - self.buf.len()).min(chunk.len());
            self.buf.extend_from_slice(&chunk.split_to(take));
            if self.buf.len() == part_size {
                self.send_part().await?;
            }
        }
        // Surface a failed part early instead of at `finish`.
        while let Some(joined) = self.in_flight.try_join_next() {
            self.part_done(joined)?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<ObjectMeta> {
        if self.failed {
            let _ = self.discard().await;
            return Err(Error::failure(format!(
                "finish of {} after a failure",
                self.key
            )));
        }
        if let Err(e) = self.complete().await {
            if let Err(e2) = self.discard().await {
                tracing::warn!(key = %self.key, error = %e2, "could not abort the multipart upload; `drctl gc` removes it");
            }
            return Err(e);
        }
        self.done = true;
        Ok(ObjectMeta {
            key: self.key.clone(),
            size: self.size,
            modified: Some(chrono::Utc::now()),
        })
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.discard().await
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // Dropping the JoinSet cancels in-flight parts; then abort the upload in the background.
        if self.done {
            return;
        }
        let (Some(id), Ok(rt)) = (self.upload_id.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        self.in_flight.abort_all();
        let (store, full) = (self.store.clone(), self.full.clone());
        rt.spawn(async move {
            if let Err(e) = abort_upload(&store, &full, &id).await {
                tracing::warn!(key = %full, error = %e, "could not abort the multipart upload; `drctl gc` removes it");
            }
        });
    }
}
