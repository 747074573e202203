# pvh_two_lines: PVH guest that prints two short lines and exits 0. It is
# the guest of locald-bench's start/exit goals (issue 17, item 6: "a tiny
# PVH guest that prints two lines"): nearly all of a run is the VMM's own
# start and exit, the guest's output costs about 30 port exits.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    PRINT "hello from pvh\n"
    PRINT "bye\n"
    EXIT 0

    .section .bss
    .balign 16
    .skip 4096
stack_top:
