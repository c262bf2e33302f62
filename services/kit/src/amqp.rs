//! The RabbitMQ connection every service shares: one supervised connection
//! that recovers by itself, idempotent topology, and confirmed publishing.
//!
//! # Recovery
//!
//! [`Amqp::start`] spawns a supervisor task that owns the `lapin` connection.
//! It connects (heartbeat from [`AmqpConfig::heartbeat_secs`], the connection
//! name in the client properties so operators can find it in
//! `rabbitmqctl list_connections`), then watches the connection's events and
//! status; when the connection drops — broker restart, missed heartbeats, a
//! close from the broker side — it reconnects with exponential backoff and
//! jitter between `reconnect_min_ms` and `reconnect_max_ms`, for ever, until
//! shut down. A broker that is down at start is just the first failed attempt:
//! [`Amqp::start`] never fails.
//!
//! lapin 4 has its own recovery (`ConnectionProperties::enable_auto_recover`),
//! but it gives up after a bounded number of TCP attempts (16 by default), its
//! backoff is not ours to jitter, and channels it replays sit in a
//! "reconnecting" state that each caller must handle with `wait_for_recovery`.
//! One supervisor with one explicit state (connected or not) is easier to
//! reason about and to test, so it is off here.
//!
//! # Topology
//!
//! Exchanges, queues and bindings are described by a [`Topology`] value and
//! registered with [`Amqp::declare`] (or [`Amqp::declare_topic_exchange`]).
//! A registered topology is declared at once when connected, and the
//! supervisor declares every registered topology again on each (re)connect,
//! *before* the connection is reported up — so once [`Amqp::wait_connected`]
//! returns, the topology exists. A declaration the broker refuses (say, a
//! queue redeclared with other arguments) fails that connection attempt: it is
//! logged and retried with backoff, and health stays down rather than running
//! with a half-made topology.
//!
//! # Publishing
//!
//! [`MessageSink`] is the object-safe publishing contract the outbox relay
//! uses; [`ConfirmedPublisher`] implements it on RabbitMQ with publisher
//! confirms: persistent, `mandatory` messages, a whole batch written before
//! its confirms are awaited, and a nack, a timeout or a returned (unroutable)
//! message reported per message.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use futures::{StreamExt, future::BoxFuture};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event, ExchangeKind,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    protocol::AMQPErrorKind,
    types::{AMQPValue, FieldTable, LongString, ShortString},
    uri::AMQPUri,
};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::AmqpConfig;

/// The topic exchange domain events are published on (routing keys like
/// `invitation.accepted`).
pub const EVENTS_EXCHANGE: &str = "usher.events";
/// The durable topic exchange of the email pipeline: producers publish email
/// jobs with routing key [`EMAIL_SEND_ROUTING_KEY`]; the notification service
/// binds its queue to it and publishes delivery results back on it.
pub const EMAIL_EXCHANGE: &str = "usher.email";
/// Routing key of email jobs on [`EMAIL_EXCHANGE`].
pub const EMAIL_SEND_ROUTING_KEY: &str = "email.send";
/// AMQP `type` of an email job.
pub const EMAIL_JOB_TYPE: &str = "usher.notification.v1.EmailJob";
/// AMQP `content_type` of protobuf payloads.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/protobuf";

/// The outbox message carrying an email job, as `email_job.proto` describes
/// it: on [`EMAIL_EXCHANGE`] with [`EMAIL_SEND_ROUTING_KEY`], the job id as
/// the message id, binary protobuf.
pub fn email_job_message(job: &usher_proto::notification::v1::EmailJob) -> OutgoingMessage {
    use prost::Message as _;
    let message = OutgoingMessage::new(
        EMAIL_EXCHANGE,
        EMAIL_SEND_ROUTING_KEY,
        EMAIL_JOB_TYPE,
        job.encode_to_vec(),
    )
    .with_message_id(job.job_id.clone())
    .with_content_type(PROTOBUF_CONTENT_TYPE);
    match job
        .create_time
        .as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
    {
        Some(created) => message.with_timestamp(created),
        None => message,
    }
}

/// AMQP `delivery_mode` of a message the broker writes to disk.
const PERSISTENT: u8 = 2;
/// How long one connection attempt (TCP, TLS and AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the supervisor double-checks the connection status, in case an
/// error event is missed.
const STATUS_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How long a clean close may take on shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// AMQP reply code of a normal close.
const REPLY_SUCCESS: u16 = 200;

/// Why a broker operation failed. Cloneable so one failure can be reported
/// for every message of a batch.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AmqpError {
    /// Not connected to the broker (down, unreachable, or reconnecting).
    #[error("broker unavailable")]
    Unavailable,
    /// The broker refused the message (`basic.nack`).
    #[error("message nacked by the broker")]
    Nacked,
    /// The broker returned a `mandatory` message: no queue is bound for it.
    #[error("message returned by the broker: {reply_code} {reply_text}")]
    Returned {
        /// AMQP reply code, e.g. 312 (`NO_ROUTE`).
        reply_code: u16,
        /// The broker's explanation.
        reply_text: String,
    },
    /// No confirm arrived within `confirm_timeout_ms`; the message may or may
    /// not have been routed.
    #[error("publisher confirm timed out")]
    ConfirmTimeout,
    /// The broker refused an operation, or the message cannot be encoded.
    #[error("amqp protocol error: {0}")]
    Protocol(String),
}

impl AmqpError {
    /// Maps a lapin error: a channel-level refusal (soft error) is about this
    /// operation; everything else means the connection is not usable.
    pub(crate) fn from_lapin(error: &lapin::Error) -> Self {
        match error.kind() {
            lapin::ErrorKind::ProtocolError(amqp)
                if matches!(amqp.kind(), AMQPErrorKind::Soft(_)) =>
            {
                Self::Protocol(format!("{} {}", amqp.get_id(), amqp.get_message()))
            }
            lapin::ErrorKind::ParsingError(_)
            | lapin::ErrorKind::SerialisationError(_)
            | lapin::ErrorKind::ChannelsLimitReached => Self::Protocol(error.to_string()),
            _ => Self::Unavailable,
        }
    }
}

/// One message to publish. Stored as is in the outbox, so it is serde-able
/// (the payload as base64 in JSON).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingMessage {
    /// Exchange to publish to (`""` is the default exchange).
    pub exchange: String,
    /// Routing key, at most 255 bytes.
    pub routing_key: String,
    /// The body, usually an encoded protobuf message.
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    /// AMQP `content_type`: [`PROTOBUF_CONTENT_TYPE`] unless replaced.
    pub content_type: String,
    /// AMQP `message_id`: consumers deduplicate on it (delivery is at least once).
    pub message_id: String,
    /// AMQP `type`: what the payload is, e.g. `usher.events.v1.InvitationAccepted`.
    pub kind: String,
    /// AMQP `timestamp`, in seconds since the Unix epoch: when the message
    /// was made (for a domain event, when its change was committed; for an
    /// email job, its `create_time`). A message without one is stamped when
    /// it is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// Application headers, e.g. CloudEvents attributes (`cloudEvents_source`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Published `mandatory`: a message no queue receives comes back as
    /// [`AmqpError::Returned`] and stays in the outbox. True for work that
    /// must be done (email jobs); false for domain events, which nobody may
    /// be subscribed to yet.
    #[serde(default = "mandatory_by_default")]
    pub mandatory: bool,
}

fn mandatory_by_default() -> bool {
    true
}

impl OutgoingMessage {
    /// A protobuf message ([`PROTOBUF_CONTENT_TYPE`]) for
    /// `exchange`/`routing_key` with a fresh random message id, of type
    /// `kind` (timestamped when published unless [`Self::with_timestamp`]
    /// says otherwise).
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        kind: impl Into<String>,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            payload,
            content_type: PROTOBUF_CONTENT_TYPE.into(),
            message_id: uuid::Uuid::new_v4().to_string(),
            kind: kind.into(),
            timestamp: None,
            // The trace of the call that makes the message continues in its
            // consumers (empty when traces are off).
            headers: crate::telemetry::current_trace_headers(),
            mandatory: true,
        }
    }

    /// Marks the message as a broadcast (a domain event): confirmed even when
    /// no queue is bound to receive it.
    #[must_use]
    pub fn broadcast(mut self) -> Self {
        self.mandatory = false;
        self
    }

    /// Replaces the message id (use a domain id to make retries idempotent).
    #[must_use]
    pub fn with_message_id(mut self, message_id: impl Into<String>) -> Self {
        self.message_id = message_id.into();
        self
    }

    /// Replaces the content type.
    #[must_use]
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = content_type.into();
        self
    }

    /// Replaces the AMQP timestamp (e.g. with the time of the change an
    /// event describes).
    #[must_use]
    pub fn with_timestamp(mut self, time: chrono::DateTime<chrono::Utc>) -> Self {
        self.timestamp = Some(unix_seconds(time));
        self
    }

    /// The AMQP timestamp to send: the message's own, or now.
    pub fn timestamp_or_now(&self) -> u64 {
        self.timestamp
            .unwrap_or_else(|| unix_seconds(crate::clock::Clock::now(&crate::clock::SystemClock)))
    }

    /// Adds an application header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The AMQP properties of this message: persistent, with its ids and headers.
    fn properties(&self) -> Result<BasicProperties, AmqpError> {
        let mut headers = FieldTable::default();
        for (name, value) in &self.headers {
            headers.insert(
                short(name)?,
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        Ok(BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type(short(&self.content_type)?)
            .with_message_id(short(&self.message_id)?)
            .with_type(short(&self.kind)?)
            .with_timestamp(self.timestamp_or_now())
            .with_headers(headers))
    }
}

/// Seconds since the Unix epoch (AMQP timestamps have a one-second
/// resolution); 0 for a time before it.
fn unix_seconds(time: chrono::DateTime<chrono::Utc>) -> u64 {
    u64::try_from(time.timestamp()).unwrap_or(0)
}

// Payloads never reach logs: `Debug` shows their size only.
impl fmt::Debug for OutgoingMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingMessage")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("payload_bytes", &self.payload.len())
            .field("content_type", &self.content_type)
            .field("message_id", &self.message_id)
            .field("kind", &self.kind)
            .field("timestamp", &self.timestamp)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

mod base64_bytes {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// An AMQP short string, refused (not truncated, not panicking) past 255 bytes.
fn short(value: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(value).map_err(|_| {
        AmqpError::Protocol(format!(
            "value longer than 255 bytes: {} bytes",
            value.len()
        ))
    })
}

/// Where messages go. Object-safe and free of lapin types, so the outbox relay
/// works the same with RabbitMQ ([`ConfirmedPublisher`]) and with the
/// in-process sink of `usher dev`.
pub trait MessageSink: Send + Sync + fmt::Debug {
    /// Publishes `messages` and returns one result per message, in order. An
    /// `Ok` means the message is safely with the broker (confirmed).
    fn publish_batch<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<(), AmqpError>>>;
}

/// The kind of an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeType {
    /// Routing-key patterns (`invitation.*`).
    Topic,
    /// Exact routing key.
    Direct,
    /// Every bound queue.
    Fanout,
}

impl ExchangeType {
    fn lapin(self) -> ExchangeKind {
        match self {
            Self::Topic => ExchangeKind::Topic,
            Self::Direct => ExchangeKind::Direct,
            Self::Fanout => ExchangeKind::Fanout,
        }
    }
}

/// A durable exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeSpec {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: ExchangeType,
}

/// A value of a queue argument (`x-queue-type`, `x-message-ttl`, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueArgument {
    /// A string, e.g. `quorum`.
    Text(String),
    /// A number, e.g. a TTL in milliseconds.
    Int(i64),
}

/// A queue. Build it with [`QueueSpec::durable`] and the `with_*` helpers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    /// Its name.
    pub name: String,
    /// Survives a broker restart.
    pub durable: bool,
    /// Private to the declaring connection and deleted with it (re-declared on
    /// every reconnect, so it comes back empty).
    pub exclusive: bool,
    /// Broker arguments.
    pub arguments: BTreeMap<String, QueueArgument>,
}

impl QueueSpec {
    /// A durable classic queue.
    pub fn durable(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            durable: true,
            exclusive: false,
            arguments: BTreeMap::new(),
        }
    }

    /// A non-durable queue that belongs to this connection only.
    pub fn exclusive(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            durable: false,
            exclusive: true,
            arguments: BTreeMap::new(),
        }
    }

    /// Makes it a quorum queue (replicated; must be durable).
    #[must_use]
    pub fn quorum(self) -> Self {
        self.with_argument("x-queue-type", QueueArgument::Text("quorum".into()))
    }

    /// Dead-letters rejected or expired messages to `exchange`, with
    /// `routing_key` when given (otherwise their own).
    #[must_use]
    pub fn with_dead_letter(self, exchange: impl Into<String>, routing_key: Option<&str>) -> Self {
        let spec = self.with_argument(
            "x-dead-letter-exchange",
            QueueArgument::Text(exchange.into()),
        );
        match routing_key {
            Some(key) => {
                spec.with_argument("x-dead-letter-routing-key", QueueArgument::Text(key.into()))
            }
            None => spec,
        }
    }

    /// Expires messages after `ttl` (a delay queue when combined with a dead-letter exchange).
    #[must_use]
    pub fn with_message_ttl(self, ttl: Duration) -> Self {
        let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.with_argument("x-message-ttl", QueueArgument::Int(millis))
    }

    /// Adds any broker argument.
    #[must_use]
    pub fn with_argument(mut self, name: impl Into<String>, value: QueueArgument) -> Self {
        self.arguments.insert(name.into(), value);
        self
    }

    fn field_table(&self) -> Result<FieldTable, AmqpError> {
        let mut table = FieldTable::default();
        for (name, value) in &self.arguments {
            let value = match value {
                QueueArgument::Text(text) => AMQPValue::LongString(LongString::from(text.as_str())),
                QueueArgument::Int(number) => AMQPValue::LongLongInt(*number),
            };
            table.insert(short(name)?, value);
        }
        Ok(table)
    }
}

/// A binding of a queue to an exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingSpec {
    /// The queue.
    pub queue: String,
    /// The exchange.
    pub exchange: String,
    /// The binding key (a pattern on topic exchanges).
    pub routing_key: String,
}

/// Exchanges, queues and bindings, declared in that order, idempotently, on
/// every (re)connect once registered with [`Amqp::declare`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// Durable exchanges.
    pub exchanges: Vec<ExchangeSpec>,
    /// Queues.
    pub queues: Vec<QueueSpec>,
    /// Bindings.
    pub bindings: Vec<BindingSpec>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a durable topic exchange.
    #[must_use]
    pub fn topic_exchange(self, name: impl Into<String>) -> Self {
        self.exchange(name, ExchangeType::Topic)
    }

    /// Adds a durable exchange of the given kind.
    #[must_use]
    pub fn exchange(mut self, name: impl Into<String>, kind: ExchangeType) -> Self {
        self.exchanges.push(ExchangeSpec {
            name: name.into(),
            kind,
        });
        self
    }

    /// Adds a queue.
    #[must_use]
    pub fn queue(mut self, queue: QueueSpec) -> Self {
        self.queues.push(queue);
        self
    }

    /// Binds `queue` to `exchange` with `routing_key`.
    #[must_use]
    pub fn bind(
        mut self,
        queue: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        self.bindings.push(BindingSpec {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        });
        self
    }

    /// Declares everything on `channel` in one round trip: every
    /// declaration but the last is sent without waiting for its answer
    /// (`nowait`), the last one waits. The broker handles a channel's
    /// methods in order, so exchanges exist before the bindings that use
    /// them, and a refused declaration closes the channel: the last one
    /// then fails with the broker's reason, whichever was refused.
    async fn declare_on(&self, channel: &Channel) -> Result<(), AmqpError> {
        let lapin_err = |e: lapin::Error| AmqpError::from_lapin(&e);
        let total = self.exchanges.len() + self.queues.len() + self.bindings.len();
        let mut sent = 0;
        let mut nowait = || {
            sent += 1;
            sent < total
        };
        for exchange in &self.exchanges {
            let options = ExchangeDeclareOptions {
                durable: true,
                nowait: nowait(),
                ..Default::default()
            };
            channel
                .exchange_declare(
                    short(&exchange.name)?,
                    exchange.kind.lapin(),
                    options,
                    FieldTable::default(),
                )
                .await
                .map_err(lapin_err)?;
        }
        for queue in &self.queues {
            let options = QueueDeclareOptions {
                durable: queue.durable,
                exclusive: queue.exclusive,
                nowait: nowait(),
                ..Default::default()
            };
            channel
                .queue_declare(short(&queue.name)?, options, queue.field_table()?)
                .await
                .map_err(lapin_err)?;
        }
        for binding in &self.bindings {
            let options = QueueBindOptions { nowait: nowait() };
            channel
                .queue_bind(
                    short(&binding.queue)?,
                    short(&binding.exchange)?,
                    short(&binding.routing_key)?,
                    options,
                    FieldTable::default(),
                )
                .await
                .map_err(lapin_err)?;
        }
        Ok(())
    }
}

/// The live connection and which one it is (bumped on every reconnect).
#[derive(Clone)]
struct Live {
    connection: Arc<Connection>,
    generation: u64,
}

/// What the supervisor and every [`Amqp`] handle share.
struct Shared {
    connection_name: String,
    config: AmqpConfig,
    state: watch::Sender<Option<Live>>,
    /// Held across "declare and publish the state" by the supervisor and
    /// across "register and declare" by [`Amqp::declare`], so a topology
    /// registered during a reconnect is never missed.
    topology: tokio::sync::Mutex<Vec<Topology>>,
}

struct Inner {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    supervisor: StdMutex<Option<JoinHandle<()>>>,
    /// Stops the supervisor when the last handle is dropped.
    _stop_on_drop: DropGuard,
}

/// A supervised connection to RabbitMQ. Cheap to clone; every clone shares
/// the one connection. See the module documentation for recovery and topology.
#[derive(Clone)]
pub struct Amqp {
    inner: Arc<Inner>,
}

