"""Orbax leaves that are read from the source only while Orbax writes them.

A conversion hands `lm.checkpoint.save_params` a params tree whose leaves are `StreamedTensor`s
(shape, dtype and a function that produces the array). The Orbax type handler registered here
writes them one after another, producing each array just before its write and dropping it after,
so converting a model needs about one tensor of host memory, not the model. On disk the result
is an ordinary numpy-array checkpoint ('np.ndarray' leaves): restoring needs nothing from here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from orbax.checkpoint import type_handlers as ocp_types
from orbax.checkpoint._src.futures import future as ocp_future

from lm import checkpoint


@dataclasses.dataclass(frozen=True)
class StreamedTensor:
  """A tensor produced on demand: `produce()` returns an array of `shape` and `dtype`."""
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    return self.size * np.dtype(self.dtype).itemsize

  def load(self) -> np.ndarray:
    x = self.produce()
    if tuple(x.shape) != tuple(self.shape) or x.dtype != self.dtype:
      raise AssertionError(f'produced {x.shape} {x.dtype}, announced {self.shape} {self.dtype}')
    return x


class _StreamedTensorHandler(ocp_types.NumpyHandler):
  """Writes StreamedTensors sequentially, each as a plain numpy array."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)  # Each array is fresh and ours alone.

  async def _write_one_at_a_time(self, values, infos, args):
    for value, info, arg in zip(values, infos, args):
      await self._background_serialize([value.load()], [info], [arg])

  async def serialize(self, values: Sequence[StreamedTensor], infos, args=None):
    args = args or [ocp_types.SaveArgs()] * len(values)
    ocp_types.check_input_arguments(values, infos, args)
    return [ocp_future.CommitFutureAwaitingContractedSignals(
        self._write_one_at_a_time(values, infos, args), name='lm_streamed_tensors')]


_registered = False


def register() -> None:
  """Registers the handler with Orbax's global registry (idempotent)."""
  global _registered
  if not _registered:  # Quietly: Orbax warns that our leaves also write 'np.ndarray'.
    checkpoint.register_type_handler(StreamedTensor, _StreamedTensorHandler())
    _registered = True
