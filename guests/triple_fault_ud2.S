# triple_fault_ud2: loads a zero-limit IDT and executes ud2. The #UD cannot be
# delivered (#GP), nor can the #GP (#DF), nor the #DF: a triple fault,
# which KVM reports as KVM_EXIT_SHUTDOWN. Exits with 2 if it survives.
# Unlike int3 (see triple_fault.S), KVM raises the #UD itself, so QEMU
# runs this one too.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    PRINT "triple fault next\n"
    lidt [null_idt]
    ud2
    PRINT "still alive\n"
    EXIT 2

    .section .rodata
    .balign 8
null_idt:
    .word 0                             # limit
    .long 0                             # base

    .section .bss
    .balign 16
    .skip 4096
stack_top:
