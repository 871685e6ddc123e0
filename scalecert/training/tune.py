"""`scalecert tune`: fine-tune a classifier to live with its sparse superficial layer and windows.

The training graph is the exporter's own split: the model's decomposed ExportedProgram, cut at
the superficial layer the exporter chooses, gated with the exporter's SIN rule (Taylor alpha,
static tau for the pruning rate, recalibrated as the weights move; straight-through gradient
past the hard gate) and occluded with windows of the exact certification family. BatchNorm runs
with its running statistics (the program is exported in eval mode), as it will at inference.

The checkpoint is a plain state_dict (loads with weights_only=True) plus a `scalecert_tune`
record: the settings and the final SIN parameters, which `scalecert-export` uses by default.
torch is used here; never in runtime/.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from scalecert.errors import ScaleCertError
from scalecert.training.split_program import SplitProgram
from scalecert.core import decision, geometry

RECORD_KEY = "scalecert_tune"
TARGETS = ("detect", "recover")
MIN_VALIDATION = 200  # validation images below which one checkpoint cannot be told from another


@dataclass
class TuneOptions:
    model: str | None
    arch: str
    data: str
    output: str
    val: str | None = None
    pretrained: bool = False
    patch: str = "2%"
    layer: str = "auto"
    prune_rate: float = 0.0
    stride: str = "auto"
    window_budget: int | None = None  # None: export/plan.WINDOW_BUDGET of the target
    max_growth: float = 2.0
    phi: str = "abs"
    epochs: int | None = None  # None: EPOCHS of the target
    batch: int = 128
    lr: float = 0.01
    weight_decay: float = 5e-4
    occlusions: int = 1
    target: str = "detect"  # "detect" | "recover": what the occluded copies teach (occlusion_indices)
    limit: int | None = None
    val_limit: int = 1000
    cert_limit: int = 200
    max_clean_drop: float = 0.03  # an epoch below the input's validation clean accuracy by more is never kept
    calib_images: int = 256
    recalibrate_every: int = 100
    seed: int = 0
    resume: bool = False
    threads: int | None = None
    quiet: bool = False
    force: bool = False


# Recovery learns two-window occlusions; its validation certified rate was still rising at epoch 5
# of 6 (ResNet-20, CIFAR-10, 5x5 patch: 15.7, 19.0, 21.3, 25.0, 28.3, 26.3%), detection's settles by 3.
EPOCHS = {"detect": 3, "recover": 6}


# -- data --------------------------------------------------------------------------------------
def load_pixels(items, input_spec: dict, what: str, quiet: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x H x W x 3 at network size, int64 labels), decoded once and kept in memory."""
    from scalecert.runtime.images import load_image

    if any(label is None for _, label in items):
        raise ScaleCertError(f"{what}: images without labels (use class subfolders or a labels.csv)")
    _, h, w = input_spec["input_size"]
    gib = len(items) * h * w * 3 / 2**30
    if gib > 8:
        raise ScaleCertError(f"{what}: {len(items)} images at {h}x{w} need {gib:.0f} GiB in memory; pass --limit")
    pixels = np.empty((len(items), h, w, 3), np.uint8)
    for i, (path, _) in enumerate(_progress(items, f"reading {what}", quiet)):
        pixels[i] = load_image(path, input_spec)
    return pixels, np.array([label for _, label in items], np.int64)


def _progress(iterable, desc: str, quiet: bool, total=None):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the dev extra; without it, no bar
        quiet = True
    if quiet:
        return _Plain(iterable)

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


