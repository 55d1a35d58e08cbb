//! Volumes and grants at the controller, and the attach credentials it signs
//! from them: the rules, restart recovery, and bad requests that must leave
//! state untouched. Driven with an explicit clock, like tests/controller.rs.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vrio_control::io_server::{create_missing_images, ImageOutcome};
use vrio_control::model::{Device, DeviceKind, Volume, VolumeGrant};
use vrio_control::placement::LeastLoaded;
use vrio_control::state::Registration;
use vrio_control::store::{FileStore, MemoryStore, StateStore};
use vrio_control::{ControlError, Controller, ControllerConfig, CredentialConfig};
use vrio_core::remote::device_key;
use vrio_core::tenancy::{AccessMode, Keyring};

const MIB: u64 = 1 << 20;
const TTL: Duration = Duration::from_secs(600);

fn open_with(store: Box<dyn StateStore>, credentials: Option<CredentialConfig>) -> Controller {
    let cfg = ControllerConfig {
        credentials,
        ..ControllerConfig::default()
    };
    let c = Controller::open(cfg, store, Box::new(LeastLoaded::default()), 0).unwrap();
    c.register_server(
        Registration {
            id: "io-a".into(),
            address: "10.0.0.1:7471".into(),
            sidecores: 2,
            capacity: 16,
        },
        0,
    )
    // A reopened controller knows it already.
    .ok();
    c
}

fn open(store: Box<dyn StateStore>) -> Controller {
    open_with(store, None)
}

fn signing() -> (Arc<Keyring>, CredentialConfig) {
    let keys = Arc::new(Keyring::ephemeral().unwrap());
    let cfg = CredentialConfig {
        keys: keys.clone(),
        ttl: TTL,
    };
    (keys, cfg)
}

fn vol(name: &str, mib: u64) -> Volume {
    Volume {
        name: name.into(),
        size_bytes: mib * MIB,
    }
}

fn grant(volume: &str, device: &str, mode: AccessMode, host: Option<&str>) -> VolumeGrant {
    VolumeGrant {
        volume: volume.into(),
        device: device.into(),
        mode,
        host: host.map(Into::into),
    }
}

fn dev(id: &str, kind: DeviceKind) -> Device {
    Device {
        id: id.into(),
        vm_id: "vm1".into(),
        kind,
        queues: 2,
        agent_address: "10.0.1.1:7000".into(),
        pinned_server: None,
    }
}

/// Unix ms of the wall clock: credentials expire by it.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn volumes_and_grants_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let before;
    {
        let c = open(Box::new(FileStore::open(dir.path()).unwrap()));
        c.create_volume(vol("vol-a", 64)).unwrap();
        c.create_volume(vol("vol-b", 1)).unwrap();
        c.create_volume(vol("gone", 1)).unwrap();
        c.grant_volume(grant("vol-a", "disk0", AccessMode::ReadWrite, None))
            .unwrap();
        c.grant_volume(grant(
            "vol-a",
            "disk1",
            AccessMode::ReadOnly,
            Some("10.0.1.2"),
        ))
        .unwrap();
        c.grant_volume(grant("vol-b", "disk2", AccessMode::Shared, None))
            .unwrap();
        c.grant_volume(grant("gone", "disk3", AccessMode::Shared, None))
            .unwrap();
        c.revoke_grant("vol-b", "disk2").unwrap();
        c.delete_volume("gone", true).unwrap();
        before = c.volumes();
        // Dropped without any shutdown step, like a crash after the last reply.
    }
    assert_eq!(
        before,
        vec![
            (
                vol("vol-a", 64),
                vec![
                    grant("vol-a", "disk0", AccessMode::ReadWrite, None),
                    grant("vol-a", "disk1", AccessMode::ReadOnly, Some("10.0.1.2")),
                ]
            ),
            (vol("vol-b", 1), vec![]),
        ]
    );
    let c = open(Box::new(FileStore::open(dir.path()).unwrap()));
    assert_eq!(c.volumes(), before);
    assert_eq!(c.grants().len(), 2);
}

fn invalid<T: std::fmt::Debug>(r: Result<T, ControlError>) {
    assert!(matches!(r, Err(ControlError::InvalidArgument(_))), "{r:?}");
}

