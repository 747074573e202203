# i8042_reset: prints "resetting", then writes the i8042 "pulse reset line"
# command 0xFE to port 0x64. A VMM with an i8042 stops here with a reset;
# without one (QEMU microvm) the guest goes on, prints "reset ignored"
# after a bounded spin and exits with 2.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    PRINT "resetting\n"
    mov al, 0xfe
    out 0x64, al
    mov ecx, 100000
1:  dec ecx
    jnz 1b
    PRINT "reset ignored\n"
    EXIT 2

    .section .bss
    .balign 16
    .skip 4096
stack_top:
