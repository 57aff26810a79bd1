-- The order read model, projected from every lifecycle event.
CREATE TABLE IF NOT EXISTS orders (
    order_id    TEXT   PRIMARY KEY,
    customer_id TEXT   NOT NULL,
    status      BIGINT NOT NULL,
    total_cents BIGINT NOT NULL,
    reason      TEXT   NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS order_lines (
    order_id         TEXT   NOT NULL,
    sku              TEXT   NOT NULL,
    name             TEXT   NOT NULL,
    quantity         BIGINT NOT NULL,
    unit_price_cents BIGINT NOT NULL,
    line_total_cents BIGINT NOT NULL,
    PRIMARY KEY (order_id, sku)
);

-- One row per event. `implied` is the status the event alone stands for (0: none);
-- `status` is the order's status right after it was applied.
CREATE TABLE IF NOT EXISTS order_history (
    event_id    TEXT   PRIMARY KEY,
    order_id    TEXT   NOT NULL,
    event       TEXT   NOT NULL,
    implied     BIGINT NOT NULL,
    status      BIGINT NOT NULL,
    occurred_at BIGINT NOT NULL,
    detail      TEXT   NOT NULL
);

CREATE INDEX IF NOT EXISTS order_history_by_order ON order_history (order_id, occurred_at);
