// The softmax part of causal attention, for the cuBLAS batched-matmul form:
//   S = Q K^T (cuBLAS) -> P = causal_softmax(scale * S) (this file) -> Y = P V (cuBLAS)
// Backward: dP = dY V^T (cuBLAS) -> dS = scale * P * (dP - rowsum(dP * P)) (this file) -> dQ = dS K, dK = dS^T Q.
//
// Layout: (BH, T, T) row-major, BH = batch * heads. One warp per row (b, h, t); only columns j <= t are live,
// j > t are written as 0 (masked). Forward keeps a running (max, sum) per lane in one pass over the live
// columns (online softmax), merges the 32 pairs with shuffles, then writes the row. Traffic: read the live
// half of S once (the second read hits L1/L2), write the full row. Works in place (P may alias S).

#ifndef INFINITY                                 // NVRTC compiles without <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

extern "C" __global__ void causal_softmax_forward(float* P, const float* S, int BH, int T, float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= (long long)BH * T) return;
    int t = (int)(row % T);
    const float* s_row = S + row * T;
    float* p_row = P + row * T;
    float m = -INFINITY, s = 0.0f;
    for (int j = lane; j <= t; j += 32) {
        float v = s_row[j] * scale;
        if (v > m) { s = s * expf(m - v) + 1.0f; m = v; } else { s += expf(v - m); }
    }
    for (int off = 16; off > 0; off >>= 1)
        merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
    float inv = 1.0f / s;
    for (int j = lane; j < T; j += 32)
        p_row[j] = (j <= t) ? expf(s_row[j] * scale - m) * inv : 0.0f;
}

// dS may alias dP. Masked entries have P = 0, so dS = 0 there; they are written without reading.
extern "C" __global__ void causal_softmax_backward(float* dS, const float* __restrict__ P, const float* dP,
                                                   int BH, int T, float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= (long long)BH * T) return;
    int t = (int)(row % T);
    const float* p = P + row * T;
    const float* dp = dP + row * T;
    float* ds = dS + row * T;
    float dot = 0.0f;
    for (int j = lane; j <= t; j += 32) dot += p[j] * dp[j];
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    for (int j = lane; j < T; j += 32)
        ds[j] = (j <= t) ? scale * p[j] * (dp[j] - dot) : 0.0f;
}
