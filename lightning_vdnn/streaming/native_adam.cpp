// One pass of Adam(W) over host memory: per element it reads the fp32 master weight, the gradient (fp32 or bf16)
// and the two moments (fp32 or bf16), and writes the weight, the moments and, if asked, a bf16 or fp32 copy of the
// new weight (what the device loads next). See native_adam.py for the Python side, which checks every tensor.
//
// The arithmetic mirrors torch's fused CPU Adam (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, fp32 path) in
// operation order, so that fp32 states give torch.optim.AdamW(fused=True)'s bits: scalars in double cast to float,
// and a fused multiply-add exactly where torch's build has one (exp_avg's lerp, by intrinsic; exp_avg_sq's sum and
// Adam's weight decay, contracted by its compiler: found by comparing bits); built with -ffp-contract=off so that
// the compiler fuses nothing else, and -fno-math-errno so that sqrt has no errno branch to keep the loop scalar. bf16 moments are widened on load, updated in fp32 and rounded to nearest even
// on store; the weight update uses the fp32 values, as a widened torch pass does.
//
// Pointers, not tensors: the module includes no torch header, so it builds in seconds and owns no libtorch ABI.
// The GIL is released for the whole call: it runs on the host optimizer's worker beside the thread driving the GPU.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

enum Kind : int { kNone = -1, kFloat = 0, kBFloat16 = 1 };

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  return __builtin_bit_cast(float, uint32_t(p[i]) << 16);
}
inline void store(float* p, int64_t i, float f) { p[i] = f; }
inline void store(uint16_t* p, int64_t i, float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p[i] = uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);  // NaN stays a (quiet) NaN
}

struct Scalars {  // float constants derived in double exactly as torch's kernel derives them
  float neg_step_size, decay, weight_decay, lerp_coeff, lerp_small, beta2, sq_coeff, bc2_sqrt, eps;
  bool small, has_decay, decoupled;
};

Scalars scalars(double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled, double step) {
  Scalars s;
  double bias_correction1 = 1 - std::pow(beta1, step);
  double bias_correction2 = 1 - std::pow(beta2, step);
  double step_size = lr / bias_correction1;
  double lerp_weight = 1 - beta1;
  s.neg_step_size = float(-step_size);
  s.decay = float(1 - lr * weight_decay);
  s.weight_decay = float(weight_decay);
  s.small = std::abs(float(lerp_weight)) < 0.5f;
  s.lerp_coeff = s.small ? float(lerp_weight) : float(lerp_weight) - 1.0f;
  s.beta2 = float(beta2);
  s.sq_coeff = float(1 - beta2);
  s.bc2_sqrt = float(std::sqrt(bias_correction2));
  s.eps = float(eps);
  s.has_decay = weight_decay != 0.f;
  s.decoupled = decoupled;
  return s;
}

enum Decay : int { kNoDecay = 0, kDecoupled = 1, kL2 = 2 };

// The arithmetic on fp32 arrays only: every choice a template argument and no conversion in the loop, which
// keeps it vectorized (GCC leaves loops that mix bf16 and fp32 scalar).
template <int kDecay>
void update(float* __restrict w, const float* __restrict g, float* __restrict m, float* __restrict v, int64_t len,
            const Scalars& s) {
  const float decay = s.decay, weight_decay = s.weight_decay, lerp_coeff = s.lerp_coeff, beta2 = s.beta2;
  const float sq_coeff = s.sq_coeff, bc2_sqrt = s.bc2_sqrt, eps = s.eps, neg_step_size = s.neg_step_size;
  const bool small = s.small;
  for (int64_t i = 0; i < len; ++i) {
    float grad = g[i];
    float param = w[i];
    if constexpr (kDecay == kDecoupled) param = param * decay;
    if constexpr (kDecay == kL2) grad = std::fma(param, weight_decay, grad);
    float avg = m[i];
    float base = small ? avg : grad;  // exp_avg.lerp_(grad, 1 - beta1), torch's two-branch form
    avg = std::fma(lerp_coeff, grad - avg, base);
    float sq = std::fma(sq_coeff * grad, grad, v[i] * beta2);
    m[i] = avg;
    v[i] = sq;
    float denom = std::sqrt(sq) / bc2_sqrt + eps;
    w[i] = param + neg_step_size * avg / denom;
  }
}

constexpr int64_t kTile = 1024;  // elements widened at a time: three fp32 tiles stay in L1

inline float* widen(float* p, float*, int64_t) { return p; }
inline const float* widen(const float* p, float*, int64_t) { return p; }
inline float* widen(const uint16_t* p, float* tile, int64_t len) {
  for (int64_t i = 0; i < len; ++i) tile[i] = load(p, i);
  return tile;
}
inline void narrow(const float*, float*, int64_t) {}  // fp32 moments were updated in place
inline void narrow(const float* tile, uint16_t* p, int64_t len) {
  for (int64_t i = 0; i < len; ++i) store(p, i, tile[i]);
}

// The compute-dtype copy is only written, and read next by the device's copy engine: streaming stores keep the
// CPU from first reading each of its cache lines from memory (2 bytes a parameter less host traffic) and from
// evicting the weights and moments still being updated.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
#if defined(__SSE2__)
  int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + 16 <= bytes; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
  std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(d, s, bytes);
#endif
}

#if defined(__AVX512F__)
// bf16 moments with 512-bit vectors: each element is widened, updated and rounded in registers, with the same
// IEEE operations in the same order as update() (and the same rounding as store()), so the same bits; the tile path
// would write every widened value to L1 and read it back, half again the work of the fp32 pass.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m256i round16(__m512 f) {  // store()'s round to nearest even, NaN to 0x7FC0, sixteen at a time
  __m512i u = _mm512_castps_si512(f);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                          _mm512_set1_epi32(0x7F800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0)));
}
inline void store16(uint16_t* p, __m512 f) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round16(f)); }

// The whole vectors of a tile: returns how many elements it did (a multiple of 16); ``o``, if set, gets the new
// weights rounded to bf16.
template <typename G, int kDecay>
int64_t update_bf16_moments(float* w, const G* g, uint16_t* m, uint16_t* v, uint16_t* o, int64_t len,
                            const Scalars& s) {
  const __m512 decay = _mm512_set1_ps(s.decay), weight_decay = _mm512_set1_ps(s.weight_decay);
  const __m512 lerp_coeff = _mm512_set1_ps(s.lerp_coeff), beta2 = _mm512_set1_ps(s.beta2);
  const __m512 sq_coeff = _mm512_set1_ps(s.sq_coeff), bc2_sqrt = _mm512_set1_ps(s.bc2_sqrt);
  const __m512 eps = _mm512_set1_ps(s.eps), neg_step_size = _mm512_set1_ps(s.neg_step_size);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m512 grad = load16(g + i), param = _mm512_loadu_ps(w + i);
    if constexpr (kDecay == kDecoupled) param = _mm512_mul_ps(param, decay);
    if constexpr (kDecay == kL2) grad = _mm512_fmadd_ps(param, weight_decay, grad);
    __m512 avg = load16(m + i);
    __m512 base = s.small ? avg : grad;
    avg = _mm512_fmadd_ps(lerp_coeff, _mm512_sub_ps(grad, avg), base);
    __m512 sq = _mm512_fmadd_ps(_mm512_mul_ps(sq_coeff, grad), grad, _mm512_mul_ps(load16(v + i), beta2));
    store16(m + i, avg);
    store16(v + i, sq);
    __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(sq), bc2_sqrt), eps);
    __m512 updated = _mm512_add_ps(param, _mm512_div_ps(_mm512_mul_ps(neg_step_size, avg), denom));
    _mm512_storeu_ps(w + i, updated);
    if (o != nullptr) store16(o + i, updated);
  }
  return i;
}
#endif

// One thread's range, a tile at a time: bf16 tensors are widened into fp32 tiles, updated, and rounded back
// while the tile is in cache, so host memory is still read and written once (bf16 moments on AVX-512: in registers,
// the tile path only for a tensor's last few elements).
template <typename G, typename S, typename O, int kDecay, bool kOut>
void run(float* w, const G* g, S* m, S* v, O* out, int64_t begin, int64_t end, const Scalars& s) {
  alignas(64) float g_tile[kTile], m_tile[kTile], v_tile[kTile];
  alignas(64) uint16_t o_tile[kTile];
  constexpr bool kBf16Out = kOut && !std::is_same_v<O, float>;
  for (int64_t a = begin; a < end; a += kTile) {
    int64_t len = std::min(kTile, end - a), done = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<S, uint16_t>) {
      done = update_bf16_moments<G, kDecay>(w + a, g + a, m + a, v + a, kBf16Out ? o_tile : nullptr, len, s);
    }
#endif
    if (done < len) {
      const int64_t b = a + done, rest = len - done;
      float* mt = widen(m + b, m_tile, rest);
      float* vt = widen(v + b, v_tile, rest);
      update<kDecay>(w + b, widen(g + b, g_tile, rest), mt, vt, rest, s);
      narrow(mt, m + b, rest);
      narrow(vt, v + b, rest);
      if constexpr (kBf16Out) narrow(w + b, o_tile + done, rest);
    }
    if constexpr (kOut) {
      if constexpr (std::is_same_v<O, float>) {
        stream_copy(out + a, w + a, len * sizeof(float));
      } else {
        stream_copy(out + a, o_tile, len * sizeof(uint16_t));
      }
    }
  }
#if defined(__SSE2__)
  if constexpr (kOut) _mm_sfence();  // the streamed stores visible before the caller reports the update done
#endif
}

template <typename G, typename S, typename O, bool kOut>
void run_range(float* w, const G* g, S* m, S* v, O* out, int64_t begin, int64_t end, const Scalars& s) {
  if (!s.has_decay) {
    run<G, S, O, kNoDecay, kOut>(w, g, m, v, out, begin, end, s);
  } else if (s.decoupled) {
    run<G, S, O, kDecoupled, kOut>(w, g, m, v, out, begin, end, s);
  } else {
    run<G, S, O, kL2, kOut>(w, g, m, v, out, begin, end, s);
  }
}

// One tensor's part of a pass: its addresses, its scalars, and the kernel for its dtypes.
struct Part {
  uintptr_t w, g, m, v, out;
  int64_t n;
  Scalars s;
  void (*range)(const Part&, int64_t, int64_t);
};

template <typename G, typename S, typename O>
void range_of(const Part& p, int64_t begin, int64_t end) {
  auto* w = reinterpret_cast<float*>(p.w);
  auto* g = reinterpret_cast<const G*>(p.g);
  auto* m = reinterpret_cast<S*>(p.m);
  auto* v = reinterpret_cast<S*>(p.v);
  auto* out = reinterpret_cast<O*>(p.out);
  if (out != nullptr) {
    run_range<G, S, O, true>(w, g, m, v, out, begin, end, p.s);
  } else {
    run_range<G, S, O, false>(w, g, m, v, out, begin, end, p.s);
  }
}

template <typename G, typename S>
auto range_for_out(int out_kind) {  // kFloat, or kNone with out == 0 (a null pointer of either type)
  return out_kind == kBFloat16 ? &range_of<G, S, uint16_t> : &range_of<G, S, float>;
}

Part part(uintptr_t w, uintptr_t g, uintptr_t m, uintptr_t v, uintptr_t out, int64_t n, int grad_kind,
          int state_kind, int out_kind, const Scalars& s) {
  Part p{w, g, m, v, out_kind == kNone ? 0 : out, n, s, nullptr};
  if (grad_kind == kFloat && state_kind == kFloat) {
    p.range = range_for_out<float, float>(out_kind);
  } else if (grad_kind == kFloat) {
    p.range = range_for_out<float, uint16_t>(out_kind);
  } else if (state_kind == kFloat) {
    p.range = range_for_out<uint16_t, float>(out_kind);
  } else {
    p.range = range_for_out<uint16_t, uint16_t>(out_kind);
  }
  return p;
}

// Every part's pieces in one parallel loop, handed out as threads come free, not one fixed range per thread: the
// update runs beside the thread driving the GPU and the copy engines' memory traffic, and one thread descheduled
// for a while would otherwise hold every other thread at the end of the pass. One loop for a whole block, not one
// per tensor: one wait for the slowest thread, and one return to Python, whose lock the worker must win back
// from the thread driving the GPU. A piece (native_adam.py's PIECE) is whole cache lines for every dtype here.
void run_parts(const std::vector<Part>& parts, int threads, int64_t piece) {
  std::vector<std::pair<int64_t, int64_t>> pieces;  // (part, first element)
  for (int64_t i = 0; i < int64_t(parts.size()); ++i) {
    for (int64_t a = 0; a < parts[i].n; a += piece) pieces.emplace_back(i, a);
  }
  const int64_t count = int64_t(pieces.size());
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t k = 0; k < count; ++k) {
    const Part& p = parts[pieces[k].first];
    const int64_t begin = pieces[k].second;
    p.range(p, begin, std::min(p.n, begin + piece));
  }
}

// Several tensors' steps in one pass (or one tensor's: native_adam.step). Per tensor: addresses and n; kinds (grad,
// state, out); hyper (lr, beta1, beta2, eps, weight_decay, decoupled); and the address of its float32 step count,
// incremented here, as torch's Adam increments state["step"] before its update (a float32 add of 1: the same bits).
// Returns the pass's own wall time in seconds, timed without the GIL: the caller's clock also counts winning the GIL
// back from the thread driving the GPU, and the difference tells the two costs apart.
double adam_step_many(const std::vector<uintptr_t>& w, const std::vector<uintptr_t>& g, const std::vector<uintptr_t>& m,
                    const std::vector<uintptr_t>& v, const std::vector<uintptr_t>& out, const std::vector<int64_t>& n,
                    const std::vector<int>& kinds, const std::vector<double>& hyper,
                    const std::vector<uintptr_t>& steps, int threads, int64_t piece) {
  std::vector<Part> parts;
  parts.reserve(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    float* count = reinterpret_cast<float*>(steps[i]);
    *count += 1.0f;
    const double* h = &hyper[6 * i];
    Scalars s = scalars(h[0], h[1], h[2], h[3], h[4], h[5] != 0.0, double(*count));
    parts.push_back(part(w[i], g[i], m[i], v[i], out[i], n[i], kinds[3 * i], kinds[3 * i + 1], kinds[3 * i + 2], s));
  }
  const auto start = std::chrono::steady_clock::now();
  run_parts(parts, threads, piece);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("adam_step_many", &adam_step_many, pybind11::call_guard<pybind11::gil_scoped_release>(),
             "Adam(W) steps of several tensors at the given addresses in one pass (kinds: -1 none, 0 fp32, "
             "1 bf16), each step count incremented first; returns the pass's wall time in seconds.");
}
