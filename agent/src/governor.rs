//! The overhead budget: a token bucket per process and probe group,
//! refilled at `--overhead-budget` of a CPU per second and `--overhead-window`
//! deep. A burst spends what the bucket holds and never trips it; only a
//! sustained storm empties it. Empty, the group's probes are detached; they
//! come back when the bucket is full again, so over any stretch of time T
//! they cost at most `budget × (window + T)`.
use std::time::{Duration, Instant};

/// What the probes may cost a process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// CPU seconds per second (a fraction of one CPU).
    pub fraction: f64,
    /// The bucket holds `fraction × window` CPU seconds.
    pub window: Duration,
}

impl Budget {
    pub fn capacity_s(&self) -> f64 {
        self.fraction * self.window.as_secs_f64()
    }
}

/// CPU seconds a group of probes may still spend.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    budget: Budget,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(budget: Budget, now: Instant) -> Self {
        Self {
            budget,
            tokens: budget.capacity_s(),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.budget.fraction).min(self.budget.capacity_s());
    }

    /// Refills for the time since the last call, then takes `cost_s`.
    /// Returns whether anything is left.
    pub fn spend(&mut self, now: Instant, cost_s: f64) -> bool {
        self.refill(now);
        self.tokens -= cost_s;
        self.tokens > 0.0
    }

    /// Whether the bucket has refilled completely (time to re-attach).
    pub fn full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.budget.capacity_s()
    }

    /// CPU seconds left (negative after an overdraft).
    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget {
        fraction: 0.01,
        window: Duration::from_secs(10),
    };

    #[test]
    fn a_burst_fits_a_storm_does_not() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(BUDGET, t0);
        // A few thousand growths at 2 µs in 50 ms: 6 ms of a 100 ms bucket.
        assert!(b.spend(t0 + Duration::from_millis(50), 3000.0 * 2e-6));
        // Then 1% of a CPU for a minute: sustainable.
        for i in 1..=600 {
            let t = t0 + Duration::from_millis(50 + 100 * i);
            assert!(b.spend(t, 0.01 * 0.1), "step {i}");
        }
        // A storm at 30% of a CPU empties it within a second or so.
        let t1 = t0 + Duration::from_millis(50 + 100 * 600);
        let steps = (1..=100)
            .take_while(|&i| b.spend(t1 + Duration::from_millis(100 * i), 0.3 * 0.1))
            .count();
        assert!((2..=4).contains(&steps), "{steps}");
    }

    #[test]
    fn refills_to_full_in_one_window() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(BUDGET, t0);
        assert!(!b.spend(t0, 0.2));
        assert!(!b.full(t0 + Duration::from_secs(15)));
        assert!(b.full(t0 + Duration::from_secs(21)));
        // Never more than full.
        assert!((b.tokens() - BUDGET.capacity_s()).abs() < 1e-12);
        assert!(b.full(t0 + Duration::from_secs(1000)));
        assert!((b.tokens() - BUDGET.capacity_s()).abs() < 1e-12);
    }
}