#[test]
fn bad_volume_requests_are_refused_and_change_nothing() {
    let c = open(Box::new(MemoryStore::default()));
    c.create_volume(vol("vol-a", 1)).unwrap();
    c.grant_volume(grant("vol-a", "disk0", AccessMode::ReadWrite, None))
        .unwrap();
    let before = c.volumes();
    // Names that are not file-name safe, and sizes that are no disk's.
    let long = "x".repeat(65);
    for name in ["", ".hidden", "a/b", "../x", long.as_str()] {
        invalid(c.create_volume(vol(name, 1)));
    }
    for size in [0, 100, MIB + 1, u64::MAX - 511] {
        invalid(c.create_volume(Volume {
            name: "odd".into(),
            size_bytes: size,
        }));
    }
    assert!(matches!(
        c.create_volume(vol("vol-a", 2)),
        Err(ControlError::AlreadyExists(_))
    ));
    // Grants: bad host, bad device, unknown volume, a second volume.
    invalid(c.grant_volume(grant(
        "vol-a",
        "disk1",
        AccessMode::ReadOnly,
        Some("host.example"),
    )));
    invalid(c.grant_volume(grant("vol-a", "", AccessMode::ReadOnly, None)));
    invalid(c.grant_volume(grant("vol-a", "a\nb", AccessMode::ReadOnly, None)));
    assert!(matches!(
        c.grant_volume(grant("nope", "disk1", AccessMode::ReadOnly, None)),
        Err(ControlError::NotFound(_))
    ));
    c.create_volume(vol("vol-b", 1)).unwrap();
    let before_b = c.volumes();
    match c.grant_volume(grant("vol-b", "disk0", AccessMode::ReadOnly, None)) {
        Err(ControlError::FailedPrecondition(m)) => {
            assert!(m.contains("vrio-ctl volume revoke vol-a disk0"), "{m}")
        }
        r => panic!("a second volume for disk0: {r:?}"),
    }
    assert!(matches!(
        c.revoke_grant("vol-b", "disk0"),
        Err(ControlError::NotFound(_))
    ));
    // Deleting a granted volume needs force; an unknown one is not found.
    match c.delete_volume("vol-a", false) {
        Err(ControlError::FailedPrecondition(m)) => assert!(m.contains("disk0"), "{m}"),
        r => panic!("deleting a granted volume: {r:?}"),
    }
    assert!(matches!(
        c.delete_volume("nope", true),
        Err(ControlError::NotFound(_))
    ));
    assert_eq!(c.volumes(), before_b);
    assert_eq!(&before_b[..1], &before[..]);
}

#[test]
fn grants_are_replaced_revoked_and_forced_away() {
    let c = open(Box::new(MemoryStore::default()));
    c.create_volume(vol("vol-a", 1)).unwrap();
    c.grant_volume(grant("vol-a", "disk0", AccessMode::ReadWrite, None))
        .unwrap();
    // Granting again changes mode and host; hosts are kept canonical.
    let g = c
        .grant_volume(grant(
            "vol-a",
            "disk0",
            AccessMode::ReadOnly,
            Some("[0:0::1]"),
        ))
        .unwrap();
    assert_eq!(
        g,
        grant("vol-a", "disk0", AccessMode::ReadOnly, Some("::1"))
    );
    let g = c
        .grant_volume(grant("vol-a", "disk1", AccessMode::Shared, Some("local")))
        .unwrap();
    assert_eq!(g.host.as_deref(), Some("local"));
    assert_eq!(c.grants().len(), 2);
    assert_eq!(
        c.revoke_grant("vol-a", "disk1").unwrap(),
        grant("vol-a", "disk1", AccessMode::Shared, Some("local"))
    );
    // Once revoked, the device may be granted another volume.
    c.create_volume(vol("vol-b", 1)).unwrap();
    c.grant_volume(grant("vol-b", "disk1", AccessMode::ReadWrite, None))
        .unwrap();
    let revoked = c.delete_volume("vol-a", true).unwrap();
    assert_eq!(
        revoked,
        vec![grant("vol-a", "disk0", AccessMode::ReadOnly, Some("::1"))]
    );
    assert_eq!(
        c.volumes(),
        vec![(
            vol("vol-b", 1),
            vec![grant("vol-b", "disk1", AccessMode::ReadWrite, None)]
        )]
    );
}

