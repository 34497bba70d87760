"""A small CNN digit classifier trained on the real MNIST-5k digits, to score generated samples.

`class_accuracy(samples, labels)` says how often a sample of class y is recognised as y. The
network is trained deterministically (fixed seed, one thread) on 4,500 digits the first time it is
needed (~30 s on a CPU) and cached (MASKDIT_FAST_CACHE, default ~/.cache/maskdit_fast); the other
500 digits (50 per class) are held out and its accuracy on them is stored with the weights.
`DigitClassifier.features` gives the penultimate 128-d features (for a Frechet distance).
`stray_components(samples)` measures speckle (held-out real digits: REAL_STRAY_COMPONENTS).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskdit_fast.checkpoint import atomic_save
from maskdit_fast.data import load_mnist5k, mnist_to_tensor

CACHE_ENV = "MASKDIT_FAST_CACHE"
WEIGHTS_NAME = "mnist5k_classifier_v1.pt"
TEST_PER_CLASS = 50
REAL_STRAY_COMPONENTS = 0.034  # stray_components of the 500 held-out real digits (tested)
_loaded = {}


class DigitClassifier(nn.Module):
    """CNN for [N, 1, 32, 32] digits in [-1, 1]: three conv stages, global average pool, linear."""

    def __init__(self, num_classes=10, width=32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x):
        """[N, 1, 32, 32] float in [-1, 1] -> [N, 4 * width] float32 features."""
        return self.body(x.float())

    def forward(self, x):
        """[N, 1, 32, 32] float in [-1, 1] -> [N, num_classes] logits."""
        return self.head(self.features(x))


def train_test_split():
    """MNIST-5k as padded tensors, split per class: the last 50 digits of each class are the
    test set. Returns (x_train [4500,1,32,32], y_train [4500], x_test [500,1,32,32], y_test [500])."""
    images, labels = load_mnist5k()
    x, y = mnist_to_tensor(images), torch.from_numpy(labels)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        test[torch.nonzero(y == c).flatten()[-TEST_PER_CLASS:]] = True
    return x[~test], y[~test], x[test], y[test]


def _random_shift(x, generator, max_shift=2):
    """Translates each image by up to max_shift pixels (background -1 fills), for robustness to
    slightly off-centre samples."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    size = x.shape[-1]
    return torch.stack([padded[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size] for i in range(n)])


@torch.no_grad()
def evaluate(model, x, y, batch_size=500):
    """Top-1 accuracy (float in [0, 1]) of `model` on x [N, 1, 32, 32], y [N] int64."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / max(1, len(y))


def train_classifier(epochs=6, batch_size=64, lr=2e-3, seed=0):
    """Trains a DigitClassifier on the 4,500 training digits, deterministically (one thread).

    Returns:
        (model in eval mode, held-out test accuracy as a float).
    """
    x_train, y_train, x_test, y_test = train_test_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed reduction order -> same weights on every machine run
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitClassifier()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        steps_per_epoch = len(y_train) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(y_train), generator=g)
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                loss = F.cross_entropy(model(_random_shift(x_train[idx], g)), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        acc = evaluate(model, x_test, y_test)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), acc


def cache_dir():
    """Directory for cached weights: $MASKDIT_FAST_CACHE or ~/.cache/maskdit_fast."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "maskdit_fast")


def load_classifier(directory=None, verbose=True):
    """The cached DigitClassifier (trained and cached on first use).

    Returns:
        (model in eval mode on CPU, held-out test accuracy).
    """
    directory = directory or cache_dir()
    path = os.path.join(directory, WEIGHTS_NAME)
    if path in _loaded:
        return _loaded[path]
    model = DigitClassifier()
    if os.path.isfile(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        result = (model.eval(), float(state["test_accuracy"]))
    else:
        if verbose:
            print(f"training the MNIST-5k digit classifier (once; cached at {path}) ...", flush=True)
        model, acc = train_classifier()
        os.makedirs(directory, exist_ok=True)
        atomic_save({"model": model.state_dict(), "test_accuracy": acc}, path)
        if verbose:
            print(f"digit classifier: held-out accuracy {acc:.1%}", flush=True)
        result = (model, acc)
    model.requires_grad_(False)
    _loaded[path] = result
    return result


def classifier_input(samples):
    """Digits of any even size up to the classifier's 32 x 32 (e.g. the 24 x 24 of "mnist5k-24") ->
    [N, 1, 32, 32] float32 in [-1, 1]: clamped, centred on the background (-1) as the training digits are.

    Args:
        samples: [N, 1, S, S] float images in [-1, 1], S <= 32 and even.
    """
    if samples.dim() != 4 or samples.shape[1] != 1 or samples.shape[2] != samples.shape[3] \
            or samples.shape[3] > 32 or samples.shape[3] % 2:
        raise ValueError(f"samples must be [N, 1, S, S] with S even and at most 32, got {tuple(samples.shape)}")
    pad = (32 - samples.shape[3]) // 2
    return F.pad(samples.detach().float().clamp(-1, 1), (pad, pad, pad, pad), value=-1.0)


@torch.no_grad()
def class_accuracy(samples, labels, classifier=None):
    """Fraction of samples that the digit classifier assigns to their intended class.

    Args:
        samples: [N, 1, S, S] float images in [-1, 1] (values are clamped to it), S <= 32 and even
            (`classifier_input` pads them).
        labels: [N] int64 intended classes in [0, 10).
        classifier: a DigitClassifier; default: `load_classifier()`'s.
    Returns:
        accuracy as a float in [0, 1].
    """
    x = classifier_input(samples)
    if labels.shape != samples.shape[:1]:
        raise ValueError(f"labels must be [N]={samples.shape[0]}, got {tuple(labels.shape)}")
    model = classifier if classifier is not None else load_classifier()[0]
    return evaluate(model.eval(), x.cpu(), labels.cpu().long())


def stray_components(samples):
    """Speckle and broken strokes: the mean number, per image, of bright regions (pixels > 0, i.e.
    above mid-grey in [-1, 1]; 8-connected) beyond the largest one. A clean digit is one region:
    the 500 held-out real MNIST-5k digits score REAL_STRAY_COMPONENTS (0.034).

    Args:
        samples: [N, 1, H, W] float images in [-1, 1].
    Returns:
        the mean count as a float (0.0 for N = 0).
    """
    from scipy import ndimage  # scikit-learn's dependency; only this metric needs it

    if samples.dim() != 4 or samples.shape[1] != 1:
        raise ValueError(f"samples must be [N, 1, H, W], got {tuple(samples.shape)}")
    bright = (samples.detach().float().cpu() > 0).squeeze(1).numpy()
    if len(bright) == 0:
        return 0.0
    counts = [max(ndimage.label(b, structure=[[1, 1, 1]] * 3)[1] - 1, 0) for b in bright]
    return float(sum(counts)) / len(counts)
