// onnxruntime custom-op library: saa.edge::MultiScaleDeformableAttention (msda.h says what it computes).
//
// Why: onnxruntime has no deformable-attention op. Written with standard ops it takes a grid_sample
// per level and point plus element-wise passes over [B*H, d, Q] per term; on an H200 that was ~95 of
// GroundingDINO's 156 ms head, and on a 2-core CPU grid_sample alone was 0.41 s of a 2.4 s caption.
// One pass that reads each sample's d channels once and accumulates in registers does the same sum.
//
// Written against onnxruntime's C API only (include/onnxruntime_c_api.h from 1.21, vendored), asking
// for API version 17: a library built with it loads in onnxruntime 1.17 and newer. The CPU kernel is always built; the
// CUDA one (msda_cuda.cu) is added when SAA_OPS_CUDA is defined (runtime/ops/build.py --cuda).
#include <math.h>
#include <string.h>

#include <mutex>
#include <string>
#include <vector>

#include "include/onnxruntime_c_api.h"
#include "msda.h"
#include "msda_element.h"  // saa_msda_finite, shared with the CUDA kernel

namespace {

const char* const kDomain = "saa.edge";
const char* const kOpName = "MultiScaleDeformableAttention";
// The C API version asked for and declared: 17 (onnxruntime 1.17, KernelContext_ParallelFor) is the
// newest thing used, so one build loads in 1.17 and every later release.
const uint32_t kApiVersion = 17;
const OrtApi* g_api = nullptr;

OrtStatus* Fail(const std::string& message) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(kOpName) + ": " + message).c_str());
}

struct Kernel {
  std::vector<int64_t> heights, widths;  // the levels' sizes, from the spatial_shapes attribute
  bool cuda = false;
};

// --- the CPU sum -------------------------------------------------------------------------------

struct CpuJob {
  const SaaMsdaShape* shape;
  const float* value;
  const float* grids;
  const float* weights;
  float* out;
  int64_t rows_per_chunk, rows;  // a row is one (batch, query)
};

// The sum is compiled for several x86 levels and picked at load time (GCC/Clang function clones):
// AVX2 with FMA took a full-size GroundingDINO layer's op from 38 to 24 ms on 2 cores.
// Dispatch on x86-64 ISA levels came with GCC 12 (GCC 11 stops with "no dispatcher found"; Clang
// before 18 is reported to dispatch wrongly): elsewhere, or with -DSAA_NO_CLONES (build.py's retry
// when a compiler refuses the clones), one baseline build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && !defined(__CUDACC__) && \
    !defined(SAA_NO_CLONES)
#define SAA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAA_CPU_CLONES
#endif

template <int kChannels>  // > 0: the channel count known at compile time (the loops vectorise fully)
__attribute__((always_inline)) inline void SumRow(const SaaMsdaShape& s, const float* value, const float* grids, const float* weights, float* out,
            int64_t channels_runtime) {
  const int64_t channels = kChannels > 0 ? kChannels : channels_runtime;
  const int64_t row_stride = s.heads * channels;  // one position's values
  for (int64_t h = 0; h < s.heads; ++h) {
    float* acc = out + h * channels;
    for (int64_t c = 0; c < channels; ++c) acc[c] = 0.f;
    const float* grid = grids + h * s.levels * s.points * 2;
    const float* weight = weights + h * s.levels * s.points;
    for (int64_t l = 0; l < s.levels; ++l) {
      const int64_t height = s.height[l], width = s.width[l];
      const float* level = value + s.start[l] * row_stride + h * channels;
      for (int64_t p = 0; p < s.points; ++p, grid += 2, ++weight) {
        // grid_sample's unnormalisation (align_corners=False): pixel = ((g + 1) * size - 1) / 2
        const float x = ((grid[0] + 1.f) * (float)width - 1.f) / 2.f;
        const float y = ((grid[1] + 1.f) * (float)height - 1.f) / 2.f;
        const float w = *weight;
        if (!(x > -1.f && x < (float)width && y > -1.f && y < (float)height)) {  // all corners out, or NaN
          // A non-finite coordinate or weight from upstream is shown, not hidden: grid_sample's sum
          // is NaN there. (On the level, a NaN weight carries through the products by itself.)
          if (!saa_msda_finite(x, y, w))
            for (int64_t c = 0; c < channels; ++c) acc[c] = NAN;
          continue;
        }
        const float x0f = floorf(x), y0f = floorf(y);
        const int64_t x0 = (int64_t)x0f, y0 = (int64_t)y0f;
        const float fx = x - x0f, fy = y - y0f;
        const float corner_weight[4] = {(1.f - fx) * (1.f - fy) * w, fx * (1.f - fy) * w, (1.f - fx) * fy * w, fx * fy * w};
        const int64_t corner_x[4] = {x0, x0 + 1, x0, x0 + 1}, corner_y[4] = {y0, y0, y0 + 1, y0 + 1};
        for (int k = 0; k < 4; ++k) {
          if (corner_x[k] < 0 || corner_x[k] >= width || corner_y[k] < 0 || corner_y[k] >= height) continue;
          const float* v = level + (corner_y[k] * width + corner_x[k]) * row_stride;
          const float cw = corner_weight[k];
          for (int64_t c = 0; c < channels; ++c) acc[c] += cw * v[c];
        }
      }
    }
  }
}

SAA_CPU_CLONES void SumChunk(void* data, size_t chunk) {
  const CpuJob& job = *static_cast<const CpuJob*>(data);
  const SaaMsdaShape& s = *job.shape;
  const int64_t begin = (int64_t)chunk * job.rows_per_chunk;
  const int64_t end = begin + job.rows_per_chunk < job.rows ? begin + job.rows_per_chunk : job.rows;
  const int64_t samples = s.heads * s.levels * s.points;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / s.queries;
    const float* value = job.value + b * s.positions * s.heads * s.channels;
    const float* grids = job.grids + row * samples * 2;
    const float* weights = job.weights + row * samples;
    float* out = job.out + row * s.heads * s.channels;
    if (s.channels == 32) {
      SumRow<32>(s, value, grids, weights, out, 32);
    } else {
      SumRow<0>(s, value, grids, weights, out, s.channels);
    }
  }
}

// --- shapes and the kernel's entry points ------------------------------------------------------

std::vector<int64_t> Dims(const OrtValue* tensor, OrtStatus** status) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  std::vector<int64_t> dims;
  if ((*status = g_api->GetTensorTypeAndShape(tensor, &info)) != nullptr) return dims;
  size_t count = 0;
  if ((*status = g_api->GetDimensionsCount(info, &count)) == nullptr) {
    dims.resize(count);
    *status = g_api->GetDimensions(info, dims.data(), count);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return dims;
}

std::string Show(const std::vector<int64_t>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

OrtStatus* Compute(void* op_kernel, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<const Kernel*>(op_kernel);
  const OrtValue* inputs[3] = {nullptr, nullptr, nullptr};
  OrtStatus* status = nullptr;
  for (size_t i = 0; i < 3; ++i) {
    if ((status = g_api->KernelContext_GetInput(context, i, &inputs[i])) != nullptr) return status;
    if (inputs[i] == nullptr) return Fail("input " + std::to_string(i) + " is missing");
  }
  const std::vector<int64_t> value = Dims(inputs[0], &status);
  if (status) return status;
  const std::vector<int64_t> grids = Dims(inputs[1], &status);
  if (status) return status;
  const std::vector<int64_t> weights = Dims(inputs[2], &status);
  if (status) return status;

  SaaMsdaShape s;
  memset(&s, 0, sizeof(s));
  if (value.size() != 4) return Fail("value must be [batch, positions, heads, channels], got " + Show(value));
  if (grids.size() != 6 || grids[5] != 2)
    return Fail("grids must be [batch, queries, heads, levels, points, 2], got " + Show(grids));
  s.batch = value[0], s.positions = value[1], s.heads = value[2], s.channels = value[3];
  s.queries = grids[1], s.levels = grids[3], s.points = grids[4];
  if (grids[0] != s.batch || grids[2] != s.heads)
    return Fail("grids " + Show(grids) + " do not match value " + Show(value) + " in batch or heads");
  if (weights != std::vector<int64_t>(grids.begin(), grids.end() - 1))
    return Fail("weights must be " + Show(std::vector<int64_t>(grids.begin(), grids.end() - 1)) + ", got " + Show(weights));
  if (s.levels != (int64_t)kernel.heights.size())
    return Fail("grids have " + std::to_string(s.levels) + " levels, spatial_shapes " + std::to_string(kernel.heights.size()));
  int64_t start = 0;
  for (int64_t l = 0; l < s.levels; ++l) {
    s.height[l] = kernel.heights[l], s.width[l] = kernel.widths[l], s.start[l] = start;
    start += s.height[l] * s.width[l];
  }
  if (start != s.positions)
    return Fail("value has " + std::to_string(s.positions) + " positions, spatial_shapes add up to " + std::to_string(start));

  const std::vector<int64_t> out_dims = {s.batch, s.queries, s.heads * s.channels};
  OrtValue* out = nullptr;
  if ((status = g_api->KernelContext_GetOutput(context, 0, out_dims.data(), out_dims.size(), &out)) != nullptr) return status;
  const float* data[3];
  for (int i = 0; i < 3; ++i) {
    void* input = nullptr;  // GetTensorMutableData: the read-only getter is newer than API 17
    if ((status = g_api->GetTensorMutableData(const_cast<OrtValue*>(inputs[i]), &input)) != nullptr) return status;
    data[i] = static_cast<const float*>(input);
  }
  float* out_data = nullptr;
  if ((status = g_api->GetTensorMutableData(out, reinterpret_cast<void**>(&out_data))) != nullptr) return status;
  if (s.batch * s.queries * s.heads * s.channels == 0) return nullptr;

  if (kernel.cuda) {
#ifdef SAA_OPS_CUDA
    void* stream = nullptr;
    if ((status = g_api->KernelContext_GetGPUComputeStream(context, &stream)) != nullptr) return status;
    const char* error = saa_msda_cuda(&s, data[0], data[1], data[2], out_data, stream);
    return error ? g_api->CreateStatus(ORT_EP_FAIL, (std::string(kOpName) + " (CUDA): " + error).c_str()) : nullptr;
#else
    return Fail("built without CUDA");
#endif
  }
  CpuJob job{&s, data[0], data[1], data[2], out_data, 64, s.batch * s.queries};
  const size_t chunks = (size_t)((job.rows + job.rows_per_chunk - 1) / job.rows_per_chunk);
  return g_api->KernelContext_ParallelFor(context, SumChunk, chunks, 0, &job);  // the session's intra-op threads
}

OrtStatus* CreateKernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  (void)api;
  size_t count = 0;
  OrtStatus* status = g_api->KernelInfoGetAttributeArray_int64(info, "spatial_shapes", nullptr, &count);
  if (status) return status;
  std::vector<int64_t> shapes(count);
  if (count && (status = g_api->KernelInfoGetAttributeArray_int64(info, "spatial_shapes", shapes.data(), &count)))
    return status;
  if (count == 0 || count % 2 || count / 2 > SAA_MSDA_MAX_LEVELS)
    return Fail("spatial_shapes must hold 1 to " + std::to_string(SAA_MSDA_MAX_LEVELS) + " (height, width) pairs, got " +
                std::to_string(count) + " numbers");
  Kernel* kernel = new Kernel();
  for (size_t i = 0; i < count; i += 2) {
    // Bounded sides: the positions they add up to must not overflow (a wrapped sum could match
    // value's S and send the kernel outside it), and pixel coordinates stay exact in float.
    if (shapes[i] <= 0 || shapes[i + 1] <= 0 || shapes[i] > SAA_MSDA_MAX_SIDE || shapes[i + 1] > SAA_MSDA_MAX_SIDE) {
      delete kernel;
      return Fail("spatial_shapes " + Show(shapes) + " has a size outside 1.." + std::to_string(SAA_MSDA_MAX_SIDE));
    }
    kernel->heights.push_back(shapes[i]);
    kernel->widths.push_back(shapes[i + 1]);
  }
  kernel->cuda = strcmp(op->GetExecutionProviderType(op), "CUDAExecutionProvider") == 0;
  *out = kernel;
  return nullptr;
}

void DestroyKernel(void* op_kernel) { delete static_cast<Kernel*>(op_kernel); }

template <bool kCuda>
OrtCustomOp MakeOp() {
  OrtCustomOp op;
  memset(&op, 0, sizeof(op));
  op.version = kApiVersion;
  op.GetName = [](const OrtCustomOp*) { return kOpName; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* {
    return kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
  };
  op.GetInputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = CreateKernel;
  op.KernelComputeV2 = Compute;
  op.KernelDestroy = DestroyKernel;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return 1 << 30; };
  return op;
}

const OrtCustomOp kCpuOp = MakeOp<false>();
#ifdef SAA_OPS_CUDA
const OrtCustomOp kCudaOp = MakeOp<true>();
#endif

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(kApiVersion);
  if (api == nullptr) {  // an onnxruntime older than 1.17: every release knows version 1's CreateStatus
    const OrtApi* oldest = api_base->GetApi(1);
    return oldest ? oldest->CreateStatus(ORT_FAIL, "the saa.edge ops need onnxruntime 1.17 or newer") : nullptr;
  }
  // One domain for the process, shared by every session that registers the library (the domain
  // must outlive them; a domain per registration was never freed). Made under a lock: sessions
  // may be opened from several threads.
  static std::mutex mutex;
  static OrtCustomOpDomain* shared_domain = nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  g_api = api;
  if (shared_domain == nullptr) {
    OrtCustomOpDomain* domain = nullptr;
    OrtStatus* status = g_api->CreateCustomOpDomain(kDomain, &domain);
    if (status) return status;
    status = g_api->CustomOpDomain_Add(domain, &kCpuOp);
#ifdef SAA_OPS_CUDA
    if (status == nullptr) status = g_api->CustomOpDomain_Add(domain, &kCudaOp);
#endif
    if (status) {
      g_api->ReleaseCustomOpDomain(domain);
      return status;
    }
    shared_domain = domain;
  }
  return g_api->AddCustomOpDomain(options, shared_domain);
}

extern "C" __attribute__((visibility("default"))) const char* SaaOpsBuildInfo(void) {
#ifdef SAA_OPS_CUDA
  return "saa.edge ops 1: CPU + CUDA";
#else
  return "saa.edge ops 1: CPU";
#endif
}
