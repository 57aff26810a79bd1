-- The inbox is pruned by age (`SLUICE_INBOX_RETENTION_SECS`). Its rows arrive in time order, so
-- a BRIN index finds the old ones from a summary per block range: a few pages in all, next to
-- nothing for an insert to keep up to date (a B-tree would add a write to every claim).
CREATE INDEX IF NOT EXISTS sluice_inbox_received_at ON sluice_inbox USING brin (received_at);
