//! Rate limits for warnings a peer can cause: a hostile peer must not be
//! able to flood the log (one once produced 44,832 lines in 12 s), but an
//! operator must still see that it happens and how often. Used by the
//! listeners here (one key per listener) and by the I/O server (a key per
//! peer host).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most distinct keys remembered; beyond it the oldest windows are dropped
/// (a peer cycling source ports must not grow the map without bound).
const MAX_KEYS: usize = 1024;

struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// Lets `burst` warnings per key through in each `period`, and counts the
/// rest.
#[derive(Debug)]
pub struct WarnLimiter {
    period: Duration,
    burst: u32,
    windows: Mutex<HashMap<String, Window>>,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("logged", &self.logged)
            .field("suppressed", &self.suppressed)
            .finish()
    }
}

impl WarnLimiter {
    /// `burst` lines per key every `period`.
    pub fn new(period: Duration, burst: u32) -> Self {
        Self {
            period,
            burst: burst.max(1),
            windows: Mutex::default(),
        }
    }

    /// Whether a warning for `key` may be logged at `now`: `Some(n)` with
    /// the number suppressed since the last one logged, `None` to drop it.
    pub fn allow(&self, key: &str, now: Instant) -> Option<u64> {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() >= MAX_KEYS && !w.contains_key(key) {
            let period = self.period;
            w.retain(|_, v| now.saturating_duration_since(v.start) < period);
            if w.len() >= MAX_KEYS {
                w.clear();
            }
        }
        let win = w.entry(key.to_string()).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(win.start) >= self.period {
            win.start = now;
            win.logged = 0;
        }
        if win.logged < self.burst {
            win.logged += 1;
            Some(std::mem::take(&mut win.suppressed))
        } else {
            win.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_key_then_counts_until_the_next_period() {
        let l = WarnLimiter::new(Duration::from_secs(1), 3);
        let t = Instant::now();
        assert_eq!(l.allow("a", t), Some(0));
        assert_eq!(l.allow("a", t), Some(0));
        assert_eq!(l.allow("a", t), Some(0));
        for _ in 0..100 {
            assert_eq!(l.allow("a", t), None);
        }
        // Another peer is not held back by the first.
        assert_eq!(l.allow("b", t), Some(0));
        // The next period reports what was dropped.
        assert_eq!(l.allow("a", t + Duration::from_secs(1)), Some(100));
        assert_eq!(l.allow("a", t + Duration::from_secs(1)), Some(0));
        // Many keys do not grow the map without bound.
        for i in 0..5000 {
            l.allow(&format!("k{i}"), t);
        }
        assert!(l.windows.lock().unwrap().len() <= MAX_KEYS);
    }
}
