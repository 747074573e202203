/*
 * vecregs: are a guest process's vector registers safe across context
 * switches?  Built by the real-Linux tier
 * (crates/locald-vmm-cli/tests/linux_hostile.rs) with gcc -static and run
 * several at once, each with its own pattern.  Three cases:
 *   - user mode has no AVX state: nothing to check, exit 0;
 *   - the kernel uses XSAVE (hardware KVM, bare metal): hold PATTERN in
 *     ymm1 while spinning, count the checks that found it changed, exit 1
 *     if any did;
 *   - user mode has AVX state but the kernel does not use XSAVE (software
 *     KVM: the kernel would not preserve it, docs/software-kvm.md "Vector
 *     state"): glibc must not use AVX (the guest init's GLIBC_TUNABLES),
 *     exit 1 if glibc reports any AVX-family feature active.
 * Usage: vecregs PATTERN CHECKS.  Prints one line starting "vecregs: ".
 */
#include <cpuid.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/platform/x86.h>

static int kernel_uses_xsave(void)
{
	char line[4096];
	FILE *f = fopen("/proc/cpuinfo", "r");
	int found = 0;
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f)) {
		if (strncmp(line, "flags", 5))
			continue;
		for (char *t = strtok(line, " \t\n"); t; t = strtok(NULL, " \t\n"))
			if (!strcmp(t, "xsave"))
				found = 1;
		break;
	}
	fclose(f);
	return found;
}

int main(int argc, char **argv)
{
	unsigned a, b, c, d, lo = 0, hi = 0;
	if (argc != 3) {
		fprintf(stderr, "usage: vecregs PATTERN CHECKS\n");
		return 2;
	}
	__cpuid(1, a, b, c, d);
	if (c & (1u << 27)) /* OSXSAVE: XGETBV works */
		__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	if (!(c & (1u << 27)) || (lo & 6) != 6 || !(c & (1u << 28))) {
		printf("vecregs: no AVX state in user mode (xcr0=%#x)\n", lo);
		return 0;
	}
	int kx = kernel_uses_xsave();
	if (kx <= 0) {
		int avx = CPU_FEATURE_ACTIVE(AVX), avx2 = CPU_FEATURE_ACTIVE(AVX2),
		    avx512 = CPU_FEATURE_ACTIVE(AVX512F);
		printf("vecregs: xcr0=%#x, kernel without xsave: glibc AVX=%d AVX2=%d AVX512F=%d\n",
		       lo, avx, avx2, avx512);
		return avx || avx2 || avx512;
	}
	uint64_t v = strtoull(argv[1], 0, 0);
	long checks = atol(argv[2]), changed = 0;
	uint64_t want[4] __attribute__((aligned(32))) = {v, ~v, v * 3, v ^ 0x5a5a};
	__asm__ volatile("vmovdqu %0, %%ymm1" ::"m"(want) : "xmm1");
	for (long i = 0; i < checks; i++) {
		int eq;
		for (volatile int k = 0; k < 1000; k++)
			;
		__asm__ volatile("vpcmpeqq %1, %%ymm1, %%ymm2\n\tvmovmskpd %%ymm2, %0"
				 : "=r"(eq)
				 : "m"(want)
				 : "xmm2");
		if (eq != 15) {
			changed++;
			__asm__ volatile("vmovdqu %0, %%ymm1" ::"m"(want) : "xmm1");
		}
	}
	printf("vecregs: xcr0=%#x pattern %#llx: ymm1 changed in %ld of %ld checks\n", lo,
	       (unsigned long long)v, changed, checks);
	return changed != 0;
}
