#![allow(dead_code)]
//! The moto server the S3 tests run against (`scripts/moto.sh` starts it; `DRCTL_MOTO_PORT`
//! says where), unique bucket names, and a plain SDK client for checking what S3 holds.

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::Client;

pub fn port() -> u16 {
    std::env::var("DRCTL_MOTO_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5000)
}

pub fn endpoint() -> String {
    format!("http://127.0.0.1:{}", port())
}

/// Credentials for moto, for code in this process that uses the standard AWS chain. Called
/// before any S3 client is built; tests never talk to real AWS.
pub fn env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY (edition 2021: safe fn): set once, before any thread reads these variables.
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::remove_var("AWS_SESSION_TOKEN");
        std::env::remove_var("AWS_PROFILE");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    });
}

/// The same credentials for a child process.
pub fn env_for(cmd: &mut std::process::Command) {
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE");
}

/// A bucket name no other test (or test run) uses.
pub fn bucket(label: &str) -> String {
    format!("drctl-{label}-{:016x}", rand::random::<u64>())
}

/// `s3://bucket/prefix?region=R&endpoint=moto&part-size-mib=5`, plus `extra` query parameters.
pub fn url(bucket: &str, prefix: &str, region: &str, extra: &str) -> String {
    format!(
        "s3://{bucket}/{prefix}?region={region}&endpoint={}&part-size-mib=5{extra}",
        endpoint()
    )
}

/// A client for checking what S3 holds, independent of the code under test.
pub fn client(region: &str) -> Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(endpoint())
        .force_path_style(true)
        .build();
    Client::from_conf(config)
}

/// Unfinished multipart uploads in a bucket, as `key` strings.
pub async fn multipart_uploads(client: &Client, bucket: &str) -> Vec<String> {
    let out = client
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .expect("list multipart uploads");
    out.uploads()
        .iter()
        .map(|u| u.key().unwrap_or_default().to_owned())
        .collect()
}
