// Fused reward-model input preparation: one launch over a batch of decoded images produces the input tensor of
// every reward model (separable resize with precomputed contiguous taps, centre crop folded into the taps, mean/std
// normalisation, output dtype) plus the uint8 HWC images that JPEG- or VLM-based rewards read.
//
// Torch-free on purpose: the CUDA translation unit includes only this header and the CUDA runtime, so it compiles
// with plain nvcc (the CI compile check), and the same per-thread code runs on the CPU, both in the separable CPU
// path (tap_sum, unit_value, snap8, uint8 packing) and in the kernel emulation (every phase of the tile kernel).
//
// The tile kernel, per block: one output tile of kTileH x kTileW pixels of one image plane. The source rows the tile
// needs are processed in chunks that fit the shared-memory budget; per chunk
//   1. stage_rows:      load the chunk's source rows [rows, stage_w] (coalesced), convert them to [0, 1] (8-bit
//                       snapped when quantize) once each, into shared memory;
//   2. horizontal_rows: horizontal taps of every staged row for the tile's kTileW columns -> shared memory (snapped
//                       to the 8-bit grid when quantize, like PIL's horizontal pass);
//   3. vertical_rows:   each thread adds the chunk's vertical taps to its kTileH / kWarps outputs in registers.
// Then store_tile snaps (quantize), normalises and stores. Taps are added in increasing order across chunks, so a
// tile's sums are the CPU path's sums, term by term.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define FDFO_HD __host__ __device__ __forceinline__
#else
#define FDFO_HD inline
#endif

namespace fdfo {

enum OutKind : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8HWC = 3 };

constexpr int kTileW = 32;                  // output columns per tile (one per lane in the vertical pass)
constexpr int kTileH = 64;                  // output rows per tile
constexpr int kThreads = 256;               // threads per block
constexpr int kWarps = kThreads / 32;       // 8
constexpr int kRowsPerThread = kTileH / kWarps;  // 8 vertical accumulators per thread
constexpr int kHStride = kTileW + 1;        // row stride of the horizontal results (odd: conflict-free banks)
constexpr int kStageFloats = 8192;          // dynamic shared memory per block: 32 KiB (7 blocks fit on an SM)
constexpr int kPixelsPerThread = 4;         // uint8 HWC: 4 pixels = 12 bytes = three 4-byte stores per thread

// One output of the launch. For a model input it is [B, 3, out_h, out_w] (NCHW); for kUInt8HWC it is
// [B, in_h, in_w, 3] and the tap tables are unused. Plain data, passed to the CUDA kernel by value.
struct Segment {
  void* out;
  // Tap tables (centre crop applied): output row y reads source rows row_start[y] + k, k < taps_h, with weights
  // row_weight[k * out_h + y] (tap-major, so consecutive outputs read consecutive addresses); row_start is
  // non-decreasing and row_start[y] + taps_h <= in_h. Columns alike.
  const int32_t* row_start;  // [out_h]
  const float* row_weight;   // [taps_h, out_h], each column sums to 1
  const int32_t* col_start;  // [out_w]
  const float* col_weight;   // [taps_w, out_w]
  int32_t out_h, out_w, taps_h, taps_w;
  float scale[3];            // out = p·scale[c] + shift[c], i.e. (p − mean)/std
  float shift[3];
  int32_t kind;              // OutKind
  int32_t quantize;          // 1: round input and resampled pixels to 1/255 like an 8-bit PIL pipeline
  int32_t tiles_x;           // tiles per plane along x (model inputs); blocks per third of an image (uint8)
  int32_t block_begin;       // first blockIdx.x of this segment; blockIdx.y is the plane b·3 + c (uint8: b·3 + part)
  int64_t numel;
};

constexpr int kMaxSegments = 8;

struct Plan {
  Segment seg[kMaxSegments];
  int32_t n_segments;
  int32_t batch, in_h, in_w;
  int32_t blocks_x;  // gridDim.x = Σ blocks of the segments; gridDim.y = batch · 3
};

// Clip to [0, 1] (the CUDA build uses the saturating instruction; both agree on every non-NaN input).
FDFO_HD float clamp01(float p) {
#ifdef __CUDA_ARCH__
  return __saturatef(p);
#else
  return p < 0.f ? 0.f : (p > 1.f ? 1.f : p);
#endif
}

// Snap to the 8-bit grid with round-half-up, as PIL does with its resampled uint8 values.
FDFO_HD float snap8(float p) { return floorf(clamp01(p) * 255.f + 0.5f) * (1.f / 255.f); }

