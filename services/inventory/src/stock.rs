//! Stock operations inside a delivery's transaction. Every change is a conditional UPDATE
//! (`available >= quantity`), atomic in both SQLite and PostgreSQL, so concurrent orders can
//! never oversell. On PostgreSQL an order's SKUs are changed one at a time, in sorted order, so
//! two orders cannot deadlock; SQLite has one writer, and changes them all in one query (one
//! round trip to sqlx's worker thread). A sale ([`COMMIT`]) is a row the bus writes for the
//! whole batch at once.

use std::{
    collections::{BTreeMap, HashMap},
    sync::LazyLock,
};

use sluice::events::{OrderItem, PricedLine};
use sluice::store::{Backend, Rows, placeholders};
use sqlx::{AnyConnection, Row, any::AnyRow};

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
    let sqlite = Backend::of(db) == Backend::Sqlite;
    // The (SKU, name, unit price) of each line taken.
    let mut taken: HashMap<String, (String, i64)> = HashMap::new();
    if sqlite {
        // Every line and, if all were taken, their reservation rows, in one query.
        let lines = serde_json::Value::Array(items.iter().map(|(sku, quantity)| serde_json::json!([sku, quantity])).collect());
        for row in sqlx::query(RESERVE_SQLITE).bind(lines.to_string()).bind(order_id).fetch_all(&mut *db).await? {
            taken.insert(row.try_get("sku")?, (row.try_get("name")?, row.try_get("price_cents")?));
        }
    } else {
        // One SKU at a time, in sorted order: the lock order of every stock change.
        for (sku, quantity) in items {
            let row = sqlx::query(
                "UPDATE inventory_items SET available = available - $1, reserved = reserved + $1 WHERE sku = $2 AND available >= $1 \
                 RETURNING name, price_cents",
            )
            .bind(*quantity)
            .bind(sku)
            .fetch_optional(&mut *db)
            .await?;
            if let Some(row) = row {
                taken.insert(sku.clone(), (row.try_get("name")?, row.try_get("price_cents")?));
            }
        }
    }
    let unavailable: Vec<String> = items.keys().filter(|sku| !taken.contains_key(*sku)).cloned().collect();
    if !unavailable.is_empty() {
        // Give back what this order took; the transaction still commits (inbox + rejection).
        for (sku, quantity) in items.iter().filter(|(sku, _)| taken.contains_key(*sku)) {
            sqlx::query(RELEASE_SQL).bind(*quantity).bind(sku).execute(&mut *db).await?;
        }
        return Ok(Reservation::Unavailable(unavailable));
    }
    let held: Vec<PricedLine> = items
        .iter()
        .filter_map(|(sku, quantity)| {
            let (name, unit) = taken.remove(sku)?;
            Some(PricedLine {
                sku: sku.clone(),
                name,
                quantity: u32::try_from(*quantity).unwrap_or(u32::MAX),
                unit_price_cents: unit,
                line_total_cents: unit.saturating_mul(*quantity),
            })
        })
        .collect();
    if !sqlite && !held.is_empty() {
        // Every line in one statement (SQLite's query wrote them already).
        let sql = format!("INSERT INTO inventory_reservations (order_id, sku, quantity, state) VALUES {}", placeholders(held.len(), 4));
        let mut insert = sqlx::query(&sql);
        for line in &held {
            insert = insert.bind(order_id).bind(&line.sku).bind(i64::from(line.quantity)).bind("reserved");
        }
        insert.execute(&mut *db).await?;
    }
    Ok(Reservation::Reserved(held))
}

/// SQLite: takes every line of `$1` (a JSON array of `[sku, quantity]`) that is in stock, returns
/// the SKU, name and price of each line taken, and writes the reservation rows of order `$2`
/// only if it took them all (`changes()` counts the lines the UPDATE took).
const RESERVE_SQLITE: &str = "UPDATE inventory_items SET available = available - (i.value ->> 1), reserved = reserved + (i.value ->> 1) \
     FROM json_each($1) AS i WHERE inventory_items.sku = i.value ->> 0 AND inventory_items.available >= (i.value ->> 1) \
     RETURNING sku, name, price_cents; \
     INSERT INTO inventory_reservations (order_id, sku, quantity, state) \
     SELECT $2, value ->> 0, value ->> 1, 'reserved' FROM json_each($1) WHERE changes() = json_array_length($1)";

