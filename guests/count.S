# count: counts from 1 to 40, printing "count N" for each, with about
# 25 ms between counts (measured with RDTSC: 2^26 cycles at 1-3 GHz),
# then exits with 0. The count lives in memory and, times 3, in EBP; a
# mismatch (memory or registers restored wrongly) exits with 2. Used to
# snapshot a guest mid-run and restore it.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .set LAST, 40

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    mov dword ptr [counter], 0
    xor ebp, ebp
    PRINT "counting\n"
1:  mov eax, [counter]
    lea edx, [eax + eax*2]
    cmp edx, ebp
    jne mismatch
    inc eax
    mov [counter], eax
    add ebp, 3
    PRINT "count "
    call putdec
    PRINT "\n"
    cmp eax, LAST
    jae done
    # Wait about 2^26 TSC cycles.
    rdtsc
    mov esi, eax
    mov edi, edx
2:  rdtsc
    sub eax, esi
    sbb edx, edi
    test edx, edx
    jnz 1b
    cmp eax, 0x4000000
    jb 2b
    jmp 1b
done:
    PRINT "done\n"
    EXIT 0
mismatch:
    PRINT "count mismatch\n"
    EXIT 2

    .section .data
    .balign 4
counter:
    .long 0

    .section .bss
    .balign 16
    .skip 4096
stack_top:
