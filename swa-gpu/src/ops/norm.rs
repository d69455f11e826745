//! Batch norm and per-channel sums.

use swa_core::backend::{
    BackendError, BackendResult, BatchNormGrads, BatchNormSaved, HasShape, NormOps,
};

use crate::backend::{u32_extent, GpuBackend};
use crate::context::{Dispatch, GpuTensor, Params};
use crate::kernels;
use crate::uniforms::BatchNormParams;

/// `[N, C, H, W]` or `[N, C]` as (batch, channels, pixels per channel).
fn layout(op: &'static str, x: &GpuTensor) -> BackendResult<(usize, usize, usize)> {
    match *x.dims() {
        [n, c, h, w] => Ok((n, c, h * w)),
        [n, c] => Ok((n, c, 1)),
        _ => Err(BackendError::ShapeMismatch {
            op,
            expected: "an input [N, C, H, W] or [N, C]".into(),
            got: x.dims().to_vec(),
        }),
    }
}

fn per_channel(op: &'static str, what: &str, t: &GpuTensor, c: usize) -> BackendResult<()> {
    if t.dims() == [c] {
        Ok(())
    } else {
        Err(BackendError::ShapeMismatch {
            op,
            expected: format!("{what} of shape [{c}]"),
            got: t.dims().to_vec(),
        })
    }
}

impl GpuBackend {
    fn bn_params(
        &self,
        op: &'static str,
        (n, c, hw): (usize, usize, usize),
        momentum: f32,
        eps: f32,
    ) -> BackendResult<Params> {
        Ok(Params::of(&BatchNormParams {
            batch: u32_extent(op, "batch", n)?,
            channels: u32_extent(op, "channels", c)?,
            hw: u32_extent(op, "pixels per channel", hw)?,
            momentum,
            eps,
            total: u32_extent(op, "element count", n * c * hw)?,
        }))
    }

    fn channel_groups(&self, op: &'static str, c: usize) -> BackendResult<[u32; 3]> {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension as usize;
        if c > max {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!(
                    "{c} channels exceed the adapter's {max} workgroups per dimension"
                ),
            });
        }
        Ok([c as u32, 1, 1])
    }

    /// `out = (x − centre[c])·scale[c] + shift[c]` from coefficients `[centre | scale | shift]`.
    fn bn_apply(
        &self,
        op: &'static str,
        x: &GpuTensor,
        coeff: &GpuTensor,
        dims: (usize, usize, usize),
    ) -> BackendResult<GpuTensor> {
        self.bn_apply_with(&kernels::BN_APPLY, op, x, coeff, dims)
    }

    /// [`GpuBackend::bn_apply`] with `kernel`, one of the `apply` entry points of `batchnorm.wgsl`.
    fn bn_apply_with(
        &self,
        kernel: &'static kernels::Kernel,
        op: &'static str,
        x: &GpuTensor,
        coeff: &GpuTensor,
        dims: (usize, usize, usize),
    ) -> BackendResult<GpuTensor> {
        let out = self.ctx.alloc(op, x.dims())?;
        let n = x.numel();
        if n > 0 {
            let params = self.bn_params(op, dims, 0.0, 0.0)?;
            self.ctx.encode(&[Dispatch::new(
                kernel,
                params,
                vec![x, coeff, &out],
                self.ctx.grid_1d(n),
            )])?;
        }
        Ok(out)
    }

    /// The `[centre C | scale C | shift C]` coefficients of an evaluation-mode batch norm of `x`, after
    /// checking that each per-channel tensor has one value per channel.
    #[allow(clippy::too_many_arguments)]
    fn bn_eval_coefficients(
        &self,
        op: &'static str,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        running_mean: &GpuTensor,
        running_var: &GpuTensor,
        eps: f32,
    ) -> BackendResult<GpuTensor> {
        let dims = layout(op, x)?;
        let c = dims.1;
        for (what, t) in [
            ("gamma", gamma),
            ("beta", beta),
            ("running mean", running_mean),
            ("running variance", running_var),
        ] {
            per_channel(op, what, t, c)?;
        }
        let coeff = self.ctx.alloc(op, &[3 * c])?;
        if c > 0 {
            let params = self.bn_params(op, dims, 0.0, eps)?;
            self.ctx.encode(&[Dispatch::new(
                &kernels::BN_EVAL_COEFF,
                params,
                vec![gamma, beta, running_mean, running_var, &coeff],
                [c.div_ceil(64) as u32, 1, 1],
            )])?;
        }
        Ok(coeff)
    }

    /// `out[c] = Σ dy[n, c, ·]`: a convolution's bias gradient.
    pub(crate) fn channel_sums(
        &self,
        op: &'static str,
        dy: &GpuTensor,
        n: usize,
        c: usize,
        hw: usize,
    ) -> BackendResult<GpuTensor> {
        let out = self.ctx.alloc(op, &[c])?;
        if c > 0 {
            let params = self.bn_params(op, (n, c, hw), 0.0, 0.0)?;
            self.ctx.encode(&[Dispatch::new(
                &kernels::CHANNEL_SUM,
                params,
                vec![dy, &out],
                self.channel_groups(op, c)?,
            )])?;
        }
        Ok(out)
    }
}

