// One fused 8-bit Adam(W) step over any number of float32 leaves, for XLA:CPU through jax.ffi.
//
// Each leaf is θ, g and two block-quantized moments (functional_adam.storage.quantized):
// int8 codes of m and uint8 codes of sqrt(v), one float32 absmax per block. Per block, in
// two sweeps over its float32 moments kept in L1:
//
//   m̃, ṽ = decode(codes) · scale            (ṽ = (decode · scale)²)
//   m = (1 - b1) g + b1 m̃                   v = (1 - b2) g² + b2 ṽ
//   θ = θ + (-lr) (m̂ / (sqrt(v̂ + eps_root) + eps) [+ wd θ])     (as adam_cpu.cc)
//   scale = max |m| over the valid elements, sqrt(max v) likewise (valid: m and v finite)
//   codes = encode(m / scale), encode(sqrt(v) / scale)              (invalid ones saturate)
//
// The codec is functional_adam.storage.codec's rule, computed arithmetically: decode
// (k - offset[d]) · slope[d] with d from k's leading zeros; encode r = #{thresholds <= a},
// k = min(floor(fma(a, gain[r], -shift[r])), last[r]). The constants arrive in `consts`.
// With `float_codes`, the codes are functional_adam.storage.float_codes' instead (bit
// operations on the float32 of a).
// Fused multiply-adds are placed where XLA:CPU places them in the jax.numpy path, so the
// moments and the codes equal that path's; θ differs from it by an ulp or two where XLA
// divides by the bias corrections and this kernel multiplies by their reciprocals.
// Everything is updated in place (the Python side aliases each result to its operand),
// except with `updates`: then the first result of a leaf is the update -lr (...) itself
// (the form of GradientTransformation.update), written over g (each element's g is read
// just before its update is written, and never again), and θ is read only for the decay.
// Blocks are shared out in chunks over all leaves together on XLA's intra-op thread pool.
// The AVX-512 code (adam8_avx512.cc) encodes each block while it computes the next one's
// moments, so that the square roots and divisions of the one overlap the table look-ups of
// the other; a block holding a non-finite moment is finished by the scalar code here.

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512CD__)
#include <immintrin.h>
#define FA_AVX512 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Order of the entries of `scalars` (KernelScalars in adam_cpu.py).
enum Scalar { kB1, kOneMinusB1, kB2, kOneMinusB2, kEps, kEpsRoot, kInvBc1, kInvBc2, kInvBc1Next,
              kNegLr, kWd, kNumScalars };

// Layout of one map's constants in `consts` (codec_constants in adam8_cpu.py): six tables
// of 16, then two of 32 indexed by the low 5 bits of a's biased exponent (for a >= 2^-24):
// the region at the start of that binade, and the next threshold within it (or inf).
enum Table { kThresholds, kGain, kShift, kLast, kSlope, kOffset, kNumTables };
constexpr int kTableSize = 16;
constexpr int kBinades = 32;
constexpr int kMapSize = kNumTables * kTableSize + 2 * kBinades;  // signed map, then unsigned
constexpr int kRegions = 8;                        // thresholds in use (regions 0..8)
constexpr int kMaxBlock = 4096;                    // largest block kept on the stack
constexpr int64_t kBlocksPerChunk = 64;            // blocks per unit of work (or fewer if large)
constexpr int64_t kPrefetchAhead = 4;              // blocks

struct Map {
  float thresholds[kTableSize], gain[kTableSize], shift[kTableSize], slope[kTableSize],
      offset[kTableSize], next[kBinades];
  int32_t last[kTableSize], region[kBinades];
};

Map ReadMap(const float* c) {
  Map map;
  for (int i = 0; i < kTableSize; ++i) {
    map.thresholds[i] = c[kThresholds * kTableSize + i];
    map.gain[i] = c[kGain * kTableSize + i];
    map.shift[i] = c[kShift * kTableSize + i];
    map.last[i] = static_cast<int32_t>(c[kLast * kTableSize + i]);
    map.slope[i] = c[kSlope * kTableSize + i];
    map.offset[i] = c[kOffset * kTableSize + i];
  }
  for (int i = 0; i < kBinades; ++i) {
    map.region[i] = static_cast<int32_t>(c[kNumTables * kTableSize + i]);
    map.next[i] = c[kNumTables * kTableSize + kBinades + i];
  }
  return map;
}

struct Params {
  float b1, omb1, b2, omb2, eps, eps_root, inv_bc1, inv_bc2, inv_bc1_next, neg_lr, wd;
};

Params ReadParams(const float* s) {
  return {s[kB1],     s[kOneMinusB1], s[kB2],     s[kOneMinusB2], s[kEps], s[kEpsRoot],
          s[kInvBc1], s[kInvBc2],     s[kInvBc1Next], s[kNegLr],   s[kWd]};
}

struct Leaf {
  const float* p_in;
  const float* g;
  const int8_t* m_in;
  const float* ms_in;
  const uint8_t* v_in;
  const float* vs_in;
  float* p;
  int8_t* m;
  float* ms;
  uint8_t* v;
  float* vs;
  int64_t size;
  int64_t block;
  bool decay;
  bool updates;  // write the update -lr·(u [+ wd θ]) into p instead of the new θ (no alias)
};

// ---- scalar codec and step: the reference, and the path for machines without AVX-512 ----

inline float DecodeScalar(int32_t k, int32_t d, const Map& map) {
  const int i = d & 15;
  return (static_cast<float>(k) - map.offset[i]) * map.slope[i];
}

inline float DecodeSigned(int8_t code, const Map& map) {
  const int32_t c = code, k = c < 0 ? -c : c;
  const float value = DecodeScalar(k, k ? 31 - __builtin_clz(k) : -1, map);
  return (c < 0 && c != -128) ? -value : value;
}

inline float DecodeUnsigned(uint8_t code, const Map& map) {
  const int32_t k = code;
  return DecodeScalar(k, 30 - __builtin_clz(k + 1), map);
}

inline int32_t IndexScalar(float a, const Map& map) {
  int r = 0;
  for (int t = 0; t < kRegions; ++t) r += a >= map.thresholds[t];
  const float y = std::fma(a, map.gain[r], -map.shift[r]);
  return std::min(static_cast<int32_t>(std::floor(y)), map.last[r]);
}

// Float codes (functional_adam.storage.float_codes): a code is the top bits of the float32 of
// a = |x| / scale: q = clamp((bits(a) + 2^(shift-1) - (base << shift)) >> shift, 0, top),
// decoded as the float32 of (q + base) << shift (0 for q = 0).
template <bool kSigned>
struct FloatCode {
  static constexpr int32_t kBase = kSigned ? 889 : 1777, kShift = kSigned ? 20 : 19,
                           kTop = kSigned ? 127 : 255;
  static constexpr int32_t kRound = (1 << (kShift - 1)) - (kBase << kShift);
};

template <bool kSigned>
inline int32_t FloatIndex(float a) {  // a in [0, 1]
  using C = FloatCode<kSigned>;
  int32_t bits;
  std::memcpy(&bits, &a, sizeof(bits));
  return std::clamp((bits + C::kRound) >> C::kShift, 0, C::kTop);
}

template <bool kSigned>
inline float FloatValue(int32_t q) {
  using C = FloatCode<kSigned>;
  const int32_t bits = (q + C::kBase) << C::kShift;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return q > 0 ? out : 0.0f;
}

// The codec of either format (kFloat: float codes; else the dynamic map).
template <bool kFloat>
inline float DecodeSignedCode(int8_t code, const Map& map) {
  if constexpr (kFloat) {
    const int32_t c = code;
    const float value = FloatValue<true>(c < 0 ? -c : c);
    return c < 0 ? -value : value;
  }
  return DecodeSigned(code, map);
}

template <bool kFloat>
inline float DecodeUnsignedCode(uint8_t code, const Map& map) {
  if constexpr (kFloat) return FloatValue<false>(code);
  return DecodeUnsigned(code, map);
}

template <bool kFloat, bool kSigned>
inline int32_t Index(float a, const Map& map) {
  if constexpr (kFloat) return FloatIndex<kSigned>(a);
  return IndexScalar(a, map);
}

inline bool Finite(float x) { return std::isfinite(x); }

// Multiply-adds are explicit (std::fma, _mm512_fmadd_ps) wherever XLA:CPU contracts the
// same expression, so that both code paths round alike whatever the compiler contracts.

inline float Denominator(const Params& s, float v) {
  return std::sqrt(std::fma(v, s.inv_bc2, s.eps_root)) + s.eps;
}

template <bool kNesterov>
inline float MHat(const Params& s, float g, float m) {
  if constexpr (kNesterov) return std::fma(s.omb1, g * s.inv_bc1, s.b1 * (m * s.inv_bc1_next));
  return m * s.inv_bc1;
}

// The new moments of block b into M and V (the final block's padding: g = 0), and the new θ
// (or, with `updates`, the update) of the block's elements.
template <bool kNesterov, bool kFloat>
void MomentsScalar(const Params& s, const Map& mm, const Map& vm, const Leaf& x, int64_t b,
                   float* M, float* V) {
  const int64_t start = b * x.block, count = std::min(x.block, x.size - start);
  const float sm = x.ms_in[b], sv = x.vs_in[b];
  for (int64_t i = 0; i < x.block; ++i) {
    const float g = i < count ? x.g[start + i] : 0.0f;
    const float md = DecodeSignedCode<kFloat>(x.m_in[start + i], mm) * sm;
    const float t = DecodeUnsignedCode<kFloat>(x.v_in[start + i], vm) * sv;
    const float m = std::fma(s.omb1, g, s.b1 * md);
    const float v = std::fma(s.omb2, g * g, s.b2 * (t * t));
    M[i] = m;
    V[i] = v;
    if (i < count) {
      const float p = x.decay || !x.updates ? x.p_in[start + i] : 0.0f;
      float u = MHat<kNesterov>(s, g, m) / Denominator(s, v);
      if (x.decay) u = std::fma(s.wd, p, u);
      x.p[start + i] = x.updates ? s.neg_lr * u : std::fma(s.neg_lr, u, p);
    }
  }
}

// The scales (absolute maxima of the valid m and sqrt(v)) and codes of block b from its new
// moments (valid: m and v finite; invalid ones saturate).
template <bool kFloat>
void EncodeScalar(const Map& mm, const Map& vm, const Leaf& x, int64_t b, const float* M,
                  const float* V) {
  const int64_t start = b * x.block;
  float m_max = 0.0f, v_max = 0.0f;
  for (int64_t i = 0; i < x.block; ++i) {
    if (Finite(M[i]) && Finite(V[i])) {
      m_max = std::max(m_max, std::fabs(M[i]));
      v_max = std::max(v_max, V[i]);
    }
  }
  const float m_scale = m_max, v_scale = std::sqrt(v_max);
  const float m_inv = m_scale > 0 ? 1.0f / m_scale : 0.0f;
  const float v_inv = v_scale > 0 ? 1.0f / v_scale : 0.0f;
  // The signed map holds +1 but not -1; float codes are symmetric.
  const int32_t top = kFloat ? FloatCode<true>::kTop : mm.last[kRegions] - 1;
  for (int64_t i = 0; i < x.block; ++i) {
    const float m = M[i], v = V[i], root = std::sqrt(v);
    const bool valid = Finite(m) && Finite(v);
    const float am = valid ? std::fabs(m) * m_inv : (std::isnan(m) ? 0.0f : 1.0f);
    const float av = valid ? root * v_inv : 1.0f;
    const int32_t km = Index<kFloat, true>(am, mm);
    int32_t kv = Index<kFloat, false>(av, vm);
    if (root > 0 && kv == 0) kv = 1;  // a positive v never gets the zero code
    x.m[start + i] = static_cast<int8_t>(m < 0 ? -std::min(km, top) : km);
    x.v[start + i] = static_cast<uint8_t>(kv);
  }
  x.ms[b] = m_scale;
  x.vs[b] = v_scale;
}

template <bool kNesterov, bool kFloat>
void BlockScalar(const Params& s, const Map& mm, const Map& vm, const Leaf& x, int64_t b) {
  float M[kMaxBlock], V[kMaxBlock];
  MomentsScalar<kNesterov, kFloat>(s, mm, vm, x, b, M, V);
  EncodeScalar<kFloat>(mm, vm, x, b, M, V);
}

// Asks for the cache lines of the elements [at, at + n) of a leaf (those that exist), so
// that loads are in flight while the core works on the blocks before them.
inline void Prefetch(const Leaf& x, int64_t at, int64_t n) {
  const int64_t end = std::min(at + n, x.size);
  for (int64_t k = at; k < end; k += 16) {
    __builtin_prefetch(x.g + k, 0, 3);
    if (x.decay || !x.updates) __builtin_prefetch(x.p_in + k, 1, 3);
  }
  for (int64_t k = at; k < end; k += 64) {
    __builtin_prefetch(x.m_in + k, 1, 3);
    __builtin_prefetch(x.v_in + k, 1, 3);
  }
}

#ifdef FA_AVX512
#include "adam8_avx512.cc"  // NOLINT: inside the namespace
#endif  // FA_AVX512

struct Work {
  std::vector<Leaf> leaves;
  std::vector<int64_t> starts;  // global index of each leaf's first block, plus the total
  Params params;
  Map m_map, v_map;
  bool nesterov, simd, float_codes;
  int64_t chunk_blocks, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  template <bool kNesterov, bool kFloat>
  void Blocks(const Leaf& x, int64_t lo, int64_t hi) {
#ifdef FA_AVX512
    if (simd && x.block % 16 == 0) {
      const MapV mm = Vectors(m_map, true), vm = Vectors(v_map, false);
      BlocksVector<kNesterov, kFloat>(params, mm, vm, m_map, v_map, x, lo, hi);
      return;
    }
#endif
    for (int64_t b = lo; b < hi; ++b) {
      BlockScalar<kNesterov, kFloat>(params, m_map, v_map, x, b);
    }
  }

  void Blocks(const Leaf& x, int64_t lo, int64_t hi) {
    if (float_codes) {
      nesterov ? Blocks<true, true>(x, lo, hi) : Blocks<false, true>(x, lo, hi);
    } else {
      nesterov ? Blocks<true, false>(x, lo, hi) : Blocks<false, false>(x, lo, hi);
    }
  }

