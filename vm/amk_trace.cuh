// Optional per-instruction timing trace (build with -DAMK_TRACE=1; tools/trace_vm.py).
// Thread 0 of each block records, for global instruction gi, three points:
//   0: before its wait, 1: after the wait (barrier passed), 2: after the op (before signal)
// each as (%globaltimer ns, clock64 cycles): 6 u64 words per instruction in amk_trace.
// Off by default: the macro compiles to nothing and the kernel is unchanged.
#pragma once

#if defined(AMK_TRACE) && AMK_TRACE
__device__ unsigned long long* amk_trace;  // set by the host (module global), 6 words per instruction
#define AMK_TRACE_POINT(gi, k)                                                            \
    do {                                                                                  \
        if (threadIdx.x == 0 && amk_trace) {                                              \
            unsigned long long t_, c_;                                                    \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                        \
            c_ = (unsigned long long)clock64();                                           \
            amk_trace[(size_t)(gi) * 6 + 2 * (k)] = t_;                                   \
            amk_trace[(size_t)(gi) * 6 + 2 * (k) + 1] = c_;                               \
        }                                                                                 \
    } while (0)
#else
#define AMK_TRACE_POINT(gi, k) \
    do {                       \
    } while (0)
#endif
