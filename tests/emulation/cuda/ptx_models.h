// ptx_models.h - C++ models of the inline PTX instructions the kernels use, written from the PTX ISA manual:
// cvt.rn.bf16x2.f32, mma.sync (m16n8k16 bf16), ldmatrix (m8n8 x4, .trans), cp.async (.cg, 16 bytes) with
// cp.async.commit_group, cp.async.wait_group and cp.async.wait_all.
//
// rewrite.py turns `asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));` into
// `emu::ptx::cvt_rn_bf16x2_f32(__LINE__, r, hi, lo);`: the operands in the order the instruction names them
// (%0, %1, ...), outputs by reference. An instruction without a model here is a compile error.
#pragma once

namespace emu {
namespace ptx {

// float32 -> bfloat16, round to nearest even; infinities stay; no flush of denormals (cvt without .ftz keeps
// them). NaN becomes the canonical NaN 0x7FFF: what the CUDA headers' own float -> bf16 conversion returns;
// that the cvt instruction gives the same bits is an assumption until a GPU run checks it.
inline uint16_t f32_to_bf16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    uint32_t lsb = (u >> 16) & 1u;            // ties go to the even neighbour
    return (uint16_t)((u + 0x7fffu + lsb) >> 16);
}

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// cvt.rn.bf16x2.f32 d, a, b: a goes to the upper half of d, b to the lower half.
inline void cvt_rn_bf16x2_f32(int, unsigned& d, float a, float b) {
    d = ((unsigned)f32_to_bf16_rn(a) << 16) | f32_to_bf16_rn(b);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0..d3}, {a0..a3}, {b0, b1}, {c0..c3}
// A warp-wide instruction: every lane gives its fragments of A (16x16), B (16x8) and C (16x8); the warp
// computes D = A B + C and every lane gets back its fragment of D. A lane waits here until all 32 arrive.
inline void mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(int line, float& d0, float& d1, float& d2, float& d3,
                                                                unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                                                unsigned b0, unsigned b1, float c0, float c1,
                                                                float c2, float c3) {
    Fiber* f = M().cur;
    uint32_t in[10] = {a0, a1, a2, a3, b0, b1};
    float c[4] = {c0, c1, c2, c3};
    memcpy(in + 6, c, sizeof c);
    memcpy(f->in, in, sizeof in);
    warp_collective(MMA_M16N8K16_BF16, 0xffffffffu, 0, line);
    float d[4];
    memcpy(d, f->out, sizeof d);
    d0 = d[0]; d1 = d[1]; d2 = d[2]; d3 = d[3];
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 {d0..d3}, [addr]   (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"). A warp-wide load of four 8x8 matrices of 16-bit elements from shared memory: lane
// 8i + r gives the shared address of row r of matrix i (16 contiguous bytes, 16-byte aligned); register i of
// every lane receives its piece of matrix i (the exchange, ldmatrix_m8n8 below). `param` = matrix count | .trans << 8.
inline void ldmatrix_x4(int line, unsigned& d0, unsigned& d1, unsigned& d2, unsigned& d3, uint64_t addr, int trans) {
    Fiber* f = M().cur;
    f->in[0] = (uint32_t)addr;
    f->in[1] = (uint32_t)(addr >> 32);
    warp_collective(LDMATRIX, 0xffffffffu, 4 | trans << 8, line);
    d0 = f->out[0]; d1 = f->out[1]; d2 = f->out[2]; d3 = f->out[3];
}
inline void ldmatrix_sync_aligned_m8n8_x4_shared_b16(int line, unsigned& d0, unsigned& d1, unsigned& d2,
                                                     unsigned& d3, uint64_t addr) {
    ldmatrix_x4(line, d0, d1, d2, d3, addr, 0);
}
inline void ldmatrix_sync_aligned_m8n8_x4_trans_shared_b16(int line, unsigned& d0, unsigned& d1, unsigned& d2,
                                                           unsigned& d3, uint64_t addr) {
    ldmatrix_x4(line, d0, d1, d2, d3, addr, 1);
}

// cp.async.cg.shared.global [dst], [src], 16{, src_size}   (PTX ISA, "Data Movement and Conversion
// Instructions: cp.async"). An asynchronous copy of 16 bytes from global to shared memory (.cg allows only 16):
// the first src_size bytes are read from src, the rest of the 16 are zeros. Between the issue and the wait the
// destination's bytes are undefined (the copy may land at any moment), so the model makes them NaN (0xFF bytes)
// at the issue and writes the data only when this thread's cp.async.wait_group / wait_all covers the copy's
// group: a read before the wait (a missing or too lenient wait, or another thread reading without a barrier
// after the wait) sees NaN, and so does a thread still reading the old contents of a buffer that another
// thread has already started to refill (a missing barrier before the issue). The source is read (and checked)
// at the issue. The destination must be 16-byte aligned inside one __shared__ array, the source 16-byte
// aligned inside its allocation.
template <class T>
void cp_async_cg_shared_global(int line, uint64_t dst, ptr<T> src, int src_size) {
    Fiber* f = M().cur;
    if (src_size < 0 || src_size > 16) fault("cp.async at line %d: src-size %d is not in 0..16", line, src_size);
    AsyncCopy c;
    c.dst = shared_at(dst, 16, 16, "cp.async destination", line);
    memset(c.dst, 0xFF, 16);
    c.group = -1;
    memset(c.bytes, 0, 16);
    const char* s = (const char*)src.p;
    if ((uintptr_t)s % 16) fault("cp.async at line %d: source %s not 16-byte aligned", line,
                                 region_name(src.region, src.lo).c_str());
    if (src_size > 0) {
        if (src.hi == nullptr || s < src.lo || s + src_size > src.hi)
            fault("cp.async at line %d: %d source bytes at byte offset %lld of %s, which has %lld bytes", line,
                  src_size, (long long)(s - src.lo), region_name(src.region, src.lo).c_str(),
                  (long long)(src.hi - src.lo));
        memcpy(c.bytes, s, src_size);
    }
    f->async.push_back(c);
}
template <class T>
void cp_async_cg_shared_global(int line, uint64_t dst, ptr<T> src) {
    cp_async_cg_shared_global(line, dst, src, 16);
}

// cp.async.commit_group: this thread's copies issued since its last commit become one group (possibly empty).
inline void cp_async_commit_group(int) {
    Fiber* f = M().cur;
    for (AsyncCopy& c : f->async)
        if (c.group < 0) c.group = f->async_groups;
    f->async_groups++;
}

// cp.async.wait_group n: waits until at most the n most recent committed groups of this thread are pending:
// every copy of an older group lands now. Copies not yet committed are not waited for. Only this thread's
// copies: other threads see them after a barrier.
inline void cp_async_wait_group(int line, int n) {
    Fiber* f = M().cur;
    if (n < 0) fault("cp.async.wait_group at line %d: negative count %d", line, n);
    std::vector<AsyncCopy> left;
    for (AsyncCopy& c : f->async) {
        if (c.group >= 0 && c.group < f->async_groups - n) memcpy(c.dst, c.bytes, 16);
        else left.push_back(c);
    }
    f->async.swap(left);
}

// cp.async.wait_all: commit_group, then wait_group 0.
inline void cp_async_wait_all(int line) {
    cp_async_commit_group(line);
    cp_async_wait_group(line, 0);
}

}  // namespace ptx

// ldmatrix's exchange, once all 32 lanes have arrived (PTX ISA, ldmatrix, "matrix fragment for ldmatrix"):
// matrix i is read from the 8 row addresses of lanes 8i .. 8i+7. Without .trans, lane l (g = l/4, t = l%4)
// gets row g, elements 2t (low half) and 2t+1 (high half) of matrix i in register i; with .trans the matrix is
// transposed on the way: register i gets elements (row 2t, column g) (low) and (row 2t+1, column g) (high).
inline void ldmatrix_m8n8(Fiber* lanes[32], int param, int line) {
    int num = param & 0xff;
    bool trans = (param >> 8) & 1;
    uint16_t mat[4][8][8];
    for (int i = 0; i < num; i++)
        for (int r = 0; r < 8; r++) {
            const Fiber* src = lanes[8 * i + r];
            uint64_t addr = (uint64_t)src->in[0] | (uint64_t)src->in[1] << 32;
            char what[64];
            snprintf(what, sizeof what, "ldmatrix row address of lane %d", 8 * i + r);
            memcpy(mat[i][r], shared_at(addr, 16, 16, what, line), 16);
        }
    for (int l = 0; l < 32; l++) {
        int g = l / 4, t = l % 4;
        for (int i = 0; i < num; i++) {
            uint16_t lo = trans ? mat[i][2 * t][g] : mat[i][g][2 * t];
            uint16_t hi = trans ? mat[i][2 * t + 1][g] : mat[i][g][2 * t + 1];
            lanes[l]->out[i] = (uint32_t)lo | (uint32_t)hi << 16;
        }
    }
}

// The exchange itself, done once all 32 lanes have arrived. Fragment layout (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"), with group g = lane / 4 and t = lane % 4:
//   A (row-major 16x16): register i holds two elements (low half first):
//        a0,a1: row g,   cols 2t, 2t+1      a2,a3: row g+8, cols 2t, 2t+1
//        a4,a5: row g,   cols 2t+8, 2t+9    a6,a7: row g+8, cols 2t+8, 2t+9
//   B (16x8, "col": stored by column): b0,b1: rows 2t, 2t+1 of column g;  b2,b3: rows 2t+8, 2t+9 of column g
//   C and D (16x8 f32): c0,c1: row g, cols 2t, 2t+1;  c2,c3: row g+8, cols 2t, 2t+1
// The products of two bf16 are exact in float; the sums are done in double and rounded once, which is at
// least as accurate as the tensor cores (their exact accumulation rounding is not modelled).
inline void mma_m16n8k16_bf16(Fiber* lanes[32]) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; l++) {
        const uint32_t* in = lanes[l]->in;
        int g = l / 4, t = l % 4;
        for (int r = 0; r < 4; r++) {
            int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
            A[row][col] = ptx::bf16_to_f32((uint16_t)(in[r] & 0xffff));
            A[row][col + 1] = ptx::bf16_to_f32((uint16_t)(in[r] >> 16));
        }
        for (int r = 0; r < 2; r++) {
            B[2 * t + 8 * r][g] = ptx::bf16_to_f32((uint16_t)(in[4 + r] & 0xffff));
            B[2 * t + 8 * r + 1][g] = ptx::bf16_to_f32((uint16_t)(in[4 + r] >> 16));
        }
        float c[4];
        memcpy(c, in + 6, sizeof c);
        C[g][2 * t] = c[0]; C[g][2 * t + 1] = c[1]; C[g + 8][2 * t] = c[2]; C[g + 8][2 * t + 1] = c[3];
    }
    for (int l = 0; l < 32; l++) {
        int g = l / 4, t = l % 4;
        float d[4];
        for (int e = 0; e < 4; e++) {
            int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
            double acc = C[row][col];
            for (int k = 0; k < 16; k++) acc += (double)A[row][k] * (double)B[k][col];
            d[e] = (float)acc;
        }
        memcpy(lanes[l]->out, d, sizeof d);
    }
}

}  // namespace emu
