// Elementwise kernels: 1-D with an early-return bounds guard, 2-D and 3-D
// grids that record every block's %ctaid/%nctaid (the index remapping test).
extern "C" __global__ void saxpy(const float* x, float* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = a * x[i] + y[i];
}

// out[(block linear)*ntid + tid] = packed (ctaid.xyz, nctaid.xyz) of the block.
extern "C" __global__ void grid_ids_3d(unsigned* out) {
    unsigned linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
    unsigned* row = out + 6ull * (linear * nthreads + t);
    row[0] = blockIdx.x; row[1] = blockIdx.y; row[2] = blockIdx.z;
    row[3] = gridDim.x;  row[4] = gridDim.y;  row[5] = gridDim.z;
}

extern "C" __global__ void add_2d(const float* a, const float* b, float* c, int width, int height) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x < width && y < height) c[y * width + x] = a[y * width + x] * 2.0f - b[y * width + x];
}

// Predicated early exit through inline PTX `exit` (not `ret`).
extern "C" __global__ void exit_early(const int* in, int* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) asm volatile("exit;");
    out[i] = in[i] * 3 + (int)blockIdx.x;
}
