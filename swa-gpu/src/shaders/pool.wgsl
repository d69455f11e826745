// Max and average pooling over square windows and their gradients; max pooling takes an implicit padding
// that never wins a window (PyTorch's), average pooling has none.
//
// Gradients run one thread per input element and gather from the windows that contain it, in window
// order, so there are no atomics and the result is deterministic. Max pooling routes a window's gradient
// to the first position (row-major) holding the window's maximum, as the CPU reference does.

struct Params {
    total: u32,
    channels: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kernel: u32,
    stride: u32,
    padding: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

// Offset in x of the first position holding the maximum of window (oy, ox) of plane `plane`. The window
// starts at padded coordinates (oy·stride, ox·stride); positions in the padding are skipped, and every
// window holds at least one input because the padding is at most half the window.
fn argmax(plane: u32, oy: u32, ox: u32) -> u32 {
    let base = plane * p.h * p.w;
    var best = base;
    var best_value = 0.0;
    var found = false;
    for (var ky = 0u; ky < p.kernel; ky = ky + 1u) {
        let py = oy * p.stride + ky;
        if (py < p.padding || py >= p.h + p.padding) { continue; }
        for (var kx = 0u; kx < p.kernel; kx = kx + 1u) {
            let px = ox * p.stride + kx;
            if (px < p.padding || px >= p.w + p.padding) { continue; }
            let i = base + (py - p.padding) * p.w + px - p.padding;
            let v = x[i];
            // Strictly greater keeps the first maximum; a NaN wins so that it propagates (x != x tests NaN).
            if (!found || v > best_value || (v != v && best_value == best_value)) {
                found = true;
                best_value = v;
                best = i;
            }
        }
    }
    return best;
}

@compute @workgroup_size(256)
fn max_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.total) { return; }
    let plane = i / (p.oh * p.ow);
    let pixel = i % (p.oh * p.ow);
    out[i] = x[argmax(plane, pixel / p.ow, pixel % p.ow)];
}

// First and one-past-last output index along one axis whose window covers input coordinate `c` (padded
// coordinate c + padding; average pooling has no padding).
fn covering(c: u32, outputs: u32) -> vec2<u32> {
    let padded = c + p.padding;
    var first = 0u;
    if (padded + 1u > p.kernel) {
        first = (padded + 1u - p.kernel + p.stride - 1u) / p.stride;
    }
    let last = min(padded / p.stride + 1u, outputs);
    return vec2<u32>(first, last);
}

@compute @workgroup_size(256)
fn max_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.total) { return; }
    let plane = i / (p.h * p.w);
    let pixel = i % (p.h * p.w);
    let ys = covering(pixel / p.w, p.oh);
    let xs = covering(pixel % p.w, p.ow);
    var grad = 0.0;
    for (var oy = ys.x; oy < ys.y; oy = oy + 1u) {
        for (var ox = xs.x; ox < xs.y; ox = ox + 1u) {
            if (argmax(plane, oy, ox) == i) {
                grad = grad + dy[(plane * p.oh + oy) * p.ow + ox];
            }
        }
    }
    out[i] = grad;
}

@compute @workgroup_size(256)
fn avg_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.total) { return; }
    let plane = i / (p.oh * p.ow);
    let pixel = i % (p.oh * p.ow);
    let y0 = (pixel / p.ow) * p.stride;
    let x0 = (pixel % p.ow) * p.stride;
    var sum = 0.0;
    for (var ky = 0u; ky < p.kernel; ky = ky + 1u) {
        for (var kx = 0u; kx < p.kernel; kx = kx + 1u) {
            sum = sum + x[(plane * p.h + y0 + ky) * p.w + x0 + kx];
        }
    }
    out[i] = sum / f32(p.kernel * p.kernel);
}

@compute @workgroup_size(256)
fn avg_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.total) { return; }
    let plane = i / (p.h * p.w);
    let pixel = i % (p.h * p.w);
    let oy = (pixel / p.w) / p.stride;
    let ox = (pixel % p.w) / p.stride;
    var grad = 0.0;
    if (oy < p.oh && ox < p.ow) {
        grad = dy[(plane * p.oh + oy) * p.ow + ox] / f32(p.kernel * p.kernel);
    }
    out[i] = grad;
}
