//! command-dispatcher: delivers commands to devices over AMQP and reports
//! how they ended, behind a Microsoft Graph style HTTP API.

pub mod agent;
pub mod domain;
pub mod net;
pub mod postback;
