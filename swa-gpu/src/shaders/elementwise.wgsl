// Element-wise kernels: fills, scaling (whole and per image), axpy, the fused SGD step, arithmetic,
// ReLU, dropout masks, row biases and column sums.
//
// One thread per element over a 2-D grid of 256-wide workgroups (the host spreads large tensors over y
// because a dimension holds at most 65535 workgroups).

struct Params {
    n: u32,
    a: f32,
    b: f32,
    c: f32,
    d: f32,
    flag: u32,
    seed_lo: u32,
    seed_hi: u32,
    inner: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read_write> aux: array<f32>;
@group(0) @binding(4) var<storage, read> src2: array<f32>;

const WG: u32 = 256u;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    dst[i] = p.a;
}

@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    dst[i] = dst[i] * p.a;
}

// dst += a · src
@compute @workgroup_size(256)
fn axpy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    dst[i] = dst[i] + p.a * src[i];
}

// PyTorch's SGD: d = g + wd·p; buf = μ·buf + (1 − dampening)·d; d = nesterov ? d + μ·buf : buf; p −= lr·d.
// a = lr, b = momentum, c = weight decay, d = dampening, flag = nesterov.
@compute @workgroup_size(256)
fn sgd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let param = dst[i];
    let d = src[i] + p.c * param;
    let buf = p.b * aux[i] + (1.0 - p.d) * d;
    aux[i] = buf;
    var step = buf;
    if (p.flag != 0u) {
        step = d + p.b * buf;
    }
    dst[i] = param - p.a * step;
}

@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    dst[i] = src[i] + src2[i];
}

@compute @workgroup_size(256)
fn mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    dst[i] = src[i] * src2[i];
}

// dst = src scaled per image: src2[k] scales the k-th run of `inner` elements.
@compute @workgroup_size(256)
fn scale_per_image(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    dst[i] = src[i] * src2[i / p.inner];
}

@compute @workgroup_size(256)
fn relu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    dst[i] = max(src[i], 0.0);
}

@compute @workgroup_size(256)
fn relu_in_place(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    dst[i] = max(dst[i], 0.0);
}

// src = the ReLU's output y, src2 = dy.
@compute @workgroup_size(256)
fn relu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    dst[i] = select(src2[i], 0.0, src[i] <= 0.0);
}

// PCG-RXS-M-XS, the same arithmetic as swa_core::backend::pcg_hash (u32 products wrap in WGSL too).
fn pcg_hash(input: u32) -> u32 {
    let state = input * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// a = 1/(1 − p), b = p; the seed's halves in seed_lo / seed_hi (swa_core::backend::dropout_keeps).
@compute @workgroup_size(256)
fn dropout_mask(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let stream = pcg_hash(p.seed_lo ^ pcg_hash(p.seed_hi));
    let h = pcg_hash(i ^ stream);
    let uniform01 = f32(h >> 8u) * (1.0 / 16777216.0);
    dst[i] = select(0.0, p.a, uniform01 >= p.b);
}

// dst[row, j] += src[j] for a row length of `inner`.
@compute @workgroup_size(256)
fn add_row_bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    dst[i] = dst[i] + src[i % p.inner];
}

// dst[j] = Σ_r src[r·n + j] over `inner` rows, in row order (deterministic). Also sums split-K partials.
@compute @workgroup_size(256)
fn sum_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = flat(gid, nwg);
    if (j >= p.n) { return; }
    var acc = 0.0;
    for (var r = 0u; r < p.inner; r = r + 1u) {
        acc = acc + src[r * p.n + j];
    }
    dst[j] = acc;
}
