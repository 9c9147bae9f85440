//! The jobs waiting for one notification node: bounded without ever dropping a fire.
//!
//! Every watchdog that shares a node has its own small queue of pending script runs, and the
//! node keeps a FIFO of the watchdogs that have work, each watchdog in it at most once. The
//! runner takes the first job of the first watchdog in that FIFO; a watchdog with more work
//! goes to the back. So:
//! - N watchdogs expiring together need N slots, never more, and none is refused;
//! - each watchdog's jobs run in the order it submitted them (an escalation step, or a
//!   `stopped_script`, waits behind the watchdog's earlier script, it is never dropped);
//! - watchdogs are served fairly: one with a long chain cannot hold the node while others wait.
//!
//! A job identical to one of the same watchdog that has not started yet is coalesced with it
//! (it would do the same thing, and the waiting one will run), so a watchdog's queue is bounded
//! by the number of distinct scripts in its chain.
//!
//! [`JobQueue::push`] never blocks and never awaits: a watchdog task calls it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::warn;

use super::Job;
use super::limits::{DEEP_BACKLOG, DEEP_LOG_INTERVAL};

/// What became of a pushed job.
#[derive(Debug)]
pub enum Pushed {
    /// Queued; `backlog` jobs now wait on the node (this one included).
    Queued {
        /// Jobs waiting on the node.
        backlog: usize,
    },
    /// The same watchdog already has an identical job waiting; that one will run.
    Coalesced,
    /// The runner has stopped (shutdown or reload); the job is handed back.
    Closed(Job),
}

#[derive(Debug, Default)]
struct Inner {
    /// Each watchdog's jobs not started yet, oldest first; never an empty entry.
    waiting: HashMap<Arc<str>, VecDeque<Job>>,
    /// Watchdogs with work, in the order they are served; each at most once.
    order: VecDeque<Arc<str>>,
    /// Jobs waiting, over all watchdogs.
    len: usize,
    closed: bool,
    backlog: Gauge,
    last_deep_log: Option<Instant>,
    deep_suppressed: u64,
}

/// The pending jobs of one notification node.
#[derive(Debug)]
pub struct JobQueue {
    node: Arc<str>,
    inner: Mutex<Inner>,
    ready: Notify,
}

