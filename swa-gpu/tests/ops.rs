//! Every kernel against the CPU reference on random inputs, including sizes that are not multiples of
//! the tile sizes.
//!
//! Tolerances:
//! - element-wise arithmetic (`+`, `·`, lerp, axpy, SGD) is the same IEEE f32 expression on both sides;
//!   only a fused multiply-add the shader compiler may form differs, by at most one rounding of each
//!   product: `1e-6` absolute + `1e-6` relative on values of magnitude ≤ ~4;
//! - matrix products and convolutions sum in different orders: each side is within `K·u·Σ|a·b|` of the
//!   exact sum (u = 2⁻²⁴), so they are within twice that, with `Σ|a·b|` computed by the same op on
//!   absolute values;
//! - batch norm, softmax and cross-entropy use `sqrt`, `exp` and `log`, which WGSL only guarantees to a
//!   few ulp, after reductions over ≤ 130 values: `2e-5` absolute + `2e-5` relative, well above the
//!   expected error (~10 ulp) and far below any formula error (which would be ≥ 1e-2).

mod common;

use common::*;
use swa_core::backend::prelude::*;
use swa_core::backend::{dropout_keeps, BackendError, Conv2dSpec, SgdStep};

const ELEMENTWISE_TOL: f32 = 1e-6;
const TRANSCENDENTAL_TOL: f32 = 2e-5;

#[test]
fn fill_copy_scale_duplicate_reshape() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let (mut gt, mut ct) = random_pair(&g, 1, &[3, 7]);
    g.scale_(&mut gt, -2.5).unwrap();
    c.scale_(&mut ct, -2.5).unwrap();
    assert_close("scale_", &g, &gt, &ct, ELEMENTWISE_TOL, ELEMENTWISE_TOL);

    let copy = g.duplicate(&gt).unwrap();
    g.fill_(&mut gt, 0.75).unwrap();
    assert_eq!(host(&g, &gt), vec![0.75; 21]);
    assert_close("duplicate", &g, &copy, &ct, 0.0, 0.0);

    let (src, csrc) = random_pair(&g, 2, &[3, 7]);
    g.copy_(&mut gt, &src).unwrap();
    assert_close("copy_", &g, &gt, &csrc, 0.0, 0.0);

    let reshaped = g.reshape(gt, &[7, 3]).unwrap();
    assert_eq!(reshaped.dims(), &[7, 3]);
    assert_eq!(
        host(&g, &reshaped),
        csrc.iter().copied().collect::<Vec<_>>()
    );
    assert!(g.reshape(reshaped, &[4, 5]).is_err());

    let zeros = g.zeros(&[5, 3]).unwrap();
    assert_eq!(host(&g, &zeros), vec![0.0; 15]);
    let empty = g.zeros(&[0, 4]).unwrap();
    assert!(host(&g, &empty).is_empty());
}

#[test]
fn shape_errors_are_typed() {
    let Some(g) = gpu() else { return };
    let mut a = g.zeros(&[2, 3]).unwrap();
    let b = g.zeros(&[3, 2]).unwrap();
    assert!(matches!(
        g.add(&a, &b),
        Err(swa_core::BackendError::ShapeMismatch { op: "add", .. })
    ));
    assert!(matches!(
        g.lerp_(&mut a, &b, 0.5),
        Err(swa_core::BackendError::ShapeMismatch { op: "lerp_", .. })
    ));
    assert!(g.from_host(&[1.0, 2.0], &[3]).is_err());
    assert!(g.matmul(&a, &a, false, false).is_err());
    assert!(g.softmax_cross_entropy(&a, &[0, 3]).is_err());
}

#[test]
fn averaging_updates_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let shapes: [&[usize]; 4] = [&[17], &[5, 3, 3, 3], &[1000], &[10, 33]];
    let mut gd = Vec::new();
    let mut cd = Vec::new();
    let mut gs = Vec::new();
    let mut cs = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        let (a, b) = random_pair(&g, 10 + i as u64, shape);
        gd.push(a);
        cd.push(b);
        let (a, b) = random_pair(&g, 20 + i as u64, shape);
        gs.push(a);
        cs.push(b);
    }
    for weight in [1.0, 0.5, 1.0 / 3.0] {
        let mut gdm: Vec<&mut _> = gd.iter_mut().collect();
        let gsr: Vec<&_> = gs.iter().collect();
        g.lerp_many_(&mut gdm, &gsr, weight).unwrap();
        let mut cdm: Vec<&mut _> = cd.iter_mut().collect();
        let csr: Vec<&_> = cs.iter().collect();
        c.lerp_many_(&mut cdm, &csr, weight).unwrap();
    }
    for (i, (a, b)) in gd.iter().zip(&cd).enumerate() {
        assert_close(
            &format!("lerp_many_ #{i}"),
            &g,
            a,
            b,
            ELEMENTWISE_TOL,
            ELEMENTWISE_TOL,
        );
    }
    let (mut a, mut b) = random_pair(&g, 30, &[9, 4]);
    let (x, y) = random_pair(&g, 31, &[9, 4]);
    g.lerp_(&mut a, &x, 0.25).unwrap();
    c.lerp_(&mut b, &y, 0.25).unwrap();
    g.axpy_(&mut a, -1.5, &x).unwrap();
    c.axpy_(&mut b, -1.5, &y).unwrap();
    assert_close(
        "lerp_ then axpy_",
        &g,
        &a,
        &b,
        ELEMENTWISE_TOL,
        ELEMENTWISE_TOL,
    );

    // More pairs than one fused dispatch binds, of assorted sizes, including an empty tensor.
    let sizes = [3usize, 0, 700, 1, 64, 65, 5000, 2, 17, 300, 9, 1025];
    let mut gd2 = Vec::new();
    let mut cd2 = Vec::new();
    let mut gs2 = Vec::new();
    let mut cs2 = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let (a, b) = random_pair(&g, 100 + i as u64, &[n]);
        gd2.push(a);
        cd2.push(b);
        let (a, b) = random_pair(&g, 200 + i as u64, &[n]);
        gs2.push(a);
        cs2.push(b);
    }
    let mut gdm: Vec<&mut _> = gd2.iter_mut().collect();
    g.lerp_many_(&mut gdm, &gs2.iter().collect::<Vec<_>>(), 0.3)
        .unwrap();
    let mut cdm: Vec<&mut _> = cd2.iter_mut().collect();
    c.lerp_many_(&mut cdm, &cs2.iter().collect::<Vec<_>>(), 0.3)
        .unwrap();
    for (i, (a, b)) in gd2.iter().zip(&cd2).enumerate() {
        assert_close(
            &format!("lerp_many_ of {} pairs, #{i}", sizes.len()),
            &g,
            a,
            b,
            ELEMENTWISE_TOL,
            ELEMENTWISE_TOL,
        );
    }

    let mut too_few: Vec<&mut _> = gd.iter_mut().take(1).collect();
    assert!(g.lerp_many_(&mut too_few, &[], 0.5).is_err());
}

#[test]
fn sgd_step_matches_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let steps = [
        SgdStep {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            dampening: 0.0,
            nesterov: false,
        },
        SgdStep {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-3,
            dampening: 0.0,
            nesterov: true,
        },
        SgdStep {
            lr: 0.2,
            momentum: 0.5,
            weight_decay: 0.0,
            dampening: 0.1,
            nesterov: false,
        },
    ];
    for (i, step) in steps.iter().enumerate() {
        let seed = 40 + 3 * i as u64;
        let (mut gp, mut cp) = random_pair(&g, seed, &[37, 3]);
        let (gg, cg) = random_pair(&g, seed + 1, &[37, 3]);
        let (mut gm, mut cm) = random_pair(&g, seed + 2, &[37, 3]);
        for _ in 0..3 {
            g.sgd_step_(&mut gp, &gg, &mut gm, step).unwrap();
            c.sgd_step_(&mut cp, &cg, &mut cm, step).unwrap();
        }
        assert_close(
            &format!("sgd param {step:?}"),
            &g,
            &gp,
            &cp,
            ELEMENTWISE_TOL,
            ELEMENTWISE_TOL,
        );
        assert_close(
            &format!("sgd momentum {step:?}"),
            &g,
            &gm,
            &cm,
            ELEMENTWISE_TOL,
            ELEMENTWISE_TOL,
        );
    }
}

#[test]
fn arithmetic_relu_and_bias_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let (ga, ca) = random_pair(&g, 50, &[2, 3, 5, 7]);
    let (gb, cb) = random_pair(&g, 51, &[2, 3, 5, 7]);
    assert_close(
        "add",
        &g,
        &g.add(&ga, &gb).unwrap(),
        &c.add(&ca, &cb).unwrap(),
        0.0,
        0.0,
    );
    assert_close(
        "mul",
        &g,
        &g.mul(&ga, &gb).unwrap(),
        &c.mul(&ca, &cb).unwrap(),
        0.0,
        0.0,
    );
    let (gs, cs) = random_pair(&g, 52, &[2]);
    assert_close(
        "scale_per_image",
        &g,
        &g.scale_per_image(&ga, &gs).unwrap(),
        &c.scale_per_image(&ca, &cs).unwrap(),
        0.0,
        0.0,
    );
    assert!(matches!(
        g.scale_per_image(&ga, &gb),
        Err(BackendError::ShapeMismatch {
            op: "scale_per_image",
            ..
        })
    ));
    assert_close(
        "add(a, a)",
        &g,
        &g.add(&ga, &ga).unwrap(),
        &c.add(&ca, &ca).unwrap(),
        0.0,
        0.0,
    );
    let gy = g.relu(&ga).unwrap();
    let cy = c.relu(&ca).unwrap();
    assert_close("relu", &g, &gy, &cy, 0.0, 0.0);
    let (mut g_in_place, mut c_in_place) = (g.duplicate(&ga).unwrap(), c.duplicate(&ca).unwrap());
    g.relu_(&mut g_in_place).unwrap();
    c.relu_(&mut c_in_place).unwrap();
    assert_close("relu_", &g, &g_in_place, &c_in_place, 0.0, 0.0);
    assert_close("relu_ and relu", &g, &g_in_place, &cy, 0.0, 0.0);
    assert_close(
        "relu_backward",
        &g,
        &g.relu_backward(&gy, &gb).unwrap(),
        &c.relu_backward(&cy, &cb).unwrap(),
        0.0,
        0.0,
    );

    let (mut gx, mut cx) = random_pair(&g, 52, &[13, 6]);
    let (gbias, cbias) = random_pair(&g, 53, &[6]);
    g.add_row_bias_(&mut gx, &gbias).unwrap();
    c.add_row_bias_(&mut cx, &cbias).unwrap();
    assert_close("add_row_bias_", &g, &gx, &cx, 0.0, 0.0);
    // 13 rows summed in order on both sides.
    let sums_bound = 13.0 * 2.0 * U * 13.0;
    assert_close(
        "sum_rows",
        &g,
        &g.sum_rows(&gx).unwrap(),
        &c.sum_rows(&cx).unwrap(),
        sums_bound,
        0.0,
    );
}

#[test]
fn dropout_masks_equal_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for (shape, p, seed) in [
        (&[4usize, 33][..], 0.5f32, 7u64),
        (&[1000][..], 0.1, 0xDEAD_BEEF_0123_4567),
        (&[3, 5, 7][..], 0.0, 1),
    ] {
        let gm = g.dropout_mask(shape, p, seed).unwrap();
        let cm = c.dropout_mask(shape, p, seed).unwrap();
        assert_close(&format!("dropout {shape:?} p={p}"), &g, &gm, &cm, 0.0, 0.0);
        let kept = host(&g, &gm).iter().filter(|&&v| v != 0.0).count();
        let expected = (0..cm.len() as u32)
            .filter(|&i| dropout_keeps(seed, i, p))
            .count();
        assert_eq!(kept, expected);
    }
    assert!(g.dropout_mask(&[3], 1.0, 0).is_err());
}

/// Matmul with every transpose, at sizes that are not multiples of any tile, and with a long K that
/// splits the reduction.
#[test]
fn matmul_matches_cpu() {
    let Some(g) = gpu() else { return };
    check_matmul(&g);
}

/// Convolution forward and all gradients: 3 → 5 channels on 7×9 images, stride 1 and 2, padding 0 and
/// 1, kernels 1×1 and 3×3, with and without bias.
#[test]
fn conv2d_matches_cpu() {
    let Some(g) = gpu() else { return };
    check_conv2d(&g);
}

/// Four input channels make the weights' rows (4·3·3 values) a multiple of four: the vec4 weight loads.
#[test]
fn conv2d_with_vectorised_weight_loads_matches_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let spec = Conv2dSpec {
        stride: 1,
        padding: 1,
    };
    let (gx, cx) = random_pair(&g, 300, &[2, 4, 7, 9]);
    let (gw, cw) = random_pair(&g, 301, &[6, 4, 3, 3]);
    let (gb, cb) = random_pair(&g, 302, &[6]);
    let gy = g.conv2d(&gx, &gw, Some(&gb), spec).unwrap();
    let cy = c.conv2d(&cx, &cw, Some(&cb), spec).unwrap();
    let mag = c
        .conv2d(&abs(&cx), &abs(&cw), Some(&abs(&cb)), spec)
        .unwrap();
    assert_eq!(gy.dims(), cy.shape());
    assert_within(
        "conv2d 4 → 6 channels",
        &host(&g, &gy),
        &cy.iter().copied().collect::<Vec<_>>(),
        &summation_bounds(4 * 9 + 1, &mag),
    );
}

#[test]
fn batch_norm_matches_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for shape in [&[4usize, 3, 5, 6][..], &[9, 7][..]] {
        let ch = shape[1];
        let (gx, cx) = random_pair(&g, 70, shape);
        let (ggamma, cgamma) = random_pair(&g, 71, &[ch]);
        let (gbeta, cbeta) = random_pair(&g, 72, &[ch]);
        let (mut grm, mut crm) = random_pair(&g, 73, &[ch]);
        let ones = vec![1.0; ch];
        let (mut grv, mut crv) = pair(&g, &ones, &[ch]);
        let (gy, gsaved) = g
            .batch_norm_train(&gx, &ggamma, &gbeta, &mut grm, &mut grv, 0.1, 1e-5)
            .unwrap();
        let (cy, csaved) = c
            .batch_norm_train(&cx, &cgamma, &cbeta, &mut crm, &mut crv, 0.1, 1e-5)
            .unwrap();
        let t = TRANSCENDENTAL_TOL;
        assert_close("bn train y", &g, &gy, &cy, t, t);
        assert_close("bn saved mean", &g, &gsaved.mean, &csaved.mean, t, t);
        assert_close(
            "bn saved inv_std",
            &g,
            &gsaved.inv_std,
            &csaved.inv_std,
            t,
            t,
        );
        assert_close("bn running mean", &g, &grm, &crm, t, t);
        assert_close("bn running var", &g, &grv, &crv, t, t);

        let (gdy, cdy) = random_pair(&g, 74, shape);
        let gg = g.batch_norm_backward(&gx, &ggamma, &gsaved, &gdy).unwrap();
        let cg = c.batch_norm_backward(&cx, &cgamma, &csaved, &cdy).unwrap();
        assert_close("bn dx", &g, &gg.input, &cg.input, t, t);
        assert_close("bn dgamma", &g, &gg.gamma, &cg.gamma, t, t);
        assert_close("bn dbeta", &g, &gg.beta, &cg.beta, t, t);

        let ge = g
            .batch_norm_eval(&gx, &ggamma, &gbeta, &grm, &grv, 1e-5)
            .unwrap();
        let ce = c
            .batch_norm_eval(&cx, &cgamma, &cbeta, &crm, &crv, 1e-5)
            .unwrap();
        assert_close("bn eval", &g, &ge, &ce, t, t);

        let gr = g
            .batch_norm_relu_eval(&gx, &ggamma, &gbeta, &grm, &grv, 1e-5)
            .unwrap();
        let cr = c
            .batch_norm_relu_eval(&cx, &cgamma, &cbeta, &crm, &crv, 1e-5)
            .unwrap();
        assert_close("bn relu eval", &g, &gr, &cr, t, t);
    }
}

#[test]
fn batch_norm_relu_matches_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for shape in [&[4usize, 3, 5, 6][..], &[9, 7][..]] {
        let ch = shape[1];
        let (gx, cx) = random_pair(&g, 90, shape);
        let (ggamma, cgamma) = random_pair(&g, 91, &[ch]);
        let (gbeta, cbeta) = random_pair(&g, 92, &[ch]);
        let (mut grm, mut crm) = random_pair(&g, 93, &[ch]);
        let ones = vec![1.0; ch];
        let (mut grv, mut crv) = pair(&g, &ones, &[ch]);
        let (gz, gsaved) = g
            .batch_norm_relu_train(&gx, &ggamma, &gbeta, &mut grm, &mut grv, 0.1, 1e-5)
            .unwrap();
        let (cz, csaved) = c
            .batch_norm_relu_train(&cx, &cgamma, &cbeta, &mut crm, &mut crv, 0.1, 1e-5)
            .unwrap();
        let t = TRANSCENDENTAL_TOL;
        assert_close("bn+relu train z", &g, &gz, &cz, t, t);
        assert!(
            cz.iter().any(|&v| v == 0.0) && cz.iter().any(|&v| v > 0.0),
            "the ReLU cuts part of the output"
        );
        assert_close("bn+relu running mean", &g, &grm, &crm, t, t);
        assert_close("bn+relu running var", &g, &grv, &crv, t, t);

        let (gdz, cdz) = random_pair(&g, 94, shape);
        let gg = g
            .batch_norm_relu_backward(&gx, &ggamma, &gbeta, &gsaved, &gdz)
            .unwrap();
        let cg = c
            .batch_norm_relu_backward(&cx, &cgamma, &cbeta, &csaved, &cdz)
            .unwrap();
        assert_close("bn+relu dx", &g, &gg.input, &cg.input, t, t);
        assert_close("bn+relu dgamma", &g, &gg.gamma, &cg.gamma, t, t);
        assert_close("bn+relu dbeta", &g, &gg.beta, &cg.beta, t, t);
    }
}

#[test]
fn pooling_matches_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    // Values on a coarse grid so that windows hold ties, which must go to the first maximum.
    let data: Vec<f32> = random(80, 2 * 3 * 7 * 9)
        .iter()
        .map(|v| (v * 3.0).round())
        .collect();
    let (gx, cx) = pair(&g, &data, &[2, 3, 7, 9]);
    for (kernel, stride, padding) in [(2, 2, 0), (3, 2, 0), (3, 1, 0), (3, 2, 1), (3, 1, 1)] {
        let case = format!("k={kernel} s={stride} p={padding}");
        let gy = g.max_pool2d(&gx, kernel, stride, padding).unwrap();
        let cy = c.max_pool2d(&cx, kernel, stride, padding).unwrap();
        assert_close(&format!("max_pool2d {case}"), &g, &gy, &cy, 0.0, 0.0);
        let (gdy, cdy) = random_pair(&g, 81, cy.shape());
        let gdx = g
            .max_pool2d_backward(&gx, &gdy, kernel, stride, padding)
            .unwrap();
        let cdx = c
            .max_pool2d_backward(&cx, &cdy, kernel, stride, padding)
            .unwrap();
        // Up to 4 overlapping windows add into one input: a few roundings.
        assert_close(
            &format!("max_pool2d_backward {case}"),
            &g,
            &gdx,
            &cdx,
            4.0 * 4.0 * U,
            0.0,
        );
    }
    let (gx, cx) = random_pair(&g, 82, &[2, 3, 7, 9]);
    for kernel in [2, 3] {
        let gy = g.avg_pool2d(&gx, kernel).unwrap();
        let cy = c.avg_pool2d(&cx, kernel).unwrap();
        let terms = (kernel * kernel) as f32;
        assert_close(
            &format!("avg_pool2d k={kernel}"),
            &g,
            &gy,
            &cy,
            2.0 * terms * U,
            4.0 * U,
        );
        let (gdy, cdy) = random_pair(&g, 83, cy.shape());
        let gdx = g.avg_pool2d_backward(&gdy, kernel, &[2, 3, 7, 9]).unwrap();
        let cdx = c.avg_pool2d_backward(&cdy, kernel, &[2, 3, 7, 9]).unwrap();
        assert_close(
            &format!("avg_pool2d_backward k={kernel}"),
            &g,
            &gdx,
            &cdx,
            2.0 * U,
            2.0 * U,
        );
    }
}

#[test]
fn softmax_and_cross_entropy_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let logits: Vec<f32> = random(90, 13 * 10).iter().map(|v| v * 8.0).collect();
    let (gl, cl) = pair(&g, &logits, &[13, 10]);
    let labels: Vec<u32> = (0..13).map(|i| (i * 7 % 10) as u32).collect();
    let t = TRANSCENDENTAL_TOL;
    assert_close(
        "softmax",
        &g,
        &g.softmax(&gl).unwrap(),
        &c.softmax(&cl).unwrap(),
        t,
        t,
    );
    let gx = g.softmax_cross_entropy(&gl, &labels).unwrap();
    let cx = c.softmax_cross_entropy(&cl, &labels).unwrap();
    assert_eq!(gx.loss.dims(), &[1]);
    assert_close("cross-entropy loss", &g, &gx.loss, &cx.loss, t, t);
    assert_close("cross-entropy grad", &g, &gx.grad, &cx.grad, t, t);
    assert!(g.softmax_cross_entropy(&gl, &[10; 13]).is_err());
}

/// Slices along every axis, the writes that replace and that add, on shapes whose slices are not
/// multiples of a workgroup: the same copies as the CPU's, exactly.
#[test]
fn narrow_and_slice_writes_match_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let shape = [3, 7, 5, 9];
    let (gx, cx) = random_pair(&g, 61, &shape);
    for (axis, start, len) in [(0, 1, 2), (1, 2, 4), (1, 0, 7), (2, 4, 1), (3, 3, 6)] {
        let got = g.narrow(&gx, axis, start, len).unwrap();
        let want = c.narrow(&cx, axis, start, len).unwrap();
        assert_close(&format!("narrow axis {axis}"), &g, &got, &want, 0.0, 0.0);

        let (mut gd, mut cd) = random_pair(&g, 62, &shape);
        g.narrow_assign_(&mut gd, axis, start, &got).unwrap();
        c.narrow_assign_(&mut cd, axis, start, &want).unwrap();
        assert_close(
            &format!("narrow_assign_ axis {axis}"),
            &g,
            &gd,
            &cd,
            0.0,
            0.0,
        );
        g.narrow_add_(&mut gd, axis, start, &got).unwrap();
        c.narrow_add_(&mut cd, axis, start, &want).unwrap();
        assert_close(&format!("narrow_add_ axis {axis}"), &g, &gd, &cd, 0.0, 0.0);
    }
    let (gp, cp) = random_pair(&g, 63, &[300]);
    let got = g.narrow(&gp, 0, 17, 260).unwrap();
    assert_close(
        "narrow 1-D",
        &g,
        &got,
        &c.narrow(&cp, 0, 17, 260).unwrap(),
        0.0,
        0.0,
    );
    assert!(matches!(
        g.narrow(&gp, 0, 290, 20),
        Err(swa_core::BackendError::InvalidArgument { op: "narrow", .. })
    ));
    let mut small = g.zeros(&[2, 3]).unwrap();
    assert!(g.narrow_add_(&mut small, 1, 0, &gp).is_err());
}
