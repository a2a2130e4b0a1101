/*
 * saa.h: the C ABI of the SAA+ edge runtime (zero-shot industrial anomaly segmentation).
 *
 * One pipeline object, three doors: the CLI (`python -m runtime.infer`), the Python API
 * (`runtime.pipeline.Pipeline`) and this ABI all run the same Python pipeline. The library
 * (libsaa.so, built by `pip install -e .`) hosts the Python runtime:
 *
 *  - In a Python process (ctypes, or a program that already embeds Python) it finds the
 *    running interpreter (Py_IsInitialized) and takes the GIL with PyGILState_Ensure;
 *    no second interpreter is started.
 *  - In a plain C/C++ program it loads libpython and starts an interpreter on the first
 *    saa_open. The interpreter, first match wins:
 *      1. $SAA_PYTHON, e.g. /opt/line/venv/bin/python;
 *      2. the python of the environment whose site-packages holds this library
 *         (a regular `pip install`: <prefix>/lib/python3.X/site-packages/runtime/capi);
 *      3. the interpreter that built the library (`pip install -e .`; saa_version() names it).
 *    Its sys.prefix, and so its site-packages (a venv's when it is a venv's python), are
 *    computed from that path as `python` itself does. The `runtime` package beside this
 *    library comes first on sys.path, so the Python half always matches the library.
 *    The loaded libpython must be the Python minor version the library was built for
 *    (checked); $SAA_PYTHON must belong to that same libpython (docs/capi.md). The host's
 *    SIGINT/SIGTERM/SIGPIPE/SIGXFSZ handlers are put back after Python starts and after
 *    each saa_open. A fork() child without exec must not call the library.
 *    Other environment variables, read once at start:
 *      SAA_LIBPYTHON  the libpython3.X.so to load (default: the building interpreter's).
 *      SAA_VERBOSE=1  print the interpreter (and why it was chosen), sys.prefix,
 *                     site-packages and runtime folder to stderr when Python starts.
 *      PYTHONPATH and the other PYTHON* variables work as for `python`.
 *    The embedded interpreter lives until the process exits (it is never finalised) and
 *    installs no signal handlers.
 *
 * Threads: every function may be called from any thread. Calls on one handle are
 * serialised by a lock in the handle (saa_infer and saa_close wait for each other).
 * Calls on different handles run concurrently, but the Python parts of a call hold
 * the GIL, so they overlap only where the engines run (onnxruntime and numpy release
 * the GIL). For throughput, open one handle per thread.
 *
 * Memory: the caller owns every buffer; the library never returns memory the caller
 * must free. Strings returned by saa_version() are static; saa_last_error() strings
 * are per thread (see there).
 *
 * Errors: every call returns a status (SAA_OK or a negative SAA_E_* code); no bad
 * argument, Python exception or engine failure aborts the process. saa_last_error()
 * gives a one-line message naming the problem. What the library cannot check: that a
 * non-NULL pointer really points at as many bytes as the sizes say.
 *
 * Build: g++ my_line.cpp $(python -m runtime.capi --cflags --libs)
 */
#ifndef SAA_H
#define SAA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any change to a signature, a struct or a code's meaning, and when functions are added
 * (2 added saa_open_options, saa_open_ex, saa_last_mask and saa_save_memory; what version 1 had is
 * unchanged, so a version-1 program runs with this library once rebuilt against this header;
 * 3 gave saa_open_options' reserved field its use, warm_up, which a version-2 program leaves 0;
 * 4 appended saa_open_options.settings, which an older program's smaller struct leaves NULL, and
 * added saa_last_exact). */
#define SAA_ABI_VERSION 4

#if defined(__GNUC__)
#define SAA_API __attribute__((visibility("default")))
#else
#define SAA_API
#endif

/* Status codes: 0 is success, every failure is negative. */
enum saa_status {
    SAA_OK = 0,
    SAA_E_INVALID_ARGUMENT = -1, /* NULL pointer, size <= 0, stride < row, channels not 1/3/4, map size
                                    (over 100 MP too), threshold, a path that cannot be written */
    SAA_E_BAD_HANDLE = -2,       /* NULL or not returned by saa_open */
    SAA_E_CLOSED = -3,           /* the handle was closed by saa_close */
    SAA_E_ENGINES = -4,          /* engines dir missing, incomplete, corrupt or from another version */
    SAA_E_CONFIG = -5,           /* unknown dataset/category, unreadable or invalid prompt file; a calibration
                                    or memory file unreadable or made for other engines/config */
    SAA_E_IMAGE = -6,            /* the image cannot be processed (e.g. smaller than 2x2, over 100 MP) */
    SAA_E_ENGINE = -7,           /* an engine failed to load or run (device missing, bad model) */
    SAA_E_PYTHON = -8,           /* the Python runtime could not be started or imported */
    SAA_E_INTERNAL = -9          /* anything else (a bug: the message names the Python exception) */
};

