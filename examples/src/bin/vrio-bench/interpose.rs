//! `vrio-bench blk --interpose-cost`: what interposition costs the remote
//! path (issue 15: "an empty chain costs <= 2% of remote throughput; the
//! AES-XTS stage reaches >= 1 GB/s per core").
//!
//! The remote doorbell model at one load point (4 KiB, half reads, half
//! writes, so that the cipher runs both ways), over each fabric of
//! `--fabric`, `--pairs` rounds. Each round runs every arm once, in an
//! order rotated from round to round so that a drift in the machine's load
//! falls on all of them:
//! - `none`: no interposition hooks at all (the baseline);
//! - `empty`: the hooks, with no stages (every device's default);
//! - `meter`, `qos` (a limit far above the load: the bucket's work, no
//!   wait) and `crypt` (AES-XTS-256): one stage each.
//!
//! Each arm's figure is the median over the rounds of its req/s divided
//! by `none`'s in the same round. Then the cipher alone: AES-XTS over
//! 4 KiB requests on one thread, in bytes per second of that thread's CPU
//! time.

use std::time::Instant;

use vrio_core::interpose::{PolicySpec, XtsStage};
use vrio_examples::{backend_name, model_json, print_table};
use vrio_testkit::cputime::thread_cpu_ns;

use super::cost::{median, run_once, Arm, CostArgs};

type BoxError = Box<dyn std::error::Error>;

/// A fixed test key (the cost does not depend on it).
const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                   f0e0d0c0b0a090807060504030201000f1e1d1c1b1a191817161514131211101";

fn arms() -> Result<Vec<(&'static str, Arm)>, BoxError> {
    let p = |json: &str| PolicySpec::parse(json).map(Arm::Policy);
    Ok(vec![
        ("none", Arm::NoInterposition),
        ("empty", Arm::Plain),
        ("meter", p(r#"{"stages":[{"stage":"meter"}]}"#)?),
        (
            "qos",
            p(r#"{"stages":[{"stage":"qos","rw_ios_per_sec":100000000}]}"#)?,
        ),
        (
            "crypt",
            p(&format!(
                r#"{{"stages":[{{"stage":"crypt","key":"{KEY}"}}]}}"#
            ))?,
        ),
    ])
}

/// The cipher's rate on this thread: (encrypt, decrypt) bytes per CPU
/// second over 4 KiB requests.
pub fn xts_rate(secs: f64) -> Result<(f64, f64), BoxError> {
    let mut key = [0u8; 64];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&KEY[2 * i..2 * i + 2], 16)?;
    }
    let xts = XtsStage::new(&key)?;
    let mut buf = vec![0xa5u8; 1 << 20];
    let mut rate = |decrypt: bool| {
        let (t0, c0) = (Instant::now(), thread_cpu_ns());
        let mut bytes = 0u64;
        let mut sector = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            for chunk in buf.chunks_exact_mut(4096) {
                if decrypt {
                    xts.decrypt(sector, chunk);
                } else {
                    xts.encrypt(sector, chunk);
                }
                sector += 8;
                bytes += 4096;
            }
        }
        let cpu = (thread_cpu_ns().saturating_sub(c0)).max(1) as f64 / 1e9;
        bytes as f64 / cpu
    };
    let enc = rate(false);
    let dec = rate(true);
    Ok((enc, dec))
}

