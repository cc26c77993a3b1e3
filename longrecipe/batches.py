"""Training data: the `samples` table read in a seeded order, and micro-batches made
from it with each sequence's boundaries stated explicitly.

Two layouts, picked by the attention backend:

- padded (sdpa, eager, flex_attention): one sample per row, right-padded, with a 2D
  attention mask of ones on real tokens. With an explicit mask transformers never
  infers packed sequences from gapped position ids.
- packed (flash attention): the micro-batch's samples concatenated into one row, with
  `cu_seq_lens_q/k` and `max_length_q/k`, so flash attention's varlen kernel gets the
  boundaries as given instead of cutting where position ids restart.

Targets are the next token of the same sample (-100 after each sample's last token and
on padding): the loss never predicts across a boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from longrecipe.artifacts import ArtifactRef
from longrecipe.errors import InputError

IGNORE_INDEX = -100

# backends that take explicit sequence boundaries (cu_seq_lens) instead of a mask
VARLEN_ATTENTION = {"flash_attention_2", "flash_attention_3"}


class TrainError(InputError):
    """Bad training input (samples, model, window); the message names the field or row."""


@dataclass
class Sample:
    sample_id: Any
    input_ids: np.ndarray
    position_ids: np.ndarray
    weights: np.ndarray | None = None
    """Loss weight of each token as a target (train.loss_weights), else None."""


@dataclass
class Batch:
    """One micro-batch as the model takes it. `targets[b, t]` is the token that hidden
    state [b, t] predicts (IGNORE_INDEX where none)."""

    input_ids: Any
    position_ids: Any
    attention_mask: Any
    targets: Any
    kwargs: dict = field(default_factory=dict)
    weights: Any = None
    """Loss weight per target, aligned with `targets` (0 where IGNORE_INDEX); None: all 1."""
    n_labels: int = 0
    n_tokens: int = 0
    max_position: int = 0


def collate(samples: list[Sample], pad_id: int, device, *, packed: bool = False) -> Batch:
    """A micro-batch: padded rows with a mask, or one packed row with cu_seq_lens."""
    import torch

    lengths = [len(s.input_ids) for s in samples]
    targets = [np.concatenate([s.input_ids[1:], [IGNORE_INDEX]]) for s in samples]
    weighted = samples[0].weights is not None
    # the weight of the token each position predicts: weights[t + 1], none after the last
    tw = [np.concatenate([s.weights[1:], [0.0]]).astype(np.float32) for s in samples] if weighted else None
    common = dict(
        n_labels=sum(k - 1 for k in lengths), n_tokens=sum(lengths),
        max_position=max(int(s.position_ids.max()) for s in samples),
    )
    if packed:
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        as_row = [np.concatenate(x)[None].astype(np.int64) for x in (
            [s.input_ids for s in samples], [s.position_ids for s in samples], targets)]
        ids, pos, tgt = (torch.from_numpy(a).to(device) for a in as_row)
        cu_t = torch.from_numpy(cu).to(device)
        kwargs = {"cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t,
                  "max_length_q": max(lengths), "max_length_k": max(lengths)}
        w = torch.from_numpy(np.concatenate(tw)[None]).to(device) if tw else None
        return Batch(ids, pos, None, tgt, kwargs, w, **common)
    n = max(lengths)
    ids = np.full((len(samples), n), pad_id, dtype=np.int64)
    pos = np.zeros((len(samples), n), dtype=np.int64)
    mask = np.zeros((len(samples), n), dtype=np.int64)
    tgt = np.full((len(samples), n), IGNORE_INDEX, dtype=np.int64)
    for i, (s, k) in enumerate(zip(samples, lengths, strict=True)):
        ids[i, :k] = s.input_ids
        pos[i, :k] = s.position_ids
        mask[i, :k] = 1
        tgt[i, :k] = targets[i]
    w = None
    if tw:
        wa = np.zeros((len(samples), n), dtype=np.float32)
        for i, (x, k) in enumerate(zip(tw, lengths, strict=True)):
            wa[i, :k] = x
        w = torch.from_numpy(wa).to(device)
    ids, pos, mask, tgt = (torch.from_numpy(a).to(device) for a in (ids, pos, mask, tgt))
    return Batch(ids, pos, mask, tgt, {}, w, **common)


class SampleStream:
    """Samples in a seeded order, epoch after epoch, addressed by a global position so a
    resumed run picks up exactly where the killed one stopped, and so that every process
    of a run agrees on which sample sits where.

    The order shuffles the parts, then the rows inside each part: a whole part is read
    once per visit, never one row at a time from all over the table.
    """

    def __init__(self, ref: ArtifactRef, seed: int, weights=None):
        """`weights` (longrecipe.token_weights.TokenWeights) gives each sample its
        per-token loss weights, from the sample's spans."""
        if "samples" not in ref.tables():
            raise TrainError(f"{ref.stage}/{ref.key} has no `samples` table to train on")
        self.ref, self.seed, self.weights = ref, seed, weights
        self.files = ref.files("samples")
        self.rows = [f["rows"] for f in ref.manifest["files"] if f.get("table") == "samples"]
        self.total = sum(self.rows)
        if self.total == 0:
            raise TrainError(f"{ref.stage}/{ref.key}: the `samples` table is empty")
        import pyarrow.parquet as pq

        names = pq.read_schema(self.files[0], filesystem=ref.fs).names
        missing = [c for c in ("sample_id", "input_ids", "position_ids") if c not in names]
        if missing:
            raise TrainError(
                f"{ref.stage}/{ref.key}: the `samples` table has no column {', '.join(missing)}"
            )
        self._epoch: int | None = None
        self._order: tuple[np.ndarray, np.ndarray] | None = None
        self._part: tuple[int, dict] | None = None

    def take(self, first: int, n: int) -> list[Sample]:
        return [self.get(first + i) for i in range(n)]

    def get(self, index: int) -> Sample:
        epoch, i = divmod(index, self.total)
        parts, rows = self._epoch_order(epoch)
        return self._row(int(parts[i]), int(rows[i]))

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            parts, rows = [], []
            for p in rng.permutation(len(self.rows)):
                parts.append(np.full(self.rows[p], p))
                rows.append(rng.permutation(self.rows[p]))
            self._epoch, self._order = epoch, (np.concatenate(parts), np.concatenate(rows))
        assert self._order is not None
        return self._order

    def _row(self, part: int, row: int) -> Sample:
        if self._part is None or self._part[0] != part:
            import pyarrow.parquet as pq

            columns = ["sample_id", "input_ids", "position_ids"]
            t = pq.read_table(self.files[part], columns=columns + ["spans"] * bool(self.weights),
                              filesystem=self.ref.fs)
            self._part = (part, {
                "sample_id": t.column("sample_id").to_pylist(),
                "input_ids": _offsets_values(t.column("input_ids")),
                "position_ids": _offsets_values(t.column("position_ids")),
                "spans": t.column("spans").to_pylist() if self.weights else None,
            })
        d = self._part[1]
        (ids_off, ids), (pos_off, pos) = d["input_ids"], d["position_ids"]
        sid = d["sample_id"][row]
        s = Sample(sid, ids[ids_off[row]:ids_off[row + 1]], pos[pos_off[row]:pos_off[row + 1]])
        if len(s.input_ids) != len(s.position_ids) or len(s.input_ids) < 2:
            raise TrainError(
                f"{self.ref.stage}/{self.ref.key}: sample {sid!r} has {len(s.input_ids)} "
                f"input ids and {len(s.position_ids)} position ids (need equal, at least 2)"
            )
        if self.weights is not None:
            s.weights = self.weights.of(d["spans"][row], len(s.input_ids), sid)
        return s


def _offsets_values(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks()
    return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)
