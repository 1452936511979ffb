// The AVX-512 code of the 8-bit Adam kernel: the same arithmetic as adam8_cpu.cc's scalar
// code, 16 elements at a time. Not compiled on its own: adam8_cpu.cc includes it inside its
// anonymous namespace where FA_AVX512 is defined (so it ships as a .cc with the sources).

// The decode tables are indexed by the low 4 bits of lzcnt(k) (signed map) or lzcnt(k + 1)
// (unsigned), which pick the decade without a subtraction; the signed map's top entry
// decodes to -1, so that flipping by the code's sign bit gives +1 for code -128.
//
// The encoding tables are indexed by binade (the low 5 bits of a's biased exponent, for
// a >= 2^-24) and hold the constants of the region at the binade's start. A binade holds at
// most one threshold, and past it lies the region that starts the next binade: so the
// constants for a are those of binade b + (a >= next[b]).
struct MapV {
  __m512 slope, offset, next_lo, next_hi, gain_lo, gain_hi, shift_lo, shift_hi;
  __m512i last_lo, last_hi, largest_negative;  // the signed map holds +1, not -1
};

MapV Vectors(const Map& map, bool is_signed) {
  MapV v;
  float slope[kTableSize], offset[kTableSize], gain[kBinades], shift[kBinades];
  int32_t last[kBinades];
  for (int slot = 0; slot < kTableSize; ++slot) {
    const int d = is_signed ? (slot >= 8 ? 15 - slot : -1) : (slot >= 7 ? 14 - slot : -1);
    slope[slot] = (is_signed && d == 7 ? -1.0f : 1.0f) * map.slope[d & 15];
    offset[slot] = map.offset[d & 15];
  }
  for (int b = 0; b < kBinades; ++b) {
    const int r = map.region[b];
    gain[b] = map.gain[r];
    shift[b] = map.shift[r];
    last[b] = map.last[r];
  }
  v.next_lo = _mm512_loadu_ps(map.next);
  v.next_hi = _mm512_loadu_ps(map.next + 16);
  v.gain_lo = _mm512_loadu_ps(gain);
  v.gain_hi = _mm512_loadu_ps(gain + 16);
  v.shift_lo = _mm512_loadu_ps(shift);
  v.shift_hi = _mm512_loadu_ps(shift + 16);
  v.last_lo = _mm512_loadu_si512(last);
  v.last_hi = _mm512_loadu_si512(last + 16);
  v.slope = _mm512_loadu_ps(slope);
  v.offset = _mm512_loadu_ps(offset);
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

// Float codes (FloatCode in adam8_cpu.cc): decode (q + base) << shift as float32, 0 for q = 0.
template <bool kSigned>
inline __m512 FloatDecodeV(__m512i q) {
  using C = FloatCode<kSigned>;
  const __m512i bits = _mm512_add_epi32(q, _mm512_set1_epi32(C::kBase));
  const __mmask16 nonzero = _mm512_test_epi32_mask(q, q);
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(nonzero, bits, C::kShift));
}

// q = (bits(a) + round) >> shift, not yet clamped (a in [0, 1]).
template <bool kSigned>
inline __m512i FloatIndexV(__m512 a) {
  using C = FloatCode<kSigned>;
  const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(a), _mm512_set1_epi32(C::kRound));
  return _mm512_srai_epi32(bits, C::kShift);
}

template <bool kFloat>
inline __m512 DecodeSignedCodeV(const int8_t* codes, const MapV& map) {
  if constexpr (kFloat) {
    const __m512i c =
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    const __m512 magnitude = FloatDecodeV<true>(_mm512_abs_epi32(c));
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
        _mm512_castps_si512(magnitude), c, _mm512_set1_epi32(INT32_MIN), 0x78));
  }
  return DecodeSignedV(codes, map);
}

template <bool kFloat>
inline __m512 DecodeUnsignedCodeV(const uint8_t* codes, const MapV& map) {
  if constexpr (kFloat) {
    return FloatDecodeV<false>(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))));
  }
  return DecodeUnsignedV(codes, map);
}

// k = min(floor(fma(a, gain, -shift)), last) with the constants of a's region (MapV), for
// a >= 2^-24 (smaller a are all in region 0, whose constants give k = 0 for a = 2^-24 too).
inline __m512i IndexV(__m512 a, const MapV& map) {
  __m512i b = _mm512_srli_epi32(_mm512_castps_si512(a), 23);
  const __m512 next = _mm512_permutex2var_ps(map.next_lo, b, map.next_hi);
  b = _mm512_mask_add_epi32(b, _mm512_cmp_ps_mask(a, next, _CMP_GE_OQ), b, _mm512_set1_epi32(1));
  const __m512 y = _mm512_fmsub_ps(a, _mm512_permutex2var_ps(map.gain_lo, b, map.gain_hi),
                                   _mm512_permutex2var_ps(map.shift_lo, b, map.shift_hi));
  const __m512i k = _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm512_min_epi32(k, _mm512_permutex2var_epi32(map.last_lo, b, map.last_hi));
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

// The moment sweep over 16 elements at `at` (kMasked: `real` of them are the leaf's, the
// rest padding with g = 0): the new m and v into M and V at i, the running maxima of the
// bits of |m| and v (unsigned: any non-finite value, and only such, reaches 0x7f800000 or
// above; so does a negative v, which b2 in [0, 1) rules out), and θ.
template <bool kNesterov, bool kMasked, bool kFloat>
inline void MomentsV(const Params& s, const MapV& mm, const MapV& vm, const Leaf& x,
                     int64_t at, int64_t i, __mmask16 real, __m512 sm, __m512 sv, float* M,
                     float* V, __m512i& m_max, __m512i& v_max) {
  const __m512 g = kMasked ? _mm512_maskz_loadu_ps(real, x.g + at) : _mm512_loadu_ps(x.g + at);
  const __m512 md = _mm512_mul_ps(DecodeSignedCodeV<kFloat>(x.m_in + at, mm), sm);
  const __m512 t = _mm512_mul_ps(DecodeUnsignedCodeV<kFloat>(x.v_in + at, vm), sv);
  const __m512 m = _mm512_fmadd_ps(_mm512_set1_ps(s.omb1), g,
                                   _mm512_mul_ps(_mm512_set1_ps(s.b1), md));
  const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(s.omb2), _mm512_mul_ps(g, g),
                                   _mm512_mul_ps(_mm512_set1_ps(s.b2), _mm512_mul_ps(t, t)));
  _mm512_store_ps(M + i, m);
  _mm512_store_ps(V + i, v);
  const __m512i abs_m = _mm512_and_si512(_mm512_castps_si512(m), _mm512_set1_epi32(INT32_MAX));
  m_max = _mm512_max_epu32(m_max, abs_m);
  v_max = _mm512_max_epu32(v_max, _mm512_castps_si512(v));
  if (kMasked && !real) return;
  __m512 u = _mm512_div_ps(MHatV<kNesterov>(s, g, m), DenominatorV(s, v));
  __m512 p_new;
  if (x.updates && !x.decay) {  // the update alone: θ is not read
    p_new = _mm512_mul_ps(_mm512_set1_ps(s.neg_lr), u);
  } else {
    const __m512 p =
        kMasked ? _mm512_maskz_loadu_ps(real, x.p_in + at) : _mm512_loadu_ps(x.p_in + at);
    if (x.decay) u = _mm512_fmadd_ps(_mm512_set1_ps(s.wd), p, u);
    p_new = x.updates ? _mm512_mul_ps(_mm512_set1_ps(s.neg_lr), u)
                      : _mm512_fmadd_ps(_mm512_set1_ps(s.neg_lr), u, p);
  }
  if (kMasked) {
    _mm512_mask_storeu_ps(x.p + at, real, p_new);
  } else {
    _mm512_storeu_ps(x.p + at, p_new);
  }
}

// A block between its two sweeps: its new moments (in L1) and scales.
struct Swept {
  const float* M;
  const float* V;
  int64_t start;
  __m512 m_inv, v_inv;
};

// The codes of 16 elements at `at` from their new m and v, all valid (finite).
template <bool kFloat>
inline void EncodeV(const MapV& mm, const MapV& vm, const Leaf& x, const Swept& w, int64_t i) {
  const __m512 m = _mm512_load_ps(w.M + i), root = _mm512_sqrt_ps(_mm512_load_ps(w.V + i));
  if constexpr (kFloat) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i km = _mm512_min_epi32(
        _mm512_max_epi32(FloatIndexV<true>(_mm512_abs_ps(_mm512_mul_ps(m, w.m_inv))), zero),
        _mm512_set1_epi32(FloatCode<true>::kTop));
    // max with (root > 0): clamps at 0, and a positive v never gets the zero code.
    const __m512i kv = _mm512_min_epi32(
        _mm512_max_epi32(FloatIndexV<false>(_mm512_mul_ps(root, w.v_inv)),
                         _mm512_min_epu32(_mm512_castps_si512(root), _mm512_set1_epi32(1))),
        _mm512_set1_epi32(FloatCode<false>::kTop));
    const __mmask16 negative = _mm512_movepi32_mask(_mm512_castps_si512(m));
    _mm512_mask_cvtepi32_storeu_epi8(x.m + w.start + i, 0xFFFF,
                                     _mm512_mask_sub_epi32(km, negative, zero, km));
    _mm512_mask_cvtepi32_storeu_epi8(x.v + w.start + i, 0xFFFF, kv);
    return;
  }
  const __m512 floor = _mm512_set1_ps(0x1p-24f);
  // max(|m · (1 / scale)|, 2^-24): range's larger magnitude (0b11), sign cleared (0b10xx).
  const __m512i km = IndexV(_mm512_range_ps(_mm512_mul_ps(m, w.m_inv), floor, 0x0B), mm);
  __m512i kv = IndexV(_mm512_max_ps(_mm512_mul_ps(root, w.v_inv), floor), vm);
  // A positive v never gets the zero code: kv = max(kv, root > 0) (root >= 0: its bits order it).
  kv = _mm512_max_epi32(kv, _mm512_min_epu32(_mm512_castps_si512(root), _mm512_set1_epi32(1)));
  // Negative m (its sign bit: -0 encodes as 0 either way) takes -min(k, largest negative).
  const __mmask16 negative = _mm512_movepi32_mask(_mm512_castps_si512(m));
  const __m512i cm = _mm512_mask_sub_epi32(km, negative, _mm512_setzero_si512(),
                                           _mm512_min_epi32(km, mm.largest_negative));
  _mm512_mask_cvtepi32_storeu_epi8(x.m + w.start + i, 0xFFFF, cm);
  _mm512_mask_cvtepi32_storeu_epi8(x.v + w.start + i, 0xFFFF, kv);
}

inline float MaxOf(__m512i bits) {
  const uint32_t top = _mm512_reduce_max_epu32(bits);
  float out;
  std::memcpy(&out, &top, sizeof(out));
  return out;
}

// The moment sweep of block b into M and V and, with kEncode, the encoding sweep of the block
// before it, interleaved: the square roots and divisions of the one run on the divider while
// the table look-ups of the other run on the vector units. Returns the block's maxima.
template <bool kNesterov, bool kMasked, bool kEncode, bool kFloat>
void Sweeps(const Params& s, const MapV& mm, const MapV& vm, const Leaf& x, int64_t b,
            float* M, float* V, const Swept& before, float* m_scale, float* v_scale) {
  const int64_t start = b * x.block, count = std::min(x.block, x.size - start);
  const __m512 sm = _mm512_set1_ps(x.ms_in[b]), sv = _mm512_set1_ps(x.vs_in[b]);
  __m512i m_max = _mm512_setzero_si512(), v_max = _mm512_setzero_si512();
  Prefetch(x, start + kPrefetchAhead * x.block, x.block);
  for (int64_t i = 0; i < x.block; i += 16) {
    const int64_t left = count - i;
    const __mmask16 real = !kMasked || left >= 16 ? 0xFFFF : (left > 0 ? (1u << left) - 1 : 0);
    MomentsV<kNesterov, kMasked, kFloat>(s, mm, vm, x, start + i, i, real, sm, sv, M, V, m_max,
                                         v_max);
    if constexpr (kEncode) EncodeV<kFloat>(mm, vm, x, before, i);
  }
  *m_scale = MaxOf(m_max);
  *v_scale = MaxOf(v_max);
}

template <bool kNesterov, bool kEncode, bool kFloat>
void Sweeps(const Params& s, const MapV& mm, const MapV& vm, const Leaf& x, int64_t b,
            float* M, float* V, const Swept& before, float* m_scale, float* v_scale) {
  if (x.size - b * x.block >= x.block) {
    Sweeps<kNesterov, false, kEncode, kFloat>(s, mm, vm, x, b, M, V, before, m_scale, v_scale);
  } else {
    Sweeps<kNesterov, true, kEncode, kFloat>(s, mm, vm, x, b, M, V, before, m_scale, v_scale);
  }
}

// Blocks [lo, hi) of a leaf, each encoded while the next one's moments are computed. A block
// with a non-finite m or v (rare) is encoded by the scalar code, where the saturation policy
// is written.
template <bool kNesterov, bool kFloat>
void BlocksVector(const Params& s, const MapV& mm, const MapV& vm, const Map& m_map,
                  const Map& v_map, const Leaf& x, int64_t lo, int64_t hi) {
  alignas(64) float buffers[2][2][kMaxBlock];
  Swept before{};
  bool pending = false;
  for (int64_t b = lo; b < hi; ++b) {
    float* M = buffers[b & 1][0];
    float* V = buffers[b & 1][1];
    float m_max, v_max;
    if (pending) {
      Sweeps<kNesterov, true, kFloat>(s, mm, vm, x, b, M, V, before, &m_max, &v_max);
    } else {
      Sweeps<kNesterov, false, kFloat>(s, mm, vm, x, b, M, V, before, &m_max, &v_max);
    }
    pending = m_max <= FLT_MAX && v_max <= FLT_MAX;
    if (!pending) [[unlikely]] {  // M and V hold the block's moments (with `updates`, g is gone)
      EncodeScalar<kFloat>(m_map, v_map, x, b, M, V);
      continue;
    }
    const float m_scale = m_max, v_scale = std::sqrt(v_max);
    x.ms[b] = m_scale;  // this block's old scales are read: the sweep has begun
    x.vs[b] = v_scale;
    before = {M, V, b * x.block, _mm512_set1_ps(m_scale > 0 ? 1.0f / m_scale : 0.0f),
              _mm512_set1_ps(v_scale > 0 ? 1.0f / v_scale : 0.0f)};
  }
  if (pending) {
    for (int64_t i = 0; i < x.block; i += 16) EncodeV<kFloat>(mm, vm, x, before, i);
  }
}
