"""Checkpoints with orbax: train state (params, optimizer state, step, RNG), the grain iterator state, the config.

Each checkpoint is one orbax step directory with three items:
  state   `StandardSave` of the train-state pytree; restored onto the shardings of the *current* mesh, so a
          checkpoint written on one mesh restores onto another
  data    the grain iterator state as JSON. Every process reads rows of the same global batch stream, so the
          state is the same on all of them; one copy restores onto any number of processes (grain's own handler
          writes one file per process and so cannot change the process count)
  config  the resolved config as JSON
Orbax writes into a temporary directory and renames it on commit, so a half-written checkpoint is never the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, cfg: ml_collections.ConfigDict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.checkpoint.max_to_keep,
            enable_async_checkpointing=cfg.checkpoint.async_save,
            create=True,
        )
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, cfg: ml_collections.ConfigDict) -> None:
        """Starts a save (asynchronous when enabled); returns once the device arrays are safe to donate."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_iterator.get_state()),
            config=ocp.args.JsonSave(cfg.to_dict()),
        ), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
        """Restores `state` with the shardings in `abstract_state` (ShapeDtypeStructs); sets the iterator in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        return restored["state"]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
