/* virtio.c: a minimal, polled virtio-mmio driver guest (virtio 1.2,
 * section 4.2, modern devices only: Version 2), written from the spec.
 *
 * Finds its devices on the kernel command line (`virtio_mmio.device=
 * <size>@<base>:<irq>`, one per device), then:
 *  1. lists them (base, size, irq, device id, vendor id, version);
 *  2. for each block device (id 2): negotiates VERSION_1 (+ FLUSH and RO
 *     if offered), sets up queue 0, prints the capacity, reads sector 0
 *     (first 16 bytes in hex), writes a known pattern to sector 1, FLUSHes,
 *     reads it back and compares, reads the GET_ID string; a write that
 *     fails with IOERR marks the disk read-only, and sector 1 must then be
 *     unchanged;
 *  3. on the first writable disk, hostile cases: a re-initialisation with
 *     a QueueNotify before DRIVER_OK and QueueNum = 3 before the real size,
 *     a read past the end, a data buffer outside guest RAM, an unknown
 *     request type, a descriptor chain that loops on itself with no
 *     writable status; then a reset, re-initialisation and a good read;
 *  4. for the entropy device (id 4): two 64-byte requests, each filled
 *     (used length 64, not all zero), and different from each other.
 *
 * Every step prints one `virtio: ...` line. Every wait is bounded: a
 * timeout prints `virtio: TIMEOUT <what>` and exits 3. Otherwise the exit
 * status is 0 if every check passed, else the code of the first failed
 * step (see enum fail_code). */
#include "c_rt.h"

/* Registers (4.2.2), all accessed as aligned 32-bit words. */
enum {
    REG_MAGIC = 0x000,
    REG_VERSION = 0x004,
    REG_DEVICE_ID = 0x008,
    REG_VENDOR_ID = 0x00c,
    REG_DEVICE_FEATURES = 0x010,
    REG_DEVICE_FEATURES_SEL = 0x014,
    REG_DRIVER_FEATURES = 0x020,
    REG_DRIVER_FEATURES_SEL = 0x024,
    REG_QUEUE_SEL = 0x030,
    REG_QUEUE_NUM_MAX = 0x034,
    REG_QUEUE_NUM = 0x038,
    REG_QUEUE_READY = 0x044,
    REG_QUEUE_NOTIFY = 0x050,
    REG_INTERRUPT_STATUS = 0x060,
    REG_INTERRUPT_ACK = 0x064,
    REG_STATUS = 0x070,
    REG_QUEUE_DESC_LOW = 0x080,
    REG_QUEUE_DESC_HIGH = 0x084,
    REG_QUEUE_DRIVER_LOW = 0x090,
    REG_QUEUE_DRIVER_HIGH = 0x094,
    REG_QUEUE_DEVICE_LOW = 0x0a0,
    REG_QUEUE_DEVICE_HIGH = 0x0a4,
    REG_CONFIG_GENERATION = 0x0fc,
    REG_CONFIG = 0x100,
};

#define VIRTIO_MAGIC 0x74726976u /* "virt" */

/* Device status (2.1). */
enum {
    ST_ACKNOWLEDGE = 1,
    ST_DRIVER = 2,
    ST_DRIVER_OK = 4,
    ST_FEATURES_OK = 8,
    ST_NEEDS_RESET = 64,
    ST_FAILED = 128,
};

/* Feature bits. */
#define F_VERSION_1 (1ull << 32)
#define BLK_F_RO (1ull << 5)
#define BLK_F_FLUSH (1ull << 9)

/* Device ids (5). */
enum { ID_BLOCK = 2, ID_RNG = 4 };

/* Block requests (5.2.6). */
enum { BLK_T_IN = 0, BLK_T_OUT = 1, BLK_T_FLUSH = 4, BLK_T_GET_ID = 8 };
enum { BLK_S_OK = 0, BLK_S_IOERR = 1, BLK_S_UNSUPP = 2 };
#define SECTOR 512u
#define BLK_ID_BYTES 20u

