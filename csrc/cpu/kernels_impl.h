// The CPU kernels, written once and built once per ISA by isa_avx512.cpp, isa_avx2.cpp and isa_portable.cpp, each of
// which sets MOEKERN_ISA_LEVEL (3: AVX-512 F/BW/VL/DQ/VNNI, 2: AVX2 + FMA + F16C, 0: plain C++) and a target pragma
// before including this file inside its own namespace. Everything here is `static`: no symbol of one variant can
// stand in for another's at link time. No torch header, no std template: see kernels.h.
//
// Oracle: moekern/ops/reference.py (moe_experts on the dequantized weights). The arithmetic per output element:
//   4-bit INT8:  sum over blocks b of  s_g * d_b * (sum_k q_k xq_k - z_g * sum_k xq_k)      (exact int32 inner sums)
//   4-bit BF16:  sum over groups g of  s_g * (sum_k q_k bf16(x_k) - z_g * sum_k bf16(x_k))
//   4-bit FP32:  sum over groups g of  s_g * sum_k (q_k - z_g) x_k
//   dense:       sum_k w_k x_k in fp32 (bf16 weights widened exactly, or vdpbf16ps on bf16 activations)
// The epilogues (gated activation, bias, routing weight) are the reference's formulas in fp32.

#if MOEKERN_ISA_LEVEL >= 2
#define MK_VEC 1
#else
#define MK_VEC 0
#endif

static inline int64_t mk_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline float mk_maxf(float a, float b) { return a > b ? a : b; }
static inline float mk_absf(float a) { return a < 0 ? -a : a; }

static inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does (NaN kept a NaN)
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

static inline float f16_to_f32(uint16_t h) {  // IEEE half -> float, exactly (subnormals included)
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

static inline float load_as_f32(const void* p, int dtype, int64_t i) {
  if (dtype == DT_F32) return static_cast<const float*>(p)[i];
  if (dtype == DT_BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

static inline float sigmoidf_(float v) { return 1.0f / (1.0f + __builtin_expf(-v)); }

static inline float gated(float g, float u, int act, float alpha, float limit) {
  if (act == ACT_SILU) return g * sigmoidf_(g) * u;
  g = g > limit ? limit : g;  // a NaN stays a NaN, as in torch's clamp
  u = u < -limit ? -limit : (u > limit ? limit : u);
  return (u + 1.0f) * g * sigmoidf_(g * alpha);
}

// e^x in vector registers, as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so that r keeps
// its precision), e^r = 1 + r + r^2 P(r) (P of degree 5, minimax), times 2^n; within 2 ulp of expf over its range.
// With expf one column at a time, the decode path's epilogue took about 28 us of a 0.8 ms Qwen3-30B-A3B layer at one
// token (8 experts of 768 columns), under 5 us so.
#define MK_EXP_POLY(r, mul, fma, set1)                                                                             \
  fma(fma(fma(fma(fma(fma(set1(1.9875691500E-4f), r, set1(1.3981999507E-3f)), r, set1(8.3334519073E-3f)), r,       \
                  set1(4.1665795894E-2f)),                                                                          \
              r, set1(1.6666665459E-1f)),                                                                           \
          r, set1(5.0000001201E-1f)),                                                                               \
      mul(r, r), r)
#if MOEKERN_ISA_LEVEL >= 3
static inline __m512 exp_avx512(__m512 x) {
  // clamped so that +-inf give inf and 0 (NaN stays NaN: max/min return their second operand where one is NaN)
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 p = _mm512_add_ps(MK_EXP_POLY(r, _mm512_mul_ps, _mm512_fmadd_ps, _mm512_set1_ps), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);  // p * 2^n, to inf or through the subnormals to 0 as expf
}

static inline __m512 gated_avx512(__m512 g, __m512 u, int act, float alpha, float limit) {
  const __m512 one = _mm512_set1_ps(1.0f);
  if (act == ACT_SILU) {
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
  }
  g = _mm512_min_ps(_mm512_set1_ps(limit), g);
  u = _mm512_min_ps(_mm512_set1_ps(limit), _mm512_max_ps(_mm512_set1_ps(-limit), u));
  const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp_avx512(_mm512_mul_ps(g, _mm512_set1_ps(-alpha)))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(u, one), g), sig);
}
#elif MOEKERN_ISA_LEVEL == 2
static inline __m256 exp_avx2(__m256 in) {
  // computed on the normal range (2^n built in the exponent bits), then inf above it and 0 below (under 1.2e-38)
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), in));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 p = _mm256_add_ps(MK_EXP_POLY(r, _mm256_mul_ps, _mm256_fmadd_ps, _mm256_set1_ps), _mm256_set1_ps(1.0f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
  const __m256 big = _mm256_cmp_ps(in, _mm256_set1_ps(88.72f), _CMP_GT_OQ);
  const __m256 small = _mm256_cmp_ps(in, _mm256_set1_ps(-87.33f), _CMP_LT_OQ);
  return _mm256_andnot_ps(small, _mm256_blendv_ps(e, _mm256_set1_ps(__builtin_inff()), big));
}

static inline __m256 gated_avx2(__m256 g, __m256 u, int act, float alpha, float limit) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if (act == ACT_SILU) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
  }
  g = _mm256_min_ps(_mm256_set1_ps(limit), g);
  u = _mm256_min_ps(_mm256_set1_ps(limit), _mm256_max_ps(_mm256_set1_ps(-limit), u));
  const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp_avx2(_mm256_mul_ps(g, _mm256_set1_ps(-alpha)))));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(u, one), g), sig);
}
#endif

// h[i] = gated(g[i], u[i]) for i < n: the decode path's gate_up epilogue.
static void gate_columns(const float* g, const float* u, float* h, int64_t n, int act, float alpha, float limit) {
  int64_t i = 0;
#if MOEKERN_ISA_LEVEL >= 3
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(h + i, gated_avx512(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i), act, alpha, limit));
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(h + i, m, gated_avx512(_mm512_maskz_loadu_ps(m, g + i), _mm512_maskz_loadu_ps(m, u + i),
                                                 act, alpha, limit));
    i = n;
  }
#elif MOEKERN_ISA_LEVEL == 2
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(h + i, gated_avx2(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i), act, alpha, limit));
#endif
  for (; i < n; ++i) h[i] = gated(g[i], u[i], act, alpha, limit);
}

// The order of the 8 inputs of one k-step as the codes come out of its 64 bytes (see kernels.h):
// INT8 takes the low nibbles (k = 0, 2, 4, 6) with one vpdpbusd and the high nibbles (1, 3, 5, 7) with another;
// BF16 takes 16-bit word pairs after a shift of 4j bits: (j, 4 + j); FP32 takes nibble j, k = j: no reordering.
static const int kInt8Order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
static const int kBf16Order[8] = {0, 4, 1, 5, 2, 6, 3, 7};
// k-steps prefetched ahead of the one being read: a tile's steps lie 4N bytes apart, a stride no hardware prefetcher
// follows across pages; 32 steps keep enough lines in flight to stream at the memory's pace.
#define MK_PREFETCH_STEPS 32

// ---------------------------------------------------------------------------------------------------------------------
// Activation rows for the 4-bit GEMM
// ---------------------------------------------------------------------------------------------------------------------
#if MOEKERN_ISA_LEVEL >= 3
// 16 fp32, bf16 or fp16 values at p, as fp32
static inline __m512 scales16(const void* p, int dtype) {
  if (dtype == DT_F32) return _mm512_loadu_ps(p);
  const __m256i h = _mm256_loadu_si256((const __m256i*)p);
  if (dtype == DT_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One int8 block of ab = 16 or 32 inputs (src elements i0.., times sc where given), as prepare_rows' scalar loop
// computes it, to the bit: the same products, max and rounding (cvtps2dq rounds to nearest even, as nearbyintf).
static inline void quantize_block_avx512(const void* src, int dtype, int64_t i0, const float* sc, int64_t ab,
                                         int8_t* xq, float* d, int32_t* sum) {
  const int esz = dtype == DT_F32 ? 4 : 2;
  const int n = (int)(ab / 16);
  __m512 v[2], amax = _mm512_setzero_ps();
  for (int i = 0; i < n; ++i) {
    v[i] = scales16((const char*)src + (i0 + 16 * i) * esz, dtype);  // 16 values of any of the three dtypes
    if (sc) v[i] = _mm512_mul_ps(v[i], _mm512_loadu_ps(sc + 16 * i));
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
  }
  const float am = _mm512_reduce_max_ps(amax);
  const float inv = am > 0.0f ? 127.0f / am : 0.0f;
  const __m512i order = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);  // kInt8Order
  __m512i total = _mm512_setzero_si512();
  for (int i = 0; i < n; ++i) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutexvar_ps(order, v[i]), _mm512_set1_ps(inv)));
    total = _mm512_add_epi32(total, q);
    _mm_storeu_si128((__m128i*)(xq + 16 * i), _mm512_cvtepi32_epi8(q));
  }
  *d = am / 127.0f;
  *sum = _mm512_reduce_add_epi32(total);
}
#endif

static void prepare_rows(const void* src, int src_dtype, int64_t ld_src, const int64_t* src_row, int64_t rows,
                         const float* in_scale, const int64_t* in_scale_row, int64_t in_scale_stride,
                         const Prepared& out, int64_t row0, int64_t row1) {
  (void)rows;
  const int64_t K = out.k;
  float buf[STEP_K];
  for (int64_t r = row0; r < row1; ++r) {
    const int64_t sr = src_row ? src_row[r] : r;
    const float* sc = in_scale ? in_scale + (in_scale_row ? in_scale_row[r] : 0) * in_scale_stride : nullptr;
    if (out.inner == INNER_INT8) {
      int8_t* xq = (int8_t*)out.xa + r * K;
      float* d = (float*)out.xs + r * out.nscale;
      int32_t* sums = (int32_t*)out.xi + r * out.nscale;
      const int64_t ab = out.block;
      for (int64_t b = 0; b < K / ab; ++b) {
#if MOEKERN_ISA_LEVEL >= 3
        if (ab % 16 == 0) {
          quantize_block_avx512(src, src_dtype, sr * ld_src + b * ab, sc ? sc + b * ab : nullptr, ab, xq + b * ab,
                                d + b, sums + b);
          continue;
        }
#endif
        float x[32], amax = 0.0f;  // block <= 32
        for (int64_t i = 0; i < ab; ++i) {
          const int64_t k = b * ab + i;
          float v = load_as_f32(src, src_dtype, sr * ld_src + k);
          if (sc) v *= sc[k];
          x[i] = v;
          amax = mk_maxf(amax, mk_absf(v));
        }
        const float db = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t s = 0;
        for (int64_t i0 = 0; i0 < ab; i0 += STEP_K) {
          for (int i = 0; i < STEP_K; ++i) {
            const int32_t qv = (int32_t)__builtin_nearbyintf(x[i0 + kInt8Order[i]] * inv);
            xq[b * ab + i0 + i] = (int8_t)qv;
            s += qv;
          }
        }
        d[b] = db;
        sums[b] = s;
      }
    } else {
      const int64_t G = out.block;  // BF16/FP32: the weight group size (sums per group)
      float* gsum = (float*)out.xs + r * out.nscale;
      for (int64_t g = 0; g < out.nscale; ++g) gsum[g] = 0.0f;
      for (int64_t k0 = 0; k0 < K; k0 += STEP_K) {
        for (int i = 0; i < STEP_K; ++i) {
          float v = load_as_f32(src, src_dtype, sr * ld_src + k0 + i);
          if (sc) v *= sc[k0 + i];
          buf[i] = v;
        }
        if (out.inner == INNER_BF16) {
          uint16_t* xb = (uint16_t*)out.xa + r * K + k0;
          float s = 0.0f;
          for (int i = 0; i < STEP_K; ++i) {
            xb[i] = f32_to_bf16(buf[kBf16Order[i]]);
            s += bf16_to_f32(xb[i]);
          }
          gsum[k0 / G] += s;
        } else {
          float* xf = (float*)out.xa + r * K + k0;
          for (int i = 0; i < STEP_K; ++i) xf[i] = buf[i];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// 4-bit tile cores: out[m][0..15] = the 16 weight rows n0..n0+15 of one expert for MB activation rows.
// ---------------------------------------------------------------------------------------------------------------------
struct TileRows {  // the activation rows of one block of MB
  const int8_t* xq[8];
  const float* xs[8];
  const int32_t* xi[8];
  const void* xa[8];
};

struct Tile {              // where one tile's data lie
  const uint8_t* q;        // qweight[e, 0, n0]; k-step s at q + s * ldq
  int64_t ldq;             // 4N bytes
  const void* s;           // scales[e, 0, n0]; group g at + g * n elements
  const uint8_t* z;        // zeros[e, 0, n0]
  int64_t n;               // the row stride of scales and zeros (N)
  int sdt;                 // scales' dtype
  int lanes;               // valid rows (16 but at the end of N)
};

#if MOEKERN_ISA_LEVEL >= 3

static inline const void* scale_row(const Tile& t, int64_t g) {
  return (const char*)t.s + g * t.n * (t.sdt == DT_F32 ? 4 : 2);
}

template <int MB>
static inline void q4_int8_avx512(const Tile& t, int64_t K, int64_t G, int64_t ab, const TileRows& x,
                                  float (*out)[TILE_N]) {
  __m512 accf[MB];
  for (int m = 0; m < MB; ++m) accf[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int64_t nb_per_g = G / ab;
  for (int64_t g = 0; g < K / G; ++g) {
    const __m512 s = scales16(scale_row(t, g), t.sdt);
    const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(t.z + g * t.n)));
    for (int64_t b = 0; b < nb_per_g; ++b) {
      const int64_t blk = g * nb_per_g + b, k0 = blk * ab;
      __m512i acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_si512();
      for (int64_t kk = k0; kk < k0 + ab; kk += STEP_K) {
        const uint8_t* p = t.q + (kk / STEP_K) * t.ldq;
        _mm_prefetch((const char*)(p + MK_PREFETCH_STEPS * t.ldq), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512((const void*)p);
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int m = 0; m < MB; ++m) {
          int32_t a0, a1;
          __builtin_memcpy(&a0, x.xq[m] + kk, 4);
          __builtin_memcpy(&a1, x.xq[m] + kk + 4, 4);
          acc[m] = _mm512_dpbusd_epi32(acc[m], lo, _mm512_set1_epi32(a0));
          acc[m] = _mm512_dpbusd_epi32(acc[m], hi, _mm512_set1_epi32(a1));
        }
      }
      for (int m = 0; m < MB; ++m) {
        const __m512i corr = _mm512_mullo_epi32(z, _mm512_set1_epi32(x.xi[m][blk]));
        const __m512 sd = _mm512_mul_ps(s, _mm512_set1_ps(x.xs[m][blk]));
        accf[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m], corr)), sd, accf[m]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out[m], accf[m]);
}

template <int MB>
static inline void q4_fp32_avx512(const Tile& t, int64_t K, int64_t G, const TileRows& x, float (*out)[TILE_N]) {
  __m512 accf[MB];
  for (int m = 0; m < MB; ++m) accf[m] = _mm512_setzero_ps();
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = 0; g < K / G; ++g) {
    const __m512 s = scales16(scale_row(t, g), t.sdt);
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(t.z + g * t.n))));
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t kk = g * G; kk < (g + 1) * G; kk += STEP_K) {
      const uint8_t* p = t.q + (kk / STEP_K) * t.ldq;
      _mm_prefetch((const char*)(p + MK_PREFETCH_STEPS * t.ldq), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512((const void*)p);
      for (int j = 0; j < 8; ++j) {  // (q - z) exactly in fp32, then the reference's products
        const __m512 w = _mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * j), table), z);
        for (int m = 0; m < MB; ++m)
          acc[m] = _mm512_fmadd_ps(w, _mm512_set1_ps(((const float*)x.xa[m])[kk + j]), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) accf[m] = _mm512_fmadd_ps(acc[m], s, accf[m]);
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out[m], accf[m]);
}

template <int MB>
__attribute__((target("avx512bf16"))) static inline void q4_bf16_avx512(const Tile& t, int64_t K, int64_t G,
                                                                        const TileRows& x, float (*out)[TILE_N]) {
  __m512 accf[MB];
  for (int m = 0; m < MB; ++m) accf[m] = _mm512_setzero_ps();
  // bf16 bits of 0..15, twice: vpermw reads 5 index bits, the fifth being a bit of the next nibble
  const __m512i table = _mm512_set_epi16(
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040,
      0x4000, 0x3F80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0,
      0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  for (int64_t g = 0; g < K / G; ++g) {
    const __m512 s = scales16(scale_row(t, g), t.sdt);
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(t.z + g * t.n))));
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t kk = g * G; kk < (g + 1) * G; kk += STEP_K) {
      const uint8_t* p = t.q + (kk / STEP_K) * t.ldq;
      _mm_prefetch((const char*)(p + MK_PREFETCH_STEPS * t.ldq), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512((const void*)p);
      for (int j = 0; j < 4; ++j) {
        const __m512i w = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4 * j), table);
        for (int m = 0; m < MB; ++m) {
          int32_t pair;
          __builtin_memcpy(&pair, (const uint16_t*)x.xa[m] + kk + 2 * j, 4);
          acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)w, (__m512bh)_mm512_set1_epi32(pair));
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 corrected = _mm512_fnmadd_ps(z, _mm512_set1_ps(x.xs[m][g]), acc[m]);
      accf[m] = _mm512_fmadd_ps(corrected, s, accf[m]);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out[m], accf[m]);
}
#endif  // MOEKERN_ISA_LEVEL >= 3

#if MOEKERN_ISA_LEVEL == 2
static inline __m256 scales8(const void* p, int dtype) {
  if (dtype == DT_F32) return _mm256_loadu_ps((const float*)p);
  const __m128i h = _mm_loadu_si128((const __m128i*)p);
  if (dtype == DT_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline const void* scale_at(const Tile& t, int64_t g, int h) {
  const int esz = t.sdt == DT_F32 ? 4 : 2;
  return (const char*)t.s + (g * t.n + 8 * h) * esz;
}

// AVX2: a 64-byte step is two registers of 8 lanes; vpmaddubsw + vpmaddwd stand in for vpdpbusd (no overflow: the
// codes are at most 15, so a pair of products is at most 2 * 15 * 127 in int16).
template <int MB>
static inline void q4_int8_avx2(const Tile& t, int64_t K, int64_t G, int64_t ab, const TileRows& x,
                                float (*out)[TILE_N]) {
  __m256 accf[MB][2];
  for (int m = 0; m < MB; ++m) accf[m][0] = accf[m][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t nb_per_g = G / ab;
  for (int64_t g = 0; g < K / G; ++g) {
    __m256 s[2];
    __m256i z[2];
    for (int h = 0; h < 2; ++h) {
      s[h] = scales8(scale_at(t, g, h), t.sdt);
      z[h] = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(t.z + g * t.n + 8 * h)));
    }
    for (int64_t b = 0; b < nb_per_g; ++b) {
      const int64_t blk = g * nb_per_g + b, k0 = blk * ab;
      __m256i acc[MB][2];
      for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
      for (int64_t kk = k0; kk < k0 + ab; kk += STEP_K) {
        const uint8_t* p = t.q + (kk / STEP_K) * t.ldq;
        _mm_prefetch((const char*)(p + MK_PREFETCH_STEPS * t.ldq), _MM_HINT_T0);
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 * h));
          const __m256i lo = _mm256_and_si256(v, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          for (int m = 0; m < MB; ++m) {
            int32_t a0, a1;
            __builtin_memcpy(&a0, x.xq[m] + kk, 4);
            __builtin_memcpy(&a1, x.xq[m] + kk + 4, 4);
            const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(a0)), ones);
            const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(a1)), ones);
            acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_add_epi32(p0, p1));
          }
        }
      }
      for (int m = 0; m < MB; ++m) {
        for (int h = 0; h < 2; ++h) {
          const __m256i corr = _mm256_mullo_epi32(z[h], _mm256_set1_epi32(x.xi[m][blk]));
          const __m256 sd = _mm256_mul_ps(s[h], _mm256_set1_ps(x.xs[m][blk]));
          accf[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m][h], corr)), sd, accf[m][h]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    _mm256_storeu_ps(out[m], accf[m][0]);
    _mm256_storeu_ps(out[m] + 8, accf[m][1]);
  }
}

template <int MB>
static inline void q4_fp32_avx2(const Tile& t, int64_t K, int64_t G, const TileRows& x, float (*out)[TILE_N]) {
  __m256 accf[MB][2];
  for (int m = 0; m < MB; ++m) accf[m][0] = accf[m][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(0x0F);
  for (int64_t g = 0; g < K / G; ++g) {
    for (int h = 0; h < 2; ++h) {
      const __m256 s = scales8(scale_at(t, g, h), t.sdt);
      const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(t.z + g * t.n + 8 * h)));
      __m256 acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t kk = g * G; kk < (g + 1) * G; kk += STEP_K) {
        const uint8_t* p = t.q + (kk / STEP_K) * t.ldq + 32 * h;
        _mm_prefetch((const char*)(p + MK_PREFETCH_STEPS * t.ldq), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256((const __m256i*)p);
        for (int j = 0; j < 8; ++j) {
          const __m256i q = _mm256_and_si256(_mm256_srli_epi32(v, 4 * j), low);
          const __m256 w = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, z));
          for (int m = 0; m < MB; ++m)
            acc[m] = _mm256_fmadd_ps(w, _mm256_set1_ps(((const float*)x.xa[m])[kk + j]), acc[m]);
        }
      }
      for (int m = 0; m < MB; ++m) accf[m][h] = _mm256_fmadd_ps(acc[m], s, accf[m][h]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    _mm256_storeu_ps(out[m], accf[m][0]);
    _mm256_storeu_ps(out[m] + 8, accf[m][1]);
  }
}
#endif  // MOEKERN_ISA_LEVEL == 2

// Portable (and every variant's tiles at the end of N): the same arithmetic lane by lane (int32 inner sums for INT8,
// so the variants agree to the order of fp32 sums). Lanes past t.lanes give 0 and are never read.
[[maybe_unused]] static void q4_int8_scalar(const Tile& t, int64_t K, int64_t G, int64_t ab, const TileRows& x, int mb,
                                            float (*out)[TILE_N]) {
  const int64_t nb_per_g = G / ab;
  for (int m = 0; m < mb; ++m) {
    for (int lane = 0; lane < TILE_N; ++lane) {
      float accf = 0.0f;
      for (int64_t g = 0; lane < t.lanes && g < K / G; ++g) {
        const float s = load_as_f32(t.s, t.sdt, g * t.n + lane);
        const int32_t z = t.z[g * t.n + lane];
        for (int64_t b = 0; b < nb_per_g; ++b) {
          const int64_t blk = g * nb_per_g + b, k0 = blk * ab;
          int32_t acc = 0;
          for (int64_t kk = k0; kk < k0 + ab; kk += STEP_K) {
            const uint8_t* p = t.q + (kk / STEP_K) * t.ldq + lane * 4;
            for (int i = 0; i < 4; ++i) {
              acc += int32_t(p[i] & 0xF) * x.xq[m][kk + i];
              acc += int32_t(p[i] >> 4) * x.xq[m][kk + 4 + i];
            }
          }
          accf += float(acc - z * x.xi[m][blk]) * (s * x.xs[m][blk]);
        }
      }
      out[m][lane] = accf;
    }
  }
}

[[maybe_unused]] static void q4_fp32_scalar(const Tile& t, int64_t K, int64_t G, const TileRows& x, int mb,
                                            float (*out)[TILE_N]) {
  for (int m = 0; m < mb; ++m) {
    const float* xf = (const float*)x.xa[m];
    for (int lane = 0; lane < TILE_N; ++lane) {
      float accf = 0.0f;
      for (int64_t g = 0; lane < t.lanes && g < K / G; ++g) {
        const float s = load_as_f32(t.s, t.sdt, g * t.n + lane);
        const int32_t z = t.z[g * t.n + lane];
        float acc = 0.0f;
        for (int64_t kk = g * G; kk < (g + 1) * G; kk += STEP_K) {
          uint32_t word;
          __builtin_memcpy(&word, t.q + (kk / STEP_K) * t.ldq + lane * 4, 4);
          for (int j = 0; j < 8; ++j) acc += float(int32_t((word >> (4 * j)) & 0xF) - z) * xf[kk + j];
        }
        accf += acc * s;
      }
      out[m][lane] = accf;
    }
  }
}

[[maybe_unused]] static void q4_bf16_scalar(const Tile& t, int64_t K, int64_t G, const TileRows& x, int mb,
                                            float (*out)[TILE_N]) {
  for (int m = 0; m < mb; ++m) {
    const uint16_t* xb = (const uint16_t*)x.xa[m];
    for (int lane = 0; lane < TILE_N; ++lane) {
      float accf = 0.0f;
      for (int64_t g = 0; lane < t.lanes && g < K / G; ++g) {
        float acc = 0.0f;
        for (int64_t kk = g * G; kk < (g + 1) * G; kk += STEP_K) {
          uint32_t word;
          __builtin_memcpy(&word, t.q + (kk / STEP_K) * t.ldq + lane * 4, 4);
          for (int j = 0; j < 4; ++j)  // pair j holds x[k + j] and x[k + 4 + j]
            acc += float((word >> (4 * j)) & 0xF) * bf16_to_f32(xb[kk + 2 * j]) +
                   float((word >> (4 * (4 + j))) & 0xF) * bf16_to_f32(xb[kk + 2 * j + 1]);
        }
        const float z = float(t.z[g * t.n + lane]);
        accf += (acc - z * x.xs[m][g]) * load_as_f32(t.s, t.sdt, g * t.n + lane);
      }
      out[m][lane] = accf;
    }
  }
}

#if MOEKERN_ISA_LEVEL >= 3
#define MK_MB_INT8 8
#define MK_MB 4
#elif MOEKERN_ISA_LEVEL == 2
#define MK_MB_INT8 2
#define MK_MB 2
#else
#define MK_MB_INT8 4
#define MK_MB 4
#endif

// Weight rows n0..n0+15 of expert e for one block of mb (1..MK_MB_*) activation rows, by the job's inner product.
static void q4_tile(const Q4Weight& w, int64_t e, int64_t n0, const Prepared& p, const TileRows& x, int mb,
                    float (*out)[TILE_N]) {
  const int64_t K = w.k, G = w.group, N = w.n;
  const int esz = w.scale_dtype == DT_F32 ? 4 : 2;
  Tile t;
  t.q = w.q + (e * (K / STEP_K) * N + n0) * 4;
  t.ldq = N * 4;
  t.s = (const char*)w.scales + (e * (K / G) * N + n0) * esz;
  t.z = w.zeros + e * (K / G) * N + n0;
  t.n = N;
  t.sdt = w.scale_dtype;
  t.lanes = (int)mk_min(TILE_N, N - n0);
  if (t.lanes < TILE_N) {  // the last tile of a width that is not a multiple of 16: never read past the weight
    if (p.inner == INNER_INT8) return q4_int8_scalar(t, K, G, p.block, x, mb, out);
    if (p.inner == INNER_BF16) return q4_bf16_scalar(t, K, G, x, mb, out);
    return q4_fp32_scalar(t, K, G, x, mb, out);
  }
#if MOEKERN_ISA_LEVEL >= 3
#define MK_CASE(N_, CALL) \
  case N_:                \
    CALL;                 \
    return;
  if (p.inner == INNER_INT8) {
    switch (mb) {
      MK_CASE(1, (q4_int8_avx512<1>(t, K, G, p.block, x, out)))
      MK_CASE(2, (q4_int8_avx512<2>(t, K, G, p.block, x, out)))
      MK_CASE(3, (q4_int8_avx512<3>(t, K, G, p.block, x, out)))
      MK_CASE(4, (q4_int8_avx512<4>(t, K, G, p.block, x, out)))
      MK_CASE(5, (q4_int8_avx512<5>(t, K, G, p.block, x, out)))
      MK_CASE(6, (q4_int8_avx512<6>(t, K, G, p.block, x, out)))
      MK_CASE(7, (q4_int8_avx512<7>(t, K, G, p.block, x, out)))
      MK_CASE(8, (q4_int8_avx512<8>(t, K, G, p.block, x, out)))
    }
  } else if (p.inner == INNER_BF16) {
    switch (mb) {
      MK_CASE(1, (q4_bf16_avx512<1>(t, K, G, x, out)))
      MK_CASE(2, (q4_bf16_avx512<2>(t, K, G, x, out)))
      MK_CASE(3, (q4_bf16_avx512<3>(t, K, G, x, out)))
      MK_CASE(4, (q4_bf16_avx512<4>(t, K, G, x, out)))
    }
  } else {
    switch (mb) {
      MK_CASE(1, (q4_fp32_avx512<1>(t, K, G, x, out)))
      MK_CASE(2, (q4_fp32_avx512<2>(t, K, G, x, out)))
      MK_CASE(3, (q4_fp32_avx512<3>(t, K, G, x, out)))
      MK_CASE(4, (q4_fp32_avx512<4>(t, K, G, x, out)))
    }
  }
#undef MK_CASE
#elif MOEKERN_ISA_LEVEL == 2
  if (p.inner == INNER_INT8) {
    if (mb == 1) return q4_int8_avx2<1>(t, K, G, p.block, x, out);
    return q4_int8_avx2<2>(t, K, G, p.block, x, out);
  }
  if (mb == 1) return q4_fp32_avx2<1>(t, K, G, x, out);
  return q4_fp32_avx2<2>(t, K, G, x, out);
#else
  if (p.inner == INNER_INT8) return q4_int8_scalar(t, K, G, p.block, x, mb, out);
  return q4_fp32_scalar(t, K, G, x, mb, out);
#endif
}

