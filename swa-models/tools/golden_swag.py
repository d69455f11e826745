"""Fixture of the SWAG golden test: the paper's formulas computed in float64 with NumPy, and PyTorch's own
BatchNorm recomputation and predictions, on a small PyramidNet from xtask/torch/cifar_networks.py.

Called by make_golden.py (family `swag`). Writes golden_swag_<net>.safetensors with:
  snapshot<i>.<key>      SNAPSHOTS state_dicts of one network, a random walk of its parameters from a
                         seeded initialisation (BatchNorm randomised), standing in for an SGD trajectory;
  mean.<p>, sq_mean.<p>  the first and second moments of the parameters over all snapshots (float64,
                         rounded once to float32);
  deviations.<p>         [MAX_RANK, numel]: D_i = theta_i - mean_i for the last MAX_RANK snapshots, oldest
                         first, mean_i being the mean of snapshots 0..=i (the authors' collect_model);
  z1.<s>.<p>, z2.<s>     standard normal noise of sample s (float32, from NumPy): z1 over every parameter
                         element, z2 over the deviation columns;
  sample_low_rank.<p>    theta_bar + sqrt(scale) * (sigma * z1/sqrt(2) + D z2 / sqrt(2 (K - 1))) for sample 0
                         at LOW_RANK_SCALE, sigma = sqrt(max(sq_mean - mean^2, 1e-30)) (the paper's identity);
  sample_diagonal.<p>    theta_bar + sqrt(scale) * sigma * z1 for sample 0 at DIAGONAL_SCALE;
  bn<j>.input            the batches BatchNorm is recomputed on, one size, so that torch's cumulative mean
                         equals swa-models' batch-size-weighted mean;
  test.input, test.labels  the test batch;
  bma.probabilities      [images, classes]: the mean over the SAMPLES low-rank samples (z1.<s>, z2.<s>) of the
                         softmax of the eval-mode logits, each sample loaded into the network,
                         BatchNorm reset and recomputed with torch.optim.swa_utils.update_bn on the bn batches;
                         the averaging over samples in float64;
  bma.member<s>.probabilities  each sample's softmax.
Parameters <p> are model.named_parameters(); BatchNorm statistics are not part of SWAG's moments.
"""
import os, sys

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..', 'xtask', 'torch'))
import cifar_networks as nets  # noqa: E402

NETWORK, CLASSES = 'pyramidnet8a3', 10
SNAPSHOTS = 5          # more than MAX_RANK, so that the ring of columns has wrapped
MAX_RANK = 3
SAMPLES = 3
LOW_RANK_SCALE = 1.0   # swa-models' scale multiplies the covariance: 1 is the paper's sampling identity
DIAGONAL_SCALE = 0.5
STEP = 0.02            # the random walk's step, relative to each tensor's RMS (floored)
BN_BATCHES, BATCH = 2, 8
VARIANCE_CLAMP = 1e-30


def write(out, randomise_batch_norm):
    torch.manual_seed(9000)
    model = nets.build(NETWORK, CLASSES)
    randomise_batch_norm(model, torch.Generator().manual_seed(9001))
    # Logits of a few units, so that the probabilities are not near uniform and differ between samples.
    model.fc.weight.data *= 8.0
    names = [n for n, _ in model.named_parameters()]
    rng = np.random.default_rng(9002)
    io = {}

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    thetas = []   # float64 parameter dicts, one per snapshot
    for i in range(SNAPSHOTS):
        if i > 0:
            for n in names:
                value = state[n].double().numpy()
                rms = max(float(np.sqrt((value ** 2).mean())), 0.05)
                step = STEP * rms * rng.standard_normal(value.shape)
                state[n] = torch.from_numpy((value + step).astype(np.float32))
        for k, v in state.items():
            io[f'snapshot{i}.{k}'] = v.clone().contiguous()
        thetas.append({n: state[n].double().numpy() for n in names})

    # The moments, by definition, and the deviation of each snapshot from the mean that includes it.
    mean = {n: np.mean([t[n] for t in thetas], axis=0) for n in names}
    sq_mean = {n: np.mean([t[n] ** 2 for t in thetas], axis=0) for n in names}
    deviations = {n: [] for n in names}
    for i in range(SNAPSHOTS - MAX_RANK, SNAPSHOTS):
        for n in names:
            running = np.mean([t[n] for t in thetas[:i + 1]], axis=0)
            deviations[n].append((thetas[i][n] - running).reshape(-1))
    sigma = {n: np.sqrt(np.maximum(sq_mean[n] - mean[n] ** 2, VARIANCE_CLAMP)) for n in names}
    for n in names:
        io[f'mean.{n}'] = torch.from_numpy(mean[n].astype(np.float32))
        io[f'sq_mean.{n}'] = torch.from_numpy(sq_mean[n].astype(np.float32))
        io[f'deviations.{n}'] = torch.from_numpy(np.stack(deviations[n]).astype(np.float32))

    def sample(z1, z2, scale, low_rank):
        """The paper's draw in float64 from the float32 noise."""
        drawn = {}
        for n in names:
            if low_rank:
                d = np.stack(deviations[n], axis=1)   # [numel, K]
                term = sigma[n] * z1[n] / np.sqrt(2.0) + \
                    (d @ z2).reshape(mean[n].shape) / np.sqrt(2.0 * (MAX_RANK - 1))
            else:
                term = sigma[n] * z1[n]
            drawn[n] = mean[n] + np.sqrt(scale) * term
        return drawn

    noise = []
    for s in range(SAMPLES):
        z1 = {n: rng.standard_normal(mean[n].shape).astype(np.float32) for n in names}
        z2 = rng.standard_normal(MAX_RANK).astype(np.float32)
        for n in names:
            io[f'z1.{s}.{n}'] = torch.from_numpy(z1[n])
        io[f'z2.{s}'] = torch.from_numpy(z2)
        noise.append(({n: z.astype(np.float64) for n, z in z1.items()}, z2.astype(np.float64)))
    for key, scale, low_rank in (('sample_low_rank', LOW_RANK_SCALE, True),
                                 ('sample_diagonal', DIAGONAL_SCALE, False)):
        for n, v in sample(*noise[0], scale, low_rank).items():
            io[f'{key}.{n}'] = torch.from_numpy(v.astype(np.float32))

    gen = torch.Generator().manual_seed(9003)
    bn_batches = [torch.randn(BATCH, 3, 32, 32, generator=gen) for _ in range(BN_BATCHES)]
    for j, x in enumerate(bn_batches):
        io[f'bn{j}.input'] = x
    test = torch.randn(BATCH, 3, 32, 32, generator=gen)
    io['test.input'] = test
    io['test.labels'] = torch.randint(0, CLASSES, (BATCH,), generator=gen)

    members = []
    for s in range(SAMPLES):
        drawn = sample(*noise[s], LOW_RANK_SCALE, True)
        weights = dict(state)
        for n in names:
            weights[n] = torch.from_numpy(drawn[n].astype(np.float32))
        model.load_state_dict(weights, strict=True)
        torch.optim.swa_utils.update_bn(bn_batches, model)
        model.eval()
        with torch.no_grad():
            probabilities = torch.softmax(model(test), dim=1)
        model.train()
        io[f'bma.member{s}.probabilities'] = probabilities
        members.append(probabilities.double())
    average = torch.stack(members).mean(0)
    io['bma.probabilities'] = average.float()
    spread = (torch.stack(members) - average).abs().max().item()
    print(f'swag {NETWORK}: {sum(m.size for m in mean.values())} parameters, {SNAPSHOTS} snapshots, '
          f'K = {MAX_RANK}, {SAMPLES} samples; largest difference of a member from the average {spread:.3f}')
    assert spread > 1e-2, 'the samples barely differ: the test would not see a wrong covariance'
    save_file({k: v.contiguous() for k, v in io.items()},
              os.path.join(out, f'golden_swag_{NETWORK}.safetensors'))
