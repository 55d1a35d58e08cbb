//! Controller state in a real etcd (Debian's etcd-server), started by the
//! test. Built only with `--features etcd`.
#![cfg(feature = "etcd")]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vrio_control::model::{Device, DeviceKind, QueueKey, Slot};
use vrio_control::placement::LeastLoaded;
use vrio_control::state::Registration;
use vrio_control::store_etcd::{campaign, EtcdStore, Fence};
use vrio_control::{Controller, ControllerConfig};

struct Etcd {
    child: Child,
    url: String,
    dir: std::path::PathBuf,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_etcd() -> Etcd {
    let bin = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!("etcd not installed: run scripts/setup.sh (installs etcd-server)")
        });
    let (client, peer) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("vrio-etcd-{}-{client}", std::process::id()));
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(bin)
        .arg("--data-dir")
        .arg(&dir)
        .args(["--name", "vrio-test"])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("vrio-test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let etcd = Etcd { child, url, dir };
    // Wait until it accepts a client; a bound on start-up, not a timing claim.
    let start = Instant::now();
    loop {
        match EtcdStore::connect(vec![etcd.url.clone()], "/vrio/probe", None).and_then(|s| {
            use vrio_control::store::StateStore;
            s.load()
        }) {
            Ok(_) => break,
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                panic!("etcd never came up: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    etcd
}

fn open(url: &str) -> Controller {
    open_fenced(url, None)
}

fn open_fenced(url: &str, fence: Option<Fence>) -> Controller {
    Controller::open(
        ControllerConfig::default(),
        Box::new(
            EtcdStore::connect(vec![url.to_string()], "/vrio/controller/state", fence).unwrap(),
        ),
        Box::new(LeastLoaded::default()),
        0,
    )
    .unwrap()
}

#[test]
fn a_second_controller_on_the_same_etcd_recovers_every_assignment() {
    let etcd = start_etcd();
    let before;
    {
        let c = open(&etcd.url);
        for id in ["a", "b"] {
            c.register_server(
                Registration {
                    id: id.into(),
                    address: format!("{id}:7471"),
                    sidecores: 2,
                    capacity: 8,
                },
                0,
            )
            .unwrap();
        }
        c.attach_device(
            Device {
                id: "disk0".into(),
                vm_id: "vm1".into(),
                kind: DeviceKind::Net,
                queues: 3,
                agent_address: "h:1".into(),
                pinned_server: None,
            },
            0,
        )
        .unwrap();
        let q0 = QueueKey {
            device: "disk0".into(),
            queue: 0,
        };
        let a0 = c.assignments()[0].slot.clone().unwrap();
        let other = if a0.server == "a" { "b" } else { "a" };
        c.move_queue(
            &q0,
            Slot {
                server: other.into(),
                sidecore: 1,
            },
            1,
        )
        .unwrap();
        before = c.assignments();
    }
    let c = open(&etcd.url);
    assert_eq!(c.assignments(), before);
    assert_eq!(c.devices().len(), 1);
    assert_eq!(c.stats().counters.moves, 1);
}

fn reg(id: &str) -> Registration {
    Registration {
        id: id.into(),
        address: format!("{id}:7471"),
        sidecores: 2,
        capacity: 8,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_leader_dies_another_controller_takes_over_with_the_state() {
    let etcd = start_etcd();
    let eps = vec![etcd.url.clone()];
    let first = campaign(eps.clone(), "/vrio/leader", "ctrl-1", 2)
        .await
        .unwrap();
    let c1 = open_fenced(&etcd.url, Some(first.fence.clone()));
    c1.register_server(reg("a"), 0).unwrap();
    c1.register_server(reg("b"), 0).unwrap();
    c1.attach_device(
        Device {
            id: "disk0".into(),
            vm_id: "vm1".into(),
            kind: DeviceKind::Blk,
            queues: 4,
            agent_address: "h:1".into(),
            pinned_server: None,
        },
        0,
    )
    .unwrap();
    let state = c1.assignments();

    // A second controller campaigns and must wait while the first leads.
    let second = tokio::spawn(campaign(eps.clone(), "/vrio/leader", "ctrl-2", 2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "two leaders at once");

    // The first "crashes": its lease lapses and the second wins.
    first.abandon();
    let second = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("no takeover within 30 s")
        .unwrap()
        .unwrap();
    let c2 = open_fenced(&etcd.url, Some(second.fence.clone()));
    assert_eq!(c2.assignments(), state);

    // The deposed leader can no longer write: fencing rejects its save and
    // its state is left as it was.
    let err = c1.register_server(reg("zombie"), 1).unwrap_err();
    assert!(err.to_string().contains("not the leader"), "{err}");
    c2.register_server(reg("c"), 1).unwrap();
    let c3 = open(&etcd.url);
    assert_eq!(c3.servers().len(), 3);
    assert!(c3.servers().iter().all(|(s, _)| s.id != "zombie"));
    second.resign().await.unwrap();
}

#[test]
fn policies_survive_in_etcd_with_their_keys() {
    use vrio_core::interpose::PolicySpec;
    let key = "11".repeat(32) + &"22".repeat(32);
    let json = format!(r#"{{"stages":[{{"stage":"meter"}},{{"stage":"crypt","key":"{key}"}}]}}"#);
    let etcd = start_etcd();
    let (set, cleared);
    {
        let c = open(&etcd.url);
        set = c
            .set_device_policy("disk0", PolicySpec::parse(&json).unwrap())
            .unwrap();
        c.set_device_policy(
            "net0",
            PolicySpec::parse(r#"{"stages":[{"stage":"meter"}]}"#).unwrap(),
        )
        .unwrap();
        cleared = c.set_device_policy("net0", PolicySpec::default()).unwrap();
    }
    // Another controller on the same etcd (a new leader) serves the same
    // policies, keys included, and keeps counting versions.
    let c = open(&etcd.url);
    let p = c.device_policy("disk0").expect("disk0's policy");
    assert_eq!(Some(&p), set.policy.as_ref());
    assert!(p.json_with_keys().contains(&key));
    assert!(c.device_policy("net0").is_none());
    let next = c
        .set_device_policy(
            "net0",
            PolicySpec::parse(r#"{"stages":[{"stage":"meter"}]}"#).unwrap(),
        )
        .unwrap();
    assert!(next.version > cleared.version);
}
