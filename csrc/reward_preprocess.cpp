// Torch binding of the fused reward-input preparation (fdfo_fast._C): input checks, the CPU path (at::parallel_for
// over image planes, separable passes), the CUDA kernel emulated block by block on the CPU (tests) and, in CUDA
// builds, the launch on the current stream under a device guard.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "reward_preprocess.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
extern "C" cudaError_t fdfo_reward_preprocess_cuda(const fdfo::Plan* plan, const float* images, cudaStream_t stream);
#endif

namespace {

using fdfo::Plan;
using fdfo::Segment;

int32_t kind_of(const at::Tensor& out, const std::string& name) {
  switch (out.scalar_type()) {
    case at::kFloat: return fdfo::kFloat32;
    case at::kHalf: return fdfo::kFloat16;
    case at::kBFloat16: return fdfo::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", out.scalar_type());
  }
}

void check_same_device(const at::Tensor& t, const at::Tensor& images, const std::string& name) {
  TORCH_CHECK(t.device() == images.device(), name, " is on ", t.device(), " but images are on ", images.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// start [out] int32 (non-decreasing), weight [taps, out] float32: output i reads in[start[i] + k], k < taps.
void check_taps(const at::Tensor& start, const at::Tensor& weight, int64_t out_size, int64_t in_size,
                const std::string& name) {
  TORCH_CHECK(start.dim() == 1 && weight.dim() == 2, name,
              " needs a 1-D start table and a 2-D [taps, out] weight table, got ", start.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(start.size(0) == out_size && weight.size(1) == out_size, name, " has ", start.size(0), " starts and ",
              weight.size(1), " weight columns for an output of size ", out_size);
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(0) <= in_size, name, " needs 1 to ", in_size, " taps, got ",
              weight.size(0));
  TORCH_CHECK(start.scalar_type() == at::kInt, name, " start must be int32, got ", start.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, name, " weight must be float32, got ", weight.scalar_type());
  if (start.device().is_cpu()) {  // on the device this would cost a sync; the Python planner builds valid tables
    const int32_t* p = start.data_ptr<int32_t>();
    const int64_t taps = weight.size(0);
    const auto [lo, hi] = std::minmax_element(p, p + out_size);
    TORCH_CHECK(*lo >= 0 && *hi + taps <= in_size, name, " index out of range [0, ", in_size, "): taps [", *lo,
                ", ", *hi + taps, ")");
    TORCH_CHECK(std::is_sorted(p, p + out_size), name, " start must be non-decreasing");
  }
}

// Source columns the CUDA kernel stages per tile row must fit its shared memory (CPU tables only; the Python
// planner checks device tables): the largest stage stride + the horizontal results' stride per staged row.
void check_stage_width(const Segment& s, const std::string& name) {
  for (int32_t x0 = 0; x0 < s.out_w; x0 += fdfo::kTileW) {
    const int32_t x1 = std::min(x0 + fdfo::kTileW, s.out_w) - 1;
    const int32_t stride = (s.col_start[x1] + s.taps_w - s.col_start[x0]) | 1;
    TORCH_CHECK(stride + fdfo::kHStride <= fdfo::kStageFloats, name, ": ", fdfo::kTileW, " output columns read ",
                stride, " source columns, more than the kernel's shared memory holds (downscale factor too large)");
  }
}

void store_value(const Segment& s, int64_t o, float v) {
  switch (s.kind) {
    case fdfo::kFloat16: static_cast<at::Half*>(s.out)[o] = at::Half(v); break;
    case fdfo::kBFloat16: static_cast<at::BFloat16*>(s.out)[o] = at::BFloat16(v); break;
    default: static_cast<float*>(s.out)[o] = v;
  }
}

void run_cpu(const Plan& plan, const float* images) {
  const int64_t plane = static_cast<int64_t>(plan.in_h) * plan.in_w;
  for (int k = 0; k < plan.n_segments; ++k) {
    const Segment& s = plan.seg[k];
    if (s.kind == fdfo::kUInt8HWC) {
      auto* out = static_cast<uint8_t*>(s.out);
      const int64_t groups = (plane + fdfo::kPixelsPerThread - 1) / fdfo::kPixelsPerThread;
      at::parallel_for(0, plan.batch * groups, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g)
          fdfo::uint8_pixels_scalar(plan, images, out, g / groups, g % groups * fdfo::kPixelsPerThread);
      });
      continue;
    }
    // Separable, per (image, channel) plane: convert each source row the crop needs once, resample it horizontally
    // into a [rows, out_w] buffer, then vertically; the same tap sums (tap_sum, same order) as the CUDA kernel.
    const bool q = s.quantize != 0;
    const int32_t row_lo = s.row_start[0], row_hi = s.row_start[s.out_h - 1] + s.taps_h;
    const int64_t planes = static_cast<int64_t>(plan.batch) * 3;
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> unit(plan.in_w), tmp(static_cast<size_t>(row_hi - row_lo) * s.out_w);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int c = static_cast<int>(bc % 3);
        const float* src = images + bc * plane;
        for (int32_t y = row_lo; y < row_hi; ++y) {
          for (int32_t x = 0; x < plan.in_w; ++x) unit[x] = fdfo::unit_value(src[int64_t(y) * plan.in_w + x], q);
          float* dst = tmp.data() + int64_t(y - row_lo) * s.out_w;
          for (int32_t x = 0; x < s.out_w; ++x) {
            const float acc =
                fdfo::tap_sum(unit.data() + s.col_start[x], 1, s.col_weight + x, s.out_w, 0, s.taps_w, 0.f);
            dst[x] = q ? fdfo::snap8(acc) : acc;  // PIL's horizontal pass writes a uint8 image
          }
        }
        const int64_t base = bc * s.out_h * s.out_w;
        for (int32_t oy = 0; oy < s.out_h; ++oy) {
          const float* col = tmp.data() + int64_t(s.row_start[oy] - row_lo) * s.out_w;
          for (int32_t x = 0; x < s.out_w; ++x) {
            const float acc = fdfo::tap_sum(col + x, s.out_w, s.row_weight + oy, s.out_h, 0, s.taps_h, 0.f);
            store_value(s, base + int64_t(oy) * s.out_w + x, (q ? fdfo::snap8(acc) : acc) * s.scale[c] + s.shift[c]);
          }
        }
      }
    });
  }
}

// The CUDA kernel run on the CPU, block by block: each phase between two barriers runs for every thread of the block
// in turn, with the block's shared memory and every thread's registers (accumulators) as plain arrays. Lets tests
// check the kernel's tiling, chunking, shared-memory indexing, uint8 packing and stores on machines without a GPU.
void emulate_cuda_kernel(const Plan& plan, const float* images) {
  const int64_t plane = static_cast<int64_t>(plan.in_h) * plan.in_w;
  const int32_t grid_y = plan.batch * 3;
  at::parallel_for(0, static_cast<int64_t>(plan.blocks_x) * grid_y, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> smem(fdfo::kStageFloats);
    std::vector<float> acc(static_cast<size_t>(fdfo::kThreads) * fdfo::kRowsPerThread);
    for (int64_t blk = begin; blk < end; ++blk) {
      const auto bx = static_cast<int32_t>(blk % plan.blocks_x), by = static_cast<int32_t>(blk / plan.blocks_x);
      const Segment& s = plan.seg[fdfo::segment_of(plan, bx)];
      if (s.kind == fdfo::kUInt8HWC) {  // the kernel's aligned path: 4 consecutive floats per channel, 3 words
        auto* out = static_cast<uint8_t*>(s.out);
        for (int tid = 0; tid < fdfo::kThreads; ++tid) {
          const int64_t pix = fdfo::uint8_group(plan, s, bx, by, tid), b = by / 3;
          if (pix < 0) continue;
          if (plane % 4 != 0) {
            fdfo::uint8_pixels_scalar(plan, images, out, b, pix);
            continue;
          }
          uint32_t word[3];
          fdfo::pack_pixels4(images + (b * 3) * plane + pix, images + (b * 3 + 1) * plane + pix,
                             images + (b * 3 + 2) * plane + pix, word);
          std::memcpy(out + (b * plane + pix) * 3, word, sizeof(word));  // little-endian, like the GPU
        }
        continue;
      }
      const fdfo::Tile t = fdfo::make_tile(s, bx, by);
      std::fill(acc.begin(), acc.end(), 0.f);
      if (t.chunk_rows > 0) {
        float* stage = smem.data();
        float* h = smem.data() + t.chunk_rows * t.stage_stride;
        for (int32_t r0 = t.row_lo; r0 < t.row_hi; r0 += t.chunk_rows) {
          const int32_t n = std::min(t.row_hi - r0, t.chunk_rows);
          for (int tid = 0; tid < fdfo::kThreads; ++tid) fdfo::stage_rows(plan, s, t, images, stage, tid, r0, n);
          for (int tid = 0; tid < fdfo::kThreads; ++tid) fdfo::horizontal_rows(s, t, stage, h, tid, n);
          for (int tid = 0; tid < fdfo::kThreads; ++tid)
            fdfo::vertical_rows(s, t, h, tid, r0, n, acc.data() + tid * fdfo::kRowsPerThread);
        }
      }
      for (int tid = 0; tid < fdfo::kThreads; ++tid)
        for (int j = 0; j < fdfo::kRowsPerThread; ++j) {
          float v;
          int64_t i;
          if (fdfo::tile_output(s, t, tid, j, acc.data() + tid * fdfo::kRowsPerThread, &v, &i)) store_value(s, i, v);
        }
    }
  });
}

}  // namespace

// Checks every input and lays the outputs out as segments of one launch: tiles of the model inputs, then the uint8
// images' pixel groups, along gridDim.x; the image plane along gridDim.y.
static Plan make_plan(const at::Tensor& images, const std::vector<at::Tensor>& outputs,
                      const std::vector<at::Tensor>& row_start, const std::vector<at::Tensor>& row_weight,
                      const std::vector<at::Tensor>& col_start, const std::vector<at::Tensor>& col_weight,
                      const std::vector<double>& scale, const std::vector<double>& shift,
                      const std::vector<int64_t>& quantize, const at::Tensor& uint8_out) {
  TORCH_CHECK(images.dim() == 4 && images.size(1) == 3, "images must be [B, 3, H, W], got ", images.sizes());
  TORCH_CHECK(images.scalar_type() == at::kFloat, "images must be float32 in [-1, 1], got ", images.scalar_type());
  TORCH_CHECK(images.is_contiguous(), "images must be contiguous");
  const size_t n = outputs.size();
  const bool want_uint8 = uint8_out.numel() > 0;
  TORCH_CHECK(n + (want_uint8 ? 1 : 0) <= static_cast<size_t>(fdfo::kMaxSegments), "at most ",
              fdfo::kMaxSegments, " outputs per launch (including the uint8 images), got ", n + want_uint8);
  TORCH_CHECK(row_start.size() == n && row_weight.size() == n && col_start.size() == n && col_weight.size() == n,
              "one row/column tap table per output: ", n, " outputs but ", row_start.size(), "/", row_weight.size(),
              "/", col_start.size(), "/", col_weight.size(), " tables");
  TORCH_CHECK(scale.size() == 3 * n && shift.size() == 3 * n && quantize.size() == n,
              "scale and shift need 3 values per output and quantize one flag per output");
  TORCH_CHECK(images.size(2) < (1 << 30) && images.size(3) < (1 << 30), "image too large");
  TORCH_CHECK(images.size(0) * 3 <= 65535, "at most 21845 images per call (the image plane is gridDim.y), got ",
              images.size(0));

  Plan plan{};
  plan.batch = static_cast<int32_t>(images.size(0));
  plan.in_h = static_cast<int32_t>(images.size(2));
  plan.in_w = static_cast<int32_t>(images.size(3));
  int64_t blocks = 0;
  for (size_t k = 0; k < n; ++k) {
    const std::string name = "outputs[" + std::to_string(k) + "]";
    const at::Tensor& out = outputs[k];
    TORCH_CHECK(out.dim() == 4 && out.size(0) == images.size(0) && out.size(1) == 3 && out.size(2) >= 1 &&
                    out.size(3) >= 1,
                name, " must be [", images.size(0), ", 3, h, w] with h, w >= 1, got ", out.sizes());
    for (const auto* t : {&out, &row_start[k], &row_weight[k], &col_start[k], &col_weight[k]})
      check_same_device(*t, images, name);
    check_taps(row_start[k], row_weight[k], out.size(2), images.size(2), name + " rows");
    check_taps(col_start[k], col_weight[k], out.size(3), images.size(3), name + " columns");
    Segment& s = plan.seg[k];
    s.out = out.data_ptr();
    s.row_start = row_start[k].data_ptr<int32_t>();
    s.row_weight = row_weight[k].data_ptr<float>();
    s.col_start = col_start[k].data_ptr<int32_t>();
    s.col_weight = col_weight[k].data_ptr<float>();
    s.out_h = static_cast<int32_t>(out.size(2));
    s.out_w = static_cast<int32_t>(out.size(3));
    s.taps_h = static_cast<int32_t>(row_weight[k].size(0));
    s.taps_w = static_cast<int32_t>(col_weight[k].size(0));
    for (int c = 0; c < 3; ++c) {
      s.scale[c] = static_cast<float>(scale[3 * k + c]);
      s.shift[c] = static_cast<float>(shift[3 * k + c]);
    }
    s.kind = kind_of(out, name);
    s.quantize = quantize[k] != 0;
    s.tiles_x = (s.out_w + fdfo::kTileW - 1) / fdfo::kTileW;
    s.block_begin = static_cast<int32_t>(blocks);
    s.numel = out.numel();
    blocks += static_cast<int64_t>(s.tiles_x) * ((s.out_h + fdfo::kTileH - 1) / fdfo::kTileH);
  }
  plan.n_segments = static_cast<int32_t>(n);
  if (want_uint8) {
    TORCH_CHECK(uint8_out.scalar_type() == at::kByte, "uint8_out must be uint8, got ", uint8_out.scalar_type());
    TORCH_CHECK(uint8_out.dim() == 4 && uint8_out.size(0) == images.size(0) && uint8_out.size(1) == images.size(2) &&
                    uint8_out.size(2) == images.size(3) && uint8_out.size(3) == 3,
                "uint8_out must be [B, H, W, 3] = [", images.size(0), ", ", images.size(2), ", ", images.size(3),
                ", 3], got ", uint8_out.sizes());
    check_same_device(uint8_out, images, "uint8_out");
    Segment& s = plan.seg[n];
    s = Segment{};
    s.out = uint8_out.data_ptr();
    s.kind = fdfo::kUInt8HWC;
    // blocks per third of an image: gridDim.y = b·3 + part splits each image's pixels in three
    constexpr int64_t per_block = 3 * fdfo::kThreads * fdfo::kPixelsPerThread;
    s.tiles_x = static_cast<int32_t>((images.size(2) * images.size(3) + per_block - 1) / per_block);
    s.block_begin = static_cast<int32_t>(blocks);
    s.numel = uint8_out.numel();
    blocks += s.tiles_x;
    plan.n_segments += 1;
  }
  TORCH_CHECK(blocks < (int64_t{1} << 31), "outputs too large for one launch (", blocks, " blocks)");
  plan.blocks_x = plan.batch > 0 ? static_cast<int32_t>(blocks) : 0;
  return plan;
}

// images [B, 3, H, W] float32 in [-1, 1]; outputs[k] [B, 3, h_k, w_k] with its tap tables; scale/shift 3 per output
// ((p − mean)/std as p·scale + shift); quantize one flag per output; uint8_out [B, H, W, 3] (or an empty tensor).
// Tap tables: row_start[k] [h_k] int32 and row_weight[k] [taps, h_k] float32 (columns alike), see fdfo::Segment.
// emulate_kernel (CPU only): run the CUDA kernel block by block instead of the separable CPU path (tests).
void reward_preprocess(const at::Tensor& images, const std::vector<at::Tensor>& outputs,
                       const std::vector<at::Tensor>& row_start, const std::vector<at::Tensor>& row_weight,
                       const std::vector<at::Tensor>& col_start, const std::vector<at::Tensor>& col_weight,
                       const std::vector<double>& scale, const std::vector<double>& shift,
                       const std::vector<int64_t>& quantize, const at::Tensor& uint8_out, bool emulate_kernel) {
  const Plan plan =
      make_plan(images, outputs, row_start, row_weight, col_start, col_weight, scale, shift, quantize, uint8_out);
  if (images.is_cuda()) {
#ifdef WITH_CUDA
    const c10::cuda::CUDAGuard guard(images.device());
    const cudaError_t err =
        fdfo_reward_preprocess_cuda(&plan, images.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "reward_preprocess CUDA launch failed: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "fdfo_fast._C was built without CUDA; rebuild on a machine with the CUDA toolkit");
#endif
  } else {
    TORCH_CHECK(images.device().is_cpu(), "images must be on the CPU or a CUDA device, got ", images.device());
    if (emulate_kernel) {
      for (size_t k = 0; k < outputs.size(); ++k) check_stage_width(plan.seg[k], "outputs[" + std::to_string(k) + "]");
      emulate_cuda_kernel(plan, images.data_ptr<float>());
    }
    else
      run_cpu(plan, images.data_ptr<float>());
  }
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fdfo_fast C++/CUDA extension: fused reward-model input preparation";
  m.def("reward_preprocess", &reward_preprocess, "Fill every reward model's input (and uint8 images) in one pass",
        py::arg("images"), py::arg("outputs"), py::arg("row_start"), py::arg("row_weight"), py::arg("col_start"),
        py::arg("col_weight"), py::arg("scale"), py::arg("shift"), py::arg("quantize"), py::arg("uint8_out"),
        py::arg("emulate_kernel") = false);
  m.def("with_cuda", &with_cuda, "Whether this build contains the CUDA path");
  // the kernel's tiling, for the Python planner's device-table check and the benchmarks
  m.attr("TILE_W") = fdfo::kTileW;
  m.attr("TILE_H") = fdfo::kTileH;
  m.attr("H_STRIDE") = fdfo::kHStride;
  m.attr("STAGE_FLOATS") = fdfo::kStageFloats;
}
