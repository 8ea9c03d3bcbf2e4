//! The one metric model: every series gopulse exports, with its value.
//! The collection stage (and the attach and discovery stages, for their own
//! gauges) record into it through typed handles; the exporters
//! (`crate::export`) only read it, so `/metrics` and OTLP cannot disagree.
//!
//! A series is a metric ([`decl`]), a group (the watched process's labels, or
//! none for the node's own metrics) and the metric's label values.
pub mod decl;

use std::{
    collections::{BTreeMap, BTreeSet},
    marker::PhantomData,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use decl::{Decl, Kind, Number};

use crate::metrics::ProcLabels;

/// Observations of one histogram series kept for OTLP between two exports;
/// beyond it they are counted in `gopulse_otlp_points_dropped_total`.
pub const MAX_PENDING: usize = 100_000;

/// Distinct map growth sites a process's series name by default
/// (`--max-map-sites`); growths at further sites go under `site="other"`.
pub const DEFAULT_MAX_SITES: usize = 200;

/// Who a series belongs to: a watched process, or the node (`None`).
pub type Group = Option<ProcLabels>;

/// A series' identity, as the recording side names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    pub group: Group,
    /// The metric's label values, in its declaration's order.
    pub values: Vec<String>,
}

/// A histogram series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hist {
    pub count: u64,
    pub sum: f64,
    /// Per bucket of the declaration (not cumulative), then the +Inf one.
    pub buckets: Vec<u64>,
    /// Observations since the OTLP exporter last took them (only kept while
    /// it runs).
    pub pending: Vec<f64>,
    /// Observations given as counts of a value, since the OTLP exporter
    /// last took them (a histogram the agent reads already bucketed, whose
    /// observations are replayed at a value inside their bucket).
    pub weighted: Vec<(f64, u64)>,
}

impl Hist {
    /// Observations waiting for OTLP.
    fn waiting(&self) -> u64 {
        self.pending.len() as u64 + self.weighted.iter().map(|(_, n)| n).sum::<u64>()
    }
}

/// Histogram observations waiting for OTLP: single values, and values
/// with how many times each was observed.
#[derive(Debug, Default, PartialEq)]
pub struct Pending {
    pub values: Vec<f64>,
    pub weighted: Vec<(f64, u64)>,
}

/// A series' value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An integer counter.
    Count(u64),
    /// An integer gauge.
    Int(i64),
    /// A floating point counter or gauge.
    Float(f64),
    /// Boxed: histograms are few, and the other values stay 16 bytes.
    Hist(Box<Hist>),
}

impl Value {
    fn zero(d: &Decl) -> Self {
        match d.kind {
            Kind::Counter(Number::Int) => Value::Count(0),
            Kind::Gauge(Number::Int) | Kind::UpDownCounter(Number::Int) => Value::Int(0),
            Kind::Counter(Number::Float)
            | Kind::Gauge(Number::Float)
            | Kind::UpDownCounter(Number::Float) => Value::Float(0.0),
            Kind::Histogram(bounds) => Value::Hist(Box::new(Hist {
                buckets: vec![0; bounds.len() + 1],
                ..Hist::default()
            })),
        }
    }
}

/// One metric's series in one group, by the metric's label values.
type Table = BTreeMap<Box<[String]>, Value>;

/// Every series, by group, then one table per metric of [`decl::ALL`]: a
/// group's labels are kept once, not in each of its series (a process
/// with 50 map growth sites has some 300).
#[derive(Default)]
struct Tables {
    groups: BTreeMap<Group, Vec<Table>>,
}

impl Tables {
    /// A series, made (at zero) when absent.
    fn series_mut(&mut self, id: usize, key: SeriesKey) -> &mut Value {
        let SeriesKey { group, values } = key;
        let tables = self
            .groups
            .entry(group)
            .or_insert_with(|| vec![Table::new(); decl::ALL.len()]);
        tables[id]
            .entry(values.into_boxed_slice())
            .or_insert_with(|| Value::zero(decl::ALL[id]))
    }
}