/* Exit status of the first failed step. */
enum fail_code {
    FAIL_START_INFO = 1,
    FAIL_TIMEOUT = 3,
    FAIL_PROBE = 10,
    FAIL_BLK_INIT = 20,
    FAIL_BLK_READ0 = 21,
    FAIL_BLK_WRITE = 22,
    FAIL_BLK_FLUSH = 23,
    FAIL_BLK_READBACK = 24,
    FAIL_BLK_GET_ID = 25,
    FAIL_HOSTILE_SETUP = 30,
    FAIL_HOSTILE_PAST_END = 31,
    FAIL_HOSTILE_BAD_ADDR = 32,
    FAIL_HOSTILE_BAD_TYPE = 33,
    FAIL_HOSTILE_LOOP = 34,
    FAIL_HOSTILE_RECOVERY = 35,
    FAIL_RNG_INIT = 40,
    FAIL_RNG_DATA = 41,
    FAIL_RNG_REPEAT = 42,
};

/* Split virtqueue (2.7): descriptor table (16-byte aligned), driver area
 * (avail, 2-byte aligned), device area (used, 4-byte aligned). */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define QSZ 16 /* ring entries we allocate; QueueNum is at most this */

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[QSZ];
    uint16_t used_event;
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[QSZ];
    uint16_t avail_event;
};

struct queue_mem {
    struct virtq_desc desc[QSZ];
    struct virtq_avail avail __attribute__((aligned(64)));
    struct virtq_used used __attribute__((aligned(64)));
} __attribute__((aligned(4096)));

#define MAX_DEVS 8

struct dev {
    uint32_t base, size, irq;
    uint32_t id, vendor, version;
    bool ok; /* magic and version right */
    char name[8];
    uint64_t features; /* negotiated */
    struct queue_mem *q;
    uint16_t qsize;
    uint16_t avail_idx; /* next avail index we publish */
    uint16_t last_used; /* used index we have consumed up to */
};

static struct dev devs[MAX_DEVS];
static uint32_t ndevs;
static struct queue_mem queues[MAX_DEVS];
static int first_failure;
static int step; /* fail_code of the step running (for shared helpers) */
static uint32_t ram_end; /* end of the highest RAM range below 4 GiB */

/* Buffers of the block requests (one request in flight at a time). */
struct blk_req_hdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};
static struct blk_req_hdr req_hdr __attribute__((aligned(16)));
static volatile uint8_t req_status __attribute__((aligned(16)));
static uint8_t buf_a[SECTOR] __attribute__((aligned(512)));
static uint8_t buf_b[SECTOR] __attribute__((aligned(512)));
static uint8_t pattern[SECTOR] __attribute__((aligned(512)));
static uint8_t rng_a[64] __attribute__((aligned(64)));
static uint8_t rng_b[64] __attribute__((aligned(64)));

/* Polling bounds: about 2^34 TSC cycles (3-17 s at 1-5 GHz), and an
 * iteration cap in case the TSC does not advance. */
#define WAIT_TSC (1ull << 34)
#define WAIT_ITERS (1u << 28)

static void fail(int code, const char *what)
{
    kprintf("virtio: FAIL %s (code %d)\n", what, code);
    if (!first_failure)
        first_failure = code;
}

static void timeout(const char *what)
{
    kprintf("virtio: TIMEOUT %s\n", what);
    guest_exit(FAIL_TIMEOUT);
}

static uint32_t rd(const struct dev *d, uint32_t reg)
{
    return mmio_read32(d->base + reg);
}

static void wr(const struct dev *d, uint32_t reg, uint32_t v)
{
    mmio_write32(d->base + reg, v);
}

/* ---- command line ---------------------------------------------------- */

static bool is_hex(char c, uint32_t *v)
{
    if (c >= '0' && c <= '9')
        *v = (uint32_t)(c - '0');
    else if (c >= 'a' && c <= 'f')
        *v = (uint32_t)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F')
        *v = (uint32_t)(c - 'A' + 10);
    else
        return false;
    return true;
}

/* Parses a number at *p like the kernel's memparse/simple_strtoul: 0x
 * prefix means hex, else decimal (or hex when `hex`); optional K/M/G
 * suffix when `suffix`. Returns false if there are no digits. */
static bool parse_num(const char **p, bool hex, bool suffix, uint64_t *out)
{
    const char *s = *p;
    uint64_t v = 0;
    uint32_t digit;
    int base = hex ? 16 : 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    const char *start = s;
    while (is_hex(*s, &digit) && digit < (uint32_t)base) {
        v = v * (uint32_t)base + digit;
        s++;
    }
    if (s == start)
        return false;
    if (suffix) {
        if (*s == 'K' || *s == 'k')
            v <<= 10, s++;
        else if (*s == 'M' || *s == 'm')
            v <<= 20, s++;
        else if (*s == 'G' || *s == 'g')
            v <<= 30, s++;
    }
    *p = s;
    *out = v;
    return true;
}

