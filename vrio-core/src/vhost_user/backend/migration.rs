//! Live migration of a guest whose vrings a remote I/O server serves.
//!
//! The server writes guest memory with one-sided WRITEs, which the VMM's
//! dirty tracking never sees. So the front offers `VHOST_F_LOG_ALL` (and,
//! through the relay, `LOG_SHMFD`): the relay maps the VMM's log
//! (SET_LOG_BASE) and hands it here; while the VMM acks LOG_ALL, every
//! attached queue's agent logs (`AttachedDevice::set_log`): its server
//! stops publishing used.idx, and the agent marks each batch's pages before
//! it publishes. Turning LOG_ALL off (a cancelled or failed migration)
//! really stops it. The switch returns only once every server confirmed,
//! and QEMU waits for SET_FEATURES with LOG_ALL before it copies memory.
//!
//! The stop is GET_VRING_BASE, as for any back-end: the vring drains (the
//! guest is paused, so nothing new arrives), the queue detaches from the
//! server at that index, and the destination's front attaches at the base
//! QEMU gives it.

use std::sync::Arc;

use crate::virtio::dirty_log::DirtyLog;

use super::serving::Serving;
use super::VrioBackend;

/// `VHOST_F_LOG_ALL`: the back-end logs its writes while this is acked.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

impl VrioBackend {
    /// Whether the front can log (the VMM may migrate): a remote server
    /// serves the vrings. A local sidecore writes guest memory with the
    /// CPU, which is not logged, so migration stays blocked there.
    pub fn can_log(&self) -> bool {
        matches!(self.cfg.serving, Serving::Remote(_))
    }

    /// The VMM's dirty log (SET_LOG_BASE, through the relay). If logging is
    /// on already (a new log after a memory change), the queues move to it.
    pub fn set_dirty_log(&self, log: DirtyLog) {
        tracing::info!(bytes = log.len(), "dirty log from the VMM (SET_LOG_BASE)");
        let log = Arc::new(log);
        let on = {
            let mut st = self.lock();
            st.dirty_log = Some(log.clone());
            st.acked & VHOST_F_LOG_ALL != 0
        };
        if on {
            self.switch_log(Some(log));
        }
    }

    /// SET_FEATURES: logging follows LOG_ALL, in both directions.
    pub(super) fn set_acked(&self, features: u64) {
        let (was, log) = {
            let mut st = self.lock();
            let was = st.acked & VHOST_F_LOG_ALL != 0;
            st.acked = features;
            (was, st.dirty_log.clone())
        };
        let on = features & VHOST_F_LOG_ALL != 0;
        if on == was {
            return;
        }
        if on && log.is_none() {
            tracing::error!("LOG_ALL without a dirty log (no SET_LOG_BASE): the I/O server's writes cannot be logged");
            return;
        }
        tracing::info!(
            logging = on,
            "the VMM switched dirty logging (live migration)"
        );
        self.switch_log(if on { log } else { None });
    }

    /// Puts every attached queue's agent on `log` (None: off); returns once
    /// their servers confirmed.
    fn switch_log(&self, log: Option<Arc<DirtyLog>>) {
        for (q, d) in self.remote_devices() {
            match d.set_log(log.clone()) {
                Ok(()) => tracing::debug!(queue = q, logging = log.is_some(), "queue switched"),
                Err(e) => {
                    tracing::error!(queue = q, error = %e, "the queue's I/O server did not confirm the dirty-log switch")
                }
            }
        }
    }
}
