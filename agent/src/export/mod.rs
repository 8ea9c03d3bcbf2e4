//! The exporters: leaves that only read the metric model
//! (`crate::model`). `prometheus` renders `/metrics`; `otlp` pushes to an
//! OpenTelemetry collector.
pub mod otlp;
pub mod prometheus;
