//! Inventory's answers to requests from other processes (request/reply over RabbitMQ).

use sluice::bus::{BoxError, Responder};
use sluice::pb::{CheckSkusReply, CheckSkusRequest, GetStockReply, GetStockRequest};
use sqlx::{AnyPool, Row};

/// Most SKUs one check may ask about (an order has at most 100 lines).
const MAX_SKUS: usize = 256;

/// Which SKUs exist (the gateway validates orders with it).
#[derive(Debug, Clone)]
pub struct CheckSkus {
    pool: AnyPool,
}

impl CheckSkus {
    /// Answers from `pool`.
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }
}

impl Responder<CheckSkusRequest> for CheckSkus {
    async fn respond(&self, request: CheckSkusRequest) -> Result<CheckSkusReply, BoxError> {
        if request.skus.len() > MAX_SKUS {
            return Err(format!("at most {MAX_SKUS} skus per check").into());
        }
        let mut unknown = Vec::new();
        for sku in request.skus {
            let found = sqlx::query("SELECT 1 FROM inventory_items WHERE sku = $1").bind(&sku).fetch_optional(&self.pool).await?;
            if found.is_none() {
                unknown.push(sku);
            }
        }
        Ok(CheckSkusReply { unknown })
    }
}

/// Current stock of one SKU.
#[derive(Debug, Clone)]
pub struct GetStock {
    pool: AnyPool,
}

impl GetStock {
    /// Answers from `pool`.
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }
}

impl Responder<GetStockRequest> for GetStock {
    async fn respond(&self, request: GetStockRequest) -> Result<GetStockReply, BoxError> {
        let row = sqlx::query("SELECT available, reserved FROM inventory_items WHERE sku = $1")
            .bind(&request.sku)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => GetStockReply { found: true, available: row.try_get("available")?, reserved: row.try_get("reserved")? },
            None => GetStockReply::default(),
        })
    }
}
