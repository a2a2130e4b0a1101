/*
 * saa.c: the C ABI (saa.h) over the Python pipeline. The library hosts Python; the work is
 * done by runtime/capi/_host.py, which this file calls with plain integers and addresses.
 *
 * The Python C API is resolved at run time (dlsym) instead of linked: in a Python process
 * the running interpreter's symbols are used (whether python is a static or a shared build),
 * and in a plain C/C++ program libpython is dlopen'ed. The library therefore has no
 * undefined Py* symbols and no DT_NEEDED on libpython, so a Python process never gets a
 * second copy of the interpreter. Headers are used for types and struct layouts only; the
 * version check below refuses a libpython of another minor version.
 */
#define _GNU_SOURCE
#include <Python.h>

#include <dlfcn.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "saa.h"

#ifndef SAA_BUILD_PYTHON
#define SAA_BUILD_PYTHON "" /* interpreter that built the library (runtime/capi/build.py sets it) */
#endif
#ifndef SAA_BUILD_LIBPYTHON
#define SAA_BUILD_LIBPYTHON "" /* its shared libpython, "" when it has none */
#endif
#ifndef SAA_PACKAGE_VERSION
#define SAA_PACKAGE_VERSION "unknown"
#endif

#define SAA_STR2(x) #x
#define SAA_STR(x) SAA_STR2(x)
#define PY_MINOR_TEXT SAA_STR(PY_MAJOR_VERSION) "." SAA_STR(PY_MINOR_VERSION)
#define ERROR_CAPACITY 1024
#define HOST_MODULE "runtime.capi._host"

_Static_assert(sizeof(saa_region) == 96, "saa_region layout changed: update REGION_DTYPE in runtime/capi/abi.py");
_Static_assert(sizeof(void *) != 8 || sizeof(saa_open_options) == 64,
               "saa_open_options layout changed: update OpenOptions in runtime/capi/abi.py");

/* ---- the Python C API, resolved at run time ---------------------------------------- */

#define SAA_PY_API(X)                                                                                 \
    X(Py_GetVersion) X(Py_IsInitialized) X(PyGILState_Ensure) X(PyGILState_Release) X(PyGILState_Check) \
    X(PyEval_SaveThread) X(PyEval_RestoreThread) X(PyConfig_InitPythonConfig) X(PyConfig_SetBytesString) \
    X(PyConfig_Clear) X(Py_InitializeFromConfig) X(PyStatus_Exception) X(PyImport_ImportModule)         \
    X(PyObject_GetAttrString) X(PyObject_CallFunction) X(PyLong_AsLongLong) X(PyTuple_GetItem)          \
    X(PyTuple_Size) X(PyUnicode_AsUTF8) X(PyUnicode_DecodeFSDefault) X(PyList_Insert) X(Py_IncRef) X(Py_DecRef)     \
    X(PyErr_Fetch) X(PyErr_Clear) X(PyErr_Occurred) X(PyObject_Str)

#define SAA_PY_DECLARE(name) static __typeof__(name) *py_##name;
SAA_PY_API(SAA_PY_DECLARE)

static int resolve_python(void *library, char *why, size_t size) {
#define SAA_PY_RESOLVE(name)                                                   \
    py_##name = (__typeof__(name) *)dlsym(library, #name);                     \
    if (!py_##name) {                                                          \
        snprintf(why, size, "the Python C API function %s is missing", #name); \
        return -1;                                                             \
    }
    SAA_PY_API(SAA_PY_RESOLVE)
    return 0;
}

/* ---- errors ------------------------------------------------------------------------- */

struct saa_pipeline {
    pthread_mutex_t call_lock;  /* serialises saa_infer / saa_close on this handle */
    pthread_mutex_t error_lock; /* guards error (short hold: never held across Python) */
    int closed;                 /* guarded by call_lock */
    PyObject *pipeline;         /* runtime.pipeline.Pipeline; NULL once closed */
    char error[ERROR_CAPACITY];
    struct saa_pipeline *next; /* registry: every handle ever opened, closed ones included */
};

static _Thread_local char thread_error[ERROR_CAPACITY];
static _Thread_local char returned_error[ERROR_CAPACITY];

/* Drop a UTF-8 sequence left incomplete at the end of `text` (a message cut to fit its buffer). */
static void utf8_trim(char *text) {
    size_t length = strlen(text), lead = length;
    while (lead > 0 && ((unsigned char)text[lead - 1] & 0xC0) == 0x80)
        --lead;
    if (lead == 0)
        return;
    unsigned char first = (unsigned char)text[lead - 1];
    size_t expected = first >= 0xF0 ? 4 : first >= 0xE0 ? 3 : first >= 0xC0 ? 2 : 1;
    if (length - (lead - 1) < expected)
        text[lead - 1] = '\0';
}

static void copy_text(char *to, const char *from, size_t size) {
    snprintf(to, size, "%s", from ? from : "");
    utf8_trim(to);
}

/* Record a failure for the calling thread and, when given, the handle; return status. */
static int fail(saa_pipeline *handle, int status, const char *format, ...) {
    char message[ERROR_CAPACITY];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    copy_text(thread_error, message, sizeof thread_error); /* cut at a character boundary */
    if (handle) {
        pthread_mutex_lock(&handle->error_lock);
        copy_text(handle->error, message, sizeof handle->error);
        pthread_mutex_unlock(&handle->error_lock);
    }
    return status;
}

/* ---- handle registry: a handle is dereferenced only after it is found here ---------------- */

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static saa_pipeline *registry;

static int registered(const saa_pipeline *handle) {
    int found = 0;
    pthread_mutex_lock(&registry_lock);
    for (const saa_pipeline *item = registry; item && !found; item = item->next)
        found = item == handle;
    pthread_mutex_unlock(&registry_lock);
    return found;
}

static int check_handle(const saa_pipeline *handle, const char *function) {
    if (!handle)
        return fail(NULL, SAA_E_BAD_HANDLE, "%s: handle is NULL (open one with saa_open)", function);
    if (!registered(handle))
        return fail(NULL, SAA_E_BAD_HANDLE, "%s: %p is not a handle returned by saa_open", function,
                    (const void *)handle);
    return SAA_OK;
}

/* ---- starting or finding Python ------------------------------------------------------ */

static pthread_once_t python_once = PTHREAD_ONCE_INIT;
static int python_status = SAA_OK;
static char python_error[ERROR_CAPACITY];
static PyObject *host_open, *host_infer, *host_close, *host_control;

static void python_fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(python_error, sizeof python_error, format, args);
    va_end(args);
    python_status = SAA_E_PYTHON;
}

static int verbose(void) {
    const char *value = getenv("SAA_VERBOSE");
    return value && *value && strcmp(value, "0") != 0;
}

/* "TypeName: message" of the pending Python exception, which is cleared. Needs the GIL. */
static void take_python_error(char *out, size_t size) {
    PyObject *type = NULL, *value = NULL, *traceback = NULL;
    py_PyErr_Fetch(&type, &value, &traceback);
    PyObject *name = type ? py_PyObject_GetAttrString(type, "__name__") : NULL;
    PyObject *text = value ? py_PyObject_Str(value) : NULL;
    const char *name_utf8 = name ? py_PyUnicode_AsUTF8(name) : NULL;
    const char *text_utf8 = text ? py_PyUnicode_AsUTF8(text) : NULL;
    snprintf(out, size, "%s: %s", name_utf8 ? name_utf8 : "unknown Python error", text_utf8 ? text_utf8 : "");
    if (py_PyErr_Occurred())
        py_PyErr_Clear();
    py_Py_DecRef(text);
    py_Py_DecRef(name);
    py_Py_DecRef(type);
    py_Py_DecRef(value);
    py_Py_DecRef(traceback);
}

/* <root> such that <root>/runtime/capi/_host.py sits beside this library, or "" */
static void package_root(char *root, size_t size) {
    Dl_info info;
    char real[PATH_MAX], probe[PATH_MAX + 32];
    root[0] = '\0';
    if (!dladdr((void *)saa_version, &info) || !info.dli_fname || !realpath(info.dli_fname, real))
        return;
    for (int level = 0; level < 3; ++level) {
        char *slash = strrchr(real, '/');
        if (!slash)
            return;
        *slash = '\0';
    }
    snprintf(probe, sizeof probe, "%s/runtime/capi/_host.py", real);
    if (access(probe, R_OK) == 0)
        copy_text(root, real, size);
}

/* Import the Python half and keep its three entry points. Needs the GIL. */
static void import_host(const char *interpreter) {
    PyObject *module = py_PyImport_ImportModule(HOST_MODULE);
    if (!module) {
        char why[ERROR_CAPACITY / 2];
        take_python_error(why, sizeof why);
        python_fail("cannot import %s with the Python at %s: %s "
                    "(is saa-edge installed for it? see SAA_PYTHON in saa.h)", HOST_MODULE, interpreter, why);
        return;
    }
    host_open = py_PyObject_GetAttrString(module, "open_pipeline");
    host_infer = py_PyObject_GetAttrString(module, "infer");
    host_close = py_PyObject_GetAttrString(module, "close_pipeline");
    host_control = py_PyObject_GetAttrString(module, "control");
    PyObject *describe = py_PyObject_GetAttrString(module, "describe");
    if (!host_open || !host_infer || !host_close || !host_control || !describe) {
        py_PyErr_Clear();
        python_fail("%s lacks open_pipeline, infer, close_pipeline or describe: library and package differ in version",
                    HOST_MODULE);
    } else if (verbose()) {
        PyObject *text = py_PyObject_CallFunction(describe, NULL);
        const char *utf8 = text ? py_PyUnicode_AsUTF8(text) : NULL;
        fprintf(stderr, "saa: %s\n", utf8 ? utf8 : "(no description)");
        py_Py_DecRef(text);
        py_PyErr_Clear();
    }
    py_Py_DecRef(describe);
    py_Py_DecRef(module);
}

/*
 * The interpreter to start: SAA_PYTHON; else the python of the prefix whose site-packages holds
 * this library (a regular install: <prefix>/lib/pythonX.Y/site-packages/runtime/capi); else the
 * interpreter that built the library (an editable install, where the library sits in the source).
 */
static const char *choose_interpreter(const char *root, char *found, size_t size, const char **why) {
    const char *chosen = getenv("SAA_PYTHON");
    if (chosen && *chosen) {
        *why = "from SAA_PYTHON";
        return chosen;
    }
    const char *tail = "/lib/python" PY_MINOR_TEXT "/site-packages";
    size_t root_length = strlen(root), tail_length = strlen(tail);
    if (root_length > tail_length && strcmp(root + root_length - tail_length, tail) == 0) {
        const char *names[] = {"python" PY_MINOR_TEXT, "python3", "python"};
        for (size_t i = 0; i < sizeof names / sizeof names[0]; ++i) {
            snprintf(found, size, "%.*s/bin/%s", (int)(root_length - tail_length), root, names[i]);
            if (access(found, X_OK) == 0) {
                *why = "the environment this library is installed in";
                return found;
            }
        }
    }
    *why = "the interpreter that built this library";
    return SAA_BUILD_PYTHON;
}

/*
 * The host program's handlers for the signals Python touches. install_signal_handlers = 0
 * is not enough: importing Python's signal module (onnxruntime, numba and tqdm do) still
 * points SIGINT at Python's handler, so Ctrl-C no longer stopped a plain C program but made
 * the call in flight fail with KeyboardInterrupt. Saved before Python starts and put back
 * after every call that may import.
 */
static const int host_signals[] = {SIGINT, SIGTERM, SIGPIPE, SIGXFSZ};
static struct sigaction host_actions[sizeof host_signals / sizeof host_signals[0]];
static int host_actions_saved;

static void save_host_signals(void) {
    for (size_t i = 0; i < sizeof host_signals / sizeof host_signals[0]; ++i)
        sigaction(host_signals[i], NULL, &host_actions[i]);
    host_actions_saved = 1;
}

static void restore_host_signals(void) {
    if (!host_actions_saved) /* Python was there first (ctypes, an embedding program): its handlers stay */
        return;
    for (size_t i = 0; i < sizeof host_signals / sizeof host_signals[0]; ++i)
        sigaction(host_signals[i], &host_actions[i], NULL);
}

/* Start an interpreter in a program without one; leaves the GIL released. */
static void start_embedded(void) {
    char root[PATH_MAX], found[PATH_MAX + 32];
    const char *why = "";
    package_root(root, sizeof root);
    const char *interpreter = choose_interpreter(root, found, sizeof found, &why);
    if (!*interpreter || access(interpreter, X_OK) != 0) {
        python_fail("Python interpreter '%s' (%s) not found or not executable (set SAA_PYTHON to the python of the "
                    "venv where saa-edge is installed)", interpreter, why);
        return;
    }
    if (verbose())
        fprintf(stderr, "saa: starting Python %s (%s)\n", interpreter, why);
    PyConfig config;
    py_PyConfig_InitPythonConfig(&config);
    save_host_signals();
    config.install_signal_handlers = 0; /* the host program keeps SIGINT and friends (and see above) */
    config.parse_argv = 0;
    /* The interpreter's path decides sys.prefix: a venv's python gives the venv's site-packages. */
    PyStatus status = py_PyConfig_SetBytesString(&config, &config.program_name, interpreter);
    if (!py_PyStatus_Exception(status))
        status = py_PyConfig_SetBytesString(&config, &config.executable, interpreter);
    if (!py_PyStatus_Exception(status))
        status = py_Py_InitializeFromConfig(&config);
    py_PyConfig_Clear(&config);
    if (py_PyStatus_Exception(status)) {
        python_fail("cannot start Python from %s: %s%s%s", interpreter, status.func ? status.func : "",
                    status.func ? ": " : "", status.err_msg ? status.err_msg : "initialisation failed");
        return;
    }
    if (root[0]) { /* the Python half that matches this library comes first */
        PyObject *sys = py_PyImport_ImportModule("sys");
        PyObject *path = sys ? py_PyObject_GetAttrString(sys, "path") : NULL;
        PyObject *entry = path ? py_PyUnicode_DecodeFSDefault(root) : NULL;
        if (!entry || py_PyList_Insert(path, 0, entry) != 0)
            py_PyErr_Clear();
        py_Py_DecRef(entry);
        py_Py_DecRef(path);
        py_Py_DecRef(sys);
    }
    import_host(interpreter);
    restore_host_signals();
    py_PyEval_SaveThread(); /* the main thread state stays; any thread now takes the GIL with PyGILState_Ensure */
}

static void python_start(void) {
    void *library = RTLD_DEFAULT;
    char why[256];
    if (!dlsym(RTLD_DEFAULT, "Py_IsInitialized")) { /* no Python in the process yet */
        const char *path = getenv("SAA_LIBPYTHON");
        if (!path || !*path)
            path = SAA_BUILD_LIBPYTHON;
        if (!*path) {
            python_fail("this library was built by a Python without a shared libpython: set SAA_LIBPYTHON to a "
                        "libpython" PY_MINOR_TEXT ".so");
            return;
        }
        library = dlopen(path, RTLD_NOW | RTLD_GLOBAL); /* GLOBAL: extension modules resolve Py* from it */
        if (!library) {
            python_fail("cannot load libpython %s (%s): set SAA_LIBPYTHON to a libpython" PY_MINOR_TEXT ".so", path,
                        dlerror());
            return;
        }
    }
    if (resolve_python(library, why, sizeof why) != 0) {
        python_fail("%s in this process", why);
        return;
    }
    const char *version = py_Py_GetVersion();
    size_t prefix = strlen(PY_MINOR_TEXT);
    if (strncmp(version, PY_MINOR_TEXT, prefix) != 0 || (version[prefix] >= '0' && version[prefix] <= '9')) {
        python_fail("library built for Python " PY_MINOR_TEXT " but the process has Python %.20s: rebuild it with "
                    "`pip install -e .` under that Python", version);
        return;
    }
    if (py_Py_IsInitialized()) { /* a Python process (ctypes) or a program embedding Python */
        PyGILState_STATE gil = py_PyGILState_Ensure();
        import_host("running in this process");
        py_PyGILState_Release(gil);
        return;
    }
    start_embedded();
}

/*
 * A caller through ctypes.PyDLL holds the GIL. If another thread is inside the one-time
 * start-up (python_start takes the GIL to import the host module), waiting on pthread_once
 * with the GIL held deadlocked both: let it go while waiting. The Python API is looked up
 * here directly, since python_start may not have resolved it yet.
 */
static int (*running_initialized)(void), (*running_holds_gil)(void);
static PyThreadState *(*running_save)(void);
static void (*running_restore)(PyThreadState *);
static pthread_once_t running_lookup_once = PTHREAD_ONCE_INIT;

static void look_up_running_python(void) {
    *(void **)&running_initialized = dlsym(RTLD_DEFAULT, "Py_IsInitialized");
    *(void **)&running_holds_gil = dlsym(RTLD_DEFAULT, "PyGILState_Check");
    *(void **)&running_save = dlsym(RTLD_DEFAULT, "PyEval_SaveThread");
    *(void **)&running_restore = dlsym(RTLD_DEFAULT, "PyEval_RestoreThread");
}

static void start_python_once(void) {
    pthread_once(&running_lookup_once, look_up_running_python);
    int (*initialized)(void) = running_initialized, (*holds_gil)(void) = running_holds_gil;
    PyThreadState *(*save)(void) = running_save;
    void (*restore)(PyThreadState *) = running_restore;
    PyThreadState *state = NULL;
    if (initialized && holds_gil && save && restore && initialized() && holds_gil())
        state = save();
    pthread_once(&python_once, python_start);
    if (state)
        restore(state);
}

static int ensure_python(void) {
    start_python_once();
    if (python_status != SAA_OK)
        return fail(NULL, python_status, "%s", python_error);
    return SAA_OK;
}

/*
 * Unpack the host's (status, payload) reply; needs the GIL. On success *object gets a new
 * reference to the payload or *number its value; on failure message gets the text.
 */
static int unpack_reply(PyObject *reply, PyObject **object, long long *number, char *message, size_t size) {
    if (!reply) {
        take_python_error(message, size);
        return SAA_E_INTERNAL;
    }
    int status = SAA_E_INTERNAL;
    PyObject *code = py_PyTuple_Size(reply) == 2 ? py_PyTuple_GetItem(reply, 0) : NULL;
    PyObject *payload = code ? py_PyTuple_GetItem(reply, 1) : NULL;
    long long value = code ? py_PyLong_AsLongLong(code) : -1;
    if (!payload || py_PyErr_Occurred()) {
        py_PyErr_Clear();
        copy_text(message, HOST_MODULE " replied with something other than (status, payload)", size);
    } else if (value != SAA_OK) {
        const char *text = py_PyUnicode_AsUTF8(payload);
        copy_text(message, text ? text : "(no message)", size);
        py_PyErr_Clear();
        status = (int)value;
    } else if (object) {
        py_Py_IncRef(payload);
        *object = payload;
        status = SAA_OK;
    } else {
        *number = py_PyLong_AsLongLong(payload);
        status = py_PyErr_Occurred() ? SAA_E_INTERNAL : SAA_OK;
        if (status != SAA_OK) {
            py_PyErr_Clear();
            copy_text(message, HOST_MODULE ".infer replied with a non-integer count", size);
        }
    }
    py_Py_DecRef(reply);
    return status;
}

/* Lock a handle without holding the GIL while waiting (a caller through ctypes.PyDLL holds it). */
static void lock_call(saa_pipeline *handle) {
    if (pthread_mutex_trylock(&handle->call_lock) == 0)
        return;
    if (py_PyGILState_Check()) {
        PyThreadState *state = py_PyEval_SaveThread();
        pthread_mutex_lock(&handle->call_lock);
        py_PyEval_RestoreThread(state);
    } else {
        pthread_mutex_lock(&handle->call_lock);
    }
}

/* saa_open and saa_open_ex: check the arguments, call runtime.capi._host.open_pipeline, register the handle. */
static int open_pipeline(const char *function, const char *engine_dir, const char *config,
                         const saa_open_options *options, saa_pipeline **handle) {
    if (!handle)
        return fail(NULL, SAA_E_INVALID_ARGUMENT, "%s: handle is NULL (pass the address of a saa_pipeline *)", function);
    *handle = NULL;
    if (!engine_dir || !*engine_dir)
        return fail(NULL, SAA_E_INVALID_ARGUMENT, "%s: engine_dir is %s", function, engine_dir ? "empty" : "NULL");
    if (!config || !*config)
        return fail(NULL, SAA_E_INVALID_ARGUMENT,
                    "%s: config is %s (give DATASET/CATEGORY such as mvtec/bottle, or a prompt file)", function,
                    config ? "empty" : "NULL");
    if (options->threads < 0 || options->stream_memory < 0)
        return fail(NULL, SAA_E_INVALID_ARGUMENT, "%s: options->%s = %d is negative", function,
                    options->threads < 0 ? "threads" : "stream_memory",
                    (int)(options->threads < 0 ? options->threads : options->stream_memory));
    int status = ensure_python();
    if (status != SAA_OK)
        return status;
    saa_pipeline *opened = calloc(1, sizeof *opened);
    if (!opened)
        return fail(NULL, SAA_E_INTERNAL, "%s: out of memory", function);

    char message[ERROR_CAPACITY];
    PyObject *pipeline = NULL;
    PyGILState_STATE gil = py_PyGILState_Ensure();
    /* "y" turns a NULL string into None: no calibration, no memory. */
    PyObject *reply = py_PyObject_CallFunction(host_open, "yyyiyyiddiy", engine_dir, config,
                                               options->device ? options->device : "cpu", (int)options->threads,
                                               options->calibration, options->memory, (int)options->stream_memory,
                                               options->image_threshold, options->pixel_threshold,
                                               (int)(options->warm_up != 0), options->settings);
    status = unpack_reply(reply, &pipeline, NULL, message, sizeof message);
    py_PyGILState_Release(gil);
    restore_host_signals(); /* opening imports the pipeline's modules */
    if (status != SAA_OK) {
        free(opened);
        return fail(NULL, status, "%s: %s", function, message);
    }
    pthread_mutex_init(&opened->call_lock, NULL);
    pthread_mutex_init(&opened->error_lock, NULL);
    opened->pipeline = pipeline;
    pthread_mutex_lock(&registry_lock);
    opened->next = registry;
    registry = opened;
    pthread_mutex_unlock(&registry_lock);
    *handle = opened;
    return SAA_OK;
}

/* ---- the ABI -------------------------------------------------------------------------- */

SAA_API const char *saa_version(void) {
    return "saa-edge " SAA_PACKAGE_VERSION ", C ABI " SAA_STR(SAA_ABI_VERSION) ", Python " PY_MINOR_TEXT
           " at " SAA_BUILD_PYTHON;
}

SAA_API int saa_abi_version(void) { return SAA_ABI_VERSION; }

/* The struct as ABI 1 defined it: every later version only appends fields. */
#define OPEN_OPTIONS_V1_SIZE ((int32_t)(offsetof(saa_open_options, pixel_threshold) + sizeof(double)))

static saa_open_options default_options(void) {
    saa_open_options options;
    memset(&options, 0, sizeof options);
    options.struct_size = (int32_t)sizeof options;
    options.image_threshold = NAN;
    options.pixel_threshold = NAN;
    return options;
}

SAA_API void saa_open_options_init_sized(saa_open_options *options, int32_t struct_size) {
    if (!options || struct_size < OPEN_OPTIONS_V1_SIZE)
        return; /* too small to be any version's struct: saa_open_ex refuses what it holds */
    saa_open_options defaults = default_options();
    /* Only the fields this library knows and the caller's struct holds; a newer header's extra
       fields stay as they are, and saa_open_ex refuses a struct larger than it knows. */
    memcpy(options, &defaults, (size_t)(struct_size < (int32_t)sizeof defaults ? struct_size : (int32_t)sizeof defaults));
    options->struct_size = struct_size;
}

SAA_API void(saa_open_options_init)(saa_open_options *options) {
    saa_open_options_init_sized(options, (int32_t)sizeof *options);
}

SAA_API int saa_open(const char *engine_dir, const char *config, const char *device, saa_pipeline **handle) {
    saa_open_options options;
    saa_open_options_init(&options);
    options.device = device;
    return open_pipeline("saa_open", engine_dir, config, &options, handle);
}

SAA_API int saa_open_ex(const char *engine_dir, const char *config, const saa_open_options *options,
                        saa_pipeline **handle) {
    saa_open_options merged = default_options();
    if (options && (options->struct_size < OPEN_OPTIONS_V1_SIZE || options->struct_size > (int32_t)sizeof merged)) {
        if (handle)
            *handle = NULL;
        return fail(NULL, SAA_E_INVALID_ARGUMENT,
                    "saa_open_ex: options->struct_size is %d, expected %d to %d (fill the options with "
                    "saa_open_options_init; a larger struct comes from a newer saa.h than this library)",
                    (int)options->struct_size, (int)OPEN_OPTIONS_V1_SIZE, (int)sizeof merged);
    }
    if (options) /* an older program's struct: the fields it lacks keep their defaults */
        memcpy(&merged, options, (size_t)options->struct_size);
    return open_pipeline("saa_open_ex", engine_dir, config, &merged, handle);
}

