//! The in-process broker behind the embedded default.
//!
//! It keeps the parts of RabbitMQ's contract the service relies on: a message
//! to a device is routed to that device's queue or returned as unroutable,
//! each queue is FIFO with one active consumer at a time, deliveries stay
//! unacked until acked, and a consumer that goes away hands its unacked
//! messages back to the head of the queue, marked redelivered.
//!
//! NOTE: queues live in memory only. The relay re-enqueues every unfinished
//! command from the store when the service starts, which is what makes a
//! restart lose nothing on this broker (see docs/ARCHITECTURE.md).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::{
    Acker, BrokerError, Delivery, Destination, MessageProperties, OutgoingMessage, Topology,
};
use crate::domain::DeviceId;

#[derive(Clone)]
pub struct MemoryBroker {
    topology: Topology,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    /// Woken whenever a queue gains a ready message, an ack frees a prefetch
    /// slot, or the active consumer changes.
    changed: Notify,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, Queue>,
    /// Routing keys bound on the commands exchange.
    device_bindings: HashSet<String>,
    next_consumer_id: u64,
    next_delivery_tag: u64,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Stored>,
    /// Unacked deliveries by tag; tags grow, so the map keeps delivery order.
    unacked: BTreeMap<u64, (u64, Stored)>,
    /// Consumers in the order they subscribed; the first is the active one.
    consumers: Vec<u64>,
}

#[derive(Clone)]
struct Stored {
    properties: MessageProperties,
    body: Vec<u8>,
    redelivered: bool,
}

impl MemoryBroker {
    pub fn new(topology: Topology) -> Self {
        Self {
            topology,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn declare_device(&self, device: &DeviceId) -> Result<(), BrokerError> {
        let mut state = self.shared.lock();
        state
            .queues
            .entry(self.topology.device_queue(device))
            .or_default();
        state
            .queues
            .entry(self.topology.control_queue(device))
            .or_default();
        state.device_bindings.insert(device.as_str().to_owned());
        Ok(())
    }

    pub fn declare_reports(&self) -> Result<(), BrokerError> {
        let mut state = self.shared.lock();
        state
            .queues
            .entry(self.topology.reports_queue())
            .or_default();
        Ok(())
    }

    pub fn publish(&self, message: &OutgoingMessage) -> Result<(), BrokerError> {
        let queue_name = match &message.destination {
            Destination::Device(device) => {
                self.declare_device(device)?;
                self.topology.device_queue(device)
            }
            Destination::Control(device) => {
                self.declare_device(device)?;
                self.topology.control_queue(device)
            }
            Destination::Queue(queue) => queue.clone(),
        };
        let mut state = self.shared.lock();
        let Some(queue) = state.queues.get_mut(&queue_name) else {
            return Err(BrokerError::Unroutable(message.destination.clone()));
        };
        queue.ready.push_back(Stored {
            properties: message.properties.clone(),
            body: message.body.clone(),
            redelivered: false,
        });
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(())
    }

    pub fn get(&self, queue: &str) -> Option<Delivery> {
        let mut state = self.shared.lock();
        state.next_delivery_tag += 1;
        let tag = state.next_delivery_tag;
        let entry = state.queues.get_mut(queue)?;
        let stored = entry.ready.pop_front()?;
        // Consumer id 0 is never given to a consumer: the message stays
        // unacked until acked or requeued through its acker.
        entry.unacked.insert(tag, (0, stored.clone()));
        Some(Delivery {
            properties: stored.properties,
            body: stored.body,
            redelivered: stored.redelivered,
            acker: Acker::Memory(MemoryAcker {
                shared: self.shared.clone(),
                queue: queue.to_owned(),
                tag,
            }),
        })
    }

    pub fn consume(&self, queue: &str, prefetch: u16) -> Result<MemoryConsumer, BrokerError> {
        let mut state = self.shared.lock();
        state.next_consumer_id += 1;
        let id = state.next_consumer_id;
        state
            .queues
            .entry(queue.to_owned())
            .or_default()
            .consumers
            .push(id);
        Ok(MemoryConsumer {
            shared: self.shared.clone(),
            queue: queue.to_owned(),
            id,
            prefetch: usize::from(prefetch.max(1)),
        })
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every
        // change is a single insert or remove), so a poisoned lock is used as is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct MemoryConsumer {
    shared: Arc<Shared>,
    queue: String,
    id: u64,
    prefetch: usize,
}

impl MemoryConsumer {
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            // Register interest before checking, so a publish between the
            // check and the wait is not missed.
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(delivery) = self.try_take() {
                return Some(delivery);
            }
            changed.await;
        }
    }

    fn try_take(&self) -> Option<Delivery> {
        let mut state = self.shared.lock();
        state.next_delivery_tag += 1;
        let tag = state.next_delivery_tag;
        let queue = state.queues.get_mut(&self.queue)?;
        if queue.consumers.first() != Some(&self.id) {
            return None;
        }
        let held = queue
            .unacked
            .values()
            .filter(|(owner, _)| *owner == self.id)
            .count();
        if held >= self.prefetch {
            return None;
        }
        let stored = queue.ready.pop_front()?;
        queue.unacked.insert(tag, (self.id, stored.clone()));
        Some(Delivery {
            properties: stored.properties,
            body: stored.body,
            redelivered: stored.redelivered,
            acker: Acker::Memory(MemoryAcker {
                shared: self.shared.clone(),
                queue: self.queue.clone(),
                tag,
            }),
        })
    }
}

impl Drop for MemoryConsumer {
    /// Hands every unacked delivery back to the head of the queue, in the
    /// order it was delivered, as RabbitMQ does when a channel closes.
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some(queue) = state.queues.get_mut(&self.queue) {
            queue.consumers.retain(|id| *id != self.id);
            let mine: Vec<u64> = queue
                .unacked
                .iter()
                .filter(|(_, (owner, _))| *owner == self.id)
                .map(|(tag, _)| *tag)
                .collect();
            for tag in mine.into_iter().rev() {
                if let Some((_, mut stored)) = queue.unacked.remove(&tag) {
                    stored.redelivered = true;
                    queue.ready.push_front(stored);
                }
            }
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }
}

#[derive(Debug)]
pub struct MemoryAcker {
    shared: Arc<Shared>,
    queue: String,
    tag: u64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

impl MemoryAcker {
    /// Removes the delivery; acking twice, or after the consumer went away
    /// and the message was handed back, does nothing, as in AMQP.
    pub fn ack(&self) {
        let mut state = self.shared.lock();
        if let Some(queue) = state.queues.get_mut(&self.queue) {
            queue.unacked.remove(&self.tag);
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }

    pub fn requeue(&self) {
        let mut state = self.shared.lock();
        if let Some(queue) = state.queues.get_mut(&self.queue)
            && let Some((_, mut stored)) = queue.unacked.remove(&self.tag)
        {
            stored.redelivered = true;
            queue.ready.push_front(stored);
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }
}
