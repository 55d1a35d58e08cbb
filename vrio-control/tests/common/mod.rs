//! Helpers shared by the control-plane tests.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use vrio_control::placement::LeastLoaded;
use vrio_control::server::{serve, ServeOptions};
use vrio_control::store::MemoryStore;
use vrio_control::{Controller, ControllerConfig};

/// Starts a controller (memory store, least-loaded placement) with
/// `config`, served with `opts` on 127.0.0.1:0. Returns its address and the
/// sender that stops it (dropping the sender stops it too).
pub async fn start(config: ControllerConfig, opts: ServeOptions) -> (String, oneshot::Sender<()>) {
    let ctrl = Arc::new(
        Controller::open(
            config,
            Box::new(MemoryStore::default()),
            Box::new(LeastLoaded::default()),
            vrio_control::service::now_ms(),
        )
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        serve(listener, ctrl, opts, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (addr, tx)
}
