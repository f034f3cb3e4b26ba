"""Teacher-forced token scores of a model beside model-free baselines, on the same targets.

A *target* is one token the model predicts from the tokens before it in its sequence (what validation loss
scores). For a modality of T tokens per image each target has its block position p (0..T-1: where it sits in
its own image's tokens) and, for p > 0, the token u before it in the same block.

The baselines know nothing but token statistics of the training rows (`TokenBaselines.fit`):

  position   at block position p, the token most frequent at p in the training rows (top-5: the five most
             frequent there); its probabilities are the counts at p, add-half smoothed over the vocabulary
  bigram     the token that most often followed u in the training rows; P(v | u) = (c(u, v) + s P_uni(v)) /
             (c(u) + s), s = BIGRAM_STRENGTH; at p = 0 (no u in the block) it is the unigram
  unigram    the token most frequent anywhere in the training rows; add-half smoothed counts

Scores (`TokenScores`), per modality and scorer: loss (mean cross-entropy, nats), perplexity (exp of it),
accuracy (the most probable token is the target) and top-5 accuracy, over the targets of rows that have the
modality; `spread` is the standard error of the mean over rows (the rows are the sample; the scores are
deterministic). The model's accuracies count only ids the codec has (`vocab` of the store: an upstream model
with a larger vocabulary never gets credit for an id no image holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SCORERS = ("model", "position", "bigram", "unigram")
BASELINES = SCORERS[1:]
BIGRAM_STRENGTH = 5.0  # pseudo-counts of the unigram in each bigram context
ADD = 0.5  # add-half (Jeffreys) smoothing of position and unigram counts
TOP = 5


@dataclass
class ModalityBaselines:
    """Token statistics of one modality's training rows: what the three baselines predict from."""

    vocab: int
    tokens_per_image: int
    rows: int  # training rows counted
    pos_logp: np.ndarray  # [T, V] float32: log P(v at position p)
    pos_top: np.ndarray  # [T, TOP] int64: most frequent tokens at p, most frequent first
    uni_logp: np.ndarray  # [V] float64
    uni_top: np.ndarray  # [TOP] int64
    pair_keys: np.ndarray  # [pairs] int64, sorted: u * V + v of every (u, v) seen in a block
    pair_counts: np.ndarray  # [pairs] int64
    context_counts: np.ndarray  # [V] int64: c(u), pairs with u first
    next_top: np.ndarray  # [V, TOP] int64: most frequent followers of u (padded with the unigram's)

    @classmethod
    def fit(cls, chunks, vocab: int, tokens_per_image: int) -> "ModalityBaselines":
        """Count over an iterable of [n, T] token arrays (the training rows, in pieces)."""
        T, V = tokens_per_image, vocab
        pos_counts = np.zeros(T * V, dtype=np.int64)
        pair_keys, pair_counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows = 0
        for tok in chunks:
            tok = np.asarray(tok, dtype=np.int64)
            if not len(tok):
                continue
            rows += len(tok)
            pos_counts += np.bincount((np.arange(T) * V + tok).ravel(), minlength=T * V)
            keys, counts = np.unique((tok[:, :-1] * V + tok[:, 1:]).ravel(), return_counts=True)
            pair_keys, pair_counts = _merge_counts(pair_keys, pair_counts, keys, counts)
        if rows == 0:
            raise ValueError("no training rows to fit the baselines on")
        pos_counts = pos_counts.reshape(T, V)
        pos_p = (pos_counts + ADD) / (pos_counts.sum(1, keepdims=True) + ADD * V)  # [T, V]
        uni_counts = pos_counts.sum(0)  # [V]
        uni_p = (uni_counts + ADD) / (uni_counts.sum() + ADD * V)
        uni_top = _top(uni_counts[None], TOP)[0]
        context = np.bincount(pair_keys // V, weights=pair_counts, minlength=V).astype(np.int64)
        return cls(vocab=V, tokens_per_image=T, rows=rows, pos_logp=np.log(pos_p).astype(np.float32),
                   pos_top=_top(pos_counts, TOP), uni_logp=np.log(uni_p), uni_top=uni_top,
                   pair_keys=pair_keys, pair_counts=pair_counts, context_counts=context,
                   next_top=_followers(pair_keys, pair_counts, V, uni_top))

    def score(self, target: np.ndarray, position: np.ndarray, previous: np.ndarray) -> dict[str, tuple]:
        """{baseline: (log-probability [n], top-1 hit [n], top-5 hit [n])} of targets [n] at block positions [n]
        after the block's previous tokens [n] (-1 where position is 0)."""
        y = np.asarray(target, dtype=np.int64)
        p = np.asarray(position, dtype=np.int64)
        u = np.asarray(previous, dtype=np.int64)
        out = {}
        pos_top = self.pos_top[p]  # [n, TOP]
        out["position"] = (self.pos_logp[p, y].astype(np.float64), pos_top[:, 0] == y, (pos_top == y[:, None]).any(1))
        uni_logp = self.uni_logp[y]
        uni_hit1, uni_hit5 = self.uni_top[0] == y, (self.uni_top[None] == y[:, None]).any(1)
        out["unigram"] = (uni_logp, uni_hit1, uni_hit5)
        has_u = u >= 0
        uu = np.where(has_u, u, 0)
        key = uu * self.vocab + y
        if len(self.pair_keys):
            at = np.searchsorted(self.pair_keys, key).clip(max=len(self.pair_keys) - 1)
            pair = np.where(self.pair_keys[at] == key, self.pair_counts[at], 0)
        else:
            pair = np.zeros_like(key)
        bi_logp = np.log((pair + BIGRAM_STRENGTH * np.exp(uni_logp)) / (self.context_counts[uu] + BIGRAM_STRENGTH))
        next_top = self.next_top[uu]  # [n, TOP]
        out["bigram"] = (np.where(has_u, bi_logp, uni_logp), np.where(has_u, next_top[:, 0] == y, uni_hit1),
                         np.where(has_u, (next_top == y[:, None]).any(1), uni_hit5))
        return out

    def position_tokens(self) -> np.ndarray:
        """[T] int64: the most frequent token at each position (what the position baseline writes)."""
        return self.pos_top[:, 0].copy()


def _merge_counts(keys_a, counts_a, keys_b, counts_b):
    """Two sparse count tables (sorted unique keys) -> their sum, sorted unique."""
    keys = np.concatenate([keys_a, keys_b])
    counts = np.concatenate([counts_a, counts_b])
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)


