"""Two processes (torchrun, gloo, CPU) train one student: the replicas end identical, α included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from train_helpers import flat_settings, make_model_dir, make_workspace

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import torch.distributed as dist
    from tbt.train.config import TrainConfig
    from tbt.train.loop import train

    flat = json.loads(sys.argv[1])
    result = train(TrainConfig.from_flat(flat))
    rank = dist.get_rank()
    state = {k: v.detach().clone() for k, v in result["model"].state_dict().items()}
    torch.save(state, f"{flat['output_dir']}/replica{rank}.pt")
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_gloo_replicas_end_identical(tmp_path):
    ws = make_workspace(str(tmp_path / "ws"))
    teacher = make_model_dir(ws, "bart-tiny", "bart")
    out = str(tmp_path / "ddp")
    flat = flat_settings(ws, out, teacher=teacher, bits="2-2-2", max_steps=6, batch_size=4,
                         grad_accum=2, save_every=3)
    script = tmp_path / "run_ddp.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", str(script), json.dumps(flat)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout

    r0 = torch.load(os.path.join(out, "replica0.pt"))
    r1 = torch.load(os.path.join(out, "replica1.pt"))
    alphas = [k for k in r0 if k.endswith(".alpha")]
    assert alphas and all(bool(r0[k.replace("alpha", "initialized")]) for k in alphas)
    differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not differ, differ[:5]
    # and training changed them (the replicas did not just stay at the teacher's weights)
    from safetensors.torch import load_file

    start = load_file(os.path.join(teacher, "model.safetensors"))
    k = "model.encoder.layers.0.fc1.weight"
    assert not torch.equal(start[k], r0[k])
    ckpt = os.path.join(out, "checkpoints", "step-000006")
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= set(os.listdir(ckpt))
