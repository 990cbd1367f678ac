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
