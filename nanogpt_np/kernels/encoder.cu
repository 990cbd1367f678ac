// Token + position embedding ("encoder"), forward and a deterministic backward.
//
//   forward:  out[b,t,:] = wte[idx[b,t],:] + wpe[t,:]                      out (B,T,C), float32
//   backward: dwpe[t,:]  = sum_b dout[b,t,:]                                (a column sum over B)
//             dwte[v,:]  = sum over (b,t) with idx[b,t]==v of dout[b,t,:]   (a scatter-add)
//
// Determinism: a scatter-add with atomicAdd gives a different float sum order on every run. Instead the host
// sorts the B*T positions by token id (a stable sort), so equal ids form consecutive runs; the block that owns
// the first position of a run adds the whole run in sorted order and writes the row once. No atomics anywhere.
//
// Memory traffic: forward reads B*T*C of wte + B*T*C of wpe (wpe rows are shared across b and mostly hit L2)
// and writes B*T*C. Backward reads dout twice (once per table) and writes each touched row once.

// ---- forward: one thread per 4 consecutive channels (float4 loads/stores), needs C % 4 == 0 ----
extern "C" __global__ void encoder_forward_f4(float* __restrict__ out,
                                              const int* __restrict__ idx,      // (B*T,) token ids
                                              const float* __restrict__ wte,    // (V, C)
                                              const float* __restrict__ wpe,    // (Tmax, C)
                                              int BT, int T, int C) {
    int C4 = C / 4;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;   // index of a float4 in out
    if (i >= (long long)BT * C4) return;
    int bt = (int)(i / C4), c4 = (int)(i % C4);
    int t = bt % T;
    int tok = idx[bt];
    float4 a = reinterpret_cast<const float4*>(wte + (long long)tok * C)[c4];
    float4 p = reinterpret_cast<const float4*>(wpe + (long long)t * C)[c4];
    reinterpret_cast<float4*>(out + (long long)bt * C)[c4] = make_float4(a.x + p.x, a.y + p.y, a.z + p.z, a.w + p.w);
}

// ---- forward, any C: one thread per output element ----
extern "C" __global__ void encoder_forward(float* __restrict__ out, const int* __restrict__ idx,
                                           const float* __restrict__ wte, const float* __restrict__ wpe,
                                           int BT, int T, int C) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)BT * C) return;
    int bt = (int)(i / C), c = (int)(i % C);
    out[i] = wte[(long long)idx[bt] * C + c] + wpe[(long long)(bt % T) * C + c];
}

// ---- backward for wpe: one thread per (t, c); it walks b = 0..B-1 in order (coalesced across c) ----
// accumulate = 0: dwpe (Tmax, C) is written, rows t >= T with zeros, so the caller needs no memset.
// accumulate = 1: the sum is added into dwpe (a gradient buffer); rows t >= T are left as they are.
extern "C" __global__ void encoder_backward_wpe(float* __restrict__ dwpe, const float* __restrict__ dout,
                                                int B, int T, int Tmax, int C, int accumulate) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;   // index into dwpe
    if (i >= (long long)Tmax * C) return;
    int t = (int)(i / C);
    if (t >= T && accumulate) return;
    float acc = 0.0f;
    if (t < T) {
        for (int b = 0; b < B; b++) acc += dout[(long long)b * T * C + i];
    }
    dwpe[i] = accumulate ? dwpe[i] + acc : acc;
}

// ---- backward for wte: one block per sorted position; only the first position of a run of equal ids works ----
// sorted_pos: the B*T positions (b*T + t) sorted by token id (stable), sorted_tok: the ids in that order.
// The owning block's threads stride over the C channels; each thread adds the run's rows in sorted order,
// so the sum order is fixed, and writes (accumulate = 0) or adds (accumulate = 1: a gradient buffer that already
// holds the tied output head's part) the run's sum once. Rows of ids that never occur are not touched: with
// accumulate = 0 dwte must be zeroed beforehand.
// Load balance: a frequent token makes one long run (one busy block), fine at GPT-2 sizes.
extern "C" __global__ void encoder_backward_wte(float* __restrict__ dwte, const float* __restrict__ dout,
                                                const int* __restrict__ sorted_pos,
                                                const int* __restrict__ sorted_tok, int BT, int C, int accumulate) {
    int s = blockIdx.x;
    int tok = sorted_tok[s];
    if (s > 0 && sorted_tok[s - 1] == tok) return;        // not the head of its run: the head block does it
    int end = s + 1;
    while (end < BT && sorted_tok[end] == tok) end++;      // every thread finds the same run end
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = s; j < end; j++) acc += dout[(long long)sorted_pos[j] * C + c];
        long long o = (long long)tok * C + c;
        dwte[o] = accumulate ? dwte[o] + acc : acc;
    }
}
