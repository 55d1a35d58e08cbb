//! CPU per request by role, for every model, from per-thread CPU clocks
//! (never wall time or the process's CPU): the sidecores or workers, the VM
//! host, the I/O server's fabric threads and the synthetic guests.

use vrio_core::remote::RemoteSnapshot;
use vrio_examples::print_table;
use vrio_testkit::runner::RunCost;

/// What the remote roles cost, in ns.
#[derive(Debug, Clone, Copy)]
pub struct RemoteCpu {
    /// The VM host's agent threads.
    pub agent: u64,
    /// The VM host's fabric threads (its domains' `fabric_cpu_ns`).
    pub vmhost_fabric: u64,
    /// The I/O server's fabric threads.
    pub server_fabric: u64,
}

/// CPU time of one run by role, in ns.
#[derive(Debug, Clone, Copy)]
pub struct RoleCpu {
    /// The sidecores, or the vhost-style workers.
    pub sidecore: u64,
    /// The synthetic guests' driver threads.
    pub guests: u64,
    /// The remote roles; None for a local model.
    pub remote: Option<RemoteCpu>,
}

/// Short table headers of [`RoleCpu::cells`].
const HEADERS: [&str; 4] = ["side us", "host us", "srv fab us", "guest us"];

/// What [`HEADERS`] mean, printed above the table; `per` is the unit
/// ("request", "frame").
fn legend(per: &str) -> String {
    format!(
        "CPU us per {per} by role, from thread clocks: side = sidecores or workers; \
         host = the VM host (local: the device work; remote: agents + its fabric threads); \
         srv fab = the I/O server's fabric threads; guest = the guests' driver threads"
    )
}

impl RoleCpu {
    /// A run's roles: `remote` for a remote model, None for a local one.
    pub fn new(cost: &RunCost, remote: Option<RemoteCpu>) -> Self {
        Self {
            sidecore: cost.device_cpu_ns,
            guests: cost.guest_cpu_ns,
            remote,
        }
    }

    /// What the VM host spends: all of the device work for a local model,
    /// the agents and its fabric threads for a remote one.
    pub fn vmhost(&self) -> u64 {
        self.remote
            .map_or(self.sidecore, |r| r.agent + r.vmhost_fabric)
    }

    /// The table cells under [`HEADERS`], per `n` requests.
    pub fn cells(&self, n: u64) -> Vec<String> {
        let us = |ns: u64| format!("{:.2}", per_us(ns, n));
        vec![
            us(self.sidecore),
            us(self.vmhost()),
            self.remote.map_or("-".into(), |r| us(r.server_fabric)),
            us(self.guests),
        ]
    }

    /// `{"cpu_us_per_request": {role: us}, "cpu_s_by_role": {role: s}}`
    /// per `n` requests; remote-only roles are null for local models.
    pub fn json(&self, n: u64) -> serde_json::Value {
        let roles = |f: &dyn Fn(u64) -> f64| {
            let remote = |g: fn(&RemoteCpu) -> u64| self.remote.as_ref().map(|r| f(g(r)));
            serde_json::json!({
                "sidecore": f(self.sidecore),
                "vmhost": f(self.vmhost()),
                "vmhost_agent": remote(|r| r.agent),
                "vmhost_fabric": remote(|r| r.vmhost_fabric),
                "server_fabric": remote(|r| r.server_fabric),
                "guests": f(self.guests),
            })
        };
        serde_json::json!({
            "cpu_us_per_request": roles(&|ns| per_us(ns, n)),
            "cpu_s_by_role": roles(&|ns| ns as f64 / 1e9),
        })
    }
}

/// `ns` per `n`, in microseconds.
fn per_us(ns: u64, n: u64) -> f64 {
    ns as f64 / 1e3 / n.max(1) as f64
}

/// The cells every table row ends with: CPU per request by role
/// ([`HEADERS`]), then fabric operations and round trips per request
/// (remote models; `-` for local ones).
pub fn tail_cells(roles: &RoleCpu, n: u64, fabric: Option<&RemoteSnapshot>) -> Vec<String> {
    let mut cells = roles.cells(n);
    let fmt = |f: fn(&RemoteSnapshot) -> f64| fabric.map_or("-".into(), |s| format!("{:.2}", f(s)));
    cells.push(fmt(RemoteSnapshot::ops_per_request));
    cells.push(fmt(RemoteSnapshot::rtts_per_request));
    cells
}

/// Prints the legend of the role columns (`per`: what a request is), then
/// the table: the `leading` headers, then those of [`tail_cells`].
pub fn print_rows(per: &str, leading: &[&str], rows: &[Vec<String>]) {
    println!("{}", legend(per));
    let mut headers = leading.to_vec();
    headers.extend(HEADERS);
    headers.extend(["fabric ops/req", "RTT/req"]);
    print_table(&headers, rows);
}

/// Adds every field of the object `extra` to the object `j`.
pub fn merge(j: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(e)) = (j.as_object_mut(), extra) {
        o.extend(e);
    }
}
