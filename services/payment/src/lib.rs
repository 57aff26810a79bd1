//! Payment: charges customers for reserved orders. Owns the `payment*` tables.

mod handlers;
mod provider;

pub use handlers::{CapturePayment, RecordPaymentDetails};
pub use provider::{Charge, Sandbox};

use sluice::bus::{Consumer, Error};
use sluice::config::{ConfigError, Env, ServiceConfig};
use sluice::store::{Migration, Store};

/// The service name: queue prefix, `app_id`, default database file.
pub const SERVICE: &str = "payment";

/// Default port of the health endpoint (`SLUICE_OPS_ADDR`).
pub const OPS_PORT: u16 = 9602;

const MIGRATIONS: &[Migration] = &[
    Migration { version: 100, description: "payments", sql: include_str!("../migrations/0100_payments.sql") },
    Migration { version: 101, description: "reservation first", sql: include_str!("../migrations/0101_reservation_first.sql") },
];

/// Reads payment's configuration from the environment.
pub fn config_from_env() -> Result<ServiceConfig, ConfigError> {
    ServiceConfig::from_source(&Env, SERVICE, OPS_PORT)
}

/// Migrates the database and starts consuming. Ready when it returns.
pub async fn start(config: &ServiceConfig) -> Result<Consumer, Error> {
    let store = Store::connect(&config.database_url, MIGRATIONS).await?;
    Consumer::builder(SERVICE, &config.bus, &store)
        .on(RecordPaymentDetails::new(Sandbox))
        .on(CapturePayment::new(Sandbox))
        .start()
        .await
}
