//! Named volumes an I/O server serves: each blk device attaches one, in the
//! mode its capability grants, and the server keeps writers apart.
//!
//! Raw images live as `<dir>/<name>.img` (opened when first attached, so a
//! volume created while the server runs is served at once); memory volumes
//! are sparse and die with the server. A claim is held by the device model
//! of each queue that attached the volume ([`Claim`] wraps the back-end), so
//! a queue dropped for any reason gives its claim back with no bookkeeping.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use super::credential::{valid_volume_name, AccessMode};
use crate::blk::{BlockBackend, FileBackend, MemoryBackend, ID_BYTES};

/// Why a volume could not be attached, created or removed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No volume has that name here.
    #[error("no volume {0:?} on this server")]
    NoSuchVolume(String),
    /// Not 1 to 64 of `[A-Za-z0-9._-]`, or starting with a dot.
    #[error("invalid volume name {0:?}: 1 to 64 of [A-Za-z0-9._-], not starting with '.'")]
    BadName(String),
    /// Another device writes the volume and the mode asked excludes it.
    #[error("volume {volume:?} is attached {mode} by device {device:#x}")]
    Busy {
        /// The volume.
        volume: String,
        /// The device holding it.
        device: u64,
        /// How that device holds it.
        mode: AccessMode,
    },
    /// The volume exists already (create).
    #[error("volume {0:?} exists already")]
    Exists(String),
    /// The volume's image could not be opened or created.
    #[error("volume {name:?}: {source}")]
    Io {
        /// The volume.
        name: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// A device's hold on a volume, alive as long as its token.
struct Holder {
    device: u64,
    mode: AccessMode,
    alive: Weak<()>,
}

struct Volume {
    backend: Arc<dyn BlockBackend>,
    holders: Vec<Holder>,
}

/// The volumes an I/O server serves, and who holds each.
#[derive(Default)]
pub struct VolumeSet {
    dir: Option<PathBuf>,
    vols: Mutex<HashMap<String, Volume>>,
}

impl std::fmt::Debug for VolumeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeSet")
            .field("dir", &self.dir)
            .field("open", &self.names())
            .finish()
    }
}

/// The image path of volume `name` under `dir`.
pub fn image_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.img"))
}

