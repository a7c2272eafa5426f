// The opcodes of the AMK VM. Each runs with all AMK_THREADS threads of the block
// and implements the doc string of its OpSpec in pytest_amk/ir.py exactly:
// fp32 accumulation, rounding to the model dtype at the documented points.
//
// Activations, KV and partials are written by other blocks during the same
// launch: they are read with plain (coherent) loads, never through the
// read-only path. Only weights (never written) use ld.global.nc.
#pragma once

#include "amk_common.cuh"

struct AmkCtx {
    const int* ins;      // the current instruction's words (shared memory)
    void* const* bufs;   // buffer id -> device pointer (shared memory copy)
    float* smem;         // the op's dynamic scratch (ir.task_smem_bytes)
    float* red;          // AMK_WARPS floats of reduction scratch
    int* err;            // error record
    int sm;
    int instr;
};

template <class P>
__device__ __forceinline__ P* amk_buf(const AmkCtx& c, int word) {
    return reinterpret_cast<P*>(c.bufs[c.ins[word]]);
}

__device__ __forceinline__ float amk_fparam(const AmkCtx& c, int word) {
    return __int_as_float(c.ins[word]);
}

__device__ void raise_fault(int* err, int code, int sm, int instr, int op, int counter,
                            int value, int threshold, int extra) {
    // First writer wins: claim the record, fill it, then publish the code.
    if (atomicCAS(err + AMK_ERR_CODE, 0, -1) == 0) {
        err[AMK_ERR_SM] = sm;
        err[AMK_ERR_INSTR] = instr;
        err[AMK_ERR_OP] = op;
        err[AMK_ERR_COUNTER] = counter;
        err[AMK_ERR_VALUE] = value;
        err[AMK_ERR_THRESHOLD] = threshold;
        err[AMK_ERR_EXTRA] = extra;
        __threadfence();
        atomicExch(err + AMK_ERR_CODE, code);
    }
}

// ---------------------------------------------------------------- EMBED, ADD, SILU_MUL

__device__ void op_embed(const AmkCtx& c) {
    const int token = amk_buf<const int>(c, P_EMBED_TOKEN)[0];
    if (token < 0) {
        if (threadIdx.x == 0) raise_fault(c.err, AMK_FAULT_BAD_INPUT, c.sm, c.instr, OP_EMBED, -1, token, 0, 0);
        return;
    }
    const amk_t* table = amk_buf<const amk_t>(c, P_EMBED_TABLE);
    amk_t* out = amk_buf<amk_t>(c, P_EMBED_OUT);
    const int lo = c.ins[P_EMBED_LO], hi = c.ins[P_EMBED_HI];
    const amk_t* row = table + (size_t)token * (size_t)c.ins[P_EMBED_HIDDEN];
    for (int i = lo + threadIdx.x; i < hi; i += AMK_THREADS) out[i] = __ldg(row + i);
}

__device__ void op_add(const AmkCtx& c) {
    const amk_t* a = amk_buf<const amk_t>(c, P_ADD_A);
    const amk_t* b = amk_buf<const amk_t>(c, P_ADD_B);
    amk_t* out = amk_buf<amk_t>(c, P_ADD_OUT);
    const int lo = c.ins[P_ADD_LO], hi = c.ins[P_ADD_HI];
    for (int i = lo + threadIdx.x; i < hi; i += AMK_THREADS) out[i] = from_f(add_rn(to_f(a[i]), to_f(b[i])));
}

__device__ void op_silu_mul(const AmkCtx& c) {
    const amk_t* inp = amk_buf<const amk_t>(c, P_SILU_MUL_INP);
    amk_t* out = amk_buf<amk_t>(c, P_SILU_MUL_OUT);
    const int lo = c.ins[P_SILU_MUL_LO], hi = c.ins[P_SILU_MUL_HI], up = c.ins[P_SILU_MUL_UP_OFF];
    for (int i = lo + threadIdx.x; i < hi; i += AMK_THREADS)
        out[i] = from_f(mul_rn(rnd(silu(to_f(inp[i]))), to_f(inp[up + i])));
}

// ---------------------------------------------------------------- RMSNORM

// r = rsqrt(mean(inp[0:n]^2) + eps) in fp32, as 1/sqrt (both correctly rounded, like torch).
__device__ __forceinline__ float rms_scale(const amk_t* inp, int n, float eps, float* red) {
    float ss = 0.0f;
    for (int j = threadIdx.x; j < n; j += AMK_THREADS) {
        const float v = to_f(inp[j]);
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss, red);
    return 1.0f / sqrtf(ss / (float)n + eps);
}

__device__ __forceinline__ float norm_elem(float x, float r, float w) { return rnd(mul_rn(rnd(mul_rn(x, r)), w)); }

__device__ void op_rmsnorm(const AmkCtx& c) {
    const amk_t* inp = amk_buf<const amk_t>(c, P_RMSNORM_INP);
    const amk_t* w = amk_buf<const amk_t>(c, P_RMSNORM_WEIGHT);
    amk_t* out = amk_buf<amk_t>(c, P_RMSNORM_OUT);
    const int lo = c.ins[P_RMSNORM_LO], hi = c.ins[P_RMSNORM_HI];
    const float r = rms_scale(inp, c.ins[P_RMSNORM_N], amk_fparam(c, P_RMSNORM_EPS), c.red);
    for (int i = lo + threadIdx.x; i < hi; i += AMK_THREADS) out[i] = from_f(norm_elem(to_f(inp[i]), r, ld_weight1(w + i)));
}

// ---------------------------------------------------------------- GEMV, LM_HEAD

// Stage x = inp[0:k] (RMS-normalised and rounded to dtype if norm_id >= 0) in fp32 smem.
// One pass over inp (kept in smem for the normalisation); the norm weights, which do
// not depend on activations, are loaded into registers before the activations.
#define AMK_NORM_REGS 8

// ATTN_COMBINE of element d of one head from its nb partial rows (m, l, o[0:D]) of ``stride`` floats.
__device__ __forceinline__ float combine_elem(const float* rows, int nb, int stride, int d) {
    float M = neg_inf();
    for (int b = 0; b < nb; ++b)
        if (rows[b * stride + 1] > 0.0f) M = fmaxf(M, rows[b * stride]);
    float num = 0.0f, den = 0.0f;
    for (int b = 0; b < nb; ++b) {
        const float l = rows[b * stride + 1];
        if (!(l > 0.0f)) continue;  // empty blocks are skipped (their o is never read)
        const float s = expf(rows[b * stride] - M);
        num = fmaf(s, rows[b * stride + 2 + d], num);
        den = fmaf(s, l, den);
    }
    return den > 0.0f ? num / den : 0.0f;
}

