//! The CPU backend's tensor operations against direct-loop references in f64, finite differences of their
//! gradients, PyTorch's formulas for batch-norm statistics and SGD, shape checks and determinism.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swa_core::backend::prelude::*;
use swa_core::backend::{BackendError, BatchNormSaved, Conv2dSpec, SgdStep};
use swa_core::{CpuBackend, CpuTensor};

// ------------------------------------------------------------------------------------------ helpers

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn tensor(b: &CpuBackend, data: &[f32], shape: &[usize]) -> CpuTensor {
    b.from_host(data, shape)
        .expect("test data matches its shape")
}

fn host(b: &CpuBackend, t: &CpuTensor) -> Vec<f32> {
    b.to_host(t).expect("reading a CPU tensor")
}

/// Asserts `|got − want| ≤ tol·(1 + |want|)` elementwise, naming the first offender.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()),
            "{what}: element {i}: got {g}, want {w} (error {err})"
        );
    }
}

fn dot(a: &[f32], r: &[f32]) -> f64 {
    a.iter()
        .zip(r)
        .map(|(&a, &r)| f64::from(a) * f64::from(r))
        .sum()
}

/// Central differences of `loss` at a few coordinates of `values`, compared with `analytic`.
fn check_finite_differences(
    what: &str,
    values: &[f32],
    analytic: &[f32],
    step: f32,
    tol: f64,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    let picks: Vec<usize> = if values.len() <= 24 {
        (0..values.len()).collect()
    } else {
        (0..24)
            .map(|i| (i * values.len() / 24 + i % 3).min(values.len() - 1))
            .collect()
    };
    let mut probe = values.to_vec();
    for i in picks {
        probe[i] = values[i] + step;
        let up = loss(&probe);
        probe[i] = values[i] - step;
        let down = loss(&probe);
        probe[i] = values[i];
        let numeric = (up - down) / (2.0 * f64::from(step));
        let a = f64::from(analytic[i]);
        assert!(
            (numeric - a).abs() <= tol * (1.0 + a.abs()),
            "{what}: coordinate {i}: analytic {a}, finite difference {numeric}"
        );
    }
}

// ------------------------------------------------------------------------------------------ convolution

#[derive(Clone, Copy, Debug)]
struct ConvCase {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl ConvCase {
    fn out(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.k) / self.stride + 1,
            (self.w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }
    fn x_shape(&self) -> [usize; 4] {
        [self.n, self.cin, self.h, self.w]
    }
    fn w_shape(&self) -> [usize; 4] {
        [self.cout, self.cin, self.k, self.k]
    }
    fn y_shape(&self) -> [usize; 4] {
        let (ho, wo) = self.out();
        [self.n, self.cout, ho, wo]
    }
    fn spec(&self) -> Conv2dSpec {
        Conv2dSpec {
            stride: self.stride,
            padding: self.pad,
        }
    }
    /// Tolerance of an f32 result against the f64 sum: 1e-5 up to 144 terms per output, growing with the
    /// square root of the count beyond, as rounding errors of a long sum do (a random walk); a wrong or
    /// missing term is off by the order of one term, far above it.
    fn tolerance(&self) -> f64 {
        let terms = (self.cin * self.k * self.k).max(self.cout * self.k * self.k) as f64;
        1e-5 * (terms / 144.0).sqrt().max(1.0)
    }
    /// Calls `f(n, co, oh, ow, ci, ih, iw, kh, kw)` for every product term of the convolution.
    fn for_each_term(&self, mut f: impl FnMut([usize; 9])) {
        let (ho, wo) = self.out();
        for n in 0..self.n {
            for co in 0..self.cout {
                for oh in 0..ho {
                    for ow in 0..wo {
                        for ci in 0..self.cin {
                            for kh in 0..self.k {
                                for kw in 0..self.k {
                                    let ih = (oh * self.stride + kh) as isize - self.pad as isize;
                                    let iw = (ow * self.stride + kw) as isize - self.pad as isize;
                                    if ih < 0
                                        || iw < 0
                                        || ih >= self.h as isize
                                        || iw >= self.w as isize
                                    {
                                        continue;
                                    }
                                    f([n, co, oh, ow, ci, ih as usize, iw as usize, kh, kw]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    fn xi(&self, n: usize, c: usize, ih: usize, iw: usize) -> usize {
        ((n * self.cin + c) * self.h + ih) * self.w + iw
    }
    fn wi(&self, co: usize, ci: usize, kh: usize, kw: usize) -> usize {
        ((co * self.cin + ci) * self.k + kh) * self.k + kw
    }
    fn yi(&self, n: usize, co: usize, oh: usize, ow: usize) -> usize {
        let (ho, wo) = self.out();
        ((n * self.cout + co) * ho + oh) * wo + ow
    }

    fn reference_forward(&self, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
        let (ho, wo) = self.out();
        let mut y = vec![0.0f64; self.n * self.cout * ho * wo];
        if let Some(b) = bias {
            for (i, v) in y.iter_mut().enumerate() {
                *v = f64::from(b[(i / (ho * wo)) % self.cout]);
            }
        }
        self.for_each_term(|[n, co, oh, ow, ci, ih, iw, kh, kw]| {
            y[self.yi(n, co, oh, ow)] +=
                f64::from(x[self.xi(n, ci, ih, iw)]) * f64::from(w[self.wi(co, ci, kh, kw)]);
        });
        y
    }

    /// Gradients of the input, weight and bias for the output gradient `dy`.
    fn reference_backward(&self, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<f64>; 3] {
        let mut dx = vec![0.0f64; x.len()];
        let mut dw = vec![0.0f64; w.len()];
        let mut db = vec![0.0f64; self.cout];
        let (ho, wo) = self.out();
        for (i, &d) in dy.iter().enumerate() {
            db[(i / (ho * wo)) % self.cout] += f64::from(d);
        }
        self.for_each_term(|[n, co, oh, ow, ci, ih, iw, kh, kw]| {
            let d = f64::from(dy[self.yi(n, co, oh, ow)]);
            dx[self.xi(n, ci, ih, iw)] += d * f64::from(w[self.wi(co, ci, kh, kw)]);
            dw[self.wi(co, ci, kh, kw)] += d * f64::from(x[self.xi(n, ci, ih, iw)]);
        });
        [dx, dw, db]
    }
}

const fn case(x: [usize; 4], cout: usize, k: usize, stride: usize, pad: usize) -> ConvCase {
    let [n, cin, h, w] = x;
    ConvCase {
        n,
        cin,
        h,
        w,
        cout,
        k,
        stride,
        pad,
    }
}

/// Odd sizes, strides 1 and 2, padding 0 and 1, 1×1 and 3×3 kernels, batches of 1 and 3, and batches of
/// small images that the backend groups into one GEMM, large images that it unrolls in bands of rows, and
/// wide layers on small planes that it runs as one GEMM per kernel position (with "same" and "valid"
/// padding, 3×3 and 5×5 kernels, channel counts that do not split evenly over the threads, and a batch of
/// more than one block of the pixel-major transposes) or by
/// Winograd's F(2×2, 3×3) (3×3, padding 1, even planes, square or not), and few-channel 3×3 convolutions
/// with padding 1 on rows of whole vectors that run directly in registers (odd heights and output
/// channel counts that leave partial tiles, rows of one and two AVX-512 vectors and of one AVX2 vector)
/// or on rows half a vector long, two to a vector (even heights, a multiple of the tile's rows or not).
const CONV_CASES: [ConvCase; 28] = [
    case([1, 3, 5, 7], 4, 3, 1, 1),
    case([3, 3, 5, 7], 2, 3, 2, 1),
    case([3, 2, 7, 5], 3, 3, 1, 0),
    case([2, 3, 6, 6], 5, 3, 2, 0),
    case([3, 4, 5, 7], 6, 1, 1, 0),
    case([3, 4, 5, 7], 6, 1, 2, 0),
    case([1, 5, 4, 4], 3, 1, 1, 1),
    case([9, 3, 3, 3], 4, 3, 1, 1),
    case([11, 6, 2, 3], 5, 1, 1, 0),
    case([7, 2, 4, 4], 3, 2, 2, 0),
    case([2, 1, 3, 3], 2, 5, 1, 2),
    case([4, 8, 8, 8], 16, 3, 1, 1),
    case([2, 3, 23, 25], 4, 3, 1, 1),
    case([1, 2, 47, 49], 3, 3, 2, 1),
    case([3, 128, 4, 4], 130, 3, 1, 1),
    case([2, 131, 2, 2], 128, 3, 1, 1),
    case([2, 129, 5, 3], 128, 3, 1, 0),
    case([2, 128, 3, 4], 129, 5, 1, 2),
    case([17, 128, 4, 4], 130, 3, 1, 1),
    case([1, 128, 8, 7], 128, 3, 1, 1),
    case([2, 128, 6, 8], 129, 3, 1, 1),
    case([3, 5, 7, 16], 11, 3, 1, 1),
    case([5, 16, 4, 32], 16, 3, 1, 1),
    case([4, 3, 5, 8], 9, 3, 1, 1),
    case([2, 100, 3, 16], 70, 3, 1, 1),
    // Rows half a vector long (AVX-512: 8 columns, AVX2: 4), heights a multiple of 4 and not.
    case([2, 64, 8, 8], 64, 3, 1, 1),
    case([3, 5, 6, 8], 11, 3, 1, 1),
    case([2, 7, 6, 4], 5, 3, 1, 1),
];

#[test]
fn conv_forward_matches_the_direct_sum() {
    let mut r = rng(1);
    for threads in [1, 2, 3] {
        let b = CpuBackend::with_threads(threads);
        for c in CONV_CASES {
            let x = uniform(&mut r, c.x_shape().iter().product());
            let w = uniform(&mut r, c.w_shape().iter().product());
            let bias = uniform(&mut r, c.cout);
            let xt = tensor(&b, &x, &c.x_shape());
            let wt = tensor(&b, &w, &c.w_shape());
            let bt = tensor(&b, &bias, &[c.cout]);
            let y = b.conv2d(&xt, &wt, Some(&bt), c.spec()).expect("conv2d");
            assert_eq!(y.shape(), c.y_shape(), "{c:?}");
            let want = c.reference_forward(&x, &w, Some(&bias));
            assert_close(
                &format!("conv2d {c:?} with bias, {threads} threads"),
                &host(&b, &y),
                &want,
                c.tolerance(),
            );
            let y = b.conv2d(&xt, &wt, None, c.spec()).expect("conv2d");
            let want = c.reference_forward(&x, &w, None);
            assert_close(
                &format!("conv2d {c:?}, {threads} threads"),
                &host(&b, &y),
                &want,
                c.tolerance(),
            );
        }
    }
}

#[test]
fn conv_backward_matches_the_direct_sums() {
    let mut r = rng(2);
    for threads in [1, 2, 3] {
        let b = CpuBackend::with_threads(threads);
        for c in CONV_CASES {
            let x = uniform(&mut r, c.x_shape().iter().product());
            let w = uniform(&mut r, c.w_shape().iter().product());
            let dy = uniform(&mut r, c.y_shape().iter().product());
            let grads = b
                .conv2d_backward(
                    &tensor(&b, &x, &c.x_shape()),
                    &tensor(&b, &w, &c.w_shape()),
                    &tensor(&b, &dy, &c.y_shape()),
                    c.spec(),
                    true,
                    true,
                )
                .expect("conv2d_backward");
            let [dx, dw, db] = c.reference_backward(&x, &w, &dy);
            let what = format!("{c:?}, {threads} threads");
            let input = grads.input.expect("input gradient was asked for");
            assert_eq!(input.shape(), c.x_shape());
            assert_eq!(grads.weight.shape(), c.w_shape());
            assert_close(&format!("dx {what}"), &host(&b, &input), &dx, c.tolerance());
            assert_close(
                &format!("dw {what}"),
                &host(&b, &grads.weight),
                &dw,
                c.tolerance(),
            );
            let bias = grads.bias.expect("bias gradient was asked for");
            assert_close(&format!("db {what}"), &host(&b, &bias), &db, c.tolerance());

            let without = b
                .conv2d_backward(
                    &tensor(&b, &x, &c.x_shape()),
                    &tensor(&b, &w, &c.w_shape()),
                    &tensor(&b, &dy, &c.y_shape()),
                    c.spec(),
                    false,
                    false,
                )
                .expect("conv2d_backward");
            assert!(without.input.is_none() && without.bias.is_none());
            assert_eq!(host(&b, &without.weight), host(&b, &grads.weight), "{what}");
        }
    }
}

/// The direct kernels come in an AVX-512 and an AVX2 build, and a machine runs only its best one: this
/// runs the two tests above again in a child process capped at AVX2 (`SWA_CPU_VECTOR=avx2`), so that a
/// machine with AVX-512 checks the AVX2 kernels too, and with the direct kernels off (`none`), so that
/// the `im2col` path they replace stays checked on the same shapes.
#[test]
fn conv_cases_pass_with_every_kernel_choice() {
    if std::env::var_os(swa_core::backend::cpu::VECTOR_VARIABLE).is_some() {
        // The child itself: the two tests run on their own.
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    for cap in ["avx2", "none"] {
        let output = std::process::Command::new(&exe)
            .env(swa_core::backend::cpu::VECTOR_VARIABLE, cap)
            .args([
                "--exact",
                "conv_forward_matches_the_direct_sum",
                "conv_backward_matches_the_direct_sums",
                "--test-threads",
                "1",
            ])
            .output()
            .expect("the test binary runs again");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "with {cap}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("2 passed"),
            "with {cap} the two tests should have run: {stdout}"
        );
    }
}

#[test]
fn conv_gradients_match_finite_differences() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(3);
    for c in [
        case([2, 3, 5, 6], 4, 3, 1, 1),
        case([2, 3, 7, 5], 2, 3, 2, 1),
        case([3, 4, 4, 5], 3, 1, 1, 0),
        case([2, 4, 5, 5], 3, 1, 2, 0),
    ] {
        let x = uniform(&mut r, c.x_shape().iter().product());
        let w = uniform(&mut r, c.w_shape().iter().product());
        let bias = uniform(&mut r, c.cout);
        let probe = uniform(&mut r, c.y_shape().iter().product());
        let loss = |x: &[f32], w: &[f32], bias: &[f32]| {
            let y = b
                .conv2d(
                    &tensor(&b, x, &c.x_shape()),
                    &tensor(&b, w, &c.w_shape()),
                    Some(&tensor(&b, bias, &[c.cout])),
                    c.spec(),
                )
                .expect("conv2d");
            dot(&host(&b, &y), &probe)
        };
        let grads = b
            .conv2d_backward(
                &tensor(&b, &x, &c.x_shape()),
                &tensor(&b, &w, &c.w_shape()),
                &tensor(&b, &probe, &c.y_shape()),
                c.spec(),
                true,
                true,
            )
            .expect("conv2d_backward");
        let dx = host(&b, grads.input.as_ref().expect("input gradient"));
        let dw = host(&b, &grads.weight);
        let db = host(&b, grads.bias.as_ref().expect("bias gradient"));
        let what = format!("{c:?}");
        check_finite_differences(&format!("conv dx {what}"), &x, &dx, 1e-2, 2e-3, |v| {
            loss(v, &w, &bias)
        });
        check_finite_differences(&format!("conv dw {what}"), &w, &dw, 1e-2, 2e-3, |v| {
            loss(&x, v, &bias)
        });
        check_finite_differences(&format!("conv db {what}"), &bias, &db, 1e-2, 2e-3, |v| {
            loss(&x, &w, v)
        });
    }
}

#[test]
fn conv_rejects_bad_shapes() {
    let b = CpuBackend::with_threads(1);
    let x = b.zeros(&[2, 3, 5, 5]).expect("zeros");
    let spec = Conv2dSpec {
        stride: 1,
        padding: 0,
    };
    let wrong_cin = b.zeros(&[4, 2, 3, 3]).expect("zeros");
    assert!(matches!(
        b.conv2d(&x, &wrong_cin, None, spec),
        Err(BackendError::ShapeMismatch { op: "conv2d", .. })
    ));
    let w = b.zeros(&[4, 3, 3, 3]).expect("zeros");
    let flat = b.zeros(&[3, 5, 5]).expect("zeros");
    assert!(matches!(
        b.conv2d(&flat, &w, None, spec),
        Err(BackendError::ShapeMismatch { op: "conv2d", .. })
    ));
    let bad_bias = b.zeros(&[5]).expect("zeros");
    assert!(matches!(
        b.conv2d(&x, &w, Some(&bad_bias), spec),
        Err(BackendError::ShapeMismatch { op: "conv2d", .. })
    ));
    let zero_stride = Conv2dSpec {
        stride: 0,
        padding: 0,
    };
    assert!(matches!(
        b.conv2d(&x, &w, None, zero_stride),
        Err(BackendError::InvalidArgument { op: "conv2d", .. })
    ));
    let big = b.zeros(&[4, 3, 7, 7]).expect("zeros");
    assert!(matches!(
        b.conv2d(&x, &big, None, spec),
        Err(BackendError::InvalidArgument { op: "conv2d", .. })
    ));
    let wrong_dy = b.zeros(&[2, 4, 4, 3]).expect("zeros");
    let err = b
        .conv2d_backward(&x, &w, &wrong_dy, spec, true, true)
        .expect_err("mismatched output gradient");
    assert!(
        matches!(&err, BackendError::ShapeMismatch { op: "conv2d_backward", got, .. } if got == &[2, 4, 4, 3]),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------ dense

fn reference_matmul(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) -> Vec<f64> {
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                out[i * n + j] += f64::from(av) * f64::from(bv);
            }
        }
    }
    out
}

#[test]
fn matmul_matches_the_direct_sum_for_every_transposition() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(4);
    for (m, k, n) in [(1, 1, 1), (5, 7, 3), (17, 33, 9), (64, 70, 130)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let a = uniform(&mut r, m * k);
                let bv = uniform(&mut r, k * n);
                let a_shape = if ta { [k, m] } else { [m, k] };
                let b_shape = if tb { [n, k] } else { [k, n] };
                let c = b
                    .matmul(
                        &tensor(&b, &a, &a_shape),
                        &tensor(&b, &bv, &b_shape),
                        ta,
                        tb,
                    )
                    .expect("matmul");
                assert_eq!(c.shape(), [m, n]);
                let want = reference_matmul(&a, &bv, m, k, n, ta, tb);
                assert_close(
                    &format!("matmul {m}×{k}×{n} ta={ta} tb={tb}"),
                    &host(&b, &c),
                    &want,
                    1e-5,
                );
            }
        }
    }
    let err = b
        .matmul(
            &b.zeros(&[2, 3]).expect("zeros"),
            &b.zeros(&[4, 2]).expect("zeros"),
            false,
            false,
        )
        .expect_err("inner dimensions differ");
    assert!(
        matches!(err, BackendError::ShapeMismatch { op: "matmul", .. }),
        "{err}"
    );
    let err = b
        .matmul(
            &b.zeros(&[2, 3, 1]).expect("zeros"),
            &b.zeros(&[3, 2]).expect("zeros"),
            false,
            false,
        )
        .expect_err("rank 3");
    assert!(
        matches!(err, BackendError::ShapeMismatch { op: "matmul", .. }),
        "{err}"
    );
}

#[test]
fn matmul_gradients_match_finite_differences() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(5);
    let (m, k, n) = (4, 6, 5);
    let a = uniform(&mut r, m * k);
    let bv = uniform(&mut r, k * n);
    let probe = uniform(&mut r, m * n);
    let loss = |a: &[f32], bv: &[f32]| {
        let c = b
            .matmul(
                &tensor(&b, a, &[m, k]),
                &tensor(&b, bv, &[k, n]),
                false,
                false,
            )
            .expect("matmul");
        dot(&host(&b, &c), &probe)
    };
    let rt = tensor(&b, &probe, &[m, n]);
    // dL/dA = R·Bᵀ and dL/dB = Aᵀ·R, computed with the transposing products themselves.
    let da = b
        .matmul(&rt, &tensor(&b, &bv, &[k, n]), false, true)
        .expect("matmul");
    let db = b
        .matmul(&tensor(&b, &a, &[m, k]), &rt, true, false)
        .expect("matmul");
    check_finite_differences("matmul dA", &a, &host(&b, &da), 1e-2, 2e-3, |v| {
        loss(v, &bv)
    });
    check_finite_differences("matmul dB", &bv, &host(&b, &db), 1e-2, 2e-3, |v| {
        loss(&a, v)
    });
}

#[test]
fn row_bias_and_its_gradient() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(6);
    let (n, m) = (7, 5);
    let x = uniform(&mut r, n * m);
    let bias = uniform(&mut r, m);
    let mut xt = tensor(&b, &x, &[n, m]);
    b.add_row_bias_(&mut xt, &tensor(&b, &bias, &[m]))
        .expect("add_row_bias_");
    let want: Vec<f64> = (0..n * m)
        .map(|i| f64::from(x[i]) + f64::from(bias[i % m]))
        .collect();
    assert_close("add_row_bias_", &host(&b, &xt), &want, 1e-6);
    let sums = b.sum_rows(&tensor(&b, &x, &[n, m])).expect("sum_rows");
    assert_eq!(sums.shape(), [m]);
    let want: Vec<f64> = (0..m)
        .map(|j| (0..n).map(|i| f64::from(x[i * m + j])).sum())
        .collect();
    assert_close("sum_rows", &host(&b, &sums), &want, 1e-6);
    let err = b
        .add_row_bias_(&mut xt, &b.zeros(&[m + 1]).expect("zeros"))
        .expect_err("bias too long");
    assert!(
        matches!(
            err,
            BackendError::ShapeMismatch {
                op: "add_row_bias_",
                ..
            }
        ),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------ batch norm

struct BnReference {
    y: Vec<f64>,
    mean: Vec<f64>,
    biased_var: Vec<f64>,
}

fn bn_reference(
    x: &[f32],
    n: usize,
    c: usize,
    plane: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> BnReference {
    let count = (n * plane) as f64;
    let idx = |i: usize, ch: usize, p: usize| (i * c + ch) * plane + p;
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for ch in 0..c {
        for i in 0..n {
            for p in 0..plane {
                mean[ch] += f64::from(x[idx(i, ch, p)]) / count;
            }
        }
        for i in 0..n {
            for p in 0..plane {
                var[ch] += (f64::from(x[idx(i, ch, p)]) - mean[ch]).powi(2) / count;
            }
        }
    }
    let mut y = vec![0.0; x.len()];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..plane {
                let xhat = (f64::from(x[idx(i, ch, p)]) - mean[ch]) / (var[ch] + eps).sqrt();
                y[idx(i, ch, p)] = xhat * f64::from(gamma[ch]) + f64::from(beta[ch]);
            }
        }
    }
    BnReference {
        y,
        mean,
        biased_var: var,
    }
}

#[test]
fn batch_norm_train_matches_pytorch_including_running_statistics() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(7);
    let (momentum, eps) = (0.1f32, 1e-5f32);
    for shape in [
        vec![3, 4, 5, 7],
        vec![1, 2, 3, 3],
        vec![6, 5],
        vec![2, 3, 1, 1],
    ] {
        let (n, c) = (shape[0], shape[1]);
        let plane: usize = shape[2..].iter().product();
        // An offset mean checks that the variance does not cancel away.
        let x: Vec<f32> = uniform(&mut r, shape.iter().product())
            .iter()
            .map(|v| 3.0 + v)
            .collect();
        let gamma = uniform(&mut r, c);
        let beta = uniform(&mut r, c);
        let rm0 = uniform(&mut r, c);
        let rv0: Vec<f32> = uniform(&mut r, c).iter().map(|v| 1.5 + v).collect();
        let mut rm = tensor(&b, &rm0, &[c]);
        let mut rv = tensor(&b, &rv0, &[c]);
        let (y, saved) = b
            .batch_norm_train(
                &tensor(&b, &x, &shape),
                &tensor(&b, &gamma, &[c]),
                &tensor(&b, &beta, &[c]),
                &mut rm,
                &mut rv,
                momentum,
                eps,
            )
            .expect("batch_norm_train");
        let want = bn_reference(&x, n, c, plane, &gamma, &beta, f64::from(eps));
        let what = format!("{shape:?}");
        assert_eq!(y.shape(), &shape[..]);
        assert_close(&format!("bn y {what}"), &host(&b, &y), &want.y, 1e-4);
        assert_close(
            &format!("bn mean {what}"),
            &host(&b, &saved.mean),
            &want.mean,
            1e-6,
        );
        let inv_std: Vec<f64> = want
            .biased_var
            .iter()
            .map(|v| 1.0 / (v + f64::from(eps)).sqrt())
            .collect();
        assert_close(
            &format!("bn inv_std {what}"),
            &host(&b, &saved.inv_std),
            &inv_std,
            1e-4,
        );
        let count = (n * plane) as f64;
        let m = f64::from(momentum);
        let rm_want: Vec<f64> = (0..c)
            .map(|i| (1.0 - m) * f64::from(rm0[i]) + m * want.mean[i])
            .collect();
        let rv_want: Vec<f64> = (0..c)
            .map(|i| (1.0 - m) * f64::from(rv0[i]) + m * want.biased_var[i] * count / (count - 1.0))
            .collect();
        assert_close(
            &format!("running mean {what}"),
            &host(&b, &rm),
            &rm_want,
            1e-5,
        );
        assert_close(
            &format!("running var {what}"),
            &host(&b, &rv),
            &rv_want,
            1e-5,
        );
    }
}

#[test]
fn batch_norm_relu_eval_equals_batch_norm_eval_then_relu_exactly() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(9);
    // A large one too, so that the rows are split between threads.
    for shape in [vec![3, 4, 5, 7], vec![5, 3], vec![8, 16, 32, 32]] {
        let c = shape[1];
        let x = tensor(&b, &uniform(&mut r, shape.iter().product()), &shape);
        let gamma = tensor(&b, &uniform(&mut r, c), &[c]);
        let beta = tensor(&b, &uniform(&mut r, c), &[c]);
        let rm = tensor(&b, &uniform(&mut r, c), &[c]);
        let rv: Vec<f32> = uniform(&mut r, c).iter().map(|v| 1.5 + v).collect();
        let rv = tensor(&b, &rv, &[c]);
        let normalised = b
            .batch_norm_eval(&x, &gamma, &beta, &rm, &rv, 1e-5)
            .expect("batch_norm_eval");
        let want = host(&b, &b.relu(&normalised).expect("relu"));
        let got = b
            .batch_norm_relu_eval(&x, &gamma, &beta, &rm, &rv, 1e-5)
            .expect("batch_norm_relu_eval");
        assert_eq!(got.shape(), x.shape(), "{shape:?}: shape");
        assert_eq!(host(&b, &got), want, "{shape:?}: values");
        assert!(want.contains(&0.0) && want.iter().any(|&v| v > 0.0));
    }
}

#[test]
fn batch_norm_eval_uses_the_running_statistics() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(8);
    for shape in [vec![3, 4, 5, 7], vec![5, 3]] {
        let c = shape[1];
        let plane: usize = shape[2..].iter().product();
        let x = uniform(&mut r, shape.iter().product());
        let gamma = uniform(&mut r, c);
        let beta = uniform(&mut r, c);
        let rm = uniform(&mut r, c);
        let rv: Vec<f32> = uniform(&mut r, c).iter().map(|v| 1.5 + v).collect();
        let eps = 1e-5f32;
        let y = b
            .batch_norm_eval(
                &tensor(&b, &x, &shape),
                &tensor(&b, &gamma, &[c]),
                &tensor(&b, &beta, &[c]),
                &tensor(&b, &rm, &[c]),
                &tensor(&b, &rv, &[c]),
                eps,
            )
            .expect("batch_norm_eval");
        let want: Vec<f64> = (0..x.len())
            .map(|i| {
                let ch = (i / plane) % c;
                (f64::from(x[i]) - f64::from(rm[ch])) / (f64::from(rv[ch]) + f64::from(eps)).sqrt()
                    * f64::from(gamma[ch])
                    + f64::from(beta[ch])
            })
            .collect();
        assert_close(&format!("bn eval {shape:?}"), &host(&b, &y), &want, 1e-5);
    }
}

fn bn_backward_reference(
    x: &[f32],
    dy: &[f32],
    n: usize,
    c: usize,
    plane: usize,
    gamma: &[f32],
    eps: f64,
) -> [Vec<f64>; 3] {
    let reference = bn_reference(x, n, c, plane, gamma, &vec![0.0; c], eps);
    let count = (n * plane) as f64;
    let idx = |i: usize, ch: usize, p: usize| (i * c + ch) * plane + p;
    let mut dx = vec![0.0; x.len()];
    let mut dgamma = vec![0.0; c];
    let mut dbeta = vec![0.0; c];
    for ch in 0..c {
        let inv_std = 1.0 / (reference.biased_var[ch] + eps).sqrt();
        let xhat = |i, p| (f64::from(x[idx(i, ch, p)]) - reference.mean[ch]) * inv_std;
        for i in 0..n {
            for p in 0..plane {
                dbeta[ch] += f64::from(dy[idx(i, ch, p)]);
                dgamma[ch] += f64::from(dy[idx(i, ch, p)]) * xhat(i, p);
            }
        }
        for i in 0..n {
            for p in 0..plane {
                let d = f64::from(dy[idx(i, ch, p)]);
                dx[idx(i, ch, p)] = f64::from(gamma[ch]) * inv_std / count
                    * (count * d - dbeta[ch] - xhat(i, p) * dgamma[ch]);
            }
        }
    }
    [dx, dgamma, dbeta]
}

#[test]
fn batch_norm_backward_matches_reference_and_finite_differences() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(9);
    let eps = 1e-5f32;
    for shape in [vec![3, 4, 5, 7], vec![2, 3, 2, 3], vec![6, 4]] {
        let (n, c) = (shape[0], shape[1]);
        let plane: usize = shape[2..].iter().product();
        let x = uniform(&mut r, shape.iter().product());
        let gamma = uniform(&mut r, c);
        let beta = uniform(&mut r, c);
        let probe = uniform(&mut r, x.len());
        let forward = |x: &[f32], gamma: &[f32], beta: &[f32]| {
            let mut rm = b.zeros(&[c]).expect("zeros");
            let mut rv = b.zeros(&[c]).expect("zeros");
            b.batch_norm_train(
                &tensor(&b, x, &shape),
                &tensor(&b, gamma, &[c]),
                &tensor(&b, beta, &[c]),
                &mut rm,
                &mut rv,
                0.1,
                eps,
            )
            .expect("batch_norm_train")
        };
        let (_, saved) = forward(&x, &gamma, &beta);
        let grads = b
            .batch_norm_backward(
                &tensor(&b, &x, &shape),
                &tensor(&b, &gamma, &[c]),
                &saved,
                &tensor(&b, &probe, &shape),
            )
            .expect("batch_norm_backward");
        let [dx, dgamma, dbeta] =
            bn_backward_reference(&x, &probe, n, c, plane, &gamma, f64::from(eps));
        let what = format!("{shape:?}");
        assert_close(&format!("bn dx {what}"), &host(&b, &grads.input), &dx, 1e-4);
        assert_close(
            &format!("bn dgamma {what}"),
            &host(&b, &grads.gamma),
            &dgamma,
            1e-5,
        );
        assert_close(
            &format!("bn dbeta {what}"),
            &host(&b, &grads.beta),
            &dbeta,
            1e-5,
        );

        let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| {
            dot(&host(&b, &forward(x, gamma, beta).0), &probe)
        };
        let (gx, gg, gb) = (
            host(&b, &grads.input),
            host(&b, &grads.gamma),
            host(&b, &grads.beta),
        );
        check_finite_differences(&format!("bn dx {what}"), &x, &gx, 1e-2, 2e-2, |v| {
            loss(v, &gamma, &beta)
        });
        check_finite_differences(&format!("bn dgamma {what}"), &gamma, &gg, 1e-2, 2e-3, |v| {
            loss(&x, v, &beta)
        });
        check_finite_differences(&format!("bn dbeta {what}"), &beta, &gb, 1e-2, 2e-3, |v| {
            loss(&x, &gamma, v)
        });
    }
}

