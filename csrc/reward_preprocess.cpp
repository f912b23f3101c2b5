// Torch binding of the fused reward-input preparation (fdfo_fast._C): input checks, the CPU path
// (at::parallel_for over output rows) and, in CUDA builds, the launch on the current stream under a device guard.
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

void check_taps(const at::Tensor& index, const at::Tensor& weight, int64_t out_size, int64_t in_size,
                const std::string& name) {
  TORCH_CHECK(index.dim() == 2 && weight.dim() == 2 && index.sizes() == weight.sizes(), name,
              " index/weight must be 2-D tables of the same shape, got ", index.sizes(), " and ", weight.sizes());
  TORCH_CHECK(index.size(0) == out_size, name, " has ", index.size(0), " rows for an output of size ", out_size);
  TORCH_CHECK(index.size(1) >= 1, name, " needs at least one tap");
  TORCH_CHECK(index.scalar_type() == at::kInt, name, " index must be int32, got ", index.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, name, " weight must be float32, got ", weight.scalar_type());
  if (index.device().is_cpu()) {  // on the device this would cost a sync; the Python planner builds valid tables
    const auto lo = index.min().item<int32_t>(), hi = index.max().item<int32_t>();
    TORCH_CHECK(lo >= 0 && hi < in_size, name, " index out of range [0, ", in_size, "): [", lo, ", ", hi, "]");
  }
}

void run_cpu(const Plan& plan, const float* images) {
  const int64_t plane = static_cast<int64_t>(plan.in_h) * plan.in_w;
  for (int k = 0; k < plan.n_segments; ++k) {
    const Segment& s = plan.seg[k];
    if (s.kind == fdfo::kUInt8HWC) {
      auto* out = static_cast<uint8_t*>(s.out);
      at::parallel_for(0, static_cast<int64_t>(plan.batch) * plane, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) {
          const int64_t b = g / plane, pix = g % plane;
          for (int c = 0; c < 3; ++c) out[g * 3 + c] = fdfo::to_uint8(images[(b * 3 + c) * plane + pix]);
        }
      });
      continue;
    }
    // Separable on the CPU: per (image, channel) plane, convert the source rows the crop needs once, resample
    // them horizontally into a [in_h, out_w] buffer, then vertically. Same sums as the CUDA path's direct 2-D taps.
    const bool q = s.quantize != 0;
    int32_t row_lo = plan.in_h, row_hi = -1;
    for (int64_t i = 0; i < int64_t(s.out_h) * s.taps_h; ++i) {
      if (s.row_weight[i] == 0.f) continue;
      row_lo = std::min(row_lo, s.row_index[i]);
      row_hi = std::max(row_hi, s.row_index[i]);
    }
    const int64_t planes = static_cast<int64_t>(plan.batch) * 3;
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> unit(plan.in_w), tmp(static_cast<size_t>(plan.in_h) * s.out_w);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int c = static_cast<int>(bc % 3);
        const float* src = images + bc * plane;
        for (int32_t y = row_lo; y <= row_hi; ++y) {
          for (int32_t x = 0; x < plan.in_w; ++x) unit[x] = fdfo::unit_value(src[int64_t(y) * plan.in_w + x], q);
          float* dst = tmp.data() + int64_t(y) * s.out_w;
          for (int32_t x = 0; x < s.out_w; ++x) {
            const int32_t* ci = s.col_index + int64_t(x) * s.taps_w;
            const float* cw = s.col_weight + int64_t(x) * s.taps_w;
            float acc = 0.f;
            for (int32_t j = 0; j < s.taps_w; ++j) acc += cw[j] * unit[ci[j]];
            dst[x] = q ? fdfo::snap8(acc) : acc;  // PIL's horizontal pass writes a uint8 image
          }
        }
        const int64_t base = bc * s.out_h * s.out_w;
        for (int32_t oy = 0; oy < s.out_h; ++oy) {
          const int32_t* ri = s.row_index + int64_t(oy) * s.taps_h;
          const float* rw = s.row_weight + int64_t(oy) * s.taps_h;
          for (int32_t x = 0; x < s.out_w; ++x) {
            float acc = 0.f;
            for (int32_t i = 0; i < s.taps_h; ++i)
              if (rw[i] != 0.f) acc += rw[i] * tmp[int64_t(ri[i]) * s.out_w + x];
            const float v = (q ? fdfo::snap8(acc) : acc) * s.scale[c] + s.shift[c];
            const int64_t o = base + int64_t(oy) * s.out_w + x;
            switch (s.kind) {
              case fdfo::kFloat16: static_cast<at::Half*>(s.out)[o] = at::Half(v); break;
              case fdfo::kBFloat16: static_cast<at::BFloat16*>(s.out)[o] = at::BFloat16(v); break;
              default: static_cast<float*>(s.out)[o] = v;
            }
          }
        }
      }
    });
  }
}

}  // namespace

// Checks every input and lays the outputs out as segments of one launch.
static Plan make_plan(const at::Tensor& images, const std::vector<at::Tensor>& outputs,
               const std::vector<at::Tensor>& row_index, const std::vector<at::Tensor>& row_weight,
               const std::vector<at::Tensor>& col_index, const std::vector<at::Tensor>& col_weight,
               const std::vector<double>& scale, const std::vector<double>& shift,
               const std::vector<int64_t>& quantize, const at::Tensor& uint8_out) {
  TORCH_CHECK(images.dim() == 4 && images.size(1) == 3, "images must be [B, 3, H, W], got ", images.sizes());
  TORCH_CHECK(images.scalar_type() == at::kFloat, "images must be float32 in [-1, 1], got ", images.scalar_type());
  TORCH_CHECK(images.is_contiguous(), "images must be contiguous");
  const size_t n = outputs.size();
  const bool want_uint8 = uint8_out.numel() > 0;
  TORCH_CHECK(n + (want_uint8 ? 1 : 0) <= static_cast<size_t>(fdfo::kMaxSegments), "at most ",
              fdfo::kMaxSegments, " outputs per launch (including the uint8 images), got ", n + want_uint8);
  TORCH_CHECK(row_index.size() == n && row_weight.size() == n && col_index.size() == n && col_weight.size() == n,
              "one row/column tap table per output: ", n, " outputs but ", row_index.size(), "/", row_weight.size(),
              "/", col_index.size(), "/", col_weight.size(), " tables");
  TORCH_CHECK(scale.size() == 3 * n && shift.size() == 3 * n && quantize.size() == n,
              "scale and shift need 3 values per output and quantize one flag per output");
  TORCH_CHECK(images.size(2) < (1 << 30) && images.size(3) < (1 << 30), "image too large");

  Plan plan{};
  plan.batch = static_cast<int32_t>(images.size(0));
  plan.in_h = static_cast<int32_t>(images.size(2));
  plan.in_w = static_cast<int32_t>(images.size(3));
  int64_t total = 0;
  for (size_t k = 0; k < n; ++k) {
    const std::string name = "outputs[" + std::to_string(k) + "]";
    const at::Tensor& out = outputs[k];
    TORCH_CHECK(out.dim() == 4 && out.size(0) == images.size(0) && out.size(1) == 3, name, " must be [",
                images.size(0), ", 3, h, w], got ", out.sizes());
    for (const auto* t : {&out, &row_index[k], &row_weight[k], &col_index[k], &col_weight[k]})
      check_same_device(*t, images, name);
    check_taps(row_index[k], row_weight[k], out.size(2), images.size(2), name + " rows");
    check_taps(col_index[k], col_weight[k], out.size(3), images.size(3), name + " columns");
    Segment& s = plan.seg[k];
    s.out = out.data_ptr();
    s.row_index = row_index[k].data_ptr<int32_t>();
    s.row_weight = row_weight[k].data_ptr<float>();
    s.col_index = col_index[k].data_ptr<int32_t>();
    s.col_weight = col_weight[k].data_ptr<float>();
    s.out_h = static_cast<int32_t>(out.size(2));
    s.out_w = static_cast<int32_t>(out.size(3));
    s.taps_h = static_cast<int32_t>(row_index[k].size(1));
    s.taps_w = static_cast<int32_t>(col_index[k].size(1));
    for (int c = 0; c < 3; ++c) {
      s.scale[c] = static_cast<float>(scale[3 * k + c]);
      s.shift[c] = static_cast<float>(shift[3 * k + c]);
    }
    s.kind = kind_of(out, name);
    s.quantize = quantize[k] != 0;
    s.begin = total;
    s.numel = out.numel();
    total += s.numel;
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
    s.begin = total;
    s.numel = uint8_out.numel();
    total += s.numel;
    plan.n_segments += 1;
  }
  plan.total = total;
  return plan;
}

// The CUDA kernel's per-element code (compute_element) run on the CPU: lets tests check the kernel's segment
// lookup, indexing and stores on machines without a GPU. Slow (direct 2-D taps); not for production use.
static void emulate_cuda_kernel(const Plan& plan, const float* src) {
  at::parallel_for(0, plan.total, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      int k;
      int64_t i;
      const float v = fdfo::compute_element(plan, src, g, &k, &i);
      const Segment& s = plan.seg[k];
      switch (s.kind) {
        case fdfo::kFloat16: static_cast<at::Half*>(s.out)[i] = at::Half(v); break;
        case fdfo::kBFloat16: static_cast<at::BFloat16*>(s.out)[i] = at::BFloat16(v); break;
        case fdfo::kUInt8HWC: static_cast<uint8_t*>(s.out)[i] = static_cast<uint8_t>(v); break;
        default: static_cast<float*>(s.out)[i] = v;
      }
    }
  });
}

// images [B, 3, H, W] float32 in [-1, 1]; outputs[k] [B, 3, h_k, w_k] with its tap tables; scale/shift 3 per output
// ((p − mean)/std as p·scale + shift); quantize one flag per output; uint8_out [B, H, W, 3] (or an empty tensor).
// emulate_kernel (CPU only): run the CUDA kernel's per-element code instead of the separable CPU path (tests).
void reward_preprocess(const at::Tensor& images, const std::vector<at::Tensor>& outputs,
                       const std::vector<at::Tensor>& row_index, const std::vector<at::Tensor>& row_weight,
                       const std::vector<at::Tensor>& col_index, const std::vector<at::Tensor>& col_weight,
                       const std::vector<double>& scale, const std::vector<double>& shift,
                       const std::vector<int64_t>& quantize, const at::Tensor& uint8_out, bool emulate_kernel) {
  const Plan plan =
      make_plan(images, outputs, row_index, row_weight, col_index, col_weight, scale, shift, quantize, uint8_out);
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
    if (emulate_kernel)
      emulate_cuda_kernel(plan, images.data_ptr<float>());
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
        py::arg("images"), py::arg("outputs"), py::arg("row_index"), py::arg("row_weight"), py::arg("col_index"),
        py::arg("col_weight"), py::arg("scale"), py::arg("shift"), py::arg("quantize"), py::arg("uint8_out"),
        py::arg("emulate_kernel") = false);
  m.def("with_cuda", &with_cuda, "Whether this build contains the CUDA path");
}
