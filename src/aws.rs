//! What every AWS backend shares: the SDK configuration for one region (with an optional
//! custom endpoint) and the mapping of SDK errors to [`crate::Error`].
//!
//! Credentials come from the SDK's default chain (environment, profile, SSO, web identity,
//! container and instance roles) and never appear in messages.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

use crate::Error;

/// The SDK configuration for `region`, talking to `endpoint` instead of AWS when given.
pub async fn sdk_config(region: &str, endpoint: Option<&str>) -> SdkConfig {
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region.to_owned()));
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// Service error codes that a later attempt may not get.
const TRANSIENT_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "TransactionConflictException",
    "InternalServerError",
    "ServiceUnavailable",
    "KMSInternalException",
    "DependencyTimeoutException",
];

/// Maps an SDK error to an error saying `what` failed; throttling, 5xx, timeouts and
/// connection failures are retryable, everything else is not.
pub fn sdk_error<E, R>(what: impl std::fmt::Display, err: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("unknown error");
            let out = Error::failure(format!(
                "{what}: {code}: {}",
                e.message().unwrap_or("(no message)")
            ));
            if TRANSIENT_CODES.contains(&code) {
                out.retryable()
            } else {
                out
            }
        }
        SdkError::DispatchFailure(d) if !(d.is_io() || d.is_timeout()) => Error::failure(format!(
            "{what}: {}",
            chain(&err)
        ))
        .hint("check the AWS credentials (environment, profile, SSO, or an instance or task role)"),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Error::failure(format!("{what}: {}", chain(&err))).retryable()
        }
        _ => Error::failure(format!("{what}: {}", chain(&err))),
    }
}

/// An error and its sources, each as its `Display` says it, joined by ": ".
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}