#[test]
fn batch_norm_relu_is_batch_norm_then_relu_bit_for_bit() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(16);
    for shape in [[5usize, 6, 7, 9], [3, 4, 1, 33]] {
        let channels = shape[1];
        let n: usize = shape.iter().product();
        let x = tensor(&b, &uniform(&mut r, n), &shape);
        let gamma = tensor(&b, &uniform(&mut r, channels), &[channels]);
        // Shifts of both signs, so that the ReLU keeps part of every channel.
        let beta = tensor(&b, &uniform(&mut r, channels), &[channels]);
        let statistics = |b: &CpuBackend| {
            (
                b.zeros(&[channels]).expect("zeros"),
                tensor(b, &vec![1.0; channels], &[channels]),
            )
        };
        let (mut rm, mut rv) = statistics(&b);
        let (y, saved) = b
            .batch_norm_train(&x, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5)
            .expect("batch_norm_train");
        let z = b.relu(&y).expect("relu");
        let (mut fused_rm, mut fused_rv) = statistics(&b);
        let (fused_z, fused_saved) = b
            .batch_norm_relu_train(&x, &gamma, &beta, &mut fused_rm, &mut fused_rv, 0.1, 1e-5)
            .expect("batch_norm_relu_train");
        let bits = |t: &CpuTensor| {
            host(&b, t)
                .into_iter()
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&fused_z), bits(&z), "{shape:?}: output");
        let zeros = host(&b, &z).iter().filter(|&&v| v == 0.0).count();
        assert!(
            zeros > n / 10 && zeros < n - n / 10,
            "{shape:?}: {zeros} of {n} cut"
        );
        for (fused, separate) in [
            (&fused_rm, &rm),
            (&fused_rv, &rv),
            (&fused_saved.mean, &saved.mean),
            (&fused_saved.inv_std, &saved.inv_std),
        ] {
            assert_eq!(bits(fused), bits(separate), "{shape:?}: statistics");
        }

        let dz = tensor(&b, &uniform(&mut r, n), &shape);
        let dy = b.relu_backward(&y, &dz).expect("relu_backward");
        let separate = b
            .batch_norm_backward(&x, &gamma, &saved, &dy)
            .expect("batch_norm_backward");
        let fused = b
            .batch_norm_relu_backward(&x, &gamma, &beta, &saved, &dz)
            .expect("batch_norm_relu_backward");
        assert_eq!(bits(&fused.input), bits(&separate.input), "{shape:?}: dx");
        assert_eq!(bits(&fused.gamma), bits(&separate.gamma), "{shape:?}: dγ");
        assert_eq!(bits(&fused.beta), bits(&separate.beta), "{shape:?}: dβ");
        // Without the mask the gradients differ: the test sees the ReLU.
        let unmasked = b
            .batch_norm_backward(&x, &gamma, &saved, &dz)
            .expect("batch_norm_backward");
        assert_ne!(bits(&unmasked.beta), bits(&fused.beta), "{shape:?}");
    }
    let x = tensor(&b, &[0.0; 8], &[2, 4]);
    let ok = tensor(&b, &[1.0; 4], &[4]);
    let wrong = tensor(&b, &[1.0; 3], &[3]);
    let saved = BatchNormSaved {
        mean: ok.clone(),
        inv_std: ok.clone(),
    };
    match b.batch_norm_relu_backward(&x, &ok, &wrong, &saved, &x) {
        Err(BackendError::ShapeMismatch { op, .. }) => assert_eq!(op, "batch_norm_relu_backward"),
        other => panic!("a shift of the wrong size: {other:?}"),
    }
}

#[test]
fn batch_norm_rejects_bad_shapes() {
    let b = CpuBackend::with_threads(1);
    let x = b.zeros(&[2, 3, 4, 4]).expect("zeros");
    let ok = b.zeros(&[3]).expect("zeros");
    let wrong = b.zeros(&[4]).expect("zeros");
    let mut rm = b.zeros(&[3]).expect("zeros");
    let mut rv = b.zeros(&[3]).expect("zeros");
    let err = b
        .batch_norm_train(&x, &wrong, &ok, &mut rm, &mut rv, 0.1, 1e-5)
        .expect_err("gamma of the wrong length");
    assert!(
        matches!(
            err,
            BackendError::ShapeMismatch {
                op: "batch_norm_train",
                ..
            }
        ),
        "{err}"
    );
    let err = b
        .batch_norm_eval(
            &b.zeros(&[2, 3, 4]).expect("zeros"),
            &ok,
            &ok,
            &rm,
            &rv,
            1e-5,
        )
        .expect_err("rank 3");
    assert!(
        matches!(
            err,
            BackendError::ShapeMismatch {
                op: "batch_norm_eval",
                ..
            }
        ),
        "{err}"
    );
    let single = b.zeros(&[1, 3, 1, 1]).expect("zeros");
    let err = b
        .batch_norm_train(&single, &ok, &ok, &mut rm, &mut rv, 0.1, 1e-5)
        .expect_err("one value per channel");
    assert!(
        matches!(
            err,
            BackendError::InvalidArgument {
                op: "batch_norm_train",
                ..
            }
        ),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------ pooling

/// Max pooling written from its definition: every window position in padded coordinates, the padding
/// treated as −∞ (it never wins), ties to the first maximum in row-major order.
fn reference_max_pool(
    x: &[f32],
    shape: [usize; 4],
    (k, s, p): (usize, usize, usize),
    dy: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let [n, c, h, w] = shape;
    let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let mut y = Vec::new();
    let mut dx = vec![0.0; x.len()];
    let mut o = 0;
    for plane in 0..n * c {
        for oh in 0..ho {
            for ow in 0..wo {
                let mut best: Option<usize> = None;
                for kh in 0..k {
                    for kw in 0..k {
                        let (ph, pw) = (oh * s + kh, ow * s + kw);
                        if ph < p || pw < p || ph - p >= h || pw - p >= w {
                            continue;
                        }
                        let i = plane * h * w + (ph - p) * w + pw - p;
                        if best.is_none_or(|b| x[i] > x[b]) {
                            best = Some(i);
                        }
                    }
                }
                let best = best.expect("every window holds an input");
                y.push(f64::from(x[best]));
                dx[best] += f64::from(dy[o]);
                o += 1;
            }
        }
    }
    (y, dx)
}

#[test]
fn max_pool_matches_reference_and_sends_gradient_to_the_first_maximum() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(10);
    // The last cases are ResNet's stem pooling (3, 2, 1) on odd and even planes, and a padded stride 1.
    for (shape, k, s, p) in [
        ([2, 3, 5, 7], 2, 2, 0),
        ([1, 2, 6, 6], 3, 2, 0),
        ([3, 1, 5, 5], 3, 1, 0),
        ([2, 2, 4, 4], 2, 2, 0),
        ([2, 3, 7, 6], 3, 2, 1),
        ([1, 2, 8, 8], 3, 2, 1),
        ([1, 2, 5, 4], 3, 1, 1),
        ([1, 1, 3, 3], 4, 2, 2),
    ] {
        // Few distinct values make ties frequent, so the first-maximum rule is exercised.
        let x: Vec<f32> = (0..shape.iter().product())
            .map(|_| r.random_range(0..3) as f32)
            .collect();
        let (ho, wo) = (
            (shape[2] + 2 * p - k) / s + 1,
            (shape[3] + 2 * p - k) / s + 1,
        );
        let y_shape = [shape[0], shape[1], ho, wo];
        let dy = uniform(&mut r, y_shape.iter().product());
        let (y_want, dx_want) = reference_max_pool(&x, shape, (k, s, p), &dy);
        let xt = tensor(&b, &x, &shape);
        let y = b.max_pool2d(&xt, k, s, p).expect("max_pool2d");
        assert_eq!(y.shape(), y_shape, "k {k} s {s} p {p}");
        assert_close(&format!("max pool {shape:?}"), &host(&b, &y), &y_want, 0.0);
        let dx = b
            .max_pool2d_backward(&xt, &tensor(&b, &dy, &y_shape), k, s, p)
            .expect("max_pool2d_backward");
        assert_close(
            &format!("max pool dx {shape:?}"),
            &host(&b, &dx),
            &dx_want,
            1e-6,
        );
    }
}

#[test]
fn pooling_gradients_match_finite_differences() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(11);
    let shape = [2, 2, 6, 5];
    let n: usize = shape.iter().product();
    // Distinct values at least 0.05 apart: a step of 1e-3 never changes which element is the maximum.
    let mut x: Vec<f32> = (0..n).map(|i| i as f32 * 0.05).collect();
    for i in (1..n).rev() {
        x.swap(i, r.random_range(0..=i));
    }
    let k = 2;
    let y_shape = [2, 2, 3, 2];
    let probe = uniform(&mut r, y_shape.iter().product());
    let dy = tensor(&b, &probe, &y_shape);

    let dx = b
        .max_pool2d_backward(&tensor(&b, &x, &shape), &dy, k, k, 0)
        .expect("max_pool2d_backward");
    check_finite_differences("max pool", &x, &host(&b, &dx), 1e-3, 1e-2, |v| {
        dot(
            &host(
                &b,
                &b.max_pool2d(&tensor(&b, v, &shape), k, k, 0)
                    .expect("max_pool2d"),
            ),
            &probe,
        )
    });

    let y = b
        .avg_pool2d(&tensor(&b, &x, &shape), k)
        .expect("avg_pool2d");
    assert_eq!(y.shape(), y_shape);
    let want: Vec<f64> = (0..y_shape.iter().product())
        .map(|o| {
            let (plane, oh, ow) = (o / 6, (o % 6) / 2, o % 2);
            let mut sum = 0.0;
            for kh in 0..k {
                for kw in 0..k {
                    sum += f64::from(x[plane * 30 + (oh * k + kh) * 5 + ow * k + kw]);
                }
            }
            sum / 4.0
        })
        .collect();
    assert_close("avg pool", &host(&b, &y), &want, 1e-6);
    let dx = b
        .avg_pool2d_backward(&dy, k, &shape)
        .expect("avg_pool2d_backward");
    assert_eq!(dx.shape(), shape);
    check_finite_differences("avg pool", &x, &host(&b, &dx), 1e-2, 1e-3, |v| {
        dot(
            &host(
                &b,
                &b.avg_pool2d(&tensor(&b, v, &shape), k).expect("avg_pool2d"),
            ),
            &probe,
        )
    });

    // The global average pooling of the residual networks: 8×8 down to 1×1.
    let x = uniform(&mut r, 3 * 4 * 64);
    let y = b
        .avg_pool2d(&tensor(&b, &x, &[3, 4, 8, 8]), 8)
        .expect("avg_pool2d");
    let want: Vec<f64> = x
        .chunks(64)
        .map(|p| p.iter().map(|&v| f64::from(v)).sum::<f64>() / 64.0)
        .collect();
    assert_close("global avg pool", &host(&b, &y), &want, 1e-6);
}

#[test]
fn pooling_rejects_bad_arguments() {
    let b = CpuBackend::with_threads(1);
    let x = b.zeros(&[1, 2, 4, 4]).expect("zeros");
    assert!(matches!(
        b.max_pool2d(&x, 5, 1, 0),
        Err(BackendError::InvalidArgument {
            op: "max_pool2d",
            ..
        })
    ));
    // A padding of more than half the window would make windows of padding alone.
    assert!(matches!(
        b.max_pool2d(&x, 3, 1, 2),
        Err(BackendError::InvalidArgument {
            op: "max_pool2d",
            ..
        })
    ));
    assert!(matches!(
        b.max_pool2d(&x, 2, 0, 0),
        Err(BackendError::InvalidArgument {
            op: "max_pool2d",
            ..
        })
    ));
    let wrong = b.zeros(&[1, 2, 3, 3]).expect("zeros");
    assert!(matches!(
        b.max_pool2d_backward(&x, &wrong, 2, 2, 0),
        Err(BackendError::ShapeMismatch {
            op: "max_pool2d_backward",
            ..
        })
    ));
    assert!(matches!(
        b.avg_pool2d_backward(&wrong, 2, &[1, 2, 4, 4]),
        Err(BackendError::ShapeMismatch {
            op: "avg_pool2d_backward",
            ..
        })
    ));
    assert!(matches!(
        b.avg_pool2d(&b.zeros(&[2, 4, 4]).expect("zeros"), 2),
        Err(BackendError::ShapeMismatch {
            op: "avg_pool2d",
            ..
        })
    ));
}

