// Softmax cross-entropy, forward and backward fused in one kernel, one block per row of logits.
//
//   m_n     = max_j z_nj,   s_n = sum_j exp(z_nj - m_n) = 1 + r_n   (one pass, the running-max trick)
//   loss_n  = (m_n - z_n[y_n]) + log1p(r_n)   for kept rows (y_n != ignore_index), 0 for masked rows
//   dz_nj   = (exp(z_nj - lse_n) - [j == y_n]) / n_kept for kept rows, 0 for masked rows (lse_n = m_n + log1p r_n)
// Two things keep a small loss accurate to float32's relative precision:
//  * the loss is not lse_n - z_n[y_n]: when the loss is small next to the logits (z ~ 100, loss ~ 0.01) that
//    difference cancels; m_n - z_n[y_n] is a difference of two logits (exact when the target is the max);
//  * the sum is kept as r = s - 1, the terms other than the max's own exp(0) = 1: s itself sits next to 1, where
//    a float has only ~1e-7 of resolution, so log(s) of a loss of 1e-5 would be wrong in the third digit, while
//    log1p(r) is accurate to the last bit of r. For the same reason the target's gradient p_y - 1 is computed as
//    expm1((z_y - m) - log1p(r)), not exp(...) - 1, and every exponent as (z - m) - log1p(r), never z - lse
//    (m + log1p(r) would round the small log1p(r) away).
// A target outside [0, V) that is not ignore_index gives a NaN loss and a NaN gradient row (the kernel never
// reads outside the row; the CPU op raises instead, which would need a host sync here). -inf logits are fine.
//
// The gradient is that of the mean loss with d loss = 1 (the usual case: the loss is the root of the graph).
// No probability matrix is stored: pass 1 reads the row once (from DRAM) keeping a running max m and a running
// r per thread; the block merges the (m, r) pairs; pass 2 reads the row again (it was just read: 200 KB at
// V=50257, mostly still in L2) and writes dz. dlogits may alias logits: each element is read and then written
// by the same thread, and pass 1 finished before (block barrier) - the gradient is written in place over the
// logits when the caller allows it. dlogits may be NULL (evaluation: loss only).
// Memory traffic per row: read V floats (+ a second read mostly from L2), write V floats.
// cross_entropy_fused_bf16 is the same on bf16 logits (bf16 bits, as the bf16 gemm of the chunked output layer
// writes them: kernels/lm_head_loss.py): each logit is widened to float32 exactly as it is read, all the math
// above is float32, and the gradient is rounded once to bf16 (round to nearest even) and written as bf16 bits,
// in place over the logits (the input of the next bf16 matmuls). Per row: read 2V bytes (twice), write 2V bytes.

#ifndef INFINITY                                 // NVRTC compiles without <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

// A running pair (m, r) stands for the sum s = 1 + r of exp(z - m) over the logits seen so far, m their max;
// m = -inf means none seen yet (s = 0; r is then 0 and unused).

// add one logit v; a -inf logit adds nothing (exp(-inf - -inf) would be NaN)
__device__ __forceinline__ void online_add(float& m, float& r, float v) {
    if (v > m) {                                 // a new max: the old terms rescale, the old max's 1 joins r
        r = (m == -INFINITY) ? 0.0f : (1.0f + r) * expf(m - v);
        m = v;
    } else if (v > -INFINITY) {
        r += expf(v - m);
    }
}

// the loss of one row from its (max, r) and the target's logit zy, without cancellation
__device__ __forceinline__ float row_loss(float m, float r, float zy) {
    return (m - zy) + log1pf(r);
}

// combine two (m, r) pairs into one: the pair with the larger max keeps its 1, the other's 1 + r rescales
__device__ __forceinline__ void merge(float& m, float& r, float m2, float r2) {
    if (m2 == -INFINITY) return;                 // the other is empty
    if (m == -INFINITY) { m = m2; r = r2; return; }
    if (m >= m2) {
        r += (1.0f + r2) * expf(m2 - m);
    } else {
        r = r2 + (1.0f + r) * expf(m - m2);
        m = m2;
    }
}

// bf16 bits of a float32, round to nearest even (the same function as bf16.cu's; each .cu compiles on its own)
__device__ __forceinline__ unsigned short f32_to_bf16_rne(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;     // NaN -> canonical NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// logit j of a row as a float32: float32 logits as they are; bf16 logits (bits: the high half of a float32)
// widened, which is exact. The row function below is written once for both (Logits: a pointer to either).
__device__ __forceinline__ float logit_at(const float* z, long long j) { return z[j]; }
__device__ __forceinline__ float logit_at(const unsigned short* z, long long j) {
    return __uint_as_float((unsigned int)z[j] << 16);
}

// One row (block) of the fused loss + gradient. The logits are float32 or bf16 bits (Logits: const float* or
// const unsigned short*). The gradient goes to d32 (float32) or d16 (bf16 bits, for the bf16 matmuls that read
// it next: half the bytes written and no separate cast pass), or nowhere when both are NULL; either may alias
// the logits of its own width. sm, sr: 32 floats of shared memory each, declared by the kernel.
template <typename Logits>
__device__ __forceinline__ void cross_entropy_row(float* __restrict__ losses, float* d32, unsigned short* d16,
                                                  Logits logits, const long long* __restrict__ targets,
                                                  const float* __restrict__ n_kept, int V, long long ignore_index,
                                                  float* sm, float* sr) {
    int row = blockIdx.x;
    Logits z = logits + (long long)row * V;
    // pass 1: per-thread running max and sum over a strided slice of the row (coalesced across the block)
    float m = -INFINITY, r = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        online_add(m, r, logit_at(z, j));
    }
    // warp merge (butterfly), then one pair per warp through shared memory, then warp 0 merges those
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off), r2 = __shfl_xor_sync(0xffffffffu, r, off);
        merge(m, r, m2, r2);
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    if (lane == 0) { sm[warp] = m; sr[warp] = r; }
    __syncthreads();
    if (warp == 0) {
        m = lane < nwarps ? sm[lane] : -INFINITY;
        r = lane < nwarps ? sr[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, off), r2 = __shfl_xor_sync(0xffffffffu, r, off);
            merge(m, r, m2, r2);
        }
        if (lane == 0) { sm[0] = m; sr[0] = r; }
    }
    __syncthreads();
    float m_row = sm[0], log1p_r = log1pf(sr[0]);     // lse = m_row + log1p_r, kept apart (see the top)
    long long y = targets[row];
    bool kept = (y != ignore_index);
    bool valid = kept && y >= 0 && y < V;        // an out-of-range target: NaN, and no read outside the row
    const float nan = __int_as_float(0x7fffffff);
    if (threadIdx.x == 0) losses[row] = !kept ? 0.0f : (valid ? row_loss(m_row, sr[0], logit_at(z, y)) : nan);
    if (d32 == nullptr && d16 == nullptr) return;
    __syncthreads();                             // z[y] is read above before any thread overwrites it in place
    // pass 2: the gradient
    float scale = kept ? 1.0f / *n_kept : 0.0f;
    long long base = (long long)row * V;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float e = (logit_at(z, j) - m_row) - log1p_r;     // log p_j
        float g = (kept && !valid) ? nan : scale * (j == y ? expm1f(e) : expf(e));     // p_j - [j == y]
        if (d16 != nullptr) d16[base + j] = f32_to_bf16_rne(g);
        else d32[base + j] = g;
    }
}

extern "C" __global__ void cross_entropy_fused(float* __restrict__ losses,     // (N,) out
                                               float* dlogits,                 // (N, V) out, may alias logits, or NULL
                                               const float* logits,            // (N, V)
                                               const long long* __restrict__ targets,  // (N,)
                                               const float* __restrict__ n_kept,       // device scalar
                                               int V, long long ignore_index) {
    __shared__ float sm[32], sr[32];
    cross_entropy_row(losses, dlogits, nullptr, logits, targets, n_kept, V, ignore_index, sm, sr);
}

// The same on bf16 logits, the gradient written as bf16 bits (round to nearest even), for the bf16 matmuls of
// the output layer (kernels/lm_head_loss.py, which passes the logits buffer as dlogits: in place).
extern "C" __global__ void cross_entropy_fused_bf16(float* __restrict__ losses,          // (N,) out
                                                    unsigned short* dlogits,  // (N, V) bf16, may alias logits, or NULL
                                                    const unsigned short* logits,         // (N, V) bf16
                                                    const long long* __restrict__ targets,  // (N,)
                                                    const float* __restrict__ n_kept,       // device scalar
                                                    int V, long long ignore_index) {
    __shared__ float sm[32], sr[32];
    cross_entropy_row(losses, nullptr, dlogits, logits, targets, n_kept, V, ignore_index, sm, sr);
}

// x *= *s for an n-element array (applies a d loss that is not 1, read from the device: no host sync).
extern "C" __global__ void scale_by_device_scalar(float* x, const float* __restrict__ s, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= *s;
}