// [-1, 1] -> [0, 1], optionally as the uint8 image a PIL pipeline starts from. v·0.5 is exact, so v·0.5 + 0.5 is
// (v + 1)·0.5 rounded once, whether or not the compiler fuses it into one FMA.
FDFO_HD float unit_value(float v, bool quantize) {
  const float p = v * 0.5f + 0.5f;
  return quantize ? snap8(p) : p;
}

FDFO_HD uint32_t to_uint8(float v) {
  const float t = clamp01(v * 0.5f + 0.5f) * 255.f + 0.5f;  // in [0.5, 255.5]
#ifdef __CUDA_ARCH__
  return __float2uint_rd(t);  // floor and convert in one instruction
#else
  return static_cast<uint32_t>(floorf(t));
#endif
}

// acc + Σ_{k0 <= k < k1} w[k·w_stride]·v[k·v_stride], in increasing k: every tap sum of both paths (horizontal and
// vertical, CPU and CUDA) is this loop.
FDFO_HD float tap_sum(const float* v, int64_t v_stride, const float* w, int64_t w_stride, int32_t k0, int32_t k1,
                      float acc) {
  for (int32_t k = k0; k < k1; ++k) acc += w[k * w_stride] * v[k * v_stride];
  return acc;
}

// Four pixels (channel planes r, g, b, 4 values each) -> 12 bytes of HWC uint8 as three little-endian words.
FDFO_HD void pack_pixels4(const float* r, const float* g, const float* b, uint32_t word[3]) {
  uint32_t u[12];
  for (int p = 0; p < 4; ++p) {
    u[3 * p] = to_uint8(r[p]);
    u[3 * p + 1] = to_uint8(g[p]);
    u[3 * p + 2] = to_uint8(b[p]);
  }
  for (int i = 0; i < 3; ++i)
    word[i] = u[4 * i] | (u[4 * i + 1] << 8) | (u[4 * i + 2] << 16) | (u[4 * i + 3] << 24);
}

// The segment that blockIdx.x `block` belongs to.
FDFO_HD int segment_of(const Plan& plan, int32_t block) {
  int k = 0;
  while (k + 1 < plan.n_segments && block >= plan.seg[k + 1].block_begin) ++k;
  return k;
}

// What one block of a model-input segment works on (the same for all its threads).
struct Tile {
  int64_t plane;          // b·3 + c
  int32_t y0, x0, ny, nx;  // output tile origin and extent (ny <= kTileH, nx <= kTileW)
  int32_t row_lo, row_hi;  // source rows [row_lo, row_hi) the tile's vertical taps read
  int32_t col_lo;          // first source column of the tile's horizontal taps
  int32_t stage_w;         // source columns staged per row
  int32_t stage_stride;    // stage_w rounded up to odd (conflict-free column reads across rows)
  int32_t chunk_rows;      // source rows staged per chunk; 0: the tile does not fit in shared memory
};

FDFO_HD Tile make_tile(const Segment& s, int32_t block, int32_t plane) {
  Tile t;
  const int32_t local = block - s.block_begin;
  const int32_t ty = local / s.tiles_x, tx = local - ty * s.tiles_x;
  t.plane = plane;
  t.y0 = ty * kTileH;
  t.x0 = tx * kTileW;
  t.ny = s.out_h - t.y0 < kTileH ? s.out_h - t.y0 : kTileH;
  t.nx = s.out_w - t.x0 < kTileW ? s.out_w - t.x0 : kTileW;
  t.row_lo = s.row_start[t.y0];  // the starts are non-decreasing
  t.row_hi = s.row_start[t.y0 + t.ny - 1] + s.taps_h;
  t.col_lo = s.col_start[t.x0];
  t.stage_w = s.col_start[t.x0 + t.nx - 1] + s.taps_w - t.col_lo;
  t.stage_stride = t.stage_w | 1;
  t.chunk_rows = kStageFloats / (t.stage_stride + kHStride);
  const int32_t span = t.row_hi - t.row_lo;
  if (t.chunk_rows > span) t.chunk_rows = span;
  return t;
}

// Phase 1: source rows [r0, r0 + n) of the tile, columns [col_lo, col_lo + stage_w), converted once each, into
// stage[r · stage_stride + c]. Warps take rows, lanes take consecutive columns (coalesced loads and stores).
FDFO_HD void stage_rows(const Plan& plan, const Segment& s, const Tile& t, const float* images, float* stage,
                        int tid, int32_t r0, int32_t n) {
  const int lane = tid & 31, warp = tid >> 5;
  const bool q = s.quantize != 0;
  const float* src = images + (t.plane * plan.in_h + r0) * plan.in_w + t.col_lo;
  for (int32_t r = warp; r < n; r += kWarps) {
    const float* row = src + static_cast<int64_t>(r) * plan.in_w;
    float* dst = stage + r * t.stage_stride;
    for (int32_t c = lane; c < t.stage_w; c += 32) dst[c] = unit_value(row[c], q);
  }
}

// Phase 2: horizontal taps of the n staged rows for the tile's columns, into h[r · kHStride + x]. Lanes take rows
// (stage reads hit distinct banks: odd stride), warps take columns (the column's weights are one broadcast load).
FDFO_HD void horizontal_rows(const Segment& s, const Tile& t, const float* stage, float* h, int tid, int32_t n) {
  const int lane = tid & 31, warp = tid >> 5;
  const bool q = s.quantize != 0;
  for (int32_t x = warp; x < t.nx; x += kWarps) {
    const int32_t sx = s.col_start[t.x0 + x] - t.col_lo;
    const float* w = s.col_weight + t.x0 + x;
    for (int32_t r = lane; r < n; r += 32) {
      const float acc = tap_sum(stage + r * t.stage_stride + sx, 1, w, s.out_w, 0, s.taps_w, 0.f);
      h[r * kHStride + x] = q ? snap8(acc) : acc;  // PIL's horizontal pass writes a uint8 image
    }
  }
}

// Phase 3: the chunk's share of the vertical taps of this thread's outputs (column x0 + lane, rows y0 + warp + 8j).
FDFO_HD void vertical_rows(const Segment& s, const Tile& t, const float* h, int tid, int32_t r0, int32_t n,
                           float acc[kRowsPerThread]) {
  const int lane = tid & 31, warp = tid >> 5;
  if (lane >= t.nx) return;
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int32_t y = warp + j * kWarps;
    if (y >= t.ny) break;
    const int32_t start = s.row_start[t.y0 + y] - r0;  // chunk-relative first tap row
    const int32_t k0 = start < 0 ? -start : 0;
    const int32_t k1 = n - start < s.taps_h ? n - start : s.taps_h;
    if (k1 <= k0) continue;
    const float* v = h + (start + k0) * kHStride + lane;
    const float* w = s.row_weight + static_cast<int64_t>(k0) * s.out_h + t.y0 + y;
    acc[j] = tap_sum(v, kHStride, w, s.out_h, 0, k1 - k0, acc[j]);
  }
}

// Last step: the value and flat NCHW index of output j of this thread (false past the tile's edge). A tile that does
// not fit in shared memory (chunk_rows == 0, never from the Python planner) yields NaN rather than reading past it.
FDFO_HD bool tile_output(const Segment& s, const Tile& t, int tid, int j, const float acc[kRowsPerThread],
                         float* value, int64_t* index) {
  const int lane = tid & 31, warp = tid >> 5;
  const int32_t y = warp + j * kWarps;
  if (lane >= t.nx || y >= t.ny) return false;
  const int c = static_cast<int>(t.plane % 3);
  const float p = s.quantize ? snap8(acc[j]) : acc[j];  // PIL clips and rounds its resampled uint8 output
  *value = t.chunk_rows > 0 ? p * s.scale[c] + s.shift[c] : NAN;
  *index = (t.plane * s.out_h + t.y0 + y) * s.out_w + t.x0 + lane;
  return true;
}

// uint8 HWC: the first pixel of this thread's group of kPixelsPerThread within image `b`, or -1 past its end.
FDFO_HD int64_t uint8_group(const Plan& plan, const Segment& s, int32_t block, int32_t grid_y, int tid) {
  const int32_t part = grid_y % 3;
  const int64_t group = (static_cast<int64_t>(part) * s.tiles_x + (block - s.block_begin)) * kThreads + tid;
  const int64_t pix = group * kPixelsPerThread;
  return pix < static_cast<int64_t>(plan.in_h) * plan.in_w ? pix : -1;
}

// The group's pixels one at a time (the path for a plane size not divisible by 4, a misaligned tensor, the CPU).
FDFO_HD void uint8_pixels_scalar(const Plan& plan, const float* images, uint8_t* out, int64_t b, int64_t pix) {
  const int64_t plane = static_cast<int64_t>(plan.in_h) * plan.in_w;
  const int64_t end = pix + kPixelsPerThread < plane ? pix + kPixelsPerThread : plane;
  for (int64_t p = pix; p < end; ++p)
    for (int c = 0; c < 3; ++c)
      out[(b * plane + p) * 3 + c] = static_cast<uint8_t>(to_uint8(images[(b * 3 + c) * plane + p]));
}

}  // namespace fdfo
