// GELU (GPT-2's tanh form) with an optional bias add fused in front of it.
// (In bf16 precision the model's MLP normally runs its GELU on cuBLASLt's matmul epilogues instead,
// kernels/mlp.py; these kernels serve float32 precision and the MLP when cuBLASLt is absent or refuses.)
//
//   forward:  a = x + bias[c]   (bias may be NULL),   out = 0.5 * a * (1 + tanh(u)),  u = s*(a + k*a^3)
//             s = sqrt(2/pi), k = 0.044715
//   backward: da = dout * (0.5*(1 + tanh(u)) + 0.5*a*(1 - tanh(u)^2) * s*(1 + 3k*a^2))
//             dbias = sum over rows of da   (fused into the same pass)
//
// Only x (the pre-bias input) is kept for the backward: tanh is recomputed, which is cheaper than storing
// and re-reading a second N*C array. Memory traffic: forward reads x, writes out (bias stays in L1/L2);
// backward reads dout and x, writes dx (+ a small partial row per row-chunk for dbias).
//
// bf16 outputs: out (forward) and dx (biased backward) each feed a bf16 matmul (the MLP's c_proj, and c_fc's
// backward). The kernels take two output pointers, a float32 one and a bf16 one, and write whichever is not
// NULL; the dbias sum is always taken from the float32 values, before rounding.
//
// bf16 inputs (the *_bf16x / *_bf16 kernels): in bf16 precision c_fc's gemm writes x as bf16 bits and
// mlp.c_proj's backward gemm writes dout as bf16 bits; these kernels read them (half the bytes), widen them
// exactly to float32 (the 16 bits become the high half) and compute in float32 as the float32 kernels do.
// One body serves both input types: a template over the input pointer type, with load_in() overloaded for
// const float* and const bf16_t* (the template parameter is the pointer type itself, not T*, so that the CPU
// emulator's checked pointers, tests/emulation/cuda, fit it as well). Where bf16 rounding happens on this
// path: x once (c_fc's gemm), dout once (c_proj's gemm), out / dx once when stored; a = x + bias, gelu, gelu'
// and the dbias sums stay float32.
//
// dbias: column_sum_finish writes the sum of the chunk partials, or adds it into out (add_into = 1: the bias
// gradient's slice of the model's flat gradient buffer, docs/CONTRACTS.md), so no separate add pass is needed.

#define GELU_S 0.7978845608028654f   // sqrt(2/pi)
#define GELU_K 0.044715f

typedef unsigned short bf16_t;

// float32 -> bf16 bits, round to nearest even, NaN -> 0x7FFF (the same conversion as bf16.cu)
__device__ __forceinline__ bf16_t f32_to_bf16_rne(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// element i of an output that is float32 (out) or bf16 (out_bf16), whichever is not NULL
__device__ __forceinline__ void store(float* out, bf16_t* out_bf16, long long i, float v) {
    if (out_bf16) out_bf16[i] = f32_to_bf16_rne(v); else out[i] = v;
}

// element i of an input that is float32 or bf16 bits (widened exactly)
__device__ __forceinline__ float load_in(const float* x, long long i) { return x[i]; }
__device__ __forceinline__ float load_in(const bf16_t* x, long long i) { return __uint_as_float((unsigned)x[i] << 16); }

// elements 4*i4 .. 4*i4+3 as a float4: one float4 load, or 4 bf16 read as two 32-bit words (low half = lower
// address); needs 16-byte (float) / 8-byte (bf16) alignment
__device__ __forceinline__ float4 load_in4(const float4* x, long long i4) { return x[i4]; }
__device__ __forceinline__ float4 load_in4(const bf16_t* x, long long i4) {
    const unsigned* w = (const unsigned*)x + 2 * i4;
    unsigned w0 = w[0], w1 = w[1];
    return make_float4(__uint_as_float(w0 << 16), __uint_as_float(w0 & 0xffff0000u),
                       __uint_as_float(w1 << 16), __uint_as_float(w1 & 0xffff0000u));
}

__device__ __forceinline__ float gelu_fwd(float a) {
    float u = GELU_S * (a + GELU_K * a * a * a);
    return 0.5f * a * (1.0f + tanhf(u));
}

__device__ __forceinline__ float gelu_grad(float a) {
    float th = tanhf(GELU_S * (a + GELU_K * a * a * a));
    return 0.5f * (1.0f + th) + 0.5f * a * (1.0f - th * th) * GELU_S * (1.0f + 3.0f * GELU_K * a * a);
}

// One thread per element. n = N*C; bias (C,) or NULL. out may alias x. Writes out or out_bf16.
// X: const float* or const bf16_t* (the input's type; the two kernels below).
template <typename X>
__device__ __forceinline__ void gelu_forward_body(float* out, bf16_t* out_bf16, X x, const float* bias,
                                                  long long n, int C) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float a = load_in(x, i);
    if (bias) a += bias[i % C];
    store(out, out_bf16, i, gelu_fwd(a));
}

extern "C" __global__ void gelu_forward(float* out, bf16_t* __restrict__ out_bf16, const float* x,
                                        const float* __restrict__ bias, long long n, int C) {
    gelu_forward_body(out, out_bf16, x, bias, n, C);
}

// x as bf16 bits (c_fc's gemm wrote them in bf16 precision)
extern "C" __global__ void gelu_forward_bf16x(float* out, bf16_t* __restrict__ out_bf16, const bf16_t* x,
                                             const float* __restrict__ bias, long long n, int C) {
    gelu_forward_body(out, out_bf16, x, bias, n, C);
}

// Same with vector loads: one thread per 4 elements; needs n % 4 == 0 and C % 4 == 0 (when biased).
// Stores a float4, or 4 bf16 as two 32-bit words (low half = lower address).
// X4: const float4* or const bf16_t* (4 bf16 read as two 32-bit words).
template <typename X4>
__device__ __forceinline__ void gelu_forward4_body(float4* out, bf16_t* out_bf16, X4 x, const float4* bias,
                                                   long long n4, int C4) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float4 a = load_in4(x, i);
    if (bias) { float4 bb = bias[i % C4]; a.x += bb.x; a.y += bb.y; a.z += bb.z; a.w += bb.w; }
    float4 y = make_float4(gelu_fwd(a.x), gelu_fwd(a.y), gelu_fwd(a.z), gelu_fwd(a.w));
    if (out_bf16) {
        unsigned* o = (unsigned*)out_bf16 + 2 * i;
        o[0] = f32_to_bf16_rne(y.x) | ((unsigned)f32_to_bf16_rne(y.y) << 16);
        o[1] = f32_to_bf16_rne(y.z) | ((unsigned)f32_to_bf16_rne(y.w) << 16);
    } else {
        out[i] = y;
    }
}

extern "C" __global__ void gelu_forward_f4(float4* out, bf16_t* __restrict__ out_bf16, const float4* x,
                                           const float4* __restrict__ bias, long long n4, int C4) {
    gelu_forward4_body(out, out_bf16, x, bias, n4, C4);
}

// x as bf16 bits, 4 per thread (8-byte loads)
extern "C" __global__ void gelu_forward_bf16x4(float4* out, bf16_t* __restrict__ out_bf16, const bf16_t* x,
                                              const float4* __restrict__ bias, long long n4, int C4) {
    gelu_forward4_body(out, out_bf16, x, bias, n4, C4);
}

// Unbiased backward, one thread per element (any shape). dx may alias dout.
extern "C" __global__ void gelu_backward(float* dx, const float* dout, const float* __restrict__ x, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dx[i] = dout[i] * gelu_grad(x[i]);
}

// Biased backward with the dbias column sum fused in. Writes dx (float32) or dx_bf16; dbias from the float32 d.
// Block = 32 x RY threads, grid = (ceil(C/32), nchunks). Thread (tx, ty) owns column c = 32*blockIdx.x + tx and
// walks the rows ty, ty+RY, ... of its row chunk: a warp reads 32 consecutive elements of one row (coalesced).
// Its running dbias sum stays in a register; the RY partials of a column are added in ty order in shared
// memory and written to partial[chunk, c]; column_sum_finish adds the chunks in order (deterministic).
// T: const float* or const bf16_t* (dout and x have the same type; the two kernels below).
#define RY 8
template <typename T>
__device__ __forceinline__ void bias_gelu_backward_body(float* dx, bf16_t* dx_bf16, float* partial, T dout, T x,
                                                        const float* bias, int N, int C, int rows_per_chunk) {
    __shared__ float acc[RY][32];
    int tx = threadIdx.x, ty = threadIdx.y;
    int c = blockIdx.x * 32 + tx;
    int r0 = blockIdx.y * rows_per_chunk, r1 = min(N, r0 + rows_per_chunk);
    float s = 0.0f;
    if (c < C) {
        float bc = bias[c];
        for (int r = r0 + ty; r < r1; r += RY) {
            long long i = (long long)r * C + c;
            float d = load_in(dout, i) * gelu_grad(load_in(x, i) + bc);
            store(dx, dx_bf16, i, d);
            s += d;
        }
    }
    acc[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < C) {
        float t = 0.0f;
        for (int k = 0; k < RY; k++) t += acc[k][tx];
        partial[(long long)blockIdx.y * C + c] = t;
    }
}

extern "C" __global__ void bias_gelu_backward(float* dx, bf16_t* __restrict__ dx_bf16, float* __restrict__ partial,
                                              const float* dout, const float* __restrict__ x,
                                              const float* __restrict__ bias, int N, int C, int rows_per_chunk) {
    bias_gelu_backward_body(dx, dx_bf16, partial, dout, x, bias, N, C, rows_per_chunk);
}

// dout and x as bf16 bits (mlp.c_proj's backward gemm and c_fc's forward gemm wrote them in bf16 precision)
extern "C" __global__ void bias_gelu_backward_bf16(float* dx, bf16_t* __restrict__ dx_bf16, float* __restrict__ partial,
                                                   const bf16_t* dout, const bf16_t* __restrict__ x,
                                                   const float* __restrict__ bias, int N, int C, int rows_per_chunk) {
    bias_gelu_backward_body(dx, dx_bf16, partial, dout, x, bias, N, C, rows_per_chunk);
}

// One thread per column: t = sum over chunks of partial[chunk, c], in chunk order; out[c] = t, or with
// add_into = 1 out[c] += t (a gradient buffer that already holds other contributions).
extern "C" __global__ void column_sum_finish(float* __restrict__ out, const float* __restrict__ partial,
                                             int nchunks, int C, int add_into) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float t = 0.0f;
    for (int k = 0; k < nchunks; k++) t += partial[(long long)k * C + c];
    out[c] = add_into ? out[c] + t : t;
}
