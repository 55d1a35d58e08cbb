//! Block contents that identify (guest, block, version), so a read-back can
//! tell a stale, misplaced or torn block from the right one.

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn word(seed: u64, block: u64, version: u32, i: usize) -> u64 {
    splitmix(seed ^ block.rotate_left(20) ^ (u64::from(version) << 44)).wrapping_add(i as u64)
        ^ block
}

/// Fills `buf` with the pattern; version 0 means "never written": zeros.
pub fn fill_pattern(buf: &mut [u8], seed: u64, block: u64, version: u32) {
    if version == 0 {
        buf.fill(0);
        return;
    }
    for (i, c) in buf.chunks_mut(8).enumerate() {
        let w = word(seed, block, version, i).to_le_bytes();
        c.copy_from_slice(&w[..c.len()]);
    }
}

pub fn pattern_matches(buf: &[u8], seed: u64, block: u64, version: u32) -> bool {
    if version == 0 {
        return buf.iter().all(|&b| b == 0);
    }
    buf.chunks(8).enumerate().all(|(i, c)| {
        let w = word(seed, block, version, i).to_le_bytes();
        c == &w[..c.len()]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_block_version_and_seed() {
        let mut a = [0u8; 4096];
        fill_pattern(&mut a, 1, 7, 3);
        assert!(pattern_matches(&a, 1, 7, 3));
        assert!(!pattern_matches(&a, 1, 7, 4));
        assert!(!pattern_matches(&a, 1, 8, 3));
        assert!(!pattern_matches(&a, 2, 7, 3));
        assert!(!pattern_matches(&a, 1, 7, 0));
        a[4095] ^= 1;
        assert!(!pattern_matches(&a, 1, 7, 3));
        fill_pattern(&mut a, 1, 7, 0);
        assert!(pattern_matches(&a, 1, 7, 0));
    }
}
