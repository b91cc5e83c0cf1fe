// Decode attention on CPU, reading the paged KV cache in place (kernels/cpu_decode.py).
//
// One query token per sequence. Each sequence is one task: its query heads walk its block
// table block by block with an online softmax (running max, running sum, rescaled
// accumulator), in float32, so nothing is gathered, padded or masked: each K and V row the
// sequence uses is read once, from where it lies in the cache.
//
// The cache is in q's dtype or FP8 (e4m3, widened per element; the caller folds the K scale
// into `scale` and applies the V scale to the output). `window` > 0: a sliding window, only
// the last `window` positions. Registered as torch.ops.brim_cpu.decode_attention (no Python
// binding module is built).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Built with -ffast-math (vectorized exp), which assumes no infinities: scores start from a
// finite floor instead of -inf. exp(kNoScore - max) is 0, as exp(-inf) would be.
constexpr float kNoScore = -1e30f;

// The order in which a sequence's work is handed out: longest first (see below).
std::vector<int64_t> longest_first(const int64_t* lengths, int64_t n) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  return order;
}

// kHeadDim: the head size fixed at compile time (64, 128: the inner loops unroll and keep
// their accumulators in registers), or 0 for any head size read at run time.
template <typename scalar_t, typename cache_t, int64_t kHeadDim>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& rows,
                           const at::Tensor& block_tables, const at::Tensor& lengths,
                           double scale, int64_t window, const at::Tensor& out) {
  const int64_t num_seqs = rows.size(0);
  const int64_t num_heads = q.size(1);
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  // Strides in elements: a token's slot holds all KV heads; a block holds block_size slots.
  const int64_t slot_stride = k_cache.stride(1), block_stride = k_cache.stride(0);
  const int64_t q_stride = q.stride(0), out_stride = out.stride(0);

  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const cache_t* k_ptr = static_cast<const cache_t*>(k_cache.data_ptr());
  const cache_t* v_ptr = static_cast<const cache_t*>(v_cache.data_ptr());
  const int64_t* row_ptr = rows.data_ptr<int64_t>();
  const int32_t* table_ptr = block_tables.data_ptr<int32_t>();
  const int64_t* len_ptr = lengths.data_ptr<int64_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);

  // One task per sequence, all its KV heads: a block's K (and V) rows for every head lie
  // together, block_size * num_kv_heads * head_dim contiguous values, read front to back.
  // The cache is far bigger than the L3, so this is a stream from memory; a task per
  // (sequence, head) read a third of every 768-byte slot and ran 1.5x slower in the engine.
  //
  // Longest first, handed out one at a time: contexts in one step range from a few tokens to
  // the whole window, and at::parallel_for's even split of the sequences left one thread
  // idle while the other finished the long ones.
  const std::vector<int64_t> order = longest_first(len_ptr, num_seqs);
  const int num_threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), num_seqs));
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> qf(num_heads * head_dim), acc(num_heads * head_dim), vrow(head_dim);
    std::vector<float> scores(num_heads * block_size), run_max(num_heads), run_sum(num_heads);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_seqs; ++i) {
      const int64_t seq = order[i];
      const int64_t len = len_ptr[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const scalar_t* q_row = q_ptr + row_ptr[seq] * q_stride;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) {
        qf[i] = static_cast<float>(q_row[i]) * fscale;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(run_max.begin(), run_max.end(), kNoScore);
      std::fill(run_sum.begin(), run_sum.end(), 0.0f);
      const int64_t last_block = (len - 1) / block_size;
      for (int64_t b = first / block_size; b <= last_block; ++b) {
        const int64_t block = table_ptr[seq * max_blocks + b];
        if (b < last_block) {  // the next block's first lines, while this one is computed
          const int64_t next = table_ptr[seq * max_blocks + b + 1];
          __builtin_prefetch(k_ptr + next * block_stride);
          __builtin_prefetch(v_ptr + next * block_stride);
        }
        const cache_t* k_block = k_ptr + block * block_stride;
        const cache_t* v_block = v_ptr + block * block_stride;
        const int64_t t0 = std::max<int64_t>(first - b * block_size, 0);
        const int64_t t1 = std::min<int64_t>(len - b * block_size, block_size);
        // Scores of this block's tokens for every query head (head hd reads KV head
        // hd / group).
        for (int64_t t = t0; t < t1; ++t) {
          const cache_t* k_slot = k_block + t * slot_stride;
          for (int64_t hd = 0; hd < num_heads; ++hd) {
            const cache_t* k_row = k_slot + (hd / group) * head_dim;
            const float* qr = qf.data() + hd * head_dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < head_dim; ++i) {
              dot += qr[i] * static_cast<float>(k_row[i]);
            }
            scores[hd * block_size + t] = dot;
          }
        }
        // Online softmax: rescale what was accumulated to the new running max.
        for (int64_t hd = 0; hd < num_heads; ++hd) {
          float* sr = scores.data() + hd * block_size;
          float block_max = kNoScore;
          for (int64_t t = t0; t < t1; ++t) {
            block_max = std::max(block_max, sr[t]);
          }
          const float new_max = std::max(run_max[hd], block_max);
          const float correction = std::exp(run_max[hd] - new_max);  // 0 on the first block
          run_max[hd] = new_max;
#pragma omp simd
          for (int64_t t = t0; t < t1; ++t) {
            sr[t] = std::exp(sr[t] - new_max);  // vectorized (libmvec) under -ffast-math
          }
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = t0; t < t1; ++t) {
            sum += sr[t];
          }
          run_sum[hd] = run_sum[hd] * correction + sum;
          float* ar = acc.data() + hd * head_dim;
#pragma omp simd
          for (int64_t i = 0; i < head_dim; ++i) {
            ar[i] *= correction;
          }
        }
        for (int64_t t = t0; t < t1; ++t) {
          const cache_t* v_slot = v_block + t * slot_stride;
          for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
            const cache_t* v_row = v_slot + kvh * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < head_dim; ++i) {
              vrow[i] = static_cast<float>(v_row[i]);
            }
            for (int64_t hd = kvh * group; hd < (kvh + 1) * group; ++hd) {
              const float p = scores[hd * block_size + t];
              float* ar = acc.data() + hd * head_dim;
#pragma omp simd
              for (int64_t i = 0; i < head_dim; ++i) {
                ar[i] += p * vrow[i];
              }
            }
          }
        }
      }
      scalar_t* o_row = out_ptr + row_ptr[seq] * out_stride;
      for (int64_t hd = 0; hd < num_heads; ++hd) {
        const float inv = 1.0f / run_sum[hd];
        for (int64_t i = 0; i < head_dim; ++i) {
          o_row[hd * head_dim + i] = static_cast<scalar_t>(acc[hd * head_dim + i] * inv);
        }
      }
    }
  }
}

