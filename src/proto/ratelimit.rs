//! A token bucket in bytes, refilled from the times the caller passes in (sans-IO: no clock here).

use std::time::Instant;

#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    tokens: u64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub(crate) fn full(burst: u64) -> TokenBucket {
        TokenBucket { tokens: burst, last: None }
    }

    /// Refills at `rate` bytes per second up to `burst`, then grants as many of `units` (each costing `cost`
    /// bytes) as the tokens cover, and returns that number. A `rate` of 0 means unlimited.
    pub(crate) fn take(&mut self, now: Instant, rate: u64, burst: u64, units: u64, cost: u64) -> u64 {
        if rate == 0 {
            return units;
        }
        if let Some(last) = self.last {
            let refill = (now.saturating_duration_since(last).as_nanos() * rate as u128 / 1_000_000_000) as u64;
            self.tokens = self.tokens.saturating_add(refill).min(burst);
        }
        self.last = Some(now);
        let granted = units.min(self.tokens / cost.max(1));
        self.tokens -= granted * cost.max(1);
        granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grants_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(10_000);
        assert_eq!(b.take(t0, 1_000_000, 10_000, 100, 1000), 10, "the burst");
        assert_eq!(b.take(t0, 1_000_000, 10_000, 100, 1000), 0, "empty");
        assert_eq!(b.take(t0 + Duration::from_millis(3), 1_000_000, 10_000, 100, 1000), 3, "3 ms at 1 MB/s");
        assert_eq!(b.take(t0 + Duration::from_secs(9), 1_000_000, 10_000, 100, 1000), 10, "capped at the burst");
        assert_eq!(b.take(t0, 0, 0, 7, 1000), 7, "rate 0 is unlimited");
    }
}
