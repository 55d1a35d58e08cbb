//! Control-plane tasks beside a synchronous data path: each runs on a small
//! tokio runtime of its own thread, so a VMM or I/O server that is not
//! async itself can follow the controller without hosting a runtime.

use std::future::Future;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

/// A single-threaded runtime for one blocking call or one background task:
/// the data path's threads stay out of it.
pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// A background task on its own thread and runtime, stopped on drop.
pub struct Background {
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl Background {
    /// Runs `f` on a new thread named `name`; `f` gets the receiver that
    /// resolves when the task is told to stop.
    pub(crate) fn spawn<F, Fut>(name: &str, f: F) -> std::io::Result<Self>
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let rt = runtime()?;
        let (tx, rx) = oneshot::channel();
        let join = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || rt.block_on(f(rx)))?;
        Ok(Self {
            stop: Some(tx),
            join: Some(join),
        })
    }

    /// Tells the task to stop and waits for its thread; a second call does
    /// nothing.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}