static void parse_cmdline(const char *cmdline)
{
    static const char key[] = "virtio_mmio.device=";
    const size_t klen = sizeof key - 1;
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *word = p;
        while (*p && *p != ' ')
            p++;
        if ((size_t)(p - word) <= klen || kmemcmp(word, key, klen) != 0)
            continue;
        const char *s = word + klen;
        uint64_t size, base, irq;
        if (!parse_num(&s, false, true, &size) || *s++ != '@' ||
            !parse_num(&s, true, false, &base) || *s++ != ':' ||
            !parse_num(&s, false, false, &irq)) {
            fail(FAIL_PROBE, "unparsable virtio_mmio.device entry");
            continue;
        }
        if (base < 0xc0000000ull || base + size > 0x100000000ull || size < 0x200) {
            kprintf("virtio: device at 0x%llx size 0x%llx is outside the MMIO window\n", base,
                    size);
            fail(FAIL_PROBE, "device address");
            continue;
        }
        if (ndevs == MAX_DEVS) {
            fail(FAIL_PROBE, "too many devices");
            break;
        }
        struct dev *d = &devs[ndevs];
        d->base = (uint32_t)base;
        d->size = (uint32_t)size;
        d->irq = (uint32_t)irq;
        d->q = &queues[ndevs];
        ndevs++;
    }
}

/* ---- virtqueue ------------------------------------------------------- */

/* Acknowledges whatever interrupt the device raised (we poll). */
static void ack_interrupts(const struct dev *d)
{
    uint32_t isr = rd(d, REG_INTERRUPT_STATUS);
    if (isr)
        wr(d, REG_INTERRUPT_ACK, isr);
}

/* Publishes the chain starting at `head` and notifies queue 0. */
static void submit(struct dev *d, uint16_t head)
{
    struct queue_mem *q = d->q;
    q->avail.ring[d->avail_idx % d->qsize] = head;
    mb(); /* ring entry before idx */
    d->avail_idx++;
    *(volatile uint16_t *)&q->avail.idx = d->avail_idx;
    mb(); /* idx before the notify */
    wr(d, REG_QUEUE_NOTIFY, 0);
}

enum wait_result { WAIT_DONE, WAIT_NEEDS_RESET };

/* Waits (bounded) until the device returns the chain `head` in the used
 * ring, or sets NEEDS_RESET. */
static enum wait_result wait_used(struct dev *d, uint16_t head, uint32_t *len, const char *what)
{
    struct queue_mem *q = d->q;
    uint64_t start = rdtsc();
    for (uint32_t i = 0;; i++) {
        uint16_t used = *(volatile uint16_t *)&q->used.idx;
        if (used != d->last_used) {
            mb(); /* idx before the element */
            volatile struct virtq_used_elem *e = &q->used.ring[d->last_used % d->qsize];
            uint32_t id = e->id;
            *len = e->len;
            if ((uint16_t)(used - d->last_used) != 1) {
                kprintf("virtio: %s used idx jumped from %u to %u\n", d->name, d->last_used,
                        used);
                fail(step, "used idx");
            }
            if (id != head) {
                kprintf("virtio: %s used id %u, expected %u\n", d->name, id, head);
                fail(step, "used id");
            }
            d->last_used = used;
            ack_interrupts(d);
            return WAIT_DONE;
        }
        if ((i & 255) == 255) {
            if (rd(d, REG_STATUS) & ST_NEEDS_RESET) {
                ack_interrupts(d);
                return WAIT_NEEDS_RESET;
            }
            if (rdtsc() - start > WAIT_TSC || i > WAIT_ITERS)
                timeout(what);
        }
        cpu_relax();
    }
}

/* ---- device initialisation (3.1.1, 4.2.3) ------------------------------ */

/* Resets the device: Status = 0, then waits (bounded) until it reads 0. */
static void reset(struct dev *d)
{
    wr(d, REG_STATUS, 0);
    for (uint32_t i = 0; rd(d, REG_STATUS) != 0; i++) {
        if (i > 1000000)
            timeout("reset");
        cpu_relax();
    }
}

