//! OTLP push: the model sent to an OpenTelemetry collector every export
//! interval, over gRPC or HTTP/protobuf, each watched process as its own
//! resource (`process.*`, `container.id`, `k8s.*`) and the agent's own
//! metrics under a resource of their own (`service.name` = `gopulse`).
//!
//! Counters and gauges are observable instruments whose callbacks read the
//! model at export time. Histograms cannot be observed in OpenTelemetry, so
//! the model keeps each observation until the next export
//! ([`Model::take_pending`]) and they are recorded then, in order: count and
//! sum equal the model's. Temporality is cumulative by default, so an export
//! that fails loses nothing: the next one carries the totals.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use opentelemetry::{
    KeyValue,
    metrics::{Histogram, Meter, MeterProvider as _},
};
use opentelemetry_otlp::{
    MetricExporter, Protocol, RetryPolicy, WithExportConfig as _, WithHttpConfig as _,
    WithTonicConfig as _,
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    metrics::{
        Aggregation, Instrument, InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Stream,
        Temporality, data::ResourceMetrics, exporter::PushMetricExporter as _,
        reader::MetricReader,
    },
};

use crate::{
    metrics::{NodeLabel, ProcLabels},
    model::{
        Family, Group, Model, Value,
        decl::{self, Decl, Kind, Number, Scope},
    },
};

/// Wire protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    #[value(name = "grpc")]
    Grpc,
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// How pause and other histograms go out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HistogramKind {
    /// Base-2 exponential buckets (OTLP ExponentialHistogram): fine
    /// resolution at every scale; the OpenTelemetry Collector, rotel and
    /// Prometheus (native histograms) take them.
    Exponential,
    /// The same bucket bounds as `/metrics`.
    Explicit,
}

/// Why OTLP cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?}: {why}")]
    Env {
        var: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("--otlp-endpoint {0:?}: not a URL (for example http://127.0.0.1:4318)")]
    Endpoint(String),
    #[error(
        "{0}: TLS is not built into gopulse yet; use a collector on the node, or a \
         plain-text (http://) hop"
    )]
    Tls(String),
    #[error("building the OTLP exporter: {0}")]
    Build(String),
}

/// Where and how to push.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// From `--otlp-endpoint`; `None`: the `OTEL_EXPORTER_OTLP_*ENDPOINT`
    /// variables.
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    pub interval: Duration,
    pub timeout: Duration,
    pub temporality: Temporality,
    pub histograms: HistogramKind,
    /// `k8s.node.name` of every resource, when known.
    pub node_name: Option<String>,
    /// `--max-map-sites`: how many site series a process's metric can have
    /// (sizes each instrument's table, [`cardinality_limit`]).
    pub max_sites: usize,
}

fn env(var: &'static str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// A variable's value among `choices` (case-insensitive, as the OTLP
/// exporter reads them); the first choice when it is unset.
fn env_choice<T: Copy>(
    var: &'static str,
    choices: &[(&str, T)],
    why: &'static str,
) -> Result<T, ConfigError> {
    let Some(value) = env(var) else {
        return Ok(choices[0].1);
    };
    let value = value.trim().to_ascii_lowercase();
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, t)| *t)
        .ok_or(ConfigError::Env { var, value, why })
}

fn env_ms(var: &'static str, default: u64) -> Result<Duration, ConfigError> {
    match env(var) {
        None => Ok(Duration::from_millis(default)),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            _ => Err(ConfigError::Env {
                var,
                value: v,
                why: "expected a positive number of milliseconds",
            }),
        },
    }
}