#define SAA_PHRASE_CAPACITY 64 /* bytes, NUL included */

/*
 * One defect region. saa_infer writes them in this order: the regions fused into the
 * anomaly map (in_top_k = 1) first, by score descending, then the other regions that
 * passed the property filter, by score descending. `lite` engines (saliency only)
 * give no regions.
 */
typedef struct saa_region {
    float x0, y0, x1, y1;   /* box in input image pixels (not map pixels) */
    float score;            /* final score: detector score * exp(gain * mean saliency in the mask) */
    int32_t mask_area;      /* pixels in the region's SAM mask, at the input image size */
    int32_t prompt_index;   /* index of the defect prompt that found it (general prompts first) */
    int32_t in_top_k;       /* 1: fused into the anomaly map; 0: passed the filters, not in the top K */
    char phrase[SAA_PHRASE_CAPACITY]; /* detector phrase, UTF-8, NUL-terminated, cut to fit */
} saa_region;

typedef struct saa_pipeline saa_pipeline; /* opaque handle */

/* "saa-edge <version>, C ABI <n>, Python <x.y> at <interpreter>": static, never NULL. */
SAA_API const char *saa_version(void);

/* SAA_ABI_VERSION of the library itself: compare with the header's at start-up. */
SAA_API int saa_abi_version(void);

/*
 * Open a pipeline: load the engines in engine_dir and the prompt config.
 *   engine_dir  folder written by `python -m export` (UTF-8 / file-system bytes).
 *   config      "DATASET/CATEGORY" for a shipped prompt set (e.g. "mvtec/bottle",
 *               "mtd/mtd"), or the path of the user's prompt file (an existing file,
 *               or a name ending in .json, .yaml or .yml), as the CLI's --dataset
 *               --category / --config.
 *   device      "cpu", "cuda" or "tensorrt"; NULL means "cpu".
 *   handle      receives the handle, or NULL on failure.
 * Slow (seconds: engines load, Python may start); do it once per line, not per frame.
 */
SAA_API int saa_open(const char *engine_dir, const char *config, const char *device, saa_pipeline **handle);

/*
 * Segment one frame.
 *   pixels        first byte of the top row; BGR (3), BGRA (4, alpha ignored) or gray (1)
 *                 uint8, as OpenCV and camera SDKs hand them. Read only, not kept.
 *   height,width  frame size in pixels, each >= 1 (the pipeline needs at least 2x2).
 *   stride_bytes  bytes from one row to the next, >= width * channels (row padding is fine).
 *   channels      1, 3 or 4.
 *   map_out       receives the anomaly map, float32, row-major, map_height * map_width values.
 *   map_height, map_width  the size the caller wants the map at (bilinear resize of the map
 *                 at the image size); 0, 0 means the image size (then map_out must hold
 *                 height * width floats).
 *   regions_out   receives up to max_regions regions (may be NULL when max_regions is 0).
 *   max_regions   capacity of regions_out, >= 0. Lower-ranked regions beyond it are dropped.
 *   n_regions     receives the number of regions written (never NULL).
 * On failure map_out and regions_out may be partly written and *n_regions is 0.
 */
SAA_API int saa_infer(saa_pipeline *handle, const uint8_t *pixels, int height, int width, int stride_bytes,
                      int channels, float *map_out, int map_height, int map_width, saa_region *regions_out,
                      int max_regions, int *n_regions);

/*
 * The message of the last failed call: with a handle, the last failure on that handle;
 * with NULL, the last failure on the calling thread (use this after saa_open fails).
 * "" when there was none. The string is a copy owned by the calling thread, valid until
 * its next saa_last_error call.
 */
SAA_API const char *saa_last_error(const saa_pipeline *handle);

/*
 * Release the handle's engines. Waits for a saa_infer running on it. Later calls with
 * the handle return SAA_E_CLOSED (a closed handle keeps about 1 KB so that it
 * can say so; it is never reused for another pipeline).
 */
SAA_API int saa_close(saa_pipeline *handle);

/*
 * Line-side decisions (serialised with saa_infer on the handle).
 * saa_set_thresholds: image and pixel thresholds in the anomaly map's units; NAN turns one off;
 *   infinite ones are SAA_E_INVALID_ARGUMENT.
 * saa_last_decision: of the handle's last successful saa_infer: pred_score (max of the map at
 *   the image size) and pred_label (1 NG, 0 OK, -1 when no image threshold is set).
 * saa_reset_memory: a normal / streaming memory back to how it was opened (no-op without one).
 */
SAA_API int saa_set_thresholds(saa_pipeline *handle, double image_threshold, double pixel_threshold);
/*
 * saa_last_exact: whether the handle's last successful saa_infer ran the frame exactly as the reference
 *   algorithm takes it (*exact 1). 0 where GroundingDINO's engine had to scale it down further or pad it
 *   (the region boxes and the map can then differ from the reference's); *detector_height and
 *   *detector_width then give the detector size (`python -m export --detector-size HxW`) whose
 *   engines would run frames of this size exactly, else 0 and 0. `lite` engines: always 1.
 */
SAA_API int saa_last_exact(saa_pipeline *handle, int *exact, int *detector_height, int *detector_width);
SAA_API int saa_last_decision(saa_pipeline *handle, float *pred_score, int *pred_label);
SAA_API int saa_reset_memory(saa_pipeline *handle);

/*
 * saa_last_mask: the defect mask of the handle's last successful saa_infer: 1 where its map
 *   exceeds the pixel threshold, else 0, row-major, at the map size that saa_infer wrote
 *   (map_height x map_width must be that size, 0 x 0 meaning the image size as there).
 *   SAA_E_INVALID_ARGUMENT when no pixel threshold was set at that call.
 * saa_save_memory: write the handle's memory (a streaming memory with what it learned) to
 *   `path` (.npz), to open it again with saa_open_options.memory. SAA_E_INVALID_ARGUMENT
 *   when the handle has no memory or the file cannot be written (the message says why).
 */
SAA_API int saa_last_mask(saa_pipeline *handle, uint8_t *mask_out, int map_height, int map_width);
SAA_API int saa_save_memory(saa_pipeline *handle, const char *path);

/*
 * saa_open with the line-side settings of `python -m runtime.infer`. Fill the options with
 * saa_open_options_init (it sets struct_size and every default), then change what you need:
 *
 *     saa_open_options options;
 *     saa_open_options_init(&options);
 *     options.calibration = "calibration.json";
 *     saa_open_ex("engines/", "mtd/mtd", &options, &pipe);
 *
 * Strings are UTF-8 / file-system bytes, read during the call only. A calibration made for
 * other engines, another prompt config or another memory is refused (SAA_E_CONFIG), as are
 * memory files of other engines (a memory does not depend on the prompt config).
 * options NULL: all defaults (saa_open with device "cpu").
 */
typedef struct saa_open_options {
    int32_t struct_size;     /* the caller's sizeof(saa_open_options), set by saa_open_options_init (checked) */
    int32_t threads;         /* CPU threads per engine; 0: onnxruntime's default */
    const char *device;      /* "cpu" (or NULL), "cuda" or "tensorrt" */
    const char *calibration; /* thresholds file from `python -m runtime.calibrate`; NULL: none */
    const char *memory;      /* normal memory file (`python -m runtime.memory`, saa_save_memory); NULL: none.
                                With stream_memory, the memory the stream starts from */
    int32_t stream_memory;   /* > 0: learn from parts judged normal into a memory of at most this
                                many features (docs/line-side.md); 0: off */
    int32_t warm_up;         /* nonzero: one call on a synthetic 640x480 frame before saa_open_ex returns
                                (seconds on a GPU: algorithm choice, CUDA graph capture), so the first part
                                is not the slowest; a streaming memory learns nothing from it. 0 (the
                                default): the first saa_infer pays it */
    double image_threshold;  /* NAN (the default): the calibration's, else off */
    double pixel_threshold;  /* NAN (the default): the calibration's, else off */
    const char *settings;    /* engine settings as "key=value,key=value": the fields of
                                runtime.settings.EngineSettings (docs/configuration.md), e.g.
                                "cuda_graphs=on,overlap=on,cuda_tf32=head"; NULL or "": none. A
                                setting left out takes its SAA_* variable, then its default; an
                                unknown key or value is SAA_E_CONFIG, named in the message */
} saa_open_options;

/*
 * saa_open_options_init(&options) fills the defaults and sets struct_size to the size this
 * program was compiled with (a macro over saa_open_options_init_sized), so a later library
 * with more fields never writes past an older program's struct, and saa_open_ex reads only
 * what the program's struct holds. The plain function (for bindings that cannot expand the
 * macro, e.g. ctypes) uses this library's size.
 */
SAA_API void saa_open_options_init_sized(saa_open_options *options, int32_t struct_size);
SAA_API void(saa_open_options_init)(saa_open_options *options);
#define saa_open_options_init(options) saa_open_options_init_sized((options), (int32_t)sizeof *(options))
SAA_API int saa_open_ex(const char *engine_dir, const char *config, const saa_open_options *options,
                        saa_pipeline **handle);

#ifdef __cplusplus
}
#endif

#endif /* SAA_H */
