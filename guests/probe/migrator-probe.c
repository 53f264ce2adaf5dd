// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * migrator-probe: the guest half of migrator.
 *
 * Runs inside the microguest's busybox initramfs with stdin and stdout on the
 * serial console.  It keeps a working set of 4 KiB pages busy with reads and
 * writes from one pinned worker per vCPU and reports, as "@MIG {json}" lines:
 *
 *   ready   working set allocated and filled, workers about to start
 *   hb      heartbeat every hb_ms (guest CLOCK_MONOTONIC)
 *   stall   a worker saw a gap above stall_us between two consecutive accesses
 *   clock_step  a worker's CLOCK_MONOTONIC went back between two accesses
 *   stats   about once a second: per-worker access counts
 *   hist    per worker log2 histogram of access-to-access gaps (after verify)
 *   verify  full content check of every page (on the "verify" command)
 *   error   bad parameters, unknown command, ...
 *
 * Every worker reads CLOCK_MONOTONIC after every access, so anything that
 * stops it (the vCPU not being scheduled, a post-copy page fault waiting on
 * the network, the VM being paused while the clock still runs) shows up as a
 * gap in that worker's own timestamp sequence.  A clock that goes back (seen
 * on a destination right after migration) is no gap: it is reported as a
 * clock_step with its size, counted as a gap of 0 in the histogram and never
 * as a stall.  Pages are owned by exactly one
 * worker, so no access needs a lock and the per-page generation counter is
 * always exact: "verify" can tell a lost or stale page from a good one.
 *
 * Parameters come from /proc/cmdline (migrator.ws_mib=, migrator.write_pct=,
 * migrator.pattern=, migrator.stall_us=, migrator.hb_ms=, migrator.threads=,
 * migrator.mode=).  Commands arrive as lines on stdin: "verify", "poweroff",
 * and "corrupt PAGE" (flips a bit in that page: a self-test for verify).
 *
 * Options: --guest      allowed to power the machine off (set by /init only;
 *                       without it "poweroff" just exits, so running the probe
 *                       on a host for a test can never power the host off)
 *          --poweroff   with --guest: drain the serial line and power off now
 *          --cmdline S  read parameters from S instead of /proc/cmdline
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define WORDS_PER_PAGE (PAGE_SIZE / sizeof(uint64_t))
#define HIST_BUCKETS 64
#define MAX_THREADS 256
#define FIRST_BAD_MAX 8
#define STALL_RING 4096
/* Stall lines per heartbeat: a threshold below the noise floor must not turn
 * the serial line into the bottleneck; the rest wait in the ring. */
#define STALL_DRAIN_MAX 64
#define OUT_MAX 16384
#define CMD_MAX 256
#define STATS_PERIOD_NS 1000000000ull
/* Never let the working set take the guest's last MiBs: MAP_POPULATE beyond
 * MemAvailable ends in the OOM killer, not in a clean error line. */
#define MEM_RESERVE_KIB (24u * 1024u)

#define HEADER_MAGIC 0x4d49475250524f42ull /* "MIGRPROB" */
#define BODY_MAGIC 0x5a17c0de0badf00dull
#define BODY_MUL_PAGE 0x9e3779b97f4a7c15ull
#define BODY_MUL_WORD 0xc2b2ae3d27d4eb4full

/* ------------------------------------------------------------------------ */
/* Page content                                                              */

/* Word 0 of a page: its index and generation, so a stale page (older
 * generation) and a misplaced page (other index) are both caught. */
static inline uint64_t page_header(uint64_t idx, uint32_t gen)
{
	return ((idx << 32) | gen) ^ HEADER_MAGIC;
}

/* Words 1..511: depend on index and position only.  Both multipliers are odd,
 * so different pages differ in every word, and no word of any page is zero
 * except by a 2^-64 accident (a zero-filled page never passes). */
static inline uint64_t body_word(uint64_t idx, uint64_t w)
{
	return (idx * BODY_MUL_PAGE) ^ (w * BODY_MUL_WORD) ^ BODY_MAGIC;
}

/* ------------------------------------------------------------------------ */
/* Parameters                                                                */

struct params {
	unsigned ws_mib;
	unsigned write_pct;
	bool random;
	unsigned stall_us;
	unsigned hb_ms;
	unsigned threads; /* 0: one per online CPU */
	bool mode_boot;
};

static struct params P = {
	.ws_mib = 256,
	.write_pct = 50,
	.random = true,
	.stall_us = 1000,
	.hb_ms = 100,
	.threads = 0,
	.mode_boot = false,
};

/* ------------------------------------------------------------------------ */
/* Output: one write() per line so lines never tear between our own writes. */

static bool guest_mode;

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return; /* nowhere left to report it */
		}
		buf += n;
		len -= (size_t)n;
	}
}

struct line {
	char buf[OUT_MAX];
	size_t len;
	bool overflow;
};

static void line_add(struct line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void line_add(struct line *l, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (l->overflow)
		return;
	va_start(ap, fmt);
	n = vsnprintf(l->buf + l->len, sizeof(l->buf) - l->len, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(l->buf) - l->len - 1)
		l->overflow = true;
	else
		l->len += (size_t)n;
}

static void line_begin(struct line *l, const char *type)
{
	l->len = 0;
	l->overflow = false;
	line_add(l, "@MIG {\"t\":\"%s\"", type);
}

static void line_emit(struct line *l)
{
	if (l->overflow) {
		/* A torn JSON object is worse than none: say so in one that fits. */
		static const char msg[] = "@MIG {\"t\":\"error\",\"msg\":\"output line overflow\"}\n";

		write_all(STDOUT_FILENO, msg, sizeof(msg) - 1);
		return;
	}
	line_add(l, "}\n");
	write_all(STDOUT_FILENO, l->buf, l->len);
}

/* JSON string body for an arbitrary byte string (commands echo user input). */
static void line_add_json_string(struct line *l, const char *s)
{
	line_add(l, "\"");
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\')
			line_add(l, "\\%c", c);
		else if (c < 0x20 || c >= 0x7f)
			line_add(l, "\\u%04x", c);
		else
			line_add(l, "%c", c);
	}
	line_add(l, "\"");
}

static struct line out; /* main thread only */

static void emit_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void emit_error(const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	line_begin(&out, "error");
	line_add(&out, ",\"msg\":");
	line_add_json_string(&out, msg);
	line_add(&out, ",\"g\":%" PRIu64, mono_ns());
	line_emit(&out);
}

static void power_off(int status) __attribute__((noreturn));

static void power_off(int status)
{
	if (guest_mode) {
		/* reboot(2) does not wait for the UART: without the drain the
		 * last line may still sit in the tty buffer when QEMU exits. */
		tcdrain(STDOUT_FILENO);
		sync();
		reboot(RB_POWER_OFF);
		/* Only reachable without CAP_SYS_BOOT: let /init try. */
	}
	exit(status);
}

/* ------------------------------------------------------------------------ */
/* Parameter parsing                                                         */

static bool parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out_val)
{
	char *end;
	unsigned long long v;

	if (*s < '0' || *s > '9')
		return false;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end != '\0' || v < lo || v > hi)
		return false;
	*out_val = (unsigned)v;
	return true;
}