/* Hostile setup steps, done while initialising. */
struct setup_quirks {
    bool notify_early; /* QueueNotify before the queue is ready and before DRIVER_OK */
    bool bad_queue_num; /* QueueNum = 3 before the real size */
};

/* Resets and initialises `d` with queue 0: negotiates VERSION_1 plus the
 * bits of `wanted` the device offers. Returns false (and prints why) on
 * failure, after setting FAILED. */
static bool dev_init(struct dev *d, uint64_t wanted, const struct setup_quirks *quirks)
{
    reset(d);
    uint32_t status = ST_ACKNOWLEDGE;
    wr(d, REG_STATUS, status);
    status |= ST_DRIVER;
    wr(d, REG_STATUS, status);

    wr(d, REG_DEVICE_FEATURES_SEL, 0);
    uint32_t lo = rd(d, REG_DEVICE_FEATURES);
    wr(d, REG_DEVICE_FEATURES_SEL, 1);
    uint32_t hi = rd(d, REG_DEVICE_FEATURES);
    uint64_t offered = ((uint64_t)hi << 32) | lo;
    if (!(offered & F_VERSION_1)) {
        kprintf("virtio: %s offers 0x%016llx without VERSION_1\n", d->name, offered);
        goto failed;
    }
    d->features = F_VERSION_1 | (offered & wanted);
    wr(d, REG_DRIVER_FEATURES_SEL, 0);
    wr(d, REG_DRIVER_FEATURES, (uint32_t)d->features);
    wr(d, REG_DRIVER_FEATURES_SEL, 1);
    wr(d, REG_DRIVER_FEATURES, (uint32_t)(d->features >> 32));
    status |= ST_FEATURES_OK;
    wr(d, REG_STATUS, status);
    if (!(rd(d, REG_STATUS) & ST_FEATURES_OK)) {
        kprintf("virtio: %s refused features 0x%016llx\n", d->name, d->features);
        goto failed;
    }

    if (quirks && quirks->notify_early)
        wr(d, REG_QUEUE_NOTIFY, 0);

    wr(d, REG_QUEUE_SEL, 0);
    if (rd(d, REG_QUEUE_READY) != 0) {
        kprintf("virtio: %s queue 0 ready after reset\n", d->name);
        goto failed;
    }
    uint32_t max = rd(d, REG_QUEUE_NUM_MAX);
    if (max == 0) {
        kprintf("virtio: %s has no queue 0\n", d->name);
        goto failed;
    }
    uint16_t n = QSZ;
    while (n > max)
        n >>= 1;
    d->qsize = n;
    d->avail_idx = 0;
    d->last_used = 0;
    for (size_t i = 0; i < sizeof *d->q; i++)
        ((volatile uint8_t *)d->q)[i] = 0;
    if (quirks && quirks->bad_queue_num)
        wr(d, REG_QUEUE_NUM, 3);
    wr(d, REG_QUEUE_NUM, n);
    uint32_t desc = (uint32_t)d->q->desc, avail = (uint32_t)&d->q->avail,
             used = (uint32_t)&d->q->used;
    wr(d, REG_QUEUE_DESC_LOW, desc);
    wr(d, REG_QUEUE_DESC_HIGH, 0);
    wr(d, REG_QUEUE_DRIVER_LOW, avail);
    wr(d, REG_QUEUE_DRIVER_HIGH, 0);
    wr(d, REG_QUEUE_DEVICE_LOW, used);
    wr(d, REG_QUEUE_DEVICE_HIGH, 0);
    wr(d, REG_QUEUE_READY, 1);
    if (rd(d, REG_QUEUE_READY) != 1) {
        kprintf("virtio: %s queue 0 not ready\n", d->name);
        goto failed;
    }

    if (quirks && quirks->notify_early)
        wr(d, REG_QUEUE_NOTIFY, 0);

    status |= ST_DRIVER_OK;
    wr(d, REG_STATUS, status);
    uint32_t now = rd(d, REG_STATUS);
    if (now != status) {
        kprintf("virtio: %s status 0x%x after DRIVER_OK, expected 0x%x\n", d->name, now, status);
        goto failed;
    }
    kprintf("virtio: %s ready features 0x%016llx (offered 0x%016llx) queue %u of %u\n", d->name,
            d->features, offered, n, max);
    return true;

failed:
    wr(d, REG_STATUS, rd(d, REG_STATUS) | ST_FAILED);
    return false;
}

/* Reads the device config (offset `off`, `words` 32-bit words) until the
 * config generation is stable (4.2.2.2). */
static void read_config(const struct dev *d, uint32_t off, uint32_t *out, uint32_t words)
{
    for (uint32_t tries = 0;; tries++) {
        uint32_t g0 = rd(d, REG_CONFIG_GENERATION);
        for (uint32_t i = 0; i < words; i++)
            out[i] = rd(d, REG_CONFIG + off + 4 * i);
        if (rd(d, REG_CONFIG_GENERATION) == g0)
            return;
        if (tries > 1000)
            timeout("config generation");
    }
}

/* ---- block requests (5.2.6) -------------------------------------------- */

#define NO_STATUS 0xff /* status byte as we leave it before a request */
#define REQ_NEEDS_RESET (-1)

/* One request: header, optional data buffer at guest address `data` of
 * `len` bytes (device-writable when `device_writes`), status byte.
 * Returns the status byte, or REQ_NEEDS_RESET. */
static int blk_request(struct dev *d, uint32_t type, uint64_t sector, uint32_t data, uint32_t len,
                       bool device_writes, uint32_t *used_len, const char *what)
{
    struct virtq_desc *desc = d->q->desc;
    req_hdr.type = type;
    req_hdr.reserved = 0;
    req_hdr.sector = sector;
    req_status = NO_STATUS;
    uint16_t i = 0;
    desc[i].addr = (uint32_t)&req_hdr;
    desc[i].len = sizeof req_hdr;
    desc[i].flags = VIRTQ_DESC_F_NEXT;
    desc[i].next = (uint16_t)(i + 1);
    i++;
    if (len) {
        desc[i].addr = data;
        desc[i].len = len;
        desc[i].flags = VIRTQ_DESC_F_NEXT | (device_writes ? VIRTQ_DESC_F_WRITE : 0);
        desc[i].next = (uint16_t)(i + 1);
        i++;
    }
    desc[i].addr = (uint32_t)&req_status;
    desc[i].len = 1;
    desc[i].flags = VIRTQ_DESC_F_WRITE;
    desc[i].next = 0;
    submit(d, 0);
    if (wait_used(d, 0, used_len, what) == WAIT_NEEDS_RESET)
        return REQ_NEEDS_RESET;
    return req_status;
}

static int blk_read(struct dev *d, uint64_t sector, void *buf, uint32_t *len, const char *what)
{
    return blk_request(d, BLK_T_IN, sector, (uint32_t)buf, SECTOR, true, len, what);
}

static int blk_write(struct dev *d, uint64_t sector, const void *buf, uint32_t *len,
                     const char *what)
{
    return blk_request(d, BLK_T_OUT, sector, (uint32_t)buf, SECTOR, false, len, what);
}

static void print_hex(const uint8_t *p, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        kprintf("%02x", p[i]);
}

/* The pattern written to sector 1 (the host test rebuilds it). */
static void make_pattern(void)
{
    static const char head[] = "locald-virtio-blk sector 1\n";
    for (uint32_t i = 0; i < SECTOR; i++)
        pattern[i] = (uint8_t)('a' + i % 26);
    for (uint32_t i = 0; i < sizeof head - 1; i++)
        pattern[i] = (uint8_t)head[i];
    pattern[SECTOR - 1] = '\n';
}

/* Step 2 on one block device. Returns true if the disk took the write
 * (writable). */
