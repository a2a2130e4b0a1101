// CUDA kernel of saa.edge::MultiScaleDeformableAttention (msda.h says what it computes).
//
// One thread per output element (b, q, h, c), its body in msda_element.h (which the tests also
// compile for the CPU): with d = 32 channels a warp holds one (b, q, h), so its 32 threads read
// each corner's 32 consecutive floats in one 128-byte transaction, and the grid and weight reads
// are broadcasts. The loop over levels and points stays in registers: the standard-op form wrote
// every level's and point's samples to memory and summed them back.
#include <cuda_runtime.h>

#include "msda.h"
#include "msda_element.h"

namespace {

__global__ void MsdaKernel(const SaaMsdaShape s, const float* __restrict__ value, const float* __restrict__ grids,
                           const float* __restrict__ weights, float* __restrict__ out, int64_t total) {
  for (int64_t index = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; index < total;
       index += (int64_t)gridDim.x * blockDim.x) {
    out[index] = saa_msda_element(&s, value, grids, weights, index);
  }
}

}  // namespace

extern "C" const char* saa_msda_cuda(const SaaMsdaShape* shape, const float* value, const float* grids,
                                     const float* weights, float* out, void* stream) {
  const int64_t total = shape->batch * shape->queries * shape->heads * shape->channels;
  const int threads = 256;
  const int64_t wanted = (total + threads - 1) / threads;
  const int blocks = (int)(wanted < (1 << 20) ? wanted : (1 << 20));  // the loop strides over the rest
  MsdaKernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(*shape, value, grids, weights, out, total);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}
