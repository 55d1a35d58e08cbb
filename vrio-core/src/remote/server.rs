//! The I/O server: accepts queue attachments from VM-host agents and hands
//! each queue to the least loaded of its sidecores.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vrio_rdma::{
    Access, Completion, Domain, Endpoint, EndpointConfig, FabricError, RecvRequest, Sge, WcOpcode,
    WcStatus,
};

use super::server_queue::{RemoteQueue, RemoteQueueConfig};
use super::staging::StagingBuffer;
use super::stats::RemoteStats;
use super::wire::{Attach, Message, MAX_MSG};
use crate::blk::{BlockBackend, BlockConfig, BlockDevice};
use crate::sidecore::{SidecoreConfig, SidecoreHandle, SidecoreThread};

#[derive(Debug, Clone)]
pub struct IoServerConfig {
    pub listen: String,
    pub sidecores: usize,
    pub sidecore: SidecoreConfig,
    pub queue: RemoteQueueConfig,
    pub blk: BlockConfig,
    pub endpoint: EndpointConfig,
}

impl Default for IoServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            sidecores: 1,
            sidecore: SidecoreConfig::default(),
            queue: RemoteQueueConfig::default(),
            blk: BlockConfig::default(),
            endpoint: EndpointConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("fabric: {0}")]
    Fabric(#[from] FabricError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("sidecore: {0}")]
    Sidecore(String),
}

pub struct IoServer {
    addr: String,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    sidecores: Arc<Mutex<Vec<(SidecoreHandle, usize)>>>,
    stats: Arc<RemoteStats>,
    domain: Arc<dyn Domain>,
    endpoint: EndpointConfig,
}

impl IoServer {
    pub fn start(
        domain: Arc<dyn Domain>,
        backend: Arc<dyn BlockBackend>,
        cfg: IoServerConfig,
    ) -> Result<Self, ServerError> {
        let mut listener = domain.listen(&cfg.listen, cfg.endpoint)?;
        let addr = listener.local_addr();
        let mut scs = Vec::new();
        for i in 0..cfg.sidecores.max(1) {
            let h = SidecoreThread::spawn(&format!("sidecore-{i}"), cfg.sidecore)
                .map_err(|e| ServerError::Sidecore(e.to_string()))?;
            scs.push((h, 0usize));
        }
        let sidecores = Arc::new(Mutex::new(scs));
        let stats = Arc::new(RemoteStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s, st, sc) = (
            domain.clone(),
            stop.clone(),
            stats.clone(),
            sidecores.clone(),
        );
        let accept = std::thread::Builder::new()
            .name("vrio-accept".into())
            .spawn(move || {
                while !s.load(Relaxed) {
                    let ep = match listener.accept() {
                        Ok(ep) => ep,
                        Err(e) => {
                            if !s.load(Relaxed) {
                                tracing::warn!(error = %e, "accept failed");
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            continue;
                        }
                    };
                    if s.load(Relaxed) {
                        break;
                    }
                    let peer = ep.peer();
                    match admit(&*d, ep, &backend, &cfg, &st) {
                        Ok(q) => {
                            let name = q.name().to_string();
                            let Ok(mut scs) = sc.lock() else { break };
                            let Some(best) = scs.iter_mut().min_by_key(|(_, n)| *n) else {
                                break;
                            };
                            match best.0.add(Box::new(q)) {
                                Ok(_) => {
                                    best.1 += 1;
                                    tracing::info!(queue = %name, %peer, "queue attached");
                                }
                                Err(e) => tracing::error!(error = %e, "sidecore gone"),
                            }
                        }
                        Err(e) => tracing::warn!(%peer, error = %e, "attach refused"),
                    }
                }
            })?;
        Ok(Self {
            addr,
            stop,
            accept: Some(accept),
            sidecores,
            stats,
            domain,
            endpoint: EndpointConfig::default(),
        })
    }

    /// Where agents connect.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn stats(&self) -> &Arc<RemoteStats> {
        &self.stats
    }

