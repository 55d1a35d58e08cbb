//! Messages between a VM-host agent and an I/O server, on each queue's
//! endpoint. All little-endian; every field from the peer is checked.
//!
//! | kind | direction | carried by | content |
//! |------|-----------|------------|---------|
//! | ATTACH | agent → server | SEND | device, queue layout, mode, guest regions with rkeys (a virtio-blk queue, or one the server's configuration types) |
//! | ATTACH_DEVICE | agent → server | SEND | ATTACH plus the device type (blk, or net with the port's MAC) and the device's credential, if it has one |
//! | ATTACH_REPLY | server → agent | SEND | status ([`AttachStatus`]), the device's config space and the feature bits the server imposes (`VIRTIO_BLK_F_RO`) |
//! | DOORBELL | agent → server | SEND | new avail.idx, avail entries, their descriptors, and inline the bytes of their readable segments (headers; payloads up to the inline limit) |
//! | SET_MODE | server → agent | SEND | remote-poll or doorbell, and where the server stopped |
//! | QUIESCE | agent → server | SEND | finish the batch in flight, start no other |
//! | QUIESCED | server → agent | SEND | where the server stopped; the queue is handed back |
//! | (interrupt) | server → agent | WRITE_WITH_IMM, len 0 | imm = [`NOTIFY_IMM`] \| the used.idx the server published; sent only when the guest's suppression asks for an interrupt |
//! | SET_LOG | agent → server | SEND | on: from the next batch, WRITE the used elements but not used.idx, and leave publishing (and the interrupt decision) to the agent, which marks the written pages in the VMM's dirty log first (live migration); off: publish again |
//! | LOGGING | server → agent | SEND | SET_LOG taken, and the used index so far: every batch published without the agent is in guest memory (RC order) |
//! | (early interrupt) | server → agent | WRITE_WITH_IMM, len 0 | imm = [`EARLY_IMM`] \| batch size << [`EARLY_SPAN_SHIFT`] \| the used.idx published; sent in the reply wave right behind used.idx when the guest's suppression word, as last read, says it wants one; the agent reads the word itself and decides |
//! | (publish) | server → agent | WRITE_WITH_IMM, len 0 | imm = [`PUBLISH_IMM`] \| the used index up to which the server WROTE used elements; the agent marks, publishes and decides on the interrupt |
//!
//! A queue is served strictly in avail order, so "where the server stopped"
//! is one index: every request before it is in the used ring, none after it
//! was started. ATTACH's `start` resumes a queue there, on any server.

use vrio_rdma::RemoteRegion;

use crate::net::MacAddr;
use crate::virtio::ring::{RingFeatures, RingLayout};

/// First four bytes of every message ("VRIO" as a little-endian u32).
pub const MAGIC: u32 = 0x4f49_5256; // "VRIO"
/// Protocol version; a message of another version is refused
/// ([`WireError::BadHeader`]).
pub const VERSION: u16 = 7;
/// Largest message (and receive buffer): room for a 4 KiB write's payload
/// inline in a doorbell, with its header and descriptors.
pub const MAX_MSG: usize = 8192;
/// Longest credential an ATTACH_DEVICE carries (`tenancy::Keyring`).
pub const MAX_CREDENTIAL: usize = 1024;

const ATTACH: u16 = 1;
const ATTACH_REPLY: u16 = 2;
const DOORBELL: u16 = 3;
const SET_MODE: u16 = 4;
const QUIESCE: u16 = 5;
const QUIESCED: u16 = 6;
const ATTACH_DEVICE: u16 = 7;
const SET_LOG: u16 = 8;
const LOGGING: u16 = 9;
/// Set in the immediate of the WRITE_WITH_IMM by which the server asks the
/// VM host to interrupt the guest; the low 16 bits are the used index it
/// published in guest memory (used elements and used.idx are the server's
/// own WRITEs).
pub const NOTIFY_IMM: u32 = 1 << 16;
/// Set in the immediate of the WRITE_WITH_IMM that ends a batch while the
/// agent logs (SET_LOG): the server WROTE the used elements up to the low
/// 16 bits but not used.idx; the agent publishes it.
pub const PUBLISH_IMM: u32 = 1 << 17;
/// Set in the immediate of a WRITE_WITH_IMM the server posts right behind
/// used.idx, in the same wave, when the guest's suppression word as last
/// read says it will want an interrupt: the VM host decides on it itself,
/// as a device does (used.idx landed first, RC order, so it reads the word
/// after the index), and the interrupt costs no round trip more. The low
/// 16 bits are the used index published, bits [`EARLY_SPAN_SHIFT`].. the
/// batch's size (entries it published).
pub const EARLY_IMM: u32 = 1 << 18;
/// Where an [`EARLY_IMM`] immediate keeps the batch's size.
pub const EARLY_SPAN_SHIFT: u32 = 19;
/// Largest batch an [`EARLY_IMM`] immediate can describe (13 bits).
pub const EARLY_SPAN_MAX: u16 = (1 << (32 - EARLY_SPAN_SHIFT)) - 1;
/// `Attach::sidecore` when the server may choose.
pub const ANY_SIDECORE: u16 = u16::MAX;

/// How the server learns of new requests on a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyMode {
    /// The server READs the avail ring; guest kicks are suppressed.
    RemotePoll,
    /// The agent pushes new avail entries with their descriptors.
    Doorbell,
    /// Doorbells or remote polling, whichever costs the server's sidecore
    /// less CPU per request (it measures both); doorbells while quiet.
    Adaptive,
}

impl NotifyMode {
    fn code(self) -> u8 {
        match self {
            NotifyMode::RemotePoll => 0,
            NotifyMode::Doorbell => 1,
            NotifyMode::Adaptive => 2,
        }
    }
    fn from_code(c: u8) -> Result<Self, WireError> {
        Ok(match c {
            0 => NotifyMode::RemotePoll,
            1 => NotifyMode::Doorbell,
            2 => NotifyMode::Adaptive,
            _ => return Err(WireError::Bad("notify mode")),
        })
    }
    /// The mode's name in logs and command lines (`remote-poll`,
    /// `doorbell`, `adaptive`).
    pub fn name(self) -> &'static str {
        match self {
            NotifyMode::RemotePoll => "remote-poll",
            NotifyMode::Doorbell => "doorbell",
            NotifyMode::Adaptive => "adaptive",
        }
    }
}

/// Why a message did not encode or decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes end before the message does.
    #[error("message truncated")]
    Truncated,
    /// Wrong [`MAGIC`] or [`VERSION`].
    #[error("bad magic or version")]
    BadHeader,
    /// A kind code no message has.
    #[error("unexpected message kind {0}")]
    UnexpectedKind(u16),
    /// A field's value is invalid (named: notify mode, ring layout, device
    /// type, net device MAC).
    #[error("invalid {0}")]
    Bad(&'static str),
    /// More than [`MAX_MSG`] bytes, encoding or decoding.
    #[error("message larger than {MAX_MSG} bytes")]
    TooLarge,
}

/// A guest region as the server sees it: guest-physical range plus how to
/// reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// The fabric registration of the same bytes (address, length, rkey).
    pub remote: RemoteRegion,
}

/// ATTACH: the agent asks the server to serve one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// The device's numeric id (see [`super::device_key`]).
    pub device_id: u64,
    /// The queue's index in its device.
    pub queue: u16,
    /// Where the rings are in guest memory.
    pub layout: RingLayout,
    /// The negotiated ring features.
    pub features: RingFeatures,
    /// How the server learns of new requests.
    pub mode: NotifyMode,
    /// Next avail and next used index: 0 for a new queue, the handed-over
    /// position for a moved, failed-over or reconnected one.
    pub start: u16,
    /// The sidecore the controller placed the queue on, or [`ANY_SIDECORE`].
    pub sidecore: u16,
    /// The agent logs dirty pages (a live migration is under way): serve
    /// as after SET_LOG(on) from the first batch.
    pub logging: bool,
    /// The guest's memory, region by region, as the server may reach it.
    pub regions: Vec<WireRegion>,
}

/// What device a queue belongs to. Net queues follow §5.1.2: queue 0
/// receives, queue 1 transmits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk.
    Blk,
    /// `mac` is the port's address: the switch drops frames the guest
    /// sends from any other source.
    Net {
        /// The port's MAC address (never multicast).
        mac: MacAddr,
    },
}

/// ATTACH with the device type said explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachDevice {
    /// The queue, as in ATTACH.
    pub attach: Attach,
    /// The device it belongs to.
    pub device: DeviceKind,
    /// The capability that lets this device attach (`tenancy::Keyring`),
    /// at most [`MAX_CREDENTIAL`] bytes.
    pub credential: Option<String>,
}

/// ATTACH_REPLY: the server's answer to ATTACH or ATTACH_DEVICE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttachReply {
    /// 0 on success; otherwise why the server refused the queue
    /// ([`AttachStatus`]).
    pub status: u16,
    /// The device's config space (virtio 1.2 §4.1.4.3), as the server
    /// presents it.
    pub config: Vec<u8>,
    /// Device feature bits the server imposes on the guest: for virtio-blk,
    /// `VIRTIO_BLK_F_RO` when the volume is attached read-only.
    pub features: u64,
}

/// Why a server refused an ATTACH (the reply's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachStatus {
    /// Attached.
    Ok,
    /// No credential, or one that is forged, expired, unknown or for
    /// another device or host.
    Unauthenticated,
    /// The credential does not grant this: the volume is not the device's,
    /// or another device writes it.
    Forbidden,
    /// No such volume on this server.
    NoSuchVolume,
    /// Anything else (a bad ring, a bad net port, resources).
    Refused,
}

impl AttachStatus {
    /// The code on the wire.
    pub fn code(self) -> u16 {
        match self {
            AttachStatus::Ok => 0,
            AttachStatus::Refused => 1,
            AttachStatus::Unauthenticated => 2,
            AttachStatus::Forbidden => 3,
            AttachStatus::NoSuchVolume => 4,
        }
    }
    /// The status a code names (unknown codes are [`AttachStatus::Refused`]).
    pub fn from_code(c: u16) -> Self {
        match c {
            0 => AttachStatus::Ok,
            2 => AttachStatus::Unauthenticated,
            3 => AttachStatus::Forbidden,
            4 => AttachStatus::NoSuchVolume,
            _ => AttachStatus::Refused,
        }
    }
}

impl std::fmt::Display for AttachStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachStatus::Ok => "attached",
            AttachStatus::Unauthenticated => "no valid credential for this device",
            AttachStatus::Forbidden => "the credential does not allow this volume or mode",
            AttachStatus::NoSuchVolume => "no such volume on the server",
            AttachStatus::Refused => "refused",
        })
    }
}

/// One new avail entry: its ring position, head, and the descriptors (and
/// indirect table entries) the agent copied, by guest address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DoorbellEntry {
    /// Position in the avail ring (free-running, not wrapped to the size).
    pub pos: u16,
    /// The head the avail entry names.
    pub head: u16,
    /// Descriptor bytes as the guest wrote them, by guest address; the
    /// server validates them like any other guest data.
    pub descs: Vec<(u64, [u8; 16])>,
    /// Guest bytes the agent copied inline, by guest address: readable
    /// segments of the chain (its header; a small write's payload), so the
    /// server need not READ them before it can serve the request. The
    /// server uses them only for segments they cover exactly.
    pub inline: Vec<(u64, Vec<u8>)>,
}

/// DOORBELL: the agent announces new avail entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Doorbell {
    /// The guest's avail.idx.
    pub avail_idx: u16,
    /// Some or all of the new entries, with their descriptors; what is
    /// missing the server reads itself.
    pub entries: Vec<DoorbellEntry>,
}

/// SET_MODE: the server switches between remote polling and doorbells
/// (adaptive mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetMode {
    /// True: the server polls, the agent stops sending doorbells; false:
    /// doorbells again.
    pub poll: bool,
    /// The server's next avail index: the agent pushes from here.
    pub next_avail: u16,
}

/// The server's answer to QUIESCE: nothing is in flight, and the queue
/// resumes at `next` (next avail == next used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quiesced {
    /// Where the queue resumes.
    pub next: u16,
}

/// The server's answer to SET_LOG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logging {
    /// Whether the agent publishes from now on.
    pub on: bool,
    /// The server's next used index when it took SET_LOG.
    pub next_used: u16,
}

/// One message of the table above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// ATTACH (a virtio-blk queue, or whatever the server's configuration
    /// types it as).
    Attach(Attach),
    /// ATTACH_DEVICE.
    AttachDevice(AttachDevice),
    /// ATTACH_REPLY.
    AttachReply(AttachReply),
    /// DOORBELL.
    Doorbell(Doorbell),
    /// SET_MODE.
    SetMode(SetMode),
    /// QUIESCE: finish the batch in flight, start no other, answer with
    /// QUIESCED.
    Quiesce,
    /// QUIESCED.
    Quiesced(Quiesced),
    /// SET_LOG.
    SetLog(bool),
    /// LOGGING.
    Logging(Logging),
}

struct W<'a> {
    b: &'a mut Vec<u8>,
}
impl W<'_> {
    fn u8(&mut self, v: u8) {
        self.b.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, s: &[u8]) {
        self.b.extend_from_slice(s);
    }
    fn attach(&mut self, a: &Attach) {
        self.u64(a.device_id);
        self.u16(a.queue);
        self.u16(a.layout.size);
        self.u32(a.features.bits() as u32);
        self.u8(a.mode.code());
        self.u16(a.start);
        self.u16(a.sidecore);
        self.u8(u8::from(a.logging));
        self.u64(a.layout.desc);
        self.u64(a.layout.avail);
        self.u64(a.layout.used);
        self.u16(a.regions.len() as u16);
        for r in &a.regions {
            self.u64(r.gpa);
            self.u64(r.remote.addr);
            self.u64(r.remote.len);
            self.u32(r.remote.rkey);
        }
    }
}

struct R<'a> {
    b: &'a [u8],
}
impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    /// A DOORBELL's body into `out` (whose entries are empty), each entry
    /// taken from `spare` when it has one: its buffers are reused.
    fn doorbell_into(
        &mut self,
        out: &mut Doorbell,
        spare: &mut Vec<DoorbellEntry>,
    ) -> Result<(), WireError> {
        out.avail_idx = self.u16()?;
        let n = self.u16()?;
        out.entries.reserve(usize::from(n).min(256));
        for _ in 0..n {
            let mut e = spare.pop().unwrap_or_default();
            e.pos = self.u16()?;
            e.head = self.u16()?;
            e.descs.clear();
            let nd = self.u16()?;
            e.descs.reserve(usize::from(nd).min(64));
            for _ in 0..nd {
                let gpa = self.u64()?;
                let mut d = [0u8; 16];
                d.copy_from_slice(self.take(16)?);
                e.descs.push((gpa, d));
            }
            let ni = usize::from(self.u16()?);
            for k in 0..ni {
                let gpa = self.u64()?;
                // take() bounds the length by the message's bytes.
                let len = self.u32()? as usize;
                let bytes = self.take(len)?;
                match e.inline.get_mut(k) {
                    Some((g, b)) => {
                        *g = gpa;
                        b.clear();
                        b.extend_from_slice(bytes);
                    }
                    None => e.inline.push((gpa, bytes.to_vec())),
                }
            }
            e.inline.truncate(ni);
            out.entries.push(e);
        }
        Ok(())
    }
    fn attach(&mut self) -> Result<Attach, WireError> {
        let device_id = self.u64()?;
        let queue = self.u16()?;
        let size = self.u16()?;
        let features = RingFeatures::from_bits(u64::from(self.u32()?));
        let mode = NotifyMode::from_code(self.u8()?)?;
        let (start, sidecore) = (self.u16()?, self.u16()?);
        let logging = self.u8()? != 0;
        let (desc, avail, used) = (self.u64()?, self.u64()?, self.u64()?);
        let layout =
            RingLayout::new(size, desc, avail, used).map_err(|_| WireError::Bad("ring layout"))?;
        let n = self.u16()?;
        let mut regions = Vec::with_capacity(usize::from(n).min(64));
        for _ in 0..n {
            let gpa = self.u64()?;
            let remote = RemoteRegion {
                addr: self.u64()?,
                len: self.u64()?,
                rkey: self.u32()?,
            };
            regions.push(WireRegion { gpa, remote });
        }
        Ok(Attach {
            device_id,
            queue,
            layout,
            features,
            mode,
            start,
            sidecore,
            logging,
            regions,
        })
    }
}

/// Bytes of a doorbell entry carrying `n` descriptors and `inline` inline
/// ranges of `inline_bytes` bytes in all.
pub fn doorbell_entry_size(n: usize, inline: usize, inline_bytes: usize) -> usize {
    8 + 24 * n + 12 * inline + inline_bytes
}
/// Bytes of a doorbell's fixed part.
pub const DOORBELL_HEADER: usize = 12;

impl Message {
    /// Encodes into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.clear();
        let mut w = W { b: out };
        w.u32(MAGIC);
        w.u16(VERSION);
        match self {
            Message::Attach(a) => {
                w.u16(ATTACH);
                w.attach(a);
            }
            Message::AttachDevice(d) => {
                w.u16(ATTACH_DEVICE);
                w.attach(&d.attach);
                match d.device {
                    DeviceKind::Blk => w.u8(0),
                    DeviceKind::Net { mac } => {
                        w.u8(1);
                        w.bytes(&mac.0);
                    }
                }
                let cred = d.credential.as_deref().unwrap_or("");
                if cred.len() > MAX_CREDENTIAL {
                    return Err(WireError::Bad("credential length"));
                }
                w.u16(cred.len() as u16);
                w.bytes(cred.as_bytes());
            }
            Message::AttachReply(r) => {
                w.u16(ATTACH_REPLY);
                w.u16(r.status);
                w.u16(r.config.len() as u16);
                w.bytes(&r.config);
                w.u64(r.features);
            }
            Message::Doorbell(d) => {
                w.u16(DOORBELL);
                w.u16(d.avail_idx);
                w.u16(d.entries.len() as u16);
                for e in &d.entries {
                    w.u16(e.pos);
                    w.u16(e.head);
                    w.u16(e.descs.len() as u16);
                    for (gpa, b) in &e.descs {
                        w.u64(*gpa);
                        w.bytes(b);
                    }
                    w.u16(e.inline.len() as u16);
                    for (gpa, b) in &e.inline {
                        w.u64(*gpa);
                        w.u32(b.len() as u32);
                        w.bytes(b);
                    }
                }
            }
            Message::SetMode(m) => {
                w.u16(SET_MODE);
                w.u8(u8::from(m.poll));
                w.u16(m.next_avail);
            }
            Message::Quiesce => w.u16(QUIESCE),
            Message::Quiesced(q) => {
                w.u16(QUIESCED);
                w.u16(q.next);
            }
            Message::SetLog(on) => {
                w.u16(SET_LOG);
                w.u8(u8::from(*on));
            }
            Message::Logging(l) => {
                w.u16(LOGGING);
                w.u8(u8::from(l.on));
                w.u16(l.next_used);
            }
        }
        if out.len() > MAX_MSG {
            return Err(WireError::TooLarge);
        }
        Ok(())
    }

    /// Decodes `b` into `out` if it is a DOORBELL (true), reusing the
    /// buffers of `out`'s entries and of `spare` (where `out`'s old entries
    /// go first), so that a server's steady stream of doorbells allocates
    /// nothing. False, with `out` untouched, for any other message: decode
    /// it with [`Message::decode`]. Checks exactly what `decode` checks.
    pub fn decode_doorbell_into(
        b: &[u8],
        out: &mut Doorbell,
        spare: &mut Vec<DoorbellEntry>,
    ) -> Result<bool, WireError> {
        if b.len() > MAX_MSG {
            return Err(WireError::TooLarge);
        }
        let mut r = R { b };
        if r.u32()? != MAGIC || r.u16()? != VERSION {
            return Err(WireError::BadHeader);
        }
        if r.u16()? != DOORBELL {
            return Ok(false);
        }
        spare.append(&mut out.entries);
        r.doorbell_into(out, spare)?;
        Ok(true)
    }

    /// Decodes one message, refusing anything malformed.
    pub fn decode(b: &[u8]) -> Result<Message, WireError> {
        if b.len() > MAX_MSG {
            return Err(WireError::TooLarge);
        }
        let mut r = R { b };
        if r.u32()? != MAGIC || r.u16()? != VERSION {
            return Err(WireError::BadHeader);
        }
        let kind = r.u16()?;
        Ok(match kind {
            ATTACH => Message::Attach(r.attach()?),
            ATTACH_DEVICE => {
                let attach = r.attach()?;
                let device = match r.u8()? {
                    0 => DeviceKind::Blk,
                    1 => {
                        let mac = MacAddr::from_slice(r.take(6)?).ok_or(WireError::Truncated)?;
                        if mac.is_multicast() {
                            return Err(WireError::Bad("net device MAC"));
                        }
                        DeviceKind::Net { mac }
                    }
                    _ => return Err(WireError::Bad("device type")),
                };
                let n = usize::from(r.u16()?);
                if n > MAX_CREDENTIAL {
                    return Err(WireError::Bad("credential length"));
                }
                let cred = std::str::from_utf8(r.take(n)?)
                    .map_err(|_| WireError::Bad("credential (not UTF-8)"))?;
                let credential = (!cred.is_empty()).then(|| cred.to_string());
                Message::AttachDevice(AttachDevice {
                    attach,
                    device,
                    credential,
                })
            }
            ATTACH_REPLY => {
                let status = r.u16()?;
                let n = r.u16()?;
                let config = r.take(usize::from(n))?.to_vec();
                let features = r.u64()?;
                Message::AttachReply(AttachReply {
                    status,
                    config,
                    features,
                })
            }
            DOORBELL => {
                let mut d = Doorbell::default();
                r.doorbell_into(&mut d, &mut Vec::new())?;
                Message::Doorbell(d)
            }
            SET_MODE => Message::SetMode(SetMode {
                poll: r.u8()? != 0,
                next_avail: r.u16()?,
            }),
            QUIESCE => Message::Quiesce,
            QUIESCED => Message::Quiesced(Quiesced { next: r.u16()? }),
            SET_LOG => Message::SetLog(r.u8()? != 0),
            LOGGING => Message::Logging(Logging {
                on: r.u8()? != 0,
                next_used: r.u16()?,
            }),
            k => return Err(WireError::UnexpectedKind(k)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_a_doorbell_into_reused_buffers_gives_what_decode_gives() {
        let mk = |k: u8| {
            Message::Doorbell(Doorbell {
                avail_idx: 9 + u16::from(k),
                entries: (0..k)
                    .map(|i| DoorbellEntry {
                        pos: u16::from(i),
                        head: u16::from(i) * 3,
                        descs: (0..i).map(|j| (u64::from(j) * 16, [j; 16])).collect(),
                        inline: (0..(i % 3))
                            .map(|j| (0x1000 + u64::from(j), vec![k; usize::from(j) * 7]))
                            .collect(),
                    })
                    .collect(),
            })
        };
        let (mut out, mut spare) = (Doorbell::default(), Vec::new());
        // Larger, smaller, then larger again: buffers grow, shrink, regrow.
        for k in [5u8, 2, 6, 0, 4] {
            let mut b = Vec::new();
            let m = mk(k);
            m.encode(&mut b).unwrap();
            assert!(Message::decode_doorbell_into(&b, &mut out, &mut spare).unwrap());
            assert_eq!(Message::Doorbell(out.clone()), m);
            assert_eq!(Message::decode(&b).unwrap(), m);
        }
        let mut b = Vec::new();
        Message::Quiesce.encode(&mut b).unwrap();
        assert!(!Message::decode_doorbell_into(&b, &mut out, &mut spare).unwrap());
        // A truncated doorbell fails as decode fails.
        let mut b = Vec::new();
        mk(3).encode(&mut b).unwrap();
        b.truncate(b.len() - 1);
        assert!(Message::decode_doorbell_into(&b, &mut out, &mut spare).is_err());
        assert!(Message::decode(&b).is_err());
    }

    /// A doorbell-mode attach of an 8-entry ring without regions.
    fn small_attach() -> Attach {
        Attach {
            device_id: 1,
            queue: 0,
            layout: RingLayout::new(8, 0, 0x100, 0x200).unwrap(),
            features: RingFeatures::default(),
            mode: NotifyMode::Doorbell,
            start: 0,
            sidecore: ANY_SIDECORE,
            logging: false,
            regions: vec![],
        }
    }

    fn round_trip(m: Message) {
        let mut b = Vec::new();
        m.encode(&mut b).unwrap();
        assert_eq!(Message::decode(&b).unwrap(), m);
        // Every truncation is refused, never a panic.
        for n in 0..b.len() {
            assert!(Message::decode(&b[..n]).is_err(), "prefix {n} accepted");
        }
    }

    #[test]
    fn messages_round_trip_and_truncations_fail() {
        round_trip(Message::Attach(Attach {
            device_id: 7,
            queue: 1,
            layout: RingLayout::new(256, 0x1000, 0x2000, 0x3000).unwrap(),
            features: RingFeatures {
                indirect: true,
                event_idx: true,
            },
            mode: NotifyMode::Adaptive,
            start: 65000,
            sidecore: 3,
            logging: true,
            regions: vec![WireRegion {
                gpa: 0,
                remote: RemoteRegion {
                    addr: 0x7f00_0000_0000,
                    len: 1 << 20,
                    rkey: 42,
                },
            }],
        }));
        let attach = small_attach();
        for device in [
            DeviceKind::Blk,
            DeviceKind::Net {
                mac: MacAddr::local(5),
            },
        ] {
            for credential in [None, Some("vrio-cap-v1.k.p.t".to_string())] {
                round_trip(Message::AttachDevice(AttachDevice {
                    attach: attach.clone(),
                    device,
                    credential,
                }));
            }
        }
        round_trip(Message::AttachReply(AttachReply {
            status: 0,
            config: vec![1, 2, 3],
            features: 1 << 5,
        }));
        round_trip(Message::Doorbell(Doorbell {
            avail_idx: 9,
            entries: vec![DoorbellEntry {
                pos: 8,
                head: 3,
                descs: vec![(0x1030, [7u8; 16])],
                inline: vec![(0x2000, vec![1, 2, 3]), (0x3000, Vec::new())],
            }],
        }));
        // An inline range longer than the message is refused, not read past.
        let mut b = Vec::new();
        Message::Doorbell(Doorbell {
            avail_idx: 1,
            entries: vec![DoorbellEntry {
                pos: 0,
                head: 0,
                descs: Vec::new(),
                inline: vec![(0x2000, vec![9; 8])],
            }],
        })
        .encode(&mut b)
        .unwrap();
        let n = b.len();
        b[n - 12..n - 8].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(Message::decode(&b), Err(WireError::Truncated));
        round_trip(Message::SetMode(SetMode {
            poll: true,
            next_avail: 65535,
        }));
        round_trip(Message::Quiesced(Quiesced { next: 4097 }));
        round_trip(Message::SetLog(true));
        round_trip(Message::SetLog(false));
        round_trip(Message::Logging(Logging {
            on: true,
            next_used: 65535,
        }));
        let mut b = Vec::new();
        Message::Quiesce.encode(&mut b).unwrap();
        assert_eq!(Message::decode(&b).unwrap(), Message::Quiesce);
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(Message::decode(&[0u8; 3]), Err(WireError::Truncated));
        assert_eq!(Message::decode(&[0u8; 16]), Err(WireError::BadHeader));
        let mut b = Vec::new();
        Message::SetMode(SetMode {
            poll: false,
            next_avail: 0,
        })
        .encode(&mut b)
        .unwrap();
        b[6] = 99;
        assert_eq!(Message::decode(&b), Err(WireError::UnexpectedKind(99)));
        assert_eq!(
            Message::decode(&vec![0u8; MAX_MSG + 1]),
            Err(WireError::TooLarge)
        );
        // A bad ring layout inside an attach is refused.
        let mut a = Vec::new();
        Message::Attach(small_attach()).encode(&mut a).unwrap();
        a[18] = 3; // size 3: not a power of two
        assert!(Message::decode(&a).is_err());
        // An unknown device type, or a multicast port address, is refused.
        let mut d = Vec::new();
        let net = |mac| {
            Message::AttachDevice(AttachDevice {
                attach: small_attach(),
                device: DeviceKind::Net { mac },
                credential: None,
            })
        };
        net(MacAddr::local(1)).encode(&mut d).unwrap();
        let kind_at = d.len() - 9;
        d[kind_at] = 9;
        assert_eq!(Message::decode(&d), Err(WireError::Bad("device type")));
        net(MacAddr::BROADCAST).encode(&mut d).unwrap();
        assert_eq!(Message::decode(&d), Err(WireError::Bad("net device MAC")));
    }
}
