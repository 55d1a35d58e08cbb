//! Each built-in stage's parameters, as policies spell them in JSON.

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

pub(crate) fn default_burst_ms() -> u64 {
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
