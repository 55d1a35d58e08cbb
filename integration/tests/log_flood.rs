//! A hostile peer cannot flood the I/O server's log: a burst of refused
//! attaches from one host yields a handful of warnings, and the refusals
//! are all counted, while a legitimate guest beside it runs clean. (A
//! binary of its own: it installs the process's tracing subscriber and
//! counts every line.)

mod common;

use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vrio_core::blk::MemoryBackend;
use vrio_core::remote::{IoServer, IoServerConfig};
use vrio_core::tenancy::{AccessMode, Keyring};

use common::legit::{assert_clean, endless, run_until, soft, Legit};

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn refused_attaches_from_one_peer_are_rate_limited_and_counted() {
    tracing_subscriber::fmt()
        .with_writer(|| Capture)
        .with_ansi(false)
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .init();
    let keys = Arc::new(Keyring::ephemeral().unwrap());
    let s = IoServer::start(
        soft(),
        Arc::new(MemoryBackend::new(1 << 20)),
        IoServerConfig {
            keys: Some(keys.clone()),
            ..IoServerConfig::default()
        },
    )
    .unwrap();
    let addr = s.addr().to_string();
    let good = keys
        .mint(
            1000,
            "default",
            AccessMode::ReadWrite,
            "",
            Duration::from_secs(600),
        )
        .unwrap();
    let l = Legit::default();
    let legit = {
        let (addr, l) = (addr.clone(), l.clone());
        std::thread::spawn(move || run_until(&addr, &endless(1), &[1000], &[good], &l))
    };
    let n = 150;
    for device in 0..n {
        let e = vrio_core::vhost_user::fetch_config(
            soft(),
            &addr,
            device,
            Some("vrio-cap-v1.k1.Zm9v.YmFy".into()),
            Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no valid credential"), "{e}");
    }
    assert_eq!(s.refusals().unauthenticated.load(Relaxed), n);
    l.finish_after(500);
    assert_clean(
        &legit
            .join()
            .unwrap()
            .expect("the legitimate guest attaches"),
    );
    s.stop();
    let log = String::from_utf8(LOG.lock().unwrap().clone()).unwrap();
    let refused = log.lines().filter(|l| l.contains("attach refused")).count();
    // 5 a period of 10 s per host; the run may straddle a period or two.
    assert!(
        (1..=15).contains(&refused),
        "{refused} warnings for {n} refusals:\n{log}"
    );
}
