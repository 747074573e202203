# smp: MP-table discovery and AP start-up (run with 1-4 vCPUs).
#
# 1. Finds the MP floating pointer "_MP_" on a 16-byte boundary in
#    0x9fc00-0xa0000, else 0xf0000-0x100000, follows it to the "PCMP"
#    configuration table, checks both checksums and counts processor
#    entries (type 0, 20 bytes; types 1-4 are 8 bytes), walking the base
#    table length like Linux (not the entry count field). Prints
#       mp checksums: ok|bad
#       cpus in mp table: N
#    or "mp table: not found" (and then starts no AP).
# 2. Copies a real-mode trampoline to 0x8000 (SIPI vector 0x08; the VMM's
#    boot structures at 0x6000-0x7fff and 0x9000-0xbfff are left alone),
#    then sends INIT, SIPI, SIPI through the local APIC at 0xfee00000 to
#    every enabled processor entry whose APIC ID is not the BSP's. Each AP
#    atomically increments a counter in the trampoline page and halts.
# 3. Waits for the counter to reach the number of APs, for at most about
#    WAIT_SECONDS by the TSC (a loaded host can take long to schedule an
#    AP's vCPU thread, so the bound is time, not a spin count), prints
#    "aps started: M" and exits with status M + 1 (running CPUs).
#    The TSC rate comes from CPUID 0x16 (base MHz), else the hypervisor
#    timing leaf 0x40000010 (TSC kHz), else TSC_FALLBACK cycles are used
#    (about 5-20 s at 1-4 GHz).

    .intel_syntax noprefix
    .code32
    .include "pvh_note.inc"
    .include "lib32.inc"

    .set LAPIC, 0xfee00000
    .set LAPIC_ID, LAPIC + 0x20
    .set LAPIC_SVR, LAPIC + 0xf0
    .set LAPIC_ICR_LO, LAPIC + 0x300
    .set LAPIC_ICR_HI, LAPIC + 0x310
    .set TRAMPOLINE, 0x8000
    .set SIPI_VECTOR, TRAMPOLINE >> 12
    .set MAX_APS, 64
    .set WAIT_SECONDS, 10
    .set TSC_FALLBACK_HI, 4             # 4 << 32 cycles, about 17.2e9

    .section .text.entry, "ax"
    .globl _start
_start:
    cli
    mov esp, offset stack_top

    # Find the floating pointer structure.
    mov esi, 0x9fc00
    mov edi, 0xa0000
    call scan_mp
    test esi, esi
    jnz found_mpf
    mov esi, 0xf0000
    mov edi, 0x100000
    call scan_mp
    test esi, esi
    jnz found_mpf
    PRINT "mp table: not found\n"
    xor ebp, ebp                        # no AP to start
    jmp start_aps

found_mpf:
    # Checksum of the floating pointer (length in 16-byte units at +8).
    movzx ecx, byte ptr [esi + 8]
    shl ecx, 4
    call checksum
    mov bl, al
    mov esi, [esi + 4]                  # PCMP physical address
    cmp dword ptr [esi], 0x504d4350     # "PCMP"
    jne bad_pcmp
    movzx ecx, word ptr [esi + 4]       # base table length
    call checksum
    or bl, al
    jz 1f
    PRINT "mp checksums: bad\n"
    jmp 2f
1:  PRINT "mp checksums: ok\n"

2:  # Walk the entries: count processors, collect AP APIC IDs.
    mov eax, [LAPIC_ID]
    shr eax, 24
    mov [bsp_id], eax
    movzx ecx, word ptr [esi + 4]       # walk by base table length, as
    add ecx, esi                        # Linux does (QBOOT's count is 0)
    lea edi, [esi + 0x2c]               # first entry
    xor edx, edx                        # processor entries
    xor ebp, ebp                        # APs to start
3:  cmp edi, ecx
    jae 6f
    cmp byte ptr [edi], 0
    jne 5f
    inc edx
    test byte ptr [edi + 3], 1          # cpu flags: enabled
    jz 4f
    movzx eax, byte ptr [edi + 1]       # local APIC ID
    cmp eax, [bsp_id]
    je 4f
    cmp ebp, MAX_APS
    jae 4f
    mov [ap_ids + ebp * 4], eax
    inc ebp
4:  add edi, 20
    jmp 3b
5:  cmp byte ptr [edi], 4               # bus, I/O APIC, I/O and local
    ja 6f                               # interrupt entries: 8 bytes
    add edi, 8
    jmp 3b
6:  PRINT "cpus in mp table: "
    mov eax, edx
    call putdec
    PRINT "\n"

