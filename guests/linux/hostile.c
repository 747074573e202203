/*
 * hostile: a hostile guest *user-space* program for the real-Linux tier
 * (crates/locald-vmm-cli/tests/linux_hostile.rs). Built on the host with
 * `gcc -static`, shipped into the default guest through a share, run as
 * root by the agent. It attacks the VMM from inside a running Linux guest:
 *
 *   mmio TARGETS  virtio-mmio registers of the listed devices through
 *                 /dev/mem (needs CONFIG_DEVMEM): random register writes of
 *                 every width, a valid handshake followed by rings that lie
 *                 (outside guest RAM, self-looping chains, huge lengths,
 *                 runaway avail index, self-referencing indirect tables,
 *                 next out of range), and a notification storm;
 *   serial        random writes to every 8250 register (ioperm), then a
 *                 text flood through /dev/ttyS0;
 *   vsock PORT    connects to ports nobody listens on, 1100 connections at
 *                 once, bad CIDs, then streams 1 MiB of a known pattern to
 *                 host port PORT (the test checks every byte).
 *
 * TARGETS: "rng" (every entropy device) and/or "blkN" (the N-th block
 * device, 0-based, in command-line order). Prints one "hostile: ..." line
 * per case and "hostile: done" at the end; exits 0 when every phase ran
 * (the VMM refusing the input is the expected outcome, not a failure).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define REG_MAGIC 0x000
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

#define MAX_DEVS 16

struct dev {
    uint64_t base;
    volatile uint8_t *regs;
    uint32_t id;
};

static struct dev devs[MAX_DEVS];
static int ndevs;
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)rng_state;
}

static void die(const char *what)
{
    printf("hostile: FATAL %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint32_t rd(struct dev *d, uint32_t off)
{
    return *(volatile uint32_t *)(d->regs + off);
}

static void wr(struct dev *d, uint32_t off, uint32_t v)
{
    *(volatile uint32_t *)(d->regs + off) = v;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Finds the virtio-mmio devices on the kernel command line and maps them. */
static void discover(void)
{
    char cmdline[8192] = {0};
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0)
        die("open /proc/cmdline");
    if (read(fd, cmdline, sizeof cmdline - 1) < 0)
        die("read /proc/cmdline");
    close(fd);
    int mem = open("/dev/mem", O_RDWR | O_SYNC);
    if (mem < 0)
        die("open /dev/mem (CONFIG_DEVMEM)");
    for (char *p = cmdline; (p = strstr(p, "virtio_mmio.device=")) != NULL; p++) {
        char *at = strchr(p, '@');
        if (!at || ndevs == MAX_DEVS)
            break;
        uint64_t base = strtoull(at + 1, NULL, 0);
        void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mem, (off_t)base);
        if (m == MAP_FAILED)
            die("mmap /dev/mem");
        struct dev *d = &devs[ndevs++];
        d->base = base;
        d->regs = m;
        d->id = rd(d, REG_DEVICE_ID);
        printf("hostile: device 0x%llx id %u magic 0x%08x\n", (unsigned long long)base, d->id,
               rd(d, REG_MAGIC));
    }
    close(mem);
}

/* Guest-physical address of a locked page of ours. */
static uint64_t phys_of(void *page)
{
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        die("open pagemap");
    uint64_t entry = 0;
    off_t off = (off_t)((uintptr_t)page / 4096) * 8;
    if (pread(fd, &entry, 8, off) != 8)
        die("read pagemap");
    close(fd);
    if (!(entry & (1ull << 63)) || (entry & ((1ull << 55) - 1)) == 0) {
        errno = EFAULT;
        die("page not present / no PFN (root needed)");
    }
    return (entry & ((1ull << 55) - 1)) * 4096;
}

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* Our own ring pages: descriptors, avail, used, data. */
static uint8_t *pages;
static uint64_t phys[4];

static void ring_pages(void)
{
    pages = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pages == MAP_FAILED)
        die("mmap ring pages");
    memset(pages, 0, 4 * 4096);
    if (mlock(pages, 4 * 4096) != 0)
        die("mlock");
    for (int i = 0; i < 4; i++)
        phys[i] = phys_of(pages + i * 4096);
}

static void reset(struct dev *d)
{
    wr(d, REG_STATUS, 0);
    for (int i = 0; i < 1000 && rd(d, REG_STATUS) != 0; i++)
        sleep_ms(1);
}

/* A full handshake for queue 0 with the given ring addresses; returns the
 * device status after DRIVER_OK. */
