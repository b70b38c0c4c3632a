"""Checkpoints that survive ``kill -9``: atomic writes, and everything needed to resume exactly.

A checkpoint is a directory ``OUTPUT/checkpoints/step-000120/`` holding

* ``config.json``, ``model.safetensors`` (+ ``generation_config.json``): the student as
  ``save_pretrained`` writes it, with ``quantization_config`` in ``config.json``, so any
  checkpoint loads with :func:`tbt.hf.load_pretrained` / ``tbt evaluate --model``;
* ``tbt_config.json``: the :class:`~tbt.config.QuantConfig` (absent for full precision);
* ``train_config.json``: the resolved :class:`~tbt.train.config.TrainConfig`;
* ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()`` (AdamW moments and step counts);
* ``rng_state_<rank>.pt``: each process's torch (CPU and CUDA) and Python RNG states, which
  drive dropout;
* ``trainer_state.json``: the optimizer step, the micro-batch position in the data stream
  (which fixes the epoch and the batch within it, see :mod:`tbt.train.loop`) and the settings
  that position depends on.

Atomicity: everything is written into ``checkpoints/.tmp-step-000120``, each file is fsync'ed,
then one ``os.replace`` renames the directory. A reader therefore only ever sees complete
checkpoints: a run killed while writing leaves a ``.tmp-*`` directory that the next save
removes and :func:`latest_checkpoint` ignores. Under ``torch.distributed`` every rank writes its
RNG file into the same temporary directory between barriers and rank 0 does the rest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _noop() -> None:
    pass


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``output_dir/checkpoints``, as ``(step, path)``, oldest first."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "trainer_state.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def _fsync_tree(path: str) -> None:
    for d, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover (platforms without directory fds)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temp file + ``os.replace``)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_dir(path: str, model: Any, quant_json: str | None, train_json: str | None,
                   tokenizer: Any = None) -> None:
    """``save_pretrained`` plus tbt's JSON sidecars into ``path`` (not atomic by itself)."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if quant_json is not None:
        with open(os.path.join(path, "tbt_config.json"), "w", encoding="utf-8") as f:
            f.write(quant_json + "\n")
    if train_json is not None:
        with open(os.path.join(path, "train_config.json"), "w", encoding="utf-8") as f:
            f.write(train_json + "\n")


def save_checkpoint(output_dir: str, step: int, model: Any, optimizer: Any, scheduler: Any,
                    state: dict[str, Any], quant_json: str | None, train_json: str,
                    rank: int = 0, barrier: Callable[[], None] = _noop, keep: int = 2) -> str:
    """Write checkpoint ``step`` atomically; every rank must call it. Returns its path.

    Args:
        model: the unwrapped student (``save_pretrained`` is called on rank 0).
        state: JSON-able trainer state (step, micro-batch position, ...).
        keep: how many most recent checkpoints to keep (older ones are deleted).
    """
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, ".tmp-" + step_dir_name(step))
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-write
        os.makedirs(tmp)
    barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{rank}.pt"))
    if rank == 0:
        save_model_dir(tmp, model, quant_json, train_json)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
    barrier()
    if rank == 0:
        _fsync_tree(tmp)
        if os.path.isdir(final):  # re-saving a step (resumed from an older checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    barrier()
    return final


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load ``path/model.safetensors`` into ``model`` in place (tied copies may be absent)."""
    from safetensors.torch import load_file

    sd = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {path} has weights the model lacks: {unexpected[:5]}; "
                         "was it written for another model/quantization?")
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in sd}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"checkpoint {path} lacks weights {untied[:5]}")


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the trainer state."""
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    load_weights(model, path)
    optimizer.load_state_dict(_load_tensors(os.path.join(path, "optimizer.pt")))
    scheduler.load_state_dict(_load_tensors(os.path.join(path, "scheduler.pt")))
    rng_file = os.path.join(path, f"rng_state_{rank}.pt")
    if not os.path.isfile(rng_file):
        raise ValueError(f"{path} has no RNG state for process {rank}: resume with the "
                         f"number of processes it was written with ({state.get('world_size')})")
    set_rng_state(_load_tensors(rng_file))
    return state


def _load_tensors(file: str) -> Any:
    """``torch.load(file, weights_only=True)``: tensors, numbers, strings and containers only.

    A pickle can run any code when it is loaded; ``weights_only`` refuses every other object
    (the genuine optimizer, scheduler and RNG files hold none), so a crafted ``.pt`` file in a
    checkpoint is a one-line ``ValueError``, never executed."""
    import pickle

    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.split("error:", 1)[1].split(". ")[0].strip()
                    for line in str(e).splitlines() if "Unpickler error:" in line), "")
        raise ValueError(f"{file} holds objects other than tensors and plain values, which tbt "
                         f"refuses to unpickle (they could run code){': ' + why if why else ''}; "
                         f"resume from a checkpoint written by tbt train") from None


def truncate_log(log_path: str, step: int) -> None:
    """Drop log records written after ``step`` (by the run that died after its checkpoint).

    A line that does not parse (torn by a crash mid-write) is dropped with a warning.
    """
    if not os.path.isfile(log_path):
        return
    keep = []
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                logger.warning("%s:%d: dropped a torn log line (a crash while writing it): %.60r",
                               log_path, lineno, line.rstrip("\n"))
                continue
            if record.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{log_path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, log_path)
