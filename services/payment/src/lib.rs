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
    Migration { version: 102, description: "charged", sql: include_str!("../migrations/0102_charged.sql") },
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

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;

    /// An order charged before the `charged` column existed is marked charged when it is added,
    /// so that a reservation of it after the upgrade charges nothing; the others are not.
    #[tokio::test]
    async fn orders_charged_before_the_upgrade_are_marked_charged() {
        let path = std::env::temp_dir().join(format!("sluice-payment-{}.db", uuid::Uuid::new_v4().simple()));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let before = Store::connect(&url, &MIGRATIONS[..2]).await.unwrap();
        sqlx::query("INSERT INTO payment_orders (order_id, customer_id, payment_token, received_at) VALUES ('paid', 'c', 't', 0), ('unpaid', 'c', 't', 0)")
            .execute(before.pool())
            .await
            .unwrap();
        sqlx::query("INSERT INTO payments (order_id, payment_id, status, amount_cents, reason, created_at) VALUES ('paid', 'p', 'captured', 100, '', 0)")
            .execute(before.pool())
            .await
            .unwrap();
        before.close().await;

        let after = Store::connect(&url, MIGRATIONS).await.unwrap();
        let charged: Vec<(String, i64)> = sqlx::query("SELECT order_id, charged FROM payment_orders ORDER BY order_id")
            .fetch_all(after.pool())
            .await
            .unwrap()
            .iter()
            .map(|row| (row.try_get("order_id").unwrap(), row.try_get("charged").unwrap()))
            .collect();
        assert_eq!(charged, [("paid".to_owned(), 1), ("unpaid".to_owned(), 0)]);
        after.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