impl fmt::Debug for Amqp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Amqp")
            .field("connection_name", &self.inner.shared.connection_name)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Amqp {
    /// Starts the supervisor (must run inside a Tokio runtime). Never fails:
    /// while the broker is down, [`Amqp::is_connected`] is false and
    /// [`Amqp::channel`] answers [`AmqpError::Unavailable`].
    pub fn start(config: AmqpConfig, connection_name: &str) -> Self {
        Self::start_with_shutdown(config, connection_name, CancellationToken::new())
    }

    /// Like [`Amqp::start`], stopping when `shutdown` is cancelled (the
    /// service's shutdown token) or [`Amqp::close`] is called.
    pub fn start_with_shutdown(
        config: AmqpConfig,
        connection_name: &str,
        shutdown: CancellationToken,
    ) -> Self {
        let shutdown = shutdown.child_token();
        let (state, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            connection_name: connection_name.to_owned(),
            config,
            state,
            topology: tokio::sync::Mutex::new(Vec::new()),
        });
        let supervisor = tokio::spawn(supervise(shared.clone(), shutdown.clone()));
        Self {
            inner: Arc::new(Inner {
                shared,
                _stop_on_drop: shutdown.clone().drop_guard(),
                shutdown,
                supervisor: StdMutex::new(Some(supervisor)),
            }),
        }
    }

    /// Whether the connection is up (and its topology declared). Health checks use it.
    pub fn is_connected(&self) -> bool {
        self.current()
            .is_some_and(|live| live.connection.status().connected())
    }

    /// Waits until connected, at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), AmqpError> {
        let mut state = self.inner.shared.state.subscribe();
        let connected = tokio::time::timeout(timeout, async {
            loop {
                if self.is_connected() {
                    return true;
                }
                if state.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        match connected {
            Ok(true) => Ok(()),
            _ => Err(AmqpError::Unavailable),
        }
    }

    /// A fresh channel on the current connection. The caller owns it and
    /// should close it when done; it dies with the connection.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        Ok(self.channel_with_generation().await?.0)
    }

    async fn channel_with_generation(&self) -> Result<(Channel, u64), AmqpError> {
        let live = self.current().ok_or(AmqpError::Unavailable)?;
        let channel = live
            .connection
            .create_channel()
            .await
            .map_err(|e| AmqpError::from_lapin(&e))?;
        Ok((channel, live.generation))
    }

    fn current(&self) -> Option<Live> {
        self.inner.shared.state.borrow().clone()
    }

    /// Registers `topology` to be declared on every (re)connect, and declares
    /// it now when connected. While disconnected it returns `Ok`: the
    /// supervisor declares it before reporting the connection up. A topology
    /// the broker refuses now (e.g. a queue that exists with other arguments)
    /// is not kept, so it cannot fail every later reconnect: the error is
    /// returned instead.
    pub async fn declare(&self, topology: Topology) -> Result<(), AmqpError> {
        let mut registered = self.inner.shared.topology.lock().await;
        let Some(live) = self.current() else {
            if !registered.contains(&topology) {
                registered.push(topology);
            }
            return Ok(());
        };
        match declare_all(&live.connection, std::slice::from_ref(&topology)).await {
            // The connection dropped meanwhile: the supervisor will declare it.
            Ok(()) | Err(AmqpError::Unavailable) => {
                if !registered.contains(&topology) {
                    registered.push(topology);
                }
                Ok(())
            }
            Err(refused) => Err(refused),
        }
    }

    /// Registers and declares a durable topic exchange (see [`Amqp::declare`]).
    pub async fn declare_topic_exchange(&self, name: &str) -> Result<(), AmqpError> {
        self.declare(Topology::new().topic_exchange(name)).await
    }

    /// Closes the connection and stops the supervisor; waits for both.
    pub async fn close(&self) {
        self.inner.shutdown.cancel();
        let supervisor = self
            .inner
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(supervisor) = supervisor
            && let Err(error) = supervisor.await
        {
            tracing::warn!(%error, "amqp supervisor ended abnormally");
        }
    }
}

/// Declares `topologies` on a channel of its own, then closes it.
async fn declare_all(connection: &Connection, topologies: &[Topology]) -> Result<(), AmqpError> {
    if topologies.is_empty() {
        return Ok(());
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| AmqpError::from_lapin(&e))?;
    for topology in topologies {
        topology.declare_on(&channel).await?;
    }
    // A failed declaration has already closed the channel on the broker side.
    let _ = channel
        .close(REPLY_SUCCESS, "topology declared".into())
        .await;
    Ok(())
}

/// Why a watched connection stopped.
enum Ended {
    Shutdown,
    Lost(String),
}

/// The supervisor: connect, declare, publish the state, watch, repeat.
async fn supervise(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut failures: u32 = 0;
    let mut generation: u64 = 0;
    let name = shared.connection_name.clone();
    // Looked up on each change rather than held: a handle taken before the
    // process installed its recorder would record nowhere.
    let connected_gauge = ConnectedGauge(name.clone());
    connected_gauge.set(0.0);
    loop {
        let attempt = tokio::select! {
            () = shutdown.cancelled() => break,
            attempt = connect(&shared) => attempt,
        };
        match attempt {
            Ok(connection) => {
                let connection = Arc::new(connection);
                // Declare and go live under the topology lock (see `Shared::topology`).
                let registered = shared.topology.lock().await;
                match declare_all(&connection, &registered).await {
                    Ok(()) => {
                        generation += 1;
                        shared.state.send_replace(Some(Live {
                            connection: connection.clone(),
                            generation,
                        }));
                        drop(registered);
                        tracing::info!(connection = %name, generation, "amqp connected");
                        connected_gauge.set(1.0);
                        let since = tokio::time::Instant::now();
                        let ended = watch_connection(&connection, &shutdown).await;
                        shared.state.send_replace(None);
                        connected_gauge.set(0.0);
                        match ended {
                            Ended::Shutdown => {
                                close_connection(&connection).await;
                                break;
                            }
                            Ended::Lost(reason) => {
                                tracing::warn!(connection = %name, generation, %reason, "amqp connection lost");
                                // A connection that stayed up a while starts the
                                // backoff over; one that flaps keeps backing off.
                                if since.elapsed()
                                    >= Duration::from_millis(shared.config.reconnect_max_ms)
                                {
                                    failures = 0;
                                }
                            }
                        }
                    }
                    Err(error) => {
                        drop(registered);
                        tracing::error!(connection = %name, %error, "amqp topology declaration failed");
                        close_connection(&connection).await;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(connection = %name, %error, attempt = failures + 1, "amqp connect failed");
            }
        }
        let delay = backoff(&shared.config, failures);
        failures = failures.saturating_add(1);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    shared.state.send_replace(None);
    connected_gauge.set(0.0);
    tracing::info!(connection = %name, "amqp supervisor stopped");
}

/// `usher_amqp_connected{connection}`: 1 while the connection is up.
struct ConnectedGauge(String);

impl ConnectedGauge {
    fn set(&self, value: f64) {
        metrics::gauge!("usher_amqp_connected", "connection" => self.0.clone()).set(value);
    }
}

/// One connection attempt, bounded by [`CONNECT_TIMEOUT`].
async fn connect(shared: &Shared) -> Result<Connection, String> {
    // The URL carries the password: only "invalid url" is ever reported.
    let mut uri: AMQPUri = shared
        .config
        .url
        .expose()
        .parse()
        .map_err(|_| "invalid amqp url".to_owned())?;
    uri.query.heartbeat = Some(shared.config.heartbeat_secs);
    // lapin keeps 32 frames of send and of receive buffer: at RabbitMQ's
    // default of 128 KiB that is 8 MiB per connection, most of a service's
    // idle memory, for messages of a few KiB.
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(shared.config.frame_max_bytes);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = u64::try_from(CONNECT_TIMEOUT.as_millis()).ok();
    }
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(shared.connection_name.as_str()))
        .with_client_property("product".into(), LongString::from("usher"));
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("connect timed out".to_owned()),
    }
}

