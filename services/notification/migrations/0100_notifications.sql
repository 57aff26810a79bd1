-- Every message sent to a customer. The delivery channel (e-mail, SMS) reads from here; the
-- reference domain stops at recording and announcing it.
CREATE TABLE IF NOT EXISTS notifications (
    notification_id TEXT   PRIMARY KEY,
    order_id        TEXT   NOT NULL,
    customer_id     TEXT   NOT NULL,
    kind            TEXT   NOT NULL,
    message         TEXT   NOT NULL,
    created_at      BIGINT NOT NULL
);
