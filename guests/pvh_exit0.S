# pvh_exit0: PVH guest that exits with status 0 at once (startup latency).

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    mov al, 0
    out 0xf4, al
1:  cli
    hlt
    jmp 1b