// ------------------------------------------------------------------------------------------ loss, softmax, relu

fn reference_softmax(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .map(|&v| f64::from(v))
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|&v| (f64::from(v) - max).exp()).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|v| v / total).collect()
}

#[test]
fn softmax_cross_entropy_matches_reference_and_finite_differences() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(12);
    let (n, classes) = (5, 10);
    let logits: Vec<f32> = uniform(&mut r, n * classes)
        .iter()
        .map(|v| 4.0 * v)
        .collect();
    let labels: Vec<u32> = (0..n).map(|_| r.random_range(0..classes as u32)).collect();
    let out = b
        .softmax_cross_entropy(&tensor(&b, &logits, &[n, classes]), &labels)
        .expect("softmax_cross_entropy");
    assert_eq!(out.loss.shape(), [1]);
    let mut loss = 0.0;
    let mut grad = Vec::new();
    for (row, &label) in logits.chunks(classes).zip(&labels) {
        let p = reference_softmax(row);
        loss -= p[label as usize].ln() / n as f64;
        grad.extend(
            p.iter()
                .enumerate()
                .map(|(j, &pj)| (pj - f64::from(u8::from(j == label as usize))) / n as f64),
        );
    }
    assert_close("cross-entropy loss", &host(&b, &out.loss), &[loss], 1e-6);
    assert_close("cross-entropy grad", &host(&b, &out.grad), &grad, 1e-6);
    check_finite_differences(
        "cross-entropy",
        &logits,
        &host(&b, &out.grad),
        1e-2,
        5e-3,
        |v| {
            let out = b
                .softmax_cross_entropy(&tensor(&b, v, &[n, classes]), &labels)
                .expect("cross-entropy");
            f64::from(host(&b, &out.loss)[0])
        },
    );

    // Huge logits must not overflow.
    let big = b
        .softmax_cross_entropy(&tensor(&b, &[1000.0, 0.0, -1000.0], &[1, 3]), &[1])
        .expect("softmax_cross_entropy");
    assert_close("stable loss", &host(&b, &big.loss), &[1000.0], 1e-6);

    let probs = b
        .softmax(&tensor(&b, &logits, &[n, classes]))
        .expect("softmax");
    let want: Vec<f64> = logits.chunks(classes).flat_map(reference_softmax).collect();
    assert_close("softmax", &host(&b, &probs), &want, 1e-6);
}

#[test]
fn cross_entropy_names_an_out_of_range_label_and_its_row() {
    let b = CpuBackend::with_threads(1);
    let logits = b.zeros(&[3, 4]).expect("zeros");
    let err = b
        .softmax_cross_entropy(&logits, &[0, 3, 7])
        .expect_err("label 7 of 4 classes");
    match err {
        BackendError::InvalidArgument { op, message } => {
            assert_eq!(op, "softmax_cross_entropy");
            assert!(
                message.contains("label 7") && message.contains("row 2"),
                "{message}"
            );
        }
        other => panic!("expected InvalidArgument, got {other}"),
    }
    assert!(
        b.softmax_cross_entropy(&logits, &[0, 1]).is_err(),
        "two labels for three rows"
    );
}

#[test]
fn relu_gradient_matches_finite_differences() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(13);
    // Values kept away from the kink at 0, where the derivative is undefined.
    let x: Vec<f32> = uniform(&mut r, 40)
        .iter()
        .map(|&v| if v.abs() < 0.1 { v + 0.3 } else { v })
        .collect();
    let probe = uniform(&mut r, 40);
    let y = b.relu(&tensor(&b, &x, &[4, 10])).expect("relu");
    assert_close(
        "relu",
        &host(&b, &y),
        &x.iter().map(|&v| f64::from(v.max(0.0))).collect::<Vec<_>>(),
        0.0,
    );
    let dx = b
        .relu_backward(&y, &tensor(&b, &probe, &[4, 10]))
        .expect("relu_backward");
    check_finite_differences("relu", &x, &host(&b, &dx), 1e-2, 1e-3, |v| {
        dot(
            &host(&b, &b.relu(&tensor(&b, v, &[4, 10])).expect("relu")),
            &probe,
        )
    });
}

#[test]
fn relu_in_place_equals_relu_small_large_and_strided() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(17);
    // Small (one thread), large (split over the threads), and a transposed view (not contiguous).
    for shape in [vec![4, 10], vec![4, 16, 32, 32]] {
        let x = tensor(&b, &uniform(&mut r, shape.iter().product()), &shape);
        let want = host(&b, &b.relu(&x).expect("relu"));
        let mut in_place = x.clone();
        b.relu_(&mut in_place).expect("relu_");
        assert_eq!(host(&b, &in_place), want, "{shape:?}");
        let mut transposed = x.clone().reversed_axes();
        b.relu_(&mut transposed).expect("relu_ of a view");
        let want_transposed = host(&b, &b.relu(&x.reversed_axes()).expect("relu"));
        assert_eq!(
            host(&b, &transposed),
            want_transposed,
            "{shape:?} transposed"
        );
    }
}

#[test]
fn large_elementwise_ops_match_their_definitions() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(16);
    // Large enough to run split over the threads.
    let shape = [4, 16, 32, 32];
    let n: usize = shape.iter().product();
    let x = uniform(&mut r, n);
    let y = uniform(&mut r, n);
    let (xt, yt) = (tensor(&b, &x, &shape), tensor(&b, &y, &shape));
    let relu = b.relu(&xt).expect("relu");
    let want: Vec<f64> = x.iter().map(|&v| f64::from(v.max(0.0))).collect();
    assert_close("relu", &host(&b, &relu), &want, 0.0);
    let back = b.relu_backward(&relu, &yt).expect("relu_backward");
    let want: Vec<f64> = x
        .iter()
        .zip(&y)
        .map(|(&x, &d)| if x > 0.0 { f64::from(d) } else { 0.0 })
        .collect();
    assert_close("relu_backward", &host(&b, &back), &want, 0.0);
    let sum = b.add(&xt, &yt).expect("add");
    let want: Vec<f64> = x.iter().zip(&y).map(|(&a, &c)| f64::from(a + c)).collect();
    assert_close("add", &host(&b, &sum), &want, 0.0);
    let product = b.mul(&xt, &yt).expect("mul");
    let want: Vec<f64> = x.iter().zip(&y).map(|(&a, &c)| f64::from(a * c)).collect();
    assert_close("mul", &host(&b, &product), &want, 0.0);
    let wrong = b.zeros(&[4, 16, 32, 31]).expect("zeros");
    assert!(matches!(
        b.add(&xt, &wrong),
        Err(BackendError::ShapeMismatch { op: "add", .. })
    ));
}

#[test]
fn scale_per_image_multiplies_each_image_by_its_own_scale() {
    let mut r = rng(17);
    // One shape split over the threads and one below the parallel threshold; images of odd length.
    for (threads, shape) in [
        (2, [6usize, 16, 32, 32]),
        (1, [3, 5, 7, 3]),
        (3, [5, 1, 1, 1]),
    ] {
        let b = CpuBackend::with_threads(threads);
        let n: usize = shape.iter().product();
        let per_image = n / shape[0];
        let x = uniform(&mut r, n);
        let scales = uniform(&mut r, shape[0]);
        let scaled = b
            .scale_per_image(&tensor(&b, &x, &shape), &tensor(&b, &scales, &[shape[0]]))
            .expect("scale_per_image");
        assert_eq!(scaled.shape(), shape);
        let want: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| f64::from(v * scales[i / per_image]))
            .collect();
        assert_close("scale_per_image", &host(&b, &scaled), &want, 0.0);
    }
    let b = CpuBackend::with_threads(1);
    let empty = b
        .scale_per_image(
            &b.zeros(&[0, 3]).expect("zeros"),
            &b.zeros(&[0]).expect("zeros"),
        )
        .expect("an empty batch");
    assert_eq!(empty.len(), 0);
    let x = b.zeros(&[4, 2, 2]).expect("zeros");
    for wrong in [vec![3], vec![4, 1], vec![]] {
        let scales = b.zeros(&wrong).expect("zeros");
        assert!(
            matches!(
                b.scale_per_image(&x, &scales),
                Err(BackendError::ShapeMismatch { op: "scale_per_image", ref got, .. }) if *got == wrong
            ),
            "scales of shape {wrong:?} for 4 images"
        );
    }
}

// ------------------------------------------------------------------------------------------ SGD

#[test]
fn sgd_step_follows_its_formula_with_and_without_nesterov() {
    let b = CpuBackend::with_threads(2);
    let mut r = rng(14);
    for nesterov in [false, true] {
        for dampening in [0.0f32, 0.3] {
            let step = SgdStep {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 5e-4,
                dampening: if nesterov { 0.0 } else { dampening },
                nesterov,
            };
            let p0 = uniform(&mut r, 33);
            let mut p = tensor(&b, &p0, &[3, 11]);
            let mut buf = b.zeros(&[3, 11]).expect("zeros");
            let mut want_p: Vec<f64> = p0.iter().map(|&v| f64::from(v)).collect();
            let mut want_buf = vec![0.0f64; 33];
            for t in 0..3 {
                let g = uniform(&mut r, 33);
                b.sgd_step_(&mut p, &tensor(&b, &g, &[3, 11]), &mut buf, &step)
                    .expect("sgd_step_");
                // The op: d = g + wd·p; buf = momentum·buf + (1 − dampening)·d. On a zero buffer without
                // dampening the first step is torch.optim.SGD's buf = d (swa-models' Sgd passes dampening 0
                // on a buffer's first step, as PyTorch applies none there).
                for i in 0..33 {
                    let d = f64::from(g[i]) + f64::from(step.weight_decay) * want_p[i];
                    want_buf[i] = if t == 0 && step.dampening == 0.0 {
                        d
                    } else {
                        f64::from(step.momentum) * want_buf[i]
                            + (1.0 - f64::from(step.dampening)) * d
                    };
                    let update = if nesterov {
                        d + f64::from(step.momentum) * want_buf[i]
                    } else {
                        want_buf[i]
                    };
                    want_p[i] -= f64::from(step.lr) * update;
                }
            }
            let what = format!("sgd nesterov={nesterov} dampening={}", step.dampening);
            assert_close(&what, &host(&b, &p), &want_p, 1e-5);
            assert_close(
                &format!("{what} momentum"),
                &host(&b, &buf),
                &want_buf,
                1e-5,
            );
        }
    }
}

// ------------------------------------------------------------------------------------------ determinism

/// Runs a small training-like sequence of ops and returns every output's bits.
fn op_sequence(b: &CpuBackend) -> Vec<u32> {
    let mut r = rng(15);
    let c = case([6, 8, 9, 9], 12, 3, 1, 1);
    let x = tensor(
        b,
        &uniform(&mut r, c.x_shape().iter().product()),
        &c.x_shape(),
    );
    let w = tensor(
        b,
        &uniform(&mut r, c.w_shape().iter().product()),
        &c.w_shape(),
    );
    let y = b.conv2d(&x, &w, None, c.spec()).expect("conv2d");
    let mut rm = b.zeros(&[12]).expect("zeros");
    let mut rv = b.zeros(&[12]).expect("zeros");
    let gamma = tensor(b, &uniform(&mut r, 12), &[12]);
    let beta = tensor(b, &uniform(&mut r, 12), &[12]);
    let (z, saved) = b
        .batch_norm_train(&y, &gamma, &beta, &mut rm, &mut rv, 0.1, 1e-5)
        .expect("bn");
    let dz = tensor(b, &uniform(&mut r, z.len()), z.shape());
    let bn = b
        .batch_norm_backward(&y, &gamma, &saved, &dz)
        .expect("bn backward");
    let grads = b
        .conv2d_backward(&x, &w, &bn.input, c.spec(), true, true)
        .expect("conv backward");
    let big_a = tensor(b, &uniform(&mut r, 150 * 260), &[150, 260]);
    let big_b = tensor(b, &uniform(&mut r, 260 * 140), &[260, 140]);
    let prod = b.matmul(&big_a, &big_b, false, false).expect("matmul");
    [
        &y,
        &z,
        &rv,
        &bn.input,
        &grads.input.expect("input gradient"),
        &grads.weight,
        &prod,
    ]
    .iter()
    .flat_map(|t| host(b, t))
    .map(f32::to_bits)
    .collect()
}

#[test]
fn results_are_bit_identical_for_a_fixed_thread_count() {
    let two = CpuBackend::with_threads(2);
    assert_eq!(
        op_sequence(&two),
        op_sequence(&two),
        "two runs on one backend"
    );
    assert_eq!(
        op_sequence(&two),
        op_sequence(&CpuBackend::with_threads(2)),
        "two 2-thread backends"
    );
    let one = op_sequence(&CpuBackend::with_threads(1));
    assert_eq!(
        one,
        op_sequence(&CpuBackend::with_threads(1)),
        "two 1-thread backends"
    );
}

// ------------------------------------------------------------------------------------ axis slices

/// The flat index of `[o, c, k]` in a tensor seen as `[outer, extent, inner]`.
fn flat(o: usize, c: usize, k: usize, extent: usize, inner: usize) -> usize {
    (o * extent + c) * inner + k
}

#[test]
fn narrow_copies_the_slice_along_any_axis() {
    let b = CpuBackend::with_threads(1);
    let shape = [2, 5, 3, 2];
    let values: Vec<f32> = (0..60).map(|v| v as f32).collect();
    let x = tensor(&b, &values, &shape);
    for (axis, start, len) in [
        (0, 1, 1),
        (1, 1, 3),
        (1, 0, 5),
        (2, 2, 1),
        (3, 0, 2),
        (1, 4, 0),
    ] {
        let got = b.narrow(&x, axis, start, len).unwrap();
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let mut want_shape = shape.to_vec();
        want_shape[axis] = len;
        assert_eq!(got.shape(), want_shape.as_slice(), "axis {axis}");
        let mut want = Vec::new();
        for o in 0..outer {
            for c in start..start + len {
                for k in 0..inner {
                    want.push(values[flat(o, c, k, shape[axis], inner)]);
                }
            }
        }
        assert_eq!(host(&b, &got), want, "axis {axis}, {start}..+{len}");
    }
    // A one-dimensional tensor: the channel slice of a BatchNorm parameter.
    let gamma = tensor(&b, &[1.0, 2.0, 3.0, 4.0], &[4]);
    assert_eq!(host(&b, &b.narrow(&gamma, 0, 1, 2).unwrap()), [2.0, 3.0]);
}

#[test]
fn narrow_writes_replace_or_add_to_the_slice_only() {
    let b = CpuBackend::with_threads(1);
    let mut r = rng(41);
    let dst_values = uniform(&mut r, 2 * 6 * 3);
    let src_values = uniform(&mut r, 2 * 2 * 3);
    let src = tensor(&b, &src_values, &[2, 2, 3]);
    for accumulate in [false, true] {
        let mut dst = tensor(&b, &dst_values, &[2, 6, 3]);
        if accumulate {
            b.narrow_add_(&mut dst, 1, 3, &src).unwrap();
        } else {
            b.narrow_assign_(&mut dst, 1, 3, &src).unwrap();
        }
        let mut want: Vec<f64> = dst_values.iter().map(|&v| f64::from(v)).collect();
        for o in 0..2 {
            for c in 0..2 {
                for k in 0..3 {
                    let d = flat(o, 3 + c, k, 6, 3);
                    let s = f64::from(src_values[flat(o, c, k, 2, 3)]);
                    want[d] = if accumulate { want[d] + s } else { s };
                }
            }
        }
        assert_close("narrow write", &host(&b, &dst), &want, 1e-7);
    }
}

#[test]
fn narrow_rejects_slices_outside_the_tensor() {
    let b = CpuBackend::with_threads(1);
    let x = b.zeros(&[2, 4, 3]).unwrap();
    for (axis, start, len) in [(3, 0, 1), (1, 3, 2), (1, 5, 0), (0, usize::MAX, 2)] {
        assert!(
            matches!(
                b.narrow(&x, axis, start, len),
                Err(BackendError::InvalidArgument { op: "narrow", .. })
            ),
            "axis {axis}, {start}..+{len}"
        );
    }
    let mut dst = b.zeros(&[2, 4, 3]).unwrap();
    // Another extent on an axis other than the sliced one, another rank, a slice past the end.
    for (src_shape, start) in [(&[2, 2, 2][..], 0), (&[2, 2][..], 0), (&[2, 2, 3][..], 3)] {
        let src = b.zeros(src_shape).unwrap();
        assert!(
            b.narrow_assign_(&mut dst, 1, start, &src).is_err(),
            "{src_shape:?} at {start}"
        );
        assert!(b.narrow_add_(&mut dst, 1, start, &src).is_err());
    }
}

#[test]
fn lerp_many_over_many_tensors_equals_lerp_tensor_by_tensor() {
    let mut r = rng(18);
    // Sizes from a BatchNorm's few values to more than one piece, together well above the threshold
    // where the pass uses the threads; and a set too small for that, which takes the other path.
    for sizes in [vec![16usize, 40_000, 3, 70_001, 512, 9], vec![5, 7, 100]] {
        for threads in [1, 2, 3] {
            let b = CpuBackend::with_threads(threads);
            let weight = 0.37;
            let dst: Vec<Vec<f32>> = sizes.iter().map(|&n| uniform(&mut r, n)).collect();
            let src: Vec<Vec<f32>> = sizes.iter().map(|&n| uniform(&mut r, n)).collect();
            let mut fused: Vec<CpuTensor> = dst.iter().map(|d| tensor(&b, d, &[d.len()])).collect();
            let srcs: Vec<CpuTensor> = src.iter().map(|s| tensor(&b, s, &[s.len()])).collect();
            let mut dsts: Vec<&mut CpuTensor> = fused.iter_mut().collect();
            let src_refs: Vec<&CpuTensor> = srcs.iter().collect();
            b.lerp_many_(&mut dsts, &src_refs, weight)
                .expect("lerp_many_");
            for ((got, d), s) in fused.iter().zip(&dst).zip(&src) {
                let mut one = tensor(&b, d, &[d.len()]);
                b.lerp_(&mut one, &tensor(&b, s, &[s.len()]), weight)
                    .expect("lerp_");
                assert_eq!(
                    host(&b, got),
                    host(&b, &one),
                    "{sizes:?}, {threads} threads"
                );
                let want: Vec<f32> = d
                    .iter()
                    .zip(s)
                    .map(|(&d, &s)| d + weight * (s - d))
                    .collect();
                assert_eq!(host(&b, got), want, "{sizes:?}, {threads} threads");
            }
        }
    }
    let b = CpuBackend::with_threads(2);
    let mut a = b.zeros(&[40_000]).expect("zeros");
    let wrong = b.zeros(&[39_999]).expect("zeros");
    let mut dsts = vec![&mut a];
    assert!(matches!(
        b.lerp_many_(&mut dsts, &[&wrong], 0.5),
        Err(BackendError::ShapeMismatch {
            op: "lerp_many_",
            ..
        })
    ));
    assert!(matches!(
        b.lerp_many_(&mut dsts, &[], 0.5),
        Err(BackendError::InvalidArgument {
            op: "lerp_many_",
            ..
        })
    ));
}
