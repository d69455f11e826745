"""Makes the fixtures of swa-models' golden and shape tests from the PyTorch reference networks.

    python swa-models/tools/make_golden.py [--torch-ref DIR] [--out DIR] [--only FAMILY]
    python swa-models/tools/make_golden.py --check-load CHECKPOINT NAME CLASSES

The first form writes, into swa-models/tests/fixtures/:
  golden_<net>.safetensors     the network's state_dict (fixed torch seed, BatchNorm parameters and running
                               statistics randomised so that BatchNorm is not the identity);
  golden_<net>_io.safetensors  a fixed input batch, the eval-mode logits, the train-mode logits (batch
                               statistics) and every BatchNorm running statistic after that train-mode pass
                               (keys "after_train.<key>");
  golden_<net>_formula_io.safetensors
                               for the paper's networks, too large to store (VGG-16 with and without BatchNorm,
                               PreResNet-164, WRN-16-4, WRN-28-10): weights
                               are a hash formula of (tensor index, element index) that the Rust test
                               recomputes exactly (see formula_weights), so only the input, the eval-mode (and,
                               without dropout, train-mode)
                               logits and the running statistics after a train-mode pass are stored;
  torch_shapes.json            every state_dict key with its shape and dtype, and the parameter count, of
                               each reference network for 10 and 100 classes;
  golden_sgd.json              torch.optim.SGD on one 2×3 parameter for three steps of fixed gradients, under
                               settings that exercise each of its rules (first step, dampening, no momentum,
                               Nesterov): the settings, the gradients and the parameter after each step;
  golden_train_<net>.safetensors, golden_train_<net>_io.safetensors
                               SWA in miniature with PyTorch's own training tools: from the first file's
                               state_dict, a few steps of torch.optim.SGD (momentum, weight decay, a new
                               learning rate each step) on fixed batches, averaged with
                               torch.optim.swa_utils.AveragedModel from a given step on, BatchNorm recomputed
                               with swa_utils.update_bn, then the average's eval-mode logits. The second file
                               holds the batches, the losses, the trained state_dict ("trained.<key>"), the
                               averaged state_dict after the recomputation ("swa.<key>") and those logits;
  golden_geometry_<net>.safetensors
                               the loss-surface line between two weight sets standing in for SGD ("sgd.<key>")
                               and SWA ("swa.<key>"; two torch seeds, BatchNorm randomised, the classifier
                               scaled up): at each t of GEOMETRY_TS the parameters
                               t·w_SGD + (1 − t)·w_SWA, BatchNorm recomputed with swa_utils.update_bn on the
                               train batches, then the eval-mode train and test cross-entropy and error and
                               the L2 term wd/2·‖w‖² ("t<i>.train_nll", …, in float64), with the batches
                               ("train<j>.input"/"train<j>.labels", "test0.input"/"test0.labels");
  golden_swag_<net>.safetensors
                               SWAG's moments, one sample of each covariance from given noise and the Bayesian
                               model average with BatchNorm recomputed per sample: see golden_swag.py.
The second form loads a checkpoint written by swa-models into the reference network NAME (a key of
torch_ref.MODELS, or preresnet<depth> / wrn<depth>x<k>) with load_state_dict(strict=True).

torch_ref.py is found in --torch-ref (default: the SWA_TORCH_REF directory, else /work/shared/tools).
"""
import argparse, json, math, os, re, sys

import numpy as np

import torch
from safetensors.torch import load_file, save_file

GOLDEN = {
    'preresnet20': 10,   # basic blocks, identity and projection shortcuts
    'preresnet47': 10,   # bottleneck blocks
    'wrn10x1': 10,       # wide basic blocks with biased convolutions; final BN momentum 0.9
}
TRAIN_GOLDEN = ('preresnet8', 10)
TRAIN_BATCH = 4
TRAIN_LRS = [0.1, 0.05, 0.05, 0.02]   # one learning rate per step
TRAIN_MOMENTUM = 0.9
TRAIN_WEIGHT_DECAY = 3e-4
TRAIN_SWA_FROM = 1                    # 0-based step after which averaging starts
TRAIN_BN_BATCHES = 2
GEOMETRY_GOLDEN = ('preresnet8', 10)
GEOMETRY_TS = [0.25, 1.5]             # one point between SWA and SGD, one beyond SGD
GEOMETRY_WEIGHT_DECAY = 5e-4
GEOMETRY_FC_SCALE = 8.0               # on the classifier's default weights: logits of a few units
GEOMETRY_BATCH = 8                    # every batch one size: update_bn's cumulative mean is then the
GEOMETRY_TRAIN_BATCHES = 2            # batch-size-weighted mean that swa-models computes
FORMULA_GOLDEN = {'vgg16': 10, 'vgg16bn': 10, 'preresnet164': 100, 'wrn16x4': 10, 'wrn28x10': 100}
BATCH = 2


def formula_uniform(tensor_index, numel):
    """Uniform values in [-0.5, 0.5) from a 32-bit integer hash of (tensor index, element index); exact in
    any language, so that the Rust test rebuilds the same weights bit for bit."""
    i = np.arange(numel, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    h = (i * np.uint64(2654435761) + np.uint64((tensor_index + 1) * 40503)) & mask
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(2246822519)) & mask
    h ^= h >> np.uint64(13)
    return h.astype(np.float64) / 4294967296.0 - 0.5


def formula_weights(model):
    """Every floating-point state_dict entry from formula_uniform, scaled by its kind; counters 0."""
    state = {}
    index = 0
    for key, value in model.state_dict().items():
        if value.dtype != torch.float32:
            state[key] = torch.zeros_like(value)
            continue
        u = formula_uniform(index, value.numel())
        index += 1
        if key.endswith('running_var') or (key.endswith('weight') and value.dim() == 1):
            v = 1.0 + 0.5 * u
        elif key.endswith('running_mean') or key.endswith('bias'):
            v = 0.2 * u
        else:
            fan_in = value.numel() // value.shape[0]
            v = u * math.sqrt(24.0 / fan_in)
        state[key] = torch.from_numpy(v.astype(np.float32)).reshape(value.shape)
    return state


def build(ref, name, classes):
    if name in ref.MODELS:
        return ref.MODELS[name](classes)
    m = re.fullmatch(r'preresnet(\d+)', name)
    if m:
        return ref.PreResNet(classes, int(m.group(1)))
    m = re.fullmatch(r'wrn(\d+)x(\d+)', name)
    if m:
        return ref.WideResNet(classes, int(m.group(1)), int(m.group(2)))
    raise SystemExit(f'unknown network {name}')


def randomise_batch_norm(model, gen):
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.weight.data = 0.5 + torch.rand(c, generator=gen)
            module.bias.data = 0.1 * torch.randn(c, generator=gen)
            module.running_mean.data = 0.1 * torch.randn(c, generator=gen)
            module.running_var.data = 0.5 + torch.rand(c, generator=gen)
            module.num_batches_tracked.fill_(7)


def write_forward_fixtures(model, name, gen, out, batch=BATCH, size=32):
    """Writes `golden_<name>.safetensors` (the state_dict) and `golden_<name>_io.safetensors` (`batch`
    `size`×`size` images drawn from `gen`, the logits in eval and in train mode, and the running statistics after the train
    forward). Returns the input."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, f'golden_{name}.safetensors'), metadata={'format': 'pt'})
    x = torch.randn(batch, 3, size, size, generator=gen)
    with torch.no_grad():
        model.eval()
        logits_eval = model(x)
        model.train()
        logits_train = model(x)
    io = {'input': x, 'logits_eval': logits_eval, 'logits_train': logits_train}
    for k, v in model.state_dict().items():
        if k.endswith('running_mean') or k.endswith('running_var'):
            io['after_train.' + k] = v.detach().clone()
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, f'golden_{name}_io.safetensors'))
    print(f'{name}: {sum(p.numel() for p in model.parameters())} parameters, '
          f'eval logits[0,:3] {logits_eval[0, :3].tolist()}')
    return x


def write_gradient_fixture(model, name, x, classes, gen, out):
    """Writes `golden_<name>_grads.safetensors`: labels drawn from `gen`, the mean cross-entropy of a
    train-mode pass on `x`, and the gradient of every parameter ("grad.<key>")."""
    labels = torch.randint(0, classes, (x.shape[0],), generator=gen)
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    grads = {'labels': labels, 'loss': loss.detach().reshape(1)}
    for k, p in model.named_parameters():
        grads['grad.' + k] = p.grad.detach().clone()
    save_file({k: v.contiguous() for k, v in grads.items()}, os.path.join(out, f'golden_{name}_grads.safetensors'))
    print(f'{name}: loss {loss.item():.6f}')


def golden(ref, out):
    for i, (name, classes) in enumerate(GOLDEN.items()):
        torch.manual_seed(1000 + i)
        model = build(ref, name, classes)
        gen = torch.Generator().manual_seed(2000 + i)
        randomise_batch_norm(model, gen)
        write_forward_fixtures(model, name, gen, out)


def formula_golden(ref, out):
    for i, (name, classes) in enumerate(FORMULA_GOLDEN.items()):
        model = build(ref, name, classes)
        model.load_state_dict(formula_weights(model), strict=True)
        gen = torch.Generator().manual_seed(3000 + i)
        x = torch.randn(BATCH, 3, 32, 32, generator=gen)
        with torch.no_grad():
            model.eval()
            logits_eval = model(x)
            # VGG's dropout only acts after its last BatchNorm and the others have none, so the running
            # statistics do not depend on dropout masks.
            model.train()
            logits_train = model(x)
        io = {'input': x, 'logits_eval': logits_eval}
        if not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
            io['logits_train'] = logits_train
        for k, v in model.state_dict().items():
            if k.endswith('running_mean') or k.endswith('running_var'):
                io['after_train.' + k] = v.detach().clone()
        save_file({k: v.contiguous() for k, v in io.items()},
                  os.path.join(out, f'golden_{name}_formula_io.safetensors'))
        print(f'{name} (formula weights): eval logits[0,:3] {logits_eval[0, :3].tolist()}')


def train_golden(ref, out):
    name, classes = TRAIN_GOLDEN
    torch.manual_seed(4000)
    model = build(ref, name, classes)
    gen = torch.Generator().manual_seed(4001)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, f'golden_train_{name}.safetensors'), metadata={'format': 'pt'})
    io = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN_LRS[0], momentum=TRAIN_MOMENTUM,
                                weight_decay=TRAIN_WEIGHT_DECAY)
    swa = torch.optim.swa_utils.AveragedModel(model)
    losses = []
    model.train()
    for step, lr in enumerate(TRAIN_LRS):
        x = torch.randn(TRAIN_BATCH, 3, 32, 32, generator=gen)
        y = torch.randint(0, classes, (TRAIN_BATCH,), generator=gen)
        io[f'step{step}.input'] = x
        io[f'step{step}.labels'] = y
        for group in optimizer.param_groups:
            group['lr'] = lr
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step >= TRAIN_SWA_FROM:
            swa.update_parameters(model)
    io['losses'] = torch.tensor(losses, dtype=torch.float32)
    for k, v in model.state_dict().items():
        io['trained.' + k] = v.detach().clone()
    bn_batches = [torch.randn(TRAIN_BATCH, 3, 32, 32, generator=gen) for _ in range(TRAIN_BN_BATCHES)]
    for i, b in enumerate(bn_batches):
        io[f'bn{i}.input'] = b
    torch.optim.swa_utils.update_bn(bn_batches, swa)
    for k, v in swa.module.state_dict().items():
        io['swa.' + k] = v.detach().clone()
    test = torch.randn(TRAIN_BATCH, 3, 32, 32, generator=gen)
    swa.eval()
    with torch.no_grad():
        io['test.input'] = test
        io['test.logits'] = swa(test)
    save_file({k: v.contiguous() for k, v in io.items()},
              os.path.join(out, f'golden_train_{name}_io.safetensors'))
    print(f'{name} training: losses {losses}, {int(swa.n_averaged)} snapshots averaged')


def geometry_golden(ref, out):
    name, classes = GEOMETRY_GOLDEN
    anchors = {}
    for role, seed in (('sgd', 6000), ('swa', 6001)):
        torch.manual_seed(seed)
        model = build(ref, name, classes)
        randomise_batch_norm(model, torch.Generator().manual_seed(seed + 100))
        # Logits of a few units rather than PyTorch's default near-uniform ones, so that the losses depend
        # on every logit and not mostly on the constant log(classes).
        model.fc.weight.data *= GEOMETRY_FC_SCALE
        anchors[role] = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    # A data seed on which no image's two largest logits come near a tie at any t (asserted below).
    gen = torch.Generator().manual_seed(6004)
    io = {}
    train, test = [], []
    for prefix, batches, count in (('train', train, GEOMETRY_TRAIN_BATCHES), ('test', test, 1)):
        for j in range(count):
            x = torch.randn(GEOMETRY_BATCH, 3, 32, 32, generator=gen)
            y = torch.randint(0, classes, (GEOMETRY_BATCH,), generator=gen)
            io[f'{prefix}{j}.input'], io[f'{prefix}{j}.labels'] = x, y
            batches.append((x, y))
    for role, state in anchors.items():
        for k, v in state.items():
            io[f'{role}.{k}'] = v

    def nll_and_error(model, batches):
        """Mean cross-entropy (float64 from the float32 logits), error in percent, and the smallest gap
        between an image's two largest logits relative to the largest logit: a gap near single-precision
        rounding would make the error hinge on the order of a kernel's sums."""
        logits = torch.cat([model(x) for x, _ in batches]).double()
        labels = torch.cat([y for _, y in batches])
        nll = torch.nn.functional.cross_entropy(logits, labels).item()
        error = 100.0 * (logits.argmax(1) != labels).double().mean().item()
        top2 = logits.topk(2, dim=1).values
        return nll, error, ((top2[:, 0] - top2[:, 1]).min() / logits.abs().max()).item()

    model = build(ref, name, classes)
    parameter_names = {n for n, _ in model.named_parameters()}
    for i, t in enumerate(GEOMETRY_TS):
        # The interpolation in float64 rounded once to float32, as WeightVector::set_combination does.
        state = {k: (t * anchors['sgd'][k].double() + (1 - t) * anchors['swa'][k].double()).float()
                 if k in parameter_names else v for k, v in anchors['swa'].items()}
        model.load_state_dict(state, strict=True)
        torch.optim.swa_utils.update_bn([x for x, _ in train], model)
        model.eval()
        with torch.no_grad():
            train_nll, train_error, train_gap = nll_and_error(model, train)
            test_nll, test_error, test_gap = nll_and_error(model, test)
        l2 = 0.5 * GEOMETRY_WEIGHT_DECAY * sum((p.detach().double() ** 2).sum().item()
                                               for p in model.parameters())
        gap = min(train_gap, test_gap)
        assert gap > 1e-3, f't = {t}: two logits within {gap:.2e} (relative), the error would hinge on rounding'
        values = {'t': t, 'train_loss': train_nll + l2, 'train_nll': train_nll, 'l2_term': l2,
                  'train_error': train_error, 'test_loss': test_nll, 'test_error': test_error}
        for k, v in values.items():
            io[f't{i}.{k}'] = torch.tensor(v, dtype=torch.float64)
        print(f'{name} line t = {t}: train nll {train_nll:.6f}, L2 {l2:.6f}, train error {train_error}%, '
              f'test nll {test_nll:.6f}, test error {test_error}%, smallest top-2 logit gap {gap:.3e}')
    save_file({k: v.contiguous() for k, v in io.items()},
              os.path.join(out, f'golden_geometry_{name}.safetensors'))


SGD_CASES = [
    dict(lr=0.1, momentum=0.9, weight_decay=5e-4, dampening=0.0, nesterov=False),
    dict(lr=0.1, momentum=0.9, weight_decay=5e-4, dampening=0.3, nesterov=False),
    dict(lr=0.2, momentum=0.0, weight_decay=1e-2, dampening=0.5, nesterov=False),
    dict(lr=0.05, momentum=0.8, weight_decay=1e-3, dampening=0.0, nesterov=True),
]


def sgd_golden(ref, out):
    gen = torch.Generator().manual_seed(5000)
    start = torch.randn(2, 3, generator=gen)
    grads = [torch.randn(2, 3, generator=gen) for _ in range(3)]
    cases = []
    for settings in SGD_CASES:
        param = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.SGD([param], **settings)
        after = []
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
            after.append(param.detach().flatten().tolist())
        cases.append({'settings': settings, 'after_each_step': after})
    golden = {'start': start.flatten().tolist(), 'grads': [g.flatten().tolist() for g in grads],
              'cases': cases}
    with open(os.path.join(out, 'golden_sgd.json'), 'w') as f:
        json.dump(golden, f, indent=1)
    print(f'SGD: {len(cases)} settings, 3 steps each')


def shapes(ref, out):
    names = list(ref.MODELS) + ['preresnet56']
    table = {}
    for name in names:
        for classes in (10, 100):
            model = build(ref, name, classes)
            table[f'{name}/{classes}'] = {
                'parameters': sum(p.numel() for p in model.parameters()),
                'state_dict': [[k, list(v.shape), str(v.dtype).replace('torch.', '')]
                               for k, v in model.state_dict().items()],
            }
    with open(os.path.join(out, 'torch_shapes.json'), 'w') as f:
        json.dump(table, f, separators=(',', ':'))
    print(f'shapes of {len(table)} networks written')


