//! Why the device model or the switch dropped a frame: each reason is
//! counted on its own (see `net::stats`).

/// Why a frame was dropped. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than an Ethernet header (or than the virtio-net header).
    Short,
    /// Longer than MTU + 14 (+4 with a VLAN tag).
    Oversized,
    /// virtio_net_hdr asked for an offload that was not negotiated.
    BadHeader,
    /// Source address is a group address.
    MulticastSource,
    /// A guest port sent from an address other than its configured MAC.
    Spoofed,
    /// A descriptor chain the device could not use (walker or layout rules).
    BadChain,
    /// The destination port's backlog was full.
    BacklogFull,
    /// The frame cannot fit the guest's RX buffers even when all are used.
    RxTooLarge,
    /// Destination is the port the frame came from.
    Loopback,
    /// The uplink refused the frame.
    UplinkError,
    /// An interposition stage refused it (the ACL; its own counters say
    /// why).
    Policy,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 11] = [
        DropReason::Short,
        DropReason::Oversized,
        DropReason::BadHeader,
        DropReason::MulticastSource,
        DropReason::Spoofed,
        DropReason::BadChain,
        DropReason::BacklogFull,
        DropReason::RxTooLarge,
        DropReason::Loopback,
        DropReason::UplinkError,
        DropReason::Policy,
    ];

    /// The reason's name in reports (snake case).
    pub fn name(&self) -> &'static str {
        match self {
            DropReason::Short => "short",
            DropReason::Oversized => "oversized",
            DropReason::BadHeader => "bad_header",
            DropReason::MulticastSource => "multicast_source",
            DropReason::Spoofed => "spoofed",
            DropReason::BadChain => "bad_chain",
            DropReason::BacklogFull => "backlog_full",
            DropReason::RxTooLarge => "rx_too_large",
            DropReason::Loopback => "loopback",
            DropReason::UplinkError => "uplink_error",
            DropReason::Policy => "policy",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}
