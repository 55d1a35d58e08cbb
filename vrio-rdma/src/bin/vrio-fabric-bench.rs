//! Benchmark of the fabrics on one host against their limit: a plain TCP
//! request/response of the same sizes, measured in the same run.
//!
//! READ n: a fabric READ of n bytes vs. TCP 16-byte request -> n-byte
//! response. WRITE n: a fabric WRITE of n bytes vs. TCP (16 + n)-byte
//! request -> 16-byte response. Depth 1 gives latency; depth 32 (pipelined)
//! gives throughput. Every fabric row also gives the target's CPU per
//! operation: the target domain's fabric threads
//! ([`Domain::fabric_cpu_ns`]) for a fabric, the echo server's thread for
//! TCP (a NIC would make it zero for a one-sided operation).
//!
//! With `--json out.json` it also draws `out-ops.svg`: op/s by size and
//! depth for every fabric and TCP (`--no-plots` leaves it out).

#[path = "vrio-fabric-bench/chart.rs"]
mod chart;

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde::Serialize;
use vrio_rdma::conformance::memory::MemfdMemory;
use vrio_rdma::soft::thread_cpu_ns;
use vrio_rdma::{
    Access, Backend, Completion, Domain, Endpoint, EndpointConfig, MemoryRegion, Opcode,
    SendRequest, Sge, WcOpcode, WcStatus,
};