/// Releases an order's reservations: their stock goes back to `available`. Returns the lines it
/// released, sorted by SKU; empty if they had already ended (released, or sold by [`COMMIT`]).
pub async fn release_reservation(db: &mut AnyConnection, order_id: &str) -> Result<Vec<OrderItem>, sqlx::Error> {
    let rows = if Backend::of(db) == Backend::Sqlite {
        // In one query. `changes()` is the count of the first statement: the stock moves only
        // if this call ended the lines.
        ended_lines(sqlx::query(&RELEASE_SQLITE).bind(order_id).fetch_all(&mut *db).await?)?
    } else {
        // Ending them first returns exactly the lines this call ends (none if already ended).
        let rows = ended_lines(sqlx::query(END_SQL).bind(order_id).fetch_all(&mut *db).await?)?;
        for (sku, quantity) in &rows {
            sqlx::query(RELEASE_SQL).bind(*quantity).bind(sku).execute(&mut *db).await?;
        }
        rows
    };
    Ok(rows.into_iter().map(|(sku, quantity)| OrderItem { sku, quantity: u32::try_from(quantity).unwrap_or(u32::MAX) }).collect())
}

/// Marks order `$1`'s reserved lines released and returns them.
const END_SQL: &str = "UPDATE inventory_reservations SET state = 'released' WHERE order_id = $1 AND state = 'reserved' RETURNING sku, quantity";
/// One released line (`$1` units of SKU `$2`) back to `available`.
const RELEASE_SQL: &str = "UPDATE inventory_items SET available = available + $1, reserved = reserved - $1 WHERE sku = $2";

/// SQLite: [`END_SQL`], then the stock of the lines it ended moved back as [`RELEASE_SQL`]
/// would, in one query.
static RELEASE_SQLITE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{END_SQL}; UPDATE inventory_items SET available = available + r.quantity, reserved = reserved - r.quantity \
         FROM inventory_reservations AS r \
         WHERE changes() > 0 AND r.order_id = $1 AND r.state = 'released' AND r.sku = inventory_items.sku"
    )
});

/// Sells orders' reservations: rows of `[order_id]`, written once per transaction for every paid
/// order of a batch. The reserved lines of those orders are marked `committed`, and their units
/// leave `reserved`; lines already ended (released, or sold before) are left alone, so an order
/// paid twice, or twice in one batch, is sold once. On PostgreSQL the stock rows are locked in
/// SKU order first (`FOR UPDATE`), the order every other stock change takes them in.
pub static COMMIT: LazyLock<Rows> = LazyLock::new(|| {
    Rows::new(
        "UPDATE inventory_items SET reserved = reserved - m.quantity \
         FROM (SELECT sku, SUM(quantity) AS quantity FROM inventory_reservations \
               WHERE state = 'reserved' AND order_id IN (SELECT value ->> 0 FROM json_each($1)) GROUP BY sku) AS m \
         WHERE inventory_items.sku = m.sku; \
         UPDATE inventory_reservations SET state = 'committed' \
         WHERE state = 'reserved' AND order_id IN (SELECT value ->> 0 FROM json_each($1))",
        "WITH ended AS (UPDATE inventory_reservations SET state = 'committed' \
               WHERE state = 'reserved' AND order_id IN (SELECT value ->> 0 FROM json_array_elements($1::JSON)) \
               RETURNING sku, quantity), \
         moved AS (SELECT sku, SUM(quantity)::BIGINT AS quantity FROM ended GROUP BY sku), \
         locked AS MATERIALIZED (SELECT sku FROM inventory_items WHERE sku IN (SELECT sku FROM moved) ORDER BY sku FOR UPDATE) \
         UPDATE inventory_items SET reserved = inventory_items.reserved - moved.quantity FROM moved JOIN locked USING (sku) \
         WHERE inventory_items.sku = moved.sku",
    )
});

