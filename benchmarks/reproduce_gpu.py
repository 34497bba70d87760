"""GPU reproduction of MaskDiT's headline at a scale where masking can pay off: sample quality vs
training wall time, FLOPs and images seen, for DiT and three MaskDiT arms (issue #17).

Data: the MNIST-5k digits, every batch drawn with a random affine augmentation (rotation, scale,
shift) and resampled from 32x32 to 64x64 on the device, so 256 tokens per image at patch 4 (the
paper's token count). Model: an encoder of 8 blocks of width 256 (9.5M parameters); MaskDiT adds a
decoder of 2 blocks of width 128, 13.7% of a masked step's FLOPs (`maskdit_fast.flops`). Batch 256,
AdamW at a constant learning rate after a warm-up, EMA with warm-up, bf16 autocast, torch.compile
per block. Noise levels (EDM P_mean / P_std), guidance scale and interval, solver and sampler steps are
the `mnist` preset's (tuned on its 24 x 24 CPU model).

Arms (one per GPU call, <= 5 min on an H100 / H200; <out>/<arm>_seed<k>.json):
  dit               DiT: the same encoder, no decoder, never masked
  maskdit_mae       MaskDiT at mask ratio 0.5 with the MAE term (0.1)
  maskdit_nomae     MaskDiT at mask ratio 0.5 without the MAE term
  maskdit_unmasked  the MaskDiT network (encoder + decoder) trained unmasked
Every arm gets the same training FLOPs: DiT's `dit_steps` steps. It is evaluated at fractions of
that budget; a masked arm's evaluation point is a fork: the masked run is copied, trained unmasked
for `fork_fraction` of its masked steps with its own EMA (restarted at the fork), scored, and
dropped (the masked run goes on from where it was). The fork's steps, FLOPs, images and seconds
are counted in that point, and the masked steps before each point are chosen so that masked steps
plus fork sum to the point's share of the budget. Scores: `num_samples` class-balanced samples of
the EMA weights, resized to 32x32, Frechet distance in the MNIST-5k digit classifier's features
against augmented real digits (the training distribution) and the classifier's class accuracy.
Training seconds exclude compilation (warm-up steps run first, untimed, and undone) and evaluation.

    python benchmarks/reproduce_gpu.py --arm dit          # one arm per GPU call; the report follows
    python benchmarks/reproduce_gpu.py --arm maskdit_mae --seed 1
    python benchmarks/reproduce_gpu.py --report           # plot + verdict from the arms saved so far
    python benchmarks/reproduce_gpu.py --smoke --out /tmp/g   # every arm, tiny, on the CPU in seconds

The report (results.md, quality_vs_compute.png) names the missing arms, and its verdict states the
FLOPs and wall-time ratios at which each MaskDiT arm first reaches DiT's final FD (linear
interpolation between evaluation points), or that it does not.
"""
import argparse
import copy
import datetime
import glob
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from maskdit_fast import fid
from maskdit_fast.bench import env_info
from maskdit_fast.classifier import load_classifier
from maskdit_fast.config import PRESETS
from maskdit_fast.data import load_mnist5k, mnist_to_tensor
from maskdit_fast.diffusion import EDMPrecond, MaskDiTLoss
from maskdit_fast.ema import ShardedEMA, ema_decay
from maskdit_fast.flops import train_step_flops
from maskdit_fast.masking import random_masking_ids
from maskdit_fast.models import create_model
from maskdit_fast.parallel import apply_compile
from maskdit_fast.sample import generate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling script, for first_reach
from reproduce_small import first_reach, plot  # noqa: E402

_PRESET = PRESETS["mnist"]
SETTING = dict(
    image_size=64, patch_size=4, hidden_size=256, depth=8, num_heads=4,
    decoder_hidden_size=128, decoder_depth=2, decoder_num_heads=4,
    zero_init_decoder_input=_PRESET["model_kwargs"].get("zero_init_decoder_input", True),
    batch_size=256, lr=5e-4, lr_warmup_steps=200, ema_decay=0.999, dit_steps=3000,
    fractions=[0.25, 0.5, 0.75, 1.0], fork_fraction=0.1, mask_ratio=0.5, mae_coef=0.1, label_dropout=0.1,
    P_mean=_PRESET["P_mean"], P_std=_PRESET["P_std"], sigma_data=0.5,
    sample_steps=_PRESET["sample_steps"], sample_cfg=_PRESET["sample_cfg"],
    sample_cfg_interval=_PRESET["sample_cfg_interval"], sample_solver=_PRESET["sample_solver"],
    num_samples=1000, eval_batch=500, reference_digits=5000,
    augment=dict(degrees=10.0, scale=0.1, shift=0.1),  # rotation (deg), scale and shift (of the half-size) ranges
    precision="bf16", compile=True)
