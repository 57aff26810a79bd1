//! Answers `GetOrderRequest` from the read model (the gateway's GetOrder, over request/reply).

use sluice::bus::{BoxError, Responder};
use sluice::events::PricedLine;
use sluice::pb::{GetOrderReply, GetOrderRequest, Order, OrderHistoryEntry};
use sqlx::{AnyPool, Row};

use crate::projector::status_of;

/// Reads one order with its lines and history.
#[derive(Debug, Clone)]
pub struct GetOrder {
    pool: AnyPool,
}

impl GetOrder {
    /// Answers from `pool`.
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }
}

impl Responder<GetOrderRequest> for GetOrder {
    async fn respond(&self, request: GetOrderRequest) -> Result<GetOrderReply, BoxError> {
        let Some(row) = sqlx::query("SELECT customer_id, status, total_cents, reason FROM orders WHERE order_id = $1")
            .bind(&request.order_id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(GetOrderReply { order: None });
        };
        let lines = sqlx::query(
            "SELECT sku, name, quantity, unit_price_cents, line_total_cents FROM order_lines WHERE order_id = $1 ORDER BY sku",
        )
        .bind(&request.order_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| {
            Ok::<_, sqlx::Error>(PricedLine {
                sku: r.try_get("sku")?,
                name: r.try_get("name")?,
                quantity: u32::try_from(r.try_get::<i64, _>("quantity")?).unwrap_or(u32::MAX),
                unit_price_cents: r.try_get("unit_price_cents")?,
                line_total_cents: r.try_get("line_total_cents")?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
        let mut history = sqlx::query(
            "SELECT event_id, event, implied, status, occurred_at, detail FROM order_history WHERE order_id = $1 ORDER BY occurred_at, event_id",
        )
        .bind(&request.order_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| {
            let micros: i64 = r.try_get("occurred_at")?;
            let implied: i64 = r.try_get("implied")?;
            Ok::<_, sqlx::Error>((
                implied,
                OrderHistoryEntry {
                    event: r.try_get("event")?,
                    event_id: r.try_get("event_id")?,
                    status: status_of(r.try_get("status")?) as i32,
                    occurred_at: Some(prost_types::Timestamp {
                        seconds: micros.div_euclid(1_000_000),
                        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
                    }),
                    detail: r.try_get("detail")?,
                },
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
        // Clocks of different services may disagree by a little: within the same instant,
        // lifecycle order decides.
        history.sort_by(|(ia, a), (ib, b)| {
            let key = |e: &OrderHistoryEntry| e.occurred_at.as_ref().map(|t| (t.seconds, t.nanos / 1_000_000));
            key(a).cmp(&key(b)).then(ia.cmp(ib))
        });
        Ok(GetOrderReply {
            order: Some(Order {
                order_id: request.order_id,
                status: status_of(row.try_get("status")?) as i32,
                lines,
                total_cents: row.try_get("total_cents")?,
                history: history.into_iter().map(|(_, e)| e).collect(),
                customer_id: row.try_get("customer_id")?,
                reason: row.try_get("reason")?,
            }),
        })
    }
}
