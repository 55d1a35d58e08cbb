//! Runs pairs of synthetic net guests through a switch under one I/O model
//! (vhost-style workers, a polling sidecore, or remote sidecores on an
//! in-process I/O server) and gathers figures.
//! Guests `2i` and `2i+1` send to each other; every guest runs a sender
//! and a receiver thread.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use crate::cputime::{spawn_timed, FabricCpuClock};
use crate::guest::GuestError;
use crate::net::guest::{NetGuest, NetGuestConfig, RX_QUEUE, TX_QUEUE};
use crate::net::traffic::{
    run_receiver, run_sender, Link, RecvConfig, RecvReport, SendConfig, SendReport,
};
use crate::runner::{
    listen_addr_for, open_domain, open_domains, queue_attach, serve_local, LocalModel, RunClock,
    RunCost, RunError,
};
use vrio_core::models::LocalQueue;
use vrio_core::net::rx::RxDevice;
use vrio_core::net::rx_queue::NetRxQueue;
use vrio_core::net::stats::PortSnapshot;
use vrio_core::net::switch::{Switch, SwitchConfig};
use vrio_core::net::tx::TxDevice;
use vrio_core::net::SwitchPort;
use vrio_core::ring::RingFeatures;
use vrio_core::sidecore::ServedQueue;

#[derive(Debug, Clone, Copy)]
pub struct NetRunConfig {
    /// Guests, in sending pairs (rounded up to even).
    pub guests: u32,
    pub frame_len: usize,
    /// Frames each guest sends (0: until `duration`).
    pub frames: u64,
    pub duration: Option<Duration>,
    pub window: u64,
    pub queue_size: u16,
    pub rx_buf_len: u32,
    pub mergeable: bool,
    pub features: RingFeatures,
    pub switch: SwitchConfig,
    pub stall_timeout: Duration,
}

