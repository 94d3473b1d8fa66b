/* Per-program kernel duration profiles: the file behind TALLY_PROFILE_FILE.
 *
 * The scheduler (sched.c) learns a duration estimate per (kernel, grid x block
 * threads) while a best-effort program runs. This file carries those estimates
 * from one run of a program to the next, and from a `tally trace` recording to
 * the first gated run (`tally profiles seed`). The format is defined in
 * docs/scheduling.md ("Profile files"); src/tally/profiles.py is the reference
 * reader and writer, and this one must accept exactly what it accepts:
 *
 *   tally-profiles 1 <N>\n
 *   <fnv1a64 of the mangled name, 16 lowercase hex> <grid_threads> <est_ns> <samples> <mangled name>\n
 *   ... N such lines, nothing after them
 *
 * A file that is not exactly that (foreign, other version, truncated, a line
 * whose hash does not match its name, a duplicate key) is ignored with one
 * warning and never trusted. Writes go to a temporary file in the same
 * directory that is then renamed over the old one, so a reader sees the whole
 * old file or the whole new one.
 *
 * In the process, kernels are CUfunction pointers. A CUfunction's name is
 * hashed once, the first time it is launched (tally_profiles_name).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

#define MAGIC "tally-profiles"
#define MAX_FILE_BYTES (32u << 20)
#define FILE_SLOTS (2 * TALLY_PROFILES_MAX_KERNELS) /* open addressing, at most half full */
#define NAME_SLOTS 8192                             /* CUfunctions whose name is known */

TALLY_EXPORT uint64_t tally_fnv1a64(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* ------------------------------------------------------------- warnings */

static atomic_int warned;

static void profile_warning(const char *path, const char *what) {
    if (atomic_exchange(&warned, 1)) return;
    fprintf(stderr, "tally: warning: profile file %s %s\n", path, what);
}

/* ------------------------------------------------------------- parsing */

struct table {
    struct tally_profile_entry *slots; /* FILE_SLOTS entries; samples == 0 marks a free one */
    size_t n;
};

static size_t table_home(uint64_t name_hash, uint64_t grid_threads) {
    uint64_t h = name_hash ^ (grid_threads * 0x9E3779B97F4A7C15ull);
    return (size_t)((h ^ (h >> 29)) % FILE_SLOTS);
}

static struct tally_profile_entry *table_find(struct table *t, uint64_t name_hash, uint64_t grid_threads,
                                              int insert) {
    if (!t->slots) return NULL;
    for (size_t i = table_home(name_hash, grid_threads), probe = 0; probe < FILE_SLOTS;
         probe++, i = (i + 1) % FILE_SLOTS) {
        struct tally_profile_entry *e = &t->slots[i];
        if (e->samples == 0) return insert ? e : NULL;
        if (e->name_hash == name_hash && e->grid_threads == grid_threads) return e;
    }
    return NULL;
}

static void table_free(struct table *t) {
    if (t->slots)
        for (size_t i = 0; i < FILE_SLOTS; i++) free((char *)t->slots[i].name);
    free(t->slots);
    t->slots = NULL;
    t->n = 0;
}

/* A canonical unsigned decimal (no sign, no leading zero) ending at `end`. */
static int parse_u64(const char **p, const char *end, char stop, uint64_t *out) {
    const char *s = *p;
    uint64_t v = 0;
    if (s >= end || *s < '0' || *s > '9') return 0;
    if (*s == '0' && s + 1 < end && s[1] >= '0' && s[1] <= '9') return 0;
    for (; s < end && *s >= '0' && *s <= '9'; s++) {
        unsigned d = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - d) / 10) return 0;
        v = v * 10 + d;
    }
    if (s >= end || *s != stop) return 0;
    *p = s + 1;
    *out = v;
    return 1;
}

static int parse_hex16(const char **p, const char *end, uint64_t *out) {
    const char *s = *p;
    uint64_t v = 0;
    if (end - s < 17) return 0;
    for (int i = 0; i < 16; i++, s++) {
        int d = *s >= '0' && *s <= '9' ? *s - '0' : *s >= 'a' && *s <= 'f' ? *s - 'a' + 10 : -1;
        if (d < 0) return 0;
        v = v << 4 | (uint64_t)d;
    }
    if (*s != ' ') return 0;
    *p = s + 1;
    *out = v;
    return 1;
}

