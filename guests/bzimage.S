# bzimage: a synthetic bzImage (Linux boot protocol 2.15) that carries the
# boot64 report.
#
# File layout (see bzimage.ld): 5 setup sectors (boot sector + 4, setup
# header at 0x1f1), then the protected-mode payload, loaded at code32_start
# = 0x100000, with
#   payload + 0x000  startup_32: the 32-bit boot protocol entry
#                    (flat protected mode, paging off, ESI = &boot_params):
#                    builds identity page tables for the first GiB, enters
#                    long mode and continues at startup_64;
#   payload + 0x200  startup_64: the 64-bit boot protocol entry (long mode,
#                    identity-mapped, RSI = &boot_params): prints
#                    "bzimage ok" and the report of boot64_body.inc.
# The real-mode setup code (entered at setup + 0x200 by a BIOS-style loader
# such as QEMU's firmware) builds a zero page from the setup header,
# switches to protected mode and jumps to code32_start: so every entry of
# the boot protocol can be exercised. It makes no BIOS call, so on that path
# the e820 table stays empty (on this host qboot's int 0x15 e820 handler
# derailed the guest after the last entry, differently from run to run).

    .intel_syntax noprefix
    .code64
    .include "lib64.inc"

    .set SETUP_SECTS, 4
    .set BOOT_CS, 0x10
    .set BOOT_DS, 0x18
    .set ZERO_PAGE_SEG_OFFSET, 0x100    # zero page = setup base + 4 KiB

# ---------------------------------------------------------------- setup --
    .section .setup, "ax"
    .code16
setup_base:
    .org 0x1f1
hdr_setup_sects:        .byte SETUP_SECTS
hdr_root_flags:         .word 0
hdr_syssize:            .long _syssize          # payload size / 16
hdr_ram_size:           .word 0
hdr_vid_mode:           .word 0xffff
hdr_root_dev:           .word 0
hdr_boot_flag:          .word 0xaa55            # 0x1fe
    .org 0x200
hdr_jump:               jmp short setup_start   # 0x200: real-mode entry
hdr_header:             .ascii "HdrS"           # 0x202
hdr_version:            .word 0x020f            # 0x206
hdr_realmode_swtch:     .long 0                 # 0x208
hdr_start_sys_seg:      .word 0x1000            # 0x20c
hdr_kernel_version:     .word 0                 # 0x20e
hdr_type_of_loader:     .byte 0                 # 0x210
hdr_loadflags:          .byte 0x01              # 0x211 LOADED_HIGH
hdr_setup_move_size:    .word 0x8000            # 0x212
hdr_code32_start:       .long 0x100000          # 0x214
hdr_ramdisk_image:      .long 0                 # 0x218
hdr_ramdisk_size:       .long 0                 # 0x21c
hdr_bootsect_kludge:    .long 0                 # 0x220
hdr_heap_end_ptr:       .word 0                 # 0x224
hdr_ext_loader_ver:     .byte 0                 # 0x226
hdr_ext_loader_type:    .byte 0                 # 0x227
hdr_cmd_line_ptr:       .long 0                 # 0x228
hdr_initrd_addr_max:    .long 0x7fffffff        # 0x22c
hdr_kernel_alignment:   .long 0x200000          # 0x230
hdr_relocatable:        .byte 0                 # 0x234
hdr_min_alignment:      .byte 21                # 0x235
hdr_xloadflags:         .word 0x0003            # 0x236 XLF_KERNEL_64 |
                                                #   XLF_CAN_BE_LOADED_ABOVE_4G
hdr_cmdline_size:       .long 2047              # 0x238
hdr_hardware_subarch:   .long 0                 # 0x23c
hdr_subarch_data:       .quad 0                 # 0x240
hdr_payload_offset:     .long 0                 # 0x248
hdr_payload_length:     .long 0                 # 0x24c
hdr_setup_data:         .quad 0                 # 0x250
hdr_pref_address:       .quad 0x100000          # 0x258
hdr_init_size:          .long _init_size        # 0x260
hdr_handover_offset:    .long 0                 # 0x264
hdr_kernel_info_offset: .long 0                 # 0x268

# Real mode, CS = base + 0x20, DS = ES = SS = base (the loader's stack).
setup_start:
    cli
    cld
    mov ax, cs
    sub ax, 0x20
    mov ds, ax
    add ax, ZERO_PAGE_SEG_OFFSET
    mov es, ax

    # Zero page: zeroes, then the setup header as the loader filled it in.
    xor di, di
    xor ax, ax
    mov cx, 2048
    rep stosw
    mov si, 0x1f1
    mov di, 0x1f1
    mov cx, 0x290 - 0x1f1
    rep movsb

    # Protected mode: flat GDT (Linux's __BOOT_CS/__BOOT_DS), then a
    # 32-bit far jump to code32_start with ESI = &zero page.
    cli
    xor esi, esi
    mov si, es
    shl esi, 4
    xor eax, eax
    mov ax, ds
    shl eax, 4
    add eax, offset boot_gdt
    mov [boot_gdt_ptr + 2], eax
    mov eax, [hdr_code32_start]
    mov [pm_target], eax
    lgdt [boot_gdt_ptr]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp fword ptr [pm_target]

    .balign 8
boot_gdt:
    .quad 0
    .quad 0
    .quad 0x00cf9a000000ffff            # 0x10: flat 32-bit code
    .quad 0x00cf92000000ffff            # 0x18: flat data
boot_gdt_ptr:
    .word 4 * 8 - 1
    .long 0                             # linear base, set at run time
pm_target:
    .long 0                             # code32_start
    .word BOOT_CS

# -------------------------------------------------------------- payload --
    .section .text.entry, "ax"
    .code32
    .globl startup_32
startup_32:
    cli
    cld
    mov ax, BOOT_DS
    mov ds, ax
    mov es, ax
    mov ss, ax
    # Identity-map the first GiB with 2 MiB pages: PML4 -> PDPT -> PD.
    mov edi, offset page_tables
    xor eax, eax
    mov ecx, 3 * 4096 / 4
    rep stosd
    mov edi, offset page_tables
    lea eax, [edi + 0x1000 + 3]
    mov [edi], eax                      # PML4[0] -> PDPT
    lea eax, [edi + 0x2000 + 3]
    mov [edi + 0x1000], eax             # PDPT[0] -> PD
    add edi, 0x2000
    mov eax, 0x83                       # present, writable, 2 MiB
    mov ecx, 512
1:  mov [edi], eax
    add eax, 0x200000
    add edi, 8
    dec ecx
    jnz 1b
    # PAE, CR3, EFER.LME, then paging on.
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, offset page_tables
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    lgdt [gdt64_ptr]
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    jmp 0x08:from_startup_32

    .balign 8
gdt64:
    .quad 0
    .quad 0x00af9a000000ffff            # 0x08: 64-bit code
    .quad 0x00cf92000000ffff            # 0x10: data
gdt64_ptr:
    .word 3 * 8 - 1
    .long gdt64

    .org 0x200
    .code64
    .globl startup_64
startup_64:
    cli
    mov rsp, offset stack_top
    mov rbx, rsi
    PRINT "bzimage ok\n"
    jmp boot64_report

# Long mode reached from startup_32: the upper halves of the registers are
# undefined, so zero-extend ESI, take a known data segment, join the 64-bit
# path.
from_startup_32:
    mov esi, esi
    mov ax, 0x10
    mov ss, ax
    jmp startup_64

    .include "boot64_body.inc"

    .section .bss
    .balign 4096
page_tables:
    .skip 3 * 4096
    .skip 4096
stack_top:
