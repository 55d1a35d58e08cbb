//! The benchmark runs briefly and writes JSON with every row (no timing
//! assertions: figures on a shared machine are not test material).

use std::process::Command;

#[test]
fn bench_writes_json_with_all_rows() {
    let path = std::env::temp_dir().join(format!("vrio-bench-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_vrio-fabric-bench"))
        .args(["--seconds", "0.3", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("soft/tcp"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
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
    for r in rows {
        for side in ["soft", "tcp"] {
            assert!(r[side]["ops"].as_u64().unwrap() > 0, "{r}");
            assert!(r[side]["ops_per_sec"].as_f64().unwrap() > 0.0, "{r}");
            assert!(
                r[side]["p99_us"].as_f64().unwrap() >= r[side]["p50_us"].as_f64().unwrap(),
                "{r}"
            );
        }
        assert!(r["ratio"].as_f64().unwrap() > 0.0, "{r}");
    }
}
