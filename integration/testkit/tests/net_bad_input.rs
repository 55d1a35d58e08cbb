//! Hostile guests against the net device and switch: spoofed, short,
//! oversized and offload-flagged frames, and broken descriptor chains on
//! both queues. Each is dropped and counted under its own reason, the
//! guest gets its buffer back (used length 0), and good traffic after it
//! still flows.

use std::sync::Arc;
use std::time::Instant;

use vrio_core::memory::{GuestMemory, LocalMemory};
use vrio_core::net::{
    DropReason, MacAddr, NetHeader, Switch, SwitchConfig, HDR_LEN, RX_QUEUE, TX_QUEUE,
};
use vrio_core::ring::{Descriptor, DriverQueue, RingLayout, Segment};
use vrio_core::sidecore::ServedQueue;
use vrio_testkit::net::traffic::{build_frame, check_frame};
use vrio_testkit::net::{attach_net_guest, AttachedNetGuest, NetGuestConfig};

fn pair(mergeable: bool) -> (Arc<Switch>, AttachedNetGuest, AttachedNetGuest) {
    let sw = Switch::new(SwitchConfig::default());
    let a = attach_net_guest(&sw, NetGuestConfig::new(1), mergeable).unwrap();
    let b = attach_net_guest(&sw, NetGuestConfig::new(2), mergeable).unwrap();
    (sw, a, b)
}

fn seg(addr: u64, len: u32) -> Segment {
    Segment { addr, len }
}

/// A driver of its own on `g`'s ring `queue`, to post hostile chains, with
/// the guest's memory and the ring's layout.
fn own_driver(g: &AttachedNetGuest, queue: usize) -> (Arc<LocalMemory>, RingLayout, DriverQueue) {
    let side = g.guest.device_side(queue).unwrap();
    let drv = DriverQueue::new(side.layout, side.features, None);
    (g.guest.memory().clone(), side.layout, drv)
}

/// Writes header + frame at the start of TX slot `slot` and returns it as one segment.
fn tx_buf(g: &AttachedNetGuest, slot: u64, hdr: NetHeader, frame: &[u8]) -> Segment {
    let mem = g.guest.memory();
    let base = tx_area(g) + slot * 2048;
    mem.write(base, &hdr.to_bytes()).unwrap();
    mem.write(base + HDR_LEN as u64, frame).unwrap();
    seg(base, (HDR_LEN + frame.len()) as u32)
}

/// The synthetic guest's TX slot area, from the TX ring's device side.
fn tx_area(g: &AttachedNetGuest) -> u64 {
    // Memory ends with the TX slots: queue_size slots of TX_SLOT bytes.
    let size = vrio_core::memory::MemoryMap::of(&**g.guest.memory())
        .unwrap()
        .size();
    size - 256 * vrio_testkit::net::guest::TX_SLOT
}

#[test]
fn bad_frames_are_dropped_counted_and_completed() {
    let (_sw, mut a, b) = pair(true);
    let (mem, layout, mut drv) = own_driver(&a, TX_QUEUE);
    let (ma, mb) = (a.guest.cfg.mac, b.guest.cfg.mac);
    let good = build_frame(mb, ma, 1, 100);
    // A checksum field past the frame's end.
    let csum = NetHeader {
        flags: vrio_core::net::header::F_NEEDS_CSUM,
        csum_start: 90,
        csum_offset: 100,
        ..NetHeader::default()
    };
    let gso = NetHeader {
        gso_type: 1,
        ..NetHeader::default()
    };
    let h = NetHeader::default();
    let mut cases: Vec<(Vec<Segment>, Vec<Segment>, Option<DropReason>)> = vec![
        // Spoofed source (b's address from a's port).
        (
            vec![tx_buf(&a, 0, h, &build_frame(mb, mb, 0, 100))],
            vec![],
            Some(DropReason::Spoofed),
        ),
        // Oversized: 1515 bytes, untagged.
        (
            vec![tx_buf(&a, 1, h, &build_frame(mb, ma, 0, 1515))],
            vec![],
            Some(DropReason::Oversized),
        ),
        // Short: a 13-byte frame, and a chain shorter than the header.
        (
            vec![tx_buf(&a, 2, h, &good[..13])],
            vec![],
            Some(DropReason::Short),
        ),
        (
            vec![seg(tx_area(&a) + 3 * 2048, 10)],
            vec![],
            Some(DropReason::Short),
        ),
        // A checksum request outside the frame, and an offload that was
        // not offered.
        (
            vec![tx_buf(&a, 4, csum, &good)],
            vec![],
            Some(DropReason::BadHeader),
        ),
        (
            vec![tx_buf(&a, 5, gso, &good)],
            vec![],
            Some(DropReason::BadHeader),
        ),
        // Multicast source.
        (
            vec![tx_buf(&a, 6, h, &{
                let mut f = good.clone();
                f[6] |= 1;
                f
            })],
            vec![],
            Some(DropReason::MulticastSource),
        ),
        // A device-writable descriptor in a TX chain.
        (
            vec![tx_buf(&a, 7, h, &good)],
            vec![seg(tx_area(&a) + 8 * 2048, 64)],
            Some(DropReason::BadChain),
        ),
        // A buffer outside guest memory (refused by the walker).
        (vec![seg(1 << 40, 100)], vec![], Some(DropReason::BadChain)),
        // Finally a good frame, which must still get through.
        (vec![tx_buf(&a, 9, h, &good)], vec![], None),
    ];
    // A huge length must be refused before anything is allocated.
    cases.insert(
        0,
        (
            vec![seg(tx_area(&a), u32::MAX)],
            vec![],
            Some(DropReason::BadChain),
        ),
    );
    let mut heads = Vec::new();
    for (r, w, _) in &cases {
        heads.push(drv.add(&*mem, r, w, false).unwrap());
    }
    // A looping chain: the last good-looking descriptor points at itself.
    let l = drv
        .add(
            &*mem,
            &[tx_buf(&a, 10, h, &good), tx_buf(&a, 11, h, &good)],
            &[],
            false,
        )
        .unwrap();
    let mut d = [0u8; 16];
    mem.read(layout.desc_addr(l), &mut d).unwrap();
    let first = Descriptor::from_bytes(&d);
    let mut looped = first;
    looped.next = l;
    mem.write(layout.desc_addr(l), &looped.to_bytes()).unwrap();
    drv.publish(&*mem).unwrap();

    let out = a.tx.poll(64, Instant::now()).unwrap();
    assert_eq!(out.requests + out.errors, cases.len() as u32 + 1);
    // Every chain came back, with nothing written.
    let mut back = Vec::new();
    while let Some((head, len)) = drv.pop_used(&*mem).unwrap() {
        assert_eq!(len, 0);
        back.push(head);
    }
    assert_eq!(back.len(), cases.len() + 1);
    let s = a.port.stats().snapshot();
    for reason in DropReason::ALL {
        let want = cases.iter().filter(|c| c.2 == Some(reason)).count() as u64
            + u64::from(reason == DropReason::BadChain); // the loop
        assert_eq!(s.drops(reason), want, "{}", reason.name());
    }
    assert_eq!(s.rx_packets, 1);
    // The good frame waits in b's backlog, intact.
    assert_eq!(b.port.backlog_len(), 1);
    let f = vrio_core::net::FrameSource::pop(&*b.port).unwrap();
    assert_eq!(check_frame(&f), Some((mb, ma, 1)));
}

