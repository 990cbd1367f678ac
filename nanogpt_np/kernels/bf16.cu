// float32 <-> bfloat16 conversion; bf16 is stored as unsigned short (the top 16 bits of a float32).
// Same rounding as kernels/bf16.py and the hardware's cvt.rn.bf16.f32: round to nearest, ties to even; inf stays;
// every NaN -> the canonical NaN 0x7FFF (sign and payload dropped).
// One thread per element; traffic 6 bytes per element either way. No CUDA headers needed.

__device__ __forceinline__ unsigned short f32_to_bf16_rne(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;     // NaN -> canonical NaN, as cvt.rn.bf16.f32 gives
    u += 0x7fffu + ((u >> 16) & 1u);     // half an ulp, plus one more unit when the kept lsb is odd (ties to even)
    return (unsigned short)(u >> 16);
}

extern "C" __global__ void f32_to_bf16(unsigned short* __restrict__ out, const float* __restrict__ in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16_rne(in[i]);
}

extern "C" __global__ void bf16_to_f32(float* __restrict__ out, const unsigned short* __restrict__ in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __uint_as_float(((unsigned int)in[i]) << 16);
}

// Column sums of a bf16 (N, C) matrix, in float32: a bias gradient from a gradient written in bf16 for its
// matmul (kernels/mlp.py: c_fc's bias from the bf16 dpre when cuBLASLt refuses the DGELU_BGRAD epilogue).
// Block (32, 8), grid (ceil(C/32), nchunks): thread (tx, ty) sums column 32*blockIdx.x + tx over rows ty, ty+8,
// ... of its row chunk; the 8 partial sums are added in ty order in shared memory and written to
// partial[chunk, c] (the caller adds the chunks: a deterministic order).
#define RY 8
extern "C" __global__ void bf16_column_sum_partial(float* __restrict__ partial, const unsigned short* __restrict__ x,
                                                   int N, int C, int rows_per_chunk) {
    __shared__ float acc[RY][32];
    int tx = threadIdx.x, ty = threadIdx.y;
    int c = blockIdx.x * 32 + tx;
    int r0 = blockIdx.y * rows_per_chunk, r1 = min(N, r0 + rows_per_chunk);
    float s = 0.0f;
    if (c < C)
        for (int r = r0 + ty; r < r1; r += RY) s += __uint_as_float(((unsigned int)x[(long long)r * C + c]) << 16);
    acc[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < C) {
        float t = 0.0f;
        for (int k = 0; k < RY; k++) t += acc[k][tx];
        partial[(long long)blockIdx.y * C + c] = t;
    }
}
