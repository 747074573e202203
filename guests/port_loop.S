# port_loop: 100,000 OUTs to port 0x80 (ignored by the VMM), then exits
# with 0. Minus pvh_exit0's run time, this gives the cost of one port-I/O
# exit.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov ecx, 100000
    xor eax, eax
1:  out 0x80, al
    dec ecx
    jnz 1b
    out 0xf4, al                        # AL = 0
2:  cli
    hlt
    jmp 2b
