// What bounds the fused CPU Adam step on this machine, measured without JAX.
//
//   g++ -O3 -march=native -ffp-contract=fast -fno-math-errno -std=c++20 -pthread \
//       benchmarks/cpu_floors.cc -o /tmp/cpu_floors && /tmp/cpu_floors
//
// 1. arithmetic: the kernel's loop (functional_adam/kernels/adam_cpu.cc, Adam without
//    NAdam or decay) on 4,096 elements that stay in L1/L2, one core: its cost per element
//    with no DRAM traffic;
// 2. memory: the step's access pattern (read p, g, m, v; write p, m, v: 28 B/element) with
//    one add per array instead of Adam, 1e7 elements on two threads; beside it the in-place
//    a += b (12 B/element) that benchmarks/update_step.py takes as the streaming limit.
// Best of 20 runs each.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <typename F>
double BestOnTwoThreads(F f, int64_t n) {
  double best = 1e9;
  for (int r = 0; r < 20; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    std::thread helper(f, 0, n / 2);
    f(n / 2, n);
    helper.join();
    best = std::min(best, Seconds(t0));
  }
  return best;
}

double ArithmeticNsPerElement() {
  const int64_t n = 4096;
  const int reps = 50000;
  std::vector<float> p(n, 1.0f), g(n, 0.5f), m(n, 0.1f), v(n, 0.2f);
  const float b1 = 0.9f, omb1 = 0.1f, b2 = 0.999f, omb2 = 0.001f, eps = 1e-8f;
  const float eps_root = 0.0f, inv_bc1 = 10.0f, inv_bc2 = 1000.0f, neg_lr = -1e-9f;
  double best = 1e9;
  for (int trial = 0; trial < 20; ++trial) {
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) {
      float* P = p.data();
      float* M = m.data();
      float* V = v.data();
      const float* G = g.data();
#pragma GCC ivdep
      for (int64_t i = 0; i < n; ++i) {
        const float gi = G[i], pi = P[i];
        const float mi = omb1 * gi + b1 * M[i];
        const float vi = omb2 * (gi * gi) + b2 * V[i];
        const float u = (mi * inv_bc1) / (std::sqrt(vi * inv_bc2 + eps_root) + eps);
        M[i] = mi;
        V[i] = vi;
        P[i] = pi + neg_lr * u;
      }
    }
    best = std::min(best, Seconds(t0) / reps / n * 1e9);
  }
  return best;
}

}  // namespace

int main() {
  const double arithmetic = ArithmeticNsPerElement();
  const int64_t n = 10000000;
  std::vector<float> p(n, 1), g(n, 1), m(n, 1), v(n, 1), a(n, 1), b(n, 1);
  auto adam_pattern = [&](int64_t lo, int64_t hi) {
    float *P = p.data(), *M = m.data(), *V = v.data();
    const float* G = g.data();
#pragma GCC ivdep
    for (int64_t i = lo; i < hi; ++i) {
      const float x = G[i];
      M[i] += x;
      V[i] += x;
      P[i] += x;
    }
  };
  auto add = [&](int64_t lo, int64_t hi) {
    float* A = a.data();
    const float* B = b.data();
#pragma GCC ivdep
    for (int64_t i = lo; i < hi; ++i) A[i] += B[i];
  };
  const double pattern = BestOnTwoThreads(adam_pattern, n) / n * 1e9;
  const double streaming = BestOnTwoThreads(add, n) / n * 1e9;
  std::printf("arithmetic, in cache, one core: %.3f ns/element (two cores: %.3f)\n", arithmetic,
              arithmetic / 2);
  std::printf("memory, Adam's 28 B pattern, two threads: %.3f ns/element = %.1f GB/s\n", pattern,
              28 / pattern);
  std::printf("memory, a += b, two threads: %.3f ns/element = %.1f GB/s; 28 B at that: %.3f ns\n",
              streaming, 12 / streaming, 28 / (12 / streaming));
  std::printf("(p[0] %g, a[0] %g)\n", p[0], a[0]);
}
