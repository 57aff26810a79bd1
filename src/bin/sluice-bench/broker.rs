//! The benchmark's own vhost, created and deleted through the RabbitMQ management API, and
//! the few management look-ups the scenarios check their results with.

use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use lapin::{Channel, options::QueueDeclareOptions, types::FieldTable};

/// The management API and the AMQP listener of one broker.
#[derive(Clone)]
pub struct Broker {
    /// `amqp://user:pass@host:port`, without a vhost.
    amqp: String,
    /// `http://host:15672`.
    api: String,
    authorization: String,
    user: String,
    agent: ureq::Agent,
}

impl Broker {
    pub fn new(amqp: &str, api: &str) -> Self {
        let amqp = amqp.trim_end_matches('/').to_owned();
        let userinfo = amqp.split("://").nth(1).and_then(|rest| rest.rsplit_once('@')).map_or("guest:guest", |(u, _)| u);
        let (user, pass) = userinfo.split_once(':').unwrap_or(("guest", "guest"));
        let authorization =
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")));
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        let user = user.to_owned();
        Self { amqp, api: api.trim_end_matches('/').to_owned(), authorization, user, agent }
    }

    fn put(&self, path: &str, body: &str) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.api);
        let response = self
            .agent
            .put(&url)
            .header("Authorization", &self.authorization)
            .header("content-type", "application/json")
            .send(body)
            .with_context(|| format!("PUT {url}: is the management plugin enabled?"))?;
        if !response.status().is_success() {
            bail!("PUT {url}: HTTP {}", response.status());
        }
        Ok(())
    }

    fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.api);
        let mut response = self
            .agent
            .get(&url)
            .header("Authorization", &self.authorization)
            .call()
            .with_context(|| format!("GET {url}"))?;
        if !response.status().is_success() {
            bail!("GET {url}: HTTP {}", response.status());
        }
        let text = response.body_mut().read_to_string().with_context(|| format!("reading GET {url}"))?;
        serde_json::from_str(&text).with_context(|| format!("parsing GET {url}"))
    }

    /// The RabbitMQ version the management API reports.
    pub fn version(&self) -> anyhow::Result<String> {
        let overview = self.get_json("/api/overview")?;
        Ok(overview["rabbitmq_version"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Creates `sluice-bench-<uuid>` and grants this user everything on it.
    pub fn create_vhost(&self) -> anyhow::Result<Vhost> {
        let name = format!("sluice-bench-{}", uuid::Uuid::new_v4().simple());
        self.put(&format!("/api/vhosts/{name}"), "{}").context("creating the benchmark vhost")?;
        let vhost = Vhost { name, broker: self.clone() };
        self.put(
            &format!("/api/permissions/{}/{}", vhost.name, self.user),
            r#"{"configure":".*","write":".*","read":".*"}"#,
        )
        .context("granting permissions on the benchmark vhost")?;
        Ok(vhost)
    }
}

/// A vhost that exists for the lifetime of this value.
pub struct Vhost {
    pub name: String,
    broker: Broker,
}

impl Vhost {
    /// The AMQP URL of this vhost.
    pub fn url(&self) -> String {
        format!("{}/{}", self.broker.amqp, self.name)
    }

    /// Every queue of the vhost.
    pub fn queues(&self) -> anyhow::Result<Vec<String>> {
        let queues = self.broker.get_json(&format!("/api/queues/{}?columns=name", self.name))?;
        Ok(queues
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| q["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// The queues bound to `exchange` with exactly `routing_key`.
    pub fn bound_queues(&self, exchange: &str, routing_key: &str) -> anyhow::Result<Vec<String>> {
        let bindings =
            self.broker.get_json(&format!("/api/exchanges/{}/{exchange}/bindings/source", self.name))?;
        Ok(bindings
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["destination_type"] == "queue" && b["routing_key"] == routing_key)
            .filter_map(|b| b["destination"].as_str().map(str::to_owned))
            .collect())
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let url = format!("{}/api/vhosts/{}", self.broker.api, self.name);
        match self.broker.agent.delete(&url).header("Authorization", &self.broker.authorization).call() {
            Ok(response) if response.status().is_success() => {}
            Ok(response) => eprintln!("warning: deleting vhost {}: HTTP {}", self.name, response.status()),
            Err(e) => eprintln!("warning: deleting vhost {}: {e}", self.name),
        }
    }
}

/// Messages ready in `queue`, from a passive declare (exact, unlike the management API's
/// sampled statistics).
pub async fn message_count(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let declared = channel
        .queue_declare(
            lapin::types::ShortString::try_new(queue)?,
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("passive declare of {queue}"))?;
    Ok(declared.message_count())
}
