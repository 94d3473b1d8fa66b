// Kernels every transformation (or the worker loops) must refuse.
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

extern "C" __global__ void grid_sync(int* data) {           // cooperative launch, grid.sync()
    cg::grid_group g = cg::this_grid();
    data[g.thread_rank()] += 1;
    g.sync();
    if (g.thread_rank() == 0) data[0] = 7;
}

extern "C" __global__ void __cluster_dims__(2, 1, 1) cluster_exchange(int* out) {   // clusters + DSMEM
    __shared__ int v;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) v = (int)cluster.block_rank();
    cluster.sync();
    int* peer = cluster.map_shared_rank(&v, cluster.block_rank() ^ 1);
    out[blockIdx.x] = *peer;
    cluster.sync();
}

extern "C" __global__ void sm_id(unsigned* out) {             // %smid-dependent logic
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    out[blockIdx.x] = sm;
}

extern "C" __global__ void syncthreads_count(const int* in, int* out) {   // bar.red.popc: slice only
    int c = __syncthreads_count(in[blockIdx.x * blockDim.x + threadIdx.x] > 0);
    if (threadIdx.x == 0) out[blockIdx.x] = c;
}

extern "C" __global__ void named_barrier(const int* in, int* out) {       // bar.sync 1, 64: slice only
    __shared__ int s[64];
    if (threadIdx.x < 64) {
        s[threadIdx.x] = in[blockIdx.x * 64 + threadIdx.x];
        asm volatile("bar.sync 1, 64;");
        out[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x];
    }
}

__device__ __noinline__ unsigned block_of_caller() { return blockIdx.x; }
extern "C" __global__ void ctaid_in_callee(unsigned* out) {   // %ctaid read in a called function
    out[blockIdx.x * blockDim.x + threadIdx.x] = block_of_caller();
}
