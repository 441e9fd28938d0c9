/*
 * pattern: a migration test workload with memory whose content is known.
 *
 * It maps --mib MiB of private anonymous memory and fills every 8-byte word at
 * address a with (a ^ seed). Then, at absolute deadlines every --interval-ms,
 * it checks the whole region against that formula and prints a line:
 *
 *   READY pid=<pid> addr=0x<addr> size=<bytes> seed=0x<seed> locked=0x<addr> locked_size=<bytes>
 *   CHECK n=<iteration> sum=0x<sum of all words, mod 2^64> bad=<words that differ> usr1=<SIGUSR1s handled>
 *
 * Options (all optional):
 *   --mib N           anonymous pattern region, MiB (default 4)
 *   --seed S          pattern seed (default 0x5eed5eed5eed5eed)
 *   --interval-ms M   check period (default 100)
 *   --threads T       total threads (default 1; extras just sleep)
 *   --locked-kib K    also a mlock-ed region (MAP_LOCKED, not lazy) with the pattern
 *   --shared-kib K    also a MAP_SHARED anonymous region (not migratable)
 *   --maps N          also N small mappings, one page each with a page of
 *                     address space between them (so none merge): a quarter
 *                     of N files each mapped once, a quarter of one file
 *                     mapped page by page (private and shared in turn), half
 *                     anonymous, read-write, read-only and read-exec in turn;
 *                     the written ones hold the pattern (files in --maps-dir)
 *   --maps-dir DIR    where --maps makes its files (default: the cwd)
 *   --runs R          also R one-page runs: a region of 2R pages with the
 *                     pattern on every other page (R runs to dump, one VMA)
 *
 * It also installs a SIGUSR1 handler (SA_RESTART, sa_mask = {SIGUSR2}), blocks
 * SIGUSR2, and keeps a malloc-ed block on the heap, so tests can check that
 * signal dispositions, the signal mask and brk are read correctly.
 * Build: gcc -O2 -pthread -o pattern pattern.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t usr1_count;

static void on_usr1(int sig)
{
	(void)sig;
	usr1_count++;
}

static void *sleeper(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return NULL;
}

static void fill(uint64_t *p, size_t size, uint64_t seed)
{
	for (size_t i = 0; i < size / 8; i++)
		p[i] = (uint64_t)(uintptr_t)&p[i] ^ seed;
}

static void check(const uint64_t *p, size_t size, uint64_t seed, uint64_t *sum, uint64_t *bad)
{
	for (size_t i = 0; i < size / 8; i++) {
		*sum += p[i];
		if (p[i] != ((uint64_t)(uintptr_t)&p[i] ^ seed))
			(*bad)++;
	}
}

/* A file of `pages` pages at dir/name whose page p holds byte (p * 7 + salt) & 0xff. */
static int make_file(const char *dir, const char *name, size_t pages, int salt)
{
	char path[4096], page[4096];
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) { perror(path); exit(1); }
	for (size_t p = 0; p < pages; p++) {
		memset(page, (int)((p * 7 + salt) & 0xff), sizeof(page));
		if (write(fd, page, sizeof(page)) != (ssize_t)sizeof(page)) { perror(path); exit(1); }
	}
	return fd;
}

static void *map_at(char *at, int prot, int flags, int fd, off_t offset)
{
	void *p = mmap(at, 4096, prot, flags | MAP_FIXED_NOREPLACE, fd, offset);

	if (p != at) { perror("mmap --maps"); exit(1); }
	return p;
}

