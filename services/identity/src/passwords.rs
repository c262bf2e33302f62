//! Passwords: the policy users meet (P10) and argon2id hashing in a bounded
//! pool (P9), with a dummy verification for unknown accounts (P7).
//!
//! - [`PasswordPolicy::check`] NFC-normalises a new password and counts
//!   characters, not bytes: 8 (configurable) to 128 are accepted, longer ones
//!   are rejected before any hashing, nothing is ever truncated, control
//!   characters are refused and any other Unicode is welcome.
//! - [`PasswordHasher`] hashes to PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$…`)
//!   on `pool_size` threads of its own: each hash holds `memory_kib` of
//!   memory, so the pool bounds memory under any load. (On tokio's shared
//!   blocking threads, each new thread that hashed kept its 19 MiB in its own
//!   allocator arena: resident memory grew with the threads, not the pool.)
//!   Each thread runs argon2id in one block array of its own, kept for its
//!   life ([`run_into`]): freeing a 19 MiB array per run made glibc keep
//!   every thread's freed memory.
//!   The threads run at a lower scheduling priority (`thread_nice`), so a
//!   saturated pool leaves the CPU to the other calls first; at most `queue_size` hashes wait for a thread, and more are
//!   refused at once with UNAVAILABLE and a `RetryInfo` delay, so a flood of
//!   sign-ins costs neither memory nor the latency of everything else.
//!
//! Passwords and hashes never reach a log, an error message or `Debug` (P20).

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::anyhow;
use argon2::{Algorithm, Argon2, Params, PasswordHash, Version};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use unicode_normalization::UnicodeNormalization;
use usher_kit::{
    config::{ConfigError, Validate},
    error::{ApiError, Reason},
    tokens::Token,
};

/// OWASP's argon2id floor: memory in KiB (19 MiB).
pub const MIN_MEMORY_KIB: u32 = 19_456;
/// OWASP's argon2id floor: iterations.
pub const MIN_ITERATIONS: u32 = 2;
/// OWASP's argon2id floor: lanes.
pub const MIN_PARALLELISM: u32 = 1;
/// The shortest `min_length` a deployment may configure.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// The longest password accepted (P10); longer ones are rejected, not truncated.
pub const MAX_PASSWORD_CHARS: usize = 128;
/// The default number of hashes that may wait for a hashing thread.
pub const DEFAULT_QUEUE_SIZE: usize = 128;
/// The default niceness of the hashing threads (0 = as every other thread,
/// 19 = the lowest priority).
pub const DEFAULT_THREAD_NICE: i32 = 10;
/// The highest niceness Linux knows.
const MAX_NICE: i32 = 19;
/// The shortest retry delay a refusal suggests.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Upper bound of the UTF-8 bytes behind one character after NFC: composition
/// joins at most 4 code points (e.g. U+1F82) of at most 4 bytes each. Input
/// longer than `max_length` × this is too long whatever it normalises to, so it
/// is refused before normalising.
const MAX_BYTES_PER_NFC_CHAR: usize = 16;

/// Metric: seconds spent in one argon2id run, by `op` (`hash`, `verify`).
const HASH_SECONDS: &str = "usher_password_hash_seconds";
/// Metric: argon2id runs in progress.
const POOL_IN_USE: &str = "usher_password_pool_in_use";
/// Metric: argon2id runs waiting for a hashing thread.
const POOL_WAITING: &str = "usher_password_pool_waiting";
/// Metric: argon2id runs refused because the queue was full.
const POOL_REFUSED: &str = "usher_password_pool_refused_total";

/// Password rules and argon2id cost (section `passwords`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PasswordConfig {
    /// argon2id memory per hash, in KiB; at least 19456.
    pub memory_kib: u32,
    /// argon2id iterations; at least 2.
    pub iterations: u32,
    /// argon2id lanes; at least 1.
    pub parallelism: u32,
    /// Hashes computed at once; memory peaks at about `pool_size × memory_kib`.
    /// Defaults to the number of CPUs.
    pub pool_size: usize,
    /// Hashes that may wait for a free hashing thread; more are refused with
    /// UNAVAILABLE and a retry delay. At least 1.
    pub queue_size: usize,
    /// Niceness of the hashing threads, 0..=19 (Linux; ignored elsewhere):
    /// the higher, the more every other thread of the machine goes first.
    pub thread_nice: i32,
    /// Shortest accepted password, in characters; at least 8.
    pub min_length: usize,
    /// Longest accepted password, in characters; at most 128.
    pub max_length: usize,
}

impl Default for PasswordConfig {
    fn default() -> Self {
        Self {
            memory_kib: MIN_MEMORY_KIB,
            iterations: MIN_ITERATIONS,
            parallelism: MIN_PARALLELISM,
            pool_size: std::thread::available_parallelism().map_or(1, usize::from),
            queue_size: DEFAULT_QUEUE_SIZE,
            thread_nice: DEFAULT_THREAD_NICE,
            min_length: MIN_PASSWORD_CHARS,
            max_length: MAX_PASSWORD_CHARS,
        }
    }
}

impl Validate for PasswordConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.memory_kib < MIN_MEMORY_KIB {
            return Err(ConfigError::invalid(
                "passwords.memory_kib",
                format!("must be at least {MIN_MEMORY_KIB} (the OWASP minimum for argon2id)"),
            ));
        }
        if self.iterations < MIN_ITERATIONS {
            return Err(ConfigError::invalid(
                "passwords.iterations",
                format!("must be at least {MIN_ITERATIONS} (the OWASP minimum for argon2id)"),
            ));
        }
        if !(MIN_PARALLELISM..=Params::MAX_P_COST).contains(&self.parallelism) {
            return Err(ConfigError::invalid(
                "passwords.parallelism",
                format!(
                    "must be between {MIN_PARALLELISM} and {}",
                    Params::MAX_P_COST
                ),
            ));
        }
        if u64::from(self.memory_kib) < 8 * u64::from(self.parallelism) {
            return Err(ConfigError::invalid(
                "passwords.memory_kib",
                "must be at least 8 times passwords.parallelism",
            ));
        }
        if self.pool_size == 0 {
            return Err(ConfigError::invalid(
                "passwords.pool_size",
                "must be at least 1",
            ));
        }
        if self.queue_size == 0 {
            return Err(ConfigError::invalid(
                "passwords.queue_size",
                "must be at least 1",
            ));
        }
        if !(0..=MAX_NICE).contains(&self.thread_nice) {
            return Err(ConfigError::invalid(
                "passwords.thread_nice",
                format!("must be between 0 and {MAX_NICE}"),
            ));
        }
        if self.min_length < MIN_PASSWORD_CHARS {
            return Err(ConfigError::invalid(
                "passwords.min_length",
                format!("must be at least {MIN_PASSWORD_CHARS}"),
            ));
        }
        if self.max_length > MAX_PASSWORD_CHARS {
            return Err(ConfigError::invalid(
                "passwords.max_length",
                format!("must be at most {MAX_PASSWORD_CHARS}"),
            ));
        }
        if self.min_length > self.max_length {
            return Err(ConfigError::invalid(
                "passwords.min_length",
                "must not exceed passwords.max_length",
            ));
        }
        Ok(())
    }
}