fn aes_ni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs the arms, prints the tables, returns (the JSON's fields, a point
/// per run). Errors only when a run fails, never on a ratio.
pub fn measure(a: &CostArgs) -> Result<(serde_json::Value, Vec<serde_json::Value>), BoxError> {
    let arms = arms()?;
    let mut fabrics = a.fabrics.clone();
    fabrics.dedup();
    let total = fabrics.len() * a.pairs as usize * arms.len();
    let (mut n, mut rows, mut points) = (0, Vec::new(), Vec::new());
    let (mut sum_rows, mut summary) = (Vec::new(), Vec::new());
    for &fabric in &fabrics {
        let name = backend_name(fabric);
        // Per round, per arm: (req/s, cpu us/req).
        let mut rounds: Vec<Vec<(f64, f64)>> = Vec::new();
        for round in 0..a.pairs as usize {
            let mut got = vec![(0.0, 0.0); arms.len()];
            for k in 0..arms.len() {
                let i = (k + round) % arms.len();
                let (arm_name, arm) = &arms[i];
                n += 1;
                eprintln!(
                    "[{n}/{total}] interposition cost: {name} round {} arm {arm_name} ...",
                    round + 1
                );
                let s = run_once(a, fabric, arm)?;
                let r = &s.report;
                rows.push(vec![
                    name.to_string(),
                    (round + 1).to_string(),
                    (*arm_name).into(),
                    format!("{:.0}", r.requests_per_sec()),
                    format!("{:.2}", s.cpu_us_per_req),
                    format!("{:.1}", r.p50_us()),
                    format!("{:.1}", r.p99_us()),
                ]);
                let mut j = model_json(r);
                j["fabric_backend"] = name.into();
                j["round"] = (round + 1).into();
                j["arm"] = (*arm_name).into();
                j["process_cpu_us_per_request"] = s.cpu_us_per_req.into();
                points.push(j);
                got[i] = (r.requests_per_sec(), s.cpu_us_per_req);
            }
            rounds.push(got);
        }
        let base: Vec<f64> = rounds.iter().map(|r| r[0].0).collect();
        let spread = {
            let (lo, hi) = base
                .iter()
                .fold((f64::MAX, 0.0f64), |(l, h), &v| (l.min(v), h.max(v)));
            100.0 * (hi - lo) / median(base.clone()).max(1e-9)
        };
        for (i, (arm_name, _)) in arms.iter().enumerate() {
            let rps: Vec<f64> = rounds.iter().map(|r| r[i].0 / r[0].0.max(1e-9)).collect();
            let cpu: Vec<f64> = rounds.iter().map(|r| r[i].1 / r[0].1.max(1e-9)).collect();
            let (ratio, cpu_ratio) = (median(rps.clone()), median(cpu.clone()));
            let verdict = match *arm_name {
                "none" => "baseline".to_string(),
                "empty" if ratio >= 0.98 => "within 2%".into(),
                "empty" => "NOT within 2%".into(),
                _ => format!("costs {:.1}%", 100.0 * (1.0 - ratio)),
            };
            sum_rows.push(vec![
                name.to_string(),
                (*arm_name).into(),
                format!("{:.0}", median(rounds.iter().map(|r| r[i].0).collect())),
                format!("{ratio:.3}"),
                format!("{cpu_ratio:.3}"),
                format!("{spread:.1}"),
                verdict,
            ]);
            summary.push(serde_json::json!({
                "fabric_backend": name,
                "arm": arm_name,
                "requests_per_s": rounds.iter().map(|r| r[i].0).collect::<Vec<_>>(),
                "ratio_requests_per_s_vs_none": rps,
                "median_ratio_requests_per_s_vs_none": ratio,
                "median_ratio_cpu_per_request_vs_none": cpu_ratio,
                "none_spread_pct": spread,
            }));
        }
    }
    let (enc, dec) = xts_rate(1.0)?;
    println!(
        "interposition cost: remote doorbell x1, {} guests x QD{}, 4 KiB random I/O ({}% reads), \
         {:.1} s per run, {} rounds; ratios against `none` (no hooks) in the same round",
        a.guests, a.depth, a.read_pct, a.seconds, a.pairs
    );
    print_table(
        &[
            "fabric",
            "round",
            "arm",
            "req/s",
            "cpu us/req",
            "p50 us",
            "p99 us",
        ],
        &rows,
    );
    println!();
    println!(
        "none spread: (max - min) / median of the `none` runs' req/s, the noise the ratios sit in"
    );
    print_table(
        &[
            "fabric",
            "arm",
            "median req/s",
            "median req/s vs none",
            "median cpu/req vs none",
            "none spread %",
            "verdict",
        ],
        &sum_rows,
    );
    println!();
    let gb = |b: f64| b / 1e9;
    println!(
        "AES-XTS-256 over 4 KiB on one thread (AES-NI {}): encrypt {:.2} GB/s, decrypt {:.2} GB/s per core",
        if aes_ni() { "present" } else { "absent" },
        gb(enc),
        gb(dec)
    );
    let fields = serde_json::json!({
        "benchmark": "interpose-cost",
        "model": "remote doorbell x1",
        "guests": a.guests,
        "depth": a.depth,
        "read_pct": a.read_pct,
        "seconds_per_run": a.seconds,
        "rounds": a.pairs,
        "summary": summary,
        "xts": {
            "aes_ni": aes_ni(),
            "encrypt_bytes_per_cpu_s": enc,
            "decrypt_bytes_per_cpu_s": dec,
            "request_bytes": 4096,
        },
    });
    Ok((fields, points))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_cipher_rate_is_measured() {
        let (e, d) = xts_rate(0.05).unwrap();
        assert!(e > 1e6 && d > 1e6, "{e} {d}");
    }

    #[test]
    fn every_arm_runs_clean_once() {
        let a = CostArgs {
            fabrics: vec![vrio_rdma::Backend::Soft],
            guests: 1,
            depth: 4,
            seconds: 0.2,
            pairs: 1,
            scrape_every: Duration::from_millis(100),
            read_pct: 50,
        };
        let (fields, points) = measure(&a).unwrap();
        assert_eq!(points.len(), 5);
        assert_eq!(fields["summary"].as_array().unwrap().len(), 5);
    }
}
