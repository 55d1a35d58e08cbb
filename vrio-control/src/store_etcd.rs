//! Controller state in etcd (feature `etcd`): the snapshot lives under one
//! key, so any controller pointed at the same etcd recovers it.
//!
//! [`StateStore`] is synchronous (the controller saves under its lock), so
//! the etcd client runs on its own thread with its own runtime and each call
//! waits for that thread's answer.

use crate::store::{Snapshot, StateStore, StoreError};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

enum Cmd {
    Load(mpsc::Sender<Result<Option<Vec<u8>>, String>>),
    Save(Vec<u8>, mpsc::Sender<Result<(), String>>),
}

/// A [`StateStore`] that keeps the snapshot under one etcd key, optionally
/// fenced by a [`Leadership`]. Each call blocks until etcd answers.
pub struct EtcdStore {
    key: String,
    tx: Mutex<mpsc::Sender<Cmd>>,
}

/// Proof of leadership: saves succeed only while this election key still
/// exists with this creation revision, so a deposed leader that has not
/// noticed yet cannot overwrite its successor's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The leader's election key.
    pub key: Vec<u8>,
    /// The election key's creation revision.
    pub rev: i64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("key", &self.key).finish()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (e.g. `http://127.0.0.1:2379`) and keeps the
    /// snapshot under `key`.
    pub fn connect(
        endpoints: Vec<String>,
        key: impl Into<String>,
        fence: Option<Fence>,
    ) -> Result<Self, StoreError> {
        let key = key.into();
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let thread_key = key.clone();
        std::thread::Builder::new()
            .name("vrio-etcd".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let mut client = match rt.block_on(etcd_client::Client::connect(endpoints, None)) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                // Ends when the store (the only sender) is dropped.
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Cmd::Load(reply) => {
                            let got = rt
                                .block_on(client.get(thread_key.as_str(), None))
                                .map(|r| r.kvs().first().map(|kv| kv.value().to_vec()))
                                .map_err(|e| e.to_string());
                            let _ = reply.send(got);
                        }
                        Cmd::Save(bytes, reply) => {
                            let put = match &fence {
                                None => rt
                                    .block_on(client.put(thread_key.as_str(), bytes, None))
                                    .map(drop)
                                    .map_err(|e| e.to_string()),
                                Some(f) => {
                                    let txn = Txn::new()
                                        .when([Compare::create_revision(
                                            f.key.clone(),
                                            CompareOp::Equal,
                                            f.rev,
                                        )])
                                        .and_then([TxnOp::put(thread_key.as_str(), bytes, None)]);
                                    match rt.block_on(client.txn(txn)) {
                                        Ok(r) if r.succeeded() => Ok(()),
                                        Ok(_) => Err("not the leader any more".to_string()),
                                        Err(e) => Err(e.to_string()),
                                    }
                                }
                            };
                            let _ = reply.send(put);
                        }
                    }
                }
            })
            .map_err(|e| StoreError::Other(format!("etcd thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(EtcdStore {
                key,
                tx: Mutex::new(tx),
            }),
            Ok(Err(e)) => Err(StoreError::Other(format!("etcd connect: {e}"))),
            Err(_) => Err(StoreError::Other("etcd thread died".into())),
        }
    }

    fn call<T>(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<T, String>>) -> Cmd,
    ) -> Result<T, StoreError> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(make(reply_tx))
            .map_err(|_| StoreError::Other("etcd thread died".into()))?;
        reply_rx
            .recv()
            .map_err(|_| StoreError::Other("etcd thread died".into()))?
            .map_err(|e| StoreError::Other(format!("etcd {}: {e}", self.key)))
    }
}

impl StateStore for EtcdStore {
    fn load(&self) -> Result<Option<Snapshot>, StoreError> {
        let Some(bytes) = self.call(Cmd::Load)? else {
            return Ok(None);
        };
        Snapshot::decode(&bytes, &self.key).map(Some)
    }

    fn save(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(snapshot).map_err(|e| StoreError::Other(e.to_string()))?;
        // etcd commits a put to a quorum's log before it answers.
        self.call(|reply| Cmd::Save(bytes, reply))
    }
}

/// Leadership of one election, held while a lease is kept alive.
pub struct Leadership {
    /// Pass to [`EtcdStore::connect`] so saves fail once leadership is lost.
    pub fence: Fence,
    lease: i64,
    client: etcd_client::Client,
    keepalive: tokio::task::JoinHandle<()>,
    lost: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("fence", &self.fence)
            .finish()
    }
}

/// Waits until this process leads `election`, announcing `me` (for example
/// its gRPC address) as the leader's value. The lease lasts `ttl_secs`
/// without keep-alives: that is how long a crashed leader blocks takeover.
pub async fn campaign(
    endpoints: Vec<String>,
    election: &str,
    me: &str,
    ttl_secs: i64,
) -> Result<Leadership, StoreError> {
    let err = |e: etcd_client::Error| StoreError::Other(format!("etcd election: {e}"));
    let mut client = etcd_client::Client::connect(endpoints, None)
        .await
        .map_err(err)?;
    let lease = client.lease_grant(ttl_secs, None).await.map_err(err)?.id();
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.map_err(err)?;
    let (lost_tx, lost) = tokio::sync::watch::channel(false);
    let period = Duration::from_millis((ttl_secs.max(1) as u64) * 1000 / 3);
    // Keep-alives run while we wait in the campaign too, or the lease would
    // lapse before we win.
    let keepalive = tokio::spawn(async move {
        loop {
            let ok = keeper.keep_alive().await.is_ok()
                && matches!(answers.message().await, Ok(Some(r)) if r.ttl() > 0);
            if !ok {
                tracing::error!("etcd lease lost: leadership is gone");
                let _ = lost_tx.send(true);
                return;
            }
            tokio::time::sleep(period).await;
        }
    });
    let resp = client.campaign(election, me, lease).await.map_err(err)?;
    let leader = resp
        .leader()
        .ok_or_else(|| StoreError::Other("etcd campaign returned no leader key".into()))?;
    let fence = Fence {
        key: leader.key().to_vec(),
        rev: leader.rev(),
    };
    tracing::info!(election, me, "became leader");
    Ok(Leadership {
        fence,
        lease,
        client,
        keepalive,
        lost,
    })
}

impl Leadership {
    /// Resolves when the lease can no longer be renewed; the holder must stop
    /// acting as leader (its fenced saves already fail).
    pub async fn lost(&mut self) {
        while !*self.lost.borrow() {
            if self.lost.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives leadership up at once (instead of waiting for the lease to lapse).
    pub async fn resign(mut self) -> Result<(), StoreError> {
        self.keepalive.abort();
        self.client
            .lease_revoke(self.lease)
            .await
            .map(drop)
            .map_err(|e| StoreError::Other(format!("etcd resign: {e}")))
    }

    /// Stops renewing without telling etcd, like a crashed process: the
    /// lease lapses after its TTL. For tests.
    pub fn abandon(self) {
        self.keepalive.abort();
    }
}
