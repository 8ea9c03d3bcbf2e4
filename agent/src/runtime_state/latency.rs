//! The runtime's scheduling latency histogram (`sched.timeToRun`, a
//! `timeHistogram`) as `/sched/latencies:seconds` exports it, folded into
//! the agent's buckets.
//!
//! The runtime keeps 160 counts: 40 buckets, one per power of two of
//! nanoseconds from 2^8 up (the first covers 0-256 ns), each cut into four
//! linear sub-buckets; plus an underflow (negative durations) and an
//! overflow (2^47 ns and more). runtime/metrics hands them out as 162
//! counts in that order, [`COUNTS`]. The agent's buckets
//! ([`decl::SCHED_BUCKETS_NS`]) are runtime boundaries, so each is a union
//! of the runtime's and its count is exact. The runtime keeps no sum: it is
//! estimated as every observation at the midpoint of its runtime bucket,
//! at most 12.5% off (the widest sub-bucket is a quarter of its lower
//! bound; the first, 0-256 ns, is absolute).
use crate::model::decl;

/// Counts runtime/metrics exports: underflow, the 160 buckets, overflow.
pub const COUNTS: usize = crate::inspect::layout::TIME_HIST_COUNTS + 2;

/// Where the runtime's overflow bucket starts: 2^47 ns.
const OVERFLOW_NS: u64 = 1 << 47;

/// `[lo, hi)` of bucket `k` (0..160) in nanoseconds, as
/// `timeHistogram.record` files a duration.
fn bounds_ns(k: usize) -> (u64, u64) {
    let (bucket, sub) = ((k / 4) as u64, (k % 4) as u64);
    if bucket == 0 {
        return (sub * 64, (sub + 1) * 64);
    }
    // Bucket b holds durations of bit length l = b + 8: [2^(l-1), 2^l).
    let l = bucket + 8;
    let width = 1u64 << (l - 3);
    let lo = (1u64 << (l - 1)) + sub * width;
    (lo, lo + width)
}

/// For count `i` of [`COUNTS`]: the agent's bucket it falls in (an index
/// into the declaration's buckets, the last being +Inf) and the value its
/// observations are taken to have, in seconds.
fn place(i: usize) -> (usize, f64) {
    let bounds = &decl::SCHED_BUCKETS_NS;
    match i {
        0 => (0, 0.0),
        _ if i == COUNTS - 1 => (bounds.len(), OVERFLOW_NS as f64 / 1e9),
        _ => {
            let (lo, hi) = bounds_ns(i - 1);
            let coarse = bounds.iter().position(|&b| hi <= b).unwrap_or(bounds.len());
            (coarse, (lo + hi) as f64 / 2e9)
        }
    }
}

/// The runtime's counts in the agent's buckets (not cumulative; the last
/// is +Inf), and their estimated sum in seconds.
pub fn fold(counts: &[u64; COUNTS]) -> (Vec<u64>, f64) {
    let mut buckets = vec![0u64; decl::SCHED_BUCKETS_NS.len() + 1];
    let mut sum = 0.0;
    for (i, &n) in counts.iter().enumerate() {
        let (coarse, at) = place(i);
        buckets[coarse] += n;
        sum += n as f64 * at;
    }
    (buckets, sum)
}

/// The observations between two readings, as (value in seconds, how many):
/// what OTLP replays. `None` when a count went down (not the same
/// histogram, or not read right).
pub fn new_since(before: &[u64; COUNTS], now: &[u64; COUNTS]) -> Option<Vec<(f64, u64)>> {
    let mut out = Vec::new();
    for (i, (&b, &n)) in before.iter().zip(now).enumerate() {
        let d = n.checked_sub(b)?;
        if d > 0 {
            out.push((place(i).1, d));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_buckets_tile_the_range() {
        assert_eq!(bounds_ns(0), (0, 64));
        assert_eq!(bounds_ns(3), (192, 256));
        assert_eq!(bounds_ns(4), (256, 320));
        assert_eq!(bounds_ns(7), (448, 512));
        assert_eq!(bounds_ns(8), (512, 640));
        assert_eq!(bounds_ns(159).1, OVERFLOW_NS);
        for k in 1..160 {
            assert_eq!(bounds_ns(k - 1).1, bounds_ns(k).0, "{k}");
        }
        // Every agent bound is where a runtime bucket ends.
        for b in decl::SCHED_BUCKETS_NS {
            assert!((0..160).any(|k| bounds_ns(k).1 == b), "{b}");
        }
    }

    #[test]
    fn folds_counts_into_unions_of_runtime_buckets() {
        let mut counts = [0u64; COUNTS];
        counts[0] = 1; // underflow: the first bucket
        counts[1] = 10; // 0-64 ns
        // 896-1024 ns ends at 1024: still the first bucket (le 1.024 µs).
        let k = (0..160).find(|&k| bounds_ns(k).1 == 1024).unwrap();
        counts[k + 1] = 3;
        counts[k + 2] = 4; // 1024-1280 ns: the second
        counts[COUNTS - 1] = 2; // overflow: +Inf
        let (buckets, sum) = fold(&counts);
        assert_eq!(buckets[0], 14);
        assert_eq!(buckets[1], 4);
        assert_eq!(buckets[buckets.len() - 1], 2);
        assert_eq!(buckets.iter().sum::<u64>(), 20);
        let want = 10.0 * 32e-9 + 3.0 * 960e-9 + 4.0 * 1152e-9 + 2.0 * OVERFLOW_NS as f64 / 1e9;
        assert!((sum - want).abs() < 1e-12, "{sum} vs {want}");
    }

    #[test]
    fn new_observations_between_readings() {
        let mut a = [0u64; COUNTS];
        a[5] = 2;
        let mut b = a;
        b[5] = 7;
        b[COUNTS - 1] = 1;
        let new = new_since(&a, &b).unwrap();
        assert_eq!(new.len(), 2);
        assert_eq!(new[0].1, 5);
        let (lo, hi) = bounds_ns(4);
        assert!(new[0].0 * 1e9 > lo as f64 && new[0].0 * 1e9 < hi as f64);
        assert_eq!(new_since(&b, &a), None);
    }
}
