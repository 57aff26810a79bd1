-- What payment needs to charge an order, recorded when the order is created.
CREATE TABLE IF NOT EXISTS payment_orders (
    order_id      TEXT   PRIMARY KEY,
    customer_id   TEXT   NOT NULL,
    payment_token TEXT   NOT NULL,
    received_at   BIGINT NOT NULL
);

-- One charge attempt per order: `captured` or `declined`.
CREATE TABLE IF NOT EXISTS payments (
    order_id     TEXT   PRIMARY KEY,
    payment_id   TEXT   NOT NULL,
    status       TEXT   NOT NULL,
    amount_cents BIGINT NOT NULL,
    reason       TEXT   NOT NULL,
    created_at   BIGINT NOT NULL
);
