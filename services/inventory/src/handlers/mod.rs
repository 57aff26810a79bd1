//! Inventory's reactions to events, one handler per file.

mod commit_stock;
mod release_stock;
mod reserve_stock;

pub use commit_stock::CommitStock;
pub use release_stock::ReleaseStock;
pub use reserve_stock::ReserveStock;
