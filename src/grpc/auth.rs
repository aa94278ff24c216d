//! Optional bearer-token authentication for the blob and upload services.
//!
//! With a token configured, every call to `BlobService` and `UploadService` must carry
//! `authorization: Bearer <token>` metadata (the scheme is matched case-insensitively,
//! RFC 7235); a missing or different token is `UNAUTHENTICATED` before the handler
//! runs, so nothing is read or written. Tokens are compared in constant time. Without a
//! token (the default) every call passes. Health checks and reflection are never
//! authenticated: probes and `grpcurl list` must work without secrets, and neither
//! reveals or changes stored data.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::failure::{status, Failure};

/// A `tonic` interceptor that checks the bearer token, if one is configured.
#[derive(Clone, Debug)]
pub(crate) struct BearerAuth {
    token: Option<Arc<[u8]>>,
}

impl BearerAuth {
    /// Requires `token` on every call; `None` or an empty token turns checking off.
    pub(crate) fn new(token: Option<&str>) -> BearerAuth {
        let token = token.filter(|token| !token.is_empty());
        BearerAuth {
            token: token.map(|token| Arc::from(token.as_bytes())),
        }
    }

    fn check(&self, authorization: Option<&[u8]>) -> Result<(), Failure> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let Some(value) = authorization else {
            return Err(Failure::Unauthenticated(
                "this server requires a token: send `authorization: Bearer <token>` metadata",
            ));
        };
        let presented = bearer_token(value).ok_or(Failure::Unauthenticated(
            "the `authorization` metadata must be `Bearer <token>`",
        ))?;
        if constant_time_eq(presented, expected) {
            Ok(())
        } else {
            Err(Failure::Unauthenticated(
                "the bearer token is wrong; check the token the server was started with",
            ))
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        self.check(authorization).map_err(status)?;
        Ok(request)
    }
}

/// The token of a `Bearer <token>` header value, if it is one.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Equality whose time does not depend on where the inputs first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn call(auth: &BearerAuth, header: Option<&str>) -> Result<(), Code> {
        let mut request = Request::new(());
        if let Some(header) = header {
            request
                .metadata_mut()
                .insert("authorization", header.parse().unwrap());
        }
        auth.clone().call(request).map(drop).map_err(|s| s.code())
    }

    #[test]
    fn without_a_token_everything_passes() {
        for auth in [BearerAuth::new(None), BearerAuth::new(Some(""))] {
            assert_eq!(call(&auth, None), Ok(()));
            assert_eq!(call(&auth, Some("Bearer whatever")), Ok(()));
        }
    }

    #[test]
    fn with_a_token_only_the_right_one_passes() {
        let auth = BearerAuth::new(Some("s3cret"));
        assert_eq!(call(&auth, Some("Bearer s3cret")), Ok(()));
        assert_eq!(call(&auth, Some("bearer s3cret")), Ok(()));
        let unauthenticated = Err(Code::Unauthenticated);
        assert_eq!(call(&auth, None), unauthenticated);
        assert_eq!(call(&auth, Some("Bearer s3cre")), unauthenticated);
        assert_eq!(call(&auth, Some("Bearer s3cret2")), unauthenticated);
        assert_eq!(call(&auth, Some("Basic s3cret")), unauthenticated);
        assert_eq!(call(&auth, Some("s3cret")), unauthenticated);
        assert_eq!(call(&auth, Some("Bearer ")), unauthenticated);
    }
}
