"""Checkpoints with orbax: the train state (params, optimiser, EMA, step, RNG), the data iterators' state (one
per process, gathered and written by the primary one) and the config, saved asynchronously, keeping the last N, and atomically: on a local disk orbax writes a temporary
folder and renames it; on gs:// (no rename) it writes the step folder in place and marks it complete with
`commit_success.txt` last, and steps without that marker are neither listed nor restored."""
from __future__ import annotations

from typing import Any

from pbe_jax import storage


class Checkpoints:
    def __init__(self, directory: storage.PathLike, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        directory = storage.path(directory)
        self.directory = directory if storage.is_remote(directory) else directory.resolve()
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "config"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def config(self, step: int) -> dict:
        """The config saved with checkpoint `step` (`config.to_dict`'s form)."""
        return self.manager.restore(step, args=self._ocp.args.Composite(config=self._ocp.args.JsonRestore())).config

    def data(self, step: int) -> Any:
        """The data iterators' state saved with checkpoint `step`."""
        return self.manager.restore(step, args=self._ocp.args.Composite(data=self._ocp.args.JsonRestore())).data

    def save(self, step: int, state: Any, data_state: Any, config: dict) -> None:
        a = self._ocp.args
        self.manager.save(step, args=a.Composite(state=a.StandardSave(state), data=a.JsonSave(data_state),
                                                 config=a.JsonSave(config)))

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The state with the shardings of `abstract_state` (ShapeDtypeStructs carrying shardings)."""
        a = self._ocp.args
        return self.manager.restore(step, args=a.Composite(state=a.StandardRestore(abstract_state))).state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