SAA_API int saa_infer(saa_pipeline *handle, const uint8_t *pixels, int height, int width, int stride_bytes,
                      int channels, float *map_out, int map_height, int map_width, saa_region *regions_out,
                      int max_regions, int *n_regions) {
    if (n_regions)
        *n_regions = 0;
    int status = check_handle(handle, "saa_infer");
    if (status != SAA_OK)
        return status;
    if (!pixels)
        return fail(handle, SAA_E_INVALID_ARGUMENT, "saa_infer: pixels is NULL");
    if (height <= 0 || width <= 0)
        return fail(handle, SAA_E_INVALID_ARGUMENT, "saa_infer: image size %d x %d (height x width) is not positive",
                    height, width);
    if (channels != 1 && channels != 3 && channels != 4)
        return fail(handle, SAA_E_INVALID_ARGUMENT, "saa_infer: channels = %d (expected 1 gray, 3 BGR or 4 BGRA)",
                    channels);
    long long row = (long long)width * channels;
    if ((long long)stride_bytes < row)
        return fail(handle, SAA_E_INVALID_ARGUMENT,
                    "saa_infer: stride_bytes %d is smaller than a row (width %d x %d channels = %lld bytes)",
                    stride_bytes, width, channels, row);
    if (!map_out)
        return fail(handle, SAA_E_INVALID_ARGUMENT, "saa_infer: map_out is NULL");
    if (map_height == 0 && map_width == 0) {
        map_height = height;
        map_width = width;
    } else if (map_height <= 0 || map_width <= 0) {
        return fail(handle, SAA_E_INVALID_ARGUMENT,
                    "saa_infer: map size %d x %d (height x width) is not positive (0 x 0 means the image size)",
                    map_height, map_width);
    }
    if (max_regions < 0)
        return fail(handle, SAA_E_INVALID_ARGUMENT, "saa_infer: max_regions = %d is negative", max_regions);
    if (max_regions > 0 && !regions_out)
        return fail(handle, SAA_E_INVALID_ARGUMENT, "saa_infer: regions_out is NULL but max_regions is %d",
                    max_regions);
    if (!n_regions)
        return fail(handle, SAA_E_INVALID_ARGUMENT, "saa_infer: n_regions is NULL");

    lock_call(handle);
    if (handle->closed) {
        pthread_mutex_unlock(&handle->call_lock);
        return fail(handle, SAA_E_CLOSED, "saa_infer: the handle was closed by saa_close");
    }
    char message[ERROR_CAPACITY];
    long long count = 0;
    PyGILState_STATE gil = py_PyGILState_Ensure();
    PyObject *reply = py_PyObject_CallFunction(
        host_infer, "OKiiiiKiiKi", handle->pipeline, (unsigned long long)(uintptr_t)pixels, height, width,
        stride_bytes, channels, (unsigned long long)(uintptr_t)map_out, map_height, map_width,
        (unsigned long long)(uintptr_t)regions_out, max_regions);
    status = unpack_reply(reply, NULL, &count, message, sizeof message);
    py_PyGILState_Release(gil);
    pthread_mutex_unlock(&handle->call_lock);
    if (status != SAA_OK)
        return fail(handle, status, "saa_infer: %s", message);
    *n_regions = (int)count;
    return SAA_OK;
}

SAA_API const char *saa_last_error(const saa_pipeline *handle) {
    if (!handle) {
        copy_text(returned_error, thread_error, sizeof returned_error);
    } else if (registered(handle)) {
        saa_pipeline *known = (saa_pipeline *)handle; /* the lock is not part of the handle's state */
        pthread_mutex_lock(&known->error_lock);
        copy_text(returned_error, known->error, sizeof returned_error);
        pthread_mutex_unlock(&known->error_lock);
    } else {
        snprintf(returned_error, sizeof returned_error, "saa_last_error: %p is not a handle returned by saa_open",
                 (const void *)handle);
    }
    return returned_error;
}

SAA_API int saa_close(saa_pipeline *handle) {
    int status = check_handle(handle, "saa_close");
    if (status != SAA_OK)
        return status;
    lock_call(handle);
    if (handle->closed) {
        pthread_mutex_unlock(&handle->call_lock);
        return fail(handle, SAA_E_CLOSED, "saa_close: the handle was already closed");
    }
    PyGILState_STATE gil = py_PyGILState_Ensure();
    PyObject *reply = py_PyObject_CallFunction(host_close, "O", handle->pipeline);
    if (!reply)
        py_PyErr_Clear(); /* closing cannot fail in a way the caller could act on */
    py_Py_DecRef(reply);
    py_Py_DecRef(handle->pipeline);
    py_PyGILState_Release(gil);
    handle->pipeline = NULL;
    handle->closed = 1;
    pthread_mutex_unlock(&handle->call_lock);
    return SAA_OK;
}

