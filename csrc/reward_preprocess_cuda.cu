// CUDA path of the fused reward-input preparation: one launch for every segment of the plan, one block per output
// tile (model inputs, separable through shared memory) or per 1024 pixels of a third of an image (uint8 HWC).
// Torch-free (raw pointers + cudaStream_t) so `nvcc -c` checks it on machines without a CUDA build of torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "reward_preprocess.h"

namespace fdfo {

__device__ __forceinline__ void store(const Segment& s, int64_t i, float v) {
  switch (s.kind) {
    case kFloat16: static_cast<__half*>(s.out)[i] = __float2half_rn(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(s.out)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(s.out)[i] = v;
  }
}

// uint8 HWC: 4 pixels per thread, three float4 loads (one per channel plane) and three 4-byte stores when the plane
// size is a multiple of 4 and both tensors are aligned; else the scalar path.
__device__ void uint8_block(const Plan& plan, const Segment& s, const float* __restrict__ images) {
  const int64_t pix = uint8_group(plan, s, blockIdx.x, blockIdx.y, threadIdx.x);
  if (pix < 0) return;
  const int64_t b = blockIdx.y / 3, plane = static_cast<int64_t>(plan.in_h) * plan.in_w;
  auto* out = static_cast<uint8_t*>(s.out);
  const bool vec = plane % 4 == 0 && reinterpret_cast<uintptr_t>(images) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 4 == 0;
  if (!vec) {
    uint8_pixels_scalar(plan, images, out, b, pix);
    return;
  }
  float4 v[3];
  for (int c = 0; c < 3; ++c) v[c] = __ldg(reinterpret_cast<const float4*>(images + (b * 3 + c) * plane + pix));
  uint32_t word[3];
  pack_pixels4(&v[0].x, &v[1].x, &v[2].x, word);
  auto* dst = reinterpret_cast<uint32_t*>(out + (b * plane + pix) * 3);
  for (int i = 0; i < 3; ++i) dst[i] = word[i];
}

// gridDim = (plan.blocks_x, batch · 3), kThreads threads, kStageFloats floats of dynamic shared memory.
__global__ void __launch_bounds__(kThreads, 4) reward_preprocess_kernel(const Plan plan,
                                                                     const float* __restrict__ images) {
  extern __shared__ float smem[];
  const Segment& s = plan.seg[segment_of(plan, blockIdx.x)];
  if (s.kind == kUInt8HWC) {
    uint8_block(plan, s, images);
    return;
  }
  const Tile t = make_tile(s, blockIdx.x, blockIdx.y);
  float acc[kRowsPerThread] = {};
  if (t.chunk_rows > 0) {
    float* stage = smem;
    float* h = smem + t.chunk_rows * t.stage_stride;
    for (int32_t r0 = t.row_lo; r0 < t.row_hi; r0 += t.chunk_rows) {
      const int32_t n = t.row_hi - r0 < t.chunk_rows ? t.row_hi - r0 : t.chunk_rows;
      stage_rows(plan, s, t, images, stage, threadIdx.x, r0, n);
      __syncthreads();
      horizontal_rows(s, t, stage, h, threadIdx.x, n);
      __syncthreads();  // the next chunk's staging only touches `stage`, which no thread reads any more
      vertical_rows(s, t, h, threadIdx.x, r0, n, acc);
    }
  }
  for (int j = 0; j < kRowsPerThread; ++j) {
    float v;
    int64_t i;
    if (tile_output(s, t, threadIdx.x, j, acc, &v, &i)) store(s, i, v);
  }
}

}  // namespace fdfo

extern "C" cudaError_t fdfo_reward_preprocess_cuda(const fdfo::Plan* plan, const float* images, cudaStream_t stream) {
  if (plan->blocks_x == 0) return cudaSuccess;
  const dim3 grid(plan->blocks_x, plan->batch * 3);
  fdfo::reward_preprocess_kernel<<<grid, fdfo::kThreads, fdfo::kStageFloats * sizeof(float), stream>>>(*plan,
                                                                                                     images);
  return cudaGetLastError();
}
