"""The workload of downtime.py: a C program that writes a line every millisecond.

    dt_workload MIB idle|busy [threads N] [maps N PATH]

It maps MIB MiB of private anonymous memory and fills it, prints the line
tests/criu_peer.Workload.start waits for (``tick 0 tag 0 ...``), then writes
``T NS`` every millisecond (NS: its CLOCK_MONOTONIC in nanoseconds). The
first line it writes after a restore started marks the moment the restored
process ran code of its own again, by its own account; :class:`TickWatcher`
notes when each line comes.

* ``idle``: sleeps to absolute 1 ms deadlines between ticks (a dump interrupts
  sleeps; a deadline missed while frozen is not caught up tick by tick).
* ``busy``: writes its whole area non-stop (a memset of each page in turn) and
  ticks when a millisecond has passed, checking the clock every 16 pages.
* ``threads N``: N - 1 more threads, each asleep to 1 ms deadlines.
* ``maps N PATH``: N more mappings, each one page of the file PATH (written
  first, N pages) mapped privately and read-only, with a hole between any two
  so that none merge: N VMAs of file memory (:func:`maps_argv`).

Built statically (tests/criu_peer.build_static), so that it runs inside the CRIU chroot.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from criu_peer import build_static  # tests/: the one compile of the chroot's workloads

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "say.h"

#define PAGE 4096UL
#define TICK_NS 1000000LL

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void tick(long long ns)
{
    char line[48];
    snprintf(line, sizeof(line), "T %lld\n", ns);
    say(line);
}

/* Sleep until the next 1 ms deadline after the last one, or after now if that passed. */
static void sleep_tick(struct timespec *next)
{
    long long deadline = (long long)next->tv_sec * 1000000000LL + next->tv_nsec + TICK_NS;
    long long now = now_ns();
    if (deadline < now)
        deadline = now + TICK_NS;
    next->tv_sec = deadline / 1000000000LL;
    next->tv_nsec = deadline % 1000000000LL;
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, next, NULL) == EINTR)
        ;
}

static void *sleeper(void *arg)
{
    struct timespec next;
    (void)arg;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;)
        sleep_tick(&next);
    return NULL;
}

static void map_file_pages(size_t n, const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    char page[PAGE];
    if (fd < 0)
        _exit(5);
    memset(page, 'm', sizeof(page));
    for (size_t i = 0; i < n; i++)
        if (write(fd, page, PAGE) != (ssize_t)PAGE)
            _exit(5);
    char *base = mmap(NULL, 2 * n * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || munmap(base, 2 * n * PAGE))
        _exit(5);
    for (size_t i = 0; i < n; i++) {
        char *p = mmap(base + 2 * i * PAGE, PAGE, PROT_READ,
                       MAP_PRIVATE | MAP_FIXED_NOREPLACE, fd, (off_t)(i * PAGE));
        if (p == MAP_FAILED || p[0] != 'm')
            _exit(5);
    }
    close(fd);
}

int main(int argc, char **argv)
{
    struct timespec next;

    if (argc < 3)
        return 2;
    int busy = strcmp(argv[2], "busy") == 0;
    size_t pages = strtoul(argv[1], NULL, 10) * (1024 * 1024 / PAGE);
    unsigned char *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pages == 0 || mem == MAP_FAILED)
        return 1;
    for (size_t i = 0; i < pages; i++)
        memset(mem + i * PAGE, (int)(i & 0xff) | 1, PAGE);
    for (int a = 3; a + 1 < argc; a += 2) {
        if (strcmp(argv[a], "threads") == 0) {
            for (long t = 1; t < strtol(argv[a + 1], NULL, 10); t++) {
                pthread_t thread;
                if (pthread_create(&thread, NULL, sleeper, NULL))
                    return 6;
            }
        } else if (strcmp(argv[a], "maps") == 0 && a + 2 < argc) {
            map_file_pages(strtoul(argv[a + 1], NULL, 10), argv[a + 2]);
            a++;
        } else {
            return 2;
        }
    }
    say("tick 0 tag 0 sum 0x0000000000000000 bad 0\n");

    long long last = now_ns();
    tick(last);
    if (busy) {
        for (unsigned pass = 2;; pass++)
            for (size_t i = 0; i < pages; i++) {
                memset(mem + i * PAGE, (int)pass, PAGE);
                if (i % 16 == 0) {
                    long long now = now_ns();
                    if (now - last >= TICK_NS) {
                        tick(now);
                        last = now;
                    }
                }
            }
    }
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        sleep_tick(&next);
        tick(now_ns());
    }
}
"""

def build(dest: Path) -> Path:
    """Compile :data:`SOURCE` statically into ``dest`` (``dest``.c beside it)."""
    return build_static(SOURCE, dest, "-pthread")


def maps_argv(count: int, path: str) -> list[str]:
    """The arguments that give the workload ``count`` file mappings of ``path`` (the one
    place to change to use another many-mappings workload)."""
    return ["maps", str(count), path]


class TickWatcher:
    """Notes when a workload's log grows, from a thread polling its size every 0.5 ms.

    The arrival of a tick is the observer's clock, not the tick's own NS: the
    process restored by ``criu restore`` reads a CLOCK_MONOTONIC that goes on from
    where the dump left it (its ticks show no gap), so only the observer can tell
    when it ran again.
    """

    def __init__(self, log: Path) -> None:
        self.log = log
        self.grew: list[float] = []
        """CLOCK_MONOTONIC of each growth seen."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        size = self.log.stat().st_size
        while not self._stop.is_set():
            now = self.log.stat().st_size
            if now != size:
                self.grew.append(time.monotonic())
                size = now
            time.sleep(0.0005)

    def first_after(self, moment: float) -> float | None:
        """The first growth at or after ``moment``, if one came."""
        return next((t for t in list(self.grew) if t >= moment), None)

    def last_before(self, moment: float) -> float | None:
        """The last growth before ``moment``."""
        return max((t for t in list(self.grew) if t < moment), default=None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