#[test]
fn attach_signs_a_credential_for_the_granted_volume() {
    let (keys, cfg) = signing();
    let c = open_with(Box::new(MemoryStore::default()), Some(cfg));
    c.create_volume(vol("vol-a", 1)).unwrap();
    c.grant_volume(grant(
        "vol-a",
        "disk0",
        AccessMode::Shared,
        Some("10.0.1.1"),
    ))
    .unwrap();
    let now = wall_ms();
    let a = c
        .attach_device_with_credential(dev("disk0", DeviceKind::Blk), now)
        .unwrap();
    assert_eq!(a.assignments.len(), 2);
    let cap = keys
        .verify(a.credential.as_deref().unwrap(), SystemTime::now())
        .unwrap();
    assert_eq!(cap.device, device_key("disk0"));
    assert_eq!(
        (cap.volume.as_str(), cap.mode, cap.host.as_str()),
        ("vol-a", AccessMode::Shared, "10.0.1.1")
    );
    assert_eq!(cap.expires, now / 1000 + TTL.as_secs());

    // A net device: no volume, read-only, any host.
    let a = c
        .attach_device_with_credential(dev("nic0", DeviceKind::Net), now)
        .unwrap();
    let cap = keys
        .verify(a.credential.as_deref().unwrap(), SystemTime::now())
        .unwrap();
    assert_eq!(cap.device, device_key("nic0"));
    assert_eq!(
        (cap.volume.as_str(), cap.mode, cap.host.as_str()),
        ("net", AccessMode::ReadOnly, "")
    );

    // A restarted agent gets a fresh one; revoked, it gets none.
    let later = now + 5_000;
    let fresh = c.issue_credential("disk0", later).unwrap().unwrap();
    assert_eq!(
        keys.verify(&fresh, SystemTime::now()).unwrap().expires,
        later / 1000 + TTL.as_secs()
    );
    assert!(matches!(
        c.issue_credential("disk9", later),
        Err(ControlError::NotFound(_))
    ));
    c.revoke_grant("vol-a", "disk0").unwrap();
    assert!(matches!(
        c.issue_credential("disk0", later),
        Err(ControlError::FailedPrecondition(_))
    ));
}

#[test]
fn a_blk_device_without_exactly_one_grant_is_not_attached() {
    let (_, cfg) = signing();
    let dir = tempfile::tempdir().unwrap();
    {
        let c = open_with(Box::new(FileStore::open(dir.path()).unwrap()), None);
        c.create_volume(vol("vol-a", 1)).unwrap();
        c.create_volume(vol("vol-b", 1)).unwrap();
        c.grant_volume(grant("vol-a", "disk1", AccessMode::ReadWrite, None))
            .unwrap();
    }
    // The controller refuses a second volume per device; a snapshot edited
    // by hand might still hold one.
    let path = dir.path().join("state.json");
    let mut snap: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    snap["grants"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"volume": "vol-b", "device": "disk1", "mode": "ro"}));
    std::fs::write(&path, serde_json::to_vec(&snap).unwrap()).unwrap();

    let c = open_with(Box::new(FileStore::open(dir.path()).unwrap()), Some(cfg));
    let before = (c.devices(), c.assignments());
    match c.attach_device(dev("disk0", DeviceKind::Blk), wall_ms()) {
        Err(ControlError::FailedPrecondition(m)) => assert_eq!(
            m,
            "device disk0 has no volume grant (vrio-ctl volume grant VOLUME disk0)"
        ),
        r => panic!("an ungranted device attached: {r:?}"),
    }
    match c.attach_device(dev("disk1", DeviceKind::Blk), wall_ms()) {
        Err(ControlError::FailedPrecondition(m)) => {
            assert!(
                m.contains("vol-a, vol-b") && m.contains("serves one"),
                "{m}"
            )
        }
        r => panic!("a device with two volumes attached: {r:?}"),
    }
    assert_eq!((c.devices(), c.assignments()), before);
}

#[test]
fn without_a_data_key_attaches_need_no_grant_and_get_no_credential() {
    let c = open(Box::new(MemoryStore::default()));
    let a = c
        .attach_device_with_credential(dev("disk0", DeviceKind::Blk), 0)
        .unwrap();
    assert_eq!(a.credential, None);
    assert_eq!(c.issue_credential("disk0", 0).unwrap(), None);
}

#[test]
fn missing_images_are_created_sparse_and_present_ones_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("old.img"), b"data").unwrap();
    let out = create_missing_images(
        dir.path(),
        &[
            ("new".into(), 4 * MIB),
            ("old".into(), MIB),
            ("../escape".into(), MIB),
        ],
    );
    assert!(matches!(out[0], ImageOutcome::Created), "{out:?}");
    assert!(matches!(out[1], ImageOutcome::Present(4)), "{out:?}");
    assert!(matches!(out[2], ImageOutcome::BadName), "{out:?}");
    let new = std::fs::metadata(dir.path().join("new.img")).unwrap();
    assert_eq!(new.len(), 4 * MIB);
    assert_eq!(std::fs::read(dir.path().join("old.img")).unwrap(), b"data");
    assert!(!dir.path().join("escape.img").exists());
    // Again: nothing to do.
    let out = create_missing_images(dir.path(), &[("new".into(), 4 * MIB)]);
    assert!(matches!(out[0], ImageOutcome::Present(n) if n == 4 * MIB));
}
