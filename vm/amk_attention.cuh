// The attention opcodes of the AMK VM: ROPE_APPEND, ATTN_PARTIAL, ROPE_ATTN_PARTIAL and
// ATTN_COMBINE (the shared helpers and AmkCtx come from amk_ops.cuh, which includes this
// file at its end). Same rules as every op: implement the doc of its OpSpec in
// pytest_amk/ir.py, fp32 accumulation, KV read through L2 (coherent: plain loads, cp.async.cg).
#pragma once

// ---------------------------------------------------------------- attention

#define AMK_KV_PAD (16 / (int)sizeof(amk_t))  // ir.kv_pad: staged K/V rows are padded by 16 bytes

constexpr int AMK_SCORE_UNROLL = AMK_THREADS >= 1024 ? 1 : 2;  // the 1024-thread build has 64 registers
// attn_prewait runs on the warps besides the poller's; the 1024-thread build (64 registers) spills with it.
constexpr bool AMK_ATTN_PREWAIT = AMK_THREADS > 32 && AMK_THREADS < 1024;
constexpr int AMK_PV_WAYS = AMK_THREADS >= 1024 ? (AMK_DTYPE == 0 ? 1 : 2) : 4;  // independent P.V sums (same)

// ir.attn_chunk: positions of a KV block staged in shared memory at once.
__device__ __forceinline__ int attn_chunk(int kb, int D) {
    return max(1, min(kb, AMK_ATTN_CHUNK_BYTES / (2 * (D + AMK_KV_PAD) * (int)sizeof(amk_t))));
}

// Rotate-half RoPE of the pair (x[i], x[i + D/2]) in fp32, one rounding per product and sum.
__device__ __forceinline__ void rope_pair(float x0, float x1, float cs, float sn, float& y0, float& y1) {
    y0 = sub_rn(mul_rn(x0, cs), mul_rn(x1, sn));
    y1 = add_rn(mul_rn(x1, cs), mul_rn(x0, sn));
}

// Whether K/V rows from kp, vp can be staged as 16-byte vectors.
__device__ __forceinline__ bool kv_vec(const amk_t* kp, const amk_t* vp, int D) {
    return (D % AMK_VEC) == 0 && ((reinterpret_cast<uintptr_t>(kp) | reinterpret_cast<uintptr_t>(vp)) & 15) == 0;
}

// K and V rows [0, cn) of one head (from kp, vp) into shared memory, row stride D + AMK_KV_PAD,
// except row ``skip`` (the position this task appends: its prologue writes that row itself).
// Vector rows go by cp.async (sm_80+): every copy of the chunk is in flight at once and holds
// no registers, so staging overlaps whatever the block does next; the caller waits
// (stage_wait) before its barrier. A row of D + AMK_KV_PAD elements is 16-byte aligned, and
// 8 consecutive rows put a given 16-byte column in 8 distinct bank groups (the score loop
// reads 16 bytes per row and step). Other blocks write the cache during the launch: the
// copies read through L2 (.cg, no L1), which sees their writes. t, nt: this thread's index
// among the nt threads that share the copies.
__device__ __forceinline__ void stage_kv(const amk_t* kp, const amk_t* vp, int cn, int D, amk_t* ks, amk_t* vs, int skip,
                                         int t, int nt) {
    const int RS = D + AMK_KV_PAD;
    if (kv_vec(kp, vp, D)) {
        const int per_row = D / AMK_VEC;
#pragma unroll 1
        for (int idx = t; idx < cn * per_row; idx += nt) {
            const int row = idx / per_row, col = (idx - row * per_row) * AMK_VEC;
            if (row == skip) continue;
            const size_t g = (size_t)row * D + col;
            const int sh = row * RS + col;
#if __CUDA_ARCH__ >= 800
            const unsigned ka = (unsigned)__cvta_generic_to_shared(ks + sh);
            const unsigned va = (unsigned)__cvta_generic_to_shared(vs + sh);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(ka), "l"(kp + g) : "memory");
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(va), "l"(vp + g) : "memory");
#else
            *reinterpret_cast<uint4*>(ks + sh) = __ldcg(reinterpret_cast<const uint4*>(kp + g));
            *reinterpret_cast<uint4*>(vs + sh) = __ldcg(reinterpret_cast<const uint4*>(vp + g));
#endif
        }
    } else {
        for (int i = t; i < cn * D; i += nt) {
            const int row = i / D, col = i - row * D;
            if (row == skip) continue;
            ks[row * RS + col] = kp[i];
            vs[row * RS + col] = vp[i];
        }
    }
}

__device__ __forceinline__ void st_shared_elem(unsigned a, amk_t v) {
#if AMK_DTYPE == 0
    asm volatile("st.shared.f32 [%0], %1;" ::"r"(a), "f"(v) : "memory");
#else
    asm volatile("st.shared.b16 [%0], %1;" ::"r"(a), "h"(*reinterpret_cast<const unsigned short*>(&v)) : "memory");
#endif
}

// This thread's cp.async copies have landed (a barrier then publishes them to the block).
__device__ __forceinline__ void stage_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// Shared-memory layout of the attention ops (floats from c.smem; ir.task_smem_bytes):
// q [rep][D] | o accumulators [rep][D] | scores [rep][CH] | (m, l, alpha) [rep] | K, V chunk
// (model dtype, 16-byte aligned).
__device__ __forceinline__ int attn_kv_offset(int rep, int D, int CH) {
    return (2 * rep * D + rep * CH + 3 * rep + 3) & ~3;
}

// The row of the KV block [blk * kb, (blk + 1) * kb) that this step appends (its position pos),
// relative to the block; -1 when pos lies outside it.
__device__ __forceinline__ int appended_row(int blk, int kb, int pos) {
    return blk * kb <= pos && pos < (blk + 1) * kb ? pos - blk * kb : -1;
}

// Chunk 0 of the task's K and V block into shared memory (its n positions, at most one chunk),
// without row ``skip``: shared by attn_prewait (threads t of nt) and op_attention.
__device__ __forceinline__ void stage_first_chunk(const AmkCtx& c, int o, bool fused, int n, int skip, int t,
                                                  int nt) {
    const int* ins = c.ins;
    const int kb = ins[P_ATTN_PARTIAL_KV_BLOCK + o], D = ins[P_ATTN_PARTIAL_HEAD_DIM + o];
    const int rep = ins[P_ATTN_PARTIAL_N_HEADS + o] / ins[P_ATTN_PARTIAL_N_KV_HEADS + o];
    const int CH = attn_chunk(kb, D);
    const size_t kv0 = ((size_t)ins[P_ATTN_PARTIAL_KV_HEAD + o] * ins[P_ATTN_PARTIAL_MAX_SEQ + o] +
                        (size_t)ins[P_ATTN_PARTIAL_BLK + o] * kb) * D;
    amk_t* ks = reinterpret_cast<amk_t*>(c.smem + attn_kv_offset(rep, D, CH));
    stage_kv(amk_buf<const amk_t>(c, fused ? P_ROPE_ATTN_PARTIAL_K_CACHE : P_ATTN_PARTIAL_K_CACHE) + kv0,
             amk_buf<const amk_t>(c, fused ? P_ROPE_ATTN_PARTIAL_V_CACHE : P_ATTN_PARTIAL_V_CACHE) + kv0,
             min(CH, n), D, ks, ks + CH * (D + AMK_KV_PAD), skip, t, nt);
}

// Split-KV attention over one block of kv head g for its rep q heads (q already staged in
// fp32 at c.smem[0 : rep*D]) over its n > 0 positions; chunk 0 is already staged (and
// published by the caller's barrier). Writes (m, l, o[0:D]) per head to the partials. The
// block is processed in shared-memory chunks with a running max (online softmax); with one
// chunk this is exactly m = max s, l = sum e, o = sum e v.
__device__ void attn_block(const AmkCtx& c, int o, int n) {
    // Params are re-read from the instruction where needed, not kept: few values stay live
    // across the chunk loop (the 1024-thread build has 64 registers). o: see op_attention.
    const int* ins = c.ins;
    const int kb = ins[P_ATTN_PARTIAL_KV_BLOCK + o], D = ins[P_ATTN_PARTIAL_HEAD_DIM + o];
    const int rep = ins[P_ATTN_PARTIAL_N_HEADS + o] / ins[P_ATTN_PARTIAL_N_KV_HEADS + o];
    const bool fused = o != 0;
    const int CH = attn_chunk(kb, D);
    float* sm = c.smem;
    const int o_sc = 2 * rep * D, o_ml = o_sc + rep * CH;
    amk_t* ks = reinterpret_cast<amk_t*>(sm + attn_kv_offset(rep, D, CH));
    const amk_t* kp;
    const amk_t* vp;
    {
        const size_t kv0 = ((size_t)ins[P_ATTN_PARTIAL_KV_HEAD + o] * ins[P_ATTN_PARTIAL_MAX_SEQ + o] +
                            (size_t)ins[P_ATTN_PARTIAL_BLK + o] * kb) * D;
        kp = amk_buf<const amk_t>(c, fused ? P_ROPE_ATTN_PARTIAL_K_CACHE : P_ATTN_PARTIAL_K_CACHE) + kv0;
        vp = amk_buf<const amk_t>(c, fused ? P_ROPE_ATTN_PARTIAL_V_CACHE : P_ATTN_PARTIAL_V_CACHE) + kv0;
    }
    const bool vec = kv_vec(kp, vp, D);
#pragma unroll 1
    for (int c0 = 0; c0 < n; c0 += CH) {
        const int cn = min(CH, n - c0);
        const int RS = D + AMK_KV_PAD;
        if (c0 > 0) {  // chunk 0 was staged by the prologue; later chunks hold no new row
            stage_kv(kp + (size_t)c0 * D, vp + (size_t)c0 * D, cn, D, ks, ks + CH * RS, -1, threadIdx.x, AMK_THREADS);
            stage_wait();
            __syncthreads();
        }
        // Scores: a thread per (head, position), 16 bytes of its K row per step (the row
        // padding keeps 8 consecutive rows' reads in distinct banks).
        const float scale = amk_fparam(c, P_ATTN_PARTIAL_SCALE + o);
        for (int idx = threadIdx.x; idx < rep * cn; idx += AMK_THREADS) {
            const int hl = idx / cn, pp = idx - hl * cn;
            const float* qh = sm + hl * D;
            float s = 0.0f;
            if (vec) {
                const uint4* kr = reinterpret_cast<const uint4*>(ks + pp * RS);
#pragma unroll AMK_SCORE_UNROLL
                for (int j = 0; j < D / AMK_VEC; ++j) s = vdot(kr[j], qh + j * AMK_VEC, s);
            } else {
                const amk_t* kr = ks + pp * RS;
                for (int d = 0; d < D; ++d) s = fmaf(qh[d], to_f(kr[d]), s);
            }
            sm[o_sc + hl * CH + pp] = mul_rn(s, scale);
        }
        __syncthreads();
        // Per head: new running max, weights e = exp(s - m) in place, rescale factor alpha.
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        for (int hl = warp; hl < rep; hl += AMK_WARPS) {
            float* s = sm + o_sc + hl * CH;
            float* ml = sm + o_ml + 3 * hl;
            float mc = neg_inf();
            for (int pp = lane; pp < cn; pp += 32) mc = fmaxf(mc, s[pp]);
            mc = warp_max(mc);
            const float m_old = c0 == 0 ? neg_inf() : ml[0], m_new = fmaxf(m_old, mc);
            float l = 0.0f;
            for (int pp = lane; pp < cn; pp += 32) {
                const float e = expf(s[pp] - m_new);
                s[pp] = e;
                l += e;
            }
            l = warp_sum(l);
            if (lane == 0) {
                const float alpha = expf(m_old - m_new);  // 0 for the first chunk (m_old = -inf)
                ml[0] = m_new;
                ml[1] = c0 == 0 ? l : fmaf(ml[1], alpha, l);
                ml[2] = alpha;
            }
        }
        __syncthreads();
        // o[d] = alpha o[d] + sum_p e_p v_p[d]: a thread per (head, d), coalesced over d.
        const amk_t* vs = ks + CH * RS;
        for (int idx = threadIdx.x; idx < rep * D; idx += AMK_THREADS) {
            const int hl = idx / D, d = idx - hl * D;
            const float* e = sm + o_sc + hl * CH;
            // Independent sums: the loop is bound by shared-memory latency, not FMAs. With one way
            // the plain loop stays (the general form spilled in the fp32 1024-thread build).
            const amk_t* v = vs + d;
            float a = 0.0f;
            if (AMK_PV_WAYS == 1) {
#pragma unroll 2
                for (int pp = 0; pp < cn; ++pp) a = fmaf(e[pp], to_f(v[pp * RS]), a);
            } else {
                float sums[AMK_PV_WAYS];
#pragma unroll
                for (int w = 0; w < AMK_PV_WAYS; ++w) sums[w] = 0.0f;
                int pp = 0;
#pragma unroll 1
                for (; pp + AMK_PV_WAYS - 1 < cn; pp += AMK_PV_WAYS)
#pragma unroll
                    for (int w = 0; w < AMK_PV_WAYS; ++w) sums[w] = fmaf(e[pp + w], to_f(v[(pp + w) * RS]), sums[w]);
                for (; pp < cn; ++pp) sums[0] = fmaf(e[pp], to_f(v[pp * RS]), sums[0]);
#pragma unroll
                for (int w = 0; w < AMK_PV_WAYS; ++w) a += sums[w];
            }
            float* acc = sm + rep * D + idx;
            *acc = c0 == 0 ? a : fmaf(*acc, sm[o_ml + 3 * hl + 2], a);
        }
        __syncthreads();  // the next chunk overwrites K, V and the scores
    }
    AMK_TRACE_AT(AMK_MARK_ATTN_BLOCKS, c.instr);
    const int nb = ins[P_ATTN_PARTIAL_N_BLOCKS + o];
    float* dst = amk_buf<float>(c, fused ? P_ROPE_ATTN_PARTIAL_PARTIAL : P_ATTN_PARTIAL_PARTIAL) +
                 ((size_t)ins[P_ATTN_PARTIAL_KV_HEAD + o] * rep * nb + ins[P_ATTN_PARTIAL_BLK + o]) * (D + 2);
    for (int idx = threadIdx.x; idx < rep * (D + 2); idx += AMK_THREADS) {
        const int hl = idx / (D + 2), j = idx - hl * (D + 2);
        dst[hl * nb * (D + 2) + j] = j < 2 ? sm[o_ml + 3 * hl + j] : sm[rep * D + hl * D + j - 2];
    }
}

__device__ void op_rope_append(const AmkCtx& c) {
    const amk_t* qkv = amk_buf<const amk_t>(c, P_ROPE_APPEND_QKV);
    const float* rope = amk_buf<const float>(c, P_ROPE_APPEND_ROPE);
    const int pos = amk_buf<const int>(c, P_ROPE_APPEND_POS)[0];
    amk_t* q_out = amk_buf<amk_t>(c, P_ROPE_APPEND_Q_OUT);
    amk_t* kc = amk_buf<amk_t>(c, P_ROPE_APPEND_K_CACHE);
    amk_t* vc = amk_buf<amk_t>(c, P_ROPE_APPEND_V_CACHE);
    const int g = c.ins[P_ROPE_APPEND_KV_HEAD], nh = c.ins[P_ROPE_APPEND_N_HEADS];
    const int nkv = c.ins[P_ROPE_APPEND_N_KV_HEADS], D = c.ins[P_ROPE_APPEND_HEAD_DIM];
    const int ms = c.ins[P_ROPE_APPEND_MAX_SEQ];
    if (pos < 0 || pos >= ms) {
        if (threadIdx.x == 0) raise_fault(c.err, AMK_FAULT_BAD_INPUT, c.sm, c.instr, OP_ROPE_APPEND, -1, pos, ms, 1);
        return;
    }
    const int rep = nh / nkv, half = D / 2;
    const float* rt = rope + (size_t)pos * D;  // [half][2] = (cos, sin)
    // q heads of this group, then the k head: rotate-half in fp32, one rounding each. The fused
    // ROPE_ATTN_PARTIAL (op_attention) does the same with other destinations. Written twice on
    // purpose: shared as one helper, the kernel's register allocation changed and the fp32
    // 1024-thread build spilled (session 10).
    for (int idx = threadIdx.x; idx < (rep + 1) * half; idx += AMK_THREADS) {
        const int hl = idx / half, i = idx - hl * half;
        const amk_t* src;
        amk_t* dst;
        if (hl < rep) {
            src = qkv + (size_t)(g * rep + hl) * D;
            dst = q_out + (size_t)(g * rep + hl) * D;
        } else {
            src = qkv + (size_t)(nh + g) * D;
            dst = kc + ((size_t)g * ms + pos) * D;
        }
        float y0, y1;
        rope_pair(to_f(src[i]), to_f(src[i + half]), rt[2 * i], rt[2 * i + 1], y0, y1);
        dst[i] = from_f(y0);
        dst[i + half] = from_f(y1);
    }
    const amk_t* vsrc = qkv + (size_t)(nh + nkv + g) * D;
    amk_t* vdst = vc + ((size_t)g * ms + pos) * D;
    for (int d = threadIdx.x; d < D; d += AMK_THREADS) vdst[d] = vsrc[d];
}

// ROPE_ATTN_PARTIAL, before its wait (the VM runs this on threads 32.. while thread 0 polls):
// what does not depend on this step's qkv. The runtime inputs (into c.att_in), the block's
// first KV chunk (cp.async, except the row this step appends: cached rows are only written
// by earlier steps, which happen-before this one) and the RoPE row of pos (fp32, into the
// o accumulators' place, unused until P.V). op_attention then starts at q.
__device__ void attn_prewait(const AmkCtx& c) {
    constexpr int o = P_ROPE_ATTN_PARTIAL_KV_HEAD - P_ATTN_PARTIAL_KV_HEAD;
    const int* ins = c.ins;
    const int L = amk_buf<const int>(c, P_ROPE_ATTN_PARTIAL_SEQ_LEN)[0];
    const int pos = amk_buf<const int>(c, P_ROPE_ATTN_PARTIAL_POS)[0];
    const int t = threadIdx.x - 32, nt = AMK_THREADS - 32;
    if (t == 0) {
        c.att_in[0] = L;
        c.att_in[1] = pos;
    }
    const int ms = ins[P_ATTN_PARTIAL_MAX_SEQ + o];
    if (L < 0 || L > ms || pos < 0 || pos >= ms) return;  // op_attention raises the fault
    const int D = ins[P_ATTN_PARTIAL_HEAD_DIM + o];
    const int rep = ins[P_ATTN_PARTIAL_N_HEADS + o] / ins[P_ATTN_PARTIAL_N_KV_HEADS + o];
    const int blk = ins[P_ATTN_PARTIAL_BLK + o], kb = ins[P_ATTN_PARTIAL_KV_BLOCK + o];
    const int n = min(L, blk * kb + kb) - blk * kb;
    if (n <= 0) return;
    stage_first_chunk(c, o, true, n, appended_row(blk, kb, pos), t, nt);
    const float* rt = amk_buf<const float>(c, P_ROPE_ATTN_PARTIAL_ROPE) + (size_t)pos * D;
    for (int j = t; j < D; j += nt) c.smem[rep * D + j] = rt[j];
}

// ATTN_PARTIAL and ROPE_ATTN_PARTIAL share one call of attn_block (inlined once: the
// 1024-thread build has 64 registers). Critical path: one round trip for the runtime inputs
// (seq_len, pos), then one for q (and the rope table) with the block's first KV chunk in
// flight at the same time (cp.async; cached rows never depend on this step), then compute.
// Fused (ROPE_ATTN_PARTIAL): q is roped from qkv and rounded to dtype as the unfused q buffer
// would be; the task whose block holds pos appends the roped k and the v of this step to
// the cache, and writes that row straight into its staged chunk (when it lies in chunk 0;
// a later chunk is staged after a barrier and reads it back from the cache).
static_assert(P_ROPE_ATTN_PARTIAL_SCALE - P_ROPE_ATTN_PARTIAL_KV_HEAD == P_ATTN_PARTIAL_SCALE - P_ATTN_PARTIAL_KV_HEAD,
              "ATTN_PARTIAL and ROPE_ATTN_PARTIAL must list kv_head .. scale in the same order (ir.OPS)");
__device__ void op_attention(const AmkCtx& c, bool fused) {
    // The two ops list their shared params in the same order from kv_head on (ir.OPS).
    const int o = fused ? P_ROPE_ATTN_PARTIAL_KV_HEAD - P_ATTN_PARTIAL_KV_HEAD : 0;
    int n;
    {
        const int* ins = c.ins;
        const int g = ins[P_ATTN_PARTIAL_KV_HEAD + o], D = ins[P_ATTN_PARTIAL_HEAD_DIM + o];
        const int nh = ins[P_ATTN_PARTIAL_N_HEADS + o], ms = ins[P_ATTN_PARTIAL_MAX_SEQ + o];
        const int rep = nh / ins[P_ATTN_PARTIAL_N_KV_HEADS + o];
        const int blk = ins[P_ATTN_PARTIAL_BLK + o], kb = ins[P_ATTN_PARTIAL_KV_BLOCK + o];
        const int op = fused ? OP_ROPE_ATTN_PARTIAL : OP_ATTN_PARTIAL;
        const bool pre = fused && c.att_pre;  // attn_prewait ran: inputs, chunk 0 and the RoPE row are here
        // Both runtime inputs in one round trip.
        const int L = pre ? c.att_in[0]
                          : amk_buf<const int>(c, fused ? P_ROPE_ATTN_PARTIAL_SEQ_LEN : P_ATTN_PARTIAL_SEQ_LEN)[0];
        const int pos = pre ? c.att_in[1] : fused ? amk_buf<const int>(c, P_ROPE_ATTN_PARTIAL_POS)[0] : 0;
        if (L < 0 || L > ms) {
            if (threadIdx.x == 0) raise_fault(c.err, AMK_FAULT_BAD_INPUT, c.sm, c.instr, op, -1, L, ms, 2);
            return;
        }
        if (pos < 0 || pos >= ms) {
            if (threadIdx.x == 0) raise_fault(c.err, AMK_FAULT_BAD_INPUT, c.sm, c.instr, op, -1, pos, ms, 1);
            return;
        }
        n = min(L, blk * kb + kb) - blk * kb;
        if (n <= 0) {  // an empty block (it cannot hold pos: pos < L)
            const int nb = ins[P_ATTN_PARTIAL_N_BLOCKS + o];
            float* dst = amk_buf<float>(c, fused ? P_ROPE_ATTN_PARTIAL_PARTIAL : P_ATTN_PARTIAL_PARTIAL) +
                         ((size_t)g * rep * nb + blk) * (D + 2);
            for (int idx = threadIdx.x; idx < rep * (D + 2); idx += AMK_THREADS) {
                const int hl = idx / (D + 2), j = idx - hl * (D + 2);
                dst[hl * nb * (D + 2) + j] = j == 0 ? neg_inf() : 0.0f;
            }
            return;
        }
        const int CH = attn_chunk(kb, D);
        const int row = fused ? appended_row(blk, kb, pos) : -1;
        const bool append = row >= 0;
        amk_t* ks = reinterpret_cast<amk_t*>(c.smem + attn_kv_offset(rep, D, CH));
        if (!pre) stage_first_chunk(c, o, fused, n, row, threadIdx.x, AMK_THREADS);
        float* qs = c.smem;
        if (!fused) {
            const amk_t* q = amk_buf<const amk_t>(c, P_ATTN_PARTIAL_Q);
            for (int idx = threadIdx.x; idx < rep * D; idx += AMK_THREADS) qs[idx] = to_f(q[(size_t)g * rep * D + idx]);
        } else {
            const amk_t* qkv = amk_buf<const amk_t>(c, P_ROPE_ATTN_PARTIAL_QKV);
            // [D/2][cos, sin]: staged in shared memory by attn_prewait, else from the table
            const float* rt = pre ? c.smem + rep * D : amk_buf<const float>(c, P_ROPE_ATTN_PARTIAL_ROPE) + (size_t)pos * D;
            const int half = D / 2;
            const size_t at = ((size_t)g * ms + pos) * D;
            // The row in chunk 0 as a 32-bit shared address (0: none); fewer registers than a pointer.
            const unsigned srow = row >= 0 && row < CH ? (unsigned)__cvta_generic_to_shared(ks + row * (D + AMK_KV_PAD)) : 0u;
            // Appending, two more "heads" of threads: hl == rep ropes k, hl == rep + 1 copies v (the
            // pair i, i + half each), into the cache and, if in chunk 0, the staged row.
            for (int idx = threadIdx.x; idx < (rep + 2 * append) * half; idx += AMK_THREADS) {
                const int hl = idx / half, i = idx - hl * half;
                if (hl <= rep) {
                    const amk_t* src = qkv + (size_t)(hl < rep ? g * rep + hl : nh + g) * D;
                    float y0, y1;
                    rope_pair(to_f(src[i]), to_f(src[i + half]), rt[2 * i], rt[2 * i + 1], y0, y1);
                    if (hl < rep) {
                        qs[hl * D + i] = rnd(y0);
                        qs[hl * D + i + half] = rnd(y1);
                        continue;
                    }
                    amk_t* kd = amk_buf<amk_t>(c, P_ROPE_ATTN_PARTIAL_K_CACHE) + at;
                    kd[i] = from_f(y0);
                    kd[i + half] = from_f(y1);
                    if (srow) {
                        st_shared_elem(srow + i * (int)sizeof(amk_t), from_f(y0));
                        st_shared_elem(srow + (i + half) * (int)sizeof(amk_t), from_f(y1));
                    }
                } else {
                    const amk_t* vsrc = qkv + (size_t)(nh + ins[P_ROPE_ATTN_PARTIAL_N_KV_HEADS] + g) * D;
                    amk_t* vd = amk_buf<amk_t>(c, P_ROPE_ATTN_PARTIAL_V_CACHE) + at;
                    const amk_t v0 = vsrc[i], v1 = vsrc[i + half];
                    vd[i] = v0;
                    vd[i + half] = v1;
                    if (srow) {
                        const unsigned vrow = srow + CH * (D + AMK_KV_PAD) * (int)sizeof(amk_t);  // V follows K
                        st_shared_elem(vrow + i * (int)sizeof(amk_t), v0);
                        st_shared_elem(vrow + (i + half) * (int)sizeof(amk_t), v1);
                    }
                }
            }
        }
        stage_wait();
    }
    __syncthreads();  // q and chunk 0 staged; this block's cache writes are visible to its own loads
    AMK_TRACE_AT(AMK_MARK_ATTN_PROLOGUE, c.instr);
    attn_block(c, o, n);
}

__device__ void op_attn_combine(const AmkCtx& c) {
    const float* part = amk_buf<const float>(c, P_ATTN_COMBINE_PARTIAL);
    amk_t* out = amk_buf<amk_t>(c, P_ATTN_COMBINE_OUT);
    const int h_lo = c.ins[P_ATTN_COMBINE_HEAD_LO], h_hi = c.ins[P_ATTN_COMBINE_HEAD_HI];
    const int nb = c.ins[P_ATTN_COMBINE_N_BLOCKS], D = c.ins[P_ATTN_COMBINE_HEAD_DIM];
    const int stride = D + 2;
    for (int idx = threadIdx.x; idx < (h_hi - h_lo) * D; idx += AMK_THREADS) {
        const int hl = idx / D, d = idx - hl * D, h = h_lo + hl;
        out[(size_t)h * D + d] = from_f(combine_elem(part + (size_t)h * nb * stride, nb, stride, d));
    }
}
