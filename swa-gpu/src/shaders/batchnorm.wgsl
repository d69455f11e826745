// Batch norm over (N, H, W) per channel: training statistics with the running-stat update, evaluation,
// backward, and the per-channel sum that also serves as a convolution's bias gradient.
//
// Reductions run one workgroup per channel: each thread sums a fixed strided subset in order, then a tree
// in workgroup memory combines the partial sums, so results never depend on scheduling (no atomics).

struct Params {
    batch: u32,
    channels: u32,
    hw: u32,
    momentum: f32,
    eps: f32,
    total: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> inv_std_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(8) var<storage, read_write> running_var: array<f32>;
// Normalisation coefficients [centre C | scale C | shift C]: y = (x − centre)·scale + shift.
@group(0) @binding(9) var<storage, read_write> coeff_out: array<f32>;
@group(0) @binding(10) var<storage, read_write> out: array<f32>;
@group(0) @binding(11) var<storage, read> coeff: array<f32>;
@group(0) @binding(12) var<storage, read> mean_in: array<f32>;
@group(0) @binding(13) var<storage, read> inv_std_in: array<f32>;
@group(0) @binding(14) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(15) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(16) var<storage, read> running_mean_in: array<f32>;
@group(0) @binding(17) var<storage, read> running_var_in: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial_a: array<f32, 256>;
var<workgroup> partial_b: array<f32, 256>;

fn element(c: u32, e: u32) -> u32 {
    let n = e / p.hw;
    return (n * p.channels + c) * p.hw + e % p.hw;
}

// Tree-reduces partial_a and partial_b; the sums end in slot 0.
fn reduce_pair(t: u32) {
    for (var width = WG / 2u; width > 0u; width = width / 2u) {
        workgroupBarrier();
        if (t < width) {
            partial_a[t] = partial_a[t] + partial_a[t + width];
            partial_b[t] = partial_b[t] + partial_b[t + width];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn stats(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.x;
    let t = lid.x;
    let count = p.batch * p.hw;
    var sum = 0.0;
    for (var e = t; e < count; e = e + WG) {
        sum = sum + x[element(c, e)];
    }
    partial_a[t] = sum;
    partial_b[t] = 0.0;
    reduce_pair(t);
    let mean = partial_a[0] / f32(count);
    workgroupBarrier();
    // Second pass over centred values: no cancellation in the variance.
    var sq = 0.0;
    for (var e = t; e < count; e = e + WG) {
        let d = x[element(c, e)] - mean;
        sq = sq + d * d;
    }
    partial_a[t] = sq;
    reduce_pair(t);
    if (t == 0u) {
        let var_biased = partial_a[0] / f32(count);
        let inv_std = 1.0 / sqrt(var_biased + p.eps);
        mean_out[c] = mean;
        inv_std_out[c] = inv_std;
        let unbiased = var_biased * f32(count) / f32(count - 1u);
        running_mean[c] = (1.0 - p.momentum) * running_mean[c] + p.momentum * mean;
        running_var[c] = (1.0 - p.momentum) * running_var[c] + p.momentum * unbiased;
        coeff_out[c] = mean;
        coeff_out[p.channels + c] = gamma[c] * inv_std;
        coeff_out[2u * p.channels + c] = beta[c];
    }
}

@compute @workgroup_size(64)
fn eval_coeff(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.channels) { return; }
    coeff_out[c] = running_mean_in[c];
    coeff_out[p.channels + c] = gamma[c] / sqrt(running_var_in[c] + p.eps);
    coeff_out[2u * p.channels + c] = beta[c];
}

@compute @workgroup_size(256)
fn apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.y * nwg.x * WG + gid.x;
    if (i >= p.total) { return; }
    let c = (i / p.hw) % p.channels;
    out[i] = (x[i] - coeff[c]) * coeff[p.channels + c] + coeff[2u * p.channels + c];
}

// `apply` followed by a ReLU, for evaluation-mode batch norm feeding a ReLU.
@compute @workgroup_size(256)
fn apply_relu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.y * nwg.x * WG + gid.x;
    if (i >= p.total) { return; }
    let c = (i / p.hw) % p.channels;
    out[i] = max((x[i] - coeff[c]) * coeff[p.channels + c] + coeff[2u * p.channels + c], 0.0);
}

// dgamma = Σ dy·x̂, dbeta = Σ dy.
@compute @workgroup_size(256)
fn backward_reduce(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.x;
    let t = lid.x;
    let count = p.batch * p.hw;
    let mean = mean_in[c];
    let inv_std = inv_std_in[c];
    var sum_dy = 0.0;
    var sum_dy_xhat = 0.0;
    for (var e = t; e < count; e = e + WG) {
        let i = element(c, e);
        let g = dy[i];
        sum_dy = sum_dy + g;
        sum_dy_xhat = sum_dy_xhat + g * (x[i] - mean) * inv_std;
    }
    partial_a[t] = sum_dy;
    partial_b[t] = sum_dy_xhat;
    reduce_pair(t);
    if (t == 0u) {
        dbeta[c] = partial_a[0];
        dgamma[c] = partial_b[0];
    }
}

// dx = γ·inv_std/m · (m·dy − Σdy − x̂·Σdy·x̂)
@compute @workgroup_size(256)
fn backward_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.y * nwg.x * WG + gid.x;
    if (i >= p.total) { return; }
    let c = (i / p.hw) % p.channels;
    let m = f32(p.batch * p.hw);
    let inv_std = inv_std_in[c];
    let xhat = (x[i] - mean_in[c]) * inv_std;
    out[i] = gamma[c] * inv_std / m * (m * dy[i] - dbeta[c] - xhat * dgamma[c]);
}

// dbeta[c] = Σ dy over (N, H, W): the bias gradient of a convolution.
@compute @workgroup_size(256)
fn channel_sum(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.x;
    let t = lid.x;
    let count = p.batch * p.hw;
    var sum = 0.0;
    for (var e = t; e < count; e = e + WG) {
        sum = sum + dy[element(c, e)];
    }
    partial_a[t] = sum;
    partial_b[t] = 0.0;
    reduce_pair(t);
    if (t == 0u) {
        dbeta[c] = partial_a[0];
    }
}
