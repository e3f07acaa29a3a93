// atprune sparse CPU kernels: y[t, r] = sum_j W[r, j] * x[t, j] (+ bias[r]) for a weight stored in atprune's
// bitmap format (atprune/sparse/format.py): rows in groups of G = 4, columns in chunks of C = 32; for each group,
// chunk by chunk, the four rows' 32-bit masks (16 bytes) and, in one stream, the four rows' packed non-zero values
// of that chunk, row after row. A group reads one sequential stream of masks and one of values (the hardware
// prefetcher follows two streams, where per-row storage would give it eight), and the four rows' value pointers
// within a chunk come from popcount prefix sums, so the only loop-carried dependency is one add per chunk.
// Also dense kernels of the same structure: the fair hand-written dense baseline of the benchmark.
//
// Every instruction-set path is in this one file: each function carries __attribute__((target(...))), the file
// is compiled without -march flags, and the path is chosen at run time (__builtin_cpu_supports), so one build
// runs, and every path compiles, on any x86-64 machine.
//   avx512: AVX-512 F/BW/VL/DQ + VBMI2 + BF16. The mask drives the expand (_mm512_maskz_expand_epi16, VBMI2), which
//           puts the packed 16-bit values into their lanes (zeros elsewhere); bf16 dot products with
//           _mm512_dpbf16_ps (fp32 accumulation); fp16 through _mm512_cvtph_ps; fp32 as two 16-lane
//           _mm512_maskz_expand_ps. (The expand-load form, _mm512_maskz_expandloadu_epi16, reads only the packed
//           values but was 1.6x slower from memory on the EPYC measured; see expand16.)
//   avx2:   AVX2 + FMA + F16C. 8 columns per step: 8 packed values are loaded, widened to fp32 and moved into
//           their lanes by a permutation looked up from the mask byte (256-entry table), unset lanes zeroed.
//   scalar: portable C++, one set bit at a time (count-trailing-zeros loop).
// Up to 4 tokens share each expanded value vector (2 on avx2). Threads split groups with at::parallel_for, which
// follows torch.get_num_threads().
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

enum Kernel { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
constexpr int G = 4;    // rows per group
constexpr int C = 32;   // columns per chunk

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,avx512bitalg,avx512vpopcntdq,popcnt,bmi,bmi2,fma,f16c")))
#define T256 __attribute__((target("avx2,fma,f16c,popcnt,bmi")))

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx512bitalg") && __builtin_cpu_supports("avx512vpopcntdq") &&
         __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi");
}

// The operands of one call. x is the activation copied into a zero-padded buffer (row stride xs elements, a
// multiple of 64): bf16 for the avx512 bf16 path, fp32 for every other path. DT: 0 fp32, 1 bf16, 2 fp16.
struct Args {
  const uint8_t* bitmap;   // sparse: [groups, chunks * 16] bytes
  const void* values;      // sparse: packed values; dense: the weight [rows, cols]
  const int64_t* offsets;  // sparse: [groups + 1], first value of each group
  const void* x;           // [tokens, xs]
  int64_t xs, cols, chunks, tokens, rows;
  const float* bias;       // [rows] fp32 or nullptr
  void* y;                 // [tokens, rows] in x's dtype (fp32 accumulation, rounded once at the end)
};

// Software prefetch distances in bytes, ahead of the value stream and of the mask stream (the dense kernels
// prefetch each row stream the same distance ahead). On the 2-core EPYC measured they change nothing measurable
// (there the sparse loop is bound by the expand instructions, about 1.7 ns per 32-column row step with data in
// cache or not); set_prefetch lets them be tuned on other machines.
int PF_VALUES = 1024;
int PF_BITMAP = 256;

inline void prefetch(const char* values, const uint8_t* masks) {
  _mm_prefetch(values, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(masks), _MM_HINT_T0);
}

template <int DT>
inline void store(const Args& a, int64_t r, int64_t t, float v) {
  if (r >= a.rows) return;
  v += a.bias ? a.bias[r] : 0.f;
  if (DT == 0) static_cast<float*>(a.y)[t * a.rows + r] = v;
  else if (DT == 1) static_cast<c10::BFloat16*>(a.y)[t * a.rows + r] = c10::BFloat16(v);
  else static_cast<c10::Half*>(a.y)[t * a.rows + r] = c10::Half(v);
}

template <int DT>
inline float value_at(const void* base, int64_t i) {
  if (DT == 0) return static_cast<const float*>(base)[i];
  if (DT == 1) return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
  return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
}

// ------------------------------------------------------------------------------------------ sparse, avx512
// Decoding one row's 32-column chunk: the packed values in their lanes, zeros elsewhere. Two ways, chosen at run
// time (set_decode; default permute):
//  expand:  64 bytes loaded, then _mm512_maskz_expand_epi16 (VBMI2). From a register, not with the expand-load
//           form _mm512_maskz_expandloadu_epi16: on the EPYC measured the memory form was 1.6x slower, and the
//           empty asm keeps the compiler from folding the load back into it.
//  permute: lane j takes packed value number popcount(m & ((1 << j) - 1)) (BITALG vpopcntw on the mask broadcast
//           and ANDed with per-lane prefix masks), gathered by _mm512_maskz_permutexvar_epi16 with the mask zeroing
//           unset lanes. Seven simple instructions instead of one expand, but 1.6x faster on the EPYC measured
//           (1.0 vs 1.6 ns per row and chunk, data in cache), where vpexpandw is slow.
bool DECODE_PERMUTE = true;

T512 inline __m512i expand16(uint32_t m, const void* p) {
  __m512i v = _mm512_loadu_si512(p);
  asm("" : "+v"(v));
  return _mm512_maskz_expand_epi16(m, v);
}

T512 inline __m512i permute16(uint32_t m, const void* p, __m512i prefix) {
  const __m512i v = _mm512_loadu_si512(p);
  const __m512i halves = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(short(m & 0xFFFFu)),
                                                 _mm512_set1_epi16(short(m >> 16)));
  __m512i idx = _mm512_popcnt_epi16(_mm512_and_si512(halves, prefix));
  idx = _mm512_mask_add_epi16(idx, 0xFFFF0000u, idx, _mm512_set1_epi16(short(_mm_popcnt_u32(m & 0xFFFFu))));
  return _mm512_maskz_permutexvar_epi16(m, idx, v);
}

T512 inline __m512 expand32(__mmask16 m, const float* p) {
  __m512 v = _mm512_loadu_ps(p);
  asm("" : "+v"(v));
  return _mm512_maskz_expand_ps(m, v);
}

T512 inline __m512 permute32(__mmask16 m, const float* p, __m512i prefix) {
  const __m512i idx = _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32(int(m)), prefix));
  return _mm512_maskz_permutexvar_ps(m, idx, _mm512_loadu_ps(p));
}

// Per-lane masks of the lower lanes: (1 << (j % 16)) - 1 for 16-bit lanes, (1 << j) - 1 for 32-bit lanes.
T512 inline __m512i prefix16() {
  alignas(64) uint16_t pre[32];
  for (int j = 0; j < 32; ++j) pre[j] = uint16_t((1u << (j % 16)) - 1u);
  return _mm512_load_si512(pre);
}

T512 inline __m512i prefix32() {
  alignas(64) uint32_t pre[16];
  for (int j = 0; j < 16; ++j) pre[j] = (1u << j) - 1u;
  return _mm512_load_si512(pre);
}

template <bool PERM>
T512 inline __m512i decode16(uint32_t m, const void* p, __m512i prefix) {
  return PERM ? permute16(m, p, prefix) : expand16(m, p);
}

template <bool PERM>
T512 inline __m512 decode32(__mmask16 m, const float* p, __m512i prefix) {
  return PERM ? permute32(m, p, prefix) : expand32(m, p);
}

template <int TT, int DT, bool PERM>
T512 void sparse_avx512(const Args& a, int64_t g, int64_t t0) {
  const __m512i prefix = DT == 0 ? prefix32() : prefix16();
  constexpr size_t es = DT == 0 ? 4 : 2;
  __m512 acc[G][TT];
  #pragma GCC unroll 16
  for (int q = 0; q < G; ++q)
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) acc[q][t] = _mm512_setzero_ps();
  const uint8_t* bm = a.bitmap + g * a.chunks * 16;
  const uint8_t* const bm_end = bm + a.chunks * 16;
  const char* p = static_cast<const char*>(a.values) + a.offsets[g] * es;
  const char* xt[TT];  // this tile's token rows of the padded input, advanced one chunk per step
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) xt[t] = static_cast<const char*>(a.x) + (t0 + t) * a.xs * (DT == 1 ? 2 : 4);
  const size_t pf_values = PF_VALUES, pf_masks = PF_BITMAP;
  for (; bm < bm_end; bm += 16) {
    prefetch(p + pf_values, bm + pf_masks);
    uint32_t m[G];
    std::memcpy(m, bm, 16);
    size_t off[G + 1];
    off[0] = 0;
    #pragma GCC unroll 16
    for (int q = 0; q < G; ++q) off[q + 1] = off[q] + size_t(_mm_popcnt_u32(m[q])) * es;
    if (DT == 1) {
      __m512i xv[TT];
      #pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) xv[t] = _mm512_loadu_si512(xt[t]);
      #pragma GCC unroll 16
      for (int q = 0; q < G; ++q) {
        const __m512i v = decode16<PERM>(m[q], p + off[q], prefix);
        #pragma GCC unroll 16
        for (int t = 0; t < TT; ++t) acc[q][t] = _mm512_dpbf16_ps(acc[q][t], (__m512bh)v, (__m512bh)xv[t]);
      }
    } else {
      __m512 x0[TT], x1[TT];
      #pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) {
        x0[t] = _mm512_loadu_ps(reinterpret_cast<const float*>(xt[t]));
        x1[t] = _mm512_loadu_ps(reinterpret_cast<const float*>(xt[t]) + 16);
      }
      #pragma GCC unroll 16
      for (int q = 0; q < G; ++q) {
        __m512 v0, v1;
        if (DT == 2) {
          const __m512i v = decode16<PERM>(m[q], p + off[q], prefix);
          v0 = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
          v1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
        } else {
          const __mmask16 lo = (__mmask16)(m[q] & 0xFFFFu), hi = (__mmask16)(m[q] >> 16);
          const float* pq = reinterpret_cast<const float*>(p + off[q]);
          v0 = decode32<PERM>(lo, pq, prefix);
          v1 = decode32<PERM>(hi, pq + _mm_popcnt_u32(lo), prefix);
        }
        #pragma GCC unroll 16
        for (int t = 0; t < TT; ++t) acc[q][t] = _mm512_fmadd_ps(v1, x1[t], _mm512_fmadd_ps(v0, x0[t], acc[q][t]));
      }
    }
    p += off[G];
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) xt[t] += C * (DT == 1 ? 2 : 4);
  }
  #pragma GCC unroll 16
  for (int q = 0; q < G; ++q)
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) store<DT>(a, g * G + q, t0 + t, _mm512_reduce_add_ps(acc[q][t]));
}

// -------------------------------------------------------------------------------------------- sparse, avx2
struct Lut {
  alignas(32) int32_t perm[256][8];
  alignas(32) int32_t keep[256][8];
  Lut() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool set = (m >> lane) & 1;
        perm[m][lane] = set ? k : 0;
        keep[m][lane] = set ? -1 : 0;
        k += set;
      }
    }
  }
};
const Lut& lut() { static const Lut table; return table; }

// 8 values of dtype DT at p, as fp32 (reads 8 values: the packed array is padded).
template <int DT>
T256 inline __m256 load8(const void* p) {
  if (DT == 0) return _mm256_loadu_ps(static_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  if (DT == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

T256 inline float hsum256(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

template <int TT, int DT>
T256 void sparse_avx2(const Args& a, int64_t g, int64_t t0) {
  constexpr int es = DT == 0 ? 4 : 2;
  const Lut& L = lut();
  __m256 acc[G][TT];
  #pragma GCC unroll 16
  for (int q = 0; q < G; ++q)
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) acc[q][t] = _mm256_setzero_ps();
  const uint8_t* bm = a.bitmap + g * a.chunks * 16;
  const char* p = static_cast<const char*>(a.values) + a.offsets[g] * es;
  for (int64_t c = 0; c < a.chunks; ++c) {
    prefetch(p + PF_VALUES, bm + 16 * c + PF_BITMAP);
    #pragma GCC unroll 16
    for (int q = 0; q < G; ++q) {
      #pragma GCC unroll 16
      for (int s = 0; s < 4; ++s) {
        const unsigned mb = bm[16 * c + 4 * q + s];
        const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(L.perm[mb]));
        const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(L.keep[mb])));
        const __m256 v = _mm256_and_ps(_mm256_permutevar8x32_ps(load8<DT>(p), idx), keep);
        p += _mm_popcnt_u32(mb) * es;
        #pragma GCC unroll 16
        for (int t = 0; t < TT; ++t) {
          const __m256 xv = _mm256_loadu_ps(static_cast<const float*>(a.x) + (t0 + t) * a.xs + C * c + 8 * s);
          acc[q][t] = _mm256_fmadd_ps(v, xv, acc[q][t]);
        }
      }
    }
  }
  #pragma GCC unroll 16
  for (int q = 0; q < G; ++q)
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) store<DT>(a, g * G + q, t0 + t, hsum256(acc[q][t]));
}

// ------------------------------------------------------------------------------------------ sparse, scalar
template <int DT>
void sparse_scalar(const Args& a, int64_t g, int64_t t0, int64_t tt) {
  float acc[G][16] = {};
  const float* x = static_cast<const float*>(a.x);
  const uint8_t* bm = a.bitmap + g * a.chunks * 16;
  int64_t k = a.offsets[g];
  for (int64_t c = 0; c < a.chunks; ++c) {
    #pragma GCC unroll 16
    for (int q = 0; q < G; ++q) {
      uint32_t bits;
      std::memcpy(&bits, bm + 16 * c + 4 * q, 4);
      while (bits) {
        const int64_t j = C * c + __builtin_ctz(bits);
        bits &= bits - 1;
        const float w = value_at<DT>(a.values, k++);
        for (int t = 0; t < tt; ++t) acc[q][t] += w * x[(t0 + t) * a.xs + j];
      }
    }
  }
  #pragma GCC unroll 16
  for (int q = 0; q < G; ++q)
    for (int t = 0; t < tt; ++t) store<DT>(a, g * G + q, t0 + t, acc[q][t]);
}

// ------------------------------------------------------------------------------ dense (the fair baseline)
// R = 4 rows of the row-major weight at once; columns past the last full vector through a masked load (avx512)
// or a scalar tail (avx2).
template <int TT, int DT>
T512 void dense_avx512(const Args& a, int64_t g, int64_t t0) {
  constexpr int es = DT == 0 ? 4 : 2;
  constexpr int W = DT == 0 ? 16 : 32;  // columns per vector of weights
  __m512 acc[G][TT];
  const char* p[G];
  #pragma GCC unroll 16
  for (int q = 0; q < G; ++q) {
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) acc[q][t] = _mm512_setzero_ps();
    p[q] = static_cast<const char*>(a.values) + std::min<int64_t>(g * G + q, a.rows - 1) * a.cols * es;
  }
  const int64_t steps = (a.cols + W - 1) / W;
  const int rem = int(a.cols % W);
  const uint32_t tail = rem ? ((1u << rem) - 1u) : 0xFFFFFFFFu;
  for (int64_t c = 0; c < steps; ++c) {
    const uint32_t m = (c + 1 < steps) ? 0xFFFFFFFFu : tail;
    #pragma GCC unroll 16
    for (int q = 0; q < G; ++q) _mm_prefetch(p[q] + c * W * es + PF_VALUES, _MM_HINT_T0);
    #pragma GCC unroll 16
    for (int q = 0; q < G; ++q) {
      if (DT == 1) {
        const __m512i v = _mm512_maskz_loadu_epi16(m, p[q] + c * W * es);
        #pragma GCC unroll 16
        for (int t = 0; t < TT; ++t) {
          const __m512i xv = _mm512_loadu_si512(static_cast<const uint16_t*>(a.x) + (t0 + t) * a.xs + W * c);
          acc[q][t] = _mm512_dpbf16_ps(acc[q][t], (__m512bh)v, (__m512bh)xv);
        }
      } else if (DT == 2) {
        const __m512i v = _mm512_maskz_loadu_epi16(m, p[q] + c * W * es);
        const __m512 v0 = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
        const __m512 v1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
        #pragma GCC unroll 16
        for (int t = 0; t < TT; ++t) {
          const float* xp = static_cast<const float*>(a.x) + (t0 + t) * a.xs + W * c;
          acc[q][t] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xp + 16), _mm512_fmadd_ps(v0, _mm512_loadu_ps(xp), acc[q][t]));
        }
      } else {
        const __m512 v = _mm512_maskz_loadu_ps((__mmask16)m, reinterpret_cast<const float*>(p[q]) + c * W);
        #pragma GCC unroll 16
        for (int t = 0; t < TT; ++t)
          acc[q][t] = _mm512_fmadd_ps(v, _mm512_loadu_ps(static_cast<const float*>(a.x) + (t0 + t) * a.xs + W * c),
                                      acc[q][t]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int q = 0; q < G; ++q)
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) store<DT>(a, g * G + q, t0 + t, _mm512_reduce_add_ps(acc[q][t]));
}

template <int TT, int DT>
T256 void dense_avx2(const Args& a, int64_t g, int64_t t0) {
  constexpr int es = DT == 0 ? 4 : 2;
  __m256 acc[G][TT];
  const char* p[G];
  #pragma GCC unroll 16
  for (int q = 0; q < G; ++q) {
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) acc[q][t] = _mm256_setzero_ps();
    p[q] = static_cast<const char*>(a.values) + std::min<int64_t>(g * G + q, a.rows - 1) * a.cols * es;
  }
  const int64_t steps = a.cols / 8;
  for (int64_t c = 0; c < steps; ++c)
    #pragma GCC unroll 16
    for (int q = 0; q < G; ++q) {
      if ((c & 1) == 0) _mm_prefetch(p[q] + 8 * c * es + PF_VALUES, _MM_HINT_T0);
      const __m256 v = load8<DT>(p[q] + 8 * c * es);
      #pragma GCC unroll 16
      for (int t = 0; t < TT; ++t)
        acc[q][t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(static_cast<const float*>(a.x) + (t0 + t) * a.xs + 8 * c),
                                    acc[q][t]);
    }
  #pragma GCC unroll 16
  for (int q = 0; q < G; ++q)
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) {
      float s = hsum256(acc[q][t]);
      const float* xp = static_cast<const float*>(a.x) + (t0 + t) * a.xs;
      for (int64_t j = steps * 8; j < a.cols; ++j) s += value_at<DT>(p[q], j) * xp[j];
      store<DT>(a, g * G + q, t0 + t, s);
    }
}

template <int DT>
void dense_scalar(const Args& a, int64_t g, int64_t t0, int64_t tt) {
  const float* x = static_cast<const float*>(a.x);
  for (int q = 0; q < G && g * G + q < a.rows; ++q) {
    const int64_t r = g * G + q;
    float acc[16] = {};
    for (int64_t j = 0; j < a.cols; ++j) {
      const float w = value_at<DT>(a.values, r * a.cols + j);
      for (int t = 0; t < tt; ++t) acc[t] += w * x[(t0 + t) * a.xs + j];
    }
    for (int t = 0; t < tt; ++t) store<DT>(a, r, t0 + t, acc[t]);
  }
}

// ------------------------------------------------------------------------------------------------- dispatch
template <int TT, int DT, bool DENSE>
void tile(int kernel, const Args& a, int64_t g, int64_t t0) {
  if (kernel == AVX512) {
    if (DENSE) dense_avx512<TT, DT>(a, g, t0);
    else if (DECODE_PERMUTE) sparse_avx512<TT, DT, true>(a, g, t0);
    else sparse_avx512<TT, DT, false>(a, g, t0);
  }
  else DENSE ? dense_avx2<TT, DT>(a, g, t0) : sparse_avx2<TT, DT>(a, g, t0);
}

// Groups [gb, ge) for all tokens, in token tiles of 4 (avx512), 2 (avx2) or 16 (scalar).
template <int DT, bool DENSE>
void run_groups(int kernel, const Args& a, int64_t gb, int64_t ge) {
  for (int64_t g = gb; g < ge; ++g) {
    if (kernel == SCALAR) {
      for (int64_t t0 = 0; t0 < a.tokens; t0 += 16) {
        const int64_t tt = std::min<int64_t>(16, a.tokens - t0);
        DENSE ? dense_scalar<DT>(a, g, t0, tt) : sparse_scalar<DT>(a, g, t0, tt);
      }
      continue;
    }
    int64_t t0 = 0;
    if (kernel == AVX512) {
      for (; t0 + 4 <= a.tokens; t0 += 4) tile<4, DT, DENSE>(kernel, a, g, t0);
      if (a.tokens - t0 == 3) tile<3, DT, DENSE>(kernel, a, g, t0), t0 += 3;
    }
    for (; t0 + 2 <= a.tokens; t0 += 2) tile<2, DT, DENSE>(kernel, a, g, t0);
    if (t0 < a.tokens) tile<1, DT, DENSE>(kernel, a, g, t0);
  }
}

int dtype_code(at::ScalarType s) {
  if (s == at::kFloat) return 0;
  if (s == at::kBFloat16) return 1;
  if (s == at::kHalf) return 2;
  TORCH_CHECK(false, "atprune sparse kernels take float32, bfloat16 or float16, got ", s);
}

int check_kernel(int64_t kernel) {
  TORCH_CHECK(kernel == SCALAR || (kernel == AVX2 && cpu_has_avx2()) || (kernel == AVX512 && cpu_has_avx512()),
              "kernel ", kernel, " cannot run on this CPU");
  return static_cast<int>(kernel);
}

at::Tensor launch(const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bitmap,
                  const c10::optional<at::Tensor>& offsets, int64_t rows, const c10::optional<at::Tensor>& bias,
                  int64_t kernel_id) {
  const int kernel = check_kernel(kernel_id);
  TORCH_CHECK(x.dim() >= 1 && values.is_contiguous(), "x must be [..., cols] and the weight contiguous");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "x and the weight must have the same dtype");
  const int dt = dtype_code(x.scalar_type());
  const bool dense = !bitmap.has_value();
  Args a{};
  a.cols = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, a.cols}).contiguous();
  a.tokens = x2.size(0);
  a.rows = rows;
  a.chunks = (a.cols + C - 1) / C;
  a.xs = ((a.cols + 63) / 64) * 64;
  const int64_t groups = (rows + G - 1) / G;
  if (!dense) {
    TORCH_CHECK(bitmap->scalar_type() == at::kByte && bitmap->is_contiguous() && bitmap->dim() == 2 &&
                bitmap->size(0) == groups && bitmap->size(1) == a.chunks * 16, "bitmap must be uint8 [", groups,
                ", ", a.chunks * 16, "]");
    TORCH_CHECK(offsets->scalar_type() == at::kLong && offsets->numel() == groups + 1, "bad group offsets");
    a.bitmap = bitmap->data_ptr<uint8_t>();
    a.offsets = offsets->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(values.numel() == rows * a.cols, "dense weight must be [rows, cols]");
  }
  // The kernels read x as bf16 (avx512 bf16 path) or fp32 (all others), rows padded with zeros to xs columns:
  // used as it is when it already is that, else copied.
  const at::ScalarType xt = (kernel == AVX512 && dt == 1) ? at::kBFloat16 : at::kFloat;
  at::Tensor xp = x2;
  if (x2.scalar_type() != xt || a.xs != a.cols) {
    xp = at::zeros({a.tokens, a.xs}, x.options().dtype(xt));
    xp.narrow(1, 0, a.cols).copy_(x2);
  }
  at::Tensor bias32;
  if (bias.has_value()) {
    bias32 = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias32.numel() == rows, "bias must have one entry per output row");
    a.bias = bias32.data_ptr<float>();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  at::Tensor y = at::empty(shape, x.options());
  a.values = values.data_ptr();
  a.x = xp.data_ptr();
  a.y = y.data_ptr();
  // Grain (groups per task), so that a task is worth waking a thread for: dense, about 256 KiB of weights (it is
  // memory bound); sparse, at least 4096 row-chunk steps (about 5 us; it is bound by the decode instructions, so
  // layers that are small in bytes still gain from a second core).
  const int64_t grain = dense ? std::max<int64_t>(1, (256 * 1024) / std::max<int64_t>(1, G * a.cols * values.element_size()))
                              : std::max<int64_t>(1, 4096 / std::max<int64_t>(1, G * a.chunks));
  at::parallel_for(0, groups, grain, [&](int64_t gb, int64_t ge) {
    if (dense) {
      if (dt == 0) run_groups<0, true>(kernel, a, gb, ge);
      else if (dt == 1) run_groups<1, true>(kernel, a, gb, ge);
      else run_groups<2, true>(kernel, a, gb, ge);
    } else {
      if (dt == 0) run_groups<0, false>(kernel, a, gb, ge);
      else if (dt == 1) run_groups<1, false>(kernel, a, gb, ge);
      else run_groups<2, false>(kernel, a, gb, ge);
    }
  });
  return y;
}

at::Tensor sparse_mm(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                     const at::Tensor& offsets, int64_t rows, const c10::optional<at::Tensor>& bias, int64_t kernel) {
  return launch(x, values, bitmap, offsets, rows, bias, kernel);
}

at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    int64_t kernel) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), "weight must be [rows, cols]");
  return launch(x, weight.contiguous(), c10::nullopt, c10::nullopt, weight.size(0), bias, kernel);
}

// Group g of the packed weight written densely into out [rows, cols] with the expand (every element written).
template <int DT>
T512 void unpack_avx512(const uint8_t* bm, const char* p, char* out, int64_t g, int64_t rows, int64_t cols,
                        int64_t chunks) {
  constexpr int64_t es = DT == 0 ? 4 : 2;
  const int rem = int(cols % C);
  for (int64_t c = 0; c < chunks; ++c) {
    const uint32_t tail = (c + 1 == chunks && rem) ? ((1u << rem) - 1u) : 0xFFFFFFFFu;
    for (int q = 0; q < G; ++q) {
      uint32_t m;
      std::memcpy(&m, bm + (g * chunks + c) * 16 + 4 * q, 4);
      const int64_t r = g * G + q;
      if (r < rows) {
        char* o = out + (r * cols + C * c) * es;
        if (DT == 0) {
          const __mmask16 lo = (__mmask16)(m & 0xFFFFu), hi = (__mmask16)(m >> 16);
          const float* pq = reinterpret_cast<const float*>(p);
          _mm512_mask_storeu_ps(o, (__mmask16)(tail & 0xFFFFu), expand32(lo, pq));
          _mm512_mask_storeu_ps(o + 64, (__mmask16)(tail >> 16), expand32(hi, pq + _mm_popcnt_u32(lo)));
        } else {
          _mm512_mask_storeu_epi16(o, tail, expand16(m, p));
        }
      }
      p += _mm_popcnt_u32(m) * es;
    }
  }
}

// Dense [rows, cols] from the packed form (the prefill fallback), groups split over threads.
at::Tensor unpack(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets, int64_t rows,
                  int64_t cols, int64_t kernel, const c10::optional<at::Tensor>& into) {
  const int64_t chunks = (cols + C - 1) / C, groups = (rows + G - 1) / G;
  TORCH_CHECK(bitmap.size(0) == groups && bitmap.size(1) == chunks * 16 && offsets.numel() == groups + 1,
              "bad packed weight");
  const int64_t es = values.element_size();
  const bool vec = check_kernel(kernel) == AVX512;  // avx2 and scalar: the bit loop
  at::Tensor out;
  if (into.has_value()) {  // a reused buffer: no fresh pages to fault in for every call
    TORCH_CHECK(into->is_contiguous() && into->scalar_type() == values.scalar_type() && into->numel() == rows * cols,
                "unpack: bad output buffer");
    out = into->view({rows, cols});
    if (!vec) out.zero_();
  } else {
    out = vec ? at::empty({rows, cols}, values.options()) : at::zeros({rows, cols}, values.options());
  }
  const uint8_t* bm = bitmap.data_ptr<uint8_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const char* v = static_cast<const char*>(values.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, groups, 16, [&](int64_t gb, int64_t ge) {
    if (vec) {
      const int dt = dtype_code(values.scalar_type());
      for (int64_t g = gb; g < ge; ++g) {
        if (dt == 0) unpack_avx512<0>(bm, v + off[g] * es, o, g, rows, cols, chunks);
        else if (dt == 1) unpack_avx512<1>(bm, v + off[g] * es, o, g, rows, cols, chunks);
        else unpack_avx512<2>(bm, v + off[g] * es, o, g, rows, cols, chunks);
      }
      return;
    }
    for (int64_t g = gb; g < ge; ++g) {
      int64_t k = off[g];
      for (int64_t c = 0; c < chunks; ++c)
        #pragma GCC unroll 16
        for (int q = 0; q < G; ++q) {
          uint32_t bits;
          std::memcpy(&bits, bm + (g * chunks + c) * 16 + 4 * q, 4);
          while (bits) {
            const int64_t j = C * c + __builtin_ctz(bits);
            bits &= bits - 1;
            std::memcpy(o + ((g * G + q) * cols + j) * es, v + (k++) * es, es);
          }
        }
    }
  });
  return out;
}

void set_decode(const std::string& how) {
  TORCH_CHECK(how == "permute" || how == "expand", "decode is 'permute' or 'expand', got ", how);
  DECODE_PERMUTE = how == "permute";
}

void set_prefetch(int64_t values, int64_t masks) {
  PF_VALUES = static_cast<int>(values);
  PF_BITMAP = static_cast<int>(masks);
}

std::vector<std::string> cpu_kernels() {
  std::vector<std::string> k{"scalar"};
  if (cpu_has_avx2()) k.push_back("avx2");
  if (cpu_has_avx512()) k.push_back("avx512");
  return k;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "atprune bitmap-sparse CPU kernels (see the file's header)";
  m.def("sparse_mm", &sparse_mm, "y[t, r] = sum_j W[r, j] x[t, j] (+ bias) from bitmap + packed values");
  m.def("dense_mm", &dense_mm, "the same from a dense [rows, cols] weight (the hand-written dense baseline)");
  m.def("unpack", &unpack, "dense [rows, cols] weight from bitmap + packed values (kernel: avx512 or the bit loop)");
  m.def("cpu_kernels", &cpu_kernels, "the kernel paths this CPU can run");
  m.def("set_decode", &set_decode, "avx512 decode of the packed values: 'permute' (default) or 'expand'");
  m.def("set_prefetch", &set_prefetch, "prefetch distances in bytes (values, masks); for tuning");
}
