"""Fixtures of the Shake-Shake and PyramidNet golden tests, from xtask/torch/cifar_networks.py.

Called by make_golden.py (family `cifar`). Writes, for each reduced-depth network of GOLDEN:
  golden_<net>.safetensors, golden_<net>_io.safetensors   as make_golden.py's `golden` family: the state_dict
      (BatchNorm randomised, counters 7), an input batch, eval-mode logits, train-mode logits and the running
      statistics after that pass; Shake-Shake's training-mode coefficients are swa-models'
      shake_coefficients for seed 0 (reimplemented below), so the train-mode pass is reproducible;
  golden_<net>_grads.safetensors   labels, the mean cross-entropy of a second train-mode pass with the same
      coefficients, and the gradient of every parameter ("grad.<key>"), back-propagated through Shake-Shake's
      independent backward coefficients;
and cifar_networks_shapes.json: every state_dict key with its shape and dtype for 10 classes, and the
parameter count for 10 and 100 classes, of each network of cifar_networks.NAMED.
"""
import json, os, sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..', 'xtask', 'torch'))
import cifar_networks as nets  # noqa: E402

GOLDEN = {'shakeshake14-2x4d': 10, 'pyramidnet14a3': 10, 'pyramidnet20a8-bottleneck': 100}
BATCH = 4
MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def splitmix64_mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def splitmix64(state):
    return splitmix64_mix((state + GAMMA) & MASK)


def fold_words(first, words):
    state = first
    for word in words:
        state = splitmix64_mix(((state + GAMMA) & MASK) ^ word)
    return state


def shake_coefficients(seed, block_id, batch):
    """swa_models::layers::shake_coefficients: (alpha, beta), each [batch, 1, 1, 1]."""
    stream = splitmix64(seed ^ splitmix64(block_id))
    draw = lambda which: torch.tensor([(fold_words(stream, [which, n]) >> 40) / float(1 << 24)
                                       for n in range(batch)], dtype=torch.float32).reshape(batch, 1, 1, 1)
    return draw(0), draw(1)


def set_coefficients(model, seed):
    blocks = [m for m in model.modules() if isinstance(m, nets.ShakeBlock)]
    for block_id, block in enumerate(blocks):
        block.coefficients = lambda n, i=block_id: shake_coefficients(seed, i, n)


def write(out, randomise_batch_norm, write_forward_fixtures, write_gradient_fixture):
    for i, (name, classes) in enumerate(GOLDEN.items()):
        torch.manual_seed(7000 + i)
        model = nets.build(name, classes)
        gen = torch.Generator().manual_seed(7100 + i)
        randomise_batch_norm(model, gen)
        set_coefficients(model, 0)
        x = write_forward_fixtures(model, name, gen, out, BATCH)
        write_gradient_fixture(model, name, x, classes, gen, out)
    table = {}
    for name in nets.NAMED:
        model = nets.build(name, 10)
        table[name] = {
            'parameters': [nets.params(model), nets.params(nets.build(name, 100))],
            'state_dict': [[k, list(v.shape), str(v.dtype).replace('torch.', '')]
                           for k, v in model.state_dict().items()],
        }
    with open(os.path.join(out, 'cifar_networks_shapes.json'), 'w') as f:
        json.dump(table, f, separators=(',', ':'))
    print(f'shapes of {len(table)} networks written')