/// The series of one metric, every group's, in (group, label values)
/// order: what [`Model::visit`] gives.
pub struct Series<'a> {
    groups: &'a BTreeMap<Group, Vec<Table>>,
    id: usize,
}

impl<'a> Series<'a> {
    pub fn iter(&self) -> impl Iterator<Item = (&'a Group, &'a [String], &'a Value)> + 'a {
        let id = self.id;
        self.groups
            .iter()
            .flat_map(move |(g, t)| t[id].iter().map(move |(k, v)| (g, &k[..], v)))
    }

    pub fn is_empty(&self) -> bool {
        self.groups.values().all(|t| t[self.id].is_empty())
    }
}

struct Inner {
    tables: Mutex<Tables>,
    /// Keep histogram observations for the OTLP exporter.
    keep: AtomicBool,
}

/// The model. Clones share it.
#[derive(Clone)]
pub struct Model {
    inner: Arc<Inner>,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                tables: Mutex::new(Tables::default()),
                keep: AtomicBool::new(false),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic elsewhere must not wedge the exporters.
        self.inner
            .tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Handle to a metric, its series labelled by `L`.
    pub fn family<L: LabelKind>(&self, d: &'static Decl) -> Family<L> {
        Family {
            model: self.clone(),
            id: decl::id_of(d),
            decl: d,
            _labels: PhantomData,
        }
    }

    /// Keeps histogram observations for [`Model::take_pending`] (while an
    /// OTLP exporter runs).
    pub fn keep_observations(&self, on: bool) {
        self.inner.keep.store(on, Ordering::Relaxed);
    }

    /// Calls `f` with each metric and its series, in [`decl::ALL`] order.
    pub fn visit(&self, mut f: impl FnMut(&'static Decl, Series<'_>)) {
        let tables = self.lock();
        for (id, d) in decl::ALL.iter().enumerate() {
            f(
                d,
                Series {
                    groups: &tables.groups,
                    id,
                },
            );
        }
    }

    /// The groups that have series now.
    pub fn groups(&self) -> BTreeSet<Group> {
        let tables = self.lock();
        tables
            .groups
            .iter()
            .filter(|(_, t)| t.iter().any(|t| !t.is_empty()))
            .map(|(g, _)| g.clone())
            .collect()
    }

    /// Calls `f` with each series of one metric in one group.
    pub fn visit_group(
        &self,
        d: &'static Decl,
        group: &Group,
        mut f: impl FnMut(&[String], &Value),
    ) {
        let tables = self.lock();
        let Some(t) = tables.groups.get(group) else {
            return;
        };
        for (k, v) in &t[decl::id_of(d)] {
            f(k, v);
        }
    }

    /// Takes the observations kept for OTLP since the last call, of the
    /// groups `take` accepts: for each histogram series with some,
    /// `f(group, metric, label values, values)`.
    pub fn take_pending(
        &self,
        mut take: impl FnMut(&Group) -> bool,
        mut f: impl FnMut(&Group, &'static Decl, &[String], Pending),
    ) {
        let mut tables = self.lock();
        for (group, t) in tables.groups.iter_mut() {
            for (d, t) in decl::ALL.iter().zip(t.iter_mut()) {
                if !matches!(d.kind, Kind::Histogram(_)) {
                    continue;
                }
                for (k, v) in t.iter_mut() {
                    if let Value::Hist(h) = v
                        && h.waiting() > 0
                        && take(group)
                    {
                        let pending = Pending {
                            values: std::mem::take(&mut h.pending),
                            weighted: std::mem::take(&mut h.weighted),
                        };
                        f(group, d, k, pending);
                    }
                }
            }
        }
    }

    /// Counts observations OTLP will not receive.
    pub fn count_dropped(&self, n: u64) {
        let mut tables = self.lock();
        add_dropped(&mut tables, n);
    }

    /// Drops every series of a process.
    pub fn remove_group(&self, labels: &ProcLabels) {
        let mut tables = self.lock();
        // Looked up by value: the labels are the group's identity.
        let Some(gone) = tables.groups.remove(&Some(labels.clone())) else {
            return;
        };
        let dropped = gone
            .iter()
            .flat_map(|t| t.values())
            .map(|v| match v {
                Value::Hist(h) => h.waiting(),
                _ => 0,
            })
            .sum();
        add_dropped(&mut tables, dropped);
    }

    /// Runs `op` on a series' value, creating the series (at zero) first.
    fn with(&self, id: usize, key: SeriesKey, op: impl FnOnce(&mut Value, bool) -> u64) {
        let keep = self.inner.keep.load(Ordering::Relaxed);
        let mut tables = self.lock();
        let dropped = op(tables.series_mut(id, key), keep);
        add_dropped(&mut tables, dropped);
    }

    /// Drops one series; observations it kept for OTLP are counted lost.
    fn remove(&self, id: usize, key: &SeriesKey) {
        let mut tables = self.lock();
        let gone = tables
            .groups
            .get_mut(&key.group)
            .and_then(|t| t[id].remove(key.values.as_slice()));
        if let Some(Value::Hist(h)) = gone {
            add_dropped(&mut tables, h.waiting());
        }
    }

    fn read<T>(&self, id: usize, key: &SeriesKey, f: impl FnOnce(&Value) -> T) -> Option<T> {
        let tables = self.lock();
        tables
            .groups
            .get(&key.group)
            .and_then(|t| t[id].get(key.values.as_slice()))
            .map(f)
    }
}

fn add_dropped(tables: &mut Tables, n: u64) {
    if n == 0 {
        return;
    }
    let id = decl::id_of(&decl::OTLP_POINTS_DROPPED);
    let key = SeriesKey {
        group: None,
        values: Vec::new(),
    };
    if let Value::Count(c) = tables.series_mut(id, key) {
        *c += n;
    }
}

/// The labels of a family's series: the group and the metric's own values.
pub trait Labels {
    fn key(&self) -> SeriesKey;
}

/// The node's own metrics without labels.
impl Labels for () {
    fn key(&self) -> SeriesKey {
        SeriesKey {
            group: None,
            values: Vec::new(),
        }
    }
}

/// A process's metrics without labels of their own.
impl Labels for ProcLabels {
    fn key(&self) -> SeriesKey {
        SeriesKey {
            group: Some(self.clone()),
            values: Vec::new(),
        }
    }
}

/// Names the label type of a family's series, whatever it borrows.
pub trait LabelKind {
    type Of<'a>: Labels;
}

impl LabelKind for () {
    type Of<'a> = ();
}

impl LabelKind for ProcLabels {
    type Of<'a> = ProcLabels;
}

/// A handle to one metric of the model, its series labelled by `L`.
pub struct Family<L> {
    model: Model,
    id: usize,
    decl: &'static Decl,
    _labels: PhantomData<fn(&L)>,
}

impl<L> Clone for Family<L> {
    fn clone(&self) -> Self {
        Self {
            model: self.model.clone(),
            id: self.id,
            decl: self.decl,
            _labels: PhantomData,
        }
    }
}

impl<L: LabelKind> Family<L> {
    /// Runs `op` on a series of the metric, which must be of `kind`.
    fn update(&self, l: &L::Of<'_>, kind: Kind, op: impl FnOnce(&mut Value)) {
        debug_assert_eq!(self.decl.kind, kind, "{}", self.decl.name);
        self.model.with(self.id, l.key(), |v, _| {
            op(v);
            0
        });
    }

    /// Creates the series (at zero) so it reads 0 rather than being absent.
    pub fn create(&self, l: &L::Of<'_>) {
        self.model.with(self.id, l.key(), |_, _| 0);
    }

