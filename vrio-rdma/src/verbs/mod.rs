//! The `verbs` back-end: real RDMA through sideway (RoCE, InfiniBand,
//! Soft-RoCE). Connections are set up with rdma_cm; addresses are `IP:PORT`.
//!
//! One [`Domain`] is one device context and one protection domain. QPs are
//! created on that PD and driven through their states with the attributes
//! rdma_cm computes (`rdma_init_qp_attr`), so the GID, path and PSNs come from
//! rdma_cm while memory stays in the domain's PD.

mod cm;
mod endpoint;
pub mod gid;
mod region;
mod status;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sideway::ibverbs::address::GidType;
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::AccessFlags;
use sideway::rdmacm::communication_manager::{ConnectionParameter, Identifier, PortSpace};

use crate::api::{Access, Domain, Endpoint, EndpointConfig, FabricError, Listener, MemoryRegion};
use cm::{CmEvent, CmHub};
use endpoint::VerbsEndpoint;
use region::{RegionTable, VerbsRegion};

pub use gid::{pick_roce_v2_ipv4, GidKind, GidRow};
pub use status::map_status;

/// rdma_cm steps (address, route, connect) each get this long; Soft-RoCE in a
/// TCG guest is slow, and a missing peer fails fast with REJECTED anyway.
const CM_TIMEOUT: Duration = Duration::from_secs(20);
/// Outstanding RDMA READs per QP, both as initiator and as responder.
const RD_ATOMIC: i32 = 16;

pub(crate) struct DomainInner {
    ctx: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    name: String,
    regions: Arc<RegionTable>,
    rd_atomic: u8,
    max_inline_cap: u32,
}

/// A verbs protection domain on one opened device; see the module docs.
/// Made by [`open_domain`].
pub struct VerbsDomain {
    inner: Arc<DomainInner>,
}

fn no_device(msg: String) -> FabricError {
    FabricError::NoDevice(msg)
}

/// Opens `device` (or the first RDMA device) and allocates one PD.
///
/// Fails with [`FabricError::NoDevice`] when the host has no RDMA device
/// (`ibv_get_device_list` fails with ENOSYS, the list is empty, or rdma_cm
/// reports ENODEV), so callers can fall back to the `soft` back-end.
pub fn open_domain(device: Option<&str>) -> Result<Box<dyn Domain>, FabricError> {
    let list = DeviceList::new().map_err(|e| {
        let errno = match &e.0 {
            sideway::ibverbs::device::GetDeviceListErrorKind::Ibverbs(io) => io.raw_os_error(),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        no_device(format!(
            "ibv_get_device_list failed (errno {}): no RDMA device or no RDMA support in this kernel; \
             for Soft-RoCE load rdma_rxe and run `rdma link add rxe0 type rxe netdev <if>`, or use the soft back-end",
            errno.map_or_else(|| "?".to_string(), |n| n.to_string())
        ))
    })?;
    let names: Vec<String> = list.iter().map(|d| d.name()).collect();
    if names.is_empty() {
        return Err(no_device("ibv_get_device_list returned no devices".into()));
    }
    let dev = match device {
        Some(want) => list.iter().find(|d| d.name() == want).ok_or_else(|| {
            no_device(format!(
                "RDMA device {want:?} not found (have: {})",
                names.join(", ")
            ))
        })?,
        None => list
            .get(0)
            .ok_or_else(|| no_device("ibv_get_device_list returned no devices".into()))?,
    };
    let name = dev.name();
    let ctx = dev
        .open()
        .map_err(|e| FabricError::Verbs(format!("ibv_open_device({name}): {e}")))?;
    let pd = ctx
        .alloc_pd()
        .map_err(|e| FabricError::Verbs(format!("ibv_alloc_pd({name}): {e}")))?;
    let attr = ctx
        .query_device()
        .map_err(|e| FabricError::Verbs(format!("ibv_query_device({name}): {e}")))?;
    let rd_atomic = RD_ATOMIC
        .min(attr.max_qp_rd_atom())
        .min(attr.max_qp_init_rd_atom())
        .clamp(1, 255) as u8;
    // rdma_cm is needed for every connection: probe it now so a host
    // without it fails here, with the same clear error.
    drop(CmHub::new()?);
    log_gid(&ctx, &name);
    tracing::info!(device = %name, rd_atomic, "verbs domain open");
    Ok(Box::new(VerbsDomain {
        inner: Arc::new(DomainInner {
            ctx,
            pd,
            name,
            regions: Arc::new(RegionTable::default()),
            rd_atomic,
            // rxe allows 128; most NICs more. Asking for more fails QP creation.
            max_inline_cap: 128,
        }),
    }))
}

/// Logs the RoCE v2 IPv4 GID rdma_cm should end up using.
fn log_gid(ctx: &Arc<DeviceContext>, name: &str) {
    let Ok(table) = ctx.query_gid_table() else {
        return;
    };
    let rows: Vec<GidRow> = table
        .iter()
        .map(|e| GidRow {
            index: e.gid_index(),
            gid: Into::<std::net::Ipv6Addr>::into(e.gid()).octets(),
            kind: match e.gid_type() {
                GidType::InfiniBand => GidKind::InfiniBand,
                GidType::RoceV1 => GidKind::RoceV1,
                GidType::RoceV2 => GidKind::RoceV2,
            },
        })
        .collect();
    match pick_roce_v2_ipv4(&rows, None) {
        Some(i) => tracing::info!(device = %name, gid_index = i, "RoCE v2 IPv4 GID"),
        None => {
            tracing::info!(device = %name, entries = rows.len(), "no RoCE v2 IPv4 GID (InfiniBand?)")
        }
    }
}

fn parse_addr(addr: &str) -> Result<SocketAddr, FabricError> {
    addr.parse::<SocketAddr>().map_err(|_| {
        FabricError::InvalidRequest(format!("verbs addresses are IP:PORT, got {addr:?}"))
    })
}

fn to_access(a: Access) -> AccessFlags {
    let mut f = AccessFlags::none();
    if a.local_write {
        f |= AccessFlags::LocalWrite;
    }
    if a.remote_read {
        f |= AccessFlags::RemoteRead;
    }
    if a.remote_write {
        // verbs requires local write whenever remote write is granted
        f |= AccessFlags::RemoteWrite | AccessFlags::LocalWrite;
    }
    f
}

impl DomainInner {
    /// The cm_id must sit on our device: the QP lives in our PD.
    fn check_device(&self, id: &Identifier) -> Result<(), FabricError> {
        match id.get_device_context() {
            Some(c) if c.name() == self.name => Ok(()),
            Some(c) => Err(FabricError::Verbs(format!(
                "address routes via RDMA device {} but this domain is on {}",
                c.name(),
                self.name
            ))),
            None => Err(FabricError::Verbs("rdma_cm id has no device".into())),
        }
    }
}

impl Domain for VerbsDomain {
    // SAFETY: the caller upholds `Domain::register`'s contract (api.rs): the
    // memory stays mapped for as long as the returned region lives.
    unsafe fn register(
        &self,
        ptr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Box<dyn MemoryRegion>, FabricError> {
        if ptr.is_null() || len == 0 {
            return Err(FabricError::Register(format!(
                "empty or null region ({ptr:?}, {len})"
            )));
        }
        // SAFETY: the caller guarantees ptr..ptr+len stays mapped while the
        // returned region lives (Domain::register contract); the region owns
        // the MR, so the MR never outlives the memory.
        let mr = unsafe { self.inner.pd.reg_mr(ptr as usize, len, to_access(access)) }
            .map_err(|e| FabricError::Register(format!("ibv_reg_mr({len} bytes): {e}")))?;
        Ok(Box::new(VerbsRegion::new(
            Arc::clone(&self.inner.regions),
            mr,
            access,
        )))
    }

    fn listen(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Listener>, FabricError> {
        let sa = parse_addr(addr)?;
        let hub = CmHub::new()?;
        let bind = |sa: SocketAddr| -> Result<Arc<Identifier>, FabricError> {
            let id = hub
                .channel()
                .create_id(PortSpace::Tcp)
                .map_err(|e| FabricError::Verbs(format!("rdma_create_id: {e}")))?;
            id.bind_addr(sa).map_err(|e| {
                let io = match &e.source {
                    sideway::rdmacm::communication_manager::BindAddressErrorKind::Rdmacm(io) => {
                        std::io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(libc::EIO))
                    }
                    #[allow(unreachable_patterns)]
                    _ => std::io::Error::other(e.to_string()),
                };
                cm::os_error(&format!("rdma_bind_addr({sa})"), &io)
            })?;
            Ok(id)
        };
        // sideway cannot read back the bound port, so port 0 picks one here.
        let (id, bound) = if sa.port() == 0 {
            let mut found = None;
            let start = 20000 + (std::process::id() % 20000) as u16;
            for i in 0..200u16 {
                let cand = SocketAddr::new(sa.ip(), start.wrapping_add(i * 97) % 40000 + 20000);
                if let Ok(id) = bind(cand) {
                    found = Some((id, cand));
                    break;
                }
            }
            found
                .ok_or_else(|| FabricError::Verbs(format!("no free rdma_cm port on {}", sa.ip())))?
        } else {
            (bind(sa)?, sa)
        };
        if !matches!(sa.ip(), IpAddr::V4(ip) if ip.is_unspecified()) {
            self.inner.check_device(&id)?;
        }
        id.listen(64)
            .map_err(|e| FabricError::Verbs(format!("rdma_listen({bound}): {e}")))?;
        tracing::info!(addr = %bound, device = %self.inner.name, "verbs listening");
        let (done_tx, done_rx) = mpsc::channel();
        Ok(Box::new(VerbsListener {
            hub,
            id,
            domain: Arc::clone(&self.inner),
            cfg,
            addr: bound,
            done_tx,
            done_rx,
            in_setup: Arc::new(AtomicUsize::new(0)),
            warnings: crate::WarnLimiter::new(Duration::from_secs(1), 5),
        }))
    }

    fn connect(&self, addr: &str, cfg: EndpointConfig) -> Result<Box<dyn Endpoint>, FabricError> {
        let dst = parse_addr(addr)?;
        let fail = |reason: String| FabricError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let hub = CmHub::new()?;
        let id = hub
            .channel()
            .create_id(PortSpace::Tcp)
            .map_err(|e| FabricError::Verbs(format!("rdma_create_id: {e}")))?;
        let tok = hub.track(&id);
        id.resolve_addr(None, dst, CM_TIMEOUT)
            .map_err(|e| fail(format!("rdma_resolve_addr: {e}")))?;
        expect(&hub, tok, CmEvent::AddrResolved).map_err(fail)?;
        id.resolve_route(CM_TIMEOUT)
            .map_err(|e| fail(format!("rdma_resolve_route: {e}")))?;
        expect(&hub, tok, CmEvent::RouteResolved).map_err(fail)?;
        self.inner.check_device(&id)?;
        let mut parts = endpoint::create_parts(&self.inner, &id, cfg)?;
        let mut param = ConnectionParameter::default();
        param.setup_qp_number(endpoint::qp_number(&parts));
        id.connect(param)
            .map_err(|e| fail(format!("rdma_connect: {e}")))?;
        expect(&hub, tok, CmEvent::ConnectResponse).map_err(fail)?;
        endpoint::to_rts(&mut parts, &id, self.inner.rd_atomic)?;
        id.establish()
            .map_err(|e| fail(format!("rdma_establish: {e}")))?;
        tracing::debug!(peer = %dst, "verbs connected");
        let ep = VerbsEndpoint::new(
            parts,
            id,
            tok,
            hub,
            Arc::clone(&self.inner),
            dst.to_string(),
        )?;
        Ok(Box::new(ep))
    }
}

fn expect(hub: &CmHub, tok: u64, want: CmEvent) -> Result<(), String> {
    match hub.wait_event(tok, CM_TIMEOUT) {
        Ok(ev) if ev == want => Ok(()),
        Ok(CmEvent::Failed(what, status)) => Err(format!("{what} (status {status})")),
        Ok(ev) => Err(format!("expected {want:?}, got {ev:?}")),
        Err(e) => Err(format!("waiting for {want:?}: {e}")),
    }
}

/// An rdma_cm listener bound to an `IP:PORT` of the domain's device. Each
/// connection's handshake runs on a thread of its own (at most
/// [`MAX_SETUPS`] at once), so a peer that never completes its handshake
/// delays nobody else's; `accept` returns the next one that completed, and
/// keeps listening when a peer's handshake fails.
pub struct VerbsListener {
    hub: Arc<CmHub>,
    id: Arc<Identifier>,
    domain: Arc<DomainInner>,
    cfg: EndpointConfig,
    addr: SocketAddr,
    done_tx: mpsc::Sender<Result<VerbsEndpoint, FabricError>>,
    done_rx: mpsc::Receiver<Result<VerbsEndpoint, FabricError>>,
    in_setup: Arc<AtomicUsize>,
    warnings: crate::WarnLimiter,
}

/// Handshakes in progress at once; more connection requests are dropped
/// (the peer's connect times out).
const MAX_SETUPS: usize = 64;

/// What a handshake thread needs of its listener.
#[derive(Clone)]
struct Handshaker {
    hub: Arc<CmHub>,
    domain: Arc<DomainInner>,
    cfg: EndpointConfig,
    addr: SocketAddr,
}

impl Handshaker {
    fn accept_one(&self, req: Arc<Identifier>) -> Result<VerbsEndpoint, FabricError> {
        let tok = self.hub.track(&req);
        match self.handshake(&req, tok) {
            Ok((parts, peer)) => VerbsEndpoint::new(
                parts,
                req,
                tok,
                Arc::clone(&self.hub),
                Arc::clone(&self.domain),
                peer,
            ),
            Err(e) => {
                self.hub.forget(tok);
                Err(e)
            }
        }
    }

    fn handshake(
        &self,
        req: &Arc<Identifier>,
        tok: u64,
    ) -> Result<(endpoint::Parts, String), FabricError> {
        self.domain.check_device(req)?;
        let mut parts = endpoint::create_parts(&self.domain, req, self.cfg)?;
        endpoint::to_rts(&mut parts, req, self.domain.rd_atomic)?;
        let mut param = ConnectionParameter::default();
        param.setup_qp_number(endpoint::qp_number(&parts));
        req.accept(param)
            .map_err(|e| FabricError::Verbs(format!("rdma_accept: {e}")))?;
        expect(&self.hub, tok, CmEvent::Established).map_err(|reason| FabricError::Connect {
            addr: self.addr.to_string(),
            reason,
        })?;
        Ok((parts, format!("peer accepted on {}", self.addr)))
    }
}

impl VerbsListener {
    fn warn(&self, msg: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.warnings.allow("listener", Instant::now()) {
            tracing::warn!(suppressed, "verbs: {msg}");
        }
    }
}

impl Listener for VerbsListener {
    fn accept(&mut self) -> Result<Box<dyn Endpoint>, FabricError> {
        let _keep = &self.id;
        loop {
            while let Ok(r) = self.done_rx.try_recv() {
                match r {
                    Ok(ep) => return Ok(Box::new(ep)),
                    // A failed handshake is the peer's problem; keep
                    // listening unless the failure is ours.
                    Err(e @ FabricError::Connect { .. }) => {
                        self.warn(format_args!("handshake failed: {e}"))
                    }
                    Err(e) => return Err(e),
                }
            }
            // Back now and then for handshakes that finished meanwhile.
            let Some(req) = self.hub.next_request(Duration::from_millis(20))? else {
                continue;
            };
            if self.in_setup.load(Ordering::Relaxed) >= MAX_SETUPS {
                self.warn(format_args!(
                    "{MAX_SETUPS} handshakes in progress; a connection request is dropped"
                ));
                continue;
            }
            self.in_setup.fetch_add(1, Ordering::Relaxed);
            let (hs, tx, n) = (
                Handshaker {
                    hub: Arc::clone(&self.hub),
                    domain: Arc::clone(&self.domain),
                    cfg: self.cfg,
                    addr: self.addr,
                },
                self.done_tx.clone(),
                Arc::clone(&self.in_setup),
            );
            let spawned = std::thread::Builder::new()
                .name("vrio-verbs-hs".into())
                .spawn(move || {
                    let r = hs.accept_one(req);
                    n.fetch_sub(1, Ordering::Relaxed);
                    // The listener may be gone: the endpoint is dropped.
                    let _ = tx.send(r);
                });
            if let Err(e) = spawned {
                self.in_setup.fetch_sub(1, Ordering::Relaxed);
                self.warn(format_args!("no thread for a handshake: {e}"));
            }
        }
    }

    fn local_addr(&self) -> String {
        self.addr.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_device_on_this_host() {
        // This host has no RDMA device: opening must say so, not panic.
        match open_domain(None) {
            Err(FabricError::NoDevice(msg)) => {
                assert!(!msg.is_empty());
                println!("open_domain: {msg}");
            }
            Err(e) => panic!("expected NoDevice, got {e}"),
            Ok(_) => panic!(
                "this test expects a host without RDMA devices (an RDMA device is present; \
                 the verbs path is covered by the rxe guest test instead)"
            ),
        }
    }

    #[test]
    fn named_missing_device_is_no_device() {
        assert!(matches!(
            open_domain(Some("nope0")),
            Err(FabricError::NoDevice(_))
        ));
    }

    #[test]
    fn access_flags() {
        let f = to_access(Access::REMOTE_READ_ONLY);
        assert!(f.contains(AccessFlags::RemoteRead));
        assert!(!f.contains(AccessFlags::RemoteWrite));
        let f = to_access(Access {
            local_write: false,
            remote_read: false,
            remote_write: true,
        });
        assert!(f.contains(AccessFlags::LocalWrite | AccessFlags::RemoteWrite));
    }

    #[test]
    fn addresses_are_ip_port() {
        assert!(parse_addr("10.0.2.15:7471").is_ok());
        assert!(matches!(
            parse_addr("/tmp/sock"),
            Err(FabricError::InvalidRequest(_))
        ));
        assert!(matches!(
            parse_addr("10.0.2.15"),
            Err(FabricError::InvalidRequest(_))
        ));
    }
}
