//! The message broker behind one type: RabbitMQ in a deployment, or a queue
//! in the process for `usher dev` (ARCHITECTURE.md, "`usher dev` — the
//! embedded default").
//!
//! A service declares its [`Topology`], publishes through
//! [`Broker::publish`] or hands [`Broker::sink`] to its outbox relay, and
//! consumes with [`Broker::subscribe`]: each [`Received`] message is either
//! acked or requeued; one dropped without either goes back to its queue, as
//! RabbitMQ does with the unacked messages of a closed channel.
//!
//! [`MemoryBroker`] keeps the semantics the services rely on, and the
//! `conformance` suite runs the same checks on both: topic, direct and
//! fanout routing; `mandatory` messages with no queue refused, broadcasts
//! confirmed; prefetch bounds the unacked messages of a subscription;
//! requeued and abandoned messages come back; a queue with a message TTL and
//! a dead-letter exchange (a delay queue) forwards each message when its TTL
//! ends. What it does not keep is anything across a restart: messages in its
//! queues live in the process (the outbox has marked them sent), which is
//! why it is for development only.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture};
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::{
    amqp::{
        Amqp, AmqpError, ConfirmedPublisher, ExchangeType, MessageSink, OutgoingMessage,
        QueueArgument, QueueSpec, Topology,
    },
    config::AmqpConfig,
    health::Probe,
};

/// How long [`Broker::subscribe`] waits for RabbitMQ to be reachable.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// RabbitMQ, or the in-process broker. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Broker {
    inner: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    Amqp {
        amqp: Amqp,
        publisher: Arc<ConfirmedPublisher>,
    },
    Memory(MemoryBroker),
}

impl Broker {
    /// RabbitMQ at `config`, with a supervised connection named `name`.
    pub fn connect(config: AmqpConfig, name: &str) -> Self {
        Self::amqp(Amqp::start(config, name))
    }

    /// RabbitMQ on an existing connection.
    pub fn amqp(amqp: Amqp) -> Self {
        Self {
            inner: Backend::Amqp {
                publisher: Arc::new(ConfirmedPublisher::new(amqp.clone())),
                amqp,
            },
        }
    }

    /// The in-process broker `memory` (clones share its queues).
    pub fn memory(memory: MemoryBroker) -> Self {
        Self {
            inner: Backend::Memory(memory),
        }
    }

    /// Declares `topology` (on RabbitMQ: again on every reconnect).
    pub async fn declare(&self, topology: Topology) -> Result<(), AmqpError> {
        match &self.inner {
            Backend::Amqp { amqp, .. } => amqp.declare(topology).await,
            Backend::Memory(memory) => {
                memory.declare(&topology);
                Ok(())
            }
        }
    }

    /// Where the outbox relay publishes.
    pub fn sink(&self) -> Arc<dyn MessageSink> {
        match &self.inner {
            Backend::Amqp { publisher, .. } => publisher.clone(),
            Backend::Memory(memory) => Arc::new(memory.clone()),
        }
    }

    /// Publishes one message; `Ok` once the broker has it.
    pub async fn publish(&self, message: &OutgoingMessage) -> Result<(), AmqpError> {
        match &self.inner {
            Backend::Amqp { publisher, .. } => publisher.publish(message).await,
            Backend::Memory(memory) => memory.publish(message),
        }
    }

