//! Where each vring goes and which agent serves it, shared by the front's
//! sessions and a controller follower.

use std::sync::{Arc, Mutex};

use crate::remote::{AttachedDevice, QueueTarget};

/// Per-vring placement, shared by the front's sessions and a controller
/// follower (`vrio-client vhost-user-blk --controller`).
#[derive(Default)]
pub struct Placement {
    /// Where to attach vring q; None: [`super::RemoteFront::server`], the
    /// server's choice of sidecore.
    pub targets: Mutex<Vec<Option<QueueTarget>>>,
    /// The agent serving vring q while it runs (its one queue, index 0).
    pub attached: Mutex<Vec<Option<Arc<AttachedDevice>>>>,
    /// Called with q each time vring q attaches (on the thread that
    /// attaches it: do not block). A controller-placed front tells the
    /// controller from here that the rings run on this VM host now, which
    /// is news after a live migration.
    pub on_attach: Mutex<Option<AttachHook>>,
}

/// See [`Placement::on_attach`].
pub type AttachHook = Arc<dyn Fn(usize) + Send + Sync>;

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("targets", &self.targets.lock().map(|t| t.clone()).ok())
            .finish_non_exhaustive()
    }
}

impl Placement {
    /// Where vring `q` attaches next (None: the server's choice).
    pub fn target(&self, q: usize) -> Option<QueueTarget> {
        self.targets.lock().ok()?.get(q).cloned().flatten()
    }
    /// Sets where vring `q` attaches next; a vring already attached stays
    /// where it is until it is attached again.
    pub fn set_target(&self, q: usize, t: QueueTarget) {
        if let Ok(mut v) = self.targets.lock() {
            if v.len() <= q {
                v.resize(q + 1, None);
            }
            v[q] = Some(t);
        }
    }
    /// The agent serving vring `q` now, if it runs.
    pub fn attached(&self, q: usize) -> Option<Arc<AttachedDevice>> {
        self.attached.lock().ok()?.get(q).cloned().flatten()
    }
    pub(super) fn set_attached(&self, q: usize, d: Option<Arc<AttachedDevice>>) {
        let attached = d.is_some();
        if let Ok(mut v) = self.attached.lock() {
            if v.len() <= q {
                v.resize(q + 1, None);
            }
            v[q] = d;
        }
        let hook = self.on_attach.lock().ok().and_then(|h| h.clone());
        if let (true, Some(hook)) = (attached, hook) {
            hook(q);
        }
    }
}
