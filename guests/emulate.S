# emulate: runs each instruction that locald-vmm completes itself when
# KVM's instruction emulator cannot (software-KVM hosts): stac, clac,
# register popcnt, rdrand, fwait, int3 (with a real #BP handler). Checks
# the architectural result of each and prints one line per instruction;
# exits 0 when all are right, 1 otherwise. rdrand runs only if CPUID
# leaf 1 ECX bit 30 says it exists ("rdrand not present" otherwise) and is
# retried on CF=0. On hardware KVM the same instructions run natively and
# the output is identical; emulate_window forces the VMM's path there.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    xor ebp, ebp                        # failure count

    # stac / clac: RFLAGS.AC (bit 18)
    stac
    pushfd
    pop eax
    test eax, 1 << 18
    jz 1f
    PRINT "stac ok\n"
    jmp 2f
1:  PRINT "stac FAILED\n"
    inc ebp
2:  clac
    pushfd
    pop eax
    test eax, 1 << 18
    jnz 1f
    PRINT "clac ok\n"
    jmp 2f
1:  PRINT "clac FAILED\n"
    inc ebp
2:
    # popcnt eax, ebx = 17, ZF clear; popcnt ecx, edx with 0 sets ZF
    mov ebx, 0xf0f0f0f1
    popcnt eax, ebx
    pushfd
    pop edx
    PRINT "popcnt "
    call putdec
    PRINT "\n"
    cmp eax, 17
    jne 1f
    test edx, 1 << 6
    jnz 1f
    xor edx, edx
    mov ecx, 5
    popcnt ecx, edx
    jnz 1f
    test ecx, ecx
    jnz 1f
    PRINT "popcnt flags ok\n"
    jmp 2f
1:  PRINT "popcnt FAILED\n"
    inc ebp
2:
    # rdrand, if CPUID.1:ECX[30] says it exists: CF=1 within RDRAND_TRIES
    # tries (a CPU may be out of entropy for a moment) and two reads differ.
    mov eax, 1
    cpuid
    bt ecx, 30
    jc 3f
    PRINT "rdrand not present\n"
    jmp 2f
3:  call rdrand_retry
    jnc 1f
    mov esi, eax
    call rdrand_retry
    jnc 1f
    cmp eax, esi
    je 1f
    PRINT "rdrand ok\n"
    jmp 2f
1:  PRINT "rdrand FAILED\n"
    inc ebp
2:
    # fwait: no x87 exception pending, so it just continues
    fwait
    PRINT "fwait ok\n"

    # int3 through an IDT gate for vector 3 (interrupt gate, ring 0)
    mov eax, offset bp_handler
    mov word ptr [idt + 3*8], ax
    mov word ptr [idt + 3*8 + 2], cs
    mov word ptr [idt + 3*8 + 4], 0x8e00
    shr eax, 16
    mov word ptr [idt + 3*8 + 6], ax
    lidt [idtr]
    mov dword ptr [bp_eip], 0
    int3
after_int3:
    mov eax, [bp_eip]
    cmp eax, offset after_int3
    jne 1f
    PRINT "int3 ok\n"
    jmp 2f
1:  PRINT "int3 FAILED\n"
    inc ebp
2:
    mov eax, ebp
    test eax, eax
    jnz 3f
    EXIT 0
3:  EXIT 1

# rdrand_retry: EAX = a random value with CF=1, or CF=0 after
# RDRAND_TRIES reads that all had CF=0. Clobbers ECX.
    .set RDRAND_TRIES, 10
rdrand_retry:
    mov ecx, RDRAND_TRIES
1:  rdrand eax
    jc 2f
    dec ecx                             # keeps CF (0)
    jnz 1b
2:  ret

# #BP is a trap: the saved EIP is the instruction after int3. Returns
# without iretd: KVM's emulator (all guest kernel code on a software KVM)
# cannot run a protected-mode iret, so unwind the frame by hand
# (same privilege level: EIP, CS, EFLAGS).
bp_handler:
    pop eax
    mov [bp_eip], eax
    pop ecx
    popfd
    jmp eax

    .section .data
    .balign 8
idt:
    .fill 32, 8, 0
idtr:
    .word 32*8 - 1
    .long idt
bp_eip:
    .long 0

    .section .bss
    .balign 16
    .skip 4096
stack_top:
