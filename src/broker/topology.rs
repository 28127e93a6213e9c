use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::domain::{DeviceId, MAX_DEVICE_ID_BYTES};

/// AMQP short strings, and so queue and exchange names, hold at most 255 bytes.
const MAX_AMQP_NAME_BYTES: usize = 255;

/// The kind of RabbitMQ queue that stores each device's commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueKind {
    /// Classic durable queues: the right choice on a single broker.
    #[default]
    Classic,
    /// Quorum queues: replicated across a RabbitMQ cluster, for failover.
    ///
    /// NOTE: on RabbitMQ 3.10 a command returned to a quorum queue when its
    /// agent's consumer goes away can come back behind the next waiting one
    /// (seen in tests/broker_contract.rs), so the device may then run those
    /// two out of order.
    Quorum,
}

impl QueueKind {
    /// Returns the value of `--queue-type` that selects this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }

    /// Returns the other kind, which is what an existing queue has when it
    /// conflicts with this one, because the service declares no other kind.
    pub fn other(self) -> Self {
        match self {
            Self::Classic => Self::Quorum,
            Self::Quorum => Self::Classic,
        }
    }
}

/// The names of every exchange and queue the service uses, all under one
/// prefix so that several deployments (or test runs) can share a broker.
///
/// The public message contract in docs/amqp.md describes these names.
#[derive(Clone, Debug)]
pub struct Topology {
    prefix: String,
    queue_kind: QueueKind,
}

impl Topology {
    /// Builds the names under `prefix`, which must leave room for the longest
    /// device id inside the 255-byte limit of AMQP names.
    pub fn new(prefix: &str, queue_kind: QueueKind) -> Result<Self, String> {
        if prefix.is_empty() || prefix.len() > MAX_PREFIX_BYTES {
            return Err(format!(
                "AMQP prefix {prefix:?} must be 1 to {MAX_PREFIX_BYTES} bytes long so that queue names stay within {MAX_AMQP_NAME_BYTES} bytes"
            ));
        }
        if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!(
                "AMQP prefix {prefix:?} must not contain whitespace or control characters"
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            queue_kind,
        })
    }

    /// Returns the kind of queue this topology declares.
    pub fn queue_kind(&self) -> QueueKind {
        self.queue_kind
    }

    /// Returns the direct exchange that routes commands by device id.
    pub fn commands_exchange(&self) -> String {
        format!("{}.commands", self.prefix)
    }

    /// Returns the durable queue that stores one device's commands.
    pub fn device_queue(&self, device: &DeviceId) -> String {
        format!("{}{DEVICE_QUEUE_INFIX}{device}", self.prefix)
    }

    /// Returns the direct exchange that routes cancel notices by device id.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// The durable queue of one device's cancel notices. It is apart from the
    /// device queue so that a notice can overtake the commands queued there.
    pub fn control_queue(&self, device: &DeviceId) -> String {
        format!("{}{CONTROL_QUEUE_INFIX}{device}", self.prefix)
    }

    /// The queue where devices send status reports, named in each command's
    /// `reply_to`.
    pub fn reports_queue(&self) -> String {
        format!("{}.reports", self.prefix)
    }

    /// Arguments every declaration of a device queue must repeat exactly,
    /// because RabbitMQ closes the channel when a redeclaration differs.
    ///
    /// A single active consumer keeps one device's commands in order even
    /// when two agents for the same device connect at once.
    pub fn device_queue_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert(
            ShortString::from("x-single-active-consumer"),
            AMQPValue::Boolean(true),
        );
        if self.queue_kind == QueueKind::Quorum {
            arguments.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString("quorum".into()),
            );
        }
        arguments
    }

    /// Arguments every declaration of a control queue must repeat exactly.
    ///
    /// The agent reads notices with `basic.get`, which RabbitMQ (3.10 at
    /// least) refuses with `RESOURCE_LOCKED` on a quorum queue with a single
    /// active consumer, so quorum control queues leave that argument out.
    /// Classic control queues keep it, so that queues already declared with
    /// it still match.
    pub fn control_queue_arguments(&self) -> FieldTable {
        match self.queue_kind {
            QueueKind::Classic => self.device_queue_arguments(),
            QueueKind::Quorum => self.reports_queue_arguments(),
        }
    }

    /// Selects the arguments to declare `queue` with, by its name. A name
    /// that is neither the reports queue nor a control queue gets the
    /// device queue's arguments.
    pub fn queue_arguments(&self, queue: &str) -> FieldTable {
        if queue == self.reports_queue() {
            self.reports_queue_arguments()
        } else if queue.starts_with(&format!("{}{CONTROL_QUEUE_INFIX}", self.prefix)) {
            self.control_queue_arguments()
        } else {
            self.device_queue_arguments()
        }
    }

    /// Arguments for the reports queue; quorum on clusters, like device queues.
    pub fn reports_queue_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self.queue_kind == QueueKind::Quorum {
            arguments.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString("quorum".into()),
            );
        }
        arguments
    }
}

const DEVICE_QUEUE_INFIX: &str = ".device.";
const CONTROL_QUEUE_INFIX: &str = ".control.";
/// The longest prefix that keeps the longest queue name, a control queue of
/// a device id of the maximum length, within the AMQP limit.
const MAX_PREFIX_BYTES: usize =
    MAX_AMQP_NAME_BYTES - CONTROL_QUEUE_INFIX.len() - MAX_DEVICE_ID_BYTES;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_prefix() {
        let topology = Topology::new("cd", QueueKind::Classic).unwrap();
        let device = DeviceId::parse("kiosk-1").unwrap();
        assert_eq!(topology.commands_exchange(), "cd.commands");
        assert_eq!(topology.device_queue(&device), "cd.device.kiosk-1");
        assert_eq!(topology.reports_queue(), "cd.reports");
        assert_eq!(topology.control_exchange(), "cd.control");
        assert_eq!(topology.control_queue(&device), "cd.control.kiosk-1");
    }

    #[test]
    fn longest_queue_names_fit_amqp_limit() {
        let topology = Topology::new(&"p".repeat(MAX_PREFIX_BYTES), QueueKind::Classic).unwrap();
        let device = DeviceId::parse(&"d".repeat(MAX_DEVICE_ID_BYTES)).unwrap();
        assert_eq!(topology.control_queue(&device).len(), MAX_AMQP_NAME_BYTES);
        assert!(topology.device_queue(&device).len() < MAX_AMQP_NAME_BYTES);
    }

    #[test]
    fn prefix_one_byte_too_long_is_rejected() {
        let prefix = "p".repeat(MAX_PREFIX_BYTES + 1);
        assert!(Topology::new(&prefix, QueueKind::Classic).is_err());
    }

    #[test]
    fn quorum_control_queue_has_no_single_active_consumer() {
        let device = DeviceId::parse("kiosk-1").unwrap();
        let single_active = ShortString::from("x-single-active-consumer");
        let quorum = Topology::new("cd", QueueKind::Quorum).unwrap();
        let control = quorum.queue_arguments(&quorum.control_queue(&device));
        assert!(!control.inner().contains_key(&single_active));
        assert!(
            control
                .inner()
                .contains_key(&ShortString::from("x-queue-type"))
        );
        let device_queue = quorum.queue_arguments(&quorum.device_queue(&device));
        assert!(device_queue.inner().contains_key(&single_active));

        let classic = Topology::new("cd", QueueKind::Classic).unwrap();
        let control = classic.queue_arguments(&classic.control_queue(&device));
        assert!(control.inner().contains_key(&single_active));
    }

    #[test]
    fn rejects_prefix_that_leaves_no_room() {
        let prefix = "p".repeat(200);
        assert!(Topology::new(&prefix, QueueKind::Classic).is_err());
        assert!(Topology::new("", QueueKind::Classic).is_err());
        assert!(Topology::new("a b", QueueKind::Classic).is_err());
    }
}
