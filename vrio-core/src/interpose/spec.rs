//! Policies as text: the JSON a controller stores and `vrio-ctl policy set`
//! takes, checked and built into a [`Pipeline`].
//!
//! ```json
//! {"stages": [
//!   {"stage": "meter"},
//!   {"stage": "qos", "rw_ios_per_sec": 2000, "w_mbytes_per_sec": 50},
//!   {"stage": "crypt", "key": "<128 hex digits>"}
//! ]}
//! ```

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::crypt::XtsStage;
use super::fault::FaultStage;
use super::meter::Meter;
use super::net::{AclStage, NetRateStage};
use super::pipeline::Pipeline;
use super::qos::QosStage;
use super::stage::Stage;

/// A policy that cannot be applied; the device keeps its old one.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not JSON, or not a policy: an unknown stage or field, a wrong type.
    #[error("bad policy: {0}")]
    Parse(String),
    /// A stage's parameters do not make sense.
    #[error("stage {index} ({stage}): {reason}")]
    Stage {
        /// The stage's position in the chain, from 0.
        index: usize,
        /// Its kind.
        stage: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// A device's policy: its stages in chain order. No stages: nothing is
/// interposed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// The chain, in the order requests pass it.
    #[serde(default)]
    pub stages: Vec<StageSpec>,
}

/// One stage of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum StageSpec {
    /// Per-device limits (blk), as SPDK's `bdev_set_qos_limit`.
    Qos(QosSpec),
    /// AES-XTS encryption at rest (blk).
    Crypt(CryptSpec),
    /// Ops, bytes and latency (blk and net).
    Meter(MeterSpec),
    /// Errors or delays on a sector range (blk), for tests.
    Fault(FaultSpec),
    /// Source MAC and IPv4 filter on frames a guest sends (net).
    NetAcl(NetAclSpec),
    /// Rate limit on frames a guest sends (net).
    NetRate(NetRateSpec),
}

impl StageSpec {
    /// The stage's kind, as in the JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            StageSpec::Qos(_) => "qos",
            StageSpec::Crypt(_) => "crypt",
            StageSpec::Meter(_) => "meter",
            StageSpec::Fault(_) => "fault",
            StageSpec::NetAcl(_) => "net_acl",
            StageSpec::NetRate(_) => "net_rate",
        }
    }
}

fn default_burst_ms() -> u64 {
    100
}

/// QoS limits; 0 means unlimited, as in SPDK. A device may run ahead of
/// its limits by `burst_ms` worth of them after idling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosSpec {
    /// Requests per second, reads and writes together.
    #[serde(default)]
    pub rw_ios_per_sec: u64,
    /// MiB per second, reads and writes together.
    #[serde(default)]
    pub rw_mbytes_per_sec: u64,
    /// MiB per second of reads.
    #[serde(default)]
    pub r_mbytes_per_sec: u64,
    /// MiB per second of writes.
    #[serde(default)]
    pub w_mbytes_per_sec: u64,
    /// The burst, in milliseconds of each limit.
    #[serde(default = "default_burst_ms")]
    pub burst_ms: u64,
}

/// A secret that is never printed and is zeroised when dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: String) -> Self {
        Self(s)
    }
    /// The secret itself; callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// What a redacted key reads as in `vrio-ctl policy show`.
pub const REDACTED: &str = "redacted";

fn default_cipher() -> String {
    "aes_xts_256".into()
}

/// Encryption at rest. The key is 64 bytes (two AES-256 keys, which must
/// differ) as 128 hex digits; the 512-byte sector number is the tweak.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptSpec {
    /// Only `aes_xts_256`.
    #[serde(default = "default_cipher")]
    pub cipher: String,
    /// The key, hex.
    pub key: Secret,
}

/// Metering takes no parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterSpec {}

