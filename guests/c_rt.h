/* c_rt.h: runtime of the C test guests (see c_entry.S, c_rt.c).
 *
 * Freestanding: only compiler-provided headers. Output goes to COM1
 * (0x3f8, polling LSR bit 5); guest_exit() writes the status byte to port
 * 0xf4. Paging is off, so pointers are physical addresses. */
#ifndef C_RT_H
#define C_RT_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* struct hvm_start_info (Xen PVH), the fields the guests read. */
struct hvm_start_info {
    uint32_t magic; /* XEN_HVM_START_MAGIC_VALUE */
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr; /* version >= 1 */
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct hvm_memmap_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type; /* 1 = RAM */
    uint32_t reserved;
};

#define XEN_HVM_START_MAGIC 0x336ec578u

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline uint64_t rdtsc(void)
{
    uint64_t v;
    __asm__ volatile("rdtsc" : "=A"(v));
    return v;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

/* Compiler barrier; with x86 TSO also enough between stores the device
 * reads in order. */
static inline void barrier(void)
{
    __asm__ volatile("" ::: "memory");
}

/* Full fence (loads and stores), as Linux's virt_mb(). */
static inline void mb(void)
{
    __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory", "cc");
}

/* 32-bit MMIO accesses (one aligned movl each). */
static inline uint32_t mmio_read32(uint32_t addr)
{
    return *(volatile uint32_t *)addr;
}

static inline void mmio_write32(uint32_t addr, uint32_t v)
{
    *(volatile uint32_t *)addr = v;
}

void putc_com1(char c);
void puts_com1(const char *s);
/* printf subset: %s %c %d %u %x %p, flags '0', width, length 'll' (u64). */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kvprintf(const char *fmt, va_list ap);
/* Writes `status` to the exit port; never returns. */
void guest_exit(int status) __attribute__((noreturn));

/* In c_entry.S (gcc may also emit calls to these). */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);

int kmemcmp(const void *a, const void *b, size_t n);
size_t kstrlen(const char *s);

#endif