#[derive(Debug, Parser)]
#[command(about = "fabrics vs plain TCP request/response on one host")]
struct Args {
    /// Total measuring time, split evenly over all rows and transports.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// With --json, do not draw the chart beside it (`out-ops.svg`).
    #[arg(long)]
    no_plots: bool,
    /// Fabrics to measure beside plain TCP, comma-separated (soft, shm,
    /// verbs).
    #[arg(long, value_delimiter = ',', default_value = "soft,shm")]
    fabric: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

#[derive(Debug, Serialize, Clone, Copy)]
struct Measure {
    ops: u64,
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU the target spent per operation, from per-thread clocks: its
    /// fabric threads, or the TCP echo server's thread.
    target_cpu_us_per_op: f64,
}

/// One fabric's figures in a row.
#[derive(Debug, Serialize)]
struct FabricMeasure {
    #[serde(flatten)]
    measure: Measure,
    /// This fabric's op/s divided by TCP's.
    ratio_vs_tcp: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    op: &'static str,
    size: usize,
    depth: usize,
    /// The `soft` fabric (when measured), as before `fabrics` existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    soft: Option<Measure>,
    tcp: Measure,
    /// soft ops/s divided by TCP ops/s (when soft was measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    /// Every fabric measured, by name.
    fabrics: BTreeMap<String, FabricMeasure>,
}

#[derive(Debug, Serialize)]
struct Report {
    transport: &'static str,
    seconds_per_measurement: f64,
    /// The fabrics measured beside TCP, in order.
    fabrics: Vec<String>,
    rows: Vec<Row>,
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

fn measure(lat: &Histogram<u64>, ops: u64, elapsed: Duration, target_cpu_ns: u64) -> Measure {
    Measure {
        ops,
        ops_per_sec: ops as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: lat.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: lat.value_at_quantile(0.99) as f64 / 1000.0,
        target_cpu_us_per_op: target_cpu_ns as f64 / 1000.0 / ops.max(1) as f64,
    }
}

/// Where a rig's target listens on `backend`: loopback TCP for the socket
/// and verbs back-ends, a fresh Unix socket path for the others.
fn listen_addr(backend: Backend) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    match backend {
        Backend::Soft | Backend::Verbs => "127.0.0.1:0".into(),
        #[allow(unreachable_patterns)]
        _ => format!(
            "unix:{}",
            std::env::temp_dir()
                .join(format!(
                    "vrio-fabric-bench-{}-{}.sock",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ))
                .display()
        ),
    }
}

/// One connection on one fabric: an initiator endpoint and its local
/// memory, the target's registered memory, and both domains.
struct Rig {
    name: String,
    ep: Box<dyn Endpoint>,
    _peer: Box<dyn Endpoint>,
    remote: vrio_rdma::RemoteRegion,
    lmr: Box<dyn MemoryRegion>,
    _rmr: Box<dyn MemoryRegion>,
    lmem: MemfdMemory,
    _rmem: MemfdMemory,
    target: Box<dyn Domain>,
    _initiator: Box<dyn Domain>,
}

/// Connects an initiator domain to a target domain listening on `addr`.
fn rig(
    name: &str,
    target: Box<dyn Domain>,
    initiator: Box<dyn Domain>,
    addr: &str,
) -> BenchResult<Rig> {
    let rmem = MemfdMemory::new("bench-target", 1 << 20)?;
    let lmem = MemfdMemory::new("bench-initiator", 1 << 20)?;
    // The target's memory is registered with its file, as guest RAM is, so
    // fabrics that share files (shm) map it.
    // SAFETY: both memories live in the rig and are dropped after the regions
    // (field order of Rig); `rmem` maps its memfd from offset 0.
    let rmr =
        unsafe { target.register_fd(rmem.ptr(), rmem.len(), Access::GUEST_RAM, rmem.fd(), 0)? };
    // SAFETY: as above.
    let lmr = unsafe { initiator.register(lmem.ptr(), lmem.len(), Access::LOCAL_ONLY)? };
    let mut l = target.listen(addr, EndpointConfig::default())?;
    let addr = l.local_addr();
    let acc = std::thread::spawn(move || l.accept());
    let ep = initiator.connect(&addr, EndpointConfig::default())?;
    let peer = acc.join().map_err(|_| "accept thread panicked")??;
    Ok(Rig {
        name: name.to_string(),
        ep,
        _peer: peer,
        remote: rmr.remote(),
        lmr,
        _rmr: rmr,
        lmem,
        _rmem: rmem,
        target,
        _initiator: initiator,
    })
}

/// A rig on `backend`, named `name` (both domains on it).
fn fabric_rig(name: &str, backend: Backend) -> BenchResult<Rig> {
    let open = || vrio_rdma::open(backend, None);
    rig(name, open()?, open()?, &listen_addr(backend))
}

fn bench_fabric(
    rig: &mut Rig,
    op: Op,
    size: usize,
    depth: usize,
    dur: Duration,
) -> BenchResult<Measure> {
    let name = rig.name.clone();
    let mut lat = Histogram::<u64>::new(3)?;
    let mut posted = vec![Instant::now(); depth];
    let wr = |k: usize| SendRequest {
        wr_id: k as u64,
        opcode: match op {
            Op::Read => Opcode::Read {
                remote_addr: rig.remote.addr + (k * size) as u64,
                rkey: rig.remote.rkey,
            },
            Op::Write => Opcode::Write {
                remote_addr: rig.remote.addr + (k * size) as u64,
                rkey: rig.remote.rkey,
            },
        },
        local: Sge {
            lkey: rig.lmr.lkey(),
            addr: rig.lmem.addr() + (k * size) as u64,
            len: size as u32,
        },
        signaled: true,
    };
    let wrs: Vec<SendRequest> = (0..depth).map(wr).collect();
    let mut done = [Completion {
        wr_id: 0,
        status: WcStatus::Success,
        opcode: WcOpcode::Read,
        byte_len: 0,
        imm: None,
    }; 64];
    let cpu0 = rig.target.fabric_cpu_ns();
    let start = Instant::now();
    for p in posted.iter_mut() {
        *p = start;
    }
    rig.ep.post_send(&wrs)?;
    let (mut ops, mut outstanding) = (0u64, depth);
    let mut again = Vec::with_capacity(depth);
    while outstanding > 0 {
        let mut n = rig.ep.poll(&mut done)?;
        if n == 0 {
            rig.ep.wait(Duration::from_secs(5))?;
            n = rig.ep.poll(&mut done)?;
            if n == 0 {
                return Err(format!("{name}: no completion within 5 s").into());
            }
        }
        let now = Instant::now();
        let stop = now.duration_since(start) >= dur;
        again.clear();
        for c in &done[..n] {
            if !c.status.is_ok() {
                return Err(format!("{name}: wr {} completed {:?}", c.wr_id, c.status).into());
            }
            let k = c.wr_id as usize;
            lat.record(now.duration_since(posted[k]).as_nanos() as u64)?;
            ops += 1;
            outstanding -= 1;
            if !stop {
                posted[k] = now;
                again.push(wrs[k]);
            }
        }
        if !again.is_empty() {
            rig.ep.post_send(&again)?;
            outstanding += again.len();
        }
    }
    let elapsed = start.elapsed();
    let cpu = rig.target.fabric_cpu_ns().saturating_sub(cpu0);
    Ok(measure(&lat, ops, elapsed, cpu))
}

/// The baseline server: 16-byte header `[op u32, len u32, pad u64]`; READ
/// answers `len` bytes, WRITE reads `len` bytes and answers 16. Returns the
/// CPU time its thread used.
fn tcp_server(l: TcpListener) -> std::io::Result<u64> {
    let cpu0 = thread_cpu_ns();
    let (s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let mut r = BufReader::with_capacity(256 << 10, s.try_clone()?);
    let mut w = BufWriter::with_capacity(256 << 10, s);
    let data = vec![0x5Au8; 1 << 20];
    let mut sink = vec![0u8; 1 << 20];
    let mut h = [0u8; 16];
    loop {
        if r.read_exact(&mut h).is_err() {
            return Ok(thread_cpu_ns().saturating_sub(cpu0));
        }
        let op = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let len = (u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize).min(data.len());
        if op == 0 {
            w.write_all(&data[..len])?;
        } else {
            r.read_exact(&mut sink[..len])?;
            w.write_all(&[0u8; 16])?;
        }
        // Answer a pipelined batch with one write.
        if r.buffer().is_empty() {
            w.flush()?;
        }
    }
}

fn bench_tcp(op: Op, size: usize, depth: usize, dur: Duration) -> BenchResult<Measure> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let server = std::thread::spawn(move || tcp_server(l));
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut req = vec![0u8; 16 + size];
    req[0..4].copy_from_slice(&(if op == Op::Read { 0u32 } else { 1 }).to_le_bytes());
    req[4..8].copy_from_slice(&(size as u32).to_le_bytes());
    let req = if op == Op::Read {
        req[..16].to_vec()
    } else {
        req
    };
    let resp_len = if op == Op::Read { size } else { 16 };
    let mut resp = vec![0u8; resp_len];
    let mut rd = BufReader::with_capacity(256 << 10, s.try_clone()?);
    let mut lat = Histogram::<u64>::new(3)?;
    let mut posted: VecDeque<Instant> = VecDeque::with_capacity(depth);
    let start = Instant::now();
    // The pipeline's first `depth` requests go out in one write.
    let first: Vec<u8> = req
        .iter()
        .copied()
        .cycle()
        .take(req.len() * depth)
        .collect();
    s.write_all(&first)?;
    posted.extend(std::iter::repeat_n(start, depth));
    let mut ops = 0u64;
    while let Some(t0) = posted.pop_front() {
        rd.read_exact(&mut resp)?;
        let now = Instant::now();
        lat.record(now.duration_since(t0).as_nanos() as u64)?;
        let mut n = 1;
        // Take every response already buffered, then refill the pipeline
        // with one write, as the soft side batches its reposts.
        while rd.buffer().len() >= resp_len {
            let Some(t) = posted.pop_front() else { break };
            rd.read_exact(&mut resp)?;
            lat.record(now.duration_since(t).as_nanos() as u64)?;
            n += 1;
        }
        ops += n as u64;
        if now.duration_since(start) < dur {
            s.write_all(&first[..req.len() * n])?;
            posted.extend(std::iter::repeat_n(now, n));
        }
    }
    let elapsed = start.elapsed();
    drop(rd);
    s.shutdown(std::net::Shutdown::Both)?;
    let cpu = server.join().map_err(|_| "server panicked")??;
    Ok(measure(&lat, ops, elapsed, cpu))
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vrio-fabric-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> BenchResult<()> {
    let configs: Vec<(Op, usize, usize)> = [Op::Read, Op::Write]
        .into_iter()
        .flat_map(|op| {
            [64usize, 4096]
                .into_iter()
                .flat_map(move |s| [1usize, 32].map(|d| (op, s, d)))
        })
        .collect();
    let mut fabrics: Vec<(String, Backend)> = Vec::new();
    for f in args.fabric.iter().map(|f| f.trim()) {
        let backend = f.parse().map_err(|e| format!("--fabric {f}: {e}"))?;
        if !fabrics.iter().any(|(x, _)| x == f) {
            fabrics.push((f.to_string(), backend));
        }
    }
    let mut rigs = fabrics
        .iter()
        .map(|(f, b)| fabric_rig(f, *b).map_err(|e| format!("{f}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let fabrics: Vec<String> = fabrics.into_iter().map(|(f, _)| f).collect();
    let transports = rigs.len() + 1;
    let per =
        Duration::from_secs_f64((args.seconds / (transports * configs.len()) as f64).max(0.01));
    let mut rows = Vec::new();
    for (op, size, depth) in configs {
        let mut measured = Vec::new();
        for rig in rigs.iter_mut() {
            measured.push((rig.name.clone(), bench_fabric(rig, op, size, depth, per)?));
        }
        let tcp = bench_tcp(op, size, depth, per)?;
        let vs_tcp = |m: &Measure| m.ops_per_sec / tcp.ops_per_sec.max(1e-9);
        let soft = measured.iter().find(|(n, _)| n == "soft").map(|(_, m)| *m);
        rows.push(Row {
            op: if op == Op::Read { "READ" } else { "WRITE" },
            size,
            depth,
            soft,
            tcp,
            ratio: soft.as_ref().map(vs_tcp),
            fabrics: measured
                .into_iter()
                .map(|(n, measure)| {
                    let ratio_vs_tcp = vs_tcp(&measure);
                    (
                        n,
                        FabricMeasure {
                            measure,
                            ratio_vs_tcp,
                        },
                    )
                })
                .collect(),
        });
    }
    println!(
        "{} vs plain TCP request/response, one host, {:.2} s per measurement",
        fabrics.join(", "),
        per.as_secs_f64()
    );
    println!("tgt CPU: the target's CPU per operation (fabric threads, or the TCP server thread)");
    let header = format!(
        "{:<6} {:>5} {:>5} {:<6} | {:>11} {:>8} {:>8} | {:>13} | {:>6}",
        "op", "size", "depth", "fabric", "op/s", "p50 us", "p99 us", "tgt CPU us/op", "x tcp"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for r in &rows {
        let line = |name: &str, m: &Measure, ratio: f64| {
            println!(
                "{:<6} {:>5} {:>5} {:<6} | {:>11.0} {:>8.1} {:>8.1} | {:>13.3} | {:>6.2}",
                r.op,
                r.size,
                r.depth,
                name,
                m.ops_per_sec,
                m.p50_us,
                m.p99_us,
                m.target_cpu_us_per_op,
                ratio
            )
        };
        for f in &fabrics {
            if let Some(m) = r.fabrics.get(f) {
                line(f, &m.measure, m.ratio_vs_tcp);
            }
        }
        line("tcp", &r.tcp, 1.0);
    }
    let report = Report {
        transport: "tcp loopback",
        seconds_per_measurement: per.as_secs_f64(),
        fabrics,
        rows,
    };
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
        if !args.no_plots {
            // The JSON is written whatever becomes of the chart.
            let svg = chart::path_beside(p, "ops");
            chart::render(&svg, &ops_chart(&report))?;
            println!("wrote {}", svg.display());
        }
    }
    Ok(())
}

/// op/s of every row (op, size, depth on x) for every fabric and TCP, on a
/// log axis (depth 32 and depth 1 differ by an order of magnitude).
fn ops_chart(report: &Report) -> chart::Chart {
    let names: Vec<&str> = report
        .fabrics
        .iter()
        .map(String::as_str)
        .chain(["tcp"])
        .collect();
    let series = names
        .iter()
        .map(|&name| chart::Series {
            name: name.to_string(),
            bars: report
                .rows
                .iter()
                .map(|r| {
                    let m = match name {
                        "tcp" => Some(&r.tcp),
                        f => r.fabrics.get(f).map(|m| &m.measure),
                    };
                    m.map(|m| chart::Bar {
                        solid: m.ops_per_sec,
                        pale: None,
                    })
                })
                .collect(),
        })
        .collect();
    chart::Chart {
        title: format!(
            "Fabric op/s by size and depth ({} vs TCP loopback)",
            report.fabrics.join(", ")
        ),
        y_label: "operations per second (log)".into(),
        log_y: true,
        groups: report
            .rows
            .iter()
            .map(|r| format!("{} {} B QD{}", r.op, r.size, r.depth))
            .collect(),
        series,
        note: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chart of a tiny fake report is well-formed SVG naming every
    /// fabric, TCP and every row.
    #[test]
    fn the_chart_of_a_fake_report_is_svg_with_every_name() {
        let m = |ops_per_sec: f64| Measure {
            ops: 10,
            ops_per_sec,
            p50_us: 1.0,
            p99_us: 2.0,
            target_cpu_us_per_op: 0.1,
        };
        let row = |op, size, depth, k: f64| Row {
            op,
            size,
            depth,
            soft: Some(m(1000.0 * k)),
            tcp: m(500.0 * k),
            ratio: Some(2.0),
            fabrics: [("soft", 1000.0), ("shm", 5000.0)]
                .into_iter()
                .map(|(n, v)| {
                    let measure = m(v * k);
                    (
                        n.to_string(),
                        FabricMeasure {
                            measure,
                            ratio_vs_tcp: 2.0,
                        },
                    )
                })
                .collect(),
        };
        let report = Report {
            transport: "tcp loopback",
            seconds_per_measurement: 0.1,
            fabrics: vec!["soft".into(), "shm".into()],
            rows: vec![row("READ", 64, 1, 1.0), row("WRITE", 4096, 32, 20.0)],
        };
        let dir = std::env::temp_dir().join(format!("vrio-fabric-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = chart::path_beside(&dir.join("out.json"), "ops");
        assert_eq!(svg, dir.join("out-ops.svg"));
        chart::render(&svg, &ops_chart(&report)).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(str::trim)
            .collect();
        for want in ["soft", "shm", "tcp", "READ 64 B QD1", "WRITE 4096 B QD32"] {
            assert!(texts.contains(&want), "{want} not in {texts:?}");
        }
        assert!(doc.descendants().any(|n| n.has_tag_name("rect")));
    }

    /// A chart that cannot be written names its file.
    #[test]
    fn a_chart_that_cannot_be_written_says_where() {
        let c = chart::Chart {
            title: "t".into(),
            y_label: "y".into(),
            log_y: false,
            groups: vec!["g".into()],
            series: vec![chart::Series {
                name: "m".into(),
                bars: vec![Some(chart::Bar {
                    solid: 1.0,
                    pale: None,
                })],
            }],
            note: String::new(),
        };
        let path = std::path::Path::new("/nonexistent-vrio-dir/out-ops.svg");
        let e = chart::render(path, &c).unwrap_err();
        assert!(e.contains("/nonexistent-vrio-dir/out-ops.svg"), "{e}");
    }
}
