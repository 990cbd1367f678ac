"""A NumPy, lane-by-lane transliteration of flash_attention.cu, for checking its index arithmetic on a CPU.

The CUDA kernels cannot run without a GPU, but their logic can: this module executes the same steps with the
same indices, a warp at a time (the 32 lanes as a vector axis), over flat buffers with the same strides
(LDS = 72 in shared memory; in global memory q, k, v are read in place from qkv (B, T, 3C), row stride 3C,
head offsets part*C + h*64, rows t >= T as zero, the bias added to each loaded bf16 pair and rounded back;
dO in out's layout (B, T, C), row stride C). The instructions it has to model are mma.sync.m16n8k16: `mma`
rebuilds the 16x16 A and 16x8 B matrices from the lanes' fragments using the PTX fragment layout, multiplies,
and scatters D back, and ldmatrix.x4 (.trans): `ldmatrix_x4` reads the four 8x8 matrices at the lanes' row
addresses and hands each lane its pairs, so a wrong row/column formula in the kernel shows up as a wrong result
against the float64 attention reference (tests/test_kernel_references.py). bf16 rounding (cvt.rn.bf16x2) is
modelled with kernels/bf16.py. The kernels' cp.async double buffering is a matter of timing, not of values: here
each tile is loaded (bias added) right before the warps use it.

Slow (pure Python over blocks and warps): use tiny shapes.
"""
import math

import numpy as np

from nanogpt_np.kernels.bf16 import round_to_bf16

HS, TILE, LDS = 64, 64, 72
QBLOCK, QWARPS = 128, 8       # query rows and warps per block of the forward (and dq) kernel
LOG2E = 1.4426950408889634
LANE = np.arange(32)
G, TQ = LANE // 4, LANE % 4


def pack(lo, hi):
    """cvt.rn.bf16x2.f32 per lane: two float vectors -> (32, 2) bf16 values (as float32)."""
    return np.stack([round_to_bf16(np.asarray(lo, np.float32)), round_to_bf16(np.asarray(hi, np.float32))], axis=-1)


def head(buf, base, ld, rows, bias=None):
    """A head as the kernels' HeadIn: row 0 at flat offset `base`, row stride ld, rows >= `rows` read as 0,
    `bias` (its 64 values, or None) added to each loaded value and rounded back to bf16."""
    return dict(buf=buf, base=base, ld=ld, rows=rows, bias=bias)


def qkv_head(qkv, bias, b, h, part, T, NH):
    C = NH * HS
    return head(qkv, b * T * 3 * C + part * C + h * HS, 3 * C, T,
                None if bias is None else bias[part * C + h * HS: part * C + h * HS + HS])


def head_values(x, row, col, n):
    """n adjacent elements (row, col ..) of head x per lane (row, col: int or lane vectors) -> (..., n) float32."""
    row, col = np.asarray(row), np.asarray(col)
    valid = row < x["rows"]
    idx = x["base"] + np.where(valid, row, 0) * x["ld"] + col
    v = np.stack([x["buf"][idx + i] for i in range(n)], axis=-1).astype(np.float32)
    if x["bias"] is not None:
        v = round_to_bf16(v + np.stack([x["bias"][col + i] for i in range(n)], axis=-1).astype(np.float32))
    return np.where(valid[..., None], v, np.float32(0))


def load_a_head(x, row0, col0):
    """A fragment of the 16x16 block at (row0, col0) of head x (the kernel's load_a_head)."""
    return np.stack([head_values(x, row0 + G, col0 + 2 * TQ, 2), head_values(x, row0 + G + 8, col0 + 2 * TQ, 2),
                     head_values(x, row0 + G, col0 + 2 * TQ + 8, 2),
                     head_values(x, row0 + G + 8, col0 + 2 * TQ + 8, 2)], axis=1)


def ldmatrix_x4(buf, addr, trans):
    """ldmatrix.sync.aligned.m8n8.x4{.trans}: lane 8i + r gives in addr (32,) the flat offset of row r of matrix
    i (8 elements); lane l gets in register i row l//4, elements 2(l%4), 2(l%4)+1 of matrix i, or with .trans
    (rows 2(l%4), 2(l%4)+1, column l//4). -> (32, 4, 2)."""
    assert (addr % 8 == 0).all()                        # 16-byte aligned rows
    mats = np.stack([np.stack([buf[addr[8 * i + r]: addr[8 * i + r] + 8] for r in range(8)]) for i in range(4)])
    if trans:
        mats = mats.transpose(0, 2, 1)
    return np.stack([np.stack([mats[i, G, 2 * TQ], mats[i, G, 2 * TQ + 1]], axis=-1) for i in range(4)],
                    axis=1).astype(np.float32)


def load_b_x4(buf, off):
    """The kernel's load_b_x4: B fragments (32, 2, 2) of columns n0 .. n0+7 and n0+8 .. n0+15, k0 .. k0+15, from
    a [n][k] tile at `off` = (n0, k0): matrix i at rows n0 + 8(i//2), columns k0 + 8(i%2)."""
    r = ldmatrix_x4(buf, off + (LANE % 8 + 8 * (LANE // 16)) * LDS + 8 * (LANE // 8 % 2), False)
    return r[:, 0:2], r[:, 2:4]


def load_b_x4_trans(buf, off):
    """The kernel's load_b_x4_trans: the same fragments from a [k][n] tile at `off` = (k0, n0): matrix i at rows
    k0 + 8(i%2), columns n0 + 8(i//2), transposed."""
    r = ldmatrix_x4(buf, off + (LANE % 8 + 8 * (LANE // 8 % 2)) * LDS + 8 * (LANE // 16), True)
    return r[:, 0:2], r[:, 2:4]


def mma(c, a, b):
    """c (32, 4) += A (16x16) @ B (16x8), with A, B, C distributed over the lanes as the PTX ISA specifies."""
    A = np.full((16, 16), np.nan)
    Bm = np.full((16, 8), np.nan)
    for e in range(2):
        A[G, 2 * TQ + e] = a[:, 0, e]
        A[G + 8, 2 * TQ + e] = a[:, 1, e]
        A[G, 2 * TQ + 8 + e] = a[:, 2, e]
        A[G + 8, 2 * TQ + 8 + e] = a[:, 3, e]
        Bm[2 * TQ + e, G] = b[:, 0, e]
        Bm[2 * TQ + 8 + e, G] = b[:, 1, e]
    assert not np.isnan(A).any() and not np.isnan(Bm).any()
    D = (A @ Bm).astype(np.float32)
    c[:, 0] += D[G, 2 * TQ]
    c[:, 1] += D[G, 2 * TQ + 1]
    c[:, 2] += D[G + 8, 2 * TQ]
    c[:, 3] += D[G + 8, 2 * TQ + 1]


def tile_products(a, tile):
    """(8 x (32, 4)) accumulators of A (16 x 64: the fragments a[kc], 16 columns each) @ tile^T: one mma per 8
    tile rows (keys in the forward and dq, queries in dkdv) and 16 columns, B fragments by ldmatrix.x4 two
    n-blocks at a time."""
    acc = [np.zeros((32, 4), np.float32) for _ in range(8)]
    for kc in range(4):
        for j in range(0, 8, 2):
            f0, f1 = load_b_x4(tile, 8 * j * LDS + 16 * kc)
            mma(acc[j], a[kc], f0)
            mma(acc[j + 1], a[kc], f1)
    return acc


def add_tile_product(acc, pa, tile, kk):
    """acc (8 x (32, 4)) += P (16 x 16: the fragment pa, k chunk kk) @ tile rows 16 kk .. 16 kk + 15 (all 64
    columns), B fragments by ldmatrix.x4.trans from the [k][n] tile."""
    for jd in range(0, 8, 2):
        f0, f1 = load_b_x4_trans(tile, 16 * kk * LDS + 8 * jd)
        mma(acc[jd], pa, f0)
        mma(acc[jd + 1], pa, f1)


def acc_to_a(lo, hi):
    return np.stack([pack(lo[:, 0], lo[:, 1]), pack(lo[:, 2], lo[:, 3]),
                     pack(hi[:, 0], hi[:, 1]), pack(hi[:, 2], hi[:, 3])], axis=1)


def quad(v, op):
    v = op(v, v[LANE ^ 1])
    return op(v, v[LANE ^ 2])


def load_tile(dst, x, row0):
    for c in range(TILE * HS // 8):
        row, col = c // 8, (c % 8) * 8
        dst[row * LDS + col: row * LDS + col + 8] = head_values(x, row0 + row, col, 8)


def warp_colsum(acc, mult, row0, T):
    """store_block's column sums of a warp's 16 x 64 block (8 fragments of (32, 4)), rows >= T left out: per lane
    over its rows g and g+8, then shuffles across g (lane ^ 4, ^ 8, ^ 16). -> (64,) float32."""
    c = np.zeros((32, 8, 2), np.float32)
    for jd in range(8):
        for r in range(2):
            valid = (row0 + G + 8 * r) < T
            for e in range(2):
                c[:, jd, e] += np.where(valid, acc[jd][:, 2 * r + e] * mult, np.float32(0))
    for off in (4, 8, 16):
        c = c + c[LANE ^ off]
    out = np.zeros(64, np.float32)
    for lane in range(4):                                   # g == 0: lanes 0..3 hold the sums
        for jd in range(8):
            for e in range(2):
                out[8 * jd + 2 * TQ[lane] + e] = c[lane, jd, e]
    return out


def block_colsum(per_warp):
    """The column sums of one 64-row tile's 4 warps added in order, as the kernels do."""
    return ((per_warp[0] + per_warp[1]) + per_warp[2]) + per_warp[3]


def forward(qkv, NH, bias=None):
    """Emulates flash_attention_forward on qkv (B, T, 3C) bf16 values (+ bias (3C,) float32, or None).
    -> out (B, T, C), L2 (B*NH, Tp), state for backward."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    Tp = -(-T // QBLOCK) * QBLOCK
    buf = round_to_bf16(np.asarray(qkv, np.float32)).ravel()
    bias = None if bias is None else np.asarray(bias, np.float32)
    out = np.full((B * T * C,), np.nan, np.float32)
    L2 = np.full((B * NH * Tp,), np.nan, np.float32)
    scale_log2 = np.float32(1 / math.sqrt(HS) * LOG2E)
    Ks, Vs = np.zeros(TILE * LDS, np.float32), np.zeros(TILE * LDS, np.float32)
    nblocks = Tp // QBLOCK
    for bh in range(B * NH):
        for bx in range(nblocks):
            qb = nblocks - 1 - bx
            Q, K, V = (qkv_head(buf, bias, bh // NH, bh % NH, part, T, NH) for part in range(3))
            warps = [dict(q0=qb * QBLOCK + w * 16) for w in range(QWARPS)]
            for st in warps:
                st["qa"] = [load_a_head(Q, st["q0"], 16 * kc) for kc in range(4)]
                st["o"] = [np.zeros((32, 4), np.float32) for _ in range(8)]
                st["m"] = [np.full(32, -np.inf, np.float32) for _ in range(2)]
                st["l"] = [np.zeros(32, np.float32) for _ in range(2)]
            for kt in range((qb + 1) * (QBLOCK // TILE)):
                load_tile(Ks, K, kt * TILE)
                load_tile(Vs, V, kt * TILE)
                for st in warps:
                    q0, o, m, l = st["q0"], st["o"], st["m"], st["l"]
                    if kt * TILE > q0 + 15:                 # the tile's keys all after the warp's rows: skipped
                        continue
                    s = tile_products(st["qa"], Ks)                  # S = Q K^T
                    mx = [m[0].copy(), m[1].copy()]
                    for j in range(8):
                        for e in range(4):
                            row = q0 + G + (8 if e >= 2 else 0)
                            key = kt * TILE + 8 * j + 2 * TQ + (e & 1)
                            s[j][:, e] = np.where(key <= row, s[j][:, e] * scale_log2, -np.inf)
                            mx[e >> 1] = np.maximum(mx[e >> 1], s[j][:, e])
                    alpha, rs = [None, None], [np.zeros(32, np.float32), np.zeros(32, np.float32)]
                    for r in range(2):
                        mx[r] = quad(mx[r], np.maximum)
                        with np.errstate(invalid="ignore"):
                            alpha[r] = np.exp2(m[r] - mx[r])
                        m[r] = mx[r]
                    for j in range(8):
                        for e in range(4):
                            s[j][:, e] = np.exp2(s[j][:, e] - m[e >> 1])
                            rs[e >> 1] += s[j][:, e]
                    for r in range(2):
                        l[r] = l[r] * alpha[r] + quad(rs[r], np.add)
                    for j in range(8):
                        o[j][:, 0] *= alpha[0]; o[j][:, 1] *= alpha[0]; o[j][:, 2] *= alpha[1]; o[j][:, 3] *= alpha[1]
                    for kk in range(4):
                        pa = acc_to_a(s[2 * kk], s[2 * kk + 1])
                        add_tile_product(o, pa, Vs, kk)               # O += P V
            b, h = bh // NH, bh % NH
            for st in warps:
                for r in range(2):
                    row = st["q0"] + G + 8 * r
                    inv = 1.0 / st["l"][r]
                    for lane in range(32):
                        if row[lane] < T:
                            dst = (b * T + row[lane]) * C + h * HS + 2 * TQ[lane]
                            for jd in range(8):
                                out[dst + 8 * jd] = st["o"][jd][lane, 2 * r] * inv[lane]
                                out[dst + 8 * jd + 1] = st["o"][jd][lane, 2 * r + 1] * inv[lane]
                        if TQ[lane] == 0:
                            L2[bh * Tp + row[lane]] = st["m"][r][lane] + np.log2(st["l"][r][lane])
    return out.reshape(B, T, C), L2, (buf, bias, Tp)


def backward(dout, out, L2, state, B, T, NH, with_db_partial=False):
    """Emulates flash_attention_backward_prep, _dkdv and _dq. -> dqkv (B, T, 3C), and with with_db_partial
    also the per-tile column sums (B * Tp/64, 3C) the kernels write for the qkv bias gradient (float32 dqkv)."""
    buf, bias, Tp = state
    C = NH * HS
    db_partial = np.full((B * (Tp // TILE), 3 * C), np.nan, np.float32)
    scale = np.float32(1 / math.sqrt(HS))
    scale_log2 = np.float32(scale * LOG2E)
    # prep: dO rounded to bf16 in its own layout (B, T, C), which the kernels read in place
    dO = round_to_bf16(np.asarray(dout, np.float32)).ravel()
    D = np.zeros((B * NH, Tp), np.float32)
    dh = dO.reshape(B, T, NH, HS).transpose(0, 2, 1, 3).reshape(B * NH, T, HS)
    oh = out.reshape(B, T, NH, HS).transpose(0, 2, 1, 3).reshape(B * NH, T, HS)
    D[:, :T] = (dh * oh).sum(-1)                              # from the bf16 dO, as the kernel does
    D = D.ravel()
    dqkv = np.full((B * T * 3 * C,), np.nan, np.float32)
    ntiles = Tp // TILE
    # dK, dV
    Qs, dOs = (np.zeros(TILE * LDS, np.float32) for _ in range(2))
    for bh in range(B * NH):
        Q, K, V = (qkv_head(buf, bias, bh // NH, bh % NH, part, T, NH) for part in range(3))
        dOh = head(dO, (bh // NH) * T * C + (bh % NH) * HS, C, T)
        for kb in range(Tp // QBLOCK):                   # a block of 128 keys, 8 warps of 16
            warps = []
            for w in range(QWARPS):
                k0 = kb * QBLOCK + w * 16
                warps.append(dict(k0=k0, ka=[load_a_head(K, k0, 16 * kc) for kc in range(4)],
                                  va=[load_a_head(V, k0, 16 * kc) for kc in range(4)],
                                  dk=[np.zeros((32, 4), np.float32) for _ in range(8)],
                                  dv=[np.zeros((32, 4), np.float32) for _ in range(8)]))
            for qt in range(kb * (QBLOCK // TILE), ntiles):
                load_tile(Qs, Q, qt * TILE)
                load_tile(dOs, dOh, qt * TILE)
                Ls = L2[bh * Tp + qt * TILE: bh * Tp + qt * TILE + TILE]
                Ds = D[bh * Tp + qt * TILE: bh * Tp + qt * TILE + TILE]
                for st in warps:
                    if st["k0"] > qt * TILE + TILE - 1:       # every query before the warp's keys: skipped
                        continue
                    s = tile_products(st["ka"], Qs)                  # S^T = K Q^T
                    dp = tile_products(st["va"], dOs)                # dP^T = V dO^T
                    for j in range(8):
                        for e in range(4):
                            key = st["k0"] + G + (8 if e >= 2 else 0)
                            qi = 8 * j + 2 * TQ + (e & 1)
                            p = np.where(qt * TILE + qi >= key, np.exp2(s[j][:, e] * scale_log2 - Ls[qi]), 0.0)
                            s[j][:, e] = p
                            dp[j][:, e] = p * (dp[j][:, e] - Ds[qi])
                    for kk in range(4):
                        pa = acc_to_a(s[2 * kk], s[2 * kk + 1])
                        sa = acc_to_a(dp[2 * kk], dp[2 * kk + 1])
                        add_tile_product(st["dv"], pa, dOs, kk)       # dV += P^T dO
                        add_tile_product(st["dk"], sa, Qs, kk)        # dK += dS^T Q
            b, h = bh // NH, bh % NH
            for st in warps:
                for r in range(2):
                    row = st["k0"] + G + 8 * r
                    for lane in range(32):
                        if row[lane] >= T:
                            continue
                        dst = (b * T + row[lane]) * 3 * C + h * HS + 2 * TQ[lane]
                        for jd in range(8):
                            for e in range(2):
                                dqkv[dst + C + 8 * jd + e] = st["dk"][jd][lane, 2 * r + e] * scale
                                dqkv[dst + 2 * C + 8 * jd + e] = st["dv"][jd][lane, 2 * r + e]
            for p, name, mult in ((1, "dk", scale), (2, "dv", np.float32(1))):
                for half in range(2):                       # one row per 64-key tile: its 4 warps' sums
                    db_partial[b * ntiles + 2 * kb + half, p * C + h * HS: p * C + h * HS + HS] = block_colsum(
                        [warp_colsum(st[name], mult, st["k0"], T) for st in warps[4 * half: 4 * half + 4]])
    # dQ: blocks of 128 query rows, as the forward
    nblocks = Tp // QBLOCK
    Ks, Vs = (np.zeros(TILE * LDS, np.float32) for _ in range(2))
    for bh in range(B * NH):
        Q, K, V = (qkv_head(buf, bias, bh // NH, bh % NH, part, T, NH) for part in range(3))
        dOh = head(dO, (bh // NH) * T * C + (bh % NH) * HS, C, T)
        for bx in range(nblocks):
            qb = nblocks - 1 - bx
            warps = []
            for w in range(QWARPS):
                q0 = qb * QBLOCK + w * 16
                warps.append(dict(q0=q0, qa=[load_a_head(Q, q0, 16 * kc) for kc in range(4)],
                                  da=[load_a_head(dOh, q0, 16 * kc) for kc in range(4)],
                                  Lr=[L2[bh * Tp + q0 + G + 8 * r] for r in range(2)],
                                  Dr=[D[bh * Tp + q0 + G + 8 * r] for r in range(2)],
                                  dq=[np.zeros((32, 4), np.float32) for _ in range(8)]))
            for kt in range((qb + 1) * (QBLOCK // TILE)):
                load_tile(Ks, K, kt * TILE); load_tile(Vs, V, kt * TILE)
                for st in warps:
                    if kt * TILE > st["q0"] + 15:             # the tile's keys all after the warp's rows: skipped
                        continue
                    s = tile_products(st["qa"], Ks)                  # S = Q K^T
                    dp = tile_products(st["da"], Vs)                 # dP = dO V^T
                    for j in range(8):
                        for e in range(4):
                            row = st["q0"] + G + (8 if e >= 2 else 0)
                            key = kt * TILE + 8 * j + 2 * TQ + (e & 1)
                            p = np.where(key <= row, np.exp2(s[j][:, e] * scale_log2 - st["Lr"][e >> 1]), 0.0)
                            dp[j][:, e] = p * (dp[j][:, e] - st["Dr"][e >> 1])
                    for kk in range(4):
                        sa = acc_to_a(dp[2 * kk], dp[2 * kk + 1])
                        add_tile_product(st["dq"], sa, Ks, kk)        # dQ += dS K
            b, h = bh // NH, bh % NH
            for st in warps:
                for r in range(2):
                    row = st["q0"] + G + 8 * r
                    for lane in range(32):
                        if row[lane] >= T:
                            continue
                        dst = (b * T + row[lane]) * 3 * C + h * HS + 2 * TQ[lane]
                        for jd in range(8):
                            for e in range(2):
                                dqkv[dst + 8 * jd + e] = st["dq"][jd][lane, 2 * r + e] * scale
            for half in range(2):                           # one row per 64-row tile: its 4 warps' sums
                db_partial[b * ntiles + 2 * qb + half, h * HS: h * HS + HS] = \
                    block_colsum([warp_colsum(st["dq"], scale, st["q0"], T) for st in warps[4 * half: 4 * half + 4]])
    if with_db_partial:
        return dqkv.reshape(B, T, 3 * C), db_partial
    return dqkv.reshape(B, T, 3 * C)
