# rotel metrics processor for gopulse integration tests.
#
# rotel-agent (PyPI `rotel`) calls process_metrics(resource_metrics) once per
# ResourceMetrics of every OTLP request it receives (gRPC or HTTP), before its
# own batching. We append one JSON object per data point to the file named by
# $GOPULSE_ROTEL_DUMP and flush after each call. The data is never modified:
# rotel ignores the return value and forwards the (unchanged) object.
#
# Start it with:
#   rotel-agent start --exporter blackhole \
#     --otlp-with-metrics-processor agent/tests/support/rotel_dump.py ...
import json
import os

from rotel_sdk.open_telemetry.metrics.v1 import MetricData, NumberDataPointValue

_PATH = os.environ["GOPULSE_ROTEL_DUMP"]


def _any(v):
    """AnyValue -> plain JSON value (str/bool/int/float, lists, dicts)."""
    x = None if v is None else v.value
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    if isinstance(x, list):  # rotel hands bytes values over as list[int]
        return bytes(x).hex()
    items = list(x)  # KeyValueList yields KeyValue, ArrayValue yields AnyValue
    if items and hasattr(items[0], "key"):
        return _attrs(items)
    return [_any(i) for i in items]


def _attrs(kvs):
    return {kv.key: _any(kv.value) for kv in (kvs or [])}


def _buckets(b):
    return {"offset": b.offset, "bucket_counts": list(b.bucket_counts)} if b else None


def _point(kind, dp):
    """Fields common to all points plus the kind-specific ones."""
    d = {
        "attributes": _attrs(dp.attributes),
        "time_unix_nano": dp.time_unix_nano,
        "start_time_unix_nano": dp.start_time_unix_nano,
    }
    if kind in ("sum", "gauge"):
        v = dp.value
        d["value"] = None if v is None else v[0]
        d["value_type"] = "int" if isinstance(v, NumberDataPointValue.AsInt) else "double"
    else:
        d.update(count=dp.count, sum=dp.sum, min=dp.min, max=dp.max)
        if kind == "histogram":
            d.update(bucket_counts=list(dp.bucket_counts),
                     explicit_bounds=list(dp.explicit_bounds))
        else:  # exp_histogram
            d.update(scale=dp.scale, zero_count=dp.zero_count,
                     positive=_buckets(dp.positive), negative=_buckets(dp.negative))
    return d


# MetricData is a tagged union; metric.data[0] is the Sum/Gauge/... payload.
_KINDS = [
    (MetricData.Sum, "sum"),
    (MetricData.Gauge, "gauge"),
    (MetricData.Histogram, "histogram"),
    (MetricData.ExponentialHistogram, "exp_histogram"),
    (MetricData.Summary, "summary"),  # not expected from gopulse; kept minimal
]


def process_metrics(resource_metrics):
    # An exception escaping this hook makes rotel 0.0.1-alpha10 panic and exit
    # (the traceback keeps Python refs to the batch alive), so never let one out:
    # write it to the dump as {"error": ...} instead, for the test to report.
    try:
        lines = _dump(resource_metrics)
    except Exception as e:  # noqa: BLE001
        lines = [json.dumps({"error": repr(e)}) + "\n"]
    with open(_PATH, "a") as f:  # one write + flush per call
        f.writelines(lines)
        f.flush()
    return resource_metrics


def _dump(resource_metrics):
    res = _attrs(resource_metrics.resource.attributes) if resource_metrics.resource else {}
    lines = []
    for sm in resource_metrics.scope_metrics:
        scope = sm.scope.name if sm.scope else ""
        for m in sm.metrics:
            kind = next((k for cls, k in _KINDS if isinstance(m.data, cls)), None)
            if kind is None:
                continue
            data = m.data[0]
            base = {"resource": res, "scope": scope, "name": m.name, "unit": m.unit,
                    "description": m.description, "kind": kind}
            if kind in ("sum", "histogram", "exp_histogram"):
                # "AGGREGATION_TEMPORALITY_CUMULATIVE" / "AGGREGATION_TEMPORALITY_DELTA"
                base["temporality"] = data.aggregation_temporality.as_str_name()
            if kind == "sum":
                base["is_monotonic"] = data.is_monotonic
            for dp in data.data_points:
                if kind == "summary":
                    pt = {"attributes": _attrs(dp.attributes), "time_unix_nano": dp.time_unix_nano,
                          "start_time_unix_nano": dp.start_time_unix_nano,
                          "count": dp.count, "sum": dp.sum}
                else:
                    pt = _point(kind, dp)
                lines.append(json.dumps({**base, **pt}) + "\n")
    return lines
