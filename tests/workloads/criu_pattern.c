/*
 * criu_pattern: a CRIU test workload with a known memory pattern.
 *
 *   criu_pattern MIB [CHILDREN]
 *
 * Maps MIB MiB of private anonymous memory and fills page i with the 16-byte
 * pair (PATTERN_MAGIC | tag, i) repeated, where tag is 0 in the first process
 * and k in its k-th child (each child forks from the filled parent and then
 * rewrites every page with its own tag, so its pages differ from the parent's).
 *
 * Each process prints once
 *     start tag T pid P addr 0xADDR pages N
 * and then, every 100 ms on an absolute CLOCK_MONOTONIC deadline (a dump
 * interrupts sleeps, and a relative sleep would end early after restore),
 *     tick K tag T sum 0xS bad B
 * where S is a hash of the whole area and B the number of pages that differ
 * from the pattern. Output goes to fd 1 with one write() per line, so the
 * lines of several processes do not mix when stdout is opened with O_APPEND.
 *
 * Built statically (gcc -static) so that it runs inside any root.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "say.h"

#define PAGE 4096UL
#define PATTERN_MAGIC 0x6c617a796d696700ULL /* "\0gimyzal": "lazymig\0" read LE */
#define INTERVAL_NS 100000000L

static void fill(uint64_t *mem, size_t pages, uint64_t tag)
{
	for (size_t i = 0; i < pages; i++) {
		uint64_t *p = mem + i * (PAGE / 8);
		for (size_t w = 0; w < PAGE / 8; w += 2) {
			p[w] = PATTERN_MAGIC | tag;
			p[w + 1] = i;
		}
	}
}

static void run(uint64_t *mem, size_t pages, uint64_t tag)
{
	char line[160];
	struct timespec next;

	snprintf(line, sizeof(line), "start tag %llu pid %d addr %#lx pages %zu\n",
		 (unsigned long long)tag, (int)getpid(), (unsigned long)mem, pages);
	say(line);
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (unsigned long tick = 0;; tick++) {
		uint64_t sum = 0xcbf29ce484222325ULL;
		size_t bad = 0;
		for (size_t i = 0; i < pages; i++) {
			const uint64_t *p = mem + i * (PAGE / 8);
			int ok = 1;
			for (size_t w = 0; w < PAGE / 8; w++) {
				sum = (sum ^ p[w]) * 0x100000001b3ULL;
				if (p[w] != ((w & 1) ? i : (PATTERN_MAGIC | tag)))
					ok = 0;
			}
			bad += !ok;
		}
		snprintf(line, sizeof(line), "tick %lu tag %llu sum %#018llx bad %zu\n",
			 tick, (unsigned long long)tag, (unsigned long long)sum, bad);
		say(line);
		next.tv_nsec += INTERVAL_NS;
		if (next.tv_nsec >= 1000000000L) {
			next.tv_nsec -= 1000000000L;
			next.tv_sec++;
		}
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
			;
	}
}

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: %s MIB [CHILDREN]\n", argv[0]);
		return 2;
	}
	size_t pages = strtoul(argv[1], NULL, 10) * (1024 * 1024 / PAGE);
	unsigned long children = argc > 2 ? strtoul(argv[2], NULL, 10) : 0;
	uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (pages == 0 || mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	fill(mem, pages, 0);
	for (unsigned long k = 1; k <= children; k++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			fill(mem, pages, k);
			run(mem, pages, k);
		}
	}
	run(mem, pages, 0);
	return 0;
}
