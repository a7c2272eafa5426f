// One all-to-all synchronisation level, stand-alone: what a release/acquire counter through L2
// costs on this GPU with no work at all, for several ways of polling and laying out counters.
// One block per SM (512 threads); in each of 2000 levels thread 0 waits until every block has
// signalled the previous level's counter, a block barrier hands on the acquire, then thread 0
// signals this level's counter. Prints ns per level (best and mean of 7 launches).
//
//   nvcc -arch=sm_90 -O3 -o /tmp/sync_level_bench tools/sync_level_bench.cu && /tmp/sync_level_bench
//
// The VM's own protocol is the first row (vm/amk_vm.cu wait_counter / wait_all); PERFORMANCE.md's
// "One sync level, stand-alone" gives the H100 numbers. Not part of the package: a measurement.
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            printf("CUDA error %s at line %d\n", cudaGetErrorString(e_), __LINE__);        \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

enum Mode {
    VM,          // relaxed poll of the counter; the error word loaded only after an unmet poll
    ERR_TOO,     // the error word loaded with every poll (one round trip a poll)
    NO_FENCE,    // ERR_TOO with a relaxed add and no release fence (wrong for real work: the fence's cost)
    NO_ERR,      // the counter alone, the error word every 64th poll
    REPLICAS,    // R copies of each counter a line apart: every block adds to all, polls copy sm % R
    SLOTS,       // R partial counters: block b adds to slot b % R, the poller loads all and sums
    STAGGERED,   // R polls in flight, issued `stag` clocks apart; the oldest is checked first
};

constexpr int kLine = 32;           // words between two counters (a 128-byte line)
constexpr int kLinesPerLevel = 16;  // each level's counters: 16 lines, replicas and slots included
constexpr long long kWatchdogNs = 2000000000LL;

__device__ __forceinline__ unsigned ld_relaxed(const unsigned* p) {
    unsigned v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return (long long)t;
}

// Thread 0: returns 1 when the error word is set (watchdog).
template <int MODE, int R>
__device__ int wait_level(const unsigned* cp, unsigned thr, int* err, int sm, int stag) {
    long long t0 = -1;
    int n = 0;
    if constexpr (MODE == STAGGERED) {
        unsigned a[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            a[r] = ld_relaxed(cp);
            const long long c0 = clock64();
            while (clock64() - c0 < stag) {
            }
        }
        for (;;) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (a[r] >= thr) return 0;
                a[r] = ld_relaxed(cp);
            }
            if (t0 < 0) t0 = now_ns();
            if ((++n & 31) == 0 && *(volatile int*)err) return 1;
            if (now_ns() - t0 > kWatchdogNs) return atomicExch(err, 1), 1;
        }
    } else {
        for (;;) {
            unsigned v = 0;
            int e = 0;
            if (MODE == VM) {
                v = ld_relaxed(cp);
                if (v >= thr) return 0;
                e = *(volatile int*)err;
            } else if (MODE == ERR_TOO || MODE == NO_FENCE) {
                v = ld_relaxed(cp);
                e = (int)ld_relaxed((const unsigned*)err);
                if (v >= thr) return 0;
            } else if (MODE == NO_ERR) {
                v = ld_relaxed(cp);
                if (v >= thr) return 0;
                if ((++n & 63) == 0) e = *(volatile int*)err;
            } else if (MODE == REPLICAS) {
                v = ld_relaxed(cp + kLine * (sm % R));
                e = (int)ld_relaxed((const unsigned*)err);
                if (v >= thr) return 0;
            } else {  // SLOTS
                unsigned a[R];
#pragma unroll
                for (int r = 0; r < R; ++r) a[r] = ld_relaxed(cp + kLine * r);
                e = (int)ld_relaxed((const unsigned*)err);
#pragma unroll
                for (int r = 0; r < R; ++r) v += a[r];
                if (v >= thr) return 0;
            }
            if (t0 < 0) t0 = now_ns();
            if (e) return 1;
            if (now_ns() - t0 > kWatchdogNs) return atomicExch(err, 1), 1;
        }
    }
}

template <int MODE, int R>
__device__ void signal_level(unsigned* c, int sm) {
    if (MODE == REPLICAS) {
        asm volatile("fence.release.gpu;" ::: "memory");
#pragma unroll
        for (int r = 0; r < R; ++r) asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(c + kLine * r) : "memory");
    } else if (MODE == SLOTS) {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(c + kLine * (sm % R)) : "memory");
    } else if (MODE == NO_FENCE) {
        asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(c) : "memory");
    } else {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(c) : "memory");
    }
}

template <int MODE, int R>
__global__ void __launch_bounds__(512, 1) sync_levels(unsigned* ctr, int* err, int levels, int stag) {
    const int sm = blockIdx.x, tid = threadIdx.x;
    __shared__ int s_stop;
    if (tid == 0) s_stop = 0;
    __syncthreads();
    for (int l = 0; l < levels; ++l) {
        if (tid == 0 && l > 0) {
            s_stop = wait_level<MODE, R>(ctr + (size_t)(l - 1) * kLine * kLinesPerLevel, gridDim.x, err, sm, stag);
            asm volatile("fence.acquire.gpu;" ::: "memory");
        }
        __syncthreads();
        if (s_stop) return;
        __syncthreads();  // the op's end (the VM's barrier before the signal)
        if (tid == 0) signal_level<MODE, R>(ctr + (size_t)l * kLine * kLinesPerLevel, sm);
    }
}

template <int MODE, int R>
void run(const char* name, unsigned* ctr, int* err, int levels, int blocks, size_t bytes, int stag = 0) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    float best = 1e30f, sum = 0;
    const int reps = 7;
    for (int i = 0; i < reps; ++i) {
        CK(cudaMemset(ctr, 0, bytes));
        CK(cudaMemset(err, 0, sizeof(int)));
        CK(cudaEventRecord(a));
        sync_levels<MODE, R><<<blocks, 512>>>(ctr, err, levels, stag);
        CK(cudaGetLastError());
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        best = ms < best ? ms : best;
        sum += ms;
        int e;
        CK(cudaMemcpy(&e, err, sizeof(int), cudaMemcpyDeviceToHost));
        if (e) printf("%s: watchdog (a level never completed)\n", name);
    }
    // Every block signalled the last level (in every slot layout the line sum is the block count).
    unsigned last[kLinesPerLevel * kLine];
    CK(cudaMemcpy(last, ctr + (size_t)(levels - 1) * kLine * kLinesPerLevel, sizeof(last), cudaMemcpyDeviceToHost));
    unsigned total = 0;
    for (int r = 0; r < (MODE == SLOTS ? R : 1); ++r) total += last[r * kLine];
    printf("%-28s %8.1f ns/level (mean %8.1f)%s\n", name, best * 1e6f / levels, sum / reps * 1e6f / levels,
           total == (unsigned)blocks ? "" : "  LAST LEVEL INCOMPLETE");
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
}

int main() {
    int blocks;
    CK(cudaDeviceGetAttribute(&blocks, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d blocks x 512 threads\n", prop.name, blocks);
    const int levels = 2000;
    const size_t bytes = (size_t)levels * kLine * kLinesPerLevel * sizeof(unsigned);
    unsigned* ctr;
    int* err;
    CK(cudaMalloc(&ctr, bytes));
    CK(cudaMalloc(&err, sizeof(int)));
    run<VM, 1>("vm (poll; error if unmet)", ctr, err, levels, blocks, bytes);
    run<ERR_TOO, 1>("error word with each poll", ctr, err, levels, blocks, bytes);
    run<NO_FENCE, 1>("no release fence", ctr, err, levels, blocks, bytes);
    run<NO_ERR, 1>("no error check", ctr, err, levels, blocks, bytes);
    run<REPLICAS, 2>("2 replicas", ctr, err, levels, blocks, bytes);
    run<REPLICAS, 4>("4 replicas", ctr, err, levels, blocks, bytes);
    run<REPLICAS, 8>("8 replicas", ctr, err, levels, blocks, bytes);
    run<REPLICAS, 16>("16 replicas", ctr, err, levels, blocks, bytes);
    run<SLOTS, 2>("2 slots summed", ctr, err, levels, blocks, bytes);
    run<SLOTS, 4>("4 slots summed", ctr, err, levels, blocks, bytes);
    run<SLOTS, 8>("8 slots summed", ctr, err, levels, blocks, bytes);
    run<STAGGERED, 2>("2 polls, 150 clocks apart", ctr, err, levels, blocks, bytes, 150);
    run<STAGGERED, 2>("2 polls, 300 clocks apart", ctr, err, levels, blocks, bytes, 300);
    run<STAGGERED, 2>("2 polls, 500 clocks apart", ctr, err, levels, blocks, bytes, 500);
    run<STAGGERED, 4>("4 polls, 100 clocks apart", ctr, err, levels, blocks, bytes, 100);
    run<STAGGERED, 4>("4 polls, 200 clocks apart", ctr, err, levels, blocks, bytes, 200);
    CK(cudaFree(ctr));
    CK(cudaFree(err));
    return 0;
}
