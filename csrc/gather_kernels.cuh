// The device code of csrc/gather_kernels.cu, free of torch headers so that plain nvcc can compile it on its own
// (tests/test_csrc_sm90.py builds it for sm_90 and reads its SASS: 16-byte loads/stores, no spills).
#pragma once

#include <cstdint>

namespace tessera {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // blockDim = (32, 8): 256 threads, one warp per row

template <typename V, typename index_t>
__global__ void copy_rows_kernel(const V* __restrict__ src, V* __restrict__ dst, const index_t* __restrict__ map,
                                 int64_t n_rows, int64_t row_vecs, int64_t G, int64_t S, bool gather) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; r < n_rows; r += stride) {
    const int64_t m = (r / G) * S + static_cast<int64_t>(map[r]);
    const V* __restrict__ s = src + (gather ? m : r) * row_vecs;
    V* __restrict__ d = dst + (gather ? r : m) * row_vecs;
#pragma unroll 4
    for (int64_t c = threadIdx.x; c < row_vecs; c += kWarp) {
      d[c] = s[c];
    }
  }
}

}  // namespace tessera
