"""16550A-compatible UART (the 8250 family), as COM1 at 0x3f8 on IRQ 4.

Output goes to a file descriptor (stdout, a file) or nowhere; input bytes are queued with
:meth:`Serial.enqueue_input` (the VMM feeds stdin into it when the console is interactive).
The interrupt line is raised through ``irq_trigger`` (the VMM pulses the in-kernel IOAPIC pin).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Callable

log = logging.getLogger(__name__)

# Register offsets from the base port.
DATA = 0        # RBR (read) / THR (write); DLL when LCR.DLAB
IER = 1         # interrupt enable; DLM when LCR.DLAB
IIR_FCR = 2     # IIR (read) / FCR (write)
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01      # received data available
IER_THRE = 0x02     # transmitter holding register empty
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO_ENABLED = 0xC0
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80

RX_FIFO_LIMIT = 64 * 1024  # bytes of input buffered before further input is dropped


class Serial:
    """One UART.  Thread-safe: vCPU threads and the stdin reader call into it."""

    def __init__(self, out_fd: int | None, irq_trigger: Callable[[], None] | None = None) -> None:
        self._out_fd = out_fd
        self._irq = irq_trigger
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0x03          # 8N1
        self.mcr = MCR_OUT2
        self.scr = 0
        self.dll = 0x0C          # 9600 baud
        self.dlm = 0
        self.fcr = 0
        self._thre_pending = False
        self.bytes_out = 0

    # --- guest side ---------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._read(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            fire = self._write(offset, value & 0xFF)
        if fire and self._irq is not None:
            self._irq()

    def _read(self, offset: int) -> int:
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                return self.dll
            return self._rx.popleft() if self._rx else 0
        if offset == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRE:
                self._thre_pending = False   # reading IIR acknowledges a THRE interrupt
            return iir | (IIR_FIFO_ENABLED if self.fcr & 1 else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                m = 0
                m |= MSR_CTS if self.mcr & MCR_RTS else 0
                m |= MSR_DSR if self.mcr & MCR_DTR else 0
                m |= MSR_RI if self.mcr & MCR_OUT1 else 0
                m |= MSR_DCD if self.mcr & MCR_OUT2 else 0
                return m
            return MSR_DCD | MSR_DSR | MSR_CTS
        if offset == SCR:
            return self.scr
        return 0xFF

    def _write(self, offset: int, value: int) -> bool:
        """Apply a register write; True when the interrupt line should be pulsed."""
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return False
            if self.mcr & MCR_LOOP:
                # Loopback: the transmitted byte arrives in our own receiver.
                if len(self._rx) < RX_FIFO_LIMIT:
                    self._rx.append(value)
            else:
                self._emit(value)
            self._thre_pending = True
            return self._iir() != IIR_NONE
        if offset == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return False
            old = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_THRE and not old & IER_THRE:
                # The transmitter is always empty, so enabling THRE interrupts raises one at once
                # (the 8250 behaviour Linux's serial driver relies on).
                self._thre_pending = True
            return self._iir() != IIR_NONE
        if offset == IIR_FCR:
            self.fcr = value
            if value & 0x02:
                self._rx.clear()
            return False
        if offset == LCR:
            self.lcr = value
            return False
        if offset == MCR:
            self.mcr = value & 0x1F
            return False
        if offset == SCR:
            self.scr = value
        return False   # LSR and MSR are read-only

    def _iir(self) -> int:
        if self.ier & IER_RDA and self._rx:
            return IIR_RDA
        if self.ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _emit(self, byte: int) -> None:
        self.bytes_out += 1
        if self._out_fd is None:
            return
        try:
            os.write(self._out_fd, bytes((byte,)))
        except OSError as e:
            log.warning("serial output failed (%s); further output is dropped", e.strerror)
            self._out_fd = None

    # --- host side ----------------------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> None:
        """Queue bytes for the guest to read; raises the RX interrupt when enabled."""
        with self._lock:
            room = RX_FIFO_LIMIT - len(self._rx)
            self._rx.extend(data[:max(room, 0)])
            fire = bool(self.ier & IER_RDA and self._rx)
        if fire and self._irq is not None:
            self._irq()
