// The AVX-512 code of the 8-bit Adam kernel: the same arithmetic as adam8_cpu.cc's scalar
// code, 16 elements at a time. Not compiled on its own: adam8_cpu.cc includes it inside its
// anonymous namespace where FA_AVX512 is defined (so it ships as a .cc with the sources).

// The decode tables are indexed by the low 4 bits of lzcnt(k) (signed map) or lzcnt(k + 1)
// (unsigned), which pick the decade without a subtraction; the signed map's top entry
// decodes to -1, so that flipping by the code's sign bit gives +1 for code -128.
struct MapV {
  __m512 gain, shift, slope, offset, next_lo, next_hi;
  __m512i last, region_lo, region_hi, largest_negative;  // the signed map holds +1, not -1
};

MapV Vectors(const Map& map, bool is_signed) {
  MapV v;
  float slope[kTableSize], offset[kTableSize];
  for (int slot = 0; slot < kTableSize; ++slot) {
    const int d = is_signed ? (slot >= 8 ? 15 - slot : -1) : (slot >= 7 ? 14 - slot : -1);
    slope[slot] = (is_signed && d == 7 ? -1.0f : 1.0f) * map.slope[d & 15];
    offset[slot] = map.offset[d & 15];
  }
  v.region_lo = _mm512_loadu_si512(map.region);
  v.region_hi = _mm512_loadu_si512(map.region + 16);
  v.next_lo = _mm512_loadu_ps(map.next);
  v.next_hi = _mm512_loadu_ps(map.next + 16);
  v.gain = _mm512_loadu_ps(map.gain);
  v.shift = _mm512_loadu_ps(map.shift);
  v.slope = _mm512_loadu_ps(slope);
  v.offset = _mm512_loadu_ps(offset);
  v.last = _mm512_loadu_si512(map.last);
  v.largest_negative = _mm512_set1_epi32(map.last[kRegions] - 1);
  return v;
}

inline __m512 DecodeV(__m512i k, __m512i d, const MapV& map) {
  const __m512 slope = _mm512_permutexvar_ps(d, map.slope);
  const __m512 offset = _mm512_permutexvar_ps(d, map.offset);
  return _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(k), offset), slope);
}

inline __m512 DecodeSignedV(const int8_t* codes, const MapV& map) {
  const __m512i c = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  const __m512i k = _mm512_abs_epi32(c);
  const __m512 magnitude = DecodeV(k, _mm512_lzcnt_epi32(k), map);
  // magnitude ^ (c & sign bit): negative codes flip the sign (code -128: -1 becomes +1).
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
      _mm512_castps_si512(magnitude), c, _mm512_set1_epi32(INT32_MIN), 0x78));
}

inline __m512 DecodeUnsignedV(const uint8_t* codes, const MapV& map) {
  const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  return DecodeV(k, _mm512_lzcnt_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(1))), map);
}

// The region r = #{thresholds <= a} from a's binade: each binade holds at most one threshold,
// so r is the region at the binade's start, plus one past the binade's threshold.
inline __m512i IndexV(__m512 a, const MapV& map) {
  const __m512 floor = _mm512_set1_ps(0x1p-24f);  // smaller a are all in region 0
  const __m512i binade = _mm512_srli_epi32(_mm512_castps_si512(_mm512_max_ps(a, floor)), 23);
  __m512i r = _mm512_permutex2var_epi32(map.region_lo, binade, map.region_hi);
  const __m512 next = _mm512_permutex2var_ps(map.next_lo, binade, map.next_hi);
  r = _mm512_mask_add_epi32(r, _mm512_cmp_ps_mask(a, next, _CMP_GE_OQ), r, _mm512_set1_epi32(1));
  const __m512 y = _mm512_fmsub_ps(a, _mm512_permutexvar_ps(r, map.gain),
                                   _mm512_permutexvar_ps(r, map.shift));
  const __m512i k = _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm512_min_epi32(k, _mm512_permutexvar_epi32(r, map.last));
}

inline __mmask16 ValidV(__m512 m, __m512 v) {
  constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;  // QNaN, +inf, -inf, SNaN
  return static_cast<__mmask16>(~(_mm512_fpclass_ps_mask(m, kNonFinite) |
                                  _mm512_fpclass_ps_mask(v, kNonFinite)));
}

template <bool kNesterov>
inline __m512 DirectionV(const Params& s, __m512 g, __m512 m, __m512 v) {
  __m512 m_hat;
  if constexpr (kNesterov) {
    m_hat = _mm512_fmadd_ps(
        _mm512_set1_ps(s.omb1), _mm512_mul_ps(g, _mm512_set1_ps(s.inv_bc1)),
        _mm512_mul_ps(_mm512_set1_ps(s.b1), _mm512_mul_ps(m, _mm512_set1_ps(s.inv_bc1_next))));
  } else {
    m_hat = _mm512_mul_ps(m, _mm512_set1_ps(s.inv_bc1));
  }
  const __m512 root = _mm512_sqrt_ps(
      _mm512_fmadd_ps(v, _mm512_set1_ps(s.inv_bc2), _mm512_set1_ps(s.eps_root)));
  return _mm512_div_ps(m_hat, _mm512_add_ps(root, _mm512_set1_ps(s.eps)));
}

