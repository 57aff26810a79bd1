//! The product catalog: SKUs, names, prices and initial stock, from `SLUICE_CATALOG` (a JSON
//! file) or a built-in demo catalog. Seeding never resets the stock of a known SKU, so a
//! restart keeps what was sold.

use std::collections::HashSet;

use serde::Deserialize;
use sqlx::AnyPool;

/// One catalog entry, as in the JSON file: `{"sku","name","price_cents","stock"}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogItem {
    /// Stock keeping unit, the product's id.
    pub sku: String,
    /// Display name.
    pub name: String,
    /// Unit price in cents.
    pub price_cents: i64,
    /// Initial stock (applied only when the SKU is first seen).
    pub stock: i64,
}

/// A validated catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog(Vec<CatalogItem>);

/// Why a catalog was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// The file is not a JSON list of catalog items.
    #[error("parsing {path}: {source}")]
    Parse { path: String, source: serde_json::Error },
    /// An entry breaks a rule.
    #[error("catalog entry {sku:?}: {problem}")]
    Invalid { sku: String, problem: &'static str },
}

impl Catalog {
    /// Validates `items`: non-empty unique SKUs of at most 64 characters, non-negative prices
    /// and stock.
    pub fn new(items: Vec<CatalogItem>) -> Result<Self, CatalogError> {
        let mut seen = HashSet::new();
        for item in &items {
            let invalid = |problem| CatalogError::Invalid { sku: item.sku.clone(), problem };
            if item.sku.trim().is_empty() || item.sku.len() > 64 {
                return Err(invalid("sku must be 1 to 64 characters"));
            }
            if !seen.insert(item.sku.as_str()) {
                return Err(invalid("duplicate sku"));
            }
            if item.price_cents < 0 {
                return Err(invalid("price_cents must not be negative"));
            }
            if item.stock < 0 {
                return Err(invalid("stock must not be negative"));
            }
        }
        Ok(Self(items))
    }

    /// Reads a JSON catalog file.
    pub fn from_file(path: &str) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read { path: path.to_owned(), source })?;
        let items = serde_json::from_str(&text).map_err(|source| CatalogError::Parse { path: path.to_owned(), source })?;
        Self::new(items)
    }

    /// The built-in demo catalog.
    pub fn demo() -> Self {
        let item = |sku: &str, name: &str, price_cents, stock| CatalogItem { sku: sku.into(), name: name.into(), price_cents, stock };
        Self(vec![
            item("SKU-1", "Espresso beans, 1 kg", 1_800, 1_000_000),
            item("SKU-2", "Ceramic mug", 1_200, 1_000_000),
            item("SKU-3", "Pour-over kettle", 4_500, 100),
            item("SKU-RARE", "Signed barista handbook", 9_900, 1),
        ])
    }

    /// The entries.
    pub fn items(&self) -> &[CatalogItem] {
        &self.0
    }

    /// Inserts unknown SKUs with their initial stock; updates names and prices of known ones
    /// and leaves their stock alone.
    pub async fn seed(&self, pool: &AnyPool) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        for item in &self.0 {
            sqlx::query(
                "INSERT INTO inventory_items (sku, name, price_cents, available, reserved) VALUES ($1, $2, $3, $4, 0) \
                 ON CONFLICT (sku) DO UPDATE SET name = excluded.name, price_cents = excluded.price_cents",
            )
            .bind(&item.sku)
            .bind(&item.name)
            .bind(item.price_cents)
            .bind(item.stock)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_duplicate_and_negative_entries() {
        let item = |sku: &str, stock| CatalogItem { sku: sku.into(), name: "n".into(), price_cents: 1, stock };
        assert!(Catalog::new(vec![item("A", 1), item("A", 2)]).is_err());
        assert!(Catalog::new(vec![item("A", -1)]).is_err());
        assert!(Catalog::new(vec![item("", 1)]).is_err());
        assert!(Catalog::new(vec![item("A", 1), item("B", 0)]).is_ok());
    }

    #[test]
    fn parses_the_documented_json_shape() {
        let items: Vec<CatalogItem> =
            serde_json::from_str(r#"[{"sku":"SKU-9","name":"Tea","price_cents":250,"stock":3}]"#).unwrap();
        assert_eq!(Catalog::new(items).unwrap().items()[0].stock, 3);
    }
}