/// Waits until the connection fails or shutdown is asked for. Listens to
/// lapin's events and also polls the status, so no way of dying is missed.
async fn watch_connection(connection: &Connection, shutdown: &CancellationToken) -> Ended {
    let mut events = std::pin::pin!(connection.events_listener());
    let mut check = tokio::time::interval(STATUS_CHECK_INTERVAL);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            event = events.next() => match event {
                // Channel-level errors (a refused declaration, a publish to a
                // missing exchange) come through here too: only a connection
                // that is no longer open counts. lapin updates the status
                // before it sends the event.
                Some(Event::Error(error)) if !connection.status().connected() => {
                    return Ended::Lost(error.to_string());
                }
                Some(Event::Error(error)) => tracing::debug!(%error, "amqp channel error"),
                Some(Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(%reason, "amqp connection blocked by the broker");
                }
                Some(Event::ConnectionUnblocked) => tracing::info!("amqp connection unblocked"),
                Some(_) => {}
                None => return Ended::Lost("event stream ended".into()),
            },
            _ = check.tick() => {
                if !connection.status().connected() {
                    return Ended::Lost("connection no longer open".into());
                }
            }
        }
    }
}

async fn close_connection(connection: &Connection) {
    if connection.status().connected() {
        let closing = connection.close(REPLY_SUCCESS, "shutdown".into());
        if let Ok(Err(error)) = tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
            tracing::debug!(%error, "amqp close failed");
        }
    }
}

/// Exponential backoff with "equal jitter": a delay drawn in the upper half of
/// `min · 2^failures`, capped at `max`, never below `min`.
fn backoff(config: &AmqpConfig, failures: u32) -> Duration {
    let min = config.reconnect_min_ms.max(1);
    let max = config.reconnect_max_ms.max(min);
    let ceiling = min.saturating_mul(1u64 << failures.min(32)).min(max);
    let floor = (ceiling / 2).max(min).min(ceiling);
    Duration::from_millis(rand::rng().random_range(floor..=ceiling))
}

/// The channel a [`ConfirmedPublisher`] publishes on, and what it learnt on it.
#[derive(Default)]
struct PublisherState {
    channel: Option<(Channel, u64)>,
    /// Exchanges seen to exist on connection `known_generation`.
    known_exchanges: HashSet<String>,
    known_generation: u64,
}

/// Publishes with publisher confirms on a channel of its own, re-opened
/// transparently after a reconnect. Batches are serialised (one channel).
#[derive(Clone)]
pub struct ConfirmedPublisher {
    amqp: Amqp,
    state: Arc<tokio::sync::Mutex<PublisherState>>,
}

impl fmt::Debug for ConfirmedPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfirmedPublisher")
            .field("amqp", &self.amqp)
            .finish()
    }
}

impl ConfirmedPublisher {
    /// A publisher on `amqp`'s connection. Opens nothing until the first batch.
    pub fn new(amqp: Amqp) -> Self {
        Self {
            amqp,
            state: Arc::default(),
        }
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: &OutgoingMessage) -> Result<(), AmqpError> {
        self.publish_confirmed(std::slice::from_ref(message))
            .await
            .pop()
            .unwrap_or(Err(AmqpError::Unavailable))
    }

    /// The confirm-mode channel of the current connection, opened when missing
    /// or left over from an earlier connection.
    async fn ensure_channel(&self, state: &mut PublisherState) -> Result<Channel, AmqpError> {
        let current = self.amqp.current().ok_or(AmqpError::Unavailable)?;
        if let Some((channel, generation)) = &state.channel
            && *generation == current.generation
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        state.channel = None;
        let (channel, generation) = self.amqp.channel_with_generation().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| AmqpError::from_lapin(&e))?;
        if generation != state.known_generation {
            state.known_exchanges.clear();
            state.known_generation = generation;
        }
        state.channel = Some((channel.clone(), generation));
        Ok(channel)
    }

    /// Checks (passively) that each exchange of the batch exists, once per
    /// connection. Publishing to a missing exchange closes the channel, which
    /// would fail every later message of the batch too — and again on every
    /// retry — so such messages are refused here without being sent.
    async fn missing_exchanges(
        &self,
        state: &mut PublisherState,
        messages: &[OutgoingMessage],
    ) -> Result<HashSet<String>, AmqpError> {
        let mut missing = HashSet::new();
        for message in messages {
            let name = &message.exchange;
            if name.is_empty() || state.known_exchanges.contains(name) || missing.contains(name) {
                continue;
            }
            let Ok(exchange) = short(name) else { continue }; // refused per message later
            let probe = self.amqp.channel().await?;
            let options = ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match probe
                .exchange_declare(
                    exchange,
                    ExchangeKind::Direct,
                    options,
                    FieldTable::default(),
                )
                .await
            {
                Ok(()) => {
                    state.known_exchanges.insert(name.clone());
                    let _ = probe.close(REPLY_SUCCESS, "probe done".into()).await;
                }
                Err(error) => match AmqpError::from_lapin(&error) {
                    AmqpError::Protocol(_) => {
                        missing.insert(name.clone());
                    }
                    other => return Err(other),
                },
            }
        }
        Ok(missing)
    }

    async fn publish_confirmed(&self, messages: &[OutgoingMessage]) -> Vec<Result<(), AmqpError>> {
        let mut results: Vec<Option<Result<(), AmqpError>>> = vec![None; messages.len()];
        if messages.is_empty() {
            return Vec::new();
        }
        let mut state = self.state.lock().await;
        let prepared = async {
            let channel = self.ensure_channel(&mut state).await?;
            let missing = self.missing_exchanges(&mut state, messages).await?;
            Ok::<_, AmqpError>((channel, missing))
        };
        let (channel, missing) = match prepared.await {
            Ok(ready) => ready,
            Err(error) => {
                state.channel = None;
                return vec![Err(error); messages.len()];
            }
        };

        // Write the whole batch first (pipelined), then collect the confirms.
        let mut pending = Vec::with_capacity(messages.len());
        let mut broken = false;
        for (index, message) in messages.iter().enumerate() {
            if broken {
                results[index] = Some(Err(AmqpError::Unavailable));
                continue;
            }
            if missing.contains(&message.exchange) {
                let text = format!("404 NOT_FOUND - no exchange '{}'", message.exchange);
                results[index] = Some(Err(AmqpError::Protocol(text)));
                continue;
            }
            let encoded = (|| {
                Ok::<_, AmqpError>((
                    short(&message.exchange)?,
                    short(&message.routing_key)?,
                    message.properties()?,
                ))
            })();
            let (exchange, routing_key, properties) = match encoded {
                Ok(encoded) => encoded,
                Err(error) => {
                    results[index] = Some(Err(error));
                    continue;
                }
            };
            let options = BasicPublishOptions {
                mandatory: message.mandatory,
                immediate: false,
            };
            match channel
                .basic_publish(exchange, routing_key, options, &message.payload, properties)
                .await
            {
                Ok(confirm) => pending.push((index, confirm)),
                Err(error) => {
                    let error = AmqpError::from_lapin(&error);
                    broken = true;
                    results[index] = Some(Err(error));
                }
            }
        }

        let timeout = Duration::from_millis(self.amqp.inner.shared.config.confirm_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut reset = broken;
        for (index, confirm) in pending {
            let outcome = match tokio::time::timeout_at(deadline, confirm).await {
                Err(_) => {
                    reset = true;
                    Err(AmqpError::ConfirmTimeout)
                }
                Ok(Err(error)) => {
                    reset = true;
                    Err(AmqpError::from_lapin(&error))
                }
                Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
                    Err(AmqpError::Returned {
                        reply_code: returned.reply_code,
                        reply_text: returned.reply_text.to_string(),
                    })
                }
                Ok(Ok(Confirmation::Nack(None))) => Err(AmqpError::Nacked),
                Ok(Ok(Confirmation::NotRequested)) => {
                    reset = true;
                    Err(AmqpError::Protocol("channel not in confirm mode".into()))
                }
            };
            results[index] = Some(outcome);
        }
        if reset {
            // Late confirms of a failed batch must not land on the next one.
            if let Some((channel, _)) = state.channel.take() {
                let _ = channel.close(REPLY_SUCCESS, "reset".into()).await;
            }
            state.known_exchanges.clear();
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(AmqpError::Unavailable)))
            .collect()
    }
}