start_aps:
    # Copy the trampoline below 1 MiB and zero its counter.
    mov esi, offset tramp_start
    mov edi, TRAMPOLINE
    mov ecx, offset tramp_end - tramp_start
    cld
    rep movsb
    mov dword ptr [TRAMPOLINE + tramp_counter - tramp_start], 0

    test ebp, ebp
    jz wait_done
    mov dword ptr [LAPIC_SVR], 0x1ff    # software-enable the local APIC

    xor ebx, ebx
1:  cmp ebx, ebp
    jae wait_aps
    mov eax, [ap_ids + ebx * 4]
    shl eax, 24
    mov [LAPIC_ICR_HI], eax
    mov eax, 0x4500                     # INIT, level assert
    call send_ipi
    mov ecx, 10000
    call delay
    mov eax, 0x4600 | SIPI_VECTOR       # STARTUP
    call send_ipi
    mov ecx, 1000
    call delay
    mov eax, 0x4600 | SIPI_VECTOR       # STARTUP again, as the MP spec says
    call send_ipi
    inc ebx
    jmp 1b

wait_aps:
    call tsc_bound                      # EDX:EAX = cycles to wait
    mov esi, eax
    mov edi, edx
    rdtsc
    add esi, eax                        # EDI:ESI = deadline
    adc edi, edx
1:  cmp [TRAMPOLINE + tramp_counter - tramp_start], ebp
    jae wait_done
    pause
    rdtsc
    sub eax, esi
    sbb edx, edi
    jc 1b                               # now < deadline
wait_done:
    PRINT "aps started: "
    mov eax, [TRAMPOLINE + tramp_counter - tramp_start]
    call putdec
    PRINT "\n"
    inc eax
    jmp exit

bad_pcmp:
    PRINT "mp table: bad PCMP signature\n"
    xor ebp, ebp
    jmp start_aps

# scan_mp: find "_MP_" on a 16-byte boundary in [ESI, EDI).
# Returns ESI = its address, or 0.
scan_mp:
1:  cmp esi, edi
    jae 2f
    cmp dword ptr [esi], 0x5f504d5f     # "_MP_"
    je 3f
    add esi, 16
    jmp 1b
2:  xor esi, esi
3:  ret

# checksum: AL = byte sum of ECX bytes at ESI (0 when valid).
checksum:
    push ecx
    push esi
    xor eax, eax
1:  test ecx, ecx
    jz 2f
    add al, [esi]
    inc esi
    dec ecx
    jmp 1b
2:  pop esi
    pop ecx
    ret

# send_ipi: write EAX to ICR low, wait (bounded) for delivery status idle.
send_ipi:
    push ecx
    mov [LAPIC_ICR_LO], eax
    mov ecx, 100000
1:  test dword ptr [LAPIC_ICR_LO], 0x1000
    jz 2f
    pause
    dec ecx
    jnz 1b
2:  pop ecx
    ret

# tsc_bound: EDX:EAX = TSC cycles in WAIT_SECONDS (see the header).
# Clobbers EBX, ECX.
tsc_bound:
    xor eax, eax
    cpuid                               # EAX = highest basic leaf
    cmp eax, 0x16
    jb 1f
    mov eax, 0x16
    xor ecx, ecx
    cpuid                               # EAX[15:0] = TSC base MHz
    and eax, 0xffff
    jz 1f
    mov ecx, WAIT_SECONDS * 1000000
    mul ecx
    ret
1:  mov eax, 0x40000000
    cpuid                               # EAX = highest hypervisor leaf
    cmp eax, 0x40000010
    jb 2f
    cmp eax, 0x4fffffff                 # not a hypervisor range at all
    ja 2f
    mov eax, 0x40000010
    cpuid                               # EAX = TSC kHz
    test eax, eax
    jz 2f
    mov ecx, WAIT_SECONDS * 1000
    mul ecx
    ret
2:  xor eax, eax
    mov edx, TSC_FALLBACK_HI
    ret

# delay: spin ECX iterations.
delay:
1:  pause
    dec ecx
    jnz 1b
    ret

# The AP trampoline, copied to TRAMPOLINE and entered in real mode at
# CS = TRAMPOLINE >> 4, IP = 0.
    .code16
tramp_start:
    cli
    mov ax, cs
    mov ds, ax
    lock inc dword ptr [tramp_counter - tramp_start]
1:  cli
    hlt
    jmp 1b
    .balign 4
tramp_counter:
    .long 0
tramp_end:
    .code32

    .section .bss
    .balign 16
bsp_id:
    .skip 4
ap_ids:
    .skip MAX_APS * 4
    .skip 4096
stack_top:
