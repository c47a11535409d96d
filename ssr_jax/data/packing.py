"""The one packer: {'inputs', 'targets'} examples -> the trainer's encoder-decoder batch.

Every path (the SeqIO input pipeline, the online SSR stage after the rewrite, the offline
SSR task) packs with this module, so the same examples always give the same batches.

Greedy packing in arrival order: rows of a [batch, length] batch are filled one after the
other with whole examples; an example that does not fit in the rest of the current row
(inputs or targets) starts the next row; when it does not fit in the last row it is kept
as `pending` and opens the next batch. With pack=False every example gets its own row.
The only state between batches is that pending example, exposed for checkpointing.

Batch (int32 numpy, [batch, length]), as T5X's encoder-decoder feature converter:
  encoder_input_tokens, decoder_target_tokens, decoder_input_tokens (targets shifted right
  by one within each segment, starting with 0), decoder_loss_weights (1 on real targets),
  and with pack=True encoder_segment_ids / decoder_segment_ids (1, 2, ... per example in
  a row, 0 on padding) and encoder_positions / decoder_positions (restart at 0 per segment).
With pack=False, scalar extra features named in `passthrough` (e.g. 'num_spans') are
carried as int32 [batch] arrays (0 on empty rows).
"""
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Example = Mapping[str, np.ndarray]

PACKED_KEYS = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
               "decoder_positions")
BASE_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
             "decoder_loss_weights")


class ExampleTooLongError(ValueError):
    """An example longer than the batch's length: packing never truncates silently."""


class _BatchBuilder:
    def __init__(self, batch_size: int, inputs_length: int, targets_length: int, pack: bool,
                 passthrough: Sequence[str]):
        self.batch_size, self.pack = batch_size, pack
        self.li, self.lt = inputs_length, targets_length
        self.passthrough = tuple(passthrough)
        b = batch_size
        self.enc = np.zeros((b, inputs_length), np.int32)
        self.tgt = np.zeros((b, targets_length), np.int32)
        self.dec_in = np.zeros((b, targets_length), np.int32)
        self.enc_seg = np.zeros((b, inputs_length), np.int32)
        self.dec_seg = np.zeros((b, targets_length), np.int32)
        self.enc_pos = np.zeros((b, inputs_length), np.int32)
        self.dec_pos = np.zeros((b, targets_length), np.int32)
        self.extra = {k: np.zeros((b,), np.int32) for k in self.passthrough}
        self.row = 0
        self.enc_used = self.tgt_used = self.segments = 0
        self.num_examples = 0

    def _check(self, inputs: np.ndarray, targets: np.ndarray):
        if inputs.shape[0] > self.li or targets.shape[0] > self.lt:
            raise ExampleTooLongError(
                f"example with {inputs.shape[0]} inputs / {targets.shape[0]} targets does "
                f"not fit lengths {self.li} / {self.lt}; trim it before packing")

    def try_add(self, ex: Example) -> bool:
        """Places ex in the current or next row; False when the batch is full."""
        inputs = np.asarray(ex["inputs"], np.int32).reshape(-1)
        targets = np.asarray(ex["targets"], np.int32).reshape(-1)
        self._check(inputs, targets)
        if self.segments > 0 and (not self.pack or self.enc_used + inputs.shape[0] > self.li
                                  or self.tgt_used + targets.shape[0] > self.lt):
            self.row += 1
            self.enc_used = self.tgt_used = self.segments = 0
        if self.row >= self.batch_size:
            self.row = self.batch_size  # stays full
            return False
        r, e0, t0 = self.row, self.enc_used, self.tgt_used
        ni, nt = inputs.shape[0], targets.shape[0]
        seg = self.segments + 1
        self.enc[r, e0:e0 + ni] = inputs
        self.enc_seg[r, e0:e0 + ni] = seg
        self.enc_pos[r, e0:e0 + ni] = np.arange(ni)
        self.tgt[r, t0:t0 + nt] = targets
        self.dec_seg[r, t0:t0 + nt] = seg
        self.dec_pos[r, t0:t0 + nt] = np.arange(nt)
        if nt:
            self.dec_in[r, t0 + 1:t0 + nt] = targets[:-1]  # dec_in[r, t0] stays 0
        for k in self.passthrough:
            self.extra[k][r] = int(np.asarray(ex[k]).reshape(()))
        self.enc_used, self.tgt_used, self.segments = e0 + ni, t0 + nt, seg
        self.num_examples += 1
        return True

    @property
    def empty(self) -> bool:
        return self.num_examples == 0

    def batch(self) -> Dict[str, np.ndarray]:
        out = {"encoder_input_tokens": self.enc, "decoder_target_tokens": self.tgt,
               "decoder_input_tokens": self.dec_in,
               "decoder_loss_weights": (self.dec_seg > 0).astype(np.int32)}
        if self.pack:
            out.update(encoder_segment_ids=self.enc_seg, decoder_segment_ids=self.dec_seg,
                       encoder_positions=self.enc_pos, decoder_positions=self.dec_pos)
        else:
            out.update(self.extra)
        return out


