//! Rules for PlaceOrder, checked at the edge before anything is published. Every broken rule
//! is reported at once, as a `google.rpc.BadRequest` field violation.

use sluice::pb::PlaceOrderRequest;
use tonic_types::FieldViolation;

/// Most lines in one order.
pub const MAX_ITEMS: usize = 100;
/// Most units of one line.
pub const MAX_QUANTITY: u32 = 10_000;
/// Longest identifier (customer id, sku, idempotency key).
pub const MAX_ID_LEN: usize = 128;
/// Longest payment token.
pub const MAX_TOKEN_LEN: usize = 512;

fn check_id(violations: &mut Vec<FieldViolation>, field: &str, value: &str, max: usize, required: bool) {
    if required && value.trim().is_empty() {
        violations.push(FieldViolation::new(field, "must not be empty"));
    } else if value.len() > max {
        violations.push(FieldViolation::new(field, format!("must be at most {max} bytes")));
    } else if value.chars().any(char::is_control) {
        violations.push(FieldViolation::new(field, "must not contain control characters"));
    }
}

/// Every violation of the PlaceOrder rules (empty when the request is well-formed).
pub fn place_order(request: &PlaceOrderRequest) -> Vec<FieldViolation> {
    let mut violations = Vec::new();
    check_id(&mut violations, "customer_id", &request.customer_id, MAX_ID_LEN, true);
    check_id(&mut violations, "payment_token", &request.payment_token, MAX_TOKEN_LEN, true);
    check_id(&mut violations, "idempotency_key", &request.idempotency_key, MAX_ID_LEN, false);
    if request.items.is_empty() {
        violations.push(FieldViolation::new("items", "an order needs at least one item"));
    } else if request.items.len() > MAX_ITEMS {
        violations.push(FieldViolation::new("items", format!("at most {MAX_ITEMS} items per order")));
    } else {
        for (i, item) in request.items.iter().enumerate() {
            check_id(&mut violations, &format!("items[{i}].sku"), &item.sku, MAX_ID_LEN, true);
            if item.quantity == 0 {
                violations.push(FieldViolation::new(format!("items[{i}].quantity"), "must be at least 1"));
            } else if item.quantity > MAX_QUANTITY {
                violations.push(FieldViolation::new(format!("items[{i}].quantity"), format!("must be at most {MAX_QUANTITY}")));
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice::events::OrderItem;

    fn valid() -> PlaceOrderRequest {
        PlaceOrderRequest {
            customer_id: "c-1".into(),
            items: vec![OrderItem { sku: "SKU-1".into(), quantity: 2 }],
            payment_token: "tok_visa".into(),
            idempotency_key: String::new(),
        }
    }

    fn fields(request: &PlaceOrderRequest) -> Vec<String> {
        place_order(request).into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn a_valid_order_has_no_violations() {
        assert!(fields(&valid()).is_empty());
    }

    #[test]
    fn every_broken_rule_is_reported() {
        let mut request = valid();
        request.customer_id = " ".into();
        request.items = vec![OrderItem { sku: String::new(), quantity: 0 }, OrderItem { sku: "x".repeat(500), quantity: 1 }];
        request.idempotency_key = "k".repeat(129);
        assert_eq!(fields(&request), ["customer_id", "idempotency_key", "items[0].sku", "items[0].quantity", "items[1].sku"]);
    }

    #[test]
    fn empty_and_oversize_orders_are_refused() {
        let mut request = valid();
        request.items.clear();
        assert_eq!(fields(&request), ["items"]);
        request.items = vec![OrderItem { sku: "A".into(), quantity: 1 }; MAX_ITEMS + 1];
        assert_eq!(fields(&request), ["items"]);
    }
}
