//! Stock operations inside a delivery's transaction. Every change is a conditional UPDATE
//! (`available >= quantity`), atomic in both SQLite and PostgreSQL, so concurrent orders can
//! never oversell; SKUs are always locked in sorted order so two orders cannot deadlock.

use std::collections::BTreeMap;

use sluice::events::{OrderItem, PricedLine};
use sluice::store::placeholders;
use sqlx::{AnyConnection, Row};

/// Quantities per SKU, merged and sorted (the lock order).
pub fn merge(items: &[OrderItem]) -> BTreeMap<String, i64> {
    let mut merged = BTreeMap::new();
    for item in items {
        *merged.entry(item.sku.clone()).or_insert(0) += i64::from(item.quantity);
    }
    merged
}

/// Outcome of trying to reserve an order.
#[derive(Debug)]
pub enum Reservation {
    /// Every line is held.
    Reserved(Vec<PricedLine>),
    /// These SKUs are unknown or short; nothing is held.
    Unavailable(Vec<String>),
}

/// Holds every line of an order, or none of them.
pub async fn reserve(db: &mut AnyConnection, order_id: &str, items: &BTreeMap<String, i64>) -> Result<Reservation, sqlx::Error> {
    let mut held: Vec<PricedLine> = Vec::new();
    let mut unavailable = Vec::new();
    for (sku, quantity) in items {
        let taken = sqlx::query(
            "UPDATE inventory_items SET available = available - $1, reserved = reserved + $1 WHERE sku = $2 AND available >= $1 \
             RETURNING name, price_cents",
        )
        .bind(*quantity)
        .bind(sku)
        .fetch_optional(&mut *db)
        .await?;
        let Some(row) = taken else {
            unavailable.push(sku.clone());
            continue;
        };
        let unit: i64 = row.try_get("price_cents")?;
        held.push(PricedLine {
            sku: sku.clone(),
            name: row.try_get("name")?,
            quantity: u32::try_from(*quantity).unwrap_or(u32::MAX),
            unit_price_cents: unit,
            line_total_cents: unit.saturating_mul(*quantity),
        });
    }
    if !unavailable.is_empty() {
        // Give back what this order took; the transaction still commits (inbox + rejection).
        for line in &held {
            sqlx::query("UPDATE inventory_items SET available = available + $1, reserved = reserved - $1 WHERE sku = $2")
                .bind(i64::from(line.quantity))
                .bind(&line.sku)
                .execute(&mut *db)
                .await?;
        }
        return Ok(Reservation::Unavailable(unavailable));
    }
    if !held.is_empty() {
        // Every line in one statement.
        let sql = format!("INSERT INTO inventory_reservations (order_id, sku, quantity, state) VALUES {}", placeholders(held.len(), 4));
        let mut insert = sqlx::query(&sql);
        for line in &held {
            insert = insert.bind(order_id).bind(&line.sku).bind(i64::from(line.quantity)).bind("reserved");
        }
        insert.execute(&mut *db).await?;
    }
    Ok(Reservation::Reserved(held))
}

/// Ends an order's reservations: `released` returns stock to `available`, `committed` drops
/// it from `reserved` (it was sold). Returns the lines it ended; empty if already ended.
pub async fn end_reservation(db: &mut AnyConnection, order_id: &str, release: bool) -> Result<Vec<OrderItem>, sqlx::Error> {
    // Ending them first returns exactly the lines this call ends (none if already ended).
    let mut rows = sqlx::query("UPDATE inventory_reservations SET state = $1 WHERE order_id = $2 AND state = 'reserved' RETURNING sku, quantity")
        .bind(if release { "released" } else { "committed" })
        .bind(order_id)
        .fetch_all(&mut *db)
        .await?
        .into_iter()
        .map(|row| Ok((row.try_get::<String, _>("sku")?, row.try_get::<i64, _>("quantity")?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    // Sorted: the lock order of every stock change.
    rows.sort();
    let mut ended = Vec::with_capacity(rows.len());
    for (sku, quantity) in rows {
        let sql = if release {
            "UPDATE inventory_items SET available = available + $1, reserved = reserved - $1 WHERE sku = $2"
        } else {
            "UPDATE inventory_items SET reserved = reserved - $1 WHERE sku = $2"
        };
        sqlx::query(sql).bind(quantity).bind(&sku).execute(&mut *db).await?;
        ended.push(OrderItem { sku, quantity: u32::try_from(quantity).unwrap_or(u32::MAX) });
    }
    Ok(ended)
}
