//! Request-path metrics kept per worker, as Envoy keeps its thread-local stats.
//!
//! Every request counts itself and records two latencies. With prometheus'
//! own counters and histograms, each of those is a few atomic operations on
//! cache lines that all workers write, so every request pays for moving those
//! lines between cores. Here each worker thread adds to its own line
//! ([`enter_worker`]); a scrape sums the lines. The request path still uses
//! atomic adds (a scrape reads while workers write), but no worker ever writes
//! another's line, so they cost what a plain add costs.
//!
//! The families keep every child they made, as prometheus' `*Vec`s do, so a
//! reload that keeps a route's labels keeps its counts.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};

/// Lines per cell: one per worker and one for every other thread. 0 until set.
static LINES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's line: 0 for threads that are not workers.
    static LINE: Cell<usize> = const { Cell::new(0) };
}

/// Sets the number of workers: cells made from now on have a line for each.
/// Process-wide; a process that runs several proxies (tests) may share lines
/// between workers, which stays correct (the adds are atomic).
pub fn set_workers(n: usize) {
    LINES.store(n + 1, Ordering::Relaxed);
}

/// Marks the calling thread as worker `i` (0-based).
pub fn enter_worker(i: usize) {
    LINE.with(|l| l.set(i + 1));
}

fn lines() -> usize {
    match LINES.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()) + 1,
        n => n,
    }
}

/// `N` counters on their own cache line(s).
#[repr(align(64))]
struct Line<const N: usize>([AtomicU64; N]);

/// `N` counters, one [`Line`] per worker; values are the sums over the lines.
struct Cells<const N: usize> {
    lines: Box<[Line<N>]>,
}

impl<const N: usize> Cells<N> {
    fn new() -> Self {
        Cells { lines: (0..lines()).map(|_| Line(std::array::from_fn(|_| AtomicU64::new(0)))).collect() }
    }

    /// The calling thread's line (a worker index past the cell's lines, for a
    /// cell made before [`set_workers`], shares a line: still correct).
    #[inline]
    fn mine(&self) -> &Line<N> {
        let i = LINE.with(Cell::get);
        &self.lines[i % self.lines.len()]
    }

    #[inline]
    fn add(&self, k: usize, v: u64) {
        self.mine().0[k].fetch_add(v, Ordering::Relaxed);
    }

    fn total(&self, k: usize) -> u64 {
        self.lines.iter().map(|l| l.0[k].load(Ordering::Relaxed)).sum()
    }
}

/// Status classes `1xx` … `5xx`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Requests counted by status class.
pub struct ClassCounter(Cells<5>);

impl ClassCounter {
    /// Counts one response with `status`.
    #[inline]
    pub fn inc(&self, status: u16) {
        let idx = (status / 100).clamp(1, 5) as usize - 1;
        self.0.add(idx, 1);
    }

    /// The count of status class `class` (0 for `1xx` … 4 for `5xx`).
    pub fn get(&self, class: usize) -> u64 {
        self.0.total(class)
    }
}

/// Upper bounds of the latency buckets, in nanoseconds: 50 µs to 30 s.
const BOUNDS_NS: [u64; 18] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];
/// Per line: a count per bucket, one for `+Inf`, and the sum in nanoseconds.
const SLOTS: usize = BOUNDS_NS.len() + 2;
const SUM: usize = SLOTS - 1;

/// A latency histogram with the buckets of [`BOUNDS_NS`].
pub struct Latency(Cells<SLOTS>);

impl Latency {
    /// Records one duration.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Prometheus buckets are `le`: the first bound at or above the value.
        let bucket = BOUNDS_NS.partition_point(|&b| b < ns);
        let line = self.0.mine();
        line.0[bucket].fetch_add(1, Ordering::Relaxed);
        line.0[SUM].fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        (0..SUM).map(|k| self.0.total(k)).sum()
    }

    fn proto(&self) -> proto::Histogram {
        let mut h = proto::Histogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BOUNDS_NS.len());
        for (k, bound) in BOUNDS_NS.iter().enumerate() {
            cumulative += self.0.total(k);
            let mut b = proto::Bucket::default();
            b.set_cumulative_count(cumulative);
            b.set_upper_bound(*bound as f64 / 1e9);
            buckets.push(b);
        }
        h.set_bucket(buckets);
        h.set_sample_count(cumulative + self.0.total(BOUNDS_NS.len()));
        h.set_sample_sum(self.0.total(SUM) as f64 / 1e9);
        h
    }
}

/// What a [`PerWorkerVec`]'s children are: [`ClassCounter`] or [`Latency`].
pub trait Child: Send + Sync + 'static {
    /// The family's prometheus type.
    const TYPE: MetricType;
    /// A new child, all zero.
    fn make() -> Self;
    /// Appends this child's metrics, labelled with `labels` (in the family's order).
    fn metrics(&self, names: &[String], labels: &[String], out: &mut Vec<Metric>);
}

fn pairs(names: &[String], values: &[&str]) -> Vec<LabelPair> {
    let mut v: Vec<LabelPair> = names
        .iter()
        .zip(values)
        .map(|(n, val)| {
            let mut p = LabelPair::default();
            p.set_name(n.clone());
            p.set_value((*val).to_owned());
            p
        })
        .collect();
    v.sort();
    v
}

impl Child for ClassCounter {
    const TYPE: MetricType = MetricType::COUNTER;
    fn make() -> Self {
        ClassCounter(Cells::new())
    }
    fn metrics(&self, names: &[String], labels: &[String], out: &mut Vec<Metric>) {
        for (k, class) in CLASSES.iter().enumerate() {
            let mut values: Vec<&str> = labels.iter().map(String::as_str).collect();
            values.push(class);
            let mut m = Metric::from_label(pairs(names, &values));
            let mut c = proto::Counter::default();
            c.set_value(self.get(k) as f64);
            m.set_counter(c);
            out.push(m);
        }
    }
}

