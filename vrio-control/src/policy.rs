//! Device interposition policies at the controller: checking the JSON an
//! operator sends (`vrio-ctl policy set`), showing it without its keys,
//! and the stage reports I/O servers send, in and out of protobuf.
//!
//! A policy is a `vrio_core::interpose::PolicySpec`. The controller keeps
//! one per device name, with its keys (every I/O server needs them to
//! serve the device wherever it moves), in its state store, so policies
//! survive restarts and leader changes. Keys leave the controller only on
//! the `WatchPolicies` stream; every answer and error meant for an
//! operator has them redacted.

use serde::{Deserialize, Serialize};
use vrio_core::interpose::{LatencyHistogram, PolicySpec, StageCounter, StageReport, REDACTED};

use crate::error::ControlError;
use crate::pb;

/// Longest policy JSON the controller accepts, in bytes.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Most stages one policy may have.
pub const MAX_STAGES: usize = 32;

/// Most devices one server's stage report may carry; the rest is dropped.
pub const MAX_REPORTED_DEVICES: usize = 4096;

/// Most stages, counters per stage and histogram buckets kept of one
/// device's report; the rest is dropped.
pub const MAX_REPORTED_ITEMS: usize = 256;

/// One device's policy as the controller stores it (keys included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePolicy {
    /// The device's id at the controller (as in `Device::id`).
    pub device: String,
    /// The change that set it; versions grow with every policy change of
    /// any device.
    pub version: u64,
    /// The policy; never empty (an empty policy is no entry).
    pub spec: PolicySpec,
}

impl DevicePolicy {
    /// The policy JSON with its keys: for the state store and the I/O
    /// servers only.
    pub fn json_with_keys(&self) -> String {
        self.spec.to_json()
    }

    /// The policy JSON with every key replaced by `"redacted"`: what
    /// operators see.
    pub fn json_redacted(&self) -> String {
        self.spec.redacted().to_json()
    }
}

/// What happened to a device's policy, as watchers receive it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyEvent {
    /// The device got this policy.
    Set(DevicePolicy),
    /// The device's policy was cleared at `version`.
    Cleared {
        /// The device's id at the controller.
        device: String,
        /// The change's version.
        version: u64,
    },
}

impl PolicyEvent {
    /// The wire form (keys included: only for `WatchPolicies`).
    pub fn to_pb(&self) -> pb::PolicyEvent {
        match self {
            PolicyEvent::Set(p) => pb::PolicyEvent {
                kind: pb::PolicyEventKind::Set as i32,
                device: p.device.clone(),
                policy_json: p.json_with_keys(),
                version: p.version,
            },
            PolicyEvent::Cleared { device, version } => pb::PolicyEvent {
                kind: pb::PolicyEventKind::Cleared as i32,
                device: device.clone(),
                policy_json: String::new(),
                version: *version,
            },
        }
    }
}

/// Every string under a `key` field of `json`, if it parses: the secrets
/// an error message must not repeat.
fn secrets_in(json: &str) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match v {
                        serde_json::Value::String(s) if k == "key" && !s.is_empty() => {
                            out.push(s.clone())
                        }
                        other => walk(other, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
        walk(&v, &mut out);
    }
    out
}

/// `msg` with every key of `json` replaced by `"redacted"`: parse errors
/// may quote the input.
pub fn scrub(msg: &str, json: &str) -> String {
    let mut out = msg.to_string();
    let mut secrets = secrets_in(json);
    // Longest first, so a key that contains another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in secrets {
        out = out.replace(&s, REDACTED);
    }
    out
}

/// Checks `json` as a policy for `device` (parsed and built, as an I/O
/// server will); returns it. Empty JSON or no stages is the empty policy
/// (clears). Fails with `InvalidArgument` and a message without the keys.
pub fn check(device: &str, json: &str) -> Result<PolicySpec, ControlError> {
    if json.len() > MAX_POLICY_BYTES {
        return Err(ControlError::InvalidArgument(format!(
            "policy of device {device}: {} bytes, at most {MAX_POLICY_BYTES}",
            json.len()
        )));
    }
    let bad = |e: &dyn std::fmt::Display| {
        ControlError::InvalidArgument(format!(
            "policy of device {device}: {}",
            scrub(&e.to_string(), json)
        ))
    };
    let spec = PolicySpec::parse(json).map_err(|e| bad(&e))?;
    if spec.stages.len() > MAX_STAGES {
        return Err(ControlError::InvalidArgument(format!(
            "policy of device {device}: {} stages, at most {MAX_STAGES}",
            spec.stages.len()
        )));
    }
    spec.build(vrio_core::remote::device_key(device))
        .map_err(|e| bad(&e))?;
    Ok(spec)
}

