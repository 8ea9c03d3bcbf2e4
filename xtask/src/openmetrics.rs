//! Just enough of an OpenMetrics / Prometheus text parser for the demo's
//! summary: samples with their labels; metadata lines and exemplars are
//! skipped.
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, anyhow, bail};

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The sample name, e.g. `gopulse_gc_pause_seconds_bucket`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

pub fn parse(text: &str) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = parse_line(line).with_context(|| format!("metrics line {}: {line}", n + 1))?;
        samples.push(sample);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        bail!("bad metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    // Value, then an optional timestamp and exemplar (`# {...} v`).
    let value = rest.split_whitespace().next().context("no value")?;
    Ok(Sample {
        name: name.to_string(),
        labels,
        value: parse_value(value)?,
    })
}

/// Parses `key="value",...}` and returns what follows the `}`.
fn parse_labels<'a>(mut s: &'a str, labels: &mut BTreeMap<String, String>) -> Result<&'a str> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let eq = s.find('=').context("label without '='")?;
        let key = s[..eq].trim();
        if key.is_empty() {
            bail!("empty label name");
        }
        let quoted = s[eq + 1..].trim_start();
        let body = quoted
            .strip_prefix('"')
            .with_context(|| format!("label {key}: value not quoted"))?;
        let (value, rest) = unescape_until_quote(body)?;
        labels.insert(key.to_string(), value);
        s = rest.trim_start();
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

/// Reads an escaped label value up to its closing quote.
fn unescape_until_quote(s: &str) -> Result<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next().map(|(_, c)| c) {
                Some('n') => out.push('\n'),
                Some(c @ ('\\' | '"')) => out.push(c),
                Some(c) => bail!("unknown escape \\{c}"),
                None => break,
            },
            c => out.push(c),
        }
    }
    Err(anyhow!("unterminated label value"))
}

fn parse_value(s: &str) -> Result<f64> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().with_context(|| format!("bad value {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP go_memory_gc_cycles Completed GC cycles.
# TYPE go_memory_gc_cycles counter
go_memory_gc_cycles_total{pid="42",exe="/tmp/demo",go_version="go1.27.3"} 17
# TYPE gopulse_gc_pause_seconds histogram
gopulse_gc_pause_seconds_bucket{phase="mark_termination",pid="42",le="1e-6"} 0
gopulse_gc_pause_seconds_bucket{phase="mark_termination",pid="42",le="+Inf"} 17 # {trace_id="x"} 0.5 1.0
gopulse_gc_pause_seconds_sum{phase="mark_termination",pid="42"} 0.0031
up 1 1700000000
# EOF
"#;

    #[test]
    fn parses_samples_and_skips_metadata() {
        let samples = parse(TEXT).unwrap();
        assert_eq!(samples.len(), 5);
        let cycles = &samples[0];
        assert_eq!(cycles.name, "go_memory_gc_cycles_total");
        assert_eq!(cycles.label("pid"), Some("42"));
        assert_eq!(cycles.label("go_version"), Some("go1.27.3"));
        assert_eq!(cycles.value, 17.0);
        assert_eq!(samples[1].label("le"), Some("1e-6"));
        assert_eq!(samples[2].value, 17.0, "exemplar ignored");
        assert_eq!(samples[3].value, 0.0031);
        assert_eq!(samples[4].name, "up");
        assert!(samples[4].labels.is_empty());
        assert_eq!(samples[4].value, 1.0, "timestamp ignored");
    }

    #[test]
    fn unescapes_label_values() {
        let s = parse(r#"m{a="x\"y",b="c\\d",c="e\nf",d="g,h}i",} 2"#).unwrap();
        let labels = &s[0].labels;
        assert_eq!(labels["a"], "x\"y");
        assert_eq!(labels["b"], "c\\d");
        assert_eq!(labels["c"], "e\nf");
        assert_eq!(labels["d"], "g,h}i");
    }

    #[test]
    fn special_values() {
        let s = parse("a +Inf\nb -Inf\nc NaN\nd 1.5e-3\n").unwrap();
        assert_eq!(s[0].value, f64::INFINITY);
        assert_eq!(s[1].value, f64::NEG_INFINITY);
        assert!(s[2].value.is_nan());
        assert_eq!(s[3].value, 0.0015);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("m{a=\"x} 1").is_err());
        assert!(parse("m{a=x} 1").is_err());
        assert!(parse("m").is_err());
        assert!(parse("m one").is_err());
        assert!(parse("{a=\"b\"} 1").is_err());
    }
}
