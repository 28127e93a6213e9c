//! The device side: consumes a device queue, runs commands, reports back.

pub mod handlers;
pub mod journal;
pub mod runner;