    /// Adds to an integer counter.
    pub fn inc_by(&self, l: &L::Of<'_>, n: u64) {
        self.update(l, Kind::Counter(Number::Int), |v| {
            if let Value::Count(c) = v {
                *c += n;
            }
        });
    }

    pub fn inc(&self, l: &L::Of<'_>) {
        self.inc_by(l, 1);
    }

    /// Adds to a floating point counter.
    pub fn add(&self, l: &L::Of<'_>, x: f64) {
        self.update(l, Kind::Counter(Number::Float), |v| {
            if let Value::Float(c) = v {
                *c += x;
            }
        });
    }

    /// Sets an integer gauge or up-down counter.
    pub fn set(&self, l: &L::Of<'_>, n: i64) {
        let kind = match self.decl.kind {
            k @ Kind::UpDownCounter(Number::Int) => k,
            _ => Kind::Gauge(Number::Int),
        };
        self.update(l, kind, |v| {
            *v = Value::Int(n);
        });
    }

    /// Sets a floating point gauge.
    pub fn set_float(&self, l: &L::Of<'_>, x: f64) {
        self.update(l, Kind::Gauge(Number::Float), |v| {
            *v = Value::Float(x);
        });
    }

    /// Sets an integer counter to a total kept elsewhere (the runtime's
    /// own, since the process started).
    pub fn set_total(&self, l: &L::Of<'_>, n: u64) {
        self.update(l, Kind::Counter(Number::Int), |v| {
            *v = Value::Count(n);
        });
    }

    /// Sets a floating point counter to a total kept elsewhere.
    pub fn set_total_float(&self, l: &L::Of<'_>, x: f64) {
        self.update(l, Kind::Counter(Number::Float), |v| {
            *v = Value::Float(x);
        });
    }

    /// Sets a histogram to counts kept elsewhere, already in the
    /// declaration's buckets (`buckets`: one per bound, then +Inf; not
    /// cumulative), with their sum; `new` are the observations since the
    /// last call, as (a value in its bucket, how many), kept for OTLP.
    pub fn set_histogram(&self, l: &L::Of<'_>, buckets: &[u64], sum: f64, new: &[(f64, u64)]) {
        let Kind::Histogram(bounds) = self.decl.kind else {
            debug_assert!(false, "{} is not a histogram", self.decl.name);
            return;
        };
        debug_assert_eq!(buckets.len(), bounds.len() + 1, "{}", self.decl.name);
        self.model.with(self.id, l.key(), |v, keep| {
            let Value::Hist(h) = v else { return 0 };
            h.buckets.clear();
            h.buckets.extend_from_slice(buckets);
            h.count = buckets.iter().sum();
            h.sum = sum;
            if !keep {
                return 0;
            }
            for &(x, n) in new.iter().filter(|(_, n)| *n > 0) {
                match h
                    .weighted
                    .iter_mut()
                    .find(|(y, _)| y.to_bits() == x.to_bits())
                {
                    Some((_, m)) => *m += n,
                    None => h.weighted.push((x, n)),
                }
            }
            0
        });
    }

    /// Removes a series (a value that cannot be read now is absent, not
    /// stale).
    pub fn remove(&self, l: &L::Of<'_>) {
        self.model.remove(self.id, &l.key());
    }

    /// Raises a floating point gauge to `x` if it is below.
    pub fn set_max(&self, l: &L::Of<'_>, x: f64) {
        self.update(l, Kind::Gauge(Number::Float), |v| {
            if let Value::Float(m) = v
                && x > *m
            {
                *m = x;
            }
        });
    }

