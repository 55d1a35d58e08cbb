//! Capabilities: what lets a VM host attach a device's queue to an I/O
//! server. The controller (or an operator, with `vrio-ctl credential mint`)
//! signs one per device with a key it shares with the servers; a server
//! checks it without trusting the peer that presents it.
//!
//! The text form is `vrio-cap-v1.<key id>.<payload>.<tag>`: the payload is
//! base64url (no padding) of `key=value` lines (`device`, `volume`, `mode`,
//! `host`, `expires`), and the tag is base64url of HMAC-SHA256 over
//! everything before the last dot. Text, so it passes through command lines,
//! environment variables and gRPC unchanged.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

const PREFIX: &str = "vrio-cap-v1";
pub use crate::proto::wire::MAX_CREDENTIAL;
/// Key bytes of a generated key (HMAC-SHA256's block-size-safe minimum is 32).
const KEY_BYTES: usize = 32;

/// How a device may use a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessMode {
    /// Reads and writes; no other device may write the volume meanwhile.
    ReadWrite,
    /// Reads only: the device is offered `VIRTIO_BLK_F_RO` and the server
    /// refuses its writes.
    ReadOnly,
    /// Reads and writes alongside other shared writers (a cluster file
    /// system's disk); excludes exclusive writers.
    Shared,
}

impl AccessMode {
    /// `rw`, `ro` or `shared`: the name in capabilities and command lines.
    pub fn name(self) -> &'static str {
        match self {
            AccessMode::ReadWrite => "rw",
            AccessMode::ReadOnly => "ro",
            AccessMode::Shared => "shared",
        }
    }
    /// Whether the mode writes.
    pub fn writes(self) -> bool {
        self != AccessMode::ReadOnly
    }
}

impl std::fmt::Display for AccessMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AccessMode {
    type Err = CredentialError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rw" | "read-write" => Ok(AccessMode::ReadWrite),
            "ro" | "read-only" => Ok(AccessMode::ReadOnly),
            "shared" => Ok(AccessMode::Shared),
            _ => Err(CredentialError::Field("mode (rw, ro or shared)")),
        }
    }
}

/// What a capability grants: `device` may attach its queues for `volume` in
/// `mode`, from `host`, until `expires`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// The device's id on the wire (`remote::device_key` of its name).
    pub device: u64,
    /// The volume its blk queues serve (ignored for net devices).
    pub volume: String,
    /// How it may use the volume.
    pub mode: AccessMode,
    /// The VM host it may attach from: an IP address the server compares
    /// with the connection's source, `local` for Unix-socket fabrics, or
    /// empty for any.
    pub host: String,
    /// Unix time (seconds) after which it is refused.
    pub expires: u64,
}

