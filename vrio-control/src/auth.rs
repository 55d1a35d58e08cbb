//! Bearer-token authentication for the control API.

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server side: rejects calls without `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct RequireToken {
    expected: std::sync::Arc<[u8]>,
}

impl RequireToken {
    /// Accepts only calls that carry exactly `token`.
    pub fn new(token: &str) -> Self {
        RequireToken {
            expected: format!("Bearer {token}").into_bytes().into(),
        }
    }
}

/// Compares without stopping at the first difference, so response time does
/// not reveal how much of a guessed token was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get("authorization") {
            Some(v) if same(v.as_bytes(), &self.expected) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated(
                "missing authorization: Bearer <token> (set --token or VRIO_TOKEN)",
            )),
        }
    }
}

/// Server side with auth turned off (explicit opt-in by the operator).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Interceptor for AllowAll {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        Ok(req)
    }
}

/// Server side as the operator configured it: the token check, or no check
/// at all when auth is off.
#[derive(Clone)]
pub enum ServerAuth {
    /// Calls must carry the token.
    Token(RequireToken),
    /// Auth is off.
    Off(AllowAll),
}

impl ServerAuth {
    /// [`RequireToken`] for `Some(token)`, [`AllowAll`] for `None`.
    pub fn new(token: Option<&str>) -> Self {
        match token {
            Some(t) => ServerAuth::Token(RequireToken::new(t)),
            None => ServerAuth::Off(AllowAll),
        }
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match self {
            ServerAuth::Token(t) => t.call(req),
            ServerAuth::Off(a) => a.call(req),
        }
    }
}

/// Client side: adds the bearer token to every call.
#[derive(Clone)]
pub struct AddToken {
    value: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl AddToken {
    /// Fails if the token cannot be sent as an HTTP header.
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        let value = match token {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                Status::invalid_argument("token has characters a header cannot carry")
            })?),
            None => None,
        };
        Ok(AddToken { value })
    }
}

impl Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.value {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_the_token() {
        let mut auth = RequireToken::new("s3cret");
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.call(ok).is_ok());
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert("authorization", "Bearer s3cre".parse().unwrap());
        assert_eq!(
            auth.call(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
