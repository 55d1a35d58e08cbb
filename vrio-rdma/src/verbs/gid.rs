//! GID selection: RoCE needs the RoCE v2 entry that carries the IPv4 address.
//!
//! On rxe (and most RoCE NICs) index 0 is the link-local `fe80::` GID, so
//! taking index 0 gives RoCE v1 or a link-local v2 path that rdma_cm would not
//! pick. rdma_cm derives the GID from the bound address on its own; this pure
//! function is what vrio logs and checks against.

/// The kind of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidKind {
    /// An InfiniBand GID.
    InfiniBand,
    /// RoCE v1 (Ethernet, not routable).
    RoceV1,
    /// RoCE v2 (UDP/IP, routable): the one vrio wants.
    RoceV2,
}

/// One GID table entry, as `ibv_query_gid_table` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidRow {
    /// The entry's GID index on its port.
    pub index: u32,
    /// The GID, as 16 raw bytes (IPv4 addresses appear IPv4-mapped).
    pub gid: [u8; 16],
    /// The entry's type.
    pub kind: GidKind,
}

/// The IPv4 address inside an IPv4-mapped GID (`::ffff:a.b.c.d`).
pub fn ipv4_of(gid: &[u8; 16]) -> Option<std::net::Ipv4Addr> {
    let mapped = gid[..10].iter().all(|b| *b == 0) && gid[10] == 0xff && gid[11] == 0xff;
    mapped.then(|| std::net::Ipv4Addr::new(gid[12], gid[13], gid[14], gid[15]))
}

/// Picks the RoCE v2 IPv4 entry: the one with `want` if given, else the first
/// one. Returns its index.
pub fn pick_roce_v2_ipv4(rows: &[GidRow], want: Option<std::net::Ipv4Addr>) -> Option<u32> {
    rows.iter()
        .filter(|r| r.kind == GidKind::RoceV2)
        .filter_map(|r| ipv4_of(&r.gid).map(|ip| (r.index, ip)))
        .find(|(_, ip)| want.is_none_or(|w| w == *ip))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn link_local() -> [u8; 16] {
        let mut g = [0u8; 16];
        g[0] = 0xfe;
        g[1] = 0x80;
        g[8..].copy_from_slice(&[0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x56]);
        g
    }

    fn mapped(ip: [u8; 4]) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&ip);
        g
    }

    fn row(index: u32, gid: [u8; 16], kind: GidKind) -> GidRow {
        GidRow { index, gid, kind }
    }

    /// The table rxe shows on Debian 6.1 for eth0 = 10.0.2.15.
    fn rxe_table() -> Vec<GidRow> {
        vec![
            row(0, link_local(), GidKind::RoceV2),
            row(1, mapped([10, 0, 2, 15]), GidKind::RoceV2),
        ]
    }

    #[test]
    fn rxe_picks_index_1_not_0() {
        assert_eq!(pick_roce_v2_ipv4(&rxe_table(), None), Some(1));
        assert_eq!(
            pick_roce_v2_ipv4(&rxe_table(), Some(Ipv4Addr::new(10, 0, 2, 15))),
            Some(1)
        );
    }

    #[test]
    fn skips_roce_v1_entry_with_same_address() {
        let rows = vec![
            row(0, link_local(), GidKind::RoceV1),
            row(1, link_local(), GidKind::RoceV2),
            row(2, mapped([192, 168, 1, 5]), GidKind::RoceV1),
            row(3, mapped([192, 168, 1, 5]), GidKind::RoceV2),
        ];
        assert_eq!(pick_roce_v2_ipv4(&rows, None), Some(3));
    }

    #[test]
    fn matches_the_wanted_address() {
        let rows = vec![
            row(2, mapped([10, 0, 4, 1]), GidKind::RoceV2),
            row(5, mapped([10, 0, 4, 2]), GidKind::RoceV2),
        ];
        assert_eq!(
            pick_roce_v2_ipv4(&rows, Some(Ipv4Addr::new(10, 0, 4, 2))),
            Some(5)
        );
        assert_eq!(
            pick_roce_v2_ipv4(&rows, Some(Ipv4Addr::new(10, 9, 9, 9))),
            None
        );
    }

    #[test]
    fn none_without_ipv4_v2_entry() {
        let rows = vec![
            row(0, link_local(), GidKind::RoceV2),
            row(1, mapped([10, 0, 2, 15]), GidKind::InfiniBand),
        ];
        assert_eq!(pick_roce_v2_ipv4(&rows, None), None);
        assert_eq!(pick_roce_v2_ipv4(&[], None), None);
    }

    #[test]
    fn ipv4_of_rejects_non_mapped() {
        assert_eq!(ipv4_of(&link_local()), None);
        assert_eq!(
            ipv4_of(&mapped([1, 2, 3, 4])),
            Some(Ipv4Addr::new(1, 2, 3, 4))
        );
    }
}
