//! A local transmit queue: pops chains and runs [`TxDevice`] on each.

use std::os::fd::RawFd;

use super::local_ring::{LocalRing, Popped};
use super::stats::DropReason;
use super::tx::TxDevice;
use crate::models::DeviceSide;
use crate::ring::{DescriptorChain, QueueError};
use crate::sidecore::{PollOutcome, QueueFailure, ServedQueue};

pub struct NetTxQueue {
    ring: LocalRing,
    device: TxDevice,
    chain: DescriptorChain,
}

impl NetTxQueue {
    pub fn new(side: DeviceSide, device: TxDevice) -> Result<Self, QueueError> {
        Ok(Self {
            ring: LocalRing::new(side)?,
            device,
            chain: DescriptorChain::default(),
        })
    }
}

impl ServedQueue for NetTxQueue {
    fn poll(&mut self, budget: usize) -> Result<PollOutcome, QueueFailure> {
        let mut out = PollOutcome::default();
        for _ in 0..budget {
            let head = match self.ring.pop(&mut self.chain)? {
                Popped::Empty => break,
                Popped::Bad(head) => {
                    self.device.port().stats().dropped(DropReason::BadChain);
                    out.errors += 1;
                    head
                }
                Popped::Chain => {
                    let mem = self.ring.mem.clone();
                    if let Err(e) = self.device.transmit(&*mem, &self.chain) {
                        return Err(self.ring.fail(e));
                    }
                    out.requests += 1;
                    out.bytes += self.chain.readable_len();
                    self.chain.head
                }
            };
            self.ring.complete(head, 0)?;
        }
        if out.requests + out.errors > 0 {
            self.ring.finish()?;
        }
        Ok(out)
    }

    fn set_notifications(&mut self, enabled: bool) -> Result<bool, QueueFailure> {
        self.ring.set_kicks(enabled)
    }

    fn kick_fd(&self) -> Option<RawFd> {
        Some(self.ring.kick_fd())
    }

    fn take_kick(&mut self) -> bool {
        self.ring.kick.read().is_ok()
    }

    fn name(&self) -> &str {
        &self.ring.name
    }
}
