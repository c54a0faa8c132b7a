// Kronecker-factored matrix product on CUDA: y = x @ kron(a, b)^T without
// forming kron(a, b). Math and notation as in cpp/kron.cpp: one token's x is
// X (q x s) and its output a X b^T (p x r).
//
// Forward: each block keeps a and b^T in shared memory as float32 and walks
// tokens grid-stride; per token, X is staged in shared memory, the intermediate
// (Z = X b^T or W = a X, whichever is cheaper) never leaves the chip, and
// y = addend + scale * Y is written once (the adapter's fused residual add).
// Storage dtype float32/float16/bfloat16, float32 accumulation.
//
// Backward: dX is the forward kernel on (dY, a^T, b^T). The factor gradients
//   da = sum_t dY_t (X_t b^T)^T,   db = sum_t (a^T dY_t)^T X_t
// are accumulated per block in shared memory and added once per block into
// float32 outputs with atomics.
//
// Speed floor (bf16, in=out=4096, 64x64 factors, 8192 tokens): forward moves
// 128 MiB (x read, y written) and does 8.6 GFLOP; on tensor cores the bytes
// dominate. This SIMT kernel is compute-bound; its GPU timings are unmeasured.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace py = pybind11;

namespace lowrank {
namespace {

constexpr int kThreads = 256;

struct KronDims {
  int p, q, r, s;
  __host__ __device__ bool b_first() const {
    return int64_t(q) * s * r + int64_t(p) * q * r <= int64_t(p) * q * s + int64_t(p) * s * r;
  }
  __host__ __device__ int mid() const { return b_first() ? q * r : p * s; }
  // float32 words of shared memory: a, b^T, X, intermediate, Y.
  int64_t forward_words() const {
    return int64_t(p) * q + int64_t(s) * r + int64_t(q) * s + mid() + int64_t(p) * r;
  }
  // a, b, X, dY, G = a^T dY, Z = X b^T, da, db accumulators.
  int64_t backward_words() const {
    return 2 * int64_t(p) * q + 2 * int64_t(r) * s + int64_t(q) * s + int64_t(p) * r +
           2 * int64_t(q) * r;
  }
};

template <typename T>
__device__ __forceinline__ void stage(float* dst, const T* src, int n) {
  for (int e = threadIdx.x; e < n; e += blockDim.x) dst[e] = to_float(src[e]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_forward_kernel(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                        const T* addend, float scale, T* y, int64_t tokens, KronDims d) {
  // addend may alias y (in-place accumulation): each element is read before it is written,
  // by the same thread, so neither pointer is __restrict__.
  extern __shared__ float smem[];
  const int p = d.p, q = d.q, r = d.r, s = d.s;
  float* as = smem;           // p x q
  float* bts = as + p * q;    // s x r  (b transposed)
  float* xs = bts + s * r;    // q x s
  float* mid = xs + q * s;    // q x r or p x s
  float* ys = mid + d.mid();  // p x r
  stage(as, a, p * q);
  for (int e = threadIdx.x; e < r * s; e += blockDim.x) {
    const int k = e / s, j = e - k * s;
    bts[j * r + k] = to_float(b[e]);
  }
  const bool b_first = d.b_first();
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();  // previous token's ys fully stored; a, b^T staged
    stage(xs, x + t * q * s, q * s);
    __syncthreads();
    if (b_first) {
      block_gemm<false>(q, r, s, xs, s, 1, bts, r, 1, mid, r);
      __syncthreads();
      block_gemm<false>(p, r, q, as, q, 1, mid, r, 1, ys, r);
    } else {
      block_gemm<false>(p, s, q, as, q, 1, xs, s, 1, mid, s);
      __syncthreads();
      block_gemm<false>(p, r, s, mid, s, 1, bts, r, 1, ys, r);
    }
    __syncthreads();
    T* yt = y + t * p * r;
    const T* at = addend ? addend + t * p * r : nullptr;
    for (int e = threadIdx.x; e < p * r; e += blockDim.x)
      yt[e] = from_float<T>(at ? fmaf(scale, ys[e], to_float(at[e])) : scale * ys[e]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_factor_grads_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                             const T* __restrict__ a, const T* __restrict__ b,
                             float* __restrict__ da, float* __restrict__ db, int64_t tokens,
                             KronDims d) {
  extern __shared__ float smem[];
  const int p = d.p, q = d.q, r = d.r, s = d.s;
  float* as = smem;                // p x q
  float* bs = as + p * q;          // r x s
  float* xs = bs + r * s;          // q x s
  float* dys = xs + q * s;         // p x r
  float* g = dys + p * r;          // q x r: a^T dY
  float* z = g + q * r;            // q x r: X b^T
  float* da_acc = z + q * r;       // p x q
  float* db_acc = da_acc + p * q;  // r x s
  stage(as, a, p * q);
  stage(bs, b, r * s);
  for (int e = threadIdx.x; e < p * q; e += blockDim.x) da_acc[e] = 0.f;
  for (int e = threadIdx.x; e < r * s; e += blockDim.x) db_acc[e] = 0.f;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();
    stage(xs, x + t * q * s, q * s);
    stage(dys, dy + t * p * r, p * r);
    __syncthreads();
    block_gemm<false>(q, r, p, as, 1, q, dys, r, 1, g, r);  // a^T dY
    block_gemm<false>(q, r, s, xs, s, 1, bs, 1, s, z, r);   // X b^T: B(k, j) = b[j, k]
    __syncthreads();
    block_gemm<true>(r, s, q, g, 1, r, xs, s, 1, db_acc, s);   // += G^T X
    block_gemm<true>(p, q, r, dys, r, 1, z, 1, r, da_acc, q);  // += dY Z^T: B(k, j) = Z[j, k]
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p * q; e += blockDim.x) atomicAdd(da + e, da_acc[e]);
  for (int e = threadIdx.x; e < r * s; e += blockDim.x) atomicAdd(db + e, db_acc[e]);
}

// Checks that `bytes` of dynamic shared memory fit on the device and allows them.
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes, int device, const char* name) {
  if (bytes > size_t(max_shared_bytes(device)))
    throw std::invalid_argument(std::string(name) + ": factors too large for shared memory");
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
             "cudaFuncSetAttribute");
}

}  // namespace

int64_t kron_forward_smem_bytes(int p, int q, int r, int s) {
  return KronDims{p, q, r, s}.forward_words() * int64_t(sizeof(float));
}
int64_t kron_backward_smem_bytes(int p, int q, int r, int s) {
  return KronDims{p, q, r, s}.backward_words() * int64_t(sizeof(float));
}

void kron_matmul_cuda(int dtype, std::uintptr_t x, std::uintptr_t a, std::uintptr_t b,
                      std::uintptr_t addend, double scale, std::uintptr_t y, int64_t tokens, int p,
                      int q, int r, int s, int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0) return;
  const KronDims d{p, q, r, s};
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    auto kernel = kron_forward_kernel<T>;
    const size_t bytes = size_t(d.forward_words()) * sizeof(float);
    allow_shared(kernel, bytes, device, "kron_matmul");
    const int64_t grid = std::min<int64_t>(tokens, int64_t(multiprocessors(device)) * 8);
    kernel<<<unsigned(grid), kThreads, bytes, stream>>>(as_ptr<const T>(x), as_ptr<const T>(a),
                                                        as_ptr<const T>(b), as_ptr<const T>(addend),
                                                        float(scale), as_ptr<T>(y), tokens, d);
    check_launch("kron_forward_kernel");
  });
}