def _to_jsonable(ex: Example) -> Dict[str, list]:
    return {k: np.asarray(v).tolist() for k, v in ex.items()}


class StreamingPacker:
    """Packs a stream of examples into fixed-shape batches; see the module docstring."""

    def __init__(self, batch_size: int, inputs_length: int, targets_length: int,
                 pack: bool = True, passthrough: Sequence[str] = ()):
        if batch_size < 1 or inputs_length < 1 or targets_length < 1:
            raise ValueError("batch_size and lengths must be positive")
        self.batch_size, self.inputs_length, self.targets_length = (
            batch_size, inputs_length, targets_length)
        self.pack = pack
        self.passthrough = tuple(passthrough) if not pack else ()
        self.pending: Optional[Example] = None

    def next_batch(self, examples: Iterator[Example], allow_partial: bool = True
                   ) -> Dict[str, np.ndarray]:
        """Fills one batch from `pending` then `examples`.

        At the end of `examples` a partly filled batch is returned (padding rows/positions)
        when allow_partial; StopIteration when nothing is left.
        """
        builder = _BatchBuilder(self.batch_size, self.inputs_length, self.targets_length,
                                self.pack, self.passthrough)
        while True:
            if self.pending is not None:
                ex, self.pending = self.pending, None
            else:
                try:
                    ex = next(examples)
                except StopIteration:
                    if builder.empty or not allow_partial:
                        raise
                    return builder.batch()
            if not builder.try_add(ex):
                self.pending = ex
                return builder.batch()

    def get_state(self) -> Dict:
        return {"pending": None if self.pending is None else _to_jsonable(self.pending)}

    def set_state(self, state: Mapping):
        pending = state.get("pending")
        self.pending = None if pending is None else {
            k: np.asarray(v, np.int32) for k, v in pending.items()}


def pack_examples(examples: Sequence[Example], batch_size: int, inputs_length: int,
                  targets_length: int, pack: bool = True, passthrough: Sequence[str] = ()
                  ) -> Tuple[Dict[str, np.ndarray], List[Example]]:
    """Packs examples in order into one batch; returns (batch, examples that did not fit).

    Used by the online SSR stage after the rewrite. The batch may be partly empty.
    """
    builder = _BatchBuilder(batch_size, inputs_length, targets_length, pack,
                            passthrough if not pack else ())
    for i, ex in enumerate(examples):
        if not builder.try_add(ex):
            return builder.batch(), list(examples[i:])
    return builder.batch(), []


def batches(examples: Iterable[Example], batch_size: int, inputs_length: int,
            targets_length: int, pack: bool = True) -> Iterator[Dict[str, np.ndarray]]:
    """All batches of a finite example stream (the last one may be partial)."""
    packer = StreamingPacker(batch_size, inputs_length, targets_length, pack)
    it = iter(examples)
    while True:
        try:
            yield packer.next_batch(it)
        except StopIteration:
            return
