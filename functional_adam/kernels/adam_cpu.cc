// One fused Adam(W) step over any number of leaves, for XLA:CPU through jax.ffi.
//
// For each leaf (p, g, m, v) and each element, in one pass that reads p, g, m, v
// once and writes p, m, v once (28 bytes per float32 parameter):
//
//   m = (1 - b1) g + b1 m              v = (1 - b2) g² + b2 v
//   m̂ = m · (1 / bc1)   (NAdam: b1 (m · (1 / bc1_next)) + (1 - b1) (g · (1 / bc1)))
//   u = m̂ / (sqrt(v · (1 / bc2) + eps_root) + eps)
//   u = u + wd p                        (AdamW, on leaves whose decay flag is set)
//   p = p + (-lr) u
//
// The operations and their order are those of functional_adam.adam_leaf,
// add_decayed_weights, scale_by_learning_rate and apply_updates, so the result
// equals the XLA path's to the last bit or two (XLA turns a division by a scalar
// into a multiplication by its reciprocal, and so does this kernel; where XLA
// merges two divisions instead, the last bit can differ). The reciprocals of the
// bias corrections and the learning rate are computed in JAX and arrive in
// `scalars`. p, m, v are updated in place: the Python side aliases each of them
// to its result. Work is split in chunks over all leaves together and shared
// with XLA's intra-op thread pool; within a chunk, blocks prefetch ahead.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Order of the entries of the `scalars` operand (kept in step with SCALARS in native.py).
enum Scalar { kB1, kOneMinusB1, kB2, kOneMinusB2, kEps, kEpsRoot, kInvBc1, kInvBc2, kInvBc1Next,
              kNegLr, kWd, kNumScalars };

constexpr int64_t kChunk = 1 << 15;      // elements per unit of work
constexpr int64_t kBlock = 64;           // elements per prefetch block
constexpr int64_t kPrefetchAhead = 512;  // elements

template <typename T>
struct Leaf {
  const T* p_in;
  const T* g;
  const T* m_in;
  const T* v_in;
  T* p;
  T* m;
  T* v;
  bool decay;
};

template <typename T, bool kNesterov, bool kDecay>
void StepRange(const T* s, const Leaf<T>& x, int64_t lo, int64_t hi) {
  const T b1 = s[kB1], omb1 = s[kOneMinusB1], b2 = s[kB2], omb2 = s[kOneMinusB2];
  const T eps = s[kEps], eps_root = s[kEpsRoot], inv_bc1 = s[kInvBc1], inv_bc2 = s[kInvBc2];
  const T inv_bc1_next = s[kInvBc1Next], neg_lr = s[kNegLr], wd = s[kWd];
  // Blocks of kBlock elements. Each block first asks for the cache lines kPrefetchAhead
  // elements on, into all cache levels, so that loads are in flight while the core
  // divides and takes square roots (measured in BENCHMARKS.md, "Update step").
  constexpr int64_t line = 64 / sizeof(T);  // elements per 64-byte cache line
  for (int64_t b = lo; b < hi; b += kBlock) {
    if (b + kPrefetchAhead < hi) {
      for (int64_t k = b + kPrefetchAhead; k < b + kPrefetchAhead + kBlock; k += line) {
        __builtin_prefetch(x.g + k, 0, 3);
        __builtin_prefetch(x.p_in + k, 1, 3);
        __builtin_prefetch(x.m_in + k, 1, 3);
        __builtin_prefetch(x.v_in + k, 1, 3);
      }
    }
    const int64_t e = std::min(b + kBlock, hi);
    // Each element is read before it is written, at the same index, so the loop
    // vectorizes even where a result is its operand's buffer (in place).
#pragma GCC ivdep
    for (int64_t i = b; i < e; ++i) {
      const T g = x.g[i];
      const T p = x.p_in[i];
      const T m = omb1 * g + b1 * x.m_in[i];
      const T v = omb2 * (g * g) + b2 * x.v_in[i];
      const T v_hat = v * inv_bc2;
      T m_hat;
      if constexpr (kNesterov) {
        m_hat = b1 * (m * inv_bc1_next) + omb1 * (g * inv_bc1);
      } else {
        m_hat = m * inv_bc1;
      }
      T u = m_hat / (std::sqrt(v_hat + eps_root) + eps);
      if constexpr (kDecay) u = u + wd * p;
      x.m[i] = m;
      x.v[i] = v;
      x.p[i] = p + neg_lr * u;
    }
  }
}

template <typename T>
void StepLeafRange(const T* s, bool nesterov, const Leaf<T>& x, int64_t lo, int64_t hi) {
  if (nesterov) {
    x.decay ? StepRange<T, true, true>(s, x, lo, hi) : StepRange<T, true, false>(s, x, lo, hi);
  } else {
    x.decay ? StepRange<T, false, true>(s, x, lo, hi) : StepRange<T, false, false>(s, x, lo, hi);
  }
}

template <typename T>
struct Work {
  std::vector<Leaf<T>> leaves;
  std::vector<int64_t> starts;  // global index of each leaf's first element, plus the total
  const T* scalars;
  bool nesterov;
  int64_t num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // Takes chunks until none is left; returns after the last chunk it took is written.
  void Run() {
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      const int64_t lo = c * kChunk, hi = std::min(lo + kChunk, starts.back());
      auto it = std::upper_bound(starts.begin(), starts.end(), lo) - 1;
      for (size_t k = it - starts.begin(); k < leaves.size() && starts[k] < hi; ++k) {
        const int64_t a = std::max(lo, starts[k]) - starts[k];
        const int64_t b = std::min(hi, starts[k + 1]) - starts[k];
        if (a < b) StepLeafRange(scalars, nesterov, leaves[k], a, b);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <ffi::DataType kDtype>
ffi::Error AdamStep(ffi::ThreadPool pool, ffi::Buffer<kDtype, 1> scalars,
                    ffi::RemainingArgs args, ffi::RemainingRets rets,
                    ffi::Span<const int64_t> decay, bool nesterov) {
  using T = ffi::NativeType<kDtype>;
  const size_t num_leaves = decay.size();
  if (scalars.element_count() != kNumScalars) {
    return ffi::Error::InvalidArgument("functional_adam adam kernel: expected " +
                                       std::to_string(kNumScalars) + " scalars");
  }
  if (args.size() != 4 * num_leaves || rets.size() != 3 * num_leaves) {
    return ffi::Error::InvalidArgument(
        "functional_adam adam kernel: expected 4 operands and 3 results per leaf");
  }
  auto work = std::make_shared<Work<T>>();
  work->scalars = scalars.typed_data();
  work->nesterov = nesterov;
  work->starts.push_back(0);
  for (size_t k = 0; k < num_leaves; ++k) {
    const T* in[4];
    int64_t size = -1;
    for (int j = 0; j < 4; ++j) {
      auto buffer = args.get<ffi::AnyBuffer>(4 * k + j);
      if (!buffer.has_value() || buffer->element_type() != kDtype) {
        return ffi::Error::InvalidArgument("functional_adam adam kernel: operand dtype");
      }
      if (size >= 0 && static_cast<int64_t>(buffer->element_count()) != size) {
        return ffi::Error::InvalidArgument("functional_adam adam kernel: operand sizes differ");
      }
      size = buffer->element_count();
      in[j] = static_cast<const T*>(buffer->untyped_data());
    }
    T* out[3];
    for (int j = 0; j < 3; ++j) {
      auto buffer = rets.get<ffi::AnyBuffer>(3 * k + j);
      if (!buffer.has_value() || (*buffer)->element_type() != kDtype ||
          static_cast<int64_t>((*buffer)->element_count()) != size) {
        return ffi::Error::InvalidArgument("functional_adam adam kernel: result dtype or size");
      }
      out[j] = static_cast<T*>((*buffer)->untyped_data());
    }
    work->leaves.push_back({in[0], in[1], in[2], in[3], out[0], out[1], out[2], decay[k] != 0});
    work->starts.push_back(work->starts.back() + size);
  }
  work->num_chunks = (work->starts.back() + kChunk - 1) / kChunk;
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

#define FA_BIND                                   \
  ffi::Ffi::Bind()                                \
      .Ctx<ffi::ThreadPool>()                     \
      .Arg<ffi::Buffer<DTYPE, 1>>()               \
      .RemainingArgs()                            \
      .RemainingRets()                            \
      .Attr<ffi::Span<const int64_t>>("decay")    \
      .Attr<bool>("nesterov")

#define DTYPE ffi::F32
XLA_FFI_DEFINE_HANDLER_SYMBOL(FunctionalAdamStepF32, AdamStep<ffi::F32>, FA_BIND);
#undef DTYPE
#define DTYPE ffi::F64
XLA_FFI_DEFINE_HANDLER_SYMBOL(FunctionalAdamStepF64, AdamStep<ffi::F64>, FA_BIND);
#undef DTYPE
