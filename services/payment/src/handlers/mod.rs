//! Payment's reactions to events, one handler per file.

mod capture_payment;
mod record_payment_details;

pub use capture_payment::CapturePayment;
pub use record_payment_details::RecordPaymentDetails;
