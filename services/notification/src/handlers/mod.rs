//! Notification's reactions to events: one handler per outcome the customer hears about.

mod notify_confirmation;
mod notify_decline;
mod notify_rejection;

pub use notify_confirmation::NotifyConfirmation;
pub use notify_decline::NotifyDecline;
pub use notify_rejection::NotifyRejection;