def _top(counts: np.ndarray, k: int) -> np.ndarray:
    """[R, V] counts -> [R, k] ids of the k largest per row, largest first (ties: the smaller id)."""
    order = np.argsort(-counts, axis=1, kind="stable")
    return order[:, :k].astype(np.int64)


def _followers(pair_keys, pair_counts, vocab: int, fill: np.ndarray) -> np.ndarray:
    """[V, TOP]: per context u its most frequent followers (ties: smaller id), padded with `fill` ids not yet
    listed (the unigram's most frequent), so every context has TOP distinct guesses."""
    out = np.tile(fill, (vocab, 1))
    if not len(pair_keys):
        return out
    u, v = pair_keys // vocab, pair_keys % vocab
    order = np.lexsort((v, -pair_counts, u))  # by context, then count descending, then id
    u, v = u[order], v[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    rank = np.arange(len(u)) - np.repeat(starts, np.diff(np.r_[starts, len(u)]))
    keep = rank < TOP
    chosen = np.full((vocab, TOP), -1, dtype=np.int64)
    chosen[u[keep], rank[keep]] = v[keep]
    for ctx in np.unique(u):  # pad contexts with fewer than TOP followers (few: most contexts are full)
        row = chosen[ctx]
        if (row < 0).any():
            have = row[row >= 0]
            extra = [t for t in fill.tolist() if t not in set(have.tolist())][: TOP - len(have)]  # fill: TOP distinct
            out[ctx] = np.concatenate([have, np.asarray(extra, dtype=np.int64)])
        else:
            out[ctx] = row
    return out


HEAD = 11  # the scalar sums at the head of `_Tally.vector()`


@dataclass
class _Tally:
    """Sums of one scorer on one modality: targets, summed log-loss, hits; per row and per block position."""

    tokens_per_image: int
    targets: int = 0
    nll: float = 0.0
    hit1: int = 0
    hit5: int = 0
    rows: int = 0
    row_acc: float = 0.0  # sum over rows of each row's accuracy
    row_acc_sq: float = 0.0
    row_nll: float = 0.0
    row_nll_sq: float = 0.0
    row_top5: float = 0.0
    row_top5_sq: float = 0.0
    by_position: np.ndarray = field(default=None)  # [T, 2]: targets, top-1 hits at each block position

    def __post_init__(self):
        if self.by_position is None:
            self.by_position = np.zeros((self.tokens_per_image, 2), dtype=np.int64)

    def add(self, row: np.ndarray, position: np.ndarray, logp: np.ndarray, hit1: np.ndarray, hit5: np.ndarray):
        self.targets += len(row)
        self.nll -= float(logp.sum())
        self.hit1 += int(hit1.sum())
        self.hit5 += int(hit5.sum())
        uniq, local = np.unique(row, return_inverse=True)
        count = np.bincount(local).astype(np.float64)
        acc = np.bincount(local, weights=hit1.astype(np.float64)) / count
        nll = -np.bincount(local, weights=logp) / count
        top5 = np.bincount(local, weights=hit5.astype(np.float64)) / count
        self.rows += len(uniq)
        self.row_acc += float(acc.sum())
        self.row_acc_sq += float((acc**2).sum())
        self.row_nll += float(nll.sum())
        self.row_nll_sq += float((nll**2).sum())
        self.row_top5 += float(top5.sum())
        self.row_top5_sq += float((top5**2).sum())
        np.add.at(self.by_position, position, np.stack([np.ones_like(position), hit1.astype(np.int64)], 1))

    def vector(self) -> np.ndarray:
        head = [self.targets, self.nll, self.hit1, self.hit5, self.rows, self.row_acc, self.row_acc_sq,
                self.row_nll, self.row_nll_sq, self.row_top5, self.row_top5_sq]
        return np.concatenate([np.asarray(head, dtype=np.float64), self.by_position.ravel().astype(np.float64)])

    def load(self, vec: np.ndarray) -> None:
        (self.targets, self.nll, self.hit1, self.hit5, self.rows, self.row_acc, self.row_acc_sq, self.row_nll,
         self.row_nll_sq, self.row_top5, self.row_top5_sq) = vec[:HEAD].tolist()
        self.by_position = np.rint(vec[HEAD:]).astype(np.int64).reshape(-1, 2)

    def summary(self) -> dict:
        n, r = max(self.targets, 1), max(self.rows, 1)
        loss = self.nll / n
        perplexity = math.exp(min(loss, 700.0))
        stderr_loss = _stderr(self.row_nll, self.row_nll_sq, r)
        return {"loss": loss, "perplexity": perplexity, "accuracy": self.hit1 / n, "top5_accuracy": self.hit5 / n,
                "stderr_accuracy": _stderr(self.row_acc, self.row_acc_sq, r), "stderr_loss": stderr_loss,
                "stderr_top5_accuracy": _stderr(self.row_top5, self.row_top5_sq, r),
                # the delta method: d exp(loss) = exp(loss) d loss
                "stderr_perplexity": None if stderr_loss is None else perplexity * stderr_loss}


def _stderr(total: float, total_sq: float, n: float) -> float | None:
    """Standard error of a mean from the sum and sum of squares of n values (None for fewer than two)."""
    if n < 2:
        return None
    var = max(total_sq / n - (total / n) ** 2, 0.0) * n / (n - 1)
    return math.sqrt(var / n)


class TokenScores:
    """Accumulates teacher-forced scores of a model and the baselines over batches, per modality."""

    def __init__(self, baselines: dict[str, ModalityBaselines]):
        self.baselines = baselines
        self.tallies = {m: {s: _Tally(b.tokens_per_image) for s in SCORERS} for m, b in baselines.items()}

    def add_batch(self, model, logits, targets, inputs, order=None, loss_mask=None, row_offset: int = 0) -> None:
        """One teacher-forced batch: logits (B, L-1, vocab) of `model` for targets (B, L-1) after inputs (B, L-1);
        `order` (B, M) and `loss_mask` (B, L-1) as the model's forward takes them."""
        import torch
        import torch.nn.functional as F

        B, L1 = targets.shape
        names = list(model.names)
        # (B, L-1): index into names of each target, and its position in its own block
        modality, within = model.place(1, L1, order, B, targets.device)
        within = within.expand(B, -1)
        keep = torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
        for k, name in enumerate(names):
            if name not in self.tallies:
                continue
            vocab = self.baselines[name].vocab
            sel = (modality == k) & keep  # (B, L-1)
            if not bool(sel.any()):
                continue
            every = bool(sel.all())  # one modality, nothing masked: a view, not a copy of the logits
            lg = logits.reshape(-1, logits.size(-1)) if every else logits[sel]  # (n, vocab_model)
            y = targets.reshape(-1) if every else targets[sel]
            logp = -F.cross_entropy(lg.float(), y, reduction="none")
            top = lg[:, :vocab].topk(min(TOP, vocab), dim=-1).indices  # (n, TOP)
            hit5 = (top == y[:, None]).any(1)
            hit1 = top[:, 0] == y
            rows = torch.arange(B, device=targets.device)[:, None].expand(B, L1)[sel] + row_offset
            pos = within[sel]
            prev = torch.where(pos > 0, inputs[sel], torch.full_like(y, -1))
            rows, pos, prev, y = (t.cpu().numpy() for t in (rows, pos, prev, y))
            tallies = self.tallies[name]
            tallies["model"].add(rows, pos, logp.double().cpu().numpy(), hit1.cpu().numpy(), hit5.cpu().numpy())
            for b, (b_logp, b_hit1, b_hit5) in self.baselines[name].score(y, pos, prev).items():
                tallies[b].add(rows, pos, b_logp, b_hit1, b_hit5)

    def vector(self) -> np.ndarray:
        """Every sum as one float64 vector (to all-reduce over ranks)."""
        return np.concatenate([t.vector() for m in self.tallies for t in self.tallies[m].values()])

    def load(self, vec: np.ndarray) -> None:
        """Set every sum from `vector()`'s layout (e.g. after an all-reduce)."""
        i = 0
        for m in self.tallies:
            for t in self.tallies[m].values():
                n = HEAD + t.by_position.size
                t.load(vec[i : i + n])
                i += n

    def summary(self) -> dict:
        """{modality: {"targets", "rows", metric: {"model", "baselines": {name: value}, "spread", "spread_of"}}}."""
        out = {}
        for m, tallies in self.tallies.items():
            s = {k: t.summary() for k, t in tallies.items()}
            entry = {"targets": int(tallies["model"].targets), "rows": int(tallies["model"].rows)}
            for metric in ("loss", "perplexity", "accuracy", "top5_accuracy"):
                spread = s["model"].get(f"stderr_{metric}")
                entry[metric] = {"model": s["model"][metric], "baselines": {b: s[b][metric] for b in BASELINES},
                                 "spread": spread, "spread_of": "standard error over rows" if spread is not None else None}
            out[m] = entry
        return out

    def accuracy_by_position(self, modality: str) -> dict[str, np.ndarray]:
        """{scorer: [T] top-1 accuracy at each block position (NaN where nothing was scored)}."""
        out = {}
        for s, t in self.tallies[modality].items():
            n = t.by_position[:, 0].astype(np.float64)
            out[s] = np.where(n > 0, t.by_position[:, 1] / np.maximum(n, 1), np.nan)
        return out


BASELINE_STREAM = 0xBA5E  # the second word of the seed that samples training rows for the baselines


def seeded_subset(rows: np.ndarray, n: int, key: list[int]) -> np.ndarray:
    """All of `rows`, or n of them drawn without replacement by np.random.default_rng(key), sorted."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) <= n:
        return rows
    return np.sort(np.random.default_rng(key).choice(rows, size=n, replace=False))


def baseline_rows(rows: np.ndarray, max_rows: int, seed: int = 0) -> np.ndarray:
    """The training rows the baselines count: all of `rows`, or a seeded sample of `max_rows` of them (sorted)."""
    return seeded_subset(rows, max_rows, [seed, BASELINE_STREAM])


def fit_baselines(store, rows: np.ndarray, columns: dict[str, str | None], chunk: int = 4096
                  ) -> dict[str, ModalityBaselines]:
    """{model modality name: its baselines} counted over store `rows` (see `baseline_rows`) of the store column
    each name reads (None: the store's only column), leaving out rows that lack it (--keep-partial stores)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = {}
    for name, column in columns.items():
        def chunks(column=column):
            for i in range(0, len(rows), chunk):
                part = rows[i : i + chunk]
                tok = store.take(part, column)
                valid = store.valid(part).get(column or (store.modalities[0] if store.modalities else None))
                yield tok if valid is None else tok[valid]
        key = column or store.token_columns[0]  # each column's own vocabulary and length
        out[name] = ModalityBaselines.fit(chunks(), store.modality_vocab[key], store.modality_tokens[key])
    return out