    /// Consumes `queue` with at most `prefetch` messages unacked at a time.
    /// On RabbitMQ it waits (up to 30 s) for the connection first.
    pub async fn subscribe(
        &self,
        queue: &str,
        consumer: &str,
        prefetch: u16,
    ) -> Result<Subscription, AmqpError> {
        match &self.inner {
            Backend::Amqp { amqp, .. } => {
                amqp.wait_connected(CONNECT_WAIT).await?;
                let channel = amqp.channel().await?;
                let lapin = |e: lapin::Error| AmqpError::from_lapin(&e);
                channel
                    .basic_qos(prefetch, BasicQosOptions::default())
                    .await
                    .map_err(lapin)?;
                let consumer = channel
                    .basic_consume(
                        queue.into(),
                        consumer.into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(lapin)?;
                Ok(Subscription {
                    inner: Source::Amqp {
                        channel,
                        consumer: Box::new(consumer),
                    },
                })
            }
            Backend::Memory(memory) => Ok(Subscription {
                inner: Source::Memory {
                    queue: memory.queue(queue)?,
                    permits: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
                },
            }),
        }
    }

    /// The health probe: `amqp` (connected) or `broker` (always up).
    pub fn probe(&self) -> Probe {
        match &self.inner {
            Backend::Amqp { amqp, .. } => Probe::amqp(amqp.clone()),
            Backend::Memory(_) => Probe::new("broker", || async { true }),
        }
    }

    /// Closes the connection (RabbitMQ); nothing for the in-process broker.
    pub async fn close(&self) {
        if let Backend::Amqp { amqp, .. } = &self.inner {
            amqp.close().await;
        }
    }
}

/// Messages arriving from one queue.
pub struct Subscription {
    inner: Source,
}

enum Source {
    Amqp {
        channel: lapin::Channel,
        consumer: Box<lapin::Consumer>,
    },
    Memory {
        queue: Arc<MemoryQueue>,
        permits: Arc<Semaphore>,
    },
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            Source::Amqp { .. } => "amqp",
            Source::Memory { .. } => "memory",
        };
        f.debug_struct("Subscription")
            .field("backend", &kind)
            .finish()
    }
}

impl Subscription {
    /// The next message; `None` when the subscription ended (the channel or
    /// connection closed: subscribe again).
    pub async fn next(&mut self) -> Option<Result<Received, AmqpError>> {
        match &mut self.inner {
            Source::Amqp { consumer, .. } => {
                let delivery = consumer.next().await?;
                Some(
                    delivery
                        .map(Received::from_delivery)
                        .map_err(|e| AmqpError::from_lapin(&e)),
                )
            }
            Source::Memory { queue, permits } => {
                let permit = permits.clone().acquire_owned().await.ok()?;
                let message = queue.pop().await;
                Some(Ok(Received {
                    data: message.payload.clone(),
                    message_id: Some(message.message_id.clone()).filter(|id| !id.is_empty()),
                    routing_key: message.routing_key.clone(),
                    content_type: Some(message.content_type.clone()),
                    kind: Some(message.kind.clone()),
                    timestamp: Some(message.timestamp),
                    headers: message.headers.clone(),
                    ack: Ack::Memory {
                        queue: queue.clone(),
                        message: Some(message),
                        _permit: permit,
                    },
                }))
            }
        }
    }

    /// Stops consuming; unacked messages go back to the queue.
    pub async fn close(self) {
        if let Source::Amqp { channel, .. } = self.inner {
            let _ = channel.close(200, "consumer stopped".into()).await;
        }
    }
}

/// One message taken from a queue.
pub struct Received {
    /// Its body.
    pub data: Vec<u8>,
    /// Its message id, when it has one.
    pub message_id: Option<String>,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Its AMQP `content_type`, when it has one.
    pub content_type: Option<String>,
    /// Its AMQP `type`, when it has one.
    pub kind: Option<String>,
    /// Its AMQP `timestamp` (seconds since the Unix epoch), when it has one.
    pub timestamp: Option<u64>,
    /// Its string headers.
    pub headers: std::collections::BTreeMap<String, String>,
    ack: Ack,
}