impl PasswordConfig {
    /// The length rules of this configuration.
    pub fn policy(&self) -> PasswordPolicy {
        PasswordPolicy {
            min_length: self.min_length,
            max_length: self.max_length,
        }
    }

    /// The argon2id parameters, never below OWASP's floor: a configuration
    /// that skipped [`Validate::validate`] gets stronger hashing, not weaker.
    fn params(&self) -> Params {
        let parallelism = self.parallelism.clamp(MIN_PARALLELISM, Params::MAX_P_COST);
        let memory_kib = self
            .memory_kib
            .max(MIN_MEMORY_KIB)
            .max(parallelism.saturating_mul(8));
        let iterations = self.iterations.max(MIN_ITERATIONS);
        Params::new(memory_kib, iterations, parallelism, None).unwrap_or(Params::DEFAULT)
    }
}

/// Which passwords users may choose (P10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasswordPolicy {
    min_length: usize,
    max_length: usize,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        PasswordConfig::default().policy()
    }
}

impl PasswordPolicy {
    /// Shortest accepted password, in characters.
    pub fn min_length(&self) -> usize {
        self.min_length
    }

    /// Longest accepted password, in characters.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Checks a new password given in request field `field` and returns it
    /// NFC-normalised, the form to hash. Length counts characters after
    /// normalisation; nothing is trimmed or truncated. Control characters (NUL,
    /// tab, line breaks, escape, DEL, C1) are refused, every one of them; any
    /// other Unicode is accepted. The violation never quotes the password.
    pub fn check(&self, password: &str, field: &str) -> Result<String, ApiError> {
        let too_long = || {
            ApiError::invalid(
                field,
                format!("must be at most {} characters", self.max_length),
            )
        };
        if password.len() > self.max_length.saturating_mul(MAX_BYTES_PER_NFC_CHAR) {
            return Err(too_long());
        }
        let normalized = normalize(password);
        if normalized.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                field,
                "must not contain control characters (none are allowed, not even tab or line breaks)",
            ));
        }
        let length = normalized.chars().count();
        if length < self.min_length {
            return Err(ApiError::invalid(
                field,
                format!("must be at least {} characters", self.min_length),
            ));
        }
        if length > self.max_length {
            return Err(too_long());
        }
        Ok(normalized)
    }
}

/// The NFC form of `password`: how it is hashed and verified, so composed and
/// decomposed spellings of the same text are the same password.
pub fn normalize(password: &str) -> String {
    password.nfc().collect()
}

/// argon2id hashing and verification in a bounded pool. Cheap to clone: clones
/// share the pool. `Debug` shows the parameters only.
#[derive(Clone)]
pub struct PasswordHasher {
    inner: Arc<Inner>,
}

/// The PHC string of an argon2id hash with `argon2`'s parameters whose salt
/// and output are random bytes: no password is known to give it (not even a
/// discarded one), and verifying any password against it costs one argon2id
/// run with those parameters, like a real hash — without spending one (tens
/// of milliseconds of a core) to make it when the service starts.
fn unknowable_hash(argon2: &Argon2<'_>) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::phc::{Output, ParamsString, Salt};
    use sha2::Digest as _;
    let params = argon2.params();
    let output_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    // 64 bytes nobody knows: a digest of a fresh 256-bit random token.
    let random = sha2::Sha512::digest(Token::generate().as_str().as_bytes());
    let (salt, rest) = random.split_at(16);
    let output: Vec<u8> = rest.iter().cycle().take(output_len).copied().collect();
    Ok(PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(u32::from(Version::V0x13)),
        params: ParamsString::try_from(params)?,
        salt: Some(Salt::new(salt)?),
        hash: Some(Output::new(&output)?),
    }
    .to_string())
}

/// One argon2 run of `argon2` into this thread's memory: a block array
/// allocated at the first run (at the size of the largest run so far) and
/// kept for the thread's life, never freed between runs. (With a fresh
/// 19 MiB array per run, as the argon2 crate's own `hash_password` makes,
/// glibc raised its mmap threshold to 19 MiB at the first free, for the whole
/// process, and every thread's arena then kept what it freed: identity's
/// resident memory grew from 57 to 418 MiB over 64 runs in the bench.)
fn run_into(
    argon2: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::password_hash::Error> {
    thread_local! {
        static MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    let needed = argon2.params().block_count();
    MEMORY.with_borrow_mut(|memory| {
        if memory.len() < needed {
            // Once per thread (again only for a stored hash with more
            // memory than any before it).
            *memory = vec![argon2::Block::default(); needed];
        }
        let blocks = memory
            .get_mut(..needed)
            .ok_or(argon2::password_hash::Error::OutOfMemory)?;
        argon2.hash_password_into_with_memory(password, salt, out, blocks)?;
        Ok(())
    })
}

/// The PHC string of `password` under `argon2` (argon2id, v19, its
/// parameters) with a fresh 16-byte salt from the OS CSPRNG: what the argon2
/// crate's `hash_password` makes, run in this thread's memory.
fn hash_phc(argon2: &Argon2<'_>, password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::phc::{Output, ParamsString, Salt};
    let salt = argon2::password_hash::generate_salt();
    let params = argon2.params();
    let mut out = vec![0; params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN)];
    run_into(argon2, password, &salt, &mut out)?;
    Ok(PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(u32::from(Version::V0x13)),
        params: ParamsString::try_from(params)?,
        salt: Some(Salt::new(&salt)?),
        hash: Some(Output::new(&out)?),
    }
    .to_string())
}

