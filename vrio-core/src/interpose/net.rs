//! Net stages on frames a guest sends, between its port and the switch:
//! an ACL on source MAC and IPv4 ([`AclStage`]) and a rate limit
//! ([`NetRateStage`]).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::params::{NetAclSpec, NetRateSpec};
use super::qos::Buckets;
use super::request::{Admit, FrameInfo, Op, Refusal, Request};
use super::stage::{Stage, StageCounter, StageReport};

/// Reads the addresses an ACL checks from an Ethernet frame (no virtio-net
/// header): the source MAC, and the IPv4 source of an IPv4 packet or the
/// sender address of an ARP packet. None when the frame is shorter than
/// an Ethernet header.
pub fn frame_info(frame: &[u8]) -> Option<FrameInfo> {
    let src_mac: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = |at: usize| -> Option<Ipv4Addr> {
        let b: [u8; 4] = frame.get(at..at + 4)?.try_into().ok()?;
        Some(Ipv4Addr::from(b))
    };
    let src_ipv4 = match ethertype {
        0x0800 => ip(14 + 12),
        // ARP: sender protocol address after htype, ptype, hlen, plen, op, sha.
        0x0806 => ip(14 + 14),
        _ => None,
    };
    Some(FrameInfo { src_mac, src_ipv4 })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn parse_net(s: &str) -> Option<(u32, u32)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok().filter(|l| *l <= 32)?),
        None => (s, 32),
    };
    let a: Ipv4Addr = addr.parse().ok()?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some((u32::from(a) & mask, mask))
}

/// Why the ACL dropped frames, as counter labels.
const REASONS: [&str; 3] = ["acl_mac", "acl_ipv4", "acl_short"];

/// The `net_acl` stage: frames whose source MAC or IPv4 address is not
/// allowed are dropped and counted by reason.
#[derive(Debug)]
pub struct AclStage {
    macs: Vec<[u8; 6]>,
    nets: Vec<(u32, u32)>,
    drops: [AtomicU64; REASONS.len()],
}

impl AclStage {
    /// Checks `spec` and builds the stage.
    pub fn new(spec: &NetAclSpec) -> Result<Self, String> {
        if spec.allow_macs.is_empty() && spec.allow_ipv4.is_empty() {
            return Err("allows everything: give allow_macs or allow_ipv4".into());
        }
        let macs = spec
            .allow_macs
            .iter()
            .map(|m| parse_mac(m).ok_or_else(|| format!("bad MAC address {m:?}")))
            .collect::<Result<_, _>>()?;
        let nets = spec
            .allow_ipv4
            .iter()
            .map(|n| parse_net(n).ok_or_else(|| format!("bad IPv4 network {n:?}")))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            macs,
            nets,
            drops: Default::default(),
        })
    }

    fn verdict(&self, req: &Request) -> Option<usize> {
        let Some(f) = req.frame else {
            return Some(2);
        };
        if !self.macs.is_empty() && !self.macs.contains(&f.src_mac) {
            return Some(0);
        }
        if let (false, Some(ip)) = (self.nets.is_empty(), f.src_ipv4) {
            let ip = u32::from(ip);
            if !self.nets.iter().any(|&(net, mask)| ip & mask == net) {
                return Some(1);
            }
        }
        None
    }
}

impl Stage for AclStage {
    fn kind(&self) -> &'static str {
        "net_acl"
    }

    fn admit(&self, req: &Request, _now: Instant) -> Admit {
        if req.op != Op::Transmit {
            return Admit::Go;
        }
        match self.verdict(req) {
            None => Admit::Go,
            Some(i) => {
                self.drops[i].fetch_add(1, Relaxed);
                Admit::Refuse(Refusal::ioerr(REASONS[i]))
            }
        }
    }

    fn report(&self) -> StageReport {
        StageReport {
            kind: "net_acl".into(),
            counters: REASONS
                .iter()
                .zip(&self.drops)
                .map(|(r, d)| StageCounter {
                    name: "drops".into(),
                    label: (*r).into(),
                    value: d.load(Relaxed),
                })
                .collect(),
            latency: None,
        }
    }
}

/// The `net_rate` stage: a port's frames and bits per second. Frames over
/// the limit wait in the guest's TX ring (TCP sees back-pressure, as from
/// a slower link), they are not dropped.
#[derive(Debug)]
pub struct NetRateStage {
    buckets: Buckets<2>,
    waits: AtomicU64,
}

