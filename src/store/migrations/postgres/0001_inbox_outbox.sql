-- Inbox: one row per (event, handler) already handled. Inserted in the handler's transaction,
-- so a redelivered event finds its row and is acknowledged without a second effect.
CREATE TABLE IF NOT EXISTS sluice_inbox (
    event_id    TEXT   NOT NULL,
    handler     TEXT   NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (event_id, handler)
);

-- Outbox: events emitted by handlers, written in the handler's transaction, published by the
-- relay with confirms and deleted once confirmed.
CREATE TABLE IF NOT EXISTS sluice_outbox (
    seq            BIGSERIAL PRIMARY KEY,
    event_id       TEXT    NOT NULL UNIQUE,
    routing_key    TEXT    NOT NULL,
    type_name      TEXT    NOT NULL,
    correlation_id TEXT,
    occurred_at    TEXT    NOT NULL,
    traceparent    TEXT,
    tracestate     TEXT,
    body           BYTEA   NOT NULL,
    created_at     BIGINT  NOT NULL
);