/// The (SKU, quantity) rows [`END_SQL`] returned, sorted: the lock order of every stock change.
fn ended_lines(rows: Vec<AnyRow>) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let mut lines = rows.into_iter().map(|row| Ok((row.try_get("sku")?, row.try_get("quantity")?))).collect::<Result<Vec<_>, sqlx::Error>>()?;
    lines.sort();
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use sluice::bus::Context;
    use sluice::store::Store;
    use sqlx::{Connection as _, Executor as _};

    use super::*;

    /// Both backends: every test runs on each.
    const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

    /// The PostgreSQL server of the tests, as the e2e tests find it.
    fn postgres_base() -> String {
        std::env::var("SLUICE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
    }

    /// A fresh migrated database: SQLite in memory, or a new PostgreSQL database, dropped with
    /// this (even when the test fails).
    struct Fresh {
        store: Store,
        postgres: Option<String>,
    }

    impl Fresh {
        async fn new(backend: Backend) -> Self {
            if backend == Backend::Sqlite {
                return Self { store: Store::connect("sqlite::memory:", crate::MIGRATIONS).await.unwrap(), postgres: None };
            }
            sqlx::any::install_default_drivers();
            let name = format!("sluice_test_stock_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::AnyConnection::connect(&format!("{}/postgres", postgres_base())).await.expect("PostgreSQL unreachable (SLUICE_TEST_POSTGRES)");
            admin.execute(format!("CREATE DATABASE \"{name}\"").as_str()).await.unwrap();
            let store = Store::connect(&format!("{}/{name}", postgres_base()), crate::MIGRATIONS).await.unwrap();
            Self { store, postgres: Some(name) }
        }
    }

    impl Drop for Fresh {
        fn drop(&mut self) {
            let Some(name) = self.postgres.take() else { return };
            // Drop runs inside the test's runtime: the cleanup gets a runtime of its own.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async move {
                    let mut admin = sqlx::AnyConnection::connect(&format!("{}/postgres", postgres_base())).await.unwrap();
                    admin.execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str()).await.unwrap();
                });
            })
            .join();
        }
    }

    /// (available, reserved) of each SKU, in SKU order.
    async fn levels(ctx: &mut Context) -> Vec<(i64, i64)> {
        sqlx::query("SELECT available, reserved FROM inventory_items ORDER BY sku")
            .fetch_all(ctx.db())
            .await
            .unwrap()
            .iter()
            .map(|row| (row.try_get("available").unwrap(), row.try_get("reserved").unwrap()))
            .collect()
    }

    /// An order of 2 A and 3 B reserved, out of 10 of each, in a fresh database.
    async fn reserved(backend: Backend) -> (Fresh, Context) {
        let fresh = Fresh::new(backend).await;
        let mut ctx = Context::for_test(&fresh.store, "e-1").await.unwrap();
        sqlx::query("INSERT INTO inventory_items (sku, name, price_cents, available) VALUES ('A', 'a', 100, 10), ('B', 'b', 50, 10)")
            .execute(ctx.db())
            .await
            .unwrap();
        let items = BTreeMap::from([("A".to_owned(), 2), ("B".to_owned(), 3)]);
        assert!(matches!(reserve(ctx.db(), "o-1", &items).await.unwrap(), Reservation::Reserved(_)));
        assert_eq!(levels(&mut ctx).await, [(8, 2), (7, 3)]);
        (fresh, ctx)
    }

    /// An order that cannot be held in full holds nothing: an unknown SKU, or one short of stock.
    #[tokio::test]
    async fn a_line_that_cannot_be_taken_leaves_every_line_as_it_was() {
        for backend in BACKENDS {
            let (_fresh, mut ctx) = reserved(backend).await;
            let before = levels(&mut ctx).await;
            for (missing, items) in [
                ("Z", BTreeMap::from([("A".to_owned(), 1), ("Z".to_owned(), 1)])),
                ("B", BTreeMap::from([("A".to_owned(), 1), ("B".to_owned(), 8)])),
            ] {
                match reserve(ctx.db(), "o-2", &items).await.unwrap() {
                    Reservation::Unavailable(skus) => assert_eq!(skus, [missing], "{backend:?}"),
                    Reservation::Reserved(lines) => panic!("{backend:?}: held {lines:?}"),
                }
                assert_eq!(levels(&mut ctx).await, before, "{backend:?}: nothing taken");
                assert!(release_reservation(ctx.db(), "o-2").await.unwrap().is_empty(), "{backend:?}: no reservation rows");
            }
            let items = BTreeMap::from([("A".to_owned(), 8), ("B".to_owned(), 7)]);
            let Reservation::Reserved(lines) = reserve(ctx.db(), "o-2", &items).await.unwrap() else { panic!("{backend:?}: the rest of the stock is held") };
            let priced: Vec<_> = lines.iter().map(|l| (l.sku.as_str(), l.name.as_str(), l.quantity, l.unit_price_cents, l.line_total_cents)).collect();
            assert_eq!(priced, [("A", "a", 8, 100, 800), ("B", "b", 7, 50, 350)], "{backend:?}");
            assert_eq!(levels(&mut ctx).await, [(0, 10), (0, 10)], "{backend:?}");
        }
    }

    fn ended(lines: &[OrderItem]) -> Vec<(&str, u32)> {
        lines.iter().map(|l| (l.sku.as_str(), l.quantity)).collect()
    }

    /// Sells `orders` with one [`COMMIT`] statement, as the bus writes a batch's rows.
    async fn sell(ctx: &mut Context, orders: &[&str]) {
        let rows = serde_json::Value::Array(orders.iter().map(|order| serde_json::json!([order])).collect());
        let sql = COMMIT.sql(ctx.backend());
        sqlx::query(sql).bind(rows.to_string()).execute(ctx.db()).await.unwrap();
    }

    /// The state of each of `order`'s reservation rows, by SKU.
    async fn states(ctx: &mut Context, order: &str) -> Vec<String> {
        sqlx::query("SELECT state FROM inventory_reservations WHERE order_id = $1 ORDER BY sku")
            .bind(order)
            .fetch_all(ctx.db())
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get("state").unwrap())
            .collect()
    }

    /// A reservation ends once, sold or released: only what ends it moves the stock, whatever
    /// comes after.
    #[tokio::test]
    async fn stock_moves_once_for_what_ends_the_reservation() {
        for backend in BACKENDS {
            let (_fresh, mut ctx) = reserved(backend).await;
            assert_eq!(ended(&release_reservation(ctx.db(), "o-1").await.unwrap()), [("A", 2), ("B", 3)], "{backend:?}");
            assert_eq!(levels(&mut ctx).await, [(10, 0), (10, 0)], "{backend:?}: released, back to available");
            assert!(release_reservation(ctx.db(), "o-1").await.unwrap().is_empty(), "{backend:?}: already released");
            sell(&mut ctx, &["o-1"]).await;
            assert_eq!(levels(&mut ctx).await, [(10, 0), (10, 0)], "{backend:?}: a released order sells nothing");
            assert_eq!(states(&mut ctx, "o-1").await, ["released", "released"], "{backend:?}");

            let (_fresh, mut ctx) = reserved(backend).await;
            sell(&mut ctx, &["o-1"]).await;
            assert_eq!(levels(&mut ctx).await, [(8, 0), (7, 0)], "{backend:?}: sold, out of reserved");
            assert_eq!(states(&mut ctx, "o-1").await, ["committed", "committed"], "{backend:?}");
            sell(&mut ctx, &["o-1"]).await;
            assert!(release_reservation(ctx.db(), "o-1").await.unwrap().is_empty(), "{backend:?}: already sold");
            assert_eq!(levels(&mut ctx).await, [(8, 0), (7, 0)], "{backend:?}: unchanged");
            assert!(release_reservation(ctx.db(), "o-2").await.unwrap().is_empty(), "{backend:?}: nothing reserved");
        }
    }

    /// A batch's sales in one statement: each order paid in it is sold once, even when it comes
    /// twice, and the orders not in it keep their reservations.
    #[tokio::test]
    async fn a_batch_of_sales_sells_each_order_once() {
        for backend in BACKENDS {
            let (_fresh, mut ctx) = reserved(backend).await;
            for (order, items) in [("o-2", BTreeMap::from([("A".to_owned(), 1)])), ("o-3", BTreeMap::from([("B".to_owned(), 4)]))] {
                assert!(matches!(reserve(ctx.db(), order, &items).await.unwrap(), Reservation::Reserved(_)), "{backend:?}");
            }
            assert_eq!(levels(&mut ctx).await, [(7, 3), (3, 7)], "{backend:?}");
            sell(&mut ctx, &["o-1", "o-2", "o-1", "o-unknown"]).await;
            assert_eq!(levels(&mut ctx).await, [(7, 0), (3, 4)], "{backend:?}: o-1's 2 A and 3 B and o-2's 1 A sold, o-3's 4 B still reserved");
            assert_eq!(states(&mut ctx, "o-2").await, ["committed"], "{backend:?}");
            assert_eq!(states(&mut ctx, "o-3").await, ["reserved"], "{backend:?}");
            assert_eq!(ended(&release_reservation(ctx.db(), "o-3").await.unwrap()), [("B", 4)], "{backend:?}");
            assert_eq!(levels(&mut ctx).await, [(7, 0), (7, 0)], "{backend:?}");
        }
    }
}
