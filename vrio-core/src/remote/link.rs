//! A remote queue's link on the I/O server: its endpoint and the
//! registrations of the ring's buffers, pumped to and from the protocol
//! core (`proto::server::ServerRing`): completions in, the outbox out.

use std::time::Instant;

use vrio_rdma::{Access, Completion, Domain, Endpoint, MemoryRegion};

use crate::proto::queue_error::RemoteQueueError;
use crate::proto::server::{ServerRing, Wake};
use crate::sidecore::QueueFailure;

pub(super) struct Link {
    // Registrations before the endpoint, and the link before the core in
    // every queue: a region is deregistered before its memory goes.
    _mr_staging: Box<dyn MemoryRegion>,
    _mr_recv: Box<dyn MemoryRegion>,
    pub ep: Box<dyn Endpoint>,
    cqes: Vec<Completion>,
}

impl Link {
    /// Registers `ring`'s buffers in `domain`, starts the ring on `ep` and
    /// posts its receives.
    pub fn open(
        domain: &dyn Domain,
        ep: Box<dyn Endpoint>,
        ring: &mut ServerRing,
    ) -> Result<Self, RemoteQueueError> {
        let [(sp, sl), (rp, rl)] = ring.buffers();
        // SAFETY: both buffers are owned by the ring, which every queue
        // declares after its link, so they outlive these registrations.
        let mr_staging = unsafe { domain.register(sp, sl, Access::LOCAL_ONLY) }?;
        // SAFETY: as above.
        let mr_recv = unsafe { domain.register(rp, rl, Access::LOCAL_ONLY) }?;
        ring.start(mr_staging.lkey(), mr_recv.lkey());
        let mut link = Self {
            _mr_staging: mr_staging,
            _mr_recv: mr_recv,
            ep,
            cqes: vec![Completion::EMPTY; 64],
        };
        link.flush(ring)?;
        Ok(link)
    }

    /// Tells the ring the time and feeds it every completion waiting.
    pub fn pump(&mut self, ring: &mut ServerRing, now: Instant) -> Result<(), RemoteQueueError> {
        ring.set_now(now);
        loop {
            let n = self.ep.poll(&mut self.cqes)?;
            ring.on_completions(&self.cqes[..n])?;
            if n < self.cqes.len() {
                return Ok(());
            }
        }
    }

    /// Posts what the ring queued: work requests, then receives.
    pub fn flush(&mut self, ring: &mut ServerRing) -> Result<(), RemoteQueueError> {
        let (sends, recvs) = ring.outbox();
        if !sends.is_empty() {
            self.ep.post_send(sends)?;
        }
        if !recvs.is_empty() {
            self.ep.post_recv(recvs)?;
        }
        ring.clear_outbox();
        Ok(())
    }

    /// Does what the ring needs before its queue may sleep; true when the
    /// queue must be polled again.
    pub fn wake(&mut self, ring: &mut ServerRing, w: Wake) -> Result<bool, RemoteQueueError> {
        let again = match w {
            Wake::Poll => true,
            Wake::Sleep => false,
            Wake::ArmDoorbells => {
                self.pump(ring, Instant::now())?;
                let _ = self.ep.arm();
                // What arrived while arming.
                self.pump(ring, Instant::now())?;
                ring.has_news()
            }
        };
        self.flush(ring)?;
        Ok(again)
    }

    /// Answers the agent's ATTACH with the device's config space, as
    /// queue `ring`'s failure if that fails.
    pub fn reply_attach(
        &mut self,
        ring: &mut ServerRing,
        config: Vec<u8>,
        features: u64,
    ) -> Result<(), QueueFailure> {
        let r = ring
            .reply_attach(config, features)
            .and_then(|_| self.flush(ring));
        r.map_err(|e| ring.failure(e))
    }
}