static uint32_t setup_queue(struct dev *d, uint16_t num, uint64_t desc, uint64_t avail,
                            uint64_t used)
{
    reset(d);
    wr(d, REG_STATUS, S_ACK);
    wr(d, REG_STATUS, S_ACK | S_DRIVER);
    wr(d, REG_DEVICE_FEATURES_SEL, 1);
    wr(d, REG_DRIVER_FEATURES_SEL, 0);
    wr(d, REG_DRIVER_FEATURES, 0);
    wr(d, REG_DRIVER_FEATURES_SEL, 1);
    wr(d, REG_DRIVER_FEATURES, 1); /* VERSION_1 only */
    wr(d, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    wr(d, REG_QUEUE_SEL, 0);
    wr(d, REG_QUEUE_NUM, num);
    wr(d, REG_QUEUE_DESC_LOW, (uint32_t)desc);
    wr(d, REG_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    wr(d, REG_QUEUE_DRIVER_LOW, (uint32_t)avail);
    wr(d, REG_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    wr(d, REG_QUEUE_DEVICE_LOW, (uint32_t)used);
    wr(d, REG_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    wr(d, REG_QUEUE_READY, 1);
    wr(d, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return rd(d, REG_STATUS);
}

/* One lying ring: `fill` writes descriptors/avail into our pages. */
static void ring_case(struct dev *d, const char *name, void (*fill)(struct desc *, uint16_t *))
{
    memset(pages, 0, 4 * 4096);
    struct desc *table = (struct desc *)pages;
    uint16_t *avail = (uint16_t *)(pages + 4096);
    uint16_t *used = (uint16_t *)(pages + 2 * 4096);
    fill(table, avail);
    uint32_t st = setup_queue(d, 16, phys[0], phys[1], phys[2]);
    __sync_synchronize();
    wr(d, REG_QUEUE_NOTIFY, 0);
    sleep_ms(50);
    uint32_t after = rd(d, REG_STATUS);
    uint32_t isr = rd(d, REG_INTERRUPT_STATUS);
    wr(d, REG_INTERRUPT_ACK, isr);
    printf("hostile: 0x%llx ring %s: status 0x%x -> 0x%x used.idx %u isr 0x%x\n",
           (unsigned long long)d->base, name, st, after, used[1], isr);
}

static void fill_loop(struct desc *t, uint16_t *a)
{
    t[0] = (struct desc){phys[3], 64, F_NEXT | F_WRITE, 1};
    t[1] = (struct desc){phys[3] + 64, 64, F_NEXT | F_WRITE, 0};
    a[1] = 1;
}

/* Device-readable only: a device that *wrote* through a huge length would
 * scribble over whatever guest pages follow ours (allowed DMA, but it would
 * corrupt this guest, not test the VMM). */
static void fill_huge_len(struct desc *t, uint16_t *a)
{
    t[0] = (struct desc){phys[3], 0xffffffffu, F_NEXT, 1};
    t[1] = (struct desc){phys[3] + 64, 0xfffffff0u, 0, 0};
    a[1] = 1;
}

static void fill_outside_ram(struct desc *t, uint16_t *a)
{
    t[0] = (struct desc){0xfff00000000ull, 4096, F_WRITE, 0};
    t[1] = (struct desc){0xfffffffffffff000ull, 0x2000, F_WRITE, 0};
    a[2] = 0;
    a[3] = 1;
    a[1] = 2;
}

static void fill_runaway_idx(struct desc *t, uint16_t *a)
{
    t[0] = (struct desc){phys[3], 64, F_WRITE, 0};
    a[1] = 0x8000;
}

static void fill_self_indirect(struct desc *t, uint16_t *a)
{
    t[0] = (struct desc){phys[0], 16 * 16, F_INDIRECT, 0};
    a[1] = 1;
}

static void fill_bad_next(struct desc *t, uint16_t *a)
{
    t[0] = (struct desc){phys[3], 64, F_NEXT | F_WRITE, 0xffff};
    a[2] = 0x7777; /* head out of range */
    a[1] = 2;
}

/* Random descriptors and avail ring. Whatever the device may write stays
 * inside our data page or outside guest RAM, so the guest only hurts the
 * VMM, not itself. */
static void fill_garbage(struct desc *t, uint16_t *a)
{
    for (int i = 0; i < 16; i++) {
        uint16_t flags = (uint16_t)rnd();
        uint64_t addr;
        uint32_t len;
        if (flags & F_WRITE || rnd() % 2) {
            addr = phys[3] + rnd() % 2048;
            len = rnd() % 2048;
        } else {
            addr = ((uint64_t)(rnd() | 0x100) << 32) | rnd();
            len = rnd();
        }
        if (flags & F_INDIRECT) {
            addr = phys[0] + (rnd() % 16) * 16;
            len = rnd() % 512;
            flags &= (uint16_t)~F_WRITE;
        }
        t[i] = (struct desc){addr, len, flags, (uint16_t)rnd()};
    }
    for (int i = 0; i < 18; i++)
        a[i] = (uint16_t)rnd();
}

static void attack_mmio(struct dev *d)
{
    printf("hostile: attacking 0x%llx (id %u)\n", (unsigned long long)d->base, d->id);
    /* Ring addresses outside guest RAM. */
    uint32_t st = setup_queue(d, 16, 0xfffffffff000ull, 0xffffffffe000ull, 0xffffffffd000ull);
    printf("hostile: 0x%llx rings outside RAM: status 0x%x needs_reset=%d\n",
           (unsigned long long)d->base, st, !!(st & S_NEEDS_RESET));
    /* Oversized and zero queue sizes. */
    st = setup_queue(d, 0x8000, phys[0], phys[1], phys[2]);
    printf("hostile: 0x%llx queue size 0x8000: status 0x%x\n", (unsigned long long)d->base, st);
    st = setup_queue(d, 3, phys[0], phys[1], phys[2]);
    printf("hostile: 0x%llx queue size 3: status 0x%x\n", (unsigned long long)d->base, st);
    ring_case(d, "self-loop", fill_loop);
    ring_case(d, "huge-len", fill_huge_len);
    ring_case(d, "outside-ram", fill_outside_ram);
    ring_case(d, "runaway-idx", fill_runaway_idx);
    ring_case(d, "self-indirect", fill_self_indirect);
    ring_case(d, "bad-next", fill_bad_next);
    for (int i = 0; i < 20; i++)
        ring_case(d, "garbage", fill_garbage);
    /* Random register writes of every width, and reads. */
    unsigned writes = 0;
    for (int i = 0; i < 20000; i++) {
        uint32_t off = rnd() % 0x200;
        /* Not the status register: a random walk through the handshake
         * could aim the queues at any guest page, and the device would then
         * (rightly) DMA into this guest's own kernel. */
        if (off >= REG_STATUS && off < REG_STATUS + 4)
            continue;
        switch (rnd() % 3) {
        case 0:
            *(volatile uint8_t *)(d->regs + off) = (uint8_t)rnd();
            break;
        case 1:
            *(volatile uint16_t *)(d->regs + (off & ~1u)) = (uint16_t)rnd();
            break;
        default:
            *(volatile uint32_t *)(d->regs + (off & ~3u)) = rnd();
        }
        writes++;
        if (i % 1000 == 0)
            for (uint32_t o = 0; o < 0x200; o += 4)
                (void)rd(d, o);
    }
    printf("hostile: 0x%llx random register writes %u\n", (unsigned long long)d->base, writes);
    /* Notification storm on a device that was set up with garbage rings. */
    ring_case(d, "garbage", fill_garbage);
    for (int i = 0; i < 100000; i++)
        wr(d, REG_QUEUE_NOTIFY, rnd() % 4);
    printf("hostile: 0x%llx notify storm 100000\n", (unsigned long long)d->base);
    reset(d);
    printf("hostile: 0x%llx reset, status 0x%x\n", (unsigned long long)d->base, rd(d, REG_STATUS));
}

static void attack_serial(void)
{
    if (ioperm(0x3f8, 8, 1) != 0)
        die("ioperm 0x3f8");
    for (int i = 0; i < 20000; i++)
        outb((uint8_t)rnd(), 0x3f8 + rnd() % 8);
    unsigned reads = 0;
    for (int i = 0; i < 2000; i++)
        reads += inb(0x3f8 + rnd() % 8) != 0xff;
    /* Back to a sane 8N1 line so the kernel's console keeps working. */
    outb(0x80, 0x3fb);
    outb(0x01, 0x3f8);
    outb(0x00, 0x3f9);
    outb(0x03, 0x3fb);
    outb(0x05, 0x3f9);
    outb(0x0b, 0x3fc);
    printf("hostile: serial random register writes 20000 reads 2000\n");
    int fd = open("/dev/ttyS0", O_WRONLY | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        printf("hostile: serial flood skipped: %s\n", strerror(errno));
        return;
    }
    char line[128];
    size_t total = 0;
    for (int i = 0; i < 256; i++) {
        int n = snprintf(line, sizeof line, "hostile serial flood line %d %08x\n", i, rnd());
        ssize_t w = write(fd, line, (size_t)n);
        if (w > 0)
            total += (size_t)w;
        else if (errno == EAGAIN)
            sleep_ms(5);
    }
    close(fd);
    printf("hostile: serial flood %zu bytes\n", total);
}

static int vsock_connect(uint32_t cid, uint32_t port, int nonblock, long timeout_s)
{
    int s = socket(AF_VSOCK, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (s < 0)
        return -errno;
    /* The kernel's default connect timeout is 2 s of guest time; on a
     * loaded host running an emulated kernel the VMM's RST can take longer
     * than that to be seen, which would count as "no answer". Give the
     * device a generous timeout where an answer is due: a reply that
     * never comes still shows up, as ETIMEDOUT. */
    if (timeout_s > 0) {
        struct timeval tmo = {.tv_sec = timeout_s};
        setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tmo, sizeof tmo);
    }
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0 && !(nonblock && errno == EINPROGRESS)) {
        int e = errno;
        close(s);
        return -e;
    }
    return s;
}

static void attack_vsock(uint32_t port)
{
    unsigned refused = 0, other = 0;
    for (int i = 0; i < 300; i++) {
        int s = vsock_connect(2, 20000 + rnd() % 10000, 0, 60);
        if (s >= 0) {
            other++;
            close(s);
        } else if (s == -ECONNRESET || s == -ECONNREFUSED) {
            refused++;
        } else {
            other++;
            printf("hostile: vsock connect to a closed port: errno %d\n", -s);
        }
    }
    printf("hostile: vsock 300 connects to closed ports: %u refused, %u other\n", refused, other);
    static int socks[1100];
    unsigned opened = 0;
    for (int i = 0; i < 1100; i++) {
        socks[i] = vsock_connect(2, 5001, 1, 0);
        opened += socks[i] >= 0;
    }
    sleep_ms(500);
    for (int i = 0; i < 1100; i++)
        if (socks[i] >= 0)
            close(socks[i]);
    printf("hostile: vsock 1100 simultaneous connects: %u sockets\n", opened);
    int bad[3] = {vsock_connect(1, 5000, 0, 0), vsock_connect(3, 5000, 0, 0),
                  vsock_connect(0xfffffff0u, 5000, 0, 0)};
    for (int i = 0; i < 3; i++)
        if (bad[i] >= 0)
            close(bad[i]);
    printf("hostile: vsock bad CIDs: %d %d %d\n", bad[0] < 0 ? bad[0] : 0,
           bad[1] < 0 ? bad[1] : 0, bad[2] < 0 ? bad[2] : 0);
    /* 1 MiB of the pattern byte i = (i * 7 + 3) & 0xff to the host. */
    int s = -1;
    for (int tries = 0; tries < 50 && s < 0; tries++) {
        s = vsock_connect(2, port, 0, 60);
        if (s < 0)
            sleep_ms(100);
    }
    if (s < 0) {
        errno = -s;
        die("vsock connect to the test's listener");
    }
    static uint8_t buf[65536];
    size_t sent = 0;
    while (sent < (1u << 20)) {
        for (size_t i = 0; i < sizeof buf; i++)
            buf[i] = (uint8_t)(((sent + i) * 7 + 3) & 0xff);
        ssize_t w = write(s, buf, sizeof buf);
        if (w <= 0)
            die("vsock write");
        sent += (size_t)w;
        if ((size_t)w < sizeof buf) {
            /* Keep the pattern aligned to the stream offset. */
            continue;
        }
    }
    shutdown(s, SHUT_WR);
    char c;
    (void)read(s, &c, 1);
    close(s);
    printf("hostile: vsock streamed %zu bytes to port %u\n", sent, port);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int i = 1;
    while (i < argc) {
        if (strcmp(argv[i], "mmio") == 0) {
            discover();
            ring_pages();
            int nblk = 0;
            struct dev *targets[MAX_DEVS];
            int nt = 0;
            for (int k = 0; k < ndevs; k++) {
                int blk_index = devs[k].id == 2 ? nblk++ : -1;
                for (int j = i + 1; j < argc && strcmp(argv[j], "serial") != 0 &&
                                    strcmp(argv[j], "vsock") != 0;
                     j++) {
                    if ((strcmp(argv[j], "rng") == 0 && devs[k].id == 4) ||
                        (strncmp(argv[j], "blk", 3) == 0 && blk_index == atoi(argv[j] + 3)))
                        targets[nt++] = &devs[k];
                }
            }
            if (nt == 0) {
                printf("hostile: FATAL no target device found\n");
                return 2;
            }
            for (int k = 0; k < nt; k++)
                attack_mmio(targets[k]);
            i++;
            while (i < argc && strcmp(argv[i], "serial") != 0 && strcmp(argv[i], "vsock") != 0)
                i++;
        } else if (strcmp(argv[i], "serial") == 0) {
            attack_serial();
            i++;
        } else if (strcmp(argv[i], "vsock") == 0 && i + 1 < argc) {
            attack_vsock((uint32_t)strtoul(argv[i + 1], NULL, 0));
            i += 2;
        } else {
            printf("hostile: FATAL bad argument %s\n", argv[i]);
            return 2;
        }
    }
    printf("hostile: done\n");
    return 0;
}