/// Why a capability or a key file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Not `vrio-cap-v1.<key>.<payload>.<tag>`, or longer than allowed.
    #[error("malformed credential: {0}")]
    Malformed(&'static str),
    /// A payload field is missing or invalid (named).
    #[error("credential field {0} is missing or invalid")]
    Field(&'static str),
    /// Signed with a key this server does not have.
    #[error("credential signed with unknown key {0:?}")]
    UnknownKey(String),
    /// The tag does not match: forged or altered.
    #[error("credential signature does not verify (forged or altered)")]
    BadSignature,
    /// Past its expiry.
    #[error("credential expired {0} s ago")]
    Expired(u64),
    /// Valid, but for another device than the ATTACH names.
    #[error("credential is for device {granted:#x}, not {asked:#x}")]
    WrongDevice {
        /// The device the capability names.
        granted: u64,
        /// The device the ATTACH named.
        asked: u64,
    },
    /// Valid, but for another VM host than the connection comes from.
    #[error("credential is for host {granted:?}, the connection comes from {peer:?}")]
    WrongHost {
        /// The host the capability names.
        granted: String,
        /// The connection's peer.
        peer: String,
    },
    /// A key file could not be read or parsed (what and where).
    #[error("key file: {0}")]
    KeyFile(String),
}

/// A volume name: 1 to 64 of `[A-Za-z0-9._-]`, not starting with a dot, so
/// it is also a safe file name.
pub fn valid_volume_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn valid_host(s: &str) -> bool {
    s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:-_[]%".contains(&b))
}

impl Capability {
    fn payload(&self) -> String {
        format!(
            "device={:#x}\nvolume={}\nmode={}\nhost={}\nexpires={}\n",
            self.device, self.volume, self.mode, self.host, self.expires
        )
    }

    fn parse_payload(text: &str) -> Result<Self, CredentialError> {
        let (mut device, mut volume, mut mode, mut host, mut expires) =
            (None, None, None, None, None);
        for line in text.lines() {
            let (k, v) = line
                .split_once('=')
                .ok_or(CredentialError::Malformed("payload line without '='"))?;
            let slot_taken = match k {
                "device" => {
                    let h = v
                        .strip_prefix("0x")
                        .ok_or(CredentialError::Field("device"))?;
                    let d =
                        u64::from_str_radix(h, 16).map_err(|_| CredentialError::Field("device"))?;
                    device.replace(d).is_some()
                }
                "volume" => volume.replace(v.to_string()).is_some(),
                "mode" => mode.replace(v.parse::<AccessMode>()?).is_some(),
                "host" => host.replace(v.to_string()).is_some(),
                "expires" => {
                    let e = v.parse().map_err(|_| CredentialError::Field("expires"))?;
                    expires.replace(e).is_some()
                }
                _ => return Err(CredentialError::Malformed("unknown payload field")),
            };
            if slot_taken {
                return Err(CredentialError::Malformed("repeated payload field"));
            }
        }
        let cap = Capability {
            device: device.ok_or(CredentialError::Field("device"))?,
            volume: volume.ok_or(CredentialError::Field("volume"))?,
            mode: mode.ok_or(CredentialError::Field("mode"))?,
            host: host.ok_or(CredentialError::Field("host"))?,
            expires: expires.ok_or(CredentialError::Field("expires"))?,
        };
        cap.check_fields()?;
        Ok(cap)
    }

    fn check_fields(&self) -> Result<(), CredentialError> {
        if !valid_volume_name(&self.volume) {
            return Err(CredentialError::Field("volume"));
        }
        if !valid_host(&self.host) {
            return Err(CredentialError::Field("host"));
        }
        Ok(())
    }

    /// Whether a connection from `peer` (an endpoint's peer description:
    /// `tcp:IP:PORT`, `unix:PATH`, `shm:pid N`, or a verbs `IP:PORT`) may use
    /// it.
    pub fn check_host(&self, peer: &str) -> Result<(), CredentialError> {
        if self.host.is_empty() || self.host == peer_host(peer) {
            return Ok(());
        }
        Err(CredentialError::WrongHost {
            granted: self.host.clone(),
            peer: peer.to_string(),
        })
    }
}

/// The host part of an endpoint's peer description (`local` for Unix
/// sockets): what per-peer limits and capabilities' `host` are keyed by.
pub fn peer_host(peer: &str) -> &str {
    // Unix-socket fabrics: soft over `unix:PATH`, and shm (`shm:pid N`).
    if peer.starts_with("unix:") || peer.starts_with("shm:") || peer.starts_with('/') {
        return "local";
    }
    let p = peer.strip_prefix("tcp:").unwrap_or(peer);
    let p = p.rsplit_once(':').map_or(p, |(h, _)| h);
    p.trim_start_matches('[').trim_end_matches(']')
}

fn unix_now(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Signing keys by id. Servers verify with any key they hold (so keys can
/// be rotated); the first one signs.
pub struct Keyring {
    keys: Vec<(String, hmac::Key)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<_> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

fn valid_key_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Keyring {
    /// A key file's text with one new random key named `id`: lines of
    /// `<id> <base64url key>`; `#` starts a comment.
    pub fn generate_file_text(id: &str) -> Result<String, CredentialError> {
        if !valid_key_id(id) {
            return Err(CredentialError::KeyFile(format!(
                "key id {id:?}: 1 to 32 of [A-Za-z0-9_-]"
            )));
        }
        let mut k = [0u8; KEY_BYTES];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| CredentialError::KeyFile("no randomness for a new key".into()))?;
        Ok(format!(
            "# vrio data-plane key: whoever holds it can mint attach credentials.\n{id} {}\n",
            URL_SAFE_NO_PAD.encode(k)
        ))
    }

    /// A keyring of one fresh random key, for a process that mints and
    /// checks its own credentials (the demo).
    pub fn ephemeral() -> Result<Self, CredentialError> {
        Self::parse(&Self::generate_file_text("ephemeral")?)
    }

    /// Parses a key file's text (see [`Keyring::generate_file_text`]).
    pub fn parse(text: &str) -> Result<Self, CredentialError> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| CredentialError::KeyFile(format!("line {}: {why}", n + 1));
            let (id, key) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad("expected `<key id> <base64url key>`"))?;
            if !valid_key_id(id) {
                return Err(bad("key id: 1 to 32 of [A-Za-z0-9_-]"));
            }
            let bytes = URL_SAFE_NO_PAD
                .decode(key.trim())
                .map_err(|_| bad("key is not base64url without padding"))?;
            if bytes.len() < KEY_BYTES {
                return Err(bad("key shorter than 32 bytes"));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(bad("key id repeated"));
            }
            keys.push((id.to_string(), hmac::Key::new(hmac::HMAC_SHA256, &bytes)));
        }
        if keys.is_empty() {
            return Err(CredentialError::KeyFile("no key in it".into()));
        }
        Ok(Self { keys })
    }

    /// Reads a key file.
    pub fn from_file(path: &Path) -> Result<Self, CredentialError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CredentialError::KeyFile(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| match e {
            CredentialError::KeyFile(w) => {
                CredentialError::KeyFile(format!("{}: {w}", path.display()))
            }
            e => e,
        })
    }

    /// Signs `cap` with the first key: its text form.
    pub fn sign(&self, cap: &Capability) -> Result<String, CredentialError> {
        cap.check_fields()?;
        let (id, key) = &self.keys[0];
        let head = format!("{PREFIX}.{id}.{}", URL_SAFE_NO_PAD.encode(cap.payload()));
        let tag = hmac::sign(key, head.as_bytes());
        let token = format!("{head}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
        if token.len() > MAX_CREDENTIAL {
            return Err(CredentialError::Malformed("longer than 1024 bytes"));
        }
        Ok(token)
    }

    /// A capability for `device` valid for `ttl` from now, signed.
    pub fn mint(
        &self,
        device: u64,
        volume: &str,
        mode: AccessMode,
        host: &str,
        ttl: Duration,
    ) -> Result<String, CredentialError> {
        self.sign(&Capability {
            device,
            volume: volume.to_string(),
            mode,
            host: host.to_string(),
            expires: unix_now(SystemTime::now()).saturating_add(ttl.as_secs()),
        })
    }

    /// Checks `token`'s signature and expiry at `now`; the capability it
    /// grants. The tag is compared in constant time.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Capability, CredentialError> {
        if token.len() > MAX_CREDENTIAL {
            return Err(CredentialError::Malformed("longer than 1024 bytes"));
        }
        let (head, tag) = token
            .rsplit_once('.')
            .ok_or(CredentialError::Malformed("no signature"))?;
        let mut parts = head.split('.');
        let (Some(prefix), Some(id), Some(payload), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CredentialError::Malformed(
                "expected vrio-cap-v1.<key>.<payload>.<tag>",
            ));
        };
        if prefix != PREFIX {
            return Err(CredentialError::Malformed("not a vrio-cap-v1 credential"));
        }
        let key = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, k)| k)
            .ok_or_else(|| CredentialError::UnknownKey(id.chars().take(32).collect()))?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| CredentialError::Malformed("signature is not base64url"))?;
        hmac::verify(key, head.as_bytes(), &tag).map_err(|_| CredentialError::BadSignature)?;
        // Only signed bytes are parsed from here on.
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| CredentialError::Malformed("payload is not base64url"))?;
        let text = String::from_utf8(payload)
            .map_err(|_| CredentialError::Malformed("payload is not UTF-8"))?;
        let cap = Capability::parse_payload(&text)?;
        let now = unix_now(now);
        if now > cap.expires {
            return Err(CredentialError::Expired(now - cap.expires));
        }
        Ok(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capability {
        Capability {
            device: 0xfeed,
            volume: "vol-a".into(),
            mode: AccessMode::ReadWrite,
            host: "127.0.0.1".into(),
            expires: unix_now(SystemTime::now()) + 60,
        }
    }

    #[test]
    fn a_signed_capability_verifies_and_says_what_it_grants() {
        let k = Keyring::ephemeral().unwrap();
        let t = k.sign(&cap()).unwrap();
        assert!(t.starts_with("vrio-cap-v1.ephemeral."), "{t}");
        assert_eq!(k.verify(&t, SystemTime::now()).unwrap(), cap());
    }

    #[test]
    fn forged_altered_expired_and_foreign_capabilities_are_refused() {
        let k = Keyring::ephemeral().unwrap();
        let t = k.sign(&cap()).unwrap();
        // Another key with the same id: a forgery.
        let other = Keyring::ephemeral().unwrap();
        assert_eq!(
            other.verify(&t, SystemTime::now()),
            Err(CredentialError::BadSignature)
        );
        // A payload swapped for one granting another volume.
        let mut evil = cap();
        evil.volume = "vol-b".into();
        let forged = other.sign(&evil).unwrap();
        let (fhead, _) = forged.rsplit_once('.').unwrap();
        let (_, tag) = t.rsplit_once('.').unwrap();
        let spliced = format!("{fhead}.{tag}");
        assert_eq!(
            k.verify(&spliced, SystemTime::now()),
            Err(CredentialError::BadSignature)
        );
        // Expired.
        let later = SystemTime::now() + Duration::from_secs(120);
        assert!(matches!(
            k.verify(&t, later),
            Err(CredentialError::Expired(_))
        ));
        // Unknown key id.
        let foreign = Keyring::parse(&Keyring::generate_file_text("k2").unwrap()).unwrap();
        let t2 = foreign.sign(&cap()).unwrap();
        assert!(matches!(
            k.verify(&t2, SystemTime::now()),
            Err(CredentialError::UnknownKey(_))
        ));
        for junk in [
            "",
            "x",
            "vrio-cap-v1",
            "a.b.c.d",
            "vrio-cap-v1.ephemeral.!!.??",
        ] {
            assert!(k.verify(junk, SystemTime::now()).is_err(), "{junk}");
        }
        assert!(matches!(
            k.verify(&"a".repeat(5000), SystemTime::now()),
            Err(CredentialError::Malformed(_))
        ));
    }

    #[test]
    fn hosts_are_matched_against_the_connections_source() {
        let c = cap();
        assert!(c.check_host("tcp:127.0.0.1:5555").is_ok());
        assert!(c.check_host("127.0.0.1:4791").is_ok());
        assert!(c.check_host("tcp:10.0.0.2:5555").is_err());
        assert!(c.check_host("unix:/run/x").is_err());
        let local = Capability {
            host: "local".into(),
            ..cap()
        };
        assert!(local.check_host("unix:/run/x").is_ok());
        assert!(local.check_host("shm:pid 4242").is_ok());
        assert!(local.check_host("tcp:127.0.0.1:1").is_err());
        let any = Capability {
            host: String::new(),
            ..cap()
        };
        assert!(any.check_host("tcp:10.0.0.2:1").is_ok());
    }

    #[test]
    fn key_files_and_names_are_checked() {
        assert!(Keyring::parse("").is_err());
        assert!(Keyring::parse("k1 c2hvcnQ").is_err());
        assert!(Keyring::generate_file_text("bad id").is_err());
        let text = Keyring::generate_file_text("k1").unwrap();
        let twice = format!("{text}{text}");
        assert!(Keyring::parse(&twice).is_err());
        assert!(valid_volume_name("db-01.img"));
        for bad in ["", ".hidden", "a/b", "../x", &"v".repeat(65)] {
            assert!(!valid_volume_name(bad), "{bad}");
        }
        let mut c = cap();
        c.volume = "../etc".into();
        assert!(Keyring::ephemeral().unwrap().sign(&c).is_err());
    }
}
