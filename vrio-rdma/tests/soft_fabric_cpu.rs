//! `Domain::fabric_cpu_ns` on the soft back-end: the CPU of the threads its
//! endpoints run (accepted ones count for the listener's domain) grows when
//! they move data, stays near zero when idle, and survives their exit.

use std::time::Duration;

use vrio_rdma::conformance::memory::MemfdMemory;
use vrio_rdma::{
    Access, Backend, Completion, Domain, EndpointConfig, Opcode, SendRequest, Sge, WcOpcode,
    WcStatus,
};

const MS: u64 = 1_000_000;

fn soft() -> Box<dyn Domain> {
    vrio_rdma::open(Backend::Soft, None).unwrap()
}

#[test]
fn a_domain_without_endpoints_used_no_fabric_cpu() {
    let d = soft();
    let mem = MemfdMemory::new("cpu-idle", 1 << 16).unwrap();
    // SAFETY: `mem` outlives the region (dropped first, below).
    let mr = unsafe { d.register(mem.ptr(), mem.len(), Access::GUEST_RAM) }.unwrap();
    let _l = d.listen("127.0.0.1:0", EndpointConfig::default()).unwrap();
    assert_eq!(d.fabric_cpu_ns(), 0);
    drop(mr);
}

#[test]
fn fabric_cpu_grows_with_traffic_and_counts_exited_threads() {
    let (target, ini) = (soft(), soft());
    let tmem = MemfdMemory::new("cpu-target", 4 << 20).unwrap();
    let imem = MemfdMemory::new("cpu-initiator", 4 << 20).unwrap();
    // SAFETY: both memories outlive their regions (dropped at the end).
    let tmr = unsafe { target.register(tmem.ptr(), tmem.len(), Access::GUEST_RAM) }.unwrap();
    // SAFETY: as above.
    let imr = unsafe { ini.register(imem.ptr(), imem.len(), Access::LOCAL_ONLY) }.unwrap();
    let mut l = target
        .listen("127.0.0.1:0", EndpointConfig::default())
        .unwrap();
    let addr = l.local_addr();
    let acc = std::thread::spawn(move || l.accept().unwrap());
    let mut ep = ini.connect(&addr, EndpointConfig::default()).unwrap();
    let peer = acc.join().unwrap();

    // Connected but idle: the threads sleep in recv and on a condvar.
    let idle0 = target.fabric_cpu_ns();
    std::thread::sleep(Duration::from_millis(200));
    let idle = target.fabric_cpu_ns() - idle0;
    assert!(idle < 20 * MS, "idle endpoints used {idle} ns in 200 ms");

    // 256 MiB of 64 KiB READs and WRITEs, 16 in flight: the target's rx
    // thread answers every READ and places every WRITE.
    let size: u32 = 64 << 10;
    let depth = 16u64;
    let remote = tmr.remote();
    let wr = |k: u64| {
        let off = (k % depth) * u64::from(size);
        let (remote_addr, rkey) = (remote.addr + off, remote.rkey);
        SendRequest {
            wr_id: k,
            opcode: if k % 2 == 0 {
                Opcode::Read { remote_addr, rkey }
            } else {
                Opcode::Write { remote_addr, rkey }
            },
            local: Sge {
                lkey: imr.lkey(),
                addr: imr.addr() + off,
                len: size,
            },
            signaled: true,
        }
    };
    let before = target.fabric_cpu_ns();
    let total = 4096u64;
    let (mut posted, mut done) = (0u64, 0u64);
    let mut cqe = [Completion {
        wr_id: 0,
        status: WcStatus::Success,
        opcode: WcOpcode::Read,
        byte_len: 0,
        imm: None,
    }; 32];
    while done < total {
        while posted < total && posted - done < depth {
            ep.post_send(&[wr(posted)]).unwrap();
            posted += 1;
        }
        let mut n = ep.poll(&mut cqe).unwrap();
        if n == 0 {
            ep.wait(Duration::from_secs(10)).unwrap();
            n = ep.poll(&mut cqe).unwrap();
        }
        for c in &cqe[..n] {
            assert!(c.status.is_ok(), "{c:?}");
        }
        done += n as u64;
    }
    let busy = target.fabric_cpu_ns();
    println!(
        "target fabric CPU: idle {idle} ns in 200 ms, {} ns for {total} ops; initiator {} ns",
        busy - before,
        ini.fabric_cpu_ns()
    );
    assert!(
        busy - before > idle.max(MS),
        "256 MiB through the target's fabric threads used {} ns (idle: {idle} ns)",
        busy - before
    );
    assert!(ini.fabric_cpu_ns() > 0, "the initiator's threads received");

    // Closed endpoints' threads exit; what they used stays counted.
    drop(ep);
    drop(peer);
    let after = target.fabric_cpu_ns();
    assert!(after >= busy, "exited threads lost: {after} < {busy}");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(target.fabric_cpu_ns(), after, "no thread runs any more");
    drop((tmr, imr));
}
