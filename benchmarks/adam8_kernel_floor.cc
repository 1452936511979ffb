// What one core spends per element in the 8-bit kernel's block loop, without JAX or threads.
//
//   python -c "from functional_adam.kernels.adam8_cpu import codec_constants as c; \
//              c().tofile('/tmp/adam8_consts.bin')"
//   g++ -O3 -march=native -ffp-contract=fast -fno-math-errno -std=c++20 -w \
//       -I$(python -c "import jax; print(jax.ffi.include_dir())") \
//       benchmarks/adam8_kernel_floor.cc -o /tmp/adam8_floor && /tmp/adam8_floor
//
// Runs the kernel's own block loop (functional_adam/kernels/adam8_cpu.cc, Adam without
// NAdam or decay, blocks of 256; the dynamic map's codes, then float codes) on 32K elements that stay in cache (the arithmetic) and on
// 4M elements (arithmetic and DRAM), and the float32 kernel's loop (adam_cpu.cc) likewise.
// Best of 15 runs, ns per element. AVX-512 code where the compiler targets it.
#include "../functional_adam/kernels/adam8_cpu.cc"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <type_traits>

namespace float32_kernel {
#include "../functional_adam/kernels/adam_cpu.cc"
}

namespace {

double Best(auto f) {
  double best = 1e9;
  for (int r = 0; r < 15; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

void Run(int64_t n) {
  constexpr int64_t kBlock = 256;
  const int64_t blocks = n / kBlock;
  std::vector<float> consts(2 * kMapSize);
  std::ifstream("/tmp/adam8_consts.bin", std::ios::binary)
      .read(reinterpret_cast<char*>(consts.data()), consts.size() * sizeof(float));
  std::vector<float> p(n), g(n), m(n), v(n), ms(blocks, 0.01f), vs(blocks, 0.01f);
  std::vector<int8_t> mc(n);
  std::vector<uint8_t> vc(n);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = normal(rng), g[i] = 0.01f * normal(rng), m[i] = 0.1f * normal(rng), v[i] = 0.01f;
    mc[i] = static_cast<int8_t>(rng()), vc[i] = static_cast<uint8_t>(rng());
  }
  const float s32[11] = {0.9f, 0.1f, 0.999f, 0.001f, 1e-8f, 0.f, 10.f, 1000.f, 5.26f, -1e-3f, 0.f};
  const Params s = ReadParams(s32);
  const Map mm = ReadMap(consts.data()), vm = ReadMap(consts.data() + kMapSize);
  const Leaf x{p.data(), g.data(), mc.data(), ms.data(), vc.data(), vs.data(), p.data(),
               mc.data(), ms.data(), vc.data(), vs.data(), n, kBlock, false};
  auto eight_bit = [&](auto float_codes) {
    constexpr bool kFloat = decltype(float_codes)::value;
    return Best([&] {
#ifdef FA_AVX512
      const MapV mv = Vectors(mm, true), vv = Vectors(vm, false);
      BlocksVector<false, kFloat>(s, mv, vv, mm, vm, x, 0, blocks);
#else
      for (int64_t b = 0; b < blocks; ++b) BlockScalar<false, kFloat>(s, mm, vm, x, b);
#endif
    });
  };
  const double eight = eight_bit(std::false_type{}), eight_float = eight_bit(std::true_type{});
  const float32_kernel::Leaf<float> y{p.data(), g.data(), m.data(), v.data(),
                                      p.data(), m.data(), v.data(), false};
  const double f32 = Best([&] { float32_kernel::StepRange<float, false, false>(s32, y, 0, n); });
  std::printf(
      "%9ld elements: 8-bit %.3f ns/element (%.2fx), 8-bit float codes %.3f (%.2fx), "
      "float32 %.3f\n",
      static_cast<long>(n), eight / n * 1e9, eight / f32, eight_float / n * 1e9,
      eight_float / f32, f32 / n * 1e9);
}

}  // namespace

int main() {
#ifndef FA_AVX512
  std::printf("(no AVX-512: the 8-bit kernel's scalar code)\n");
#endif
  Run(1 << 15);
  Run(1 << 22);
}
