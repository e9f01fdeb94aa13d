//! Optional bearer-token authentication for the Retrieval service.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::metrics::Metrics;

/// Checks `authorization: Bearer <token>` when a token is configured; passes everything
/// otherwise.
#[derive(Clone)]
pub(crate) struct BearerAuth {
    token: Option<Arc<[u8]>>,
    metrics: Metrics,
}

impl BearerAuth {
    pub fn new(token: Option<&str>, metrics: Metrics) -> Self {
        Self {
            token: token.map(|t| Arc::from(t.as_bytes())),
            metrics,
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let refuse = |why: &str| {
            self.metrics
                .requests
                .with_label_values(&["auth", "UNAUTHENTICATED"])
                .inc();
            Err(Status::unauthenticated(format!(
                "{why}; send metadata `authorization: Bearer <token>` with the server's token \
                 (BLIPDEX_AUTH_TOKEN)"
            )))
        };
        let values = request.metadata().get_all("authorization");
        match check(token, values.iter().map(|v| v.as_bytes())) {
            Ok(()) => Ok(request),
            Err(why) => refuse(why),
        }
    }
}

/// Whether the `authorization` header values (every copy sent) carry `Bearer <token>`; the
/// reason otherwise. Shared by the gRPC and HTTP front ends.
pub(crate) fn check<'a>(
    token: &[u8],
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<(), &'static str> {
    let Some(given) = values.next() else {
        return Err("missing authorization");
    };
    // Proxies and servers disagree on which of several copies counts: accept none.
    if values.next().is_some() {
        return Err("more than one authorization header");
    }
    let given = given
        .strip_prefix(b"Bearer ")
        .or_else(|| given.strip_prefix(b"bearer "));
    match given {
        Some(g) if constant_time_eq(g.trim_ascii(), token) => Ok(()),
        Some(_) => Err("wrong bearer token"),
        None => Err("authorization is not a bearer token"),
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
