//! The operations of the [`Backend`](swa_core::Backend) implementation, one family per module.

mod elementwise;
mod gemm;
mod loss;
mod narrow;
mod norm;
mod pool;
