/* A multi-threaded process that checks its own per-thread state, for the
 * threads tests of lazymig (tests/test_threads.py).
 *
 *   threads [--threads T] [--mib M] [--seed S] [--interval-ms I] [--churn]
 *
 * The leader maps M MiB whose 8-byte word at address a is a ^ seed (as
 * pattern.c: lazymig.testing.memory.Pattern compares it page by page), starts
 * T - 1 workers and prints a READY line as pattern.c does. Worker i (1..T-1):
 *   - has its own TLS value (__thread tls_val = 0x7000 + i, tls_idx = i);
 *   - blocks SIGUSR1, SIGUSR2 and SIGRTMIN+i (the leader only SIGUSR2);
 *   - has its own alternate signal stack (sigaltstack) and nice value (i);
 *   - rewrites its own 256 KiB region without end: generation g writes
 *     g * 256 + i into every word, then reads them all back;
 * and counts in `tbad` every time one of these is not what it set (TLS value,
 * signal mask, sigaltstack, its region's words).
 * SIGRTMIN+i sent to worker i (tgkill) stays pending in that thread, SIGUSR2
 * sent to the process stays pending in the process. SIGUSR1 (taken by the
 * leader) releases them: each worker unblocks SIGRTMIN+i and SIGUSR2, the
 * leader SIGUSR2. The SIGRTMIN+i handler counts `rt` when it runs in thread i
 * (by its TLS), `rtbad` otherwise; the SIGUSR2 handler counts `usr2`.
 * Every I ms the leader prints
 *   CHECK n=.. sum=.. bad=.. tbad=.. gens=.. rt=.. rtbad=.. usr2=.. released=..
 * where sum/bad are the pattern region's checksum and wrong words, gens the
 * smallest generation count of the workers (it grows while they all run).
 * With --churn one more thread creates and joins short-lived threads (each
 * lives 1 ms) without end: `churn` counts those joined.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 16
#define BUSY_SIZE (256 * 1024)

static __thread unsigned long tls_val;
static __thread int tls_idx;

static atomic_ulong tbad, rt_ok, rt_wrong, usr2_count;
static atomic_int released;
static atomic_ulong gens[MAX_THREADS];
static int nthreads = 4;
static atomic_ulong churned;

static void *short_lived(void *arg)
{
	struct timespec pause = { 0, 1000 * 1000 };
	nanosleep(&pause, NULL);
	return arg;
}

static void *churner(void *arg)
{
	(void)arg;
	for (;;) {
		pthread_t t;
		void *ret;
		if (pthread_create(&t, NULL, short_lived, &churned) || pthread_join(t, &ret)
		    || ret != &churned)
			atomic_fetch_add(&tbad, 1);
		else
			atomic_fetch_add(&churned, 1);
	}
	return NULL;
}

static void on_rt(int sig)
{
	if (tls_idx == sig - SIGRTMIN && tls_val == 0x7000ul + (unsigned long)tls_idx)
		atomic_fetch_add(&rt_ok, 1);
	else
		atomic_fetch_add(&rt_wrong, 1);
}

static void on_usr2(int sig) { (void)sig; atomic_fetch_add(&usr2_count, 1); }
static void on_usr1(int sig) { (void)sig; atomic_store(&released, 1); }

static void mask_of(int i, sigset_t *set, int after_release)
{
	sigemptyset(set);
	if (after_release)
		sigaddset(set, SIGUSR1);
	else {
		sigaddset(set, SIGUSR1);
		sigaddset(set, SIGUSR2);
		sigaddset(set, SIGRTMIN + i);
	}
}

static int same_mask(const sigset_t *a, const sigset_t *b)
{
	for (int s = 1; s < SIGRTMAX; s++)
		if (s != SIGKILL && s != SIGSTOP && sigismember(a, s) != sigismember(b, s))
			return 0;
	return 1;
}

static void *worker(void *arg)
{
	int i = (int)(intptr_t)arg, mine_released = 0;
	tls_idx = i;
	tls_val = 0x7000ul + (unsigned long)i;
	setpriority(PRIO_PROCESS, (id_t)gettid(), i);  /* a nice value of its own */
	sigset_t want, cur;
	mask_of(i, &want, 0);
	pthread_sigmask(SIG_SETMASK, &want, NULL);
	stack_t ss = { .ss_size = 64 * 1024, .ss_flags = 0 };
	ss.ss_sp = mmap(NULL, ss.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ss.ss_sp == MAP_FAILED || sigaltstack(&ss, NULL)) { perror("sigaltstack"); exit(1); }
	uint64_t *busy = mmap(NULL, BUSY_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			      -1, 0);
	if (busy == MAP_FAILED) { perror("mmap"); exit(1); }
	size_t words = BUSY_SIZE / 8;
	for (uint64_t g = 1;; g++) {
		uint64_t v = g * 256 + (uint64_t)i;
		for (size_t w = 0; w < words; w++)
			busy[w] = v;
		for (size_t w = 0; w < words; w++)
			if (busy[w] != v) { atomic_fetch_add(&tbad, 1); break; }
		if (tls_idx != i || tls_val != 0x7000ul + (unsigned long)i)
			atomic_fetch_add(&tbad, 1);
		if (!mine_released && atomic_load(&released)) {
			mask_of(i, &want, 1);
			pthread_sigmask(SIG_SETMASK, &want, NULL);
			mine_released = 1;
		}
		pthread_sigmask(SIG_BLOCK, NULL, &cur);
		if (!same_mask(&cur, &want))
			atomic_fetch_add(&tbad, 1);
		stack_t now;
		if (sigaltstack(NULL, &now) || now.ss_sp != ss.ss_sp || now.ss_size != ss.ss_size)
			atomic_fetch_add(&tbad, 1);
		atomic_store(&gens[i], g);
		struct timespec pause = { 0, 2 * 1000 * 1000 };
		nanosleep(&pause, NULL);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	size_t mib = 8;
	uint64_t seed = 0x5EED5EED5EED5EEDull;
	long interval_ms = 100;
	int churn = 0;
	static const struct option opts[] = {
		{"threads", required_argument, NULL, 't'},
		{"mib", required_argument, NULL, 'm'},
		{"seed", required_argument, NULL, 's'},
		{"interval-ms", required_argument, NULL, 'i'},
		{"churn", no_argument, NULL, 'c'},
		{0, 0, 0, 0},
	};
	for (int c; (c = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
		switch (c) {
		case 't': nthreads = atoi(optarg); break;
		case 'm': mib = strtoull(optarg, NULL, 0); break;
		case 's': seed = strtoull(optarg, NULL, 0); break;
		case 'i': interval_ms = atol(optarg); break;
		case 'c': churn = 1; break;
		default: return 2;
		}
	}
	if (nthreads < 1 || nthreads > MAX_THREADS) return 2;
	tls_idx = 0;
	tls_val = 0x7000ul;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_flags = SA_RESTART | SA_ONSTACK;
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);
	sa.sa_handler = on_rt;
	for (int i = 1; i < nthreads; i++)
		sigaction(SIGRTMIN + i, &sa, NULL);
	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR2);
	for (int i = 1; i < nthreads; i++)
		sigaddset(&block, SIGRTMIN + i);  /* the workers' own: never taken by the leader */
	sigprocmask(SIG_SETMASK, &block, NULL);

	size_t size = mib << 20;
	uint64_t *region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED) { perror("mmap"); return 1; }
	for (size_t w = 0; w < size / 8; w++)
		region[w] = (uint64_t)(uintptr_t)&region[w] ^ seed;
	for (int i = 1; i < nthreads; i++) {
		pthread_t t;
		if (pthread_create(&t, NULL, worker, (void *)(intptr_t)i)) {
			perror("pthread_create");
			return 1;
		}
	}
	if (churn) {
		pthread_t t;
		if (pthread_create(&t, NULL, churner, NULL)) { perror("pthread_create"); return 1; }
	}
	for (int i = 1; i < nthreads; i++)  /* each has set its mask, stack and TLS */
		while (!atomic_load(&gens[i]))
			usleep(1000);
	printf("READY pid=%d addr=0x%" PRIxPTR " size=%zu seed=0x%" PRIx64
	       " locked=0x0 locked_size=0\n", getpid(), (uintptr_t)region, size, seed);
	fflush(stdout);

	int leader_released = 0;
	for (uint64_t n = 0;; n++) {
		struct timespec pause = { interval_ms / 1000, (interval_ms % 1000) * 1000000L };
		while (nanosleep(&pause, &pause) == -1 && errno == EINTR)
			;
		if (!leader_released && atomic_load(&released)) {
			sigset_t unblock;
			sigemptyset(&unblock);
			sigaddset(&unblock, SIGUSR2);
			sigprocmask(SIG_UNBLOCK, &unblock, NULL);
			leader_released = 1;
		}
		if (tls_idx != 0 || tls_val != 0x7000ul)
			atomic_fetch_add(&tbad, 1);
		uint64_t sum = 0, bad = 0;
		for (size_t w = 0; w < size / 8; w++) {
			sum += region[w];
			if (region[w] != ((uint64_t)(uintptr_t)&region[w] ^ seed))
				bad++;
		}
		unsigned long least = ~0ul;
		for (int i = 1; i < nthreads; i++)
			if (atomic_load(&gens[i]) < least)
				least = atomic_load(&gens[i]);
		printf("CHECK n=%" PRIu64 " sum=0x%016" PRIx64 " bad=%" PRIu64 " tbad=%lu gens=%lu"
		       " rt=%lu rtbad=%lu usr2=%lu released=%d churn=%lu\n", n, sum, bad,
		       atomic_load(&tbad), nthreads > 1 ? least : 0, atomic_load(&rt_ok),
		       atomic_load(&rt_wrong), atomic_load(&usr2_count), leader_released,
		       atomic_load(&churned));
		fflush(stdout);
	}
}
