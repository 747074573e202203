# c_entry.S: entry of the C guests (PVH boot).
#
# Entered in 32-bit protected mode, paging off, EBX = &hvm_start_info.
# Sets up a 16 KiB stack in .bss, calls `int c_main(const void *start_info)`
# (cdecl) and writes its return value to the exit port. Also provides the
# memset/memcpy/memmove that gcc may emit calls to even in freestanding
# code (they cannot be written in C here without gcc turning the loop back
# into a call to itself).

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    cld
    mov esp, offset c_stack_top
    sub esp, 12                 # keep ESP 16-byte aligned at the call
    push ebx
    call c_main
    out 0xf4, al
1:  cli
    hlt
    jmp 1b

    .section .text
# void *memset(void *dst, int c, size_t n)
    .globl memset
memset:
    push edi
    mov edi, [esp + 8]
    mov eax, [esp + 12]
    mov ecx, [esp + 16]
    rep stosb
    mov eax, [esp + 8]
    pop edi
    ret

# void *memcpy(void *dst, const void *src, size_t n)
    .globl memcpy
memcpy:
    push edi
    push esi
    mov edi, [esp + 12]
    mov esi, [esp + 16]
    mov ecx, [esp + 20]
    rep movsb
    mov eax, [esp + 12]
    pop esi
    pop edi
    ret

# void *memmove(void *dst, const void *src, size_t n)
    .globl memmove
memmove:
    push edi
    push esi
    mov edi, [esp + 12]
    mov esi, [esp + 16]
    mov ecx, [esp + 20]
    cmp edi, esi
    jbe 1f
    lea esi, [esi + ecx - 1]    # dst above src: copy backwards
    lea edi, [edi + ecx - 1]
    std
    rep movsb
    cld
    jmp 2f
1:  rep movsb
2:  mov eax, [esp + 12]
    pop esi
    pop edi
    ret

    .section .bss
    .balign 16
    .skip 16384
c_stack_top:
