"""Colour the tokens of a new text by a registered probe's score (an HTML page)."""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.hooks import capture_residuals
from lmlab.models import LoadedModel
from lmlab.shading import probability_colour, shaded_spans


@dataclass(frozen=True)
class ScoredText:
    pieces: list[str]  # the text of each chain token, in order (concatenation = the text)
    scores: np.ndarray  # probe probability at each chain token
    metadata: dict[str, Any]

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold", 0.5))


def probe_metadata(model: Any) -> dict[str, Any]:
    meta = dict(model.metadata.metadata or {})
    for key in ("layer", "lag", "label", "width"):
        if key not in meta:
            raise LmlabError(f"the loaded model is not an lmlab probe (metadata lacks {key!r})")
    return meta


def score_text(lm: LoadedModel, model: Any, text: str, problem: str) -> ScoredText:
    """Probe scores for every token of ``text`` read as the answer to ``problem``."""
    meta = probe_metadata(model)
    if int(meta["width"]) != lm.hidden_size:
        raise LmlabError(f"probe expects width {meta['width']}, model {lm.spec.name!r} has "
                         f"{lm.hidden_size}")
    if not text.strip():
        raise LmlabError("the text to score is empty")
    prompt = lm.format_chat(problem)
    full = prompt + text
    encoded = lm.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([encoded["input_ids"]])
    offsets = np.asarray(encoded["offset_mapping"]).reshape(-1, 2)
    layer = int(meta["layer"])
    acts = capture_residuals(lm, ids, torch.ones_like(ids), [layer])[layer][0].float().numpy()
    if acts.shape[0] != ids.shape[1]:
        raise LmlabError(f"{acts.shape[0]} activations for {ids.shape[1]} tokens")
    keep = offsets[:, 0] >= len(prompt)
    with warnings.catch_warnings():
        # MLflow asks for predict type hints; the probe carries a tensor signature instead.
        warnings.filterwarnings("ignore", message=".*type hints.*")
        scores = np.asarray(model.predict(acts[keep].astype(np.float32)), dtype=np.float32)
    scores = scores.reshape(-1)
    pieces = [full[a:b] for a, b in offsets[keep]]
    return ScoredText(pieces, scores, meta)


def render_html(scored: ScoredText, title: str) -> str:
    meta = scored.metadata
    lag = int(meta["lag"])
    spans = shaded_spans(scored.pieces, scored.scores, probability_colour,
                         title=lambda score: f"p={score:.3f}",
                         underline=lambda score: score >= scored.threshold)
    where = "this token" if lag == 0 else (f"the token {lag} ahead" if lag > 0
                                           else f"the token {-lag} back")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        "<body style='font-family:sans-serif;max-width:60em;margin:2em auto'>"
        f"<h2>{html.escape(title)}</h2>"
        f"<p>Label <b>{html.escape(str(meta['label']))}</b>, layer {meta['layer']}, lag {lag}: "
        f"each token is shaded by the probe's probability that {where} is labelled "
        f"{html.escape(str(meta['label']))}. Underlined: at or above the chosen threshold "
        f"{scored.threshold:.3f}. Hover for values.</p>"
        "<div style='white-space:pre-wrap;line-height:1.7;font-family:monospace'>"
        + spans + "</div></body></html>")