/// Faults on requests that touch sectors `first_sector ..
/// first_sector + sectors`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// First sector of the range.
    pub first_sector: u64,
    /// Sectors in the range (at least 1).
    pub sectors: u64,
    /// Ops it applies to (`read`, `write`, `flush`, `discard`,
    /// `write_zeroes`); empty: all.
    #[serde(default)]
    pub ops: Vec<String>,
    /// Fail the request: `ioerr` or `unsupp`; absent: do not fail.
    #[serde(default)]
    pub error: Option<String>,
    /// Hold the request this long first.
    #[serde(default)]
    pub delay_ms: u64,
}

/// Which sources may send. An empty list allows any value of that field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetAclSpec {
    /// Allowed source MACs (`52:54:00:12:34:56`).
    #[serde(default)]
    pub allow_macs: Vec<String>,
    /// Allowed IPv4 source networks (`10.0.0.0/24`, or one address).
    /// Frames that are neither IPv4 nor ARP are not checked against it.
    #[serde(default)]
    pub allow_ipv4: Vec<String>,
}

/// A rate limit on what a guest sends; 0 means unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRateSpec {
    /// Megabits (10^6 bits) per second of frames.
    #[serde(default)]
    pub mbits_per_sec: u64,
    /// Frames per second.
    #[serde(default)]
    pub frames_per_sec: u64,
    /// The burst, in milliseconds of each limit.
    #[serde(default = "default_burst_ms")]
    pub burst_ms: u64,
}

impl PolicySpec {
    /// Parses the JSON form.
    pub fn parse(json: &str) -> Result<Self, PolicyError> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_str(json).map_err(|e| PolicyError::Parse(e.to_string()))
    }

    /// The JSON form, keys included: for the controller's state and the
    /// servers, never for logs.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The same policy with every key replaced by [`REDACTED`]: what may be
    /// shown.
    pub fn redacted(&self) -> Self {
        let mut s = self.clone();
        for st in &mut s.stages {
            if let StageSpec::Crypt(c) = st {
                c.key = Secret::new(REDACTED.into());
            }
        }
        s
    }

    /// The stage kinds in order (`meter,qos`), for logs.
    pub fn summary(&self) -> String {
        let v: Vec<_> = self.stages.iter().map(|s| s.kind()).collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(",")
        }
    }

    /// Checks every stage and builds the pipeline for `device`.
    pub fn build(&self, device: u64) -> Result<Pipeline, PolicyError> {
        let mut stages: Vec<Box<dyn Stage>> = Vec::with_capacity(self.stages.len());
        for (index, s) in self.stages.iter().enumerate() {
            let bad = |reason: String| PolicyError::Stage {
                index,
                stage: s.kind(),
                reason,
            };
            let st: Box<dyn Stage> = match s {
                StageSpec::Qos(q) => Box::new(QosStage::new(q).map_err(bad)?),
                StageSpec::Crypt(c) => Box::new(XtsStage::from_spec(c).map_err(bad)?),
                StageSpec::Meter(_) => Box::new(Meter::new()),
                StageSpec::Fault(f) => Box::new(FaultStage::new(f).map_err(bad)?),
                StageSpec::NetAcl(a) => Box::new(AclStage::new(a).map_err(bad)?),
                StageSpec::NetRate(r) => Box::new(NetRateStage::new(r).map_err(bad)?),
            };
            stages.push(st);
        }
        tracing::debug!(device, stages = %self.summary(), "built interposition pipeline");
        Ok(Pipeline::new(self.clone(), stages))
    }
}

impl Default for QosSpec {
    fn default() -> Self {
        Self {
            rw_ios_per_sec: 0,
            rw_mbytes_per_sec: 0,
            r_mbytes_per_sec: 0,
            w_mbytes_per_sec: 0,
            burst_ms: default_burst_ms(),
        }
    }
}

impl Default for NetRateSpec {
    fn default() -> Self {
        Self {
            mbits_per_sec: 0,
            frames_per_sec: 0,
            burst_ms: default_burst_ms(),
        }
    }
}
