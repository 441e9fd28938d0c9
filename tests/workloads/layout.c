/* A memory layout built from a script, then held still for a dump.
 *
 *   layout SCRIPT
 *
 * SCRIPT holds one command per line (numbers in decimal, pages of 4 KiB):
 *   anon ID NPAGES               mmap NPAGES private anonymous read-write pages
 *   file ID NPAGES PATH          mmap NPAGES of PATH, private, read-write
 *   fill ID FIRST N STRIDE RUN GEN
 *                                write pages FIRST..FIRST+N-1 whose (page - FIRST) %
 *                                STRIDE < RUN: word i of page p is TAG ^ i, with
 *                                TAG = ID << 40 | p << 8 | GEN | 1 << 63
 *   dontneed ID FIRST N          madvise(MADV_DONTNEED)
 *   huge ID FIRST N ON           madvise(MADV_HUGEPAGE) if ON, else MADV_NOHUGEPAGE
 *   protect ID FIRST N PROT      mprotect: PROT 1 = read-only, 3 = read-write
 *   move ID                      mremap the region to a new place
 * and prints "AT ID ADDRESS" (hex) for every mmap and move. Then "READY" and it
 * sleeps until killed. Exit status 2 and a message on stderr on any failure.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX_REGIONS 256

static char *base[MAX_REGIONS];
static unsigned long npages[MAX_REGIONS];

static void die(const char *what, long id)
{
	fprintf(stderr, "layout: %s (region %ld)\n", what, id);
	exit(2);
}

static char *at(long id, unsigned long first, unsigned long n)
{
	if (id < 0 || id >= MAX_REGIONS || !base[id])
		die("no such region", id);
	if (first + n > npages[id])
		die("pages out of range", id);
	return base[id] + first * PAGE;
}

int main(int argc, char **argv)
{
	char cmd[32], path[4096];
	long id;
	unsigned long n, first, stride, run, gen, flag;
	FILE *script;

	if (argc != 2 || !(script = fopen(argv[1], "r")))
		die("usage: layout SCRIPT", -1);
	while (fscanf(script, "%31s %ld", cmd, &id) == 2) {
		if (id < 0 || id >= MAX_REGIONS)
			die("bad region id", id);
		if (!strcmp(cmd, "anon") || !strcmp(cmd, "file")) {
			int fd = -1, flags = MAP_PRIVATE;
			void *p;

			if (fscanf(script, "%lu", &n) != 1)
				die("bad anon/file", id);
			if (!strcmp(cmd, "file")) {
				if (fscanf(script, "%4095s", path) != 1 ||
				    (fd = open(path, O_RDONLY)) < 0)
					die("cannot open the file", id);
			} else {
				flags |= MAP_ANONYMOUS;
			}
			p = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, flags, fd, 0);
			if (p == MAP_FAILED)
				die("mmap failed", id);
			if (fd >= 0)
				close(fd);
			base[id] = p;
			npages[id] = n;
			printf("AT %ld %lx\n", id, (unsigned long)p);
		} else if (!strcmp(cmd, "fill")) {
			if (fscanf(script, "%lu %lu %lu %lu %lu", &first, &n, &stride, &run, &gen) != 5
			    || !stride)
				die("bad fill", id);
			at(id, first, n);
			for (unsigned long p = first; p < first + n; p++) {
				uint64_t *w = (uint64_t *)(base[id] + p * PAGE);
				uint64_t tag = (uint64_t)id << 40 | (uint64_t)p << 8 | gen | 1ULL << 63;

				if ((p - first) % stride >= run)
					continue;
				for (unsigned long i = 0; i < PAGE / 8; i++)
					w[i] = tag ^ i;
			}
		} else if (!strcmp(cmd, "dontneed")) {
			if (fscanf(script, "%lu %lu", &first, &n) != 2 ||
			    madvise(at(id, first, n), n * PAGE, MADV_DONTNEED))
				die("bad dontneed", id);
		} else if (!strcmp(cmd, "huge")) {
			if (fscanf(script, "%lu %lu %lu", &first, &n, &flag) != 3 ||
			    madvise(at(id, first, n), n * PAGE, flag ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
				die("bad huge", id);
		} else if (!strcmp(cmd, "protect")) {
			if (fscanf(script, "%lu %lu %lu", &first, &n, &flag) != 3 ||
			    mprotect(at(id, first, n), n * PAGE, (int)flag))
				die("bad protect", id);
		} else if (!strcmp(cmd, "move")) {
			unsigned long len = npages[id] * PAGE;
			/* A new place of the same size, reserved first so that MREMAP_FIXED
			 * lands somewhere free. */
			void *to = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
					-1, 0);
			void *p;

			at(id, 0, 0);
			if (to == MAP_FAILED)
				die("cannot reserve a new place", id);
			p = mremap(base[id], len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
			if (p == MAP_FAILED)
				die("mremap failed", id);
			base[id] = p;
			printf("AT %ld %lx\n", id, (unsigned long)p);
		} else {
			die("unknown command", id);
		}
	}
	fclose(script);
	printf("READY\n");
	fflush(stdout);
	for (;;)
		pause();
}
