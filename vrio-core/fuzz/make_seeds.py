#!/usr/bin/env python3
"""Writes the seed inputs of the parser fuzz targets under seeds/<target>.

Each seed is a valid input, laid out the way the target reads it and
encoded as the project's encoders do (remote::wire::Message::encode,
soft::wire::Header::encode, the vhost-user spec, virtio 1.x). Run it from
anywhere; it overwrites the seeds it names and leaves others alone.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(data))


def le(fmt, *v):
    return struct.pack("<" + fmt, *v)


# --- remote_wire: vrio_core::remote::wire ----------------------------------
MAGIC, VERSION = 0x4F495256, 3
INDIRECT, EVENT_IDX = 1 << 28, 1 << 29


def msg(kind, body=b""):
    return le("IHH", MAGIC, VERSION, kind) + body


def attach(regions, size=256, mode=2, features=INDIRECT | EVENT_IDX):
    b = le("QHHIBHH", 7, 1, size, features, mode, 65000, 3)
    b += le("QQQ", 0x1000, 0x2000, 0x3000)
    b += le("H", len(regions))
    for gpa, addr, ln, rkey in regions:
        b += le("QQQI", gpa, addr, ln, rkey)
    return b


put("remote_wire", "attach", msg(1, attach([(0, 0x7F0000000000, 1 << 20, 42)])))
put(
    "remote_wire",
    "attach_device_net",
    msg(7, attach([], size=8, mode=1, features=0) + b"\x01" + bytes([2, 0, 0, 0, 0, 5])),
)
put("remote_wire", "attach_device_blk", msg(7, attach([(0, 0x1000, 4096, 1)]) + b"\x00"))
put("remote_wire", "attach_reply", msg(2, le("HH", 0, 3) + b"\x01\x02\x03"))
desc = le("QIHH", 0x4000, 512, 1, 1)
put(
    "remote_wire",
    "doorbell",
    msg(3, le("HH", 9, 2) + le("HHH", 8, 3, 1) + le("Q", 0x1030) + desc + le("HHH", 9, 4, 0)),
)
put("remote_wire", "set_mode", msg(4, le("BH", 1, 65535)))
put("remote_wire", "quiesce", msg(5))
put("remote_wire", "quiesced", msg(6, le("H", 4097)))

# --- soft_wire: vrio_rdma::soft::wire, a stream of frames --------------------
SOFT_MAGIC = int.from_bytes(b"VRIOSOF1", "little")
HELLO, READ, WRITE, WRITE_IMM, SEND, READ_RESP, ACK = range(1, 8)


def frame(kind, payload=b"", status=0, addr=0, rkey=0, aux=0):
    return le("IBBHQII", len(payload), kind, status, 0, addr, rkey, aux) + payload


put("soft_wire", "hello", frame(HELLO, addr=SOFT_MAGIC, aux=1))
put(
    "soft_wire",
    "writes",
    frame(HELLO, addr=SOFT_MAGIC, aux=1)
    + frame(WRITE, b"abcdefgh", addr=0x1000, rkey=7)
    + frame(WRITE_IMM, b"", addr=0x1008, rkey=7, aux=99)
    + frame(ACK)
    + frame(ACK),
)
put(
    "soft_wire",
    "read",
    frame(READ, addr=0x2000, rkey=9, aux=16)
    + frame(READ_RESP, bytes(range(16)))
    + frame(READ_RESP, status=1),
)
put("soft_wire", "send", frame(SEND, b"\x01" * 24) + frame(ACK, status=3))

# --- vhost_user_msg: the relay's view of a vhost-user stream ------------------
V1, REPLY, NEED_REPLY = 1, 4, 8
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES = 15, 16
SET_FEATURES, SET_VRING_ENABLE = 2, 18
GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32


def vu(req, body=b"", flags=V1):
    return le("III", req, flags, len(body)) + body


def inflight_body(size, offset, queues, queue_size):
    return le("QQHH", size, offset, queues, queue_size) + bytes(4)


put(
    "vhost_user_msg",
    "handshake",
    vu(GET_PROTOCOL_FEATURES)
    + vu(GET_PROTOCOL_FEATURES, le("Q", 0x1203), V1 | REPLY)
    + vu(SET_PROTOCOL_FEATURES, le("Q", 0x1203))
    + vu(SET_VRING_ENABLE, le("II", 1, 1), V1 | NEED_REPLY)
    + vu(SET_FEATURES, le("Q", 1 << 32)),
)
put(
    "vhost_user_msg",
    "inflight",
    vu(GET_INFLIGHT_FD, inflight_body(0, 0, 2, 128))
    + vu(GET_INFLIGHT_FD, inflight_body(4352, 0, 2, 128), V1 | REPLY)
    + vu(SET_INFLIGHT_FD, inflight_body(4352, 0, 2, 128), V1 | NEED_REPLY),
)

# --- inflight: InflightRegion::from_peer and recovery --------------------------


def inflight_seed(mode, q_raw, qs_raw, size_raw, off_raw, pages, ring_log2, q, base, image, contents):
    return (
        le("BHHQQHBBHH", mode, q_raw, qs_raw, size_raw, off_raw, pages, ring_log2, q, base, len(image))
        + image
        + contents
    )


def ring_image(avail_heads, used_heads):
    img = bytearray(0x1020)
    struct.pack_into("<HH", img, 0, 0, len(avail_heads))
    for i, h in enumerate(avail_heads):
        struct.pack_into("<H", img, 4 + 2 * i, h)
    struct.pack_into("<HH", img, 0x1000, 0, len(used_heads))
    for i, h in enumerate(used_heads):
        struct.pack_into("<II", img, 0x1004 + 8 * i, h, 0)
    return bytes(img)


def queue_region(ring, used_idx, entries):
    """One queue's region (split ring): header, then DescStateSplit x ring,
    rounded up to 64 bytes. `entries` maps head -> counter (in flight)."""
    n = (16 + 16 * ring + 63) // 64 * 64
    r = bytearray(n)
    struct.pack_into("<QHHHH", r, 0, 0, 1, ring, 0, used_idx)
    for h, counter in entries.items():
        struct.pack_into("<B5xHQ", r, 16 + 16 * h, 1, 0, counter)
    return bytes(r)


# The unit test's restart: queue 1 of two 8-entry queues; the region says
# used 1 and heads 1, 2, 7 in flight; the ring says used 2, avail 5.
two_queues = queue_region(8, 0, {}) + queue_region(8, 1, {1: 1, 2: 2, 7: 3})
put(
    "inflight",
    "restart",
    inflight_seed(1, 2, 3, 0, 0, 1, 3, 1, 2, ring_image([0, 1, 2, 7, 6], [0, 1]), two_queues),
)
# A fresh (version 0) region mapped to the end of a fully sealed file.
put("inflight", "fresh", inflight_seed(2 | 32, 1, 2, 0, 0, 1, 2, 0, 0, b"", b""))
# The same region at a page offset in a two-page file.
put(
    "inflight",
    "offset",
    inflight_seed(1, 2, 3, 0, 1, 2, 3, 1, 2, ring_image([0, 1, 2, 7, 6], [0, 1]), two_queues),
)
# Unsealed: refused.
put("inflight", "unsealed", inflight_seed(0, 2, 3, 0, 0, 1, 3, 1, 2, b"", two_queues))

# --- blk_request: walker-shaped input, a virtio-blk request in the image ------
NEXT, WRITE_F, INDIRECT_F = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def blk_seed(descs, blobs, features=0, ro=0):
    """descs: the table at 0 (8 entries); blobs: (gpa, bytes) in the image."""
    img = bytearray(0x600)
    for i, (addr, ln, flags, nxt) in enumerate(descs):
        struct.pack_into("<QIHH", img, 16 * i, addr, ln, flags, nxt)
    for gpa, b in blobs:
        img[gpa : gpa + len(b)] = b
    return le("BBHHHHB", 3, features, 0, 0, 0, 0xFFFF, ro) + bytes(img)


def blk_hdr(t, sector):
    return le("IIQ", t, 0, sector)


status = (0x500, 1, WRITE_F, 0)
put(
    "blk_request",
    "read",
    blk_seed([(0x100, 16, NEXT, 1), (0x200, 512, WRITE_F | NEXT, 2), status], [(0x100, blk_hdr(T_IN, 1))]),
)
put(
    "blk_request",
    "write",
    blk_seed(
        [(0x100, 16, NEXT, 1), (0x200, 512, NEXT, 2), status],
        [(0x100, blk_hdr(T_OUT, 2)), (0x200, b"\xa5" * 512)],
    ),
)
put(
    "blk_request",
    "get_id",
    blk_seed([(0x100, 16, NEXT, 1), (0x200, 20, WRITE_F | NEXT, 2), status], [(0x100, blk_hdr(T_GET_ID, 0))]),
)
put("blk_request", "flush", blk_seed([(0x100, 16, NEXT, 1), status], [(0x100, blk_hdr(T_FLUSH, 0))]))
for name, t, flags in (("discard", T_DISCARD, 0), ("write_zeroes", T_WRITE_ZEROES, 1)):
    put(
        "blk_request",
        name,
        blk_seed(
            [(0x100, 16, NEXT, 1), (0x200, 32, NEXT, 2), status],
            [(0x100, blk_hdr(t, 0)), (0x200, le("QII", 0, 8, flags) + le("QII", 64, 16, flags))],
        ),
    )
# Through an indirect table, the header split over two descriptors.
table = le("QIHH", 0x100, 3, NEXT, 1) + le("QIHH", 0x103, 13, NEXT, 2) + le("QIHH", 0x500, 1, WRITE_F, 0)
put(
    "blk_request",
    "indirect_split_header",
    blk_seed([(0x300, 48, INDIRECT_F, 0)], [(0x300, table), (0x100, blk_hdr(T_FLUSH, 0))], features=1),
)

# --- net_tx: MTU, virtio_net_hdr, frame ------------------------------------------
F_NEEDS_CSUM = 1


def net_hdr(flags=0, csum_start=0, csum_offset=0):
    return le("BBHHHHH", flags, 0, 0, 0, csum_start, csum_offset, 0)


def eth(ethertype, payload, dst=b"\xff" * 6, src=bytes([2, 0, 0, 0, 0, 1])):
    return dst + src + struct.pack(">H", ethertype) + payload


ipv4_udp = bytes(20) + le("HH", 0, 0) + struct.pack(">HH", 24, 0x1234) + b"payload!" * 2
ipv4_tcp = bytes(20) + bytes(16) + struct.pack(">H", 0x4321) + bytes(2) + b"data"
put("net_tx", "plain", le("H", 1500) + net_hdr() + eth(0x0800, bytes(46)))
put("net_tx", "udp_csum", le("H", 1500) + net_hdr(F_NEEDS_CSUM, 34, 6) + eth(0x0800, ipv4_udp))
put("net_tx", "tcp_csum", le("H", 1500) + net_hdr(F_NEEDS_CSUM, 34, 16) + eth(0x0800, ipv4_tcp))
put("net_tx", "vlan_max", le("H", 1500) + net_hdr() + eth(0x8100, bytes(1504)))
