# boot64: a 64-bit ELF without a PVH note, for the Linux 64-bit boot
# protocol: entered in long mode with identity-mapped paging (at least the
# first GiB) and RSI = &boot_params. Prints "boot64 ok" and the report of
# boot64_body.inc, then exits with 0.

    .intel_syntax noprefix
    .code64
    .include "lib64.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov rsp, offset stack_top
    mov rbx, rsi
    PRINT "boot64 ok\n"
    jmp boot64_report

    .include "boot64_body.inc"

    .section .bss
    .balign 16
    .skip 4096
stack_top:
