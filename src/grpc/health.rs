//! `grpc.health.v1.Health`: what the server reports, and watch streams that end on
//! shutdown.
//!
//! [`report`] is the only writer of statuses. The server (`""`) and
//! `graviton.proto.BlobService` are `SERVING` while the server serves (reads work even
//! on a shard that stopped taking writes); `graviton.proto.UploadService` is `SERVING`
//! while at least one shard takes writes, as uploads go to the least-loaded healthy
//! shard, and `NOT_SERVING` once every shard is poisoned. From the shutdown signal on,
//! all three are `NOT_SERVING`. `Check` is answered from these statuses as is. A `Watch`
//! stream never ends by itself, so it would hold every shutdown for the whole drain
//! period; here each one ends when draining starts, its last message `NOT_SERVING`.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use super::drain::Drain;
use crate::engine::{Engine, ShardHealth};
use crate::proto::blob_service_server::SERVICE_NAME as BLOB_SERVICE;
use crate::proto::upload_service_server::SERVICE_NAME as UPLOAD_SERVICE;

/// How often shard health is looked at.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

pub(crate) struct HealthApi {
    inner: HealthService,
    drain: Drain,
}

impl HealthApi {
    pub(crate) fn new(reporter: HealthReporter, drain: Drain) -> HealthApi {
        HealthApi {
            inner: HealthService::from_health_reporter(reporter),
            drain,
        }
    }
}

#[tonic::async_trait]
impl Health for HealthApi {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let drain = self.drain.clone();
        let last = HealthCheckResponse {
            status: ServingStatus::NotServing as i32,
        };
        let stream = statuses
            .take_until(async move { drain.draining().await })
            .chain(futures::stream::once(async move { Ok(last) }));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Sets every status to `SERVING`; call before the server accepts calls.
pub(crate) async fn start_serving(reporter: &HealthReporter) {
    for service in ["", BLOB_SERVICE, UPLOAD_SERVICE] {
        reporter
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
}

/// Keeps the statuses up to date until draining starts, then sets them all to
/// `NOT_SERVING` and returns.
pub(crate) async fn report(engine: Engine, reporter: HealthReporter, drain: Drain) {
    let mut uploads = tonic_health::ServingStatus::Serving;
    loop {
        tokio::select! {
            () = drain.draining() => break,
            () = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        let now = upload_status(&engine.health());
        if now != uploads {
            tracing::warn!(status = ?now, "UploadService health changed");
            reporter.set_service_status(UPLOAD_SERVICE, now).await;
            uploads = now;
        }
    }
    for service in ["", BLOB_SERVICE, UPLOAD_SERVICE] {
        reporter
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// Uploads are served while any shard takes writes.
fn upload_status(shards: &[ShardHealth]) -> tonic_health::ServingStatus {
    if shards.iter().any(|shard| !shard.poisoned) {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(poisoned: bool) -> ShardHealth {
        ShardHealth {
            shard: 0,
            driver: "io_uring".into(),
            poisoned,
        }
    }

    #[test]
    fn uploads_are_served_while_any_shard_takes_writes() {
        use tonic_health::ServingStatus::{NotServing, Serving};
        assert_eq!(upload_status(&[shard(false), shard(false)]), Serving);
        assert_eq!(upload_status(&[shard(true), shard(false)]), Serving);
        assert_eq!(upload_status(&[shard(true), shard(true)]), NotServing);
    }
}