impl JobQueue {
    /// An empty queue for the node `node` (used in log lines).
    pub fn new(node: &str) -> Self {
        JobQueue {
            node: node.into(),
            inner: Mutex::default(),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Exports the backlog (jobs waiting) on `gauge` from now on.
    pub fn set_gauge(&self, gauge: Gauge) {
        let mut inner = self.lock();
        gauge.set(inner.len as i64);
        inner.backlog = gauge;
    }

    /// Queues a job behind the same watchdog's earlier ones. Never blocks.
    pub fn push(&self, job: Job) -> Pushed {
        let mut inner = self.lock();
        if inner.closed {
            return Pushed::Closed(job);
        }
        let key = job.watchdog.clone();
        let mine = inner.waiting.entry(key.clone()).or_default();
        if let Some(same) = mine
            .iter_mut()
            .find(|j| Arc::ptr_eq(&j.script, &job.script) || *j.script == *job.script)
        {
            // The waiting job now also stands for this one: it is meant for the newest QEMU
            // process either was queued for.
            same.process = same.process.max(job.process);
            return Pushed::Coalesced;
        }
        let first = mine.is_empty();
        mine.push_back(job);
        if first {
            inner.order.push_back(key);
        }
        inner.len += 1;
        let backlog = inner.len;
        inner.backlog.set(backlog as i64);
        if backlog >= DEEP_BACKLOG {
            let now = Instant::now();
            if inner
                .last_deep_log
                .is_none_or(|t| now.duration_since(t) >= DEEP_LOG_INTERVAL)
            {
                let suppressed = std::mem::take(&mut inner.deep_suppressed);
                inner.last_deep_log = Some(now);
                warn!(
                    node = &*self.node,
                    backlog,
                    watchdogs = inner.order.len(),
                    suppressed,
                    "the notification node's backlog is deep: scripts wait their turn"
                );
            } else {
                inner.deep_suppressed += 1;
            }
        }
        drop(inner);
        self.ready.notify_one();
        Pushed::Queued { backlog }
    }

    /// Takes the next job without waiting: the first job of the watchdog served longest ago.
    pub fn try_pop(&self) -> Option<Job> {
        let mut inner = self.lock();
        let key = inner.order.pop_front()?;
        let mine = inner
            .waiting
            .get_mut(&key)
            .expect("ordered watchdogs have jobs");
        let job = mine.pop_front().expect("ordered watchdogs have jobs");
        if mine.is_empty() {
            inner.waiting.remove(&key);
        } else {
            inner.order.push_back(key);
        }
        inner.len -= 1;
        inner.backlog.set(inner.len as i64);
        Some(job)
    }

    /// Waits for the next job. Cancel-safe (one consumer: the node's runner).
    pub async fn pop(&self) -> Job {
        loop {
            if let Some(job) = self.try_pop() {
                return job;
            }
            // A push between try_pop and here leaves a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether no job waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses further jobs and returns those still waiting, in serving order.
    pub fn close(&self) -> Vec<Job> {
        self.lock().closed = true;
        let mut out = Vec::new();
        while let Some(j) = self.try_pop() {
            out.push(j);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn job(wd: &str, script: &str) -> Job {
        Job::for_test(wd, script)
    }

    fn name(j: &Job) -> String {
        format!("{}:{}", j.watchdog, j.script)
    }

    fn drain(q: &JobQueue) -> Vec<String> {
        std::iter::from_fn(|| q.try_pop())
            .map(|j| name(&j))
            .collect()
    }

    #[test]
    fn a_burst_of_n_watchdogs_takes_n_slots_and_loses_none() {
        let q = JobQueue::new("mon");
        for i in 0..1000 {
            assert!(matches!(
                q.push(job(&format!("w{i}"), "quit")),
                Pushed::Queued { backlog } if backlog == i + 1
            ));
        }
        assert_eq!(q.len(), 1000);
        let got = drain(&q);
        assert_eq!(got.len(), 1000);
        assert_eq!(got[0], "w0:quit (QMP quit)");
        assert_eq!(got[999], "w999:quit (QMP quit)", "FIFO across watchdogs");
        assert!(q.is_empty());
    }

    #[test]
    fn a_later_job_waits_behind_the_watchdogs_earlier_one_and_others_are_served_between() {
        let q = JobQueue::new("mon");
        q.push(job("a", "system_reset"));
        q.push(job("b", "system_reset"));
        q.push(job("a", "quit")); // a's escalation step while its reset still waits
        q.push(job("c", "system_reset"));
        assert_eq!(
            drain(&q),
            [
                "a:system_reset (QMP system_reset)",
                "b:system_reset (QMP system_reset)",
                "c:system_reset (QMP system_reset)",
                "a:quit (QMP quit)",
            ],
            "in order per watchdog, and a goes to the back after each of its jobs"
        );
    }

    #[test]
    fn an_identical_waiting_job_is_coalesced_so_the_chain_bounds_the_queue() {
        let q = JobQueue::new("mon");
        // A watchdog that flaps while its node is down: script, escalation, script again…
        for _ in 0..100 {
            q.push(job("a", "system_reset"));
            q.push(job("a", "quit"));
        }
        assert_eq!(q.len(), 2, "bounded by the distinct scripts of the chain");
        assert!(matches!(q.push(job("a", "quit")), Pushed::Coalesced));
        assert!(
            matches!(q.push(job("b", "quit")), Pushed::Queued { .. }),
            "another watchdog's identical job is its own"
        );
        assert_eq!(
            drain(&q),
            [
                "a:system_reset (QMP system_reset)",
                "b:quit (QMP quit)",
                "a:quit (QMP quit)"
            ]
        );
        // Once started (taken), a job no longer absorbs a new identical one.
        q.push(job("a", "quit"));
        assert_eq!(
            q.try_pop().map(|j| name(&j)).as_deref(),
            Some("a:quit (QMP quit)")
        );
        assert!(matches!(
            q.push(job("a", "quit")),
            Pushed::Queued { backlog: 1 }
        ));
    }

    #[test]
    fn the_backlog_gauge_follows_the_queue() {
        let m = Metrics::new();
        let q = JobQueue::new("mon");
        q.push(job("a", "quit"));
        q.set_gauge(m.node_backlog("mon"));
        q.push(job("b", "quit"));
        assert!(m.encode().contains("awd_action_backlog{node=\"mon\"} 2"));
        q.try_pop();
        assert!(m.encode().contains("awd_action_backlog{node=\"mon\"} 1"));
    }

    #[test]
    fn a_closed_queue_hands_jobs_back_and_returns_the_abandoned() {
        let q = JobQueue::new("mon");
        q.push(job("a", "quit"));
        q.push(job("b", "quit"));
        let abandoned: Vec<_> = q.close().iter().map(name).collect();
        assert_eq!(abandoned, ["a:quit (QMP quit)", "b:quit (QMP quit)"]);
        assert!(matches!(q.push(job("c", "quit")), Pushed::Closed(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn pop_waits_for_a_push_and_submitting_never_waits() {
        let q = Arc::new(JobQueue::new("mon"));
        let q2 = q.clone();
        let consumer = tokio::spawn(async move { name(&q2.pop().await) });
        tokio::task::yield_now().await;
        assert!(!consumer.is_finished());
        q.push(job("a", "quit"));
        let got = tokio::time::timeout(std::time::Duration::from_secs(1), consumer)
            .await
            .expect("woken by the push")
            .unwrap();
        assert_eq!(got, "a:quit (QMP quit)");
    }
}