impl MessageSink for ConfirmedPublisher {
    fn publish_batch<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<(), AmqpError>>> {
        Box::pin(self.publish_confirmed(messages))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};

    use super::*;
    use crate::config::Secret;

    /// The local broker, or `USHER_TEST_AMQP_URL`.
    pub(crate) fn test_config() -> AmqpConfig {
        let url = std::env::var("USHER_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        AmqpConfig {
            url: Secret::new(url),
            reconnect_max_ms: 1_000,
            ..AmqpConfig::default()
        }
    }

    pub(crate) fn unique(prefix: &str) -> String {
        format!("usher.test.{prefix}.{}", uuid::Uuid::new_v4().simple())
    }

    /// A started, connected handle with a fresh exchange bound to a fresh queue (`#`).
    pub(crate) async fn connected_with_queue(name: &str) -> (Amqp, String, String) {
        let amqp = Amqp::start(test_config(), &unique(name));
        amqp.wait_connected(Duration::from_secs(10))
            .await
            .expect("broker reachable");
        let exchange = unique("ex");
        let queue = unique("q");
        let topology = Topology::new()
            .topic_exchange(&exchange)
            .queue(
                QueueSpec::durable(&queue)
                    // Left-overs of a failed run vanish on their own.
                    .with_argument("x-expires", QueueArgument::Int(600_000)),
            )
            .bind(&queue, &exchange, "#");
        amqp.declare(topology).await.expect("declare");
        (amqp, exchange, queue)
    }