enum Ack {
    Amqp(Box<Delivery>),
    Memory {
        queue: Arc<MemoryQueue>,
        message: Option<Stored>,
        _permit: OwnedSemaphorePermit,
    },
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("bytes", &self.data.len())
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

impl Received {
    fn from_delivery(mut delivery: Delivery) -> Self {
        let headers = delivery
            .properties
            .headers()
            .as_ref()
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .filter_map(|(name, value)| {
                        let text = match value {
                            lapin::types::AMQPValue::LongString(s) => s.to_string(),
                            lapin::types::AMQPValue::ShortString(s) => s.to_string(),
                            _ => return None,
                        };
                        Some((name.to_string(), text))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let text =
            |value: &Option<lapin::types::ShortString>| value.as_ref().map(ToString::to_string);
        Self {
            // Taken, not copied: acking needs only the delivery tag.
            data: std::mem::take(&mut delivery.data),
            message_id: text(delivery.properties.message_id()),
            routing_key: delivery.routing_key.to_string(),
            content_type: text(delivery.properties.content_type()),
            kind: text(delivery.properties.kind()),
            timestamp: *delivery.properties.timestamp(),
            headers,
            ack: Ack::Amqp(Box::new(delivery)),
        }
    }

    /// Done with it: the broker forgets it.
    pub async fn ack(mut self) -> Result<(), AmqpError> {
        match &mut self.ack {
            Ack::Amqp(delivery) => delivery
                .ack(BasicAckOptions::default())
                .await
                .map(drop)
                .map_err(|e| AmqpError::from_lapin(&e)),
            Ack::Memory { message, .. } => {
                message.take();
                Ok(())
            }
        }
    }

    /// Puts it back at the head of its queue, for another delivery.
    pub async fn requeue(mut self) -> Result<(), AmqpError> {
        match &mut self.ack {
            Ack::Amqp(delivery) => delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .map(drop)
                .map_err(|e| AmqpError::from_lapin(&e)),
            Ack::Memory { queue, message, .. } => {
                if let Some(message) = message.take() {
                    queue.push_front(message);
                }
                Ok(())
            }
        }
    }
}

/// Acknowledges every message of `batch` at once. On RabbitMQ it is one
/// `basic.ack` with `multiple` set, on the newest delivery tag of the batch:
/// that also acknowledges any *earlier* message of the same subscription
/// still unacknowledged, so the caller must have settled (acked or requeued)
/// every message its subscription delivered before the newest of `batch`,
/// or put it in `batch`; all of `batch` must come from one subscription.
/// The in-process broker acks each message.
pub async fn ack_all(batch: Vec<Received>) -> Result<(), AmqpError> {
    let mut newest: Option<Received> = None;
    for mut received in batch {
        match &mut received.ack {
            Ack::Amqp(delivery) => {
                let older = newest.as_ref().is_some_and(|n| match &n.ack {
                    Ack::Amqp(kept) => kept.delivery_tag > delivery.delivery_tag,
                    Ack::Memory { .. } => false,
                });
                if !older {
                    // The one kept acknowledges this one too.
                    newest = Some(received);
                }
            }
            Ack::Memory { .. } => received.ack().await?,
        }
    }
    let Some(newest) = newest else {
        return Ok(());
    };
    match &newest.ack {
        Ack::Amqp(delivery) => delivery
            .ack(BasicAckOptions { multiple: true })
            .await
            .map(drop)
            .map_err(|e| AmqpError::from_lapin(&e)),
        Ack::Memory { .. } => newest.ack().await,
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        // Neither acked nor requeued (its handler was cancelled): back to
        // the queue, as a broker does with a closed channel's messages.
        if let Self::Memory { queue, message, .. } = self
            && let Some(message) = message.take()
        {
            queue.push_front(message);
        }
    }
}

// ---------------------------------------------------------------------------
// In-process broker

/// A message in an in-process queue.
#[derive(Clone, Debug)]
struct Stored {
    /// Unique in the broker: a delay queue's timer finds its message by it.
    seq: u64,
    routing_key: String,
    payload: Vec<u8>,
    message_id: String,
    content_type: String,
    kind: String,
    timestamp: u64,
    headers: std::collections::BTreeMap<String, String>,
}

/// One in-process queue.
struct MemoryQueue {
    name: String,
    messages: Mutex<VecDeque<Stored>>,
    arrived: Notify,
    /// `x-message-ttl`, with where expired messages go: `(exchange,
    /// routing key or the message's own)`.
    expiry: Option<(Duration, String, Option<String>)>,
    broker: Weak<Mutex<State>>,
}

impl MemoryQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Stored>> {
        self.messages.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_back(self: &Arc<Self>, message: Stored) {
        let seq = message.seq;
        self.lock().push_back(message);
        self.arrived.notify_one();
        if let Some((ttl, _, _)) = &self.expiry {
            let queue = Arc::downgrade(self);
            let ttl = *ttl;
            tokio::spawn(async move {
                tokio::time::sleep(ttl).await;
                if let Some(queue) = queue.upgrade() {
                    queue.expire(seq);
                }
            });
        }
    }

    fn push_front(&self, message: Stored) {
        self.lock().push_front(message);
        self.arrived.notify_one();
    }

    /// Waits for the head of the queue and takes it.
    async fn pop(&self) -> Stored {
        loop {
            // Registered before looking, so a push in between still wakes us.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let (message, more) = {
                let mut messages = self.lock();
                let message = messages.pop_front();
                (message, !messages.is_empty())
            };
            if let Some(message) = message {
                // Others may be waiting for what is left.
                if more {
                    self.arrived.notify_one();
                }
                return message;
            }
            arrived.await;
        }
    }

    /// Dead-letters message `seq` if it is still waiting.
    fn expire(&self, seq: u64) {
        let Some((_, exchange, routing_key)) = &self.expiry else {
            return;
        };
        let message = {
            let mut messages = self.lock();
            let Some(index) = messages.iter().position(|m| m.seq == seq) else {
                return;
            };
            messages.remove(index)
        };
        let (Some(message), Some(state)) = (message, self.broker.upgrade()) else {
            return;
        };
        let routing_key = routing_key
            .clone()
            .unwrap_or_else(|| message.routing_key.clone());
        let targets = MemoryBroker::route(&state, exchange, &routing_key);
        if targets.is_empty() {
            tracing::debug!(queue = %self.name, %exchange, "expired message dropped: no route");
        }
        for queue in targets {
            let mut copy = message.clone();
            copy.routing_key.clone_from(&routing_key);
            copy.seq = next_seq(&state);
            queue.push_back(copy);
        }
    }
}

#[derive(Default)]
struct State {
    exchanges: HashMap<String, ExchangeType>,
    queues: HashMap<String, Arc<MemoryQueue>>,
    /// `(exchange, binding key, queue)`.
    bindings: Vec<(String, String, String)>,
    seq: u64,
}

fn next_seq(state: &Mutex<State>) -> u64 {
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    state.seq += 1;
    state.seq
}

/// The in-process broker of `usher dev`: exchanges, queues and bindings as
/// declared, in memory. Clones share everything, so the services of one
/// process talk through it.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryBroker")
            .field("exchanges", &state.exchanges.len())
            .field("queues", &state.queues.len())
            .finish()
    }
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds what `topology` names and is not there yet.
    pub fn declare(&self, topology: &Topology) {
        let weak = Arc::downgrade(&self.state);
        let mut state = self.lock();
        for exchange in &topology.exchanges {
            state
                .exchanges
                .entry(exchange.name.clone())
                .or_insert(exchange.kind);
        }
        for spec in &topology.queues {
            state
                .queues
                .entry(spec.name.clone())
                .or_insert_with(|| Arc::new(queue_of(spec, weak.clone())));
        }
        for binding in &topology.bindings {
            let entry = (
                binding.exchange.clone(),
                binding.routing_key.clone(),
                binding.queue.clone(),
            );
            if !state.bindings.contains(&entry) {
                state.bindings.push(entry);
            }
        }
    }

