/*
 * precopy_writer: writes its memory non-stop, and checks it on demand.
 *
 * Maps --pages N private anonymous pages. Every word of page i starts as
 * (i << 32); words 0 and 511 hold the page's version, which a separate table
 * holds too. The loop writes pages among the first --hot: a new version into
 * words 0 and 511 and the table, then (every 64 writes) sleeps --sleep-us.
 * A page migrated stale, or zero, or its table entry stale, disagrees.
 *
 * On SIGUSR1 it checks every page and prints
 *   CHECK bad=<pages that disagree> writes=<versions written so far>
 * It starts by printing
 *   READY pid=<pid> addr=0x<addr> pages=<N>
 * Build: gcc -O2 -o precopy_writer precopy_writer.c
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define WORDS 512

static volatile sig_atomic_t check_asked;

static void on_usr1(int sig)
{
	(void)sig;
	check_asked = 1;
}

int main(int argc, char **argv)
{
	size_t pages = 2048, hot = 512;
	long sleep_us = 1000;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--pages"))
			pages = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--hot"))
			hot = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--sleep-us"))
			sleep_us = strtol(argv[i + 1], NULL, 0);
	}
	if (!hot || hot > pages)
		hot = pages;
	uint64_t *mem = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t *table = mmap(NULL, pages * 8, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || table == MAP_FAILED)
		return 1;
	for (size_t i = 0; i < pages; i++) {
		for (size_t w = 0; w < WORDS; w++)
			mem[i * WORDS + w] = (uint64_t)i << 32;
		mem[i * WORDS] = mem[i * WORDS + WORDS - 1] = table[i] = 0;
	}
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	sigaction(SIGUSR1, &sa, NULL);
	printf("READY pid=%d addr=%p pages=%zu\n", getpid(), (void *)mem, pages);
	fflush(stdout);
	uint64_t version = 0, x = 88172645463325252ull;
	struct timespec pause = { 0, sleep_us * 1000 };
	for (;;) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		size_t i = x % hot;
		version++;
		mem[i * WORDS] = version;
		mem[i * WORDS + WORDS - 1] = version;
		table[i] = version;
		if (version % 64 == 0 && sleep_us)
			nanosleep(&pause, NULL);
		if (check_asked) {
			check_asked = 0;
			size_t bad = 0;
			for (size_t p = 0; p < pages; p++) {
				int ok = mem[p * WORDS] == table[p] && mem[p * WORDS + WORDS - 1] == table[p];
				for (size_t w = 1; ok && w < WORDS - 1; w++)
					ok = mem[p * WORDS + w] == (uint64_t)p << 32;
				bad += !ok;
			}
			printf("CHECK bad=%zu writes=%" PRIu64 "\n", bad, version);
			fflush(stdout);
		}
	}
}
