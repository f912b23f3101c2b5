// CUDA path of the fused reward-input preparation: one launch for every segment of the plan.
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
    case kUInt8HWC: static_cast<uint8_t*>(s.out)[i] = static_cast<uint8_t>(v); break;
    default: static_cast<float*>(s.out)[i] = v;
  }
}

// One thread per output element of the concatenated segments (grid-stride). Consecutive threads write
// consecutive x of one output row, so stores coalesce; the taps read a small neighbourhood that stays in L1/L2.
__global__ void reward_preprocess_kernel(const Plan plan, const float* __restrict__ images) {
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < plan.total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int k;
    int64_t i;
    const float v = compute_element(plan, images, g, &k, &i);
    store(plan.seg[k], i, v);
  }
}

}  // namespace fdfo

extern "C" cudaError_t fdfo_reward_preprocess_cuda(const fdfo::Plan* plan, const float* images, cudaStream_t stream) {
  if (plan->total == 0) return cudaSuccess;
  constexpr int threads = 256;
  const int64_t want = (plan->total + threads - 1) / threads;
  const int blocks = static_cast<int>(want < 65535 * 8 ? want : 65535 * 8);
  fdfo::reward_preprocess_kernel<<<blocks, threads, 0, stream>>>(*plan, images);
  return cudaGetLastError();
}
