//! Rate-limited warnings: a hostile peer (or a flood of them) must not
//! flood the log. A few lines per window get through; the rest are counted,
//! and the next line that gets through reports how many were suppressed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// Lets at most `per_window` events per `window` be logged.
#[derive(Debug)]
pub(crate) struct RateLimit {
    per_window: u32,
    window: Duration,
    st: Mutex<Window>,
}

impl RateLimit {
    pub(crate) fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            st: Mutex::new(Window::default()),
        }
    }

    /// Whether to log an event now: `Some(n)` if so, with `n` the events
    /// suppressed since the last one logged; `None` to drop it.
    pub(crate) fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        // A counter update cannot be torn: poison is harmless.
        let mut w = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if w.start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window)
        {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < self.per_window {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_few_through_per_window_and_counts_the_rest() {
        let r = RateLimit::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let got: Vec<_> = (0..10)
            .map(|i| r.admit_at(t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(&got[..3], &[Some(0), Some(0), Some(0)]);
        assert!(got[3..].iter().all(Option::is_none), "{got:?}");
        // The next window's first line reports the 7 suppressed.
        assert_eq!(r.admit_at(t0 + Duration::from_millis(1000)), Some(7));
        assert_eq!(r.admit_at(t0 + Duration::from_millis(1001)), Some(0));
    }
}
