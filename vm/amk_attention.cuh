// The attention opcodes of the AMK VM: ROPE_APPEND, ATTN_PARTIAL, ROPE_ATTN_PARTIAL and
// ATTN_COMBINE (the shared helpers and AmkCtx come from amk_ops.cuh, which includes this
// file at its end). Same rules as every op: implement the doc of its OpSpec in
// pytest_amk/ir.py, fp32 accumulation, KV read with plain (coherent) loads.
#pragma once

// ---------------------------------------------------------------- attention

#define AMK_KV_PAD (AMK_DTYPE == 0 ? 1 : 2)  // ir.kv_pad: staged K/V rows have an odd stride in words

// ir.attn_chunk: positions of a KV block staged in shared memory at once.
__device__ __forceinline__ int attn_chunk(int kb, int D) {
    return max(1, min(kb, AMK_ATTN_CHUNK_BYTES / (2 * (D + AMK_KV_PAD) * (int)sizeof(amk_t))));
}

// Rotate-half RoPE of the pair (x[i], x[i + D/2]) in fp32, one rounding per product and sum.
__device__ __forceinline__ void rope_pair(float x0, float x1, float cs, float sn, float& y0, float& y1) {
    y0 = sub_rn(mul_rn(x0, cs), mul_rn(x1, sn));
    y1 = add_rn(mul_rn(x1, cs), mul_rn(x0, sn));
}

__device__ __forceinline__ float2 unpack2(unsigned w) {
#if AMK_DTYPE == 1
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
#else
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));  // bf16
#endif
}

// K and V rows [0, cn) of one head (from kp, vp) into shared memory, row stride D + AMK_KV_PAD.
// A thread owns one 16-byte column of a row and walks rows with a fixed step (no division
// in the loop: the 1024-thread build has 64 registers): its K and V loads are in flight
// together, so a chunk costs about one memory round trip. The cache is written during the
// launch: plain (coherent) loads.
__device__ void stage_kv(const amk_t* kp, const amk_t* vp, int cn, int D, amk_t* ks, amk_t* vs) {
    const int RS = D + AMK_KV_PAD;
    const bool vec = (D % AMK_VEC) == 0 && ((reinterpret_cast<uintptr_t>(kp) | reinterpret_cast<uintptr_t>(vp)) & 15) == 0;
    if (vec && D / AMK_VEC <= AMK_THREADS) {
        const int per_row = D / AMK_VEC, rstep = AMK_THREADS / per_row;
        const int row0 = threadIdx.x / per_row, col = (threadIdx.x - row0 * per_row) * AMK_VEC;
        if (row0 >= rstep) return;  // threads past the last whole row of columns
        // Pointers advance by a fixed step; shared memory by 32-bit address (fewer registers).
        const uint4* kg = reinterpret_cast<const uint4*>(kp + (size_t)row0 * D + col);
        const uint4* vg = reinterpret_cast<const uint4*>(vp + (size_t)row0 * D + col);
        const size_t gstep = (size_t)rstep * D / AMK_VEC;
        unsigned ka = (unsigned)__cvta_generic_to_shared(ks + row0 * RS + col);
        const unsigned va_off = (unsigned)((vs - ks) * (int)sizeof(amk_t)), sstep = rstep * RS * (int)sizeof(amk_t);
#pragma unroll 1
        for (int row = row0; row < cn; row += rstep, kg += gstep, vg += gstep, ka += sstep) {
            const uint4 k4 = *kg, v4 = *vg;
            asm volatile("st.shared.u32 [%0], %1;\n\tst.shared.u32 [%0+4], %2;\n\t"
                         "st.shared.u32 [%0+8], %3;\n\tst.shared.u32 [%0+12], %4;"
                         ::"r"(ka), "r"(k4.x), "r"(k4.y), "r"(k4.z), "r"(k4.w) : "memory");
            asm volatile("st.shared.u32 [%0], %1;\n\tst.shared.u32 [%0+4], %2;\n\t"
                         "st.shared.u32 [%0+8], %3;\n\tst.shared.u32 [%0+12], %4;"
                         ::"r"(ka + va_off), "r"(v4.x), "r"(v4.y), "r"(v4.z), "r"(v4.w) : "memory");
        }
    } else {
        for (int i = threadIdx.x; i < cn * D; i += AMK_THREADS) {
            const int row = i / D, col = i - row * D;
            ks[row * RS + col] = kp[i];
            vs[row * RS + col] = vp[i];
        }
    }
}

// Split-KV attention over one block of kv head g for its rep q heads, already staged in
// fp32 at c.smem[0 : rep*D]. Writes (m, l, o[0:D]) per head to the partials. The block is
// processed in shared-memory chunks with a running max (online softmax); with one chunk
// this is exactly m = max s, l = sum e, o = sum e v.
// smem: q [rep][D] | o accumulators [rep][D] | scores [rep][chunk] | (m, l, alpha) [rep] | K, V chunk.
__device__ void attn_block(const AmkCtx& c, int o) {
    // Params are read from the instruction here, not passed in: nothing stays live across
    // the prologue (the 1024-thread build has 64 registers). o: see op_attention.
    const int* ins = c.ins;
    const int g = ins[P_ATTN_PARTIAL_KV_HEAD + o], blk = ins[P_ATTN_PARTIAL_BLK + o];
    const int kb = ins[P_ATTN_PARTIAL_KV_BLOCK + o], D = ins[P_ATTN_PARTIAL_HEAD_DIM + o];
    const int rep = ins[P_ATTN_PARTIAL_N_HEADS + o] / ins[P_ATTN_PARTIAL_N_KV_HEADS + o];
    const int ms = ins[P_ATTN_PARTIAL_MAX_SEQ + o], nb = ins[P_ATTN_PARTIAL_N_BLOCKS + o];
    const float scale = amk_fparam(c, P_ATTN_PARTIAL_SCALE + o);
    const bool fused = o != 0;
    const int L = amk_buf<const int>(c, fused ? P_ROPE_ATTN_PARTIAL_SEQ_LEN : P_ATTN_PARTIAL_SEQ_LEN)[0];
    const amk_t* kc = amk_buf<const amk_t>(c, fused ? P_ROPE_ATTN_PARTIAL_K_CACHE : P_ATTN_PARTIAL_K_CACHE);
    const amk_t* vc = amk_buf<const amk_t>(c, fused ? P_ROPE_ATTN_PARTIAL_V_CACHE : P_ATTN_PARTIAL_V_CACHE);
    float* part = amk_buf<float>(c, fused ? P_ROPE_ATTN_PARTIAL_PARTIAL : P_ATTN_PARTIAL_PARTIAL);
    // Few values stay live across the chunk loop (the 1024-thread build has 64 registers):
    // shared-memory arrays are offsets from c.smem, the partial rows one pointer.
    const int n = min(L, blk * kb + kb) - blk * kb;
    const int hstride = nb * (D + 2);  // floats between one head's partial rows
    float* dst = part + ((size_t)g * rep * nb + blk) * (D + 2);
    if (n <= 0) {
        for (int idx = threadIdx.x; idx < rep * (D + 2); idx += AMK_THREADS) {
            const int hl = idx / (D + 2), j = idx - hl * (D + 2);
            dst[hl * hstride + j] = j == 0 ? neg_inf() : 0.0f;
        }
        return;
    }
    const int CH = attn_chunk(kb, D);
    float* sm = c.smem;
    const int o_acc = rep * D, o_sc = 2 * rep * D, o_ml = o_sc + rep * CH, o_kv = o_ml + 3 * rep;
    for (int idx = threadIdx.x; idx < rep * D; idx += AMK_THREADS) sm[o_acc + idx] = 0.0f;
    for (int hl = threadIdx.x; hl < rep; hl += AMK_THREADS) {
        sm[o_ml + 3 * hl] = neg_inf();
        sm[o_ml + 3 * hl + 1] = 0.0f;
    }
    const size_t kv0 = ((size_t)g * ms + (size_t)blk * kb) * D;
    const amk_t* kp = kc + kv0;
    const amk_t* vp = vc + kv0;
#pragma unroll 1
    for (int c0 = 0; c0 < n; c0 += CH) {
        const int cn = min(CH, n - c0);
        const int RS = D + AMK_KV_PAD;
        amk_t* ks = reinterpret_cast<amk_t*>(sm + o_kv);
        stage_kv(kp + (size_t)c0 * D, vp + (size_t)c0 * D, cn, D, ks, ks + CH * RS);
        __syncthreads();
        // Scores: a thread per (head, position); consecutive threads read consecutive K rows,
        // whose odd word stride keeps the column reads free of bank conflicts.
        for (int idx = threadIdx.x; idx < rep * cn; idx += AMK_THREADS) {
            const int hl = idx / cn, pp = idx - hl * cn;
            const float* qh = sm + hl * D;
            float s = 0.0f;
#if AMK_DTYPE == 0
            const float* kr = ks + pp * RS;
            for (int d = 0; d < D; ++d) s = fmaf(qh[d], kr[d], s);
#else
            const unsigned* kw = reinterpret_cast<const unsigned*>(ks + pp * RS);
#pragma unroll 2
            for (int j = 0; j < D / 2; ++j) {
                const float2 f = unpack2(kw[j]);
                s = fmaf(qh[2 * j], f.x, s);
                s = fmaf(qh[2 * j + 1], f.y, s);
            }
#endif
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
            const float m_old = ml[0], m_new = fmaxf(m_old, mc);
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
                ml[1] = fmaf(ml[1], alpha, l);
                ml[2] = alpha;
            }
        }
        __syncthreads();
        // o[d] = alpha o[d] + sum_p e_p v_p[d]: a thread per (head, d), coalesced over d.
        const amk_t* vs = ks + CH * RS;
        for (int idx = threadIdx.x; idx < rep * D; idx += AMK_THREADS) {
            const int hl = idx / D, d = idx - hl * D;
            const float* e = sm + o_sc + hl * CH;
            float a = 0.0f;
#pragma unroll 2
            for (int pp = 0; pp < cn; ++pp) a = fmaf(e[pp], to_f(vs[pp * RS + d]), a);
            sm[o_acc + idx] = fmaf(sm[o_acc + idx], sm[o_ml + 3 * hl + 2], a);
        }
        __syncthreads();  // the next chunk overwrites K, V and the scores
    }
    for (int idx = threadIdx.x; idx < rep * (D + 2); idx += AMK_THREADS) {
        const int hl = idx / (D + 2), j = idx - hl * (D + 2);
        dst[hl * hstride + j] = j < 2 ? sm[o_ml + 3 * hl + j] : sm[o_acc + hl * D + j - 2];
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
    // q heads of this group, then the k head: rotate-half in fp32, one rounding each.
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

// ATTN_PARTIAL and ROPE_ATTN_PARTIAL share one call of attn_block (inlined once: the
// 1024-thread build has 64 registers). The prologue stages the q heads of kv head g in
// fp32 at c.smem[0 : rep*D]. Fused (ROPE_ATTN_PARTIAL): q is roped from qkv and rounded
// to dtype as the unfused q buffer would be; the task whose block holds pos appends the
// roped k and the v of this step first, so its own chunk staging (after the barrier)
// reads them back like any cached position.
static_assert(P_ROPE_ATTN_PARTIAL_SCALE - P_ROPE_ATTN_PARTIAL_KV_HEAD == P_ATTN_PARTIAL_SCALE - P_ATTN_PARTIAL_KV_HEAD,
              "ATTN_PARTIAL and ROPE_ATTN_PARTIAL must list kv_head .. scale in the same order (ir.OPS)");
__device__ void op_attention(const AmkCtx& c, bool fused) {
    // The two ops list their shared params in the same order from kv_head on (ir.OPS).
    const int o = fused ? P_ROPE_ATTN_PARTIAL_KV_HEAD - P_ATTN_PARTIAL_KV_HEAD : 0;
    {
        const int* ins = c.ins;
        const int g = ins[P_ATTN_PARTIAL_KV_HEAD + o], D = ins[P_ATTN_PARTIAL_HEAD_DIM + o];
        const int nh = ins[P_ATTN_PARTIAL_N_HEADS + o], ms = ins[P_ATTN_PARTIAL_MAX_SEQ + o];
        const int rep = nh / ins[P_ATTN_PARTIAL_N_KV_HEADS + o];
        const int op = fused ? OP_ROPE_ATTN_PARTIAL : OP_ATTN_PARTIAL;
        const int L = amk_buf<const int>(c, fused ? P_ROPE_ATTN_PARTIAL_SEQ_LEN : P_ATTN_PARTIAL_SEQ_LEN)[0];
        if (L < 0 || L > ms) {
            if (threadIdx.x == 0) raise_fault(c.err, AMK_FAULT_BAD_INPUT, c.sm, c.instr, op, -1, L, ms, 2);
            return;
        }
        float* qs = c.smem;
        if (!fused) {
            const amk_t* q = amk_buf<const amk_t>(c, P_ATTN_PARTIAL_Q);
            for (int idx = threadIdx.x; idx < rep * D; idx += AMK_THREADS) qs[idx] = to_f(q[(size_t)g * rep * D + idx]);
        } else {
            const int pos = amk_buf<const int>(c, P_ROPE_ATTN_PARTIAL_POS)[0];
            if (pos < 0 || pos >= ms) {
                if (threadIdx.x == 0) raise_fault(c.err, AMK_FAULT_BAD_INPUT, c.sm, c.instr, op, -1, pos, ms, 1);
                return;
            }
            const amk_t* qkv = amk_buf<const amk_t>(c, P_ROPE_ATTN_PARTIAL_QKV);
            const float* rt = amk_buf<const float>(c, P_ROPE_ATTN_PARTIAL_ROPE) + (size_t)pos * D;  // [D/2][cos, sin]
            const int blk = ins[P_ROPE_ATTN_PARTIAL_BLK], kb = ins[P_ROPE_ATTN_PARTIAL_KV_BLOCK], half = D / 2;
            const bool append = blk * kb <= pos && pos < (blk + 1) * kb;
            const size_t at = ((size_t)g * ms + pos) * D;
            for (int idx = threadIdx.x; idx < (rep + append) * half; idx += AMK_THREADS) {
                const int hl = idx / half, i = idx - hl * half;
                const amk_t* src = qkv + (size_t)(hl < rep ? g * rep + hl : nh + g) * D;
                float y0, y1;
                rope_pair(to_f(src[i]), to_f(src[i + half]), rt[2 * i], rt[2 * i + 1], y0, y1);
                if (hl < rep) {
                    qs[hl * D + i] = rnd(y0);
                    qs[hl * D + i + half] = rnd(y1);
                } else {
                    amk_t* dst = amk_buf<amk_t>(c, P_ROPE_ATTN_PARTIAL_K_CACHE) + at;
                    dst[i] = from_f(y0);
                    dst[i + half] = from_f(y1);
                }
            }
            if (append) {
                const amk_t* vsrc = qkv + (size_t)(nh + ins[P_ROPE_ATTN_PARTIAL_N_KV_HEADS] + g) * D;
                amk_t* vdst = amk_buf<amk_t>(c, P_ROPE_ATTN_PARTIAL_V_CACHE) + at;
                for (int d = threadIdx.x; d < D; d += AMK_THREADS) vdst[d] = vsrc[d];
            }
        }
    }
    __syncthreads();  // q staged; this block's cache writes are visible to its own loads
    attn_block(c, o);
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
