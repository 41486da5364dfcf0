// Fused step of the exponential multistep solvers (solvers/multistep.py history_step):
// DPM-Solver++ / DPM-Solver 2M and 3M (no noise), SDE-DPM-Solver++ 2M/3M and ER-SDE 2/3 (noise).
//
//   m      = px x + pout out                   the converted output (x0 or eps estimate, or m/p)
//   aux0  <- m                                 this step's ring buffer
//   x     <- cx x + w0 m + w1 aux1 + w2 aux2 (+ noise z)
//
// coef rows: px, pout, cx, w0, w1, w2, noise.  HIST (0, 1 or 2) is the number of earlier ring
// buffers the step reads (min(order, k + 1) - 1, as history_step adds them, weight 0 included).
// The new m is rounded to the ring's storage type before it is used, as the torch path's ring
// buffer rounds it.  Order-1 steps without hooks fold m into x and use euler_step (euler.cu).
#include "step_common.cuh"

namespace samplers {

template <class T, class O, int HIST, bool NOISE>
SAMPLERS_HD void multistep_thread(long long t, T* x, const O* out, T* aux0, const T* aux1, const T* aux2,
                                  const float* coef, const u64* seeds, const u32* index, u32 counter, u32 stream,
                                  long long per_sample, long long batch) {
    Slot slot;
    if (!slot_of(t, per_sample, batch, slot)) return;
    const long long s = slot.sample;
    const float px = coef[s], pout = coef[batch + s], cx = coef[2 * batch + s], w0 = coef[3 * batch + s];
    const float w1 = HIST >= 1 ? coef[4 * batch + s] : 0.0f;
    const float w2 = HIST >= 2 ? coef[5 * batch + s] : 0.0f;
    // every load is issued before any store (see euler.cu)
    float xv[4], ov[4], h1[4], h2[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const long long i = element_of(slot, q);
        if (i < 0) break;
        xv[q] = load(x, i);
        ov[q] = load(out, i);
        if (HIST >= 1) h1[q] = load(aux1, i);
        if (HIST >= 2) h2[q] = load(aux2, i);
    }
    float z[4];
    const float c = step_noise<NOISE>(slot, coef, 6, batch, seeds, index, counter, stream, z);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const long long i = element_of(slot, q);
        if (i < 0) break;
        const float m = rounded(aux0, fmaf(pout, ov[q], px * xv[q]));
        store(aux0, i, m);
        float v = fmaf(w0, m, cx * xv[q]);
        if (HIST >= 1) v = fmaf(w1, h1[q], v);
        if (HIST >= 2) v = fmaf(w2, h2[q], v);
        if (NOISE) v = fmaf(c, z[q], v);
        store(x, i, v);
    }
}

}  // namespace samplers

SAMPLERS_STEP_KERNELS(multistep_h0, samplers::multistep_thread, 0, false)
SAMPLERS_STEP_KERNELS(multistep_h1, samplers::multistep_thread, 1, false)
SAMPLERS_STEP_KERNELS(multistep_h2, samplers::multistep_thread, 2, false)
SAMPLERS_STEP_KERNELS(multistep_h0_noise, samplers::multistep_thread, 0, true)
SAMPLERS_STEP_KERNELS(multistep_h1_noise, samplers::multistep_thread, 1, true)
SAMPLERS_STEP_KERNELS(multistep_h2_noise, samplers::multistep_thread, 2, true)
