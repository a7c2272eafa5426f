// Optional per-instruction timing trace (build with -DAMK_TRACE=1; tools/trace_vm.py).
// Thread 0 of each block records, for global instruction gi, three points:
//   0: before its wait, 1: after the wait (barrier passed), 2: after the op (before signal)
// each as (%globaltimer ns, clock64 cycles): 6 u64 words per instruction in amk_trace.
// Off by default: the macro compiles to nothing and the kernel is unchanged.
// With AMK_TRACE_MARK = an AMK_MARK_* (BuildConfig.trace_mark), the op that reaches that
// AMK_TRACE_AT takes point 2 there instead: its "run" then times the op up to that place.
#pragma once

#ifndef AMK_TRACE_MARK
#define AMK_TRACE_MARK 0
#endif

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

#if defined(AMK_TRACE) && AMK_TRACE && AMK_TRACE_MARK
__shared__ int amk_trace_marked;  // the current instruction took point 2 at its mark
#define AMK_TRACE_AT(mark, gi)                                   \
    do {                                                         \
        if ((mark) == AMK_TRACE_MARK) {                          \
            AMK_TRACE_POINT(gi, 2);                              \
            if (threadIdx.x == 0) amk_trace_marked = 1;          \
        }                                                        \
    } while (0)
#define AMK_TRACE_BEGIN_OP()                       \
    do {                                           \
        if (threadIdx.x == 0) amk_trace_marked = 0; \
    } while (0)
#define AMK_TRACE_END_OP(gi)                                  \
    do {                                                      \
        if (!(threadIdx.x == 0 && amk_trace_marked)) AMK_TRACE_POINT(gi, 2); \
    } while (0)
#else
#define AMK_TRACE_AT(mark, gi) \
    do {                       \
    } while (0)
#define AMK_TRACE_BEGIN_OP() \
    do {                     \
    } while (0)
#define AMK_TRACE_END_OP(gi) AMK_TRACE_POINT(gi, 2)
#endif
