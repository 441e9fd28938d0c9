"""The workload of criu_side_by_side.py: a C program with a known pattern, idle or busy.

    sbs_workload MIB idle|busy
    sbs_workload MIB random TOUCHES

It maps MIB MiB of private anonymous memory, fills page i with the 16-byte pair
(PATTERN_MAGIC, i) repeated (criu_pattern's pattern, tag 0) and prints the two
lines that tests/criu_peer.Workload.start waits for (a ``start`` line and one
``tick``). Then:

* ``idle``: sleeps to absolute deadlines (a dump interrupts sleeps). On SIGUSR1
  it checks its whole area once and prints ``pass S bad B``: S seconds for the
  pass, B pages that differ from the pattern.
* ``busy``: checks its whole area non-stop. SIGUSR1 restarts the pass at page 0;
  the first full pass after the signal prints ``pass S bad B``, S counted from
  the signal, and the scanning goes on.

Sent to the restored copy right after ``criu restore`` returns, SIGUSR1 times
the busy workload's first full pass over lazily restored memory (faults and
background fetch together); sent to the idle one once every page is in, it
times a pass over local memory (the baseline).

* ``random``: as ``idle``, but SIGUSR1 makes it read TOUCHES random pages (a fixed
  seed) and time each read that faults: a page its own /proc/self/pagemap shows
  present already (the background fetch brought it) is skipped. It prints one
  ``lat US`` line per timed read, then ``faults N skipped K``: the fault round
  trip a program sees, whichever daemon serves it.

Built statically (tests/criu_peer.build_static), so that it runs inside the CRIU chroot.
"""

from __future__ import annotations

import re
from pathlib import Path

from criu_peer import build_static  # tests/: the one compile of the chroot's workloads

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "say.h"

#define PAGE 4096UL
#define PATTERN_MAGIC 0x6c617a796d696700ULL

static volatile sig_atomic_t signalled;

static void on_usr1(int sig)
{
    (void)sig;
    signalled = 1;
}

static int page_bad(const uint64_t *mem, size_t i)
{
    const uint64_t *p = mem + i * (PAGE / 8);
    uint64_t diff = 0;
    for (size_t w = 0; w < PAGE / 8; w += 2)
        diff |= (p[w] ^ PATTERN_MAGIC) | (p[w + 1] ^ i);
    return diff != 0;
}

static double since(const struct timespec *t0)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t0->tv_sec) + (double)(now.tv_nsec - t0->tv_nsec) / 1e9;
}

static void report(const struct timespec *t0, size_t bad)
{
    char line[96];
    snprintf(line, sizeof(line), "pass %.6f bad %zu\n", since(t0), bad);
    say(line);
}

static void touch_random(const volatile uint64_t *mem, size_t pages, size_t touches)
{
    char line[96];
    int pagemap = open("/proc/self/pagemap", O_RDONLY);
    double *lat = malloc(touches * sizeof(double));
    size_t n = 0, skipped = 0;
    uint64_t x = 88172645463325252ULL;
    struct timespec t0;

    if (lat == NULL)
        _exit(4);
    for (size_t t = 0; t < touches; t++) {
        uint64_t entry = 0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        size_t i = x % pages;
        uintptr_t addr = (uintptr_t)(mem + i * (PAGE / 8));
        if (pagemap >= 0 && pread(pagemap, &entry, 8, (off_t)(addr / PAGE * 8)) == 8 &&
            (entry >> 63)) {
            skipped++;
            continue;
        }
        clock_gettime(CLOCK_MONOTONIC, &t0);
        (void)mem[i * (PAGE / 8)];
        lat[n++] = since(&t0);
    }
    for (size_t k = 0; k < n; k++) {
        snprintf(line, sizeof(line), "lat %.2f\n", lat[k] * 1e6);
        say(line);
    }
    snprintf(line, sizeof(line), "faults %zu skipped %zu\n", n, skipped);
    say(line);
    free(lat);
    if (pagemap >= 0)
        close(pagemap);
}

int main(int argc, char **argv)
{
    char line[160];
    struct timespec t0, next;

    if (argc != 3 && argc != 4)
        return 2;
    int busy = strcmp(argv[2], "busy") == 0;
    size_t touches = strcmp(argv[2], "random") == 0 && argc == 4 ? strtoul(argv[3], NULL, 10) : 0;
    size_t pages = strtoul(argv[1], NULL, 10) * (1024 * 1024 / PAGE);
    uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pages == 0 || mem == MAP_FAILED)
        return 1;
    for (size_t i = 0; i < pages; i++)
        for (size_t w = 0; w < PAGE / 8; w += 2) {
            mem[i * (PAGE / 8) + w] = PATTERN_MAGIC;
            mem[i * (PAGE / 8) + w + 1] = i;
        }
    signal(SIGUSR1, on_usr1);
    snprintf(line, sizeof(line), "start tag 0 pid %d addr %#lx pages %zu\n",
             (int)getpid(), (unsigned long)mem, pages);
    say(line);
    say("tick 0 tag 0 sum 0x0000000000000000 bad 0\n");

    if (busy) {
        int timing = 0;
        size_t bad = 0;
        for (;;) {
            size_t i = 0;
            while (i < pages) {
                if (signalled) {
                    signalled = 0;
                    clock_gettime(CLOCK_MONOTONIC, &t0);
                    timing = 1;
                    bad = 0;
                    i = 0;
                }
                bad += page_bad(mem, i);
                i++;
            }
            if (timing) {
                report(&t0, bad);
                timing = 0;
            }
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        if (signalled && touches) {
            signalled = 0;
            touch_random(mem, pages, touches);
        } else if (signalled) {
            size_t bad = 0;
            signalled = 0;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (size_t i = 0; i < pages; i++)
                bad += page_bad(mem, i);
            report(&t0, bad);
        }
        next.tv_sec += 1;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            if (signalled)
                break;
    }
}
"""

_LAT = re.compile(r"^lat ([\d.]+)$", re.MULTILINE)
_FAULTS = re.compile(r"^faults (\d+) skipped (\d+)$", re.MULTILINE)
_PASS = re.compile(r"^pass ([\d.]+) bad (\d+)$", re.MULTILINE)


def build(dest: Path) -> Path:
    """Compile :data:`SOURCE` statically into ``dest`` (``dest``.c beside it)."""
    return build_static(SOURCE, dest)


def passes(log: Path) -> list[tuple[float, int]]:
    """The ``pass S bad B`` lines the workload wrote to ``log`` so far: (S, B)."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    return [(float(m[1]), int(m[2])) for m in _PASS.finditer(text)]


def faults(log: Path) -> tuple[list[float], int] | None:
    """What ``random`` wrote to ``log``: the fault round trips (us) and the skipped
    touches (present already), or None before its ``faults`` line."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return None
    done = _FAULTS.search(text)
    if done is None:
        return None
    return [float(m[1]) for m in _LAT.finditer(text)], int(done[2])
