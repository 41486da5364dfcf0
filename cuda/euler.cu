// Fused steps of the one-step linear updates:
//   euler_step:    x <- a x + b out (+ c z)            EulerMaruyama, Euler, and the order-1
//                                                      steps of DPMSolver, DPMSolverSDE, ERSDE
//   heun_predict:  pred <- a x + b out (+ c z)          Heun's first stage (pred = aux0)
//   heun_correct:  x <- x/2 + a pred + b out' (+ c z)   Heun's second stage, the same z
// coef rows (a, b, c) per sample; the _noise kernels draw z in-kernel (philox.cuh), the others
// read no noise row.  Heun's two stages draw the same z from the same key, so it is never stored.
#include "step_common.cuh"

namespace samplers {

template <class T, class O, bool NOISE, int MODE>  // MODE 0: euler, 1: heun_predict, 2: heun_correct
SAMPLERS_HD void linear_thread(long long t, T* x, const O* out, T* aux0, const T*, const T*, const float* coef,
                               const u64* seeds, const u32* index, u32 counter, u32 stream, long long per_sample,
                               long long batch) {
    Slot slot;
    if (!slot_of(t, per_sample, batch, slot)) return;
    const long long s = slot.sample;
    const float a = coef[s], b = coef[batch + s];
    // every load is issued before any store (and before the noise arithmetic): the buffers may
    // alias (unused aux pointers are x), so the compiler cannot reorder them itself, and one
    // element's loads at a time leave the memory system mostly idle
    float xv[4], ov[4], av[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const long long i = element_of(slot, q);
        if (i < 0) break;
        xv[q] = load(x, i);
        ov[q] = load(out, i);
        if (MODE == 2) av[q] = load(aux0, i);
    }
    float z[4];
    const float c = step_noise<NOISE>(slot, coef, 2, batch, seeds, index, counter, stream, z);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const long long i = element_of(slot, q);
        if (i < 0) break;
        float v = MODE == 2 ? fmaf(b, ov[q], fmaf(a, av[q], 0.5f * xv[q])) : fmaf(b, ov[q], a * xv[q]);
        if (NOISE) v = fmaf(c, z[q], v);
        store(MODE == 1 ? aux0 : x, i, v);
    }
}

}  // namespace samplers

SAMPLERS_STEP_KERNELS(euler_step, samplers::linear_thread, false, 0)
SAMPLERS_STEP_KERNELS(euler_step_noise, samplers::linear_thread, true, 0)
SAMPLERS_STEP_KERNELS(heun_predict, samplers::linear_thread, false, 1)
SAMPLERS_STEP_KERNELS(heun_predict_noise, samplers::linear_thread, true, 1)
SAMPLERS_STEP_KERNELS(heun_correct, samplers::linear_thread, false, 2)
SAMPLERS_STEP_KERNELS(heun_correct_noise, samplers::linear_thread, true, 2)
