// The torch side of moekern's CPU kernels: argument checks, the host bookkeeping of the routing (pairs sorted by
// expert), buffers, threads (at::parallel_for over (expert, tile) work items) and the choice of the ISA variant.
// Registered as torch.ops.moekern_cpu.*; moekern/ops/cpu.py is the Python face. The arithmetic lives in
// kernels_impl.h (see kernels.h for the layouts).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels.h"

// The digest of the sources a library built ahead of time came from (setup.py defines it; a JIT build's cache
// folder is keyed by its sources instead). moekern/ops/cpu.py reads it from the file before loading the library, so
// that one older than csrc/cpu/ gives way to a build of the sources there.
#define MK_STRING_(x) #x
#define MK_STRING(x) MK_STRING_(x)
#ifdef MOEKERN_SOURCES_SHA256  // a bare hex token on the command line (no quotes to survive the shell)
extern "C" __attribute__((used, visibility("default"))) const char moekern_sources_sha256[] =
    "moekern-sources-sha256:" MK_STRING(MOEKERN_SOURCES_SHA256);
#endif

namespace moekern_cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------------
// ISA variants
// ---------------------------------------------------------------------------------------------------------------------
enum Isa : int64_t { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_bf16_dot() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const Kernels* variant(int64_t isa) {
  switch (isa) {
    case ISA_AVX512:
      TORCH_CHECK(cpu_has_avx512(), "moekern: the avx512 kernels need AVX-512 F/BW/VL/DQ/VNNI, which this CPU lacks");
      return kernels_avx512();
    case ISA_AVX2:
      TORCH_CHECK(cpu_has_avx2(), "moekern: the avx2 kernels need AVX2 and FMA, which this CPU lacks");
      return kernels_avx2();
    case ISA_PORTABLE:
      return kernels_portable();
  }
  TORCH_CHECK(false, "moekern: unknown ISA variant ", isa);
}

// The best variant this CPU runs: what `auto` means.
int64_t best_isa() {
  if (cpu_has_avx512()) return ISA_AVX512;
  if (cpu_has_avx2()) return ISA_AVX2;
  return ISA_PORTABLE;
}

std::string cpu_flags() {
  std::string out;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#define MK_FLAG(name) \
  if (__builtin_cpu_supports(name)) out += std::string(out.empty() ? "" : " ") + name;
  MK_FLAG("sse4.2") MK_FLAG("avx") MK_FLAG("avx2") MK_FLAG("fma") MK_FLAG("f16c") MK_FLAG("avx512f")
  MK_FLAG("avx512bw") MK_FLAG("avx512vl") MK_FLAG("avx512dq") MK_FLAG("avx512vnni") MK_FLAG("avx512bf16")
#undef MK_FLAG
#endif
  return out;
}

// ---------------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------------
bool g_poison = false;  // tests: every buffer an op allocates starts as NaN (or a wild integer)

at::Tensor alloc(at::IntArrayRef size, at::ScalarType dtype) {
  auto t = at::empty(size, at::TensorOptions().dtype(dtype));
  if (g_poison) {
    if (at::isFloatingType(dtype)) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else t.fill_(dtype == at::kByte ? 0xAB : (dtype == at::kChar ? -77 : (dtype == at::kShort ? -12345 : -123457)));
  }
  return t;
}

int dtype_code(at::ScalarType t) {
  if (t == at::kFloat) return DT_F32;
  if (t == at::kBFloat16) return DT_BF16;
  if (t == at::kHalf) return DT_F16;
  TORCH_CHECK(false, "moekern: the CPU kernels take float32, bfloat16 or float16 activations, got ", t);
}

// Work of fewer bytes than this runs on the calling thread: waking the pool costs more than it saves (a small model's
// layer, a decode step's activations).
constexpr int64_t kParallelBytes = 1 << 18;

// f(begin, end) over [0, n) on the intra-op threads, or inline where the whole range touches fewer than
// kParallelBytes (`bytes`: an estimate of what it reads).
template <typename F>
void parallel(int64_t n, int64_t bytes, F&& f) {
  if (n <= 0) return;
  at::parallel_for(0, n, bytes < kParallelBytes ? n : 1, [&](int64_t b, int64_t e) { f(b, e); });
}

// f(i) for every i in [0, n) on the intra-op threads, which claim the i one at a time (or inline, as `parallel`): a
// thread that the OS takes off the core for a while (the machine is shared) holds back one i, where a static split
// makes the whole call wait for its share.
template <typename F>
void claimed(int64_t n, int64_t bytes, F&& f) {
  const int64_t threads = at::get_num_threads();
  if (n <= 1 || threads <= 1 || bytes < kParallelBytes || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) f(i);
  });
}

// The routed (token, slot) pairs sorted by expert, skipped slots (id < 0) left out.
struct Routing {
  int64_t tokens = 0, slots = 0, rows = 0;
  std::vector<int64_t> row_begin;   // [E + 1]
  std::vector<int64_t> token_of;    // [rows]
  std::vector<int64_t> expert_of;   // [rows]
  std::vector<float> weight_of;     // [rows]
  std::vector<int64_t> row_of_pair; // [tokens * slots], -1 for a skipped slot
};

Routing sort_pairs(const at::Tensor& ids_in, const at::Tensor& weights_in, int64_t num_experts) {
  TORCH_CHECK(ids_in.dim() == 2 && weights_in.sizes() == ids_in.sizes(),
              "moekern: top_k_index and top_k_weights must both be [tokens, k]");
  auto ids = ids_in.to(at::kLong).contiguous();
  auto w = weights_in.to(at::kFloat).contiguous();
  Routing r;
  r.tokens = ids.size(0);
  r.slots = ids.size(1);
  const int64_t n = r.tokens * r.slots;
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* wp = w.data_ptr<float>();
  std::vector<int64_t> count(num_experts + 1, 0);
  for (int64_t p = 0; p < n; ++p) {
    TORCH_CHECK(id[p] < num_experts, "moekern: expert id ", id[p], " out of range for ", num_experts, " experts");
    if (id[p] >= 0) ++count[id[p]];
  }
  r.row_begin.assign(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) r.row_begin[e + 1] = r.row_begin[e] + count[e];
  r.rows = r.row_begin[num_experts];
  r.token_of.resize(r.rows);
  r.expert_of.resize(r.rows);
  r.weight_of.resize(r.rows);
  r.row_of_pair.assign(n, -1);
  std::vector<int64_t> next(r.row_begin.begin(), r.row_begin.end() - 1);
  for (int64_t p = 0; p < n; ++p) {
    if (id[p] < 0) continue;
    const int64_t row = next[id[p]]++;
    r.token_of[row] = p / r.slots;
    r.expert_of[row] = id[p];
    r.weight_of[row] = wp[p];
    r.row_of_pair[p] = row;
  }
  return r;
}

// Work items over (expert with rows, tiles): small enough to balance the threads, large enough to stream.
struct Items {
  std::vector<int32_t> expert, tile0, tile1;
};

Items make_items(const Routing& r, int64_t tiles, int64_t num_experts) {
  int64_t active = 0;
  for (int64_t e = 0; e < num_experts; ++e) active += r.row_begin[e + 1] > r.row_begin[e];
  const int64_t threads = at::get_num_threads();
  const int64_t per_item = std::max<int64_t>(1, std::min<int64_t>(32, active * tiles / (threads * 8)));
  Items it;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (r.row_begin[e + 1] == r.row_begin[e]) continue;  // a dropped or unchosen expert costs nothing
    for (int64_t t = 0; t < tiles; t += per_item) {
      it.expert.push_back((int32_t)e);
      it.tile0.push_back((int32_t)t);
      it.tile1.push_back((int32_t)std::min(tiles, t + per_item));
    }
  }
  return it;
}

// out[t] = sum over slots (in slot order) of part[row of (t, slot)]; a token without a computed slot gets 0.
at::Tensor sum_slots(const Routing& r, const at::Tensor& part, int64_t H, at::ScalarType dtype) {
  auto out = alloc({r.tokens, H}, dtype);
  auto acc = dtype == at::kFloat ? out : alloc({r.tokens, H}, at::kFloat);
  float* o = acc.data_ptr<float>();
  const float* pp = part.numel() ? part.data_ptr<float>() : nullptr;
  parallel(r.tokens, r.rows * H * 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* dst = o + t * H;
      std::fill(dst, dst + H, 0.0f);
      for (int64_t s = 0; s < r.slots; ++s) {
        const int64_t row = r.row_of_pair[t * r.slots + s];
        if (row < 0) continue;
        const float* src = pp + row * H;
        for (int64_t h = 0; h < H; ++h) dst[h] += src[h];
      }
    }
  });
  if (dtype != at::kFloat) out.copy_(acc);
  return out;
}

at::Tensor fp32_bias(const c10::optional<at::Tensor>& b, int64_t E, int64_t width, const char* what) {
  if (!b.has_value()) return at::Tensor();
  TORCH_CHECK(b->dim() == 2 && b->size(0) == E && b->size(1) == width, "moekern: ", what, " must be [", E, ", ", width,
              "], got ", b->sizes());
  return b->to(at::kFloat).contiguous();
}

// ---------------------------------------------------------------------------------------------------------------------
// 4-bit: the fused MoE, reading moekern's layout where it lies
// ---------------------------------------------------------------------------------------------------------------------
// qweight int32 [E, K/8, N], scales [E, K/G, N] (fp32, bf16 or fp16), zeros uint8 [E, K/G, N] (a 2-D weight: E = 1).
Q4Weight q4_view(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros, const char* what) {
  TORCH_CHECK(qweight.dim() == 3 && qweight.scalar_type() == at::kInt && qweight.is_contiguous(), "moekern: ", what,
              " qweight must be a contiguous int32 [E, K/8, N]");
  TORCH_CHECK(scales.dim() == 3 && scales.is_contiguous() && zeros.sizes() == scales.sizes() && zeros.is_contiguous() &&
                  zeros.scalar_type() == at::kByte,
              "moekern: ", what, " scales and zeros must be contiguous [E, K/G, N], zeros uint8");
  const int64_t E = qweight.size(0), K = qweight.size(1) * 8, N = qweight.size(2), ngroups = scales.size(1);
  TORCH_CHECK(scales.size(0) == E && scales.size(2) == N && ngroups > 0 && K % ngroups == 0 &&
                  (K / ngroups) % 8 == 0,
              "moekern: ", what, " scales ", scales.sizes(), " do not match qweight ", qweight.sizes(),
              " (the group size must be a multiple of 8 that divides the input width)");
  Q4Weight w;
  w.q = (const uint8_t*)qweight.data_ptr<int32_t>();
  w.scales = scales.data_ptr();
  w.scale_dtype = dtype_code(scales.scalar_type());
  w.zeros = zeros.data_ptr<uint8_t>();
  w.n = N;
  w.k = K;
  w.group = K / ngroups;
  return w;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t int8_block(int64_t group) { return group % 32 == 0 ? 32 : (group % 16 == 0 ? 16 : 8); }

// Activation rows in the form the inner product reads.
struct PreparedBuffers {
  at::Tensor xa, xs, xi;
  Prepared p;
};

PreparedBuffers prepared_buffers(int inner, int64_t K, int64_t rows, int64_t group) {
  PreparedBuffers b;
  b.p.k = K;
  b.p.inner = inner;
  b.p.block = inner == INNER_INT8 ? int8_block(group) : group;
  b.p.nscale = K / b.p.block;
  const auto a_type = inner == INNER_INT8 ? at::kChar : (inner == INNER_BF16 ? at::kShort : at::kFloat);
  b.xa = alloc({rows, K}, a_type);
  b.xs = alloc({rows, b.p.nscale}, at::kFloat);
  if (inner == INNER_INT8) b.xi = alloc({rows, b.p.nscale}, at::kInt);
  b.p.xa = b.xa.data_ptr();
  b.p.xs = b.xs.data_ptr<float>();
  b.p.xi = inner == INNER_INT8 ? b.xi.data_ptr<int32_t>() : nullptr;
  return b;
}

PreparedBuffers prepare(const Kernels* kern, int inner, const at::Tensor& src, const int64_t* src_row, int64_t rows,
                        int64_t group, const at::Tensor& in_scale, const int64_t* in_scale_row) {
  const int64_t K = src.size(1);
  PreparedBuffers b = prepared_buffers(inner, K, rows, group);
  const float* sc = in_scale.defined() ? in_scale.data_ptr<float>() : nullptr;
  const int64_t sc_stride = in_scale.defined() ? in_scale.size(1) : 0;
  const void* sp = src.data_ptr();
  const int dt = dtype_code(src.scalar_type());
  const int64_t ld = src.stride(0);
  parallel(rows, rows * K * src.element_size(), [&](int64_t r0, int64_t r1) {
    kern->prepare_rows(sp, dt, ld, src_row, rows, sc, in_scale_row, sc_stride, b.p, r0, r1);
  });
  return b;
}

// The decode path (StreamJob). Each expert's k-blocks are split in items (about kItemsPerThread per thread, none of
// fewer than kMinItemBytes of codes), each with its own fp32 partial sums [rows of the expert, N]; the threads claim
// the items one at a time (`claimed`). The partials are summed in item order afterwards, so the result does not
// depend on which thread ran what.
constexpr int64_t kItemsPerThread = 4;
constexpr int64_t kMinItemBytes = 1 << 17;

struct DecodeSums {
  at::Tensor partial;
  std::vector<int64_t> first;   // [E + 1]: expert e's items are first[e] .. first[e + 1] - 1, in k order
  std::vector<int64_t> acc_at;  // where item i's partial sums begin
  int64_t n = 0;

  // dst[c - c0] = the sum over expert e's items of its row m's partial sums at columns c0 .. c1 - 1
  void row_sums(int64_t e, int64_t m, int64_t c0, int64_t c1, float* dst) const {
    const float* pp = partial.data_ptr<float>();
    const float* src = pp + acc_at[first[e]] + m * n;
    std::copy(src + c0, src + c1, dst);
    for (int64_t i = first[e] + 1; i < first[e + 1]; ++i) {
      src = pp + acc_at[i] + m * n;
      for (int64_t c = c0; c < c1; ++c) dst[c - c0] += src[c];
    }
  }
  int64_t bytes() const { return partial.numel() * 4; }
};

DecodeSums q4_decode(const Kernels* kern, const Q4Weight& w, const Prepared& x, const int64_t* row_begin,
                     const int64_t* act_row, int64_t E) {
  const int64_t nblocks = w.k / x.block, N = w.n, threads = at::get_num_threads();
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += row_begin[e + 1] > row_begin[e];
  const int64_t block_bytes = x.block / 2 * N;
  const int64_t most = std::max<int64_t>(1, std::min(nblocks, nblocks * block_bytes / kMinItemBytes));
  const int64_t splits = std::max<int64_t>(1, std::min(most, ceil_div(kItemsPerThread * threads, std::max<int64_t>(1, active))));
  const int64_t per = ceil_div(nblocks, splits);
  DecodeSums d;
  d.n = N;
  d.first.assign(E + 1, 0);
  std::vector<int32_t> item_expert;
  std::vector<int64_t> blk0, blk1, rows_of;
  int64_t size = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = row_begin[e + 1] - row_begin[e];
    d.first[e] = (int64_t)item_expert.size();
    for (int64_t b = 0; m > 0 && b < nblocks; b += per) {
      item_expert.push_back((int32_t)e);
      blk0.push_back(b);
      blk1.push_back(std::min(nblocks, b + per));
      d.acc_at.push_back(size);
      rows_of.push_back(m);
      size += m * N;
    }
  }
  const int64_t items = (int64_t)item_expert.size();
  d.first[E] = items;
  d.partial = alloc({size}, at::kFloat);
  float* pp = d.partial.data_ptr<float>();
  StreamJob job{&w, x, item_expert.data(), blk0.data(), blk1.data(), d.acc_at.data(), row_begin, act_row, pp};
  auto run_item = [&](int64_t i) {
    std::fill(pp + d.acc_at[i], pp + d.acc_at[i] + rows_of[i] * N, 0.0f);  // in the thread that sums into it
    kern->q4_stream(job, i, i + 1);
  };
  claimed(items, active * w.k * N / 2, run_item);
  return d;
}

// Columns per piece of the decode path's reductions: the threads share them by (row, piece).
constexpr int64_t kReduceCols = 1024;

// The sums [rows, N] of each row (a Linear's output before its epilogue).
at::Tensor q4_decode_sums(const Kernels* kern, const Q4Weight& w, const Prepared& x, const int64_t* row_begin,
                          const int64_t* act_row, int64_t E, int64_t rows) {
  DecodeSums d = q4_decode(kern, w, x, row_begin, act_row, E);
  auto sums = alloc({rows, w.n}, at::kFloat);
  float* out = sums.data_ptr<float>();
  const int64_t N = w.n, pieces = ceil_div(N, kReduceCols);
  std::vector<int64_t> expert_of(rows);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = row_begin[e]; r < row_begin[e + 1]; ++r) expert_of[r] = e;
  parallel(rows * pieces, d.bytes(), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r = p / pieces, c0 = (p % pieces) * kReduceCols, c1 = std::min(N, c0 + kReduceCols);
      d.row_sums(expert_of[r], r - row_begin[expert_of[r]], c0, c1, out + r * N + c0);
    }
  });
  return sums;
}

// hidden[c0, c1) of one row = act(gate + bias, up + bias): gate and up at g[j], u[j] for column c0 + j (gate rows
// then up rows), or the pairs g[2j], g[2j + 1] (interleaved, u null); bias [2I] in the weight's row order, or null.
void gate_piece(const Kernels* kern, const float* g, const float* u, const float* bias, int64_t I, int64_t c0,
                int64_t c1, int64_t act, float alpha, float limit, float* hidden) {
  float gb[kReduceCols], ub[kReduceCols];
  for (int64_t j = 0; j < c1 - c0; ++j) {
    const int64_t c = c0 + j;
    gb[j] = (u ? g[j] : g[2 * j]) + (bias ? bias[u ? c : 2 * c] : 0.0f);
    ub[j] = (u ? u[j] : g[2 * j + 1]) + (bias ? bias[u ? I + c : 2 * c + 1] : 0.0f);
  }
  kern->gate_columns(gb, ub, hidden + c0, c1 - c0, (int)act, alpha, limit);
}

// The decode path's epilogue of gate_up, with the sum of the items' partials: hidden [rows, I] = act(gate + bias,
// up + bias) of each row's sums [2I] (gate rows then up rows, or interleaved).
void gate_epilogue(const Kernels* kern, const DecodeSums& d, const float* bias, const int64_t* expert_of,
                   const int64_t* row_begin, int64_t rows, int64_t I, bool interleaved, int64_t act, float alpha,
                   float limit, float* hidden) {
  const int64_t pieces = ceil_div(I, kReduceCols);
  parallel(rows * pieces, d.bytes(), [&](int64_t p0, int64_t p1) {
    float g[2 * kReduceCols], u[kReduceCols];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r = p / pieces, c0 = (p % pieces) * kReduceCols, c1 = std::min(I, c0 + kReduceCols);
      const int64_t e = expert_of[r], m = r - row_begin[e];
      if (interleaved) {
        d.row_sums(e, m, 2 * c0, 2 * c1, g);
      } else {
        d.row_sums(e, m, c0, c1, g);
        d.row_sums(e, m, I + c0, I + c1, u);
      }
      gate_piece(kern, g, interleaved ? nullptr : u, bias ? bias + e * 2 * I : nullptr, I, c0, c1, act, alpha, limit,
                 hidden + r * I);
    }
  });
}

// The decode path's epilogue of down, with the sum of the items' partials and the sum over slots: out [tokens, H] =
// sum over each token's slots (in slot order) of routing weight * (sums + bias).
at::Tensor down_epilogue(const DecodeSums& d, const Routing& r, const float* bias, int64_t H, at::ScalarType dtype) {
  auto out = alloc({r.tokens, H}, dtype);
  auto acc = dtype == at::kFloat ? out : alloc({r.tokens, H}, at::kFloat);
  float* o = acc.data_ptr<float>();
  const int64_t pieces = ceil_div(H, kReduceCols);
  parallel(r.tokens * pieces, d.bytes(), [&](int64_t p0, int64_t p1) {
    float s[kReduceCols];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t = p / pieces, c0 = (p % pieces) * kReduceCols, c1 = std::min(H, c0 + kReduceCols);
      float* dst = o + t * H;
      std::fill(dst + c0, dst + c1, 0.0f);
      for (int64_t slot = 0; slot < r.slots; ++slot) {
        const int64_t row = r.row_of_pair[t * r.slots + slot];
        if (row < 0) continue;
        const int64_t e = r.expert_of[row];
        d.row_sums(e, row - r.row_begin[e], c0, c1, s);
        const float* b = bias ? bias + e * H : nullptr;
        const float w = r.weight_of[row];
        for (int64_t c = c0; c < c1; ++c) dst[c] += w * (s[c - c0] + (b ? b[c] : 0.0f));
      }
    }
  });
  if (dtype != at::kFloat) out.copy_(acc);
  return out;
}

// A Linear's epilogue: sums [rows, N] += bias.
void bias_epilogue(at::Tensor& sums, const float* bias, int64_t rows, int64_t N) {
  if (!bias) return;
  float* S = sums.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < N; ++n) S[r * N + n] += bias[n];
}

// The decode path with whole experts as its work items, where the routed experts are small and enough of them to
// share evenly among the threads: a thread takes an expert and runs its gate_up, the gated activation, down's
// activation rows and its down one after the other, so that no thread waits for the others between the two GEMMs
// and the epilogue runs on every thread, not on the calling one between two parallel regions. Down's partial sums,
// one item an expert, then go through down_epilogue as the k-split path's do.
constexpr int64_t kWholeExpertBytes = 8 << 20;  // 4-bit codes of an expert's three matrices, at most

enum DecodeItems : int64_t { ITEMS_AUTO = 0, ITEMS_K_BLOCKS = 1, ITEMS_WHOLE_EXPERTS = 2 };
std::atomic<int64_t> g_decode_items{ITEMS_AUTO};  // set_decode_items: the tests and benchmarks take each way

bool whole_experts(const Q4Weight& wgu, const Q4Weight& wd, const int64_t* row_begin, int64_t E) {
  if (g_decode_items != ITEMS_AUTO) return g_decode_items == ITEMS_WHOLE_EXPERTS;
  const int64_t threads = at::get_num_threads();
  int64_t active = 0;
  for (int64_t e = 0; e < E; ++e) active += row_begin[e + 1] > row_begin[e];
  const bool even = active >= threads && (active % threads == 0 || active >= 4 * threads);
  return even && (wgu.n * wgu.k + wd.n * wd.k) / 2 <= kWholeExpertBytes;
}

DecodeSums q4_decode_whole_experts(const Kernels* kern, const Q4Weight& wgu, const Q4Weight& wd, const Prepared& x,
                                   const int64_t* act_row, const Routing& r, const float* bias_gu,
                                   const at::Tensor& in_scale_down, bool interleaved, int64_t act, float alpha,
                                   float limit, float* hidden, const Prepared& hx, int64_t E) {
  const int64_t I = wd.k, H = wd.n;
  DecodeSums d;
  d.n = H;
  d.first.assign(E + 1, 0);
  std::vector<int32_t> item_expert;
  for (int64_t e = 0; e < E; ++e) {
    d.first[e] = (int64_t)item_expert.size();
    if (r.row_begin[e + 1] > r.row_begin[e]) {
      d.acc_at.push_back(r.row_begin[e] * H);  // an expert's rows are consecutive: its partials are rows r of [rows, H]
      item_expert.push_back((int32_t)e);
    }
  }
  const int64_t items = (int64_t)item_expert.size();
  d.first[E] = items;
  d.partial = alloc({r.rows, H}, at::kFloat);
  const float* sd = in_scale_down.defined() ? in_scale_down.data_ptr<float>() : nullptr;
  std::vector<int64_t> rows_id(r.rows);
  for (int64_t i = 0; i < r.rows; ++i) rows_id[i] = i;
  const int64_t zero = 0, blocks_gu = wgu.k / x.block, blocks_d = wd.k / hx.block;
  claimed(items, items * (wgu.n * wgu.k + wd.n * wd.k) / 2, [&](int64_t i) {
    const int32_t e = item_expert[i];
    const int64_t r0 = r.row_begin[e], m = r.row_begin[e + 1] - r0;
    std::vector<float> sums(m * wgu.n, 0.0f);  // gate_up's [m, 2I]
    const StreamJob gate_up{&wgu, x, &e, &zero, &blocks_gu, &zero, r.row_begin.data(), act_row, sums.data()};
    kern->q4_stream(gate_up, 0, 1);
    for (int64_t row = 0; row < m; ++row) {
      const float* s = sums.data() + row * wgu.n;
      for (int64_t c0 = 0; c0 < I; c0 += kReduceCols) {
        const int64_t c1 = std::min(I, c0 + kReduceCols);
        gate_piece(kern, interleaved ? s + 2 * c0 : s + c0, interleaved ? nullptr : s + I + c0,
                   bias_gu ? bias_gu + e * 2 * I : nullptr, I, c0, c1, act, alpha, limit, hidden + (r0 + row) * I);
      }
    }
    kern->prepare_rows(hidden, DT_F32, I, nullptr, r.rows, sd, r.expert_of.data(), sd ? I : 0, hx, r0, r0 + m);
    float* out = d.partial.data_ptr<float>() + r0 * H;
    std::fill(out, out + m * H, 0.0f);
    const StreamJob down{&wd, hx, &e, &zero, &blocks_d, &zero, r.row_begin.data(), rows_id.data(), out};
    kern->q4_stream(down, 0, 1);
  });
  return d;
}

bool decode_path(const Kernels* kern, int inner, const Q4Weight& w, const int64_t* row_begin, int64_t E) {
  if (!(kern->stream_inners & (1 << inner))) return false;
  if (inner != INNER_INT8 && w.n % TILE_N) return false;  // their decode path has no lane-by-lane columns
  for (int64_t e = 0; e < E; ++e)
    if (row_begin[e + 1] - row_begin[e] > kStreamMaxRows) return false;
  return true;
}

int resolve_inner(const Kernels* kern, int64_t isa, int64_t inner) {
  TORCH_CHECK(inner >= INNER_INT8 && inner <= INNER_FP32, "moekern: unknown inner product ", inner);
  if (inner == INNER_BF16)
    TORCH_CHECK(isa == ISA_AVX512 && kern->has_bf16_dot && cpu_has_bf16_dot(),
                "moekern: the bf16 inner product needs the avx512 variant on a CPU with AVX512_BF16");
  return (int)inner;
}

// bytes: the weight bytes one output tile reads.
void run_gemm(const Kernels* kern, const GemmJob& job, const Items& items, int64_t tile_bytes) {
  int64_t tiles = 0;
  for (size_t i = 0; i < items.expert.size(); ++i) tiles += items.tile1[i] - items.tile0[i];
  claimed((int64_t)items.expert.size(), tiles * tile_bytes, [&](int64_t i) { kern->gemm(job, i, i + 1); });
}

at::Tensor in_scale_fp32(const c10::optional<at::Tensor>& s, int64_t E, int64_t K, const char* what) {
  if (!s.has_value()) return at::Tensor();
  TORCH_CHECK(s->dim() == 2 && s->size(0) == E && s->size(1) == K, "moekern: ", what, " must be [", E, ", ", K, "]");
  return s->to(at::kFloat).contiguous();
}

// x [T, H]; ids, weights [T, k]; gate_up (qweight [E, H/8, 2I], ...) and down (qweight [E, I/8, H], ...) in moekern's
// layout, gate rows then up rows, or alternating (interleaved: GPT-OSS); biases [E, 2I] in the same row order and
// [E, H]; AWQ input scales [E, H] and [E, I].
at::Tensor moe_q4(const at::Tensor& x_in, const at::Tensor& ids, const at::Tensor& weights, at::TensorList gate_up,
                  at::TensorList down, const c10::optional<at::Tensor>& b_gate_up,
                  const c10::optional<at::Tensor>& b_down, const c10::optional<at::Tensor>& in_scale_gate_up,
                  const c10::optional<at::Tensor>& in_scale_down, int64_t act, double alpha, double limit,
                  bool interleaved, int64_t inner_in, int64_t isa) {
  TORCH_CHECK(x_in.dim() == 2, "moekern: hidden states must be [tokens, hidden]");
  TORCH_CHECK(gate_up.size() == 3 && down.size() == 3, "moekern: a 4-bit weight is (qweight, scales, zeros)");
  const Kernels* kern = variant(isa);
  const int inner = resolve_inner(kern, isa, inner_in);
  auto x = x_in.contiguous();
  const int64_t H = x.size(1), E = gate_up[0].size(0);
  Q4Weight wgu = q4_view(gate_up[0], gate_up[1], gate_up[2], "gate_up");
  Q4Weight wd = q4_view(down[0], down[1], down[2], "down");
  const int64_t inter = wd.k;
  TORCH_CHECK(wgu.k == H && wgu.n == 2 * inter && wd.n == H && down[0].size(0) == E,
              "moekern: 4-bit weights gate_up [E, H/8, 2I] ", gate_up[0].sizes(), " and down [E, I/8, H] ",
              down[0].sizes(), " do not match hidden ", H);
  Routing r = sort_pairs(ids, weights, E);
  auto bgu = fp32_bias(b_gate_up, E, 2 * inter, "gate_up bias");
  auto bd = fp32_bias(b_down, E, H, "down bias");
  auto sgu = in_scale_fp32(in_scale_gate_up, E, H, "gate_up input scale");
  auto sd = in_scale_fp32(in_scale_down, E, inter, "down input scale");
  if (r.rows == 0) return sum_slots(r, at::Tensor(), H, x.scalar_type());

  // gate_up: activations per token (or per pair where an expert's input scale differs)
  const bool per_pair = sgu.defined();
  std::vector<int64_t> act_row(r.rows);
  for (int64_t i = 0; i < r.rows; ++i) act_row[i] = per_pair ? i : r.token_of[i];
  PreparedBuffers xa = per_pair ? prepare(kern, inner, x, r.token_of.data(), r.rows, wgu.group, sgu, r.expert_of.data())
                                : prepare(kern, inner, x, nullptr, r.tokens, wgu.group, at::Tensor(), nullptr);
  auto hidden = alloc({r.rows, inter}, at::kFloat);
  const bool decode = decode_path(kern, inner, wgu, r.row_begin.data(), E) &&
                      decode_path(kern, inner, wd, r.row_begin.data(), E);
  if (decode && whole_experts(wgu, wd, r.row_begin.data(), E)) {
    PreparedBuffers ha = prepared_buffers(inner, inter, r.rows, wd.group);
    DecodeSums part = q4_decode_whole_experts(kern, wgu, wd, xa.p, act_row.data(), r,
                                              bgu.defined() ? bgu.data_ptr<float>() : nullptr, sd, interleaved, act,
                                              (float)alpha, (float)limit, hidden.data_ptr<float>(), ha.p, E);
    return down_epilogue(part, r, bd.defined() ? bd.data_ptr<float>() : nullptr, H, x.scalar_type());
  }
  if (decode) {
    DecodeSums sums = q4_decode(kern, wgu, xa.p, r.row_begin.data(), act_row.data(), E);
    gate_epilogue(kern, sums, bgu.defined() ? bgu.data_ptr<float>() : nullptr, r.expert_of.data(), r.row_begin.data(),
                  r.rows, inter, interleaved, act, (float)alpha, (float)limit, hidden.data_ptr<float>());
  } else {
    GemmJob job{};
    job.q4 = &wgu;
    job.x = xa.p;
    job.row_begin = r.row_begin.data();
    job.act_row = act_row.data();
    job.bias = bgu.defined() ? bgu.data_ptr<float>() : nullptr;
    job.bias_stride = 2 * inter;
    job.gated = interleaved ? GATED_INTERLEAVED : GATED_HALVES;
    job.act = (int)act;
    job.alpha = (float)alpha;
    job.limit = (float)limit;
    job.out_cols = inter;
    job.out = hidden.data_ptr<float>();
    job.ld_out = inter;
    Items items = make_items(r, interleaved ? ceil_div(inter, TILE_N / 2) : ceil_div(inter, TILE_N), E);
    job.item_expert = items.expert.data();
    job.item_tile0 = items.tile0.data();
    job.item_tile1 = items.tile1.data();
    run_gemm(kern, job, items, (interleaved ? 8 : 16) * H);  // a tile's rows, K / 2 bytes each
  }

  // down, times the routing weight
  std::vector<int64_t> rows_id(r.rows);
  for (int64_t i = 0; i < r.rows; ++i) rows_id[i] = i;
  PreparedBuffers ha = prepare(kern, inner, hidden, nullptr, r.rows, wd.group, sd, r.expert_of.data());
  if (decode) {
    DecodeSums part = q4_decode(kern, wd, ha.p, r.row_begin.data(), rows_id.data(), E);
    return down_epilogue(part, r, bd.defined() ? bd.data_ptr<float>() : nullptr, H, x.scalar_type());
  }
  auto part = alloc({r.rows, H}, at::kFloat);
  GemmJob down_job{};
  down_job.q4 = &wd;
  down_job.x = ha.p;
  down_job.row_begin = r.row_begin.data();
  down_job.act_row = rows_id.data();
  down_job.row_weight = r.weight_of.data();
  down_job.bias = bd.defined() ? bd.data_ptr<float>() : nullptr;
  down_job.bias_stride = H;
  down_job.gated = NOT_GATED;
  down_job.out_cols = H;
  down_job.out = part.data_ptr<float>();
  down_job.ld_out = H;
  Items ditems = make_items(r, ceil_div(H, TILE_N), E);
  down_job.item_expert = ditems.expert.data();
  down_job.item_tile0 = ditems.tile0.data();
  down_job.item_tile1 = ditems.tile1.data();
  run_gemm(kern, down_job, ditems, 8 * inter);
  return sum_slots(r, part, H, x.scalar_type());
}

// A 4-bit Linear: x [T, K] -> [T, N] (moekern.modules.quant.QuantizedLinear): qweight [K/8, N], scales and zeros
// [K/G, N].
at::Tensor linear_q4(const at::Tensor& x_in, at::TensorList w, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& in_scale, int64_t inner_in, int64_t isa) {
  TORCH_CHECK(x_in.dim() == 2 && w.size() == 3 && w[0].dim() == 2, "moekern: linear_q4 takes x [T, K] and a 4-bit "
              "weight (qweight [K/8, N], scales, zeros)");
  const Kernels* kern = variant(isa);
  const int inner = resolve_inner(kern, isa, inner_in);
  auto x = x_in.contiguous();
  Q4Weight wq = q4_view(w[0].unsqueeze(0), w[1].unsqueeze(0), w[2].unsqueeze(0), "linear");
  const int64_t n = wq.n;
  TORCH_CHECK(wq.k == x.size(1), "moekern: linear_q4 weight of input width ", wq.k, " for inputs of ", x.size(1));
  const int64_t T = x.size(0);
  auto out32 = alloc({T, n}, at::kFloat);
  if (T == 0) return out32.to(x.scalar_type());
  at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous().view({1, n}) : at::Tensor();
  at::Tensor s = in_scale.has_value() ? in_scale->to(at::kFloat).contiguous().view({1, wq.k}) : at::Tensor();
  std::vector<int64_t> zero(T, 0), rows_id(T);
  for (int64_t i = 0; i < T; ++i) rows_id[i] = i;
  PreparedBuffers xa = prepare(kern, inner, x, nullptr, T, wq.group, s, zero.data());
  std::vector<int64_t> row_begin = {0, T};
  if (decode_path(kern, inner, wq, row_begin.data(), 1)) {
    auto sums = q4_decode_sums(kern, wq, xa.p, row_begin.data(), rows_id.data(), 1, T);
    bias_epilogue(sums, b.defined() ? b.data_ptr<float>() : nullptr, T, n);
    return x.scalar_type() == at::kFloat ? sums : sums.to(x.scalar_type());
  }
  GemmJob job{};
  job.q4 = &wq;
  job.x = xa.p;
  job.row_begin = row_begin.data();
  job.act_row = rows_id.data();
  job.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  job.bias_stride = n;
  job.out_cols = n;
  job.out = out32.data_ptr<float>();
  job.ld_out = n;
  Routing one;
  one.row_begin = row_begin;
  Items items = make_items(one, ceil_div(n, TILE_N), 1);
  job.item_expert = items.expert.data();
  job.item_tile0 = items.tile0.data();
  job.item_tile1 = items.tile1.data();
  run_gemm(kern, job, items, 8 * wq.k);
  return x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------------------------------
// Dense (fp32 / bf16) experts
// ---------------------------------------------------------------------------------------------------------------------
// Up to this many rows per expert, the fused kernel (each weight read once, threads over (expert, row tile)); above,
// each expert's rows go to at::matmul (oneDNN/MKL GEMMs, which win once a weight is reused by many rows). For bf16
// weights oneDNN's bf16 GEMM (vdpbf16ps on packed tiles) already wins from two rows an expert (bench_cpu_moe.py,
// Mixtral's shapes: the fused bf16 path 0.89x of it at 4 tokens, 0.72x at 16; 1.06x at one token).
constexpr int64_t kDenseFusedMaxRows = 8;
constexpr int64_t kDenseFusedMaxRowsBf16 = 1;

at::Tensor gated_act(const at::Tensor& h, int64_t act, double alpha, double limit, bool interleaved) {
  at::Tensor g, u;
  if (interleaved) {
    g = h.slice(1, 0, h.size(1), 2);
    u = h.slice(1, 1, h.size(1), 2);
  } else {
    auto parts = h.chunk(2, 1);
    g = parts[0];
    u = parts[1];
  }
  if (act == ACT_SILU) return at::silu(g) * u;
  g = g.clamp_max(limit);
  u = u.clamp(-limit, limit);
  return (u + 1) * g * at::sigmoid(g * alpha);
}

// The activation rows of a dense job: fp32, or bf16 for the bf16 dot.
void set_dense_rows(GemmJob& job, const at::Tensor& rows) {
  if (rows.scalar_type() == at::kBFloat16) job.xdense_bf16 = (const uint16_t*)rows.data_ptr();
  else job.xdense = rows.data_ptr<float>();
}

// w_gate_up [E, 2I, H], w_down [E, H, I] in (out, in) orientation, any strides (GPT-OSS: transposed views).
at::Tensor moe_dense(const at::Tensor& x_in, const at::Tensor& ids, const at::Tensor& weights,
                     const at::Tensor& w_gate_up, const at::Tensor& w_down, const c10::optional<at::Tensor>& b_gate_up,
                     const c10::optional<at::Tensor>& b_down, int64_t act, double alpha, double limit,
                     bool interleaved, int64_t isa) {
  TORCH_CHECK(x_in.dim() == 2 && w_gate_up.dim() == 3 && w_down.dim() == 3, "moekern: moe_dense shapes");
  const Kernels* kern = variant(isa);
  const int64_t E = w_gate_up.size(0), I = w_down.size(2), H = x_in.size(1);
  TORCH_CHECK(w_gate_up.size(1) == 2 * I && w_gate_up.size(2) == H && w_down.size(0) == E && w_down.size(1) == H,
              "moekern: expert weights [E, 2I, H] and [E, H, I] do not match hidden ", H);
  Routing r = sort_pairs(ids, weights, E);
  if (r.rows == 0) return sum_slots(r, at::Tensor(), H, x_in.scalar_type());
  int64_t max_rows = 0;
  for (int64_t e = 0; e < E; ++e) max_rows = std::max(max_rows, r.row_begin[e + 1] - r.row_begin[e]);
  const auto wt = w_gate_up.scalar_type();
  const bool fused = max_rows <= (wt == at::kBFloat16 ? kDenseFusedMaxRowsBf16 : kDenseFusedMaxRows) && !interleaved && (wt == at::kFloat || wt == at::kBFloat16) &&
                     w_down.scalar_type() == wt && w_gate_up.stride(2) == 1 && w_down.stride(2) == 1;
  auto part = alloc({r.rows, H}, at::kFloat);
  if (!fused) {
    auto x = x_in.contiguous();
    auto tok = at::from_blob(r.token_of.data(), {r.rows}, at::kLong);
    auto rw = at::from_blob(r.weight_of.data(), {r.rows, 1}, at::kFloat);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = r.row_begin[e], r1 = r.row_begin[e + 1];
      if (r0 == r1) continue;
      auto xe = x.index_select(0, tok.slice(0, r0, r1));
      auto h = at::matmul(xe, w_gate_up[e].t());
      if (b_gate_up.has_value()) h = h + (*b_gate_up)[e];
      auto y = at::matmul(gated_act(h, act, alpha, limit, interleaved), w_down[e].t());
      if (b_down.has_value()) y = y + (*b_down)[e];
      part.slice(0, r0, r1).copy_(y.to(at::kFloat) * rw.slice(0, r0, r1));
    }
    return sum_slots(r, part, H, x_in.scalar_type());
  }
  const bool bf16_dot = wt == at::kBFloat16 && isa == ISA_AVX512 && cpu_has_bf16_dot();
  auto x = x_in.to(bf16_dot ? at::kBFloat16 : at::kFloat).contiguous();
  auto bgu = fp32_bias(b_gate_up, E, 2 * I, "gate_up bias");
  auto bd = fp32_bias(b_down, E, H, "down bias");
  DenseWeight dgu{w_gate_up.data_ptr(), w_gate_up.stride(0), w_gate_up.stride(1), 2 * I, H,
                  wt == at::kFloat ? DT_F32 : DT_BF16};
  DenseWeight dd{w_down.data_ptr(), w_down.stride(0), w_down.stride(1), H, I, dgu.dtype};
  auto hidden = alloc({r.rows, I}, at::kFloat);
  GemmJob job{};
  job.dense = &dgu;
  set_dense_rows(job, x);
  job.ld_xdense = H;
  job.row_begin = r.row_begin.data();
  job.act_row = r.token_of.data();
  job.bias = bgu.defined() ? bgu.data_ptr<float>() : nullptr;
  job.bias_stride = 2 * I;
  job.gated = GATED_HALVES;
  job.act = (int)act;
  job.alpha = (float)alpha;
  job.limit = (float)limit;
  job.out_cols = I;
  job.out = hidden.data_ptr<float>();
  job.ld_out = I;
  const int64_t gate_tiles = (I + TILE_N - 1) / TILE_N;
  Items items = make_items(r, gate_tiles, E);
  job.item_expert = items.expert.data();
  job.item_tile0 = items.tile0.data();
  job.item_tile1 = items.tile1.data();
  run_gemm(kern, job, items, 2 * TILE_N * H * w_gate_up.element_size());

  std::vector<int64_t> rows_id(r.rows);
  for (int64_t i = 0; i < r.rows; ++i) rows_id[i] = i;
  GemmJob down_job{};
  down_job.dense = &dd;
  auto hidden_rows = bf16_dot ? hidden.to(at::kBFloat16) : hidden;  // a bf16 model rounds it so too
  set_dense_rows(down_job, hidden_rows);
  down_job.ld_xdense = I;
  down_job.row_begin = r.row_begin.data();
  down_job.act_row = rows_id.data();
  down_job.row_weight = r.weight_of.data();
  down_job.bias = bd.defined() ? bd.data_ptr<float>() : nullptr;
  down_job.bias_stride = H;
  down_job.out_cols = H;
  down_job.out = part.data_ptr<float>();
  down_job.ld_out = H;
  Items ditems = make_items(r, (H + TILE_N - 1) / TILE_N, E);
  down_job.item_expert = ditems.expert.data();
  down_job.item_tile0 = ditems.tile0.data();
  down_job.item_tile1 = ditems.tile1.data();
  run_gemm(kern, down_job, ditems, TILE_N * I * w_down.element_size());
  return sum_slots(r, part, H, x_in.scalar_type());
}

// A dense Linear for a few rows (decode): x [M, K] -> x @ W^T + bias, W [N, K] fp32 or bf16 with unit stride along
// K. torch's CPU GEMM packs W for every call of 2 to 16 rows (a quarter of the GEMV's bandwidth here); the fused
// kernel reads each row of W once for all M rows.
at::Tensor linear_dense(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                        int64_t isa) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "moekern: linear_dense takes x [M, K] "
              "and W [N, K], got ", x_in.sizes(), " and ", w.sizes());
  const auto wt = w.scalar_type();
  TORCH_CHECK((wt == at::kFloat || wt == at::kBFloat16) && w.stride(1) == 1, "moekern: linear_dense takes a float32 "
              "or bfloat16 weight with unit stride along its input");
  const Kernels* kern = variant(isa);
  const int64_t M = x_in.size(0), N = w.size(0), K = w.size(1);
  const bool bf16_dot = wt == at::kBFloat16 && isa == ISA_AVX512 && cpu_has_bf16_dot();
  auto x = x_in.to(bf16_dot ? at::kBFloat16 : at::kFloat).contiguous();
  auto out = alloc({M, N}, at::kFloat);
  if (M == 0) return out.to(x_in.scalar_type());
  auto b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  DenseWeight dw{w.data_ptr(), 0, w.stride(0), N, K, wt == at::kFloat ? DT_F32 : DT_BF16};
  std::vector<int64_t> row_begin = {0, M}, rows(M);
  for (int64_t i = 0; i < M; ++i) rows[i] = i;
  GemmJob job{};
  job.dense = &dw;
  set_dense_rows(job, x);
  job.ld_xdense = K;
  job.row_begin = row_begin.data();
  job.act_row = rows.data();
  job.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  job.bias_stride = N;
  job.gated = NOT_GATED;
  job.out_cols = N;
  job.out = out.data_ptr<float>();
  job.ld_out = N;
  Routing one;
  one.row_begin = row_begin;
  Items items = make_items(one, ceil_div(N, TILE_N), 1);
  job.item_expert = items.expert.data();
  job.item_tile0 = items.tile0.data();
  job.item_tile1 = items.tile1.data();
  run_gemm(kern, job, items, TILE_N * K * w.element_size());
  return x_in.scalar_type() == at::kFloat ? out : out.to(x_in.scalar_type());
}

// ---------------------------------------------------------------------------------------------------------------------
// Routing: reference.route on the host, one token at a time (a few dozen floats each: a loop beats a dozen small
// tensor ops per MoE layer at decode)
// ---------------------------------------------------------------------------------------------------------------------
enum Scoring : int64_t { SCORE_SOFTMAX = 0, SCORE_SIGMOID = 1, SCORE_TOPK_SOFTMAX = 2 };
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The k best of v[0..n) (the first index on ties), written to idx in decreasing order.
void top_k(const float* v, int64_t n, int64_t k, int64_t* idx) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      bool taken = false;
      for (int64_t q = 0; q < j && !taken; ++q) taken = idx[q] == i;
      if (!taken && (best < 0 || v[i] > v[best])) best = i;
    }
    idx[j] = best;
  }
}

// logits [T, E] -> (weights [T, k] fp32, ids [T, k] int64, rows [T, k] int64): reference.route, then each id's row
// in the stored experts (expert_row, NO_EXPERT = -1 for a dropped one; ids where it is not given).
std::vector<at::Tensor> route(const at::Tensor& logits_in, int64_t scoring, int64_t top_k_, bool renormalize,
                              double scaling, int64_t n_group, int64_t topk_group, bool group_top2,
                              const c10::optional<at::Tensor>& alive_in, const c10::optional<at::Tensor>& bias_in,
                              double skip_beta, const c10::optional<at::Tensor>& expert_row_in) {
  TORCH_CHECK(logits_in.dim() == 2, "moekern: router logits must be [tokens, experts]");
  auto logits = logits_in.to(at::kFloat).contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), k = top_k_;
  TORCH_CHECK(k >= 1 && k <= E && n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group,
              "moekern: router top_k ", k, " / groups ", n_group, " do not fit ", E, " experts");
  at::Tensor alive = alive_in.has_value() ? alive_in->to(at::kBool).contiguous() : at::Tensor();
  at::Tensor bias = bias_in.has_value() ? bias_in->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor expert_row = expert_row_in.has_value() ? expert_row_in->to(at::kLong).contiguous() : at::Tensor();
  auto weights = at::empty({T, k}, at::kFloat);
  auto ids = at::empty({T, k}, at::kLong);
  auto rows = expert_row.defined() ? at::empty({T, k}, at::kLong) : ids;
  const float* lg = logits.data_ptr<float>();
  const bool* al = alive.defined() ? alive.data_ptr<bool>() : nullptr;
  const float* bs = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t* er = expert_row.defined() ? expert_row.data_ptr<int64_t>() : nullptr;
  float* wo = weights.data_ptr<float>();
  int64_t* io = ids.data_ptr<int64_t>();
  int64_t* ro = rows.data_ptr<int64_t>();
  std::vector<float> scores(E), choice(E), group_scores(n_group);
  std::vector<int64_t> top(k), best_groups(topk_group);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = lg + t * E;
    float* w = wo + t * k;
    int64_t* id = io + t * k;
    bool empty[64];
    TORCH_CHECK(k <= 64, "moekern: top_k above 64");
    if (scoring == SCORE_TOPK_SOFTMAX) {  // top-k of the logits, then a softmax over the k
      for (int64_t e = 0; e < E; ++e) choice[e] = (al && !al[e]) ? kNegInf : l[e];
      top_k(choice.data(), E, k, top.data());
      const float m = choice[top[0]];
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        w[j] = std::exp(choice[top[j]] - m);
        sum += w[j];
      }
      for (int64_t j = 0; j < k; ++j) w[j] /= sum;
    } else {
      if (scoring == SCORE_SOFTMAX) {
        float m = kNegInf, sum = 0.0f;
        for (int64_t e = 0; e < E; ++e) {
          scores[e] = (al && !al[e]) ? kNegInf : l[e];
          m = std::max(m, scores[e]);
        }
        for (int64_t e = 0; e < E; ++e) {
          scores[e] = std::exp(scores[e] - m);
          sum += scores[e];
        }
        for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
      } else {
        for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-l[e]));
      }
      for (int64_t e = 0; e < E; ++e) choice[e] = (al && !al[e]) ? kNegInf : scores[e] + (bs ? bs[e] : 0.0f);
      if (n_group > 1) {  // only experts of the topk_group best groups stay eligible
        const int64_t per = E / n_group;
        for (int64_t g = 0; g < n_group; ++g) {
          const float* c = choice.data() + g * per;
          if (!group_top2) {
            float m = kNegInf;
            for (int64_t i = 0; i < per; ++i) m = std::max(m, c[i]);
            group_scores[g] = m;
          } else {
            int64_t two[2];
            top_k(c, per, std::min<int64_t>(2, per), two);
            const float a = c[two[0]], b = per > 1 ? c[two[1]] : kNegInf;
            group_scores[g] = a == kNegInf ? kNegInf : a + (b == kNegInf ? 0.0f : b);
          }
        }
        top_k(group_scores.data(), n_group, topk_group, best_groups.data());
        for (int64_t g = 0; g < n_group; ++g) {
          bool keep = false;
          for (int64_t q = 0; q < topk_group; ++q) keep = keep || best_groups[q] == g;
          if (!keep)
            for (int64_t i = 0; i < per; ++i) choice[g * per + i] = kNegInf;
        }
      }
      top_k(choice.data(), E, k, top.data());
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        w[j] = choice[top[j]] == kNegInf ? 0.0f : scores[top[j]];
        sum += w[j];
      }
      for (int64_t j = 0; j < k; ++j) {
        if (renormalize) w[j] /= sum;
        w[j] *= (float)scaling;
      }
    }
    for (int64_t j = 0; j < k; ++j) {  // fewer eligible experts than k: those slots are empty
      empty[j] = choice[top[j]] == kNegInf;
      id[j] = empty[j] ? -1 : top[j];
      if (empty[j]) w[j] = 0.0f;
    }
    if (skip_beta > 0) {  // per-token skip: slots under beta x the top weight, the rest rescaled to the same sum
      float top_w = w[0], total = 0.0f, kept = 0.0f;
      for (int64_t j = 0; j < k; ++j) top_w = std::max(top_w, w[j]);
      bool skip[64];
      for (int64_t j = 0; j < k; ++j) {
        skip[j] = w[j] < (float)skip_beta * top_w;
        total += w[j];
        kept += skip[j] ? 0.0f : w[j];
      }
      for (int64_t j = 0; j < k; ++j) {
        w[j] = skip[j] ? 0.0f : (kept > 0 ? w[j] * (total / kept) : 0.0f);
        if (skip[j]) id[j] = -1;
      }
    }
    for (int64_t j = 0; j < k; ++j) ro[t * k + j] = er ? (id[j] < 0 ? -1 : er[id[j]]) : id[j];
  }
  return {weights, ids, rows};
}

// ---------------------------------------------------------------------------------------------------------------------
// Introspection and the bandwidth probe
// ---------------------------------------------------------------------------------------------------------------------
int64_t read_bytes(const at::Tensor& buf, int64_t isa) {
  const Kernels* kern = variant(isa);
  auto b = buf.contiguous();
  const int64_t bytes = b.numel() * b.element_size();
  const char* p = (const char*)b.data_ptr();
  const int64_t chunk = 1 << 20;
  std::atomic<uint64_t> total{0};
  parallel((bytes + chunk - 1) / chunk, bytes, [&](int64_t c0, int64_t c1) {
    const int64_t lo = c0 * chunk, hi = std::min(bytes, c1 * chunk);
    total += kern->read_sum(p + lo, hi - lo);
  });
  return (int64_t)total.load();
}

// The decode path's gated activation on its own (gate, up: fp32 of one shape), for the tests: the vector exp of each
// variant against torch's.
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, int64_t act, double alpha, double limit,
                            int64_t isa) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat && gate.sizes() == up.sizes(),
              "moekern: gate and up must be fp32 tensors of one shape");
  auto g = gate.contiguous(), u = up.contiguous();
  auto h = alloc(g.sizes(), at::kFloat);
  variant(isa)->gate_columns(g.data_ptr<float>(), u.data_ptr<float>(), h.data_ptr<float>(), g.numel(), (int)act,
                             (float)alpha, (float)limit);
  return h;
}

std::string isa_name(int64_t isa) { return variant(isa)->name; }

// The number of distinct threads at::parallel_for runs its chunks on from this library: at::get_num_threads() where
// the library was built with OpenMP, 1 where it was not (at::parallel_for is a header template, and without OpenMP it
// calls f(begin, end) on the calling thread).
int64_t parallel_threads() {
  const int64_t n = at::get_num_threads();
  std::vector<int64_t> ran_on(n, -1);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) ran_on[i] = at::get_thread_num();
  });
  std::sort(ran_on.begin(), ran_on.end());
  return std::unique(ran_on.begin(), ran_on.end()) - ran_on.begin();
}

}  // namespace
}  // namespace moekern_cpu

TORCH_LIBRARY(moekern_cpu, m) {
  using namespace moekern_cpu;
  m.def("best_isa() -> int", [] { return best_isa(); });
  m.def("isa_name(int isa) -> str", &isa_name);
  m.def("cpu_flags() -> str", [] { return cpu_flags(); });
  m.def("has_bf16_dot() -> bool", [] { return cpu_has_bf16_dot(); });
  m.def("set_poison(bool on) -> bool", [](bool on) {
    const bool before = g_poison;
    g_poison = on;
    return before;
  });
  m.def("set_decode_items(int items) -> int", [](int64_t items) {
    TORCH_CHECK(items >= ITEMS_AUTO && items <= ITEMS_WHOLE_EXPERTS, "moekern: decode items 0 (auto), 1 (k-blocks) or "
                "2 (whole experts), not ", items);
    return g_decode_items.exchange(items);
  });
  m.def("moe_q4(Tensor x, Tensor ids, Tensor weights, Tensor[] gate_up, Tensor[] down, Tensor? b_gate_up, "
        "Tensor? b_down, Tensor? in_scale_gate_up, Tensor? in_scale_down, int act, float alpha, float limit, "
        "bool interleaved, int inner, int isa) -> Tensor",
        &moe_q4);
  m.def("linear_q4(Tensor x, Tensor[] w, Tensor? bias, Tensor? in_scale, int inner, int isa) -> Tensor", &linear_q4);
  m.def("moe_dense(Tensor x, Tensor ids, Tensor weights, Tensor w_gate_up, Tensor w_down, Tensor? b_gate_up, "
        "Tensor? b_down, int act, float alpha, float limit, bool interleaved, int isa) -> Tensor",
        &moe_dense);
  m.def("route(Tensor logits, int scoring, int top_k, bool renormalize, float scaling, int n_group, int topk_group, "
        "bool group_top2, Tensor? alive, Tensor? correction_bias, float skip_beta, Tensor? expert_row) -> Tensor[]",
        &route);
  m.def("linear_dense(Tensor x, Tensor w, Tensor? bias, int isa) -> Tensor", &linear_dense);
  m.def("read_bytes(Tensor buf, int isa) -> int", &read_bytes);
  m.def("gated_activation(Tensor gate, Tensor up, int act, float alpha, float limit, int isa) -> Tensor",
        &gated_activation);
  m.def("parallel_threads() -> int", [] { return parallel_threads(); });
}