impl GpuBackend {
    #[allow(clippy::too_many_arguments)]
    fn bn_train(
        &self,
        op: &'static str,
        apply: &'static kernels::Kernel,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        running_mean: &mut GpuTensor,
        running_var: &mut GpuTensor,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(GpuTensor, BatchNormSaved<GpuTensor>)> {
        // The kernels write the running statistics through their bindings.
        let (running_mean, running_var) = (&*running_mean, &*running_var);
        let dims = layout(op, x)?;
        let (n, c, hw) = dims;
        for (what, t) in [
            ("gamma", gamma),
            ("beta", beta),
            ("running mean", running_mean),
            ("running variance", running_var),
        ] {
            per_channel(op, what, t, c)?;
        }
        if n * hw < 2 {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!(
                    "training needs more than one value per channel, got input {:?}",
                    x.dims()
                ),
            });
        }
        let mean = self.ctx.alloc(op, &[c])?;
        let inv_std = self.ctx.alloc(op, &[c])?;
        let coeff = self.ctx.alloc(op, &[3 * c])?;
        let params = self.bn_params(op, dims, momentum, eps)?;
        self.ctx.encode(&[Dispatch::new(
            &kernels::BN_STATS,
            params,
            vec![
                x,
                gamma,
                beta,
                &mean,
                &inv_std,
                running_mean,
                running_var,
                &coeff,
            ],
            self.channel_groups(op, c)?,
        )])?;
        let out = self.bn_apply_with(apply, op, x, &coeff, dims)?;
        Ok((out, BatchNormSaved { mean, inv_std }))
    }

    /// Batch norm's gradients from the gradient `dy` of its output, or with `relu_beta` from the gradient
    /// of `max(bn(x), 0)`, the ReLU's mask recomputed from `x` and the shift β.
    fn bn_backward(
        &self,
        op: &'static str,
        x: &GpuTensor,
        gamma: &GpuTensor,
        relu_beta: Option<&GpuTensor>,
        saved: &BatchNormSaved<GpuTensor>,
        dy: &GpuTensor,
    ) -> BackendResult<BatchNormGrads<GpuTensor>> {
        let dims = layout(op, x)?;
        let c = dims.1;
        per_channel(op, "gamma", gamma, c)?;
        if let Some(beta) = relu_beta {
            per_channel(op, "beta", beta, c)?;
        }
        per_channel(op, "saved mean", &saved.mean, c)?;
        per_channel(op, "saved inverse std", &saved.inv_std, c)?;
        if dy.dims() != x.dims() {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: format!("an output gradient of the input's shape {:?}", x.dims()),
                got: dy.dims().to_vec(),
            });
        }
        let dgamma = self.ctx.alloc(op, &[c])?;
        let dbeta = self.ctx.alloc(op, &[c])?;
        let dx = self.ctx.alloc(op, x.dims())?;
        if c > 0 {
            let params = self.bn_params(op, dims, 0.0, 0.0)?;
            let groups = self.channel_groups(op, c)?;
            let reduce = match relu_beta {
                None => Dispatch::new(
                    &kernels::BN_BACKWARD_REDUCE,
                    params.clone(),
                    vec![x, dy, &saved.mean, &saved.inv_std, &dgamma, &dbeta],
                    groups,
                ),
                Some(beta) => Dispatch::new(
                    &kernels::BN_BACKWARD_REDUCE_RELU,
                    params.clone(),
                    vec![
                        x,
                        dy,
                        gamma,
                        beta,
                        &saved.mean,
                        &saved.inv_std,
                        &dgamma,
                        &dbeta,
                    ],
                    groups,
                ),
            };
            let mut dispatches = vec![reduce];
            if x.numel() > 0 {
                let grid = self.ctx.grid_1d(x.numel());
                dispatches.push(match relu_beta {
                    None => Dispatch::new(
                        &kernels::BN_BACKWARD_APPLY,
                        params,
                        vec![
                            x,
                            dy,
                            gamma,
                            &saved.mean,
                            &saved.inv_std,
                            &dgamma,
                            &dbeta,
                            &dx,
                        ],
                        grid,
                    ),
                    Some(beta) => Dispatch::new(
                        &kernels::BN_BACKWARD_APPLY_RELU,
                        params,
                        vec![
                            x,
                            dy,
                            gamma,
                            beta,
                            &saved.mean,
                            &saved.inv_std,
                            &dgamma,
                            &dbeta,
                            &dx,
                        ],
                        grid,
                    ),
                });
            }
            self.ctx.encode(&dispatches)?;
        }
        Ok(BatchNormGrads {
            input: dx,
            gamma: dgamma,
            beta: dbeta,
        })
    }
}

