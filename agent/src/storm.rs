//! Growth storms: bursts of map growth at one site, which burn CPU on
//! evacuation or rehashing and take memory maps never give back.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// When a burst is a storm: more than `growths` within `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StormRule {
    pub growths: usize,
    pub window: Duration,
}

/// Growth times at one site, and whether a storm is under way.
#[derive(Debug, Default)]
pub struct StormTracker {
    times: VecDeque<Instant>,
    in_storm: bool,
}

impl StormTracker {
    /// Records a growth; returns the growths in the window when this one
    /// starts a storm. A storm lasts until the rate falls back to the rule,
    /// so one burst counts once however long it goes on.
    pub fn record(&mut self, now: Instant, rule: StormRule) -> Option<usize> {
        while self
            .times
            .front()
            .is_some_and(|&t| now.duration_since(t) > rule.window)
        {
            self.times.pop_front();
        }
        self.times.push_back(now);
        // Keep at most one more than the threshold: enough to decide.
        while self.times.len() > rule.growths + 1 {
            self.times.pop_front();
        }
        let over = self.times.len() > rule.growths;
        let starts = over && !self.in_storm;
        self.in_storm = over;
        starts.then_some(self.times.len())
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
            .map(|i| s.record(t0 + Duration::from_millis(i), RULE))
            .collect();
        assert_eq!(starts.iter().filter(|x| x.is_some()).count(), 1);
        assert_eq!(starts[3], Some(4), "the 4th growth within 10 s starts it");
    }

    #[test]
    fn slow_growth_is_no_storm_and_a_new_burst_is_a_new_storm() {
        let t0 = Instant::now();
        let mut s = StormTracker::default();
        for i in 0..10 {
            assert_eq!(s.record(t0 + Duration::from_secs(4 * i), RULE), None);
        }
        let t1 = t0 + Duration::from_secs(100);
        let n = (0..5)
            .filter(|&i| s.record(t1 + Duration::from_millis(i), RULE).is_some())
            .count();
        assert_eq!(n, 1);
        // Quiet, then another burst: a second storm.
        let t2 = t1 + Duration::from_secs(60);
        let n = (0..5)
            .filter(|&i| s.record(t2 + Duration::from_millis(i), RULE).is_some())
            .count();
        assert_eq!(n, 1);
    }
}
