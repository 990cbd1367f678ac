// LayerNorm over the last dimension C of an (N, C) matrix, with the residual add fused in.
//
//   forward:  h = x + residual (+ residual_bias[c])   (only with a residual; h is written out: the new residual
//                                                     stream. The residual is float32, or bf16 bits when a bf16
//                                                     matmul wrote it; residual_bias is the bias of that matmul,
//                                                     added here instead of in its own pass)
//             mean = sum(h)/C,  rstd = 1/sqrt(sum((h-mean)^2)/C + eps)
//             out = (h - mean) * rstd * w + b            mean, rstd (N,) are saved for the backward
//             out is float32, or bf16 bits when out_bf16 is given instead (the next matmul reads bf16: no
//             separate conversion pass)
//   The residual stream in bf16 (the matmuls in bf16): h is stored as bf16 bits (h_out_bf16), and x, the previous
//   block's h, is read as bf16 bits (x_bf16). The sum is float32; it is rounded ONCE (to nearest even) when it is
//   stored, and the layernorm normalises that rounded h, so the backward, which re-reads the stored h, sees
//   exactly the forward's input. Without a residual, h_out_bf16 stores x itself rounded (the stream's start).
//   backward: xhat = (h - mean) * rstd,  g = dout * w
//             dh = rstd * (g - mean(g) - xhat * mean(g * xhat))   (+ dres: the gradient already flowing in the
//                  residual stream is added here, so the model needs no separate add kernel)
//             float32 math; dh is stored as float32 (dh), as bf16 bits rounded once (dh_bf16), or both when the
//                  two inputs of the add want different dtypes. With the stream in bf16 the one bf16 dh is the
//                  stream's gradient AND the dy of the bf16 matmul that made `residual` (no copy).
//                  h and dres (the stream's incoming gradient) may be bf16 bits.
//             dw = sum_rows dout * xhat,  db = sum_rows dout,  and with n_sums == 3 also
//             dresidual_bias = sum_rows dh (the residual bias is added to every row: its gradient is the column
//                  sum of the residual gradient; summed here while dh is in registers, unrounded, no second pass)
//
// Work split: one warp per row. A lane handles channels lane, lane+32, ... The three passes over a row
// (sum, centered sum of squares, write) read the row from DRAM once; the second and third reads hit L1/L2
// (a row is C*4 = 3 KB at C=768). Row reductions are warp shuffles (butterfly), no shared memory.
// Memory traffic (bytes per element; 4 for float32, 2 for bf16): forward reads x (+ residual), writes out
// (+ h); backward reads dout, h (+ dres), writes dh (and/or its bf16 form). With the stream in bf16 a block
// boundary moves 2 + 2 + 2 + 2 bytes forward (x, residual, h, y) and 2 + 2 + 2 + 2 backward (dout, h, dres, dh),
// against 4 + 2 + 4 + 2 and 2 + 4 + 4 + 4 + 2 with a float32 stream and a bf16 copy of dh.
//
// Deterministic column sums (dw, db, dresidual_bias): a block owns a fixed range of rows. Each warp
// accumulates its rows into its own slice of shared memory (no atomics: a lane only touches its own channels),
// the block then adds the warp slices in warp order and writes one partial row per block and sum;
// layernorm_param_reduce adds the partials in block order and ADDS the result into dw, db (and
// dresidual_bias): the model passes its flat gradient buffer's slices (docs/CONTRACTS.md, `*_into`).

typedef unsigned short bf16_t;

// float32 -> bf16 bits, round to nearest even, NaN -> 0x7FFF (the same conversion as bf16.cu)
__device__ __forceinline__ bf16_t f32_to_bf16_rne(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float bf16_to_f32(bf16_t b) { return __uint_as_float(((unsigned int)b) << 16); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;   // every lane holds the total
}

// A row of the residual stream (or of a layernorm input), float32 or bf16 bits: exactly one pointer is given.
__device__ __forceinline__ float load_row(const float* f, const bf16_t* b, long long i) {
    return b ? bf16_to_f32(b[i]) : f[i];
}

extern "C" __global__ void layernorm_forward(float* __restrict__ out,        // (N, C) float32, or NULL and:
                                             bf16_t* __restrict__ out_bf16,  // (N, C) bf16 bits, or NULL
                                             float* __restrict__ mean,       // (N,)
                                             float* __restrict__ rstd,       // (N,)
                                             float* h_out,                   // (N, C) x + residual, or NULL, or:
                                             bf16_t* h_out_bf16,             // (N, C) the same (or x) in bf16
                                             const float* x,                 // (N, C), or NULL and:
                                             const bf16_t* x_bf16,           // (N, C) bf16 bits
                                             const float* __restrict__ residual,  // (N, C) or NULL, or:
                                             const bf16_t* __restrict__ residual_bf16,  // (N, C) bf16 bits or NULL
                                             const float* __restrict__ residual_bias,  // (C,) or NULL
                                             const float* __restrict__ w, const float* __restrict__ b,
                                             int N, int C, float eps) {
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;                        // whole warp leaves together
    long long o = (long long)row * C;
    const float* src = x ? x + o : nullptr;      // where the layernorm's input (h) lives after pass 1:
    const bf16_t* src_bf16 = x_bf16 ? x_bf16 + o : nullptr;     // float32 or bf16 bits
    float s = 0.0f;
    bool add = residual != nullptr || residual_bf16 != nullptr;
    if (add || h_out_bf16) {                     // h written out: x + residual, or x alone stored as bf16
        for (int c = lane; c < C; c += 32) {
            float v = load_row(x, x_bf16, o + c);
            if (add) {
                float rv = residual_bf16 ? bf16_to_f32(residual_bf16[o + c]) : residual[o + c];
                v += residual_bias ? rv + residual_bias[c] : rv;
            }
            if (h_out_bf16) {                    // the stream stored in bf16: rounded once, and the layernorm
                bf16_t hb = f32_to_bf16_rne(v);  // normalises the ROUNDED value (what the backward re-reads)
                h_out_bf16[o + c] = hb;
                v = bf16_to_f32(hb);
            } else {
                h_out[o + c] = v;
            }
            s += v;
        }
        src = h_out_bf16 ? nullptr : h_out + o;  // this lane re-reads only what it wrote itself
        src_bf16 = h_out_bf16 ? h_out_bf16 + o : nullptr;
    } else {
        for (int c = lane; c < C; c += 32) s += load_row(src, src_bf16, c);
    }
    float m = warp_sum(s) / C;
    float ss = 0.0f;
    for (int c = lane; c < C; c += 32) { float d = load_row(src, src_bf16, c) - m; ss += d * d; }
    float r = rsqrtf(warp_sum(ss) / C + eps);
    for (int c = lane; c < C; c += 32) {
        float y = (load_row(src, src_bf16, c) - m) * r * w[c] + b[c];
        if (out_bf16) out_bf16[o + c] = f32_to_bf16_rne(y); else out[o + c] = y;
    }
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// blockDim.x = 32 * NW; dynamic shared memory = n_sums * NW * C floats. Block k owns rows
// [k*rows_per_block, (k+1)*rows_per_block). dh may alias dres (in-place accumulation into the residual grad).
// At least one of dh, dh_bf16 is given; both when the two inputs of the add want different dtypes (a float32 x
// and a bf16 matmul's residual, or a bf16 x and a float32 residual from dropout).
extern "C" __global__ void layernorm_backward(float* dh,                         // (N, C) out, or NULL
                                              bf16_t* __restrict__ dh_bf16,      // (N, C) out, or NULL
                                              float* __restrict__ partial,       // (n_sums, gridDim.x, C) out
                                              const float* __restrict__ dout,    // (N, C), or NULL and:
                                              const bf16_t* __restrict__ dout_bf16,  // (N, C) bf16 bits, or NULL
                                              const float* __restrict__ h,       // (N, C) the LN input, or NULL:
                                              const bf16_t* __restrict__ h_bf16, // (N, C) the LN input, bf16 bits
                                              const float* __restrict__ mean, const float* __restrict__ rstd,
                                              const float* __restrict__ w,
                                              const float* dres,                 // (N, C) or NULL, or:
                                              const bf16_t* __restrict__ dres_bf16,  // (N, C) bf16 bits or NULL
                                              int n_sums,                        // 2: dw, db;  3: and sum of dh
                                              int N, int C, int rows_per_block) {
    extern __shared__ float smem[];
    int NW = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* sdw = smem + warp * C;                // this warp's private accumulators
    float* sdb = smem + (NW + warp) * C;
    float* sdh = n_sums == 3 ? smem + (2 * NW + warp) * C : nullptr;
    for (int c = lane; c < C; c += 32) { sdw[c] = 0.0f; sdb[c] = 0.0f; if (sdh) sdh[c] = 0.0f; }

    int row_end = min(N, (blockIdx.x + 1) * rows_per_block);
    for (int row = blockIdx.x * rows_per_block + warp; row < row_end; row += NW) {
        long long o = (long long)row * C;
        float m = mean[row], r = rstd[row];
        // pass 1: the two row sums the dx formula needs, and the dw/db contributions
        float sg = 0.0f, sgx = 0.0f;
        for (int c = lane; c < C; c += 32) {
            float d = dout_bf16 ? bf16_to_f32(dout_bf16[o + c]) : dout[o + c];
            float xhat = (load_row(h, h_bf16, o + c) - m) * r, g = d * w[c];
            sg += g; sgx += g * xhat;
            sdw[c] += d * xhat; sdb[c] += d;
        }
        sg = warp_sum(sg) / C; sgx = warp_sum(sgx) / C;
        // pass 2: dx (re-reads dout and h from cache), plus the incoming residual gradient; float32 math, then
        // one rounding when dh is stored as bf16
        for (int c = lane; c < C; c += 32) {
            float d = dout_bf16 ? bf16_to_f32(dout_bf16[o + c]) : dout[o + c];
            float xhat = (load_row(h, h_bf16, o + c) - m) * r, g = d * w[c];
            float v = r * (g - sg - xhat * sgx);
            if (dres) v += dres[o + c];          // same thread reads dres then writes dh: aliasing is safe
            else if (dres_bf16) v += bf16_to_f32(dres_bf16[o + c]);
            if (dh) dh[o + c] = v;
            if (dh_bf16) dh_bf16[o + c] = f32_to_bf16_rne(v);
            if (sdh) sdh[c] += v;                // the residual bias's gradient: the unrounded float32 sum
        }
    }
    __syncthreads();
    // block sum of the warp slices, in warp order (deterministic)
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        for (int s = 0; s < n_sums; s++) {
            float a = 0.0f;
            for (int k = 0; k < NW; k++) a += smem[(s * NW + k) * C + c];
            partial[((long long)s * gridDim.x + blockIdx.x) * C + c] = a;
        }
    }
}

// Sum s of the per-block partials for channel c, in block order.
__device__ __forceinline__ float partial_total(const float* __restrict__ partial, int s, int nblocks, int C, int c) {
    float a = 0.0f;
    for (int k = 0; k < nblocks; k++) a += partial[((long long)s * nblocks + k) * C + c];
    return a;
}

// One thread per channel: add the per-block partials in block order, and ADD the totals into dw, db and,
// when given (the partials then have a third row), dsum. Coalesced across c.
extern "C" __global__ void layernorm_param_reduce(float* __restrict__ dw, float* __restrict__ db,
                                                  float* __restrict__ dsum,          // (C,) or NULL
                                                  const float* __restrict__ partial, // (2 or 3, nblocks, C)
                                                  int nblocks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    dw[c] += partial_total(partial, 0, nblocks, C, c);
    db[c] += partial_total(partial, 1, nblocks, C, c);
    if (dsum) dsum[c] += partial_total(partial, 2, nblocks, C, c);
}