impl OtlpConfig {
    /// The configuration from the flags and the standard variables, or
    /// `None` when OTLP is not configured (no endpoint anywhere, or
    /// `OTEL_METRICS_EXPORTER=none`).
    pub fn resolve(
        endpoint: Option<String>,
        protocol: Option<OtlpProtocol>,
        histograms: Option<HistogramKind>,
        node_name: Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        if endpoint.is_none()
            && (env("OTEL_METRICS_EXPORTER").as_deref() == Some("none")
                || (env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
                    && env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_none()))
        {
            return Ok(None);
        }
        let protocol = match protocol {
            Some(p) => p,
            None => env_choice(
                if env("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL").is_some() {
                    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
                } else {
                    "OTEL_EXPORTER_OTLP_PROTOCOL"
                },
                // The specification's default first.
                &[
                    ("http/protobuf", OtlpProtocol::HttpProtobuf),
                    ("grpc", OtlpProtocol::Grpc),
                ],
                "gopulse speaks grpc or http/protobuf",
            )?,
        };
        let temporality = env_choice(
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
            &[
                ("cumulative", Temporality::Cumulative),
                ("delta", Temporality::Delta),
                ("lowmemory", Temporality::LowMemory),
            ],
            "expected cumulative, delta or lowmemory",
        )?;
        let histograms = match histograms {
            Some(h) => h,
            None => env_choice(
                "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
                &[
                    (
                        "base2_exponential_bucket_histogram",
                        HistogramKind::Exponential,
                    ),
                    ("explicit_bucket_histogram", HistogramKind::Explicit),
                ],
                "expected base2_exponential_bucket_histogram or explicit_bucket_histogram",
            )?,
        };
        let endpoint = match endpoint {
            None => None,
            Some(e) => Some(endpoint_url(&e, protocol)?),
        };
        for var in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        ] {
            if let Some(e) = env(var).filter(|e| e.trim().starts_with("https://")) {
                return Err(ConfigError::Tls(format!("{var}={e}")));
            }
        }
        Ok(Some(Self {
            endpoint,
            protocol,
            interval: env_ms("OTEL_METRIC_EXPORT_INTERVAL", 60_000)?,
            timeout: env_ms("OTEL_METRIC_EXPORT_TIMEOUT", 30_000)?,
            temporality,
            histograms,
            node_name,
            max_sites: crate::model::DEFAULT_MAX_SITES,
        }))
    }

    /// The configuration with `--max-map-sites`.
    pub fn with_max_sites(self, max_sites: usize) -> Self {
        Self { max_sites, ..self }
    }

    /// Where the exports go, for the log.
    pub fn describe(&self) -> String {
        let to = self.endpoint.clone().unwrap_or_else(|| {
            env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
                .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
                .unwrap_or_default()
        });
        let protocol = match self.protocol {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        };
        format!("{to} ({protocol}, every {:?})", self.interval)
    }
}

/// `--otlp-endpoint` is a base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`: over
/// HTTP the metrics path is appended when it has none.
fn endpoint_url(e: &str, protocol: OtlpProtocol) -> Result<String, ConfigError> {
    let e = e.trim();
    let Some((scheme, rest)) = e.split_once("://") else {
        return Err(ConfigError::Endpoint(e.to_owned()));
    };
    if scheme == "https" {
        return Err(ConfigError::Tls(e.to_owned()));
    }
    if scheme != "http" || rest.is_empty() {
        return Err(ConfigError::Endpoint(e.to_owned()));
    }
    let has_path = rest.trim_end_matches('/').contains('/');
    Ok(match protocol {
        OtlpProtocol::HttpProtobuf if !has_path => {
            format!("{}/v1/metrics", e.trim_end_matches('/'))
        }
        _ => e.to_owned(),
    })
}

/// Observations given as counts (the scheduling latency histogram, read
/// bucketed from the runtime) replayed into one series per export at
/// most; beyond, they are counted in `gopulse_otlp_points_dropped_total`.
/// A process whose goroutines switch a million times a second has the
/// runtime sample some 125,000 of them a second: 7.5 million a minute.
const MAX_REPLAY: u64 = 10_000_000;

/// The kinds of growth one process can have: its runtime has either the
/// two classic ones or the four swiss ones.
const KINDS_PER_PROCESS: usize = 4;

/// Attribute sets one instrument of a process's resource can have, from
/// its labels: the SDK sizes each instrument's table for its limit up
/// front (its default, 2,000, cost about 190 KB a process and 10 KB a site
/// series), and a set past the limit goes to an overflow series. Sites
/// are bounded by `max_sites` (plus `other`); the Go runtime's memory types
/// and CPU states are two and four; the other labels (stop reasons, GC
/// phases, probes) have a few dozen values at most.
fn cardinality_limit(d: &Decl, max_sites: usize) -> usize {
    d.labels
        .iter()
        .map(|l| match l.prom {
            "site" => max_sites.saturating_add(1),
            "kind" => KINDS_PER_PROCESS,
            "go_memory_type" => 2,
            "go_cpu_state" => 4,
            _ => 32,
        })
        .fold(1usize, usize::saturating_mul)
        // The SDK refuses usize::MAX (it sizes a table one larger).
        .min(1 << 24)
}

/// How long a process in a pod waits for its pod's names before it is
/// exported without them (the names cell is filled once, with the container
/// name, or after 30 s with the pod's only).
const NAMES_WAIT: Duration = Duration::from_secs(60);

/// One resource's instruments: a meter provider read by hand.
struct ResourceExport {
    /// The resource's attributes it was made with.
    attributes: Vec<(String, String)>,
    provider: SdkMeterProvider,
    reader: Arc<ManualReader>,
    /// Histogram instruments by metric id.
    histograms: HashMap<usize, Histogram<f64>>,
}

/// A reader shared between the provider and the export loop.
#[derive(Debug)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// The push loop's state.
pub struct Otlp {
    model: Model,
    config: OtlpConfig,
    exporter: MetricExporter,
    resources: HashMap<Group, ResourceExport>,
    /// When each group was first seen (to wait for pod names).
    first_seen: HashMap<Group, Instant>,
    exports: Family<NodeLabel<'static>>,
    host_name: String,
    /// Since when exports fail, and how many failed (one log line each way).
    outage: Option<(Instant, u64)>,
}

impl Otlp {
    /// Builds the exporter; the model starts keeping observations for it.
    pub fn new(model: &Model, config: OtlpConfig) -> Result<Self, ConfigError> {
        let build = |e: opentelemetry_otlp::ExporterBuildError| ConfigError::Build(e.to_string());
        let builder = MetricExporter::builder().with_temporality(config.temporality);
        let retry = RetryPolicy::recommended();
        let exporter = match config.protocol {
            OtlpProtocol::Grpc => {
                let mut b = builder
                    .with_tonic()
                    .with_protocol(Protocol::Grpc)
                    .with_retry_policy(retry)
                    .with_timeout(config.timeout);
                if let Some(e) = &config.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build().map_err(build)?
            }
            OtlpProtocol::HttpProtobuf => {
                let mut b = builder
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_retry_policy(retry)
                    .with_timeout(config.timeout);
                if let Some(e) = &config.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build().map_err(build)?
            }
        };
        model.keep_observations(true);
        let exports = model.family::<NodeLabel<'static>>(&decl::OTLP_EXPORTS);
        exports.create(&NodeLabel("ok"));
        exports.create(&NodeLabel("failed"));
        model.family::<()>(&decl::OTLP_POINTS_DROPPED).create(&());
        Ok(Self {
            model: model.clone(),
            config,
            exporter,
            resources: HashMap::new(),
            first_seen: HashMap::new(),
            exports,
            host_name: host_name(),
            outage: None,
        })
    }

    pub fn interval(&self) -> Duration {
        self.config.interval
    }

    /// One export round: every resource's metrics, one request each (the
    /// agent's own first). Two failures in a row end the round: the
    /// collector is failing, not one request. Once exports fail, a round
    /// sends only its first request until one succeeds; the others are not
    /// collected meanwhile, so their totals (or deltas) go with the next
    /// export that is sent.
    pub async fn export(&mut self) {
        self.sync_resources();
        let delta = self.config.temporality != Temporality::Cumulative;
        let mut groups: Vec<Group> = self.resources.keys().cloned().collect();
        groups.sort();
        let was_out = self.outage.is_some();
        let mut failed_in_a_row = 0;
        for group in groups {
            if failed_in_a_row >= 2 || (was_out && failed_in_a_row >= 1) {
                break;
            }
            let Some(r) = self.resources.get(&group) else {
                continue;
            };
            let mut rm = ResourceMetrics::default();
            if let Err(e) = r.reader.collect(&mut rm) {
                tracing::debug!("collecting OTLP metrics: {e}");
                continue;
            }
            let points = count_histogram_points(&rm);
            match self.send(&rm).await {
                Ok(()) => {
                    failed_in_a_row = 0;
                    self.exports.inc(&NodeLabel("ok"));
                    if let Some((since, failed)) = self.outage.take() {
                        tracing::info!(
                            failed,
                            "OTLP export resumed after {failed} failed exports over {:.0?}",
                            since.elapsed()
                        );
                    }
                }
                Err(e) => {
                    failed_in_a_row += 1;
                    self.exports.inc(&NodeLabel("failed"));
                    // Cumulative totals go again next time; deltas are lost.
                    if delta {
                        self.model.count_dropped(points);
                    }
                    match &mut self.outage {
                        Some((_, failed)) => *failed += 1,
                        None => {
                            tracing::warn!(
                                "OTLP export to {} failed: {e}; trying again every {:?} \
                                 (logged again when it recovers; gopulse_otlp_exports_total \
                                 counts each failure)",
                                self.config.describe(),
                                self.config.interval
                            );
                            self.outage = Some((Instant::now(), 1));
                        }
                    }
                }
            }
        }
    }