static bool blk_test(struct dev *d, uint64_t *capacity_out)
{
    uint32_t len;
    int st;
    step = FAIL_BLK_INIT;
    if (!dev_init(d, BLK_F_FLUSH | BLK_F_RO, NULL)) {
        fail(FAIL_BLK_INIT, "block init");
        return false;
    }
    uint32_t cap[2];
    read_config(d, 0, cap, 2);
    uint64_t capacity = ((uint64_t)cap[1] << 32) | cap[0];
    *capacity_out = capacity;
    kprintf("virtio: %s capacity %llu sectors ro=%u flush=%u\n", d->name, capacity,
            (d->features & BLK_F_RO) ? 1 : 0, (d->features & BLK_F_FLUSH) ? 1 : 0);

    step = FAIL_BLK_READ0;
    memset(buf_a, 0, SECTOR);
    st = blk_read(d, 0, buf_a, &len, "read sector 0");
    kprintf("virtio: %s read sector 0 status %d len %u\n", d->name, st, len);
    if (st != BLK_S_OK)
        fail(FAIL_BLK_READ0, "read sector 0");
    kprintf("virtio: %s sector 0 ", d->name);
    print_hex(buf_a, 16);
    kprintf("\n");

    /* Sector 1 before the write, to check a refused write changed nothing. */
    step = FAIL_BLK_WRITE;
    memset(buf_b, 0, SECTOR);
    st = blk_read(d, 1, buf_b, &len, "read sector 1 before write");
    if (st != BLK_S_OK) {
        kprintf("virtio: %s read sector 1 status %d\n", d->name, st);
        fail(FAIL_BLK_WRITE, "read sector 1 before write");
    }
    st = blk_write(d, 1, pattern, &len, "write sector 1");
    kprintf("virtio: %s write sector 1 status %d len %u\n", d->name, st, len);
    bool writable = st == BLK_S_OK;
    if (st == BLK_S_IOERR) {
        memset(buf_a, 0, SECTOR);
        st = blk_read(d, 1, buf_a, &len, "read sector 1 after refused write");
        bool same = st == BLK_S_OK && kmemcmp(buf_a, buf_b, SECTOR) == 0;
        kprintf("virtio: %s read-only, sector 1 %s\n", d->name, same ? "unchanged" : "CHANGED");
        if (!same)
            fail(FAIL_BLK_WRITE, "sector 1 of a read-only disk");
    } else if (st != BLK_S_OK) {
        fail(FAIL_BLK_WRITE, "write sector 1");
    } else if (d->features & BLK_F_RO) {
        fail(FAIL_BLK_WRITE, "write to a disk offering VIRTIO_BLK_F_RO succeeded");
    }

    if (writable) {
        step = FAIL_BLK_FLUSH;
        st = blk_request(d, BLK_T_FLUSH, 0, 0, 0, false, &len, "flush");
        kprintf("virtio: %s flush status %d\n", d->name, st);
        if (st != BLK_S_OK)
            fail(FAIL_BLK_FLUSH, "flush");

        step = FAIL_BLK_READBACK;
        memset(buf_a, 0, SECTOR);
        st = blk_read(d, 1, buf_a, &len, "read sector 1 back");
        bool same = st == BLK_S_OK && kmemcmp(buf_a, pattern, SECTOR) == 0;
        kprintf("virtio: %s read sector 1 status %d %s\n", d->name, st,
                same ? "matches" : "DIFFERS");
        if (!same)
            fail(FAIL_BLK_READBACK, "read sector 1 back");
    }

    step = FAIL_BLK_GET_ID;
    static char id[BLK_ID_BYTES + 1];
    memset(id, 0, sizeof id);
    st = blk_request(d, BLK_T_GET_ID, 0, (uint32_t)id, BLK_ID_BYTES, true, &len, "get id");
    for (uint32_t i = 0; i < BLK_ID_BYTES && id[i]; i++)
        if (id[i] < 0x20 || id[i] > 0x7e)
            id[i] = '?';
    kprintf("virtio: %s id \"%s\" status %d\n", d->name, id, st);
    if (st != BLK_S_OK)
        fail(FAIL_BLK_GET_ID, "get id");
    return writable;
}

/* ---- step 3: hostile cases on a writable disk --------------------------- */

