//! Smoke test of the verbs back-end between two processes (run in the rxe
//! guest): `verbs_smoke target IP:PORT` and `verbs_smoke initiator IP:PORT`.
//! The target registers a buffer and SENDs its RemoteRegion; the initiator
//! WRITEs, READs back, checks, tries a bad rkey, and ends with WRITE_WITH_IMM.

use std::time::Duration;

use vrio_rdma::verbs::open_domain;
use vrio_rdma::{
    Access, Completion, Endpoint, EndpointConfig, Opcode, RecvRequest, RemoteRegion, SendRequest,
    Sge, WcOpcode, WcStatus,
};

const LEN: usize = 1 << 20;

fn wait_one(ep: &mut dyn Endpoint) -> Completion {
    let mut out = [Completion {
        wr_id: 0,
        status: WcStatus::Success,
        opcode: WcOpcode::Send,
        byte_len: 0,
        imm: None,
    }];
    loop {
        if ep.poll(&mut out).expect("poll") == 1 {
            return out[0];
        }
        ep.wait(Duration::from_secs(5)).expect("wait");
    }
}

fn check(name: &str, ok: bool) {
    println!("{} {name}", if ok { "PASS" } else { "FAIL" });
    if !ok {
        std::process::exit(1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (role, addr) = match args.as_slice() {
        [_, r, a] => (r.clone(), a.clone()),
        _ => {
            eprintln!("usage: verbs_smoke target|initiator IP:PORT");
            std::process::exit(2);
        }
    };
    let dom = open_domain(None).expect("open_domain");
    let mut buf = vec![0u8; LEN];
    // SAFETY: `buf` outlives the region (dropped at the end of main).
    let mr = unsafe { dom.register(buf.as_mut_ptr(), LEN, Access::GUEST_RAM) }.expect("register");
    let cfg = EndpointConfig::default();
    if role == "target" {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let mut l = dom.listen(&addr, cfg).expect("listen");
        println!("target listening on {}", l.local_addr());
        let mut ep = l.accept().expect("accept");
        // The last 64 bytes carry our RemoteRegion (with a 1 MiB - 64 length).
        let ctl = LEN - 64;
        let region = RemoteRegion {
            addr: mr.addr(),
            len: ctl as u64,
            rkey: mr.rkey(),
        };
        buf[ctl..ctl + RemoteRegion::WIRE_SIZE].copy_from_slice(&region.to_bytes());
        ep.post_recv(&[RecvRequest {
            wr_id: 9,
            local: Sge {
                lkey: mr.lkey(),
                addr: mr.addr() + ctl as u64 + 32,
                len: 32,
            },
        }])
        .expect("post_recv");
        ep.post_send(&[SendRequest {
            wr_id: 1,
            opcode: Opcode::Send,
            local: Sge {
                lkey: mr.lkey(),
                addr: mr.addr() + ctl as u64,
                len: RemoteRegion::WIRE_SIZE as u32,
            },
            signaled: true,
        }])
        .expect("post_send");
        let c = wait_one(&mut *ep);
        check("target send region", c.status.is_ok() && c.wr_id == 1);
        // The last completion is awaited on tokio through notify_fd, the
        // way agents wait.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let c = rt.block_on(async {
            let mut aep = vrio_rdma::AsyncEndpoint::new(ep).expect("async endpoint");
            aep.next_completion().await.expect("next_completion")
        });
        check(
            "target got write_with_imm (async)",
            c.status.is_ok() && c.opcode == WcOpcode::RecvWithImm && c.imm == Some(0xabcd),
        );
        check(
            "target sees initiator's write",
            buf[4096..8192].iter().all(|b| *b == 0x5a),
        );
        println!("target done");
    } else {
        let mut ep = loop {
            match dom.connect(&addr, cfg) {
                Ok(ep) => break ep,
                Err(e) => {
                    eprintln!("connect: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        };
        ep.post_recv(&[RecvRequest {
            wr_id: 7,
            local: Sge {
                lkey: mr.lkey(),
                addr: mr.addr(),
                len: 64,
            },
        }])
        .expect("post_recv");
        let c = wait_one(&mut *ep);
        check(
            "initiator recv region",
            c.status.is_ok() && c.opcode == WcOpcode::Recv && c.byte_len == 20,
        );
        let r = RemoteRegion::from_bytes(&buf[..20]).expect("region");
        // small (inline) write, big write, read back
        buf[4096..8192].fill(0x5a);
        buf[100..140].fill(0x77);
        let l = mr.lkey();
        let base = mr.addr();
        ep.post_send(&[
            SendRequest {
                wr_id: 10,
                opcode: Opcode::Write {
                    remote_addr: r.addr + 100,
                    rkey: r.rkey,
                },
                local: Sge {
                    lkey: l,
                    addr: base + 100,
                    len: 40,
                },
                signaled: false,
            },
            SendRequest {
                wr_id: 11,
                opcode: Opcode::Write {
                    remote_addr: r.addr + 4096,
                    rkey: r.rkey,
                },
                local: Sge {
                    lkey: l,
                    addr: base + 4096,
                    len: 4096,
                },
                signaled: true,
            },
            SendRequest {
                wr_id: 12,
                opcode: Opcode::Read {
                    remote_addr: r.addr + 65536,
                    rkey: r.rkey,
                },
                local: Sge {
                    lkey: l,
                    addr: base + 65536,
                    len: 65536,
                },
                signaled: true,
            },
            SendRequest {
                wr_id: 13,
                opcode: Opcode::Read {
                    remote_addr: r.addr + 100,
                    rkey: r.rkey,
                },
                local: Sge {
                    lkey: l,
                    addr: base + 200000,
                    len: 40,
                },
                signaled: true,
            },
        ])
        .expect("post batch");
        let c = wait_one(&mut *ep);
        check(
            "write 4k",
            c.status.is_ok() && c.wr_id == 11 && c.opcode == WcOpcode::Write,
        );
        let c = wait_one(&mut *ep);
        check(
            "read 64k",
            c.status.is_ok() && c.wr_id == 12 && c.opcode == WcOpcode::Read,
        );
        check(
            "read 64k data",
            buf[65536..131072]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == ((65536 + i) % 251) as u8),
        );
        let c = wait_one(&mut *ep);
        check(
            "read back inline write",
            c.status.is_ok() && buf[200000..200040].iter().all(|b| *b == 0x77),
        );
        ep.post_send(&[SendRequest {
            wr_id: 20,
            opcode: Opcode::WriteWithImm {
                remote_addr: r.addr,
                rkey: r.rkey,
                imm: 0xabcd,
            },
            local: Sge {
                lkey: l,
                addr: base + 8192,
                len: 8,
            },
            signaled: true,
        }])
        .expect("post imm");
        let c = wait_one(&mut *ep);
        check("write_with_imm", c.status.is_ok() && c.wr_id == 20);
        // A bad rkey: remote access error, then the QP is dead (verbs).
        ep.post_send(&[SendRequest {
            wr_id: 30,
            opcode: Opcode::Read {
                remote_addr: r.addr,
                rkey: r.rkey ^ 0x5555,
            },
            local: Sge {
                lkey: l,
                addr: base,
                len: 8,
            },
            signaled: true,
        }])
        .expect("post bad");
        let c = wait_one(&mut *ep);
        println!("bad rkey -> {:?} {:?}", c.status, c.opcode);
        check(
            "bad rkey",
            c.status == WcStatus::RemoteAccessError && c.wr_id == 30 && c.opcode == WcOpcode::Read,
        );
        println!("initiator done");
    }
    drop(mr);
    println!("SMOKE OK");
}
