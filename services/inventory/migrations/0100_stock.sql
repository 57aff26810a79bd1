-- Stock per SKU. `available` can be reserved; `reserved` is held for orders awaiting payment.
-- The CHECKs make overselling impossible even for a buggy caller.
CREATE TABLE IF NOT EXISTS inventory_items (
    sku         TEXT   PRIMARY KEY,
    name        TEXT   NOT NULL,
    price_cents BIGINT NOT NULL,
    available   BIGINT NOT NULL CHECK (available >= 0),
    reserved    BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);

-- What each order holds: state is `reserved`, then `committed` (paid) or `released`.
CREATE TABLE IF NOT EXISTS inventory_reservations (
    order_id TEXT   NOT NULL,
    sku      TEXT   NOT NULL,
    quantity BIGINT NOT NULL,
    state    TEXT   NOT NULL,
    PRIMARY KEY (order_id, sku)
);
