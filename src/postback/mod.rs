//! Postbacks: signed webhook deliveries to a command's `PostBackUri`.

pub mod client;
pub mod schedule;
pub mod signature;
