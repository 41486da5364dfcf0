/* Counter-based Gaussian noise for the CPU: Philox4x32-10 (Salmon et al. 2011) + Box-Muller.
 *
 * Sample s of a batch draws from key (seeds[s]) and counter
 * (call, index[s], counter[s], stream), so its numbers depend on its own seed, its global
 * sample index, the caller's counter (a step or a Brownian-tree node) and a stream tag, and
 * never on the batch it is drawn in.  Each sample's elements are cut into work items of
 * ITEM_CALLS Philox calls; a work item is processed the same way whatever the batch size or
 * the thread that runs it, so results are bit-identical across batch sizes and threadings.
 * Work items run on OpenMP threads: loaded into a process where torch already loaded its
 * libgomp, the library shares torch's thread pool instead of competing with its spinning
 * workers.
 * samplers/noise.py holds a torch port of the same mapping (used off-CPU and as the test
 * reference); keep the two in step.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define ITEM_CALLS 1024

static void philox_calls(uint32_t key0, uint32_t key1, uint32_t first, uint32_t c1, uint32_t c2,
                         uint32_t c3, int calls, uint32_t *restrict o0, uint32_t *restrict o1,
                         uint32_t *restrict o2, uint32_t *restrict o3) {
    for (int n = 0; n < calls; ++n) {
        uint32_t x0 = first + (uint32_t)n, x1 = c1, x2 = c2, x3 = c3;
        uint32_t k0 = key0, k1 = key1;
        _Pragma("GCC unroll 10")
        for (int r = 0; r < 10; ++r) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * x0;
            uint64_t p1 = (uint64_t)PHILOX_M1 * x2;
            uint32_t y0 = (uint32_t)(p1 >> 32) ^ x1 ^ k0;
            uint32_t y2 = (uint32_t)(p0 >> 32) ^ x3 ^ k1;
            x1 = (uint32_t)p1;
            x3 = (uint32_t)p0;
            x0 = y0;
            x2 = y2;
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        o0[n] = x0; o1[n] = x1; o2[n] = x2; o3[n] = x3;
    }
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* float32: every Philox call gives two Box-Muller pairs, i.e. 4 normals.  Within a work item
 * of `calls` calls, element q * calls + n comes from output q of call n.  sin is written as a
 * shifted cos so that the loop vectorises with the vector math library. */
void samplers_normal_f32(float *out, int64_t per_sample, const uint64_t *seeds,
                         const uint32_t *index, const uint32_t *counter, uint32_t stream,
                         int64_t item_begin, int64_t item_end, int threads) {
    const int64_t item_size = 4 * ITEM_CALLS;
    const int64_t items_per_sample = (per_sample + item_size - 1) / item_size;
    const float two_pi = 6.283185307179586f;
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t w = item_begin; w < item_end; ++w) {
        uint32_t o0[ITEM_CALLS], o1[ITEM_CALLS], o2[ITEM_CALLS], o3[ITEM_CALLS];
        float z[4 * ITEM_CALLS];
        const int64_t s = w / items_per_sample, b = w % items_per_sample;
        const int64_t start = b * item_size, len = min64(item_size, per_sample - start);
        const int calls = (int)((len + 3) / 4);
        philox_calls((uint32_t)seeds[s], (uint32_t)(seeds[s] >> 32), (uint32_t)(b * ITEM_CALLS),
                     index[s], counter[s], stream, calls, o0, o1, o2, o3);
        #pragma omp simd
        for (int n = 0; n < calls; ++n) {
            const float u1 = ((float)(o0[n] >> 8) + 1.0f) * 0x1p-24f; /* (0, 1] */
            const float u2 = (float)(o1[n] >> 8) * 0x1p-24f;          /* [0, 1) */
            const float u3 = ((float)(o2[n] >> 8) + 1.0f) * 0x1p-24f;
            const float u4 = (float)(o3[n] >> 8) * 0x1p-24f;
            const float r1 = sqrtf(-2.0f * logf(u1)), r2 = sqrtf(-2.0f * logf(u3));
            z[n] = r1 * cosf(two_pi * u2);
            z[calls + n] = r1 * cosf(two_pi * (u2 - 0.25f));
            z[2 * calls + n] = r2 * cosf(two_pi * u4);
            z[3 * calls + n] = r2 * cosf(two_pi * (u4 - 0.25f));
        }
        memcpy(out + s * per_sample + start, z, (size_t)len * sizeof(float));
    }
}

/* float64: every Philox call gives one pair of 53-bit uniforms, i.e. 2 normals; element
 * q * calls + n comes from output q of call n. */
void samplers_normal_f64(double *out, int64_t per_sample, const uint64_t *seeds,
                         const uint32_t *index, const uint32_t *counter, uint32_t stream,
                         int64_t item_begin, int64_t item_end, int threads) {
    const int64_t item_size = 2 * ITEM_CALLS;
    const int64_t items_per_sample = (per_sample + item_size - 1) / item_size;
    const double two_pi = 6.283185307179586;
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1)
    for (int64_t w = item_begin; w < item_end; ++w) {
        uint32_t o0[ITEM_CALLS], o1[ITEM_CALLS], o2[ITEM_CALLS], o3[ITEM_CALLS];
        double z[2 * ITEM_CALLS];
        const int64_t s = w / items_per_sample, b = w % items_per_sample;
        const int64_t start = b * item_size, len = min64(item_size, per_sample - start);
        const int calls = (int)((len + 1) / 2);
        philox_calls((uint32_t)seeds[s], (uint32_t)(seeds[s] >> 32), (uint32_t)(b * ITEM_CALLS),
                     index[s], counter[s], stream, calls, o0, o1, o2, o3);
        #pragma omp simd
        for (int n = 0; n < calls; ++n) {
            const double u1 = ((double)(o0[n] >> 5) * 67108864.0 + (double)(o1[n] >> 6) + 1.0) * 0x1p-53;
            const double u2 = ((double)(o2[n] >> 5) * 67108864.0 + (double)(o3[n] >> 6)) * 0x1p-53;
            const double r = sqrt(-2.0 * log(u1));
            z[n] = r * cos(two_pi * u2);
            z[calls + n] = r * cos(two_pi * (u2 - 0.25));
        }
        memcpy(out + s * per_sample + start, z, (size_t)len * sizeof(double));
    }
}

/* The raw Philox words, for tests of the ports against each other. */
void samplers_philox(uint32_t *out4, int64_t calls, uint64_t seed, uint32_t c1, uint32_t c2, uint32_t c3) {
    for (int64_t first = 0; first < calls; first += ITEM_CALLS) {
        int n = (int)min64(ITEM_CALLS, calls - first);
        philox_calls((uint32_t)seed, (uint32_t)(seed >> 32), (uint32_t)first, c1, c2, c3, n,
                     out4 + first, out4 + calls + first, out4 + 2 * calls + first, out4 + 3 * calls + first);
    }
}
