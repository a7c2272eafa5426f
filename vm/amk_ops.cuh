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
    int* att_in;   // shared (seq_len, pos) of a fused attention task, written by attn_prewait
    bool att_pre;  // attn_prewait ran for this instruction
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
// 16-byte input vectors in flight per thread when a GEMV stages its input without a norm (0: none).
// One: with two, the bf16 build of 512 threads and pipelining 4 spilled 16 bytes, and one measured
// 3 us faster on the H100 (1106.3 vs 1109.5 us) though the down input then takes two round trips.
#define AMK_STAGE_VECS (AMK_DTYPE != 0 && AMK_THREADS < 1024 ? 1 : 0)

// ATTN_COMBINE of element d of one head from its nb partial rows (m, l, o[0:D]) of ``stride`` floats.
// Up to AMK_COMBINE_REGS blocks, every (m, l, o[d]) is loaded at once (one round trip; an empty
// block's o is the zeros its task wrote, loaded and never used); more blocks take two passes.
#define AMK_COMBINE_REGS 8
__device__ __forceinline__ float combine_elem(const float* rows, int nb, int stride, int d) {
    float M = neg_inf(), num = 0.0f, den = 0.0f;
    if (nb <= AMK_COMBINE_REGS) {
        float m[AMK_COMBINE_REGS], l[AMK_COMBINE_REGS], o[AMK_COMBINE_REGS];
#pragma unroll
        for (int b = 0; b < AMK_COMBINE_REGS; ++b) {
            const bool in = b < nb;
            m[b] = in ? rows[b * stride] : 0.0f;
            l[b] = in ? rows[b * stride + 1] : 0.0f;
            o[b] = in ? rows[b * stride + 2 + d] : 0.0f;
        }
#pragma unroll
        for (int b = 0; b < AMK_COMBINE_REGS; ++b)
            if (l[b] > 0.0f) M = fmaxf(M, m[b]);
#pragma unroll
        for (int b = 0; b < AMK_COMBINE_REGS; ++b) {
            if (!(l[b] > 0.0f)) continue;  // empty blocks (and b >= nb, l = 0) are skipped
            const float e = expf(m[b] - M);
            num = fmaf(e, o[b], num);
            den = fmaf(e, l[b], den);
        }
        return den > 0.0f ? num / den : 0.0f;
    }
    for (int b = 0; b < nb; ++b)
        if (rows[b * stride + 1] > 0.0f) M = fmaxf(M, rows[b * stride]);
    for (int b = 0; b < nb; ++b) {
        const float l = rows[b * stride + 1];
        if (!(l > 0.0f)) continue;  // empty blocks are skipped (their o is never read)
        const float s = expf(rows[b * stride] - M);
        num = fmaf(s, rows[b * stride + 2 + d], num);
        den = fmaf(s, l, den);
    }
    return den > 0.0f ? num / den : 0.0f;
}

#if AMK_STAGE_VECS > 0
// x[0:8 nv] = the nv 16-byte vectors at src, in fp32: AMK_STAGE_VECS loads per thread issued
// before any is used, so one round trip per AMK_STAGE_VECS * AMK_VEC * AMK_THREADS elements.
// Through L2 (.cg): other blocks wrote the input during this launch. The fp32 and 1024-thread
// builds stage element by element: with two vectors per thread ptxas spilled there (with one,
// nvcc 13.0 builds them spill-free too; not yet measured on a GPU).
__device__ __forceinline__ void stage_vectors(const uint4* src, int nv, float* x) {
#pragma unroll 1
    for (int v0 = threadIdx.x; v0 < nv; v0 += AMK_STAGE_VECS * AMK_THREADS) {
        uint4 q[AMK_STAGE_VECS];
#pragma unroll
        for (int r = 0; r < AMK_STAGE_VECS; ++r) {
            const int v = v0 + r * AMK_THREADS;
            if (v < nv) q[r] = __ldcg(src + v);
        }
#pragma unroll
        for (int r = 0; r < AMK_STAGE_VECS; ++r) {
            const int v = v0 + r * AMK_THREADS;
            if (v < nv) unpack_vec(q[r], x + v * AMK_VEC);
        }
    }
}
#endif

#if AMK_STAGE_VECS > 0
// RMSNorm staging by 16-byte vectors (k of at most one vector per thread): the input and its
// norm weights in one round trip of one load each per thread, instead of k / AMK_THREADS
// element loads (trace_vm mark gemv_staged: qkv and gate/up staged in 1.9 us, O's plain
// vector staging in 0.6). Same per-element rounding as the element path.
__device__ __forceinline__ void stage_norm_vectors(const AmkCtx& c, const uint4* src, const uint4* nw, int nv,
                                                   float eps, float* x) {
    const int v = threadIdx.x;
    float ss = 0.0f;
    uint4 w = make_uint4(0u, 0u, 0u, 0u);
    if (v < nv) {
        const uint4 q = __ldcg(src + v);
        w = ld_weight16(nw + v);
        unpack_vec(q, x + v * AMK_VEC);
#pragma unroll
        for (int e = 0; e < AMK_VEC; ++e) ss = fmaf(x[v * AMK_VEC + e], x[v * AMK_VEC + e], ss);
    }
    const float r = 1.0f / sqrtf(block_sum(ss, c.red) / (float)(nv * AMK_VEC) + eps);
    if (v < nv) {
        float wf[AMK_VEC];
        unpack_vec(w, wf);
#pragma unroll
        for (int e = 0; e < AMK_VEC; ++e) x[v * AMK_VEC + e] = norm_elem(x[v * AMK_VEC + e], r, wf[e]);
    }
}
#endif

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
#if AMK_STAGE_VECS > 0
        if (k % AMK_VEC == 0 && k <= AMK_VEC * AMK_THREADS &&
            ((reinterpret_cast<uintptr_t>(inp) | reinterpret_cast<uintptr_t>(nw)) & 15u) == 0) {
            stage_norm_vectors(c, reinterpret_cast<const uint4*>(inp), reinterpret_cast<const uint4*>(nw), k / AMK_VEC,
                               eps, x);
        } else
#endif
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
#if AMK_STAGE_VECS > 0
    } else if (k % AMK_VEC == 0 && (reinterpret_cast<uintptr_t>(inp) & 15u) == 0) {
        stage_vectors(reinterpret_cast<const uint4*>(inp), k / AMK_VEC, x);
#endif
    } else {
        for (int j = threadIdx.x; j < k; j += AMK_THREADS) x[j] = to_f(inp[j]);
    }
    __syncthreads();
}

// Loads in flight per lane and row: AMK_PIPE, capped so the load buffer (2 rows x P x
// 4 registers) fits the per-thread register budget of one resident block (65536 /
// AMK_THREADS, about 88 of which the rest of the VM needs, 96 in fp32). Measured with
// ptxas, the caps keep every build spill-free: P is at most 1 at 1024 threads, 5 at 512
// (fp32: 4), 8 at 256 or fewer (fp32: 5).
// ptxas sizes the budget by the block rounded up to 128 threads (448 threads get 128 registers).
#define AMK_REG_ROUNDED ((AMK_THREADS + 127) / 128 * 128)
#define AMK_REG_BUDGET (65536 / AMK_REG_ROUNDED > 255 ? 255 : 65536 / AMK_REG_ROUNDED)
struct AmkPipe {
    static constexpr int fit = (AMK_REG_BUDGET - (AMK_DTYPE == 0 ? 96 : 88)) / 8;  // ir.VM_BASE_REGS(_FP32)
    static constexpr int most = AMK_DTYPE == 0 ? 5 : 8;  // fp32 vectors need more registers for x
    static constexpr int cap = fit < 1 ? 1 : (fit < most ? fit : most);  // at least one load in flight
    static constexpr int value = AMK_PIPE < cap ? AMK_PIPE : cap;
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

// x1: offset of the second slot's input in x (0, or k/2 when a lone row is split).
__device__ __forceinline__ void consume_chunk(float (&acc)[2][AMK_P], const uint4 (&q)[2][AMK_P], const float* x,
                                              int x1, int v) {
#pragma unroll
    for (int p = 0; p < AMK_P; ++p) {
        acc[0][p] = vdot(q[0][p], x + (v + 32 * p) * AMK_VEC, acc[0][p]);
        acc[1][p] = vdot(q[1][p], x + x1 + (v + 32 * p) * AMK_VEC, acc[1][p]);
    }
}

// y[r] = sum_j w_r[j] * x[j] for the rows of ``rp`` (one warp, fp32): P independent
// 16-byte loads per lane and row in flight, P accumulator chains per row.
__device__ __forceinline__ void dot_rows(RowPair rp, const amk_t* const (&wr)[2], const float* x, int k,
                                         bool vec, float (&y)[2]) {
    constexpr int P = AMK_P;
    const int lane = threadIdx.x & 31;
    float acc[2][P];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int p = 0; p < P; ++p) acc[r][p] = 0.0f;
    bool split = false;
    if (vec) {
        int nv = k / AMK_VEC;
        int v = lane;
        // A lone row with whole chunks in each half streams its halves through both slots:
        // twice the loads in flight (the down projection has one row of k = 8192 per warp).
        int x1 = 0;
#if AMK_THREADS < 1024  // the 1024-thread build (64 registers) has no room for it
        if (rp.nr == 1 && nv % (64 * P) == 0) {
            split = true;
            nv /= 2;
            rp.w[1] = rp.w[0] + nv;
            rp.nr = 2;
            x1 = nv * AMK_VEC;
        }
#endif
        // The P unroll is the ILP; unrolling this loop further only costs registers.
#pragma unroll 1
        for (; v + 32 * (P - 1) < nv; v += 32 * P) {
            uint4 q[2][P];
            issue_chunk(q, rp, v);
            consume_chunk(acc, q, x, x1, v);
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
    float s[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int p = 0; p < P; ++p) s[r] += acc[r][p];
    if (split) {
        y[0] = warp_sum(s[0] + s[1]);
        y[1] = 0.0f;
    } else {
        y[0] = warp_sum(s[0]);
        y[1] = warp_sum(s[1]);
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
    AMK_TRACE_AT(AMK_MARK_GEMV_STAGED, c.instr);
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

#include "amk_attention.cuh"
