//! A circuit breaker for a run's provider: when sends keep failing on the
//! provider's side (5xx, 429, timeouts, resets), the run stops sending for a
//! cool-down instead of spending every recipient's attempts on an outage,
//! then probes with one send before opening the flood gates again.
//!
//! Only provider faults count. A busy line or an unanswered call is the
//! recipient's outcome, not the provider's health.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Breaker {
    /// Provider faults in a row, across slices.
    faults_in_a_row: u32,
    threshold: u32,
    /// The next cool-down; doubles each time the breaker opens again without
    /// a success in between.
    cool_down: Duration,
    first_cool_down: Duration,
    longest_cool_down: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, first_cool_down: Duration, longest_cool_down: Duration) -> Self {
        Self {
            faults_in_a_row: 0,
            threshold: threshold.max(1),
            cool_down: first_cool_down,
            first_cool_down,
            longest_cool_down,
        }
    }

    /// Counts one send's result, in the order results arrived.
    pub fn record(&mut self, provider_fault: bool) {
        if provider_fault {
            self.faults_in_a_row = self.faults_in_a_row.saturating_add(1);
        } else {
            self.faults_in_a_row = 0;
            self.cool_down = self.first_cool_down;
        }
    }

    /// Whether sending should stop for a cool-down.
    pub fn is_open(&self) -> bool {
        self.faults_in_a_row >= self.threshold
    }

    /// The cool-down to wait now; the next one, should the probe fail too,
    /// is twice as long (up to the longest).
    pub fn trip(&mut self) -> Duration {
        let now = self.cool_down;
        self.cool_down = (self.cool_down * 2).min(self.longest_cool_down);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(3, Duration::from_secs(1), Duration::from_secs(5))
    }

    #[test]
    fn opens_after_enough_faults_in_a_row() {
        let mut b = breaker();
        b.record(true);
        b.record(true);
        assert!(!b.is_open());
        b.record(true);
        assert!(b.is_open());
    }

    #[test]
    fn one_success_closes_it_and_resets_the_cool_down() {
        let mut b = breaker();
        for _ in 0..3 {
            b.record(true);
        }
        assert_eq!(b.trip(), Duration::from_secs(1));
        b.record(true); // the probe failed too
        assert!(b.is_open());
        assert_eq!(b.trip(), Duration::from_secs(2));
        b.record(false);
        assert!(!b.is_open());
        for _ in 0..3 {
            b.record(true);
        }
        assert_eq!(b.trip(), Duration::from_secs(1), "back to the first");
    }

    #[test]
    fn the_cool_down_doubles_up_to_the_longest() {
        let mut b = breaker();
        let waits: Vec<u64> = (0..5).map(|_| b.trip().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5]);
    }

    #[test]
    fn faults_apart_never_open_it() {
        let mut b = breaker();
        for _ in 0..100 {
            b.record(true);
            b.record(true);
            b.record(false);
        }
        assert!(!b.is_open());
    }
}
