//! Who may use `/admin/*`: a bearer token (compared in constant time, never printed), and
//! the refusal to serve it off loopback without one unless the operator says
//! `--insecure-admin` (then a warning, repeated). The routes themselves are in the
//! server's `admin` module.

use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// The bearer token `/admin/*` asks for. Only its SHA-256 is kept, compared in constant
/// time; `Debug` prints `AdminToken(<redacted>)`.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// A token; empty (or only white space) is refused, since it would open admin to anyone
    /// who sends `Authorization: Bearer `.
    pub fn new(token: &str) -> Result<Self, String> {
        if token.trim().is_empty() {
            return Err("the admin token is empty; set a long random one (e.g. `openssl rand -hex 32`)".into());
        }
        Ok(AdminToken(Sha256::digest(token.as_bytes()).into()))
    }

    /// Whether `given` is the token. Hashing first makes the comparison take the same time
    /// whatever the length or the first differing byte of `given`.
    pub fn matches(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        self.0.ct_eq(&given).into()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl std::str::FromStr for AdminToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        AdminToken::new(s)
    }
}

/// How often `--insecure-admin` repeats its warning.
pub const INSECURE_WARNING_EVERY: Duration = Duration::from_secs(600);

/// Refuses to serve on `address` with `/admin/*` open to other machines: off loopback a
/// token is needed, or the operator's explicit `insecure_admin`.
pub fn check_exposure(address: SocketAddr, token: Option<&AdminToken>, insecure_admin: bool) -> Result<(), String> {
    if address.ip().is_loopback() || token.is_some() || insecure_admin {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {address} with /admin/* open to anyone who reaches it: set ADAPTERS_ADMIN_TOKEN \
         (or --admin-token), listen on 127.0.0.1, or pass --insecure-admin if something in front of the server \
         already guards /admin"
    ))
}

/// Whether admin is open off loopback (the operator passed `--insecure-admin`): warn now
/// and every [`INSECURE_WARNING_EVERY`] while serving.
pub(crate) fn insecure(address: SocketAddr, token: Option<&AdminToken>, insecure_admin: bool) -> bool {
    insecure_admin && token.is_none() && !address.ip().is_loopback()
}

/// Logs the `--insecure-admin` warning at once and then every [`INSECURE_WARNING_EVERY`].
pub(crate) async fn warn_insecure(address: SocketAddr) {
    let mut every = tokio::time::interval(INSECURE_WARNING_EVERY);
    loop {
        every.tick().await;
        tracing::warn!(%address, "--insecure-admin: /admin/* (load, unload, pin, tag, routes) is open to anyone who reaches this address; set ADAPTERS_ADMIN_TOKEN");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_exactly_and_never_print() {
        let token = AdminToken::new("s3cret-token").unwrap();
        assert!(token.matches("s3cret-token"));
        for wrong in ["", "s3cret", "s3cret-token ", "S3CRET-TOKEN", "s3cret-tokenx"] {
            assert!(!token.matches(wrong), "{wrong:?} matched");
        }
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
        for empty in ["", "  ", "\t\n"] {
            assert!(AdminToken::new(empty).is_err(), "{empty:?} accepted");
        }
    }

    #[test]
    fn admin_is_refused_off_loopback_without_a_token_or_the_explicit_flag() {
        let token = AdminToken::new("t").unwrap();
        let (any, lan, local, local6) = (
            "0.0.0.0:8080".parse().unwrap(),
            "192.0.2.7:8080".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
            "[::1]:8080".parse().unwrap(),
        );
        let refused = check_exposure(any, None, false).unwrap_err();
        assert!(refused.contains("ADAPTERS_ADMIN_TOKEN") && refused.contains("--insecure-admin"), "{refused}");
        assert!(check_exposure(lan, None, false).is_err());
        for ok in [
            check_exposure(any, Some(&token), false),
            check_exposure(any, None, true),
            check_exposure(local, None, false),
            check_exposure(local6, None, false),
        ] {
            assert!(ok.is_ok());
        }
        assert!(insecure(any, None, true));
        assert!(!insecure(any, Some(&token), true) && !insecure(local, None, true));
    }
}