/* One line-side command on the handle's pipeline: runtime.capi._host.control(pipeline, command, a, b, out, text). */
static int control(saa_pipeline *handle, const char *function, const char *command, double a, double b, void *out,
                   const char *text, long long *number) {
    int status = check_handle(handle, function);
    if (status != SAA_OK)
        return status;
    lock_call(handle);
    if (handle->closed) {
        pthread_mutex_unlock(&handle->call_lock);
        return fail(handle, SAA_E_CLOSED, "%s: the handle was closed by saa_close", function);
    }
    char message[ERROR_CAPACITY];
    PyGILState_STATE gil = py_PyGILState_Ensure();
    PyObject *reply = py_PyObject_CallFunction(host_control, "OsddKy", handle->pipeline, command, a, b,
                                               (unsigned long long)(uintptr_t)out, text);
    status = unpack_reply(reply, NULL, number, message, sizeof message);
    py_PyGILState_Release(gil);
    pthread_mutex_unlock(&handle->call_lock);
    if (status != SAA_OK)
        return fail(handle, status, "%s: %s", function, message);
    return SAA_OK;
}

SAA_API int saa_set_thresholds(saa_pipeline *handle, double image_threshold, double pixel_threshold) {
    long long ignored = 0;
    return control(handle, "saa_set_thresholds", "thresholds", image_threshold, pixel_threshold, NULL, NULL,
                   &ignored);
}

SAA_API int saa_last_decision(saa_pipeline *handle, float *pred_score, int *pred_label) {
    if (!pred_score || !pred_label)
        return fail(registered(handle) ? handle : NULL, SAA_E_INVALID_ARGUMENT,
                    "saa_last_decision: pred_score or pred_label is NULL");
    long long label = -1;
    int status = control(handle, "saa_last_decision", "decision", 0.0, 0.0, pred_score, NULL, &label);
    if (status == SAA_OK)
        *pred_label = (int)label;
    return status;
}

SAA_API int saa_last_exact(saa_pipeline *handle, int *exact, int *detector_height, int *detector_width) {
    if (!exact || !detector_height || !detector_width)
        return fail(registered(handle) ? handle : NULL, SAA_E_INVALID_ARGUMENT,
                    "saa_last_exact: exact, detector_height or detector_width is NULL");
    int32_t size[2] = {0, 0};
    long long flag = 0;
    int status = control(handle, "saa_last_exact", "exact", 0.0, 0.0, size, NULL, &flag);
    if (status == SAA_OK) {
        *exact = (int)flag;
        *detector_height = (int)size[0];
        *detector_width = (int)size[1];
    }
    return status;
}

SAA_API int saa_reset_memory(saa_pipeline *handle) {
    long long ignored = 0;
    return control(handle, "saa_reset_memory", "reset_memory", 0.0, 0.0, NULL, NULL, &ignored);
}

SAA_API int saa_last_mask(saa_pipeline *handle, uint8_t *mask_out, int map_height, int map_width) {
    if (!mask_out)
        return fail(registered(handle) ? handle : NULL, SAA_E_INVALID_ARGUMENT, "saa_last_mask: mask_out is NULL");
    if (map_height < 0 || map_width < 0 || (map_height == 0) != (map_width == 0))
        return fail(registered(handle) ? handle : NULL, SAA_E_INVALID_ARGUMENT,
                    "saa_last_mask: map size %d x %d (height x width) is not positive (0 x 0 means the image size)",
                    map_height, map_width);
    long long ignored = 0;
    return control(handle, "saa_last_mask", "mask", (double)map_height, (double)map_width, mask_out, NULL, &ignored);
}

SAA_API int saa_save_memory(saa_pipeline *handle, const char *path) {
    if (!path || !*path)
        return fail(registered(handle) ? handle : NULL, SAA_E_INVALID_ARGUMENT, "saa_save_memory: path is %s",
                    path ? "empty" : "NULL");
    long long ignored = 0;
    return control(handle, "saa_save_memory", "save_memory", 0.0, 0.0, NULL, path, &ignored);
}
