//! Validated domain values. Each type is parsed once at the edge (HTTP or
//! AMQP), so code that holds one never checks it again.

mod command_type;
mod device_id;
pub mod postback_uri;
mod status;

pub use command_type::CommandType;
pub use device_id::{DeviceId, InvalidDeviceId, MAX_DEVICE_ID_BYTES};
pub use status::CommandStatus;
