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

use super::crypt::XtsStage;
use super::fault::FaultStage;
use super::meter::Meter;
use super::net::{AclStage, NetRateStage};
use super::params::{
    CryptSpec, FaultSpec, MeterSpec, NetAclSpec, NetRateSpec, QosSpec, Secret, REDACTED,
};
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

    /// Checks every stage and builds them, in chain order, for `device`
    /// (`PolicySpec::build` puts them in a pipeline).
    pub fn stages(&self, device: u64) -> Result<Vec<Box<dyn Stage>>, PolicyError> {
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
        tracing::debug!(device, stages = %self.summary(), "built interposition stages");
        Ok(stages)
    }
}
