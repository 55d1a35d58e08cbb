//! The benchmark runs briefly and writes JSON with every row, each with
//! every fabric and TCP, and the target's CPU per operation (no timing
//! assertions: figures on a shared machine are not test material).

use std::process::Command;

#[test]
fn bench_writes_json_with_all_rows() {
    let path = std::env::temp_dir().join(format!("vrio-bench-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_vrio-fabric-bench"))
        .args(["--seconds", "0.3", "--fabric", "soft,shm", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("tgt CPU us/op"), "{stdout}");
    assert!(stdout.contains("x tcp"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    // The chart beside the JSON.
    let chart = path.with_file_name(format!("vrio-bench-{}-ops.svg", std::process::id()));
    let svg = std::fs::read_to_string(&chart).unwrap_or_default();
    let _ = std::fs::remove_file(&chart);
    assert!(svg.contains("<svg"), "no chart at {}", chart.display());
    let rows = v["rows"].as_array().unwrap();
    let mut seen: Vec<(String, u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["op"].as_str().unwrap().to_string(),
                r["size"].as_u64().unwrap(),
                r["depth"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    let mut want = Vec::new();
    for op in ["READ", "WRITE"] {
        for size in [64, 4096] {
            for depth in [1, 32] {
                want.push((op.to_string(), size, depth));
            }
        }
    }
    assert_eq!(seen, want);
    assert_eq!(v["fabrics"], serde_json::json!(["soft", "shm"]));
    for r in rows {
        let sides = [&r["soft"], &r["tcp"], &r["fabrics"]["soft"]];
        for m in sides {
            assert!(m["ops"].as_u64().unwrap() > 0, "{r}");
            assert!(m["ops_per_sec"].as_f64().unwrap() > 0.0, "{r}");
            assert!(
                m["p99_us"].as_f64().unwrap() >= m["p50_us"].as_f64().unwrap(),
                "{r}"
            );
            // Both targets run threads of their own (the soft "NIC", the
            // TCP echo server), so both spent some CPU.
            assert!(m["target_cpu_us_per_op"].as_f64().unwrap() > 0.0, "{r}");
        }
        // shm runs no thread of its own: READ and WRITE are the
        // initiator's copies, so its target spends (next to) nothing.
        let shm = &r["fabrics"]["shm"];
        assert!(shm["ops"].as_u64().unwrap() > 0, "{r}");
        assert!(shm["target_cpu_us_per_op"].as_f64().unwrap() <= 0.05, "{r}");
        assert!(r["ratio"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["ratio"], r["fabrics"]["soft"]["ratio_vs_tcp"], "{r}");
    }
}

#[test]
fn an_unknown_fabric_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_vrio-fabric-bench"))
        .args(["--seconds", "0.1", "--fabric", "soft,carrier-pigeon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("carrier-pigeon"), "{stderr}");
}
