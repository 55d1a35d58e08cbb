//! The charts of a run, drawn from its JSON points and written beside the
//! JSON (`out.json` -> `out-throughput.svg`, `out-cpu.svg`, and for `blk`
//! `out-latency.svg`): one group of bars per load point (guests and queue
//! depth, or frame size), one bar per model.

use std::path::{Path, PathBuf};

use serde_json::Value;

#[path = "../../../../vrio-rdma/src/bin/vrio-fabric-bench/chart.rs"]
mod chart;

use chart::{Bar, Chart, Series};

/// The load point of a JSON point, as an x label.
fn group(p: &Value) -> String {
    match p["frame_bytes"].as_u64() {
        Some(b) => format!("{b} B frames"),
        None => {
            let g = p["guests"].as_u64().unwrap_or(0);
            let s = if g == 1 { "" } else { "s" };
            format!("{g} guest{s}, QD{}", p["depth"])
        }
    }
}

/// The points' distinct values of `key`, in order of appearance.
fn distinct(points: &[Value], key: impl Fn(&Value) -> String) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in points.iter().map(key) {
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

/// One chart over every model and load point; `bar` reads a point's bar.
fn chart_of(points: &[Value], bar: impl Fn(&Value) -> Option<Bar>) -> Chart {
    let model = |p: &Value| p["model"].as_str().unwrap_or("?").to_string();
    let groups = distinct(points, group);
    let series = distinct(points, model)
        .into_iter()
        .map(|name| Series {
            bars: groups
                .iter()
                .map(|g| {
                    points
                        .iter()
                        .find(|p| model(p) == name && group(p) == *g)
                        .and_then(&bar)
                })
                .collect(),
            name,
        })
        .collect();
    Chart {
        title: String::new(),
        y_label: String::new(),
        log_y: false,
        groups,
        series,
        note: String::new(),
    }
}

/// The device-side CPU of a point per request, in us: the sidecores or
/// workers, plus for a remote model the VM host's agents and fabric threads
/// and the I/O server's fabric threads (the guests' CPU is left out).
fn device_cpu(p: &Value) -> Option<(f64, f64)> {
    let c = &p["cpu_us_per_request"];
    let side = c["sidecore"].as_f64()?;
    let remote: f64 = ["vmhost_agent", "vmhost_fabric", "server_fabric"]
        .iter()
        .filter_map(|k| c[*k].as_f64())
        .sum();
    Some((side, side + remote))
}

/// The charts of one run of `workload` ("blk" or "net"), with the file
/// each goes to beside `json`.
pub fn charts(json: &Path, workload: &str, points: &[Value]) -> Vec<(PathBuf, Chart)> {
    let (per, rate_key) = match workload {
        "net" => ("frame", "packets_per_device_core_s"),
        _ => ("request", "requests_per_device_core_s"),
    };
    let mut out = Vec::new();

    let mut c = chart_of(points, |p| {
        p[rate_key].as_f64().map(|v| Bar {
            solid: v,
            pale: None,
        })
    });
    c.title = format!("{workload}: {per}s per device core-second, by model and load");
    c.y_label = format!("{per}s / device core-s");
    out.push((chart::path_beside(json, "throughput"), c));

    let mut c = chart_of(points, |p| {
        device_cpu(p).map(|(side, total)| Bar {
            solid: side,
            pale: Some(total),
        })
    });
    c.title = format!("{workload}: device CPU per {per}, by model and load");
    c.y_label = format!("CPU us / {per} (log)");
    c.log_y = true;
    c.note = "solid: sidecores or vhost-style workers; pale: + VM-host agents and fabric \
              threads + I/O-server fabric threads (remote models); guests left out"
        .into();
    out.push((chart::path_beside(json, "cpu"), c));

    if points.iter().any(|p| p["p50_us"].is_number()) {
        let mut c = chart_of(points, |p| {
            Some(Bar {
                solid: p["p50_us"].as_f64()?,
                pale: p["p99_us"].as_f64(),
            })
        });
        c.title = format!("{workload}: latency percentiles, by model and load");
        c.y_label = "us (log)".into();
        c.log_y = true;
        c.note = "solid: p50; pale: p99".into();
        out.push((chart::path_beside(json, "latency"), c));
    }
    out
}

/// Writes the charts of a run beside `json`, printing each file written.
/// Every chart is tried; the error names those that failed.
pub fn write(json: &Path, workload: &str, points: &[Value]) -> Result<(), String> {
    let mut failed = Vec::new();
    for (path, c) in charts(json, workload, points) {
        match chart::render(&path, &c) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => failed.push(e),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A tiny fake blk report: two models at two load points.
    fn fake_blk() -> Vec<Value> {
        let mut points = Vec::new();
        for (g, d) in [(1, 1), (4, 32)] {
            for (model, remote) in [("vhost-style", false), ("remote doorbell x1 (soft)", true)] {
                let r = |v: f64| if remote { json!(v) } else { Value::Null };
                points.push(json!({
                    "model": model,
                    "guests": g,
                    "depth": d,
                    "requests_per_device_core_s": 1e5 * f64::from(g),
                    "p50_us": 10.0 * f64::from(d),
                    "p99_us": 40.0 * f64::from(d),
                    "cpu_us_per_request": {
                        "sidecore": 2.0,
                        "vmhost": 2.0,
                        "vmhost_agent": r(0.5),
                        "vmhost_fabric": r(0.3),
                        "server_fabric": r(0.2),
                        "guests": 1.0,
                    },
                }));
            }
        }
        points
    }

    /// The text of every `<text>` element of the SVG at `path`, which must
    /// parse as XML with an `<svg>` root.
    fn svg_texts(path: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        assert!(doc.descendants().any(|n| n.has_tag_name("rect")));
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(|t| t.trim().to_string())
            .collect()
    }

    #[test]
    fn blk_charts_are_svg_naming_every_model_and_load() {
        let dir = std::env::temp_dir().join(format!("vrio-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("out.json");
        write(&json, "blk", &fake_blk()).unwrap();
        for what in ["throughput", "cpu", "latency"] {
            let path = dir.join(format!("out-{what}.svg"));
            let texts = svg_texts(&path);
            for want in [
                "vhost-style",
                "remote doorbell x1 (soft)",
                "1 guest, QD1",
                "4 guests, QD32",
            ] {
                assert!(
                    texts.iter().any(|t| t == want),
                    "{what}: {want} not in {texts:?}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn net_has_no_latency_chart_and_groups_by_frame_size() {
        let points = vec![json!({
            "model": "local sidecore x1",
            "frame_bytes": 64,
            "packets_per_device_core_s": 2e6,
            "cpu_us_per_request": {"sidecore": 0.4, "guests": 0.2},
        })];
        let cs = charts(Path::new("/x/net.json"), "net", &points);
        let paths: Vec<_> = cs.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(
            paths,
            [
                PathBuf::from("/x/net-throughput.svg"),
                PathBuf::from("/x/net-cpu.svg")
            ]
        );
        assert_eq!(cs[0].1.groups, ["64 B frames"]);
        let cpu = cs[1].1.series[0].bars[0].unwrap();
        assert_eq!((cpu.solid, cpu.pale), (0.4, Some(0.4)));
    }

    #[test]
    fn a_chart_that_cannot_be_written_is_named() {
        let json = Path::new("/nonexistent-vrio-bench-dir/out.json");
        let e = write(json, "blk", &fake_blk()).unwrap_err();
        for what in ["throughput", "cpu", "latency"] {
            assert!(e.contains(&format!("out-{what}.svg")), "{e}");
        }
    }
}
