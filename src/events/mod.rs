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

/// Why a payload claimed to be an event is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// The type is not a registered event.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// The bytes are not a valid encoding of that type.
    #[error("payload is not a valid {type_name}: {reason}")]
    Undecodable {
        /// The claimed type.
        type_name: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// A required field is empty.
    #[error("field {0} must be set")]
    MissingField(&'static str),
}

/// Decodes a body as an event of one registered type and returns its `order_id` (`None` for a
/// type without one); generated for each in `crate::pb::EVENT_DECODERS`.
pub(crate) type Decoder = fn(&[u8]) -> Result<Option<String>, prost::DecodeError>;

/// The [`Decoder`] of `E`.
pub(crate) fn order_id_in<E: Event>(body: &[u8]) -> Result<Option<String>, prost::DecodeError> {
    E::decode(body).map(|event| event.order_id().map(str::to_owned))
}

/// A payload [`check_payload`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPayload {
    /// The event type's routing key.
    pub routing_key: &'static str,
    /// Its `order_id`, for events that have one (the message's `correlation_id`).
    pub order_id: Option<String>,
}

/// Checks that `body` is a valid, registered event of type `full_name` (decodable, with its
/// `order_id` set when it has one) and returns its routing key and order id.
pub fn check_payload(full_name: &str, body: &[u8]) -> Result<CheckedPayload, PayloadError> {
    let &(_, routing_key, decode) = crate::pb::EVENT_DECODERS
        .iter()
        .find(|(name, ..)| *name == full_name)
        .ok_or_else(|| PayloadError::UnknownType(full_name.to_owned()))?;
    // The compiled type's decoder: it accepts exactly the bytes that decoding by the type's
    // descriptor (prost-reflect's `DynamicMessage`, used here before) accepts; a test checks.
    let order_id = decode(body).map_err(|e| PayloadError::Undecodable { type_name: full_name.to_owned(), reason: e.to_string() })?;
    match order_id {
        Some(id) if id.is_empty() => Err(PayloadError::MissingField("order_id")),
        order_id => Ok(CheckedPayload { routing_key, order_id }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_checked_against_the_registry() {
        use prost::Message as _;
        let good = OrderCreated { order_id: "o-1".into(), ..Default::default() }.encode_to_vec();
        let checked = check_payload("sluice.v1.OrderCreated", &good).unwrap();
        assert_eq!((checked.routing_key, checked.order_id.as_deref()), ("order.created", Some("o-1")));
        assert!(matches!(check_payload("sluice.v1.Nope", &good), Err(PayloadError::UnknownType(_))));
        assert!(matches!(check_payload("sluice.v1.OrderCreated", b"\xff\xff"), Err(PayloadError::Undecodable { .. })));
        let empty = OrderCreated::default().encode_to_vec();
        assert_eq!(check_payload("sluice.v1.OrderCreated", &empty), Err(PayloadError::MissingField("order_id")));
    }

    /// Protobuf wire bytes of up to `fields` fields with random numbers (1 to 9, so known and
    /// unknown ones), wire types and payloads: nested messages, text, random bytes, varints.
    fn random_fields(rng: &mut fastrand::Rng, fields: usize, depth: u32) -> Vec<u8> {
        fn varint(out: &mut Vec<u8>, mut v: u64) {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        let mut out = Vec::new();
        for _ in 0..rng.usize(0..=fields) {
            let wire = [0, 1, 2, 2, 2, 5][rng.usize(0..6)];
            varint(&mut out, (rng.u64(1..=9) << 3) | wire);
            match wire {
                0 => varint(&mut out, if rng.bool() { rng.u64(0..300) } else { rng.u64(..) }),
                1 => out.extend(rng.u64(..).to_le_bytes()),
                5 => out.extend(rng.u32(..).to_le_bytes()),
                _ => {
                    let payload = match rng.u8(0..4) {
                        0 if depth > 0 => random_fields(rng, 4, depth - 1),
                        1 => (0..rng.usize(0..12)).map(|_| rng.lowercase() as u8).collect(),
                        2 => (0..rng.usize(0..12)).map(|_| rng.u8(..)).collect(),
                        _ => Vec::new(),
                    };
                    varint(&mut out, payload.len() as u64);
                    out.extend(payload);
                }
            }
        }
        if rng.u8(0..10) == 0 {
            out.truncate(rng.usize(0..=out.len()));
        }
        out
    }

    #[test]
    fn compiled_decoders_accept_what_the_descriptors_accept() {
        let pool = prost_reflect::DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let registered: Vec<(&str, &str)> = crate::pb::EVENT_DECODERS.iter().map(|(name, key, _)| (*name, *key)).collect();
        assert_eq!(registered, REGISTERED_EVENTS);
        for (name, _, decode) in crate::pb::EVENT_DECODERS {
            let descriptor = pool.get_message_by_name(name).unwrap();
            let order_id = descriptor.get_field_by_name("order_id");
            let (mut accepted, mut refused) = (0, 0);
            for _ in 0..4_000 {
                let body = random_fields(&mut rng, 6, 2);
                let dynamic = prost_reflect::DynamicMessage::decode(descriptor.clone(), body.as_slice());
                match (decode(&body), dynamic) {
                    (Ok(id), Ok(message)) => {
                        let expected = order_id.as_ref().map(|f| message.get_field(f).as_str().unwrap_or_default().to_owned());
                        assert_eq!(id, expected, "{name}: {body:02x?}");
                        accepted += 1;
                    }
                    (Err(_), Err(_)) => refused += 1,
                    (typed, dynamic) => panic!("{name}: {body:02x?}: compiled {typed:?}, by descriptor {:?}", dynamic.map(|_| ())),
                }
            }
            // Both kinds were tried, for every type.
            assert!(accepted > 100 && refused > 100, "{name}: {accepted} accepted, {refused} refused");
        }
    }

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