    /// How many messages wait in `queue` (not counting unacked ones).
    pub fn depth(&self, queue: &str) -> usize {
        self.lock().queues.get(queue).map_or(0, |q| q.lock().len())
    }

    fn queue(&self, name: &str) -> Result<Arc<MemoryQueue>, AmqpError> {
        self.lock()
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| AmqpError::Protocol(format!("404 NOT_FOUND: no queue {name:?}")))
    }

    /// The queues `routing_key` on `exchange` reaches.
    fn route(state: &Mutex<State>, exchange: &str, routing_key: &str) -> Vec<Arc<MemoryQueue>> {
        let state = state.lock().unwrap_or_else(|e| e.into_inner());
        if exchange.is_empty() {
            // The default exchange: the queue named by the routing key.
            return state.queues.get(routing_key).cloned().into_iter().collect();
        }
        let Some(kind) = state.exchanges.get(exchange) else {
            return Vec::new();
        };
        let mut targets: Vec<Arc<MemoryQueue>> = Vec::new();
        for (bound, key, queue) in &state.bindings {
            let matches = bound == exchange
                && match kind {
                    ExchangeType::Topic => topic_matches(key, routing_key),
                    ExchangeType::Direct => key == routing_key,
                    ExchangeType::Fanout => true,
                };
            if matches
                && let Some(queue) = state.queues.get(queue)
                && !targets.iter().any(|t| Arc::ptr_eq(t, queue))
            {
                targets.push(queue.clone());
            }
        }
        targets
    }

    /// Routes `message`: `Ok` once it is in every queue it reaches.
    pub fn publish(&self, message: &OutgoingMessage) -> Result<(), AmqpError> {
        if !message.exchange.is_empty() && !self.lock().exchanges.contains_key(&message.exchange) {
            return Err(AmqpError::Protocol(format!(
                "404 NOT_FOUND: no exchange {:?}",
                message.exchange
            )));
        }
        let targets = Self::route(&self.state, &message.exchange, &message.routing_key);
        if targets.is_empty() && message.mandatory {
            return Err(AmqpError::Returned {
                reply_code: 312,
                reply_text: "NO_ROUTE".into(),
            });
        }
        for queue in targets {
            queue.push_back(Stored {
                seq: next_seq(&self.state),
                routing_key: message.routing_key.clone(),
                payload: message.payload.clone(),
                message_id: message.message_id.clone(),
                content_type: message.content_type.clone(),
                kind: message.kind.clone(),
                timestamp: message.timestamp_or_now(),
                headers: message.headers.clone(),
            });
        }
        Ok(())
    }
}

