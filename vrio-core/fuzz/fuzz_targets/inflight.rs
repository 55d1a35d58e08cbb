//! `InflightRegion::from_peer` (SET_INFLIGHT_FD) over a memfd whose length,
//! seals and contents come from the fuzzer, with the size, offset and
//! geometry a VMM sends; then what a reconnecting back-end reads out of
//! the region (`QueueTracker::recover`, `sync`) against a guest ring from
//! the fuzzer. It must never panic (nor fault on the mapping); a region is
//! accepted only when it is sealed against shrinking and lies inside the
//! file and the limit; recovery resubmits distinct heads of the ring.
//!
//! Input: mode (u8: bits 0-1 seals, 2 raw geometry, 3 raw size, 4 raw
//! offset, 5 size to the end of the file), queues (u16), queue size (u16),
//! size (u64), offset (u64), file pages (u16), ring size log2 (u8), queue
//! (u8), VMM base (u16), guest image length (u16), the guest image (avail
//! ring at 0, used ring at 0x1000), then the file's contents from the
//! region's offset on.

#![no_main]

mod common;

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use common::{CellMemory, Input, VecMemory};
use libfuzzer_sys::fuzz_target;
use vrio_core::ring::RingLayout;
use vrio_core::vhost_user::inflight::{
    region_size, InflightError, InflightRegion, QueueTracker, INFLIGHT_VERSION, MAX_REGION,
};

const PAGE: u64 = 4096;
/// At most 4 MiB of file: every page of an accepted region may be touched.
const MAX_PAGES: u16 = 1024;
const USED: u64 = 0x1000;
const GUEST: usize = 0x2000;

fn memfd(len: u64, seals: u8, contents: &[u8], at: u64) -> OwnedFd {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new
    // descriptor or -1; nothing else is touched.
    let fd = unsafe {
        libc::memfd_create(
            c"fuzz-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len).expect("size the memfd");
    if at < len && !contents.is_empty() {
        let n = contents.len().min((len - at) as usize);
        file.write_all_at(&contents[..n], at)
            .expect("fill the memfd");
    }
    let seals = match seals & 3 {
        0 => 0,
        1 => libc::F_SEAL_SHRINK,
        _ => libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
    };
    if seals != 0 {
        // SAFETY: fcntl on a descriptor we own, with integer arguments.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert!(r >= 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    }
    file.into()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    let (q_raw, qs_raw) = (input.u16(), input.u16());
    let (size_raw, off_raw) = (input.u64(), input.u64());
    let file_len = u64::from(input.u16() % (MAX_PAGES + 1)) * PAGE;
    let ring = 1u16 << (input.u8() % 9);
    let q_sel = input.u8();
    let base = input.u16();
    let image_len = usize::from(input.u16()).min(GUEST);
    let mut image = input.take(image_len).to_vec();
    image.resize(GUEST, 0);
    let contents = input.take(usize::MAX);

    let raw_geometry = mode & 4 != 0;
    let queues = if raw_geometry { q_raw } else { q_raw % 5 };
    let queue_size = if raw_geometry {
        qs_raw
    } else {
        1 << (qs_raw % 16)
    };
    let offset = if mode & 16 != 0 {
        off_raw
    } else {
        (off_raw % 4) * PAGE
    };
    let size = if mode & 8 != 0 {
        size_raw
    } else if mode & 32 != 0 {
        file_len.saturating_sub(offset)
    } else {
        region_size(queues, queue_size).unwrap_or(size_raw)
    };
    let fd = memfd(file_len, mode, contents, offset);

    let region = match InflightRegion::from_peer(fd, size, offset, queues, queue_size) {
        Ok(r) => r,
        Err(e) => {
            // Refusals the geometry alone explains come first.
            if region_size(queues, queue_size).is_err() {
                assert!(matches!(
                    e,
                    InflightError::Geometry { .. } | InflightError::TooLarge(_)
                ));
            }
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    // Accepted: sealed, inside the file and the limit, big enough.
    assert_ne!(mode & 3, 0, "an unsealed fd was accepted");
    let need = region_size(queues, queue_size).expect("accepted geometry");
    assert!(size >= need && size <= MAX_REGION);
    assert_eq!(offset % PAGE, 0);
    assert!(offset.checked_add(size).is_some_and(|end| end <= file_len));
    assert_eq!(
        (region.size(), region.offset()),
        (size, offset),
        "the region is what was asked"
    );
    assert_eq!((region.queues(), region.queue_size()), (queues, queue_size));
    let total = region.inflight_entries();
    assert!(total <= usize::from(queues) * usize::from(queue_size));

    // A reconnecting back-end's read of one queue against the guest ring.
    let q = usize::from(q_sel) % (usize::from(queues) + 1);
    if let Ok(view) = region.queue(q, ring) {
        assert!(q < usize::from(queues) && ring <= queue_size);
        let _ = (view.version(), view.desc_num(), view.used_idx());
        let _ = view.last_batch_head();
        for h in 0..ring {
            assert!(view.inflight(h).is_ok() && view.counter(h).is_ok() && view.next(h).is_ok());
        }
        assert!(view.inflight(ring).is_err(), "an entry past the ring");
    } else {
        assert!(q >= usize::from(queues) || ring > queue_size);
    }
    let mem = CellMemory(RefCell::new(VecMemory {
        regions: vec![(0, image)],
    }));
    let layout = RingLayout::new(ring, 0, 0, USED).expect("a valid layout");
    let Ok((mut tracker, rec)) = QueueTracker::recover(&region, q, layout, &mem, base) else {
        assert!(q >= usize::from(queues) || ring > queue_size);
        return;
    };
    assert!(rec.resubmit.len() <= usize::from(ring));
    let mut seen = vec![false; usize::from(ring)];
    for &h in &rec.resubmit {
        assert!(h < ring, "resubmitted head {h} of a {ring}-entry ring");
        assert!(
            !std::mem::replace(&mut seen[usize::from(h)], true),
            "head {h} twice"
        );
    }
    if !rec.fresh {
        let window = usize::from(
            mem.0.borrow().regions[0].1[2..4]
                .iter()
                .rev()
                .fold(0u16, |v, &b| v << 8 | u16::from(b))
                .wrapping_sub(rec.start),
        );
        assert!(rec.resubmit.len() + usize::from(rec.beyond) <= window);
    }
    // The region now describes the resumed ring.
    let view = region.queue(q, ring).expect("recovered queue");
    assert_eq!(view.version().ok(), Some(INFLIGHT_VERSION));
    assert_eq!(view.desc_num().ok(), Some(ring));
    assert_eq!(view.used_idx().ok(), Some(rec.start));
    tracker
        .sync(&region, &mem)
        .expect("sync over an in-bounds ring");
    tracker
        .sync(&region, &mem)
        .expect("a second sync changes nothing");
});
