"""Cascaded residual codebooks that turn item vectors into short unique codes (semantic IDs).

An item vector x (collaborative embedding) is encoded to z = E(x), quantized level by level on the residual,

    r_0 = z,   c_l = argmin_k ||r_l - e_{l,k}||,   r_{l+1} = r_l - e_{l,c_l},   z_hat = sum_l e_{l,c_l}

and decoded back, x_hat = D(z_hat). The item's code is (c_0, ..., c_{L-1}). Training minimises (Semantic
Convergence §3.2, METHODS.md §3.2; the alignment term's form is this implementation's choice, the paper gives none)

    L_tok = ||x - x_hat||^2 + beta * sum_l ||r_l - sg[e_{l,c_l}]||^2 + lambda_align * InfoNCE(W z_hat, h_text)

where h_text is the LLM's mean-pooled embedding of the item's text, W a learned linear map and the InfoNCE
uses in-batch negatives (``lambda_align = 0`` is the paper's "no alignment" ablation).

Codebooks come from ``vector-quantize-pytorch``'s ``ResidualVQ`` (pinned in pyproject), with settings chosen to
match an RQ-VAE: k-means initialisation on the first batch (the paper), EMA codebook updates (the library's
default, more stable than gradient codebooks on small catalogues), dead-code replacement (codes unused for a batch
are re-seeded from the batch, against codebook collapse), the straight-through estimator (the rotation trick off,
as in LC-Rec), commitment weight beta.

Collisions: two items may land on the same code. They are resolved by *last-level re-assignment*: within a group
sharing a code, the item closest to the code keeps it; each other item takes the nearest last-level code that no
item under the same (L-1)-prefix uses. This keeps every code L tokens long (an extra disambiguation level would
add a token to every item in every prompt) and keeps the first L-1 levels, which carry the coarse semantics,
untouched. When more than C items share an (L-1)-prefix, the extra ones move up one level (the nearest free code
under their (L-2)-prefix), and so on; only a catalogue about as large as C^L fails (the error says to enlarge C or L).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recbole_llm.losses import info_nce
from recbole_llm.settings import SettingError


@dataclass
class CodebookStats:
    """What a user checks after tokenization (written next to the cached codes)."""

    items: int
    levels: int
    codebook_size: int
    collision_rate: float  # share of items whose raw code is shared with another item, before resolution
    reassigned: int  # items moved to another last-level code by the resolution
    usage: list[float]  # per level: distinct codes used / codebook_size
    perplexity: list[float]  # per level: exp(entropy of the code distribution); codebook_size = uniform use
    reconstruction_error: float  # mean squared error of x_hat against x (standardised inputs)
    alignment_loss: float | None  # final InfoNCE against the text embeddings (None without alignment)
    cold_items: int = 0  # items without a training interaction, whose vectors were regressed from their text

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(widths: list[int]) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResidualCodebook(nn.Module):
    """Encoder MLP -> ResidualVQ (``levels`` x ``codebook_size``) -> decoder MLP, plus the alignment projection."""

    def __init__(self, input_dim: int, *, levels: int, codebook_size: int, code_dim: int = 32, hidden: int = 128,
                 beta: float = 0.25, text_dim: int | None = None, kmeans_iters: int = 10, dead_code_threshold: int = 1,
                 decay: float = 0.95):
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ

        self.levels, self.codebook_size = levels, codebook_size
        self.encoder = _mlp([input_dim, hidden, code_dim])
        self.decoder = _mlp([code_dim, hidden, input_dim])
        self.quantizer = ResidualVQ(
            dim=code_dim, num_quantizers=levels, codebook_size=codebook_size, kmeans_init=True,
            kmeans_iters=kmeans_iters, threshold_ema_dead_code=dead_code_threshold, decay=decay,
            commitment_weight=beta, rotation_trick=False,
        )
        self.align = nn.Linear(code_dim, text_dim) if text_dim else None
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("std", torch.ones(input_dim))

    def forward(self, x: torch.Tensor):
        """``(z_hat, codes [N, L], commitment loss per level [L], x_hat)`` for standardised ``x``."""
        z_hat, codes, commitment = self.quantizer(self.encoder(x))
        return z_hat, codes, commitment, self.decoder(z_hat)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def losses(self, x: torch.Tensor, text: torch.Tensor | None, lambda_align: float, tau: float) -> dict:
        z_hat, _, commitment, x_hat = self(x)
        terms = {"reconstruction": F.mse_loss(x_hat, x), "commitment": commitment.sum()}
        if text is not None and self.align is not None and lambda_align > 0:
            terms["alignment"] = lambda_align * info_nce(self.align(z_hat), text, tau, symmetric=True)
        return terms

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [N, L], squared distances of the last residual to every last-level code [N, C])``."""
        z = self.encoder(x)
        codes = []
        residual = z
        for level, layer in enumerate(self.quantizer.layers):
            codebook = layer.codebook  # [C, d]
            distances = torch.cdist(residual, codebook) ** 2
            index = distances.argmin(-1)
            codes.append(index)
            if level < self.levels - 1:
                residual = residual - codebook[index]
        return torch.stack(codes, dim=1), distances


def train_residual_codebook(items: torch.Tensor, text: torch.Tensor | None, *, levels: int, codebook_size: int,
                            epochs: int, lr: float = 1e-3, batch_size: int = 2048, lambda_align: float = 0.0,
                            tau: float = 0.1, beta: float = 0.25, code_dim: int = 32, hidden: int = 128,
                            seed: int = 0, progress: bool = False) -> tuple[ResidualCodebook, float | None]:
    """Train a :class:`ResidualCodebook` on item vectors ``items [N, D]`` (row i = item i), aligned with
    ``text [N, H]`` when ``lambda_align > 0``. Returns the model (eval mode) and the last alignment loss."""
    from tqdm.auto import tqdm

    if len(items) < codebook_size:
        raise SettingError(
            f"semconv_codebook_size={codebook_size} is larger than the {len(items)} items to quantize: k-means cannot "
            "place that many centres. Use a smaller codebook (e.g. --semconv_codebook_size=64)."
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResidualCodebook(items.shape[1], levels=levels, codebook_size=codebook_size, code_dim=code_dim,
                                 hidden=hidden, beta=beta, text_dim=text.shape[1] if text is not None else None)
        model.mean.copy_(items.mean(0))
        model.std.copy_(items.std(0).clamp(min=1e-6))
        x = model.standardise(items.float())
        text = text.float() if text is not None else None
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        alignment = None
        for _ in tqdm(range(epochs), desc="Semantic IDs", ncols=100, disable=not progress):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                rows = order[start: start + batch_size]
                terms = model.losses(x[rows], text[rows] if text is not None else None, lambda_align, tau)
                optimizer.zero_grad(set_to_none=True)
                sum(terms.values()).backward()
                optimizer.step()
                if "alignment" in terms:
                    alignment = float(terms["alignment"].detach()) / lambda_align
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, alignment


def resolve_collisions(codes: torch.Tensor, last_distances: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, int]:
    """Unique codes by last-level re-assignment (see the module docstring). Returns ``(codes, items moved)``.

    ``codes [N, L]``; ``last_distances [N, C]``: each item's distance to every last-level code (a random matrix
    gives a random but still unique assignment). An item whose (L-1)-prefix has no free last-level code left
    moves to the nearest free code under its (L-2)-prefix, and so on up: it keeps the longest prefix it can."""
    codes = codes.clone()
    levels = codes.shape[1]
    weights = codebook_size ** np.arange(levels - 1, -1, -1, dtype=np.int64)
    keys = codes.numpy() @ weights
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    if counts.max(initial=1) == 1:
        return codes, 0
    used = set(keys.tolist())
    moved = 0
    for group in np.flatnonzero(counts > 1):
        members = np.flatnonzero(inverse == group)
        last = int(codes[members[0], -1])
        keep = members[np.argmin(last_distances[members, last].numpy())]
        for item in members[members != keep]:
            codes[item] = _nearest_free_code(codes[item], last_distances[item], used, codebook_size, weights)
            used.add(int(codes[item].numpy() @ weights))
            moved += 1
    return codes, moved


def _nearest_free_code(code: torch.Tensor, distances: torch.Tensor, used: set, codebook_size: int,
                       weights: np.ndarray) -> torch.Tensor:
    levels = len(code)
    for depth in range(levels - 1, -1, -1):  # keep the first ``depth`` levels
        free_levels = levels - depth
        if codebook_size ** free_levels > 1 << 24:
            break
        tails = np.indices((codebook_size,) * free_levels).reshape(free_levels, -1).T
        candidates = np.concatenate([np.broadcast_to(code[:depth].numpy(), (len(tails), depth)), tails], axis=1)
        free = candidates[~np.isin(candidates @ weights, np.fromiter(used, dtype=np.int64))]
        if len(free):
            best = np.argmin(distances.numpy()[free[:, -1]])  # first (lexicographically) among equals
            return torch.from_numpy(free[best].copy())
    raise SettingError(
        f"no free code near {code.tolist()}: the catalogue has nearly as many items as codes. Raise "
        "semconv_codebook_size or semconv_levels."
    )


def code_statistics(codes: torch.Tensor, codebook_size: int) -> tuple[list[float], list[float]]:
    """Per level: (share of the codebook used, perplexity of the code distribution)."""
    usage, perplexity = [], []
    for level in range(codes.shape[1]):
        counts = torch.bincount(codes[:, level], minlength=codebook_size).double()
        p = counts[counts > 0] / counts.sum()
        usage.append(float((counts > 0).sum()) / codebook_size)
        perplexity.append(float(math.exp(-(p * p.log()).sum())))
    return usage, perplexity


def collision_rate(codes: torch.Tensor) -> float:
    """Share of items whose code another item also has."""
    _, inverse, counts = np.unique(codes.numpy(), axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.reshape(-1)] > 1).mean())


