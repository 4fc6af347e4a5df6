"""vhost-user wire protocol: message numbers, header, flags, feature bits (the one place they live).

The vhost-user protocol is specified in QEMU's ``docs/interop/vhost-user.rst``; its numbers are in
no kernel header, so they are written down here, once, each next to its name in that
specification.  The structs the messages carry (``vhost_vring_state``, ``vhost_vring_addr``,
``vhost_iotlb_msg``, the memory table) and the ``VHOST_*`` constants come from
``<linux/vhost_types.h>`` through :mod:`hyperpy._fast.vhost_iotlb`.

A message is a 12-byte header -- ``u32 request``, ``u32 flags``, ``u32 size`` (payload bytes),
native (little-endian) order -- followed by ``size`` bytes of payload; file descriptors travel as
``SCM_RIGHTS`` ancillary data with the header.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from .._fast import vhost_iotlb as V

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
U64 = struct.Struct("<Q")

VERSION = 0x1                 # flags bits 0-1: protocol version
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2           # this message is a reply
FLAG_NEED_REPLY = 1 << 3      # sender wants a REPLY_ACK (with VHOST_USER_PROTOCOL_F_REPLY_ACK)

#: Virtio feature bit 30 in GET/SET_FEATURES: the back-end speaks protocol features.
F_PROTOCOL_FEATURES = 30

#: Largest payload this back-end reads: the biggest message it accepts is the memory table
#: (8 + 8 * 32 bytes) or a config access (12 + 256); anything past this closes the connection.
MAX_PAYLOAD = 4096
MAX_FDS = 8                   # fds accepted with one message (one per memory region at most)
MAX_CONFIG_SIZE = 256         # VHOST_USER_MAX_CONFIG_SIZE: largest GET/SET_CONFIG payload
CONFIG_HEADER = struct.Struct("<III")   # offset, size, flags
VRING_INDEX_MASK = 0xFF       # SET_VRING_KICK/CALL/ERR u64: bits 0-7 ring index
VRING_NOFD = 1 << 8           # ... bit 8: no fd attached (polling / no interrupt)


class Request(enum.IntEnum):
    """Front-end -> back-end requests (``VHOST_USER_*``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end requests on the back-end channel (``VHOST_USER_BACKEND_*``)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class ProtocolFeature(enum.IntEnum):
    """Bits of GET/SET_PROTOCOL_FEATURES (``VHOST_USER_PROTOCOL_F_*``)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


#: Requests whose answer is a message of their own (REPLY_ACK is not added to them).
HAS_REPLY = frozenset({Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                       Request.GET_VRING_BASE, Request.GET_QUEUE_NUM, Request.GET_CONFIG,
                       Request.GET_INFLIGHT_FD, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS})


def request_name(req: int) -> str:
    try:
        return Request(req).name
    except ValueError:
        return f"request {req}"


def protocol_names(bits: int) -> list[str]:
    return [f.name for f in ProtocolFeature if bits >> f & 1]


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def u64(value: int) -> bytes:
    return U64.pack(value)


# Struct codecs from <linux/vhost_types.h> (re-exported for the server, the tests and the
# Python front-end the tests drive).
pack_vring_state = V.pack_vring_state
unpack_vring_state = V.unpack_vring_state
pack_vring_addr = V.pack_vring_addr
unpack_vring_addr = V.unpack_vring_addr
pack_iotlb = V.pack_iotlb
unpack_iotlb = V.unpack_iotlb
pack_memory = V.pack_memory
unpack_memory = V.unpack_memory
VRING_STATE_SIZE = V.VRING_STATE_SIZE
VRING_ADDR_SIZE = V.VRING_ADDR_SIZE
IOTLB_MSG_SIZE = V.IOTLB_MSG_SIZE
