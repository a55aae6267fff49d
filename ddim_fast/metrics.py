"""Sample-quality metrics: the Frechet distance and the digits classifier behind "FD-digits".

Frechet distance between two Gaussians fitted to features (Heusel et al. 2017, the FID formula):

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The matrix square root is the numerically delicate part. S1 S2 is not symmetric, so instead of
a general `sqrtm` (scipy's Schur method, which can return complex noise and needs an "eps on
the diagonal" retry for singular covariances) we use

    tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) = sum_i sqrt(lambda_i(A S2 A)),   A = S1^(1/2)

where A comes from the symmetric eigendecomposition of S1 and A S2 A is symmetric positive
semi-definite, so its eigenvalues are real; rounding-level negatives are clipped to 0. All in
float64 with numpy only (no scipy needed).

FD-digits: the same formula on the 128 penultimate features of `DigitsClassifier`, a small
CNN trained on the real scikit-learn digits (train split, see data.load_digits) and shipped in
ddim_fast/assets/digits_classifier/. Its reference statistics are those of the digits test
split. Numbers are comparable only between runs that use this same classifier file.

Standard FID (Inception-v3 pool3 features, as pytorch-fid computes it) is in ddim_fast.inception:
`fid(images_a, images_b, load_fid_inception("pt_inception-2015-12-05-6726825d.pth"))`, with the
weights file supplied by the user (pytorch-fid's release; it cannot be downloaded here).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER_DIR = ASSETS / "digits_classifier"


# -- Frechet distance ------------------------------------------------------------------------------
def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features (N, D) in float64; sigma is the unbiased covariance (N - 1)."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2 samples, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf; check the images fed to the feature extractor")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)  # symmetric: real eigenvalues, orthonormal eigenvectors
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); see the module docstring."""
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}; "
            "give two means of length D and two D x D covariances"
        )
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # exact symmetry; np.cov is symmetric up to rounding
    a = _psd_sqrt(s1)
    m = a @ s2 @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# -- the digits classifier -------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsClassifierConfig:
    resolution: int = 16  # the bundled digits model's resolution; other inputs are resized to it
    channels: int = 1  # the digits are grey
    width: int = 32  # first conv's channels; the second has 2x: ~150k params, trains in seconds
    feature_dim: int = 128  # the penultimate layer: FD-digits' feature space
    num_classes: int = 10

    def __post_init__(self):
        if self.resolution < 4 or self.resolution % 4:
            raise ValueError(f"resolution must be a multiple of 4 (two 2x poolings), got {self.resolution}")
        for k in ("channels", "width", "feature_dim", "num_classes"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


class DigitsClassifier(nn.Module):
    """conv3x3-ReLU-maxpool x2, then a dense feature layer and the class logits.

    Input (B, C, H, W) in [-1, 1] at any resolution (resized to config.resolution, 1 or 3
    channels: RGB is averaged to grey). `features(x)` gives the (B, feature_dim) penultimate
    activations used by FD-digits; `forward(x)` the (B, 10) logits.
    """

    def __init__(self, config: DigitsClassifierConfig | None = None):
        super().__init__()
        self.config = c = config or DigitsClassifierConfig()
        self.conv1 = nn.Conv2d(c.channels, c.width, 3, padding=1)
        self.conv2 = nn.Conv2d(c.width, 2 * c.width, 3, padding=1)
        self.fc = nn.Linear(2 * c.width * (c.resolution // 4) ** 2, c.feature_dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 4:
            raise ValueError(f"the classifier takes (B, C, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[1] != c.channels:
            if c.channels == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"the classifier takes {c.channels} channels, got {x.shape[1]}")
        x = x.float().clamp(-1.0, 1.0)
        if x.shape[-2:] != (c.resolution, c.resolution):
            x = F.interpolate(x, size=(c.resolution, c.resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(self._prepare(x))), 2)  # (B, w, R/2, R/2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 2w, R/4, R/4)
        return F.relu(self.fc(h.flatten(1)))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))  # (B, 10)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256):
        """(probabilities (B, 10), predicted labels (B,)) in eval mode."""
        was = self.training
        self.eval()
        probs = torch.cat([F.softmax(self(x[i:i + batch_size]), dim=1) for i in range(0, len(x), batch_size)])
        self.train(was)
        return probs, probs.argmax(1)


def load_digits_classifier(path=None, device="cpu") -> DigitsClassifier:
    """The shipped classifier (ddim_fast/assets/digits_classifier/) or one saved at `path`, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else CLASSIFIER_DIR
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"no digits classifier in {str(folder)!r} (needs config.json and model.safetensors); "
            "train one with `ddim-fast train-digits-classifier OUT`"
        )
    meta = json.loads(cfg_file.read_text())
    model = DigitsClassifier(DigitsClassifierConfig(**meta["config"]))
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()


@torch.no_grad()
def digits_report(images: torch.Tensor, classifier: DigitsClassifier | None = None) -> dict:
    """How a batch of generated digits looks to the classifier: mean max-probability
    ("confidence"), the number of distinct predicted classes, and the class histogram."""
    clf = classifier or load_digits_classifier()
    probs, labels = clf.predict(images.to(next(clf.parameters()).device))
    counts = torch.bincount(labels, minlength=clf.config.num_classes)
    return {
        "n": int(len(images)),
        "mean_confidence": float(probs.max(1).values.mean()),
        "classes": int((counts > 0).sum()),
        "histogram": counts.tolist(),
    }


@torch.no_grad()
def fd_digits(images: torch.Tensor, classifier: DigitsClassifier | None = None, reference=None) -> float:
    """FD-digits of `images` (N >= 2, in [-1, 1]) against the digits test split (or `reference`
    images). Small N biases FD upwards; compare numbers at the same N."""
    from .data import load_digits

    clf = classifier or load_digits_classifier()
    clf.eval()
    if reference is None:
        reference, _ = load_digits(clf.config.resolution, split="test")
    dev = next(clf.parameters()).device
    f1 = torch.cat([clf.features(images[i:i + 256].to(dev)) for i in range(0, len(images), 256)])
    f2 = torch.cat([clf.features(reference[i:i + 256].to(dev)) for i in range(0, len(reference), 256)])
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


# -- training the classifier -----------------------------------------------------------------------
def _outliers(n: int, resolution: int, g: torch.Generator) -> torch.Tensor:
    """Images that are not digits: white noise, smoothed noise, flat fields and soft blobs.

    Trained towards the uniform distribution ("outlier exposure", Hendrycks et al. 2019), so
    that the classifier's confidence means something on generated images: garbage gets low
    confidence instead of a confident arbitrary label.
    """
    from .data import synthetic_images

    k = n // 4
    white = torch.randn(k, 1, resolution, resolution, generator=g).clamp(-1, 1)
    coarse = torch.randn(k, 1, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(resolution, resolution), mode="bilinear", align_corners=False)
    smooth = smooth.clamp(-1, 1)
    flat = (torch.rand(k, 1, 1, 1, generator=g) * 2 - 1).expand(k, 1, resolution, resolution)
    blobs = synthetic_images(n - 3 * k, resolution, 1, seed=int(torch.randint(0, 2**31, (), generator=g)))
    return torch.cat([white, smooth, flat, blobs])


def _blends(x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
    """Pixel blends lam*a + (1-lam)*b of two digits of different classes, lam in [0.3, 0.7], with
    the soft label (lam, 1-lam) (mixup, Zhang et al. 2018): a 3 superimposed on an 8 is neither,
    and should not be called either with high confidence. Returns (images, (K, 10) targets)."""
    perm = torch.randperm(len(y), generator=g)
    keep = y != y[perm]
    a, b, ya, yb = x[keep], x[perm][keep], y[keep], y[perm][keep]
    lam = torch.rand(len(ya), generator=g) * 0.4 + 0.3  # (K,)
    images = lam.view(-1, 1, 1, 1) * a + (1 - lam.view(-1, 1, 1, 1)) * b
    soft = lam[:, None] * F.one_hot(ya, 10) + (1 - lam[:, None]) * F.one_hot(yb, 10)  # (K, 10)
    return images, soft


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1/8 of the side (zero-padded with the background value -1) and a
    little pixel noise: generated digits are not perfectly centred nor perfectly clean."""
    b, _, r, _ = x.shape
    p = max(1, r // 8)
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx, dy = torch.randint(0, 2 * p + 1, (2, b), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + r, dx[i]:dx[i] + r] for i in range(b)])
    return (out + 0.05 * torch.randn(out.shape, generator=g)).clamp(-1, 1)


