// The noise the step kernels draw, written out: normal_<T>(out, seeds, index, counter, stream,
// per_sample, batch) fills out (B, per_sample) with the keyed standard normals a step kernel with
// that key adds, so the torch path can be fed exactly the fused kernels' numbers.
#include "step_common.cuh"

namespace samplers {

template <class T>
SAMPLERS_HD void normal_thread(long long t, T* out, const u64* seeds, const u32* index, u32 counter, u32 stream,
                               long long per_sample, long long batch) {
    Slot slot;
    if (!slot_of(t, per_sample, batch, slot)) return;
    float z[4];
    slot_normals(slot, seeds, index, counter, stream, z);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const long long i = element_of(slot, q);
        if (i < 0) break;
        store(out, i, z[q]);
    }
}

}  // namespace samplers

#define SAMPLERS_NORMAL_PARAMS(T)                                                                      \
    (T * out, const samplers::u64* seeds, const samplers::u32* index, samplers::u32 counter,           \
     samplers::u32 stream, long long per_sample, long long batch)
#define SAMPLERS_NORMAL_ARGS (out, seeds, index, counter, stream, per_sample, batch)
SAMPLERS_ENTRY(normal_f32, (samplers::normal_thread<float>), SAMPLERS_NORMAL_PARAMS(float), SAMPLERS_NORMAL_ARGS)
SAMPLERS_ENTRY(normal_f16, (samplers::normal_thread<samplers::half_t>), SAMPLERS_NORMAL_PARAMS(samplers::half_t),
               SAMPLERS_NORMAL_ARGS)
SAMPLERS_ENTRY(normal_bf16, (samplers::normal_thread<samplers::bf16_t>), SAMPLERS_NORMAL_PARAMS(samplers::bf16_t),
               SAMPLERS_NORMAL_ARGS)