    /// Every message in `queue`, taken off it.
    pub(crate) async fn drain(amqp: &Amqp, queue: &str) -> Vec<lapin::message::Delivery> {
        let channel = amqp.channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            out.push(message.delivery);
        }
        out
    }

    pub(crate) async fn cleanup(amqp: &Amqp, exchange: &str, queue: &str) {
        let channel = amqp.channel().await.expect("channel");
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .expect("delete q");
        channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete exchange");
        amqp.close().await;
    }

    fn header(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
        let headers = delivery.properties.headers().as_ref()?;
        match headers.inner().get(name)? {
            AMQPValue::LongString(value) => Some(value.to_string()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn amqp_batch_of_100_is_confirmed_and_persistent() {
        let (amqp, exchange, queue) = connected_with_queue("batch").await;
        let publisher = ConfirmedPublisher::new(amqp.clone());
        let messages: Vec<_> = (0..100)
            .map(|i| {
                OutgoingMessage::new(
                    &exchange,
                    format!("invitation.created.{i}"),
                    "test.Kind",
                    vec![i as u8; 16],
                )
                .with_header("ce-source", "usher-kit-test")
                .with_header("ce-seq", i.to_string())
            })
            .collect();

        let results = publisher.publish_batch(&messages).await;
        assert_eq!(results.len(), 100);
        assert!(results.iter().all(Result::is_ok), "{results:?}");

        let received = drain(&amqp, &queue).await;
        assert_eq!(received.len(), 100);
        let sent: HashMap<_, _> = messages.iter().map(|m| (m.message_id.clone(), m)).collect();
        for delivery in &received {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .expect("message id")
                .to_string();
            let original = sent.get(&id).expect("a message we sent");
            assert_eq!(*delivery.properties.delivery_mode(), Some(PERSISTENT));
            assert_eq!(
                delivery
                    .properties
                    .kind()
                    .as_ref()
                    .map(ToString::to_string)
                    .as_deref(),
                Some("test.Kind")
            );
            assert_eq!(
                delivery
                    .properties
                    .content_type()
                    .as_ref()
                    .map(ToString::to_string)
                    .as_deref(),
                Some(PROTOBUF_CONTENT_TYPE)
            );
            // Stamped when published (the test messages carry no time).
            let stamped = delivery.properties.timestamp().expect("an AMQP timestamp");
            let now = unix_seconds(crate::clock::Clock::now(&crate::clock::SystemClock));
            assert!(now.abs_diff(stamped) <= 60, "{stamped} vs {now}");
            assert_eq!(delivery.data, original.payload);
            assert_eq!(delivery.routing_key.as_str(), original.routing_key);
            assert_eq!(
                header(delivery, "ce-source").as_deref(),
                Some("usher-kit-test")
            );
            assert_eq!(
                header(delivery, "ce-seq"),
                original.headers.get("ce-seq").cloned()
            );
        }
        cleanup(&amqp, &exchange, &queue).await;
    }

    #[tokio::test]
    async fn amqp_unroutable_mandatory_message_is_returned() {
        let amqp = Amqp::start(test_config(), &unique("returned"));
        amqp.wait_connected(Duration::from_secs(10))
            .await
            .expect("broker reachable");
        let exchange = unique("unbound");
        amqp.declare_topic_exchange(&exchange)
            .await
            .expect("declare");
        let publisher = ConfirmedPublisher::new(amqp.clone());

        let unroutable =
            OutgoingMessage::new(&exchange, "nobody.listens", "test.Kind", b"x".to_vec());
        let result = publisher.publish(&unroutable).await;
        assert!(
            matches!(&result, Err(AmqpError::Returned { reply_code: 312, reply_text }) if reply_text == "NO_ROUTE"),
            "{result:?}"
        );

        // A broadcast (an event nobody subscribed to yet) is confirmed.
        let event = OutgoingMessage::new(&exchange, "nobody.listens", "test.Kind", b"e".to_vec())
            .broadcast();
        assert_eq!(publisher.publish(&event).await, Ok(()));

        // A missing exchange is refused for that message only; the batch goes on.
        let missing = OutgoingMessage::new(unique("missing"), "k", "test.Kind", b"y".to_vec());
        let results = publisher.publish_batch(&[missing, unroutable]).await;
        assert!(
            matches!(&results[0], Err(AmqpError::Protocol(text)) if text.contains("404")),
            "{results:?}"
        );
        assert!(
            matches!(&results[1], Err(AmqpError::Returned { .. })),
            "{results:?}"
        );

        let channel = amqp.channel().await.expect("channel");
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        amqp.close().await;
    }

    #[tokio::test]
    async fn amqp_refused_topology_is_reported_and_not_kept() {
        let (amqp, exchange, queue) = connected_with_queue("refused").await;
        let clash = Topology::new()
            .queue(QueueSpec::durable(&queue).with_message_ttl(Duration::from_secs(1)));
        let refused = amqp.declare(clash.clone()).await;
        assert!(
            matches!(&refused, Err(AmqpError::Protocol(text)) if text.contains("406")),
            "{refused:?}"
        );
        assert!(
            amqp.is_connected(),
            "a channel error leaves the connection up"
        );
        assert!(!amqp.inner.shared.topology.lock().await.contains(&clash));
        amqp.declare_topic_exchange(&exchange)
            .await
            .expect("still declares");
        cleanup(&amqp, &exchange, &queue).await;
    }

    #[tokio::test]
    async fn amqp_a_topology_is_declared_in_one_go_and_a_refusal_anywhere_in_it_is_reported() {
        let (amqp, exchange, queue) = connected_with_queue("one-go").await;
        // The refused queue first, then what would be fine: the refusal
        // still comes back, with the broker's reason.
        let other = unique("one-go-ex");
        let clash = Topology::new()
            .topic_exchange(&other)
            .queue(QueueSpec::durable(&queue).with_message_ttl(Duration::from_secs(1)))
            .bind(&queue, &other, "#");
        for _ in 0..20 {
            let refused = amqp.declare(clash.clone()).await;
            assert!(
                matches!(&refused, Err(AmqpError::Protocol(text)) if text.contains("406")),
                "{refused:?}"
            );
        }
        assert!(amqp.is_connected());
        assert!(!amqp.inner.shared.topology.lock().await.contains(&clash));
        // A good topology of several parts exists once `declare` returns.
        let fresh = unique("one-go-q");
        amqp.declare(
            Topology::new()
                .topic_exchange(&other)
                .queue(QueueSpec::durable(&fresh))
                .bind(&fresh, &other, "a.#"),
        )
        .await
        .expect("declared");
        let channel = amqp.channel().await.expect("channel");
        channel
            .queue_declare(
                fresh.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the queue exists");
        channel
            .queue_delete(fresh.as_str().into(), Default::default())
            .await
            .expect("delete");
        channel
            .exchange_delete(other.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        cleanup(&amqp, &exchange, &queue).await;
    }

    #[tokio::test]
    async fn amqp_frames_are_the_configured_size_not_the_brokers_128_kib() {
        let amqp = Amqp::start(test_config(), &unique("frames"));
        amqp.wait_connected(Duration::from_secs(10))
            .await
            .expect("broker reachable");
        let live = amqp.current().expect("connected");
        assert_eq!(
            live.connection.configuration().frame_max(),
            AmqpConfig::default().frame_max_bytes
        );
        // A message over several frames still arrives whole.
        let (channel, queue) = (amqp.channel().await.expect("channel"), unique("frames-q"));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue");
        let big = vec![7u8; 100_000];
        ConfirmedPublisher::new(amqp.clone())
            .publish(&OutgoingMessage::new("", &queue, "test.Big", big.clone()))
            .await
            .expect("confirmed");
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("a message");
        assert_eq!(got.delivery.data, big);
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        amqp.close().await;
    }

    /// The broker-side id of the connection named `name`, via `rabbitmqctl`.
    async fn broker_connection_pid(name: &str) -> Option<String> {
        let output = tokio::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "list_connections",
                "--no-table-headers",
                "pid",
                "client_properties",
            ])
            .output()
            .await
            .expect("rabbitmqctl runs");
        let listing = String::from_utf8_lossy(&output.stdout);
        listing
            .lines()
            .find(|line| line.contains(name))
            .and_then(|line| line.split_whitespace().next())
            .map(str::to_owned)
    }

    #[tokio::test]
    async fn amqp_recovers_after_the_broker_closes_the_connection() {
        let name = unique("recovery");
        let amqp = Amqp::start(test_config(), &name);
        amqp.wait_connected(Duration::from_secs(10))
            .await
            .expect("broker reachable");
        let exchange = unique("ex");
        let queue = unique("exclusive");
        // An exclusive queue dies with its connection: finding it again after
        // the reconnect proves the topology was re-declared.
        let topology = Topology::new()
            .topic_exchange(&exchange)
            .queue(QueueSpec::exclusive(&queue))
            .bind(&queue, &exchange, "#");
        amqp.declare(topology).await.expect("declare");
        let publisher = ConfirmedPublisher::new(amqp.clone());
        let message = || OutgoingMessage::new(&exchange, "a.b", "test.Kind", b"1".to_vec());
        publisher.publish(&message()).await.expect("first publish");

        // rabbitmqctl lists a connection a moment after it opens.
        let mut pid = None;
        for _ in 0..20 {
            pid = broker_connection_pid(&name).await;
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let pid = pid.expect("our connection is listed");
        let closed = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", &pid, "usher-kit recovery test"])
            .status()
            .await
            .expect("rabbitmqctl runs");
        assert!(closed.success());

        let lost = tokio::time::timeout(Duration::from_secs(5), async {
            while amqp.is_connected() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(lost.is_ok(), "the drop is noticed");
        let started = tokio::time::Instant::now();
        amqp.wait_connected(Duration::from_secs(5))
            .await
            .expect("reconnects");
        assert!(started.elapsed() < Duration::from_secs(5));

        // The old confirm channel is gone; the publisher opens a new one, and
        // the exclusive queue exists again (a missing queue would return it).
        publisher
            .publish(&message())
            .await
            .expect("publish after recovery");
        let received = drain(&amqp, &queue).await;
        assert_eq!(
            received.len(),
            1,
            "only the message sent after the reconnect"
        );

        let channel = amqp.channel().await.expect("channel");
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        amqp.close().await;
        assert!(!amqp.is_connected());
    }

    /// A TCP proxy to the broker that can freeze every connection — nothing
    /// flows, nothing closes: a half-open link only heartbeats can detect.
    struct StallingProxy {
        port: u16,
        stalled: Arc<std::sync::atomic::AtomicBool>,
        task: JoinHandle<()>,
    }

    impl StallingProxy {
        async fn start(upstream: &'static str) -> Self {
            use std::sync::atomic::AtomicBool;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let stalled = Arc::new(AtomicBool::new(false));
            let flag = stalled.clone();
            let task = tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(Self::pump(client_read, server_write, flag.clone()));
                    tokio::spawn(Self::pump(server_read, client_write, flag.clone()));
                }
            });
            Self {
                port,
                stalled,
                task,
            }
        }

        async fn pump(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            stalled: Arc<std::sync::atomic::AtomicBool>,
        ) {
            use std::sync::atomic::Ordering;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                let n = match from.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                while stalled.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if to.write_all(&buffer[..n]).await.is_err() {
                    break;
                }
            }
            let _ = to.shutdown().await;
        }

        fn set_stalled(&self, stalled: bool) {
            self.stalled
                .store(stalled, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Drop for StallingProxy {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    #[tokio::test]
    async fn amqp_detects_a_half_open_connection_by_heartbeat_and_reconnects() {
        let proxy = StallingProxy::start("127.0.0.1:5672").await;
        let config = AmqpConfig {
            url: Secret::new(format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port)),
            heartbeat_secs: 1,
            ..test_config()
        };
        let amqp = Amqp::start(config, &unique("half-open"));
        amqp.wait_connected(Duration::from_secs(10))
            .await
            .expect("connects through the proxy");
        let publisher = ConfirmedPublisher::new(amqp.clone());
        let message = OutgoingMessage::new("", unique("nobody"), "test.Kind", b"h".to_vec());
        let answered =
            |result: Result<(), AmqpError>| matches!(result, Err(AmqpError::Returned { .. }));
        assert!(
            answered(publisher.publish(&message).await),
            "the broker answers"
        );

        proxy.set_stalled(true);
        let noticed = tokio::time::timeout(Duration::from_secs(6), async {
            while amqp.is_connected() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            noticed.is_ok(),
            "missed heartbeats are noticed within seconds"
        );
        assert_eq!(
            publisher.publish(&message).await,
            Err(AmqpError::Unavailable)
        );

        proxy.set_stalled(false);
        amqp.wait_connected(Duration::from_secs(15))
            .await
            .expect("reconnects after healing");
        assert!(
            answered(publisher.publish(&message).await),
            "publishing works again"
        );
        amqp.close().await;
    }

    #[tokio::test]
    async fn amqp_start_does_not_fail_when_the_broker_is_unreachable() {
        let config = AmqpConfig {
            url: Secret::new("amqp://guest:guest@127.0.0.1:1/%2f"),
            ..test_config()
        };
        let amqp = Amqp::start(config, &unique("down"));
        assert!(!amqp.is_connected());
        assert_eq!(
            amqp.wait_connected(Duration::from_millis(300)).await,
            Err(AmqpError::Unavailable)
        );
        assert!(matches!(amqp.channel().await, Err(AmqpError::Unavailable)));
        let publisher = ConfirmedPublisher::new(amqp.clone());
        let message = OutgoingMessage::new("x", "y", "test.Kind", Vec::new());
        let results = publisher.publish_batch(&[message.clone(), message]).await;
        assert_eq!(
            results,
            vec![Err(AmqpError::Unavailable), Err(AmqpError::Unavailable)]
        );
        amqp.close().await;
    }

    #[test]
    fn backoff_stays_between_min_and_max_and_grows() {
        let config = AmqpConfig {
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
            ..AmqpConfig::default()
        };
        for failures in 0..40 {
            let delay = backoff(&config, failures).as_millis() as u64;
            assert!((100..=5_000).contains(&delay), "{failures}: {delay}");
        }
        assert!(backoff(&config, 0) <= Duration::from_millis(100));
        assert!(backoff(&config, 20) >= Duration::from_millis(2_500));
    }

    #[test]
    fn outgoing_message_round_trips_through_json_and_hides_its_payload() {
        let message = OutgoingMessage::new(
            EVENTS_EXCHANGE,
            "invitation.accepted",
            "k",
            vec![0, 1, 2, 255],
        )
        // A fixed id: a random one could itself contain "255".
        .with_message_id("message-1")
        .with_header("ce-id", "1");
        let json = serde_json::to_string(&message).expect("serialize");
        assert!(json.contains("\"AAEC/w==\""), "{json}");
        let back: OutgoingMessage = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, message);
        let shown = format!("{message:?}");
        assert!(
            shown.contains("payload_bytes: 4") && !shown.contains("255"),
            "{shown}"
        );
    }

    #[test]
    fn overlong_routing_key_is_a_protocol_error_not_a_panic() {
        assert!(matches!(
            short(&"k".repeat(256)),
            Err(AmqpError::Protocol(_))
        ));
        assert!(short(&"k".repeat(255)).is_ok());
    }
}
