// Fused reward-model input preparation: one pass over a batch of decoded images produces the input tensor of
// every reward model (resize with precomputed separable taps, centre crop folded into the taps, mean/std
// normalisation, output dtype) plus the uint8 HWC images that JPEG- or VLM-based rewards read.
//
// Torch-free on purpose: the CUDA translation unit includes only this header and the CUDA runtime, so it compiles
// with plain nvcc (the CI compile check) and the same per-element code runs in the C++ CPU path.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FDFO_HD __host__ __device__ __forceinline__
#else
#define FDFO_HD inline
#endif

namespace fdfo {

enum OutKind : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8HWC = 3 };

// One output of the launch. For a model input it is [B, 3, out_h, out_w] (NCHW); for kUInt8HWC it is
// [B, in_h, in_w, 3] and the tap tables are unused. Plain data, passed to the CUDA kernel by value.
struct Segment {
  void* out;
  const int32_t* row_index;  // [out_h, taps_h] source rows; the centre crop is already applied
  const float* row_weight;   // [out_h, taps_h], each row sums to 1
  const int32_t* col_index;  // [out_w, taps_w]
  const float* col_weight;   // [out_w, taps_w]
  int32_t out_h, out_w, taps_h, taps_w;
  float scale[3];            // out = p·scale[c] + shift[c], i.e. (p − mean)/std
  float shift[3];
  int32_t kind;              // OutKind
  int32_t quantize;          // 1: round input and resampled pixels to 1/255 like an 8-bit PIL pipeline
  int64_t begin;             // first flat output index of this segment in the launch
  int64_t numel;
};

constexpr int kMaxSegments = 8;

struct Plan {
  Segment seg[kMaxSegments];
  int32_t n_segments;
  int32_t batch, in_h, in_w;
  int64_t total;  // Σ numel
};

FDFO_HD float clamp01(float p) { return p < 0.f ? 0.f : (p > 1.f ? 1.f : p); }

// Clip to [0, 1] and snap to the 8-bit grid with round-half-up, as PIL does with its resampled uint8 values.
FDFO_HD float snap8(float p) { return floorf(clamp01(p) * 255.f + 0.5f) * (1.f / 255.f); }

// [-1, 1] -> [0, 1], optionally as the uint8 image a PIL pipeline starts from.
FDFO_HD float unit_value(float v, bool quantize) {
  const float p = (v + 1.f) * 0.5f;
  return quantize ? snap8(p) : p;
}

// Resampled value of output pixel (y, x) of one image plane [in_h, in_w], before normalisation. Horizontal taps
// first, then vertical, like PIL (whose 8-bit intermediate image `quantize` reproduces).
FDFO_HD float resample_pixel(const Segment& s, const float* plane, int32_t in_w, int32_t y, int32_t x) {
  const bool q = s.quantize != 0;
  const int32_t* ri = s.row_index + static_cast<int64_t>(y) * s.taps_h;
  const float* rw = s.row_weight + static_cast<int64_t>(y) * s.taps_h;
  const int32_t* ci = s.col_index + static_cast<int64_t>(x) * s.taps_w;
  const float* cw = s.col_weight + static_cast<int64_t>(x) * s.taps_w;
  float acc = 0.f;
  for (int32_t i = 0; i < s.taps_h; ++i) {
    const float wy = rw[i];
    if (wy == 0.f) continue;  // padded taps
    const float* src = plane + static_cast<int64_t>(ri[i]) * in_w;
    float row = 0.f;
    for (int32_t j = 0; j < s.taps_w; ++j) row += cw[j] * unit_value(src[ci[j]], q);
    acc += wy * (q ? snap8(row) : row);  // PIL's horizontal pass writes a uint8 image
  }
  return q ? snap8(acc) : acc;  // PIL clips and rounds its resampled uint8 output
}

FDFO_HD uint8_t to_uint8(float v) { return static_cast<uint8_t>(floorf(clamp01((v + 1.f) * 0.5f) * 255.f + 0.5f)); }

// Output element g of the concatenated segments: sets its segment and flat index there, returns the value to store
// (the normalised model input, or the 0..255 uint8 value). One CUDA thread runs this per element; the CPU
// `reward_preprocess_direct` entry point runs the very same code so tests check the kernel's indexing without a GPU.
FDFO_HD float compute_element(const Plan& plan, const float* images, int64_t g, int* seg, int64_t* index) {
  int k = 0;
  while (k + 1 < plan.n_segments && g >= plan.seg[k + 1].begin) ++k;
  const Segment& s = plan.seg[k];
  const int64_t i = g - s.begin;
  *seg = k;
  *index = i;
  const int64_t plane = static_cast<int64_t>(plan.in_h) * plan.in_w;
  if (s.kind == kUInt8HWC) {  // [B, H, W, 3] from [B, 3, H, W]
    const int64_t c = i % 3, pix = (i / 3) % plane, b = i / (3 * plane);
    return static_cast<float>(to_uint8(images[(b * 3 + c) * plane + pix]));
  }
  const int32_t x = static_cast<int32_t>(i % s.out_w);
  const int64_t rest = i / s.out_w;
  const int32_t y = static_cast<int32_t>(rest % s.out_h);
  const int64_t bc = rest / s.out_h;  // b·3 + c
  const int c = static_cast<int>(bc % 3);
  return resample_pixel(s, images + bc * plane, plan.in_w, y, x) * s.scale[c] + s.shift[c];
}

}  // namespace fdfo
