//! Group commit at the application level: concurrent calls that must be
//! serialised on one key (an account's seat lock, say) are handed to one
//! worker per key, which runs everything queued for that key as one batch —
//! one lock, one transaction, one commit — and answers each caller.
//!
//! A call that finds no worker for its key starts one (a spawned task, so a
//! caller that goes away never strands the others); the worker takes what is
//! queued, up to `max_batch` items and `max_weight` in all (an item's weight
//! is what the caller says it costs, for instance its rows; a batch always
//! takes at least one item), runs it, and goes on until the queue is empty.
//! Calls made while a batch runs wait for the next one: under load batches
//! grow by themselves, and a lone call waits for nothing.
//!
//! The batch function answers every item of the batch, in order. It owns the
//! fallback when a batch fails as a whole (for instance: run each item on its
//! own, so each caller gets its own error).

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::oneshot;
use tracing::Instrument as _;

/// Items queued for one key, each with its weight, where its answer goes and
/// the span of the call that queued it.
type Queue<T, R> = Vec<(T, usize, oneshot::Sender<R>, tracing::Span)>;

/// The queues, by key.
type Queues<K, T, R> = Arc<Mutex<HashMap<K, Queue<T, R>>>>;

/// Locks the queues; a poisoned lock is taken over (the map stays valid:
/// every change to it is a single insert, drain or remove).
fn lock<K, T, R>(queues: &Queues<K, T, R>) -> MutexGuard<'_, HashMap<K, Queue<T, R>>> {
    queues.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ends a worker: whatever is still queued for its key when it stops —
/// normally nothing; after a panic of the batch function, the calls queued
/// meanwhile — is answered [`Unanswered`] (their senders are dropped), and
/// the next call starts a new worker.
///
/// A worker that ends normally removes its key itself, in the same critical
/// section that found its queue empty, and disarms this: removing it later
/// would drop a call queued in between (the caller would get [`Unanswered`]
/// for nothing) or the queue of the next worker.
struct Retire<K: Eq + Hash, T, R> {
    queues: Queues<K, T, R>,
    key: K,
    armed: bool,
}

impl<K: Eq + Hash, T, R> Drop for Retire<K, T, R> {
    fn drop(&mut self) {
        if self.armed {
            let mut map = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            map.remove(&self.key);
        }
    }
}

/// One worker per key, batching the items queued for it.
pub struct Coalescer<K, T, R> {
    queues: Queues<K, T, R>,
    max_batch: usize,
    max_weight: usize,
}

impl<K, T, R> std::fmt::Debug for Coalescer<K, T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("keys", &lock(&self.queues).len())
            .field("max_batch", &self.max_batch)
            .field("max_weight", &self.max_weight)
            .finish()
    }
}

impl<K, T, R> Clone for Coalescer<K, T, R> {
    fn clone(&self) -> Self {
        Self {
            queues: self.queues.clone(),
            max_batch: self.max_batch,
            max_weight: self.max_weight,
        }
    }
}

/// Why a call got no answer: the batch function panicked or the runtime is
/// shutting down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the batch that held this call ended without answering it")]
pub struct Unanswered;

