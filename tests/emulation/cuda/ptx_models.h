// ptx_models.h - C++ models of the inline PTX instructions the kernels use, written from the PTX ISA manual.
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

}  // namespace ptx

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
