-- The reservation of an order (from inventory) can overtake the order itself (its payment
-- details): the two come through different queues. Either may now create the order's row; it
-- is the one place where the two meet, and both handlers write it first, so on PostgreSQL the
-- second waits for the first to commit.
--   has_details:  1 once the order's payment details are recorded (0 while only its
--                 reservation is known, `payment_token` is then empty);
--   reserved_first_cents: the amount of a reservation that arrived before the details, charged
--                 when they come (NULL when the details came first).
ALTER TABLE payment_orders ADD COLUMN has_details BIGINT NOT NULL DEFAULT 1;
ALTER TABLE payment_orders ADD COLUMN reserved_first_cents BIGINT;
