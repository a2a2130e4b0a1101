/* One output element of the CUDA kernel (msda_cuda.cu), written once for the device and the host:
 * tests/test_ops.py compiles it for the CPU and checks it against PyTorch, so the GPU's indexing
 * and corner arithmetic are tested where no GPU is. */
#ifndef SAA_MSDA_ELEMENT_H
#define SAA_MSDA_ELEMENT_H

#include <math.h>
#include <stdint.h>

#include "msda.h"

#ifdef __CUDACC__
#define SAA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SAA_HOST_DEVICE static inline
#endif

/* False for a NaN or infinite sample coordinate or weight: grid_sample's sum is NaN there. */
SAA_HOST_DEVICE int saa_msda_finite(float x, float y, float w) {
  return isfinite(x) && isfinite(y) && isfinite(w);
}

/* out[index] of [B, Q, H*d]: index is (row = b*Q + q, head h, channel c) in that order. */
SAA_HOST_DEVICE float saa_msda_element(const SaaMsdaShape* s, const float* value, const float* grids,
                                       const float* weights, int64_t index) {
  const int64_t c = index % s->channels;
  const int64_t h = (index / s->channels) % s->heads;
  const int64_t row = index / (s->channels * s->heads);
  const int64_t b = row / s->queries;
  const int64_t row_stride = s->heads * s->channels;  /* one position's values */
  const float* base = value + b * s->positions * row_stride + h * s->channels + c;
  const int64_t sample0 = (row * s->heads + h) * s->levels * s->points;
  const float* grid = grids + sample0 * 2;
  const float* weight = weights + sample0;
  float acc = 0.f;
  for (int64_t l = 0; l < s->levels; ++l) {
    const int64_t height = s->height[l], width = s->width[l];
    const float* level = base + s->start[l] * row_stride;
    for (int64_t p = 0; p < s->points; ++p, grid += 2, ++weight) {
      const float x = ((grid[0] + 1.f) * (float)width - 1.f) / 2.f; /* grid_sample, align_corners=False */
      const float y = ((grid[1] + 1.f) * (float)height - 1.f) / 2.f;
      if (!(x > -1.f && x < (float)width && y > -1.f && y < (float)height)) { /* all corners off, or NaN */
        if (!saa_msda_finite(x, y, *weight)) return NAN; /* from upstream: shown, not hidden */
        continue;
      }
      const float x0f = floorf(x), y0f = floorf(y);
      const int64_t x0 = (int64_t)x0f, y0 = (int64_t)y0f;
      const float fx = x - x0f, fy = y - y0f;
      const int left = x0 >= 0, right = x0 + 1 < width, top = y0 >= 0, bottom = y0 + 1 < height;
      const float* v = level + (y0 * width + x0) * row_stride; /* read only where the corner is inside */
      float sum = 0.f;
      if (top && left) sum += (1.f - fx) * (1.f - fy) * v[0];
      if (top && right) sum += fx * (1.f - fy) * v[row_stride];
      if (bottom && left) sum += (1.f - fx) * fy * v[width * row_stride];
      if (bottom && right) sum += fx * fy * v[(width + 1) * row_stride];
      acc += *weight * sum;
    }
  }
  return acc;
}

#endif
