//! The local mode end to end without a VMM: the test plays the VMM (memory
//! table, vring addresses, call fd) and the guest driver (rings, kicks).

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};

use vhost_user_backend::VhostUserDaemon;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{FrontConfig, LocalFront, Mem, Serving, VrioBackend};
use crate::blk::{BlockBackend, BlockConfig, MemoryBackend};
use crate::sidecore::{SidecoreConfig, SidecoreThread};
use crate::virtio::memory::{GuestMemory, LocalMemory};
use crate::virtio::ring::layout::VIRTIO_RING_F_EVENT_IDX;
use crate::virtio::ring::{DriverQueue, Segment};
use crate::virtio::ring::{RingFeatures, RingLayout};

const SIZE: u16 = 16;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x11000;
const STATUS: u64 = 0x13000;

fn local_front(queues: u16, backend: Arc<dyn BlockBackend>) -> FrontConfig {
    let sidecore = SidecoreThread::spawn("test-sidecore", SidecoreConfig::default()).unwrap();
    FrontConfig {
        serving: Serving::Local(LocalFront {
            backend,
            blk: BlockConfig::default(),
            sidecore: Arc::new(sidecore),
        }),
        queues,
        max_queue_size: 256,
    }
}

/// One request on queue `q` (its rings at `base`), kicked and waited
/// for; returns the status byte.
#[allow(clippy::too_many_arguments)]
fn request(
    b: &VrioBackend,
    vrings: &[VringRwLock<Mem>],
    drv: &mut DriverQueue,
    mem: &LocalMemory,
    q: usize,
    kind: u32,
    sector: u64,
    data: u64,
) -> u8 {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write(HDR, &hdr).unwrap();
    mem.write(STATUS, &[0xff]).unwrap();
    let seg = |addr, len| Segment { addr, len };
    let (hdr_seg, data_seg, status_seg) = (seg(HDR, 16), seg(data, 4096), seg(STATUS, 1));
    let (readable, writable) = if kind == VIRTIO_BLK_T_OUT {
        (vec![hdr_seg, data_seg], vec![status_seg])
    } else {
        (vec![hdr_seg], vec![data_seg, status_seg])
    };
    drv.add(mem, &readable, &writable, false).unwrap();
    drv.publish(mem).unwrap();
    // The VMM's epoll thread seeing the guest's kick.
    b.handle_event(q as u16, EventSet::IN, vrings, 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((_, len)) = drv.pop_used(mem).unwrap() {
            assert!(len >= 1, "used length {len}");
            break;
        }
        assert!(Instant::now() < deadline, "queue {q}: no completion");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut s = [0u8];
    mem.read(STATUS, &mut s).unwrap();
    s[0]
}

/// A daemon for `b` whose vring worker has exited: it would consume
/// the sidecore's interrupts for its own vrings, so the test's
/// handle_event calls play its part. Its epoll set stays usable.
fn idle_daemon(b: &Arc<VrioBackend>, name: &str) -> VhostUserDaemon<Arc<VrioBackend>> {
    let daemon = VhostUserDaemon::new(
        name.into(),
        b.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    b.set_handlers(&daemon.get_epoll_handlers());
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    wait_until_no_vring_worker();
    daemon
}

fn wait_until_no_vring_worker() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| t.ok())
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .any(|c| c.trim() == "vring_worker");
        if !alive {
            return;
        }
        assert!(Instant::now() < deadline, "the vring worker did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_local_sidecore_serves_each_vring_and_interrupts_through_the_call_fd() {
    let disk = Arc::new(MemoryBackend::new(1 << 20));
    let front = local_front(2, disk.clone());
    let config = match &front.serving {
        Serving::Local(l) => l.config_space(),
        Serving::Remote(_) => unreachable!(),
    };
    let b = Arc::new(VrioBackend::new(front, &config));
    assert_eq!(b.get_config(0, 8), ((1u64 << 20) / 512).to_le_bytes());
    let _daemon = idle_daemon(&b, "test");
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let atomic = GuestMemoryAtomic::new(ram.clone());
    b.update_memory(atomic.clone()).unwrap();
    let features = b.features();
    assert_ne!(features & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    b.acked_features(features);

    let mut vrings = Vec::new();
    let mut drivers = Vec::new();
    let mut calls = Vec::new();
    for q in 0..2u64 {
        let base = 0x1000 + q * 0x4000;
        let layout = RingLayout::new(SIZE, base, base + 0x1000, base + 0x2000).unwrap();
        let v = VringRwLock::new(atomic.clone(), 256).unwrap();
        v.set_queue_size(SIZE);
        v.set_queue_info(layout.desc, layout.avail, layout.used)
            .unwrap();
        v.set_queue_event_idx(true);
        v.set_queue_ready(true);
        v.set_enabled(true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let fd = call.try_clone().unwrap().into_raw_fd();
        // SAFETY: `fd` is a fresh duplicate that nothing else owns.
        v.set_call(Some(unsafe { File::from_raw_fd(fd) }));
        let drv = DriverQueue::new(layout, RingFeatures::from_bits(features), None);
        drv.init(&ram).unwrap();
        vrings.push(v);
        drivers.push(drv);
        calls.push(call);
    }

    // A write on queue 1, read back on queue 0.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    ram.write(DATA, &pattern).unwrap();
    let s = request(
        &b,
        &vrings,
        &mut drivers[1],
        &ram,
        1,
        VIRTIO_BLK_T_OUT,
        8,
        DATA,
    );
    assert_eq!(s, 0, "write status");
    let mut on_disk = vec![0u8; 4096];
    disk.read_vectored_at(8 * 512, &mut [std::io::IoSliceMut::new(&mut on_disk)])
        .unwrap();
    assert_eq!(on_disk, pattern, "the write reached the back-end");
    let back = DATA + 0x1000;
    let s = request(
        &b,
        &vrings,
        &mut drivers[0],
        &ram,
        0,
        VIRTIO_BLK_T_IN,
        8,
        back,
    );
    assert_eq!(s, 0, "read status");
    let mut got = vec![0u8; 4096];
    ram.read(back, &mut got).unwrap();
    assert_eq!(got, pattern, "read back through queue 0");
    assert_eq!(b.attached_queues(), 2, "one sidecore queue per vring");

    // The sidecore's interrupt reaches the VMM's call fd of that vring.
    // It publishes the used entry before it writes its call fd, so a
    // preempted sidecore may not have written it yet: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        b.handle_event(2 + 1, EventSet::IN, &vrings, 0).unwrap();
        if calls[0].read().is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queue 0 was not interrupted within 10 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(calls[1].read().is_err(), "queue 1 has no new interrupt");

    // GET_VRING_BASE: the ring stops where it is and leaves the sidecore.
    b.stop_vring(0).unwrap();
    assert_eq!(vrings[0].queue_next_avail(), 1);
    assert_eq!(b.attached_queues(), 1);
    b.reset_device();
    assert_eq!(b.attached_queues(), 0);
    drop(b);

    // The back-end died with a request posted on queue 0 whose kick it
    // ate. The next back-end gets the ring at QEMU's base (used.idx, 1)
    // and no kick: the rescan timer finds the request and serves it.
    let pattern2: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
    ram.write(DATA, &pattern2).unwrap();
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    hdr[8..16].copy_from_slice(&16u64.to_le_bytes());
    ram.write(HDR, &hdr).unwrap();
    ram.write(STATUS, &[0xff]).unwrap();
    let seg = |addr, len| Segment { addr, len };
    drivers[0]
        .add(
            &ram,
            &[seg(HDR, 16), seg(DATA, 4096)],
            &[seg(STATUS, 1)],
            false,
        )
        .unwrap();
    drivers[0].publish(&ram).unwrap();
    let front = local_front(2, disk.clone());
    let b = Arc::new(VrioBackend::new(front, &config));
    let _daemon = idle_daemon(&b, "test2");
    b.update_memory(atomic.clone()).unwrap();
    b.acked_features(features);
    // QEMU's SET_VRING_BASE after a crash: used.idx of each ring.
    for v in &vrings {
        v.set_queue_next_avail(1);
        v.set_queue_next_used(1);
    }
    while calls[0].read().is_ok() {}
    // What the epoll thread does on each timer tick.
    b.handle_event(b.rescan_event() as u16, EventSet::IN, &vrings, 0)
        .unwrap();
    assert_eq!(b.attached_queues(), 1, "the rescan attached queue 0 only");
    assert!(
        calls[0].read().is_ok(),
        "a resumed vring interrupts the guest once"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while drivers[0].pop_used(&ram).unwrap().is_none() {
        assert!(Instant::now() < deadline, "the resumed ring served nothing");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut s = [0u8];
    ram.read(STATUS, &mut s).unwrap();
    assert_eq!(s[0], 0, "write status after the resume");
    disk.read_vectored_at(16 * 512, &mut [std::io::IoSliceMut::new(&mut on_disk)])
        .unwrap();
    assert_eq!(on_disk, pattern2, "the resumed ring wrote to the back-end");
    b.stop_vring(0).unwrap();
    assert_eq!(
        vrings[0].queue_next_avail(),
        2,
        "the resumed ring went on from 1"
    );
}
