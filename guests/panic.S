# panic: behaves like a Linux kernel that panics with panic=-1 and
# reboot=k: prints the panic line on the console, then resets through the
# i8042. The VMM must report a panic, not a plain reset.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    PRINT "[    1.000000] Kernel panic - not syncing: Attempted to kill init!\n"
    PRINT "[    1.000001] Rebooting in 1 seconds..\n"
    mov al, 0xfe
    out 0x64, al
    EXIT 2

    .section .bss
    .balign 16
    .skip 1024
stack_top:
