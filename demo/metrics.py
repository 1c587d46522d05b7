"""The demo's metrics: stand-ins for the paper's DINOv2 features and VLM scores (Section 5.1).

- `DigitNet`: a small digit classifier trained on plain and styled digits. Its penultimate layer
  (64 ReLU features) is the feature extractor f_theta; its head gives class accuracy (does the
  sample show the digit it was asked for, the stand-in for prompt correspondence).
- `StyleNet`: P(the image is in the LoRA's style), trained with half-styled digits as negatives,
  so that inverted-only or slanted-only samples do not count; scaled to 0-5 like the paper's CPS.
- Diversity (Eq. 8): 1 - mean pairwise cosine similarity of the features of the samples of one
  prompt (one digit class here), averaged over the classes. Div-Style = Diversity x Style.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
import torch.nn.functional as F

from .data import NUM_DIGITS

EVALUATORS_FILE = Path(__file__).parent / "assets" / "evaluators.safetensors"
STYLE_SCALE = 5.0


class DigitNet(nn.Module):
    def __init__(self, features: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, features)
        self.head = nn.Linear(features, NUM_DIGITS)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class StyleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The style logit, shape (n,)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.relu(self.conv2(h))
        return self.fc(h.flatten(1))[:, 0]


def diversity(features: torch.Tensor) -> float:
    """Eq. 8: 1 - the mean cosine similarity over all pairs i < j."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least two samples")
    f = F.normalize(features.double(), dim=1)
    sim = f @ f.T
    mean_pair = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    return float(1.0 - mean_pair)


def pixel_diversity(images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Two diversities that need no trained network, averaged over the classes: Eq. 8 on the raw
    pixels (images in [-1, 1], flattened), and the mean pairwise Euclidean distance between them.
    A check that a finding does not hinge on the classifier's features."""
    cosine, distance = [], []
    for c in labels.unique().tolist():
        x = images[labels == c].flatten(1).double()
        n = x.shape[0]
        if n < 2:
            continue
        cosine.append(diversity(x))
        distance.append(float(torch.cdist(x, x).sum() / (n * (n - 1))))
    if not cosine:
        raise ValueError("pixel_diversity needs two samples of one class")
    return sum(cosine) / len(cosine), sum(distance) / len(distance)


def copied_share(samples: torch.Tensor, labels: torch.Tensor, training: torch.Tensor,
                 training_labels: torch.Tensor, others: torch.Tensor, other_labels: torch.Tensor) -> float:
    """How much a LoRA copies its training set: the share of samples nearer (Euclidean, pixels) to
    one of the training digits of their class than to any other digit of that class, all in the
    LoRA's style. A LoRA that learned the style alone scores near its training digits' share of the
    class (1 % for 2 of ~180, 11 % for 20)."""
    copied = 0
    for sample, label in zip(samples, labels):
        distance = lambda pool, pool_labels: (pool[pool_labels == label] - sample).flatten(1).norm(dim=1).min()
        copied += int(distance(training, training_labels) < distance(others, other_labels))
    return copied / len(samples)


@dataclass
class Scores:
    diversity: float  # 0..1, mean over the prompts (classes)
    style: float  # 0..5
    accuracy: float  # 0..1, the digit classifier agrees with the requested class

    @property
    def div_style(self) -> float:
        return self.diversity * self.style


class Evaluators:
    def __init__(self, digit: DigitNet, style: StyleNet):
        self.digit, self.style = digit.eval(), style.eval()

    @classmethod
    def load(cls, path: Union[str, Path, None] = None) -> "Evaluators":
        from safetensors.torch import load_file
        state = load_file(str(path or EVALUATORS_FILE))
        digit, style = DigitNet(), StyleNet()
        digit.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("digit.")})
        style.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("style.")})
        return cls(digit, style)

    def state_dict(self) -> dict:
        return {**{f"digit.{k}": v for k, v in self.digit.state_dict().items()},
                **{f"style.{k}": v for k, v in self.style.state_dict().items()}}

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor) -> Scores:
        """images in [-1, 1], (n, 1, 8, 8); labels: the class each sample was generated for."""
        images = images.clamp(-1, 1)
        feats = self.digit.features(images)
        per_class = [diversity(feats[labels == c]) for c in labels.unique().tolist()
                     if int((labels == c).sum()) >= 2]
        accuracy = (self.digit.head(feats).argmax(1) == labels).double().mean()
        style = torch.sigmoid(self.style(images)).double().mean() * STYLE_SCALE
        return Scores(sum(per_class) / len(per_class), float(style), float(accuracy))


def style_probability(evaluators: Evaluators, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.sigmoid(evaluators.style(images.clamp(-1, 1)))


def format_table(rows, base: Optional[Scores] = None) -> str:
    """rows: [(lora_scale, Scores for LoRA+CFG, Scores for AutoLoRA+CFG)] -> a Table 1-like text table."""
    head = ("           |            LoRA+CFG             |          AutoLoRA+CFG\n"
            "LoRA scale | Diversity Style Div-Style  Acc  | Diversity Style Div-Style  Acc")
    fmt = lambda s: f"{s.diversity:9.3f} {s.style:5.2f} {s.div_style:9.3f} {s.accuracy:5.2f}"
    lines = [head, "-" * len(head.splitlines()[1])]
    for scale, lora, auto in rows:
        lines.append(f"{scale:10.2f} | {fmt(lora)}  | {fmt(auto)}")
    if base is not None:
        lines.append(f"base model (no LoRA) + CFG: {fmt(base).strip()}")
    return "\n".join(lines)
