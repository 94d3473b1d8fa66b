// Block-wide barriers in the kernel body, with and without threads that
// return before the barrier.
#include <cuda_pipeline.h>

// Block sum in shared memory (tree reduction, __syncthreads in a loop).
extern "C" __global__ void block_sum(const int* in, int* out, int n) {
    __shared__ int s[256];
    int i = blockIdx.x * 256 + threadIdx.x;
    s[threadIdx.x] = i < n ? in[i] : 0;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

// Whole warps return before the barriers the remaining warps still execute:
// the PTB worker must keep those threads joining barriers.
extern "C" __global__ void early_return_then_sync(const int* in, int* out, int active) {
    __shared__ int s[128];
    if (threadIdx.x >= active) return;          // active is a multiple of 32
    s[threadIdx.x] = in[blockIdx.x * 128 + threadIdx.x];
    __syncthreads();
    int v = s[(threadIdx.x + 1) % active];
    __syncthreads();
    s[threadIdx.x] = v * 2;
    __syncthreads();
    out[(blockIdx.y * gridDim.x + blockIdx.x) * 128 + threadIdx.x] = s[active - 1 - threadIdx.x] + (int)blockIdx.y;
}

// Tiled matrix multiply (integer, exact): barriers inside a loop, 2-D grid.
extern "C" __global__ void matmul_tiled(const int* a, const int* b, int* c, int n) {
    __shared__ int ta[16][16], tb[16][16];
    int row = blockIdx.y * 16 + threadIdx.y, col = blockIdx.x * 16 + threadIdx.x;
    int acc = 0;
    for (int k0 = 0; k0 < n; k0 += 16) {
        ta[threadIdx.y][threadIdx.x] = (row < n && k0 + threadIdx.x < n) ? a[row * n + k0 + threadIdx.x] : 0;
        tb[threadIdx.y][threadIdx.x] = (col < n && k0 + threadIdx.y < n) ? b[(k0 + threadIdx.y) * n + col] : 0;
        __syncthreads();
        for (int k = 0; k < 16; ++k) acc += ta[threadIdx.y][k] * tb[k][threadIdx.x];
        __syncthreads();
    }
    if (row < n && col < n) c[row * n + col] = acc;
}

// Dynamic shared memory, 3-D thread block.
extern "C" __global__ void reverse_dynamic_smem(const float* in, float* out) {
    extern __shared__ float buf[];
    unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    unsigned base = (blockIdx.x + gridDim.x * blockIdx.y) * nt;
    buf[t] = in[base + t];
    __syncthreads();
    out[base + t] = buf[nt - 1 - t];
}

// cp.async copies into shared memory, waited before the barrier.
extern "C" __global__ void async_copy_shift(const float* in, float* out) {
    __shared__ float tile[128];
    int base = blockIdx.x * 128;
    __pipeline_memcpy_async(&tile[threadIdx.x], &in[base + threadIdx.x], sizeof(float));
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    out[base + threadIdx.x] = tile[(threadIdx.x + 5) % 128] + 1.0f;
}

// __launch_bounds__ (.maxntid, .minnctapersm) and a non-inlined helper.
__device__ __noinline__ float helper_square(float v) { return v * v; }
extern "C" __global__ void __launch_bounds__(256, 2) bounded_square(const float* in, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = helper_square(in[i]);
}

// __maxnreg__ (.maxnreg).
extern "C" __global__ void __maxnreg__(32) limited_registers(const float* in, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i] * 0.5f + 1.0f;
}
