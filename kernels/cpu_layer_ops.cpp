// The pointwise parts of a decoder layer as single ops, for steps of a few tokens on CPU
// (runtime/models/llama.py, `between_attentions_few`). At one to seven tokens per step the
// layers run eagerly (a compiled call costs more than it saves there), and eagerly an RMSNorm
// is eight dispatches, a residual add one more, RoPE six, SiLU * up two: each costs more
// than its arithmetic. Here each is one call, with transformers' rounding steps in 16-bit:
//
//   add_rms_norm_(x, residual, weight, eps) -> out
//       x += residual (in place, rounded to x's dtype, as `x + residual` is), then
//       out = weight * dtype(float(x) * rsqrt(mean(float(x)^2) + eps))
//   rms_norm(x, weight, eps) -> out         the same without the add
//   silu_mul(gate_up) -> out                 dtype(silu(gate)) * up, gate/up the halves
//   rope_(x, positions, cos_sin)             in place on [T, heads, D] rows: x * cos +
//                                            swap_halves(x) * signed_sin (rope.py's table),
//                                            each product rounded, then the sum
//   packed_linear(x, packed_weight, bias)    mkldnn::_linear_pointwise(x, w, bias, "none")
//                                            (models/cpu_linear.py): the compiled regions'
//                                            matmul as a C++ op, 4 per layer. The Python
//                                            custom op it replaces cost ~7 us of wrapper a
//                                            call, ~0.85 ms a 30-layer step.
//
// float32 differs from the torch ops only in the order of the norm's sum of squares.
// Registered as a fragment of torch.ops.brim_cpu (the decode kernel's library).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include <cmath>
#include <type_traits>

namespace {

template <typename scalar_t>
inline scalar_t round_to(float v) {
  return static_cast<scalar_t>(v);  // float32: exact; 16-bit: round to nearest even
}

template <typename scalar_t>
void rms_norm_rows(scalar_t* x, const scalar_t* residual, int64_t res_stride,
                   const scalar_t* weight, scalar_t* out, int64_t rows, int64_t x_stride,
                   int64_t out_stride, int64_t hidden, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* xr = x + r * x_stride;
    if (residual != nullptr) {
      const scalar_t* rr = residual + r * res_stride;
      for (int64_t i = 0; i < hidden; ++i) {
        xr[i] = round_to<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
      }
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < hidden; ++i) {
      const float v = static_cast<float>(xr[i]);
      sum += v * v;
    }
    const float rstd = 1.0f / std::sqrt(sum / static_cast<float>(hidden) + eps);
    scalar_t* o = out + r * out_stride;
    for (int64_t i = 0; i < hidden; ++i) {
      const scalar_t normed = round_to<scalar_t>(static_cast<float>(xr[i]) * rstd);
      o[i] = round_to<scalar_t>(static_cast<float>(weight[i]) * static_cast<float>(normed));
    }
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, ": x [T, hidden] with contiguous rows");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              name, ": weight [hidden] in x's dtype");
}

at::Tensor norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                double eps) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(),
                            residual ? residual->data_ptr<scalar_t>() : nullptr,
                            residual ? residual->stride(0) : 0, weight.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), x.size(0), x.stride(0), out.stride(0),
                            x.size(1), static_cast<float>(eps));
  });
  return out;
}

at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& residual,
                         const at::Tensor& weight, double eps) {
  check_rows(x, weight, "add_rms_norm_");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.stride(1) == 1 &&
                  residual.scalar_type() == x.scalar_type(),
              "add_rms_norm_: residual like x");
  return norm(x, &residual, weight, eps);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "rms_norm");
  return norm(x, nullptr, weight, eps);
}

