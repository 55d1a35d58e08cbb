//! AsyncEndpoint: completions awaited on tokio through the notify fd.

use std::time::Duration;

use vrio_rdma::conformance::memory::MemfdMemory;
use vrio_rdma::soft::SoftDomain;
use vrio_rdma::{
    Access, AsyncEndpoint, Domain, EndpointConfig, Opcode, RecvRequest, SendRequest, Sge, WcOpcode,
    WcStatus,
};

#[test]
fn awaits_write_with_imm_on_both_sides() {
    let (td, id) = (SoftDomain::new(), SoftDomain::new());
    let tmem = MemfdMemory::new("async-target", 1 << 16).unwrap();
    let imem = MemfdMemory::new("async-initiator", 1 << 16).unwrap();
    // SAFETY: both memories outlive their regions (dropped at the end).
    let tmr = unsafe { td.register(tmem.ptr(), tmem.len(), Access::GUEST_RAM) }.unwrap();
    // SAFETY: as above.
    let imr = unsafe { id.register(imem.ptr(), imem.len(), Access::LOCAL_ONLY) }.unwrap();
    let mut l = td.listen("127.0.0.1:0", EndpointConfig::default()).unwrap();
    let addr = l.local_addr();
    let t = std::thread::spawn(move || l.accept().unwrap());
    let iep = id.connect(&addr, EndpointConfig::default()).unwrap();
    let tep = t.join().unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut target = AsyncEndpoint::new(tep).unwrap();
        let mut ini = AsyncEndpoint::new(iep).unwrap();
        // Nothing posted: nothing completes (no spurious wakeup result).
        assert!(
            tokio::time::timeout(Duration::from_millis(200), ini.next_completion())
                .await
                .is_err()
        );

        target
            .endpoint()
            .post_recv(&[RecvRequest {
                wr_id: 77,
                local: Sge {
                    lkey: tmr.lkey(),
                    addr: tmr.addr(),
                    len: 0,
                },
            }])
            .unwrap();
        let waiter = tokio::spawn(async move {
            let c = target.next_completion().await.unwrap();
            (c, target)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        imem.write(0, b"async data");
        ini.endpoint()
            .post_send(&[SendRequest {
                wr_id: 1,
                opcode: Opcode::WriteWithImm {
                    remote_addr: tmr.addr() + 100,
                    rkey: tmr.rkey(),
                    imm: 9,
                },
                local: Sge {
                    lkey: imr.lkey(),
                    addr: imr.addr(),
                    len: 10,
                },
                signaled: true,
            }])
            .unwrap();
        let c = ini.next_completion().await.unwrap();
        assert_eq!(
            (c.wr_id, c.status, c.opcode),
            (1, WcStatus::Success, WcOpcode::Write)
        );
        let (t, _target) = waiter.await.unwrap();
        assert_eq!(
            (t.wr_id, t.status, t.opcode, t.imm),
            (77, WcStatus::Success, WcOpcode::RecvWithImm, Some(9))
        );
        assert_eq!(tmem.to_vec(100, 10), b"async data");

        // A batch: 20 READs, awaited with poll_batch until all are in.
        let wrs: Vec<SendRequest> = (0..20)
            .map(|k| SendRequest {
                wr_id: 100 + k,
                opcode: Opcode::Read {
                    remote_addr: tmr.addr() + 100,
                    rkey: tmr.rkey(),
                },
                local: Sge {
                    lkey: imr.lkey(),
                    addr: imr.addr() + 1024 + k * 16,
                    len: 10,
                },
                signaled: true,
            })
            .collect();
        ini.endpoint().post_send(&wrs).unwrap();
        let mut got = Vec::new();
        let mut buf = [c; 8];
        while got.len() < 20 {
            let n = ini.poll_batch(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got
            .iter()
            .enumerate()
            .all(|(k, c)| c.wr_id == 100 + k as u64 && c.status.is_ok()));
        assert_eq!(imem.to_vec(1024 + 19 * 16, 10), b"async data");
    });
    drop((tmr, imr));
}

#[test]
fn outside_a_runtime_is_an_error_not_a_panic() {
    let d = SoftDomain::new();
    let mut l = d.listen("127.0.0.1:0", EndpointConfig::default()).unwrap();
    let addr = l.local_addr();
    let t = std::thread::spawn(move || l.accept().unwrap());
    let ep = SoftDomain::new()
        .connect(&addr, EndpointConfig::default())
        .unwrap();
    let _peer = t.join().unwrap();
    assert!(AsyncEndpoint::new(ep).is_err());
}