static void hostile(struct dev *d, uint64_t capacity)
{
    uint32_t len;
    int st;

    /* (d) + (e): QueueNotify before DRIVER_OK, QueueNum = 3 first. */
    step = FAIL_HOSTILE_SETUP;
    const struct setup_quirks quirks = { .notify_early = true, .bad_queue_num = true };
    if (!dev_init(d, BLK_F_FLUSH | BLK_F_RO, &quirks)) {
        fail(FAIL_HOSTILE_SETUP, "init with early notify and QueueNum 3");
        return;
    }
    memset(buf_a, 0, SECTOR);
    st = blk_read(d, 1, buf_a, &len, "read after hostile setup");
    bool same = st == BLK_S_OK && kmemcmp(buf_a, pattern, SECTOR) == 0;
    kprintf("virtio: hostile setup (notify before DRIVER_OK, QueueNum 3) read status %d %s\n", st,
            same ? "ok" : "BAD");
    if (!same)
        fail(FAIL_HOSTILE_SETUP, "read after hostile setup");

    /* (a) read at sector = capacity. */
    step = FAIL_HOSTILE_PAST_END;
    st = blk_read(d, capacity, buf_a, &len, "read past end");
    kprintf("virtio: hostile read past end status %d\n", st);
    if (st != BLK_S_IOERR)
        fail(FAIL_HOSTILE_PAST_END, "read past end");

    /* (b) data buffer beyond guest RAM (and below the MMIO window). */
    step = FAIL_HOSTILE_BAD_ADDR;
    uint32_t bad = 0xb0000000u;
    if (ram_end > bad)
        bad = (ram_end + 0xfffffu) & ~0xfffffu;
    if (bad && bad < 0xc0000000u) {
        st = blk_request(d, BLK_T_IN, 0, bad, SECTOR, true, &len, "bad address");
        kprintf("virtio: hostile bad address 0x%08x status %d\n", bad, st);
        if (st != BLK_S_IOERR)
            fail(FAIL_HOSTILE_BAD_ADDR, "data outside guest RAM");
    } else {
        kprintf("virtio: hostile bad address skipped (RAM up to 0x%08x)\n", ram_end);
    }

    /* (c) unknown request type. */
    step = FAIL_HOSTILE_BAD_TYPE;
    st = blk_request(d, 0x77, 0, 0, 0, false, &len, "unknown type");
    kprintf("virtio: hostile unknown type status %d\n", st);
    if (st != BLK_S_UNSUPP)
        fail(FAIL_HOSTILE_BAD_TYPE, "unknown request type");

    /* (f) a chain whose next loops back to itself, no writable status. */
    step = FAIL_HOSTILE_LOOP;
    struct virtq_desc *desc = d->q->desc;
    req_hdr.type = BLK_T_IN;
    req_hdr.reserved = 0;
    req_hdr.sector = 0;
    desc[0].addr = (uint32_t)&req_hdr;
    desc[0].len = sizeof req_hdr;
    desc[0].flags = VIRTQ_DESC_F_NEXT;
    desc[0].next = 0;
    submit(d, 0);
    if (wait_used(d, 0, &len, "loop chain") == WAIT_NEEDS_RESET) {
        kprintf("virtio: hostile loop chain needs reset\n");
    } else {
        kprintf("virtio: hostile loop chain completed len %u\n", len);
        if (len != 0)
            fail(FAIL_HOSTILE_LOOP, "loop chain used length");
    }

    /* Reset, re-initialise, one good read. */
    step = FAIL_HOSTILE_RECOVERY;
    if (!dev_init(d, BLK_F_FLUSH | BLK_F_RO, NULL)) {
        fail(FAIL_HOSTILE_RECOVERY, "re-init after reset");
        return;
    }
    memset(buf_a, 0, SECTOR);
    st = blk_read(d, 1, buf_a, &len, "read after reset");
    same = st == BLK_S_OK && kmemcmp(buf_a, pattern, SECTOR) == 0;
    kprintf("virtio: hostile reset, read status %d %s\n", st, same ? "recovered" : "BAD");
    if (!same)
        fail(FAIL_HOSTILE_RECOVERY, "read after reset");
}

/* ---- step 4: entropy device (5.4) -------------------------------------- */

static bool rng_fill(struct dev *d, uint8_t *buf, const char *what)
{
    uint32_t len = 0;
    memset(buf, 0, 64);
    struct virtq_desc *desc = d->q->desc;
    desc[0].addr = (uint32_t)buf;
    desc[0].len = 64;
    desc[0].flags = VIRTQ_DESC_F_WRITE;
    desc[0].next = 0;
    submit(d, 0);
    if (wait_used(d, 0, &len, what) == WAIT_NEEDS_RESET) {
        kprintf("virtio: %s needs reset\n", d->name);
        fail(FAIL_RNG_DATA, what);
        return false;
    }
    bool nonzero = false;
    for (uint32_t i = 0; i < 64; i++)
        nonzero |= buf[i] != 0;
    if (len != 64 || !nonzero) {
        kprintf("virtio: %s %s len %u %s\n", d->name, what, len, nonzero ? "" : "all zero");
        fail(FAIL_RNG_DATA, what);
        return false;
    }
    kprintf("virtio: rng ok %u\n", len);
    return true;
}