def learn_semantic_ids(items: torch.Tensor, text: torch.Tensor | None, *, levels: int, codebook_size: int,
                       epochs: int, lambda_align: float, seed: int, progress: bool = False,
                       **train_kwargs) -> tuple[torch.Tensor, CodebookStats, ResidualCodebook]:
    """Train the codebooks and return unique codes ``[N, L]``, their statistics and the trained module."""
    model, alignment = train_residual_codebook(items, text, levels=levels, codebook_size=codebook_size, epochs=epochs,
                                               lambda_align=lambda_align, seed=seed, progress=progress, **train_kwargs)
    x = model.standardise(items.float())
    with torch.no_grad():
        raw, distances = model.encode(x)
        reconstruction = float(F.mse_loss(model.decoder(model.quantizer.get_output_from_indices(raw)), x))
    codes, moved = resolve_collisions(raw, distances, codebook_size)
    usage, perplexity = code_statistics(codes, codebook_size)
    stats = CodebookStats(len(items), levels, codebook_size, collision_rate(raw), moved, usage, perplexity,
                          reconstruction, alignment)
    return codes, stats, model


def random_semantic_ids(n_items: int, *, levels: int, codebook_size: int, seed: int) -> tuple[torch.Tensor, CodebookStats]:
    """The "random codes" ablation: uniform codes per level, made unique the same way as learned ones."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(codebook_size, (n_items, levels), generator=generator)
    codes, moved = resolve_collisions(raw, torch.rand(n_items, codebook_size, generator=generator), codebook_size)
    usage, perplexity = code_statistics(codes, codebook_size)
    return codes, CodebookStats(n_items, levels, codebook_size, collision_rate(raw), moved, usage, perplexity,
                                float("nan"), None)