    /// Sends one request (the exporter retries transient failures with
    /// back-off: 3 retries from 100 ms to 1.6 s), bounded by the timeout.
    async fn send(&self, rm: &ResourceMetrics) -> Result<(), String> {
        match tokio::time::timeout(self.config.timeout, self.exporter.export(rm)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.config.timeout)),
        }
    }

    /// Creates resources for new groups (once their pod names are known, or
    /// after [`NAMES_WAIT`]), remakes those whose attributes changed, drops
    /// those of groups gone, and records the histogram observations kept
    /// since the last round.
    fn sync_resources(&mut self) {
        let groups = self.model.groups();
        self.resources.retain(|g, r| {
            let keep = groups.contains(g);
            if !keep {
                let _ = r.provider.shutdown();
            }
            keep
        });
        self.first_seen.retain(|g, _| groups.contains(g));
        let now = Instant::now();
        for g in groups {
            let since = *self.first_seen.entry(g.clone()).or_insert(now);
            let named = match &g {
                Some(ProcLabels {
                    names: Some(names), ..
                }) => names.get().is_some(),
                _ => true,
            };
            if !named && now.duration_since(since) < NAMES_WAIT {
                continue;
            }
            let attrs = self.resource_attributes(&g);
            let signature = signature(&attrs);
            match self.resources.get(&g) {
                Some(r) if r.attributes == signature => {}
                old => {
                    // Names that came late make it a new resource: its
                    // histograms start again there (as a new series would).
                    if let Some(old) = old {
                        let _ = old.provider.shutdown();
                    }
                    let r = self.resource_export(&g, attrs, signature);
                    self.resources.insert(g, r);
                }
            }
        }
        let resources = &self.resources;
        let mut dropped = 0;
        self.model.take_pending(
            |group| resources.contains_key(group),
            |group, d, values, pending| {
                // Only groups with a resource are taken (above).
                let Some(h) = resources
                    .get(group)
                    .and_then(|r| r.histograms.get(&decl::id_of(d)))
                else {
                    return;
                };
                let attrs = attributes(d, values);
                for x in pending.values {
                    h.record(x, &attrs);
                }
                // The SDK takes observations one at a time: counts read
                // already bucketed are replayed, up to a bound per export.
                let mut budget = MAX_REPLAY;
                for (x, n) in pending.weighted {
                    let now = n.min(budget);
                    for _ in 0..now {
                        h.record(x, &attrs);
                    }
                    budget -= now;
                    dropped += n - now;
                }
            },
        );
        self.model.count_dropped(dropped);
    }

    /// A group's meter provider: its resource made of `attrs` (whose
    /// `signature` it keeps), its instruments.
    fn resource_export(
        &self,
        group: &Group,
        attrs: Vec<KeyValue>,
        signature: Vec<(String, String)>,
    ) -> ResourceExport {
        let reader = Arc::new(
            ManualReader::builder()
                .with_temporality(self.config.temporality)
                .build(),
        );
        let mut builder = SdkMeterProvider::builder()
            // The defaults (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME, the
            // SDK's own), then ours: a process's identity wins.
            .with_resource(Resource::builder().with_attributes(attrs).build())
            .with_reader(SharedReader(reader.clone()));
        let exponential = self.config.histograms == HistogramKind::Exponential;
        // The agent's own resource keeps the SDK's default limit: its
        // watch failures are by executable, and there is one of it.
        let max_sites = group.as_ref().map(|_| self.config.max_sites);
        if exponential || max_sites.is_some() {
            builder = builder.with_view(move |i: &Instrument| {
                let mut stream = Stream::builder();
                let histogram = exponential && i.kind() == InstrumentKind::Histogram;
                if histogram {
                    stream = stream.with_aggregation(Aggregation::Base2ExponentialHistogram {
                        max_size: 160,
                        max_scale: 20,
                        record_min_max: true,
                    });
                }
                let limit = max_sites.and_then(|n| {
                    decl::ALL
                        .iter()
                        .find(|d| d.scope == Scope::Process && d.otel == i.name())
                        .map(|d| cardinality_limit(d, n))
                });
                if let Some(limit) = limit {
                    stream = stream.with_cardinality_limit(limit);
                }
                (histogram || limit.is_some())
                    .then(|| stream.build().ok())
                    .flatten()
            });
        }
        let provider = builder.build();
        let meter = provider.meter_with_scope(
            opentelemetry::InstrumentationScope::builder("gopulse")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        let scope = if group.is_some() {
            Scope::Process
        } else {
            Scope::Node
        };
        let mut histograms = HashMap::new();
        for d in decl::ALL.iter().copied().filter(|d| d.scope == scope) {
            if let Kind::Histogram(bounds) = d.kind {
                let h = meter
                    .f64_histogram(d.otel)
                    .with_unit(d.otel_unit)
                    .with_description(d.help)
                    .with_boundaries(bounds.to_vec())
                    .build();
                histograms.insert(decl::id_of(d), h);
            } else {
                self.observe(&meter, d, group);
            }
        }
        ResourceExport {
            attributes: signature,
            provider,
            reader,
            histograms,
        }
    }

    /// An observable instrument whose callback reads the model.
    fn observe(&self, meter: &Meter, d: &'static Decl, group: &Group) {
        let (model, group) = (self.model.clone(), group.clone());
        let each = move |f: &mut dyn FnMut(&Value, &[KeyValue])| {
            model.visit_group(d, &group, |values, v| f(v, &attributes(d, values)));
        };
        // One builder per instrument type; the callbacks differ only in the
        // value they take.
        macro_rules! observable {
            ($builder:ident, $variant:ident) => {
                meter
                    .$builder(d.otel)
                    .with_unit(d.otel_unit)
                    .with_description(d.help)
                    .with_callback(move |o| {
                        each(&mut |v, a| {
                            if let Value::$variant(x) = v {
                                o.observe(*x, a);
                            }
                        })
                    })
                    .build()
            };
        }
        match d.kind {
            Kind::Counter(Number::Int) => {
                observable!(u64_observable_counter, Count);
            }
            Kind::Counter(Number::Float) => {
                observable!(f64_observable_counter, Float);
            }
            Kind::Gauge(Number::Int) => {
                observable!(i64_observable_gauge, Int);
            }
            Kind::Gauge(Number::Float) => {
                observable!(f64_observable_gauge, Float);
            }
            Kind::UpDownCounter(Number::Int) => {
                observable!(i64_observable_up_down_counter, Int);
            }
            Kind::UpDownCounter(Number::Float) => {
                observable!(f64_observable_up_down_counter, Float);
            }
            Kind::Histogram(_) => {}
        }
    }

    /// The attributes gopulse gives a group's resource: a watched
    /// process's, or the agent's own.
    fn resource_attributes(&self, group: &Group) -> Vec<KeyValue> {
        let mut attrs = vec![KeyValue::new("host.name", self.host_name.clone())];
        if let Some(node) = &self.config.node_name {
            attrs.push(KeyValue::new("k8s.node.name", node.clone()));
        }
        match group {
            None => {
                attrs.push(KeyValue::new("service.name", "gopulse"));
                attrs.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
            }
            Some(p) => attrs.extend(process_attributes(p)),
        }
        attrs
    }

    /// Ends every resource (at shutdown, after a last export).
    pub fn shutdown(&mut self) {
        for (_, r) in self.resources.drain() {
            let _ = r.provider.shutdown();
        }
        let _ = self.exporter.shutdown();
    }
}

