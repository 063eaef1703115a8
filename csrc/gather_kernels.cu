// CUDA kernels of csrc/gather.cpp: a row copy through an index map, one warp per row, 16-byte accesses when the
// row length and both base pointers allow (else 8, 4, 2 or 1 bytes). Memory-bound: each byte is read once and
// written once; a grid-stride loop over rows keeps the grid at a few waves.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "gather_kernels.cuh"

namespace tessera {
namespace {

template <typename V>
void launch(const at::Tensor& src, at::Tensor& dst, const at::Tensor& map, int64_t n_rows, int64_t row_bytes,
            int64_t G, int64_t S, bool gather) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(V));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t want = (n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(sms) * 16)));
  const dim3 threads(kWarp, kRowsPerBlock);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(map.scalar_type(), "tessera_copy_rows", [&] {
    copy_rows_kernel<V, index_t><<<blocks, threads, 0, stream>>>(
        reinterpret_cast<const V*>(src.data_ptr()), reinterpret_cast<V*>(dst.data_ptr()),
        map.data_ptr<index_t>(), n_rows, row_vecs, G, S, gather);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void copy_rows_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& map, int64_t n_rows, int64_t row_bytes,
                    int64_t G, int64_t S, bool gather) {
  if (n_rows == 0 || row_bytes == 0) {
    return;
  }
  // Widest access that divides the row length and both base addresses.
  const uint64_t align = static_cast<uint64_t>(row_bytes) | reinterpret_cast<uintptr_t>(src.data_ptr()) |
                         reinterpret_cast<uintptr_t>(dst.data_ptr());
  if (align % 16 == 0) {
    launch<uint4>(src, dst, map, n_rows, row_bytes, G, S, gather);
  } else if (align % 8 == 0) {
    launch<uint2>(src, dst, map, n_rows, row_bytes, G, S, gather);
  } else if (align % 4 == 0) {
    launch<uint32_t>(src, dst, map, n_rows, row_bytes, G, S, gather);
  } else if (align % 2 == 0) {
    launch<uint16_t>(src, dst, map, n_rows, row_bytes, G, S, gather);
  } else {
    launch<uint8_t>(src, dst, map, n_rows, row_bytes, G, S, gather);
  }
}

}  // namespace tessera