#if defined(__AVX512F__)
// The same computation with AVX-512 vectors and a head size fixed at compile time (kHeadDim
// a multiple of 16), for caches in q's dtype. What differs from the generic loops above is
// where the work sits: the query heads that share a KV head (up to 4 at a time) go through
// the block's rows of that KV head together, so each K and V row is loaded (and, from
// 16-bit, widened) once for all of them, with their q and output accumulators in registers
// for the whole block. The generic loops kept all heads' accumulators in memory and loaded
// and stored them for every token: about twice the time per token on SmolLM2's shapes. One
// head at a time (each re-reading the rows) cost a 16-bit cache a widening per head: a
// bfloat16 decode layer took 0.31 ms against float32's 0.37 on half the bytes.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One block's tokens [t0, t1) for kHeads query heads that share the KV head whose rows
// start at k_rows / v_rows: scores, the online softmax's update, and the accumulators
// (acc: kHeads consecutive rows of kHeadDim; run_max, run_sum: kHeads entries).
template <typename scalar_t, int64_t kHeadDim, int kHeads>
inline void decode_block_heads(const scalar_t* q, float scale, const scalar_t* k_rows,
                               const scalar_t* v_rows, const scalar_t* next_k_rows,
                               const scalar_t* next_v_rows, int64_t slot_stride, int64_t t0,
                               int64_t t1, float* scores, float* run_max, float* run_sum,
                               float* acc) {
  constexpr int kVecs = kHeadDim / 16;
  constexpr int64_t kRowBytes = kHeadDim * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t stride = t1;  // scores[h * stride + t]
  __m512 qv[kHeads][kVecs];
  for (int h = 0; h < kHeads; ++h) {
    for (int j = 0; j < kVecs; ++j) {
      qv[h][j] = _mm512_mul_ps(load16(q + h * kHeadDim + 16 * j), _mm512_set1_ps(scale));
    }
  }
  float block_max[kHeads];
  for (int h = 0; h < kHeads; ++h) block_max[h] = kNoScore;
  for (int64_t t = t0; t < t1; ++t) {
    // The same row of the next block (nullptr: none), on its way while this block is
    // computed: a row at a time, the misses in flight stay within what the core can track.
    // All of a block's lines at once filled that queue and the core waited on it.
    if (next_k_rows != nullptr) {
      const char* line = reinterpret_cast<const char*>(next_k_rows + t * slot_stride);
      for (int64_t off = 0; off < kRowBytes; off += 64) _mm_prefetch(line + off, _MM_HINT_T0);
    }
    const scalar_t* k_row = k_rows + t * slot_stride;
    __m512 kv[kVecs];
    for (int j = 0; j < kVecs; ++j) kv[j] = load16(k_row + 16 * j);
    for (int h = 0; h < kHeads; ++h) {
      __m512 dot = _mm512_mul_ps(qv[h][0], kv[0]);
      for (int j = 1; j < kVecs; ++j) dot = _mm512_fmadd_ps(qv[h][j], kv[j], dot);
      const float score = _mm512_reduce_add_ps(dot);
      scores[h * stride + t] = score;
      block_max[h] = std::max(block_max[h], score);
    }
  }
  __m512 correction[kHeads];
  for (int h = 0; h < kHeads; ++h) {
    const float new_max = std::max(run_max[h], block_max[h]);
    const float c = std::exp(run_max[h] - new_max);  // 0 on the first block
    run_max[h] = new_max;
    float sum = 0.0f;
    float* sh = scores + h * stride;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = t0; t < t1; ++t) {
      sh[t] = std::exp(sh[t] - new_max);
      sum += sh[t];
    }
    run_sum[h] = run_sum[h] * c + sum;
    correction[h] = _mm512_set1_ps(c);
  }
  __m512 av[kHeads][kVecs];
  for (int h = 0; h < kHeads; ++h) {
    for (int j = 0; j < kVecs; ++j) {
      av[h][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + h * kHeadDim + 16 * j), correction[h]);
    }
  }
  for (int64_t t = t0; t < t1; ++t) {
    if (next_v_rows != nullptr) {
      const char* line = reinterpret_cast<const char*>(next_v_rows + t * slot_stride);
      for (int64_t off = 0; off < kRowBytes; off += 64) _mm_prefetch(line + off, _MM_HINT_T0);
    }
    const scalar_t* v_row = v_rows + t * slot_stride;
    __m512 vv[kVecs];
    for (int j = 0; j < kVecs; ++j) vv[j] = load16(v_row + 16 * j);
    for (int h = 0; h < kHeads; ++h) {
      const __m512 p = _mm512_set1_ps(scores[h * stride + t]);
      for (int j = 0; j < kVecs; ++j) av[h][j] = _mm512_fmadd_ps(p, vv[j], av[h][j]);
    }
  }
  for (int h = 0; h < kHeads; ++h) {
    for (int j = 0; j < kVecs; ++j) _mm512_storeu_ps(acc + h * kHeadDim + 16 * j, av[h][j]);
  }
}