/// Attributes as comparable text.
fn signature(attrs: &[KeyValue]) -> Vec<(String, String)> {
    attrs
        .iter()
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

/// A process's resource attributes.
fn process_attributes(p: &ProcLabels) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new("service.name", p.exe.clone()),
        KeyValue::new("process.executable.name", p.exe.clone()),
        KeyValue::new("process.runtime.name", "go"),
        KeyValue::new("process.runtime.version", p.go_version.clone()),
    ];
    if let Some(pid) = p.pid.as_deref().and_then(|s| s.parse::<i64>().ok()) {
        attrs.push(KeyValue::new("process.pid", pid));
    }
    if let Some(id) = &p.container_id {
        attrs.push(KeyValue::new("container.id", id.clone()));
    }
    if let Some(uid) = &p.pod_uid {
        attrs.push(KeyValue::new("k8s.pod.uid", uid.clone()));
    }
    if let Some(names) = &p.names {
        for (k, v) in names.labels() {
            let key = match k {
                "namespace" => "k8s.namespace.name",
                "pod" => "k8s.pod.name",
                "container" => "k8s.container.name",
                _ => continue,
            };
            attrs.push(KeyValue::new(key, v));
        }
    }
    attrs
}

/// A series' own attributes (the process is in the resource).
fn attributes(d: &Decl, values: &[String]) -> Vec<KeyValue> {
    d.labels
        .iter()
        .zip(values)
        .map(|(l, v)| KeyValue::new(l.otel, v.clone()))
        .collect()
}

/// Histogram observations in a request (what a lost delta export loses).
fn count_histogram_points(rm: &ResourceMetrics) -> u64 {
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    let mut n = 0;
    for sm in rm.scope_metrics() {
        for m in sm.metrics() {
            if let AggregatedMetrics::F64(data) = m.data() {
                match data {
                    MetricData::Histogram(h) => {
                        n += h.data_points().map(|p| p.count()).sum::<u64>()
                    }
                    MetricData::ExponentialHistogram(h) => {
                        n += h.data_points().map(|p| p.count() as u64).sum::<u64>()
                    }
                    _ => {}
                }
            }
        }
    }
    n
}

/// This host's name (`host.name`).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_base_urls() {
        let http = OtlpProtocol::HttpProtobuf;
        assert_eq!(
            endpoint_url("http://c:4318", http).unwrap(),
            "http://c:4318/v1/metrics"
        );
        assert_eq!(
            endpoint_url("http://c:4318/", http).unwrap(),
            "http://c:4318/v1/metrics"
        );
        assert_eq!(
            endpoint_url("http://c:4318/custom/path", http).unwrap(),
            "http://c:4318/custom/path"
        );
        assert_eq!(
            endpoint_url("http://c:4317", OtlpProtocol::Grpc).unwrap(),
            "http://c:4317"
        );
        assert!(endpoint_url("c:4317", OtlpProtocol::Grpc).is_err());
        assert!(endpoint_url("ftp://c", http).is_err());
        assert!(matches!(
            endpoint_url("https://c:4318", http),
            Err(ConfigError::Tls(_))
        ));
    }

    #[test]
    fn process_resource_names() {
        let p = ProcLabels {
            pid: Some("42".into()),
            exe: "api".into(),
            go_version: "go1.27.3".into(),
            container_id: Some("abc".into()),
            pod_uid: Some("u-1".into()),
            names: None,
        };
        let attrs = process_attributes(&p);
        let get = |k: &str| {
            attrs
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(get("process.pid").as_deref(), Some("42"));
        assert_eq!(get("process.runtime.name").as_deref(), Some("go"));
        assert_eq!(get("process.runtime.version").as_deref(), Some("go1.27.3"));
        assert_eq!(get("container.id").as_deref(), Some("abc"));
        assert_eq!(get("k8s.pod.uid").as_deref(), Some("u-1"));
    }
}