/* Returns false after printing an error line. */
static bool parse_cmdline(char *cmdline)
{
	static const char prefix[] = "migrator.";
	char *save = NULL;

	for (char *tok = strtok_r(cmdline, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
		char *key, *val;
		bool ok;

		if (strncmp(tok, prefix, sizeof(prefix) - 1) != 0)
			continue;
		key = tok + sizeof(prefix) - 1;
		val = strchr(key, '=');
		if (!val) {
			emit_error("parameter %s has no value", tok);
			return false;
		}
		*val++ = '\0';
		if (!strcmp(key, "ws_mib")) {
			ok = parse_uint(val, 1, 1u << 20, &P.ws_mib);
		} else if (!strcmp(key, "write_pct")) {
			ok = parse_uint(val, 0, 100, &P.write_pct);
		} else if (!strcmp(key, "stall_us")) {
			ok = parse_uint(val, 1, 60000000, &P.stall_us);
		} else if (!strcmp(key, "hb_ms")) {
			ok = parse_uint(val, 1, 60000, &P.hb_ms);
		} else if (!strcmp(key, "threads")) {
			ok = parse_uint(val, 0, MAX_THREADS, &P.threads);
		} else if (!strcmp(key, "pattern")) {
			ok = !strcmp(val, "random") || !strcmp(val, "sequential");
			P.random = !strcmp(val, "random");
		} else if (!strcmp(key, "mode")) {
			ok = !strcmp(val, "run") || !strcmp(val, "boot");
			P.mode_boot = !strcmp(val, "boot");
		} else {
			emit_error("unknown parameter migrator.%s", key);
			return false;
		}
		if (!ok) {
			emit_error("bad value for migrator.%s: %s", key, val);
			return false;
		}
	}
	return true;
}

/* Reads a small /proc file into buf (NUL-terminated); NULL on error. */
static char *read_file(const char *path, char *buf, size_t size)
{
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return NULL;
	n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return NULL;
	buf[n] = '\0';
	return buf;
}

static long mem_available_kib(void)
{
	char buf[4096];
	char *text = read_file("/proc/meminfo", buf, sizeof(buf));
	char *p = text ? strstr(text, "MemAvailable:") : NULL;

	return p ? strtol(p + strlen("MemAvailable:"), NULL, 10) : -1;
}

/* ------------------------------------------------------------------------ */
/* Workers                                                                   */

/* A stall, or (back) a step back of the clock by gap_ns after the access at start_ns. */
struct stall {
	int cpu;
	bool back;
	uint64_t start_ns;
	uint64_t gap_ns;
};

/* total counts stalls, steps_back clock steps; dropped counts both kinds. */
static struct {
	pthread_mutex_t lock;
	struct stall ring[STALL_RING];
	unsigned head, count;
	uint64_t total, steps_back, dropped;
} stalls = { .lock = PTHREAD_MUTEX_INITIALIZER };

struct worker {
	pthread_t thread;
	unsigned index;
	int cpu;
	uint64_t first; /* first page owned */
	uint64_t count; /* pages owned */
	uint64_t rng;
	uint64_t ops; /* written by the worker, read by main: relaxed atomics */
	uint64_t read_mismatches;
	uint64_t max_gap;
	uint64_t hist[HIST_BUCKETS];
	/* verify results, written by the verifier thread for this slice */
	uint64_t bad_pages;
	uint64_t first_bad[FIRST_BAD_MAX];
	unsigned n_first_bad;
} __attribute__((aligned(64)));

static uint64_t *mem;         /* the working set */
static uint32_t *generation;  /* per page, owned by the page's worker */
static uint64_t n_pages;
static unsigned n_workers;
static struct worker workers[MAX_THREADS];
static pthread_barrier_t filled;
static int stop_flag;         /* relaxed atomic: workers leave their loop */
static unsigned verify_left;  /* atomic: verifier threads still running */
static int done_pipe[2];      /* last verifier writes a byte: wakes main */

static inline uint64_t xorshift64(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

/* Uniform in [0, n) without a division: the high half of a 64x64 product. */
static inline uint64_t below(uint64_t r, uint64_t n)
{
	return (uint64_t)(((unsigned __int128)r * n) >> 64);
}

static void pin_to(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	/* Failure only costs the per-vCPU attribution; the run still means something. */
	(void)sched_setaffinity(0, sizeof(set), &set);
}

static void record_stall(struct worker *w, bool back, uint64_t start, uint64_t gap)
{
	pthread_mutex_lock(&stalls.lock);
	if (back)
		stalls.steps_back++;
	else
		stalls.total++;
	if (stalls.count == STALL_RING) {
		stalls.dropped++;
	} else {
		unsigned slot = (stalls.head + stalls.count) % STALL_RING;

		stalls.ring[slot] = (struct stall){ w->cpu, back, start, gap };
		stalls.count++;
	}
	pthread_mutex_unlock(&stalls.lock);
}

/* now - then, or 0 when the clock went back in between (never an unsigned wrap). */
static inline uint64_t elapsed(uint64_t then, uint64_t now)
{
	return now > then ? now - then : 0;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	const uint64_t stall_ns = (uint64_t)P.stall_us * 1000u;
	/* write_pct=100 gives 2^32: every 32-bit draw is below it. */
	const uint64_t write_below = ((uint64_t)P.write_pct << 32) / 100u;
	uint64_t pos = 0, ops = 0, mismatches = 0, max_gap = 0, prev;

	pin_to(w->cpu);
	/* First touch from the owning vCPU, in parallel: fill time scales with
	 * vCPUs, which matters under TCG. */
	for (uint64_t i = w->first; i < w->first + w->count; i++) {
		uint64_t *page = mem + i * WORDS_PER_PAGE;

		page[0] = page_header(i, 0);
		for (uint64_t k = 1; k < WORDS_PER_PAGE; k++)
			page[k] = body_word(i, k);
	}
	pthread_barrier_wait(&filled);

	prev = mono_ns();
	while (!__atomic_load_n(&stop_flag, __ATOMIC_RELAXED)) {
		uint64_t r = xorshift64(&w->rng);
		uint64_t idx, now, gap;
		uint64_t *page;

		if (P.random) {
			idx = w->first + below(r, w->count);
		} else {
			idx = w->first + pos;
			if (++pos == w->count)
				pos = 0;
		}
		page = mem + idx * WORDS_PER_PAGE;
		/* The low 32 bits decide read or write; the high bits chose the page. */
		if ((r & 0xffffffffu) < write_below) {
			uint32_t gen = generation[idx] + 1;

			generation[idx] = gen;
			__atomic_store_n(&page[0], page_header(idx, gen), __ATOMIC_RELAXED);
		} else {
			/* Header plus one body word, rotating through the page, so reads
			 * also notice a page whose body is wrong. */
			uint64_t k = ops & (WORDS_PER_PAGE - 1);

			if (k == 0)
				k = 1;

			if (__atomic_load_n(&page[0], __ATOMIC_RELAXED) != page_header(idx, generation[idx]) ||
			    __atomic_load_n(&page[k], __ATOMIC_RELAXED) != body_word(idx, k))
				mismatches++;
		}
		now = mono_ns();
		/* A step back is not a stall: reported with its size, a gap of 0 here. */
		if (now < prev)
			record_stall(w, true, prev, prev - now);
		gap = elapsed(prev, now);
		w->hist[63 - __builtin_clzll(gap | 1)]++;
		if (gap > max_gap)
			max_gap = gap;
		if (gap > stall_ns)
			record_stall(w, false, prev, gap);
		prev = now;
		__atomic_store_n(&w->ops, ++ops, __ATOMIC_RELAXED);
	}
	w->read_mismatches = mismatches;
	w->max_gap = max_gap;
	return NULL;
}

static void *verifier_main(void *arg)
{
	struct worker *w = arg;

	pin_to(w->cpu);
	w->bad_pages = 0;
	w->n_first_bad = 0;
	for (uint64_t i = w->first; i < w->first + w->count; i++) {
		const uint64_t *page = mem + i * WORDS_PER_PAGE;
		bool bad = page[0] != page_header(i, generation[i]);

		for (uint64_t k = 1; k < WORDS_PER_PAGE && !bad; k++)
			bad = page[k] != body_word(i, k);
		if (bad) {
			if (w->n_first_bad < FIRST_BAD_MAX)
				w->first_bad[w->n_first_bad++] = i;
			w->bad_pages++;
		}
	}
	if (__atomic_sub_fetch(&verify_left, 1, __ATOMIC_ACQ_REL) == 0) {
		char byte = 1;

		(void)!write(done_pipe[1], &byte, 1);
	}
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* Main thread: heartbeats, stall and stats lines, commands                  */

enum state { RUNNING, VERIFYING, IDLE };

static enum state state = RUNNING;
static uint64_t verify_started_ns;

static void emit_stalls(void)
{
	struct stall batch[STALL_DRAIN_MAX];
	unsigned n = 0;

	pthread_mutex_lock(&stalls.lock);
	while (stalls.count > 0 && n < STALL_DRAIN_MAX) {
		batch[n++] = stalls.ring[stalls.head];
		stalls.head = (stalls.head + 1) % STALL_RING;
		stalls.count--;
	}
	pthread_mutex_unlock(&stalls.lock);
	/* Print outside the lock: the serial write may block. */
	for (unsigned i = 0; i < n; i++) {
		line_begin(&out, batch[i].back ? "clock_step" : "stall");
		line_add(&out, ",\"cpu\":%d,\"g\":%" PRIu64 ",\"%s\":%" PRIu64, batch[i].cpu,
			 batch[i].start_ns, batch[i].back ? "back" : "gap", batch[i].gap_ns);
		line_emit(&out);
	}
}

static void emit_stats(void)
{
	uint64_t total, steps_back, dropped;

	pthread_mutex_lock(&stalls.lock);
	total = stalls.total;
	steps_back = stalls.steps_back;
	dropped = stalls.dropped;
	pthread_mutex_unlock(&stalls.lock);
	line_begin(&out, "stats");
	line_add(&out, ",\"g\":%" PRIu64 ",\"ops\":[", mono_ns());
	for (unsigned i = 0; i < n_workers; i++)
		line_add(&out, "%s%" PRIu64, i ? "," : "", __atomic_load_n(&workers[i].ops, __ATOMIC_RELAXED));
	line_add(&out, "],\"stalls\":%" PRIu64 ",\"clock_steps\":%" PRIu64 ",\"dropped\":%" PRIu64
		 ",\"running\":%s", total, steps_back, dropped, state == RUNNING ? "true" : "false");
	line_emit(&out);
}

static void start_threads(void *(*fn)(void *))
{
	for (unsigned i = 0; i < n_workers; i++) {
		int err = pthread_create(&workers[i].thread, NULL, fn, &workers[i]);

		if (err) {
			emit_error("pthread_create: %s", strerror(err));
			power_off(1);
		}
	}
}

static void join_threads(void)
{
	for (unsigned i = 0; i < n_workers; i++)
		pthread_join(workers[i].thread, NULL);
}

static void start_verify(void)
{
	if (state == RUNNING) {
		/* A worker blocked in a post-copy fault delays this join; that is
		 * the guest's reality, not something to hide. */
		__atomic_store_n(&stop_flag, 1, __ATOMIC_RELAXED);
		join_threads();
	}
	state = VERIFYING;
	verify_started_ns = mono_ns();
	__atomic_store_n(&verify_left, n_workers, __ATOMIC_RELEASE);
	start_threads(verifier_main);
}

static void finish_verify(void)
{
	uint64_t bad = 0, mism = 0, now;
	unsigned n_first = 0;
	uint64_t first[FIRST_BAD_MAX];
	char byte;

	(void)!read(done_pipe[0], &byte, 1);
	join_threads();
	now = mono_ns();
	for (unsigned i = 0; i < n_workers; i++) {
		struct worker *w = &workers[i];
		unsigned last = 0;

		for (unsigned b = 0; b < HIST_BUCKETS; b++)
			if (w->hist[b])
				last = b + 1;
		line_begin(&out, "hist");
		line_add(&out, ",\"cpu\":%d,\"buckets\":[", w->cpu);
		for (unsigned b = 0; b < last; b++)
			line_add(&out, "%s%" PRIu64, b ? "," : "", w->hist[b]);
		line_add(&out, "],\"max\":%" PRIu64 ",\"ops\":%" PRIu64, w->max_gap, w->ops);
		line_emit(&out);
		/* Slices are contiguous and in worker order: the global first bad
		 * pages are the concatenation's prefix. */
		for (unsigned k = 0; k < w->n_first_bad && n_first < FIRST_BAD_MAX; k++)
			first[n_first++] = w->first_bad[k];
		bad += w->bad_pages;
		mism += w->read_mismatches;
	}
	line_begin(&out, "verify");
	line_add(&out, ",\"pages\":%" PRIu64 ",\"bad_pages\":%" PRIu64 ",\"first_bad\":[", n_pages, bad);
	for (unsigned k = 0; k < n_first; k++)
		line_add(&out, "%s%" PRIu64, k ? "," : "", first[k]);
	line_add(&out, "],\"read_mismatches\":%" PRIu64 ",\"g\":%" PRIu64 ",\"ns\":%" PRIu64, mism, now,
		 elapsed(verify_started_ns, now));
	line_emit(&out);
	state = IDLE;
}

static void handle_command(char *cmd)
{
	size_t len = strlen(cmd);

	while (len && (cmd[len - 1] == ' ' || cmd[len - 1] == '\t'))
		cmd[--len] = '\0';
	while (*cmd == ' ' || *cmd == '\t')
		cmd++;
	if (*cmd == '\0')
		return;
	if (!strcmp(cmd, "verify")) {
		if (state == VERIFYING)
			emit_error("verify already running");
		else
			start_verify();
	} else if (!strcmp(cmd, "poweroff")) {
		power_off(0);
	} else if (!strncmp(cmd, "corrupt ", 8)) {
		/* Self-test of the checkers: flip one bit of one body word, so a
		 * test can see verify (and, while running, reads) catch it. */
		char *end;
		unsigned long long page;

		errno = 0;
		page = strtoull(cmd + 8, &end, 10);
		if (errno || *end != '\0' || end == cmd + 8 || page >= n_pages)
			emit_error("corrupt needs a page index below %" PRIu64, n_pages);
		else if (state == VERIFYING)
			emit_error("cannot corrupt while verify runs");
		else
			__atomic_fetch_xor(&mem[page * WORDS_PER_PAGE + 1], 1, __ATOMIC_RELAXED);
	} else {
		line_begin(&out, "error");
		line_add(&out, ",\"msg\":\"unknown command\",\"cmd\":");
		line_add_json_string(&out, cmd);
		line_add(&out, ",\"g\":%" PRIu64, mono_ns());
		line_emit(&out);
	}
}

/* Splits stdin into lines; tolerates \r\n, \r, and lines longer than CMD_MAX.
 * Returns false when stdin is gone for good. */
static bool read_commands(void)
{
	static char buf[CMD_MAX];
	static size_t len;
	static bool discarding;
	char chunk[512];
	ssize_t n = read(STDIN_FILENO, chunk, sizeof(chunk));

	if (n < 0)
		return errno == EINTR || errno == EAGAIN;
	/* A canonical tty returns 0 for a ^D from line noise: keep listening.
	 * Anything else (a pipe in a host test) returning 0 is at its end. */
	if (n == 0)
		return isatty(STDIN_FILENO);
	for (ssize_t i = 0; i < n; i++) {
		char c = chunk[i];

		if (c == '\n' || c == '\r') {
			if (discarding)
				emit_error("command line too long");
			else if (len) {
				buf[len] = '\0';
				handle_command(buf);
			}
			len = 0;
			discarding = false;
		} else if (len < sizeof(buf) - 1) {
			buf[len++] = c;
		} else {
			discarding = true;
		}
	}
	return true;
}

static void main_loop(uint64_t first_hb)
{
	const uint64_t hb_ns = (uint64_t)P.hb_ms * 1000000u;
	/* Stats ride on the heartbeat schedule, every ~STATS_PERIOD_NS. */
	const uint64_t stats_every = hb_ns >= STATS_PERIOD_NS ? 1 : (STATS_PERIOD_NS + hb_ns / 2) / hb_ns;
	uint64_t next_hb = first_hb, seq = 0;
	bool stdin_open = true;

	for (;;) {
		uint64_t now = mono_ns();
		struct pollfd fds[2] = {
			{ .fd = done_pipe[0], .events = POLLIN },
			{ .fd = STDIN_FILENO, .events = POLLIN },
		};
		struct timespec timeout;

		if (now >= next_hb) {
			emit_stalls();
			line_begin(&out, "hb");
			line_add(&out, ",\"seq\":%" PRIu64 ",\"g\":%" PRIu64, seq, now);
			line_emit(&out);
			if (++seq % stats_every == 0)
				emit_stats();
			/* Keep the schedule absolute (no drift); after falling behind by
			 * more than a period, restart it instead of bursting. */
			next_hb += hb_ns;
			if (next_hb <= now)
				next_hb = now + hb_ns;
			continue;
		}
		timeout.tv_sec = (time_t)((next_hb - now) / 1000000000u);
		timeout.tv_nsec = (long)((next_hb - now) % 1000000000u);
		if (ppoll(fds, stdin_open ? 2 : 1, &timeout, NULL) <= 0)
			continue;
		if (fds[0].revents & POLLIN)
			finish_verify();
		if (stdin_open && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) {
			if ((fds[1].revents & (POLLHUP | POLLERR)) && !(fds[1].revents & POLLIN))
				stdin_open = false;
			else
				stdin_open = read_commands();
			if (!stdin_open)
				emit_error("stdin closed; commands no longer accepted");
		}
	}
}

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	static char cmdline_buf[8192];
	const char *cmdline_arg = NULL;
	bool poweroff_now = false;
	char *cmdline;
	cpu_set_t online;
	int cpus[MAX_THREADS];
	unsigned n_cpus = 0;
	uint64_t t0, t_ready, seed;
	long avail;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--guest")) {
			guest_mode = true;
		} else if (!strcmp(argv[i], "--poweroff")) {
			poweroff_now = true;
		} else if (!strcmp(argv[i], "--cmdline") && i + 1 < argc) {
			cmdline_arg = argv[++i];
		} else {
			emit_error("usage: migrator-probe [--guest] [--poweroff] [--cmdline STRING]");
			return 2;
		}
	}
	if (poweroff_now)
		power_off(0);

	if (cmdline_arg) {
		snprintf(cmdline_buf, sizeof(cmdline_buf), "%s", cmdline_arg);
		cmdline = cmdline_buf;
	} else {
		cmdline = read_file("/proc/cmdline", cmdline_buf, sizeof(cmdline_buf));
		if (!cmdline) {
			emit_error("cannot read /proc/cmdline: %s", strerror(errno));
			power_off(1);
		}
	}
	if (!parse_cmdline(cmdline))
		power_off(2);
	if (P.mode_boot)
		power_off(0);

	if (sched_getaffinity(0, sizeof(online), &online) != 0) {
		emit_error("sched_getaffinity: %s", strerror(errno));
		power_off(1);
	}
	for (int c = 0; c < CPU_SETSIZE && n_cpus < MAX_THREADS; c++)
		if (CPU_ISSET(c, &online))
			cpus[n_cpus++] = c;
	n_workers = P.threads ? P.threads : n_cpus;
	if (n_workers > n_cpus) {
		/* Two workers time-sharing a vCPU would see the scheduler's slices
		 * as stalls. */
		emit_error("migrator.threads=%u exceeds the %u online CPUs", P.threads, n_cpus);
		power_off(2);
	}

	n_pages = (uint64_t)P.ws_mib * (1024u * 1024u / PAGE_SIZE);
	if (n_pages < n_workers) {
		emit_error("working set of %" PRIu64 " pages is smaller than %u threads", n_pages, n_workers);
		power_off(2);
	}
	avail = mem_available_kib();
	if (avail >= 0 && (uint64_t)P.ws_mib * 1024u + MEM_RESERVE_KIB > (uint64_t)avail) {
		emit_error("migrator.ws_mib=%u does not fit: MemAvailable is %ld KiB", P.ws_mib, avail);
		power_off(2);
	}

	t0 = mono_ns();
	mem = mmap(NULL, n_pages * PAGE_SIZE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	generation = calloc(n_pages, sizeof(*generation));
	if (mem == MAP_FAILED || !generation) {
		emit_error("cannot allocate a %u MiB working set: %s", P.ws_mib, strerror(errno));
		power_off(1);
	}
	if (pipe2(done_pipe, O_CLOEXEC) != 0) {
		emit_error("pipe2: %s", strerror(errno));
		power_off(1);
	}

	seed = t0 ^ 0x2545f4914f6cdd1dull;
	for (unsigned i = 0; i < n_workers; i++) {
		struct worker *w = &workers[i];

		w->index = i;
		w->cpu = cpus[i];
		w->first = n_pages * i / n_workers;
		w->count = n_pages * (i + 1) / n_workers - w->first;
		w->rng = (seed + i * 0x9e3779b97f4a7c15ull) | 1; /* xorshift must not start at 0 */
	}
	pthread_barrier_init(&filled, NULL, n_workers + 1);
	start_threads(worker_main);
	pthread_barrier_wait(&filled);
	t_ready = mono_ns();

	line_begin(&out, "ready");
	line_add(&out, ",\"pages\":%" PRIu64 ",\"threads\":%u,\"ws_mib\":%u,\"g\":%" PRIu64
		 ",\"fill_ns\":%" PRIu64 ",\"cpus\":[",
		 n_pages, n_workers, P.ws_mib, t_ready, elapsed(t0, t_ready));
	for (unsigned i = 0; i < n_workers; i++)
		line_add(&out, "%s%d", i ? "," : "", workers[i].cpu);
	line_add(&out, "],\"write_pct\":%u,\"pattern\":\"%s\",\"stall_us\":%u,\"hb_ms\":%u", P.write_pct,
		 P.random ? "random" : "sequential", P.stall_us, P.hb_ms);
	line_emit(&out);

	main_loop(t_ready + (uint64_t)P.hb_ms * 1000000u);
	return 0;
}