impl Child for Latency {
    const TYPE: MetricType = MetricType::HISTOGRAM;
    fn make() -> Self {
        Latency(Cells::new())
    }
    fn metrics(&self, names: &[String], labels: &[String], out: &mut Vec<Metric>) {
        let values: Vec<&str> = labels.iter().map(String::as_str).collect();
        let mut m = Metric::from_label(pairs(names, &values));
        m.set_histogram(self.proto());
        out.push(m);
    }
}

struct Family<T> {
    desc: Desc,
    children: Mutex<HashMap<Vec<String>, Arc<T>>>,
}

/// A labelled family of per-worker children, registered as a prometheus
/// collector; like prometheus' `*Vec`, it hands out a child per label set.
pub struct PerWorkerVec<T>(Arc<Family<T>>);

/// Requests by status class: the family's last label is `class`.
pub type ClassCounterVec = PerWorkerVec<ClassCounter>;
/// Latency histograms.
pub type LatencyVec = PerWorkerVec<Latency>;

impl<T> Clone for PerWorkerVec<T> {
    fn clone(&self) -> Self {
        PerWorkerVec(self.0.clone())
    }
}

impl<T: Child> PerWorkerVec<T> {
    /// A family named `name` with labels `labels` (for a [`ClassCounterVec`],
    /// the last one is `class`, filled in per status class).
    pub fn new(name: &str, help: &str, labels: &[&str]) -> Result<Self, prometheus::Error> {
        let names = labels.iter().map(|l| (*l).to_owned()).collect();
        let desc = Desc::new(name.to_owned(), help.to_owned(), names, HashMap::new())?;
        Ok(PerWorkerVec(Arc::new(Family { desc, children: Mutex::new(HashMap::new()) })))
    }

    /// The child with these label values (for a [`ClassCounterVec`], all but `class`).
    pub fn with_label_values(&self, values: &[&str]) -> Arc<T> {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        self.0.children.lock().entry(key).or_insert_with(|| Arc::new(T::make())).clone()
    }
}

impl<T: Child> Collector for PerWorkerVec<T> {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut metrics = Vec::new();
        for (labels, child) in self.0.children.lock().iter() {
            child.metrics(&self.0.desc.variable_labels, labels, &mut metrics);
        }
        let mut mf = MetricFamily::default();
        mf.set_name(self.0.desc.fq_name.clone());
        mf.set_help(self.0.desc.help.clone());
        mf.set_field_type(T::TYPE);
        mf.set_metric(metrics);
        vec![mf]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, Registry, TextEncoder};

    fn text(r: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn workers_count_on_their_own_lines_and_a_scrape_sums_them() {
        let v = ClassCounterVec::new("t_requests_total", "help", &["route", "class"]).unwrap();
        let r = Registry::new();
        r.register(Box::new(v.clone())).unwrap();
        let c = v.with_label_values(&["a"]);
        std::thread::scope(|s| {
            for w in 0..3 {
                let c = &c;
                s.spawn(move || {
                    enter_worker(w);
                    for _ in 0..1000 {
                        c.inc(200);
                    }
                    c.inc(503);
                });
            }
        });
        c.inc(404);
        assert_eq!(c.get(1), 3000);
        let t = text(&r);
        assert!(t.contains("t_requests_total{class=\"2xx\",route=\"a\"} 3000"), "{t}");
        assert!(t.contains("t_requests_total{class=\"5xx\",route=\"a\"} 3"), "{t}");
        assert!(t.contains("t_requests_total{class=\"4xx\",route=\"a\"} 1"), "{t}");
        assert!(t.contains("t_requests_total{class=\"1xx\",route=\"a\"} 0"), "{t}");
        // The same labels give the same child.
        v.with_label_values(&["a"]).inc(200);
        assert_eq!(c.get(1), 3001);
    }

    #[test]
    fn a_latency_lands_in_the_first_bucket_at_or_above_it() {
        let v = LatencyVec::new("t_seconds", "help", &["cluster"]).unwrap();
        let r = Registry::new();
        r.register(Box::new(v.clone())).unwrap();
        let h = v.with_label_values(&["b"]);
        h.observe(Duration::from_micros(50)); // le 0.00005 exactly
        h.observe(Duration::from_micros(51)); // le 0.0001
        h.observe(Duration::from_millis(3)); // le 0.005
        h.observe(Duration::from_secs(60)); // +Inf
        assert_eq!(h.count(), 4);
        let t = text(&r);
        for line in [
            "t_seconds_bucket{cluster=\"b\",le=\"0.00005\"} 1",
            "t_seconds_bucket{cluster=\"b\",le=\"0.0001\"} 2",
            "t_seconds_bucket{cluster=\"b\",le=\"0.0025\"} 2",
            "t_seconds_bucket{cluster=\"b\",le=\"0.005\"} 3",
            "t_seconds_bucket{cluster=\"b\",le=\"30\"} 3",
            "t_seconds_bucket{cluster=\"b\",le=\"+Inf\"} 4",
            "t_seconds_count{cluster=\"b\"} 4",
        ] {
            assert!(t.contains(line), "missing {line} in\n{t}");
        }
        let sum: f64 = t
            .lines()
            .find_map(|l| l.strip_prefix("t_seconds_sum{cluster=\"b\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!((sum - 60.003101).abs() < 1e-9, "{sum}");
    }
}
