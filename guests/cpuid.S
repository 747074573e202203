# cpuid: prints what CPUID tells a guest about its hypervisor:
#   hypervisor bit: <leaf 1 ECX bit 31>
#   apic id: <leaf 1 EBX[31:24], decimal>
#   hypervisor signature: <leaf 0x40000000 EBX,ECX,EDX as text>
# then exits with 0.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov esi, ebx
    PRINT "hypervisor bit: "
    mov eax, ecx
    shr eax, 31
    call putdec
    PRINT "\napic id: "
    mov eax, esi
    shr eax, 24
    call putdec
    PRINT "\n"

    mov eax, 0x40000000
    xor ecx, ecx
    cpuid
    mov [signature], ebx
    mov [signature + 4], ecx
    mov [signature + 8], edx
    mov byte ptr [signature + 12], 0
    PRINT "hypervisor signature: "
    mov esi, offset signature
    call puts
    PRINT "\n"
    EXIT 0

    .section .bss
    .balign 16
signature:
    .skip 16
    .skip 4096
stack_top:
