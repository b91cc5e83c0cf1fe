// One draw per row from softmax(logits), in one call (runtime/engine/sampler.py, `_sample`).
//
//   sample_rows(logits [S, V] float32, uniforms [S] float64) -> tokens [S] int64
//
// Row r's token is the first whose cumulative weight exceeds uniforms[r] times the row's
// total, the weights being exp(logit - max). That is the sampler's inverse CDF
// (`_inverse_cdf`) with the weights it would have computed, done in two passes over the row
// and without the dozen torch dispatches (and their vocabulary-sized temporaries) between
// them: at SmolLM2's 49k-token vocabulary those cost more than the arithmetic, about
// 0.4 ms a step for one row.
//
// Pass 1: the row's max over its finite logits. Pass 2: each block of kBlock tokens' weight,
// summed in float32 lanes (libmvec's exp under -ffast-math) and accumulated in float64. The
// target's block is then found from the float64 block sums, and the token within it from a
// float64 running sum of its recomputed weights. A logit of -inf (masked by top-k, top-p,
// min-p or min_tokens), +inf or NaN weighs 0; the check reads the bits, which -ffast-math
// cannot assume away. Rounding can leave the search at a block's end on a token of weight
// 0; the row is then searched again with one float64 running sum over the whole row, as
// `_inverse_cdf` does. A row with no finite logit gets token 0 (the sampler never builds
// one: filters always keep the most likely token).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;

inline bool finite_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) != 0x7f800000u;
}

// exp(x - max) for a finite x, else 0.
inline float weight(float x, float max) { return finite_bits(x) ? std::exp(x - max) : 0.0f; }

float block_weight(const float* x, int64_t n, float max) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += weight(x[i], max);
  }
  return sum;
}

// The first index in [begin, end) whose running sum, from `before`, exceeds target. When
// none does (a uniform within rounding of 1 puts the target at the very top), the last index
// of weight > 0, or end - 1 if there is none.
int64_t search(const float* x, int64_t begin, int64_t end, float max, double before,
               double target) {
  double cumulative = before;
  int64_t last_positive = end - 1;
  for (int64_t i = begin; i < end; ++i) {
    const float w = weight(x[i], max);
    cumulative += static_cast<double>(w);
    if (cumulative > target) return i;
    if (w > 0.0f) last_positive = i;
  }
  return last_positive;
}

int64_t sample_row(const float* x, int64_t vocab, double u, std::vector<double>& block_cdf) {
  float max = -std::numeric_limits<float>::max();
  bool any_finite = false;
  for (int64_t i = 0; i < vocab; ++i) {
    if (finite_bits(x[i])) {
      max = std::max(max, x[i]);
      any_finite = true;
    }
  }
  if (!any_finite) return 0;
  const int64_t num_blocks = (vocab + kBlock - 1) / kBlock;
  block_cdf.resize(num_blocks);
  double total = 0.0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t begin = b * kBlock, n = std::min(kBlock, vocab - begin);
    total += static_cast<double>(block_weight(x + begin, n, max));
    block_cdf[b] = total;
  }
  const double target = u * total;
  const int64_t block = std::min<int64_t>(
      std::upper_bound(block_cdf.begin(), block_cdf.end(), target) - block_cdf.begin(),
      num_blocks - 1);
  const double before = block > 0 ? block_cdf[block - 1] : 0.0;
  int64_t token = search(x, block * kBlock, std::min(vocab, (block + 1) * kBlock), max, before,
                         target);
  if (weight(x[token], max) <= 0.0f) {
    // The blocks' float32 sums put the target past the block's last token of weight > 0.
    double whole = 0.0;
    for (int64_t i = 0; i < vocab; ++i) whole += static_cast<double>(weight(x[i], max));
    token = search(x, 0, vocab, max, 0.0, u * whole);
  }
  return token;
}

at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& uniforms) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "sample_rows: logits float32 [S, V] with contiguous rows");
  TORCH_CHECK(uniforms.dim() == 1 && uniforms.scalar_type() == at::kDouble &&
                  uniforms.size(0) == logits.size(0) && uniforms.is_contiguous(),
              "sample_rows: uniforms float64 [S]");
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(vocab > 0, "sample_rows: an empty vocabulary");
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  const double* u = uniforms.data_ptr<double>();
  int64_t* out = tokens.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> block_cdf;
    for (int64_t r = begin; r < end; ++r) {
      out[r] = sample_row(x + r * stride, vocab, u[r], block_cdf);
    }
  });
  return tokens;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(brim_cpu, m) {
  m.def("sample_rows(Tensor logits, Tensor uniforms) -> Tensor");
}

TORCH_LIBRARY_IMPL(brim_cpu, CPU, m) { m.impl("sample_rows", &sample_rows); }
