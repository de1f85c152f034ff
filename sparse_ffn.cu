/*
Sparse gated FFN for decoding: a torch CUDA extension, module _sparse_ffn_cuda.

Computes, for a batch x [B, d] with 1 <= B <= 16,

    y = W2 (g_t(W1 x) * (W3 x)),   g_t(u) = g(u) where |g(u)| > t, else 0;  g = relu or silu

reading W1 in full but W3 and W2 only for the active hidden units: unit j is active when
g_t(W1_j . x_b) != 0 for some row b (the union over the batch; other rows still get exactly 0 for
it). relu with t = 0 is the method's RELU; silu with t > 0 is CATS (a SILU model made sparse). Batch-1 decoding is memory bound, so at sparsity s the bytes read drop from
3*d*h to d*h*(1 + 2(1 - s)): the ideal speedup is 3 / (1 + 2(1 - s)).

Weights: w1 [h, d], w3 [h, d] (nn.Linear weights) and w2t [h, d] = W2^T, packed once at load time
so that the output weights of unit j are one contiguous row. All tensors contiguous, on one CUDA
device, one dtype in {float32, float16, bfloat16}; accumulation is fp32.

Python API:
    forward(x, w1, w3, w2t, out, gate, t) -> None
                                           gate 0 = relu, 1 = silu; t >= 0 the threshold;
                                           writes out [B, d] in full, on the current stream;
                                           no host sync, CUDA-graph capturable. B = 0 or d = 0
                                           is a no-op; out must not overlap the weights.
    reference(x, w1, w3, w2t, gate, t) -> y   the same FFN in fp32 with ATen ops (CPU or CUDA),
                                           returned in x's dtype.

Build:  python build.py     (torch.utils.cpp_extension.CUDAExtension "_sparse_ffn_cuda")
Files:  sparse_ffn.cu (this: the design, the reference, the launcher, the API), kernels/sparse_ffn_kernels.cuh (the kernels)
Test:   python -m pytest -q test_cuda.py   (against the PyTorch FFN; skips without a GPU)

Design (two kernels, no host round trip):
  phase 1, gate_up_kernel: one warp per hidden unit (two for B > 1, so x is loaded once per two
    rows) streams W1_j with 16-byte loads, reduces with warp shuffles and, only when the unit is
    active, streams W3_j too and writes g[j, b] = g_t(W1_j . x_b) * (W3_j . x_b) (0 if inactive).
    Its threads also zero phase 2's fp32 accumulator, which saves a memset launch.
  phase 2, down_kernel: y[b] = sum_j g[j, b] * W2t_j. The grid is (d-slices of 32 vectors) x
    (chunks of hidden units), about 4 blocks per SM. A block compacts the active units of its chunk
    in shared memory (scan of g, stable order), its 8 warps split them and stream 512-byte slices
    of their W2t rows, the warps' partial sums meet in shared memory and go to the accumulator
    with one fp32 atomicAdd (float4 on sm_90) per element. The last block to finish a slice
    (a counter per slice) converts that slice to the output dtype. So the active set never leaves
    the device, and with no active unit the output is still written (zeros).
  Why atomics rather than a deterministic two-level reduction: the partial sums would have to be
    written and then re-read by one block per slice, a latency tail of several microseconds in a
    kernel that moves 3 MB (d=2048, s=0.9). The cost: the order of the fp32 additions, hence the
    last bits of y, can vary from run to run.
  Rows that are not 16-byte aligned (d not a multiple of 16 / sizeof(dtype), or an offset
  pointer) take the same kernels with one-element loads: correct, not fast.
  Non-finite values: a NaN pre-activation counts as active, so NaN in x propagates as in torch;
  an inactive unit contributes exactly 0 even where W3_j . x is inf (dense torch gives 0 * inf).
*/
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

// ----------------------------------------------------------------------------------------------
// reference

at::Tensor reference(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3,
                     const at::Tensor& w2t, int64_t gate, double t) {
    const at::Tensor xf = x.to(at::kFloat);
    const at::Tensor pre = at::matmul(xf, w1.to(at::kFloat).t());           // (B, h)
    const at::Tensor g = gate == 0 ? at::relu(pre) : at::silu(at::clamp_min(pre, -1e4));
    const at::Tensor a = at::where(g.abs() <= t, at::zeros_like(g), g);
    const at::Tensor u = at::matmul(xf, w3.to(at::kFloat).t());            // (B, h)
    return at::matmul(a * u, w2t.to(at::kFloat)).to(x.scalar_type());      // (B, d)
}

// ----------------------------------------------------------------------------------------------
// kernels: phase 1 and phase 2, in their own file

#include "kernels/sparse_ffn_kernels.cuh"

// ----------------------------------------------------------------------------------------------
// launcher

static int sm_count(int device) {  // cached: no driver call once warm (e.g. under graph capture)
    static std::atomic<int> cache[64];
    int n = device < 64 ? cache[device].load() : 0;
    if (n == 0) {
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
        if (device < 64) cache[device].store(n);
    }
    return n;
}

template <typename T, int NB, int VEC>
void launch(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3,
            const at::Tensor& w2t, const at::Tensor& out, int gate, float t, cudaStream_t stream) {
    constexpr int R = NB == 1 ? 1 : 2;  // hidden units per phase-1 warp
    const int B = (int)x.size(0), d = (int)x.size(1), h = (int)w1.size(0);
    const int slices = (d / VEC + 31) / 32;

    // phase 2 grid: about 4 blocks per SM, as slices x chunks, at most kMaxUnits units a chunk
    const int sms = sm_count(x.get_device());
    int chunks = std::clamp((4 * sms + slices - 1) / slices, 1, h);
    const int units = std::min((h + chunks - 1) / chunks, kMaxUnits);
    chunks = (h + units - 1) / units;
    TORCH_CHECK(chunks <= 65535, "sparse_ffn: too many hidden units (h = ", h, ")");

    // fp32 scratch, one allocation: [acc B*d | slice counters | g h*B]
    const int64_t n_zero = (int64_t)B * d + slices;
    at::Tensor ws = at::empty({n_zero + (int64_t)h * B}, x.options().dtype(at::kFloat));
    float* acc = ws.data_ptr<float>();
    unsigned* done = reinterpret_cast<unsigned*>(acc + (int64_t)B * d);
    float* g = acc + n_zero;

    const auto ptr = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); };
    const int rows_per_block = kGateThreads / 32 * R;
    gate_up_kernel<T, NB, VEC, R><<<(h + rows_per_block - 1) / rows_per_block, kGateThreads, 0,
                                    stream>>>(ptr(x), ptr(w1), ptr(w3), g, acc, n_zero, B, d, h, gate, t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    down_kernel<T, NB, VEC><<<dim3(slices, chunks), kDownThreads, 0, stream>>>(
        g, ptr(w2t), acc, done, reinterpret_cast<T*>(out.data_ptr()), B, d, h, units);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_batch(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3,
                  const at::Tensor& w2t, const at::Tensor& out, int gate, float t,
                  cudaStream_t stream) {
    const int64_t B = x.size(0);  // register accumulators are sized for NB >= B rows
    if (B <= 1) launch<T, 1, VEC>(x, w1, w3, w2t, out, gate, t, stream);
    else if (B <= 2) launch<T, 2, VEC>(x, w1, w3, w2t, out, gate, t, stream);
    else if (B <= 4) launch<T, 4, VEC>(x, w1, w3, w2t, out, gate, t, stream);
    else if (B <= 8) launch<T, 8, VEC>(x, w1, w3, w2t, out, gate, t, stream);
    else launch<T, 16, VEC>(x, w1, w3, w2t, out, gate, t, stream);
}

template <typename T>
void launch_dtype(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3,
                  const at::Tensor& w2t, const at::Tensor& out, int gate, float t,
                  cudaStream_t stream) {
    constexpr int V = 16 / sizeof(T);
    const auto aligned = [](const at::Tensor& t) {
        return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
    };
    if (x.size(1) % V == 0 && aligned(x) && aligned(w1) && aligned(w3) && aligned(w2t))
        launch_batch<T, V>(x, w1, w3, w2t, out, gate, t, stream);
    else
        launch_batch<T, 1>(x, w1, w3, w2t, out, gate, t, stream);
}

// ----------------------------------------------------------------------------------------------
// binding

static void check_operand(const at::Tensor& t, const char* name, const at::Tensor& x) {
    TORCH_CHECK(t.is_cuda(), "sparse_ffn: ", name, " must be a CUDA tensor, got ", t.device());
    TORCH_CHECK(t.device() == x.device(), "sparse_ffn: ", name, " is on ", t.device(),
                " but x is on ", x.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "sparse_ffn: ", name, " has dtype ",
                t.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(t.dim() == 2, "sparse_ffn: ", name, " must be 2-D, got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "sparse_ffn: ", name, " must be contiguous");
}

void forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3,
             const at::Tensor& w2t, const at::Tensor& out, int64_t gate, double t) {
    const auto st = x.scalar_type();
    TORCH_CHECK(gate == 0 || gate == 1, "sparse_ffn: gate must be 0 (relu) or 1 (silu), got ", gate);
    TORCH_CHECK(t >= 0 && t < 1e30, "sparse_ffn: threshold t must be finite and >= 0, got ", t);
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                "sparse_ffn: dtype must be float32, float16 or bfloat16, got ", st);
    check_operand(x, "x", x);
    check_operand(w1, "w1", x);
    check_operand(w3, "w3", x);
    check_operand(w2t, "w2t", x);
    check_operand(out, "out", x);
    const int64_t B = x.size(0), d = x.size(1), h = w1.size(0);
    TORCH_CHECK(B <= kMaxBatch, "sparse_ffn: at most ", kMaxBatch, " rows in x, got ", B);
    TORCH_CHECK(w1.size(1) == d, "sparse_ffn: w1 must be [h, d] with d = ", d, ", got ",
                w1.sizes());
    TORCH_CHECK(w3.sizes() == w1.sizes(), "sparse_ffn: w3 must have w1's shape ", w1.sizes(),
                ", got ", w3.sizes());
    TORCH_CHECK(w2t.sizes() == w1.sizes(), "sparse_ffn: w2t (W2 transposed) must have w1's shape ",
                w1.sizes(), ", got ", w2t.sizes());
    TORCH_CHECK(out.sizes() == x.sizes(), "sparse_ffn: out must have x's shape ", x.sizes(),
                ", got ", out.sizes());
    TORCH_CHECK(d <= INT_MAX / kMaxBatch && h <= INT_MAX / kMaxBatch,
                "sparse_ffn: d and h must be below ", INT_MAX / kMaxBatch);
    if (B == 0 || d == 0) return;

    const c10::cuda::CUDAGuard guard(x.device());
    if (h == 0) {  // no hidden units: y = 0
        out.zero_();
        return;
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int g = (int)gate;
    const float tf = (float)t;
    if (st == at::kFloat) launch_dtype<float>(x, w1, w3, w2t, out, g, tf, stream);
    else if (st == at::kHalf) launch_dtype<__half>(x, w1, w3, w2t, out, g, tf, stream);
    else launch_dtype<__nv_bfloat16>(x, w1, w3, w2t, out, g, tf, stream);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "Sparse gated FFN: W1 read in full, W3 and W2 only for active units";
    m.def("forward", &forward,
          "forward(x, w1, w3, w2t, out, gate=0, t=0): out = W2 (g_t(W1 x) * (W3 x)), g relu (0) or silu (1)",
          py::arg("x"), py::arg("w1"), py::arg("w3"), py::arg("w2t"), py::arg("out"),
          py::arg("gate") = 0, py::arg("t") = 0.0);
    m.def("reference", &reference, "reference(x, w1, w3, w2t, gate=0, t=0): the same FFN with ATen ops, fp32",
          py::arg("x"), py::arg("w1"), py::arg("w3"), py::arg("w2t"), py::arg("gate") = 0,
          py::arg("t") = 0.0);
}
