# spin: prints "spinning" and loops forever (for timeout tests).

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    PRINT "spinning\n"
1:  jmp 1b

    .section .bss
    .balign 16
    .skip 4096
stack_top:
