// The AMK persistent interpreter (DESIGN §7).
//
// One block per SM queue (blockIdx.x = queue index). Each block walks its queue
// of fixed-size instructions (layout in the generated amk_ir.h): wait until
// every (counter, threshold) of the instruction is met, run the op with all
// threads, then signal: one thread adds 1 to the signal counter (release).
//
// Ordering: the waiting thread polls each counter with ld.acquire.gpu; the
// barrier that follows hands the acquire to the other threads. After the op, a
// barrier, then one thread's red.release.gpu add on the signal counter (release;
// cumulative over the writes the barrier ordered before it).
//
// Watchdog: a wait that lasts longer than watchdog_ns (%globaltimer, ns) writes
// the error record and aborts; every other waiting block sees the record and
// exits, so no program can hang the GPU.
#include "amk_ops.cuh"
#include "amk_trace.cuh"

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ int ld_volatile(const int* p) { return *reinterpret_cast<const volatile int*>(p); }

__device__ __forceinline__ long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return (long long)t;
}

// Thread 0 only. Returns 1 when the block must stop (watchdog or another block's fault).
// Polls with ld.acquire and no back-off: measured on an H100 (NOP skeleton of the
// Llama-1B program), faster than relaxed polls + one fence.acq_rel (185 vs 217 us),
// and dropping a 32 ns __nanosleep saved ~10% of the sync time on its own.
__device__ int wait_all(const int* ins, const unsigned* counters, int* err, int sm, int instr,
                        long long budget_ns) {
    long long t0 = -1;
#pragma unroll 1
    for (int w = 0; w < AMK_MAX_WAITS; ++w) {
        const int c = ins[AMK_W_WAIT_COUNTER(w)];
        if (c < 0) continue;
        const unsigned thr = (unsigned)ins[AMK_W_WAIT_THRESHOLD(w)];
        for (;;) {
            const unsigned v = ld_acquire(counters + c);
            if (v >= thr) break;
            if (t0 < 0) t0 = now_ns();  // the budget counts from the first unmet poll
            if (ld_volatile(err + AMK_ERR_CODE) != 0) return 1;
            if (now_ns() - t0 > budget_ns) {
                raise_fault(err, AMK_FAULT_WATCHDOG, sm, instr, ins[AMK_W_OP], c, (int)v, (int)thr, 0);
                return 1;
            }
        }
    }
    return 0;
}

// Start streaming an instruction's weight rows into L2 before its dependencies
// are met (weights never depend on activations). ``pf`` = {addr, bytes} x 2
// per instruction, computed by the host; bytes == 0 means none. One warp.
__device__ __forceinline__ void prefetch_weights(const longlong2* pf, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
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

extern "C" __global__ void __launch_bounds__(AMK_THREADS, 1)
amk_vm(const int* __restrict__ instrs, const int* __restrict__ queue_start, const int* __restrict__ queue_len,
       void* const* __restrict__ buffers, int num_buffers, unsigned* counters, int* error_record,
       const longlong2* __restrict__ prefetch, long long watchdog_ns) {
    extern __shared__ float4 amk_dyn[];
    __shared__ int s_ins[2][AMK_INSTR_WORDS];
    __shared__ float s_red[AMK_WARPS];
    __shared__ int s_stop;

    const int sm = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int q0 = queue_start[sm], n = queue_len[sm];
    if (n <= 0) return;

    // Buffer table in shared memory: each op resolves its pointers without a global round trip.
    void** s_bufs = reinterpret_cast<void**>(amk_dyn);
    for (int i = tid; i < num_buffers; i += AMK_THREADS) s_bufs[i] = buffers[i];
    float* scratch = reinterpret_cast<float*>(amk_dyn) + ((num_buffers * 8 + 15) / 16) * 4;

    if (tid < AMK_INSTR_WORDS) s_ins[0][tid] = __ldg(instrs + (size_t)q0 * AMK_INSTR_WORDS + tid);
    if (warp == AMK_PF_WARP) prefetch_weights(prefetch + 2 * (size_t)q0, lane);
    __syncthreads();

    AmkCtx ctx;
    ctx.bufs = s_bufs;
    ctx.smem = scratch;
    ctx.red = s_red;
    ctx.err = error_record;
    ctx.sm = sm;

    for (int i = 0; i < n; ++i) {
        const int* cur = s_ins[i & 1];
        const int gi = q0 + i;
        const bool has_next = i + 1 < n;
        // Fetch the next instruction and start its weights' prefetch while this one waits.
        int next_word = 0;
        if (has_next && tid < AMK_INSTR_WORDS) next_word = __ldg(instrs + (size_t)(gi + 1) * AMK_INSTR_WORDS + tid);
        if (has_next && warp == AMK_PF_WARP) prefetch_weights(prefetch + 2 * (size_t)(gi + 1), lane);
        AMK_TRACE_POINT(gi, 0);
        if (tid == 0) s_stop = wait_all(cur, counters, error_record, sm, gi, watchdog_ns);
        if (has_next && tid < AMK_INSTR_WORDS) s_ins[(i + 1) & 1][tid] = next_word;
        __syncthreads();
        if (s_stop) return;
        AMK_TRACE_POINT(gi, 1);
        const int op = cur[AMK_W_OP], sig = cur[AMK_W_SIGNAL];
        ctx.ins = cur;
        ctx.instr = gi;
        switch (op) {
            case OP_NOP: break;
            case OP_EMBED: op_embed(ctx); break;
            case OP_RMSNORM: op_rmsnorm(ctx); break;
            case OP_GEMV: op_gemv(ctx); break;
            case OP_ROPE_APPEND: op_rope_append(ctx); break;
            case OP_ATTN_PARTIAL: op_attn_partial(ctx); break;
            case OP_ATTN_COMBINE: op_attn_combine(ctx); break;
            case OP_ADD: op_add(ctx); break;
            case OP_SILU_MUL: op_silu_mul(ctx); break;
            case OP_LM_HEAD: op_lm_head(ctx); break;
            case OP_ARGMAX: op_argmax(ctx); break;
            default:
                if (tid == 0) raise_fault(error_record, AMK_FAULT_BAD_OPCODE, sm, gi, op, -1, 0, 0, 0);
                break;
        }
        __syncthreads();
        AMK_TRACE_POINT(gi, 2);
        if (tid == 0 && sig >= 0) {
            // Release: every thread's writes (ordered before this by the barrier) are visible
            // to whoever acquires the new counter value. One instruction, no return value.
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counters + sig) : "memory");
        }
    }
}
