//! The model threads: one loads the engine, then serves the `search` lane; with a caption
//! model a second thread serves the `caption` lane (Caption requests and searches that caption
//! their hits), so slow caption generation never holds up plain searches. Each lane is a
//! bounded queue served in dynamic batches, off the async runtime.
//!
//! Each turn takes the first queued job, then whatever else arrives within `batch_wait` (up to
//! `max_batch` jobs), and hands their queries to `Engine::answer` in one call (which batches
//! the model work across them; see `blipdex_search::Query`). Replies go back through oneshot
//! channels; a panic in the engine fails the turn's requests with INTERNAL and the thread keeps
//! serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blipdex_search::{Answer, Engine, Query};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use tokio::sync::oneshot;

use crate::metrics::Metrics;

pub(crate) type Reply<T> = oneshot::Sender<blipdex_core::Result<T>>;

/// One queued request: a query validated by its handler, and where its answer goes.
pub(crate) struct Job {
    pub query: Query,
    pub reply: Reply<Answer>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub max_batch: usize,
    pub batch_wait: Duration,
}

/// Which queue and model thread a job goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    Search,
    Caption,
}

impl Lane {
    pub fn name(self) -> &'static str {
        match self {
            Lane::Search => "search",
            Lane::Caption => "caption",
        }
    }
}

/// The senders of both lanes.
pub(crate) struct Queues {
    pub search: crossbeam_channel::Sender<Job>,
    pub caption: crossbeam_channel::Sender<Job>,
}

impl Queues {
    pub fn lane(&self, lane: Lane) -> &crossbeam_channel::Sender<Job> {
        match lane {
            Lane::Search => &self.search,
            Lane::Caption => &self.caption,
        }
    }
}

/// Serves one lane's jobs until every sender is dropped.
pub(crate) fn run(
    engine: &Engine,
    rx: &Receiver<Job>,
    lane: Lane,
    limits: BatchLimits,
    metrics: &Metrics,
) {
    let max_batch = limits.max_batch.max(1);
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + limits.batch_wait;
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => {
                    jobs.push(j);
                    continue;
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => break,
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(j) => jobs.push(j),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics
            .queue_depth
            .with_label_values(&[lane.name()])
            .set(rx.len() as i64);
        metrics.batch_jobs.observe(jobs.len() as f64);
        let start = Instant::now();
        // Only this turn's jobs are lost to a panic: their reply senders are dropped, so
        // their handlers answer INTERNAL.
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            process(engine, jobs, metrics);
        }));
        if turn.is_err() {
            tracing::error!("the model panicked; the affected requests failed with INTERNAL");
        }
        metrics.batch_seconds.observe(start.elapsed().as_secs_f64());
    }
    tracing::debug!(lane = lane.name(), "model thread: queue closed");
}

fn process(engine: &Engine, jobs: Vec<Job>, metrics: &Metrics) {
    let (queries, replies): (Vec<Query>, Vec<Reply<Answer>>) =
        jobs.into_iter().map(|j| (j.query, j.reply)).unzip();
    let (answers, sizes) = engine.answer(queries);
    for (label, n) in [
        ("text", sizes.texts),
        ("image", sizes.images),
        ("itm_pairs", sizes.itm_pairs),
        ("caption", sizes.captions),
    ] {
        if n > 0 {
            metrics
                .batch_items
                .with_label_values(&[label])
                .observe(n as f64);
        }
    }
    for (answer, reply) in answers.into_iter().zip(replies) {
        let _ = reply.send(answer);
    }
}

/// Where loading the engine ends up.
pub(crate) type Loaded = Result<Arc<Engine>, String>;

#[cfg(test)]
mod tests {
    use super::*;
    use blipdex_model::{LoadOptions, ModelFiles, Retriever};
    use blipdex_search::{EngineOptions, SearchParams};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// Batching, without timing: ten queries queued before the model thread starts are answered
    /// in turns of `max_batch` (4, 4, 2), each with its own answer.
    #[test]
    fn a_turn_takes_what_is_queued_up_to_max_batch() -> TestResult {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let tmp = tempfile::tempdir()?;
        let index = tmp.path().join("index");
        let files = ModelFiles::resolve(&fixtures.join("models/itm-a").to_string_lossy(), None)?;
        let retriever = Retriever::load(&files, &LoadOptions::default())?;
        let job = blipdex_ingest::IngestJob {
            roots: vec![fixtures.join("photos")],
            index: Some(index.clone()),
            model: Some(files.name.clone()),
            ..Default::default()
        };
        blipdex_ingest::ingest(&job, &retriever)?;
        let engine = Engine::load(&EngineOptions::new(&index, files))?;
        let (tx, rx) = crossbeam_channel::bounded(16);
        let mut replies = Vec::new();
        for top_k in 1..=10 {
            let (reply, answer) = oneshot::channel();
            let query = Query::Text {
                text: format!("photo number {top_k}"),
                params: SearchParams {
                    top_k,
                    exact: true,
                    ..SearchParams::default()
                },
                rerank_top_n: 0,
                with_captions: false,
            };
            tx.send(Job { query, reply })?;
            replies.push((top_k.min(5), answer));
        }
        drop(tx);
        let metrics = Metrics::new()?;
        let limits = BatchLimits {
            max_batch: 4,
            batch_wait: Duration::ZERO,
        };
        run(&engine, &rx, Lane::Search, limits, &metrics);
        assert_eq!(metrics.batch_jobs.get_sample_count(), 3);
        assert_eq!(metrics.batch_jobs.get_sample_sum(), 10.0);
        for (want, answer) in replies {
            match answer.blocking_recv()? {
                Ok(Answer::Hits { hits, .. }) => assert_eq!(hits.len(), want),
                Ok(Answer::Caption(_)) => panic!("a caption for a text search"),
                Err(status) => panic!("{status}"),
            }
        }
        Ok(())
    }
}
