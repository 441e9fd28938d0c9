/* fds.py in C: a process holding open files that reports their state once it
 * runs under a new pid (see fds.py for the files, the lines and the options;
 * --extra is not supported here). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int log_fd, ro, null_fd, pipe_fds[2], tail_fds[2], dir_fd;

static long pid_now(void) { return syscall(SYS_getpid); }

static int cloexec(int fd) { return fcntl(fd, F_GETFD) & FD_CLOEXEC; }

static void print_state(void)
{
	printf("pid=%ld pgid=%d sid=%d log_pos=%ld log_flags=%d log_cloexec=%d ro_pos=%ld "
	       "ro_flags=%d ro_cloexec=%d dup_cloexec=%d null_flags=%d r_flags=%d w_flags=%d "
	       "r_cloexec=%d tail_flags=%d dir_flags=%d pipe_size=%d",
	       pid_now(), getpgid(0), getsid(0), (long)lseek(log_fd, 0, SEEK_CUR),
	       fcntl(log_fd, F_GETFL), cloexec(log_fd), (long)lseek(ro, 0, SEEK_CUR),
	       fcntl(ro, F_GETFL), cloexec(ro), cloexec(42), fcntl(null_fd, F_GETFL),
	       fcntl(pipe_fds[0], F_GETFL), fcntl(pipe_fds[1], F_GETFL), cloexec(pipe_fds[0]),
	       fcntl(tail_fds[0], F_GETFL), fcntl(dir_fd, F_GETFL), fcntl(pipe_fds[0], F_GETPIPE_SZ));
}

static void print_hex(const char *key, int fd, size_t len)
{
	unsigned char buf[100];
	ssize_t n = read(fd, buf, len);
	printf(" %s=", key);
	for (ssize_t i = 0; i < n; i++)
		printf("%02x", buf[i]);
}

static void must(int ok, const char *what)
{
	if (!ok) {
		perror(what);
		exit(2);
	}
}

int main(int argc, char **argv)
{
	char path[4096], buf[100];
	struct timespec tick = {0, 20 * 1000 * 1000};

	sigset_t usr1;
	int sig;

	if (argc < 2)
		return 2;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, NULL);
	for (int i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "--setsid"))
			must(setsid() >= 0, "setsid");
		else if (!strcmp(argv[i], "--setpgid"))
			must(setpgid(0, 0) == 0, "setpgid");
	}
	snprintf(path, sizeof(path), "%s/log", argv[1]);
	must((log_fd = open(path, O_WRONLY | O_APPEND)) >= 0, "open log");
	must(write(log_fd, "opened\n", 7) == 7, "write log");
	snprintf(path, sizeof(path), "%s/data", argv[1]);
	must((ro = open(path, O_RDONLY | O_CLOEXEC)) >= 0, "open data");
	must(read(ro, buf, 100) == 100, "read data");
	must(dup2(ro, 42) == 42, "dup2");
	must((null_fd = open("/dev/null", O_WRONLY | O_NONBLOCK)) >= 0, "open /dev/null");
	must(pipe2(pipe_fds, O_CLOEXEC) == 0, "pipe2");
	must(fcntl(pipe_fds[0], F_SETFL, O_NONBLOCK) == 0, "F_SETFL");
	must(fcntl(pipe_fds[1], F_SETPIPE_SZ, 1 << 20) >= 0, "F_SETPIPE_SZ");
	must(write(pipe_fds[1], "in-flight", 9) == 9, "write pipe");
	must(pipe(tail_fds) == 0, "pipe");
	must(write(tail_fds[1], "tail", 4) == 4, "write tail");
	close(tail_fds[1]);
	must((dir_fd = open(argv[1], O_PATH | O_DIRECTORY)) >= 0, "open dir");

	long pid = pid_now();
	printf("READY ");
	print_state();
	printf(" log=%d ro=%d null=%d r=%d w=%d tail=%d dir=%d extra=-1\n", log_fd, ro,
	       null_fd, pipe_fds[0], pipe_fds[1], tail_fds[0], dir_fd);
	fflush(stdout);
	while (pid_now() == pid)
		nanosleep(&tick, NULL);

	printf("RESTORED ");
	print_state();
	must(write(log_fd, "after\n", 6) == 6, "write log");
	print_hex("ro_read", ro, 10);
	printf(" dup_pos=%ld null_write=%zd", (long)lseek(42, 0, SEEK_CUR),
	       write(null_fd, "xyz", 3));
	print_hex("pipe_data", pipe_fds[0], 100);
	must(write(pipe_fds[1], "echo", 4) == 4, "write pipe");
	print_hex("pipe_echo", pipe_fds[0], 100);
	print_hex("tail_data", tail_fds[0], 100);
	printf(" tail_eof=%d", read(tail_fds[0], buf, sizeof(buf)) == 0);
	int data_fd = openat(dir_fd, "data", O_RDONLY);
	must(data_fd >= 0, "openat data");
	print_hex("dir_read", data_fd, 4);
	printf("\n");
	fflush(stdout);
	sigwait(&usr1, &sig);
	return 0;
}
