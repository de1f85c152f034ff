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
// kernels

constexpr int kMaxBatch = 16;
constexpr int kGateThreads = 256;  // phase 1: 8 warps, each on its own hidden unit(s)
constexpr int kDownThreads = 256;  // phase 2: 8 warps sharing one d-slice
constexpr int kDownWarps = kDownThreads / 32;
constexpr int kMaxUnits = 1024;    // phase 2: most hidden units one block scans
constexpr int kUnroll = 4;         // phase 1: loads in flight per lane and row
constexpr unsigned kFull = 0xffffffffu;

// A "vector" is VEC consecutive elements read with one load: 16 bytes (uint4) on the fast path,
// one element (VEC = 1, read as raw bits) on the unaligned fallback.
template <typename T, int VEC>
using Raw = std::conditional_t<VEC * sizeof(T) == 16, uint4,
                               std::conditional_t<sizeof(T) == 4, unsigned, unsigned short>>;

// Weights are read once per token: stream them (evict-first) so x and g stay in cache.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) { return __ldcs(p); }
__device__ __forceinline__ unsigned ld_stream(const unsigned* p) { return __ldcs(p); }
__device__ __forceinline__ unsigned short ld_stream(const unsigned short* p) { return __ldcs(p); }

// The low 16 / high 16 bits of a 32-bit word (the whole word for float) as float, and back.
template <typename T> struct Num;
template <> struct Num<float> {
    static __device__ float lo(unsigned w) { return __uint_as_float(w); }
    static __device__ float from_float(float v) { return v; }
};
template <> struct Num<__nv_bfloat16> {
    static __device__ float lo(unsigned w) { return __uint_as_float(w << 16); }
    static __device__ float hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
    static __device__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Num<__half> {
    static __device__ float lo(unsigned w) { return __half2float(__ushort_as_half(w & 0xffffu)); }
    static __device__ float hi(unsigned w) { return __half2float(__ushort_as_half(w >> 16)); }
    static __device__ __half from_float(float v) { return __float2half_rn(v); }
};

template <typename T, int VEC>
__device__ __forceinline__ void unpack(const Raw<T, VEC>& r, float (&f)[VEC]) {
    if constexpr (VEC == 1) {
        f[0] = Num<T>::lo(r);
    } else {
        const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            if constexpr (sizeof(T) == 4) {
                f[k] = Num<T>::lo(w[k]);
            } else {  // little endian: element 2k in the low half
                f[2 * k] = Num<T>::lo(w[k]);
                f[2 * k + 1] = Num<T>::hi(w[k]);
            }
        }
    }
}

// acc[r][b] += W_r[v] . x_b[v] for one vector v of R rows (w holds their raw loads).
template <typename T, int NB, int VEC, int R>
__device__ __forceinline__ void fma_vector(const Raw<T, VEC> (&w)[R], const Raw<T, VEC>* x,
                                           int nvec, int v, int B, float (&acc)[R][NB]) {
    float wf[R][VEC];
#pragma unroll
    for (int r = 0; r < R; r++) unpack<T, VEC>(w[r], wf[r]);
#pragma unroll
    for (int b = 0; b < NB; b++) {
        if (b < B) {
            float xf[VEC];
            unpack<T, VEC>(__ldg(x + (size_t)b * nvec + v), xf);  // x is tiny: L1 hits
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int i = 0; i < VEC; i++) acc[r][b] = fmaf(wf[r][i], xf[i], acc[r][b]);
        }
    }
}

// acc[r][b] = rows[r] . x_b, computed by one warp; every lane ends with the full sums.
template <typename T, int NB, int VEC, int R>
__device__ __forceinline__ void warp_dot(const Raw<T, VEC>* const (&rows)[R],
                                         const Raw<T, VEC>* x, int nvec, int B, int lane,
                                         float (&acc)[R][NB]) {
    using RawT = Raw<T, VEC>;
    int v = lane;
    for (; v + 32 * (kUnroll - 1) < nvec; v += 32 * kUnroll) {
        RawT w[kUnroll][R];  // issue all loads first: bytes in flight are what a GEMV needs
#pragma unroll
        for (int u = 0; u < kUnroll; u++)
#pragma unroll
            for (int r = 0; r < R; r++) w[u][r] = ld_stream(rows[r] + v + 32 * u);
#pragma unroll
        for (int u = 0; u < kUnroll; u++)
            fma_vector<T, NB, VEC, R>(w[u], x, nvec, v + 32 * u, B, acc);
    }
    for (; v < nvec; v += 32) {
        RawT w[R];
#pragma unroll
        for (int r = 0; r < R; r++) w[r] = ld_stream(rows[r] + v);
        fma_vector<T, NB, VEC, R>(w, x, nvec, v, B, acc);
    }
    // xor butterfly: each lane adds the same pairs, so all lanes hold bit-identical sums
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < NB; b++)
            if (b < B)
#pragma unroll
                for (int o = 16; o > 0; o /= 2) acc[r][b] += __shfl_xor_sync(kFull, acc[r][b], o);
}

// g(u) as model.py computes it: relu keeps NaN; silu clamped at -1e4 (no value changes) so that
// -inf gives -0 and not NaN
__device__ __forceinline__ float gate_value(float u, int gate) {
    if (gate == 0) return u <= 0.f ? 0.f : u;
    u = u < -1e4f ? -1e4f : u;
    return u / (1.f + __expf(-u));
}

// Phase 1. g[j, b] = g_t(W1_j . x_b) * (W3_j . x_b), W3_j read only if unit j is active.
template <typename T, int NB, int VEC, int R>
__global__ void __launch_bounds__(kGateThreads)
gate_up_kernel(const T* __restrict__ x, const T* __restrict__ w1, const T* __restrict__ w3,
               float* __restrict__ g, float* __restrict__ zero, int64_t n_zero, int B, int d,
               int h, int gate, float t) {
    using RawT = Raw<T, VEC>;
    // side job: zero phase 2's accumulator and slice counters
    for (int64_t i = (int64_t)blockIdx.x * kGateThreads + threadIdx.x; i < n_zero;
         i += (int64_t)gridDim.x * kGateThreads)
        zero[i] = 0.f;

    const int lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * (kGateThreads / 32) + threadIdx.x / 32) * R;
    if (row0 >= h) return;  // the whole warp leaves together
    const int nvec = d / VEC;
    const RawT* xv = reinterpret_cast<const RawT*>(x);

    const RawT* rows[R];  // past the last row: re-read row h-1, result dropped below
#pragma unroll
    for (int r = 0; r < R; r++)
        rows[r] = reinterpret_cast<const RawT*>(w1) + (size_t)min(row0 + r, h - 1) * nvec;
    float a[R][NB] = {};
    warp_dot<T, NB, VEC, R>(rows, xv, nvec, B, lane, a);

#pragma unroll
    for (int r = 0; r < R; r++) {
        const int j = row0 + r;
        if (j >= h) break;
        bool active = false, on[NB];
#pragma unroll
        for (int b = 0; b < NB; b++) {
            a[r][b] = gate_value(a[r][b], gate);
            on[b] = b < B && !(fabsf(a[r][b]) <= t);  // NaN is active: it propagates, as in torch
            active |= on[b];
        }
        float u[1][NB] = {};
        if (__any_sync(kFull, active)) {
            const RawT* row3[1] = {reinterpret_cast<const RawT*>(w3) + (size_t)j * nvec};
            warp_dot<T, NB, VEC, 1>(row3, xv, nvec, B, lane, u);
        }
        if (lane == 0)
#pragma unroll
            for (int b = 0; b < NB; b++)
                if (b < B) g[(size_t)j * B + b] = on[b] ? a[r][b] * u[0][b] : 0.f;
    }
}

__device__ __forceinline__ void atomic_add4(float* p, float4 v) {  // p is 16-byte aligned
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(p), v);
#else
    atomicAdd(p, v.x); atomicAdd(p + 1, v.y); atomicAdd(p + 2, v.z); atomicAdd(p + 3, v.w);
#endif
}

