# serial_echo: reads bytes from COM1 until '\n' and prints them back
# upper-cased (the '\n' included), then exits with 0.
#
# Input is polled: LSR bit 0 (data ready) at 0x3fd, then IN from 0x3f8.
# The line is echoed once complete, so output never interleaves with input.

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .set LINE_MAX, 256

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top
    mov edi, offset line
    xor ecx, ecx                        # bytes stored
1:  mov dx, COM1_LSR
    in al, dx
    test al, 0x01
    jz 1b
    mov dx, COM1_DATA
    in al, dx
    cmp al, 'a'
    jb 2f
    cmp al, 'z'
    ja 2f
    sub al, 'a' - 'A'
2:  cmp ecx, LINE_MAX - 1
    jae 3f                              # full: keep reading, drop the byte
    mov [edi + ecx], al
    inc ecx
3:  cmp al, '\n'
    jne 1b
    mov byte ptr [edi + ecx], 0
    mov esi, edi
    call puts
    EXIT 0

    .section .bss
    .balign 16
line:
    .skip LINE_MAX
    .skip 4096
stack_top:
