//! The benchmark's own vhost, created and deleted through the RabbitMQ management API
//! ([`sluice::bus::admin`]), and the few management look-ups the scenarios check their results
//! with.

use anyhow::Context;
use lapin::{Channel, options::QueueDeclareOptions, types::FieldTable};
use sluice::bus::admin::Admin;

/// The management API and the AMQP listener of one broker.
#[derive(Clone)]
pub struct Broker {
    /// `amqp://user:pass@host:port`, without a vhost.
    amqp: String,
    admin: Admin,
}

impl Broker {
    pub fn new(amqp: &str, api: &str) -> anyhow::Result<Self> {
        let amqp = amqp.trim_end_matches('/').to_owned();
        let admin = Admin::new(&amqp, api)?;
        Ok(Self { amqp, admin })
    }

    /// The RabbitMQ version the management API reports.
    pub fn version(&self) -> anyhow::Result<String> {
        Ok(self.admin.version()?.unwrap_or_else(|| "unknown".to_owned()))
    }

    /// Creates `sluice-bench-<uuid>` and grants this user everything on it.
    pub fn create_vhost(&self) -> anyhow::Result<Vhost> {
        let name = format!("sluice-bench-{}", uuid::Uuid::new_v4().simple());
        self.admin.create_vhost(&name).context("creating the benchmark vhost")?;
        Ok(Vhost { name, broker: self.clone() })
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
        Ok(self.broker.admin.queue_names(&self.name)?)
    }

    /// The services' own queues bound to `exchange`, whatever their routing key (a tap's
    /// server-named `amq.gen-...` queue is not one of them).
    pub fn service_queues(&self, exchange: &str) -> anyhow::Result<Vec<String>> {
        let mut queues: Vec<String> = self
            .broker
            .admin
            .bindings(&self.name, exchange)?
            .into_iter()
            .filter(|b| b.destination_type == "queue" && !b.destination.starts_with("amq."))
            .map(|b| b.destination)
            .collect();
        queues.sort();
        queues.dedup();
        Ok(queues)
    }

    /// The queues bound to `exchange` with exactly `routing_key`.
    pub fn bound_queues(&self, exchange: &str, routing_key: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .broker
            .admin
            .bindings(&self.name, exchange)?
            .into_iter()
            .filter(|b| b.destination_type == "queue" && b.routing_key == routing_key)
            .map(|b| b.destination)
            .collect())
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if let Err(e) = self.broker.admin.delete_vhost(&self.name) {
            eprintln!("warning: deleting vhost {}: {e}", self.name);
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
