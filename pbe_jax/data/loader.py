"""The training input pipeline on grain: a source's items sharded by process, shuffled and repeated with a
seed, made into pairs (`pbe_jax.data.pairs`) in worker processes, and batched. Unusable items are skipped
and counted by reason, never fatal, and the iterator's position (a count of items, whatever the number of
workers) can be checkpointed and restored exactly."""
from __future__ import annotations

import dataclasses
import logging
import signal
from typing import Any, Sequence

import numpy as np

from pbe_jax.data import pairs, photos
from pbe_jax.data.photos import CorruptItem

BATCH_KEYS = ("image", "reference", "box", "box_ext")
STATS_KEYS = ("examples", *(f"rejected_{r}" for r in photos.REASONS), "skipped_boxes")

log = logging.getLogger(__name__)


class _ReadOrReject:
    """The source, with an item that cannot be read replaced by a reject record: in a worker process an
    exception would end the whole iteration, a record is counted and dropped in the main process."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        try:
            return self.source[i]
        except CorruptItem as e:
            return {"rejected": e.reason, "error": str(e), "skipped_boxes": 0}


@dataclasses.dataclass(frozen=True)
class _PairOrReject:
    """`pairs.make_pair` as a grain random map; an item without a usable box becomes a reject record."""

    config: pairs.PairConfig

    def __call__(self, item: dict, rng: np.random.Generator) -> dict:
        if "rejected" in item:
            return item
        try:
            return pairs.make_pair(item, rng, self.config)
        except pairs.NoValidBox as e:
            return {"rejected": photos.NO_BOX, "error": str(e), "skipped_boxes": len(item["boxes"])}


class _Tally:
    """Counts records as the main process consumes them, so the counts match the iterator's position."""

    def __init__(self):
        self.stats = dict.fromkeys(STATS_KEYS, 0)

    def admit(self, record: dict) -> bool:
        self.stats["skipped_boxes"] += int(record["skipped_boxes"])
        reason = record.get("rejected")
        if reason is None:
            self.stats["examples"] += 1
            return True
        self.stats[f"rejected_{reason}"] += 1
        # An unreadable file is worth a look; an image without a usable box is ordinary (COCO has some).
        log.log(logging.DEBUG if reason in (photos.NO_BOX, photos.TOO_SMALL) else logging.WARNING, "skipped %s",
                record["error"])
        return False

    @property
    def position(self) -> int:
        """Items of the stream consumed so far: one record each, used or rejected."""
        return self.stats["examples"] + sum(self.stats[f"rejected_{r}"] for r in photos.REASONS)


def _stack(records: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in records]) for k in BATCH_KEYS}


class PairIterator:
    """Batches {"image": uint8 (B, S, S, 3), "reference": uint8 (B, R, R, 3), "box": float32 (B, 4),
    "box_ext": float32 (B, 4)}. `stats` counts, since the start of training, the pairs made, the items
    rejected by reason (`photos.REASONS`) and the boxes skipped.

    `get_state()` is a JSON-serialisable dict: the position in this process's stream (the items consumed, as
    every item gives one record, used or rejected), the counts, and the source's length. `set_state()` on an
    iterator made with the same source, seed and process split restores it: the batches after it are those
    the interrupted run would have had, with any number of workers, since the stream does not depend on them.
    A state saved on another source (another length) is refused with a sentence."""

    def __init__(self, build, tally: _Tally, source_len: int):
        self._build, self._tally, self._source_len = build, tally, source_len
        self._iterator, self._start = None, 0

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._tally.stats)

    def __iter__(self) -> "PairIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:  # built on first use, so that restoring a state starts no worker twice
            self._iterator = self._build(self._start)
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"position": self._tally.position, "stats": self.stats, "source_len": self._source_len}

    def set_state(self, state: dict[str, Any]) -> None:
        if "position" not in state:
            raise ValueError("the saved data position is of an older form (grain's iterator state), which this "
                             "version cannot restore; start a new run or resume with the version that saved it")
        if state.get("source_len") != self._source_len:
            raise ValueError(f"the saved data position is for a source of {state.get('source_len')} items, this "
                             f"process's source has {self._source_len}: the data changed since the checkpoint")
        self.close()
        self._start = int(state["position"])
        self._tally.stats.update({k: int(state["stats"].get(k, 0)) for k in STATS_KEYS})

    def close(self) -> None:
        """Stops the worker processes (also done on garbage collection, which is not prompt)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def __enter__(self) -> "PairIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_absl_flags() -> None:
    """Marks absl's flags parsed (at their defaults) unless the program parsed them: grain reads one when it
    starts workers (docs/data.md#grains-worker-processes)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
    """In grain's workers: SIGTERM ignored; the main process stops them when it closes the loader
    (docs/data.md#grains-worker-processes)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def process_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous items [start, stop) of process `process_index`: lengths differ by at most one, the
    first n % process_count processes having one more. Contiguous, so that with prepared shards a host opens
    only the shards its items are in."""
    per, extra = divmod(n, process_count)
    start = process_index * per + min(process_index, extra)
    return start, start + per + (process_index < extra)


def make_loader(source, *, batch_size: int, seed: int, image_size: int = 512, reference_size: int = 224,
                shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                process_count: int = 1, worker_count: int = 0, read_threads: int = 8,
                max_reject_fraction: float | None = 0.9, **pair_options) -> PairIterator:
    """Batches of training pairs from `source` (anything with `__len__` and `__getitem__` giving
    {"image", "boxes", "id"}, see `pbe_jax.data.sources`).

    Args:
      source: the items; read only in the range of this process (`process_range`).
      batch_size: this process's batch; the last incomplete batch is dropped.
      seed: with `process_index`, seeds the shuffle (anew each epoch) and every pair: the same arguments give
        the same batches.
      shuffle, num_epochs: shuffle each process's range; repeat it `num_epochs` times (None: forever). Ranges
        differ in length by at most one, so with a finite `num_epochs` processes may disagree on the number of
        batches by one: train for a fixed number of steps.
      process_index, process_count: this process's place among those sharing the source.
      worker_count: > 0 reads and builds pairs in that many processes (grain's `mp_prefetch`), each with
        `read_threads` threads; the batches are the same as with 0.
      max_reject_fraction: if this fraction or more of a window of 1000 items (grain's successive windows) is
        rejected (unreadable, no usable box, ...), iteration raises ValueError: a wrong path or annotation
        format rather than a few bad files. Fewer are counted in `stats` and skipped.
      pair_options: go to `pairs.PairConfig`."""
    import grain

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if len(source) < process_count:
        raise ValueError(f"the source has {len(source)} items, fewer than the {process_count} processes sharing it")
    config = pairs.PairConfig(image_size=image_size, reference_size=reference_size, **pair_options)
    shuffle_seed, pair_seed = (int(s) for s in np.random.SeedSequence([seed, process_index]).generate_state(2))

    start, stop = process_range(len(source), process_index, process_count)
    ds = grain.MapDataset.source(_ReadOrReject(source))[start:stop]
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    # Pairs after repeat: the random map is seeded by the element's index, so each epoch crops anew (and a
    # slice of the stream keeps each element's seed).
    stream = ds.repeat(num_epochs).random_map(_PairOrReject(config), seed=pair_seed)
    tally = _Tally()
    options = grain.experimental.DatasetOptions(filter_raise_threshold_ratio=max_reject_fraction)

    def build(position: int):
        # About two batches read ahead per process: each element is ~1 MB at 512², so memory stays bounded.
        it = stream[position:].to_iter_dataset(
            grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, read_threads)))
        if worker_count > 0:
            _parse_absl_flags()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                                worker_init_fn=_ignore_sigterm)
        # Filtering after the workers, one record per item before it: every worker count gives the same stream,
        # the counts are kept in this process, and they say how far the stream has been consumed.
        it = it.filter(tally.admit).batch(batch_size, drop_remainder=True, batch_fn=_stack)
        return iter(grain.experimental.WithOptionsIterDataset(it, options))

    return PairIterator(build, tally, len(source))