void kron_factor_grads_cuda(int dtype, std::uintptr_t dy, std::uintptr_t x, std::uintptr_t a,
                            std::uintptr_t b, std::uintptr_t da, std::uintptr_t db, int64_t tokens,
                            int p, int q, int r, int s, int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0) return;
  const KronDims d{p, q, r, s};
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    auto kernel = kron_factor_grads_kernel<T>;
    const size_t bytes = size_t(d.backward_words()) * sizeof(float);
    allow_shared(kernel, bytes, device, "kron_matmul backward");
    const int64_t grid = std::min<int64_t>(tokens, int64_t(multiprocessors(device)) * 4);
    kernel<<<unsigned(grid), kThreads, bytes, stream>>>(
        as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(a), as_ptr<const T>(b),
        as_ptr<float>(da), as_ptr<float>(db), tokens, d);
    check_launch("kron_factor_grads_kernel");
  });
}

void bind_kron(py::module_& m) {
  m.def("kron_matmul", &kron_matmul_cuda, py::call_guard<py::gil_scoped_release>(),
        "y = x @ kron(a, b)^T on the given device and stream.");
  m.def("kron_factor_grads", &kron_factor_grads_cuda, py::call_guard<py::gil_scoped_release>(),
        "Accumulates da, db (float32, zeroed by the caller) of kron_matmul.");
  m.def("kron_forward_smem_bytes", &kron_forward_smem_bytes);
  m.def("kron_backward_smem_bytes", &kron_backward_smem_bytes);
}

}  // namespace lowrank