  // Takes chunks until none is left; returns after the last chunk it took is written.
  void Run() {
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      const int64_t lo = c * chunk_blocks, hi = std::min(lo + chunk_blocks, starts.back());
      auto it = std::upper_bound(starts.begin(), starts.end(), lo) - 1;
      for (size_t k = it - starts.begin(); k < leaves.size() && starts[k] < hi; ++k) {
        const int64_t a = std::max(lo, starts[k]) - starts[k];
        const int64_t b = std::min(hi, starts[k + 1]) - starts[k];
        if (a >= b) continue;
        Blocks(leaves[k], a, b);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("functional_adam 8-bit adam kernel: " + what);
}

// Checks one leaf's operands (θ, g, m codes, m scales, v codes, v scales) and results.
ffi::Error ReadLeaf(ffi::RemainingArgs& args, ffi::RemainingRets& rets, size_t k, bool decay,
                    bool updates, Leaf* leaf) {
  constexpr ffi::DataType kTypes[6] = {ffi::F32, ffi::F32, ffi::S8, ffi::F32, ffi::U8, ffi::F32};
  void* in[6];
  int64_t count[6];
  for (int j = 0; j < 6; ++j) {
    auto buffer = args.get<ffi::AnyBuffer>(6 * k + j);
    if (!buffer.has_value() || buffer->element_type() != kTypes[j]) return Invalid("operand dtype");
    in[j] = buffer->untyped_data();
    count[j] = static_cast<int64_t>(buffer->element_count());
  }
  constexpr int kOut[5] = {0, 2, 3, 4, 5};  // results: θ, m codes, m scales, v codes, v scales
  void* out[5];
  for (int j = 0; j < 5; ++j) {
    auto buffer = rets.get<ffi::AnyBuffer>(5 * k + j);
    if (!buffer.has_value() || (*buffer)->element_type() != kTypes[kOut[j]] ||
        static_cast<int64_t>((*buffer)->element_count()) != count[kOut[j]]) {
      return Invalid("result dtype or size");
    }
    out[j] = (*buffer)->untyped_data();
  }
  const int64_t blocks = count[3];
  const int64_t block = blocks ? count[2] / blocks : 1;
  if (count[1] != count[0] || count[4] != count[2] || count[5] != blocks ||
      block * blocks != count[2] || block > kMaxBlock || count[0] > block * blocks ||
      count[0] <= block * (blocks - 1)) {
    return Invalid("operand sizes do not match one leaf's blocks (block size <= 4096)");
  }
  *leaf = {static_cast<const float*>(in[0]),   static_cast<const float*>(in[1]),
           static_cast<const int8_t*>(in[2]),  static_cast<const float*>(in[3]),
           static_cast<const uint8_t*>(in[4]), static_cast<const float*>(in[5]),
           static_cast<float*>(out[0]),        static_cast<int8_t*>(out[1]),
           static_cast<float*>(out[2]),        static_cast<uint8_t*>(out[3]),
           static_cast<float*>(out[4]),        count[0],
           block,                              decay,
           updates};
  return ffi::Error::Success();
}

ffi::Error Adam8Step(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 1> scalars,
                     ffi::Buffer<ffi::F32, 1> consts, ffi::RemainingArgs args,
                     ffi::RemainingRets rets, ffi::Span<const int64_t> decay, bool nesterov,
                     bool simd, bool updates, bool float_codes) {
  const size_t num_leaves = decay.size();
  if (scalars.element_count() != kNumScalars) return Invalid("expected 11 scalars");
  if (consts.element_count() != 2 * kMapSize) return Invalid("expected 320 codec constants");
  if (args.size() != 6 * num_leaves || rets.size() != 5 * num_leaves) {
    return Invalid("expected 6 operands and 5 results per leaf");
  }
  auto work = std::make_shared<Work>();
  work->params = ReadParams(scalars.typed_data());
  work->m_map = ReadMap(consts.typed_data());
  work->v_map = ReadMap(consts.typed_data() + kMapSize);
  work->nesterov = nesterov;
  work->simd = simd;
  work->float_codes = float_codes;
  work->starts.push_back(0);
  int64_t largest = 1;
  for (size_t k = 0; k < num_leaves; ++k) {
    Leaf leaf;
    ffi::Error error = ReadLeaf(args, rets, k, decay[k] != 0, updates, &leaf);
    if (error.failure()) return error;
    work->leaves.push_back(leaf);
    work->starts.push_back(work->starts.back() + (leaf.block ? (leaf.size + leaf.block - 1) / leaf.block : 0));
    largest = std::max(largest, leaf.block);
  }
  work->chunk_blocks = std::max<int64_t>(1, kBlocksPerChunk * 256 / largest);
  work->num_chunks = (work->starts.back() + work->chunk_blocks - 1) / work->chunk_blocks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, work->num_chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([work] { work->Run(); });  // a helper that starts late finds no chunk left
  }
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->num_chunks) {
    std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

#define FA8_BIND                                  \
  ffi::Ffi::Bind()                                \
      .Ctx<ffi::ThreadPool>()                     \
      .Arg<ffi::Buffer<ffi::F32, 1>>()            \
      .Arg<ffi::Buffer<ffi::F32, 1>>()            \
      .RemainingArgs()                            \
      .RemainingRets()                            \
      .Attr<ffi::Span<const int64_t>>("decay")    \
      .Attr<bool>("nesterov")                     \
      .Attr<bool>("simd")                         \
      .Attr<bool>("updates")                      \
      .Attr<bool>("float_codes")

XLA_FFI_DEFINE_HANDLER_SYMBOL(FunctionalAdam8bitStepF32, Adam8Step, FA8_BIND);

// Whether this build has the AVX-512 code (without it the kernel runs its scalar reference
// code, slower than XLA's own loops, so the Python side does not dispatch to it).
extern "C" int FunctionalAdam8bitSimd() {
#ifdef FA_AVX512
  return 1;
#else
  return 0;
#endif
}
