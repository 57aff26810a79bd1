//! Inventory: reserves stock for new orders, releases it when payment fails, and answers
//! catalog questions. Owns the `inventory_*` tables.

mod catalog;
mod handlers;
mod queries;
mod stock;

pub use catalog::{Catalog, CatalogError, CatalogItem};
pub use handlers::{CommitStock, ReleaseStock, ReserveStock};
pub use queries::{CheckSkus, GetStock};

use sluice::bus::{Consumer, Error};
use sluice::config::{ConfigError, Env, ServiceConfig, Source};
use sluice::store::{Migration, Store};

/// The service name: queue prefix, `app_id`, default database file.
pub const SERVICE: &str = "inventory";

/// Default port of the health endpoint (`SLUICE_OPS_ADDR`).
pub const OPS_PORT: u16 = 9601;

const MIGRATIONS: &[Migration] =
    &[Migration { version: 100, description: "stock", sql: include_str!("../migrations/0100_stock.sql") }];

/// Inventory's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Broker, database, telemetry.
    pub service: ServiceConfig,
    /// The catalog seeded at start (`SLUICE_CATALOG`, or the demo catalog).
    pub catalog: Catalog,
}

/// Why the service could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A variable is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The catalog file is unusable.
    #[error("SLUICE_CATALOG: {0}")]
    Catalog(#[from] CatalogError),
}

impl Config {
    /// Reads the environment.
    pub fn from_env() -> Result<Self, StartupError> {
        Self::from_source(&Env)
    }

    /// Reads `source`.
    pub fn from_source(source: &impl Source) -> Result<Self, StartupError> {
        let catalog = match source.get("SLUICE_CATALOG") {
            Some(path) => Catalog::from_file(&path)?,
            None => Catalog::demo(),
        };
        Ok(Self { service: ServiceConfig::from_source(source, SERVICE, OPS_PORT)?, catalog })
    }
}

/// Migrates the database, seeds the catalog, and starts consuming. Ready when it returns.
pub async fn start(config: &Config) -> Result<Consumer, Error> {
    let store = Store::connect(&config.service.database_url, MIGRATIONS).await?;
    config.catalog.seed(store.pool()).await?;
    Consumer::builder(SERVICE, &config.service.bus, &store)
        .on(ReserveStock)
        .on(ReleaseStock)
        .on(CommitStock)
        .serve(CheckSkus::new(store.pool().clone()))
        .serve(GetStock::new(store.pool().clone()))
        .start()
        .await
}
