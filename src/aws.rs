//! What every AWS backend shares: the SDK configuration for one region (with an optional
//! custom endpoint) and the mapping of SDK errors to [`crate::Error`].
//!
//! Credentials come from the SDK's default chain (environment, profile, SSO, web identity,
//! container and instance roles) and never appear in messages.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

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
    let (message, retryable) = match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("unknown error");
            (
                format!("{what}: {code}: {}", e.message().unwrap_or("(no message)")),
                TRANSIENT_CODES.contains(&code),
            )
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            (format!("{what}: {}", DisplayErrorContext(&err)), true)
        }
        _ => (format!("{what}: {}", DisplayErrorContext(&err)), false),
    };
    let err = Error::failure(message);
    if retryable {
        err.retryable()
    } else {
        err
    }
}