template <bool kNesterov>
void BlockVector(const Params& s, const MapV& mm, const MapV& vm, const Leaf& x, int64_t b) {
  alignas(64) float M[kMaxBlock];
  alignas(64) float V[kMaxBlock];
  __mmask16 valids[kMaxBlock / 16];
  const int64_t start = b * x.block, count = std::min(x.block, x.size - start);
  const __m512 sm = _mm512_set1_ps(x.ms_in[b]), sv = _mm512_set1_ps(x.vs_in[b]);
  const __m512 b1 = _mm512_set1_ps(s.b1), omb1 = _mm512_set1_ps(s.omb1);
  const __m512 b2 = _mm512_set1_ps(s.b2), omb2 = _mm512_set1_ps(s.omb2);
  const __m512 wd = _mm512_set1_ps(s.wd), neg_lr = _mm512_set1_ps(s.neg_lr);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 m_max = _mm512_setzero_ps(), v_max = _mm512_setzero_ps();
  Prefetch(x, start + kPrefetchAhead * x.block, x.block);
  for (int64_t i = 0; i < x.block; i += 16) {
    const int64_t left = count - i;
    const __mmask16 real = left >= 16 ? 0xFFFF : (left > 0 ? (1u << left) - 1 : 0);
    const __m512 g = _mm512_maskz_loadu_ps(real, x.g + start + i);
    const __m512 md = _mm512_mul_ps(DecodeSignedV(x.m_in + start + i, mm), sm);
    const __m512 t = _mm512_mul_ps(DecodeUnsignedV(x.v_in + start + i, vm), sv);
    const __m512 m = _mm512_fmadd_ps(omb1, g, _mm512_mul_ps(b1, md));
    const __m512 v = _mm512_fmadd_ps(omb2, _mm512_mul_ps(g, g), _mm512_mul_ps(b2, _mm512_mul_ps(t, t)));
    _mm512_store_ps(M + i, m);
    _mm512_store_ps(V + i, v);
    const __mmask16 valid = ValidV(m, v);
    valids[i / 16] = valid;
    m_max = _mm512_mask_max_ps(m_max, valid, m_max, _mm512_andnot_ps(sign, m));
    v_max = _mm512_mask_max_ps(v_max, valid, v_max, v);
    if (real) {
      const __m512 p = _mm512_maskz_loadu_ps(real, x.p_in + start + i);
      __m512 u = DirectionV<kNesterov>(s, g, m, v);
      if (x.decay) u = _mm512_fmadd_ps(wd, p, u);
      _mm512_mask_storeu_ps(x.p + start + i, real, _mm512_fmadd_ps(neg_lr, u, p));
    }
  }
  const float m_scale = _mm512_reduce_max_ps(m_max);
  const float v_scale = std::sqrt(_mm512_reduce_max_ps(v_max));
  const __m512 m_inv = _mm512_set1_ps(m_scale > 0 ? 1.0f / m_scale : 0.0f);
  const __m512 v_inv = _mm512_set1_ps(v_scale > 0 ? 1.0f / v_scale : 0.0f);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < x.block; i += 16) {
    const __m512 m = _mm512_load_ps(M + i), v = _mm512_load_ps(V + i);
    const __m512 root = _mm512_sqrt_ps(v);
    const __mmask16 valid = valids[i / 16];
    __m512 am = _mm512_mul_ps(_mm512_andnot_ps(sign, m), m_inv);
    __m512 av = _mm512_mul_ps(root, v_inv);
    if (valid != 0xFFFF) [[unlikely]] {  // invalid elements saturate (NaN m: to 0)
      const __mmask16 nan = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
      am = _mm512_mask_mov_ps(am, ~valid, _mm512_mask_mov_ps(one, nan, zero));
      av = _mm512_mask_mov_ps(av, ~valid, one);
    }
    const __m512i km = IndexV(am, mm);
    __m512i kv = IndexV(av, vm);
    // A positive v never gets the zero code: kv = max(kv, v > 0) (v >= 0, so its bits order it).
    kv = _mm512_max_epi32(kv, _mm512_min_epu32(_mm512_castps_si512(v), _mm512_set1_epi32(1)));
    const __mmask16 negative = _mm512_cmp_ps_mask(m, zero, _CMP_LT_OQ);
    const __m512i cm = _mm512_mask_sub_epi32(km, negative, _mm512_setzero_si512(),
                                             _mm512_min_epi32(km, mm.largest_negative));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x.m + start + i), _mm512_cvtepi32_epi8(cm));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x.v + start + i), _mm512_cvtepi32_epi8(kv));
  }
  x.ms[b] = m_scale;
  x.vs[b] = v_scale;
}
