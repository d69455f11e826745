// Softmax, and the mean softmax cross-entropy with its gradient.
//
// One thread per row (class counts are small); the mean over rows is a single-workgroup tree reduction
// in fixed order, so the loss is deterministic.

struct Params {
    rows: u32,
    classes: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(5) var<storage, read_write> loss: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

fn row_max(base: u32) -> f32 {
    var m = logits[base];
    for (var j = 1u; j < p.classes; j = j + 1u) {
        m = max(m, logits[base + j]);
    }
    return m;
}

fn row_exp_sum(base: u32, m: f32) -> f32 {
    var s = 0.0;
    for (var j = 0u; j < p.classes; j = j + 1u) {
        s = s + exp(logits[base + j] - m);
    }
    return s;
}

@compute @workgroup_size(64)
fn softmax(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) { return; }
    let base = r * p.classes;
    let m = row_max(base);
    let s = row_exp_sum(base, m);
    for (var j = 0u; j < p.classes; j = j + 1u) {
        out[base + j] = exp(logits[base + j] - m) / s;
    }
}

// out = gradient (softmax − one-hot)/rows; row_loss = log Σ exp − logit[label].
@compute @workgroup_size(64)
fn cross_entropy_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) { return; }
    let base = r * p.classes;
    let label = labels[r];
    let m = row_max(base);
    let s = row_exp_sum(base, m);
    let inv_rows = 1.0 / f32(p.rows);
    for (var j = 0u; j < p.classes; j = j + 1u) {
        var g = exp(logits[base + j] - m) / s;
        if (j == label) {
            g = g - 1.0;
        }
        out[base + j] = g * inv_rows;
    }
    row_loss[r] = log(s) + m - logits[base + label];
}

@compute @workgroup_size(256)
fn mean_loss(@builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    var sum = 0.0;
    for (var r = t; r < p.rows; r = r + WG) {
        sum = sum + row_loss[r];
    }
    partial[t] = sum;
    for (var width = WG / 2u; width > 0u; width = width / 2u) {
        workgroupBarrier();
        if (t < width) {
            partial[t] = partial[t] + partial[t + width];
        }
    }
    if (t == 0u) {
        loss[0] = partial[0] / f32(p.rows);
    }
}