/// Whether `password` gives `stored` under the algorithm, version and
/// parameters stored in it (the argon2 crate's `verify_password`, run in
/// this thread's memory); the outputs are compared in constant time.
fn verify_phc(password: &[u8], stored: &PasswordHash) -> Result<(), argon2::password_hash::Error> {
    use argon2::password_hash::{Error, phc::Output};
    let (Some(salt), Some(expected)) = (&stored.salt, &stored.hash) else {
        return Err(Error::PasswordInvalid);
    };
    let algorithm = Algorithm::try_from(stored.algorithm.as_str())?;
    let version = stored
        .version
        .map(Version::try_from)
        .transpose()?
        .unwrap_or_default();
    let params = Params::try_from(stored)?;
    let argon2 = Argon2::new(algorithm, version, params);
    let mut out = vec![
        0;
        argon2
            .params()
            .output_len()
            .unwrap_or(Params::DEFAULT_OUTPUT_LEN)
    ];
    run_into(&argon2, password, salt.as_ref(), &mut out)?;
    if Output::new(&out)? == *expected {
        Ok(())
    } else {
        Err(Error::PasswordInvalid)
    }
}

/// Work for the hashing threads.
type Job = Box<dyn FnOnce() + Send>;

struct Inner {
    argon2: Argon2<'static>,
    /// One permit per concurrent argon2id run.
    permits: Arc<Semaphore>,
    /// The hashing threads' queue (they end when it is dropped).
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    pool_size: usize,
    /// Most runs waiting for a permit.
    queue_size: usize,
    /// Runs waiting for a permit now.
    waiting: AtomicUsize,
    /// A moving average of one run's duration, in microseconds (for the
    /// retry delay of a refusal).
    mean_micros: AtomicU64,
    /// PHC string of an unknowable password, for [`PasswordHasher::verify_dummy`].
    /// Empty only if it could not be made at construction.
    dummy: String,
    /// argon2id runs in progress.
    running: AtomicUsize,
    /// Most argon2id runs ever in progress at once (what the pool test checks).
    peak: AtomicUsize,
    /// argon2id runs finished since start (what the sign-in timing test counts).
    finished: AtomicUsize,
}

/// An argon2id run in progress: holds the pool permit and counts the run until
/// dropped, on the blocking thread, when the work is done.
struct Slot {
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn enter(inner: Arc<Inner>, permit: OwnedSemaphorePermit) -> Self {
        let running = inner.running.fetch_add(1, Ordering::SeqCst) + 1;
        inner.peak.fetch_max(running, Ordering::SeqCst);
        metrics::gauge!(POOL_IN_USE).increment(1.0);
        Self {
            inner,
            _permit: permit,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Runs before the permit field is dropped, so the count never shows
        // more runs than permits.
        self.inner.running.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!(POOL_IN_USE).decrement(1.0);
    }
}

impl PasswordHasher {
    /// A hasher with the configured parameters (never below OWASP's floor) and
    /// a pool of `pool_size` (at least 1). Runs no argon2id: the dummy hash
    /// is made of random bytes (see [`unknowable_hash`]).
    pub fn new(config: &PasswordConfig) -> Self {
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, config.params());
        let dummy = match unknowable_hash(&argon2) {
            Ok(hash) => hash,
            Err(error) => {
                tracing::error!(%error, "cannot make the dummy password hash");
                String::new()
            }
        };
        let pool_size = config.pool_size.max(1);
        // Served from the start (docs/operations.md lists them).
        metrics::gauge!(POOL_IN_USE).increment(0.0);
        metrics::gauge!(POOL_WAITING).increment(0.0);
        metrics::counter!(POOL_REFUSED).increment(0);
        for op in ["hash", "verify"] {
            let _ = metrics::histogram!(HASH_SECONDS, "op" => op);
        }
        Self {
            inner: Arc::new(Inner {
                argon2,
                permits: Arc::new(Semaphore::new(pool_size)),
                jobs: std::sync::Mutex::new(hashing_threads(pool_size, config.thread_nice)),
                pool_size,
                queue_size: config.queue_size.max(1),
                waiting: AtomicUsize::new(0),
                mean_micros: AtomicU64::new(0),
                dummy,
                running: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                finished: AtomicUsize::new(0),
            }),
        }
    }

    /// Hashes run at once at most.
    pub fn pool_size(&self) -> usize {
        self.inner.pool_size
    }

    /// Hashes running now.
    pub fn in_use(&self) -> usize {
        self.inner.running.load(Ordering::SeqCst)
    }

    /// argon2id runs (hashes and verifications, the dummy's included)
    /// finished since this hasher was made: every failed sign-in costs the
    /// same one run whatever its cause, which a test counts rather than times.
    pub fn runs(&self) -> usize {
        self.inner.finished.load(Ordering::SeqCst)
    }