class _Plain:
    """The iterable, with tqdm's set_postfix as a no-op."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **_):
        pass


def augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random translation (zero padding of 1/8 of the side) and horizontal flip."""
    n, h, w, _ = pixels.shape
    pad = max(1, h // 8)
    padded = np.pad(pixels, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    out = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def occlusion_indices(rng: np.random.Generator, n_windows: int, n: int, copies: int, target: str) -> list[np.ndarray]:
    """The windows zeroed in each occluded copy of a batch of n images. Detection: `copies`
    copies, each with one random window of the family, (n,) indices. Recovery (double masking,
    docs/design.md §10): those, and `copies` more with the union of two distinct random windows,
    (n, 2) indices, as PatchCleanser fine-tunes with one and two masks."""
    singles = [rng.integers(0, n_windows, n) for _ in range(copies)]
    if target == "detect":
        return singles
    pairs = []
    for _ in range(copies):
        first = rng.integers(0, n_windows, n)
        second = (first + rng.integers(1, n_windows, n)) % n_windows if n_windows > 1 else first
        pairs.append(np.stack([first, second], 1))
    return singles + pairs


# -- the split network --------------------------------------------------------------------------
class SplitNetwork(SplitProgram):
    """The exporter's split of the model, trained through: a straight-through gate, calibration
    of alpha and tau as the weights move, and certified accuracy on validation images."""

    def __init__(self, module, layer: str, input_spec: dict, windows: np.ndarray, feature_hw, phi: str,
                 device: str = "cpu"):
        super().__init__(module, layer, input_spec, windows, feature_hw, [1.0], -1.0, phi, device)

    def gated(self, a, straight_through: bool = False):
        """The prefix's gate; with straight_through the forward value is the same and the gradient
        also reaches the score through a sigmoid of (score - tau)."""
        score = self.score(a)
        s = self._apply_gate(a, score)
        if straight_through and self.tau >= 0:
            temperature = max(abs(self.tau), 1e-3) * 0.1
            soft = self.torch.sigmoid((score - self.tau) / temperature)[:, None]
            s = s + a * (self.alpha > 0) * (soft - soft.detach())
        return s

    def calibrate(self, pixels: np.ndarray, labels: np.ndarray, rate: float) -> dict:
        """alpha (Taylor), the score distribution and tau for `rate`, as the exporter computes them."""
        from scalecert.core import sin
        from scalecert.export.taylor import taylor_scores

        x = self.normalize(pixels).cpu().numpy()
        activation, gradient = taylor_scores(self.module, self.layer_node.name, x, list(labels))
        alpha = sin.taylor_importance(activation, gradient)
        score = sin.scores(activation, alpha, self.phi)
        table = [sin.threshold_for_rate(score, r / 100) for r in range(100)]
        self.alpha = self.torch.from_numpy(alpha).reshape(1, -1, 1, 1).to(self.device)
        self.tau = table[round(rate * 100)] if rate > 0 else -1.0
        return {"alpha": [float(a) for a in alpha], "threshold_by_rate": table, "threshold": self.tau,
                "prune_rate": rate, "phi": self.phi, "calibration_images": len(pixels),
                "importance": "taylor |A*dL/dA|"}

    def certified_recovery(self, s1, gate: np.ndarray, label: int, batch: int = 256) -> bool:
        """Whether recovery of `label` is certified for one gated row (its kept positions `gate`),
        by the runtime's own procedure (runtime/recovery.py::PairRecovery) with this torch split as
        the row predictor: every pair of windows predicts it. (The recovered label's accuracy is
        `scalecert bench --mode recover`'s.)"""
        from scalecert.runtime.recovery import PairRecovery

        procedure = self.__dict__.get("_procedure")
        if procedure is None or procedure.windows is not self.windows:
            procedure = self.__dict__["_procedure"] = PairRecovery(self.windows, self.feature_hw,
                                                                   self.fill is not None, batch=batch)
        index = {tuple(w): i for i, w in enumerate(self.windows.tolist())}

        def predict(rows: np.ndarray) -> np.ndarray:
            rows = np.asarray(rows).reshape(len(rows), -1, 4)
            if not (rows[:, :, 2] > rows[:, :, 0]).any():  # the un-occluded row
                return self.suffix(s1.expand(len(rows), -1, -1, -1)).cpu().numpy()
            windows = np.array([[index[tuple(r)] for r in row.tolist()] for row in rows])
            return self.suffix(self.occlude(s1.expand(len(rows), -1, -1, -1), windows)).cpu().numpy()

        outcome = procedure.run(predict, gate, certify=True)
        return bool(outcome.certified) and outcome.verdict.label == label

    def evaluate(self, pixels: np.ndarray, labels: np.ndarray, cert_limit: int, batch: int = 256,
                 target: str = "detect") -> dict:
        """Clean accuracy (gated, no window) on all; on the first cert_limit, certified accuracy:
        for detection, every window of the family predicts the label; for recovery, every pair of
        windows does (certified recovery, the contract of core/recovery.py)."""
        torch = self.torch
        if target == "recover":
            return self._evaluate_recovery(pixels, labels, cert_limit, batch)
        correct, certified = 0, 0
        with torch.no_grad():
            for lo in range(0, len(pixels), batch):
                s = self.gated(self.superficial(self.normalize(pixels[lo:lo + batch])))
                predicted = self.suffix(s).argmax(1).cpu().numpy()
                correct += int((predicted == labels[lo:lo + batch]).sum())
                for i in range(min(len(s), max(0, cert_limit - lo))):
                    if predicted[i] == labels[lo + i]:
                        certified += int(decision.every_row_agrees(
                            lambda index: self.suffix(self.occlude(s[i:i + 1].expand(len(index), -1, -1, -1), index))
                            .argmax(1).cpu().numpy(), np.arange(len(self.windows)), int(labels[lo + i]),
                            first_batch=batch, max_batch=batch))
        n_cert = min(cert_limit, len(pixels))
        return {"clean_accuracy": correct / len(pixels), "certified_accuracy": certified / max(1, n_cert),
                "images": len(pixels), "certified_on": n_cert}

    def _evaluate_recovery(self, pixels, labels, cert_limit: int, batch: int) -> dict:
        torch = self.torch
        correct = certified = 0
        n_cert = min(cert_limit, len(pixels))
        with torch.no_grad():
            for lo in range(0, len(pixels), batch):
                a = self.superficial(self.normalize(pixels[lo:lo + batch]))
                s, kept = self.gated(a), self.gate(a).cpu().numpy()
                predicted = self.suffix(s).argmax(1).cpu().numpy()
                correct += int((predicted == labels[lo:lo + batch]).sum())
                for i in range(min(len(s), max(0, n_cert - lo))):
                    if predicted[i] == labels[lo + i]:
                        certified += int(self.certified_recovery(s[i:i + 1], kept[i], int(labels[lo + i]), batch))
        return {"clean_accuracy": correct / len(pixels), "certified_accuracy": certified / max(1, n_cert),
                "images": len(pixels), "certified_on": n_cert, "target": "recover"}


# -- setup shared with the exporter -------------------------------------------------------------
def lost_clean(metrics: dict, start: dict, max_clean_drop: float) -> bool:
    """Validation clean accuracy more than `max_clean_drop` below the input's (`start`)."""
    return metrics["clean_accuracy"] < start["clean_accuracy"] - max_clean_drop


def beats(metrics: dict, best: dict, start: dict, max_clean_drop: float) -> bool:
    """Whether an epoch's validation `metrics` replace the `best` checkpoint so far: more certified
    (then clean) accuracy, a finite training loss, and clean accuracy at most `max_clean_drop` below
    the input's (`start`). A diverged or collapsing network never wins: a constant prediction
    "certifies" its class's share of the images."""
    if not np.isfinite(metrics.get("train_loss", 0.0)) or lost_clean(metrics, start, max_clean_drop):
        return False
    return (metrics["certified_accuracy"], metrics["clean_accuracy"]) > (best["certified_accuracy"], best["clean_accuracy"])


def plan(loaded, patch: str, layer_spec: str, stride_spec: str, window_budget: int, max_growth: float):
    """(program, split plan): what scalecert-export would choose for this model (export/plan.py)."""
    from scalecert.export.plan import plan_split
    from scalecert.export.to_onnx import to_onnx

    _, image_h, image_w = loaded.preprocess.input_size
    patch_hw = geometry.parse_patch(patch, (image_h, image_w))
    model, program = to_onnx(loaded)
    if program is None:
        raise ScaleCertError("tune needs a PyTorch model (a state_dict with --arch), not an ONNX or TorchScript file")
    return program, plan_split(model, (image_h, image_w), patch_hw, layer_spec, stride_spec, window_budget, max_growth)


def _check_output(path: str, force: bool = False) -> None:
    from scalecert.bundle.staging import check_output_file

    check_output_file(path, force, "-o ")


def _save(path: str, payload: dict) -> None:
    import torch

    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(payload, tmp)
    os.replace(tmp, path)


def tune(opts: TuneOptions, say=print) -> dict:
    """Fine-tune a state_dict checkpoint through the exporter's split (export/plan.py): the SIN gate
    with a straight-through gradient, recalibrated every `recalibrate_every` steps, and `occlusions`
    copies of every training image with a random window of the certification family zeroed (and,
    with target "recover", as many with two windows zeroed: occlusion_indices).
    Validates each epoch (clean and certified accuracy), keeps the best checkpoint at opts.output
    and the resumable state at opts.output + ".last". Returns {"output", "best", "history"}."""
    import torch

    from scalecert.runtime.datasets import image_set
    from scalecert.export.loading import load_model
    from scalecert.export.plan import WINDOW_BUDGET

    if opts.target not in TARGETS:
        raise ScaleCertError(f"--mode {opts.target!r}: expected one of {', '.join(TARGETS)}")
    opts.epochs = EPOCHS[opts.target] if opts.epochs is None else opts.epochs
    opts.window_budget = WINDOW_BUDGET[opts.target] if opts.window_budget is None else opts.window_budget
    _check_output(opts.output, opts.force or opts.resume)
    _check_output(opts.output + ".last", opts.force or opts.resume)  # the resumable state is an output too
    if not 0 <= opts.max_clean_drop <= 1:
        raise ScaleCertError(f"--max-clean-drop {opts.max_clean_drop}: expected a fraction in [0, 1]")
    if opts.epochs < 1 or opts.batch < 1 or opts.lr <= 0:
        raise ScaleCertError("--epochs and --batch must be positive and --lr above 0")
    for flag, value, low in (("--occlusions", opts.occlusions, 0), ("--limit", opts.limit, 1),
                             ("--val-limit", opts.val_limit, 1), ("--cert-limit", opts.cert_limit, 0),
                             ("--window-budget", opts.window_budget, 1), ("--threads", opts.threads, 1)):
        if value is not None and value < low:
            raise ScaleCertError(f"{flag} {value}: expected a number >= {low}")
    if not 0 <= opts.prune_rate <= 0.99:
        raise ScaleCertError(f"--prune-rate {opts.prune_rate}: expected a number in [0, 0.99]")
    loaded = load_model(opts.model, opts.arch, None, False, opts.pretrained)
    if loaded.kind != "torch":
        raise ScaleCertError("tune needs a state_dict checkpoint with --arch (it writes one back)")
    from scalecert.export.archs import REGISTRY
    from scalecert.runtime.datasets import check_labels

    num_classes = REGISTRY[opts.arch].num_classes if opts.arch in REGISTRY else None
    train_items = image_set(opts.data, seed=opts.seed, limit=opts.limit)
    say(train_items.describe())
    check_labels(train_items, num_classes, f"--data {opts.data}")
    if opts.val:
        val_items = image_set(opts.val, seed=opts.seed, limit=opts.val_limit)
        say(val_items.describe())
        check_labels(val_items, num_classes, f"--val {opts.val}")
    else:
        held = min(opts.val_limit, max(1, len(train_items) // 20))
        val_items, train_items = train_items[:held], train_items[held:]
        say(f"no --val: holding out {held} training images for validation")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    input_spec = loaded.preprocess.to_json()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    program, split = plan(loaded, opts.patch, opts.layer, opts.stride, opts.window_budget, opts.max_growth)
    layer, window_hw, stride, windows = split.layer, split.window_hw, split.stride, split.windows
    say(f"device {device}; layer {layer.name} ({layer.scope or 'root'}), features {layer.shape}, footprint {window_hw[0]}x{window_hw[1]}, "
        f"windows {split.window_size[0]}x{split.window_size[1]} at stride {stride}, {len(windows)} windows, prune rate {opts.prune_rate}")
    module = program.module().to(device)
    net = SplitNetwork(module, layer.name, input_spec, windows, layer.shape[1:], opts.phi, device)
    train_x, train_y = load_pixels(train_items, input_spec, "training images", opts.quiet)
    val_x, val_y = load_pixels(val_items, input_spec, "validation images", opts.quiet)
    calib_rng = np.random.default_rng(opts.seed + 1)
    calib_index = calib_rng.choice(len(train_x), min(opts.calib_images, len(train_x)), replace=False)

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=opts.lr, momentum=0.9, weight_decay=opts.weight_decay, nesterov=True)
    steps_per_epoch = (len(train_x) + opts.batch - 1) // opts.batch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, opts.lr, total_steps=opts.epochs * steps_per_epoch,
                                                    pct_start=0.15, anneal_strategy="cos")
    settings = {k: v for k, v in asdict(opts).items() if k not in ("quiet", "resume", "threads", "output")}
    settings.update({"layer_name": layer.name, "stride_chosen": stride, "windows": len(windows),
                     "footprint": list(window_hw), "source": os.path.abspath(loaded.source)})
    last_path = opts.output + ".last"
    start_epoch, best, history = 0, None, []
    if opts.resume and os.path.exists(last_path):
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state["settings"] != json.loads(json.dumps(settings)):
            raise ScaleCertError(f"{last_path}: was written with other settings; drop --resume or match them")
        module.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        say(f"resumed from {last_path} after epoch {start_epoch}")
    elif opts.resume:
        say(f"--resume: no {last_path} yet, starting from the model's weights")

    if len(val_x) < MIN_VALIDATION:
        say(f"warning: {len(val_x)} validation images are too few to tell a better checkpoint from noise "
            f"(at least {MIN_VALIDATION}: pass --val or more --data)")
    record = net.calibrate(train_x[calib_index], train_y[calib_index], opts.prune_rate)
    if start_epoch == 0 and best is None:
        # the input is the checkpoint to beat: the output is never worse on validation than what came in
        best = {"epoch": 0, **net.evaluate(val_x, val_y, opts.cert_limit, target=opts.target)}
        history.append(best)
        say(f"before tuning: clean {best['clean_accuracy']:.1%}, certified {best['certified_accuracy']:.1%}{_recovered(best)} "
            f"(on {best['certified_on']} validation images)")
        _save(opts.output, {"state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                            RECORD_KEY: {"settings": settings, "sin": record, "epoch": 0, "validation": best,
                                         "history": history, "scalecert_version": _version()}})
    for epoch in range(start_epoch, opts.epochs):
        rng = np.random.default_rng([opts.seed, epoch])
        order = rng.permutation(len(train_x))
        bar = _progress(range(steps_per_epoch), f"epoch {epoch + 1}/{opts.epochs}", opts.quiet)
        seen = correct = 0
        loss_sum = 0.0
        started = time.perf_counter()
        for step in bar:
            if step and step % opts.recalibrate_every == 0:
                net.calibrate(train_x[calib_index], train_y[calib_index], opts.prune_rate)
            index = order[step * opts.batch:(step + 1) * opts.batch]
            x = net.normalize(augment(train_x[index], rng))
            y = torch.from_numpy(train_y[index]).to(device)
            s = net.gated(net.superficial(x), straight_through=True)
            occluded = [net.occlude(s, zeroed)
                        for zeroed in occlusion_indices(rng, len(windows), len(index), opts.occlusions, opts.target)]
            logits = net.suffix(torch.cat([s, *occluded]))
            targets = y.repeat(1 + len(occluded))
            loss = torch.nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            loss_sum += float(loss.detach()) * len(targets)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}")
        record = net.calibrate(train_x[calib_index], train_y[calib_index], opts.prune_rate)
        metrics = net.evaluate(val_x, val_y, opts.cert_limit, target=opts.target)
        metrics.update({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                        "rows_per_image": seen / len(train_x), "seconds": time.perf_counter() - started})
        history.append(metrics)
        improved = beats(metrics, best, history[0], opts.max_clean_drop)
        say(f"epoch {epoch + 1}: loss {metrics['train_loss']:.3f}, val clean {metrics['clean_accuracy']:.1%}, "
            f"certified {metrics['certified_accuracy']:.1%}{_recovered(metrics)} ({metrics['seconds']:.0f} s)"
            + ("  [best]" if improved else "" if not lost_clean(metrics, history[0], opts.max_clean_drop) else
               f"  (clean more than {opts.max_clean_drop:.0%} below the input's: not kept)"))
        state_dict = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        if improved:
            best = metrics
            _save(opts.output, {"state_dict": state_dict, RECORD_KEY: {
                "settings": settings, "sin": record, "epoch": epoch + 1, "validation": metrics,
                "history": history, "scalecert_version": _version()}})
        _save(last_path, {"state_dict": state_dict, "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best": best,
                          "history": history, "settings": json.loads(json.dumps(settings))})
    if best["epoch"] == 0:
        say(f"no epoch beat the input on validation (certified {best['certified_accuracy']:.1%}, clean "
            f"{best['clean_accuracy']:.1%}): {opts.output} holds the input weights, unchanged")
    return {"output": opts.output, "best": best, "history": history}


def _recovered(metrics: dict) -> str:
    return " recovery" if metrics.get("target") == "recover" else ""


def _version() -> str:
    from scalecert import __version__

    return __version__
