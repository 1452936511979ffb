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

template <bool kNesterov>
inline __m512 MHatV(const Params& s, __m512 g, __m512 m) {
  if constexpr (kNesterov) {
    return _mm512_fmadd_ps(
        _mm512_set1_ps(s.omb1), _mm512_mul_ps(g, _mm512_set1_ps(s.inv_bc1)),
        _mm512_mul_ps(_mm512_set1_ps(s.b1), _mm512_mul_ps(m, _mm512_set1_ps(s.inv_bc1_next))));
  }
  return _mm512_mul_ps(m, _mm512_set1_ps(s.inv_bc1));
}

inline __m512 DenominatorV(const Params& s, __m512 v) {
  const __m512 r = _mm512_sqrt_ps(
      _mm512_fmadd_ps(v, _mm512_set1_ps(s.inv_bc2), _mm512_set1_ps(s.eps_root)));
  return _mm512_add_ps(r, _mm512_set1_ps(s.eps));
}

// The first sweep over 16 elements at i (kMasked: `real` of them are the leaf's, the rest
// padding with g = 0): new m and sqrt(v) into M and R, their bits' running maxima (unsigned:
// any non-finite value, and only such, reaches 0x7f800000 or above), and θ.
template <bool kNesterov, bool kMasked>
inline void MomentsV(const Params& s, const MapV& mm, const MapV& vm, const Leaf& x,
                     int64_t at, int64_t i, __mmask16 real, __m512 sm, __m512 sv, float* M,
                     float* R, __m512i& m_max, __m512i& r_max) {
  const __m512 g = kMasked ? _mm512_maskz_loadu_ps(real, x.g + at) : _mm512_loadu_ps(x.g + at);
  const __m512 md = _mm512_mul_ps(DecodeSignedV(x.m_in + at, mm), sm);
  const __m512 t = _mm512_mul_ps(DecodeUnsignedV(x.v_in + at, vm), sv);
  const __m512 m = _mm512_fmadd_ps(_mm512_set1_ps(s.omb1), g,
                                   _mm512_mul_ps(_mm512_set1_ps(s.b1), md));
  const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(s.omb2), _mm512_mul_ps(g, g),
                                   _mm512_mul_ps(_mm512_set1_ps(s.b2), _mm512_mul_ps(t, t)));
  const __m512 root = _mm512_sqrt_ps(v);
  _mm512_store_ps(M + i, m);
  _mm512_store_ps(R + i, root);
  const __m512i abs_m = _mm512_and_si512(_mm512_castps_si512(m), _mm512_set1_epi32(INT32_MAX));
  m_max = _mm512_max_epu32(m_max, abs_m);
  r_max = _mm512_max_epu32(r_max, _mm512_castps_si512(root));
  if (kMasked && !real) return;
  const __m512 p = kMasked ? _mm512_maskz_loadu_ps(real, x.p_in + at) : _mm512_loadu_ps(x.p_in + at);
  __m512 u = _mm512_div_ps(MHatV<kNesterov>(s, g, m), DenominatorV(s, v));
  if (x.decay) u = _mm512_fmadd_ps(_mm512_set1_ps(s.wd), p, u);
  const __m512 p_new = _mm512_fmadd_ps(_mm512_set1_ps(s.neg_lr), u, p);
  if (kMasked) {
    _mm512_mask_storeu_ps(x.p + at, real, p_new);
  } else {
    _mm512_storeu_ps(x.p + at, p_new);
  }
}

// The codes of 16 elements at i from their new m and sqrt(v), all valid (finite).
inline void EncodeV(const MapV& mm, const MapV& vm, const Leaf& x, int64_t at, __m512 m,
                    __m512 root, __m512 m_inv, __m512 v_inv) {
  const __m512 am = _mm512_mul_ps(_mm512_abs_ps(m), m_inv);
  const __m512i km = IndexV(am, mm);
  __m512i kv = IndexV(_mm512_mul_ps(root, v_inv), vm);
  // A positive v never gets the zero code: kv = max(kv, root > 0) (root >= 0: its bits order it).
  kv = _mm512_max_epi32(kv, _mm512_min_epu32(_mm512_castps_si512(root), _mm512_set1_epi32(1)));
  // Negative m (its sign bit: -0 encodes as 0 either way) takes -min(k, largest negative).
  const __mmask16 negative = _mm512_movepi32_mask(_mm512_castps_si512(m));
  const __m512i cm = _mm512_mask_sub_epi32(km, negative, _mm512_setzero_si512(),
                                           _mm512_min_epi32(km, mm.largest_negative));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(x.m + at), _mm512_cvtepi32_epi8(cm));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(x.v + at), _mm512_cvtepi32_epi8(kv));
}

inline float MaxOf(__m512i bits) {
  const uint32_t top = _mm512_reduce_max_epu32(bits);
  float out;
  std::memcpy(&out, &top, sizeof(out));
  return out;
}

// One block: the moments and θ in a first sweep, the scales, the codes in a second sweep
// over the moments in L1. A block with a non-finite m or v (rare) is encoded by the scalar
// code, which the saturation policy is written in.
template <bool kNesterov>
void BlockVector(const Params& s, const MapV& mm, const MapV& vm, const Map& m_map,
                 const Map& v_map, const Leaf& x, int64_t b) {
  alignas(64) float M[kMaxBlock];
  alignas(64) float R[kMaxBlock];
  const int64_t start = b * x.block, count = std::min(x.block, x.size - start);
  const __m512 sm = _mm512_set1_ps(x.ms_in[b]), sv = _mm512_set1_ps(x.vs_in[b]);
  __m512i m_max = _mm512_setzero_si512(), r_max = _mm512_setzero_si512();
  Prefetch(x, start + kPrefetchAhead * x.block, x.block);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    MomentsV<kNesterov, false>(s, mm, vm, x, start + i, i, 0xFFFF, sm, sv, M, R, m_max,
                                        r_max);
  }
  for (; i < x.block; i += 16) {  // the final block's last elements and padding
    const int64_t left = count - i;
    const __mmask16 real = left > 0 ? (1u << left) - 1 : 0;
    MomentsV<kNesterov, true>(s, mm, vm, x, start + i, i, real, sm, sv, M, R, m_max,
                                       r_max);
  }
  const float m_scale = MaxOf(m_max), v_scale = MaxOf(r_max);
  if (!(m_scale <= FLT_MAX && v_scale <= FLT_MAX)) [[unlikely]] {
    MomentsScalar<kNesterov>(s, m_map, v_map, x, b, false, M, R);
    EncodeScalar(m_map, v_map, x, b, M, R);
    return;
  }
  const __m512 m_inv = _mm512_set1_ps(m_scale > 0 ? 1.0f / m_scale : 0.0f);
  const __m512 v_inv = _mm512_set1_ps(v_scale > 0 ? 1.0f / v_scale : 0.0f);
  for (int64_t j = 0; j < x.block; j += 16) {
    EncodeV(mm, vm, x, start + j, _mm512_load_ps(M + j), _mm512_load_ps(R + j), m_inv, v_inv);
  }
  x.ms[b] = m_scale;
  x.vs[b] = v_scale;
}
