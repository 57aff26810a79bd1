//! The RabbitMQ management HTTP API, for what AMQP cannot do or tell: the broker version,
//! creating and deleting vhosts, the queues of a vhost, the bindings of an exchange. Used by
//! `sluice dlq list` (through [`dlq`](super::dlq)), `sluice-bench` and the end-to-end tests.
//!
//! The client signs in with the user and password of an AMQP URL (HTTP Basic) and is
//! blocking: call it from synchronous code or from `tokio::task::spawn_blocking`. Every error
//! names the request (method and URL) and, for an HTTP answer other than 2xx, its status and
//! the start of its body.

use std::{fmt, str::FromStr, time::Duration};

use base64::Engine as _;
use lapin::uri::AMQPUri;
use serde::{Deserialize, de::DeserializeOwned};

use crate::config::redact;

/// How long one request may take, unless [`Admin::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of an error answer's body an [`ApiError`] quotes, in characters.
const EXCERPT: usize = 200;

/// A client of one broker's management API, as the user of an AMQP URL.
#[derive(Clone)]
pub struct Admin {
    /// `http://host:15672`, without a trailing `/`.
    api: String,
    user: String,
    /// The AMQP URL's vhost (`/` when it names none).
    vhost: String,
    authorization: String,
    agent: ureq::Agent,
}

/// A failed management API call, or an unusable AMQP URL.
#[derive(Debug, thiserror::Error)]
#[error("{request}: {detail}")]
pub struct ApiError {
    /// `GET http://host:15672/api/...`, or `AMQP URL amqp://user:***@host`.
    request: String,
    status: Option<u16>,
    detail: String,
}

impl ApiError {
    /// The HTTP status of an answer other than 2xx; `None` when there was no answer, or an
    /// answer that was not the JSON expected.
    pub fn status(&self) -> Option<u16> {
        self.status
    }
}

/// A binding whose source is an exchange, as `/api/exchanges/<vhost>/<exchange>/bindings/source`
/// lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Binding {
    /// The queue or exchange the binding leads to.
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_type: String,
    /// The binding key.
    pub routing_key: String,
}

impl Admin {
    /// A client of the management API at `api` (`http://host:15672`) that signs in with the
    /// user and password of `amqp_url` (`guest:guest` when it names none).
    pub fn new(amqp_url: &str, api: &str) -> Result<Self, ApiError> {
        let uri = AMQPUri::from_str(amqp_url).map_err(|reason| ApiError {
            request: format!("AMQP URL {}", redact(amqp_url)),
            status: None,
            detail: reason,
        })?;
        Ok(Self::from_uri(&uri, api))
    }

