//! Growth storms: bursts of map growth at one site, which burn CPU on
//! evacuation or rehashing and take memory maps never give back.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// When a burst is a storm: more than `growths` within `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StormRule {
    pub growths: u64,
    pub window: Duration,
}

/// Growths at one site as the collector saw them (a count per
/// collection), and whether a storm is under way.
#[derive(Debug, Default)]
pub struct StormTracker {
    seen: VecDeque<(Instant, u64)>,
    in_window: u64,
    in_storm: bool,
}

impl StormTracker {
    /// Records `n` growths seen at `now`; returns the growths in the window
    /// when they start a storm. A storm lasts until the rate falls back to
    /// the rule, so one burst counts once however long it goes on. Growths
    /// are timed when collected (every poll interval, and at each scrape),
    /// so the window is that precise.
    pub fn record(&mut self, now: Instant, n: u64, rule: StormRule) -> Option<u64> {
        while let Some(&(t, k)) = self.seen.front() {
            if now.duration_since(t) <= rule.window {
                break;
            }
            self.in_window -= k;
            self.seen.pop_front();
        }
        if n > 0 {
            self.seen.push_back((now, n));
            self.in_window += n;
        }
        let over = self.in_window > rule.growths;
        let starts = over && !self.in_storm;
        self.in_storm = over;
        starts.then_some(self.in_window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: StormRule = StormRule {
        growths: 3,
        window: Duration::from_secs(10),
    };

    #[test]
    fn a_burst_is_one_storm() {
        let t0 = Instant::now();
        let mut s = StormTracker::default();
        let starts: Vec<_> = (0..10)
            .map(|i| s.record(t0 + Duration::from_millis(i), 1, RULE))
            .collect();
        assert_eq!(starts.iter().filter(|x| x.is_some()).count(), 1);
        assert_eq!(starts[3], Some(4), "the 4th growth within 10 s starts it");
        // Seen in one collection, a burst is one storm too.
        let mut s = StormTracker::default();
        assert_eq!(s.record(t0, 200, RULE), Some(200));
        assert_eq!(s.record(t0 + Duration::from_secs(1), 50, RULE), None);
    }

    #[test]
    fn slow_growth_is_no_storm_and_a_new_burst_is_a_new_storm() {
        let t0 = Instant::now();
        let mut s = StormTracker::default();
        for i in 0..10 {
            assert_eq!(s.record(t0 + Duration::from_secs(4 * i), 1, RULE), None);
        }
        let t1 = t0 + Duration::from_secs(100);
        let n = (0..5)
            .filter(|&i| s.record(t1 + Duration::from_millis(i), 1, RULE).is_some())
            .count();
        assert_eq!(n, 1);
        // Quiet (collections that saw nothing), then another burst: a
        // second storm.
        for i in 1..=20 {
            assert_eq!(s.record(t1 + Duration::from_secs(i), 0, RULE), None);
        }
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(s.record(t2, 3, RULE), None);
        assert_eq!(s.record(t2, 1, RULE), Some(4));
    }
}
