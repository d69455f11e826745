//! Training, averaging and BatchNorm recomputation on the GPU give what PyTorch's `torch.optim.SGD` and
//! `swa_utils` give on the same weights and batches: the check swa-models runs on the CPU, with its
//! fixtures, run here on the GPU backend.

#[path = "../../swa-models/tests/pytorch_training/mod.rs"]
mod pytorch_training;

use swa_gpu::testing::backend_or_skip;

#[test]
fn sgd_swa_and_update_bn_match_pytorch_on_gpu() {
    let Some(backend) = backend_or_skip() else {
        return;
    };
    pytorch_training::check_against_pytorch(&backend, "gpu");
}
