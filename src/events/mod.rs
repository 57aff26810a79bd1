//! Events: Protobuf messages bound to a routing key on the `sluice.events` exchange.
//!
//! The binding is declared once, in the `.proto` (`option (routing_key) = "order.created"`);
//! `build.rs` turns it into an [`Event`] impl. Nothing in Rust spells a routing key by hand.

pub use crate::pb::{
    InventoryRejected, InventoryReleased, InventoryReserved, NotificationKind, NotificationSent,
    OrderCreated, OrderItem, PaymentCaptured, PaymentDeclined, PricedLine, REGISTERED_EVENTS,
};

/// A Protobuf message that travels on the bus as an event.
pub trait Event: prost::Message + Default + Clone + Send + Sync + 'static {
    /// Routing key on the `sluice.events` topic exchange, from the `.proto` option.
    const ROUTING_KEY: &'static str;
    /// Full Protobuf name (`sluice.v1.OrderCreated`), sent as the AMQP `type` property.
    const FULL_NAME: &'static str;
    /// The order this event belongs to, if any; it becomes the message's `correlation_id`.
    fn order_id(&self) -> Option<&str>;
}

/// Is `full_name` a registered event type? Returns its routing key if so.
pub fn routing_key_of(full_name: &str) -> Option<&'static str> {
    REGISTERED_EVENTS
        .iter()
        .find(|(name, _)| *name == full_name)
        .map(|(_, key)| *key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_come_from_the_proto_options() {
        assert_eq!(OrderCreated::ROUTING_KEY, "order.created");
        assert_eq!(PaymentDeclined::ROUTING_KEY, "payment.declined");
        assert_eq!(NotificationSent::FULL_NAME, "sluice.v1.NotificationSent");
        assert_eq!(REGISTERED_EVENTS.len(), 7);
        assert_eq!(routing_key_of("sluice.v1.InventoryReleased"), Some("inventory.released"));
        assert_eq!(routing_key_of("sluice.v1.PlaceOrderRequest"), None);
    }

    #[test]
    fn order_id_is_the_correlation_id() {
        let event = OrderCreated { order_id: "o-1".into(), ..Default::default() };
        assert_eq!(event.order_id(), Some("o-1"));
    }
}