impl<K, T, R> Coalescer<K, T, R>
where
    K: Eq + Hash + Clone + Send + 'static,
    T: Send + 'static,
    R: Send + 'static,
{
    /// A coalescer running at most `max_batch` items per batch (at least 1),
    /// whatever their weight.
    pub fn new(max_batch: usize) -> Self {
        Self {
            queues: Arc::new(Mutex::new(HashMap::new())),
            max_batch: max_batch.max(1),
            max_weight: usize::MAX,
        }
    }

    /// The same, with batches of at most `max_weight` in all (an item
    /// heavier than that runs alone).
    #[must_use]
    pub fn with_max_weight(mut self, max_weight: usize) -> Self {
        self.max_weight = max_weight.max(1);
        self
    }

    /// Queues `item` (of weight 1) under `key` and waits for its answer.
    /// `batch` runs one batch (items in arrival order) and must return one
    /// answer per item, in the same order; a missing answer is [`Unanswered`].
    pub async fn submit<F, Fut>(&self, key: K, item: T, batch: F) -> Result<R, Unanswered>
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        self.submit_weighted(key, item, 1, batch).await
    }

    /// [`Self::submit`] for an item of `weight` (see [`Self::with_max_weight`]).
    pub async fn submit_weighted<F, Fut>(
        &self,
        key: K,
        item: T,
        weight: usize,
        batch: F,
    ) -> Result<R, Unanswered>
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let span = tracing::Span::current();
        let start_worker = {
            let mut queues = lock(&self.queues);
            match queues.get_mut(&key) {
                // A worker is running for this key: it takes this item next.
                Some(queue) => {
                    queue.push((item, weight, tx, span));
                    false
                }
                None => {
                    queues.insert(key.clone(), vec![(item, weight, tx, span)]);
                    true
                }
            }
        };
        if start_worker {
            let (queues, max_batch, max_weight) =
                (self.queues.clone(), self.max_batch, self.max_weight);
            tokio::spawn(async move {
                let mut retire = Retire {
                    queues,
                    key,
                    armed: true,
                };
                loop {
                    let taken: Option<Queue<T, R>> = {
                        let mut map = lock(&retire.queues);
                        match map.get_mut(&retire.key) {
                            None => None,
                            Some(queue) if queue.is_empty() => {
                                // Nothing arrived during the last batch:
                                // this worker ends, under the lock a new
                                // call takes, and the next call starts
                                // another.
                                map.remove(&retire.key);
                                None
                            }
                            Some(queue) => {
                                let n = batch_len(queue, max_batch, max_weight);
                                Some(queue.drain(..n).collect())
                            }
                        }
                    };
                    let Some(taken) = taken else {
                        retire.armed = false;
                        break;
                    };
                    // With traces exported, the batch is a `batch` span of
                    // the first queued call's trace (its database
                    // transaction a child of it); the other calls' traces
                    // show only their wait.
                    let span = taken
                        .first()
                        .filter(|_| crate::telemetry::traces_exported())
                        .filter(|(_, _, _, first)| !first.is_none())
                        .map(|(_, _, _, first)| {
                            tracing::info_span!(parent: first, "batch", calls = taken.len())
                        })
                        .unwrap_or_else(tracing::Span::none);
                    let (items, senders): (Vec<T>, Vec<oneshot::Sender<R>>) =
                        taken.into_iter().map(|(item, _, tx, _)| (item, tx)).unzip();
                    metrics::histogram!("usher_coalesced_batch_size").record(items.len() as f64);
                    let answers = batch(items).instrument(span).await;
                    for (sender, answer) in senders.into_iter().zip(answers) {
                        // The caller may have gone away: its answer is dropped.
                        let _ = sender.send(answer);
                    }
                }
            });
        }
        rx.await.map_err(|_| Unanswered)
    }
}