    /// Adds an observation to a histogram.
    pub fn observe(&self, l: &L::Of<'_>, x: f64) {
        let Kind::Histogram(bounds) = self.decl.kind else {
            debug_assert!(false, "{} is not a histogram", self.decl.name);
            return;
        };
        self.model.with(self.id, l.key(), |v, keep| {
            let Value::Hist(h) = v else { return 0 };
            h.count += 1;
            h.sum += x;
            let i = bounds.iter().position(|&b| x <= b).unwrap_or(bounds.len());
            h.buckets[i] += 1;
            if !keep {
                0
            } else if h.pending.len() < MAX_PENDING {
                h.pending.push(x);
                0
            } else {
                1
            }
        });
    }

    /// Adds observations counted in the histogram's own buckets already
    /// (the kernel's): `counts[i]` in bucket `i` (the last one +Inf),
    /// summing to `sums[i]`. OTLP gets each bucket's observations at their
    /// mean, so its sums and counts agree with `/metrics`.
    pub fn observe_buckets(&self, l: &L::Of<'_>, counts: &[u64], sums: &[f64]) {
        let Kind::Histogram(bounds) = self.decl.kind else {
            debug_assert!(false, "{} is not a histogram", self.decl.name);
            return;
        };
        debug_assert_eq!(counts.len(), bounds.len() + 1, "{}", self.decl.name);
        self.model.with(self.id, l.key(), |v, keep| {
            let Value::Hist(h) = v else { return 0 };
            let mut dropped = 0;
            for (i, (&n, &sum)) in counts.iter().zip(sums).enumerate() {
                if n == 0 {
                    continue;
                }
                h.count += n;
                h.sum += sum;
                if let Some(b) = h.buckets.get_mut(i) {
                    *b += n;
                }
                if !keep {
                } else if h.weighted.len() < MAX_PENDING {
                    h.weighted.push((sum / n as f64, n));
                } else {
                    dropped += n;
                }
            }
            dropped
        });
    }

