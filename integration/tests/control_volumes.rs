//! Volumes at the controller end to end: vrio-ctl records volumes and
//! grants, vrio-controller --data-key answers AttachDevice with a credential
//! the I/O servers' key verifies (the granted volume, mode and host, for
//! the device's wire id) and refuses a blk device without a grant; an I/O
//! server joined with a volume directory creates the images, and a VM host
//! attaches with the credential `place_devices` hands it and runs verified
//! I/O on its volume.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::Code;
use vrio_control::client::connect;
use vrio_control::{
    join_as_server_with, pb, place_devices, wait_for_servers, ControlOpts, GlueError, JoinOptions,
};
use vrio_core::blk::MemoryBackend;
use vrio_core::remote::{device_key, IoServer, IoServerConfig, NotifyMode};
use vrio_core::tenancy::{image_path, AccessMode, Keyring, VolumeSet};
use vrio_integration::rxe;
use vrio_testkit::guest::WorkloadConfig;
use vrio_testkit::runner::{attach_guests_credentialed, drive_guests, make_guests, RunConfig};

const TOKEN: &str = "volumes-test-token";
const DEADLINE: Duration = Duration::from_secs(60);

/// Kills the controller it started when the test ends, pass or fail.
struct Controller {
    child: Child,
    addr: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_controller(bin: &Path, args: &[&str]) -> Controller {
    let mut child = Command::new(bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--memory",
            "--rebalance-secs",
            "0",
        ])
        .args(args)
        .env("VRIO_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "first line {line:?}");
    Controller { child, addr }
}

fn bins() -> (PathBuf, PathBuf) {
    (
        rxe::bin("vrio-examples", "vrio-controller"),
        rxe::bin("vrio-examples", "vrio-ctl"),
    )
}

/// A fresh scratch directory of this test process.
fn scratch(what: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("control-volumes-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A data-plane key file written by `vrio-ctl key generate`.
fn key_file(ctl_bin: &Path, dir: &Path) -> PathBuf {
    let path = dir.join("data.key");
    ok(Command::new(ctl_bin)
        .args(["key", "generate", "--out"])
        .arg(&path)
        .output()
        .unwrap());
    path
}

fn ctl(bin: &Path, addr: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(["--addr", addr])
        .args(args)
        .env("VRIO_TOKEN", TOKEN)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "vrio-ctl failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "vrio-ctl should fail, stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains(needle),
        "stderr {err:?} should mention {needle:?}"
    );
}

fn json(out: Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn device(id: &str, kind: pb::DeviceType) -> pb::AttachDeviceRequest {
    pb::AttachDeviceRequest {
        device: Some(pb::Device {
            id: id.into(),
            vm_id: "vm1".into(),
            r#type: kind as i32,
            queues: 2,
            agent_address: "host1:7000".into(),
            pinned_server_id: String::new(),
        }),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ctl_manages_volumes_and_attaches_carry_signed_credentials() {
    let (controller_bin, ctl_bin) = bins();
    let dir = scratch("ctl");
    let key = key_file(&ctl_bin, &dir);
    let ctrl = start_controller(
        &controller_bin,
        &[
            "--lease-ttl-ms",
            "600000",
            "--data-key",
            key.to_str().unwrap(),
            "--credential-ttl-secs",
            "3600",
        ],
    );
    let addr = ctrl.addr.as_str();

    // Volumes and grants through vrio-ctl.
    let made = ok(ctl(
        &ctl_bin,
        addr,
        &["volume", "create", "vol-a", "--size-mib", "64"],
    ));
    assert!(made.contains("created volume vol-a (64 MiB)"), "{made}");
    let made = json(ctl(
        &ctl_bin,
        addr,
        &["--json", "volume", "create", "vol-b", "--size-mib", "1"],
    ));
    assert_eq!(made["size_bytes"], 1 << 20, "{made}");
    fails(
        ctl(
            &ctl_bin,
            addr,
            &["volume", "create", "vol-a", "--size-mib", "1"],
        ),
        "already exists",
    );
    fails(
        ctl(
            &ctl_bin,
            addr,
            &["volume", "create", "../etc", "--size-mib", "1"],
        ),
        "invalid request",
    );
    ok(ctl(&ctl_bin, addr, &["volume", "grant", "vol-a", "disk0"]));
    let granted = ok(ctl(
        &ctl_bin,
        addr,
        &[
            "volume",
            "grant",
            "vol-b",
            "disk1",
            "--mode",
            "ro",
            "--host",
            "127.0.0.1",
        ],
    ));
    assert!(
        granted.contains("granted volume vol-b to device disk1 (ro, from 127.0.0.1)"),
        "{granted}"
    );
    fails(
        ctl(
            &ctl_bin,
            addr,
            &["volume", "grant", "vol-b", "disk0", "--mode", "shared"],
        ),
        "vrio-ctl volume revoke vol-a disk0",
    );
    fails(
        ctl(&ctl_bin, addr, &["volume", "grant", "vol-c", "disk2"]),
        "not found",
    );
    let table = ok(ctl(&ctl_bin, addr, &["volume", "list"]));
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["VOLUME", "MIB", "DEVICE", "MODE", "HOST"],
            vec!["vol-a", "64", "disk0", "rw", "any"],
            vec!["vol-b", "1", "disk1", "ro", "127.0.0.1"],
        ],
        "{table}"
    );
    let list = json(ctl(&ctl_bin, addr, &["--json", "volume", "list"]));
    assert_eq!(list[0]["name"], "vol-a");
    assert_eq!(list[0]["size_bytes"], 64 << 20);
    assert_eq!(list[0]["grants"][0]["device"], "disk0");
    assert_eq!(list[0]["grants"][0]["mode"], "rw");
    assert_eq!(list[0]["grants"][0]["host"], Value::Null);
    assert_eq!(list[1]["grants"][0]["host"], "127.0.0.1");

    // Attaches: each credential verifies with the servers' key and names
    // the device's wire id and its grant.
    let keys = Keyring::from_file(&key).unwrap();
    let mut c = connect(addr, Some(TOKEN)).await.unwrap();
    c.register_server(pb::RegisterServerRequest {
        id: "io-a".into(),
        address: "io-a.rack1:7471".into(),
        sidecores: 2,
        capacity: 16,
    })
    .await
    .unwrap();
    let before = unix_now();
    let cases = [
        (
            "disk0",
            pb::DeviceType::Blk,
            "vol-a",
            AccessMode::ReadWrite,
            "",
        ),
        (
            "disk1",
            pb::DeviceType::Blk,
            "vol-b",
            AccessMode::ReadOnly,
            "127.0.0.1",
        ),
        ("nic0", pb::DeviceType::Net, "net", AccessMode::ReadOnly, ""),
    ];
    for (id, kind, volume, mode, host) in cases {
        let r = c
            .attach_device(device(id, kind))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.assignments.len(), 2);
        let cap = keys.verify(&r.credential, SystemTime::now()).unwrap();
        assert_eq!(cap.device, device_key(id), "{id}");
        assert_eq!(
            (cap.volume.as_str(), cap.mode, cap.host.as_str()),
            (volume, mode, host),
            "{id}"
        );
        assert!(
            (before + 3600..=unix_now() + 3600).contains(&cap.expires),
            "{id} expires at {}, now {before}",
            cap.expires
        );
    }
    // A blk device nobody granted a volume is refused and not recorded.
    let e = c
        .attach_device(device("disk2", pb::DeviceType::Blk))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(
        e.message()
            .contains("device disk2 has no volume grant (vrio-ctl volume grant VOLUME disk2)"),
        "{e}"
    );
    let devices = c
        .list_devices(pb::ListDevicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(devices.len(), 3);
    // An agent that restarted gets a fresh credential for its device.
    let again = c
        .issue_credential(pb::IssueCredentialRequest {
            device_id: "disk0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .credential;
    assert_eq!(
        keys.verify(&again, SystemTime::now()).unwrap().volume,
        "vol-a"
    );

    // Revoke and delete.
    fails(
        ctl(&ctl_bin, addr, &["volume", "delete", "vol-a"]),
        "not possible now",
    );
    ok(ctl(&ctl_bin, addr, &["volume", "revoke", "vol-a", "disk0"]));
    fails(
        ctl(&ctl_bin, addr, &["volume", "revoke", "vol-a", "disk0"]),
        "not found",
    );
    let e = c
        .issue_credential(pb::IssueCredentialRequest {
            device_id: "disk0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    ok(ctl(&ctl_bin, addr, &["volume", "delete", "vol-a"]));
    let deleted = json(ctl(
        &ctl_bin,
        addr,
        &["--json", "volume", "delete", "vol-b", "--force"],
    ));
    assert_eq!(deleted["revoked"][0]["device"], "disk1", "{deleted}");
    assert_eq!(
        json(ctl(&ctl_bin, addr, &["--json", "volume", "list"])),
        Value::Array(vec![])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without --data-key nothing changes: blk devices attach without a grant
/// and get no credential.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_data_key_attaches_carry_no_credential() {
    let (controller_bin, _) = bins();
    let ctrl = start_controller(&controller_bin, &["--lease-ttl-ms", "600000"]);
    let mut c = connect(&ctrl.addr, Some(TOKEN)).await.unwrap();
    c.register_server(pb::RegisterServerRequest {
        id: "io-a".into(),
        address: "io-a.rack1:7471".into(),
        sidecores: 1,
        capacity: 4,
    })
    .await
    .unwrap();
    let r = c
        .attach_device(device("disk0", pb::DeviceType::Blk))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.assignments.len(), r.credential.as_str()), (2, ""));
}

/// The whole path: `vrio-ctl volume create` provisions the image on an I/O
/// server that checks credentials, the grant lets `place_devices` hand the
/// VM host a credential, and the guest's verified I/O on the volume ends
/// with no error; a device without a grant is never placed.
#[test]
fn a_vm_host_attaches_its_granted_volume_with_the_controllers_credential() {
    let (controller_bin, ctl_bin) = bins();
    let dir = scratch("e2e");
    let key = key_file(&ctl_bin, &dir);
    let volumes_dir = dir.join("volumes");
    std::fs::create_dir_all(&volumes_dir).unwrap();
    // A short lease: servers renew (and provision) every 300 ms.
    let ctrl = start_controller(
        &controller_bin,
        &[
            "--lease-ttl-ms",
            "900",
            "--tick-ms",
            "100",
            "--data-key",
            key.to_str().unwrap(),
        ],
    );
    let ctl_opts = ControlOpts {
        addr: ctrl.addr.clone(),
        token: Some(TOKEN.into()),
        tls: None,
    };

    let keys = Arc::new(Keyring::from_file(&key).unwrap());
    let server = Arc::new(
        IoServer::start(
            Arc::from(vrio_rdma::open(vrio_rdma::Backend::Soft, None).unwrap()),
            Arc::new(MemoryBackend::new(1 << 20)),
            IoServerConfig {
                sidecores: 2,
                keys: Some(keys),
                volumes: Arc::new(VolumeSet::with_dir(&volumes_dir)),
                ..IoServerConfig::default()
            },
        )
        .unwrap(),
    );
    let _member = join_as_server_with(
        ctl_opts.clone(),
        "io-1".into(),
        16,
        server.clone(),
        JoinOptions {
            volume_dir: Some(volumes_dir.clone()),
        },
    )
    .unwrap();
    wait_for_servers(&ctl_opts, 1, DEADLINE).unwrap();

    ok(ctl(
        &ctl_bin,
        &ctrl.addr,
        &["volume", "create", "vol-a", "--size-mib", "2"],
    ));
    ok(ctl(
        &ctl_bin,
        &ctrl.addr,
        &["volume", "grant", "vol-a", "disk0"],
    ));
    let image = image_path(&volumes_dir, "vol-a");
    let start = Instant::now();
    while !image.exists() {
        assert!(
            start.elapsed() < DEADLINE,
            "the server never created {}",
            image.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 2 << 20);

    // Not granted: the controller places nothing.
    match place_devices(&ctl_opts, "vm1", "test-vm-host", &[("disk9".into(), 1)]) {
        Err(GlueError::Rpc(s)) if s.code() == Code::FailedPrecondition => {}
        r => panic!("an ungranted device was placed: {r:?}"),
    }

    let placed = place_devices(&ctl_opts, "vm1", "test-vm-host", &[("disk0".into(), 2)]).unwrap();
    let credential = placed[0]
        .credential
        .clone()
        .expect("the controller signs credentials");
    let rc = RunConfig {
        guests: 1,
        queues_per_guest: 2,
        workload: WorkloadConfig {
            requests: 400,
            depth: 8,
            blocks: 128,
            stall_timeout: DEADLINE,
            ..WorkloadConfig::default()
        },
        ..RunConfig::default()
    };
    let guests = make_guests(&rc).unwrap();
    let agents = attach_guests_credentialed(
        &guests,
        &[(device_key("disk0"), placed[0].targets.clone())],
        vrio_rdma::Backend::Soft,
        None,
        NotifyMode::Doorbell,
        std::slice::from_ref(&credential),
    )
    .unwrap();
    let r = drive_guests(
        guests,
        &rc,
        &Arc::new(AtomicU64::new(0)),
        &Arc::new(AtomicBool::new(false)),
    );
    drop(agents);
    assert_eq!(r.completed, 800, "{r:?}");
    assert_eq!(
        (r.io_errors, r.corrupt, r.lost, r.protocol_errors),
        (0, 0, 0, 0),
        "io errors, corrupt, lost, protocol errors"
    );
    // An agent that restarts finds its device attached: same placement,
    // and a fresh credential for the same grant.
    let again = place_devices(&ctl_opts, "vm1", "test-vm-host", &[("disk0".into(), 2)]).unwrap();
    assert_eq!(again[0].targets, placed[0].targets);
    let keys = Keyring::from_file(&key).unwrap();
    let cap = keys
        .verify(again[0].credential.as_deref().unwrap(), SystemTime::now())
        .unwrap();
    assert_eq!(
        (cap.device, cap.volume.as_str(), cap.mode),
        (device_key("disk0"), "vol-a", AccessMode::ReadWrite)
    );
    let refused = server.refusals();
    assert_eq!(
        (
            refused.unauthenticated.load(Relaxed),
            refused.forbidden.load(Relaxed)
        ),
        (0, 0),
        "refused attaches"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