def cifar_networks(ref, out):
    """Shake-Shake and PyramidNet, from xtask/torch/cifar_networks.py: see golden_cifar_networks.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import golden_cifar_networks
    golden_cifar_networks.write(out, randomise_batch_norm, write_forward_fixtures, write_gradient_fixture)


def imagenet_networks(ref, out):
    """torchvision's ResNets: see golden_imagenet_networks.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import golden_imagenet_networks
    golden_imagenet_networks.write(out, randomise_batch_norm, write_forward_fixtures, write_gradient_fixture)


def swag_golden(ref, out):
    """SWAG's moments, samples and Bayesian model average: see golden_swag.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import golden_swag
    golden_swag.write(out, randomise_batch_norm)


def check_load(ref, path, name, classes):
    model = build(ref, name, int(classes))
    state = load_file(path)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        y = model(torch.zeros(1, 3, 32, 32))
    print(f'{path}: load_state_dict(strict=True) into {name} ({classes} classes) accepted {len(state)} '
          f'tensors; logits on a zero image {y[0, :3].tolist()}')


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser()
    parser.add_argument('--torch-ref', default=os.environ.get('SWA_TORCH_REF', '/work/shared/tools'))
    parser.add_argument('--out', default=os.path.join(here, '..', 'tests', 'fixtures'))
    parser.add_argument('--check-load', nargs=3, metavar=('CHECKPOINT', 'NAME', 'CLASSES'))
    parser.add_argument('--only', choices=['golden', 'formula', 'train', 'geometry', 'sgd', 'shapes', 'cifar',
                                           'imagenet', 'swag'],
                        help='write one family of fixtures only')
    args = parser.parse_args()
    sys.path.insert(0, args.torch_ref)
    import torch_ref as ref
    torch.set_num_threads(2)
    if args.check_load:
        check_load(ref, *args.check_load)
        return
    os.makedirs(args.out, exist_ok=True)
    families = {'golden': golden, 'formula': formula_golden, 'train': train_golden,
                'geometry': geometry_golden, 'sgd': sgd_golden,
                'shapes': shapes, 'cifar': cifar_networks, 'imagenet': imagenet_networks,
                'swag': swag_golden}
    for family, write in families.items():
        if args.only in (None, family):
            write(ref, args.out)


if __name__ == '__main__':
    main()