template <typename scalar_t>
void silu_mul_rows(const scalar_t* in, int64_t in_stride, scalar_t* out, int64_t rows,
                   int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* gate = in + r * in_stride;
    const scalar_t* up = gate + width;
    scalar_t* o = out + r * width;
    for (int64_t i = 0; i < width; ++i) {
      const float g = static_cast<float>(gate[i]);
      const scalar_t act = round_to<scalar_t>(g / (1.0f + std::exp(-g)));
      o[i] = round_to<scalar_t>(static_cast<float>(act) * static_cast<float>(up[i]));
    }
  }
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up [T, 2 * width] with contiguous rows");
  const int64_t width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), width}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul",
                                  [&] {
                                    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(),
                                                            gate_up.stride(0),
                                                            out.data_ptr<scalar_t>(),
                                                            gate_up.size(0), width);
                                  });
  return out;
}

template <typename scalar_t>
void rope_rows(scalar_t* x, int64_t token_stride, int64_t head_stride, int64_t tokens,
               int64_t heads, int64_t dim, const int64_t* positions, const float* table,
               int64_t num_positions) {
  const int64_t half = dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t pos = positions[t];
    TORCH_CHECK(pos >= 0 && pos < num_positions, "rope_: position ", pos, " out of [0, ",
                num_positions, ")");
    const float* cos = table + pos * 2 * dim;  // [P, 2, D]: cos, then the signed sine
    const float* sin = cos + dim;
    for (int64_t h = 0; h < heads; ++h) {
      scalar_t* row = x + t * token_stride + h * head_stride;
      for (int64_t i = 0; i < half; ++i) {
        const scalar_t a = row[i], b = row[i + half];
        // transformers rotates in the activations' dtype: each product rounded, then the sum;
        // the table's values too are first rounded to that dtype.
        const float c0 = static_cast<float>(round_to<scalar_t>(cos[i]));
        const float c1 = static_cast<float>(round_to<scalar_t>(cos[i + half]));
        const float s0 = static_cast<float>(round_to<scalar_t>(sin[i]));
        const float s1 = static_cast<float>(round_to<scalar_t>(sin[i + half]));
        const float a_cos = static_cast<float>(round_to<scalar_t>(static_cast<float>(a) * c0));
        const float b_sin = static_cast<float>(round_to<scalar_t>(static_cast<float>(b) * s0));
        const float b_cos = static_cast<float>(round_to<scalar_t>(static_cast<float>(b) * c1));
        const float a_sin = static_cast<float>(round_to<scalar_t>(static_cast<float>(a) * s1));
        row[i] = round_to<scalar_t>(a_cos + b_sin);
        row[i + half] = round_to<scalar_t>(b_cos + a_sin);
      }
    }
  }
}

void rope_(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos_sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rope_: x [T, heads, D] with contiguous head rows");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 &&
                  positions.size(0) == x.size(0) && positions.is_contiguous(),
              "rope_: positions int64 [T]");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 3 &&
                  cos_sin.size(1) == 2 && cos_sin.size(2) == x.size(2) &&
                  cos_sin.is_contiguous(),
              "rope_: cos_sin float32 [positions, 2, D]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope_", [&] {
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.size(0), x.size(1),
                        x.size(2), positions.data_ptr<int64_t>(), cos_sin.data_ptr<float>(),
                        cos_sin.size(0));
  });
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed_weight,
                         const std::optional<at::Tensor>& bias) {
  // Boxed, so that the call does not depend on the C++ signature torch's build registered.
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(packed_weight);
  stack.emplace_back(bias);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::optional<std::string>(std::string("")));
  op.callBoxed(&stack);
  return std::move(stack[0]).toTensor();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(brim_cpu, m) {
  m.def("add_rms_norm_(Tensor(a!) x, Tensor residual, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor positions, Tensor cos_sin) -> ()");
  m.def("packed_linear(Tensor x, Tensor packed_weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(brim_cpu, CPU, m) {
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_", &rope_);
  m.impl("packed_linear", &packed_linear);
}

// The packed weight is an MKLDNN tensor: a call with it dispatches on that backend's key.
TORCH_LIBRARY_IMPL(brim_cpu, MkldnnCPU, m) { m.impl("packed_linear", &packed_linear); }
