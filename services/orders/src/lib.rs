//! Orders: the order read model. Projects every lifecycle event and answers GetOrder.
//! Owns the `order*` tables.

mod lifecycle;
mod projector;
mod queries;

pub use lifecycle::{Change, Lifecycle};
pub use projector::Projector;
pub use queries::GetOrder;

use sluice::bus::{Consumer, Error};
use sluice::config::{ConfigError, Env, ServiceConfig};
use sluice::events::{
    InventoryRejected, InventoryReleased, InventoryReserved, NotificationSent, OrderCreated, PaymentCaptured, PaymentDeclined,
};
use sluice::store::{Migration, Store};

/// The service name: queue prefix, `app_id`, default database file.
pub const SERVICE: &str = "orders";

/// Default port of the health endpoint (`SLUICE_OPS_ADDR`).
pub const OPS_PORT: u16 = 9604;

const MIGRATIONS: &[Migration] =
    &[Migration { version: 100, description: "orders", sql: include_str!("../migrations/0100_orders.sql") }];

/// Reads orders' configuration from the environment.
pub fn config_from_env() -> Result<ServiceConfig, ConfigError> {
    ServiceConfig::from_source(&Env, SERVICE, OPS_PORT)
}

/// Migrates the database and starts consuming. Ready when it returns.
pub async fn start(config: &ServiceConfig) -> Result<Consumer, Error> {
    let store = Store::connect(&config.database_url, MIGRATIONS).await?;
    Consumer::builder(SERVICE, &config.bus, &store)
        .on::<OrderCreated, _>(Projector)
        .on::<InventoryReserved, _>(Projector)
        .on::<InventoryRejected, _>(Projector)
        .on::<InventoryReleased, _>(Projector)
        .on::<PaymentCaptured, _>(Projector)
        .on::<PaymentDeclined, _>(Projector)
        .on::<NotificationSent, _>(Projector)
        .serve(GetOrder::new(store.pool().clone()))
        .start()
        .await
}