/// How many items from the front of `queue` the next batch takes: at most
/// `max_batch`, at most `max_weight` in all, and at least one.
fn batch_len<T, R>(queue: &Queue<T, R>, max_batch: usize, max_weight: usize) -> usize {
    let mut weight = 0usize;
    let within = queue
        .iter()
        .take(max_batch)
        .take_while(|(_, w, _, _)| {
            weight = weight.saturating_add(*w);
            weight <= max_weight
        })
        .count();
    within.max(1).min(queue.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;

    #[tokio::test]
    async fn a_lone_call_is_a_batch_of_one() {
        let coalescer = Coalescer::new(10);
        let answer = coalescer
            .submit("k", 2, |items: Vec<i32>| async move {
                items.iter().map(|i| i * 10).collect()
            })
            .await;
        assert_eq!(answer, Ok(20));
    }

    #[tokio::test]
    async fn concurrent_calls_on_one_key_share_batches_and_get_their_own_answers() {
        let coalescer = Coalescer::new(8);
        let batches = Arc::new(Mutex::new(Vec::<usize>::new()));
        let running = Arc::new(AtomicUsize::new(0));
        let mut calls = Vec::new();
        for i in 0..40 {
            let (coalescer, batches, running) =
                (coalescer.clone(), batches.clone(), running.clone());
            calls.push(tokio::spawn(async move {
                coalescer
                    .submit("account", i, move |items: Vec<i32>| {
                        let (batches, running) = (batches.clone(), running.clone());
                        async move {
                            // Never two batches of one key at once.
                            assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            batches.lock().unwrap().push(items.len());
                            running.fetch_sub(1, Ordering::SeqCst);
                            items.iter().map(|i| i + 1000).collect()
                        }
                    })
                    .await
            }));
        }
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Ok(i as i32 + 1000));
        }
        let sizes = batches.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(sizes.iter().all(|&n| n <= 8), "{sizes:?}");
        assert!(sizes.len() < 40, "calls were batched: {sizes:?}");
    }

    #[tokio::test]
    async fn batches_stay_within_their_weight_and_a_heavy_item_runs_alone() {
        let coalescer = Coalescer::new(64).with_max_weight(1_000);
        let batches = Arc::new(Mutex::new(Vec::<Vec<usize>>::new()));
        // Held by the first call's batch, so the rest queue up behind it.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let weights = [1, 600, 300, 200, 900, 2_500, 100, 100];
        let mut calls = Vec::new();
        for weight in weights {
            let (coalescer, batches, gate) = (coalescer.clone(), batches.clone(), gate.clone());
            calls.push(tokio::spawn(async move {
                coalescer
                    .submit_weighted("lane", weight, weight, move |items: Vec<usize>| {
                        let (batches, gate) = (batches.clone(), gate.clone());
                        async move {
                            if items == [1] {
                                let _ = gate.acquire().await;
                            }
                            batches.lock().unwrap().push(items.clone());
                            items
                        }
                    })
                    .await
            }));
            // Arrival in this order.
            tokio::task::yield_now().await;
        }
        gate.add_permits(1);
        for (call, weight) in calls.into_iter().zip(weights) {
            assert_eq!(call.await.unwrap(), Ok(weight));
        }
        let batches = batches.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![
                vec![1],
                vec![600, 300],
                vec![200],
                vec![900],
                vec![2_500],
                vec![100, 100],
            ]
        );
    }

    #[test]
    fn a_batch_takes_at_least_one_item_and_never_more_than_max_batch() {
        let queue: Queue<(), ()> = (0..5)
            .map(|_| ((), 10, oneshot::channel().0, tracing::Span::none()))
            .collect();
        assert_eq!(batch_len(&queue, 3, usize::MAX), 3);
        assert_eq!(batch_len(&queue, 64, 25), 2);
        assert_eq!(batch_len(&queue, 64, 5), 1);
        assert_eq!(batch_len(&queue, 64, 1_000), 5);
    }

    #[tokio::test]
    async fn keys_do_not_wait_for_each_other() {
        let coalescer = Coalescer::new(8);
        let slow = {
            let coalescer = coalescer.clone();
            tokio::spawn(async move {
                coalescer
                    .submit("slow", 1, |items: Vec<i32>| async move {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        items
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        let fast = tokio::time::timeout(
            Duration::from_secs(10),
            coalescer.submit("fast", 2, |items: Vec<i32>| async move { items }),
        )
        .await
        .expect("another key is not held up");
        assert_eq!(fast, Ok(2));
        slow.abort();
    }

    #[tokio::test]
    async fn a_batch_that_answers_short_leaves_the_rest_unanswered_and_the_key_usable() {
        let coalescer = Coalescer::new(8);
        let short = coalescer
            .submit("k", 1, |_items: Vec<i32>| async move { Vec::new() })
            .await;
        assert_eq!(short, Err(Unanswered));
        let next = coalescer
            .submit("k", 3, |items: Vec<i32>| async move { items })
            .await;
        assert_eq!(next, Ok(3));
    }

    #[tokio::test]
    async fn a_panicking_batch_answers_unanswered_and_the_next_call_starts_afresh() {
        let coalescer = Coalescer::new(8);
        let failed = coalescer
            .submit("k", 1, |_items: Vec<i32>| async move {
                panic!("the batch function failed");
                #[allow(unreachable_code)]
                Vec::new()
            })
            .await;
        assert_eq!(failed, Err(Unanswered));
        let next = coalescer
            .submit("k", 5, |items: Vec<i32>| async move { items })
            .await;
        assert_eq!(next, Ok(5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_call_arriving_as_its_worker_ends_is_answered() {
        // Lone calls in quick succession on one key: each often arrives just
        // as the previous call's worker finds its queue empty and ends.
        let coalescer = Coalescer::new(4);
        for round in 0..2_000 {
            let mut calls = Vec::new();
            for i in 0..3 {
                let coalescer = coalescer.clone();
                calls.push(tokio::spawn(async move {
                    coalescer
                        .submit("key", i, |items: Vec<i32>| async move { items })
                        .await
                }));
            }
            for (i, call) in calls.into_iter().enumerate() {
                let answer = call.await.expect("joined");
                assert_eq!(answer, Ok(i as i32), "round {round}");
            }
        }
    }
}