def train_digits_classifier(resolution: int = 16, *, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3,
                            seed: int = 0, outlier_weight: float = 0.5, log=print):
    """Train DigitsClassifier on the digits train split; returns (model, report dict).

    Cross entropy on digits plus `outlier_weight` x (cross entropy to the uniform distribution on
    `_outliers`, one per digit in each batch, + cross entropy to the soft label of `_blends`).
    Adam with cosine decay.
    """
    from .data import load_digits

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits(resolution, split="train")
    x_test, y_test = load_digits(resolution, split="test")
    model = DigitsClassifier(DigitsClassifierConfig(resolution=resolution))
    steps = epochs * math.ceil(len(x_train) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x, y = _augment(x_train[idx], g), y_train[idx]
            out = _outliers(len(idx), resolution, g)
            mixed, soft = _blends(x, y, g)
            n, m = len(idx), len(idx) + len(out)
            logp = F.log_softmax(model(torch.cat([x, out, mixed])), dim=1)
            ce = F.nll_loss(logp[:n], y)
            uniform = -logp[n:m].mean()  # CE to the uniform distribution
            blend = -(soft * logp[m:]).sum(1).mean()  # CE to the two-class soft label
            loss = ce + outlier_weight * (uniform + blend)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log and (epoch + 1) % 10 == 0:
            acc = float((model.predict(x_test)[1] == y_test).float().mean())
            log(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {acc:.4f}")
    model.eval()
    probs, pred = model.predict(x_test)
    noise = _outliers(400, resolution, torch.Generator().manual_seed(seed + 1))
    blends, _ = _blends(x_test, y_test, torch.Generator().manual_seed(seed + 2))
    report = {
        "test_accuracy": float((pred == y_test).float().mean()),
        "test_size": int(len(y_test)),
        "test_mean_confidence": float(probs.max(1).values.mean()),
        "outlier_mean_confidence": float(model.predict(noise)[0].max(1).values.mean()),
        "blend_mean_confidence": float(model.predict(blends)[0].max(1).values.mean()),
        "train": {"resolution": resolution, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                  "seed": seed, "outlier_weight": outlier_weight, "train_size": int(len(y_train))},
    }
    return model, report


def save_digits_classifier(model: DigitsClassifier, folder, report: dict | None = None) -> None:
    """config.json (config + how it was trained + accuracy) and model.safetensors, each atomically."""
    from .files import atomic_save_safetensors, atomic_write_json, check_creatable

    folder = Path(folder)
    if not folder.is_dir():
        check_creatable(folder)  # the folder itself is created, never the folders above it
        folder.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save_safetensors(folder / "model.safetensors", state)
    atomic_write_json(folder / "config.json", {"config": asdict(model.config), **(report or {})})


def evaluate_digits_model(model="digits", *, n: int = 200, steps: int = 20, seed: int = 0, grid=None) -> dict:
    """DDIM-`steps` samples of a digits model judged by the classifier, plus FD-digits (test split)."""
    import time

    from .checkpoint import load_model
    from .sample_grid import sample_images, write_sample_grid

    m = load_model(model) if not isinstance(model, nn.Module) else model
    t0 = time.perf_counter()
    images = sample_images(m, n, steps=steps, seed=seed)
    report = digits_report(images)
    report.update({"steps": steps, "seed": seed, "fd_digits": fd_digits(images) if n >= 2 else None,
                   "sampling_s": round(time.perf_counter() - t0, 2)})
    if grid:
        write_sample_grid(grid, m, min(n, 100), steps=steps, seed=seed, scale=2)
    return report
