//! The rule both software back-ends (`soft`, `sim`) apply before touching
//! registered memory: access flags and bounds.

use crate::api::Access;

/// What an access needs from a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Local source (WRITE/SEND payload): any registered region.
    LocalRead,
    /// Local destination (READ result, receive buffer).
    LocalWrite,
    /// A peer's READ.
    RemoteRead,
    /// A peer's WRITE or WRITE_WITH_IMM.
    RemoteWrite,
}

/// Whether a region of `size` bytes at `base`, registered with `access`,
/// lets `need` touch `addr..addr+len`: the flag is granted and the range
/// lies inside the region (overflow-checked).
pub(crate) fn permits(
    base: u64,
    size: u64,
    access: Access,
    addr: u64,
    len: u64,
    need: Need,
) -> bool {
    let allowed = match need {
        Need::LocalRead => true,
        Need::LocalWrite => access.local_write,
        Need::RemoteRead => access.remote_read,
        Need::RemoteWrite => access.remote_write,
    };
    let (Some(end), Some(region_end)) = (addr.checked_add(len), base.checked_add(size)) else {
        return false;
    };
    allowed && addr >= base && end <= region_end
}