impl VolumeSet {
    /// An empty set: volumes only as added.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set serving the images `<dir>/<name>.img`, as well as any added.
    pub fn with_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: Some(dir.into()),
            vols: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Volume>> {
        // A holder list is valid at every step: a poisoned lock is usable.
        self.vols.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `backend` as volume `name` (replacing nothing: an existing
    /// name is an error).
    pub fn insert(&self, name: &str, backend: Arc<dyn BlockBackend>) -> Result<(), VolumeError> {
        if !valid_volume_name(name) {
            return Err(VolumeError::BadName(name.into()));
        }
        let mut v = self.lock();
        if v.contains_key(name) {
            return Err(VolumeError::Exists(name.into()));
        }
        v.insert(
            name.into(),
            Volume {
                backend,
                holders: Vec::new(),
            },
        );
        Ok(())
    }

    /// Adds a sparse memory volume of `bytes`.
    pub fn add_memory(&self, name: &str, bytes: u64) -> Result<(), VolumeError> {
        self.insert(name, Arc::new(MemoryBackend::new(bytes).with_id(name)))
    }

    /// Volumes open or added so far (images not yet attached are not
    /// listed).
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<_> = self.lock().keys().cloned().collect();
        n.sort();
        n
    }

    fn open_image(&self, name: &str) -> Result<Option<Arc<dyn BlockBackend>>, VolumeError> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let path = image_path(dir, name);
        match FileBackend::open(&path, false) {
            Ok(b) => Ok(Some(Arc::new(b))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(VolumeError::Io {
                name: name.into(),
                source,
            }),
        }
    }

    /// Lets `device` use volume `name` in `mode`, or says why not: an
    /// exclusive writer excludes every other device's writes, and shared
    /// writers exclude exclusive ones. Readers never conflict. Queues of
    /// the same device share its claim.
    pub fn claim(&self, name: &str, device: u64, mode: AccessMode) -> Result<Claim, VolumeError> {
        if !valid_volume_name(name) {
            return Err(VolumeError::BadName(name.into()));
        }
        let mut vols = self.lock();
        if !vols.contains_key(name) {
            let b = self
                .open_image(name)?
                .ok_or_else(|| VolumeError::NoSuchVolume(name.into()))?;
            vols.insert(
                name.into(),
                Volume {
                    backend: b,
                    holders: Vec::new(),
                },
            );
        }
        let Some(vol) = vols.get_mut(name) else {
            return Err(VolumeError::NoSuchVolume(name.into()));
        };
        vol.holders.retain(|h| h.alive.strong_count() > 0);
        if mode.writes() {
            let conflict = vol.holders.iter().find(|h| {
                h.device != device
                    && h.mode.writes()
                    && (mode == AccessMode::ReadWrite || h.mode == AccessMode::ReadWrite)
            });
            if let Some(h) = conflict {
                return Err(VolumeError::Busy {
                    volume: name.into(),
                    device: h.device,
                    mode: h.mode,
                });
            }
        }
        let token = Arc::new(());
        vol.holders.push(Holder {
            device,
            mode,
            alive: Arc::downgrade(&token),
        });
        Ok(Claim {
            backend: vol.backend.clone(),
            read_only: !mode.writes(),
            _token: token,
        })
    }
}

/// A device's use of a volume: the volume's back-end, refusing writes when
/// the claim is read-only. Dropping it gives the claim back.
pub struct Claim {
    backend: Arc<dyn BlockBackend>,
    read_only: bool,
    _token: Arc<()>,
}

impl BlockBackend for Claim {
    fn capacity(&self) -> u64 {
        self.backend.capacity()
    }
    fn read_only(&self) -> bool {
        self.read_only || self.backend.read_only()
    }
    fn id(&self) -> [u8; ID_BYTES] {
        self.backend.id()
    }
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.backend.read_vectored_at(offset, bufs)
    }
    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        // The device model refuses writes to a read-only device already;
        // this is the second line, below any device model.
        if self.read_only {
            return Err(crate::blk::read_only_error());
        }
        self.backend.write_vectored_at(offset, bufs)
    }
    fn flush(&self) -> io::Result<()> {
        self.backend.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(crate::blk::read_only_error());
        }
        self.backend.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(crate::blk::read_only_error());
        }
        self.backend.write_zeroes(offset, len, may_unmap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_each_other_and_readers_never_conflict() {
        let v = VolumeSet::new();
        v.add_memory("a", 1 << 20).unwrap();
        let w = v.claim("a", 1, AccessMode::ReadWrite).unwrap();
        // Same device again (another queue): fine.
        let _w2 = v.claim("a", 1, AccessMode::ReadWrite).unwrap();
        assert!(matches!(
            v.claim("a", 2, AccessMode::ReadWrite),
            Err(VolumeError::Busy { device: 1, .. })
        ));
        assert!(v.claim("a", 2, AccessMode::Shared).is_err());
        let r = v.claim("a", 2, AccessMode::ReadOnly).unwrap();
        assert!(r.read_only());
        let mut b = [0u8; 512];
        assert!(r.write_vectored_at(0, &[IoSlice::new(&b)]).is_err());
        assert!(r
            .read_vectored_at(0, &mut [IoSliceMut::new(&mut b)])
            .is_ok());
        drop((w, _w2));
        // Claims die with their holders.
        let s = v.claim("a", 2, AccessMode::Shared).unwrap();
        let _s3 = v.claim("a", 3, AccessMode::Shared).unwrap();
        assert!(v.claim("a", 4, AccessMode::ReadWrite).is_err());
        drop(s);
        assert!(matches!(
            v.claim("nope", 1, AccessMode::ReadOnly),
            Err(VolumeError::NoSuchVolume(_))
        ));
        assert!(matches!(
            v.claim("../x", 1, AccessMode::ReadOnly),
            Err(VolumeError::BadName(_))
        ));
    }

    #[test]
    fn images_under_the_directory_are_opened_on_first_claim() {
        let dir = std::env::temp_dir().join(format!("vrio-vol-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v = VolumeSet::with_dir(&dir);
        assert!(v.claim("disk1", 1, AccessMode::ReadWrite).is_err());
        FileBackend::create(image_path(&dir, "disk1"), 1 << 20).unwrap();
        let c = v.claim("disk1", 1, AccessMode::ReadWrite).unwrap();
        assert_eq!(c.capacity(), (1 << 20) / 512);
        assert_eq!(v.names(), vec!["disk1".to_string()]);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
