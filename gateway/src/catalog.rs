//! Which SKUs exist, as far as the gateway knows. The inventory service owns the catalog; the
//! gateway asks it (request/reply) about SKUs it has not seen and remembers the known ones, so
//! the common case costs no round trip. Unknown SKUs are never cached: a catalog update is
//! visible at once.

use std::{collections::HashSet, sync::RwLock, time::Duration};

use sluice::bus::{Error, RpcClient};
use sluice::pb::CheckSkusRequest;

/// A cache of known SKUs in front of inventory's `CheckSkus`.
#[derive(Debug, Default)]
pub struct KnownSkus {
    // A std lock: held only to read or extend the set, never across an await.
    known: RwLock<HashSet<String>>,
}

/// Largest number of SKUs remembered; past it, the cache stops growing (answers stay correct).
const MAX_CACHED: usize = 100_000;

impl KnownSkus {
    /// The SKUs among `skus` that the catalog does not contain.
    pub async fn unknown(&self, rpc: &RpcClient, skus: &[&str], timeout: Duration) -> Result<HashSet<String>, Error> {
        let missing: Vec<String> = {
            let known = self.known.read().unwrap_or_else(|e| e.into_inner());
            skus.iter().filter(|s| !known.contains(**s)).map(|s| (*s).to_owned()).collect::<HashSet<_>>().into_iter().collect()
        };
        if missing.is_empty() {
            return Ok(HashSet::new());
        }
        let reply = rpc.call(&CheckSkusRequest { skus: missing.clone() }, timeout).await?;
        let unknown: HashSet<String> = reply.unknown.into_iter().collect();
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        for sku in missing.into_iter().filter(|s| !unknown.contains(s)) {
            if known.len() < MAX_CACHED {
                known.insert(sku);
            }
        }
        Ok(unknown)
    }
}
