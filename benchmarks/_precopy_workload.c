/*
 * _precopy_workload: the workload of benchmarks/precopy.py.
 *
 * Maps --mib MiB of private anonymous memory: every word of page i is
 * (i << 32) but word 0, the page's version, which a table holds too.
 *   --mode idle    touches nothing
 *   --mode read    reads its whole memory over and over, and writes --pct
 *                  percent of its pages per second (the next ones in order)
 *   --mode write   writes --pct percent of its pages per second, reads nothing
 * Writes are spread over 10 ms ticks. On SIGUSR1 it makes one full pass over
 * its memory, checking every page, and prints
 *   PASS seconds=<the pass> bad=<pages that disagree>
 * It starts by printing READY pid=<pid> pages=<N>.
 * Build: gcc -O2 -o _precopy_workload _precopy_workload.c
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define WORDS 512

static volatile sig_atomic_t pass_asked;

static void on_usr1(int sig)
{
	(void)sig;
	pass_asked = 1;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	size_t mib = 1024;
	double pct = 0;
	const char *mode = "idle";
	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--mib"))
			mib = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--pct"))
			pct = atof(argv[i + 1]);
		else if (!strcmp(argv[i], "--mode"))
			mode = argv[i + 1];
	}
	size_t pages = mib * 256;
	uint64_t *mem = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t *table = mmap(NULL, pages * 8, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || table == MAP_FAILED)
		return 1;
	for (size_t i = 0; i < pages; i++) {
		for (size_t w = 1; w < WORDS; w++)
			mem[i * WORDS + w] = (uint64_t)i << 32;
		mem[i * WORDS] = table[i] = 1;
	}
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	sigaction(SIGUSR1, &sa, NULL);
	printf("READY pid=%d pages=%zu\n", getpid(), pages);
	fflush(stdout);
	int reading = !strcmp(mode, "read"), idle = !strcmp(mode, "idle");
	double per_tick = pages * pct / 100 / 100, owed = 0, tick = now();
	size_t cursor = 0, reader = 0;
	uint64_t version = 1, sum = 0;
	for (;;) {
		if (pass_asked) {
			pass_asked = 0;
			double t = now();
			size_t bad = 0;
			for (size_t p = 0; p < pages; p++) {
				int ok = mem[p * WORDS] == table[p];
				for (size_t w = 1; ok && w < WORDS; w++)
					ok = mem[p * WORDS + w] == (uint64_t)p << 32;
				bad += !ok;
			}
			printf("PASS seconds=%.6f bad=%zu\n", now() - t, bad);
			fflush(stdout);
		}
		if (idle) {
			pause();
			continue;
		}
		if (now() >= tick) {
			tick += 0.01;
			for (owed += per_tick; owed >= 1; owed--) {
				version++;
				mem[cursor * WORDS] = version;
				table[cursor] = version;
				cursor = (cursor + 1) % pages;
			}
		}
		if (reading) {
			for (int k = 0; k < 64; k++, reader = (reader + 1) % pages)
				sum += mem[reader * WORDS + 1];
			if (sum == 42)
				puts("");
		} else {
			struct timespec ts = { 0, 1000000 };
			nanosleep(&ts, NULL);
		}
	}
}