impl Default for NetRunConfig {
    fn default() -> Self {
        Self {
            guests: 2,
            frame_len: 1514,
            frames: 10_000,
            duration: None,
            window: 256,
            queue_size: 256,
            rx_buf_len: 2048,
            mergeable: true,
            features: RingFeatures {
                indirect: true,
                event_idx: true,
            },
            switch: SwitchConfig::default(),
            stall_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NetReport {
    pub model: String,
    pub sent: SendReport,
    pub recv: RecvReport,
    pub cost: RunCost,
    /// Per guest port, in guest order.
    pub ports: Vec<PortSnapshot>,
}

impl NetReport {
    pub fn packets_per_sec(&self) -> f64 {
        self.cost.per_sec(self.recv.received as f64)
    }
    pub fn gbit_per_sec(&self) -> f64 {
        self.cost.per_sec(self.recv.bytes as f64 * 8.0 / 1e9)
    }
    pub fn packets_per_core_sec(&self) -> f64 {
        self.cost.per_core_sec(self.recv.received as f64)
    }
    pub fn gbit_per_core_sec(&self) -> f64 {
        self.cost.per_core_sec(self.recv.bytes as f64 * 8.0 / 1e9)
    }
    pub fn port_drops(&self) -> u64 {
        self.ports.iter().map(PortSnapshot::total_drops).sum()
    }
    /// Must be 0 for a correct device and switch.
    pub fn failures(&self) -> u64 {
        self.recv.failures() + self.sent.protocol_errors + u64::from(self.sent.stalled)
    }
}

/// A guest attached to the switch: its device queues and its port.
pub struct AttachedNetGuest {
    pub guest: NetGuest,
    pub rx: NetRxQueue,
    pub tx: LocalQueue<TxDevice>,
    pub port: Arc<vrio_core::net::Port>,
}

/// Makes a guest, a switch port with its MAC, and the device queues.
pub fn attach_net_guest(
    switch: &Arc<Switch>,
    cfg: NetGuestConfig,
    mergeable: bool,
) -> Result<AttachedNetGuest, RunError> {
    let guest = NetGuest::new(cfg)?;
    let port = switch.add_guest_port(&format!("net{}", cfg.id), cfg.mac);
    let dev = |e: vrio_core::ring::QueueError| RunError::Device(e.to_string());
    let rx = NetRxQueue::new(
        guest.device_side(RX_QUEUE)?,
        RxDevice::new(mergeable),
        port.clone(),
    )
    .map_err(dev)?;
    let tx = LocalQueue::new(
        guest.device_side(TX_QUEUE)?,
        SwitchPort::tx(switch.clone(), port.clone()),
    )
    .map_err(dev)?;
    Ok(AttachedNetGuest {
        guest,
        rx,
        tx,
        port,
    })
}

/// The guests of `rc`, in sending pairs (rounded up to even).
fn guest_configs(rc: &NetRunConfig) -> Vec<NetGuestConfig> {
    let n = rc.guests.max(2).div_ceil(2) * 2;
    (0..n)
        .map(|id| NetGuestConfig {
            queue_size: rc.queue_size,
            rx_buf_len: rc.rx_buf_len,
            features: rc.features,
            ..NetGuestConfig::new(id)
        })
        .collect()
}

/// Runs `rc` under `model`.
pub fn run_net(
    model: LocalModel,
    rc: &NetRunConfig,
    progress: &Arc<AtomicU64>,
) -> Result<NetReport, RunError> {
    let switch = Switch::new(rc.switch);
    let mut guests = Vec::new();
    let mut devices: Vec<Vec<Box<dyn ServedQueue>>> = Vec::new();
    let mut ports = Vec::new();
    for cfg in guest_configs(rc) {
        let a = attach_net_guest(&switch, cfg, rc.mergeable)?;
        devices.push(vec![Box::new(a.rx), Box::new(a.tx)]);
        ports.push(a.port);
        guests.push(a.guest);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let clock = RunClock::start();
    let (run, device_cpu_ns, stats) =
        serve_local(model, devices, "net", || drive(guests, rc, progress, &stop))?;
    let (sent, recv, guest_cpu_ns) = run?;
    let wall = clock.wall();
    Ok(NetReport {
        model: model.name(),
        sent,
        recv,
        cost: clock
            .cost(wall, device_cpu_ns, stats)
            .with_guest_cpu(guest_cpu_ns),
        ports: ports.iter().map(|p| p.stats().snapshot()).collect(),
    })
}

/// Attaches `guest`'s RX and TX queues to the I/O server at `server`
/// through an agent of its own, in a protection domain of its own on
/// `fabric`.
pub fn attach_net_remote(
    guest: &NetGuest,
    device_id: u64,
    server: &str,
    mode: vrio_core::remote::NotifyMode,
    fabric: vrio_rdma::Backend,
) -> Result<vrio_core::remote::AttachedDevice, RunError> {
    let agent = crate::runner::new_agent()?;
    attach_net_in(
        &agent,
        open_domain(fabric, None)?,
        guest,
        device_id,
        server,
        mode,
        None,
    )
}

/// [`attach_net_remote`] with the device in `domain`, served by `agent`.
fn attach_net_in(
    agent: &vrio_core::remote::Agent,
    domain: Arc<dyn vrio_rdma::Domain>,
    guest: &NetGuest,
    device_id: u64,
    server: &str,
    mode: vrio_core::remote::NotifyMode,
    credential: Option<String>,
) -> Result<vrio_core::remote::AttachedDevice, RunError> {
    use vrio_core::remote::{AgentConfig, DeviceAttach};
    let mut queues = Vec::new();
    for q in [RX_QUEUE, TX_QUEUE] {
        queues.push(queue_attach(guest.device_side(q)?));
    }
    agent
        .attach(
            domain,
            server,
            DeviceAttach {
                device_id,
                mem: guest.memory().clone(),
                queues,
                credential,
            },
            AgentConfig {
                mode,
                device: vrio_core::remote::DeviceKind::Net { mac: guest.cfg.mac },
                ..AgentConfig::default()
            },
        )
        .map_err(|e| RunError::Model(e.to_string()))
}

/// The I/O server's view of a remote net run.
#[derive(Debug, Clone, Default)]
pub struct RemoteNetFigures {
    pub fabric: vrio_core::remote::RemoteSnapshot,
    /// CPU time of the VM-host agents.
    pub vmhost_cpu_ns: u64,
    /// CPU time of the VM host's fabric threads (0 with a NIC).
    pub vmhost_fabric_cpu_ns: u64,
    /// CPU time of the I/O server's fabric threads.
    pub server_fabric_cpu_ns: u64,
}

/// Runs `rc` against remote sidecores: an in-process I/O server whose
/// switch connects the guests (guest `i` is device `i`, port MAC
/// `MacAddr::local(i)`), one agent per guest, over `fabric` on this host.
/// Credentials are on: a fresh key, one credential per guest.
pub fn run_net_remote(
    mode: vrio_core::remote::NotifyMode,
    sidecores: usize,
    fabric: vrio_rdma::Backend,
    rc: &NetRunConfig,
    progress: &Arc<AtomicU64>,
) -> Result<(NetReport, RemoteNetFigures), RunError> {
    use vrio_core::remote::{IoServer, IoServerConfig, NetServerConfig};
    let cfgs = guest_configs(rc);
    let server_domain = open_domain(fabric, None)?;
    let keys = Arc::new(
        vrio_core::tenancy::Keyring::ephemeral().map_err(|e| RunError::Model(e.to_string()))?,
    );
    let server = IoServer::start(
        Arc::clone(&server_domain),
        Arc::new(vrio_core::blk::MemoryBackend::new(1 << 20)),
        IoServerConfig {
            listen: listen_addr_for(fabric),
            sidecores,
            net: NetServerConfig {
                switch: rc.switch,
                mergeable: rc.mergeable,
                devices: cfgs.iter().map(|c| (u64::from(c.id), c.mac)).collect(),
            },
            keys: Some(keys.clone()),
            ..IoServerConfig::default()
        },
    )
    .map_err(|e| RunError::Model(e.to_string()))?;
    let mut guests = Vec::new();
    let mut agents = Vec::new();
    let agent = crate::runner::new_agent()?;
    let host_domains = open_domains(fabric, None, cfgs.len())?;
    for (c, domain) in cfgs.into_iter().zip(&host_domains) {
        let g = NetGuest::new(c)?;
        let id = u64::from(c.id);
        // Net devices name no volume; the credential still binds the device.
        let credential = keys
            .mint(
                id,
                "net",
                vrio_core::tenancy::AccessMode::ReadOnly,
                "",
                std::time::Duration::from_secs(3600),
            )
            .map_err(|e| RunError::Model(e.to_string()))?;
        agents.push(attach_net_in(
            &agent,
            Arc::clone(domain),
            &g,
            id,
            server.addr(),
            mode,
            Some(credential),
        )?);
        guests.push(g);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let fabric_clock = FabricCpuClock::start(&server_domain, &host_domains);
    let clock = RunClock::start();
    let (sent, recv, guest_cpu_ns) = drive(guests, rc, progress, &stop)?;
    let wall = clock.wall();
    let mut fig = RemoteNetFigures::default();
    for a in agents.iter_mut() {
        a.detach();
    }
    fig.vmhost_cpu_ns = agent.cpu_ns();
    // Before `stop`, whose own connection to the server is no request's.
    (fig.vmhost_fabric_cpu_ns, fig.server_fabric_cpu_ns) = fabric_clock.elapsed();
    // After the sidecores stopped: nothing is counted any more.
    let device_cpu_ns = server.stop();
    let stats = server.sidecore_stats();
    fig.fabric = server.net_stats().snapshot();
    let ports = server
        .net()
        .port_stats()
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    Ok((
        NetReport {
            model: format!("remote {} x{}", mode.name(), sidecores.max(1)),
            sent,
            recv,
            cost: clock
                .cost(wall, device_cpu_ns, stats)
                .with_guest_cpu(guest_cpu_ns),
            ports,
        },
        fig,
    ))
}

/// Guest `i` sends on link `i` to its peer `i ^ 1` and receives link `i ^ 1`.
/// Returns what was sent, what was received, and the CPU time of the
/// guests' sender and receiver threads.
fn drive(
    guests: Vec<NetGuest>,
    rc: &NetRunConfig,
    progress: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
) -> Result<(SendReport, RecvReport, u64), RunError> {
    let links: Vec<Arc<Link>> = guests.iter().map(|_| Arc::new(Link::default())).collect();
    let macs: Vec<_> = guests.iter().map(|g| g.cfg.mac).collect();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (i, g) in guests.into_iter().enumerate() {
        let me = g.cfg.mac;
        let peer = *macs
            .get(i ^ 1)
            .ok_or_else(|| RunError::Guest(GuestError::Config("guests come in pairs".into())))?;
        let (mem, mut rxq, mut txq) = g.into_parts();
        let scfg = SendConfig {
            dst: peer,
            frames: rc.frames,
            duration: rc.duration,
            frame_len: rc.frame_len,
            window: rc.window,
            stall_timeout: rc.stall_timeout,
        };
        let rcfg = RecvConfig {
            peer,
            stall_timeout: rc.stall_timeout,
        };
        let (out, inn) = (links[i].clone(), links[i ^ 1].clone());
        let (m2, stop, progress) = (mem.clone(), stop.clone(), progress.clone());
        senders.push(spawn_timed(move || {
            run_sender(&mut txq, &mem, me, &scfg, &out, &stop)
        }));
        receivers.push(spawn_timed(move || {
            run_receiver(&mut rxq, &m2, me, &rcfg, &inn, &progress)
        }));
    }
    let mut cpu = 0;
    let mut s = SendReport::default();
    for t in senders {
        match t.join() {
            Ok((r, c)) => {
                cpu += c;
                s.sent += r.sent;
                s.bytes += r.bytes;
                s.protocol_errors += r.protocol_errors;
                s.stalled |= r.stalled;
                s.elapsed = s.elapsed.max(r.elapsed);
            }
            Err(_) => s.protocol_errors += 1,
        }
    }
    let mut r = RecvReport::default();
    for t in receivers {
        match t.join() {
            Ok((x, c)) => {
                cpu += c;
                r.merge(&x);
            }
            Err(_) => r.protocol_errors += 1,
        }
    }
    Ok((s, r, cpu))
}
