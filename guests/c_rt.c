/* c_rt.c: runtime of the C test guests: COM1 output, a printf subset,
 * exit. */
#include "c_rt.h"

#define COM1_DATA 0x3f8
#define COM1_LSR 0x3fd
#define EXIT_PORT 0xf4

void putc_com1(char c)
{
    /* Bounded: a missing UART must not hang the guest. */
    for (uint32_t i = 0; i < 1000000 && !(inb(COM1_LSR) & 0x20); i++)
        cpu_relax();
    outb(COM1_DATA, (uint8_t)c);
}

void puts_com1(const char *s)
{
    while (*s)
        putc_com1(*s++);
}

void guest_exit(int status)
{
    outb(EXIT_PORT, (uint8_t)status);
    for (;;)
        __asm__ volatile("cli; hlt");
}

int kmemcmp(const void *a, const void *b, size_t n)
{
    const uint8_t *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t kstrlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

/* (hi:lo) / 10 without libgcc's __udivdi3: two 32-bit divisions. */
static uint32_t divmod10(uint64_t *v)
{
    uint32_t hi = (uint32_t)(*v >> 32), lo = (uint32_t)*v;
    uint32_t qhi = hi / 10, r = hi % 10, qlo;
    __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "rm"(10u));
    *v = ((uint64_t)qhi << 32) | qlo;
    return r;
}

static void put_padded(const char *digits, int n, int width, char pad)
{
    for (int i = n; i < width; i++)
        putc_com1(pad);
    while (n > 0)
        putc_com1(digits[--n]);
}

void kvprintf(const char *fmt, va_list ap)
{
    static const char hex[] = "0123456789abcdef";
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            putc_com1(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, longlong = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            longlong++;
            fmt++;
        }
        char buf[24];
        int n = 0;
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            for (int i = (int)kstrlen(s); i < width; i++)
                putc_com1(' ');
            puts_com1(s);
            break;
        }
        case 'c':
            putc_com1((char)va_arg(ap, int));
            break;
        case 'd': {
            int64_t v = longlong >= 2 ? va_arg(ap, int64_t) : va_arg(ap, int32_t);
            uint64_t u = v < 0 ? (uint64_t)-v : (uint64_t)v;
            do
                buf[n++] = (char)('0' + divmod10(&u));
            while (u);
            if (v < 0)
                buf[n++] = '-';
            put_padded(buf, n, width, pad);
            break;
        }
        case 'u': {
            uint64_t u = longlong >= 2 ? va_arg(ap, uint64_t) : va_arg(ap, uint32_t);
            do
                buf[n++] = (char)('0' + divmod10(&u));
            while (u);
            put_padded(buf, n, width, pad);
            break;
        }
        case 'p':
        case 'x': {
            uint64_t u = longlong >= 2 ? va_arg(ap, uint64_t) : va_arg(ap, uint32_t);
            if (*fmt == 'p')
                puts_com1("0x");
            do {
                buf[n++] = hex[u & 0xf];
                u >>= 4;
            } while (u);
            put_padded(buf, n, width, pad);
            break;
        }
        case '%':
            putc_com1('%');
            break;
        case 0:
            return;
        default:
            putc_com1('%');
            putc_com1(*fmt);
        }
    }
}

void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(fmt, ap);
    va_end(ap);
}