#[test]
fn bad_rx_chains_are_completed_and_frames_still_arrive() {
    let (sw, a, mut b) = pair(true);
    let (mem, _, mut drv) = own_driver(&b, RX_QUEUE);
    // Scratch buffers in the guest's (unused here) TX slot area.
    let rx_base = tx_area(&b);
    // Readable descriptor, too small for a header, outside memory, then two
    // good 64-byte buffers (frame of 100 bytes + 12 needs both: merged).
    let chains: [(&[Segment], &[Segment]); 5] = [
        (&[seg(rx_base, 64)], &[seg(rx_base + 64, 64)]),
        (&[], &[seg(rx_base + 128, 11)]),
        (&[], &[seg(1 << 40, 64)]),
        (&[], &[seg(rx_base + 256, 64)]),
        (&[], &[seg(rx_base + 320, 64)]),
    ];
    let heads: Vec<u16> = chains
        .iter()
        .map(|(r, w)| drv.add(&*mem, r, w, false).unwrap())
        .collect();
    let (g1, g2) = (heads[3], heads[4]);
    drv.publish(&*mem).unwrap();
    let (ma, mb) = (a.guest.cfg.mac, b.guest.cfg.mac);
    sw.forward(&a.port, build_frame(mb, ma, 5, 100));
    let out = b.rx.poll(8, Instant::now()).unwrap();
    assert_eq!((out.requests, out.errors), (1, 3));
    let mut used = Vec::new();
    while let Some(u) = drv.pop_used(&*mem).unwrap() {
        used.push(u);
    }
    assert_eq!(used.len(), 5);
    assert!(used[..3].iter().all(|&(_, len)| len == 0));
    assert_eq!(&used[3..], &[(g1, 64), (g2, 48)]);
    let mut buf = [0u8; 112];
    mem.read(rx_base + 256, &mut buf[..64]).unwrap();
    mem.read(rx_base + 320, &mut buf[64..]).unwrap();
    assert_eq!(
        NetHeader::from_bytes(buf[..12].try_into().unwrap()).num_buffers,
        2
    );
    assert_eq!(check_frame(&buf[12..]), Some((mb, ma, 5)));
    let s = b.port.stats().snapshot();
    assert_eq!(s.drops(DropReason::BadChain), 3);
    assert_eq!(s.tx_packets, 1);
}

#[test]
fn a_full_backlog_drops_instead_of_growing() {
    let sw = Switch::new(SwitchConfig {
        backlog: 8,
        ..SwitchConfig::default()
    });
    let a = attach_net_guest(&sw, NetGuestConfig::new(1), true).unwrap();
    let b = attach_net_guest(&sw, NetGuestConfig::new(2), true).unwrap();
    // b never posts RX buffers.
    let (ma, mb) = (a.guest.cfg.mac, MacAddr::local(2));
    for i in 0..100 {
        sw.forward(&a.port, build_frame(mb, ma, i, 64));
    }
    assert_eq!(b.port.backlog_len(), 8);
    assert_eq!(b.port.stats().snapshot().drops(DropReason::BacklogFull), 92);
}

/// The ones'-complement sum of `b` as big-endian words, folded.
fn sum16(b: &[u8], mut acc: u32) -> u16 {
    for w in b.chunks(2) {
        acc += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[test]
fn a_partial_udp_checksum_is_completed_before_switching() {
    let (_sw, mut a, b) = pair(true);
    let (mem, _, mut drv) = own_driver(&a, TX_QUEUE);
    let (ma, mb) = (a.guest.cfg.mac, b.guest.cfg.mac);
    // Ethernet + IPv4 (20) + UDP (8) + 101 bytes of payload (odd).
    let payload: Vec<u8> = (0..101u8).map(|i| i.wrapping_mul(37)).collect();
    let udp_len = 8 + payload.len();
    let mut f = Vec::new();
    f.extend_from_slice(&mb.0);
    f.extend_from_slice(&ma.0);
    f.extend_from_slice(&[0x08, 0x00]);
    let (src, dst) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0]);
    f[16..18].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x30, 0x39, 0x13, 0x88]);
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    // The driver seeds the field with the pseudo-header sum (not inverted).
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&sum16(&pseudo, 0).to_be_bytes());
    f.extend_from_slice(&payload);
    let hdr = NetHeader {
        flags: vrio_core::net::header::F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 6,
        ..NetHeader::default()
    };
    drv.add(&*mem, &[tx_buf(&a, 0, hdr, &f)], &[], false)
        .unwrap();
    drv.publish(&*mem).unwrap();
    a.tx.poll(8, Instant::now()).unwrap();
    assert_eq!(a.port.stats().snapshot().checksummed, 1);
    let got = vrio_core::net::FrameSource::pop(&*b.port).expect("the frame was switched");
    assert_eq!(got.len(), f.len());
    assert_eq!(got[..40], f[..40], "only the checksum changed");
    assert_eq!(got[42..], f[42..], "only the checksum changed");
    assert_ne!(got[40..42], f[40..42], "the checksum was written");
    // A receiver's check: pseudo-header + UDP header + payload sum to all ones.
    assert_eq!(sum16(&got[34..], u32::from(sum16(&pseudo, 0))), 0xffff);
}
