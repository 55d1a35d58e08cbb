//! Guest memory for the fuzz targets: plain byte vectors at guest addresses.
//! Any access outside them is refused, like every real `GuestMemory`.

// Each target uses a different part of this module.
#![allow(dead_code)]

use vrio_core::ring::{DescriptorChain, RingFeatures};
use vrio_core::{GuestMemory, GuestRegion, MemoryError, MemoryMap};

pub struct VecMemory {
    pub regions: Vec<(u64, Vec<u8>)>,
}

impl VecMemory {
    pub fn map(&self) -> Option<MemoryMap> {
        MemoryMap::new(
            self.regions
                .iter()
                .map(|(gpa, b)| GuestRegion {
                    gpa: *gpa,
                    len: b.len() as u64,
                })
                .collect(),
        )
        .ok()
    }

    fn locate(&self, addr: u64, len: usize) -> Result<(usize, usize), MemoryError> {
        let oob = MemoryError::OutOfBounds {
            addr,
            len: len as u64,
        };
        for (i, (gpa, b)) in self.regions.iter().enumerate() {
            if addr >= *gpa {
                let off = addr - gpa;
                let end = off.checked_add(len as u64).ok_or(oob.clone())?;
                if end <= b.len() as u64 {
                    return Ok((i, off as usize));
                }
            }
        }
        Err(oob)
    }
}

impl GuestMemory for VecMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let (i, off) = self.locate(addr, buf.len())?;
        buf.copy_from_slice(&self.regions[i].1[off..off + buf.len()]);
        Ok(())
    }
    fn write(&self, _addr: u64, _buf: &[u8]) -> Result<(), MemoryError> {
        unreachable!("use write_mut")
    }
}

/// Interior mutability for the device target, which writes used rings.
pub struct CellMemory(pub std::cell::RefCell<VecMemory>);

impl GuestMemory for CellMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.0.borrow().read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let mut m = self.0.borrow_mut();
        let (i, off) = m.locate(addr, buf.len())?;
        m.regions[i].1[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

/// Every segment a walk produced, accepted or not, lies inside the map and
/// inside the memory that backs it.
pub fn assert_inside(chain: &DescriptorChain, map: &MemoryMap, mem: &VecMemory, size: u16) {
    let n = chain.readable.len() + chain.writable.len();
    assert!(n <= usize::from(size), "more segments than the queue size");
    for s in chain.readable.iter().chain(&chain.writable) {
        assert!(
            map.check(s.addr, u64::from(s.len)).is_ok(),
            "segment {:#x}+{:#x} outside the map",
            s.addr,
            s.len
        );
        assert!(mem.locate(s.addr, s.len as usize).is_ok());
    }
}

/// The ring a chain-walking target walks, read from the front of its input:
/// size_log2, features, head (u16), desc table slot (u16), second region
/// gpa (u16, in pages), region split (u16).
pub struct RingArgs {
    pub size: u16,
    pub features: RingFeatures,
    pub head: u16,
    pub desc: u64,
    gpa1: u64,
    split: usize,
}

impl RingArgs {
    pub fn read(input: &mut Input) -> Self {
        Self {
            size: 1u16 << (input.u8() % 16),
            features: RingFeatures::from_bits(u64::from(input.u8()) << 28),
            head: input.u16(),
            desc: u64::from(input.u16()) * 16,
            gpa1: u64::from(input.u16()) << 12,
            split: usize::from(input.u16()),
        }
    }

    /// The memory image cut in two regions (at `split`, the second at
    /// `gpa1` past the first's end); empty parts are left out.
    pub fn memory(&self, image: &[u8]) -> VecMemory {
        let (r0, r1) = image.split_at(self.split.min(image.len()));
        let mut regions = Vec::new();
        if !r0.is_empty() {
            regions.push((0, r0.to_vec()));
        }
        if !r1.is_empty() {
            regions.push((r0.len() as u64 + self.gpa1, r1.to_vec()));
        }
        VecMemory { regions }
    }
}

/// Little-endian reader over fuzz input; runs out as zeroes.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    pub fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
