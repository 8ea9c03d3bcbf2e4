//! Histograms rebuilt from scraped samples, and Prometheus's
//! `histogram_quantile` over them.
use std::collections::BTreeMap;

use crate::openmetrics::Sample;

/// One histogram, summed over every series that shares the grouping label
/// (e.g. all watched pids).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Cumulative `(upper bound, count <= bound)`, sorted by bound.
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
    pub sum: f64,
}

impl Histogram {
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(q, &self.buckets)
    }

    /// `(lower, upper]` bounds of the highest bucket holding an observation,
    /// which brackets the largest one (upper is infinite for `+Inf`).
    pub fn max_bucket(&self) -> Option<(f64, f64)> {
        let (mut below_count, mut below_bound) = (0.0, 0.0);
        let mut highest = None;
        for &(le, cumulative) in &self.buckets {
            if cumulative > below_count {
                highest = Some((below_bound, le));
            }
            (below_count, below_bound) = (cumulative, le);
        }
        highest
    }

    /// The largest finite bucket bound, to say "above X" for `+Inf`.
    pub fn largest_finite_bound(&self) -> Option<f64> {
        self.buckets
            .iter()
            .map(|&(le, _)| le)
            .rfind(|le| le.is_finite())
    }
}

/// Histograms named `name` (samples `name_bucket`, `name_count`,
/// `name_sum`), one per value of label `by`.
pub fn collect(samples: &[Sample], name: &str, by: &str) -> BTreeMap<String, Histogram> {
    let bucket = format!("{name}_bucket");
    let count = format!("{name}_count");
    let sum = format!("{name}_sum");
    let mut out: BTreeMap<String, Histogram> = BTreeMap::new();
    for s in samples {
        let key = s.label(by).unwrap_or_default().to_string();
        if s.name == bucket {
            let Some(le) = s.label("le").and_then(parse_le) else {
                continue;
            };
            let h = out.entry(key).or_default();
            match h.buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += s.value,
                None => h.buckets.push((le, s.value)),
            }
        } else if s.name == count {
            out.entry(key).or_default().count += s.value;
        } else if s.name == sum {
            out.entry(key).or_default().sum += s.value;
        }
    }
    for h in out.values_mut() {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

fn parse_le(le: &str) -> Option<f64> {
    match le {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        _ => le.parse().ok(),
    }
}

/// Prometheus's `histogram_quantile`: finds the bucket holding rank
/// `q * count` and interpolates linearly inside it (the lowest bucket starts
/// at 0). `buckets` are cumulative `(upper bound, count)` pairs and must end
/// with `+Inf`; ranks in the `+Inf` bucket give the largest finite bound.
/// `None` where Prometheus returns NaN (no observations, bad buckets).
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    if q.is_nan() {
        return None;
    }
    if q < 0.0 {
        return Some(f64::NEG_INFINITY);
    }
    if q > 1.0 {
        return Some(f64::INFINITY);
    }
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.len() < 2 || buckets.last().is_some_and(|b| b.0 != f64::INFINITY) {
        return None;
    }
    // Scrapes are not atomic, so counts may dip; Prometheus evens them out.
    let mut max = 0.0_f64;
    for b in &mut buckets {
        max = max.max(b.1);
        b.1 = max;
    }
    let observations = buckets[buckets.len() - 1].1;
    if observations <= 0.0 {
        return None;
    }
    let mut rank = q * observations;
    // The +Inf bucket is not searched: a rank there answers with the bound
    // below it. Rank 0 goes to the first non-empty bucket (avoids 0/0).
    let finite = &buckets[..buckets.len() - 1];
    let b = finite
        .iter()
        .position(|&(_, c)| if rank > 0.0 { c >= rank } else { c > 0.0 })
        .unwrap_or(finite.len());
    if b == finite.len() {
        return Some(buckets[b - 1].0);
    }
    if b == 0 && buckets[0].0 <= 0.0 {
        return Some(buckets[0].0);
    }
    let (end, mut count) = buckets[b];
    let mut start = 0.0;
    if b > 0 {
        start = buckets[b - 1].0;
        count -= buckets[b - 1].1;
        rank -= buckets[b - 1].1;
    }
    Some(start + (end - start) * (rank / count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openmetrics::parse;

    const INF: f64 = f64::INFINITY;

    fn close(a: Option<f64>, b: f64) {
        let a = a.unwrap();
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn interpolates_within_bucket() {
        // 10 in (0,1], 10 in (1,2], 0 in (2,4], 0 above.
        let b = [(1.0, 10.0), (2.0, 20.0), (4.0, 20.0), (INF, 20.0)];
        close(quantile(0.5, &b), 1.0);
        close(quantile(0.25, &b), 0.5);
        close(quantile(0.75, &b), 1.5);
        close(quantile(1.0, &b), 2.0);
        close(quantile(0.0, &b), 0.0);
    }

    #[test]
    fn interpolates_across_buckets() {
        let b = [
            (0.1, 50.0),
            (0.2, 70.0),
            (0.4, 110.0),
            (1.0, 120.0),
            (INF, 120.0),
        ];
        close(quantile(0.5, &b), 0.15); // rank 60: 10 of the 20 in (0.1, 0.2]
        close(quantile(0.75, &b), 0.3);
        close(quantile(0.9, &b), 0.39);
        close(quantile(0.99, &b), 0.928);
    }

    #[test]
    fn rank_in_inf_bucket_gives_largest_finite_bound() {
        let b = [(1.0, 1.0), (2.0, 1.0), (INF, 10.0)];
        close(quantile(0.99, &b), 2.0);
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(quantile(0.5, &[(1.0, 0.0), (INF, 0.0)]), None);
        assert_eq!(quantile(0.5, &[(1.0, 3.0), (2.0, 5.0)]), None, "no +Inf");
        assert_eq!(quantile(0.5, &[(INF, 5.0)]), None);
        assert_eq!(quantile(f64::NAN, &[(1.0, 1.0), (INF, 1.0)]), None);
        assert_eq!(quantile(-1.0, &[(1.0, 1.0), (INF, 1.0)]), Some(-INF));
        assert_eq!(quantile(2.0, &[(1.0, 1.0), (INF, 1.0)]), Some(INF));
        // Unsorted and non-monotonic input is fixed up, as Prometheus does.
        close(quantile(0.5, &[(INF, 4.0), (2.0, 3.0), (1.0, 4.0)]), 0.5);
    }

    #[test]
    fn collects_and_sums_series() {
        let text = r#"
h_bucket{phase="a",pid="1",le="0.001"} 1
h_bucket{phase="a",pid="1",le="+Inf"} 2
h_bucket{phase="a",pid="2",le="0.001"} 3
h_bucket{phase="a",pid="2",le="+Inf"} 3
h_bucket{phase="b",pid="1",le="+Inf"} 1
h_bucket{phase="b",pid="1",le="0.001"} 0
h_count{phase="a",pid="1"} 2
h_count{phase="a",pid="2"} 3
h_sum{phase="a",pid="1"} 0.5
other_bucket{phase="a",le="+Inf"} 99
"#;
        let hs = collect(&parse(text).unwrap(), "h", "phase");
        assert_eq!(hs.len(), 2);
        assert_eq!(hs["a"].buckets, vec![(0.001, 4.0), (INF, 5.0)]);
        assert_eq!(hs["a"].count, 5.0);
        assert_eq!(hs["a"].sum, 0.5);
        assert_eq!(hs["b"].buckets, vec![(0.001, 0.0), (INF, 1.0)]);
        assert_eq!(hs["a"].max_bucket(), Some((0.001, INF)));
        assert_eq!(hs["a"].largest_finite_bound(), Some(0.001));
        let one = Histogram {
            buckets: vec![(0.001, 1.0), (0.002, 3.0), (0.005, 3.0), (INF, 3.0)],
            ..Default::default()
        };
        assert_eq!(one.max_bucket(), Some((0.001, 0.002)));
    }
}
