/* A source for "a SIGKILLed dumper must not kill the source" (test_dump_late_fill):
 * it fills --mib MiB with a known pattern (the word at address a is a ^ SEED),
 * blocks SIGUSR2 (a signal mask of its own), then loops forever: it loads a
 * pattern into ymm8 (xmm8 without AVX) and a double into xmm9, spins in asm
 * without touching them, stores them back and compares, then checks its memory;
 * each round it prints "CHECK round=N bad=B" (B counts wrong words and registers).
 * A dumper killed while this process runs the injected vmsplice loop must hand
 * it back its own registers, FPU/AVX state and signal mask. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define SEED 0x5EED5EED5EED5EEDULL

static unsigned spin_check(int avx, uint64_t round) {
    uint64_t in[4] __attribute__((aligned(32))), out[4] __attribute__((aligned(32)));
    double d_in = 1.0 / 3.0 + (double)round, d_out = 0.0;
    unsigned bad = 0;
    for (int i = 0; i < 4; i++) in[i] = SEED * (i + 1) + round;
    memset(out, 0, sizeof(out));
    if (avx)
        __asm__ volatile(
            "vmovdqa (%[in]), %%ymm8\n\tmovq %[d], %%xmm9\n\t"
            "mov $20000000, %%ecx\n1:\n\tdec %%ecx\n\tjnz 1b\n\t"
            "vmovdqa %%ymm8, (%[out])\n\tmovq %%xmm9, %[dout]\n\tvzeroupper"
            : [dout] "=m"(d_out) : [in] "r"(in), [out] "r"(out), [d] "m"(d_in)
            : "rcx", "xmm8", "xmm9", "memory");
    else
        __asm__ volatile(
            "movdqa (%[in]), %%xmm8\n\tmovq %[d], %%xmm9\n\t"
            "mov $20000000, %%ecx\n1:\n\tdec %%ecx\n\tjnz 1b\n\t"
            "movdqa %%xmm8, (%[out])\n\tmovq %%xmm9, %[dout]"
            : [dout] "=m"(d_out) : [in] "r"(in), [out] "r"(out), [d] "m"(d_in)
            : "rcx", "xmm8", "xmm9", "memory");
    for (int i = 0; i < (avx ? 4 : 2); i++) bad += out[i] != in[i];
    return bad + (d_out != d_in);
}

int main(int argc, char **argv) {
    size_t len = (size_t)(argc > 1 ? atoi(argv[1]) : 64) << 20;
    uint64_t *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 1;
    madvise(mem, len, MADV_NOHUGEPAGE);
    for (size_t i = 0; i < len / 8; i++) mem[i] = (uint64_t)(uintptr_t)&mem[i] ^ SEED;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    sigprocmask(SIG_BLOCK, &set, NULL);
    __builtin_cpu_init();
    int avx = __builtin_cpu_supports("avx");
    printf("READY avx=%d\n", avx != 0);
    fflush(stdout);
    for (uint64_t round = 0;; round++) {
        unsigned bad = spin_check(avx, round);
        for (size_t i = 0; i < len / 8; i += 512)
            bad += mem[i] != ((uint64_t)(uintptr_t)&mem[i] ^ SEED);
        printf("CHECK round=%llu bad=%u\n", (unsigned long long)round, bad);
        fflush(stdout);
    }
}
