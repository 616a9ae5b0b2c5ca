"""Orbax checkpoints: async save every N steps, keep-N, restore onto any mesh.

Each checkpoint holds the train state (params, optimizer state, step, RNG,
non-finite counters) and the data position as JSON. Orbax writes into a
temporary directory and renames it when complete, so a save interrupted by a
crash or kill is never listed, let alone restored. On an object store (``gs://``)
Orbax writes through tensorstore and marks a finished step with a
``commit_success.txt`` object instead; a step without it is not listed either. The
manifest of digests below is read and written through ``jaxalign.storage`` on
either.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxalign import storage

# Orbax detects a truncated file only by a failed read deep inside TensorStore and
# does not notice flipped bytes at all, so every finished checkpoint gets a
# manifest of SHA-256 digests that is checked before it is restored.
MANIFEST = "jaxalign_manifest.json"


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, no permission); older ones are untouched."""


def _digests(step_dir: str) -> dict[str, str]:
    out = {}
    for rel in storage.walk_files(step_dir):
        if rel.rsplit("/", 1)[-1].startswith(MANIFEST):  # the manifest and its temporaries
            continue
        h = hashlib.sha256()
        with storage.open_read(storage.join(step_dir, rel)) as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
        out[rel] = h.hexdigest()
    return out


def verify_step_dir(step_dir: str) -> str | None:
    """Why the checkpoint in ``step_dir`` is damaged, or None if it matches its manifest.

    A checkpoint without a manifest (the process died between Orbax's commit and
    the manifest write) is not rejected here; Orbax's own reads still check it.
    """
    path = storage.join(step_dir, MANIFEST)
    if not storage.exists(path):
        return None
    try:
        want = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    have = _digests(step_dir)
    for rel, digest in sorted(want.items()):
        if rel not in have:
            return f"missing file {rel}"
        if have[rel] != digest:
            return f"checksum mismatch in {rel}"
    return None


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for one workdir."""

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = storage.absolute(directory)
        self.save_every = max(int(save_every), 1)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(save_every), 1),
            max_to_keep=int(keep) if keep and keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data"))
        # The step of the async save in flight: its failure surfaces only at the next
        # wait, and the error must name that step, not the one being started.
        self._pending: int | None = None

    def _save_error(self, step: int | None, e: Exception, what: str = "checkpoint"
                    ) -> CheckpointSaveError:
        older = [s for s in self._manager.all_steps() if s != step]
        latest = f"the latest is step {max(older)}" if older else "none was written before"
        return CheckpointSaveError(
            f"writing {what} step {step if step is not None else '?'} to {self.directory} "
            f"failed ({type(e).__name__}: {e}). Earlier checkpoints are untouched ({latest}); "
            "free disk space or fix the directory's permissions, then rerun the same "
            "command to resume.")

    def _finish_pending(self) -> None:
        """Waits for the async save in flight; raises ``CheckpointSaveError`` if it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax re-raises whatever its writer hit
            raise self._save_error(step, e) from e

    def _step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def _write_manifests(self, skip: int | None = None) -> None:
        """Digests every finished checkpoint that has no manifest yet (process 0 only)."""
        if jax.process_index() != 0:
            return
        for step in self._manager.all_steps():
            step_dir = self._step_dir(step)
            if step == skip or storage.exists(storage.join(step_dir, MANIFEST)):
                continue
            digests = _digests(step_dir)
            try:
                storage.write_json(storage.join(step_dir, MANIFEST), digests, indent=0,
                                   sort_keys=True)
            except OSError as e:
                raise self._save_error(step, e, "the checksum manifest of checkpoint") from e

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any,
             data_state: dict[str, Any] | Callable[[], dict[str, Any]], *,
             force: bool = False) -> bool:
        """Starts an (async) save if ``step`` is a multiple of ``save_every``, or with ``force``.

        ``data_state`` may be a function, called only when the save happens (an
        asynchronous rollout source finishes its in-flight rollouts to record them).

        Raises:
          CheckpointSaveError: this save, or the async one before it, failed to write.
        """
        # The schedule is decided here, not by Orbax, which also saves the first step it sees.
        if not force and step % self.save_every:
            return False
        if callable(data_state):
            data_state = data_state()
        # Orbax finishes the previous async save before starting this one.
        self._finish_pending()
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=ocp.args.JsonSave(data_state)),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - a failed write surfaces as any type
            raise self._save_error(step, e) from e
        if saved:
            self._pending = step
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
            self._write_manifests(skip=step)
        return saved

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings carried by ``abstract_state``'s ShapeDtypeStructs."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    data=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["data"] or {})

    def restore_latest_intact(self, abstract_state: Any
                              ) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest checkpoint that verifies and reads; None if there are none.

        Damaged checkpoints are skipped with a warning naming the step and the
        reason.

        Raises:
          RuntimeError: checkpoints exist but none of them can be restored.
        """
        problems = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            reason = verify_step_dir(self._step_dir(step))
            if reason is None:
                try:
                    state, data_state = self.restore(step, abstract_state)
                    return step, state, data_state
                except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
                    reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            problems.append(f"step {step}: {reason}")
            logging.warning("checkpoint step %d in %s is damaged (%s); trying an older one",
                            step, self.directory, reason)
        if problems:
            raise RuntimeError(f"no intact checkpoint in {self.directory}: " + "; ".join(problems)
                               + ". Move the directory away to start from scratch.")
        return None

    def wait(self) -> None:
        """Finishes the save in flight and writes missing manifests.

        Raises:
          CheckpointSaveError: the save in flight failed to write.
        """
        self._finish_pending()
        self._write_manifests()

    def close(self) -> None:
        self.wait()
        self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` tree carrying the target shardings for restore."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
