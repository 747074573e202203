# unhandled: executes `rdseed eax`, which neither KVM's instruction
# emulator nor locald-vmm completes on a software-KVM host, so the VM must
# end with an error naming the instruction, its bytes and the RIP. On
# hardware KVM the instruction runs natively: it is retried up to
# RDSEED_TRIES times while CF=0 (the entropy source may be busy), then the
# guest prints "rdseed ok" and exits 0, or "rdseed FAILED" and exits 1.
# Without CPUID leaf 7 EBX bit 18 it prints "rdseed not present" and exits
# 0 without running it. (emulate_window refuses rdseed on every host.)

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .set RDSEED_TRIES, 100

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    xor eax, eax
    cpuid                               # EAX = highest basic leaf
    cmp eax, 7
    jb 1f
    mov eax, 7
    xor ecx, ecx
    cpuid
    bt ebx, 18
    jc 2f
1:  PRINT "rdseed not present\n"
    EXIT 0
2:  PRINT "rdseed next\n"
    mov ecx, RDSEED_TRIES
3:  rdseed eax
    jc 4f
    dec ecx                             # keeps CF (0)
    jnz 3b
    PRINT "rdseed FAILED\n"
    EXIT 1
4:  PRINT "rdseed ok\n"
    EXIT 0

    .section .bss
    .balign 16
    .skip 1024
stack_top:
