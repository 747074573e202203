#!/usr/bin/env python3
"""Writes the hand-made seeds of the exit_port, i8042, net_segment, serial,
virtio_fs, virtio_net and vsock_packet fuzz targets into fuzz/seeds/TARGET/
(standard library only; the output is deterministic, so running it again
changes nothing).

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


# ----- virtio_fs ------------------------------------------------------------
# A control byte (bit 0 clear: the target serves its own INIT first), then
# up to 8 messages in all, each a u16 reply-buffer size (0: no reply
# descriptor) and one FUSE message whose in_header.len (its first 4 bytes)
# says where it ends (cut at the end of the input, at most 0x8000 bytes).
# Every input gets a fresh share: share/{file ("hello"), dir/, up ->
# ../sentinel} next to base/sentinel. Node ids and file handles are the
# passthrough's counters: the root is 1, the first new inode 2, the first
# handle 1, each in the order the messages make them.
FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_SETATTR = 1, 2, 3, 4
FUSE_READLINK, FUSE_SYMLINK, FUSE_MKNOD, FUSE_MKDIR = 5, 6, 8, 9
FUSE_UNLINK, FUSE_RMDIR, FUSE_RENAME, FUSE_LINK = 10, 11, 12, 13
FUSE_OPEN, FUSE_READ, FUSE_WRITE, FUSE_STATFS = 14, 15, 16, 17
FUSE_RELEASE, FUSE_FSYNC, FUSE_SETXATTR, FUSE_GETXATTR = 18, 20, 21, 22
FUSE_LISTXATTR, FUSE_REMOVEXATTR, FUSE_FLUSH, FUSE_INIT = 23, 24, 25, 26
FUSE_OPENDIR, FUSE_READDIR, FUSE_RELEASEDIR, FUSE_ACCESS = 27, 28, 29, 34
FUSE_CREATE, FUSE_DESTROY, FUSE_BATCH_FORGET, FUSE_FALLOCATE = 35, 38, 42, 43
FUSE_READDIRPLUS, FUSE_RENAME2, FUSE_LSEEK = 44, 45, 46
ROOT = 1
O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_EXCL, O_TRUNC = 0, 1, 2, 0o100, 0o200, 0o1000
O_DIRECTORY, O_PATH = 0o200000, 0o10000000
INIT_EXT = 1 << 30


class Fuse:
    """Builds one virtio_fs input: FUSE messages with increasing unique ids."""

    def __init__(self, own_init=False):
        self.ctl = 1 if own_init else 0
        self.msgs = []

    def msg(self, op, nodeid, body=b"", reply=0x1000, length=None):
        n = 40 + len(body) if length is None else length
        hdr = struct.pack("<IIQQIIII", n, op, len(self.msgs) + 2, nodeid, 0, 0, 0, 0)
        self.msgs.append(struct.pack("<H", reply) + hdr + body)
        assert len(self.msgs) + (1 - self.ctl) <= 8, "the target serves 8 messages"
        return self

    def bytes(self):
        return bytes([self.ctl]) + b"".join(self.msgs)


def cstr(*names):
    return b"".join(n + b"\0" for n in names)


def init_in(major=7, minor=38, flags=0xFFFFFFFF, flags2=None):
    b = struct.pack("<IIII", major, minor, 0x20000, flags)
    if flags2 is not None:  # fuse_init_in's extension (FUSE_INIT_EXT)
        b += struct.pack("<I", flags2) + bytes(44)
    return b


def read_in(fh, offset, size):
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


def release_in(fh, flags=0):
    return struct.pack("<QIIQ", fh, flags, 0, 0)


def create_in(flags, mode=0o100644, umask=0o022):
    return struct.pack("<IIII", flags, mode, umask, 0)


def setattr_in(valid, size=0, mode=0, fh=0):
    return struct.pack("<IIQQQQQQIIIIIIII", valid, 0, fh, size, 0, 0, 0, 0,
                       0, 0, 0, mode, 0, 0, 0, 0)


# A v2 `security.capability` value granting CAP_SETUID|CAP_SYS_ADMIN
# (struct vfs_cap_data): the guest must never plant this on a host file.
VFS_CAP = struct.pack("<IIIII", 0x02000001, (1 << 7) | (1 << 21), 0, 0, 0)


@seed("virtio_fs", "read_file")
def _():
    # The target's INIT, then what `cat /share/file` does: LOOKUP (node 2),
    # GETATTR, OPEN (fh 1), READ, FLUSH, RELEASE, and the kernel's FORGET
    # (no reply descriptor).
    f = Fuse()
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"file"))
    f.msg(FUSE_GETATTR, 2, struct.pack("<IIQ", 0, 0, 0))
    f.msg(FUSE_OPEN, 2, struct.pack("<II", O_RDONLY, 0))
    f.msg(FUSE_READ, 2, read_in(1, 0, 4096), reply=0x2000)
    f.msg(FUSE_FLUSH, 2, struct.pack("<QIIQ", 1, 0, 0, 0))
    f.msg(FUSE_RELEASE, 2, release_in(1))
    f.msg(FUSE_FORGET, 2, struct.pack("<Q", 1), reply=0)
    return f.bytes()


@seed("virtio_fs", "readdir")
def _():
    # `ls -l`: LOOKUP dir (node 2) and list it (fh 1), then the root (fh 2)
    # with READDIR and READDIRPLUS (which looks up every entry).
    f = Fuse()
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"dir"))
    f.msg(FUSE_OPENDIR, 2, struct.pack("<II", O_RDONLY | O_DIRECTORY, 0))
    f.msg(FUSE_READDIR, 2, read_in(1, 0, 4096), reply=0x1800)
    f.msg(FUSE_RELEASEDIR, 2, release_in(1))
    f.msg(FUSE_OPENDIR, ROOT, struct.pack("<II", O_RDONLY | O_DIRECTORY, 0))
    f.msg(FUSE_READDIR, ROOT, read_in(2, 0, 4096), reply=0x1800)
    f.msg(FUSE_READDIRPLUS, ROOT, read_in(2, 0, 4096), reply=0x1800)
    return f.bytes()


@seed("virtio_fs", "create_write_rename")
def _():
    # CREATE new (node 2, fh 1), WRITE, READ it back, RELEASE, LOOKUP dir
    # (node 3), RENAME into dir, UNLINK there.
    data = b"written by the guest\n"
    f = Fuse()
    f.msg(FUSE_CREATE, ROOT, create_in(O_CREAT | O_EXCL | O_RDWR) + cstr(b"new"))
    f.msg(FUSE_WRITE, 2, struct.pack("<QQIIQII", 1, 0, len(data), 0, 0, 0, 0) + data)
    f.msg(FUSE_READ, 2, read_in(1, 0, 64), reply=0x100)
    f.msg(FUSE_RELEASE, 2, release_in(1, O_RDWR))
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"dir"))
    f.msg(FUSE_RENAME, ROOT, struct.pack("<Q", 3) + cstr(b"new", b"moved"))
    f.msg(FUSE_UNLINK, 3, cstr(b"moved"))
    return f.bytes()


@seed("virtio_fs", "xattrs")
def _():
    # user.* set, sized (size 0), read with a huge size (capped at
    # XATTR_SIZE_MAX), listed and removed; security.capability refused.
    f = Fuse()
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"file"))
    f.msg(FUSE_SETXATTR, 2, struct.pack("<II", 5, 0) + cstr(b"user.locald") + b"value")
    f.msg(FUSE_GETXATTR, 2, struct.pack("<II", 0, 0) + cstr(b"user.locald"))
    f.msg(FUSE_GETXATTR, 2, struct.pack("<II", 0xFFFFFFFF, 0) + cstr(b"user.locald"),
          reply=0xFFFF)
    f.msg(FUSE_SETXATTR, 2,
          struct.pack("<II", len(VFS_CAP), 0) + cstr(b"security.capability") + VFS_CAP)
    f.msg(FUSE_LISTXATTR, 2, struct.pack("<II", 4096, 0))
    f.msg(FUSE_REMOVEXATTR, 2, cstr(b"user.locald"))
    return f.bytes()


@seed("virtio_fs", "xattr_namespaces")
def _():
    # The other namespaces: security.capability read and removed (allowed),
    # trusted.* hidden and not settable, an ACL refused, a SETXATTR whose
    # size disagrees with its value, LISTXATTR asking for the size.
    f = Fuse()
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"file"))
    f.msg(FUSE_GETXATTR, 2, struct.pack("<II", 64, 0) + cstr(b"security.capability"))
    f.msg(FUSE_GETXATTR, 2, struct.pack("<II", 64, 0) + cstr(b"trusted.overlay.opaque"))
    f.msg(FUSE_SETXATTR, 2,
          struct.pack("<II", 1, 0) + cstr(b"trusted.overlay.opaque") + b"y")
    acl = struct.pack("<IHHI", 2, 1, 6, 0xFFFFFFFF) + struct.pack("<HHI", 2, 6, 0)
    f.msg(FUSE_SETXATTR, 2,
          struct.pack("<II", len(acl), 0) + cstr(b"system.posix_acl_access") + acl)
    f.msg(FUSE_SETXATTR, 2, struct.pack("<II", 99, 0) + cstr(b"user.x") + b"abc")
    f.msg(FUSE_REMOVEXATTR, 2, cstr(b"security.capability"))
    return f.bytes()


@seed("virtio_fs", "escape_lookups")
def _():
    # The symlink to the sentinel looked up (node 2), read and opened
    # (never followed), then `..` at the root and names with '/'.
    f = Fuse()
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"up"))
    f.msg(FUSE_READLINK, 2)
    f.msg(FUSE_OPEN, 2, struct.pack("<II", O_RDWR | O_TRUNC, 0))
    f.msg(FUSE_LOOKUP, ROOT, cstr(b".."))
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"../sentinel"))
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"dir/../../sentinel"))
    f.msg(FUSE_OPEN, ROOT, struct.pack("<II", O_RDONLY | O_PATH, 0))
    return f.bytes()


@seed("virtio_fs", "escape_changes")
def _():
    # Changes aimed outside: CREATE through `..` and through the symlink's
    # name, SYMLINK to the sentinel (made, never followed), MKDIR with '/',
    # LINK of node 2 (a symlink, whichever CREATE or SYMLINK made it) with
    # '/', RENAME and UNLINK of `../sentinel`.
    f = Fuse()
    f.msg(FUSE_CREATE, ROOT, create_in(O_CREAT | O_WRONLY) + cstr(b"../escaped"))
    f.msg(FUSE_CREATE, ROOT, create_in(O_CREAT | O_WRONLY | O_TRUNC) + cstr(b"up"))
    f.msg(FUSE_SYMLINK, ROOT, cstr(b"link", b"../sentinel"))
    f.msg(FUSE_MKDIR, ROOT, struct.pack("<II", 0o755, 0o022) + cstr(b"dir/../../x"))
    f.msg(FUSE_LINK, ROOT, struct.pack("<Q", 2) + cstr(b"../hard"))
    f.msg(FUSE_RENAME, ROOT, struct.pack("<Q", ROOT) + cstr(b"file", b"../sentinel"))
    f.msg(FUSE_UNLINK, ROOT, cstr(b"../sentinel"))
    return f.bytes()


@seed("virtio_fs", "setattr_mknod")
def _():
    # A set-user-id chmod (bit dropped), truncation, a character device
    # (EPERM), a FIFO, a set-group-id directory, STATFS.
    f = Fuse()
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"file"))
    f.msg(FUSE_SETATTR, 2, setattr_in(0x1, mode=0o104755))
    f.msg(FUSE_SETATTR, 2, setattr_in(0x8, size=2))
    f.msg(FUSE_MKNOD, ROOT, struct.pack("<IIII", 0o020600, 0x0103, 0, 0) + cstr(b"tty"))
    f.msg(FUSE_MKNOD, ROOT, struct.pack("<IIII", 0o010644, 0, 0o022, 0) + cstr(b"fifo"))
    f.msg(FUSE_MKDIR, ROOT, struct.pack("<II", 0o2775, 0o022) + cstr(b"sub"))
    f.msg(FUSE_STATFS, ROOT)
    return f.bytes()


@seed("virtio_fs", "own_init_malformed")
def _():
    # The input's own INIT (7.38 with the FUSE_INIT_EXT extension), then
    # broken requests: a reply buffer too small for the entry, no reply
    # descriptor, an unknown opcode, an empty name (in_header.len 40),
    # BATCH_FORGET, DESTROY, and a length over the server's 1 MiB limit.
    f = Fuse(own_init=True)
    f.msg(FUSE_INIT, 0, init_in(flags2=0xFFFFFFFF))
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"file"), reply=24)
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"dir"), reply=0)
    f.msg(9999, ROOT, b"\0" * 8)
    f.msg(FUSE_LOOKUP, ROOT, length=40)
    f.msg(FUSE_BATCH_FORGET, 0, struct.pack("<IIQQQQ", 2, 0, 2, 1, 3, 1), reply=0)
    f.msg(FUSE_DESTROY, 0)
    f.msg(FUSE_GETATTR, ROOT, struct.pack("<IIQ", 0, 0, 0), length=0x200000)
    return f.bytes()


@seed("virtio_fs", "init_versions")
def _():
    # INIT versions: major 6 (EPROTO), 8 (the server asks for 7.x), minor 5
    # and 22 (short replies), 38 without the extension; then requests on
    # handles that do not exist and a header cut short.
    f = Fuse(own_init=True)
    f.msg(FUSE_INIT, 0, init_in(major=6))
    f.msg(FUSE_INIT, 0, init_in(major=8))
    f.msg(FUSE_INIT, 0, init_in(minor=5, flags=0))
    f.msg(FUSE_INIT, 0, init_in(minor=22, flags=0xFFFFFFFF & ~INIT_EXT))
    f.msg(FUSE_INIT, 0, init_in(minor=38, flags=0x1FFFFFFF))
    f.msg(FUSE_READ, ROOT, read_in(77, 0, 0xFFFFFFFF), reply=0x2000)
    f.msg(FUSE_WRITE, 99, struct.pack("<QQIIQII", 5, 0, 4, 0, 0, 0, 0) + b"data")
    f.msgs.append(struct.pack("<H", 0x100) + struct.pack("<II", 8, FUSE_LOOKUP))
    return f.bytes()


@seed("virtio_fs", "open_file_ops")
def _():
    # Requests on an open file (fh 1): FSYNC, FALLOCATE, LSEEK (SEEK_DATA),
    # GETATTR by handle; RENAME2 with RENAME_NOREPLACE onto an existing name.
    f = Fuse()
    f.msg(FUSE_LOOKUP, ROOT, cstr(b"file"))
    f.msg(FUSE_OPEN, 2, struct.pack("<II", O_RDWR, 0))
    f.msg(FUSE_FSYNC, 2, struct.pack("<QII", 1, 1, 0))
    f.msg(FUSE_FALLOCATE, 2, struct.pack("<QQQII", 1, 0, 4096, 0, 0))
    f.msg(FUSE_LSEEK, 2, struct.pack("<QQII", 1, 0, 3, 0))
    f.msg(FUSE_GETATTR, 2, struct.pack("<IIQ", 1, 0, 1))
    f.msg(FUSE_RENAME2, ROOT, struct.pack("<QII", ROOT, 1, 0) + cstr(b"file", b"dir"))
    return f.bytes()


# ----- net_segment ----------------------------------------------------------
# mode byte % 3: 0 raw (the rest is the packet: virtio-net header then
# frame), 1 IPv4 TCP, 2 IPv6 TCP built by the target from: gso_size u16
# (% 3000), TCP option words byte (% 11), payload length u16 (payload
# generated), 12 MAC bytes, 8 (IPv4) or 32 (IPv6) address bytes, 12 TCP
# bytes (ports, seq, ack), TCP flags, a lie byte (0: then frame offset u16
# and the byte to put there), a gso selector (% 4: 0 none, 1 TCPV4/TCPV6,
# 2 TCPV4|ECN, 3 the next byte). The target's header always has
# NEEDS_CSUM, csum_start at TCP, csum_offset 16.
ADDR4 = bytes([10, 0, 2, 15, 10, 0, 2, 2])
ADDR6 = b"\xfd" + bytes(14) + b"\x0f" + b"\xfd" + bytes(14) + b"\x02"
TCP12 = struct.pack("!HHII", 40000, 443, 0xFFFFFFF0, 1)
FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80


def tcp_seed(v4, gso_size, words, plen, flags, gso_sel, lie=None, gso_raw=None):
    s = bytes([1 if v4 else 2]) + struct.pack("<HBH", gso_size, words, plen)
    s += MAC_H + MAC_G + (ADDR4 if v4 else ADDR6) + TCP12 + bytes([flags])
    s += b"\x01" if lie is None else b"\x00" + struct.pack("<HB", *lie)
    s += bytes([gso_sel]) + (b"" if gso_raw is None else bytes([gso_raw]))
    return s


def sum16(b, acc=0):
    if len(b) % 2:
        b += b"\0"
    for i in range(0, len(b), 2):
        acc += (b[i] << 8) | b[i + 1]
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return acc


def raw_seed(hdr, frame):
    return b"\x00" + hdr + frame


def vlan_tso4_frame(payload):
    """Ethernet + 802.1Q tag + IPv4 + TCP, lengths right, the TCP checksum
    field holding the pseudo-header sum as Linux leaves it."""
    tot = 20 + 20 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, tot, 0x1234, 0x4000, 64, 6, 0,
                               ADDR4[:4], ADDR4[4:]))
    ip[10:12] = struct.pack("!H", ~sum16(bytes(ip)) & 0xFFFF)
    partial = sum16(ADDR4, 6 + 20 + len(payload))
    tcp = TCP12 + struct.pack("!BBHHH", 0x50, ACK | PSH, 65535, partial, 0)
    return MAC_H + MAC_G + b"\x81\x00\x00\x05\x08\x00" + bytes(ip) + tcp + payload


@seed("net_segment", "tso4_options")
def _():
    # TSO4, MSS 1448, 40 bytes of TCP options (doff 15), 4000 bytes: three
    # segments; FIN/PSH on the last only, CWR on the first only.
    return tcp_seed(True, 1448, 10, 4000, ACK | PSH | FIN | CWR, 1)


@seed("net_segment", "tso4_ecn")
def _():
    # TSO4|ECN, MSS 536, 12 option bytes, a payload of 64 KiB - 1 - 64 (the
    # largest IPv4 packet this option size allows).
    return tcp_seed(True, 536, 3, 65535 - 20 - 32 - 20, ACK | CWR, 2)


@seed("net_segment", "tso6")
def _():
    # TSO6, MSS 1428, 8 option bytes, 3000 bytes, a payload not a multiple
    # of the MSS.
    return tcp_seed(False, 1428, 2, 3000, ACK | PSH, 1)


@seed("net_segment", "tso6_ecn_as_v4")
def _():
    # An IPv6 frame whose header says TCPV4|ECN: refused.
    return tcp_seed(False, 1000, 0, 2500, ACK, 2)


@seed("net_segment", "tso6_ecn")
def _():
    # TSO6|ECN through the raw gso selector, 20 option bytes, FIN.
    return tcp_seed(False, 1000, 5, 2500, ACK | FIN, 3, gso_raw=0x84)


@seed("net_segment", "csum_only_tcp")
def _():
    # Checksum offload only (gso none) on an odd-length TCP payload.
    return tcp_seed(True, 0, 1, 25, ACK | PSH, 0)


@seed("net_segment", "csum_only_udp")
def _():
    # Raw: a UDP datagram with NEEDS_CSUM at 34+6 (the driver's partial
    # sum in the field); then the same completed in place.
    payload = b"mdns query, odd."
    ulen = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 1, 0x4000, 64, 17, 0,
                     ADDR4[:4], ADDR4[4:])
    udp = struct.pack("!HHHH", 5353, 5353, ulen, sum16(ADDR4, 17 + ulen))
    frame = MAC_H + MAC_G + b"\x08\x00" + ip + udp + payload
    return raw_seed(vnet_hdr(1, 0, 0, 0, 34, 6), frame)


@seed("net_segment", "plain")
def _():
    # Raw, no offload: an ARP request must come out unchanged.
    return raw_seed(vnet_hdr(), arp_request())


@seed("net_segment", "vlan_tso4")
def _():
    # Raw: a VLAN-tagged TSO4 packet (only raw mode reaches the 802.1Q
    # path), MSS 700, 2000 bytes.
    payload = bytes((i * 7 + 3) & 0xFF for i in range(2000))
    return raw_seed(vnet_hdr(1, 1, 58, 700, 38, 16), vlan_tso4_frame(payload))


@seed("net_segment", "tso4_ip_length_lies")
def _():
    # The IPv4 total length's high byte overwritten: IP length and frame
    # disagree (refused, nothing emitted).
    return tcp_seed(True, 1448, 0, 3000, ACK, 1, lie=(16, 0xFF))


@seed("net_segment", "tso4_length_wraps")
def _():
    # A payload so large the 16-bit IPv4 length wraps (65535 + 60).
    return tcp_seed(True, 1448, 5, 65535, ACK, 1)


@seed("net_segment", "tso4_fragment")
def _():
    # More-fragments set in a segmented packet: refused.
    return tcp_seed(True, 1448, 0, 2000, ACK, 1, lie=(20, 0x20))


@seed("net_segment", "tso4_doff_past_end")
def _():
    # TCP data offset 15 on a packet with no payload and no options: the
    # header runs past the frame.
    return tcp_seed(True, 1448, 0, 0, ACK, 1, lie=(46, 0xF0))


@seed("net_segment", "tso6_extension_header")
def _():
    # IPv6 next header 0 (hop-by-hop) in a TSO6 packet: refused.
    return tcp_seed(False, 1428, 0, 2000, ACK, 1, lie=(20, 0))


@seed("net_segment", "tso_tiny_mss")
def _():
    # MSS 1 over 300 bytes (300 segments), and an empty FIN segment.
    return tcp_seed(True, 1, 0, 300, ACK | FIN, 1)


@seed("net_segment", "tso_wrong_types")
def _():
    # A TCPV6 type on an IPv4 frame, then GSO_UDP (unsupported).
    return tcp_seed(True, 1448, 0, 2000, ACK, 3, gso_raw=4)


@seed("net_segment", "gso_udp")
def _():
    return tcp_seed(True, 1448, 0, 2000, ACK, 3, gso_raw=3)


@seed("net_segment", "raw_malformed")
def _():
    # Raw: a TSO4 header in front of a frame cut inside the IPv4 header.
    return raw_seed(vnet_hdr(1, 1, 54, 1448, 34, 16), ipv4_tcp(100)[:30])


@seed("net_segment", "raw_csum_outside")
def _():
    # Raw: checksum offset past the end of the frame.
    return raw_seed(vnet_hdr(1, 0, 0, 0, 0xFFF0, 16), arp_request())


@seed("net_segment", "raw_runt")
def _():
    # Raw: shorter than the virtio-net header.
    return raw_seed(b"", b"\x01\x01\x00\x00\x05")


# ----- image_unpack -----------------------------------------------------------
# Byte 0: 0 plain tar media type, 1 gzip, 2 zstd, else sniffed; bytes 1-2:
# u16 LE length of the first layer; the rest is the second layer. The
# canary the target checks lives at /tmp/locald-fuzz-unpack-canary, and the
# staging root at /tmp/locald-fuzz-unpack-PID/root (so `../../` from the
# root reaches /tmp).
CANARY = "/tmp/locald-fuzz-unpack-canary"


def tar_layer(entries, fmt=None):
    """entries: (name, type, data/linkname, extra dict) tuples."""
    import io
    import tarfile

    fmt = tarfile.PAX_FORMAT if fmt is None else fmt
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, typ, arg, extra in entries:
            ti = tarfile.TarInfo(name)
            ti.type = typ
            ti.mtime = 1600000000
            ti.mode = extra.get("mode", 0o755 if typ == tarfile.DIRTYPE else 0o644)
            ti.uid = extra.get("uid", 0)
            ti.gid = extra.get("gid", 0)
            ti.devmajor, ti.devminor = extra.get("dev", (0, 0))
            ti.pax_headers = extra.get("pax", {})
            data = None
            if typ in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = arg
            elif typ == tarfile.REGTYPE:
                data = arg
                ti.size = len(arg)
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def unpack_seed(mode, first, second=b""):
    return bytes([mode]) + struct.pack("<H", len(first)) + first + second


def _reg(name, data=b"x", **kw):
    import tarfile

    return (name, tarfile.REGTYPE, data, kw)


def _dir(name, **kw):
    import tarfile

    return (name, tarfile.DIRTYPE, None, kw)


def _sym(name, target):
    import tarfile

    return (name, tarfile.SYMTYPE, target, {"mode": 0o777})


def _lnk(name, target):
    import tarfile

    return (name, tarfile.LNKTYPE, target, {})


def _dev(name, typ, major, minor):
    return (name, typ, None, {"dev": (major, minor), "mode": 0o666})


def basic_layer():
    import tarfile

    return tar_layer([
        _dir("./"),
        _dir("etc"),
        _reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        _reg("usr/bin/sudo", b"suid", mode=0o4755,
             pax={"SCHILY.xattr.user.a": "1", "SCHILY.xattr.security.capability": "c"}),
        _lnk("usr/bin/sudo2", "usr/bin/sudo"),
        _sym("bin", "usr/bin"),
        _reg("bin/through", b"t"),
        _dev("dev/null", tarfile.CHRTYPE, 1, 3),
        _dev("dev/sda", tarfile.BLKTYPE, 8, 0),
        _dev("dev/fifo", tarfile.FIFOTYPE, 0, 0),
        _reg("d" * 120 + "/" + "f" * 120, b"long"),
    ])


@seed("image_unpack", "basic_plain")
def _():
    return unpack_seed(0, basic_layer())


@seed("image_unpack", "basic_gzip")
def _():
    import gzip

    return unpack_seed(1, gzip.compress(basic_layer(), mtime=0))


@seed("image_unpack", "basic_gnu_sniffed")
def _():
    import tarfile

    return unpack_seed(3, tar_layer([
        _dir("a"), _reg("a/" + "n" * 150, b"gnu long name"),
        _sym("a/" + "s" * 120, "t" * 130),
    ], fmt=tarfile.GNU_FORMAT))


@seed("image_unpack", "whiteouts_two_layers")
def _():
    lower = tar_layer([
        _dir("etc"), _reg("etc/gone"), _dir("etc/gonedir"), _reg("etc/gonedir/x"),
        _dir("opq"), _reg("opq/old"), _dir("opq/sub"), _reg("opq/sub/old"),
        _sym("lib", "usr/lib"), _dir("usr"), _dir("usr/lib"), _reg("usr/lib/a"),
    ])
    upper = tar_layer([
        _reg("etc/.wh.gone", b""), _reg("etc/.wh.gonedir", b""),
        _reg("opq/new", b"n"), _reg("opq/.wh..wh..opq", b""), _reg("opq/sub/later"),
        _reg("lib/.wh.a", b""), _reg("lib/b"), _reg(".wh..wh.plnk", b""),
        _reg("etc/gone", b"back"), _reg("etc/.wh.gone", b""),
    ])
    return unpack_seed(0, lower, upper)


@seed("image_unpack", "symlink_write_through")
def _():
    lower = tar_layer([
        _sym("abs", CANARY), _sym("rel", "../../locald-fuzz-unpack-canary"),
        _sym("up", "../../../../.."), _sym("loop", "loop"),
        _sym("file", CANARY + "/secret"),
        _reg("abs/pwned"), _reg("rel/pwned"), _reg("up/tmp/pwned"),
    ])
    upper = tar_layer([
        _reg("file", b"overwrite"), _dir("abs", mode=0o777),
        _reg("rel/sub/deep", b"x"), _reg("loop/x"),
    ])
    return unpack_seed(0, lower, upper)


@seed("image_unpack", "hardlinks_out")
def _():
    return unpack_seed(0, tar_layer([
        _sym("abs", CANARY), _sym("rel", "../../locald-fuzz-unpack-canary"),
        _lnk("l1", "abs/secret"), _lnk("l2", "rel/secret"),
        _lnk("l3", CANARY + "/secret"), _lnk("l4", "../../locald-fuzz-unpack-canary/secret"),
        _lnk("l5", "."), _lnk("l6", "abs"),
    ]))


@seed("image_unpack", "hostile_names")
def _():
    return unpack_seed(0, tar_layer([
        _reg(CANARY + "/pwned"), _reg("../../locald-fuzz-unpack-canary/pwned"),
        _reg("a/../../x"), _reg("."), _reg(""), _reg("a/.wh.."),
    ]))


@seed("image_unpack", "replace_dirs")
def _():
    lower = tar_layer([
        _dir("p"), _dir("p/d"), _sym("p/d/rel", "../../../../locald-fuzz-unpack-canary"),
        _sym("p/d/abs", CANARY), _reg("p/f"), _dir("q"), _sym("q/abs", CANARY),
    ])
    upper = tar_layer([
        _reg("p/d", b"file"), _dir("p/f"), _reg("p/f/x"),
        _reg("q/.wh..wh..opq", b""), _dir("q"),
    ])
    return unpack_seed(0, lower, upper)


def main():
    for (target, name), fn in sorted(SEEDS.items()):
        d = os.path.join(HERE, "seeds", target)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "wb") as f:
            f.write(fn())
        print(f"seeds/{target}/{name}")


if __name__ == "__main__":
    main()
