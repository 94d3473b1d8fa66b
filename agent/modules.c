/* Saving the code images a program loads (TALLY_MODULE_DIR set).
 *
 * Transforming a best-effort program's kernels (issue 5) needs their PTX or
 * cubin, and the only moment the agent can see that code is when the program
 * hands it to the driver. So on the exit of every successful module or
 * library load from memory, the image is copied to
 *     $TALLY_MODULE_DIR/<fnv1a64 of its bytes, 16 hex digits>.img
 * once per distinct content; tally's Python side reads the directory later.
 *
 * The driver is given a bare pointer, not a size: the size is read from the
 * image's own header (fatbin, ELF) or its terminating NUL (PTX text), and
 * nothing past that is read, since the bytes after an image belong to
 * whatever the program put there. An image of no known kind is left alone.
 *
 * Failures never reach the program: one warning line, and the kernels of the
 * program simply stay with launch-level scheduling.
 *
 * The same load exit tells block-level scheduling (blocksched.c) which image
 * each module handle holds, whether or not images are being saved.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

#define MIN_IMAGE_BYTES 16u
#define MAX_IMAGE_BYTES (1ull << 30)
#define PATH_BYTES 4096

#define FATBIN_MAGIC 0xBA55ED50u
#define FATBIN_WRAPPER_MAGIC 0x466243B1u
#define FATBIN_HEADER_BYTES 16u /* magic u32, version u16, header_size u16, fat_size u64 */
#define ELF64_HEADER_BYTES 64u

static struct {
    int enabled;
    char dir[PATH_BYTES];
    atomic_int dir_state;       /* 0: not made yet; 1: there; -errno: cannot be made */
    atomic_int warned;
    _Atomic uint64_t seen, written, present, failed;
    atomic_uint tmp_seq;
} M;

int tally_modules_init(void) {
    const char *dir = getenv("TALLY_MODULE_DIR");
    if (!dir || !*dir) return 0;
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') n--;
    if (n >= sizeof M.dir) {
        atomic_store(&M.warned, 1);
        fprintf(stderr, "tally: warning: cannot save loaded modules to %s: path too long; "
                        "kernels of this program keep launch-level scheduling\n", dir);
        return 0;
    }
    memcpy(M.dir, dir, n);
    M.dir[n] = 0;
    M.enabled = 1;
    return 1;
}

/* cuModuleLoad(module, fname): PyTorch Inductor's static launcher loads
 * every torch.compile kernel this way, from the cubin Triton cached. */
int tally_modules_is_file_load(const char *name) { return name && strcmp(name, "cuModuleLoad") == 0; }

int tally_modules_is_load(const char *name) {
    /* Loads from a file are tally_modules_is_file_load's. Every entry point
     * below has the image as its second parameter, after the output handle. */
    static const char *const loads[] = {
        "cuModuleLoadData", "cuModuleLoadDataEx", "cuModuleLoadFatBinary", "cuLibraryLoadData",
    };
    if (!name) return 0;
    for (size_t i = 0; i < sizeof loads / sizeof loads[0]; i++) {
        size_t k = strlen(loads[i]);
        if (strncmp(name, loads[i], k) != 0) continue;
        /* Later CUDA versions may add _v2 / _ptsz forms with the same leading parameters. */
        const char *rest = name + k;
        if (!*rest || !strcmp(rest, "_v2") || !strcmp(rest, "_ptsz") || !strcmp(rest, "_v2_ptsz")) return 1;
    }
    return 0;
}

/* ------------------------------------------------------- image sizes */

static uint64_t le(const unsigned char *p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* Compared byte by byte, so a short NUL-terminated text stops the reading at
 * its first byte that differs (no magic below contains a zero byte). */
static int starts_with(const unsigned char *p, const unsigned char *magic, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != magic[i]) return 0;
    return 1;
}

static uint64_t fatbin_size(const unsigned char *p) {
    static const unsigned char magic[4] = {0x50, 0xED, 0x55, 0xBA};
    if (!starts_with(p, magic, 4)) return 0;
    uint64_t header = le(p + 6, 2), fat = le(p + 8, 8);
    if (header < FATBIN_HEADER_BYTES || fat > MAX_IMAGE_BYTES) return 0;
    return header + fat;
}

static uint64_t elf64_size(const unsigned char *p) {
    /* Past the 4-byte magic: EI_CLASS 2 (64-bit), EI_DATA 1 (little-endian). */
    if (p[4] != 2 || p[5] != 1) return 0;
    uint64_t phoff = le(p + 0x20, 8), shoff = le(p + 0x28, 8);
    uint64_t phentsize = le(p + 0x36, 2), phnum = le(p + 0x38, 2);
    uint64_t shentsize = le(p + 0x3A, 2), shnum = le(p + 0x3C, 2);
    /* Offsets over the cap would overflow the sums below; they are no cubin. */
    if (phoff > MAX_IMAGE_BYTES || shoff > MAX_IMAGE_BYTES) return 0;
    uint64_t end = ELF64_HEADER_BYTES;
    if (shoff + shnum * shentsize > end) end = shoff + shnum * shentsize;
    if (phoff + phnum * phentsize > end) end = phoff + phnum * phentsize;
    return end;
}

static int is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

/* The image's bytes, and how many: 0 for an image of no known kind. */
static uint64_t image_extent(const void *image, const unsigned char **start) {
    const unsigned char *p = image;
    *start = p;
    static const unsigned char wrapper_magic[4] = {0xB1, 0x43, 0x62, 0x46};
    static const unsigned char elf_magic[4] = {0x7F, 'E', 'L', 'F'};
    if (p[0] == 0x50) return fatbin_size(p);
    if (p[0] == 0xB1) {
        if (!starts_with(p, wrapper_magic, 4)) return 0;
        const unsigned char *fatbin;
        memcpy(&fatbin, p + 8, sizeof fatbin);
        if (!fatbin) return 0;
        *start = fatbin;
        return fatbin_size(fatbin);
    }
    if (p[0] == 0x7F) return starts_with(p, elf_magic, 4) ? elf64_size(p) : 0;
    const unsigned char *q = p;
    while (is_space(*q)) q++;
    if (strncmp((const char *)q, "//", 2) != 0 && strncmp((const char *)q, ".version", 8) != 0) return 0;
    /* Bounded: an unterminated "text" stops being read one byte past the cap. */
    size_t n = strnlen((const char *)p, MAX_IMAGE_BYTES + 1);
    return n;
}

/* ------------------------------------------------------------ saving */

static void warn_once(const char *reason) {
    if (atomic_exchange(&M.warned, 1)) return;
    fprintf(stderr, "tally: warning: cannot save loaded modules to %s: %s; "
                    "kernels of this program keep launch-level scheduling\n", M.dir, reason);
}

static void fail(const char *what, int err) {
    atomic_fetch_add_explicit(&M.failed, 1, memory_order_relaxed);
    char reason[256];
    snprintf(reason, sizeof reason, "%s (%s)", what, strerror(err));
    warn_once(reason);
}

/* mkdir -p, so the launcher may name a directory under one that is not there
 * yet. No lock: threads racing here make the same directories, and EEXIST is
 * success; a lock held across fork could hang the child. Returns 0 or errno. */
static int make_dir(void) {
    int state = atomic_load(&M.dir_state);
    if (state) return state > 0 ? 0 : -state;
    char path[PATH_BYTES];
    snprintf(path, sizeof path, "%s", M.dir);
    int err = 0;
    for (char *s = path + 1; !err; s++) {
        if (*s != '/' && *s != 0) continue;
        char c = *s;
        *s = 0;
        if (mkdir(path, 0700) != 0 && errno != EEXIST) err = errno;
        *s = c;
        if (!c) break;
    }
    struct stat st;
    if (!err && stat(M.dir, &st) != 0) err = errno;
    else if (!err && !S_ISDIR(st.st_mode)) err = ENOTDIR;
    atomic_store(&M.dir_state, err ? -err : 1);
    return err;
}

static int write_all(int fd, const unsigned char *p, uint64_t n) {
    while (n) {
        ssize_t w = write(fd, p, n > (1u << 30) ? (1u << 30) : (size_t)n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return w == 0 ? (errno = EIO, -1) : -1;
        p += w;
        n -= (uint64_t)w;
    }
    return 0;
}

static void save(const unsigned char *bytes, uint64_t n) {
    int err = make_dir();
    if (err) {
        fail("cannot create the directory", err);
        return;
    }
    char path[PATH_BYTES + 32], tmp[PATH_BYTES + 80]; /* room the compiler can see; init keeps M.dir short */
    snprintf(path, sizeof path, "%s/%016llx.img", M.dir, (unsigned long long)tally_fnv1a64((const char *)bytes, n));
    struct stat st;
    if (stat(path, &st) == 0) {
        atomic_fetch_add_explicit(&M.present, 1, memory_order_relaxed);
        return;
    }
    /* The sequence number keeps two threads saving the same image apart; each
     * renames a complete file over the other's identical one. */
    snprintf(tmp, sizeof tmp, "%s.tmp.%d.%u", path, (int)getpid(), atomic_fetch_add(&M.tmp_seq, 1));
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        fail("cannot create a file", errno);
        return;
    }
    err = write_all(fd, bytes, n) != 0 ? errno : 0;
    if (close(fd) != 0 && !err) err = errno;
    if (err) {
        unlink(tmp);
        fail("cannot write a file", err);
        return;
    }
    if (rename(tmp, path) != 0) {
        err = errno;
        unlink(tmp);
        fail("cannot rename a file", err);
        return;
    }
    atomic_fetch_add_explicit(&M.written, 1, memory_order_relaxed);
}