impl MessageSink for MemoryBroker {
    fn publish_batch<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<(), AmqpError>>> {
        Box::pin(async move { messages.iter().map(|m| self.publish(m)).collect() })
    }
}

fn queue_of(spec: &QueueSpec, broker: Weak<Mutex<State>>) -> MemoryQueue {
    let text = |name: &str| match spec.arguments.get(name) {
        Some(QueueArgument::Text(text)) => Some(text.clone()),
        _ => None,
    };
    let ttl = match spec.arguments.get("x-message-ttl") {
        Some(QueueArgument::Int(ms)) => u64::try_from(*ms).ok().map(Duration::from_millis),
        _ => None,
    };
    let expiry = match (ttl, text("x-dead-letter-exchange")) {
        (Some(ttl), Some(exchange)) => Some((ttl, exchange, text("x-dead-letter-routing-key"))),
        _ => None,
    };
    MemoryQueue {
        name: spec.name.clone(),
        messages: Mutex::new(VecDeque::new()),
        arrived: Notify::new(),
        expiry,
        broker,
    }
}

/// Whether the topic `routing_key` matches the binding `pattern` (`*` one
/// word, `#` zero or more words, words split by `.`).
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    fn matches(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| matches(rest, &key[skip..])),
            Some((word, rest)) => key.split_first().is_some_and(|(first, tail)| {
                (*word == "*" || word == first) && matches(rest, tail)
            }),
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = if routing_key.is_empty() {
        Vec::new()
    } else {
        routing_key.split('.').collect()
    };
    matches(&pattern, &key)
}

/// The checks both brokers pass (run by this module's tests on each).
#[cfg(test)]
pub(crate) mod conformance {
    use std::time::Duration;

    use super::{Broker, Received, Subscription};
    use crate::amqp::{ExchangeType, OutgoingMessage, QueueSpec, Topology};

    /// Names unique to one run, so tests on a shared RabbitMQ do not meet.
    pub struct Names {
        pub exchange: String,
        pub direct: String,
        pub queue: String,
        pub other: String,
        pub delay: String,
        pub by_name_delay: String,
    }

    impl Names {
        pub fn new() -> Self {
            let id = uuid::Uuid::new_v4().simple().to_string();
            Self {
                exchange: format!("conf.topic.{id}"),
                direct: format!("conf.direct.{id}"),
                queue: format!("conf.q.{id}"),
                other: format!("conf.other.{id}"),
                delay: format!("conf.delay.{id}"),
                by_name_delay: format!("conf.delay-by-name.{id}"),
            }
        }

        pub fn topology(&self) -> Topology {
            Topology::new()
                .topic_exchange(&self.exchange)
                .exchange(&self.direct, ExchangeType::Direct)
                .queue(QueueSpec::exclusive(&self.queue))
                .queue(QueueSpec::exclusive(&self.other))
                .queue(
                    QueueSpec::exclusive(&self.delay)
                        .with_message_ttl(Duration::from_millis(300))
                        .with_dead_letter(&self.exchange, Some("job.retry")),
                )
                .queue(
                    QueueSpec::exclusive(&self.by_name_delay)
                        .with_message_ttl(Duration::from_millis(300))
                        .with_dead_letter("", Some(&self.queue)),
                )
                .bind(&self.queue, &self.exchange, "job.#")
                .bind(&self.other, &self.exchange, "*.audit")
                .bind(&self.delay, &self.direct, "later")
        }
    }

