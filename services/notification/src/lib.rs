//! Notification: tells customers how their order went. Owns the `notifications` table.

mod handlers;
mod notifications;

pub use handlers::{NotifyConfirmation, NotifyDecline, NotifyRejection};

use sluice::bus::{Consumer, Error};
use sluice::config::{ConfigError, Env, ServiceConfig};
use sluice::store::{Migration, Store};

/// The service name: queue prefix, `app_id`, default database file.
pub const SERVICE: &str = "notification";

/// Default port of the health endpoint (`SLUICE_OPS_ADDR`).
pub const OPS_PORT: u16 = 9603;

const MIGRATIONS: &[Migration] =
    &[Migration { version: 100, description: "notifications", sql: include_str!("../migrations/0100_notifications.sql") }];

/// Reads notification's configuration from the environment.
pub fn config_from_env() -> Result<ServiceConfig, ConfigError> {
    ServiceConfig::from_source(&Env, SERVICE, OPS_PORT)
}

/// Migrates the database and starts consuming. Ready when it returns.
pub async fn start(config: &ServiceConfig) -> Result<Consumer, Error> {
    let store = Store::connect(&config.database_url, MIGRATIONS).await?;
    Consumer::builder(SERVICE, &config.bus, &store)
        .on(NotifyConfirmation)
        .on(NotifyRejection)
        .on(NotifyDecline)
        .start()
        .await
}
