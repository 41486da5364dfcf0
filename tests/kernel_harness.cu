// The fused step kernels' thread bodies compiled as host code (tests/test_kernels.py): every
// kernel of cuda/*.cu becomes a C function that runs all the threads of its launch in turn.
#define SAMPLERS_HOST_EMULATION
#include "euler.cu"
#include "multistep.cu"
#include "noise.cu"

// raw Philox words and the float16/bfloat16 conversions, for the tests of the ports
extern "C" void philox_words(samplers::u32* out4, int calls, samplers::u64 seed, samplers::u32 c1, samplers::u32 c2,
                             samplers::u32 c3) {
    for (int n = 0; n < calls; ++n) {
        const samplers::Words w = samplers::philox4x32_10((samplers::u32)n, c1, c2, c3, (samplers::u32)seed,
                                                          (samplers::u32)(seed >> 32));
        out4[4 * n] = w.w0;
        out4[4 * n + 1] = w.w1;
        out4[4 * n + 2] = w.w2;
        out4[4 * n + 3] = w.w3;
    }
}

extern "C" void to_half(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = samplers::float_to_half_bits(in[i]);
}
extern "C" void from_half(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = samplers::half_bits_to_float(in[i]);
}
extern "C" void to_bf16(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = samplers::float_to_bf16_bits(in[i]);
}
