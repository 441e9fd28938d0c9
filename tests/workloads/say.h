/*
 * say(line): the whole line to stdout in one write where it fits, retried on EINTR
 * (a dump interrupts it), the process gone with status 3 if stdout is.
 * Shared by the static C workloads of the CRIU tests and benchmarks
 * (tests/criu_peer.build_static puts this directory on their include path).
 */
#ifndef LAZYMIG_SAY_H
#define LAZYMIG_SAY_H

#include <errno.h>
#include <string.h>
#include <unistd.h>

static void say(const char *line)
{
	size_t len = strlen(line);
	while (len) {
		ssize_t n = write(1, line, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			_exit(3);
		}
		line += n;
		len -= (size_t)n;
	}
}

#endif