// ---------------------------------------------------------------------------------------------------------------------
// Dense tile core: out[m][i] = W[row(i)] . x[m] for the (up to) 16 rows of a tile, fp32 or bf16 weights.
// ---------------------------------------------------------------------------------------------------------------------
#if MOEKERN_ISA_LEVEL >= 3
static inline __m512 load16_w(const void* w, int dtype, int64_t k, __mmask16 mask) {
  if (dtype == DT_F32) return _mm512_maskz_loadu_ps(mask, (const float*)w + k);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t*)w + k);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// RB weight rows at once, each read front to back: eight for one activation row (decode), whose eight streams keep more
// lines in flight than four (Mixtral's experts in fp32 at one token, interleaved with transformers' eager in one
// run: 1.035-1.045x its speed with eight rows, 0.99-1.00x with four, 1.01x with sixteen); four for 2-4 activation
// rows, whose RB * MB accumulators would not fit the registers.
template <int RB, int MB>
static inline void dense_rows_avx512(const void* const* wrow, int nrows, int dtype, int64_t K, const float* const* x,
                                     float (*out)[TILE_N], int i0) {
  // Rows past nrows repeat the first (wrow), read from cache and never stored: no branch in the loop, whose
  // accumulators then stay in registers (a `break` at nrows cost the eight rows their gain).
  __m512 acc[RB][MB];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x[m] + k);
    for (int r = 0; r < RB; ++r) {
      const __m512 w = load16_w(wrow[r], dtype, k, (__mmask16)0xFFFF);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);
    }
  }
  if (k < K) {
    const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x[m] + k);
    for (int r = 0; r < RB; ++r) {
      const __m512 w = load16_w(wrow[r], dtype, k, mask);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < nrows; ++r)
    for (int m = 0; m < MB; ++m) out[m][i0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}
#endif

#if MOEKERN_ISA_LEVEL >= 3
// bf16 weights and bf16 activations (a bf16 model's): vdpbf16ps, 32 products an instruction, no widening.
template <int MB>
__attribute__((target("avx512bf16"))) static inline void dense_rows4_bf16dot(
    const void* const* wrow, int nrows, int64_t K, const uint16_t* const* xb, float (*out)[TILE_N], int i0) {
  __m512 acc[4][MB];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
    __m512bh xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mask, xb[m] + k);
    for (int r = 0; r < 4; ++r) {
      if (r >= nrows) break;
      const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(mask, (const uint16_t*)wrow[r] + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], w, xv[m]);
    }
  }
  for (int r = 0; r < nrows; ++r)
    for (int m = 0; m < MB; ++m) out[m][i0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}
#endif

#if MOEKERN_ISA_LEVEL == 2
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int MB>
static inline void dense_rows4_avx2(const void* const* wrow, int nrows, int dtype, int64_t K, const float* const* x,
                                    float (*out)[TILE_N], int i0) {
  __m256 acc[4][MB];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x[m] + k);
    for (int r = 0; r < 4; ++r) {
      if (r >= nrows) break;
      __m256 w;
      if (dtype == DT_F32) {
        w = _mm256_loadu_ps((const float*)wrow[r] + k);
      } else {
        const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)wrow[r] + k));
        w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      }
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(w, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < nrows; ++r) {
    for (int m = 0; m < MB; ++m) {
      float s = hsum256(acc[r][m]);
      for (int64_t k = K8; k < K; ++k) s += load_as_f32(wrow[r], dtype, k) * x[m][k];
      out[m][i0 + r] = s;
    }
  }
}
#endif

[[maybe_unused]] static void dense_rows_scalar(const void* const* wrow, int nrows, int dtype, int64_t K,
                                               const float* const* x, int mb, float (*out)[TILE_N], int i0) {
  for (int r = 0; r < nrows; ++r) {
    for (int m = 0; m < mb; ++m) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums, as a vector unit would keep them
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int i = 0; i < 8; ++i) acc[i] += load_as_f32(wrow[r], dtype, k + i) * x[m][k + i];
      float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
      for (; k < K; ++k) s += load_as_f32(wrow[r], dtype, k) * x[m][k];
      out[m][i0 + r] = s;
    }
  }
}

// The 16 (or fewer, at the end of N) consecutive weight rows from `row0`, four at a time (eight for one activation
// row). xb: the same activation rows in bf16 where the bf16 dot runs (bf16 weights, AVX512_BF16), else null.
static void dense_tile(const DenseWeight& w, int64_t e, int64_t row0, int nrows, const float* const* x,
                       const uint16_t* const* xb, int mb, float (*out)[TILE_N]) {
  const int esz = w.dtype == DT_F32 ? 4 : 2;
  const char* base = (const char*)w.w + (e * w.stride_e + row0 * w.stride_n) * esz;
  const int rb = MOEKERN_ISA_LEVEL >= 3 && xb == nullptr && mb == 1 ? 8 : 4;  // see dense_rows_avx512
  for (int i0 = 0; i0 < nrows; i0 += rb) {
    const void* wrow[8];
    const int n = (int)mk_min(rb, nrows - i0);
    for (int r = 0; r < rb; ++r) wrow[r] = base + (i0 + (r < n ? r : 0)) * w.stride_n * esz;
#if MOEKERN_ISA_LEVEL >= 3
    if (xb != nullptr) {
      switch (mb) {
        case 1: dense_rows4_bf16dot<1>(wrow, n, w.k, xb, out, i0); break;
        case 2: dense_rows4_bf16dot<2>(wrow, n, w.k, xb, out, i0); break;
        case 3: dense_rows4_bf16dot<3>(wrow, n, w.k, xb, out, i0); break;
        default: dense_rows4_bf16dot<4>(wrow, n, w.k, xb, out, i0); break;
      }
      continue;
    }
    switch (mb) {
      case 1: dense_rows_avx512<8, 1>(wrow, n, w.dtype, w.k, x, out, i0); break;
      case 2: dense_rows_avx512<4, 2>(wrow, n, w.dtype, w.k, x, out, i0); break;
      case 3: dense_rows_avx512<4, 3>(wrow, n, w.dtype, w.k, x, out, i0); break;
      default: dense_rows_avx512<4, 4>(wrow, n, w.dtype, w.k, x, out, i0); break;
    }
#elif MOEKERN_ISA_LEVEL == 2
    if (mb == 1) dense_rows4_avx2<1>(wrow, n, w.dtype, w.k, x, out, i0);
    else dense_rows4_avx2<2>(wrow, n, w.dtype, w.k, x, out, i0);
#else
    dense_rows_scalar(wrow, n, w.dtype, w.k, x, mb, out, i0);
#endif
    (void)xb;
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// The 4-bit decode path (StreamJob, INT8): k-blocks of one expert across all its rows, in memory order.
// ---------------------------------------------------------------------------------------------------------------------
// Columns [n0, n1) of one k-block, lane by lane: the portable build, and every build's last columns past the last
// whole tile.
static void stream_int8_columns(const uint8_t* qb, int64_t ldq, int64_t steps, const void* srow, int sdt,
                                const uint8_t* zrow, int64_t k0, int64_t blk, const TileRows& x, int mb,
                                float* acc, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float s = load_as_f32(srow, sdt, n);
    const int32_t z = zrow[n];
    for (int m = 0; m < mb; ++m) {
      int32_t a = 0;
      for (int64_t st = 0; st < steps; ++st) {
        const uint8_t* p = qb + st * ldq + n * 4;
        const int8_t* xq = x.xq[m] + k0 + st * STEP_K;
        for (int i = 0; i < 4; ++i) a += int32_t(p[i] & 0xF) * xq[i] + int32_t(p[i] >> 4) * xq[4 + i];
      }
      acc[m * N + n] += float(a - z * x.xi[m][blk]) * (s * x.xs[m][blk]);
    }
  }
}

// Each visit of a k-step row reads TJ lines side by side and prefetches each of them MK_STREAM_AHEAD bytes on, into
// L2 (MK_STREAM_HINT): the hardware prefetcher alone falls behind on the steps' several streams. Into L1 (T0, 1 KiB
// on) the same prefetches cost time: interleaved in one run on Mixtral's layer at one token, T1 2 KiB on took 0.85x
// of T0 1 KiB's time (0.83x on Qwen3-30B-A3B's), and no prefetch at all 0.91x (0.94x).
#ifndef MK_STREAM_AHEAD
#define MK_STREAM_AHEAD 2048
#endif
#define MK_STREAM_HINT _MM_HINT_T1
// Where a k-block's rows are short (a small expert's: 4N = 6-16 KiB), the prefetches go to the same place in the next
// block instead (steps * 4N bytes on): 2 KiB on would run into the block's own next row, and the next block's rows
// would each start on demand misses. Interleaved A/B in one run, cold caches, one token: 0.84-0.90x the time on the
// Qwen3-30B-A3B, OLMoE and DeepSeek-V2-Lite shapes, 0.96x on Mixtral's (its down: 64 KiB blocks).
#define MK_NEXT_BLOCK_SPAN (64 << 10)
#if MOEKERN_ISA_LEVEL >= 3
// TJ tiles side by side (TJ * 64 contiguous bytes of each qweight row), the low and the high nibbles in their own
// accumulators: 2 * TJ * MB independent vpdpbusd chains, where one chain per tile would wait on the instruction's
// latency at every step.
template <int MB, int TJ>
static inline void stream_int8_group(const uint8_t* qb, int64_t ldq, int64_t steps, const void* srow, int sdt,
                                     const uint8_t* zrow, int64_t k0, const TileRows& x, const __m512i* xi,
                                     const __m512* xs, float* acc, int64_t N, int64_t j0, int64_t ahead) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512i lo[MB][TJ], hi[MB][TJ];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < TJ; ++t) lo[m][t] = hi[m][t] = _mm512_setzero_si512();
  for (int64_t st = 0; st < steps; ++st) {
    const uint8_t* row = qb + st * ldq + j0 * 64;
    for (int t = 0; t < TJ; ++t) _mm_prefetch((const char*)(row + ahead + t * 64), MK_STREAM_HINT);
    __m512i a0[MB], a1[MB];
    for (int m = 0; m < MB; ++m) {
      int32_t v0, v1;
      __builtin_memcpy(&v0, x.xq[m] + k0 + st * STEP_K, 4);
      __builtin_memcpy(&v1, x.xq[m] + k0 + st * STEP_K + 4, 4);
      a0[m] = _mm512_set1_epi32(v0);
      a1[m] = _mm512_set1_epi32(v1);
    }
    for (int t = 0; t < TJ; ++t) {
      const __m512i v = _mm512_loadu_si512((const void*)(row + t * 64));
      const __m512i vl = _mm512_and_si512(v, low);
      const __m512i vh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int m = 0; m < MB; ++m) {
        lo[m][t] = _mm512_dpbusd_epi32(lo[m][t], vl, a0[m]);
        hi[m][t] = _mm512_dpbusd_epi32(hi[m][t], vh, a1[m]);
      }
    }
  }
  const int esz = sdt == DT_F32 ? 4 : 2;
  for (int t = 0; t < TJ; ++t) {
    const int64_t j = j0 + t;
    const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zrow + j * TILE_N)));
    const __m512 s = scales16((const char*)srow + j * TILE_N * esz, sdt);
    for (int m = 0; m < MB; ++m) {
      float* a = acc + m * N + j * TILE_N;
      const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(lo[m][t], hi[m][t]), _mm512_mullo_epi32(z, xi[m]));
      _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(s, xs[m]), _mm512_loadu_ps(a)));
    }
  }
}

template <int MB>
static void stream_int8_tiles(const uint8_t* qb, int64_t ldq, int64_t steps, const void* srow, int sdt,
                              const uint8_t* zrow, int64_t k0, int64_t blk, const TileRows& x, float* acc, int64_t N,
                              int64_t tiles) {
  // Tiles a visit takes, by rows: 2 * TJ * MB accumulators and 2 * MB broadcasts in the 32 vector registers. Fewer
  // tiles for 2-4 rows measured faster (1 thread, weights in the caches: 4 rows at TJ = 2 took 1.3-1.7x the time of
  // TJ = 1, 2 rows at TJ = 4 about 1.3x that of TJ = 2).
  constexpr int TJ = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  __m512i xi[MB];
  __m512 xs[MB];
  for (int m = 0; m < MB; ++m) {
    xi[m] = _mm512_set1_epi32(x.xi[m][blk]);
    xs[m] = _mm512_set1_ps(x.xs[m][blk]);
  }
  const int64_t ahead = steps * ldq <= MK_NEXT_BLOCK_SPAN ? steps * ldq : MK_STREAM_AHEAD;
  int64_t j = 0;
  for (; j + TJ <= tiles; j += TJ)
    stream_int8_group<MB, TJ>(qb, ldq, steps, srow, sdt, zrow, k0, x, xi, xs, acc, N, j, ahead);
  for (; j < tiles; ++j) stream_int8_group<MB, 1>(qb, ldq, steps, srow, sdt, zrow, k0, x, xi, xs, acc, N, j, ahead);
}

// The BF16 and FP32 inner products on the same decode path (a block is a whole group), so that their figures
// against INT8 compare inner products, not memory access patterns.
template <int MB, int TJ>
__attribute__((target("avx512bf16"))) static inline void stream_bf16_group(
    const uint8_t* qb, int64_t ldq, int64_t steps, const void* srow, int sdt, const uint8_t* zrow, int64_t k0,
    const TileRows& x, const __m512* gsum, float* acc, int64_t N, int64_t j0) {
  const __m512i table = _mm512_set_epi16(
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040,
      0x4000, 0x3F80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0,
      0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  __m512 a[MB][TJ][2];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < TJ; ++t) a[m][t][0] = a[m][t][1] = _mm512_setzero_ps();
  for (int64_t st = 0; st < steps; ++st) {
    const uint8_t* row = qb + st * ldq + j0 * 64;
    for (int t = 0; t < TJ; ++t) _mm_prefetch((const char*)(row + MK_STREAM_AHEAD + t * 64), MK_STREAM_HINT);
    for (int t = 0; t < TJ; ++t) {
      const __m512i v = _mm512_loadu_si512((const void*)(row + t * 64));
      for (int j = 0; j < 4; ++j) {
        const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4 * j), table);
        for (int m = 0; m < MB; ++m) {
          int32_t pair;
          __builtin_memcpy(&pair, (const uint16_t*)x.xa[m] + k0 + st * STEP_K + 2 * j, 4);
          a[m][t][j & 1] = _mm512_dpbf16_ps(a[m][t][j & 1], w, (__m512bh)_mm512_set1_epi32(pair));
        }
      }
    }
  }
  const int esz = sdt == DT_F32 ? 4 : 2;
  for (int t = 0; t < TJ; ++t) {
    const int64_t j = j0 + t;
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zrow + j * TILE_N))));
    const __m512 s = scales16((const char*)srow + j * TILE_N * esz, sdt);
    for (int m = 0; m < MB; ++m) {
      float* out = acc + m * N + j * TILE_N;
      const __m512 corrected = _mm512_fnmadd_ps(z, gsum[m], _mm512_add_ps(a[m][t][0], a[m][t][1]));
      _mm512_storeu_ps(out, _mm512_fmadd_ps(corrected, s, _mm512_loadu_ps(out)));
    }
  }
}

template <int MB, int TJ>
static inline void stream_fp32_group(const uint8_t* qb, int64_t ldq, int64_t steps, const void* srow, int sdt,
                                     const uint8_t* zrow, int64_t k0, const TileRows& x, float* acc, int64_t N,
                                     int64_t j0) {
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 a[MB][TJ][2], z[TJ];
  for (int t = 0; t < TJ; ++t)
    z[t] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zrow + (j0 + t) * TILE_N))));
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < TJ; ++t) a[m][t][0] = a[m][t][1] = _mm512_setzero_ps();
  for (int64_t st = 0; st < steps; ++st) {
    const uint8_t* row = qb + st * ldq + j0 * 64;
    for (int t = 0; t < TJ; ++t) _mm_prefetch((const char*)(row + MK_STREAM_AHEAD + t * 64), MK_STREAM_HINT);
    for (int t = 0; t < TJ; ++t) {
      const __m512i v = _mm512_loadu_si512((const void*)(row + t * 64));
      for (int j = 0; j < 8; ++j) {
        const __m512 w = _mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * j), table), z[t]);
        for (int m = 0; m < MB; ++m)
          a[m][t][j & 1] = _mm512_fmadd_ps(w, _mm512_set1_ps(((const float*)x.xa[m])[k0 + st * STEP_K + j]),
                                           a[m][t][j & 1]);
      }
    }
  }
  const int esz = sdt == DT_F32 ? 4 : 2;
  for (int t = 0; t < TJ; ++t) {
    const __m512 s = scales16((const char*)srow + (j0 + t) * TILE_N * esz, sdt);
    for (int m = 0; m < MB; ++m) {
      float* out = acc + m * N + (j0 + t) * TILE_N;
      _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_add_ps(a[m][t][0], a[m][t][1]), s, _mm512_loadu_ps(out)));
    }
  }
}

template <int MB>
static void stream_float_tiles(int inner, const uint8_t* qb, int64_t ldq, int64_t steps, const void* srow, int sdt,
                               const uint8_t* zrow, int64_t k0, int64_t g, const TileRows& x, float* acc, int64_t N,
                               int64_t tiles) {
  constexpr int TJ = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  int64_t j = 0;
  if (inner == INNER_BF16) {
    __m512 gsum[MB];
    for (int m = 0; m < MB; ++m) gsum[m] = _mm512_set1_ps(x.xs[m][g]);
    for (; j + TJ <= tiles; j += TJ)
      stream_bf16_group<MB, TJ>(qb, ldq, steps, srow, sdt, zrow, k0, x, gsum, acc, N, j);
    for (; j < tiles; ++j) stream_bf16_group<MB, 1>(qb, ldq, steps, srow, sdt, zrow, k0, x, gsum, acc, N, j);
  } else {
    for (; j + TJ <= tiles; j += TJ) stream_fp32_group<MB, TJ>(qb, ldq, steps, srow, sdt, zrow, k0, x, acc, N, j);
    for (; j < tiles; ++j) stream_fp32_group<MB, 1>(qb, ldq, steps, srow, sdt, zrow, k0, x, acc, N, j);
  }
}
#elif MOEKERN_ISA_LEVEL == 2
template <int MB>
static void stream_int8_tiles(const uint8_t* qb, int64_t ldq, int64_t steps, const void* srow, int sdt,
                              const uint8_t* zrow, int64_t k0, int64_t blk, const TileRows& x, float* acc, int64_t N,
                              int64_t tiles) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int esz = sdt == DT_F32 ? 4 : 2;
  for (int64_t j = 0; j < tiles * 2; ++j) {  // half tiles of 8 lanes
    __m256i ai[MB];
    for (int m = 0; m < MB; ++m) ai[m] = _mm256_setzero_si256();
    for (int64_t st = 0; st < steps; ++st) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(qb + st * ldq + j * 32));
      const __m256i lo = _mm256_and_si256(v, low);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int m = 0; m < MB; ++m) {
        int32_t a0, a1;
        __builtin_memcpy(&a0, x.xq[m] + k0 + st * STEP_K, 4);
        __builtin_memcpy(&a1, x.xq[m] + k0 + st * STEP_K + 4, 4);
        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(a0)), ones);
        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(a1)), ones);
        ai[m] = _mm256_add_epi32(ai[m], _mm256_add_epi32(p0, p1));
      }
    }
    const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(zrow + j * 8)));
    const __m256 s = scales8((const char*)srow + j * 8 * esz, sdt);
    for (int m = 0; m < MB; ++m) {
      float* a = acc + m * N + j * 8;
      const __m256i corr = _mm256_mullo_epi32(z, _mm256_set1_epi32(x.xi[m][blk]));
      const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(ai[m], corr));
      const __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(x.xs[m][blk]));
      _mm256_storeu_ps(a, _mm256_fmadd_ps(d, sd, _mm256_loadu_ps(a)));
    }
  }
}
#endif

// One k-block of an expert for up to 4 activation rows, across all N weight rows.
static void stream_block(const Q4Weight& w, const Prepared& p, const uint8_t* qb, int64_t steps, const void* srow,
                         const uint8_t* zrow, int64_t k0, int64_t blk, int64_t g, const TileRows& x, int mb,
                         float* acc) {
  const int64_t N = w.n, ldq = N * 4;
  const int64_t tiles = MK_VEC ? N / TILE_N : 0;
  const int sdt = w.scale_dtype;
#if MOEKERN_ISA_LEVEL >= 3
  if (p.inner != INNER_INT8) {  // blocks are whole groups here (blk == g); ops.cpp keeps N a multiple of 16
    const int in = p.inner;
    switch (mb) {
      case 1: return stream_float_tiles<1>(in, qb, ldq, steps, srow, sdt, zrow, k0, g, x, acc, N, tiles);
      case 2: return stream_float_tiles<2>(in, qb, ldq, steps, srow, sdt, zrow, k0, g, x, acc, N, tiles);
      case 3: return stream_float_tiles<3>(in, qb, ldq, steps, srow, sdt, zrow, k0, g, x, acc, N, tiles);
      default: return stream_float_tiles<4>(in, qb, ldq, steps, srow, sdt, zrow, k0, g, x, acc, N, tiles);
    }
  }
#else
  (void)g;
#endif
#if MK_VEC
  switch (mb) {
    case 1: stream_int8_tiles<1>(qb, ldq, steps, srow, sdt, zrow, k0, blk, x, acc, N, tiles); break;
    case 2: stream_int8_tiles<2>(qb, ldq, steps, srow, sdt, zrow, k0, blk, x, acc, N, tiles); break;
    case 3: stream_int8_tiles<3>(qb, ldq, steps, srow, sdt, zrow, k0, blk, x, acc, N, tiles); break;
    default: stream_int8_tiles<4>(qb, ldq, steps, srow, sdt, zrow, k0, blk, x, acc, N, tiles); break;
  }
#endif
  stream_int8_columns(qb, ldq, steps, srow, sdt, zrow, k0, blk, x, mb, acc, N, tiles * TILE_N, N);
}

static void q4_stream(const StreamJob& job, int64_t item0, int64_t item1) {
  const Q4Weight& w = *job.q4;
  const Prepared& p = job.x;
  const int64_t K = w.k, G = w.group, N = w.n, ab = p.block, steps = ab / STEP_K, nb_per_g = G / ab;
  const int64_t ldq = N * 4, esz = w.scale_dtype == DT_F32 ? 4 : 2;
  const int esz_x = p.inner == INNER_INT8 ? 1 : (p.inner == INNER_BF16 ? 2 : 4);
  for (int64_t item = item0; item < item1; ++item) {
    const int64_t e = job.item_expert[item];
    const int64_t r0 = job.row_begin[e], rows = job.row_begin[e + 1] - r0;
    float* acc = job.partial + job.item_acc[item];
    const uint8_t* qe = w.q + e * (K / STEP_K) * ldq;
    for (int64_t blk = job.item_blk0[item]; blk < job.item_blk1[item]; ++blk) {
      const int64_t k0 = blk * ab, g = blk / nb_per_g;
      const uint8_t* qb = qe + (k0 / STEP_K) * ldq;
      const void* srow = (const char*)w.scales + ((e * (K / G) + g) * N) * esz;
      const uint8_t* zrow = w.zeros + (e * (K / G) + g) * N;
      // Four activation rows at a time: a block's few qweight rows (4N bytes each) stay in L2 for the next four.
      for (int64_t m0 = 0; m0 < rows; m0 += 4) {
        const int mb = (int)mk_min(4, rows - m0);
        TileRows x;
        for (int m = 0; m < mb; ++m) {
          const int64_t ar = job.act_row[r0 + m0 + m];
          x.xa[m] = (const char*)p.xa + ar * K * esz_x;
          x.xq[m] = (const int8_t*)x.xa[m];
          x.xs[m] = p.xs + ar * p.nscale;
          x.xi[m] = p.xi ? p.xi + ar * p.nscale : nullptr;
        }
        stream_block(w, p, qb, steps, srow, zrow, k0, blk, g, x, mb, acc + m0 * N);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// The GEMM driver: work items over (expert, tiles), rows in blocks of MB, the epilogue.
// ---------------------------------------------------------------------------------------------------------------------
static void gemm(const GemmJob& job, int64_t item0, int64_t item1) {
  const bool q4 = job.q4 != nullptr;
  const int mbmax = q4 ? (job.x.inner == INNER_INT8 ? MK_MB_INT8 : MK_MB) : MK_MB;
  const bool interleaved = job.gated == GATED_INTERLEAVED;  // 4-bit only (ops.cpp sends dense GPT-OSS to ATen)
  const int cols_per_tile = interleaved ? TILE_N / 2 : TILE_N;
  float a[8][TILE_N], b[8][TILE_N];
  for (int64_t item = item0; item < item1; ++item) {
    const int64_t e = job.item_expert[item];
    const int64_t r0 = job.row_begin[e], r1 = job.row_begin[e + 1];
    for (int64_t t = job.item_tile0[item]; t < job.item_tile1[item]; ++t) {
      const int64_t col0 = t * cols_per_tile, row0 = t * TILE_N;
      const int ncols = (int)mk_min(cols_per_tile, job.out_cols - col0);
      for (int64_t rb = r0; rb < r1; rb += mbmax) {
        const int mb = (int)mk_min(mbmax, r1 - rb);
        if (q4) {
          TileRows x;
          const Prepared& p = job.x;
          for (int m = 0; m < mb; ++m) {
            const int64_t ar = job.act_row[rb + m];
            const int esz = p.inner == INNER_INT8 ? 1 : (p.inner == INNER_BF16 ? 2 : 4);
            x.xa[m] = (const char*)p.xa + ar * p.k * esz;
            x.xq[m] = (const int8_t*)x.xa[m];
            x.xs[m] = p.xs + ar * p.nscale;
            x.xi[m] = p.xi ? p.xi + ar * p.nscale : nullptr;
          }
          q4_tile(*job.q4, e, row0, p, x, mb, a);
          if (job.gated == GATED_HALVES) q4_tile(*job.q4, e, job.out_cols + row0, p, x, mb, b);
        } else {
          const float* x[8];
          const uint16_t* xb[8];
          for (int m = 0; m < mb; ++m) {
            x[m] = job.xdense ? job.xdense + job.act_row[rb + m] * job.ld_xdense : nullptr;
            xb[m] = job.xdense_bf16 ? job.xdense_bf16 + job.act_row[rb + m] * job.ld_xdense : nullptr;
          }
          const uint16_t* const* xbp = job.xdense_bf16 ? xb : nullptr;
          dense_tile(*job.dense, e, row0, ncols, x, xbp, mb, a);
          if (job.gated == GATED_HALVES) dense_tile(*job.dense, e, job.out_cols + row0, ncols, x, xbp, mb, b);
        }
        const float* bias = job.bias ? job.bias + e * job.bias_stride : nullptr;
        for (int m = 0; m < mb; ++m) {
          float* o = job.out + (rb + m) * job.ld_out + col0;
          if (job.gated == GATED_HALVES) {
            for (int i = 0; i < ncols; ++i) {
              float g = a[m][i], u = b[m][i];
              if (bias) {
                g += bias[col0 + i];
                u += bias[job.out_cols + col0 + i];
              }
              o[i] = gated(g, u, job.act, job.alpha, job.limit);
            }
          } else if (interleaved) {
            for (int i = 0; i < ncols; ++i) {
              float g = a[m][2 * i], u = a[m][2 * i + 1];
              if (bias) {
                g += bias[row0 + 2 * i];
                u += bias[row0 + 2 * i + 1];
              }
              o[i] = gated(g, u, job.act, job.alpha, job.limit);
            }
          } else {
            const float rw = job.row_weight ? job.row_weight[rb + m] : 1.0f;
            for (int i = 0; i < ncols; ++i) o[i] = rw * (a[m][i] + (bias ? bias[col0 + i] : 0.0f));
          }
        }
      }
    }
  }
}

static uint64_t read_sum(const void* p, int64_t bytes) {
  const char* c = (const char*)p;
  int64_t i = 0;
  uint64_t total = 0;
#if MOEKERN_ISA_LEVEL >= 3
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 256 <= bytes; i += 256) {
    s0 = _mm512_add_epi64(s0, _mm512_loadu_si512((const void*)(c + i)));
    s1 = _mm512_add_epi64(s1, _mm512_loadu_si512((const void*)(c + i + 64)));
    s2 = _mm512_add_epi64(s2, _mm512_loadu_si512((const void*)(c + i + 128)));
    s3 = _mm512_add_epi64(s3, _mm512_loadu_si512((const void*)(c + i + 192)));
  }
  total = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
#elif MOEKERN_ISA_LEVEL == 2
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 128 <= bytes; i += 128) {
    s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i*)(c + i)));
    s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i*)(c + i + 32)));
    s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i*)(c + i + 64)));
    s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i*)(c + i + 96)));
  }
  uint64_t lanes[4];
  _mm256_storeu_si256((__m256i*)lanes, _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
  total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
  for (; i + 8 <= bytes; i += 8) {  // the rest (all of it in the portable build), 8 bytes at a time
    uint64_t w;
    __builtin_memcpy(&w, c + i, 8);
    total += w;
  }
  for (; i < bytes; ++i) total += (uint8_t)c[i];
  return total;
}

static const Kernels kKernels = {
    MOEKERN_ISA_NAME,
#if MOEKERN_ISA_LEVEL >= 3
    true,
#else
    false,
#endif
#if MOEKERN_ISA_LEVEL >= 3
    (1 << INNER_INT8) | (1 << INNER_BF16) | (1 << INNER_FP32),
#else
    1 << INNER_INT8,
#endif
    prepare_rows, gate_columns, gemm, q4_stream, read_sum};
