# triple_fault: loads a zero-limit IDT and executes int3. The #BP cannot be
# delivered (#GP), nor can the #GP (#DF), nor the #DF: a triple fault,
# which KVM reports as KVM_EXIT_SHUTDOWN. Exits with 2 if it survives.
#
# On this host KVM's emulator cannot execute int3 (an emulation-failure
# exit; QEMU stops there): the VMM must emulate it (advance RIP, inject
# #BP). triple_fault_ud2 is the same guest with ud2, which KVM handles.

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
    int3
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
