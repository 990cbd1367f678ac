// Causal flash attention (forward and backward) on bf16 tensor cores, head size 64. sm_80 or newer.
//
// Never materialises the T x T score matrix. Per (batch*head, 128 query rows) a block of 8 warps streams 64-row
// tiles of K and V through shared memory; each warp owns 16 query rows and keeps its scores, probabilities
// and output accumulator in registers (the mma fragments), FlashAttention-2 style. A tile in shared memory
// serves all 128 rows of the block: K and V are re-read from global memory once per 128 query rows, not per 64.
//   S = Q K^T (tensor cores, bf16 in, f32 accumulate)  ->  online softmax per row (running max m, sum l)
//   O = O * exp(m_old - m_new) + P V                   ->  at the end O / l, and L = m + log2(l) is saved.
// Scores are kept in base 2: s2 = (q.k) * scale * log2(e), p = exp2(s2 - m) (exp2 is one instruction).
//
// Backward (recomputes P from Q, K and the saved L, so nothing of size T x T is stored either):
//   D_i = sum_d dO_i,d * O_i,d, with dO rounded to bf16 (backward_prep; it also writes a float32 dO as bf16, while
//   a dO that arrives as bf16, written so by the c_proj matmul's backward, is read in place)
//   P = exp2(s2 - L),  dP = dO V^T,  dS = P * (dP - D) (gradient of the scaled scores)
//   dV = P^T dO,  dK = scale * dS^T Q                  (kernel dkdv: a block per 128 keys, loops over queries)
//   dQ = scale * dS K                                  (kernel dq:   a block per 128 queries, loops over keys)
// Two kernels instead of atomics: every gradient element is written once, in a fixed order (deterministic).
// Both use 128-row blocks of 8 warps too (dkdv: 128 keys, streaming 64-query tiles of Q and dO; dq: 128 queries,
// streaming 64-key tiles of K and V), so each streamed tile is read once per 128 rows.
// Given db_partial, each block also writes the column sums of the gradient rows it wrote, per 64-row tile (4
// warps; dq, or dk and dv), to a row of its own (two per block): the qkv bias gradient is then the sum of those
// rows (one gemm).
//
// Causal skipping: a 128-row block spans two 64-row tiles on its diagonal. A warp whose 16 rows lie wholly before
// (forward, dq: all keys after its queries) or after (dkdv: all queries before its keys) a streamed tile skips
// it; the test depends on the warp only, so it is uniform within a warp, and it comes after the loop's two
// __syncthreads, so every thread still reaches every barrier (and copies its share of every tile).
//
// Streaming a tile (double buffering with cp.async, see "global -> shared tiles" below): each streamed tile has
// two buffers in shared memory. In iteration i:  __syncthreads (every warp is done with tile i-1)  ->  issue the
// copies of tile i+1 into the buffer tile i-1 used (cp.async: they run in the background)  ->  commit them as one
// group  ->  wait until only that newest group is in flight (tile i has landed)  ->  add the bias to the chunks
// this thread copied  ->  __syncthreads (every thread's chunks of tile i are in)  ->  compute on tile i while
// tile i+1 is on its way. The loads of the next tile thus overlap the mma work of the current one, instead of
// every warp waiting at the barrier for the global loads of the tile it is about to use.
//
// Tensor-core instruction: mma.sync.m16n8k16 (bf16 x bf16 -> f32): D(16x8) += A(16x16) * B(16x8).
// Lane l holds (g = l/4, t = l%4):  A: rows g and g+8, columns 2t,2t+1 and 2t+8,2t+9 (4 registers of 2 bf16);
// B: column g, rows 2t,2t+1 and 2t+8,2t+9 (2 registers); C/D: rows g, g+8, columns 2t, 2t+1 (4 floats).
// The C layout of one 16x16 product equals the A layout of the next (two 16x8 halves side by side), so P and dS
// go from accumulator registers straight into the next mma without shared memory.
// B fragments come from the tiles in shared memory by ldmatrix (four 8x8 matrices per instruction, see below).
//
// Layouts: q, k, v are read where the qkv matmul wrote them: one bf16 (unsigned short) tensor (B, T, 3C), C = NH*64;
// head h of batch b is the 64 columns at h*64 (q), C + h*64 (k), 2C + h*64 (v) of the rows b*T .. b*T+T-1,
// row stride 3C. The matmul's bias (3C,) float32 is added to each tile once it has landed in shared memory and to
// the fragments read from global memory (bf16 + bias, rounded back to bf16: the value the mma multiplies), or
// bias is NULL (already added). Rows t >= T of the last tile read as 0.
// dO (the gradient of out) is bf16 in out's layout (B, T, C): head h at columns h*64, row stride C. Tp = T rounded
// up to 128 (the query block) is the row count of L2 and D (one value per query row, rows t >= T included).
// out and dqkv are in the model's layout, (B, T, C) and (B, T, 3C): float32, or bf16 when the matmul that reads
// them runs in bf16 (the kernels take a float32 and a bf16 pointer and write the one that is not NULL: store2).
// Memory traffic (forward): Q read once, K and V once per 128-row query block that needs them (each K/V tile is
// reused by the block's 8 warps), out written once. Reading q, k, v in place costs no extra bytes: a tile row
// is 128 contiguous bytes (whole 32-byte sectors) and the 8 threads reading it are adjacent; the bias (64 floats
// per head) stays in cache. The price is ALU work: the bias is added to every value each time its tile is
// loaded (K, V once per query block), in shared memory (one more 16-byte shared load and store per 8 values,
// since cp.async cannot add it on the way). Shared memory (static, two buffers of each streamed 64-row tile,
// padded rows): K and V tiles = 36 KB (forward); Q, dO tiles + L, D + column sums = 41 KB (dkdv); K, V tiles +
// column sums = 38 KB (dq): under the 48 KB of static shared memory a block may have without opt-in.
// Each tile is stored once, as it is in memory ([row][d]): where an mma needs it transposed, ldmatrix .trans
// transposes it on the way to the registers. Blocks of 256 threads: registers (ptxas) decide how many fit on an
// SM; the forward asks for two (__launch_bounds__(256, 2): at most 128 registers, as it used before ldmatrix).

#define HS 64          // head size (fixed: GPT-2 and most models here)
#define TILE 64        // rows per tile (queries or keys) staged in shared memory
#define QBLOCK 128     // rows per block (queries: forward, dq; keys: dkdv): 8 warps of 16 rows
#define QWARPS (QBLOCK / 16)
#define LDS 72         // shared row stride in bf16: 64 + 8 padding, so the 8 rows an ldmatrix reads hit 32 banks
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned short bf16_t;

// two floats -> one register of two bf16 (round to nearest even); lo lands in the low half (lower address)
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// two adjacent elements i, i+1 of an output that is float32 (out) or bf16 (out_bf16), whichever is not NULL
__device__ __forceinline__ void store2(float* out, bf16_t* out_bf16, long long i, float a, float b) {
    if (out_bf16) *(unsigned*)(out_bf16 + i) = pack_bf16x2(a, b);
    else *(float2*)(out + i) = make_float2(a, b);
}

// c (16x8 f32) += a (16x16 bf16) * b (16x8 bf16)
__device__ __forceinline__ void mma_bf16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------- shared memory -> mma B fragments: ldmatrix
// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): the warp
// loads four 8x8 matrices of bf16 from shared memory in one instruction. Lane 8i + r gives the address of row r
// of matrix i (16 contiguous bytes, 16-byte aligned); register i of lane l (g = l/4, t = l%4) receives row g,
// elements 2t (low half) and 2t+1 of matrix i: the pairs an mma fragment holds. With .trans each matrix is
// transposed on the way: register i receives (row 2t, column g) and (row 2t+1, column g). So one ldmatrix
// replaces four 32-bit shared loads per lane, and .trans replaces a transposed copy of a tile in shared memory.
// Bank conflicts: the hardware reads one matrix (8 rows of 16 bytes) at a time; rows are LDS = 72 bf16 = 144
// bytes = 36 banks apart, so row r covers banks 4r .. 4r+3 (mod 32) and the 8 rows hit the 32 banks once each
// (rows of 64 bf16, unpadded, would all start at bank 0: an 8-way conflict).

// the address of p in the shared state space, which ldmatrix and cp.async take (a 32-bit offset)
__device__ __forceinline__ unsigned shared_address(const bf16_t* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const bf16_t* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const bf16_t* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)));
}

// Both loaders below give the mma B fragments (16 k x 8 n) of one 16-wide k chunk k0 .. k0+15 for two 8-wide n
// blocks: b[0], b[1] for columns n0 .. n0+7 and b[2], b[3] for n0+8 .. n0+15 (b0 holds k rows 2t, 2t+1 of
// column g, b1 rows 2t+8, 2t+9).
// From a tile that holds B transposed, [n][k] (K, Q, dO, V tiles as the second operand of Q K^T, K Q^T, V dO^T,
// dO V^T); p = the tile at (n0, k0). Matrix i: rows n0 + 8(i/2), columns k0 + 8(i%2): its row g, elements 2t,
// 2t+1 are B's column n0 + g (+8), k rows 2t, 2t+1 (+8).
__device__ __forceinline__ void load_b_x4(unsigned* b, const bf16_t* p, int lane) {
    ldmatrix_x4(b, p + (lane % 8 + 8 * (lane / 16)) * LDS + 8 * (lane / 8 % 2));
}

// From a tile that holds B itself, [k][n] (V, K, dO, Q tiles as the second operand of P V, dS K, P^T dO,
// dS^T Q); p = the tile at (k0, n0). Matrix i: rows k0 + 8(i%2), columns n0 + 8(i/2), transposed by .trans.
__device__ __forceinline__ void load_b_x4_trans(unsigned* b, const bf16_t* p, int lane) {
    ldmatrix_x4_trans(b, p + (lane % 8 + 8 * (lane / 8 % 2)) * LDS + 8 * (lane / 16));
}

// A fragments for k-chunk kk from two 16x8 accumulator tiles (columns 16kk..16kk+15)
__device__ __forceinline__ void acc_to_a(unsigned* a, const float* lo, const float* hi) {
    a[0] = pack_bf16x2(lo[0], lo[1]);
    a[1] = pack_bf16x2(lo[2], lo[3]);
    a[2] = pack_bf16x2(hi[0], hi[1]);
    a[3] = pack_bf16x2(hi[2], hi[3]);
}

// bias added to a register of two bf16 (the pair at columns c, c+1), rounded back to bf16
__device__ __forceinline__ unsigned add_bias2(unsigned p, const float* b) {
    return pack_bf16x2(__uint_as_float(p << 16) + b[0], __uint_as_float(p & 0xffff0000u) + b[1]);
}

// A head of q, k, v or dO as the kernels see it: `base` points at its row 0, column 0 in global memory,
// rows are `ld` elements apart, rows >= `rows` read as zero, and `bias` (its 64 values, or NULL) is added.
struct HeadIn {
    const bf16_t* base;
    const float* bias;
    long long ld;
    int rows;
};

// head h of part (0 q, 1 k, 2 v) of batch b in qkv (B, T, 3C); bias (3C,) or NULL
__device__ __forceinline__ HeadIn qkv_head(const bf16_t* qkv, const float* bias, int b, int h, int part,
                                           int T, int NH) {
    int C = NH * HS;
    HeadIn r;
    r.base = qkv + (long long)b * T * 3 * C + part * C + h * HS;
    r.bias = bias ? bias + part * C + h * HS : nullptr;
    r.ld = 3LL * C;
    r.rows = T;
    return r;
}

// head h of batch b in a (B, T, C) bf16 tensor (dO)
__device__ __forceinline__ HeadIn out_head(const bf16_t* x, int b, int h, int T, int NH) {
    int C = NH * HS;
    HeadIn r;
    r.base = x + (long long)b * T * C + h * HS;
    r.bias = nullptr;
    r.ld = C;
    r.rows = T;
    return r;
}

// two adjacent elements (row, col), (row, col+1) of a head, as one register of two bf16
__device__ __forceinline__ unsigned head_pair(const HeadIn& x, int row, int col) {
    if (row >= x.rows) return 0u;
    unsigned p = *(const unsigned*)(x.base + row * x.ld + col);
    return x.bias ? add_bias2(p, x.bias + col) : p;
}

// A fragment of the 16x16 block at (row0, col0) of a head
__device__ __forceinline__ void load_a_head(unsigned* a, const HeadIn& x, int row0, int col0, int g, int t) {
    a[0] = head_pair(x, row0 + g, col0 + 2 * t);
    a[1] = head_pair(x, row0 + g + 8, col0 + 2 * t);
    a[2] = head_pair(x, row0 + g, col0 + 2 * t + 8);
    a[3] = head_pair(x, row0 + g + 8, col0 + 2 * t + 8);
}

// ------------------------------------------------------------------ global -> shared tiles: cp.async
// cp.async.cg.shared.global [dst], [src], 16, src_size (PTX ISA, "Data Movement and Conversion Instructions:
// cp.async"): a 16-byte copy from global to shared memory that does not pass through registers and does not
// stall the thread that issues it; the thread goes on and the copy completes in the background. The first
// src_size bytes come from src, the rest are zeros (src_size 0: 16 zero bytes, nothing read). .cg: cached in
// L2 only (the tile's reuse happens in shared memory). src is a generic pointer to global memory, which is
// also its global address.
__device__ __forceinline__ void cp_async_16(bf16_t* dst, const bf16_t* src, int src_size) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(shared_address(dst)), "l"(src), "r"(src_size) : "memory");
}

// the same for 4 floats (L2 and D rows), all 16 bytes read
__device__ __forceinline__ void cp_async_16f(float* dst, const float* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
}

// cp.async.commit_group (PTX ISA, "cp.async.commit_group"): the copies this thread issued since its last commit
// become one group (an empty group when there were none).
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// cp.async.wait_group N (PTX ISA, "cp.async.wait_group"): waits until at most the N most recent groups of this
// thread are still in flight: the copies of the older groups are then in shared memory, seen by this thread.
// Other threads see them only after a __syncthreads that follows the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

// Double buffering: the kernels below keep two buffers per streamed tile. While the warps compute on tile i in
// one buffer, the copies of tile i+1 into the other are in flight; one group per loop iteration, so that
// "wait until at most 1 group is in flight" means "tile i has landed, tile i+1 may still be coming".

// Issue the copies of the 64x64 tile at rows row0.. of a head into shared memory (row stride LDS), raw bf16
// bits: 512 chunks of 16 bytes, 2 per thread. Rows >= x.rows become zeros (src_size 0; the address given is
// row 0's and is not read).
__device__ __forceinline__ void copy_tile_async(bf16_t* dst, const HeadIn& x, int row0) {
    for (int c = threadIdx.x; c < TILE * HS / 8; c += blockDim.x) {
        int row = c / 8, col = (c % 8) * 8;
        bool inside = row0 + row < x.rows;
        cp_async_16(dst + row * LDS + col, x.base + (inside ? row0 + row : 0) * x.ld + col, inside ? 16 : 0);
    }
}