impl NormOps<GpuTensor> for GpuBackend {
    fn batch_norm_train(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        running_mean: &mut GpuTensor,
        running_var: &mut GpuTensor,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(GpuTensor, BatchNormSaved<GpuTensor>)> {
        self.bn_train(
            "batch_norm_train",
            &kernels::BN_APPLY,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
        )
    }

    fn batch_norm_relu_train(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        running_mean: &mut GpuTensor,
        running_var: &mut GpuTensor,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(GpuTensor, BatchNormSaved<GpuTensor>)> {
        self.bn_train(
            "batch_norm_relu_train",
            &kernels::BN_APPLY_RELU,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
        )
    }

    fn batch_norm_eval(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        running_mean: &GpuTensor,
        running_var: &GpuTensor,
        eps: f32,
    ) -> BackendResult<GpuTensor> {
        let op = "batch_norm_eval";
        let coeff =
            self.bn_eval_coefficients(op, x, gamma, beta, running_mean, running_var, eps)?;
        self.bn_apply(op, x, &coeff, layout(op, x)?)
    }

    fn batch_norm_relu_eval(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        running_mean: &GpuTensor,
        running_var: &GpuTensor,
        eps: f32,
    ) -> BackendResult<GpuTensor> {
        let op = "batch_norm_relu_eval";
        let coeff =
            self.bn_eval_coefficients(op, x, gamma, beta, running_mean, running_var, eps)?;
        self.bn_apply_with(&kernels::BN_APPLY_RELU, op, x, &coeff, layout(op, x)?)
    }

    fn batch_norm_backward(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        saved: &BatchNormSaved<GpuTensor>,
        dy: &GpuTensor,
    ) -> BackendResult<BatchNormGrads<GpuTensor>> {
        self.bn_backward("batch_norm_backward", x, gamma, None, saved, dy)
    }

    fn batch_norm_relu_backward(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        saved: &BatchNormSaved<GpuTensor>,
        dz: &GpuTensor,
    ) -> BackendResult<BatchNormGrads<GpuTensor>> {
        self.bn_backward("batch_norm_relu_backward", x, gamma, Some(beta), saved, dz)
    }
}
