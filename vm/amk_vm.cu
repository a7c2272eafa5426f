// The AMK persistent interpreter (DESIGN §7).
//
// One block per SM queue (blockIdx.x = queue index). Each block walks its queue
// of fixed-size instructions (layout in the generated amk_ir.h): wait until
// every (counter, threshold) of the instruction is met, run the op with all
// threads, then signal: one thread adds 1 to the signal counter (release).
//
// Ordering: the waiting thread polls each counter with relaxed loads and, once every wait
// is met, makes them an acquire with one fence (poll_met); the barrier that follows hands
// the acquire to the other threads. After the op, a barrier, then one thread's
// red.release.gpu add on the signal counter (release; cumulative over the writes the
// barrier ordered before it).
//
// Watchdog: a wait that lasts longer than watchdog_ns (%globaltimer, ns) writes
// the error record and aborts; every other waiting block sees the record and
// exits, so no program can hang the GPU.
//
// K-step launch (steps > 1; pytest_amk/multistep.py proves it safe for the program):
// the queue runs `steps` times, decoding one token per pass. Counters are never reset
// inside a launch, so in step s every wait threshold becomes threshold + s *
// counter_step[c] (signals per step). Every task of a step happens-before the single
// ARGMAX task (coarse stage counters), so a block that starts step s >= 1 first waits
// for the ARGMAX counter to reach s * counter_step[barrier_counter] (the step barrier):
// from then on counter c only moves by step s's own signals, exactly as in one step.
// Right after the ARGMAX op, its thread 0 stores the token in tokens_out[s] and updates
// the runtime inputs in place (token = next token, pos += 1, seq_len += 1) before its
// release signal, so the barrier publishes them to step s + 1. With steps == 1 none of
// this runs and the kernel behaves as the single-step VM.
#include "amk_trace.cuh"  // first: the ops take marks (AMK_TRACE_AT)
#include "amk_ops.cuh"

__device__ __forceinline__ unsigned ld_relaxed(const unsigned* p) {
    unsigned v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// After a relaxed poll saw the counter met: the acquire pattern (PTX memory model: a relaxed
// load that observes the release, then an acquire fence), so the op's reads come after the
// producers' writes. fence.acquire (PTX 8.6, sm_90) is the one-way fence; before sm_90 the
// two-way acq_rel.
__device__ __forceinline__ void poll_met() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.acquire.gpu;" ::: "memory");
#else
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
#endif
}

__device__ __forceinline__ int ld_volatile(const int* p) { return *reinterpret_cast<const volatile int*>(p); }

__device__ __forceinline__ long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return (long long)t;
}

// Thread 0, after a poll found counter c unmet (value v, threshold thr): 1 when the block must
// stop, because another block raised a fault or this instruction's wait budget is spent (then it
// raises the watchdog fault itself). t0: when the instruction's first unmet poll began (-1: not
// yet); the budget counts from there.
__device__ __forceinline__ int poll_unmet(int* err, long long& t0, long long budget_ns, int sm, int instr, int op,
                                          int c, unsigned v, unsigned thr, int step) {
    if (t0 < 0) t0 = now_ns();
    if (ld_volatile(err + AMK_ERR_CODE) != 0) return 1;
    if (now_ns() - t0 > budget_ns) {
        raise_fault(err, AMK_FAULT_WATCHDOG, sm, instr, op, c, (int)v, (int)thr, step);
        return 1;
    }
    return 0;
}

// Thread 0 only: spin until counters[c] >= thr (the step barrier; wait_all below polls an
// instruction's waits the same way). Relaxed loads: the caller runs poll_met once every wait is met.
// Returns 1 when the block must stop (watchdog or another block's fault). Polls with no back-off:
// dropping a 32 ns __nanosleep saved ~10% of the sync time. Relaxed polls and one acquire fence
// instead of an ld.acquire per poll (which also invalidated L1 on every poll, CCTL.IVALL in the
// SASS), measured on an H100 (1B shape, tools/ab_vm.py, 6 rounds, session 9): the NOP skeleton
// 146.7 against 156.3 us, the step 1040.5 / 1073.9 against 1042.8 / 1078.9 us at context 16 / 512.
// (With the two-way fence.acq_rel, before fence.acquire existed, the skeleton had measured 217
// against 185 us.) The error code is loaded only after an unmet poll: loaded with every poll (one
// round trip a poll instead of two) the skeleton measured 150.1 against 146.7 us (session 11),
// though a stand-alone sync micro-benchmark was 9% faster with it. A fault record's extra word is
// the step (0 for a one-step launch).
__device__ int wait_counter(const unsigned* counters, int c, unsigned thr, int* err, int sm, int instr, int op,
                            int step, long long budget_ns, long long& t0) {
    for (;;) {
        const unsigned v = ld_relaxed(counters + c);
        if (v >= thr) return 0;
        if (poll_unmet(err, t0, budget_ns, sm, instr, op, c, v, thr, step)) return 1;
    }
}

// Thread 0 only: every (counter, threshold) of the instruction, thresholds shifted to step s.
// Each poll loads all of the instruction's counters at once instead of one wait after another,
// which cost a block that arrives after its waits were met a round trip for each wait (the O
// projection and down have two). H100, tools/ab_vm.py, 6 rounds (session 11): the 1B skeleton
// 132.0 against 146.7 us, the step 1032.7 / 1069.6 against 1037.6 / 1075.3 us at context 16 /
// 512; toy-4L 92.4 against 93.3 us, its skeleton 35.3 against 38.5. Same budget and fault record
// as wait_counter (poll_unmet; the first unmet wait is reported).
__device__ int wait_all(const int* ins, const unsigned* counters, const unsigned* counter_step, int s, int* err,
                        int sm, int instr, long long budget_ns) {
    int cs[AMK_MAX_WAITS];
    unsigned thr[AMK_MAX_WAITS];
#pragma unroll
    for (int w = 0; w < AMK_MAX_WAITS; ++w) {
        cs[w] = ins[AMK_W_WAIT_COUNTER(w)];
        thr[w] = cs[w] < 0 ? 0u
                           : (unsigned)ins[AMK_W_WAIT_THRESHOLD(w)] + (s ? (unsigned)s * __ldg(counter_step + cs[w]) : 0u);
    }
    long long t0 = -1;
    for (;;) {
        unsigned v[AMK_MAX_WAITS];
#pragma unroll
        for (int w = 0; w < AMK_MAX_WAITS; ++w) v[w] = cs[w] < 0 ? 0u : ld_relaxed(counters + cs[w]);
        int uc = -1;  // the first unmet wait (no dynamic index: the arrays stay in registers)
        unsigned uv = 0, ut = 0;
#pragma unroll
        for (int w = AMK_MAX_WAITS - 1; w >= 0; --w)
            if (v[w] < thr[w]) uc = cs[w], uv = v[w], ut = thr[w];
        if (uc < 0) return 0;
        if (poll_unmet(err, t0, budget_ns, sm, instr, ins[AMK_W_OP], uc, uv, ut, s)) return 1;
    }
}

// K-step launch, thread 0 of the ARGMAX task right after the op (it wrote next_token
// itself): record the token and advance the runtime inputs for step s + 1. Its release
// signal, which follows, publishes these writes to every block past the step barrier.
// Not inlined: runs once per step, and inlined it made ptxas re-allocate the hot loop
// (bf16, 256 threads: 80 -> 108 registers; 85 as a call, no stack frame, no spills).
__device__ __noinline__ void advance_inputs(void* const* bufs, const int* ins, int s, int* tokens_out,
                                            int token_buf, int pos_buf, int seq_len_buf) {
    const int nt = reinterpret_cast<const int*>(bufs[ins[P_ARGMAX_OUT]])[0];
    tokens_out[s] = nt;
    if (token_buf >= 0) reinterpret_cast<int*>(bufs[token_buf])[0] = nt;
    if (pos_buf >= 0) reinterpret_cast<int*>(bufs[pos_buf])[0] += 1;
    if (seq_len_buf >= 0) reinterpret_cast<int*>(bufs[seq_len_buf])[0] += 1;
}

// Start streaming an instruction's weight rows into L2 before its dependencies
// are met (weights never depend on activations). ``pf`` = {addr, bytes} x AMK_PF_RANGES
// per instruction, computed by the host (pytest_amk/gpu/prefetch.py prefetch_table: the
// instruction's own first bytes, then a later one's); bytes == 0 means none. One warp.
__device__ __forceinline__ void prefetch_weights(const longlong2* pf, int lane) {
#pragma unroll
    for (int r = 0; r < AMK_PF_RANGES; ++r) {
        const longlong2 e = pf[r];
        if (e.y <= 0) continue;
#if __CUDA_ARCH__ >= 900
        if (lane == 0)
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(e.x), "r"((unsigned)e.y) : "memory");
#else
        for (long long off = (long long)lane * 128; off < e.y; off += 32 * 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(e.x + off));
#endif
    }
}

#define AMK_PF_WARP (AMK_WARPS > 1 ? 1 : 0)
#ifndef AMK_PF_LATE
#define AMK_PF_LATE 1  // prefetch the next instruction's weights after this op (0: before its wait)
#endif

extern "C" __global__ void __launch_bounds__(AMK_THREADS, 1)
amk_vm(const int* __restrict__ instrs, const int* __restrict__ queue_start, const int* __restrict__ queue_len,
       void* const* __restrict__ buffers, int num_buffers, unsigned* counters, int* error_record,
       const longlong2* __restrict__ prefetch, long long watchdog_ns,
       int steps, const unsigned* __restrict__ counter_step, int* tokens_out, int barrier_counter,
       int token_buf, int pos_buf, int seq_len_buf) {
    extern __shared__ float4 amk_dyn[];
    __shared__ int s_ins[2][AMK_INSTR_WORDS];
    __shared__ float s_red[AMK_WARPS];
    __shared__ int s_stop;
    __shared__ int s_att[2];

    const int sm = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int q0 = queue_start[sm], n = queue_len[sm];
    if (n <= 0 || steps < 1) return;

    // Buffer table in shared memory: each op resolves its pointers without a global round trip.
    void** s_bufs = reinterpret_cast<void**>(amk_dyn);
    for (int i = tid; i < num_buffers; i += AMK_THREADS) s_bufs[i] = buffers[i];
    float* scratch = reinterpret_cast<float*>(amk_dyn) + ((num_buffers * 8 + 15) / 16) * 4;

    if (tid < AMK_INSTR_WORDS) s_ins[0][tid] = __ldg(instrs + (size_t)q0 * AMK_INSTR_WORDS + tid);
    if (warp == AMK_PF_WARP) prefetch_weights(prefetch + AMK_PF_RANGES * (size_t)q0, lane);
    __syncthreads();

    AmkCtx ctx;
    ctx.bufs = s_bufs;
    ctx.smem = scratch;
    ctx.red = s_red;
    ctx.err = error_record;
    ctx.sm = sm;
    ctx.att_in = s_att;

    // i: position in the queue, s: step, par: which s_ins slot holds instruction i.
    for (int i = 0, s = 0, par = 0;; par ^= 1) {
        const int* cur = s_ins[par];
        const int gi = q0 + i;
        const bool last = i + 1 == n;  // the step's last instruction: the next one is q0 again
        const bool has_next = !last || s + 1 < steps;
        const int ngi = last ? q0 : gi + 1;
        // Fetch the next instruction while this one waits.
        int next_word = 0;
        if (has_next && tid < AMK_INSTR_WORDS) next_word = __ldg(instrs + (size_t)ngi * AMK_INSTR_WORDS + tid);
#if !AMK_PF_LATE
        if (has_next && warp == AMK_PF_WARP) prefetch_weights(prefetch + AMK_PF_RANGES * (size_t)ngi, lane);
#endif
        AMK_TRACE_POINT(gi, 0);
        ctx.ins = cur;
        ctx.instr = gi;
        // A fused attention task stages its inputs that do not depend on this step while thread 0
        // polls (not before a later step's barrier: the runtime inputs change between steps).
        ctx.att_pre = AMK_ATTN_PREWAIT && cur[AMK_W_OP] == OP_ROPE_ATTN_PARTIAL && (i > 0 || s == 0);
        if (ctx.att_pre && warp > 0) attn_prewait(ctx);
        if (tid == 0) {
            // Step barrier: step s - 1's ARGMAX (after every task of that step) has signalled.
            long long t0 = -1;
            int stop = i == 0 && s > 0
                ? wait_counter(counters, barrier_counter, (unsigned)s * __ldg(counter_step + barrier_counter),
                               error_record, sm, gi, cur[AMK_W_OP], s, watchdog_ns, t0)
                : 0;
            if (!stop) stop = wait_all(cur, counters, counter_step, s, error_record, sm, gi, watchdog_ns);
            if (!stop) poll_met();  // the acquire of every wait above, before the op's reads
            s_stop = stop;
        }
        if (has_next && tid < AMK_INSTR_WORDS) s_ins[par ^ 1][tid] = next_word;
        __syncthreads();
        if (s_stop) return;
        AMK_TRACE_POINT(gi, 1);
        AMK_TRACE_BEGIN_OP();
        const int op = cur[AMK_W_OP], sig = cur[AMK_W_SIGNAL];
        switch (op) {
            case OP_NOP: break;
            case OP_EMBED: op_embed(ctx); break;
            case OP_RMSNORM: op_rmsnorm(ctx); break;
            case OP_GEMV: op_gemv(ctx); break;
            case OP_ROPE_APPEND: op_rope_append(ctx); break;
            case OP_ATTN_PARTIAL:  // the two share one inlined body (registers)
            case OP_ROPE_ATTN_PARTIAL: op_attention(ctx, op == OP_ROPE_ATTN_PARTIAL); break;
            case OP_ATTN_COMBINE: op_attn_combine(ctx); break;
            case OP_ADD: op_add(ctx); break;
            case OP_SILU_MUL: op_silu_mul(ctx); break;
            case OP_LM_HEAD: op_lm_head(ctx); break;
            case OP_ARGMAX:
                op_argmax(ctx);
                // Here, not after the barrier below: cur may be overwritten once other threads pass it.
                if (steps > 1 && tid == 0) advance_inputs(s_bufs, cur, s, tokens_out, token_buf, pos_buf, seq_len_buf);
                break;
            default:
                if (tid == 0) raise_fault(error_record, AMK_FAULT_BAD_OPCODE, sm, gi, op, -1, 0, 0, s);
                break;
        }
        __syncthreads();
        AMK_TRACE_END_OP(gi);
#if AMK_PF_LATE
        // Start the next instruction's weights into L2 now that this op is done: they stream
        // while this block waits for its dependencies, when HBM would otherwise idle (issued
        // earlier, a long op's own stream evicts them again).
        if (has_next && warp == AMK_PF_WARP) prefetch_weights(prefetch + AMK_PF_RANGES * (size_t)ngi, lane);
#endif
        if (tid == 0 && sig >= 0) {
            // Release: every thread's writes (ordered before this by the barrier) are visible
            // to whoever acquires the new counter value. One instruction, no return value.
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counters + sig) : "memory");
        }
        if (!last) {
            ++i;
        } else if (++s < steps) {
            i = 0;
        } else {
            break;
        }
    }
}
