//! `/metrics`: the model rendered as OpenMetrics text, through
//! prometheus-client's encoder (names, escaping, cumulative buckets).
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabel as _, EncodeLabelSet, LabelSetEncoder, MetricEncoder,
        NoLabelSet,
    },
    metrics::MetricType,
    registry::{Registry, Unit},
};

use crate::model::{
    Group, Model, Value,
    decl::{Kind, Label},
};

/// A registry whose only content is the model.
pub fn registry(model: &Model) -> Registry {
    // Names are whole in the declarations: ours `gopulse_*`, the Go
    // runtime conventions' `go_*`.
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ModelCollector {
        model: model.clone(),
    }));
    registry
}

/// Renders the model as OpenMetrics text.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    // Sized as the last body (plus room to grow): grown by doubling, a
    // body of megabytes would pass through buffers of every size below it.
    let last = LAST_LEN.load(Ordering::Relaxed);
    let mut out = String::with_capacity(last + last / 8);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    LAST_LEN.store(out.len(), Ordering::Relaxed);
    Ok(out)
}

/// The length of the last body rendered.
static LAST_LEN: AtomicUsize = AtomicUsize::new(0);

struct ModelCollector {
    model: Model,
}

impl std::fmt::Debug for ModelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelCollector")
    }
}

/// A series' labels: its process's, then the metric's own.
struct SeriesLabels<'a> {
    group: &'a Group,
    names: &'static [Label],
    values: &'a [String],
}

impl EncodeLabelSet for SeriesLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        if let Some(proc) = self.group {
            for (k, v) in proc.prom_labels() {
                (k, v.as_str()).encode(encoder.encode_label())?;
            }
        }
        for (l, v) in self.names.iter().zip(self.values) {
            (l.prom, v.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

impl Collector for ModelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut result = Ok(());
        self.model.visit(|d, series| {
            if result.is_err() || series.is_empty() {
                return;
            }
            let unit = match d.prom_unit {
                Some("seconds") => Some(Unit::Seconds),
                Some("bytes") => Some(Unit::Bytes),
                Some(other) => Some(Unit::Other(other.to_owned())),
                None => None,
            };
            let ty = match d.kind {
                Kind::Counter(_) => MetricType::Counter,
                Kind::Gauge(_) | Kind::UpDownCounter(_) => MetricType::Gauge,
                Kind::Histogram(_) => MetricType::Histogram,
            };
            result = (|| {
                let mut metric = encoder.encode_descriptor(d.name, d.help, unit.as_ref(), ty)?;
                for (group, values, value) in series.iter() {
                    let labels = SeriesLabels {
                        group,
                        names: d.labels,
                        values,
                    };
                    if group.is_none() && values.is_empty() {
                        // No labels: `name 1`, not `name{} 1`.
                        encode_value(&mut metric, value, d.kind)?;
                    } else {
                        encode_value(&mut metric.encode_family(&labels)?, value, d.kind)?;
                    }
                }
                Ok(())
            })();
        });
        result
    }
}

fn encode_value(e: &mut MetricEncoder<'_>, value: &Value, kind: Kind) -> std::fmt::Result {
    match (value, kind) {
        (Value::Count(n), _) => e.encode_counter::<NoLabelSet, _, f64>(n, None),
        (Value::Float(x), Kind::Counter(_)) => e.encode_counter::<NoLabelSet, _, f64>(x, None),
        (Value::Float(x), _) => e.encode_gauge(x),
        (Value::Int(n), _) => e.encode_gauge(n),
        (Value::Hist(h), Kind::Histogram(bounds)) => {
            let buckets: Vec<(f64, u64)> = bounds
                .iter()
                .copied()
                .chain(std::iter::once(f64::MAX))
                .zip(h.buckets.iter().copied())
                .collect();
            e.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)
        }
        (Value::Hist(_), _) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, PHASE_MARK, ProcAnd, ProcLabels};

    #[test]
    fn names_units_and_removal() {
        let model = Model::new();
        let registry = registry(&model);
        let m = Metrics::new(&model);
        let proc = ProcLabels {
            pid: Some("1".into()),
            exe: "x".into(),
            go_version: "go1.27.3".into(),
            ..ProcLabels::default()
        };
        m.runtime.gc_cycles.set_total(&proc, 1);
        m.runtime.gogc.set(&proc, -1);
        m.runtime.memory_used.set(
            &ProcAnd {
                proc: &proc,
                value: "stack",
            },
            65536,
        );
        m.gc_pause.observe(
            &ProcAnd {
                proc: &proc,
                value: PHASE_MARK,
            },
            20e-6,
        );
        m.events_lost.create(&proc);
        let out = render(&registry).unwrap();
        assert!(
            out.contains(r#"go_memory_gc_cycles_total{pid="1",exe="x",go_version="go1.27.3"} 1"#),
            "{out}"
        );
        assert!(out.contains("# TYPE go_config_gogc_percent gauge"), "{out}");
        assert!(
            out.contains("# UNIT go_config_gogc_percent percent"),
            "{out}"
        );
        assert!(
            out.contains(r#"go_config_gogc_percent{pid="1",exe="x",go_version="go1.27.3"} -1"#)
        );
        assert!(out.contains("# UNIT go_memory_used_bytes bytes"), "{out}");
        assert!(out.contains(
            r#"go_memory_used_bytes{pid="1",exe="x",go_version="go1.27.3",go_memory_type="stack"} 65536"#
        ));
        assert!(out.contains(r#"gopulse_gc_pause_seconds_count{pid="1",exe="x",go_version="go1.27.3",phase="mark_termination"} 1"#));
        assert!(out.contains(r#"gopulse_gc_pause_seconds_bucket{le="0.000025",pid="1",exe="x",go_version="go1.27.3",phase="mark_termination"} 1"#), "{out}");
        assert!(out.contains(r#"gopulse_gc_pause_seconds_bucket{le="+Inf",pid="1",exe="x",go_version="go1.27.3",phase="mark_termination"} 1"#));
        assert!(out.contains("# UNIT gopulse_gc_pause_seconds seconds"));
        assert!(out.contains("gopulse_events_lost_total{"));
        assert!(out.contains("gopulse_uprobes_attached 0"), "{out}");
        m.remove_process(&proc);
        let out = render(&registry).unwrap();
        assert!(!out.contains("pid=\"1\""));
        assert!(out.ends_with("# EOF\n"));
    }
}