# --smoke: tiny model, a few steps, few samples; every arm on the CPU in seconds.
SMOKE = dict(image_size=16, hidden_size=32, depth=1, num_heads=2, decoder_hidden_size=16, decoder_depth=1,
             decoder_num_heads=2, batch_size=8, lr=1e-3, lr_warmup_steps=2, dit_steps=6, fractions=[0.5, 1.0],
             num_samples=20, eval_batch=20, reference_digits=200, sample_steps=2, precision="fp32", compile=False)
ARMS = {
    "dit": dict(model="DiT", mask_ratio=0.0, mae=False),
    "maskdit_mae": dict(model="MaskDiT", mask_ratio=None, mae=True),
    "maskdit_nomae": dict(model="MaskDiT", mask_ratio=None, mae=False),
    "maskdit_unmasked": dict(model="MaskDiT", mask_ratio=0.0, mae=False),
}
LABELS = {"dit": "DiT", "maskdit_mae": "MaskDiT 0.5 + MAE", "maskdit_nomae": "MaskDiT 0.5, no MAE",
          "maskdit_unmasked": "MaskDiT network, unmasked"}
NUM_CLASSES = 10
AXES = (("train_seconds", "training wall time (s)", 1.0), ("train_flops", "training FLOPs (PFLOP)", 1e-15),
        ("images", "images seen (millions)", 1e-6))


def arm_mask_ratio(arm, s):
    """The mask ratio of `arm`'s main run (0 = unmasked: no forks)."""
    ratio = ARMS[arm]["mask_ratio"]
    return s["mask_ratio"] if ratio is None else ratio


def build_net(arm, s, check_inputs=True):
    """The arm's network (fp32, CPU): DiT or MaskDiT with the setting's encoder."""
    kw = dict(input_size=s["image_size"], in_channels=1, num_classes=NUM_CLASSES, patch_size=s["patch_size"],
              hidden_size=s["hidden_size"], depth=s["depth"], num_heads=s["num_heads"], check_inputs=check_inputs)
    if ARMS[arm]["model"] == "DiT":
        return create_model("DiT-S/4", learn_sigma=False, **kw)
    return create_model("MaskDiT-S/4", decoder_hidden_size=s["decoder_hidden_size"], decoder_depth=s["decoder_depth"],
                        decoder_num_heads=s["decoder_num_heads"],
                        zero_init_decoder_input=s["zero_init_decoder_input"], **kw)


def step_flops(arm, s):
    """Training FLOPs of one step: {"main": the arm's step, "fork": an unmasked step of its network,
    "dit": a DiT step (the budget's unit)}."""
    net, b = build_net(arm, s), s["batch_size"]
    return {"main": train_step_flops(net, mask_ratio=arm_mask_ratio(arm, s), batch=b),
            "fork": train_step_flops(net, batch=b), "dit": train_step_flops(build_net("dit", s), batch=b)}


def plan(arm, s, flops):
    """Evaluation points of `arm`: a list of (fraction, main steps, fork steps).

    The budget is s["dit_steps"] DiT steps' FLOPs. An unmasked arm is scored at the fraction of its
    step count; a masked arm at m masked steps plus a fork of round(fork_fraction * m) unmasked steps,
    m the largest count whose masked steps and fork fit the fraction of the budget."""
    budget = s["dit_steps"] * flops["dit"]
    if arm_mask_ratio(arm, s) == 0:
        total = int(budget // flops["main"])
        return [(f, max(1, round(f * total)), 0) for f in s["fractions"]]
    fork = lambda m: max(1, round(s["fork_fraction"] * m))  # noqa: E731
    points = []
    for f in s["fractions"]:
        m = max(1, int(f * budget // (flops["main"] + s["fork_fraction"] * flops["fork"])))
        while m > 1 and m * flops["main"] + fork(m) * flops["fork"] > f * budget:  # the one-step fork floor
            m -= 1
        points.append((f, m, fork(m)))
    return points


def augment(x, size, aug, generator):
    """Random affine copies of digits x [B, 1, h, w] in [-1, 1], resampled to [B, 1, size, size]
    (bilinear; the background -1 fills what comes into view)."""
    u = torch.rand(x.shape[0], 4, device=x.device, generator=generator) * 2 - 1
    angle, scale = u[:, 0] * math.radians(aug["degrees"]), 1 + u[:, 1] * aug["scale"]
    cos, sin = angle.cos() / scale, angle.sin() / scale  # output -> input coordinates
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * aug["shift"]], 1),
                         torch.stack([sin, cos, u[:, 3] * aug["shift"]], 1)], 1)
    grid = F.affine_grid(theta, (x.shape[0], 1, size, size), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


class Digits:
    """An endless stream of augmented MNIST-5k batches (reshuffled every epoch), all on `device`."""

    def __init__(self, images, labels, s, seed):
        self.images, self.labels, self.s = images, labels, s
        self.order_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator(images.device).manual_seed(seed)
        self.order, self.pos = torch.randperm(len(labels), generator=self.order_gen), 0

    def next(self):
        b = self.s["batch_size"]
        if self.pos + b > len(self.order):
            self.order, self.pos = torch.randperm(len(self.labels), generator=self.order_gen), 0
        idx = self.order[self.pos:self.pos + b].to(self.images.device)
        self.pos += b
        return augment(self.images[idx], self.s["image_size"], self.s["augment"], self.aug_gen), self.labels[idx]


def to_classifier_size(x):
    """Images [N, 1, H, W] -> [N, 1, 32, 32] for the digit classifier (antialiased resize)."""
    if x.shape[-1] == 32:
        return x.clamp(-1, 1)
    return F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


class Scorer:
    """Classifier FD against augmented real digits, and class accuracy."""

    def __init__(self, images, labels, s, device, seed=12345):
        self.s, self.device = s, device
        self.classifier = load_classifier()[0].to(device)
        gen = torch.Generator(device).manual_seed(seed)
        n = min(s["reference_digits"], len(labels))
        feats = np.concatenate([self.features(augment(images[i:i + 500], s["image_size"], s["augment"], gen))[0]
                                for i in range(0, n, 500)])[:n]
        self.mu, self.sigma = fid.feature_stats(feats)
        # the metric's floor: as many other augmented real digits as samples, class-balanced like them
        by_class = [torch.nonzero(labels == c).flatten() for c in range(NUM_CLASSES)]
        order = torch.stack([by_class[i % NUM_CLASSES][i // NUM_CLASSES] for i in range(s["num_samples"])])
        real = augment(images[order], s["image_size"], s["augment"], gen)
        self.floor = self.score(real, labels[order])

    @torch.no_grad()
    def features(self, x):
        """Images [N, 1, S, S] -> (float64 features [N, D], predicted classes [N])."""
        f = self.classifier.features(to_classifier_size(x.to(self.device)).float())
        return f.double().cpu().numpy(), self.classifier.head(f).argmax(1).cpu()

    def score(self, x, labels):
        """{"fid_classifier", "class_accuracy"} of images x with intended classes `labels`."""
        feats, preds = [], []
        for i in range(0, len(x), 500):
            f, p = self.features(x[i:i + 500])
            feats.append(f)
            preds.append(p)
        fd = fid.frechet_distance_to_features(np.concatenate(feats), self.mu, self.sigma)
        return {"fid_classifier": float(fd), "class_accuracy": float((torch.cat(preds) == labels.cpu()).float().mean())}


class Branch:
    """One training run's state: network, optimizer, EMA, data stream, random numbers, steps done."""

    def __init__(self, net, s, data, seed, device, ema=None, optimizer=None, step=0):
        self.net, self.s, self.data, self.step = net, s, data, step
        self.precond = EDMPrecond(net, s["sigma_data"])
        self.optimizer = optimizer or torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=0.0)
        self.ema = ema or ShardedEMA(net)
        self.ema_steps = 0  # updates since the EMA (re)started: its warm-up counts from there
        self.gen = torch.Generator(device).manual_seed(seed)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["precision"] == "bf16")
        self.last_loss = None

    def loss(self, loss_fn, mask_ratio):
        """This step's loss on the next batch (label dropout, mask, noise levels and noise from self.gen)."""
        x, y = self.data.next()
        drop = torch.rand(y.shape[0], device=y.device, generator=self.gen) < self.s["label_dropout"]
        y = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
        ids = None
        if mask_ratio:
            length = (x.shape[-1] // self.s["patch_size"]) ** 2
            ids = random_masking_ids(x.shape[0], length, mask_ratio, generator=self.gen)[0]
        with self.autocast:
            return loss_fn(self.precond, x, y, mask_ratio=mask_ratio, ids_keep=ids, generator=self.gen).loss

    def train(self, steps, loss_fn, mask_ratio):
        """`steps` optimizer steps at `mask_ratio` (no host sync)."""
        for _ in range(steps):
            lr = self.s["lr"] * min(1.0, (self.step + 1) / max(1, self.s["lr_warmup_steps"]))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self.loss(loss_fn, mask_ratio)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update(self.net, ema_decay(self.ema_steps, self.s["ema_decay"]))
            self.step, self.ema_steps, self.last_loss = self.step + 1, self.ema_steps + 1, loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(branch, loss_fns, ratios, device):
    """Compiles every shape the run will train at: two forwards + backwards at each mask ratio on
    `branch` (a throwaway stream and generator sharing the run's network and optimizer), gradients
    dropped, nothing stepped. Returns the seconds it took."""
    _sync(device)
    t0 = time.perf_counter()
    for ratio, loss_fn in zip(ratios, loss_fns):
        for _ in range(2):
            branch.loss(loss_fn, ratio).backward()
    branch.optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - t0


def evaluate_ema(ema, arm, s, scorer, device):
    """Samples `num_samples` class-balanced images from the EMA weights (seeds 0..N-1, the same for every
    arm and point) and scores them. Returns (metrics dict, seconds)."""
    t0 = time.perf_counter()
    net = build_net(arm, s)
    net.load_state_dict(ema.full_state_dict())
    precond = EDMPrecond(net.to(device), s["sigma_data"]).eval()
    labels = torch.arange(s["num_samples"]) % NUM_CLASSES
    x = generate(precond, labels, list(range(s["num_samples"])), batch_size=s["eval_batch"],
                 num_steps=s["sample_steps"], cfg_scale=s["sample_cfg"], solver=s["sample_solver"],
                 cfg_interval=s["sample_cfg_interval"] or None)
    metrics = scorer.score(x, labels)
    return metrics, time.perf_counter() - t0


def run_arm(arm, s, device, seed, out, log=print):
    """Trains and evaluates one arm; writes <out>/<arm>_seed<seed>.json after every evaluation point
    (a run cut short keeps what it measured, marked incomplete). Returns the result dict."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    flops = step_flops(arm, s)
    points_plan = plan(arm, s, flops)
    digits, classes = load_mnist5k()
    images, labels = mnist_to_tensor(digits).to(device), torch.from_numpy(classes).long().to(device)
    scorer = Scorer(images, labels, s, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the init depends on the seed only
        net = build_net(arm, s, check_inputs=False).to(device)
    if s["compile"]:
        apply_compile(net, scope="blocks")
    ratio = arm_mask_ratio(arm, s)
    main_loss = MaskDiTLoss(s["P_mean"], s["P_std"], s["sigma_data"], s["mae_coef"] if ARMS[arm]["mae"] else 0.0)
    fork_loss = MaskDiTLoss(s["P_mean"], s["P_std"], s["sigma_data"], 0.0)
    main = Branch(net, s, Digits(images, labels, s, seed), seed, device)
    forked = any(k for _, _, k in points_plan)
    ratios, fns = ([ratio, 0.0], [main_loss, fork_loss]) if forked else ([ratio], [main_loss])
    path = os.path.join(out, f"{arm}_seed{seed}.json")
    result = {"arm": arm, "label": LABELS[arm], "seed": seed, "setting": s, "device": env_info(device),
              "step_flops": flops, "plan": points_plan, "params": sum(p.numel() for p in net.parameters()),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "complete": False, "points": []}
    throwaway = Branch(net, s, Digits(images, labels, s, seed + 10**6), seed + 10**6, device, ema=main.ema,
                       optimizer=main.optimizer)
    result["warmup_seconds"] = warm_up(throwaway, fns, ratios, device)
    log(f"{arm} seed {seed}: {result['params'] / 1e6:.2f}M parameters, warm-up {result['warmup_seconds']:.0f} s, "
        f"plan {points_plan}")
    main_seconds = 0.0
    for i, (fraction, m, k) in enumerate(points_plan):
        _sync(device)
        t0 = time.perf_counter()
        main.train(m - main.step, main_loss, ratio)
        _sync(device)
        main_seconds += time.perf_counter() - t0
        branch, fork_seconds = main, 0.0
        if k:  # the fork: a copy of the masked run trained unmasked, its EMA restarted
            saved = ({n: t.clone() for n, t in net.state_dict().items()}, copy.deepcopy(main.optimizer.state_dict()))
            branch = Branch(net, s, Digits(images, labels, s, seed * 1000 + i + 1), seed * 1000 + i + 1, device,
                            ema=ShardedEMA(net), optimizer=main.optimizer, step=main.step)
            _sync(device)
            t0 = time.perf_counter()
            branch.train(k, fork_loss, 0.0)
            _sync(device)
            fork_seconds = time.perf_counter() - t0
        loss = float(branch.last_loss)
        if not math.isfinite(loss):
            raise RuntimeError(f"{arm}: non-finite loss {loss} at evaluation point {i}")
        metrics, eval_seconds = evaluate_ema(branch.ema, arm, s, scorer, device)
        if k:
            net.load_state_dict(saved[0])
            main.optimizer.load_state_dict(saved[1])
        result["points"].append(dict(
            fraction=fraction, main_steps=m, fork_steps=k, images=(m + k) * s["batch_size"],
            train_flops=float(m * flops["main"] + k * flops["fork"]),
            train_seconds=round(main_seconds + fork_seconds, 3),
            main_seconds=round(main_seconds, 3), fork_seconds=round(fork_seconds, 3), loss=loss,
            eval_seconds=round(eval_seconds, 1), **metrics))
        p = result["points"][-1]
        log(f"{arm} {fraction:.2f} of the budget: {m} + {k} steps, {p['train_seconds']:.1f} s, "
            f"FD {p['fid_classifier']:.2f}, accuracy {p['class_accuracy']:.1%} (eval {eval_seconds:.0f} s)")
        result["complete"] = i == len(points_plan) - 1
        result["real_floor"] = scorer.floor
        result["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        _write_json(result, path)
    return result


def _write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- report
def load_results(out):
    """{arm: [result dicts, by seed]} of the arm files in `out`."""
    arms = {}
    for path in sorted(glob.glob(os.path.join(out, "*_seed*.json"))):
        with open(path) as f:
            r = json.load(f)
        if r.get("arm") in ARMS and r.get("points"):
            arms.setdefault(r["arm"], []).append(r)
    return arms


def curve(results):
    """The mean over seeds of an arm's evaluation points (the points all seeds reached)."""
    n = min(len(r["points"]) for r in results)
    keys = ("fraction", "main_steps", "fork_steps", "images", "train_flops", "train_seconds", "main_seconds",
            "fid_classifier", "class_accuracy")
    return [{k: float(np.mean([r["points"][i][k] for r in results])) for k in keys} for i in range(n)]


def verdict(curves):
    """The comparison from {arm: curve}: DiT's final FD and, per MaskDiT arm present, the ratios of
    FLOPs, wall time and images at which it first reaches that FD to DiT's totals (None: it does not),
    its final FD, and DiT's FD interpolated at that arm's final FLOPs. Returns a dict; "missing"
    lists the arms not (yet) run."""
    out = {"missing": [a for a in ARMS if a not in curves], "arms": {}}
    dit = curves.get("dit")
    if not dit:
        return out
    target = dit[-1]["fid_classifier"]
    out["dit_final_fid"], out["dit_final_accuracy"] = target, dit[-1]["class_accuracy"]
    for arm, pts in curves.items():
        if arm == "dit":
            continue
        row = {"final_fid": pts[-1]["fid_classifier"], "final_accuracy": pts[-1]["class_accuracy"]}
        for axis, _, _ in AXES:
            reach = first_reach([0.0] + [p[axis] for p in pts], [float("inf")] + [p["fid_classifier"] for p in pts],
                                target)
            row[f"reach_{axis}"] = None if reach is None else reach / dit[-1][axis]
            row[f"final_{axis}"] = pts[-1][axis] / dit[-1][axis]
        xs = [p["train_flops"] for p in dit]
        budget = pts[-1]["train_flops"]
        row["dit_fid_at_final_flops"] = (float(np.interp(budget, xs, [p["fid_classifier"] for p in dit]))
                                         if xs[0] <= budget <= xs[-1] else None)
        out["arms"][arm] = row
    return out


def verdict_lines(v, curves, results):
    """Markdown lines stating the verdict and what the data say about why."""
    if "dit_final_fid" not in v:
        return ["**No verdict yet**: the DiT arm has not been run."]
    if not v["arms"]:
        return ["**No verdict yet**: no MaskDiT arm has been run."]
    lines = [f"DiT ends at FD {v['dit_final_fid']:.2f} (class accuracy {v['dit_final_accuracy']:.1%})."]
    for arm, row in v["arms"].items():
        if row["reach_train_flops"] is None:
            lines.append(f"- **{LABELS[arm]} does not reach DiT's final FD** within its run: it ends at FD "
                         f"{row['final_fid']:.2f} ({row['final_accuracy']:.1%}) after {row['final_train_flops']:.2f}x "
                         f"DiT's FLOPs and {row['final_train_seconds']:.2f}x its wall time.")
        else:
            lines.append(f"- **{LABELS[arm]} reaches DiT's final FD at {row['reach_train_flops']:.2f}x DiT's FLOPs and "
                         f"{row['reach_train_seconds']:.2f}x its wall time** ({row['reach_images']:.2f}x its images); "
                         f"it ends at FD {row['final_fid']:.2f} ({row['final_accuracy']:.1%}).")
    lines += ["", "What the data show about why:"]
    dit = results["dit"][0]
    for arm in v["arms"]:
        r = results[arm][0]
        per_image = r["step_flops"]["main"] / dit["step_flops"]["dit"]
        pts, dpts = curves[arm], curves["dit"]
        wall = (pts[-1]["main_seconds"] / pts[-1]["main_steps"]) / (dpts[-1]["main_seconds"] / dpts[-1]["main_steps"])
        lines.append(f"- {LABELS[arm]}: a training step costs {per_image:.2f}x a DiT step's FLOPs and took "
                     f"{wall:.2f}x its time (same batch; same device: {r['device'].get('card')} vs "
                     f"{dit['device'].get('card')}).")
        at = v["arms"][arm]["dit_fid_at_final_flops"]
        if at is not None:
            lines.append(f"  At its final FLOPs DiT's FD (interpolated) is {at:.2f} vs its "
                         f"{pts[-1]['fid_classifier']:.2f}.")
    if "maskdit_mae" in v["arms"] and "maskdit_nomae" in v["arms"]:
        lines.append(f"- MAE term: final FD {v['arms']['maskdit_mae']['final_fid']:.2f} with it, "
                     f"{v['arms']['maskdit_nomae']['final_fid']:.2f} without.")
    if "maskdit_unmasked" in v["arms"]:
        lines.append(f"- Without masking the MaskDiT network ends at FD "
                     f"{v['arms']['maskdit_unmasked']['final_fid']:.2f} vs DiT's {v['dit_final_fid']:.2f} at the same "
                     f"FLOPs (the decoder's cost and capacity alone).")
    return lines


def mismatch_lines(results):
    """A warning naming the arm runs whose setting differs from the first's (e.g. another --dit-steps):
    their curves are not comparable."""
    runs = [r for rs in results.values() for r in rs]
    if not runs:
        return []
    first = runs[0]["setting"]
    differ = [f"{r['arm']} seed {r['seed']} ({', '.join(k for k in r['setting'] if r['setting'][k] != first.get(k))})"
              for r in runs[1:] if r["setting"] != first]
    if not differ:
        return []
    return [f"**Warning**: these runs differ in setting from {runs[0]['arm']} seed {runs[0]['seed']}, so the "
            f"comparison is not like for like: {'; '.join(differ)}.", ""]


def report(out, command="python benchmarks/reproduce_gpu.py"):
    """(Re)writes <out>/results.md and quality_vs_compute.png from the arm files there; returns the
    verdict dict."""
    results = load_results(out)
    curves = {arm: curve(results[arm]) for arm in ARMS if arm in results}
    v = verdict(curves)
    lines = ["# MaskDiT vs DiT at 256 tokens (GPU reproduction)", "",
             "Written by `python benchmarks/reproduce_gpu.py --report` from the arm files in this folder "
             "(see the script's docstring for the setting).", ""]
    if curves:
        any_run = next(iter(results.values()))[0]
        s = any_run["setting"]
        lines += [f"Setting: {s['image_size']}x{s['image_size']} augmented MNIST-5k, patch {s['patch_size']}, encoder "
                  f"{s['depth']} x {s['hidden_size']}, decoder {s['decoder_depth']} x {s['decoder_hidden_size']}, "
                  f"batch "
                  f"{s['batch_size']}, lr {s['lr']}, EMA {s['ema_decay']}, budget {s['dit_steps']} DiT steps, forks "
                  f"{s['fork_fraction']} of the masked steps, {s['num_samples']} samples, {s['sample_solver']} "
                  f"{s['sample_steps']} steps, CFG {s['sample_cfg']}"
                  + (" at {} < sigma <= {}".format(*s["sample_cfg_interval"]) if s.get("sample_cfg_interval") else "")
                  + f", {s['precision']}"
                  + (", compiled" if s["compile"] else "") + ".", "",
                  "| arm | seeds | device | fraction | steps (masked + fork) | wall s | PFLOP | images | FD "
                  "| accuracy |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, pts in curves.items():
            runs = results[arm]
            card = runs[0]["device"].get("card")
            seeds = ",".join(str(r["seed"]) for r in runs)
            seeds += "" if all(r["complete"] for r in runs) else " (incomplete)"
            for p in pts:
                lines.append(f"| {LABELS[arm]} | {seeds} | {card} | {p['fraction']:.2f} | {p['main_steps']:.0f} + "
                             f"{p['fork_steps']:.0f} | {p['train_seconds']:.1f} | {p['train_flops'] / 1e15:.2f} | "
                             f"{p['images']:.0f} | {p['fid_classifier']:.2f} | {p['class_accuracy']:.1%} |")
        floor = any_run.get("real_floor")
        if floor:
            lines += ["", f"Metric floor: {s['num_samples']} other augmented real digits score FD "
                          f"{floor['fid_classifier']:.2f}, accuracy {floor['class_accuracy']:.1%}."]
        plot(curves, os.path.join(out, "quality_vs_compute.png"), AXES,
             "MaskDiT vs DiT, 256 tokens (MNIST-5k at 64x64, patch 4): quality vs training compute",
             floor=floor and floor["fid_classifier"], floor_label="augmented real digits", labels=LABELS)
        lines += ["", "![quality vs compute](quality_vs_compute.png)"]
    lines += ["", "## Verdict", ""] + mismatch_lines(results) + verdict_lines(v, curves, results)
    if v["missing"]:
        lines += ["", "## Pending arms", "", "One GPU call each (<= 5 min on an H100 / H200), then `--report`:", ""]
        lines += [f"- {LABELS[arm]}: `{command} --arm {arm}`" for arm in v["missing"]]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return v


def main(argv=None):
    """CLI entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", choices=sorted(ARMS), help="train and evaluate this arm, then rewrite the report")
    p.add_argument("--seed", type=int, default=0, help="seed of the arm's init, data order and noise")
    p.add_argument("--report", action="store_true", help="only rewrite results.md / the PNG from the saved arms")
    p.add_argument("--smoke", action="store_true", help="every arm, tiny, on the CPU (seconds): a pipeline check")
    p.add_argument("--out", default=None, help="arm files and report (default benchmarks/results/reproduce_gpu; "
                   "runs/reproduce_gpu_smoke with --smoke)")
    p.add_argument("--device", default="cuda", help="device of --arm (default cuda)")
    p.add_argument("--dit-steps", type=int, default=None, help=f"budget in DiT steps ({SETTING['dit_steps']})")
    args = p.parse_args(argv)
    if sum([bool(args.arm), args.report, args.smoke]) != 1:
        p.error("give exactly one of --arm, --report, --smoke")
    if args.dit_steps is not None and args.dit_steps < 1:
        p.error("--dit-steps must be >= 1")
    out = args.out or ("runs/reproduce_gpu_smoke" if args.smoke else "benchmarks/results/reproduce_gpu")
    os.makedirs(out, exist_ok=True)
    s = dict(SETTING, **SMOKE) if args.smoke else dict(SETTING)
    if args.dit_steps:
        s["dit_steps"] = args.dit_steps
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.arm:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("reproduce_gpu: no CUDA device (use --smoke for the CPU pipeline check)")
        run_arm(args.arm, s, device, args.seed, out, log)
    elif args.smoke:
        for arm in ARMS:
            run_arm(arm, s, torch.device("cpu"), args.seed, out, log)
    v = report(out)
    with open(os.path.join(out, "results.md")) as f:
        sys.stdout.write(f.read())
    return v


if __name__ == "__main__":
    main()