    /// Runs `work` on a hashing thread once a pool permit is free. The permit
    /// moves into the job, so a caller that gives up (deadline, cancelled
    /// call) cannot free its slot while argon2 still runs.
    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        work: impl FnOnce(&Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = self.permit().await?;
        let inner = Arc::clone(&self.inner);
        let (done, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let slot = Slot::enter(inner, permit);
            let started = Instant::now();
            let out = work(&slot.inner.argon2);
            let took = started.elapsed();
            metrics::histogram!(HASH_SECONDS, "op" => op).record(took.as_secs_f64());
            slot.inner.observe(took);
            slot.inner.finished.fetch_add(1, Ordering::SeqCst);
            drop(slot);
            let _ = done.send(out);
        });
        self.inner
            .jobs
            .lock()
            .map_err(|_| ApiError::Internal(anyhow!("password hashing queue poisoned")))?
            .send(job)
            .map_err(|_| ApiError::Internal(anyhow!("password hashing threads gone")))?;
        answer
            .await
            .map_err(|_| ApiError::Internal(anyhow!("password hashing task failed")))
    }

    /// A pool permit: at once when a thread is free, after waiting in the
    /// queue when it has room, else UNAVAILABLE with the time the queue
    /// needs to drain as the retry delay. A caller that gives up while
    /// waiting leaves the queue.
    async fn permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        let closed = || ApiError::Internal(anyhow!("password hashing pool closed"));
        let permits = &self.inner.permits;
        match Arc::clone(permits).try_acquire_owned() {
            Ok(permit) => return Ok(permit),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(closed()),
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        let queue = &self.inner.waiting;
        let entered = queue.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| {
            (waiting < self.inner.queue_size).then_some(waiting + 1)
        });
        if entered.is_err() {
            metrics::counter!(POOL_REFUSED).increment(1);
            return Err(ApiError::retry_later(
                Reason::Unavailable,
                "password hashing is at capacity, retry after the delay given",
                self.inner.drain_time(),
            ));
        }
        let _waiting = Waiting::enter(Arc::clone(&self.inner));
        Arc::clone(permits)
            .acquire_owned()
            .await
            .map_err(|_| closed())
    }

    /// Runs waiting for a hashing thread now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::SeqCst)
    }

    /// The PHC string of `password` (NFC-normalised) with a fresh 16-byte salt
    /// from the OS CSPRNG. Check it with [`PasswordPolicy::check`] first.
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        let password = normalize(&password);
        self.run("hash", move |argon2| hash_phc(argon2, password.as_bytes()))
            .await?
            .map_err(|error| ApiError::Internal(anyhow!("password hashing failed: {error}")))
    }

    /// Whether `password` (NFC-normalised) matches the stored PHC string `phc`,
    /// using the parameters stored in it. A malformed `phc` is an internal
    /// error (the message never quotes it).
    pub async fn verify(&self, password: String, phc: &str) -> Result<bool, ApiError> {
        let stored = PasswordHash::new(phc).map_err(|error| {
            ApiError::Internal(anyhow!("stored password hash unusable: {error}"))
        })?;
        let password = normalize(&password);
        let verified = self
            .run("verify", move |_| verify_phc(password.as_bytes(), &stored))
            .await?;
        match verified {
            Ok(()) => Ok(true),
            Err(argon2::password_hash::Error::PasswordInvalid) => Ok(false),
            Err(error) => Err(ApiError::Internal(anyhow!(
                "password verification failed: {error}"
            ))),
        }
    }

    /// Spends what [`PasswordHasher::verify`] spends, on a hash of an unknowable
    /// password with the configured parameters: for sign-in with an unknown
    /// email, so it costs the same time as a known one (P7). The outcome is
    /// always "no match", so there is nothing to return but a refusal of a
    /// full queue, answered exactly as for a known user (so a full queue
    /// tells nobody which users exist).
    pub async fn verify_dummy(&self, password: String) -> Result<(), ApiError> {
        let outcome = if self.inner.dummy.is_empty() {
            self.hash(password).await.map(|_| false)
        } else {
            self.verify(password, &self.inner.dummy).await
        };
        match outcome {
            Ok(_) => Ok(()),
            Err(refused @ ApiError::Rejected { .. }) => Err(refused),
            Err(error) => {
                tracing::warn!(%error, "dummy password verification failed");
                Ok(())
            }
        }
    }

    /// Whether the stored PHC string should be replaced by a new hash at the
    /// next successful sign-in: another algorithm or version, parameters weaker
    /// than configured, a short output, or not parseable at all.
    pub fn needs_rehash(&self, phc: &str) -> bool {
        let Ok(stored) = PasswordHash::new(phc) else {
            return true;
        };
        if stored.algorithm != Algorithm::Argon2id.ident()
            || stored.version != Some(u32::from(Version::V0x13))
        {
            return true;
        }
        let Ok(params) = Params::try_from(&stored) else {
            return true;
        };
        let wanted = self.inner.argon2.params();
        params.m_cost() < wanted.m_cost()
            || params.t_cost() < wanted.t_cost()
            || params.p_cost() < wanted.p_cost()
            || params.output_len().unwrap_or(0) < Params::DEFAULT_OUTPUT_LEN
    }
}

impl Inner {
    /// Folds one run's duration into the moving average (weight 1/8).
    fn observe(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = self
            .mean_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mean| {
                Some(if mean == 0 {
                    micros
                } else {
                    mean - mean / 8 + micros / 8
                })
            });
    }

    /// How long the queue and the runs in progress take to drain on the
    /// pool's threads, at the mean duration of a run; at least 50 ms.
    fn drain_time(&self) -> Duration {
        let ahead = self.waiting.load(Ordering::SeqCst) + self.running.load(Ordering::SeqCst);
        let mean = self.mean_micros.load(Ordering::Relaxed);
        let rounds = u64::try_from(ahead.div_ceil(self.pool_size)).unwrap_or(u64::MAX);
        Duration::from_micros(mean.saturating_mul(rounds)).max(MIN_RETRY_DELAY)
    }
}

/// A run waiting for a permit: counted in the queue until dropped (given a
/// permit, or its caller gone).
struct Waiting {
    inner: Arc<Inner>,
}

impl Waiting {
    /// Counts a run that already took its place in `inner.waiting`.
    fn enter(inner: Arc<Inner>) -> Self {
        metrics::gauge!(POOL_WAITING).increment(1.0);
        Self { inner }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.inner.waiting.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!(POOL_WAITING).decrement(1.0);
    }
}

/// Lowers the calling thread's scheduling priority to `nice` (Linux:
/// niceness applies per thread), never raising it; a failure is logged,
/// never fatal.
fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let thread = rustix::thread::gettid();
        let current = rustix::process::getpriority_process(Some(thread)).unwrap_or(0);
        if nice <= current {
            return;
        }
        if let Err(error) = rustix::process::setpriority_process(Some(thread), nice) {
            tracing::warn!(%error, nice, "cannot lower the priority of a password hashing thread");
        }
    }
}

