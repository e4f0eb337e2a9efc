// Sort the (token, slot) pairs of a routed batch by expert and pad each expert's run to a multiple of block_m, so
// that a grouped GEMM can give every block of block_m rows a single expert. Pairs whose expert id is negative (a
// skipped slot, or a slot that routed to no surviving expert) are left out: no block is ever launched for them.
//
// The order inside an expert's run is the order of the pairs (stable), so the result is deterministic. The
// PyTorch reference is moekern.ops.reference.align_block_size.
//
// One thread block does the whole job: routing batches are small (decode: k pairs per token; prefill of 2048
// tokens with k=8: 16K pairs), and one block needs no grid-wide synchronisation.

#include <cuda_runtime.h>
#include <cstdint>

namespace moekern {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxExperts = 1024;

__global__ void align_block_size_kernel(const int32_t* __restrict__ expert_of_pair,  // [num_pairs]
                                        int32_t num_pairs, int32_t num_experts, int32_t block_m,
                                        int32_t* __restrict__ sorted_pairs,   // [max_padded], filled with num_pairs
                                        int32_t* __restrict__ block_expert,   // [max_padded / block_m]
                                        int32_t* __restrict__ num_padded,     // [1]
                                        int32_t max_padded) {
  __shared__ int32_t count[kMaxExperts];
  __shared__ int32_t start[kMaxExperts + 1];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  for (int e = tid; e < num_experts; e += kThreads) count[e] = 0;
  for (int i = tid; i < max_padded; i += kThreads) sorted_pairs[i] = num_pairs;  // padding rows point past the end
  __syncthreads();

  for (int i = tid; i < num_pairs; i += kThreads) {
    const int32_t e = expert_of_pair[i];
    if (e >= 0 && e < num_experts) atomicAdd(&count[e], 1);  // counts only: the placement below is ordered
  }
  __syncthreads();

  if (tid == 0) {  // exclusive prefix sum of the padded counts; at most kMaxExperts iterations
    int32_t offset = 0;
    for (int e = 0; e < num_experts; ++e) {
      start[e] = offset;
      offset += (count[e] + block_m - 1) / block_m * block_m;
    }
    start[num_experts] = offset;
    *num_padded = offset;
  }
  __syncthreads();

  const int32_t num_blocks = max_padded / block_m;
  for (int b = tid; b < num_blocks; b += kThreads) {
    // A block past the last expert's run gets -1: the GEMM returns at once for it.
    int32_t owner = -1;
    const int32_t row = b * block_m;
    if (row < start[num_experts]) {
      int lo = 0, hi = num_experts - 1;  // last expert whose run starts at or before row
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (start[mid] <= row) lo = mid; else hi = mid - 1;
      }
      owner = lo;
    }
    block_expert[b] = owner;
  }

  // One warp per expert walks the pairs in order and compacts its matches with a ballot: stable and atomics-free.
  for (int e = warp; e < num_experts; e += kWarps) {
    int32_t written = start[e];
    for (int base = 0; base < num_pairs; base += 32) {
      const int i = base + lane;
      const bool mine = i < num_pairs && expert_of_pair[i] == e;
      const unsigned ballot = __ballot_sync(0xffffffffu, mine);
      if (mine) sorted_pairs[written + __popc(ballot & ((1u << lane) - 1u))] = i;
      written += __popc(ballot);
    }
  }
}

// Host launcher on raw pointers, so this file builds with nvcc alone (CI compiles it for sm_80 and sm_90).
// max_padded must be at least num_pairs + num_experts * (block_m - 1), rounded up to block_m.
extern "C" cudaError_t moekern_align_block_size(const int32_t* expert_of_pair, int32_t num_pairs, int32_t num_experts,
                                                int32_t block_m, int32_t* sorted_pairs, int32_t* block_expert,
                                                int32_t* num_padded, int32_t max_padded, cudaStream_t stream) {
  if (num_experts > kMaxExperts || block_m <= 0 || max_padded % block_m != 0) return cudaErrorInvalidValue;
  align_block_size_kernel<<<1, kThreads, 0, stream>>>(expert_of_pair, num_pairs, num_experts, block_m, sorted_pairs,
                                                      block_expert, num_padded, max_padded);
  return cudaGetLastError();
}

}  // namespace moekern