    /// An integer counter's value (0 when absent).
    pub fn get(&self, l: &L::Of<'_>) -> u64 {
        self.model
            .read(self.id, &l.key(), |v| match v {
                Value::Count(c) => *c,
                _ => 0,
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: &str) -> ProcLabels {
        ProcLabels {
            pid: Some(pid.into()),
            exe: "x".into(),
            go_version: "go1.27.3".into(),
            ..ProcLabels::default()
        }
    }

    #[test]
    fn records_and_removes_by_process() {
        let m = Model::new();
        let cycles = m.family::<ProcLabels>(&decl::EVENTS_LOST);
        let (a, b) = (proc("1"), proc("2"));
        cycles.inc_by(&a, 3);
        cycles.create(&b);
        assert_eq!((cycles.get(&a), cycles.get(&b)), (3, 0));
        assert_eq!(m.groups().len(), 2);
        m.remove_group(&a);
        assert_eq!(cycles.get(&a), 0);
        assert_eq!(m.groups().into_iter().collect::<Vec<_>>(), vec![Some(b)]);
    }

    #[test]
    fn histograms_bucket_and_keep_for_otlp_only_when_asked() {
        let m = Model::new();
        let h = m.family::<()>(&decl::DISCOVERY_ATTACH_DELAY);
        h.observe(&(), 0.01); // on a bound: in that bucket (le)
        h.observe(&(), 100.0); // past the last bound: +Inf
        m.keep_observations(true);
        h.observe(&(), 0.3);
        let mut seen = Vec::new();
        m.visit(|d, t| {
            if std::ptr::eq(d, &decl::DISCOVERY_ATTACH_DELAY) {
                seen.extend(t.iter().map(|(_, _, v)| v.clone()));
            }
        });
        let [Value::Hist(v)] = seen.as_slice() else {
            panic!("{seen:?}")
        };
        assert_eq!(v.count, 3);
        assert!((v.sum - 100.31).abs() < 1e-9);
        assert_eq!(v.buckets[0], 1);
        assert_eq!(v.buckets[5], 1);
        assert_eq!(v.buckets[10], 1);
        let mut taken = Vec::new();
        m.take_pending(|_| false, |_, _, _, _| panic!("not asked for"));
        m.take_pending(|_| true, |_, _, _, p| taken.extend(p.values));
        assert_eq!(taken, vec![0.3]);
        m.take_pending(|_| true, |_, _, _, _| panic!("taken twice"));
    }

    #[test]
    fn bucketed_observations_keep_counts_sums_and_means() {
        let m = Model::new();
        m.keep_observations(true);
        let h = m.family::<ProcLabels>(&decl::MAP_LOAD_FACTOR_RATIO);
        let p = proc("3");
        let mut counts = vec![0; decl::LOAD_FACTOR_BUCKETS.len() + 1];
        let mut sums = vec![0.0; counts.len()];
        counts[2] = 4;
        sums[2] = 0.6;
        counts[12] = 1;
        sums[12] = 3.0;
        h.observe_buckets(&p, &counts, &sums);
        m.visit(|d, t| {
            if std::ptr::eq(d, &decl::MAP_LOAD_FACTOR_RATIO) {
                for (_, _, v) in t.iter() {
                    let Value::Hist(v) = v else { panic!() };
                    assert_eq!((v.count, v.buckets[2], v.buckets[12]), (5, 4, 1));
                    assert!((v.sum - 3.6).abs() < 1e-9);
                }
            }
        });
        let mut taken = Vec::new();
        m.take_pending(|_| true, |_, _, _, p| taken.extend(p.weighted));
        assert_eq!(taken.len(), 2);
        assert!((taken[0].0 - 0.15).abs() < 1e-9 && taken[0].1 == 4);
        assert_eq!(taken[1], (3.0, 1));
    }

    #[test]
    fn histograms_set_from_counts_keep_their_new_observations_for_otlp() {
        let m = Model::new();
        let h = m.family::<ProcLabels>(&decl::GO_SCHEDULE_DURATION);
        let p = proc("3");
        let mut buckets = vec![0; decl::SCHED_BUCKETS.len() + 1];
        buckets[0] = 5;
        buckets[3] = 2;
        h.set_histogram(&p, &buckets, 1e-5, &[(1e-6, 5)]);
        m.keep_observations(true);
        h.set_histogram(&p, &buckets, 1e-5, &[(5e-7, 3), (8e-6, 2), (5e-7, 1)]);
        let mut got = None;
        m.visit_group(&decl::GO_SCHEDULE_DURATION, &Some(p.clone()), |_, v| {
            got = Some(v.clone());
        });
        let Some(Value::Hist(v)) = got else {
            panic!("{got:?}")
        };
        assert_eq!((v.count, v.buckets[3]), (7, 2));
        assert_eq!(v.weighted, vec![(5e-7, 4), (8e-6, 2)]);
        let mut taken = Vec::new();
        m.take_pending(|_| true, |_, _, _, p| taken.push(p));
        assert_eq!(
            taken,
            vec![Pending {
                values: vec![],
                weighted: vec![(5e-7, 4), (8e-6, 2)]
            }]
        );
        // Removed with observations waiting: counted lost.
        h.set_histogram(&p, &buckets, 1e-5, &[(1e-6, 9)]);
        h.remove(&p);
        assert_eq!(m.family::<()>(&decl::OTLP_POINTS_DROPPED).get(&()), 9);
    }

    #[test]
    fn observations_past_the_bound_are_counted_dropped() {
        let m = Model::new();
        m.keep_observations(true);
        let h = m.family::<ProcLabels>(&decl::MAP_LOAD_FACTOR_RATIO);
        let p = proc("7");
        for _ in 0..MAX_PENDING + 5 {
            h.observe(&p, 0.5);
        }
        let dropped = m.family::<()>(&decl::OTLP_POINTS_DROPPED);
        assert_eq!(dropped.get(&()), 5);
        m.remove_group(&p); // its pending observations go with it
        assert_eq!(dropped.get(&()), 5 + MAX_PENDING as u64);
    }
}
