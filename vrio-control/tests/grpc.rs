//! The gRPC surface: auth, status codes, watch streams, lease failover over
//! the wire, health. Runs a real server on 127.0.0.1:0.

mod common;

use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use vrio_control::client::{connect, Client};
use vrio_control::pb;
use vrio_control::server::ServeOptions;
use vrio_control::ControllerConfig;

const TOKEN: &str = "test-token";

async fn start(lease_ttl_ms: u64) -> (String, tokio::sync::oneshot::Sender<()>) {
    let config = ControllerConfig {
        lease_ttl_ms,
        ..ControllerConfig::default()
    };
    let opts = ServeOptions {
        token: Some(TOKEN.into()),
        tick: Duration::from_millis(20),
        rebalance_every: None,
        tls: None,
    };
    common::start(config, opts).await
}

/// A plain channel to `addr`, without the token.
async fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn register(id: &str, cores: u32, cap: u32) -> pb::RegisterServerRequest {
    pb::RegisterServerRequest {
        id: id.into(),
        address: format!("{id}.example:7471"),
        sidecores: cores,
        capacity: cap,
    }
}

fn attach(id: &str, queues: u32) -> pb::AttachDeviceRequest {
    pb::AttachDeviceRequest {
        device: Some(pb::Device {
            id: id.into(),
            vm_id: "vm1".into(),
            r#type: pb::DeviceType::Blk as i32,
            queues,
            agent_address: "host1:7000".into(),
            pinned_server_id: String::new(),
        }),
    }
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.code(),
    }
}

/// Renews `id`'s lease every 50 ms until aborted.
fn keep_renewing(c: &Client, id: &str) -> tokio::task::JoinHandle<()> {
    let (mut c, id) = (c.clone(), id.to_string());
    tokio::spawn(async move {
        loop {
            let _ = c
                .renew_lease(pb::RenewLeaseRequest {
                    server_id: id.clone(),
                })
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

async fn assignments(c: &mut Client) -> Vec<pb::Assignment> {
    c.list_assignments(pb::ListAssignmentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .assignments
}

async fn list_servers(c: &mut Client) -> Vec<pb::IoServer> {
    c.list_servers(pb::ListServersRequest {})
        .await
        .unwrap()
        .into_inner()
        .servers
}

/// Attaches device `id` with `queues` queues; returns where they went.
async fn place(c: &mut Client, id: &str, queues: u32) -> Vec<pb::Assignment> {
    c.attach_device(attach(id, queues))
        .await
        .unwrap()
        .into_inner()
        .assignments
}

/// Watches every assignment.
async fn watch(c: &mut Client) -> Streaming<pb::AssignmentEvent> {
    c.watch_assignments(pb::WatchAssignmentsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn calls_without_the_right_token_are_rejected() {
    let (addr, _stop) = start(60_000).await;
    for token in [None, Some("wrong"), Some("")] {
        let mut c = connect(&addr, token).await.unwrap();
        let err = c.stats(pb::StatsRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "token {token:?}");
        let err = c.register_server(register("a", 1, 1)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "token {token:?}");
        let err = c
            .watch_assignments(pb::WatchAssignmentsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "token {token:?}");
    }
    // Nothing the rejected calls tried took effect.
    let mut c = connect(&addr, Some(TOKEN)).await.unwrap();
    let stats = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.servers, 0);
}

#[tokio::test]
async fn health_is_served_without_a_token() {
    let (addr, _stop) = start(60_000).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&addr).await);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "vrio.control.v1.Control".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn reflection_lists_the_services_for_grpcurl() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let (addr, _stop) = start(60_000).await;
    let mut client = ServerReflectionClient::new(channel(&addr).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer {msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"vrio.control.v1.Control".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn bad_requests_map_to_status_codes() {
    let (addr, _stop) = start(60_000).await;
    let mut c = connect(&addr, Some(TOKEN)).await.unwrap();
    c.register_server(register("a", 2, 8)).await.unwrap();
    c.attach_device(attach("disk0", 2)).await.unwrap();
    let before = assignments(&mut c).await;

    assert_eq!(
        code(c.register_server(register("a", 2, 8)).await),
        Code::AlreadyExists
    );
    let mut untyped = attach("x", 1);
    untyped.device.as_mut().unwrap().r#type = 0;
    for (req, want) in [
        (attach("disk0", 1), Code::AlreadyExists),
        (attach("big", 100), Code::ResourceExhausted),
        (untyped, Code::InvalidArgument),
        (
            pb::AttachDeviceRequest { device: None },
            Code::InvalidArgument,
        ),
    ] {
        let what = format!("{req:?}");
        assert_eq!(code(c.attach_device(req).await), want, "{what}");
    }
    let mv = |d: &str, q: u32, s: &str, core: u32| pb::MoveQueueRequest {
        device_id: d.into(),
        queue: q,
        server_id: s.into(),
        sidecore: core,
    };
    for (req, want) in [
        (mv("nope", 0, "a", 0), Code::NotFound),
        (mv("disk0", 0, "nope", 0), Code::NotFound),
        (mv("disk0", 0, "a", 9), Code::InvalidArgument),
        (mv("disk0", 5, "a", 0), Code::InvalidArgument),
    ] {
        let what = format!("{req:?}");
        assert_eq!(code(c.move_queue(req).await), want, "{what}");
    }
    assert_eq!(
        code(
            c.detach_device(pb::DetachDeviceRequest {
                device_id: "nope".into()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.drain_server(pb::DrainServerRequest {
                server_id: "a".into()
            })
            .await
        ),
        Code::FailedPrecondition,
        "draining the only server has nowhere to go"
    );
    assert_eq!(assignments(&mut c).await, before);
    let servers = list_servers(&mut c).await;
    assert!(
        !servers[0].draining,
        "a failed drain must not leave the server draining"
    );
}

#[tokio::test]
async fn watch_streams_snapshot_moves_and_lease_failover() {
    // Short lease: server b stops renewing and its queues must fail over to a.
    let (addr, _stop) = start(1500).await;
    let mut c = connect(&addr, Some(TOKEN)).await.unwrap();
    c.register_server(register("a", 2, 8)).await.unwrap();
    // Keep a alive until b's queues have failed over.
    let renewer = keep_renewing(&c, "a");
    c.register_server(register("b", 2, 8)).await.unwrap();
    // b too renews until the queues are placed and the watch is open: on a
    // loaded machine its lease must not lapse before we look.
    let b_renewer = keep_renewing(&c, "b");
    let placed = place(&mut c, "disk0", 4).await;
    let on_b: Vec<u32> = placed
        .iter()
        .filter(|a| a.server_id == "b")
        .map(|a| a.queue)
        .collect();
    assert_eq!(on_b.len(), 2);

    let mut watch = watch(&mut c).await;
    for _ in 0..4 {
        let e = watch.next().await.unwrap().unwrap();
        assert_eq!(e.kind, pb::EventKind::Snapshot as i32);
    }
    b_renewer.abort();
    let b_last_renewed = std::time::Instant::now();

    let mut failed_over = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    while failed_over.len() < on_b.len() {
        tokio::select! {
            e = watch.next() => {
                let e = e.unwrap().unwrap();
                assert_eq!(e.kind, pb::EventKind::Moved as i32);
                assert_eq!(e.reason, "failover");
                assert_eq!(e.previous.unwrap().server_id, "b");
                let a = e.assignment.unwrap();
                assert_eq!(a.server_id, "a");
                failed_over.push(a.queue);
            }
            _ = &mut deadline => panic!("no failover within 20 s; got {failed_over:?}"),
        }
    }
    renewer.abort();
    // A figure for the notes, not an assertion: lease 1500 ms, tick 20 ms.
    eprintln!(
        "failover: b's queues moved {} ms after its last renewal (lease 1500 ms, tick 20 ms)",
        b_last_renewed.elapsed().as_millis()
    );
    failed_over.sort();
    assert_eq!(failed_over, on_b);
    let stats = c.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.failovers, 1);
    assert_eq!(stats.alive_servers, 1);
    assert_eq!(
        c.renew_lease(pb::RenewLeaseRequest {
            server_id: "b".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn lease_keeper_keeps_its_lease_while_a_silent_server_fails_over() {
    let (addr, _stop) = start(1500).await;
    let mut c = connect(&addr, Some(TOKEN)).await.unwrap();
    let (stop_keeper, keeper_stopped) = tokio::sync::oneshot::channel::<()>();
    let keeper = tokio::spawn(vrio_control::io_server::keep_registered(
        c.clone(),
        register("a", 1, 8),
        || {
            vec![pb::SidecoreLoad {
                sidecore: 0,
                busy: 0.0,
                requests_per_sec: 1234.0,
            }]
        },
        async {
            let _ = keeper_stopped.await;
        },
    ));
    // Wait until the lease keeper has registered a.
    let registered_by = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let servers = list_servers(&mut c).await;
        if servers.iter().any(|s| s.id == "a") {
            break;
        }
        assert!(
            std::time::Instant::now() < registered_by,
            "the lease keeper did not register a within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.register_server(register("b", 1, 8)).await.unwrap();
    // b renews until its queue is placed (a loaded machine must not let its
    // lease lapse first), then goes silent.
    let b_renewer = keep_renewing(&c, "b");
    let mut watch = watch(&mut c).await;
    let placed = place(&mut c, "disk0", 2).await;
    // With both registered, one queue lands on each.
    let mut servers: Vec<&str> = placed.iter().map(|a| a.server_id.as_str()).collect();
    servers.sort();
    assert_eq!(servers, ["a", "b"]);
    b_renewer.abort();
    // b renews no more; its queue must move to a, whose lease keeper keeps it alive.
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            e = watch.next() => {
                let e = e.unwrap().unwrap();
                if e.reason == "failover" {
                    assert_eq!(e.assignment.unwrap().server_id, "a");
                    break;
                }
            }
            _ = &mut deadline => panic!("b's queue never failed over"),
        }
    }
    let servers = list_servers(&mut c).await;
    let a = servers.iter().find(|s| s.id == "a").unwrap();
    let b = servers.iter().find(|s| s.id == "b").unwrap();
    assert!(a.alive && !b.alive);
    // Its lease outlived the TTL only through load reports, so one arrived.
    assert_eq!(a.load[0].requests_per_sec, 1234.0);
    assert_eq!(a.assigned_queues, 2);
    let _ = stop_keeper.send(());
    keeper.await.unwrap();
}

fn grant_req(volume: &str, device: &str, mode: pb::AccessMode) -> pb::GrantVolumeRequest {
    pb::GrantVolumeRequest {
        volume: volume.into(),
        device_id: device.into(),
        mode: mode as i32,
        host: String::new(),
    }
}

#[tokio::test]
async fn volume_calls_answer_with_clear_status_codes() {
    let (addr, _stop) = start(60_000).await;
    let mut bad = connect(&addr, Some("wrong")).await.unwrap();
    let create = |name: &str, size_bytes: u64| pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes,
    };
    assert_eq!(
        code(bad.create_volume(create("vol-a", 1 << 20)).await),
        Code::Unauthenticated
    );
    let mut c = connect(&addr, Some(TOKEN)).await.unwrap();
    c.create_volume(create("vol-a", 1 << 20)).await.unwrap();
    assert_eq!(
        code(c.create_volume(create("vol-a", 1 << 20)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.create_volume(create("a/b", 1 << 20)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_volume(create("vol-b", 1000)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.grant_volume(grant_req("vol-a", "disk0", pb::AccessMode::Unspecified))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.grant_volume(grant_req("vol-z", "disk0", pb::AccessMode::Rw))
                .await
        ),
        Code::NotFound
    );
    let g = c
        .grant_volume(grant_req("vol-a", "disk0", pb::AccessMode::Ro))
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    assert_eq!(g.mode, pb::AccessMode::Ro as i32);
    let volumes = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(volumes.len(), 1);
    assert_eq!(
        (volumes[0].size_bytes, volumes[0].grants.len()),
        (1 << 20, 1)
    );
    let delete = |force| pb::DeleteVolumeRequest {
        name: "vol-a".into(),
        force,
    };
    assert_eq!(
        code(c.delete_volume(delete(false)).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            c.revoke_grant(pb::RevokeGrantRequest {
                volume: "vol-a".into(),
                device_id: "disk9".into(),
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.issue_credential(pb::IssueCredentialRequest {
                device_id: "disk0".into(),
            })
            .await
        ),
        Code::NotFound
    );
    let revoked = c
        .delete_volume(delete(true))
        .await
        .unwrap()
        .into_inner()
        .revoked;
    assert_eq!(revoked, vec![g]);
    assert_eq!(code(c.delete_volume(delete(true)).await), Code::NotFound);
}