impl NetRateStage {
    /// Checks `spec` and builds the stage.
    pub fn new(spec: &NetRateSpec) -> Result<Self, String> {
        if spec.mbits_per_sec == 0 && spec.frames_per_sec == 0 {
            return Err("no limit set (mbits_per_sec or frames_per_sec)".into());
        }
        if spec.burst_ms == 0 || spec.burst_ms > 60_000 {
            return Err(format!(
                "burst_ms {} is not within 1..=60000",
                spec.burst_ms
            ));
        }
        let rates = [
            spec.frames_per_sec as f64,
            spec.mbits_per_sec as f64 * 1e6 / 8.0,
        ];
        Ok(Self {
            buckets: Buckets::new(rates, Duration::from_millis(spec.burst_ms)),
            waits: AtomicU64::new(0),
        })
    }
}

impl Stage for NetRateStage {
    fn kind(&self) -> &'static str {
        "net_rate"
    }

    fn admit(&self, req: &Request, now: Instant) -> Admit {
        if req.op != Op::Transmit {
            return Admit::Go;
        }
        let a = self.buckets.take([1.0, req.len as f64], now);
        if matches!(a, Admit::Wait(_)) {
            self.waits.fetch_add(1, Relaxed);
        }
        a
    }

    fn report(&self) -> StageReport {
        StageReport {
            kind: "net_rate".into(),
            counters: vec![StageCounter {
                name: "waits".into(),
                label: String::new(),
                value: self.waits.load(Relaxed),
            }],
            latency: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(mac: [u8; 6], ethertype: u16, ip: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xffu8; 6];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&ethertype.to_be_bytes());
        let mut body = vec![0u8; 28];
        let at = if ethertype == 0x0800 { 12 } else { 14 };
        body[at..at + 4].copy_from_slice(&ip);
        f.extend_from_slice(&body);
        f
    }

    fn tx(f: &[u8]) -> Request {
        Request {
            device: 1,
            op: Op::Transmit,
            sector: 0,
            len: f.len() as u64,
            frame: frame_info(f),
            arrived: Instant::now(),
            vm_host: 0,
        }
    }

    #[test]
    fn the_acl_drops_by_mac_and_ipv4_and_counts_why() {
        let acl = AclStage::new(&NetAclSpec {
            allow_macs: vec!["52:54:00:00:00:01".into()],
            allow_ipv4: vec!["10.0.0.0/24".into()],
        })
        .expect("valid");
        let good = [0x52, 0x54, 0, 0, 0, 1];
        let now = Instant::now();
        assert_eq!(
            acl.admit(&tx(&frame(good, 0x0800, [10, 0, 0, 7])), now),
            Admit::Go
        );
        assert!(matches!(
            acl.admit(&tx(&frame([2; 6], 0x0800, [10, 0, 0, 7])), now),
            Admit::Refuse(_)
        ));
        assert!(matches!(
            acl.admit(&tx(&frame(good, 0x0800, [10, 0, 1, 7])), now),
            Admit::Refuse(_)
        ));
        // ARP with a spoofed sender address.
        assert!(matches!(
            acl.admit(&tx(&frame(good, 0x0806, [192, 168, 0, 1])), now),
            Admit::Refuse(_)
        ));
        // IPv6 is not checked against IPv4 networks.
        assert_eq!(acl.admit(&tx(&frame(good, 0x86dd, [0; 4])), now), Admit::Go);
        assert!(matches!(acl.admit(&tx(&[1, 2, 3]), now), Admit::Refuse(_)));
        let r = acl.report();
        assert_eq!(r.counter("drops", "acl_mac"), 1);
        assert_eq!(r.counter("drops", "acl_ipv4"), 2);
        assert_eq!(r.counter("drops", "acl_short"), 1);
    }

    #[test]
    fn bad_acls_are_refused() {
        for (macs, nets) in [
            (vec![], vec![]),
            (vec!["52:54:00:00:01".to_string()], vec![]),
            (vec![], vec!["10.0.0.0/33".to_string()]),
            (vec![], vec!["10.0.0".to_string()]),
        ] {
            let spec = NetAclSpec {
                allow_macs: macs,
                allow_ipv4: nets,
            };
            assert!(AclStage::new(&spec).is_err(), "{spec:?}");
        }
    }

    #[test]
    fn the_rate_limit_holds_frames_back() {
        let r = NetRateStage::new(&NetRateSpec {
            mbits_per_sec: 8,
            frames_per_sec: 0,
            burst_ms: 10,
        })
        .expect("valid");
        let f = frame([2; 6], 0x0800, [10, 0, 0, 1]);
        let mut req = tx(&f);
        req.len = 1000;
        let t0 = Instant::now();
        let mut now = t0;
        let mut bytes = 0u64;
        while now < t0 + Duration::from_secs(1) {
            match r.admit(&req, now) {
                Admit::Go => bytes += 1000,
                Admit::Wait(t) => now = t,
                Admit::Refuse(_) => panic!("never refuses"),
            }
        }
        // 1 MB/s plus the 10 ms burst, within a frame.
        assert!((1_000_000..=1_012_000).contains(&bytes), "{bytes}");
    }
}
