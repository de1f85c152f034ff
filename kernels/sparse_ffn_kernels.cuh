/*
sparse_ffn_kernels.cuh: the two device kernels of sparse_ffn.cu (its header comment has the design): phase 1,
gate_up_kernel (W1 in full, W3 for the active units, g = g_t(W1 x) * W3 x) and phase 2, down_kernel
(y = sum over the active units of g_j W2t_j), with the loads and warp reductions they share.
Included by sparse_ffn.cu only, after its CUDA and ATen includes.
*/
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>


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