__device__ void stage_input(const AmkCtx& c, const amk_t* inp, int k, int norm_id, float eps, int inp_blocks,
                            int head_dim, float* x) {
    if (inp_blocks > 0) {
        // The input is fp32 attention partials: combine while staging (no combine stage, no
        // sync level), as ATTN_COMBINE does. Three passes keep the global loads parallel:
        // every (head, block)'s (m, l) at once; per head the block weights exp(m_b - M) and
        // the denominator; then each o_b[d] of the live blocks. Each thread later normalises
        // only the elements it wrote here.
        const float* part = reinterpret_cast<const float*>(inp);
        const int stride = head_dim + 2, nb = inp_blocks, heads = k / head_dim;
        float* wb = x + k;            // [heads][nb]: m_b, then exp(m_b - M)
        float* lb = wb + heads * nb;  // [heads][nb]: l_b
        float* den = lb + heads * nb; // [heads]
        for (int i = threadIdx.x; i < heads * nb; i += AMK_THREADS) {
            wb[i] = part[(size_t)i * stride];
            lb[i] = part[(size_t)i * stride + 1];
        }
        __syncthreads();
        for (int h = threadIdx.x; h < heads; h += AMK_THREADS) {
            float M = neg_inf(), dn = 0.0f;
            for (int b = 0; b < nb; ++b)
                if (lb[h * nb + b] > 0.0f) M = fmaxf(M, wb[h * nb + b]);
            for (int b = 0; b < nb; ++b) {
                const float l = lb[h * nb + b];
                const float e = l > 0.0f ? expf(wb[h * nb + b] - M) : 0.0f;
                if (l > 0.0f) dn = fmaf(e, l, dn);
                wb[h * nb + b] = e;
            }
            den[h] = dn;
        }
        __syncthreads();
        float ss = 0.0f;
        for (int j = threadIdx.x; j < k; j += AMK_THREADS) {
            const int h = j / head_dim, d = j - h * head_dim;
            const float* o = part + (size_t)h * nb * stride + 2 + d;
            float num = 0.0f;
#pragma unroll 4
            for (int b = 0; b < nb; ++b)
                if (lb[h * nb + b] > 0.0f) num = fmaf(wb[h * nb + b], o[(size_t)b * stride], num);
            const float v = rnd(den[h] > 0.0f ? num / den[h] : 0.0f);
            x[j] = v;
            ss = fmaf(v, v, ss);
        }
        if (norm_id >= 0) {
            const amk_t* nw = reinterpret_cast<const amk_t*>(c.bufs[norm_id]);
            const float r = 1.0f / sqrtf(block_sum(ss, c.red) / (float)k + eps);
            for (int j = threadIdx.x; j < k; j += AMK_THREADS) x[j] = norm_elem(x[j], r, ld_weight1(nw + j));
        }
        __syncthreads();
        return;
    }
    if (norm_id >= 0) {
        const amk_t* nw = reinterpret_cast<const amk_t*>(c.bufs[norm_id]);
        float ss = 0.0f;
        if (k <= AMK_NORM_REGS * AMK_THREADS) {
            float wv[AMK_NORM_REGS];
#pragma unroll
            for (int t = 0; t < AMK_NORM_REGS; ++t) {
                const int j = threadIdx.x + t * AMK_THREADS;
                wv[t] = j < k ? ld_weight1(nw + j) : 0.0f;
            }
#pragma unroll
            for (int t = 0; t < AMK_NORM_REGS; ++t) {
                const int j = threadIdx.x + t * AMK_THREADS;
                if (j < k) {
                    const float v = to_f(inp[j]);
                    x[j] = v;
                    ss = fmaf(v, v, ss);
                }
            }
            const float r = 1.0f / sqrtf(block_sum(ss, c.red) / (float)k + eps);
#pragma unroll
            for (int t = 0; t < AMK_NORM_REGS; ++t) {
                const int j = threadIdx.x + t * AMK_THREADS;
                if (j < k) x[j] = norm_elem(x[j], r, wv[t]);  // each thread rereads only its own x[j]
            }
        } else {
            for (int j = threadIdx.x; j < k; j += AMK_THREADS) {
                const float v = to_f(inp[j]);
                x[j] = v;
                ss = fmaf(v, v, ss);
            }
            const float r = 1.0f / sqrtf(block_sum(ss, c.red) / (float)k + eps);
            for (int j = threadIdx.x; j < k; j += AMK_THREADS) x[j] = norm_elem(x[j], r, ld_weight1(nw + j));
        }
    } else {
        for (int j = threadIdx.x; j < k; j += AMK_THREADS) x[j] = to_f(inp[j]);
    }
    __syncthreads();
}

// Loads in flight per lane and row: AMK_PIPE, capped so the load buffer (2 rows x P x
// 4 registers) fits the per-thread register budget of one resident block (65536 /
// AMK_THREADS, about 56 of which the rest of the VM needs). Measured with ptxas, the
// caps keep every build (each dtype; sm_80, sm_90, sm_120) spill-free: P is at most
// 1 at 1024 threads, 9 at 512, 8 at 256 or fewer (fp32: 5).
#define AMK_REG_BUDGET (65536 / AMK_THREADS > 255 ? 255 : 65536 / AMK_THREADS)
struct AmkPipe {
    static constexpr int fit = (AMK_REG_BUDGET - 56) / 8;
    static constexpr int most = AMK_DTYPE == 0 ? 5 : 8;  // fp32 vectors need more registers for x
    static constexpr int cap = fit < most ? fit : most;
    static constexpr int value = AMK_PIPE < cap ? AMK_PIPE : (cap < 1 ? 1 : cap);
};
#define AMK_P (AmkPipe::value)
#ifdef AMK_PIPE_CAP  // passed by the builder from ir.max_pipelining_depth: the two must agree
static_assert(AmkPipe::cap == AMK_PIPE_CAP, "ir.max_pipelining_depth drifted from the VM's register cap");
#endif

// A warp's GEMV work item: two weight rows streamed together (a row pair, or the gate
// and up rows of a SiLU-mul row); ``nr`` = 1 when only the first row exists.
struct RowPair {
    const uint4* w[2];
    int nr;
};

// Issue the P 16-byte loads of rows at vector index v (skipped for a missing second row).
__device__ __forceinline__ void issue_chunk(uint4 (&q)[2][AMK_P], const RowPair& rp, int v) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int p = 0; p < AMK_P; ++p)
            q[r][p] = (r < rp.nr) ? ld_weight16(rp.w[r] + v + 32 * p) : make_uint4(0u, 0u, 0u, 0u);
}

__device__ __forceinline__ void consume_chunk(float (&acc)[2][AMK_P], const uint4 (&q)[2][AMK_P], const float* x,
                                              int v) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int p = 0; p < AMK_P; ++p) acc[r][p] = vdot(q[r][p], x + (v + 32 * p) * AMK_VEC, acc[r][p]);
}

// y[r] = sum_j w_r[j] * x[j] for the rows of ``rp`` (one warp, fp32): P independent
// 16-byte loads per lane and row in flight, P accumulator chains per row.
__device__ __forceinline__ void dot_rows(const RowPair& rp, const amk_t* const (&wr)[2], const float* x, int k,
                                         bool vec, float (&y)[2]) {
    constexpr int P = AMK_P;
    const int lane = threadIdx.x & 31;
    float acc[2][P];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int p = 0; p < P; ++p) acc[r][p] = 0.0f;
    if (vec) {
        const int nv = k / AMK_VEC;
        int v = lane;
        // The P unroll is the ILP; unrolling this loop further only costs registers.
#pragma unroll 1
        for (; v + 32 * (P - 1) < nv; v += 32 * P) {
            uint4 q[2][P];
            issue_chunk(q, rp, v);
            consume_chunk(acc, q, x, v);
        }
#pragma unroll 1
        for (; v < nv; v += 32) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
                if (r < rp.nr) acc[r][0] = vdot(ld_weight16(rp.w[r] + v), x + v * AMK_VEC, acc[r][0]);
        }
    } else {
#pragma unroll 1
        for (int j = lane; j < k; j += 32) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
                if (r < rp.nr) acc[r][0] = fmaf(ld_weight1(wr[r] + j), x[j], acc[r][0]);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float s = 0.0f;
#pragma unroll
        for (int p = 0; p < P; ++p) s += acc[r][p];
        y[r] = warp_sum(s);
    }
}

__device__ __forceinline__ bool vec_ok(const amk_t* w, int k) {
    return (k % AMK_VEC) == 0 && (reinterpret_cast<uintptr_t>(w) & 15u) == 0;
}

// Work item i of this warp: act=1: gate row n_lo+warp+i*W and its up row; else the row
// pair (n_lo+warp+2iW, +W). Rows of a warp ascend (argmax ties keep the smallest).
__device__ __forceinline__ bool gemv_item(const amk_t* w, int k, int n_lo, int n_hi, int act, int up_row, int i,
                                          RowPair& rp, const amk_t* (&wr)[2], int (&rows)[2]) {
    const int warp = threadIdx.x >> 5;
    if (act == 1) {
        rows[0] = n_lo + warp + i * AMK_WARPS;
        rows[1] = up_row + rows[0];
        rp.nr = 2;
    } else {
        rows[0] = n_lo + warp + 2 * i * AMK_WARPS;
        rows[1] = rows[0] + AMK_WARPS;
        rp.nr = rows[1] < n_hi ? 2 : 1;
    }
    if (rows[0] >= n_hi) return false;
    wr[0] = w + (size_t)rows[0] * k;
    wr[1] = w + (size_t)(rp.nr == 2 ? rows[1] : rows[0]) * k;
    rp.w[0] = reinterpret_cast<const uint4*>(wr[0]);
    rp.w[1] = reinterpret_cast<const uint4*>(wr[1]);
    return true;
}

// The shared body of GEMV and LM_HEAD: the block stages the input, then each warp
// streams its rows (their first bytes are usually in L2 already: see prefetch_weights).
template <bool LM>
__device__ void gemv_body(const AmkCtx& c, const amk_t* inp, const amk_t* w, int n_lo, int n_hi, int k, int norm_id,
                          float eps, int act, int up_row, int inp_blocks, int head_dim, amk_t* out, const amk_t* res,
                          float* logits, float& best, int& best_row) {
    float* x = c.smem;
    const bool vec = vec_ok(w, k);
    const int lane = threadIdx.x & 31;
    RowPair rp;
    const amk_t* wr[2];
    int rows[2];
    stage_input(c, inp, k, norm_id, eps, inp_blocks, head_dim, x);
#pragma unroll 1
    for (int i = 0; gemv_item(w, k, n_lo, n_hi, act, up_row, i, rp, wr, rows); ++i) {
        float y[2];
        dot_rows(rp, wr, x, k, vec, y);
        if (LM) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                if (r >= rp.nr) break;
                if (lane == 0) logits[rows[r]] = y[r];
                if (y[r] > best || best_row == 0x7fffffff) {
                    best = y[r];
                    best_row = rows[r];
                }
            }
        } else if (lane == 0) {
            float v[2];
            int nout = rp.nr;
            if (act == 1) {
                v[0] = mul_rn(rnd(silu(rnd(y[0]))), rnd(y[1]));
                nout = 1;
            } else {
                v[0] = y[0];
                v[1] = y[1];
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                if (r >= nout) break;
                float o = v[r];
                if (res) o = add_rn(to_f(res[rows[r]]), rnd(o));
                out[rows[r]] = from_f(o);
            }
        }
    }
}

__device__ void op_gemv(const AmkCtx& c) {
    const int res_id = c.ins[P_GEMV_RESIDUAL];
    const amk_t* res = res_id >= 0 ? reinterpret_cast<const amk_t*>(c.bufs[res_id]) : nullptr;
    float best = 0.0f;
    int best_row = 0;
    gemv_body<false>(c, amk_buf<const amk_t>(c, P_GEMV_INP), amk_buf<const amk_t>(c, P_GEMV_WEIGHT),
                     c.ins[P_GEMV_N_LO], c.ins[P_GEMV_N_HI], c.ins[P_GEMV_K], c.ins[P_GEMV_NORM_WEIGHT],
                     amk_fparam(c, P_GEMV_EPS), c.ins[P_GEMV_ACT], c.ins[P_GEMV_UP_ROW], c.ins[P_GEMV_INP_BLOCKS],
                     c.ins[P_GEMV_HEAD_DIM], amk_buf<amk_t>(c, P_GEMV_OUT), res, nullptr, best, best_row);
}

__device__ void op_lm_head(const AmkCtx& c) {
    const int n_lo = c.ins[P_LM_HEAD_N_LO], tile = c.ins[P_LM_HEAD_TILE];
    float* amax = amk_buf<float>(c, P_LM_HEAD_AMAX);
    float best = neg_inf();
    int best_row = 0x7fffffff;
    gemv_body<true>(c, amk_buf<const amk_t>(c, P_LM_HEAD_INP), amk_buf<const amk_t>(c, P_LM_HEAD_WEIGHT), n_lo,
                    c.ins[P_LM_HEAD_N_HI], c.ins[P_LM_HEAD_K], c.ins[P_LM_HEAD_NORM_WEIGHT],
                    amk_fparam(c, P_LM_HEAD_EPS), 0, 0, 0, 0, nullptr, nullptr, amk_buf<float>(c, P_LM_HEAD_OUT),
                    best, best_row);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __shared__ float s_best[AMK_WARPS];
    __shared__ int s_row[AMK_WARPS];
    if (lane == 0) {
        s_best[warp] = best;
        s_row[warp] = best_row;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float b = neg_inf();
        int br = 0x7fffffff;
        for (int i = 0; i < AMK_WARPS; ++i) {
            if (s_row[i] == 0x7fffffff) continue;
            if (br == 0x7fffffff || s_best[i] > b || (s_best[i] == b && s_row[i] < br)) {
                b = s_best[i];
                br = s_row[i];
            }
        }
        amax[2 * tile] = b;
        amax[2 * tile + 1] = (float)(br == 0x7fffffff ? n_lo : br);
    }
}

__device__ void op_argmax(const AmkCtx& c) {
    if (threadIdx.x >= 32) return;
    const float* amax = amk_buf<const float>(c, P_ARGMAX_AMAX);
    const int n = c.ins[P_ARGMAX_N_TILES];
    float best = neg_inf();
    int bt = 0x7fffffff;
    for (int t = threadIdx.x; t < n; t += 32) {
        const float v = amax[2 * t];
        if (bt == 0x7fffffff || v > best) {
            best = v;
            bt = t;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int ot = __shfl_xor_sync(0xffffffffu, bt, o);
        const bool take = ot != 0x7fffffff &&
                          (bt == 0x7fffffff || ov > best || (ov == best && ot < bt));
        if (take) {
            best = ov;
            bt = ot;
        }
    }
    if (threadIdx.x == 0 && bt != 0x7fffffff) amk_buf<int>(c, P_ARGMAX_OUT)[0] = (int)amax[2 * bt + 1];
}

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
