// Shared helpers of the AMK VM: model dtype, conversions, loads, reductions.
// Compile-time settings (all from the host build, see pytest_amk/gpu/build.py):
//   AMK_DTYPE   0 = fp32, 1 = fp16, 2 = bf16 (model dtype of weights, activations, KV)
//   AMK_THREADS threads per block (multiple of 32)
//   AMK_PIPE    independent 16-byte weight loads in flight per lane in GEMV
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "amk_ir.h"  // generated from pytest_amk/ir.py at build time

#ifndef AMK_DTYPE
#define AMK_DTYPE 2
#endif
#ifndef AMK_THREADS
#define AMK_THREADS 256
#endif
#ifndef AMK_PIPE
#define AMK_PIPE 2
#endif

#define AMK_WARPS (AMK_THREADS / 32)
#if AMK_THREADS % 32 != 0 || AMK_THREADS < 32 || AMK_THREADS > 1024
#error "AMK_THREADS must be a multiple of 32 in [32, 1024]"
#endif
#if AMK_PIPE < 1 || AMK_PIPE > 16
#error "AMK_PIPE must be in [1, 16]"
#endif

// AMK_MAX_HEAD_DIM, the largest head_dim the attention ops handle, comes from amk_ir.h (ir.MAX_HEAD_DIM).

// Error record (int32 words), written once by the first failing block.
#define AMK_ERR_WORDS 8
#define AMK_ERR_CODE 0      // 0 = none; -1 while being written; else an AMK_FAULT_*
#define AMK_ERR_SM 1
#define AMK_ERR_INSTR 2     // global instruction index (queue_start[sm] + i)
#define AMK_ERR_OP 3
#define AMK_ERR_COUNTER 4
#define AMK_ERR_VALUE 5
#define AMK_ERR_THRESHOLD 6
#define AMK_ERR_EXTRA 7
#define AMK_FAULT_WATCHDOG 1
#define AMK_FAULT_BAD_OPCODE 2
#define AMK_FAULT_BAD_INPUT 3

#if AMK_DTYPE == 0
typedef float amk_t;
#define AMK_VEC 4
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ amk_t from_f(float x) { return x; }
#elif AMK_DTYPE == 1
typedef __half amk_t;
#define AMK_VEC 8
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ amk_t from_f(float x) { return __float2half_rn(x); }
#elif AMK_DTYPE == 2
typedef __nv_bfloat16 amk_t;
#define AMK_VEC 8
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ amk_t from_f(float x) { return __float2bfloat16_rn(x); }
#else
#error "AMK_DTYPE must be 0 (fp32), 1 (fp16) or 2 (bf16)"
#endif

// Round an fp32 value to the model dtype and back: the documented rounding points.
__device__ __forceinline__ float rnd(float x) { return to_f(from_f(x)); }

// Explicit fp32 products and sums where the reference rounds each step (torch
// tensor ops): keeps nvcc from contracting them into an FMA with one rounding.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// SiLU in fp32 with an accurate expf (the build does not use --use_fast_math).
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// Weights are read once per step and never written: the non-coherent path, no L1 allocation.
__device__ __forceinline__ uint4 ld_weight16(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

__device__ __forceinline__ float ld_weight1(const amk_t* p) { return to_f(__ldg(p)); }

// fp32 dot of one 16-byte weight vector with AMK_VEC staged fp32 inputs.
__device__ __forceinline__ float vdot(uint4 w, const float* x, float acc) {
    const float4 xa = *reinterpret_cast<const float4*>(x);
#if AMK_DTYPE == 0
    acc = fmaf(__uint_as_float(w.x), xa.x, acc);
    acc = fmaf(__uint_as_float(w.y), xa.y, acc);
    acc = fmaf(__uint_as_float(w.z), xa.z, acc);
    acc = fmaf(__uint_as_float(w.w), xa.w, acc);
#else
    const float4 xb = *reinterpret_cast<const float4*>(x + 4);
#if AMK_DTYPE == 1
    float2 f;
    f = __half22float2(*reinterpret_cast<const __half2*>(&w.x));
    acc = fmaf(f.x, xa.x, acc); acc = fmaf(f.y, xa.y, acc);
    f = __half22float2(*reinterpret_cast<const __half2*>(&w.y));
    acc = fmaf(f.x, xa.z, acc); acc = fmaf(f.y, xa.w, acc);
    f = __half22float2(*reinterpret_cast<const __half2*>(&w.z));
    acc = fmaf(f.x, xb.x, acc); acc = fmaf(f.y, xb.y, acc);
    f = __half22float2(*reinterpret_cast<const __half2*>(&w.w));
    acc = fmaf(f.x, xb.z, acc); acc = fmaf(f.y, xb.w, acc);
#else
    // bf16 -> fp32 is a 16-bit shift: element 2i is the low half of word i.
    acc = fmaf(__uint_as_float(w.x << 16), xa.x, acc);
    acc = fmaf(__uint_as_float(w.x & 0xffff0000u), xa.y, acc);
    acc = fmaf(__uint_as_float(w.y << 16), xa.z, acc);
    acc = fmaf(__uint_as_float(w.y & 0xffff0000u), xa.w, acc);
    acc = fmaf(__uint_as_float(w.z << 16), xb.x, acc);
    acc = fmaf(__uint_as_float(w.z & 0xffff0000u), xb.y, acc);
    acc = fmaf(__uint_as_float(w.w << 16), xb.z, acc);
    acc = fmaf(__uint_as_float(w.w & 0xffff0000u), xb.w, acc);
#endif
#endif
    return acc;
}

// The AMK_VEC model-dtype elements of a 16-byte vector, in fp32, to 16-byte aligned x.
__device__ __forceinline__ void unpack_vec(uint4 w, float* x) {
#if AMK_DTYPE == 0
    *reinterpret_cast<uint4*>(x) = w;
#else
    float f[8];
#if AMK_DTYPE == 1
    const __half2* h = reinterpret_cast<const __half2*>(&w);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 t = __half22float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
#else
    const unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(u[i] << 16);
        f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
#endif
    *reinterpret_cast<float4*>(x) = make_float4(f[0], f[1], f[2], f[3]);
    *reinterpret_cast<float4*>(x + 4) = make_float4(f[4], f[5], f[6], f[7]);
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the same value (warp partials summed in a
// fixed order). ``red`` is AMK_WARPS floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.0f;
#pragma unroll
    for (int w = 0; w < AMK_WARPS; ++w) t += red[w];
    __syncthreads();  // red may be reused right after
    return t;
}
