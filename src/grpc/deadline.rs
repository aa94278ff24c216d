//! Client deadlines (`grpc-timeout`) enforced over a request's whole life.
//!
//! tonic's own timeout layer only bounds the future that produces the response headers,
//! so it never stops a streaming RPC (an upload, a long read) once its handler has
//! returned the stream, and it answers `CANCELLED`, not `DEADLINE_EXCEEDED`. A
//! [`Deadline`] is read from the request's metadata when the handler starts and is raced
//! against every engine call and every step of a stream; when it passes, the work is
//! dropped (an `Upload` dropped is an upload aborted) and the client gets
//! `DEADLINE_EXCEEDED`.
//!
//! The deadline is set [`MARGIN`] before the client's, so that for unary calls ours
//! fires before tonic's layer (which started its clock a few microseconds earlier) and
//! the client sees `DEADLINE_EXCEEDED` rather than `CANCELLED`. A header that cannot be
//! parsed is ignored, as tonic does.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use super::failure::Failure;

/// How much earlier than the client's deadline the server gives up.
pub(crate) const MARGIN: Duration = Duration::from_millis(5);

/// When the client stops waiting for this request, if it said.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    at: Option<Instant>,
}

impl Deadline {
    /// The deadline of a request that just arrived with `metadata`.
    pub(crate) fn from_metadata(metadata: &MetadataMap) -> Deadline {
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout);
        Deadline {
            at: timeout.map(|timeout| Instant::now() + timeout.saturating_sub(MARGIN)),
        }
    }

    /// Runs `work` to completion unless the deadline passes first; then drops it.
    pub(crate) async fn run<T>(
        &self,
        what: &'static str,
        work: impl Future<Output = T>,
    ) -> Result<T, Failure> {
        match self.at {
            None => Ok(work.await),
            Some(at) => tokio::time::timeout_at(at, work)
                .await
                .map_err(|_| Failure::DeadlineExceeded { what }),
        }
    }

    /// Resolves when the deadline passes; never, if there is none.
    pub(crate) async fn passed(&self) {
        match self.at {
            None => std::future::pending().await,
            Some(at) => tokio::time::sleep_until(at).await,
        }
    }
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`,
/// `n`), as in gRPC's PROTOCOL-HTTP2.md.
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(amount * 3600),
        'M' => Duration::from_secs(amount * 60),
        'S' => Duration::from_secs(amount),
        'm' => Duration::from_millis(amount),
        'u' => Duration::from_micros(amount),
        'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "S",
            "10",
            "10s",
            "123456789S",
            "-1S",
            "1.5S",
            "1 S",
            "10é",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn work_past_the_deadline_is_dropped() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "100m".parse().unwrap());
        let deadline = Deadline::from_metadata(&metadata);
        let fast = deadline.run("fast", async { 7 }).await;
        assert_eq!(fast.unwrap(), 7);
        let slow = deadline
            .run("slow", tokio::time::sleep(Duration::from_secs(10)))
            .await;
        assert!(matches!(
            slow,
            Err(Failure::DeadlineExceeded { what: "slow" })
        ));
    }

    #[tokio::test]
    async fn no_header_means_no_deadline() {
        let deadline = Deadline::from_metadata(&MetadataMap::new());
        let work = deadline.run("work", tokio::time::sleep(Duration::from_millis(20)));
        assert!(work.await.is_ok());
        let passed = tokio::time::timeout(Duration::from_millis(50), deadline.passed()).await;
        assert!(passed.is_err());
    }
}
