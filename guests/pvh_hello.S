# pvh_hello: PVH boot smoke test.
#
# Entered in 32-bit protected mode, paging off, EBX = &hvm_start_info.
# hvm_start_info: magic @0, version @4, cmdline_paddr @24 (u64),
# memmap_paddr @40 (u64), memmap_entries @48 (u32); memmap entries are
# {u64 addr, u64 size, u32 type, u32 reserved}.
# Prints "pvh ok", the command line and the memory map, exits with 0;
# exits with 1 if the start-info magic is wrong.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    cmp dword ptr [ebx], 0x336ec578     # XEN_HVM_START_MAGIC_VALUE
    jne bad_magic

    PRINT "pvh ok\n"
    PRINT "cmdline: "
    mov esi, [ebx + 24]                 # cmdline_paddr (low half)
    test esi, esi
    jz 1f
    call puts
1:  PRINT "\n"

    xor eax, eax
    cmp dword ptr [ebx + 4], 1          # memmap fields exist from version 1
    jb 2f
    mov eax, [ebx + 48]                 # memmap_entries
2:  mov edi, eax
    PRINT "memmap entries: "
    call putdec
    PRINT "\n"
    mov esi, [ebx + 40]                 # memmap_paddr (low half)
    cmp edi, 64                         # print at most 64 entries
    jbe 3f
    mov edi, 64
3:  test edi, edi
    jz 4f
    PRINT "memmap: addr="
    call puthex64
    add esi, 8
    PRINT " size="
    call puthex64
    add esi, 8
    PRINT " type=0x"
    mov eax, [esi]
    mov ecx, 8
    call puthex
    PRINT "\n"
    add esi, 8
    dec edi
    jmp 3b
4:  EXIT 0

bad_magic:
    PRINT "pvh bad magic\n"
    EXIT 1

    .section .bss
    .balign 16
    .skip 4096
stack_top:
