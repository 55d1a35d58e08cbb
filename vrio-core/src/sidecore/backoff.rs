//! Idle back-off: spin a little, then sleep for growing periods, so that an
//! idle sidecore does not burn a core forever (the SPDK complaint).

use std::time::Duration;

/// How an idle sidecore waits: spin, then sleep exponentially longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Empty rounds to spin before sleeping at all.
    pub spin_rounds: u32,
    /// First sleep; doubles on every further empty round.
    pub min_sleep: Duration,
    /// Longest sleep. `Duration::ZERO` means never sleep (pure polling).
    pub max_sleep: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            spin_rounds: 2000,
            min_sleep: Duration::from_micros(20),
            max_sleep: Duration::from_millis(1),
        }
    }
}

impl Backoff {
    /// Never sleeps: a classic 100% sidecore.
    pub fn spin() -> Self {
        Self {
            spin_rounds: u32::MAX,
            min_sleep: Duration::ZERO,
            max_sleep: Duration::ZERO,
        }
    }

    /// How long to sleep after `empty_rounds` consecutive empty rounds.
    pub fn delay(&self, empty_rounds: u32) -> Option<Duration> {
        if self.max_sleep.is_zero() || empty_rounds < self.spin_rounds {
            return None;
        }
        let exp = (empty_rounds - self.spin_rounds).min(20);
        Some(self.min_sleep.saturating_mul(1 << exp).min(self.max_sleep))
    }
}
