//! Optional bearer-token authentication with per-token grants.
//!
//! `SLUICE_AUTH_TOKENS` names a JSON file of tokens, stored as SHA-256 hashes (never the
//! tokens themselves), each with the routing patterns it may publish to and subscribe to:
//!
//! ```json
//! [{"name": "checkout", "sha256": "<hex of sha256(token)>", "publish": ["order.*"], "subscribe": ["order.#"]}]
//! ```
//!
//! A call without a valid `authorization: Bearer <token>` is `UNAUTHENTICATED`; a routing key
//! or pattern outside the token's grant is `PERMISSION_DENIED`. Health and reflection stay
//! open. Tokens are never logged: only the grant's name is.

use std::{collections::HashMap, sync::Arc};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::{Status, metadata::MetadataMap};

/// What one token may do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Shown in logs instead of the token.
    pub name: String,
    /// Hex SHA-256 of the token.
    sha256: String,
    /// Routing patterns it may publish to (`order.*`, `#`).
    #[serde(default)]
    pub publish: Vec<String>,
    /// Routing patterns it may subscribe to (and read orders with `order.created`).
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// Why the token file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// Cannot read it.
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// Not a JSON list of grants.
    #[error("parsing {path}: {source}")]
    Parse { path: String, source: serde_json::Error },
    /// A hash is not 64 hex digits.
    #[error("grant {0:?}: sha256 must be 64 hex digits")]
    BadHash(String),
}

/// The grants of every known token, by token hash.
#[derive(Debug, Default)]
pub struct Grants {
    by_hash: HashMap<String, Arc<Grant>>,
}

/// The hex SHA-256 of a token, as the token file stores it.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl Grants {
    /// Reads a token file.
    pub fn from_file(path: &str) -> Result<Self, AuthConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::Read { path: path.to_owned(), source })?;
        let grants: Vec<Grant> = serde_json::from_str(&text).map_err(|source| AuthConfigError::Parse { path: path.to_owned(), source })?;
        let mut by_hash = HashMap::new();
        for grant in grants {
            let hash = grant.sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(AuthConfigError::BadHash(grant.name));
            }
            by_hash.insert(hash, Arc::new(grant));
        }
        Ok(Self { by_hash })
    }

    /// The grant of the call's bearer token.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Arc<Grant>, Status> {
        let header = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("expected `authorization: Bearer <token>`"))?;
        self.by_hash.get(&token_hash(token.trim())).cloned().ok_or_else(|| Status::unauthenticated("unknown token"))
    }
}

/// Authentication as configured: off, or the grants of a token file.
pub type Auth = Option<Arc<Grants>>;

/// Checks that the call may publish to `routing_key`.
pub fn may_publish(auth: &Auth, metadata: &MetadataMap, routing_key: &str) -> Result<(), Status> {
    let Some(grants) = auth else { return Ok(()) };
    let grant = grants.authenticate(metadata)?;
    if grant.publish.iter().any(|p| covers(p, routing_key)) {
        Ok(())
    } else {
        tracing::warn!(grant = %grant.name, routing_key, "publish denied");
        Err(Status::permission_denied(format!("not allowed to publish {routing_key}")))
    }
}

/// Checks that the call may subscribe to every pattern.
pub fn may_subscribe(auth: &Auth, metadata: &MetadataMap, patterns: &[String]) -> Result<(), Status> {
    let Some(grants) = auth else { return Ok(()) };
    let grant = grants.authenticate(metadata)?;
    match patterns.iter().find(|p| !grant.subscribe.iter().any(|g| covers(g, p))) {
        None => Ok(()),
        Some(denied) => {
            tracing::warn!(grant = %grant.name, pattern = %denied, "subscribe denied");
            Err(Status::permission_denied(format!("not allowed to subscribe to {denied}")))
        }
    }
}

/// Whether grant pattern `grant` covers `wanted` (a routing key, or a pattern): `*` in the
/// grant covers any one word (a `*` included), `#` covers any number of words; a `#` in
/// `wanted` is only covered by a `#` in the grant.
pub fn covers(grant: &str, wanted: &str) -> bool {
    fn go(g: &[&str], w: &[&str]) -> bool {
        match (g.split_first(), w.split_first()) {
            (None, None) => true,
            (Some((&"#", g_rest)), _) => go(g_rest, w) || w.split_first().is_some_and(|(_, w_rest)| go(g, w_rest)),
            (Some(_), None) | (None, Some(_)) => false,
            (Some((gw, g_rest)), Some((ww, w_rest))) => *ww != "#" && (*gw == "*" || gw == ww) && go(g_rest, w_rest),
        }
    }
    let g: Vec<&str> = grant.split('.').collect();
    let w: Vec<&str> = wanted.split('.').collect();
    go(&g, &w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_patterns_cover_keys_and_narrower_patterns() {
        assert!(covers("#", "order.created"));
        assert!(covers("#", "order.#"));
        assert!(covers("order.*", "order.created"));
        assert!(covers("order.*", "order.*"));
        assert!(!covers("order.*", "order.#"));
        assert!(!covers("order.*", "payment.captured"));
        assert!(covers("order.#", "order.created"));
        assert!(covers("order.#", "order"));
        assert!(!covers("order.created", "order.*"));
        assert!(covers("order.created", "order.created"));
    }

    #[test]
    fn tokens_are_matched_by_hash() {
        let grants = Grants {
            by_hash: [(token_hash("s3cret"), Arc::new(Grant { name: "t".into(), sha256: String::new(), publish: vec![], subscribe: vec![] }))]
                .into(),
        };
        let mut metadata = MetadataMap::new();
        assert_eq!(grants.authenticate(&metadata).unwrap_err().code(), tonic::Code::Unauthenticated);
        metadata.insert("authorization", "Bearer wrong".parse().unwrap());
        assert_eq!(grants.authenticate(&metadata).unwrap_err().code(), tonic::Code::Unauthenticated);
        metadata.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(grants.authenticate(&metadata).unwrap().name, "t");
    }
}
