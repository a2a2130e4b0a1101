/* Multi-scale deformable attention's sampling and weighted sum, shared by the CPU and CUDA kernels.
 *
 * out[b, q, h*d + c] = sum over levels l and points p of
 *     weight[b, q, h, l, p] * bilinear(value[b, level l, h, c], grid[b, q, h, l, p])
 *
 * with grid_sample's conventions: grids in [-1, 1] over each level (align_corners=False),
 * corners outside the level read as zero. value is [B, S, H, d] with the levels' positions
 * laid end to end (S = sum of height x width), grids [B, Q, H, L, P, 2] as (x, y), weights
 * [B, Q, H, L, P], out [B, Q, H*d]. */
#ifndef SAA_MSDA_H
#define SAA_MSDA_H

#include <stdint.h>

#define SAA_MSDA_MAX_LEVELS 8
#define SAA_MSDA_MAX_SIDE 16384 /* a level's height or width: 8 levels of 16384^2 add up to 2^31 */

typedef struct SaaMsdaShape {
  int64_t batch, positions, heads, channels, queries, levels, points;
  int64_t height[SAA_MSDA_MAX_LEVELS], width[SAA_MSDA_MAX_LEVELS], start[SAA_MSDA_MAX_LEVELS];
} SaaMsdaShape;

#ifdef __cplusplus
extern "C" {
#endif

/* Launches the CUDA kernel on `stream` (a cudaStream_t); returns NULL or a static error text. */
const char* saa_msda_cuda(const SaaMsdaShape* shape, const float* value, const float* grids,
                          const float* weights, float* out, void* stream);

#ifdef __cplusplus
}
#endif

#endif