/* --maps: n one-page mappings, each followed by an unmapped page (see the header). */
static void make_maps(size_t n, const char *dir, uint64_t seed)
{
	const size_t page = 4096, files = n / 4, one = n / 4;
	char *base = mmap(NULL, 2 * n * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	size_t k = 0;
	char name[64];
	int fd;

	if (base == MAP_FAILED) { perror("mmap --maps"); exit(1); }
	munmap(base, 2 * n * page);
	for (size_t i = 0; i < files; i++, k++) {
		snprintf(name, sizeof(name), "map-%zu", i);
		fd = make_file(dir, name, 1, (int)i);
		map_at(base + 2 * k * page, PROT_READ, MAP_PRIVATE, fd, 0);
		close(fd);
	}
	fd = make_file(dir, "map-one", one, 3);
	for (size_t i = 0; i < one; i++, k++) {
		int shared = i % 2, written = !shared && i % 4 == 0;
		char *p = map_at(base + 2 * k * page, PROT_READ | (written ? PROT_WRITE : 0),
				 shared ? MAP_SHARED : MAP_PRIVATE, fd, (off_t)(i * page));
		if (written)  /* a private copy of the file page */
			fill((uint64_t *)p, page, seed);
	}
	close(fd);
	for (size_t i = 0; k < n; i++, k++) {
		static const int prots[] = {PROT_READ | PROT_WRITE, PROT_READ, PROT_READ | PROT_EXEC};
		char *p = map_at(base + 2 * k * page, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		fill((uint64_t *)p, page, seed);
		if (mprotect(p, page, prots[i % 3])) { perror("mprotect --maps"); exit(1); }
	}
}

int main(int argc, char **argv)
{
	size_t mib = 4, locked_kib = 0, shared_kib = 0, maps = 0, runs = 0;
	const char *maps_dir = ".";
	uint64_t seed = 0x5eed5eed5eed5eedULL;
	long interval_ms = 100;
	int threads = 1;
	static const struct option opts[] = {
		{"mib", required_argument, NULL, 'm'},
		{"seed", required_argument, NULL, 's'},
		{"interval-ms", required_argument, NULL, 'i'},
		{"threads", required_argument, NULL, 't'},
		{"locked-kib", required_argument, NULL, 'l'},
		{"shared-kib", required_argument, NULL, 'S'},
		{"maps", required_argument, NULL, 'M'},
		{"maps-dir", required_argument, NULL, 'D'},
		{"runs", required_argument, NULL, 'R'},
		{NULL, 0, NULL, 0},
	};
	int c;

	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'm': mib = strtoull(optarg, NULL, 0); break;
		case 's': seed = strtoull(optarg, NULL, 0); break;
		case 'i': interval_ms = strtol(optarg, NULL, 0); break;
		case 't': threads = atoi(optarg); break;
		case 'l': locked_kib = strtoull(optarg, NULL, 0); break;
		case 'S': shared_kib = strtoull(optarg, NULL, 0); break;
		case 'M': maps = strtoull(optarg, NULL, 0); break;
		case 'D': maps_dir = optarg; break;
		case 'R': runs = strtoull(optarg, NULL, 0); break;
		default: fprintf(stderr, "bad option\n"); return 2;
		}
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGUSR2);
	if (sigaction(SIGUSR1, &sa, NULL)) { perror("sigaction"); return 1; }
	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR2);
	sigprocmask(SIG_BLOCK, &block, NULL);

	char *heap = malloc(64 * 1024);
	if (!heap) return 1;
	memset(heap, 0x5a, 64 * 1024);

	size_t size = mib << 20;
	uint64_t *region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED) { perror("mmap"); return 1; }
	fill(region, size, seed);

	size_t lsize = locked_kib << 10;
	uint64_t *locked = NULL;
	if (lsize) {
		locked = mmap(NULL, lsize, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
		if (locked == MAP_FAILED) { perror("mmap locked"); return 1; }
		fill(locked, lsize, seed);
	}
	if (shared_kib) {
		char *shared = mmap(NULL, shared_kib << 10, PROT_READ | PROT_WRITE,
				    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		if (shared == MAP_FAILED) { perror("mmap shared"); return 1; }
		memset(shared, 1, shared_kib << 10);
	}
	if (maps)
		make_maps(maps, maps_dir, seed);
	if (runs) {
		char *r = mmap(NULL, 2 * runs * 4096, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (r == MAP_FAILED) { perror("mmap --runs"); return 1; }
		madvise(r, 2 * runs * 4096, MADV_NOHUGEPAGE);  /* a THP would fill the holes */
		for (size_t i = 0; i < runs; i++)
			fill((uint64_t *)(r + 2 * i * 4096), 4096, seed);
	}
	for (int i = 1; i < threads; i++) {
		pthread_t t;
		if (pthread_create(&t, NULL, sleeper, NULL)) { perror("pthread_create"); return 1; }
	}

	printf("READY pid=%d addr=0x%" PRIxPTR " size=%zu seed=0x%" PRIx64
	       " locked=0x%" PRIxPTR " locked_size=%zu\n",
	       getpid(), (uintptr_t)region, size, seed, (uintptr_t)locked, lsize);
	fflush(stdout);

	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (uint64_t n = 0;; n++) {
		next.tv_nsec += (interval_ms % 1000) * 1000000L;
		next.tv_sec += interval_ms / 1000 + next.tv_nsec / 1000000000L;
		next.tv_nsec %= 1000000000L;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
			;
		uint64_t sum = 0, bad = 0;
		check(region, size, seed, &sum, &bad);
		if (locked)
			check(locked, lsize, seed, &sum, &bad);
		printf("CHECK n=%" PRIu64 " sum=0x%016" PRIx64 " bad=%" PRIu64 " usr1=%d\n",
		       n, sum, bad, (int)usr1_count);
		fflush(stdout);
	}
}
