//! Training, averaging and BatchNorm recomputation on the CPU give what PyTorch's `torch.optim.SGD` and
//! `swa_utils` give on the same weights and batches (see `pytorch_training`).

mod pytorch_training;

use swa_core::CpuBackend;

#[test]
fn sgd_swa_and_update_bn_match_pytorch_on_cpu() {
    pytorch_training::check_against_pytorch(&CpuBackend::with_threads(2), "cpu");
}