template <typename scalar_t, int64_t kHeadDim>
void decode_attention_avx512(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& rows,
                             const at::Tensor& block_tables, const at::Tensor& lengths,
                             double scale, int64_t window, const at::Tensor& out) {
  constexpr int kVecs = kHeadDim / 16;
  const int64_t num_seqs = rows.size(0);
  const int64_t num_heads = q.size(1);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t slot_stride = k_cache.stride(1), block_stride = k_cache.stride(0);
  const int64_t q_stride = q.stride(0), out_stride = out.stride(0);

  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  const int64_t* row_ptr = rows.data_ptr<int64_t>();
  const int32_t* table_ptr = block_tables.data_ptr<int32_t>();
  const int64_t* len_ptr = lengths.data_ptr<int64_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);

  // Tasks: a sequence with all its heads, longest first; with fewer sequences than threads
  // (a decode of one or two), a task per (sequence, query head) instead, so no thread idles.
  const std::vector<int64_t> order = longest_first(len_ptr, num_seqs);
  const int64_t max_threads = at::get_num_threads();
  const int64_t heads_per_task = num_seqs < max_threads ? 1 : num_heads;
  const int64_t tasks_per_seq = num_heads / heads_per_task;
  const int64_t num_tasks = num_seqs * tasks_per_seq;
  const int num_threads = static_cast<int>(std::min<int64_t>(max_threads, num_tasks));
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> acc(num_heads * kHeadDim), scores(4 * block_size);
    std::vector<float> run_max(num_heads), run_sum(num_heads);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; ++task) {
      const int64_t seq = order[task / tasks_per_seq];
      const int64_t h0 = (task % tasks_per_seq) * heads_per_task, h1 = h0 + heads_per_task;
      const int64_t len = len_ptr[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const scalar_t* q_row = q_ptr + row_ptr[seq] * q_stride;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(run_max.begin(), run_max.end(), kNoScore);
      std::fill(run_sum.begin(), run_sum.end(), 0.0f);
      const int64_t last_block = (len - 1) / block_size;
      for (int64_t b = first / block_size; b <= last_block; ++b) {
        const int64_t block = table_ptr[seq * max_blocks + b];
        // -1: no next block to prefetch from.
        const int64_t next = b < last_block ? table_ptr[seq * max_blocks + b + 1] : -1;
        const int64_t t0 = std::max<int64_t>(first - b * block_size, 0);
        const int64_t t1 = std::min<int64_t>(len - b * block_size, block_size);
        // The task's heads, a KV head's share (up to 4) at a time.
        for (int64_t hd = h0; hd < h1;) {
          const int64_t kv_head = hd / group;
          const int64_t count = std::min<int64_t>({h1, (kv_head + 1) * group, hd + 4}) - hd;
          const int64_t kv_offset = block * block_stride + kv_head * kHeadDim;
          const int64_t next_offset = next * block_stride + kv_head * kHeadDim;
          const scalar_t* next_k = next >= 0 ? k_ptr + next_offset : nullptr;
          const scalar_t* next_v = next >= 0 ? v_ptr + next_offset : nullptr;
#define BRIM_DECODE_HEADS(N)                                                                  \
  decode_block_heads<scalar_t, kHeadDim, N>(q_row + hd * kHeadDim, fscale, k_ptr + kv_offset,  \
                                            v_ptr + kv_offset, next_k, next_v, slot_stride,    \
                                            t0, t1,                                            \
                                            scores.data(), run_max.data() + hd,                \
                                            run_sum.data() + hd, acc.data() + hd * kHeadDim)
          switch (count) {
            case 1: BRIM_DECODE_HEADS(1); break;
            case 2: BRIM_DECODE_HEADS(2); break;
            case 3: BRIM_DECODE_HEADS(3); break;
            default: BRIM_DECODE_HEADS(4); break;
          }
#undef BRIM_DECODE_HEADS
          hd += count;
        }
      }
      scalar_t* o_row = out_ptr + row_ptr[seq] * out_stride;
      for (int64_t hd = h0; hd < h1; ++hd) {
        const float inv = 1.0f / run_sum[hd];
        for (int64_t i = 0; i < kHeadDim; ++i) {
          o_row[hd * kHeadDim + i] = static_cast<scalar_t>(acc[hd * kHeadDim + i] * inv);
        }
      }
    }
  }
}
#endif

template <typename scalar_t, typename cache_t>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& rows, const at::Tensor& block_tables,
                       const at::Tensor& lengths, double scale, int64_t window,
                       const at::Tensor& out) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, cache_t> && !std::is_same_v<scalar_t, double>) {
    // Every head size of a multiple of 16 lanes that models ship with.
#define BRIM_AVX512_CASE(D)                                                                    \
  case D:                                                                                      \
    return decode_attention_avx512<scalar_t, D>(q, k_cache, v_cache, rows, block_tables,       \
                                                lengths, scale, window, out);
    switch (q.size(2)) {
      BRIM_AVX512_CASE(32)
      BRIM_AVX512_CASE(64)
      BRIM_AVX512_CASE(80)
      BRIM_AVX512_CASE(96)
      BRIM_AVX512_CASE(128)
      BRIM_AVX512_CASE(256)
      default:
        break;
    }
#undef BRIM_AVX512_CASE
  }
#endif
  switch (q.size(2)) {
    case 64:
      return decode_attention_impl<scalar_t, cache_t, 64>(q, k_cache, v_cache, rows, block_tables,
                                                          lengths, scale, window, out);
    case 128:
      return decode_attention_impl<scalar_t, cache_t, 128>(q, k_cache, v_cache, rows,
                                                           block_tables, lengths, scale, window,
                                                           out);
    default:
      return decode_attention_impl<scalar_t, cache_t, 0>(q, k_cache, v_cache, rows, block_tables,
                                                         lengths, scale, window, out);
  }
}

void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& rows, const at::Tensor& block_tables,
                      const at::Tensor& lengths, double scale, int64_t window, const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "decode_attention: q [T, heads, d], caches [blocks, block_size, kv_heads, d]");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "decode_attention: head_dim or GQA group mismatch");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && out.stride(2) == 1 &&
                  out.stride(1) == out.size(2) && out.sizes() == q.sizes(),
              "decode_attention: q and out rows must be contiguous [heads, d]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "decode_attention: contiguous caches");
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK((fp8 || q.scalar_type() == k_cache.scalar_type()) &&
                  v_cache.scalar_type() == k_cache.scalar_type() &&
                  q.scalar_type() == out.scalar_type(),
              "decode_attention: q and out share one dtype, the caches it or float8_e4m3fn");
  TORCH_CHECK(rows.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong &&
                  block_tables.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  rows.size(0) == lengths.size(0) && rows.size(0) == block_tables.size(0),
              "decode_attention: rows, lengths int64 [S], block_tables int32 [S, blocks]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention",
                                  [&] {
                                    if (fp8) {
                                      dispatch_head_dim<scalar_t, c10::Float8_e4m3fn>(
                                          q, k_cache, v_cache, rows, block_tables, lengths, scale,
                                          window, out);
                                    } else {
                                      dispatch_head_dim<scalar_t, scalar_t>(
                                          q, k_cache, v_cache, rows, block_tables, lengths, scale,
                                          window, out);
                                    }
                                  });
}

// store_kv: each token's K and V rows into their cache slots, in one call for both caches
// (the same values as quantize_kv + index_copy_, without their six dispatches per layer),
// non-finite values written as 0: the kernel above relies on a finite cache. Finiteness is
// read from the bits (an all-ones exponent), which -ffast-math cannot assume away.
template <typename scalar_t>
inline bool is_finite_bits(scalar_t x) {
  if constexpr (sizeof(scalar_t) == 4) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    return (bits & 0x7f800000u) != 0x7f800000u;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return (x.x & 0x7f80u) != 0x7f80u;
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "float32, bfloat16 or float16");
    return (x.x & 0x7c00u) != 0x7c00u;
  }
}

template <typename scalar_t>
void store_kv_impl(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const at::Tensor& slots) {
  const int64_t num_tokens = slots.size(0);
  const int64_t row = k_cache.size(2) * k_cache.size(3);  // all KV heads of one slot
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slot_ptr[t] >= 0 && slot_ptr[t] < num_slots, "store_kv: slot ", slot_ptr[t],
                " out of [0, ", num_slots, ")");
  }
  const scalar_t* src[2] = {key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>()};
  const int64_t src_stride[2] = {key.stride(0), value.stride(0)};
  scalar_t* dst[2] = {k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>()};
  // A slot is a few hundred bytes: only a prefill's thousands of tokens are worth threads.
  at::parallel_for(0, num_tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int c = 0; c < 2; ++c) {
        const scalar_t* in = src[c] + t * src_stride[c];
        scalar_t* out = dst[c] + slot_ptr[t] * row;
        for (int64_t i = 0; i < row; ++i) {
          out[i] = is_finite_bits(in[i]) ? in[i] : scalar_t(0);
        }
      }
    }
  });
}

void store_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
              const at::Tensor& v_cache, const at::Tensor& slots) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && k_cache.dim() == 4 &&
                  v_cache.sizes() == k_cache.sizes() && key.size(1) == k_cache.size(2) &&
                  key.size(2) == k_cache.size(3),
              "store_kv: key, value [T, kv_heads, d], caches [blocks, block_size, kv_heads, d]");
  TORCH_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 &&
                  value.stride(1) == value.size(2),
              "store_kv: key and value rows must be contiguous [kv_heads, d]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "store_kv: contiguous caches");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() &&
                  value.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "store_kv: key, value and the caches share one dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 &&
                  slots.size(0) == key.size(0),
              "store_kv: slots int64 [T]");
  AT_DISPATCH_SWITCH(key.scalar_type(), "store_kv",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       store_kv_impl<float>(key, value, k_cache, v_cache, slots);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       store_kv_impl<c10::BFloat16>(key, value, k_cache, v_cache, slots);
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       store_kv_impl<c10::Half>(key, value, k_cache, v_cache, slots);
                     }));
}

}  // namespace

TORCH_LIBRARY(brim_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, "
      "Tensor block_tables, Tensor lengths, float scale, int window, Tensor(a!) out) -> ()");
  m.def(
      "store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(brim_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("store_kv", &store_kv);
}