    async fn next(subscription: &mut Subscription) -> Received {
        tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .expect("a message within 5 s")
            .expect("subscription open")
            .expect("a message")
    }

    async fn nothing(subscription: &mut Subscription, wait: Duration) {
        let got = tokio::time::timeout(wait, subscription.next()).await;
        assert!(got.is_err(), "expected no message, got {got:?}");
    }

    fn message(exchange: &str, key: &str, body: &str) -> OutgoingMessage {
        OutgoingMessage::new(exchange, key, "test", body.as_bytes().to_vec())
            .with_header("x-test", body)
    }

    /// Routing, refusals, ack, requeue, abandon, prefetch and delay queues.
    pub async fn run(broker: &Broker) {
        let names = Names::new();
        broker.declare(names.topology()).await.expect("declare");
        let mut queue = broker
            .subscribe(&names.queue, "conformance", 2)
            .await
            .expect("subscribe");
        let mut other = broker
            .subscribe(&names.other, "conformance", 10)
            .await
            .expect("subscribe other");

        // Topic routing: `job.#` takes `job.a.b`, `*.audit` takes `x.audit`.
        broker
            .publish(&message(&names.exchange, "job.a.b", "one").with_message_id("m-1"))
            .await
            .expect("publish one");
        broker
            .publish(&message(&names.exchange, "x.audit", "audit"))
            .await
            .expect("publish audit");
        let one = next(&mut queue).await;
        assert_eq!(one.data, b"one");
        assert_eq!(one.message_id.as_deref(), Some("m-1"));
        assert_eq!(one.routing_key, "job.a.b");
        assert_eq!(one.content_type.as_deref(), Some("application/protobuf"));
        assert_eq!(one.kind.as_deref(), Some("test"));
        let now = u64::try_from(crate::clock::Clock::now(&crate::clock::SystemClock).timestamp())
            .expect("after 1970");
        let stamped = one.timestamp.expect("a timestamp");
        assert!(now.abs_diff(stamped) <= 60, "{stamped} vs {now}");
        assert_eq!(one.headers.get("x-test").map(String::as_str), Some("one"));
        assert_eq!(next(&mut other).await.data, b"audit");

        // A mandatory message nobody receives is refused; a broadcast is not.
        let unrouted = broker
            .publish(&message(&names.exchange, "nobody.here", "lost"))
            .await;
        assert!(unrouted.is_err(), "mandatory without a route: {unrouted:?}");
        broker
            .publish(&message(&names.exchange, "nobody.here", "event").broadcast())
            .await
            .expect("a broadcast without a route is confirmed");

        // Requeued: delivered again.
        one.requeue().await.expect("requeue");
        let again = next(&mut queue).await;
        assert_eq!(again.data, b"one");
        again.ack().await.expect("ack");

        // Prefetch 2: a third message waits until one of two is acked.
        for body in ["p1", "p2", "p3"] {
            broker
                .publish(&message(&names.exchange, "job.p", body))
                .await
                .expect("publish");
        }
        let p1 = next(&mut queue).await;
        let p2 = next(&mut queue).await;
        nothing(&mut queue, Duration::from_millis(300)).await;
        p1.ack().await.expect("ack p1");
        let p3 = next(&mut queue).await;
        assert_eq!(
            (p2.data.as_slice(), p3.data.as_slice()),
            (&b"p2"[..], &b"p3"[..])
        );
        p3.ack().await.expect("ack p3");
        // p2 abandoned with its subscription: it comes back to the next one.
        drop(p2);
        queue.close().await;
        let mut queue = broker
            .subscribe(&names.queue, "conformance", 2)
            .await
            .expect("subscribe again");
        let p2 = next(&mut queue).await;
        assert_eq!(p2.data, b"p2");
        p2.ack().await.expect("ack p2");

        // A batch acked at once (one multiple-ack on RabbitMQ): none comes
        // back to the next subscription; the one requeued before it does.
        for body in ["b1", "b2", "b3"] {
            broker
                .publish(&message(&names.exchange, "job.b", body))
                .await
                .expect("publish");
        }
        let mut queue = {
            queue.close().await;
            broker
                .subscribe(&names.queue, "conformance", 3)
                .await
                .expect("subscribe for a batch")
        };
        let b1 = next(&mut queue).await;
        let b2 = next(&mut queue).await;
        let b3 = next(&mut queue).await;
        b2.requeue().await.expect("requeue b2");
        super::ack_all(vec![b3, b1]).await.expect("ack the batch");
        let b2 = next(&mut queue).await;
        assert_eq!(b2.data, b"b2");
        b2.ack().await.expect("ack b2");
        nothing(&mut queue, Duration::from_millis(300)).await;
        queue.close().await;
        let mut queue = broker
            .subscribe(&names.queue, "conformance", 2)
            .await
            .expect("subscribe after the batch");
        nothing(&mut queue, Duration::from_millis(300)).await;

        // A delay queue forwards after its TTL, with its dead-letter key.
        let sent = std::time::Instant::now();
        broker
            .publish(&message(&names.direct, "later", "delayed"))
            .await
            .expect("publish delayed");
        let delayed = next(&mut queue).await;
        assert_eq!(delayed.data, b"delayed");
        assert!(
            sent.elapsed() >= Duration::from_millis(250),
            "forwarded after {:?}",
            sent.elapsed()
        );
        delayed.ack().await.expect("ack delayed");

        // Through the default exchange by queue name, in and out (the email
        // pipeline's private retries).
        broker
            .publish(&message("", &names.by_name_delay, "by name"))
            .await
            .expect("publish by queue name");
        let by_name = next(&mut queue).await;
        assert_eq!(by_name.data, b"by name");
        by_name.ack().await.expect("ack by name");
        nothing(&mut queue, Duration::from_millis(200)).await;
        queue.close().await;
        other.close().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("email.send", "email.send"));
        assert!(!topic_matches("email.send", "email.sent"));
        assert!(topic_matches("email.result.*", "email.result.invitation"));
        assert!(!topic_matches("email.result.*", "email.result"));
        assert!(!topic_matches("email.result.*", "email.result.a.b"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#", "a.b.c"));
        assert!(topic_matches("a.#", "a"));
        assert!(topic_matches("a.#.z", "a.b.c.z"));
        assert!(topic_matches("*.audit", "user.audit"));
        assert!(!topic_matches("*.audit", "audit"));
    }

    #[tokio::test]
    async fn memory_broker_conforms() {
        conformance::run(&Broker::memory(MemoryBroker::new())).await;
    }

    #[tokio::test]
    async fn amqp_broker_conforms() {
        let broker = Broker::connect(crate::amqp::tests::test_config(), "conformance");
        conformance::run(&broker).await;
        broker.close().await;
    }

    #[tokio::test]
    async fn unknown_names_are_refused() {
        let broker = Broker::memory(MemoryBroker::new());
        let missing = broker
            .publish(&OutgoingMessage::new("nowhere", "k", "t", vec![]))
            .await;
        assert!(
            matches!(missing, Err(AmqpError::Protocol(_))),
            "{missing:?}"
        );
        assert!(broker.subscribe("nope", "c", 1).await.is_err());
        assert!(broker.probe().check().await);
    }

    #[tokio::test]
    async fn competing_consumers_share_a_queue() {
        let memory = MemoryBroker::new();
        let broker = Broker::memory(memory.clone());
        broker
            .declare(
                Topology::new()
                    .queue(QueueSpec::durable("work"))
                    .topic_exchange("x")
                    .bind("work", "x", "#"),
            )
            .await
            .expect("declare");
        let mut a = broker.subscribe("work", "a", 1).await.expect("a");
        let mut b = broker.subscribe("work", "b", 1).await.expect("b");
        for i in 0..2 {
            broker
                .sink()
                .publish_batch(&[OutgoingMessage::new("x", "k", "t", vec![i])])
                .await
                .into_iter()
                .for_each(|r| r.expect("published"));
        }
        let first = a.next().await.expect("open").expect("a gets one");
        let second = b.next().await.expect("open").expect("b gets the other");
        let mut bodies = vec![first.data.clone(), second.data.clone()];
        bodies.sort();
        assert_eq!(bodies, vec![vec![0], vec![1]]);
        first.ack().await.expect("ack");
        second.ack().await.expect("ack");
        assert_eq!(memory.depth("work"), 0);
    }
}
