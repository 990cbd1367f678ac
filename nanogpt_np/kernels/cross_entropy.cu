// Softmax cross-entropy, forward and backward fused in one kernel, one block per row of logits.
//
//   m_n     = max_j z_nj,   s_n = sum_j exp(z_nj - m_n)   (one pass, the running-max trick)
//   loss_n  = (m_n - z_n[y_n]) + log(s_n)   for kept rows (y_n != ignore_index), 0 for masked rows
//   dz_nj   = (exp(z_nj - lse_n) - [j == y_n]) / n_kept for kept rows, 0 for masked rows (lse_n = m_n + log s_n)
// The loss is not computed as lse_n - z_n[y_n]: when the loss is small next to the logits (z ~ 100, loss ~ 0.01)
// that difference cancels and loses digits; m_n - z_n[y_n] is exact-ish (both are logits) and log(s_n) small.
// A target outside [0, V) that is not ignore_index gives a NaN loss and a NaN gradient row (the kernel never
// reads outside the row; the CPU op raises instead, which would need a host sync here). -inf logits are fine.
//
// The gradient is that of the mean loss with d loss = 1 (the usual case: the loss is the root of the graph).
// No probability matrix is stored: pass 1 reads the row once (from DRAM) keeping a running max m and a running
// sum s of exp(z - m) per thread; the block merges the (m, s) pairs; pass 2 reads the row again (it was just
// read: 200 KB at V=50257, mostly still in L2) and writes dz. dlogits may alias logits: each element is read
// and then written by the same thread, and pass 1 finished before (block barrier) - the gradient is written in
// place over the logits when the caller allows it. dlogits may be NULL (evaluation: loss only).
// Memory traffic per row: read V floats (+ a second read mostly from L2), write V floats.

#ifndef INFINITY                                 // NVRTC compiles without <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

// add one logit v to a running (max m, sum s of exp(z - m)); a -inf logit adds nothing (exp(-inf - -inf) is NaN)
__device__ __forceinline__ void online_add(float& m, float& s, float v) {
    if (v > m) { s = s * expf(m - v) + 1.0f; m = v; }
    else if (v > -INFINITY) { s += expf(v - m); }
}

// the loss of one row from its (max, sum) and the target's logit zy, without cancellation
__device__ __forceinline__ float row_loss(float m, float s, float zy) {
    return (m - zy) + logf(s);
}

__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    // combine two (max, sum of exp(z - max)) pairs into one
    float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;                 // both empty
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

extern "C" __global__ void cross_entropy_fused(float* __restrict__ losses,     // (N,) out
                                               float* dlogits,                 // (N, V) out, may alias logits, or NULL
                                               const float* logits,            // (N, V)
                                               const long long* __restrict__ targets,  // (N,)
                                               const float* __restrict__ n_kept,       // device scalar
                                               int V, long long ignore_index) {
    __shared__ float sm[32], ss[32];
    int row = blockIdx.x;
    const float* z = logits + (long long)row * V;
    // pass 1: per-thread running max and sum over a strided slice of the row (coalesced across the block)
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        online_add(m, s, z[j]);
    }
    // warp merge (butterfly), then one pair per warp through shared memory, then warp 0 merges those
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
        merge(m, s, m2, s2);
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        m = lane < nwarps ? sm[lane] : -INFINITY;
        s = lane < nwarps ? ss[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
            merge(m, s, m2, s2);
        }
        if (lane == 0) { sm[0] = m; ss[0] = s; }
    }
    __syncthreads();
    float lse = sm[0] + logf(ss[0]);
    long long y = targets[row];
    bool kept = (y != ignore_index);
    bool valid = kept && y >= 0 && y < V;        // an out-of-range target: NaN, and no read outside the row
    const float nan = __int_as_float(0x7fffffff);
    if (threadIdx.x == 0) losses[row] = !kept ? 0.0f : (valid ? row_loss(sm[0], ss[0], z[y]) : nan);
    if (dlogits == nullptr) return;
    __syncthreads();                             // z[y] is read above before any thread overwrites it in place
    // pass 2: the gradient
    float scale = kept ? 1.0f / *n_kept : 0.0f;
    float* d = dlogits + (long long)row * V;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float p = expf(z[j] - lse);
        d[j] = (kept && !valid) ? nan : scale * (p - (j == y ? 1.0f : 0.0f));
    }
}

// x *= *s for an n-element array (applies a d loss that is not 1, read from the device: no host sync).
extern "C" __global__ void scale_by_device_scalar(float* x, const float* __restrict__ s, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= *s;
}