    /// Sidecore counters, summed.
    pub fn sidecore_stats(&self) -> crate::sidecore::StatsSnapshot {
        let mut t = crate::sidecore::StatsSnapshot::default();
        if let Ok(scs) = self.sidecores.lock() {
            for (h, _) in scs.iter() {
                let s = h.stats().snapshot();
                t.requests += s.requests;
                t.bytes += s.bytes;
                t.errors += s.errors;
                t.polls += s.polls;
                t.empty_polls += s.empty_polls;
                t.busy_ns += s.busy_ns;
                t.sleeps += s.sleeps;
                t.poll_mode_on += s.poll_mode_on;
                t.poll_mode_off += s.poll_mode_off;
            }
        }
        t
    }

    /// Stops accepting and stops the sidecores; returns their CPU time.
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Relaxed);
        // Unblock accept() with a connection of our own.
        let _ = self.domain.connect(&self.addr, self.endpoint);
        if let Some(j) = self.accept.take() {
            let _ = j.join();
        }
        let mut cpu = 0;
        if let Ok(mut scs) = self.sidecores.lock() {
            for (h, _) in scs.iter_mut() {
                h.stop();
                cpu += h.cpu_ns();
            }
        }
        cpu
    }
}

impl Drop for IoServer {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop();
        }
    }
}

/// Receives the ATTACH on a new endpoint and builds the queue.
fn admit(
    domain: &dyn Domain,
    mut ep: Box<dyn Endpoint>,
    backend: &Arc<dyn BlockBackend>,
    cfg: &IoServerConfig,
    stats: &Arc<RemoteStats>,
) -> Result<RemoteQueue<BlockDevice>, String> {
    let attach = {
        let buf = StagingBuffer::new(MAX_MSG).map_err(|e| e.to_string())?;
        // SAFETY: `buf` outlives `mr` (dropped at the end of this block,
        // after `mr`, which is declared later and so dropped first).
        let mr = unsafe { domain.register(buf.as_ptr(), buf.len(), Access::LOCAL_ONLY) }
            .map_err(|e| e.to_string())?;
        ep.post_recv(&[RecvRequest {
            wr_id: 1,
            local: Sge {
                lkey: mr.lkey(),
                addr: buf.addr(),
                len: MAX_MSG as u32,
            },
        }])
        .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut c = [Completion {
            wr_id: 0,
            status: WcStatus::Success,
            opcode: WcOpcode::Recv,
            byte_len: 0,
            imm: None,
        }];
        loop {
            if ep.poll(&mut c).map_err(|e| e.to_string())? == 1 {
                break;
            }
            if Instant::now() > deadline {
                return Err("no ATTACH within 10 s".into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if !c[0].status.is_ok() {
            return Err(format!("attach receive failed: {:?}", c[0].status));
        }
        let mut b = vec![0u8; (c[0].byte_len as usize).min(MAX_MSG)];
        buf.get(0, &mut b).map_err(|e| e.to_string())?;
        drop(mr);
        match Message::decode(&b) {
            Ok(Message::Attach(a)) => a,
            other => return Err(format!("expected ATTACH, got {other:?}")),
        }
    };
    admit_queue(domain, ep, &attach, backend, cfg, stats)
}

fn admit_queue(
    domain: &dyn Domain,
    ep: Box<dyn Endpoint>,
    attach: &Attach,
    backend: &Arc<dyn BlockBackend>,
    cfg: &IoServerConfig,
    stats: &Arc<RemoteStats>,
) -> Result<RemoteQueue<BlockDevice>, String> {
    let dev = BlockDevice::new(backend.clone(), cfg.blk.clone());
    let config = dev.config_space();
    let mut q = RemoteQueue::new(domain, ep, attach, dev, cfg.queue, stats.clone())
        .map_err(|e| e.to_string())?;
    q.reply_attach(config).map_err(|e| e.to_string())?;
    Ok(q)
}
