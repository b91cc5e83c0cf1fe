// Causal attention for prefill chunks on CPU, reading the paged KV cache in place
// (kernels/cpu_attention.py; torch.ops.brim_cpu.prefill_attention).
//
//   prefill_attention(q [T, heads, d], k_cache, v_cache [blocks, block_size, kv_heads, d],
//                     block_tables [P, max_blocks] int32, q_starts [P], q_lens [P],
//                     seq_lens [P] (int64), scale, window, out [T, heads, d]) -> bool
//
// Sequence p's queries are rows q_starts[p] .. + q_lens[p] of q, at positions seq_len -
// q_len .. seq_len - 1; each attends to keys 0 .. its own position (the last `window` of
// them when window > 0). Returns false, having written nothing, where this build has no
// path for the inputs (no AVX-512, a head size other than 64 or 128, a cache in another
// dtype than q): the caller then uses SDPA.
//
// Why not SDPA's flash kernel: at a 256-token prefill of SmolLM2 (9 query heads, 3 KV
// heads, d 64) it took ~1 ms a layer, 15% of the prefill, at ~75 GFLOP/s: its blocks are
// small GEMM calls. Here one task is one KV head's group of query heads (up to 4) for 16
// consecutive query positions: 16 * heads rows that share every K and V row they read. The
// scores are laid out with the 16 positions in a vector's lanes (one vector per query
// head), so that:
//   - S = Q K^T is a broadcast of one K element times a column of Q^T, accumulated over d,
//     for a chunk of kChunk keys at once (kChunk * heads accumulators in registers);
//   - the online softmax's max, exp and sum run down the keys, lane by lane: no horizontal
//     reductions at all;
//   - O^T = O^T * correction + P V is a broadcast of one V element times a column of P.
// The query's transposed rows and O^T stay in L1 (d * heads vectors each). Everything
// accumulates in float32; K and V are widened from 16-bit per chunk.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)

// -ffast-math assumes no infinities: masked scores take a finite floor (exp of it minus any
// real score is 0).
constexpr float kMasked = -1e30f;
constexpr int64_t kLanes = 16;  // query positions per task

inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 widen16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 widen16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

struct Task {
  int64_t seq, kv_head, first_head, num_heads, block;  // block: which 16 query positions
  int64_t cost;                                        // keys it reads
};

struct Scratch {
  std::vector<float> qt, ot, k, v, p;
};

// One task: kHeads query heads (of KV head `kv_head`) x 16 query positions.
template <typename scalar_t, int64_t kHeadDim, int kHeads>
void run_task(const Task& task, const scalar_t* q_ptr, int64_t q_stride, const scalar_t* k_ptr,
              const scalar_t* v_ptr, int64_t block_size, int64_t slot_stride,
              const int32_t* table, int64_t q_start, int64_t q_len, int64_t seq_len, float scale,
              int64_t window, scalar_t* out_ptr, int64_t out_stride, Scratch& s) {
  constexpr int kChunk = kHeads <= 3 ? 8 : 4;  // kChunk * kHeads score accumulators
  const int64_t first_row = task.block * kLanes;
  const int64_t rows = std::min<int64_t>(kLanes, q_len - first_row);
  const int64_t pos0 = seq_len - q_len + first_row;  // lane 0's position
  // Lanes past the last query get position -1: every key is masked for them.
  alignas(64) int32_t pos_lanes[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) pos_lanes[i] = i < rows ? static_cast<int32_t>(pos0 + i) : -1;
  const __m512i pos = _mm512_load_si512(pos_lanes);
  const __m512i lower = _mm512_sub_epi32(pos, _mm512_set1_epi32(static_cast<int32_t>(window)));

  // Q^T, scaled: qt[(d * kHeads + h) * 16 + lane].
  s.qt.assign(kHeadDim * kHeads * kLanes, 0.0f);
  s.ot.assign(kHeadDim * kHeads * kLanes, 0.0f);
  float* qt = s.qt.data();
  float* ot = s.ot.data();
  for (int64_t lane = 0; lane < rows; ++lane) {
    const scalar_t* row = q_ptr + (q_start + first_row + lane) * q_stride;
    for (int h = 0; h < kHeads; ++h) {
      const scalar_t* head = row + (task.first_head + h) * kHeadDim;
      for (int64_t d = 0; d < kHeadDim; ++d) {
        qt[(d * kHeads + h) * kLanes + lane] = static_cast<float>(head[d]) * scale;
      }
    }
  }
  s.k.resize(kChunk * kHeadDim);
  s.v.resize(kChunk * kHeadDim);
  s.p.resize((kChunk + 1) * kHeads * kLanes);  // corrections, then the chunk's scores
  float* kc = s.k.data();
  float* vc = s.v.data();
  float* pc = s.p.data();

  __m512 run_max[kHeads], run_sum[kHeads];
  for (int h = 0; h < kHeads; ++h) {
    run_max[h] = _mm512_set1_ps(kMasked);
    run_sum[h] = _mm512_setzero_ps();
  }
  const int64_t last_key = pos0 + rows - 1;
  const int64_t first_key = window > 0 ? std::max<int64_t>(0, pos0 - window + 1) : 0;
  for (int64_t j0 = first_key; j0 <= last_key; j0 += kChunk) {
    const int64_t keys = std::min<int64_t>(kChunk, last_key - j0 + 1);
    // This chunk's K and V rows, widened to float32 (zeros past the last key).
    for (int64_t k = 0; k < kChunk; ++k) {
      float* kd = kc + k * kHeadDim;
      float* vd = vc + k * kHeadDim;
      if (k >= keys) {
        std::fill(kd, kd + kHeadDim, 0.0f);
        std::fill(vd, vd + kHeadDim, 0.0f);
        continue;
      }
      const int64_t key = j0 + k;
      const int64_t offset = (static_cast<int64_t>(table[key / block_size]) * block_size +
                              key % block_size) * slot_stride + task.kv_head * kHeadDim;
      for (int64_t d = 0; d < kHeadDim; d += 16) {
        _mm512_storeu_ps(kd + d, widen16(k_ptr + offset + d));
        _mm512_storeu_ps(vd + d, widen16(v_ptr + offset + d));
      }
    }
    // Scores: s[k][h] lanes = positions.
    __m512 sc[kChunk][kHeads];
    for (int k = 0; k < kChunk; ++k)
      for (int h = 0; h < kHeads; ++h) sc[k][h] = _mm512_setzero_ps();
    for (int64_t d = 0; d < kHeadDim; ++d) {
      __m512 qv[kHeads];
      for (int h = 0; h < kHeads; ++h) qv[h] = _mm512_loadu_ps(qt + (d * kHeads + h) * kLanes);
      for (int k = 0; k < kChunk; ++k) {
        const __m512 kv = _mm512_set1_ps(kc[k * kHeadDim + d]);
        for (int h = 0; h < kHeads; ++h) sc[k][h] = _mm512_fmadd_ps(qv[h], kv, sc[k][h]);
      }
    }
    // Mask: key <= position, key > position - window, and only the chunk's real keys.
    for (int k = 0; k < kChunk; ++k) {
      const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(j0 + k));
      __mmask16 allowed = k < keys ? _mm512_cmple_epi32_mask(key, pos) : 0;
      if (window > 0) allowed &= _mm512_cmpgt_epi32_mask(key, lower);
      for (int h = 0; h < kHeads; ++h) {
        sc[k][h] = _mm512_mask_blend_ps(allowed, _mm512_set1_ps(kMasked), sc[k][h]);
      }
    }
    // Online softmax, lane by lane down the keys.
    __m512 correction[kHeads];
    for (int h = 0; h < kHeads; ++h) {
      __m512 chunk_max = sc[0][h];
      for (int k = 1; k < kChunk; ++k) chunk_max = _mm512_max_ps(chunk_max, sc[k][h]);
      const __m512 new_max = _mm512_max_ps(run_max[h], chunk_max);
      _mm512_storeu_ps(pc + h * kLanes, _mm512_sub_ps(run_max[h], new_max));
      run_max[h] = new_max;
      for (int k = 0; k < kChunk; ++k) {
        _mm512_storeu_ps(pc + ((k + 1) * kHeads + h) * kLanes, _mm512_sub_ps(sc[k][h], new_max));
      }
    }
    // exp over the corrections (first kHeads vectors) and the shifted scores (the rest),
    // vectorized by the compiler (libmvec under -ffast-math).
    {
      float* e = pc;
      const int64_t n = (kChunk + 1) * kHeads * kLanes;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) e[i] = std::exp(e[i]);
    }
    __m512 pv[kChunk][kHeads];
    for (int h = 0; h < kHeads; ++h) {
      correction[h] = _mm512_loadu_ps(pc + h * kLanes);
      __m512 sum = _mm512_setzero_ps();
      for (int k = 0; k < kChunk; ++k) {
        pv[k][h] = _mm512_loadu_ps(pc + ((k + 1) * kHeads + h) * kLanes);
        sum = _mm512_add_ps(sum, pv[k][h]);
      }
      run_sum[h] = _mm512_fmadd_ps(run_sum[h], correction[h], sum);
    }
    // O^T = O^T * correction + P V.
    for (int64_t d = 0; d < kHeadDim; ++d) {
      __m512 o[kHeads];
      for (int h = 0; h < kHeads; ++h) {
        o[h] = _mm512_mul_ps(_mm512_loadu_ps(ot + (d * kHeads + h) * kLanes), correction[h]);
      }
      for (int k = 0; k < kChunk; ++k) {
        const __m512 vv = _mm512_set1_ps(vc[k * kHeadDim + d]);
        for (int h = 0; h < kHeads; ++h) o[h] = _mm512_fmadd_ps(pv[k][h], vv, o[h]);
      }
      for (int h = 0; h < kHeads; ++h) _mm512_storeu_ps(ot + (d * kHeads + h) * kLanes, o[h]);
    }
  }
  alignas(64) float inv[kHeads][kLanes];
  for (int h = 0; h < kHeads; ++h) {
    _mm512_store_ps(inv[h], _mm512_div_ps(_mm512_set1_ps(1.0f), run_sum[h]));
  }
  for (int64_t lane = 0; lane < rows; ++lane) {
    scalar_t* row = out_ptr + (q_start + first_row + lane) * out_stride;
    for (int h = 0; h < kHeads; ++h) {
      scalar_t* head = row + (task.first_head + h) * kHeadDim;
      for (int64_t d = 0; d < kHeadDim; ++d) {
        head[d] = static_cast<scalar_t>(ot[(d * kHeads + h) * kLanes + lane] * inv[h][lane]);
      }
    }
  }
}

template <typename scalar_t, int64_t kHeadDim>
void prefill_attention_avx512(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& block_tables,
                              const at::Tensor& q_starts, const at::Tensor& q_lens,
                              const at::Tensor& seq_lens, double scale, int64_t window,
                              const at::Tensor& out) {
  const int64_t num_seqs = q_starts.size(0), num_heads = q.size(1);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const int64_t* start_ptr = q_starts.data_ptr<int64_t>();
  const int64_t* qlen_ptr = q_lens.data_ptr<int64_t>();
  const int64_t* len_ptr = seq_lens.data_ptr<int64_t>();
  std::vector<Task> tasks;
  for (int64_t p = 0; p < num_seqs; ++p) {
    const int64_t q_len = qlen_ptr[p], seq_len = len_ptr[p];
    TORCH_CHECK(q_len >= 1 && seq_len >= q_len && (seq_len + block_size - 1) / block_size <= max_blocks,
                "prefill_attention: sequence ", p, " has q_len ", q_len, ", seq_len ", seq_len,
                " and room for ", max_blocks, " blocks");
    for (int64_t b = 0; b * kLanes < q_len; ++b) {
      const int64_t last = seq_len - q_len + std::min<int64_t>(q_len, (b + 1) * kLanes) - 1;
      const int64_t first = window > 0 ? std::max<int64_t>(0, seq_len - q_len + b * kLanes - window + 1) : 0;
      for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
        for (int64_t h0 = 0; h0 < group; h0 += 4) {
          tasks.push_back({p, kvh, kvh * group + h0, std::min<int64_t>(4, group - h0), b,
                           last - first + 1});
        }
      }
    }
  }
  // Longest first, handed out one at a time: later query blocks read more keys.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  const int32_t* table_ptr = block_tables.data_ptr<int32_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int num_threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), num_tasks));
  const float fscale = static_cast<float>(scale);
#pragma omp parallel num_threads(num_threads)
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_tasks; ++i) {
      const Task& t = tasks[i];
      const int64_t p = t.seq;
#define BRIM_PREFILL_TASK(HEADS)                                                               \
  run_task<scalar_t, kHeadDim, HEADS>(t, q_ptr, q.stride(0), k_ptr, v_ptr, block_size,         \
                                      k_cache.stride(1), table_ptr + p * max_blocks,            \
                                      start_ptr[p], qlen_ptr[p], len_ptr[p], fscale, window,    \
                                      out_ptr, out.stride(0), scratch)
      switch (t.num_heads) {
        case 1: BRIM_PREFILL_TASK(1); break;
        case 2: BRIM_PREFILL_TASK(2); break;
        case 3: BRIM_PREFILL_TASK(3); break;
        default: BRIM_PREFILL_TASK(4); break;
      }
#undef BRIM_PREFILL_TASK
    }
  }
}

#endif  // __AVX512F__

bool prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& q_starts,
                       const at::Tensor& q_lens, const at::Tensor& seq_lens, double scale,
                       int64_t window, const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "prefill_attention: q [T, heads, d], caches [blocks, block_size, kv_heads, d]");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && out.sizes() == q.sizes() &&
                  out.stride(2) == 1 && out.stride(1) == out.size(2),
              "prefill_attention: q and out rows must be contiguous [heads, d]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.is_contiguous() && q_starts.scalar_type() == at::kLong &&
                  q_lens.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  q_starts.size(0) == block_tables.size(0) &&
                  q_lens.size(0) == block_tables.size(0) &&
                  seq_lens.size(0) == block_tables.size(0),
              "prefill_attention: block_tables int32 [P, blocks]; q_starts, q_lens, seq_lens "
              "int64 [P]");
#if defined(__AVX512F__)
  if (k_cache.scalar_type() != q.scalar_type() || v_cache.scalar_type() != q.scalar_type() ||
      out.scalar_type() != q.scalar_type() || !k_cache.is_contiguous() ||
      !v_cache.is_contiguous()) {
    return false;
  }
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefill_attention",
                                  [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (q.size(2) == 64) {
        prefill_attention_avx512<scalar_t, 64>(q, k_cache, v_cache, block_tables, q_starts,
                                               q_lens, seq_lens, scale, window, out);
        done = true;
      } else if (q.size(2) == 128) {
        prefill_attention_avx512<scalar_t, 128>(q, k_cache, v_cache, block_tables, q_starts,
                                                q_lens, seq_lens, scale, window, out);
        done = true;
      }
    }
  });
  return done;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(brim_cpu, m) {
  m.def(
      "prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor q_starts, Tensor q_lens, Tensor seq_lens, float scale, int window, "
      "Tensor(a!) out) -> bool");
}

TORCH_LIBRARY_IMPL(brim_cpu, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