/// Starts `count` threads at niceness `nice` running the jobs sent on the
/// returned queue, until it is dropped. A job that panics ends only itself
/// (its caller sees an internal error).
fn hashing_threads(count: usize, nice: i32) -> std::sync::mpsc::Sender<Job> {
    let (sender, receiver) = std::sync::mpsc::channel::<Job>();
    let receiver = Arc::new(std::sync::Mutex::new(receiver));
    for n in 0..count {
        let receiver = Arc::clone(&receiver);
        let spawned = std::thread::Builder::new()
            .name(format!("argon2-{n}"))
            .spawn(move || {
                lower_priority(nice);
                loop {
                    let next = match receiver.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = next else { return };
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start a password hashing thread");
        }
    }
    sender
}

impl fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params = self.inner.argon2.params();
        f.debug_struct("PasswordHasher")
            .field("memory_kib", &params.m_cost())
            .field("iterations", &params.t_cost())
            .field("parallelism", &params.p_cost())
            .field("pool_size", &self.inner.pool_size)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use usher_kit::error::Violation;

    use argon2::{PasswordHasher as _, PasswordVerifier as _};

    use super::*;

    /// Parameters at the floor but with little memory: fast in debug builds.
    fn small() -> Argon2<'static> {
        Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(1_024, 2, 1, None).expect("params"),
        )
    }

    /// The PHC strings made in the thread's reused memory are those the
    /// argon2 crate makes and checks, both ways, and reusing the memory for
    /// runs of other sizes changes no answer.
    #[test]
    fn hashes_made_in_reused_memory_agree_with_the_argon2_crate() {
        let argon2 = small();
        let ours = hash_phc(&argon2, b"correct horse").expect("hash");
        let parsed = PasswordHash::new(&ours).expect("a PHC string");
        argon2
            .verify_password(b"correct horse", &parsed)
            .expect("the crate verifies our hash");
        assert_eq!(
            argon2.verify_password(b"wrong horse", &parsed),
            Err(argon2::password_hash::Error::PasswordInvalid)
        );
        let theirs: PasswordHash = argon2.hash_password(b"battery staple").expect("hash");
        // A bigger run first, then the smaller one in the same memory.
        let big = hash_phc(
            &Argon2::new(
                Algorithm::Argon2id,
                Version::V0x13,
                Params::new(4_096, 2, 1, None).expect("params"),
            ),
            b"other",
        )
        .expect("hash");
        verify_phc(b"other", &PasswordHash::new(&big).expect("phc")).expect("the big one");
        verify_phc(b"battery staple", &theirs).expect("we verify the crate's hash");
        assert_eq!(
            verify_phc(b"battery stapler", &theirs),
            Err(argon2::password_hash::Error::PasswordInvalid)
        );
        verify_phc(b"correct horse", &parsed).expect("and our own");
        // Two hashes of one password differ (fresh salts).
        assert_ne!(hash_phc(&argon2, b"correct horse").expect("hash"), ours);
    }

    const OWASP_PREFIX: &str = "$argon2id$v=19$m=19456,t=2,p=1$";

    fn hasher(pool_size: usize) -> PasswordHasher {
        PasswordHasher::new(&PasswordConfig {
            pool_size,
            ..PasswordConfig::default()
        })
    }

    /// The single violation of `error`.
    fn violation(error: ApiError) -> Violation {
        match error {
            ApiError::InvalidArgument(mut violations) if violations.len() == 1 => {
                violations.remove(0)
            }
            other => panic!("expected one violation, got {other:?}"),
        }
    }

    fn rejected(password: &str) -> Violation {
        violation(
            PasswordPolicy::default()
                .check(password, "password")
                .expect_err("rejected"),
        )
    }

    // ---- configuration ----

    #[test]
    fn defaults_are_owasp_argon2id_and_8_to_128_characters() {
        let config = PasswordConfig::default();
        assert_eq!(
            (config.memory_kib, config.iterations, config.parallelism),
            (19_456, 2, 1)
        );
        assert_eq!((config.min_length, config.max_length), (8, 128));
        assert!(config.pool_size >= 1);
        config.validate().expect("defaults are valid");
    }

    #[test]
    fn validation_refuses_weak_or_inconsistent_settings_naming_the_field() {
        let base = PasswordConfig::default();
        let cases = [
            (
                PasswordConfig {
                    memory_kib: 19_455,
                    ..base.clone()
                },
                "passwords.memory_kib",
            ),
            (
                PasswordConfig {
                    iterations: 1,
                    ..base.clone()
                },
                "passwords.iterations",
            ),
            (
                PasswordConfig {
                    parallelism: 0,
                    ..base.clone()
                },
                "passwords.parallelism",
            ),
            (
                PasswordConfig {
                    parallelism: 4_000,
                    ..base.clone()
                },
                "passwords.memory_kib",
            ),
            (
                PasswordConfig {
                    pool_size: 0,
                    ..base.clone()
                },
                "passwords.pool_size",
            ),
            (
                PasswordConfig {
                    queue_size: 0,
                    ..base.clone()
                },
                "passwords.queue_size",
            ),
            (
                PasswordConfig {
                    thread_nice: 20,
                    ..base.clone()
                },
                "passwords.thread_nice",
            ),
            (
                PasswordConfig {
                    thread_nice: -1,
                    ..base.clone()
                },
                "passwords.thread_nice",
            ),
            (
                PasswordConfig {
                    min_length: 7,
                    ..base.clone()
                },
                "passwords.min_length",
            ),
            (
                PasswordConfig {
                    max_length: 129,
                    ..base.clone()
                },
                "passwords.max_length",
            ),
            (
                PasswordConfig {
                    min_length: 20,
                    max_length: 16,
                    ..base.clone()
                },
                "passwords.min_length",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().expect_err(field);
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        PasswordConfig {
            memory_kib: 65_536,
            iterations: 3,
            parallelism: 4,
            pool_size: 1,
            queue_size: 1,
            thread_nice: 0,
            min_length: 12,
            max_length: 64,
        }
        .validate()
        .expect("stronger settings are valid");
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let figment = usher_kit::config::figment_for::<PasswordConfig>(
            None,
            [("USHER_MEMORY_KIB".to_owned(), "65536".to_owned())],
        );
        let config: PasswordConfig = figment.extract().expect("known key");
        assert_eq!(config.memory_kib, 65_536);
        let figment = usher_kit::config::figment_for::<PasswordConfig>(
            None,
            [("USHER_MEMORY_KB".to_owned(), "1".to_owned())],
        );
        let err = figment
            .extract::<PasswordConfig>()
            .expect_err("unknown key");
        assert!(err.to_string().contains("memory_kb"), "{err}");
    }

    #[test]
    fn unvalidated_weak_parameters_are_raised_to_the_floor() {
        let params = PasswordConfig {
            memory_kib: 8,
            iterations: 0,
            parallelism: 0,
            ..PasswordConfig::default()
        }
        .params();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (19_456, 2, 1)
        );
    }

    // ---- policy ----

    #[test]
    fn length_limits_are_8_to_128() {
        let policy = PasswordPolicy::default();
        assert_eq!((policy.min_length(), policy.max_length()), (8, 128));
        let v = rejected(&"a".repeat(7));
        assert_eq!(v.field, "password");
        assert_eq!(v.description, "must be at least 8 characters");
        assert_eq!(
            policy.check(&"a".repeat(8), "password").expect("8"),
            "a".repeat(8)
        );
        assert_eq!(
            policy.check(&"a".repeat(128), "password").expect("128"),
            "a".repeat(128)
        );
        let v = rejected(&"a".repeat(129));
        assert_eq!(v.description, "must be at most 128 characters");
        assert!(rejected("").description.contains("at least 8"));
    }

    #[test]
    fn configured_lengths_apply() {
        let policy = PasswordConfig {
            min_length: 12,
            max_length: 20,
            ..PasswordConfig::default()
        }
        .policy();
        let err = policy
            .check(&"x".repeat(11), "new_password")
            .expect_err("11");
        let v = violation(err);
        assert_eq!(v.field, "new_password");
        assert_eq!(v.description, "must be at least 12 characters");
        policy.check(&"x".repeat(12), "new_password").expect("12");
        policy.check(&"x".repeat(20), "new_password").expect("20");
        let v = violation(
            policy
                .check(&"x".repeat(21), "new_password")
                .expect_err("21"),
        );
        assert_eq!(v.description, "must be at most 20 characters");
    }

    #[test]
    fn characters_are_counted_not_bytes() {
        let policy = PasswordPolicy::default();
        // 7 characters, 21 bytes: too short.
        assert!(rejected(&"€".repeat(7)).description.contains("at least 8"));
        // 8 characters of 2 bytes.
        policy.check(&"é".repeat(8), "password").expect("8 chars");
        // 128 emoji are 512 bytes: accepted; 129 are not.
        policy
            .check(&"😀".repeat(128), "password")
            .expect("128 emoji");
        assert!(
            rejected(&"😀".repeat(129))
                .description
                .contains("at most 128")
        );
        // Any script.
        policy
            .check("пароль-密码-كلمة", "password")
            .expect("any script");
    }

    #[test]
    fn length_counts_after_nfc_normalisation() {
        let policy = PasswordPolicy::default();
        let decomposed = "e\u{301}".repeat(128); // 256 code points, 128 after NFC
        let normalized = policy
            .check(&decomposed, "password")
            .expect("128 after nfc");
        assert_eq!(normalized, "\u{e9}".repeat(128));
        // Four code points (8 bytes) compose into one character: 128 of them
        // are 1,024 bytes of input and still 128 characters.
        let greek = "\u{3b1}\u{313}\u{300}\u{345}".repeat(128);
        let normalized = policy.check(&greek, "password").expect("128 after nfc");
        assert_eq!(normalized, "\u{1f82}".repeat(128));
        assert_eq!(
            policy
                .check(&"e\u{301}".repeat(4), "password")
                .map_err(violation),
            Err(Violation {
                field: "password".into(),
                description: "must be at least 8 characters".into(),
            })
        );
    }

    #[test]
    fn control_characters_are_refused_and_other_unicode_accepted() {
        for control in [
            '\0', '\t', '\n', '\r', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}',
        ] {
            let v = rejected(&format!("correct{control}horse"));
            assert_eq!(v.field, "password");
            assert!(v.description.contains("control characters"), "{v:?}");
            assert!(!v.description.contains("horse"), "{v:?}");
        }
        let policy = PasswordPolicy::default();
        for fine in [
            "  spaces  around  ",
            "zero\u{200d}width\u{200c}joiners",
            "bidi\u{202e}override",
            "\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}",
        ] {
            assert_eq!(policy.check(fine, "password").expect(fine), normalize(fine));
        }
    }

    #[test]
    fn oversized_input_is_refused_without_quoting_it() {
        let huge = "a".repeat(4 * 1024 * 1024);
        let v = rejected(&huge);
        assert_eq!(v.description, "must be at most 128 characters");
        let secret = "s3cr3t-pa55word-".repeat(9); // 144 characters
        let v = rejected(&secret);
        assert!(!v.description.contains("s3cr3t"));
    }

    // ---- hashing ----

    #[tokio::test]
    async fn stored_hash_is_argon2id_phc_with_owasp_parameters() {
        let hasher = hasher(2);
        let phc = hasher
            .hash("correct horse battery staple".into())
            .await
            .expect("hash");
        assert!(phc.starts_with(OWASP_PREFIX), "{phc}");
        assert!(!phc.contains("correct horse"));
        assert!(!hasher.needs_rehash(&phc));
        let again = hasher
            .hash("correct horse battery staple".into())
            .await
            .expect("hash");
        assert_ne!(phc, again, "every hash has its own salt");
    }

    #[tokio::test]
    async fn verify_accepts_the_right_password_only() {
        let hasher = hasher(2);
        let phc = hasher
            .hash("correct horse battery staple".into())
            .await
            .expect("hash");
        assert!(
            hasher
                .verify("correct horse battery staple".into(), &phc)
                .await
                .expect("verify")
        );
        assert!(
            !hasher
                .verify("correct horse battery stapl".into(), &phc)
                .await
                .expect("verify")
        );
        assert!(
            !hasher
                .verify("Correct horse battery staple".into(), &phc)
                .await
                .expect("verify")
        );
        assert!(!hasher.verify(String::new(), &phc).await.expect("verify"));
    }

    #[tokio::test]
    async fn nothing_is_truncated() {
        let hasher = hasher(2);
        let long = "ab".repeat(64); // 128 characters
        let phc = hasher.hash(long.clone()).await.expect("hash");
        assert!(hasher.verify(long.clone(), &phc).await.expect("verify"));
        assert!(
            !hasher
                .verify(long[..127].to_owned(), &phc)
                .await
                .expect("verify")
        );
        assert!(
            !hasher
                .verify(format!("{long}a"), &phc)
                .await
                .expect("verify")
        );
    }

    #[tokio::test]
    async fn composed_and_decomposed_forms_verify_interchangeably() {
        let policy = PasswordPolicy::default();
        let hasher = hasher(2);
        let composed = "caf\u{e9}-cr\u{e8}me-br\u{fb}l\u{e9}e";
        let decomposed = "cafe\u{301}-cre\u{300}me-bru\u{302}le\u{301}e";
        assert_ne!(composed, decomposed);

        let phc = hasher
            .hash(policy.check(composed, "password").expect("composed"))
            .await
            .expect("hash");
        let other = policy.check(decomposed, "password").expect("decomposed");
        assert!(hasher.verify(other, &phc).await.expect("verify"));
        // The hasher normalises too, so a caller that skipped the policy still matches.
        assert!(
            hasher
                .verify(decomposed.into(), &phc)
                .await
                .expect("verify")
        );

        let phc = hasher.hash(decomposed.into()).await.expect("hash");
        assert!(hasher.verify(composed.into(), &phc).await.expect("verify"));
    }

    #[tokio::test]
    async fn verify_dummy_costs_a_verification_with_the_configured_parameters() {
        let hasher = hasher(1);
        assert!(hasher.inner.dummy.starts_with(OWASP_PREFIX));
        assert!(!hasher.needs_rehash(&hasher.inner.dummy));
        let phc = hasher
            .hash("correct horse battery staple".into())
            .await
            .expect("hash");
        // Warm the blocking thread and the allocator, then compare medians.
        hasher
            .verify_dummy("whatever-was-typed".into())
            .await
            .expect("dummy");
        let (mut dummy, mut real) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let started = Instant::now();
            hasher
                .verify_dummy("whatever-was-typed".into())
                .await
                .expect("dummy");
            dummy.push(started.elapsed());
            let started = Instant::now();
            let matched = hasher
                .verify("whatever-was-typed".into(), &phc)
                .await
                .expect("verify");
            real.push(started.elapsed());
            assert!(!matched);
        }
        dummy.sort();
        real.sort();
        let (dummy, real) = (dummy[2], real[2]);
        eprintln!("median verify_dummy {dummy:?}, median verify {real:?}");
        // Same parameters, same work; fail only on a gross gap (a dummy that
        // skipped argon2), not on scheduling noise.
        assert!(dummy * 3 > real, "dummy {dummy:?} vs verify {real:?}");
        assert_eq!(hasher.in_use(), 0);
    }

    #[tokio::test]
    async fn making_a_hasher_runs_no_argon2_and_its_dummy_matches_nothing() {
        // 200 iterations: one argon2id run would take well over a second.
        let config = PasswordConfig {
            iterations: 200,
            pool_size: 1,
            ..PasswordConfig::default()
        };
        let started = Instant::now();
        let slow = PasswordHasher::new(&config);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(300),
            "start-up spends no argon2id run: {took:?}"
        );
        assert!(
            slow.inner
                .dummy
                .starts_with("$argon2id$v=19$m=19456,t=200,p=1$"),
            "{}",
            slow.inner.dummy
        );
        assert_ne!(slow.inner.dummy, PasswordHasher::new(&config).inner.dummy);
        let fast = hasher(1);
        assert!(
            !fast
                .verify("correct horse battery staple".into(), &fast.inner.dummy)
                .await
                .expect("a well-formed hash that matches nothing")
        );
    }

    #[tokio::test]
    async fn verify_refuses_malformed_hashes_without_quoting_them() {
        let hasher = hasher(1);
        for bad in [
            "",
            "plaintext-password",
            "$argon2id$v=19$m=19456,t=2,p=1$bad",
        ] {
            let err = hasher
                .verify("correct horse battery staple".into(), bad)
                .await
                .expect_err(bad);
            assert!(matches!(err, ApiError::Internal(_)), "{err:?}");
            if !bad.is_empty() {
                assert!(!format!("{err:#}").contains(bad), "{err:#}");
            }
        }
    }

    #[tokio::test]
    async fn needs_rehash_when_stored_parameters_are_weaker() {
        let hasher = hasher(1);
        let weaker = |m: u32, t: u32, p: u32| {
            Argon2::new(
                Algorithm::Argon2id,
                Version::V0x13,
                Params::new(m, t, p, None).expect("params"),
            )
            .hash_password(b"correct horse battery staple")
            .expect("hash")
            .to_string()
        };
        let weak_memory = weaker(8_192, 2, 1);
        assert!(hasher.needs_rehash(&weak_memory));
        assert!(hasher.needs_rehash(&weaker(19_456, 1, 1)));
        // Stronger than configured: keep it.
        assert!(!hasher.needs_rehash(&weaker(32_768, 3, 1)));
        // Another variant or garbage: rehash.
        let argon2i = Argon2::new(Algorithm::Argon2i, Version::V0x13, Params::DEFAULT)
            .hash_password(b"correct horse battery staple")
            .expect("hash")
            .to_string();
        assert!(hasher.needs_rehash(&argon2i));
        assert!(hasher.needs_rehash("not a phc string"));
        // Old hashes still verify with their own parameters until replaced.
        assert!(
            hasher
                .verify("correct horse battery staple".into(), &weak_memory)
                .await
                .expect("verify")
        );
    }

    #[tokio::test]
    async fn debug_shows_parameters_never_passwords_or_hashes() {
        let hasher = hasher(3);
        let phc = hasher
            .hash("correct horse battery staple".into())
            .await
            .expect("hash");
        let shown = format!("{hasher:?}");
        assert!(shown.contains("memory_kib: 19456"), "{shown}");
        assert!(shown.contains("pool_size: 3"), "{shown}");
        assert!(!shown.contains("$argon2"), "{shown}");
        let salt_and_hash = phc.rsplit('$').next().expect("hash part");
        assert!(!shown.contains(salt_and_hash), "{shown}");
        assert!(!format!("{:?}", PasswordPolicy::default()).contains("horse"));
    }

    // ---- the bounded pool (P9) ----

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn pool_never_runs_more_hashes_at_once_than_its_size() {
        let hasher = hasher(2);
        let started = Instant::now();
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let hasher = hasher.clone();
                tokio::spawn(async move { hasher.hash(format!("password number {i}")).await })
            })
            .collect();
        let mut hashes = Vec::new();
        for task in tasks {
            hashes.push(task.await.expect("task").expect("hash"));
        }
        eprintln!("12 hashes through a pool of 2 in {:?}", started.elapsed());
        assert_eq!(hashes.len(), 12);
        assert!(hashes.iter().all(|phc| phc.starts_with(OWASP_PREFIX)));
        let peak = hasher.inner.peak.load(Ordering::SeqCst);
        assert!(peak <= 2, "{peak} hashes ran at once with a pool of 2");
        assert_eq!(peak, 2, "the pool should be used to its size");
        assert_eq!(hasher.in_use(), 0);
        assert_eq!(hasher.inner.permits.available_permits(), 2);
        for (i, phc) in hashes.iter().enumerate() {
            assert!(
                hasher
                    .verify(format!("password number {i}"), phc)
                    .await
                    .expect("verify")
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hashes_run_on_the_pools_own_threads_only() {
        let hasher = hasher(2);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let hasher = hasher.clone();
                tokio::spawn(async move {
                    hasher
                        .run("test", |_| std::thread::current().name().map(str::to_owned))
                        .await
                })
            })
            .collect();
        let mut threads = std::collections::BTreeSet::new();
        for task in tasks {
            threads.insert(task.await.expect("task").expect("ran"));
        }
        // Memory follows the threads that ever hashed: at most the pool's.
        assert!(threads.len() <= 2, "{threads:?}");
        assert!(
            threads
                .iter()
                .all(|name| name.as_deref().is_some_and(|n| n.starts_with("argon2-"))),
            "{threads:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_keeps_its_slot_until_argon2_ends() {
        let hasher = hasher(1);
        let abandoned =
            tokio::time::timeout(Duration::from_millis(1), hasher.hash("given up on".into())).await;
        assert!(abandoned.is_err(), "the hash cannot finish within 1 ms");
        // The abandoned run still holds the only permit...
        assert_eq!(hasher.inner.permits.available_permits(), 0);
        // ...so the next hash waits for it instead of running alongside.
        hasher.hash("next in line".into()).await.expect("hash");
        assert_eq!(hasher.inner.peak.load(Ordering::SeqCst), 1);
        assert_eq!(hasher.inner.permits.available_permits(), 1);
    }

    /// A hasher with one thread and room for `queue` waiting runs, and a
    /// run that holds its thread until the returned sender is dropped.
    async fn busy_hasher(queue: usize) -> (PasswordHasher, std::sync::mpsc::Sender<()>) {
        let hasher = PasswordHasher::new(&PasswordConfig {
            pool_size: 1,
            queue_size: queue,
            ..PasswordConfig::default()
        });
        let (release, held) = std::sync::mpsc::channel::<()>();
        let holder = hasher.clone();
        tokio::spawn(async move { holder.run("test", move |_| held.recv()).await });
        while hasher.in_use() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (hasher, release)
    }

    /// Waits until `count` runs wait for the thread.
    async fn until_waiting(hasher: &PasswordHasher, count: usize) {
        while hasher.waiting() != count {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_at_once_with_unavailable_and_a_retry_delay() {
        let (hasher, release) = busy_hasher(2).await;
        let queued: Vec<_> = (0..2)
            .map(|i| {
                let hasher = hasher.clone();
                tokio::spawn(async move { hasher.hash(format!("queued password {i}")).await })
            })
            .collect();
        until_waiting(&hasher, 2).await;

        // Both ways in are refused alike, the dummy of unknown users too.
        let refused = hasher.hash("one too many".into()).await.expect_err("full");
        let dummy = hasher
            .verify_dummy("one too many".into())
            .await
            .expect_err("full");
        for error in [refused, dummy] {
            match error {
                ApiError::Rejected {
                    reason: Reason::Unavailable,
                    retry_after: Some(after),
                    ..
                } => assert!(after >= MIN_RETRY_DELAY, "{after:?}"),
                other => panic!("expected UNAVAILABLE with a retry delay, got {other:?}"),
            }
        }
        assert_eq!(hasher.waiting(), 2, "a refused run never waits");

        drop(release);
        for task in queued {
            let phc = task.await.expect("task").expect("queued runs are served");
            assert!(phc.starts_with(OWASP_PREFIX));
        }
        assert_eq!(hasher.waiting(), 0);
        hasher.hash("room again".into()).await.expect("served");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_waiting_leaves_the_queue() {
        let (hasher, release) = busy_hasher(1).await;
        let waiter = {
            let hasher = hasher.clone();
            tokio::spawn(async move { hasher.hash("given up on".into()).await })
        };
        until_waiting(&hasher, 1).await;
        waiter.abort();
        until_waiting(&hasher, 0).await;
        // Its place is free again.
        let next = {
            let hasher = hasher.clone();
            tokio::spawn(async move { hasher.hash("next in line".into()).await })
        };
        until_waiting(&hasher, 1).await;
        drop(release);
        next.await.expect("task").expect("served");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_threads_run_at_the_configured_niceness() {
        let own = || rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        // The tests may themselves run under `nice`: never raised above it.
        let base = own().expect("own priority");
        for nice in [0, 7, DEFAULT_THREAD_NICE] {
            let hasher = PasswordHasher::new(&PasswordConfig {
                pool_size: 1,
                thread_nice: nice,
                ..PasswordConfig::default()
            });
            let seen = hasher
                .run("test", |_| {
                    rustix::process::getpriority_process(Some(rustix::thread::gettid()))
                })
                .await
                .expect("ran")
                .expect("priority");
            assert_eq!(seen, nice.max(base), "configured {nice}");
        }
        // The calling threads keep theirs.
        assert_eq!(own().expect("own priority"), base);
    }

    // ---- properties ----

    proptest! {
        #[test]
        fn policy_output_is_nfc_within_limits_and_stable(
            chars in proptest::collection::vec(any::<char>(), 0..200)
        ) {
            let input: String = chars.into_iter().collect();
            let policy = PasswordPolicy::default();
            if let Ok(normalized) = policy.check(&input, "password") {
                let length = normalized.chars().count();
                prop_assert!((8..=128).contains(&length));
                prop_assert!(!normalized.chars().any(char::is_control));
                prop_assert_eq!(&normalized, &normalize(&input));
                prop_assert_eq!(policy.check(&normalized, "password").ok(), Some(normalized.clone()));
            }
        }
    }

    proptest! {
        // Each case costs two argon2id runs with production parameters.
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn accepted_passwords_round_trip_hash_then_verify(
            chars in proptest::collection::vec(
                any::<char>().prop_filter("control characters are refused", |c| !c.is_control()),
                8..=128,
            )
        ) {
            let input: String = chars.into_iter().collect();
            let checked = PasswordPolicy::default().check(&input, "password");
            // Only NFC composition can shrink the input below 8: rare.
            prop_assume!(checked.is_ok());
            let password = checked.expect("accepted");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let hasher = shared_hasher();
            let verified = runtime.block_on(async {
                let phc = hasher.hash(password.clone()).await.expect("hash");
                prop_assert!(phc.starts_with(OWASP_PREFIX));
                let right = hasher.verify(input.clone(), &phc).await.expect("verify");
                let wrong = hasher.verify(format!("{password}x"), &phc).await.expect("verify");
                Ok((right, wrong))
            })?;
            prop_assert_eq!(verified, (true, false));
        }
    }

    /// One hasher for every proptest case (its dummy hash is computed once).
    fn shared_hasher() -> PasswordHasher {
        static HASHER: std::sync::OnceLock<PasswordHasher> = std::sync::OnceLock::new();
        HASHER.get_or_init(|| hasher(2)).clone()
    }
}
