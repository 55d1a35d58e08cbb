//! Where controller state survives restarts. [`FileStore`] is the embedded
//! default: every change writes a full snapshot to a temp file, fsyncs it,
//! renames it over the old one and fsyncs the directory, so a crash leaves
//! either the old or the new snapshot, never a torn one. The file is the
//! owner's only (mode 0600): it holds the interposition policies' keys.

use crate::model::{Assignment, Device, Server, Volume, VolumeGrant};
use crate::policy::DevicePolicy;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Format version written into every snapshot; loading another fails.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Running totals, kept with the state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Queue moves of any cause (by hand, drain, failover, rebalance).
    pub moves: u64,
    /// Servers whose lease expired and whose queues were failed over.
    pub failovers: u64,
    /// Queue moves made by rebalance rounds.
    pub rebalance_moves: u64,
}

/// Everything the controller must not forget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SNAPSHOT_VERSION`] when written.
    pub version: u32,
    /// Every known server, dead ones included.
    pub servers: Vec<Server>,
    /// Every attached device.
    pub devices: Vec<Device>,
    /// Every queue's assignment.
    pub assignments: Vec<Assignment>,
    /// Running totals.
    pub counters: Counters,
    /// Every volume (absent from snapshots written before volumes existed).
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// Every grant of a volume to a device (absent likewise).
    #[serde(default)]
    pub grants: Vec<VolumeGrant>,
    /// Every device's interposition policy, keys included (absent from
    /// snapshots written before policies existed).
    #[serde(default)]
    pub policies: Vec<DevicePolicy>,
    /// The version of the last policy change (absent likewise).
    #[serde(default)]
    pub policy_version: u64,
}

impl Snapshot {
    /// Parses a stored snapshot (`path` names where it was stored, for the
    /// error) and checks its format version.
    pub fn decode(bytes: &[u8], path: impl Into<PathBuf>) -> Result<Snapshot, StoreError> {
        let snap: Snapshot =
            serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
                path: path.into(),
                source,
            })?;
        if snap.version != SNAPSHOT_VERSION {
            return Err(StoreError::Version(snap.version));
        }
        Ok(snap)
    }
}

/// Why loading or saving state failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The stored snapshot does not parse.
    #[error("{path}: corrupt snapshot: {source}")]
    Corrupt {
        /// Where it was stored (a file path, or the etcd key).
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored snapshot has another format version.
    #[error("snapshot version {0} is not supported (want {SNAPSHOT_VERSION})")]
    Version(u32),
    /// Anything else (serialisation, etcd).
    #[error("{0}")]
    Other(String),
}

/// Where the controller keeps its state. Implementations must be durable:
/// the controller applies a change only after `save` returns.
pub trait StateStore: Send + Sync {
    /// The last saved snapshot, or None on first start.
    fn load(&self) -> Result<Option<Snapshot>, StoreError>;
    /// Durably replaces the saved snapshot; returns only once it is on disk.
    fn save(&self, snapshot: &Snapshot) -> Result<(), StoreError>;
}

/// Keeps state in memory only (tests, single-shot demos).
#[derive(Debug, Default)]
pub struct MemoryStore(Mutex<Option<Snapshot>>);

impl StateStore for MemoryStore {
    fn load(&self) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    fn save(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshot.clone());
        Ok(())
    }
}

/// Crash-safe snapshot file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    tmp: PathBuf,
}

impl FileStore {
    /// Uses `dir/state.json`, creating `dir` if needed.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(FileStore {
            path: dir.join("state.json"),
            tmp: dir.join("state.json.tmp"),
        })
    }

    /// The snapshot file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<Option<Snapshot>, StoreError> {
        // A leftover temp file is a save that crashed before its rename: the
        // snapshot it meant to replace is still the committed one.
        let _ = fs::remove_file(&self.tmp);
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(&self.path)(e)),
        };
        Snapshot::decode(&bytes, &self.path).map(Some)
    }

    fn save(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let bytes =
            serde_json::to_vec_pretty(snapshot).map_err(|e| StoreError::Other(e.to_string()))?;
        // Owner only: the snapshot holds the crypt stages' keys.
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.tmp)
            .map_err(self.io(&self.tmp))?;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(self.io(&self.tmp))?;
        f.write_all(&bytes).map_err(self.io(&self.tmp))?;
        f.sync_all().map_err(self.io(&self.tmp))?;
        drop(f);
        fs::rename(&self.tmp, &self.path).map_err(self.io(&self.path))?;
        // The rename is durable only once the directory entry is.
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(self.io(dir))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(n: u64) -> Snapshot {
        Snapshot {
            version: SNAPSHOT_VERSION,
            servers: vec![],
            devices: vec![],
            assignments: vec![],
            counters: Counters {
                moves: n,
                ..Counters::default()
            },
            volumes: vec![],
            grants: vec![],
            policies: vec![],
            policy_version: 0,
        }
    }

    #[test]
    fn file_store_round_trips_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), None);
        store.save(&snap(1)).unwrap();
        store.save(&snap(2)).unwrap();
        let again = FileStore::open(dir.path()).unwrap();
        assert_eq!(again.load().unwrap(), Some(snap(2)));
    }

    #[test]
    fn crashed_save_keeps_previous_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.save(&snap(7)).unwrap();
        // A save that died half-way through writing the temp file.
        fs::write(dir.path().join("state.json.tmp"), b"{\"version\":1,\"serv").unwrap();
        assert_eq!(store.load().unwrap(), Some(snap(7)));
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn snapshots_from_before_volumes_load_with_none() {
        let old = br#"{"version":1,"servers":[],"devices":[],"assignments":[],
            "counters":{"moves":3,"failovers":0,"rebalance_moves":0}}"#;
        let s = Snapshot::decode(old, "old.json").unwrap();
        assert_eq!(s, snap(3));
    }

    #[test]
    fn volumes_and_grants_round_trip() {
        use crate::model::{Volume, VolumeGrant};
        use vrio_core::tenancy::AccessMode;
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut s = snap(0);
        s.volumes.push(Volume {
            name: "vol-a".into(),
            size_bytes: 1 << 20,
        });
        for (device, mode, host) in [
            ("d1", AccessMode::ReadWrite, None),
            ("d2", AccessMode::ReadOnly, Some("10.0.0.2".to_string())),
            ("d3", AccessMode::Shared, None),
        ] {
            s.grants.push(VolumeGrant {
                volume: "vol-a".into(),
                device: device.into(),
                mode,
                host,
            });
        }
        store.save(&s).unwrap();
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(text.contains("\"mode\": \"ro\""), "{text}");
        assert_eq!(store.load().unwrap(), Some(s));
    }

    #[test]
    fn policies_round_trip_with_their_keys_in_an_owner_only_file() {
        use crate::policy::DevicePolicy;
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut s = snap(0);
        let key = "ab".repeat(32) + &"cd".repeat(32);
        let json =
            format!(r#"{{"stages":[{{"stage":"meter"}},{{"stage":"crypt","key":"{key}"}}]}}"#);
        s.policies.push(DevicePolicy {
            device: "d1".into(),
            version: 4,
            spec: vrio_core::interpose::PolicySpec::parse(&json).unwrap(),
        });
        s.policy_version = 5;
        store.save(&s).unwrap();
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(fs::read_to_string(store.path()).unwrap().contains(&key));
        assert_eq!(store.load().unwrap(), Some(s));
    }

    #[test]
    fn corrupt_snapshot_is_an_error_not_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("state.json"), b"garbage").unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
    }
}
