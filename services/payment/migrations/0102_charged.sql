-- Which of the two handlers charges an order is decided in the order's row, under its lock:
--   charged: 1 once a handler has taken the order's charge (the reservation's, when the details
--            were there first; the details', when the reservation was). A second reservation
--            of the order finds it set and charges nothing.
-- Orders charged before this column have their `payments` row.
ALTER TABLE payment_orders ADD COLUMN charged BIGINT NOT NULL DEFAULT 0;
UPDATE payment_orders SET charged = 1 WHERE order_id IN (SELECT order_id FROM payments);
