# emulate_window: forces the VMM's instruction-completion path on any host
# (Intel, AMD, software KVM). Needs the VMM's test hook
# LOCALD_VMM_TEST_CODE_WINDOW=1 (see crates/locald-vmm/src/kvm/emulate.rs,
# code_window): a page at 0xc0000000 that is MMIO to KVM but backed by VMM
# memory. KVM cannot fetch instructions there, so each instruction placed
# in the window ends in KVM_EXIT_INTERNAL_ERROR (emulation) and is completed
# by the VMM, or refused.
#
# Each case copies instruction bytes plus a final int3 into the window with
# MMIO writes, sets registers, and jumps there. The VMM completes the
# instructions and the int3 (#BP into bp_handler, in RAM), which records
# the saved EIP and returns to the caller with the flags of the trap. Each
# case checks the architectural result and that the saved EIP is right
# after the window's int3 (every instruction advanced RIP by its length).
# Prints:
#   window ok               (MMIO writes to the window read back), else
#   window not present      and exits 3 (hook off)
#   stac ok, clac ok, popcnt 17, popcnt flags ok, rdrand ok, fwait ok,
#   int3 ok, sequence ok    (one line each; "... FAILED" otherwise)
#   rdseed next             then executes rdseed eax in the window, which
#                           the VMM must refuse: the VM ends with an error
#                           naming `rdseed eax`, bytes 0f c7 f8, RIP
#                           0xc0000000. Exits 1 instead if a check failed,
#                           2 if rdseed returned.
# Window trips: 9 (int3 completed 9 times); completed in all: stac 2, clac 2,
# popcnt 3, rdrand 2, fwait 2 (the sequence adds one stac, fwait, popcnt, clac).

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .set WINDOW, 0xc0000000

# CASE label, len: copy `len` bytes at `label` plus int3 into the window.
.macro LOADW label, len
    mov esi, offset \label
    mov ecx, \len
    call load_window
.endm

# CHECK_EIP len: ZF=1 if the last #BP came from the int3 after `len` bytes.
.macro CHECK_EIP len
    cmp dword ptr [bp_eip], WINDOW + \len + 1
.endm

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    xor ebp, ebp                        # failure count

    # #BP gate (interrupt gate, ring 0) to bp_handler.
    mov eax, offset bp_handler
    mov word ptr [idt + 3*8], ax
    mov word ptr [idt + 3*8 + 2], cs
    mov word ptr [idt + 3*8 + 4], 0x8e00
    shr eax, 16
    mov word ptr [idt + 3*8 + 6], ax
    lidt [idtr]

    # The window must hold what we write (the hook is on).
    LOADW i_stac, 3
    cmp byte ptr [WINDOW], 0x0f
    jne 1f
    cmp byte ptr [WINDOW + 3], 0xcc
    jne 1f
    PRINT "window ok\n"
    jmp 2f
1:  PRINT "window not present\n"
    EXIT 3
2:
    # stac (loaded above): AC set.
    call enter_window
    pushfd
    pop eax
    CHECK_EIP 3
    jne 1f
    test eax, 1 << 18
    jz 1f
    PRINT "stac ok\n"
    jmp 2f
1:  PRINT "stac FAILED\n"
    inc ebp
2:
    # clac: AC clear.
    LOADW i_clac, 3
    call enter_window
    pushfd
    pop eax
    CHECK_EIP 3
    jne 1f
    test eax, 1 << 18
    jnz 1f
    PRINT "clac ok\n"
    jmp 2f
1:  PRINT "clac FAILED\n"
    inc ebp
2:
    # popcnt eax, ebx = 17 with ZF clear; popcnt ecx, edx of 0 sets ZF.
    LOADW i_popcnt_eax_ebx, 4
    mov ebx, 0xf0f0f0f1
    mov eax, 0x12345678
    call enter_window
    pushfd
    pop edx
    PRINT "popcnt "
    call putdec
    PRINT "\n"
    CHECK_EIP 4
    jne 1f
    cmp eax, 17
    jne 1f
    test edx, 1 << 6
    jnz 1f
    LOADW i_popcnt_ecx_edx, 4
    xor edx, edx
    mov ecx, 5
    call enter_window
    jnz 1f
    test ecx, ecx
    jnz 1f
    CHECK_EIP 4
    jne 1f
    PRINT "popcnt flags ok\n"
    jmp 2f
1:  PRINT "popcnt FAILED\n"
    inc ebp
2:
    # rdrand eax, twice: CF=1 and the values differ (the VMM fills it from
    # the host; no CPUID bit is involved, the CPU never runs it).
    LOADW i_rdrand_eax, 3
    call enter_window
    jnc 1f
    mov esi, eax
    CHECK_EIP 3
    jne 1f
    call enter_window
    jnc 1f
    cmp eax, esi
    je 1f
    PRINT "rdrand ok\n"
    jmp 2f
1:  PRINT "rdrand FAILED\n"
    inc ebp
2:
    # fwait: nothing but RIP changes.
    LOADW i_fwait, 1
    mov eax, 0x5a5a5a5a
    call enter_window
    CHECK_EIP 1
    jne 1f
    cmp eax, 0x5a5a5a5a
    jne 1f
    PRINT "fwait ok\n"
    jmp 2f
1:  PRINT "fwait FAILED\n"
    inc ebp
2:
    # int3 alone.
    LOADW i_none, 0
    call enter_window
    CHECK_EIP 0
    jne 1f
    PRINT "int3 ok\n"
    jmp 2f
1:  PRINT "int3 FAILED\n"
    inc ebp
2:
    # A sequence in one trip: stac; fwait; popcnt eax, ebx; clac.
    LOADW i_sequence, 11
    mov ebx, 0x3
    call enter_window
    pushfd
    pop edx
    CHECK_EIP 11
    jne 1f
    cmp eax, 2
    jne 1f
    test edx, 1 << 18
    jnz 1f
    PRINT "sequence ok\n"
    jmp 2f
1:  PRINT "sequence FAILED\n"
    inc ebp
2:
    test ebp, ebp
    jz 3f
    EXIT 1
3:  # rdseed eax: not completed by the VMM; the VM must end here.
    PRINT "rdseed next\n"
    LOADW i_rdseed_eax, 3
    call enter_window
    PRINT "rdseed returned\n"
    EXIT 2

# load_window: copy ECX bytes at ESI into the window (one MMIO write per
# byte) and put int3 after them. Preserves all registers.
load_window:
    push eax
    push ecx
    push esi
    push edi
    mov edi, WINDOW
1:  test ecx, ecx
    jz 2f
    mov al, [esi]
    mov [edi], al
    inc esi
    inc edi
    dec ecx
    jmp 1b
2:  mov byte ptr [edi], 0xcc
    pop edi
    pop esi
    pop ecx
    pop eax
    ret

# enter_window: run the window; returns (through bp_handler) with the
# registers and flags the window's instructions left.
enter_window:
    jmp WINDOW

# #BP: a trap, the saved EIP is after the int3. Record it, drop CS, restore
# the trap's EFLAGS and return to enter_window's caller (no iretd: KVM's
# emulator on a software KVM cannot run a protected-mode iret; no flag-
# changing instruction after popfd).
bp_handler:
    pop dword ptr [bp_eip]
    lea esp, [esp + 4]
    popfd
    ret

    .section .rodata
i_stac:           .byte 0x0f, 0x01, 0xcb
i_clac:           .byte 0x0f, 0x01, 0xca
i_popcnt_eax_ebx: .byte 0xf3, 0x0f, 0xb8, 0xc3
i_popcnt_ecx_edx: .byte 0xf3, 0x0f, 0xb8, 0xca
i_rdrand_eax:     .byte 0x0f, 0xc7, 0xf0
i_fwait:          .byte 0x9b
i_none:
i_sequence:       .byte 0x0f, 0x01, 0xcb, 0x9b, 0xf3, 0x0f, 0xb8, 0xc3, 0x0f, 0x01, 0xca
i_rdseed_eax:     .byte 0x0f, 0xc7, 0xf8

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
