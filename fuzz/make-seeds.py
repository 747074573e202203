#!/usr/bin/env python3
"""Writes the hand-made seeds of the exit_port, i8042, serial, virtio_net and
vsock_packet fuzz targets into fuzz/seeds/TARGET/ (standard library only;
the output is deterministic, so running it again changes nothing).

    python3 fuzz/make-seeds.py

Each function below builds one input in the byte format its target decodes
(see the target's source: op bytes taken modulo the op count, ports and
widths from index bytes, little-endian integers); the comments say which
path of the device each step is meant to reach.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = {}


def seed(target, name):
    def deco(fn):
        SEEDS[(target, name)] = fn
        return fn

    return deco


# ----- exit_port ------------------------------------------------------------
# op % 6: 0 write / 1 read (port = 0xf0 + b % 10, width index into
# [1,1,1,2,4,0,8,3]), 2 note_panic, 3 request_stop (Exited value byte, then
# status index: PowerOff, TimedOut, TripleFault, Reset, Panic, Exited),
# 4 fail (byte), 5 wait (mode byte, then the timeout's bytes).
EP_STATUS, EP_MARKER = 4, 5  # port bytes for 0xf4 / 0xf5
W1, W2, W4, W0, W8, W3 = 0, 3, 4, 5, 6, 7  # width index bytes


def ep_write(port, widx, data):
    return bytes([0, port, widx]) + bytes(data)


def ep_read(port, widx):
    return bytes([1, port, widx])


def ep_wait(mode, arg=b""):
    return bytes([5, mode]) + arg


def ep_waits():
    return (
        ep_wait(0, struct.pack("<Q", 30))  # from_secs
        + ep_wait(1, struct.pack("<QI", 2**64 - 1, 999_999_999))  # new(max, ns)
        + ep_wait(2)  # Duration::MAX
        + ep_wait(3, struct.pack("<H", 250))  # millis
    )


@seed("exit_port", "status_write")
def _():
    # Boot markers, the magic read, then the test's exit status 0; later
    # writes must not change the first status.
    s = b""
    for m in (1, 2, 3, 0x10):
        s += ep_write(EP_MARKER, W1, [m])
    s += ep_read(EP_STATUS, W1) + ep_read(EP_STATUS, W2) + ep_read(EP_MARKER, W1)
    s += ep_wait(3, struct.pack("<H", 0))  # before the stop: None at once
    s += ep_write(EP_STATUS, W1, [0])
    s += ep_waits()
    s += ep_write(EP_STATUS, W1, [7]) + ep_write(EP_MARKER, W1, [0x11])
    return s


@seed("exit_port", "wide_and_unclaimed")
def _():
    # Width 2 at 0xf4 is claimed (status = first byte); width 4/8/3 and
    # ports around the pair are not; width 0 is claimed but writes nothing.
    s = b""
    for p in (0, 3, 6, 9):
        s += ep_read(p, W1) + ep_write(p, W1, [0xaa])
    s += ep_read(EP_STATUS, W4) + ep_read(EP_STATUS, W8) + ep_read(EP_MARKER, W3)
    s += ep_write(EP_STATUS, W4, [1, 2, 3, 4]) + ep_write(EP_STATUS, W0, [])
    s += ep_write(EP_MARKER, W2, [5, 6]) + ep_write(3, W2, [9, 9])
    s += ep_write(EP_STATUS, W2, [42, 0])
    s += ep_waits()
    return s


@seed("exit_port", "panic_then_reset")
def _():
    # A noticed kernel panic turns the following reset into Panic.
    s = ep_write(EP_MARKER, W1, [1]) + bytes([2])
    s += bytes([3, 0, 3])  # request_stop(Reset)
    s += ep_waits() + ep_write(EP_STATUS, W1, [3])
    return s


@seed("exit_port", "vmm_failure")
def _():
    # A VMM failure wins; no guest status afterwards.
    s = ep_wait(1, struct.pack("<QI", 0, 0)) + bytes([4, 7])
    s += ep_write(EP_STATUS, W1, [9]) + ep_waits() + bytes([3, 5, 5])
    return s


@seed("exit_port", "host_stops")
def _():
    # Host stops of every kind (only the first counts), with waits between.
    s = bytes([3, 0, 1])  # TimedOut
    s += ep_waits()
    for idx in (0, 2, 4):
        s += bytes([3, 0, idx])
    s += bytes([3, 77, 5]) + ep_write(EP_STATUS, W1, [1]) + ep_waits()
    return s


# ----- i8042 ----------------------------------------------------------------
# Each op: op byte (% 5: 0 write, 1 write with 0xfe forced, 2 read,
# 3 note_panic, 4 request_stop), port byte (0x5c + b % 14), width index
# byte, then the write's bytes, or for a stop the Exited value and the
# status index (PowerOff, TimedOut, TripleFault, Exited).
KBD_DATA, KBD_CMD = 4, 8  # port bytes for 0x60 / 0x64


def kb(op, port, widx, tail=b""):
    return bytes([op, port, widx]) + bytes(tail)


@seed("i8042", "reset")
def _():
    # The reboot path Linux takes: poll status, then 0xfe to the command port.
    s = kb(2, KBD_CMD, W1) + kb(2, KBD_DATA, W1)
    s += kb(0, KBD_CMD, W1, [0xfe]) + kb(2, KBD_CMD, W1)
    s += kb(0, KBD_CMD, W1, [0xfe])  # a second reset changes nothing
    return s


@seed("i8042", "panic_then_reset")
def _():
    # Panic noticed, then the guest resets: the VM stops with Panic.
    return kb(3, 0, 0) + kb(1, KBD_CMD, W1, [0x00]) + kb(2, KBD_CMD, W1)


@seed("i8042", "stopped_first")
def _():
    # A VMM stop before the reset command: the stop's status stays.
    s = kb(4, 0, 0, [0, 0]) + kb(0, KBD_CMD, W1, [0xfe])
    s += kb(4, 0, 0, [3, 3]) + kb(4, 0, 0, [0, 2])
    return s


@seed("i8042", "accesses")
def _():
    # Every port in and around 0x60-0x64 read at every width; non-reset
    # commands and data; 0xfe where it must not reset (data port, wide or
    # unclaimed writes); then the real reset.
    s = b""
    for p in range(14):
        for w in (W1, W2, W4, W0, W8, W3):
            s += kb(2, p, w)
    s += kb(0, KBD_CMD, W1, [0xd1]) + kb(0, KBD_DATA, W1, [0xdf])
    s += kb(0, KBD_CMD, W1, [0xad]) + kb(0, KBD_DATA, W1, [0xfe])
    s += kb(0, KBD_CMD, W2, [0xfe, 0]) + kb(0, 12, W1, [0xfe]) + kb(0, 3, W2, [0, 0xfe])
    s += kb(0, 0, W1, [0xfe]) + kb(0, KBD_CMD, W0, [])
    s += kb(1, KBD_CMD, W1, [0])
    return s


# ----- serial ---------------------------------------------------------------
# op % 9: 0 port write (port byte: 0x3f4 + b % 16, width index into
# [1,1,1,1,1,2,4,0], data), 1 port read, 2 queue host input (n % 100
# bytes), 3 queue generated host input (n, 0xb1 = more than the bound),
# 4 THR write, 5 loopback on/off, 6 DLAB on/off, 7 guest receive,
# 8 text burst (n % 64 bytes, then a flag byte: bit 0 appends the panic
# text).
RBR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(4, 12)
SW1, SW2, SW4, SW0 = 0, 5, 6, 7


def sw(port, widx, data):
    return bytes([0, port, widx]) + bytes(data)


def sr(port, widx=SW1):
    return bytes([1, port, widx])


def burst(text, panic=False):
    assert len(text) < 64
    return bytes([8, len(text)]) + text + bytes([1 if panic else 0])


def thr(text):
    return b"".join(bytes([4, c]) for c in text)


def recv(n):
    return bytes([7]) * n


@seed("serial", "boot_text")
def _():
    # Kernel output in bursts and single THR writes, with the LSR polls
    # the 8250 driver does.
    s = burst(b"Linux version 6.6.0 (locald) #1 SMP PREEMPT\n")
    s += sr(LSR) + sr(IIR) + sr(MSR)
    s += burst(b"Run /init as init process\n") + thr(b"ok\r\n") + sr(LSR)
    return s


@seed("serial", "panic")
def _():
    # The panic text past the first 256 bytes of a line (not a panic),
    # then inside a line: the detector fires.
    s = burst(b"=" * 60) * 5 + burst(b" ", panic=True) + thr(b"\n")
    s += burst(b"[    1.234567] ", panic=True)
    s += burst(b": VFS: Unable to mount root fs on unknown-block(0,0)\n")
    s += burst(b"---[ end ", panic=False) + thr(b"]---\n")
    return s


@seed("serial", "dlab_and_registers")
def _():
    # Divisor latch programming (DLAB on: port 0/1 are DLL/DLM, nothing is
    # output), then every register: IER, FCR, LCR, MCR, SCR, MSR, wide and
    # unclaimed accesses.
    s = bytes([6, 1])  # DLAB on
    s += sw(RBR, SW1, [0x01]) + sw(IER, SW1, [0x00]) + sr(RBR) + sr(IER)
    s += thr(b"x")  # to DLL, not the console
    s += bytes([6, 0])  # DLAB off
    s += thr(b"OK\n")
    s += sw(LCR, SW1, [0x83]) + sw(RBR, SW1, [0x0c]) + sw(LCR, SW1, [0x03])
    s += sw(IER, SW1, [0x0f]) + sr(IIR) + sw(IIR, SW1, [0xc7])  # FCR
    s += sw(MCR, SW1, [0x0b]) + sw(SCR, SW1, [0x55]) + sr(SCR) + sr(MSR)
    s += thr(b"irq\n") + sr(IIR) + sr(LSR)
    for p in (0, 3, 12, 15):
        s += sr(p) + sw(p, SW1, [0x41])
    s += sr(RBR, SW2) + sr(LSR, SW4) + sr(SCR, SW2) + sr(RBR, SW0)
    s += sw(RBR, SW2, b"ab") + sw(10, SW4, b"abcd") + sw(LCR, SW0, b"")
    s += sw(IER, SW1, [0x00]) + thr(b"done\n")
    return s


@seed("serial", "loopback")
def _():
    # The 8250 probe's loopback test: MCR loop on, THR bytes come back in
    # RBR (not on the console), host input queued meanwhile must survive
    # and arrive once loopback is off.
    s = bytes([5, 1]) + thr(b"\x55\xaa\x01") + recv(3)
    s += bytes([2, 5]) + b"hello" + thr(b"z") + recv(2)
    s += sw(MCR, SW1, [0x1f]) + sr(MSR) + sw(MCR, SW1, [0x0b])
    s += bytes([5, 0]) + recv(6) + thr(b"after\n")
    return s


@seed("serial", "host_input")
def _():
    # Console input: a short line read byte by byte, then more than the
    # 64-byte FIFO (the rest waits as pending input and refills on reads),
    # with output interleaved.
    s = bytes([2, 6]) + b"root\r\n" + recv(6) + recv(1)
    s += bytes([3, 200]) + recv(70) + burst(b"# ") + recv(20)
    s += bytes([6, 1]) + bytes([2, 3]) + b"abc" + bytes([6, 0]) + recv(5)
    return s


@seed("serial", "input_flood")
def _():
    # More host input than the bounded queue holds: queue_input takes
    # exactly what fits, and input then comes out in order.
    return bytes([3, 0xb1]) + recv(8) + bytes([2, 10]) + b"0123456789" + recv(4)


# ----- virtio_net -----------------------------------------------------------
# 16 control bytes, then guest memory from address 0 (64 KiB):
#   ctl[0..5] TX queue, ctl[5..10] RX queue: size 1 << (c0 % 9), desc table,
#   avail and used ring at c << 8, event_idx = c4 & 1;
#   ctl[10] features: MRG_RXBUF, CSUM, HOST_TSO4, HOST_TSO6, HOST_ECN,
#   GUEST_CSUM (bits 0-5); ctl[11] % 8 backend frames, frame i is
#   (ctl[12 + i % 4] * 37) % 9000 + 1 bytes of guest memory from the end of
#   the previous one (the first from address 0); the backend blocks TX
#   after ctl[13] % 8 + 1 frames on the first pass.
NEXT, WRITE, INDIRECT = 1, 2, 4
F_MRG, F_CSUM, F_TSO4, F_TSO6, F_ECN, F_GCSUM = (1 << i for i in range(6))
TXD, TXA, TXU = 0x10, 0x11, 0x12  # 0x1000, 0x1100, 0x1200
RXD, RXA, RXU = 0x20, 0x21, 0x22  # 0x2000, 0x2100, 0x2200


class Mem:
    def __init__(self):
        self.b = bytearray()

    def put(self, addr, data):
        if len(self.b) < addr + len(data):
            self.b.extend(bytes(addr + len(data) - len(self.b)))
        self.b[addr : addr + len(data)] = data

    def descs(self, table, descs):
        """descs: (addr, len, flags, next)."""
        for i, (a, n, fl, nx) in enumerate(descs):
            self.put(table + 16 * i, struct.pack("<QIHH", a, n, fl, nx))

    def avail(self, ring, heads, size=8, used_event=0):
        self.put(ring, struct.pack("<HH", 0, len(heads)))
        for i, h in enumerate(heads):
            self.put(ring + 4 + 2 * i, struct.pack("<H", h))
        self.put(ring + 4 + 2 * size, struct.pack("<H", used_event))


def vnet_hdr(flags=0, gso=0, hdr_len=0, gso_size=0, cs=0, co=0):
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, cs, co, 0)


MAC_G = bytes.fromhex("525400123456")
MAC_H = bytes.fromhex("9a5500000001")


def ipv4_tcp(payload_len, flags=0x18):
    eth = MAC_H + MAC_G + b"\x08\x00"
    tot = 20 + 20 + payload_len
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, min(tot, 0xFFFF), 1, 0x4000, 64, 6, 0,
        bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2]),
    )
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 1, 0x50, flags, 65535, 0, 0)
    return eth + ip + tcp


def ipv6_tcp(payload_len):
    eth = MAC_H + MAC_G + b"\x86\xdd"
    ip = struct.pack("!IHBB16s16s", 0x60000000, 20 + payload_len, 6, 64,
                     b"\xfd" + bytes(14) + b"\x0f", b"\xfd" + bytes(14) + b"\x02")
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1, 1, 0x50, 0x18, 65535, 0, 0)
    return eth + ip + tcp


def arp_request():
    return (b"\xff" * 6 + MAC_G + b"\x08\x06" + bytes.fromhex("0001080006040001")
            + MAC_G + bytes([10, 0, 2, 15]) + bytes(6) + bytes([10, 0, 2, 2])
            + bytes(18))


def frame_byte(length):
    """A ctl byte b with (b * 37) % 9000 + 1 == length."""
    for b in range(256):
        if (b * 37) % 9000 + 1 == length:
            return b
    raise ValueError(length)


def vnet(ctl, mem):
    assert len(ctl) == 16
    return bytes(ctl) + bytes(mem.b)


def rx_frames(mem, lengths):
    """Backend frames laid from address 0: a virtio-net header (the device
    rewrites num_buffers) and an ARP reply or a TCP segment."""
    off = 0
    for n in lengths:
        if n >= 12:
            f = vnet_hdr() + (ipv4_tcp(0, 0x12) if n >= 66 else arp_request())
            f = (f + bytes(n))[:n]
            mem.put(off, f)
        off += n


@seed("virtio_net", "tx_rx_plain")
def _():
    # No offloads. TX: a header+frame split over two descriptors and a
    # one-descriptor ARP request; the backend blocks after the first, the
    # second pass sends the other. RX: two 1526-byte buffers take two
    # backend frames (75 and 297 bytes).
    m = Mem()
    rx_frames(m, [75, 297])
    frame = ipv4_tcp(6) + b"hello\n"
    m.put(0x3000, vnet_hdr())
    m.put(0x3100, frame)
    m.put(0x3200, vnet_hdr() + arp_request())
    m.descs(TXD * 256, [
        (0x3000, 12, NEXT, 1),
        (0x3100, len(frame), 0, 0),
        (0x3200, 12 + 60, 0, 0),
    ])
    m.avail(TXA * 256, [0, 2])
    m.descs(RXD * 256, [(0x6000, 1526, WRITE, 0), (0x6800, 1526, WRITE, 0)])
    m.avail(RXA * 256, [0, 1])
    ctl = [3, TXD, TXA, TXU, 0, 3, RXD, RXA, RXU, 0, 0, 2,
           frame_byte(75), frame_byte(297), 0, 0]
    assert ctl[13] % 8 == 0
    return vnet(ctl, m)


@seed("virtio_net", "tx_offloads")
def _():
    # CSUM + TSO4/TSO6/ECN negotiated, EVENT_IDX on: a 3000-byte TSO4
    # segment over three descriptors, a TSO6|ECN one through an indirect
    # table, and a checksum-only UDP-style frame.
    m = Mem()
    p4 = ipv4_tcp(3000)
    m.put(0x3000, vnet_hdr(1, 1, 54, 1448, 34, 16))
    m.put(0x3100, p4)
    m.put(0x3200, bytes(range(256)) * 12)  # 3072 bytes, 3000 used
    p6 = ipv6_tcp(2000)
    m.put(0x4000, vnet_hdr(1, 4 | 0x80, 74, 1428, 54, 16) + p6)
    m.put(0x4100, bytes(2000))
    m.descs(0x4900, [(0x4000, 12 + len(p6), NEXT, 1), (0x4100, 2000, 0, 0)])
    udp = ipv4_tcp(0)[:34] + struct.pack("!HHHH", 5353, 5353, 16, 0) + b"mdnsmdns"
    m.put(0x4a00, vnet_hdr(1, 0, 0, 0, 34, 6) + udp)
    m.descs(TXD * 256, [
        (0x3000, 12, NEXT, 1),
        (0x3100, len(p4), NEXT, 2),
        (0x3200, 3000, 0, 0),
        (0x4900, 32, INDIRECT, 0),
        (0x4a00, 12 + len(udp), 0, 0),
    ])
    m.avail(TXA * 256, [0, 3, 4], used_event=1)
    m.descs(RXD * 256, [(0x6000, 1526, WRITE, 0)])
    m.avail(RXA * 256, [0])
    ctl = [3, TXD, TXA, TXU, 1, 3, RXD, RXA, RXU, 1,
           F_CSUM | F_TSO4 | F_TSO6 | F_ECN | F_GCSUM, 1, frame_byte(75), 7, 0, 0]
    rx_frames(m, [75])
    return vnet(ctl, m)


@seed("virtio_net", "rx_mergeable")
def _():
    # MRG_RXBUF and EVENT_IDX: a 1518-byte frame spread over three 512-byte
    # buffers (num_buffers = 3), a 297-byte one in one buffer, then a third
    # that finds too few buffers and waits (NoBuffers, re-arm). One RX
    # buffer is a header descriptor chained to a data descriptor.
    m = Mem()
    rx_frames(m, [1518, 297, 1518])
    m.descs(RXD * 256, [
        (0x6000, 512, WRITE, 0),
        (0x6400, 12, WRITE | NEXT, 2),
        (0x6500, 500, WRITE, 0),
        (0x6800, 512, WRITE, 0),
        (0x6c00, 512, WRITE, 0),
        (0x7000, 512, WRITE, 0),
    ])
    m.avail(RXA * 256, [0, 1, 3, 4, 5], used_event=0)
    m.avail(TXA * 256, [])
    ctl = [3, TXD, TXA, TXU, 1, 3, RXD, RXA, RXU, 1, F_MRG | F_GCSUM, 3,
           frame_byte(1518), frame_byte(297), frame_byte(1518), 0]
    return vnet(ctl, m)


@seed("virtio_net", "bad_chains")
def _():
    # Every TX drop cause (writable descriptor, runt, unknown flags,
    # checksum or TSO not negotiated, oversized frame, buffer outside guest
    # memory) followed by a good packet; RX: a runt from the backend, a
    # readable descriptor, a buffer outside memory, one smaller than the
    # header, one too small without MRG_RXBUF, and finally a good one.
    m = Mem()
    good = vnet_hdr() + arp_request()
    m.put(0x3000, good)
    m.put(0x3100, vnet_hdr(0x80) + arp_request())
    m.put(0x3200, vnet_hdr(1, 0, 0, 0, 34, 16) + arp_request())
    m.put(0x3300, vnet_hdr(0, 1, 54, 1448) + ipv4_tcp(0))
    m.descs(TXD * 256, [
        (0x3000, 72, WRITE, 0),
        (0x3000, 10, 0, 0),
        (0x3100, 72, 0, 0),
        (0x3200, 72, 0, 0),
        (0x3300, 66, 0, 0),
        (0x4000, 2000, 0, 0),
        (0xffc0, 200, 0, 0),
        (0x3000, 72, 0, 0),
    ])
    m.avail(TXA * 256, list(range(8)))
    m.put(0x4000, bytes(2000))
    m.descs(RXD * 256, [
        (0x6000, 1526, 0, 0),
        (0xffc0, 1526, WRITE, 0),
        (0x6000, 8, WRITE, 0),
        (0x6000, 100, WRITE, 0),
        (0x7000, 1526, WRITE, 0),
    ])
    m.avail(RXA * 256, list(range(5)))
    # frames: 1 (runt), 297, 297, 297, 1 (runt), 75 ... ctl[13] = 8 -> 297
    ctl = [3, TXD, TXA, TXU, 0, 3, RXD, RXA, RXU, 0, 0, 7,
           frame_byte(1), frame_byte(297), frame_byte(297), frame_byte(75)]
    rx_frames(m, [1, 297, 297, 75, 1, 297, 297])
    return vnet(ctl, m)


@seed("virtio_net", "broken_rings")
def _():
    # TX: a descriptor chain that loops (next points back at itself: read
    # until the queue size bounds it), then a head index past the ring
    # (its used entry cannot be written: broken). RX: an avail index far
    # ahead of the ring (broken at once).
    m = Mem()
    m.put(0x3000, vnet_hdr() + arp_request())
    m.descs(TXD * 256, [(0x3000, 72, NEXT, 0)])
    m.avail(TXA * 256, [0, 9])
    m.descs(RXD * 256, [(0x6000, 1526, WRITE, 0)])
    m.avail(RXA * 256, [0])
    m.put(RXA * 256 + 2, struct.pack("<H", 40))  # idx 40 > size 8
    rx_frames(m, [75, 75])
    ctl = [3, TXD, TXA, TXU, 0, 3, RXD, RXA, RXU, 0, 0, 2,
           frame_byte(75), frame_byte(75), 0, 0]
    return vnet(ctl, m)


# ----- vsock_packet ---------------------------------------------------------
# A script: kind % 5 = 0/1 guest TX packet (nd, fix, nd % 4 + 1 descriptors
# of (len u16, flags: bit 0 writable, bit 1 at the end of memory), body
# length u16, body = header + payload laid over the descriptors; fix bit 0
# makes CIDs/type plausible, bit 1 aims at host port 5, bit 3 at the
# muxer's local ports 1 << 30.., bit 2 sets len), 2 drain (room byte * 64),
# 3 host action (which stream, what % 4: write `what` bytes, read,
# shutdown write, close), 4 host client connect (sel: bit 7 = "CONNECT
# sel & 7\n", else sel % 40 raw bytes).
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CUPD, OP_CREQ = range(1, 8)
GUEST_CID, HOST_CID = 3, 2
LOCAL = 1 << 30


def vhdr(op, src_port, dst_port, length=0, flags=0, buf_alloc=65536, fwd_cnt=0,
         src_cid=GUEST_CID, dst_cid=HOST_CID, type_=1):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length,
                       type_, op, flags, buf_alloc, fwd_cnt)


def tx(hdr, payload=b"", fix=0, descs=None):
    body = hdr + payload
    if descs is None:
        descs = [(len(body), 0)]
    s = bytes([0, len(descs) - 1, fix])
    for n, fl in descs:
        s += struct.pack("<HB", n, fl)
    return s + struct.pack("<H", len(body)) + body


def pkt(op, src, dst, payload=b"", **kw):
    """A well-formed guest packet (no fix-ups needed)."""
    return tx(vhdr(op, src, dst, len(payload), **kw), payload)


def drain(room=16):
    return bytes([2, room])


def host(which, what, data=b""):
    assert what % 4 != 0 or len(data) == what
    return bytes([3, which, what]) + data


def connect(port=None, raw=None):
    if raw is not None:
        assert len(raw) < 40
        return bytes([4, len(raw)]) + raw
    return bytes([4, 0x80 | port])


@seed("vsock_packet", "guest_connect")
def _():
    # Guest REQUEST to host port 5, RESPONSE, data both ways, credit
    # update/request, then SHUTDOWN (both) -> RST from the host, guest RST.
    s = pkt(OP_REQUEST, 1, 5) + drain()
    s += pkt(OP_RW, 1, 5, b"hello vsock\n") + host(0, 1)
    s += host(0, 8, b"hostdata") + drain()
    s += pkt(OP_CUPD, 1, 5, fwd_cnt=8) + pkt(OP_CREQ, 1, 5, fwd_cnt=8) + drain()
    s += pkt(OP_SHUTDOWN, 1, 5, flags=3, fwd_cnt=8) + drain()
    s += pkt(OP_RST, 1, 5) + drain()
    return s


@seed("vsock_packet", "host_connect")
def _():
    # A host client's "CONNECT 3\n": REQUEST to the guest, guest RESPONSE
    # ("OK 1073741824\n" to the client), data both ways, host half-close
    # (SHUTDOWN to the guest), guest SHUTDOWN -> RST, client close.
    s = connect(3) + drain()
    s += pkt(OP_RESPONSE, 3, LOCAL) + host(0, 1)
    s += host(0, 4, b"ping") + drain()
    s += pkt(OP_RW, 3, LOCAL, b"pong") + host(0, 5)
    s += host(0, 2) + drain()
    s += pkt(OP_SHUTDOWN, 3, LOCAL, flags=3) + drain() + host(0, 3) + drain()
    return s


@seed("vsock_packet", "connect_lines")
def _():
    # CONNECT variants: lower case with CR (valid) refused by the guest's
    # RST; "HELLO"; an oversized line; a line completed by a later write
    # with early data after the newline ("abc" must reach the guest).
    s = connect(raw=b"connect  7\r\n") + drain()
    s += pkt(OP_RST, 7, LOCAL)
    s += connect(raw=b"HELLO 52\n") + connect(raw=b"x" * 39)
    s += connect(raw=b"CONNECT 4") + host(3, 4, b"\nabc") + drain()
    s += pkt(OP_RESPONSE, 4, LOCAL + 1) + drain()
    s += pkt(OP_RW, 4, LOCAL + 1, b"echo") + host(3, 1)
    s += connect(raw=b"CONNECT 99999999999\n") + drain()
    return s


@seed("vsock_packet", "malformed_tx")
def _():
    # Chain layouts and every TX error: header split over three
    # descriptors (a valid REQUEST), a writable descriptor, a descriptor at
    # the end of memory, a short header, a truncated and an oversized
    # payload (reject_pkt -> RST), wrong CID (dropped), wrong type, unknown
    # op, payload on a control packet, packets for unknown connections, a
    # REQUEST to a port nobody listens on, a duplicate REQUEST.
    req = vhdr(OP_REQUEST, 2, 5)
    s = tx(req, fix=0, descs=[(20, 0), (10, 0), (14, 0)]) + drain()
    s += tx(vhdr(OP_RW, 2, 5, 6), b"spread", descs=[(44, 0), (3, 0), (3, 0)])
    s += host(0, 1)
    s += tx(req, descs=[(44, 1)])
    s += tx(req, descs=[(44, 2)])
    s += tx(req[:30], descs=[(30, 0)])
    s += tx(vhdr(OP_RW, 3, 5, 100), b"short")
    s += tx(vhdr(OP_RW, 3, 5, 0x20000), b"")
    s += pkt(OP_REQUEST, 1, 5, src_cid=9) + pkt(OP_REQUEST, 1, 5, dst_cid=7)
    s += pkt(OP_REQUEST, 1, 5, type_=2) + pkt(9, 1, 5)
    s += tx(vhdr(OP_REQUEST, 1, 5, 4), b"data")
    s += pkt(OP_RW, 3, 5, b"??") + pkt(OP_SHUTDOWN, 3, 5) + pkt(OP_CUPD, 3, 5)
    s += pkt(OP_REQUEST, 1, 6)
    s += pkt(OP_REQUEST, 2, 5)  # duplicate: kills the connection
    s += drain(0) + drain(1) + drain()
    return s


@seed("vsock_packet", "credit_flow")
def _():
    # A guest with a small receive buffer (buf_alloc 100): host data comes
    # in credit-sized RW packets into small RX buffers, the guest's
    # CREDIT_UPDATEs open the window; a 4 KiB guest write; host close with
    # data still buffered.
    s = pkt(OP_REQUEST, 1, 5, buf_alloc=100) + drain()
    s += host(0, 64, bytes(range(64))) + host(0, 128, b"B" * 128)
    s += drain(1) + drain(1)
    s += pkt(OP_CUPD, 1, 5, buf_alloc=100, fwd_cnt=100) + drain(1) + drain(1)
    s += pkt(OP_CREQ, 1, 5, buf_alloc=4096, fwd_cnt=192) + drain()
    s += pkt(OP_RW, 1, 5, bytes(4096), buf_alloc=4096, fwd_cnt=192)
    s += pkt(OP_SHUTDOWN, 1, 5, flags=2, buf_alloc=4096, fwd_cnt=192) + drain()
    s += host(0, 1) + host(0, 3) + drain()
    return s


def main():
    for (target, name), fn in sorted(SEEDS.items()):
        d = os.path.join(HERE, "seeds", target)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "wb") as f:
            f.write(fn())
        print(f"seeds/{target}/{name}")


if __name__ == "__main__":
    main()