/* Parses a whole file's bytes into t. Returns NULL, or why the file is not one. */
static const char *parse(const char *buf, size_t len, struct table *t) {
    const char *p = buf, *end = buf + len;
    size_t magic = sizeof MAGIC - 1;
    if (len < magic + 1 || memcmp(p, MAGIC, magic) != 0 || p[magic] != ' ') return "is not a tally profile file";
    p += magic + 1;
    uint64_t version, count;
    if (!parse_u64(&p, end, ' ', &version)) return "is not a tally profile file";
    if (version != TALLY_PROFILES_VERSION) return "has another format version (written by another tally version?)";
    if (!parse_u64(&p, end, '\n', &count)) return "has a malformed header";
    if (count > TALLY_PROFILES_MAX_KERNELS) return "lists more kernels than allowed";
    t->slots = calloc(FILE_SLOTS, sizeof *t->slots);
    if (!t->slots) return "cannot be read (out of memory)";
    for (uint64_t i = 0; i < count; i++) {
        uint64_t hash, grid_threads, est, samples;
        if (!parse_hex16(&p, end, &hash) || !parse_u64(&p, end, ' ', &grid_threads) ||
            !parse_u64(&p, end, ' ', &est) || !parse_u64(&p, end, ' ', &samples))
            return "is truncated or corrupt";
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) return "is truncated or corrupt";
        size_t n = (size_t)(nl - p);
        if (n == 0 || n > TALLY_PROFILES_MAX_NAME || memchr(p, '\r', n) || memchr(p, '\0', n))
            return "is truncated or corrupt";
        if (est == 0 || est > INT64_MAX || samples == 0 || samples > INT64_MAX) return "is truncated or corrupt";
        if (tally_fnv1a64(p, n) != hash) return "is truncated or corrupt (a name does not match its hash)";
        struct tally_profile_entry *e = table_find(t, hash, grid_threads, 1);
        if (!e || e->samples) return "is corrupt (a kernel is listed twice)";
        char *name = malloc(n + 1);
        if (!name) return "cannot be read (out of memory)";
        memcpy(name, p, n);
        name[n] = 0;
        *e = (struct tally_profile_entry){hash, grid_threads, est, samples, name};
        t->n++;
        p = nl + 1;
    }
    if (p != end) return "is corrupt (bytes after its last kernel)";
    return NULL;
}

/* Reads path into t. Returns 0 when the file does not exist (t empty), 1 when
 * it was read, -1 when it is not a usable profile file (t empty, *why says why). */
static int read_file(const char *path, struct table *t, const char **why) {
    memset(t, 0, sizeof *t);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR) return 0;
        *why = "cannot be read";
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size > MAX_FILE_BYTES) {
        close(fd);
        *why = "is not a tally profile file";
        return -1;
    }
    size_t len = (size_t)st.st_size, got = 0;
    char *buf = malloc(len + 1);
    if (!buf) {
        close(fd);
        *why = "cannot be read (out of memory)";
        return -1;
    }
    while (got < len) {
        ssize_t r = read(fd, buf + got, len - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    *why = parse(buf, got, t);
    free(buf);
    if (*why) {
        table_free(t);
        return -1;
    }
    return 1;
}

/* --------------------------------------------------------- this process */

static struct {
    pthread_mutex_t lock;
    char path[4096];
    int loaded;
    pid_t pid;                 /* the process that loaded: a forked child does not save */
    struct table seeds;        /* the file as it was at join; read-only afterwards */
    struct tally_kernel_name names[NAME_SLOTS];
} P = {.lock = PTHREAD_MUTEX_INITIALIZER};

int tally_profiles_load(void) {
    const char *path = getenv("TALLY_PROFILE_FILE");
    if (!path || !*path || strlen(path) >= sizeof P.path) return 0;
    pthread_mutex_lock(&P.lock);
    if (!P.loaded) {
        snprintf(P.path, sizeof P.path, "%s", path);
        const char *why = NULL;
        if (read_file(P.path, &P.seeds, &why) < 0) {
            char what[256];
            snprintf(what, sizeof what, "%s; it is ignored, kernel estimates start from scratch", why);
            profile_warning(P.path, what);
        }
        P.pid = getpid();
        P.loaded = 1;
    }
    pthread_mutex_unlock(&P.lock);
    return 1;
}

const struct tally_kernel_name *tally_profiles_name(uintptr_t kernel, const char *symbol) {
    if (!kernel || !P.loaded) return NULL; /* no profile file: names are not needed */
    size_t home = (size_t)((kernel * 0x9E3779B97F4A7C15ull) >> 40) % NAME_SLOTS;
    const struct tally_kernel_name *found = NULL;
    pthread_mutex_lock(&P.lock);
    for (size_t i = home, probe = 0; probe < 64; probe++, i = (i + 1) % NAME_SLOTS) {
        struct tally_kernel_name *k = &P.names[i];
        if (k->kernel == kernel) {
            found = k->name ? k : NULL;
            break;
        }
        if (k->kernel == 0) {
            /* First sight of this CUfunction: copy and hash its name once. CUPTI's
             * symbolName need not outlive the callback. */
            size_t n = symbol ? strnlen(symbol, TALLY_PROFILES_MAX_NAME + 1) : 0;
            k->kernel = kernel;
            if (n == 0 || n > TALLY_PROFILES_MAX_NAME || strpbrk(symbol, "\r\n")) break; /* not persistable */
            char *copy = malloc(n + 1);
            if (!copy) break;
            memcpy(copy, symbol, n + 1);
            k->hash = tally_fnv1a64(copy, n);
            k->name = copy;
            found = k;
            break;
        }
    }
    pthread_mutex_unlock(&P.lock);
    return found;
}

int tally_profiles_seed(uint64_t name_hash, uint64_t grid_threads, uint64_t *est_ns, uint64_t *samples) {
    /* P.seeds is written once, under the lock, before any launch is gated. */
    struct tally_profile_entry *e = table_find(&P.seeds, name_hash, grid_threads, 0);
    if (!e) return 0;
    *est_ns = e->est_ns;
    *samples = e->samples;
    return 1;
}

/* ---------------------------------------------------------------- saving */

static int by_samples(const void *a, const void *b) {
    const struct tally_profile_entry *x = *(struct tally_profile_entry *const *)a;
    const struct tally_profile_entry *y = *(struct tally_profile_entry *const *)b;
    if (x->samples != y->samples) return x->samples > y->samples ? -1 : 1;
    if (x->name_hash != y->name_hash) return x->name_hash < y->name_hash ? -1 : 1;
    if (x->grid_threads != y->grid_threads) return x->grid_threads < y->grid_threads ? -1 : 1;
    return 0;
}

static int make_parent_dirs(const char *path) {
    char dir[sizeof P.path];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir) return 0;
    *slash = 0;
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(dir, 0777) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(dir, 0777) != 0 && errno != EEXIST ? -1 : 0;
}

static int write_all(int fd, const char *s, size_t n) {
    while (n) {
        ssize_t w = write(fd, s, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

static int write_table(const char *path, struct table *t) {
    struct tally_profile_entry **order = malloc((t->n ? t->n : 1) * sizeof *order);
    if (!order) return -1;
    size_t n = 0;
    for (size_t i = 0; i < FILE_SLOTS; i++)
        if (t->slots[i].samples) order[n++] = &t->slots[i];
    qsort(order, n, sizeof *order, by_samples);
    if (n > TALLY_PROFILES_MAX_KERNELS) n = TALLY_PROFILES_MAX_KERNELS; /* the most-used kernels stay */
    char tmp[sizeof P.path + 64];
    snprintf(tmp, sizeof tmp, "%s.tmp-%d-%llu", path, (int)getpid(), (unsigned long long)tally_now_ns());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno == ENOENT && make_parent_dirs(path) == 0)
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        free(order);
        return -1;
    }
    char line[128 + TALLY_PROFILES_MAX_NAME];
    int len = snprintf(line, sizeof line, MAGIC " %d %zu\n", TALLY_PROFILES_VERSION, n);
    int bad = write_all(fd, line, (size_t)len);
    for (size_t i = 0; i < n && !bad; i++) {
        const struct tally_profile_entry *e = order[i];
        len = snprintf(line, sizeof line, "%016llx %llu %llu %llu %s\n", (unsigned long long)e->name_hash,
                       (unsigned long long)e->grid_threads, (unsigned long long)e->est_ns,
                       (unsigned long long)e->samples, e->name);
        bad = len <= 0 || (size_t)len >= sizeof line || write_all(fd, line, (size_t)len);
    }
    free(order);
    if (close(fd) != 0) bad = 1;
    if (bad || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

void tally_profiles_save(const struct tally_profile_entry *learned, size_t n) {
    if (!P.loaded || P.pid != getpid() || n == 0) return;
    /* Merge with the file as it is now: another run of the program may have
     * written it since we loaded it. Per kernel, this run's estimate is the
     * newer one; sample counts add up. A file that is not one is replaced. */
    struct table t;
    const char *why = NULL;
    if (read_file(P.path, &t, &why) <= 0) {
        memset(&t, 0, sizeof t);
        t.slots = calloc(FILE_SLOTS, sizeof *t.slots);
        if (!t.slots) return;
    }
    for (size_t i = 0; i < n; i++) {
        const struct tally_profile_entry *l = &learned[i];
        if (!l->name || !l->samples || !l->est_ns) continue;
        struct tally_profile_entry *e = table_find(&t, l->name_hash, l->grid_threads, 1);
        if (!e) continue; /* full: the kernels already there stay */
        if (!e->samples) {
            char *name = strdup(l->name);
            if (!name) continue;
            *e = (struct tally_profile_entry){l->name_hash, l->grid_threads, 0, 0, name};
            t.n++;
        }
        e->est_ns = l->est_ns;
        e->samples = e->samples > INT64_MAX - l->samples ? INT64_MAX : e->samples + l->samples;
    }
    if (write_table(P.path, &t) != 0) profile_warning(P.path, "cannot be written; this run's estimates are lost");
    table_free(&t);
}
