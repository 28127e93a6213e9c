//! Network policy for outgoing requests to caller-chosen URLs.

pub mod address;
