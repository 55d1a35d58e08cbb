//! Who may attach what on an I/O server: named volumes instead of one
//! shared disk ([`VolumeSet`]), capabilities that say which device may use
//! which volume and how ([`Keyring`], [`Capability`]), and the gate an
//! ATTACH passes before it gets a queue ([`Gate`]). `docs/security.md` has
//! the threat model.

mod credential;
mod volume;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::SystemTime;

pub use credential::{
    peer_host, valid_volume_name, AccessMode, Capability, CredentialError, Keyring, MAX_CREDENTIAL,
};
pub use volume::{image_path, Claim, VolumeError, VolumeSet};
pub use vrio_rdma::WarnLimiter;

use crate::proto::wire::AttachStatus;

/// The volume an open server (no keyring) gives attaches that carry no
/// credential, shared by all of them: the single disk of old.
pub const DEFAULT_VOLUME: &str = "default";

/// Why an ATTACH got no queue, before any queue was built.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The server needs a credential and got none.
    #[error("no credential (this server requires one)")]
    NoCredential,
    /// The credential is forged, expired, unknown or for another party.
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// The volume is missing, busy or badly named.
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl Refusal {
    /// The ATTACH_REPLY status the peer is told.
    pub fn status(&self) -> AttachStatus {
        match self {
            Refusal::NoCredential | Refusal::Credential(_) => AttachStatus::Unauthenticated,
            Refusal::Volume(VolumeError::NoSuchVolume(_)) => AttachStatus::NoSuchVolume,
            Refusal::Volume(_) => AttachStatus::Forbidden,
        }
    }
}

/// Attaches refused so far, by reason.
#[derive(Debug, Default)]
pub struct RefusalCounts {
    /// No, or no valid, credential.
    pub unauthenticated: AtomicU64,
    /// A volume not there, not granted, or written by another device.
    pub forbidden: AtomicU64,
}

/// What a checked ATTACH may do.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The volume its blk queue serves and how.
    pub volume: String,
    /// The mode granted.
    pub mode: AccessMode,
}

/// The check every ATTACH passes: its credential against the keyring (when
/// the server has one), and its volume against the set.
#[derive(Debug)]
pub struct Gate {
    keys: Option<Arc<Keyring>>,
    volumes: Arc<VolumeSet>,
    refused: RefusalCounts,
}

impl Gate {
    /// A gate over `volumes`; with `keys`, every attach needs a credential
    /// signed by one of them; without, attaches are taken on trust and blk
    /// queues get [`DEFAULT_VOLUME`] shared.
    pub fn new(keys: Option<Arc<Keyring>>, volumes: Arc<VolumeSet>) -> Self {
        Self {
            keys,
            volumes,
            refused: RefusalCounts::default(),
        }
    }

    /// Whether attaches need credentials.
    pub fn requires_credentials(&self) -> bool {
        self.keys.is_some()
    }

    /// The volumes behind the gate.
    pub fn volumes(&self) -> &Arc<VolumeSet> {
        &self.volumes
    }

    /// Attaches refused so far.
    pub fn refused(&self) -> &RefusalCounts {
        &self.refused
    }

    /// Checks an ATTACH from `peer` for `device` carrying `credential`;
    /// counts a refusal.
    pub fn admit(
        &self,
        credential: Option<&str>,
        device: u64,
        peer: &str,
        now: SystemTime,
    ) -> Result<Grant, Refusal> {
        let r = self.check(credential, device, peer, now);
        if let Err(e) = &r {
            match e.status() {
                AttachStatus::Unauthenticated => self.refused.unauthenticated.fetch_add(1, Relaxed),
                _ => self.refused.forbidden.fetch_add(1, Relaxed),
            };
        }
        r
    }

    fn check(
        &self,
        credential: Option<&str>,
        device: u64,
        peer: &str,
        now: SystemTime,
    ) -> Result<Grant, Refusal> {
        let Some(keys) = &self.keys else {
            return Ok(Grant {
                volume: DEFAULT_VOLUME.into(),
                mode: AccessMode::Shared,
            });
        };
        let token = credential.ok_or(Refusal::NoCredential)?;
        let cap = keys.verify(token, now)?;
        if cap.device != device {
            return Err(CredentialError::WrongDevice {
                granted: cap.device,
                asked: device,
            }
            .into());
        }
        cap.check_host(peer)?;
        Ok(Grant {
            volume: cap.volume,
            mode: cap.mode,
        })
    }

    /// Claims the granted volume for `device` (blk queues only).
    pub fn claim(&self, grant: &Grant, device: u64) -> Result<Claim, Refusal> {
        self.volumes
            .claim(&grant.volume, device, grant.mode)
            .inspect_err(|_| {
                self.refused.forbidden.fetch_add(1, Relaxed);
            })
            .map_err(Refusal::from)
    }
}