static void rng_test(struct dev *d)
{
    step = FAIL_RNG_INIT;
    if (!dev_init(d, 0, NULL)) {
        fail(FAIL_RNG_INIT, "rng init");
        return;
    }
    step = FAIL_RNG_DATA;
    bool a = rng_fill(d, rng_a, "rng request 1");
    bool b = rng_fill(d, rng_b, "rng request 2");
    if (a && b) {
        bool differ = kmemcmp(rng_a, rng_b, 64) != 0;
        kprintf("virtio: rng %s\n", differ ? "differs" : "REPEATS");
        if (!differ)
            fail(FAIL_RNG_REPEAT, "rng repeats");
    }
}

/* ---- main --------------------------------------------------------------- */

int c_main(const struct hvm_start_info *si)
{
    if (si->magic != XEN_HVM_START_MAGIC) {
        kprintf("virtio: bad start info magic 0x%08x\n", si->magic);
        return FAIL_START_INFO;
    }
    if (si->version >= 1 && si->memmap_paddr) {
        const struct hvm_memmap_entry *m = (const void *)(uint32_t)si->memmap_paddr;
        for (uint32_t i = 0; i < si->memmap_entries && i < 128; i++) {
            uint64_t end = m[i].addr + m[i].size;
            if (m[i].type == 1 && end <= 0x100000000ull && end > ram_end)
                ram_end = (uint32_t)end;
        }
    }
    const char *cmdline = si->cmdline_paddr ? (const char *)(uint32_t)si->cmdline_paddr : "";
    parse_cmdline(cmdline);
    make_pattern();

    /* Step 1: list the devices. */
    step = FAIL_PROBE;
    kprintf("virtio: %u devices\n", ndevs);
    uint32_t nblk = 0, nrng = 0;
    for (uint32_t i = 0; i < ndevs; i++) {
        struct dev *d = &devs[i];
        uint32_t magic = rd(d, REG_MAGIC);
        d->version = rd(d, REG_VERSION);
        d->id = rd(d, REG_DEVICE_ID);
        d->vendor = rd(d, REG_VENDOR_ID);
        kprintf("virtio: dev%u base=0x%08x size=0x%x irq=%u id=%u vendor=0x%08x version=%u\n", i,
                d->base, d->size, d->irq, d->id, d->vendor, d->version);
        d->ok = magic == VIRTIO_MAGIC && d->version == 2;
        if (!d->ok) {
            kprintf("virtio: dev%u magic 0x%08x\n", i, magic);
            fail(FAIL_PROBE, "magic or version");
        }
        const char *kind = d->id == ID_BLOCK ? "blk" : d->id == ID_RNG ? "rng" : "dev";
        uint32_t n = d->id == ID_BLOCK ? nblk++ : d->id == ID_RNG ? nrng++ : i;
        d->name[0] = kind[0];
        d->name[1] = kind[1];
        d->name[2] = kind[2];
        d->name[3] = (char)('0' + n % 10);
        d->name[4] = 0;
    }

    /* Step 2: every disk; step 3 on the first writable one. */
    struct dev *victim = NULL;
    uint64_t victim_capacity = 0;
    for (uint32_t i = 0; i < ndevs; i++) {
        uint64_t capacity = 0;
        if (devs[i].ok && devs[i].id == ID_BLOCK && blk_test(&devs[i], &capacity) && !victim) {
            victim = &devs[i];
            victim_capacity = capacity;
        }
    }
    if (victim) {
        kprintf("virtio: hostile cases on %s\n", victim->name);
        hostile(victim, victim_capacity);
    } else {
        kprintf("virtio: no writable disk, hostile cases skipped\n");
    }

    /* Step 4: the first entropy device. */
    for (uint32_t i = 0; i < ndevs; i++) {
        if (devs[i].ok && devs[i].id == ID_RNG) {
            rng_test(&devs[i]);
            break;
        }
    }

    /* Leave every device reset. */
    for (uint32_t i = 0; i < ndevs; i++)
        if (devs[i].ok)
            reset(&devs[i]);

    if (first_failure)
        kprintf("virtio: FAILED code %d\n", first_failure);
    else
        kprintf("virtio: all ok\n");
    return first_failure;
}
