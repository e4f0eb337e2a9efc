// The contract between the torch binding (ops.cpp) and the ISA variants of the CPU kernels (isa_*.cpp, each one
// build of kernels_impl.h). Plain C++ on raw pointers: no torch header reaches the variants, so no inline function
// compiled for AVX-512 can be shared (by the linker) with the portable build.
#pragma once
#include <cstdint>

namespace moekern_cpu {

// A stacked 4-bit weight W [E, N, K] read where it lies, in moekern's layout (moekern/quant/layout.py):
//   qweight int32 [E, K/8, N]: word [e, s, n] holds q[n, 8s + j] in bits 4j..4j+3
//   scales [E, K/G, N] (fp32, bf16 or fp16), zeros uint8 [E, K/G, N]
// The kernels take TILE_N = 16 consecutive output rows at a time: one k-step of a tile is 16 words, 64 bytes in a
// row, whose bytes hold q[n, 8s + 2i] in the low nibble and q[n, 8s + 2i + 1] in the high one (i = 0..3). So a mask
// (or a shift and a mask) gives, per 32-bit lane, 4 codes of even (or odd) k: the operand of one vpdpbusd; the
// activations are laid out to match (prepare_rows). Consecutive k-steps of a tile are 4N bytes apart, so the cores
// prefetch the steps ahead.
constexpr int TILE_N = 16;
constexpr int STEP_K = 8;

struct Q4Weight {
  const uint8_t* q;       // qweight
  const void* scales;
  const uint8_t* zeros;
  int scale_dtype;        // DT_F32, DT_BF16 or DT_F16
  int64_t n, k, group;
};

struct DenseWeight {      // W [E, N, K] with unit stride along K
  const void* w;
  int64_t stride_e, stride_n, n, k;
  int dtype;              // DT_F32 or DT_BF16
};

enum DType : int { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

// How activations meet the 4-bit weights (the inner product):
//   INT8: activations quantized to int8 per block of 32 inputs (16 or 8 for smaller groups; symmetric, scale
//         d = max|x| / 127); the products of unsigned 4-bit codes and int8 activations summed exactly in int32
//         (vpdpbusd), the zero point taken off once per block from the block's activation sum:
//         sum (q - z) x = sum q x - z sum x.
//   BF16: activations rounded to bf16, codes turned into bf16 by a table, vdpbf16ps (AVX-512 BF16 only).
//   FP32: activations as they are (fp32), codes to fp32 by a table, FMA: the same products as the reference.
enum Inner : int { INNER_INT8 = 0, INNER_BF16 = 1, INNER_FP32 = 2 };

enum Act : int { ACT_SILU = 0, ACT_CLAMPED_SWIGLU = 1 };

// Prepared activation rows (see prepare_rows): row r's K inputs at xa + r * K elements (int8, bf16 bits or fp32,
// the last two permuted within each step of 8 to the order the weight codes come out of a 64-byte step), its block
// scales (INT8) or group sums (BF16) at xs + r * nscale, its int8 block sums (INT8) at xi + r * nscale.
// `block`: the inputs per scale: the int8 block (32, or 16 or 8 where the group size asks) or the weight group.
struct Prepared {
  const void* xa;
  const float* xs;
  const int32_t* xi;
  int64_t k, nscale, block;
  int inner;
};

// One GEMM over the experts' row lists. Work item w covers expert item_expert[w], output tiles [item_tile0[w],
// item_tile1[w]). Expert e's rows are r = row_begin[e] .. row_begin[e + 1] - 1 (positions in the sorted pair list):
// it reads prepared activation row act_row[r] and writes output row r.
//   GATED_HALVES (gate_up, gate rows then up rows): output tile t, columns 16t.. of I = act(gate rows 16t.. + bias,
//     up rows I + 16t.. + bias), bias [E, 2I] in the weight's row order.
//   GATED_INTERLEAVED (GPT-OSS: gate row 2i, up row 2i + 1; 4-bit only): output tile t is weight rows 16t..16t+15,
//     columns 8t..8t+7.
//   NOT_GATED (down): out = row_weight[r] * (acc + bias).
enum Gated : int { NOT_GATED = 0, GATED_HALVES = 1, GATED_INTERLEAVED = 2 };

struct GemmJob {
  const Q4Weight* q4;       // one of q4 / dense
  const DenseWeight* dense;
  Prepared x;               // for q4
  const float* xdense;      // for dense: fp32 activation rows [*, k]
  const uint16_t* xdense_bf16;  // or bf16 ones, for bf16 weights where the CPU has AVX512_BF16 (xdense null)
  int64_t ld_xdense;
  const int32_t* item_expert;
  const int32_t* item_tile0;
  const int32_t* item_tile1;
  const int64_t* row_begin;
  const int64_t* act_row;
  const float* row_weight;  // not gated only
  const float* bias;        // [E, bias_stride] fp32 or null, in the weight's row order
  int64_t bias_stride;
  int gated;
  int act;
  float alpha, limit;
  int64_t out_cols;         // I (gated) or N
  float* out;               // [rows, ld_out] fp32
  int64_t ld_out;
};

// The decode path of the 4-bit GEMM (INT8 activations, a few rows per expert): work item w reads the k-blocks
// [item_blk0[w], item_blk1[w]) of expert item_expert[w] across all N rows of the weight, in memory order (a block's
// few qweight rows side by side, each read front to back: streams the hardware prefetchers follow, where a tile's
// column of 64-byte pieces 4N bytes apart is not), and adds its partial sums to partial + item_acc[w], fp32
// [rows of the expert, N]. ops.cpp then sums an expert's items and applies the epilogue.
struct StreamJob {
  const Q4Weight* q4;
  Prepared x;
  const int32_t* item_expert;
  const int64_t* item_blk0;
  const int64_t* item_blk1;
  const int64_t* item_acc;
  const int64_t* row_begin;
  const int64_t* act_row;
  float* partial;  // zeroed by the caller
};
constexpr int kStreamMaxRows = 16;  // rows per expert up to which the decode path runs (decode and small batches)

// The functions of one ISA variant.
struct Kernels {
  const char* name;
  bool has_bf16_dot;  // INNER_BF16 available
  int stream_inners;  // the inner products (1 << Inner) of its decode path (q4_stream); INT8 in every variant
  // Prepare activation rows [rows, k] (fp32 src, or bf16/fp16 given by src_dtype) for the 4-bit GEMM. src row r is
  // at src + src_row[r] * ld_src (src_row null: r), times in_scale (per row pointer, may be null).
  void (*prepare_rows)(const void* src, int src_dtype, int64_t ld_src, const int64_t* src_row, int64_t rows,
                       const float* in_scale, const int64_t* in_scale_row, int64_t in_scale_stride,
                       const Prepared& out, int64_t row0, int64_t row1);
  // h[i] = the gated activation (Act, alpha, limit) of gate g[i] and up u[i], i < n
  void (*gate_columns)(const float* g, const float* u, float* h, int64_t n, int act, float alpha, float limit);
  void (*gemm)(const GemmJob& job, int64_t item0, int64_t item1);
  void (*q4_stream)(const StreamJob& job, int64_t item0, int64_t item1);
  // Streams `bytes` of memory with vector loads; returns a value that depends on all of them (the read bandwidth
  // probe of the benchmarks).
  uint64_t (*read_sum)(const void* p, int64_t bytes);
};

// Each returns its variant, or null where the build left it out (a compiler without the target).
const Kernels* kernels_avx512();
const Kernels* kernels_avx2();
const Kernels* kernels_portable();

}  // namespace moekern_cpu