// Issue the copies of 64 rows of L2 and of D (float32, one per query row) starting at element r: 16 + 16 chunks
// of 4 floats, by threads 0-31 (r is a multiple of 64: 16-byte aligned).
__device__ __forceinline__ void copy_rows_async(float* Ls, float* Ds, const float* L2, const float* D, long long r) {
    int i = threadIdx.x;
    if (i < TILE / 4) cp_async_16f(Ls + 4 * i, L2 + r + 4 * i);
    else if (i < TILE / 2) cp_async_16f(Ds + 4 * (i - TILE / 4), D + r + 4 * (i - TILE / 4));
}

// Once this thread's copies of the tile have landed (cp_async_wait, before the __syncthreads): the bias added
// to the chunks this thread copied itself (the same chunks c as copy_tile_async), rounded back to bf16; zero
// rows past the end stay zero. The price of cp.async: the bias can no longer be added in registers on the way
// from global to shared memory, so each biased chunk is read and written once more in shared memory.
__device__ __forceinline__ void add_tile_bias(bf16_t* dst, const HeadIn& x, int row0) {
    if (!x.bias) return;
    for (int c = threadIdx.x; c < TILE * HS / 8; c += blockDim.x) {
        int row = c / 8, col = (c % 8) * 8;
        if (row0 + row >= x.rows) continue;
        uint4 v = *(const uint4*)(dst + row * LDS + col);
        const float* b = x.bias + col;
        v.x = add_bias2(v.x, b); v.y = add_bias2(v.y, b + 2); v.z = add_bias2(v.z, b + 4); v.w = add_bias2(v.w, b + 6);
        *(uint4*)(dst + row * LDS + col) = v;
    }
}

// a value as store2 writes it: rounded to bf16 when the output is bf16
__device__ __forceinline__ float as_stored(const bf16_t* out_bf16, float v) {
    return out_bf16 ? __uint_as_float(pack_bf16x2(v, 0.0f) << 16) : v;
}

// A warp's 16 x 64 result block (8 accumulator fragments times `mult`, rows row0 .. row0+15, rows >= T skipped)
// written at out[base + row * ld + column] with store2. With sums, the warp also puts into colsum (shared, 64 floats)
// the column sums of its rows, of the values as written: per lane over its rows g and g+8, then over the
// 8 lanes of a column (shuffles across g), one 8-column fragment at a time. Fixed order: deterministic.
__device__ __forceinline__ void store_block(float* out, bf16_t* out_bf16, const float (*acc)[4], float mult,
                                            long long base, int ld, int row0, int T, int g, int t, float* colsum,
                                            bool sums) {
#pragma unroll
    for (int jd = 0; jd < 8; jd++) {
        float c0 = 0.0f, c1 = 0.0f;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int row = row0 + g + 8 * r;
            if (row < T) {
                float a = acc[jd][2 * r] * mult, b = acc[jd][2 * r + 1] * mult;
                store2(out, out_bf16, base + (long long)row * ld + 2 * t + 8 * jd, a, b);
                c0 += as_stored(out_bf16, a);
                c1 += as_stored(out_bf16, b);
            }
        }
        if (sums) {                                    // the same for the whole block: no divergent shuffle
#pragma unroll
            for (int off = 4; off < 32; off <<= 1) {
                c0 += __shfl_xor_sync(0xffffffffu, c0, off);
                c1 += __shfl_xor_sync(0xffffffffu, c1, off);
            }
            if (g == 0) { colsum[8 * jd + 2 * t] = c0; colsum[8 * jd + 2 * t + 1] = c1; }
        }
    }
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ------------------------------------------------------------------------------------------ float32 input
// qkv (B, T, 3C) float32 (+ bias (3C,), or NULL) -> the same layout in bf16, for a qkv matmul that wrote float32
// (float32 precision). One thread per pair of channels. With bf16 matmuls the matmul writes bf16 itself and
// the kernels below add the bias, so this pass is skipped.
extern "C" __global__ void qkv_to_bf16(bf16_t* __restrict__ out, const float* __restrict__ qkv,
                                       const float* __restrict__ bias, long long n_pairs, int C3) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_pairs) return;
    float2 a = *(const float2*)(qkv + 2 * i);
    if (bias) {
        int c = (int)((2 * i) % C3);
        a.x += bias[c]; a.y += bias[c + 1];
    }
    ((unsigned*)out)[i] = pack_bf16x2(a.x, a.y);
}

// ----------------------------------------------------------------------------------------------------- forward
// grid (Tp/128, B*NH), block 256: block = one 128-row query block, warp w = its 16 rows at 16w. Reads q, k, v
// from qkv (B, T, 3C) bf16 (+ bias, or NULL). Writes out (B, T, C) (float32 out or bf16 out_bf16) and
// L2 (B*NH, Tp) = log2 of each row's softmax sum (rows t >= T included: the backward reads them, and they are
// finite since key 0 is always visible).
// The block streams the 64-key tiles 0 .. 2*qb+1 (the causal ones of its last row). The last tile lies wholly
// after the rows of warps 0-3 (rows 128qb .. 128qb+63): they skip it (the test is per warp, so uniform within
// it), but still reach every barrier, since the skip comes after the loop's two __syncthreads.
extern "C" __global__ void __launch_bounds__(256, 2)
flash_attention_forward(float* __restrict__ out, bf16_t* __restrict__ out_bf16, float* __restrict__ L2,
                        const bf16_t* __restrict__ qkv, const float* __restrict__ bias,
                        int T, int Tp, int NH, float scale_log2) {
    __shared__ __align__(16) bf16_t Ks[2][TILE * LDS]; // K tiles, [key][d]: tile kt in buffer kt % 2
    __shared__ __align__(16) bf16_t Vs[2][TILE * LDS]; // V tiles, [key][d] (read transposed by ldmatrix .trans)
    int qb = gridDim.x - 1 - blockIdx.x;               // longest (most key tiles) blocks first
    int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    HeadIn Q = qkv_head(qkv, bias, b, h, 0, T, NH), K = qkv_head(qkv, bias, b, h, 1, T, NH),
           V = qkv_head(qkv, bias, b, h, 2, T, NH);
    int q0 = qb * QBLOCK + warp * 16;                  // this warp's first query row

    unsigned qa[4][4];                                 // the warp's 16x64 Q block as 4 A fragments
#pragma unroll
    for (int kc = 0; kc < 4; kc++) load_a_head(qa[kc], Q, q0, 16 * kc, g, t);

    float o[8][4];                                     // O accumulator 16x64: 8 tiles of 16x8
#pragma unroll
    for (int j = 0; j < 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};   // rows g and g+8

    int n_kt = (qb + 1) * (QBLOCK / TILE);             // key tiles up to the block's last row
    copy_tile_async(Ks[0], K, 0);                      // tile 0 on its way
    copy_tile_async(Vs[0], V, 0);
    cp_async_commit();
    for (int kt = 0; kt < n_kt; kt++) {
        int cur = kt % 2;
        __syncthreads();                               // the previous tiles are no longer read
        if (kt + 1 < n_kt) {                           // tile kt+1 into the other buffer, while tile kt is used
            copy_tile_async(Ks[1 - cur], K, (kt + 1) * TILE);
            copy_tile_async(Vs[1 - cur], V, (kt + 1) * TILE);
        }
        cp_async_commit();                             // (empty on the last tile: one group per iteration)
        cp_async_wait<1>();                            // forward: this thread's copies of tile kt have landed
        add_tile_bias(Ks[cur], K, kt * TILE);
        add_tile_bias(Vs[cur], V, kt * TILE);
        __syncthreads();                               // forward: every thread's copies of tile kt have landed
        if (kt * TILE > q0 + 15) continue;             // every key after every row of this warp: nothing to add
        const bf16_t* Kcur = Ks[cur];                  // tile kt's buffers
        const bf16_t* Vcur = Vs[cur];

        float s[8][4];                                 // S = Q K^T, 16 x 64 keys
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < 4; kc++)
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                unsigned kf[4];                        // keys 8j .. 8j+15, d 16kc .. 16kc+15
                load_b_x4(kf, Kcur + 8 * j * LDS + 16 * kc, lane);
                mma_bf16(s[j], qa[kc], kf[0], kf[1]);
                mma_bf16(s[j + 1], qa[kc], kf[2], kf[3]);
            }
        // scale into base 2, causal mask, running max over the row (4 lanes share a row)
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int row = q0 + g + (e >= 2 ? 8 : 0), key = kt * TILE + 8 * j + 2 * t + (e & 1);
                s[j][e] = (key <= row) ? s[j][e] * scale_log2 : NEG_INF;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
            }
        float alpha[2], rs[2] = {0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = quad_max(mx[r]);                   // finite: key kt*64 <= row always
            alpha[r] = exp2f(m[r] - mx[r]);            // 0 on the first tile (m = -inf)
            m[r] = mx[r];
        }
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) { s[j][e] = exp2f(s[j][e] - m[e >> 1]); rs[e >> 1] += s[j][e]; }
#pragma unroll
        for (int r = 0; r < 2; r++) l[r] = l[r] * alpha[r] + quad_sum(rs[r]);
#pragma unroll
        for (int j = 0; j < 8; j++) { o[j][0] *= alpha[0]; o[j][1] *= alpha[0]; o[j][2] *= alpha[1]; o[j][3] *= alpha[1]; }
        // O += P V: P (16 x 64 keys) straight from the S registers, V from shared (ldmatrix .trans)
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            unsigned pa[4];
            acc_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int jd = 0; jd < 8; jd += 2) {
                unsigned vb[4];                        // keys 16kk .. 16kk+15, d 8jd .. 8jd+15
                load_b_x4_trans(vb, Vcur + 16 * kk * LDS + 8 * jd, lane);
                mma_bf16(o[jd], pa, vb[0], vb[1]);
                mma_bf16(o[jd + 1], pa, vb[2], vb[3]);
            }
        }
    }
    int C = NH * HS;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int row = q0 + g + 8 * r;
        float inv = 1.0f / l[r];
        if (row < T) {
            long long dst = ((long long)b * T + row) * C + h * HS + 2 * t;
#pragma unroll
            for (int jd = 0; jd < 8; jd++) store2(out, out_bf16, dst + 8 * jd, o[jd][2 * r] * inv, o[jd][2 * r + 1] * inv);
        }
        if (t == 0) L2[(long long)bh * Tp + row] = m[r] + log2f(l[r]);
    }
}

// ---------------------------------------------------------------------------------------------------- backward
// One warp per (bh, t) row (t < Tp): D = sum_d bf16(dO) * O (float32; 0 for t >= T). dO arrives as float32 dout
// (then also written as bf16 into dO16, same layout (B, T, C), for the two kernels below) or as bf16 dout_bf16
// (then dO16 is NULL: they read dout_bf16 itself); O (the forward's output) as float32 out or bf16 out_bf16 (of
// each pair, the other pointer is NULL).
extern "C" __global__ void flash_attention_backward_prep(bf16_t* __restrict__ dO16, float* __restrict__ D,
                                                         const float* __restrict__ dout,
                                                         const bf16_t* __restrict__ dout_bf16,
                                                         const float* __restrict__ out,
                                                         const bf16_t* __restrict__ out_bf16,
                                                         int B, int T, int Tp, int NH) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= (long long)B * NH * Tp) return;
    int t = (int)(row % Tp), bh = (int)(row / Tp), b = bh / NH, h = bh % NH, C = NH * HS;
    float dot = 0.0f;
    unsigned p = 0;
    if (t < T) {
        long long off = ((long long)b * T + t) * C + h * HS + 2 * lane;
        float2 o;
        if (out_bf16) {
            unsigned ob = *(const unsigned*)(out_bf16 + off);
            o = make_float2(__uint_as_float(ob << 16), __uint_as_float(ob & 0xffff0000u));
        } else {
            o = *(const float2*)(out + off);
        }
        if (dout_bf16) {
            p = *(const unsigned*)(dout_bf16 + off);
        } else {
            float2 a = *(const float2*)(dout + off);
            p = pack_bf16x2(a.x, a.y);
            *(unsigned*)(dO16 + off) = p;
        }
        // D from the bf16 dO that dP = dO V^T will use, so that D = rowsum(P * dP) holds for the values the
        // kernels multiply (with the float32 dO, dS = P (dP - D) would carry a bias of bf16 size)
        dot = __uint_as_float(p << 16) * o.x + __uint_as_float(p & 0xffff0000u) * o.y;
    }
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) D[row] = dot;
}

// dK and dV. grid (Tp/128, B*NH), block 256: block = 128 keys, warp = 16 of them; loops over the 64-query tiles
// at or after its first key (the causal ones). On the first, 2kb, every query comes before the keys of warps
// 4-7 (keys 128kb+64 ..): they skip it (warp-uniform, after the barriers). Works on transposed scores S^T
// (keys x queries). q, k, v from qkv (+ bias) as in the forward, dO (B, T, C) bf16; writes the k and v thirds
// of dqkv (B, T, 3C).
// db_partial (B * Tp/64, 3C) float32, or NULL: per 64-key tile, the column sums of the dk, dv its 4 warps wrote,
// to row b * Tp/64 + 2kb (warps 0-3) or + 2kb + 1 (warps 4-7), columns C + h*64 and 2C + h*64 (the dq kernel
// fills the q third): the qkv bias gradient is then one sum over the rows (a gemm), with no second pass over dqkv.
extern "C" __global__ void __launch_bounds__(256)
flash_attention_backward_dkdv(float* __restrict__ dqkv, bf16_t* __restrict__ dqkv_bf16,
                              const bf16_t* __restrict__ qkv, const float* __restrict__ bias,
                              const bf16_t* __restrict__ dO, const float* __restrict__ L2, const float* __restrict__ D,
                              int T, int Tp, int NH, float scale_log2, float scale, float* __restrict__ db_partial) {
    __shared__ __align__(16) bf16_t Qs[2][TILE * LDS]; // Q tiles [q][d], double-buffered as in the forward
    __shared__ __align__(16) bf16_t dOs[2][TILE * LDS];// dO tiles [q][d]
    __shared__ __align__(16) float Ls[2][TILE], Ds[2][TILE];
    __shared__ float colsum[2][QWARPS][HS];            // per part (k, v) and warp: column sums of dk, dv
    int kb = blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH;   // low kb = most query tiles: launched first
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    HeadIn Q = qkv_head(qkv, bias, b, h, 0, T, NH), K = qkv_head(qkv, bias, b, h, 1, T, NH),
           V = qkv_head(qkv, bias, b, h, 2, T, NH), dOh = out_head(dO, b, h, T, NH);
    int k0 = kb * QBLOCK + warp * 16;

    unsigned ka[4][4], va[4][4];                       // this warp's 16 keys of K and V as A fragments
#pragma unroll
    for (int kc = 0; kc < 4; kc++) {
        load_a_head(ka[kc], K, k0, 16 * kc, g, t);
        load_a_head(va[kc], V, k0, 16 * kc, g, t);
    }
    float dk[8][4], dv[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[j][e] = dv[j][e] = 0.0f;

    int qt0 = kb * (QBLOCK / TILE), n_qt = Tp / TILE;  // the query tiles at or after the block's first key
    long long rows = (long long)bh * Tp;               // this head's rows of L2 and D
    copy_tile_async(Qs[0], Q, qt0 * TILE);
    copy_tile_async(dOs[0], dOh, qt0 * TILE);
    copy_rows_async(Ls[0], Ds[0], L2, D, rows + qt0 * TILE);
    cp_async_commit();
    for (int qt = qt0; qt < n_qt; qt++) {
        int cur = (qt - qt0) % 2, nxt = 1 - cur;
        __syncthreads();                               // the previous query tiles are no longer read
        if (qt + 1 < n_qt) {
            int r = (qt + 1) * TILE;
            copy_tile_async(Qs[nxt], Q, r);
            copy_tile_async(dOs[nxt], dOh, r);
            copy_rows_async(Ls[nxt], Ds[nxt], L2, D, rows + r);
        }
        cp_async_commit();
        cp_async_wait<1>();                            // dkdv: this thread's copies of query tile qt have landed
        add_tile_bias(Qs[cur], Q, qt * TILE);          // (dO has no bias)
        __syncthreads();                               // dkdv: every thread's copies of query tile qt have landed
        if (k0 > qt * TILE + TILE - 1) continue;       // every query before this warp's keys (warp-uniform)
        const bf16_t* Qcur = Qs[cur];                  // query tile qt's buffers
        const bf16_t* dOcur = dOs[cur];
        const float* Lcur = Ls[cur];
        const float* Dcur = Ds[cur];

        float s[8][4], dp[8][4];                        // S^T and dP^T: 16 keys x 64 queries
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < 4; kc++)
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                unsigned qf[4], of[4];                 // queries 8j .. 8j+15, d 16kc .. 16kc+15
                load_b_x4(qf, Qcur + 8 * j * LDS + 16 * kc, lane);
                mma_bf16(s[j], ka[kc], qf[0], qf[1]);  // S^T = K Q^T
                mma_bf16(s[j + 1], ka[kc], qf[2], qf[3]);
                load_b_x4(of, dOcur + 8 * j * LDS + 16 * kc, lane);
                mma_bf16(dp[j], va[kc], of[0], of[1]); // dP^T = V dO^T
                mma_bf16(dp[j + 1], va[kc], of[2], of[3]);
            }
        // P^T = exp2(s2 - L) where query >= key, else 0;  dS^T = P^T (dP^T - D)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + g + (e >= 2 ? 8 : 0), qi = 8 * j + 2 * t + (e & 1);
                float p = (qt * TILE + qi >= key) ? exp2f(s[j][e] * scale_log2 - Lcur[qi]) : 0.0f;
                s[j][e] = p;
                dp[j][e] = p * (dp[j][e] - Dcur[qi]);
            }
        // dV += P^T dO  and  dK += dS^T Q   (k = queries; B operands: the dO and Q tiles read with .trans)
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            unsigned pa[4], sa[4];
            acc_to_a(pa, s[2 * kk], s[2 * kk + 1]);
            acc_to_a(sa, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int jd = 0; jd < 8; jd += 2) {
                unsigned of[4], qf[4];                 // queries 16kk .. 16kk+15, d 8jd .. 8jd+15
                load_b_x4_trans(of, dOcur + 16 * kk * LDS + 8 * jd, lane);
                mma_bf16(dv[jd], pa, of[0], of[1]);
                mma_bf16(dv[jd + 1], pa, of[2], of[3]);
                load_b_x4_trans(qf, Qcur + 16 * kk * LDS + 8 * jd, lane);
                mma_bf16(dk[jd], sa, qf[0], qf[1]);
                mma_bf16(dk[jd + 1], sa, qf[2], qf[3]);
            }
        }
    }
    int C = NH * HS;
    long long base = (long long)b * T * 3 * C + h * HS;
    store_block(dqkv, dqkv_bf16, dk, scale, base + C, 3 * C, k0, T, g, t, colsum[0][warp], db_partial != nullptr);
    store_block(dqkv, dqkv_bf16, dv, 1.0f, base + 2 * C, 3 * C, k0, T, g, t, colsum[1][warp], db_partial != nullptr);
    if (db_partial == nullptr) return;
    __syncthreads();
    for (int i = threadIdx.x; i < 4 * HS; i += blockDim.x) {      // per part and 64-key tile: its 4 warps, in order
        int p = i / (2 * HS), half = i / HS % 2, d = i % HS, w = 4 * half;
        db_partial[((long long)b * 2 * gridDim.x + 2 * kb + half) * 3 * C + (p + 1) * C + h * HS + d] =
            ((colsum[p][w][d] + colsum[p][w + 1][d]) + colsum[p][w + 2][d]) + colsum[p][w + 3][d];
    }
}

// dQ. grid (Tp/128, B*NH), block 256: block = 128 query rows, warp = 16 of them; loops over the key tiles up to
// its last row, warps 0-3 skipping the last one (wholly after their rows), as in the forward.
// db_partial: as in dkdv, the q third, per 64-row tile: the block's rows 0-63 (warps 0-3) to row b * Tp/64 + 2qb,
// rows 64-127 (warps 4-7) to row b * Tp/64 + 2qb + 1 (columns h*64 ..).
extern "C" __global__ void __launch_bounds__(256)
flash_attention_backward_dq(float* __restrict__ dqkv, bf16_t* __restrict__ dqkv_bf16,
                            const bf16_t* __restrict__ qkv, const float* __restrict__ bias,
                            const bf16_t* __restrict__ dO, const float* __restrict__ L2, const float* __restrict__ D,
                            int T, int Tp, int NH, float scale_log2, float scale, float* __restrict__ db_partial) {
    __shared__ __align__(16) bf16_t Ks[2][TILE * LDS]; // K tiles [key][d], double-buffered as in the forward
    __shared__ __align__(16) bf16_t Vs[2][TILE * LDS]; // V tiles [key][d]
    __shared__ float colsum[QWARPS][HS];               // per warp: column sums of dq
    int qb = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    HeadIn Q = qkv_head(qkv, bias, b, h, 0, T, NH), K = qkv_head(qkv, bias, b, h, 1, T, NH),
           V = qkv_head(qkv, bias, b, h, 2, T, NH), dOh = out_head(dO, b, h, T, NH);
    int q0 = qb * QBLOCK + warp * 16;

    unsigned qa[4][4], da[4][4];                       // Q and dO rows of this warp
#pragma unroll
    for (int kc = 0; kc < 4; kc++) {
        load_a_head(qa[kc], Q, q0, 16 * kc, g, t);
        load_a_head(da[kc], dOh, q0, 16 * kc, g, t);
    }
    float Lr[2], Dr[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        Lr[r] = L2[(long long)bh * Tp + q0 + g + 8 * r];
        Dr[r] = D[(long long)bh * Tp + q0 + g + 8 * r];
    }
    float dq[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.0f;

    int n_kt = (qb + 1) * (QBLOCK / TILE);             // key tiles up to the block's last row
    copy_tile_async(Ks[0], K, 0);
    copy_tile_async(Vs[0], V, 0);
    cp_async_commit();
    for (int kt = 0; kt < n_kt; kt++) {
        int cur = kt % 2;
        __syncthreads();                               // the previous key tiles are no longer read
        if (kt + 1 < n_kt) {
            copy_tile_async(Ks[1 - cur], K, (kt + 1) * TILE);
            copy_tile_async(Vs[1 - cur], V, (kt + 1) * TILE);
        }
        cp_async_commit();
        cp_async_wait<1>();                            // dq: this thread's copies of key tile kt have landed
        add_tile_bias(Ks[cur], K, kt * TILE);
        add_tile_bias(Vs[cur], V, kt * TILE);
        __syncthreads();                               // dq: every thread's copies of key tile kt have landed
        if (kt * TILE > q0 + 15) continue;             // keys all after this warp's rows (warp-uniform)
        const bf16_t* Kcur = Ks[cur];                  // tile kt's buffers
        const bf16_t* Vcur = Vs[cur];

        float s[8][4], dp[8][4];                        // S and dP: 16 queries x 64 keys
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < 4; kc++)
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                unsigned kf[4], vf[4];                 // keys 8j .. 8j+15, d 16kc .. 16kc+15
                load_b_x4(kf, Kcur + 8 * j * LDS + 16 * kc, lane);
                mma_bf16(s[j], qa[kc], kf[0], kf[1]);  // S = Q K^T
                mma_bf16(s[j + 1], qa[kc], kf[2], kf[3]);
                load_b_x4(vf, Vcur + 8 * j * LDS + 16 * kc, lane);
                mma_bf16(dp[j], da[kc], vf[0], vf[1]); // dP = dO V^T
                mma_bf16(dp[j + 1], da[kc], vf[2], vf[3]);
            }
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int row = q0 + g + (e >= 2 ? 8 : 0), key = kt * TILE + 8 * j + 2 * t + (e & 1);
                float p = (key <= row) ? exp2f(s[j][e] * scale_log2 - Lr[e >> 1]) : 0.0f;
                dp[j][e] = p * (dp[j][e] - Dr[e >> 1]);   // dS
            }
        // dQ += dS K   (k = keys; B operand: the K tile read with .trans)
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            unsigned sa[4];
            acc_to_a(sa, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int jd = 0; jd < 8; jd += 2) {
                unsigned kf[4];                        // keys 16kk .. 16kk+15, d 8jd .. 8jd+15
                load_b_x4_trans(kf, Kcur + 16 * kk * LDS + 8 * jd, lane);
                mma_bf16(dq[jd], sa, kf[0], kf[1]);
                mma_bf16(dq[jd + 1], sa, kf[2], kf[3]);
            }
        }
    }
    int C = NH * HS;
    store_block(dqkv, dqkv_bf16, dq, scale, (long long)b * T * 3 * C + h * HS, 3 * C, q0, T, g, t,
                colsum[warp], db_partial != nullptr);
    if (db_partial == nullptr) return;
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * HS; i += blockDim.x) {      // per 64-row tile (half) its 4 warps, in order
        int half = i / HS, d = i % HS, w = 4 * half;
        db_partial[((long long)b * 2 * gridDim.x + 2 * qb + half) * 3 * C + h * HS + d] =
            ((colsum[w][d] + colsum[w + 1][d]) + colsum[w + 2][d]) + colsum[w + 3][d];
    }
}
