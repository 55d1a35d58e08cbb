//! Memory hot-plug: a new memory table while vrings run detaches each
//! attached vring (drained) and attaches it again at its index with the
//! new table, so the agent registers the new regions with the fabric (or
//! the sidecore queue gets the new mappings).

use std::ops::Deref;
use std::sync::Arc;

use vhost_user_backend::VringT;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

use super::{Mem, VrioBackend};

impl VrioBackend {
    /// SET_MEM_TABLE: keeps the new table, and moves the vrings attached
    /// over the old one to it.
    pub(super) fn set_memory(&self, mem: Mem) {
        let local = Arc::new(mem.memory().deref().clone());
        let regions: Vec<String> = local
            .iter()
            .map(|r| format!("{:#x}+{:#x}", r.start_addr().0, r.len()))
            .collect();
        tracing::info!(?regions, "memory table");
        let mut st = self.lock();
        let same = st.mem.as_ref().is_some_and(|old| {
            old.iter()
                .map(|r| (r.start_addr(), r.len()))
                .eq(local.iter().map(|r| (r.start_addr(), r.len())))
        });
        st.mem = Some(local);
        if same {
            return;
        }
        // Attached queues registered the old regions with the fabric (or
        // the sidecore holds the old table): each is detached and attached
        // again with the new table, at the index it stopped at. Until
        // then, no kick or rescan attaches it behind our back.
        let attached: Vec<usize> = st
            .queues
            .iter_mut()
            .enumerate()
            .filter(|(_, qs)| qs.is_attached())
            .map(|(q, qs)| {
                qs.paused = true;
                q
            })
            .collect();
        drop(st);
        for q in attached {
            self.reattach(q, &regions);
        }
    }

    /// Detaches vring `q` (drained) and attaches it again where it stopped,
    /// with the current memory table (memory hot-plug).
    fn reattach(&self, q: usize, regions: &[String]) {
        let vring = self.lock().queues.get(q).and_then(|qs| qs.vring().cloned());
        self.detach(q, true);
        if let Some(qs) = self.lock().queues.get_mut(q) {
            qs.paused = false;
        }
        let Some(vring) = vring else {
            return;
        };
        let at = vring.queue_next_avail();
        if self.ensure_attached(q, &vring) {
            tracing::info!(
                queue = q,
                at,
                ?regions,
                "vring re-attached with the new memory table"
            );
            // Requests posted while it was away announced themselves to
            // nobody.
            self.forward_kick(q);
        }
    }
}