/// A stage report in its wire form.
pub fn report_to_pb(r: &StageReport) -> pb::StageReport {
    pb::StageReport {
        kind: r.kind.clone(),
        counters: r
            .counters
            .iter()
            .map(|c| pb::StageCounter {
                name: c.name.clone(),
                label: c.label.clone(),
                value: c.value,
            })
            .collect(),
        latency: r.latency.as_ref().map(|h| pb::LatencyHistogram {
            bounds: h.bounds.clone(),
            counts: h.counts.clone(),
            sum: h.sum,
        }),
    }
}

/// A wire stage report, cut to [`MAX_REPORTED_ITEMS`] counters and
/// buckets.
pub fn report_from_pb(r: &pb::StageReport) -> StageReport {
    StageReport {
        kind: r.kind.clone(),
        counters: r
            .counters
            .iter()
            .take(MAX_REPORTED_ITEMS)
            .map(|c| StageCounter {
                name: c.name.clone(),
                label: c.label.clone(),
                value: c.value,
            })
            .collect(),
        latency: r.latency.as_ref().map(|h| LatencyHistogram {
            bounds: h.bounds.iter().take(MAX_REPORTED_ITEMS).copied().collect(),
            counts: h
                .counts
                .iter()
                .take(MAX_REPORTED_ITEMS + 1)
                .copied()
                .collect(),
            sum: h.sum,
        }),
    }
}

/// A server's `Policies::reports()` in their wire form, for
/// `ReportLoadRequest::stage_reports`.
pub fn reports_to_pb(reports: &[(u64, Vec<StageReport>)]) -> Vec<pb::DeviceStageReports> {
    reports
        .iter()
        .map(|(key, stages)| pb::DeviceStageReports {
            device_key: *key,
            stages: stages.iter().map(report_to_pb).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                       202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f";

    #[test]
    fn good_policies_pass_and_bad_ones_say_why_without_the_key() {
        let ok = format!(r#"{{"stages":[{{"stage":"meter"}},{{"stage":"crypt","key":"{KEY}"}}]}}"#);
        let spec = check("disk0", &ok).unwrap();
        assert_eq!(spec.summary(), "meter,crypt");
        assert!(check("disk0", "").unwrap().stages.is_empty());
        assert!(check("disk0", r#"{"stages":[]}"#)
            .unwrap()
            .stages
            .is_empty());

        for bad in [
            r#"{"stages":[{"stage":"teleport"}]}"#.to_string(),
            "not json".to_string(),
            format!(
                r#"{{"stages":[{{"stage":"crypt","key":"{}"}}]}}"#,
                &KEY[..100]
            ),
            // Equal halves.
            format!(
                r#"{{"stages":[{{"stage":"crypt","key":"{0}{0}"}}]}}"#,
                &KEY[..64]
            ),
            format!(r#"{{"stages":[{{"stage":"crypt","key":"{KEY}","cipher":"rot13"}}]}}"#),
            format!(r#"{{"stages":[{{"stage":"crypt","key":"{KEY}","extra":"{KEY}"}}]}}"#),
        ] {
            let e = check("disk0", &bad).unwrap_err();
            assert!(matches!(e, ControlError::InvalidArgument(_)), "{e}");
            let text = e.to_string();
            assert!(!text.contains(&KEY[..32]), "{text}");
            assert!(!text.contains(&KEY[64..96]), "{text}");
            assert!(text.contains("disk0"), "{text}");
        }
    }

    #[test]
    fn scrub_replaces_every_key() {
        let json = r#"{"stages":[{"stage":"crypt","key":"abcdef0123"}]}"#;
        assert_eq!(
            scrub("bad key abcdef0123 here", json),
            "bad key redacted here"
        );
        assert_eq!(scrub("nothing", "not json"), "nothing");
    }

    #[test]
    fn redacted_json_hides_the_key() {
        let spec = check(
            "d",
            &format!(r#"{{"stages":[{{"stage":"crypt","key":"{KEY}"}}]}}"#),
        )
        .unwrap();
        let p = DevicePolicy {
            device: "d".into(),
            version: 3,
            spec,
        };
        assert!(p.json_with_keys().contains(KEY));
        assert!(!p.json_redacted().contains(&KEY[..16]));
        assert!(p.json_redacted().contains(REDACTED));
    }

    #[test]
    fn stage_reports_round_trip_through_protobuf() {
        let r = StageReport {
            kind: "meter".into(),
            counters: vec![StageCounter {
                name: "requests".into(),
                label: "read".into(),
                value: 42,
            }],
            latency: Some(LatencyHistogram {
                bounds: vec![1e-5, 1e-3],
                counts: vec![1, 2, 3],
                sum: 0.5,
            }),
        };
        assert_eq!(report_from_pb(&report_to_pb(&r)), r);
        let plain = StageReport {
            kind: "qos".into(),
            ..StageReport::default()
        };
        assert_eq!(report_from_pb(&report_to_pb(&plain)), plain);
        let wire = reports_to_pb(&[(7, vec![r.clone(), plain])]);
        assert_eq!(wire[0].device_key, 7);
        assert_eq!(wire[0].stages.len(), 2);
    }
}
