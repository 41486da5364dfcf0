// Keyed counter-based Gaussian noise for the fused step kernels: the scheme of
// samplers/_native/philox.c and samplers/noise.py (Philox4x32-10, Box-Muller), so a kernel draws
// the numbers NoiseSource.normal draws on the CPU, up to the last bits of log/cos.
//
// Sample s of a batch draws from key seeds[s] and counter (call, index[s], counter, stream).
// Its elements are cut into work items of ITEM_CALLS Philox calls (4 * ITEM_CALLS float32
// normals); within an item of `calls` calls, element q * calls + n comes from output q of
// call n.  One GPU thread runs one call and so owns 4 elements `calls` apart: consecutive
// threads touch consecutive addresses, and no element depends on the launch shape or on the
// other samples of the batch.
//
// Everything here is __host__ __device__ and needs no header, so it compiles with NVRTC (CuPy's
// RawModule), with nvcc for the GPU, and with nvcc as host code for the tests' CPU harness.
#pragma once

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

#if defined(__CUDACC__)
#define SAMPLERS_HD __host__ __device__ __forceinline__
#else
#define SAMPLERS_HD inline
#endif

namespace samplers {

typedef unsigned int u32;
typedef unsigned long long u64;

#define SAMPLERS_ITEM_CALLS 1024  // must equal ITEM_CALLS in samplers/_native/philox.c
#define SAMPLERS_ITEM_SIZE (4 * SAMPLERS_ITEM_CALLS)

struct Words {
    u32 w0, w1, w2, w3;
};

// Philox4x32-10 (Salmon et al. 2011): counter (x0, x1, x2, x3), key (k0, k1).
SAMPLERS_HD Words philox4x32_10(u32 x0, u32 x1, u32 x2, u32 x3, u32 k0, u32 k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const u64 p0 = (u64)0xD2511F53u * x0;
        const u64 p1 = (u64)0xCD9E8D57u * x2;
        const u32 y0 = (u32)(p1 >> 32) ^ x1 ^ k0;
        const u32 y2 = (u32)(p0 >> 32) ^ x3 ^ k1;
        x1 = (u32)p1;
        x3 = (u32)p0;
        x0 = y0;
        x2 = y2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    Words w = {x0, x1, x2, x3};
    return w;
}

// The 4 float32 normals of one Philox call (two Box-Muller pairs), as philox.c writes them:
// z[q] is the element q * calls + n of the call's work item.
SAMPLERS_HD void box_muller4(const Words& w, float z[4]) {
    const float two_pi = 6.283185307179586f;
    const float u1 = ((float)(w.w0 >> 8) + 1.0f) * 5.9604644775390625e-08f;  // (0, 1]
    const float u2 = (float)(w.w1 >> 8) * 5.9604644775390625e-08f;           // [0, 1)
    const float u3 = ((float)(w.w2 >> 8) + 1.0f) * 5.9604644775390625e-08f;
    const float u4 = (float)(w.w3 >> 8) * 5.9604644775390625e-08f;
    const float r1 = sqrtf(-2.0f * logf(u1));
    const float r2 = sqrtf(-2.0f * logf(u3));
    // sin written as a shifted cos, exactly as the CPU library computes it
    z[0] = r1 * cosf(two_pi * u2);
    z[1] = r1 * cosf(two_pi * (u2 - 0.25f));
    z[2] = r2 * cosf(two_pi * u4);
    z[3] = r2 * cosf(two_pi * (u4 - 0.25f));
}

// What a kernel needs to know to draw sample s's noise of one step.
struct NoiseKey {
    const u64* seeds;   // (B,) the 64-bit seed of each sample
    const u32* index;   // (B,) the global sample index of each sample
    u32 counter;        // the step (or another caller counter)
    u32 stream;         // STREAM_STEP, STREAM_PRIOR, ... of samplers/noise.py
};

SAMPLERS_HD void normals4(const NoiseKey& key, long long s, u32 call, float z[4]) {
    const u64 seed = key.seeds[s];
    box_muller4(philox4x32_10(call, key.index[s], key.counter, key.stream, (u32)seed, (u32)(seed >> 32)), z);
}

// The element layout of one thread.  Thread t of a launch over a (B, per_sample) batch runs
// Philox call n = t % ITEM_CALLS of work item b of sample s (t / ITEM_CALLS = s * items + b);
// threads past the end of a short last item, or of the batch, have nothing to do.
struct Slot {
    long long sample;   // s
    long long base;     // flat offset of the work item's first element: s * per_sample + b * ITEM_SIZE
    int calls;          // calls in this work item
    int len;            // elements in this work item
    int n;              // this thread's call within the item
    u32 call;           // the Philox counter word: b * ITEM_CALLS + n
};

SAMPLERS_HD long long items_per_sample(long long per_sample) {
    return (per_sample + SAMPLERS_ITEM_SIZE - 1) / SAMPLERS_ITEM_SIZE;
}

// Threads a launch needs for a batch (B, per_sample).
SAMPLERS_HD long long thread_count(long long per_sample, long long batch) {
    return batch * items_per_sample(per_sample) * SAMPLERS_ITEM_CALLS;
}

SAMPLERS_HD bool slot_of(long long t, long long per_sample, long long batch, Slot& slot) {
    const long long items = items_per_sample(per_sample);
    const long long item = (long long)((u64)t >> 10);  // s * items + b (t >= 0; ITEM_CALLS = 2^10)
    if (item >= batch * items) return false;
    long long s, b;
    if (item <= 0xFFFFFFFFll && items <= 0xFFFFFFFFll) {  // 32-bit division: a 64-bit one costs several times more on a GPU
        const u32 q = (u32)item / (u32)items;
        s = q;
        b = item - (long long)q * items;
    } else {
        s = item / items;
        b = item % items;
    }
    const long long start = b * SAMPLERS_ITEM_SIZE;
    const long long rest = per_sample - start;
    slot.len = (int)(rest < SAMPLERS_ITEM_SIZE ? rest : SAMPLERS_ITEM_SIZE);
    slot.calls = (slot.len + 3) / 4;
    slot.n = (int)(t & (SAMPLERS_ITEM_CALLS - 1));
    if (slot.n >= slot.calls) return false;
    slot.sample = s;
    slot.base = s * per_sample + start;
    slot.call = (u32)(b * SAMPLERS_ITEM_CALLS + slot.n);
    return true;
}

}  // namespace samplers
