//! The payment provider. The reference domain ships a deterministic sandbox with the same
//! tokens as common provider sandboxes: `tok_decline` is refused, any other `tok_*` token is
//! charged. A real provider plugs in here.

/// What the provider said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    /// Money moved; the provider's payment id.
    Captured { payment_id: String },
    /// The provider refused; why.
    Declined { reason: String },
}

/// A sandbox provider.
#[derive(Debug, Clone, Default)]
pub struct Sandbox;

impl Sandbox {
    /// Charges `amount_cents` to `token`. Deterministic: the payment id is derived from the
    /// order id, so retrying a charge can never charge twice.
    pub fn charge(&self, order_id: &str, token: &str, amount_cents: i64) -> Charge {
        if token == "tok_decline" {
            return Charge::Declined { reason: "card declined".into() };
        }
        if !token.starts_with("tok_") {
            return Charge::Declined { reason: "invalid payment token".into() };
        }
        if amount_cents <= 0 {
            return Charge::Declined { reason: "nothing to charge".into() };
        }
        let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("payment/{order_id}").as_bytes());
        Charge::Captured { payment_id: format!("pay_{}", id.simple()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_tokens_behave_like_a_provider_sandbox() {
        let sandbox = Sandbox;
        assert!(matches!(sandbox.charge("o", "tok_visa", 100), Charge::Captured { .. }));
        assert_eq!(sandbox.charge("o", "tok_visa", 100), sandbox.charge("o", "tok_visa", 100));
        assert!(matches!(sandbox.charge("o", "tok_decline", 100), Charge::Declined { .. }));
        assert!(matches!(sandbox.charge("o", "4111111111111111", 100), Charge::Declined { .. }));
    }
}