// Phase 2. acc[b, slice] += sum over active j in this block's chunk of g[j, b] * W2t_j[slice];
// the last block of each slice writes out[:, slice] = acc[:, slice] in the output dtype.
template <typename T, int NB, int VEC>
__global__ void __launch_bounds__(kDownThreads)
down_kernel(const float* __restrict__ g, const T* __restrict__ w2t, float* __restrict__ acc,
            unsigned* __restrict__ done, T* __restrict__ out, int B, int d, int h, int units) {
    using RawT = Raw<T, VEC>;
    constexpr int kWidth = 32 * VEC;                      // elements per slice
    constexpr int kUnits = NB <= 1 ? 8 : NB <= 4 ? 4 : 2;  // rows in flight per warp
    __shared__ int list[kMaxUnits];
    __shared__ int warp_count[kDownWarps];
    __shared__ __align__(16) float red[kDownWarps][kWidth];
    __shared__ bool last;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nvec = d / VEC;
    const int e0 = blockIdx.x * kWidth;  // first element of this slice

    // 1. compact the active units of the chunk, in increasing order
    const int j_end = min(h, (int)blockIdx.y * units + units);
    int n = 0;
    for (int base = blockIdx.y * units; base < j_end; base += kDownThreads) {
        const int j = base + threadIdx.x;
        bool active = false;
        if (j < j_end)
#pragma unroll
            for (int b = 0; b < NB; b++)
                if (b < B) active |= g[(size_t)j * B + b] != 0.f;  // true for NaN too
        const unsigned mask = __ballot_sync(kFull, active);
        if (lane == 0) warp_count[warp] = __popc(mask);
        __syncthreads();
        int offset = n;
#pragma unroll
        for (int w = 0; w < kDownWarps; w++) {
            offset += w < warp ? warp_count[w] : 0;
            n += warp_count[w];
        }
        if (active) list[offset + __popc(mask & ((1u << lane) - 1u))] = j;
        __syncthreads();  // list complete, warp_count free for the next round
    }

    // 2. each warp takes every 8th active unit; lane owns vector column col of the rows
    float s[NB][VEC] = {};
    const int col = blockIdx.x * 32 + lane;
    if (col < nvec) {
        const RawT* w = reinterpret_cast<const RawT*>(w2t) + col;
        for (int k0 = warp; k0 < n; k0 += kDownWarps * kUnits) {
            RawT wr[kUnits];
            float gv[kUnits][NB];
#pragma unroll
            for (int u = 0; u < kUnits; u++) {
                const int k = k0 + u * kDownWarps;
                const int j = k < n ? list[k] : 0;
                wr[u] = k < n ? ld_stream(w + (size_t)j * nvec) : RawT{};
#pragma unroll
                for (int b = 0; b < NB; b++)
                    gv[u][b] = (k < n && b < B) ? g[(size_t)j * B + b] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < kUnits; u++) {
                float wf[VEC];
                unpack<T, VEC>(wr[u], wf);
#pragma unroll
                for (int b = 0; b < NB; b++)
#pragma unroll
                    for (int i = 0; i < VEC; i++) s[b][i] = fmaf(gv[u][b], wf[i], s[b][i]);
            }
        }
    }

    // 3. sum the 8 warps in shared memory, one atomic per element (or float4) into acc
    if (n > 0) {
#pragma unroll
        for (int b = 0; b < NB; b++) {
            if (b >= B) break;
#pragma unroll
            for (int i = 0; i < VEC; i++) red[warp][lane * VEC + i] = s[b][i];
            __syncthreads();
            float* dst = acc + (size_t)b * d + e0;
            if constexpr (VEC % 4 == 0) {  // d % 4 == 0 here, so groups never straddle d
                for (int e = 4 * threadIdx.x; e < kWidth && e0 + e < d; e += 4 * kDownThreads) {
                    float4 t = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
                    for (int q = 0; q < kDownWarps; q++) {
                        const float4 p = *reinterpret_cast<const float4*>(&red[q][e]);
                        t.x += p.x; t.y += p.y; t.z += p.z; t.w += p.w;
                    }
                    atomic_add4(dst + e, t);
                }
            } else {
                for (int e = threadIdx.x; e < kWidth && e0 + e < d; e += kDownThreads) {
                    float t = 0.f;
#pragma unroll
                    for (int q = 0; q < kDownWarps; q++) t += red[q][e];
                    atomicAdd(dst + e, t);
                }
            }
            __syncthreads();  // red is reused for the next b
        }
    }

    // 4. the last block of this slice converts it (threadFenceReduction pattern)
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done + blockIdx.x, 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int width = min(kWidth, d - e0);
    for (int t = threadIdx.x; t < B * width; t += kDownThreads) {
        const size_t i = (size_t)(t / width) * d + e0 + t % width;
        out[i] = Num<T>::from_float(__ldcg(acc + i));  // L2, where the atomics landed
    }
}

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
