# unhandled: executes `rdseed eax`, which neither KVM's instruction
# emulator nor locald-vmm completes on a software-KVM host, so the VM must
# end with an error naming the instruction, its bytes and the RIP. On
# hardware KVM the instruction runs natively and the guest exits 0.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    PRINT "rdseed next\n"
    rdseed eax
    EXIT 0

    .section .bss
    .balign 16
    .skip 1024
stack_top:
