# cython: language_level=3, boundscheck=False, wraparound=False
"""virtio-net data path over a TAP device with a virtio-net header (IFF_VNET_HDR).

Frames move with one ``readv``/``writev`` on iovecs that point into guest RAM: the tap's vnet
header has the same layout as the driver's ``struct virtio_net_hdr_v1``, so nothing is copied.
TAP constants (multi-queue ones included), the interface ioctls, ``struct virtio_net_config``
and the control-queue structures come from the UAPI headers.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset, memcpy
from libc.stdlib cimport malloc, free
from libc.errno cimport errno, EAGAIN, EINTR
from posix.uio cimport iovec, readv, writev

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN

from hyperpy._fast.virtqueue cimport SplitQueue, Chain

cdef extern from "<sys/ioctl.h>":   # defines _IOW, which <linux/if_tun.h> uses
    pass

cdef extern from "<linux/if.h>":
    enum:
        _IFNAMSIZ "IFNAMSIZ"
        _IFF_UP "IFF_UP"

cdef extern from "<linux/sockios.h>":
    enum:
        _SIOCGIFFLAGS "SIOCGIFFLAGS"
        _SIOCSIFFLAGS "SIOCSIFFLAGS"
        _SIOCSIFADDR "SIOCSIFADDR"
        _SIOCSIFNETMASK "SIOCSIFNETMASK"

cdef extern from "<linux/if_tun.h>":
    const unsigned long _TUNSETIFF "TUNSETIFF"
    const unsigned long _TUNSETVNETHDRSZ "TUNSETVNETHDRSZ"
    const unsigned long _TUNSETOFFLOAD "TUNSETOFFLOAD"
    const unsigned long _TUNSETQUEUE "TUNSETQUEUE"
    enum:
        _IFF_TAP "IFF_TAP"
        _IFF_NO_PI "IFF_NO_PI"
        _IFF_VNET_HDR "IFF_VNET_HDR"
        _IFF_MULTI_QUEUE "IFF_MULTI_QUEUE"
        _IFF_ATTACH_QUEUE "IFF_ATTACH_QUEUE"
        _IFF_DETACH_QUEUE "IFF_DETACH_QUEUE"

cdef extern from "<linux/virtio_net.h>" nogil:
    struct virtio_net_hdr_v1:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t num_buffers
    struct virtio_net_config:
        uint8_t mac[6]
        uint16_t status
        uint16_t max_virtqueue_pairs
        uint16_t mtu
    struct virtio_net_ctrl_hdr:
        uint8_t cls "class"
        uint8_t cmd
    struct virtio_net_ctrl_mq:
        uint16_t virtqueue_pairs

IFNAMSIZ = _IFNAMSIZ                 # interface names: IFNAMSIZ - 1 bytes and the NUL
IFF_UP = _IFF_UP
SIOCGIFFLAGS = _SIOCGIFFLAGS
SIOCSIFFLAGS = _SIOCSIFFLAGS
SIOCSIFADDR = _SIOCSIFADDR
SIOCSIFNETMASK = _SIOCSIFNETMASK
TUNSETIFF = _TUNSETIFF
TUNSETVNETHDRSZ = _TUNSETVNETHDRSZ
TUNSETOFFLOAD = _TUNSETOFFLOAD
IFF_TAP = _IFF_TAP
IFF_NO_PI = _IFF_NO_PI
IFF_VNET_HDR = _IFF_VNET_HDR
IFF_MULTI_QUEUE = _IFF_MULTI_QUEUE
IFF_ATTACH_QUEUE = _IFF_ATTACH_QUEUE
IFF_DETACH_QUEUE = _IFF_DETACH_QUEUE
TUNSETQUEUE = _TUNSETQUEUE
VNET_HDR_SIZE = sizeof(virtio_net_hdr_v1)
CTRL_HDR_SIZE = sizeof(virtio_net_ctrl_hdr)      # struct virtio_net_ctrl_hdr {class, cmd}
CTRL_MQ_SIZE = sizeof(virtio_net_ctrl_mq)        # VQ_PAIRS_SET data: le16 virtqueue_pairs


def net_config(bytes mac, uint16_t status, uint16_t pairs, uint16_t mtu):
    """The bytes of ``struct virtio_net_config``."""
    cdef virtio_net_config c
    memset(&c, 0, sizeof(c))
    memcpy(c.mac, <char *>mac, 6)
    c.status = status
    c.max_virtqueue_pairs = pairs
    c.mtu = mtu
    return (<char *>&c)[:sizeof(c)]


cdef class NetWorker:
    """Moves frames between one TAP fd and one rx/tx queue pair."""

    cdef int tap
    cdef Chain *chain
    cdef readonly uint64_t tx_frames
    cdef readonly uint64_t rx_frames
    cdef readonly uint64_t tx_errors
    cdef readonly uint64_t tx_bytes      # frame bytes (virtio-net header included) to the tap
    cdef readonly uint64_t rx_bytes      # frame bytes (header included) into guest buffers

    def __cinit__(self):
        self.chain = <Chain *>malloc(sizeof(Chain))
        if self.chain == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.chain)

    def __init__(self, int tap_fd):
        self.tap = tap_fd

    def tx(self, SplitQueue q):
        """Send every frame the driver queued.  Returns (frames, should_notify, broken)."""
        cdef int r
        cdef long n
        cdef uint64_t done = 0, errs = 0, nbytes = 0
        cdef bint notify
        with nogil:
            while True:
                r = q.pop(self.chain)
                if r <= 0:
                    break
                if self.chain.n_readable and self.chain.readable_len >= sizeof(virtio_net_hdr_v1):
                    n = writev(self.tap, &self.chain.iov[0], self.chain.n_readable)
                    if n < 0:
                        errs += 1   # e.g. the tap is down: the frame is dropped, as on a wire
                    else:
                        nbytes += <uint64_t>n
                else:
                    errs += 1
                q.push_used(self.chain.head, 0)
                done += 1
            notify = q.should_notify() if done else False
        self.tx_frames += done
        self.tx_errors += errs
        self.tx_bytes += nbytes
        return done, notify, r < 0

    def rx(self, SplitQueue q):
        """Deliver frames waiting on the tap into rx buffers.

        Returns (frames, should_notify, broken, out_of_buffers): out_of_buffers means a frame
        may be waiting but the driver has posted no buffer; poll the tap again after a kick.
        """
        cdef int r = 0
        cdef long n
        cdef uint64_t done = 0, nbytes = 0
        cdef bint notify, starved = False
        cdef virtio_net_hdr_v1 *hdr
        cdef pollfd pfd
        pfd.fd = self.tap
        pfd.events = POLLIN
        with nogil:
            while True:
                # Take a buffer only when a frame is waiting, so none is consumed in vain.
                pfd.revents = 0
                if poll(&pfd, 1, 0) <= 0 or not (pfd.revents & POLLIN):
                    break
                r = q.pop(self.chain)
                if r < 0:
                    break
                if r == 0:
                    starved = True
                    break
                if self.chain.n_writable == 0 or self.chain.iov[self.chain.n_readable].iov_len < sizeof(virtio_net_hdr_v1):
                    q.push_used(self.chain.head, 0)   # unusable buffer: hand it back empty
                    continue
                n = readv(self.tap, &self.chain.iov[self.chain.n_readable], self.chain.n_writable)
                if n < 0:
                    q.push_used(self.chain.head, 0)   # the frame vanished: return the buffer empty
                    break
                hdr = <virtio_net_hdr_v1 *>self.chain.iov[self.chain.n_readable].iov_base
                hdr.num_buffers = 1   # no VIRTIO_NET_F_MRG_RXBUF: one buffer per frame
                q.push_used(self.chain.head, <uint32_t>n)
                nbytes += <uint64_t>n
                done += 1
            notify = q.should_notify() if done else False
        self.rx_frames += done
        self.rx_bytes += nbytes
        return done, notify, r < 0, starved
