// Device-side launch (dynamic parallelism): refused. Compiled with -rdc=true.
extern "C" __global__ void child(int* data) { data[threadIdx.x] += 1; }
extern "C" __global__ void parent(int* data) {
    if (threadIdx.x == 0) child<<<1, 32>>>(data);
}