/* Every load entry point's parameter block starts with these two pointers
 * (generated_cuda_meta.h: cuModuleLoadData_params, cuModuleLoadDataEx_params,
 * cuModuleLoadFatBinary_params, cuLibraryLoadData_params). */
typedef struct {
    void *handle_out;
    const void *image;
} load_params_prefix;

void tally_modules_loaded(const void *params, CUresult result, int is_library) {
    int plan = tally_blocksched_enabled() && !is_library;
    if ((!M.enabled && !plan) || result != CUDA_SUCCESS || !params) return;
    const load_params_prefix *p = params;
    if (!p->image) return;
    if (M.enabled) atomic_fetch_add_explicit(&M.seen, 1, memory_order_relaxed);
    const unsigned char *start;
    uint64_t n = image_extent(p->image, &start);
    if (n < MIN_IMAGE_BYTES || n > MAX_IMAGE_BYTES) {
        if (M.enabled) atomic_fetch_add_explicit(&M.failed, 1, memory_order_relaxed);
        return;
    }
    if (M.enabled) save(start, n);
    /* Libraries (cuLibraryLoadData) hand out CUlibrary handles, and the
     * functions the runtime gets from them do not map back to a module
     * (cuFuncGetModule fails for them): their kernels are not sliced. */
    if (plan && p->handle_out) tally_blocksched_module_loaded(*(CUmodule *)p->handle_out, start, n);
}

void *tally_read_file(const char *path, uint64_t min, uint64_t max, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL; /* errno: fopen's */
    struct stat st;
    unsigned char *bytes = NULL;
    int err = EINVAL; /* not a regular file, or a size out of range */
    if (fstat(fileno(f), &st) != 0) {
        err = errno;
    } else if (S_ISREG(st.st_mode) && (uint64_t)st.st_size >= min && (uint64_t)st.st_size <= max) {
        bytes = malloc(st.st_size ? (size_t)st.st_size : 1);
        if (!bytes) {
            err = ENOMEM;
        } else if (fread(bytes, 1, (size_t)st.st_size, f) != (size_t)st.st_size) {
            err = EIO;
            free(bytes);
            bytes = NULL;
        }
    }
    fclose(f);
    if (!bytes) {
        errno = err;
        return NULL;
    }
    *n = (size_t)st.st_size;
    return bytes;
}

/* A module loaded from a file: its bytes are the file's, read once more here
 * (the driver has just read it; a file changed in between is a different
 * image, matched to nothing). */
void tally_modules_loaded_file(const void *params, CUresult result) {
    int plan = tally_blocksched_enabled();
    if ((!M.enabled && !plan) || result != CUDA_SUCCESS || !params) return;
    const load_params_prefix *p = params;
    const char *path = p->image;
    if (!path) return;
    if (M.enabled) atomic_fetch_add_explicit(&M.seen, 1, memory_order_relaxed);
    size_t n = 0;
    unsigned char *bytes = tally_read_file(path, MIN_IMAGE_BYTES, MAX_IMAGE_BYTES, &n);
    if (!bytes) {
        if (M.enabled) atomic_fetch_add_explicit(&M.failed, 1, memory_order_relaxed);
        return;
    }
    if (M.enabled) save(bytes, n);
    if (plan && p->handle_out) tally_blocksched_module_loaded(*(CUmodule *)p->handle_out, bytes, n);
    free(bytes);
}

/* For tally's Python side and the tests: out = {images seen, written,
 * already present, unknown or failed}. Returns 1 when TALLY_MODULE_DIR is in
 * effect. */
TALLY_EXPORT int tally_agent_module_stats(uint64_t out[4]) {
    out[0] = atomic_load(&M.seen);
    out[1] = atomic_load(&M.written);
    out[2] = atomic_load(&M.present);
    out[3] = atomic_load(&M.failed);
    return M.enabled;
}
