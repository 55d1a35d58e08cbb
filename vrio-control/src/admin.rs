//! One-shot blocking calls for tools, demos and tests: wait until servers
//! have registered, drain a server. Each runs on a runtime of its own, so
//! call them outside any tokio runtime.

use std::time::{Duration, Instant};

use crate::background::runtime;
use crate::client::{server_addresses, ControlOpts};
use crate::error::GlueError;
use crate::pb;

/// Blocks until `n` servers hold a live lease at the controller, or fails
/// with [`GlueError::ServersMissing`] after `within`. An unreachable
/// controller counts as none yet: it may still be starting.
pub fn wait_for_servers(ctl: &ControlOpts, n: usize, within: Duration) -> Result<(), GlueError> {
    let rt = runtime()?;
    rt.block_on(async {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(mut c) = ctl.connect().await {
                if let Ok(m) = server_addresses(&mut c).await {
                    if m.values().filter(|(_, alive)| *alive).count() >= n {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(GlueError::ServersMissing { wanted: n, within });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Asks the controller to drain `server_id` (move all its queues to other
/// servers); returns how many queues it moved.
pub fn drain(ctl: &ControlOpts, server_id: &str) -> Result<usize, GlueError> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = ctl.connect().await?;
        let r = c
            .drain_server(pb::DrainServerRequest {
                server_id: server_id.to_string(),
            })
            .await?;
        Ok(r.into_inner().moved.len())
    })
}

/// Makes sure volume `volume` of `size_bytes` exists at the controller and
/// grants it to each of `devices` in `mode` (any host): what an operator
/// does with `vrio-ctl volume create` and `volume grant`, for demos and
/// tests.
pub fn grant_volume(
    ctl: &ControlOpts,
    volume: &str,
    size_bytes: u64,
    devices: &[String],
    mode: vrio_core::tenancy::AccessMode,
) -> Result<(), GlueError> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = ctl.connect().await?;
        let created = c
            .create_volume(pb::CreateVolumeRequest {
                name: volume.to_string(),
                size_bytes,
            })
            .await;
        match created {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => return Err(s.into()),
        }
        for d in devices {
            c.grant_volume(pb::GrantVolumeRequest {
                volume: volume.to_string(),
                device_id: d.clone(),
                mode: crate::model::mode_to_pb(mode) as i32,
                host: String::new(),
            })
            .await?;
        }
        Ok(())
    })
}