    /// [`Admin::new`] from an AMQP URL parsed already.
    pub fn from_uri(uri: &AMQPUri, api: &str) -> Self {
        let user = &uri.authority.userinfo;
        let pair = format!("{}:{}", user.username, user.password);
        Self {
            api: api.trim_end_matches('/').to_owned(),
            user: user.username.clone(),
            vhost: uri.vhost.clone(),
            authorization: format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)),
            agent: agent(DEFAULT_TIMEOUT),
        }
    }

    /// The same client, with requests given up after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.agent = agent(timeout);
        self
    }

    /// The management API's base URL.
    pub fn api(&self) -> &str {
        &self.api
    }

    /// The vhost the AMQP URL names (`/` when it names none).
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// The RabbitMQ version, from `/api/overview`; `None` when the overview does not say.
    pub fn version(&self) -> Result<Option<String>, ApiError> {
        #[derive(Deserialize)]
        struct Overview {
            rabbitmq_version: Option<String>,
        }
        let overview: Overview = self.get_json("/api/overview")?;
        Ok(overview.rabbitmq_version)
    }

    /// Creates the vhost `name` and grants the client's user every permission on it. When the
    /// grant fails, the vhost is deleted again (as far as the API lets it).
    pub fn create_vhost(&self, name: &str) -> Result<(), ApiError> {
        let vhost = segment(name);
        self.request(Method::Put("{}"), &format!("/api/vhosts/{vhost}"))?;
        let permissions = format!("/api/permissions/{vhost}/{}", segment(&self.user));
        if let Err(error) = self.request(Method::Put(r#"{"configure":".*","write":".*","read":".*"}"#), &permissions) {
            let _ = self.delete_vhost(name);
            return Err(error);
        }
        Ok(())
    }

    /// Deletes the vhost `name` and everything in it.
    pub fn delete_vhost(&self, name: &str) -> Result<(), ApiError> {
        self.request(Method::Delete, &format!("/api/vhosts/{}", segment(name)))?;
        Ok(())
    }

    /// The name of every queue of `vhost`, in the API's order.
    pub fn queue_names(&self, vhost: &str) -> Result<Vec<String>, ApiError> {
        #[derive(Deserialize)]
        struct Queue {
            name: String,
        }
        let queues: Vec<Queue> = self.get_json(&format!("/api/queues/{}?columns=name", segment(vhost)))?;
        Ok(queues.into_iter().map(|q| q.name).collect())
    }

    /// The bindings whose source is `exchange` in `vhost`. Unlike the API's statistics,
    /// bindings are listed as soon as they exist.
    pub fn bindings(&self, vhost: &str, exchange: &str) -> Result<Vec<Binding>, ApiError> {
        self.get_json(&format!("/api/exchanges/{}/{}/bindings/source", segment(vhost), segment(exchange)))
    }

    fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let (request, body) = self.request(Method::Get, path)?;
        serde_json::from_str(&body).map_err(|e| ApiError { request, status: None, detail: format!("unexpected answer: {e}") })
    }

    /// Sends one request; returns `METHOD url` and the body of a 2xx answer.
    fn request(&self, method: Method<'_>, path: &str) -> Result<(String, String), ApiError> {
        let url = format!("{}{path}", self.api);
        let request = format!("{} {url}", method.name());
        let sent = match method {
            Method::Get => self.agent.get(&url).header("Authorization", &self.authorization).call(),
            Method::Delete => self.agent.delete(&url).header("Authorization", &self.authorization).call(),
            Method::Put(body) => self
                .agent
                .put(&url)
                .header("Authorization", &self.authorization)
                .header("content-type", "application/json")
                .send(body),
        };
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => {
                let detail = format!("{e} (is the management plugin enabled?)");
                return Err(ApiError { request, status: None, detail });
            }
        };
        let status = response.status();
        let body = match response.body_mut().read_to_string() {
            Ok(body) => body,
            Err(e) => return Err(ApiError { request, status: None, detail: format!("reading the answer: {e}") }),
        };
        if !status.is_success() {
            let excerpt: String = body.trim().chars().take(EXCERPT).collect();
            return Err(ApiError { request, status: Some(status.as_u16()), detail: format!("HTTP {status}: {excerpt}") });
        }
        Ok((request, body))
    }
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the credentials.
        f.debug_struct("Admin").field("api", &self.api).field("user", &self.user).field("vhost", &self.vhost).finish()
    }
}

enum Method<'a> {
    Get,
    /// With this JSON body.
    Put(&'a str),
    Delete,
}

impl Method<'_> {
    fn name(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put(_) => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into()
}

/// Percent-encodes a vhost, exchange or user name for a management API path (`/` is `%2F`).
fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(admin: &Admin) -> String {
        let encoded = admin.authorization.strip_prefix("Basic ").unwrap();
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded).unwrap()).unwrap()
    }

    #[test]
    fn the_amqp_url_gives_the_credentials_and_the_vhost() {
        let admin = Admin::new("amqps://ops:p%40ss%3Aword@rabbit.example:5671/orders%2Feu", "https://rabbit.example:15671/").unwrap();
        assert_eq!(credentials(&admin), "ops:p@ss:word");
        assert_eq!(admin.user, "ops");
        assert_eq!(admin.vhost(), "orders/eu");
        assert_eq!(admin.api(), "https://rabbit.example:15671");
    }

    #[test]
    fn a_url_without_credentials_or_vhost_is_guest_on_the_default_vhost() {
        let admin = Admin::new("amqp://127.0.0.1:5672", "http://127.0.0.1:15672").unwrap();
        assert_eq!(credentials(&admin), "guest:guest");
        assert_eq!(admin.vhost(), "/");
    }

    #[test]
    fn an_unusable_url_is_an_error_that_hides_the_password() {
        let error = Admin::new("http://ops:secret@rabbit.example", "http://rabbit.example:15672").unwrap_err().to_string();
        assert!(error.starts_with("AMQP URL http://ops:***@rabbit.example: "), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn the_debug_form_leaves_the_credentials_out() {
        let admin = Admin::new("amqp://ops:secret@127.0.0.1:5672", "http://127.0.0.1:15672").unwrap();
        let debug = format!("{admin:?}");
        assert!(!debug.contains("secret") && !debug.contains("Basic"), "{debug}");
    }

    #[test]
    fn names_are_percent_encoded_in_paths() {
        assert_eq!(segment("/"), "%2F");
        assert_eq!(segment("sluice-test-1"), "sluice-test-1");
        assert_eq!(segment("sluice.events"), "sluice.events");
        assert_eq!(segment("a b"), "a%20b");
    }
}
