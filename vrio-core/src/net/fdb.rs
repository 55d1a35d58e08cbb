//! The switch's forwarding database: MAC address → port, learned from
//! source addresses, forgotten after `ageing` without traffic.
//!
//! Lookups and refreshes take a read lock only (the timestamp is atomic),
//! so steady traffic never serialises on the table. The table is bounded:
//! when full, expired entries are evicted first, and a new address that
//! still finds no room is simply not learned (its frames get flooded).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::port::PortId;
use crate::virtio::net::mac::MacAddr;

#[derive(Debug)]
struct Entry {
    port: PortId,
    /// Last time seen, in ns since the table's epoch.
    seen: AtomicU64,
}

/// A bounded MAC → port table with ageing; shared by every thread that
/// forwards through the switch.
#[derive(Debug)]
pub struct Fdb {
    map: RwLock<HashMap<MacAddr, Entry>>,
    epoch: Instant,
    ageing_ns: u64,
    capacity: usize,
}

impl Fdb {
    /// An empty table holding at most `capacity` addresses (at least one),
    /// each forgotten `ageing` after it was last seen; times count from
    /// `epoch`.
    pub fn new(ageing: Duration, capacity: usize, epoch: Instant) -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            epoch,
            ageing_ns: ageing.as_nanos().min(u128::from(u64::MAX)) as u64,
            capacity: capacity.max(1),
        }
    }

    fn ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn fresh(&self, e: &Entry, now_ns: u64) -> bool {
        now_ns.saturating_sub(e.seen.load(Relaxed)) < self.ageing_ns
    }

    /// Records that `mac` was seen on `port`. Returns false when the table
    /// is full and the address could not be learned.
    pub fn learn(&self, mac: MacAddr, port: PortId, now: Instant) -> bool {
        let t = self.ns(now);
        {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = map.get(&mac) {
                if e.port == port {
                    e.seen.store(t, Relaxed);
                    return true;
                }
            }
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&mac) && map.len() >= self.capacity {
            map.retain(|_, e| t.saturating_sub(e.seen.load(Relaxed)) < self.ageing_ns);
            if map.len() >= self.capacity {
                return false;
            }
        }
        if let Some(old) = map.get(&mac) {
            if old.port != port {
                tracing::debug!(%mac, from = old.port, to = port, "address moved");
            }
        }
        map.insert(
            mac,
            Entry {
                port,
                seen: AtomicU64::new(t),
            },
        );
        true
    }

    /// The port `mac` was last seen on, unless that entry has aged out.
    pub fn lookup(&self, mac: MacAddr, now: Instant) -> Option<PortId> {
        let t = self.ns(now);
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(&mac).filter(|e| self.fresh(e, t)).map(|e| e.port)
    }

    /// Drops entries older than the ageing time; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let t = self.ns(now);
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|_, e| t.saturating_sub(e.seen.load(Relaxed)) < self.ageing_ns);
        before - map.len()
    }

    /// Forgets every address learned on `port` (the port went away).
    pub fn forget_port(&self, port: PortId) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, e| e.port != port);
    }

    /// Addresses held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }
    /// No address held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_moves_ages_and_stays_bounded() {
        let t0 = Instant::now();
        let f = Fdb::new(Duration::from_secs(10), 2, t0);
        let (a, b, c) = (MacAddr::local(1), MacAddr::local(2), MacAddr::local(3));
        assert!(f.learn(a, 1, t0));
        assert_eq!(f.lookup(a, t0), Some(1));
        assert!(f.learn(a, 2, t0 + Duration::from_secs(1)));
        assert_eq!(f.lookup(a, t0 + Duration::from_secs(1)), Some(2));
        assert!(f.learn(b, 1, t0 + Duration::from_secs(5)));
        // Full: c finds no room while a and b are fresh.
        assert!(!f.learn(c, 3, t0 + Duration::from_secs(6)));
        assert_eq!(f.lookup(c, t0 + Duration::from_secs(6)), None);
        // a aged out (last seen at 1 s): lookups miss, and c takes its place.
        let late = t0 + Duration::from_secs(12);
        assert_eq!(f.lookup(a, late), None);
        assert_eq!(f.lookup(b, late), Some(1));
        assert!(f.learn(c, 3, late));
        assert_eq!(f.len(), 2);
        assert_eq!(f.expire(t0 + Duration::from_secs(30)), 2);
        assert!(f.is_empty());
        f.learn(a, 4, late);
        f.forget_port(4);
        assert_eq!(f.lookup(a, late), None);
    }
}
