//! command-dispatcher: delivers commands to devices over AMQP and reports
//! how they ended, behind a Microsoft Graph style HTTP API.

pub mod agent;
pub mod api;
pub mod backoff;
pub mod broker;
pub mod cli;
pub mod command;
pub mod contract;
pub mod domain;
pub mod logging;
pub mod net;
pub mod postback;
pub mod run;
pub mod server;
pub mod store;
