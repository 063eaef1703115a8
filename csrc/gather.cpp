// Masked-token gather/scatter for deferred masking (the `cuda` backend of config `kernels.gather`).
//
//   gather_tokens_forward(x (B, N, D), idx (B, K) int64|int32) -> (B, K, D):  out[b, k] = x[b, idx[b, k]]
//   gather_tokens_backward(grad (B, K, D), idx (B, K), n) -> (B, n, D):     zeros, then dx[b, idx[b, k]] = grad[b, k]
//
// Any dtype (the kernels copy bytes, 16 at a time when rows and pointers allow). CUDA tensors, contiguous.
// The backward assumes the K indices of a sample are distinct (the trainer draws them by argsort): it is then a
// plain scatter-store, no atomics, deterministic. Indices are not range-checked on the device.
// Bound with TORCH_LIBRARY as torch.ops.tessera_csrc.*; kernels/gather_cuda.py adds the fake and autograd
// registrations. Built by setup.py's cuda_extensions() into the extension module `tessera_csrc`.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>

namespace tessera {

// csrc/gather_kernels.cu: for every row r < n_rows, m = (r / G) * S + map[r];
// gather: dst[r] = src[m]; scatter: dst[m] = src[r]. Rows are row_bytes long.
void copy_rows_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& map, int64_t n_rows, int64_t row_bytes,
                    int64_t G, int64_t S, bool gather);

namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& idx, const char* name) {
  TORCH_CHECK(x.is_cuda() && idx.is_cuda(), name, ": x and idx must be CUDA tensors");
  TORCH_CHECK(x.device() == idx.device(), name, ": x and idx must be on the same device");
  TORCH_CHECK(x.dim() == 3 && idx.dim() == 2 && idx.size(0) == x.size(0), name,
              ": expected x (B, N, D) and idx (B, K), got ", x.sizes(), " and ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, name, ": idx must be int64 or int32");
  TORCH_CHECK(x.is_contiguous() && idx.is_contiguous(), name, ": x and idx must be contiguous");
}

}  // namespace

at::Tensor gather_tokens_forward(const at::Tensor& x, const at::Tensor& idx) {
  check_inputs(x, idx, "gather_tokens_forward");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = idx.size(1);
  at::Tensor out = at::empty({B, K, D}, x.options());
  copy_rows_cuda(x, out, idx, B * K, D * static_cast<int64_t>(x.element_size()), K, N, /*gather=*/true);
  return out;
}

at::Tensor gather_tokens_backward(const at::Tensor& grad, const at::Tensor& idx, int64_t n) {
  check_inputs(grad, idx, "gather_tokens_backward");
  TORCH_CHECK(n >= 0, "gather_tokens_backward: n must be >= 0");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2);
  TORCH_CHECK(idx.size(1) == K, "gather_tokens_backward: grad has ", K, " rows per sample, idx ", idx.size(1));
  at::Tensor dx = at::zeros({B, n, D}, grad.options());
  copy_rows_cuda(grad, dx, idx, B * K, D * static_cast<int64_t>(grad.element_size()), K, n, /*gather=*/false);
  return dx;
}

}  // namespace tessera

TORCH_LIBRARY(tessera_csrc, m) {
  m.def("gather_tokens_forward(Tensor x, Tensor idx) -> Tensor");
  m.def("gather_tokens_backward(Tensor grad, Tensor idx, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(tessera_csrc, CUDA, m) {
  m.impl("gather_tokens_forward", &tessera::gather_tokens_forward);
  m.impl("gather_tokens_backward", &tessera::gather_tokens_backward);
}

// `import tessera_csrc` loads the library above (which registers the ops); the module itself exports nothing else.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Tessera CUDA ops: torch.ops.tessera_csrc.gather_tokens_forward / gather_tokens_backward";
}
