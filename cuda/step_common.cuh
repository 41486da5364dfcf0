// Shared pieces of the fused step kernels: storage types, the entry-point macro and the one
// signature every step kernel has.
//
// A step kernel updates a batch in place in one pass: it reads the state, the network output
// (and, for multistep solvers, the history), draws its Gaussian noise itself (philox.cuh, keyed
// like samplers.NoiseSource, so no noise tensor is read or written), and writes the new state.
// Arithmetic is float32 whatever the storage type (float32, float16, bfloat16).
//
// The per-sample coefficients of the step come as a float32 table `coef` of shape (ncoef, B):
// coefficient j of sample s is coef[j * B + s] (the solver's prepare() tables, row k).
//
// Every step kernel has the signature
//     (T* x, const O* out, T* aux0, const T* aux1, const T* aux2, const float* coef,
//      const u64* seeds, const u32* index, u32 counter, u32 stream, long long per_sample, long long batch)
// with aux0..aux2 the kernel's extra state-sized buffers (Heun's stage, the multistep ring) and
// (seeds, index, counter, stream) the noise key; unused pointers may be any valid pointer.
//
// With SAMPLERS_HOST_EMULATION defined the same thread functions are compiled as host
// functions that loop over the launch's threads: the tests run every kernel's exact body on
// the CPU against the torch solver step.
#pragma once

#include "philox.cuh"

#if !defined(__CUDACC_RTC__) && !defined(__CUDA_ARCH__)
#include <string.h>
#endif

namespace samplers {

// float16 and bfloat16 as their bits: no cuda_fp16.h, so NVRTC needs no include path.
struct half_t {
    unsigned short bits;
};
struct bf16_t {
    unsigned short bits;
};

SAMPLERS_HD u32 float_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    u32 u;
    memcpy(&u, &f, 4);
    return u;
#endif
}

SAMPLERS_HD float bits_float(u32 u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

// Round to nearest even, as torch's .to(float16) does (overflow to inf, subnormals kept).
SAMPLERS_HD unsigned short float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    u32 x = float_bits(f);
    const u32 sign = (x >> 16) & 0x8000u;
    x &= 0x7FFFFFFFu;
    if (x >= 0x7F800000u) return (unsigned short)(sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u));
    if (x >= 0x477FF000u) return (unsigned short)(sign | 0x7C00u);  // >= 65520 rounds to inf
    u32 r, rem, half;
    if (x < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), units of 2^-24
        if (x < 0x33000000u) return (unsigned short)sign;  // below 2^-25 rounds to 0
        const u32 m = (x & 0x7FFFFFu) | 0x800000u;
        const u32 shift = 126u - (x >> 23);  // 14 .. 24
        r = m >> shift;
        rem = m & ((1u << shift) - 1u);
        half = 1u << (shift - 1u);
    } else {
        const u32 m = x - 0x38000000u;  // rebias the exponent from 127 to 15
        r = m >> 13;
        rem = m & 0x1FFFu;
        half = 0x1000u;
    }
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return (unsigned short)(sign | r);
#endif
}

SAMPLERS_HD float half_bits_to_float(unsigned short h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const u32 sign = (u32)(h & 0x8000u) << 16;
    const u32 e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-08f;  // m * 2^-24, exact
        return sign ? -v : v;
    }
    if (e == 31) return bits_float(sign | 0x7F800000u | (m << 13));
    return bits_float(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

SAMPLERS_HD unsigned short float_to_bf16_bits(float f) {
    const u32 x = float_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((x >> 16) | 0x40u);  // quiet NaN
    return (unsigned short)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);  // round to nearest even
}

SAMPLERS_HD float bf16_bits_to_float(unsigned short b) { return bits_float((u32)b << 16); }

SAMPLERS_HD float load(const float* p, long long i) { return p[i]; }
SAMPLERS_HD float load(const half_t* p, long long i) { return half_bits_to_float(p[i].bits); }
SAMPLERS_HD float load(const bf16_t* p, long long i) { return bf16_bits_to_float(p[i].bits); }

SAMPLERS_HD void store(float* p, long long i, float v) { p[i] = v; }
SAMPLERS_HD void store(half_t* p, long long i, float v) { p[i].bits = float_to_half_bits(v); }
SAMPLERS_HD void store(bf16_t* p, long long i, float v) { p[i].bits = float_to_bf16_bits(v); }

// v as storage type T holds it (what the torch path's buffer of dtype T would hand back)
SAMPLERS_HD float rounded(const float*, float v) { return v; }
SAMPLERS_HD float rounded(const half_t*, float v) { return half_bits_to_float(float_to_half_bits(v)); }
SAMPLERS_HD float rounded(const bf16_t*, float v) { return bf16_bits_to_float(float_to_bf16_bits(v)); }

// Flat offset of the thread's element q (element q * calls + n of its work item, the one z[q] of its
// Philox call belongs to), or -1 past the end of a short last item.
SAMPLERS_HD long long element_of(const Slot& slot, int q) {
    const int w = q * slot.calls + slot.n;
    return w < slot.len ? slot.base + w : -1;
}

// The 4 keyed standard normals of one thread's Philox call (its 4 elements, philox.cuh).
SAMPLERS_HD void slot_normals(const Slot& slot, const u64* seeds, const u32* index, u32 counter, u32 stream,
                              float z[4]) {
    const NoiseKey key = {seeds, index, counter, stream};
    normals4(key, slot.sample, slot.call, z);
}

// A step kernel's noise: z gets the thread's normals and the result is the sample's noise
// coefficient, coef row `row`; without NOISE, zeros and no key is read.
template <bool NOISE>
SAMPLERS_HD float step_noise(const Slot& slot, const float* coef, int row, long long batch, const u64* seeds,
                             const u32* index, u32 counter, u32 stream, float z[4]) {
    if (!NOISE) {
        z[0] = z[1] = z[2] = z[3] = 0.0f;
        return 0.0f;
    }
    slot_normals(slot, seeds, index, counter, stream, z);
    return coef[row * batch + slot.sample];
}

}  // namespace samplers

#define SAMPLERS_STEP_PARAMS(T, O)                                                                 \
    (T * x, const O* out, T* aux0, const T* aux1, const T* aux2, const float* coef,                \
     const samplers::u64* seeds, const samplers::u32* index, samplers::u32 counter,                 \
     samplers::u32 stream, long long per_sample, long long batch)
#define SAMPLERS_STEP_ARGS (x, out, aux0, aux1, aux2, coef, seeds, index, counter, stream, per_sample, batch)
#define SAMPLERS_EXPAND(...) __VA_ARGS__

// SAMPLERS_ENTRY(name, thread function, (params), (args)): a __global__ kernel running the
// thread function once per thread, or, for the host harness, a C function running it for every
// thread of the launch in turn.  The params must name per_sample and batch.
#if defined(SAMPLERS_HOST_EMULATION)
#define SAMPLERS_ENTRY(NAME, THREAD_FN, PARAMS, ARGS)                                            \
    extern "C" void NAME PARAMS {                                                                \
        const long long threads = samplers::thread_count(per_sample, batch);                     \
        for (long long t = 0; t < threads; ++t) THREAD_FN(t, SAMPLERS_EXPAND ARGS);              \
    }
#else
#define SAMPLERS_ENTRY(NAME, THREAD_FN, PARAMS, ARGS)                                            \
    extern "C" __global__ void __launch_bounds__(256) NAME PARAMS {                              \
        THREAD_FN((long long)blockIdx.x * blockDim.x + threadIdx.x, SAMPLERS_EXPAND ARGS);       \
    }
#endif

// A step kernel for each pair of storage types the driver needs, NAME_<state>_<output>: a float32
// state with a float32, float16 or bfloat16 network output (the driver keeps half-precision runs'
// state in float32), and float16/bfloat16 states with an output of their own type.  Each runs the
// thread function FN<T, O, ...> with the step-kernel signature, the extra template arguments given.
#define SAMPLERS_STEP_KERNEL(NAME, TN, T, ON, O, FN, ...)                                            \
    SAMPLERS_ENTRY(NAME##_##TN##_##ON, (FN<T, O, __VA_ARGS__>), SAMPLERS_STEP_PARAMS(T, O), SAMPLERS_STEP_ARGS)
#define SAMPLERS_STEP_KERNELS(NAME, FN, ...)                                                       \
    SAMPLERS_STEP_KERNEL(NAME, f32, float, f32, float, FN, __VA_ARGS__)                            \
    SAMPLERS_STEP_KERNEL(NAME, f32, float, f16, samplers::half_t, FN, __VA_ARGS__)                 \
    SAMPLERS_STEP_KERNEL(NAME, f32, float, bf16, samplers::bf16_t, FN, __VA_ARGS__)                \
    SAMPLERS_STEP_KERNEL(NAME, f16, samplers::half_t, f16, samplers::half_t, FN, __VA_ARGS__)      \
    SAMPLERS_STEP_KERNEL(NAME, bf16, samplers::bf16_t, bf16, samplers::bf16_t, FN, __VA_ARGS__)
