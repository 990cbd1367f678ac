// AdamW over every parameter at once, plus the global gradient norm for clipping, all on the device.
//
// The model keeps all parameters as views into one flat float32 buffer (decayed parameters first, then the
// rest), and likewise the gradients, so a whole optimizer step is three launches whatever the model size:
//   1. sumsq_partial:   each block adds g^2 over a grid-strided slice -> partial[block]
//   2. norm_and_scale:  one block adds the partials in a fixed order -> norm, clip scale (deterministic)
//   3. adamw_update:    one thread per element, reads the clip scale from device memory (no host sync):
//        g = g * scale
//        m = beta1*m + (1-beta1)*g,  v = beta2*v + (1-beta2)*g^2
//        p = p - lr * ( (m/bc1) / (sqrt(v/bc2) + eps) + wd_i * p )   wd_i = weight_decay for i < n_decay, else 0
//      lr, bc1 = 1 - beta1^step and bc2 = 1 - beta2^step change every step: they are read from a small device
//      array (step_scalars = [lr, bc1, bc2], written by one 12-byte host->device copy before the launch), so the
//      launch arguments are the same every step and a captured CUDA graph replays the right values.
//      Optionally also writes a bf16 copy of the new p (the weights the bf16 forward pass reads).
// Memory traffic of the update: read p, g, m, v and write p, m, v: 28 bytes per parameter (+2 with bf16 copy).

#define NORM_THREADS 256

__device__ __forceinline__ float block_sum(float v, float* shared32) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    v = (lane < blockDim.x / 32) ? shared32[lane] : 0.0f;
    if (warp == 0) for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;                                    // valid in warp 0 (thread 0 writes it)
}

// grid = fixed number of blocks (the wrapper uses the same count every step: the sum order never changes)
extern "C" __global__ void sumsq_partial(float* __restrict__ partial, const float* __restrict__ g, long long n) {
    __shared__ float sh[32];
    float s = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = g[i];
        s += v * v;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// one block: out[0] = global norm, out[1] = clip scale = min(1, max_norm / (norm + 1e-6)) (1 if max_norm <= 0)
extern "C" __global__ void norm_and_scale(float* __restrict__ out, const float* __restrict__ partial,
                                          int nparts, float max_norm) {
    __shared__ float sh[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += partial[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        float norm = sqrtf(s);
        out[0] = norm;
        out[1] = (max_norm > 0.0f) ? fminf(1.0f, max_norm / (norm + 1e-6f)) : 1.0f;
    }
}

__device__ __forceinline__ unsigned short f32_to_bf16_rne(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;     // NaN -> canonical NaN, as cvt.rn.bf16.f32 gives
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

extern "C" __global__ void adamw_update(float* __restrict__ p, const float* __restrict__ g,
                                        float* __restrict__ m, float* __restrict__ v,
                                        unsigned short* __restrict__ p_bf16,   // (n,) or NULL
                                        const float* __restrict__ clip,        // &out[1] of norm_and_scale, or NULL
                                        long long n, long long n_decay,
                                        const float* __restrict__ step_scalars,   // (3,) [lr, bc1, bc2]
                                        float beta1, float beta2, float eps, float weight_decay) {
    float scale = clip ? *clip : 1.0f;
    float lr = step_scalars[0], bc1 = step_scalars[1], bc2 = step_scalars[2];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i] * scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        float pi = p[i];
        float wd = (i < n_decay) ? weight_decay : 0.0f;
        pi -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * pi);
        m[i] = mi; v[i] = vi; p[i] = pi;
        if (p_bf16) p_bf16[i] = f32_to_bf16_rne(pi);
    }
}
