//! The load generator: `concurrency` workers call an async function in a
//! closed loop, for a duration (after a warm-up) or for a number of calls,
//! and record every call's latency and gRPC code.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

// tokio's clock, so tests can pause time; the same as std's when not paused.
use tokio::time::Instant;

use crate::stats::{Recorder, Summary};

/// When a run stops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stop {
    /// After a warm-up (calls made, not recorded), measure for this long.
    Duration {
        /// Calls in this first part are not recorded.
        warmup: Duration,
        /// Length of the measured part.
        measure: Duration,
    },
    /// Exactly this many calls, all recorded (no warm-up): for work that is
    /// consumed, such as invitation tokens.
    Count(u64),
}

/// One run's shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    /// Workers calling at once (each waits for its call before the next).
    pub concurrency: usize,
    /// When to stop.
    pub stop: Stop,
}

impl Load {
    /// `concurrency` workers for `measure` after `warmup`.
    pub fn timed(concurrency: usize, warmup: Duration, measure: Duration) -> Self {
        Self {
            concurrency,
            stop: Stop::Duration { warmup, measure },
        }
    }

    /// `concurrency` workers making `count` calls in all.
    pub fn count(concurrency: usize, count: u64) -> Self {
        Self {
            concurrency,
            stop: Stop::Count(count),
        }
    }
}

/// Runs `call` under `load`. `call` gets the call's sequence number (0, 1, …,
/// unique across workers) and fails with a gRPC status. Returns what the
/// measured part recorded.
pub async fn run<F, Fut>(load: Load, call: F) -> Summary
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (measure_from, measure_until) = match load.stop {
        Stop::Duration { warmup, measure } => (started + warmup, Some(started + warmup + measure)),
        Stop::Count(_) => (started, None),
    };
    let limit = match load.stop {
        Stop::Count(n) => n,
        Stop::Duration { .. } => u64::MAX,
    };
    let mut workers = Vec::with_capacity(load.concurrency.max(1));
    for _ in 0..load.concurrency.max(1) {
        let call = call.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut recorder = Recorder::new();
            let mut last_end = started;
            loop {
                let begin = Instant::now();
                if measure_until.is_some_and(|until| begin >= until) {
                    break;
                }
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= limit {
                    break;
                }
                let outcome = call(seq).await;
                let end = Instant::now();
                if begin >= measure_from {
                    let code = outcome.err().map(|status| format!("{:?}", status.code()));
                    recorder.record(end - begin, code.as_deref());
                    last_end = end;
                }
            }
            (recorder, last_end)
        }));
    }
    let mut total = Recorder::new();
    let mut last_end = started;
    for worker in workers {
        if let Ok((recorder, end)) = worker.await {
            total.merge(&recorder);
            last_end = last_end.max(end);
        }
    }
    let elapsed = match measure_until {
        // Calls started before the end are finished and counted.
        Some(until) => last_end.max(until) - measure_from,
        None => last_end - started,
    };
    total.summary(elapsed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use std::sync::Mutex;

    use super::*;

    #[tokio::test]
    async fn count_runs_each_sequence_number_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shared = seen.clone();
        let summary = run(Load::count(4, 100), move |seq| {
            let shared = shared.clone();
            async move {
                shared.lock().unwrap().push(seq);
                if seq % 10 == 0 {
                    Err(tonic::Status::unavailable("down"))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert_eq!(summary.calls, 100);
        assert_eq!(summary.ok, 90);
        assert_eq!(summary.errors["Unavailable"], 10);
    }

    #[tokio::test]
    async fn timed_runs_stop_and_record_every_measured_call() {
        // No warm-up: every call made is in the measured part, so each one
        // is recorded, whatever the machine's speed.
        let made = Arc::new(AtomicU64::new(0));
        let counter = made.clone();
        let summary = run(
            Load::timed(3, Duration::ZERO, Duration::from_millis(100)),
            move |_| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                    Err(tonic::Status::unauthenticated("no"))
                }
            },
        )
        .await;
        let made = made.load(Ordering::Relaxed);
        assert_eq!(summary.calls, made);
        assert_eq!(
            summary.errors.get("Unauthenticated").copied().unwrap_or(0),
            made
        );
        assert_eq!(summary.ok, 0);
        assert!(summary.seconds >= 0.1, "{summary:?}");
    }
}
