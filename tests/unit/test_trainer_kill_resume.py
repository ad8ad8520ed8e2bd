"""A trainer killed mid-run (SIGKILL, no chance to clean up) resumes from its last checkpoint when the same command
is run again, and ends with the adapter an uninterrupted run produces.

Each case runs ``python -m trainers.<algo> --config FILE`` as a subprocess on the tiny zoo pipeline and a tiny
corpus, kills it as soon as its first checkpoint (``checkpoints/step-00000002/trainer_state.json``) is on disk and
step 3 has been logged, reruns the identical command, and compares with a run that was never interrupted (same
config but another ``output_dir``, which the resume fingerprint ignores; run in the test process):

- ``result.json`` says ``resumed_from_step`` = the latest complete checkpoint left by the killed run (> 0);
- ``metrics.jsonl`` holds each step exactly once, and its values equal the uninterrupted run's;
- the final adapters are equal (bitwise on CPU with one thread: step ``k``'s randomness is seeded by ``(seed, k)``,
  the data stream is skipped to the consumed count, and AdamW's state is restored from ``optimizer.pt``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trainers  # noqa: F401  (torchvision shim before diffusers)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
wds = pytest.importorskip("webdataset")

from tiny_corpus import CAPTIONS, COLOURS, noisy_jpeg, write_corpus  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 12
FIRST_CHECKPOINT = "step-00000002"





@pytest.fixture(scope="module")
def multi_image_model(tmp_path_factory) -> str:
    """The tiny Qwen-Image-Edit-Plus: GRPO's pool holds multi_ref prompts, which its policy conditions on."""
    from pipelines.zoo import build_zoo

    return str(build_zoo(tmp_path_factory.mktemp("zoo_qwen"), only=["qwen_image_edit"])["qwen_image_edit"])


@pytest.fixture(scope="module")
def sft_corpus(tmp_path_factory) -> str:
    samples = [{"__key__": f"s{i:04d}", "jpg": noisy_jpeg(COLOURS[i % 6], i), "txt": CAPTIONS[i % 6], "json": {}}
               for i in range(10)]
    return write_corpus(tmp_path_factory.mktemp("sft_corpus") / "v1", samples, per_shard=4)


@pytest.fixture(scope="module")
def pref_corpus(tmp_path_factory) -> str:
    samples = []
    for i in range(10):
        label_0 = ["1", "0", "0.5"][i % 3]  # ties included: raw_samples_consumed must count them on resume
        samples.append({
            "__key__": f"p{i:04d}",
            "jpg_0.jpg": noisy_jpeg(COLOURS[i % 6], 100 + i),
            "jpg_1.jpg": noisy_jpeg(COLOURS[(i + 3) % 6], 200 + i),
            "caption.txt": CAPTIONS[i % 6],
            "label_0.txt": label_0,
            "label_1.txt": {"1": "0", "0": "1", "0.5": "0.5"}[label_0],
            "json": {"pair_id": f"p{i}"},
        })
    return write_corpus(tmp_path_factory.mktemp("pref_corpus") / "v1", samples, per_shard=4)


# --------------------------------------------------------------------------------------------- helpers
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PREFMILL_LOG_LEVEL": "INFO"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for key in [k for k in env if k.startswith("DAGSTER_PIPES_")]:  # not under Pipes, even if pytest is
        env.pop(key)
    return env


def _command(module: str, config_file: Path) -> list[str]:
    return [sys.executable, "-m", module, "--config", str(config_file)]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _logged_lines(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name[len("step-"):]) for d in root.iterdir()
                  if d.is_dir() and d.name.startswith("step-") and (d / "trainer_state.json").is_file())


def _run_and_kill(module: str, config_file: Path, out: Path, total_steps: int, timeout: float = 240.0) -> int:
    """Start the trainer and SIGKILL it once its first checkpoint is complete and a later step has been logged (so
    ``metrics.jsonl`` holds lines the resumed run must drop); returns the latest complete checkpoint's step."""
    log_file = out.parent / f"{out.name}.killed.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(_command(module, config_file), cwd=REPO, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        marker = out / "checkpoints" / FIRST_CHECKPOINT / "trainer_state.json"
        deadline = time.monotonic() + timeout
        try:
            while not (marker.is_file() and _logged_lines(out) > int(FIRST_CHECKPOINT[len("step-"):])):
                if proc.poll() is not None:
                    pytest.fail(f"{module} exited ({proc.returncode}) before its first checkpoint:\n"
                                f"{log_file.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{module}: no checkpoint after {timeout:.0f} s:\n{log_file.read_text()[-3000:]}")
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"{module} was not killed mid-run (rc {proc.returncode})"
    assert not (out / "result.json").exists(), "the killed run must not have finished"
    steps = _checkpoint_steps(out)
    assert steps and steps[-1] < total_steps, steps
    return steps[-1]


def _run_to_end(module: str, config_file: Path, timeout: float = 300.0) -> str:
    proc = subprocess.run(_command(module, config_file), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stderr


def _adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "pytorch_lora_weights.safetensors"))


def _check_kill_resume(module: str, cfg: dict, tmp_path: Path, compare_keys: list[str],
                       adapters: tuple[str, ...] = ("adapter",)) -> dict:
    total_steps = cfg.get("max_steps") or cfg["num_steps"]
    killed_out, straight_out = tmp_path / "killed", tmp_path / "straight"
    cfg_killed = {**cfg, "output_dir": str(killed_out)}
    cfg_straight = {**cfg, "output_dir": str(straight_out)}
    (tmp_path / "killed.json").write_text(json.dumps(cfg_killed))

    t0 = time.perf_counter()
    ckpt_step = _run_and_kill(module, tmp_path / "killed.json", killed_out, total_steps)
    t_kill = time.perf_counter() - t0
    lines_at_kill = _logged_lines(killed_out)
    assert lines_at_kill >= ckpt_step

    log = _run_to_end(module, tmp_path / "killed.json")  # the same command again
    t_resume = time.perf_counter() - t0 - t_kill
    result = json.loads((killed_out / "result.json").read_text())
    assert result["resumed_from_step"] == ckpt_step > 0
    assert result["steps"] == total_steps
    assert f"step-{ckpt_step:08d} at step {ckpt_step}" in log  # "resumed from <ckpt dir> at step k"
    recs = _metrics(killed_out)
    assert [r["step"] for r in recs] == list(range(1, total_steps + 1))  # lines after the checkpoint were dropped

    # the uninterrupted run in this process (saves a second interpreter start; same config, one thread as well)
    import importlib

    importlib.import_module(module).train(cfg_straight)
    t_straight = time.perf_counter() - t0 - t_kill - t_resume
    straight = _metrics(straight_out)
    assert json.loads((straight_out / "result.json").read_text())["resumed_from_step"] == 0
    for a, b in zip(recs, straight, strict=True):
        for key in compare_keys:  # (some keys appear only on some steps, e.g. the held-out score)
            assert (key in a) == (key in b), (a["step"], key)
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key, a[key], b[key])

    diffs = {}
    for name in adapters:
        resumed_sd, straight_sd = _adapter_tensors(killed_out / name), _adapter_tensors(straight_out / name)
        assert resumed_sd.keys() == straight_sd.keys()
        diffs[name] = max((resumed_sd[k] - straight_sd[k]).abs().max().item() for k in resumed_sd)
        assert max(v.abs().max().item() for k, v in straight_sd.items() if "lora.up" in k or "lora_B" in k) > 0
    max_diff = max(diffs.values())
    print(f"\n{module}: killed after {lines_at_kill} logged steps, resumed at step {ckpt_step}; "
          f"max |adapter diff| vs uninterrupted = {diffs}; "
          f"wall: killed run {t_kill:.1f} s, resume {t_resume:.1f} s, uninterrupted {t_straight:.1f} s")
    assert max_diff == 0.0  # a resumed run continues exactly like an uninterrupted one
    return {"checkpoint_step": ckpt_step, "max_diff": max_diff, "result": result,
            "straight_result": json.loads((straight_out / "result.json").read_text())}


# --------------------------------------------------------------------------------------------- tests
def test_sft_killed_mid_run_resumes_from_checkpoint(tiny_model, sft_corpus, tmp_path):
    cfg = {"pretrained_model": tiny_model, "corpus_dir": sft_corpus, "max_steps": MAX_STEPS, "batch_size": 2,
           "resolution": 32, "checkpoint_every": 2, "keep_checkpoints": 2, "seed": 0, "learning_rate": 1e-3,
           "lora_rank": 4, "num_threads": 1, "device": "cpu"}
    _check_kill_resume("trainers.sft", cfg, tmp_path, ["loss", "grad_norm", "samples_seen"])


def test_dpo_killed_mid_run_resumes_from_checkpoint(tiny_model, pref_corpus, tmp_path):
    cfg = {"pretrained_model": tiny_model, "corpus_dir": pref_corpus, "max_steps": MAX_STEPS, "batch_size": 2,
           "resolution": 32, "checkpoint_every": 2, "keep_checkpoints": 2, "seed": 0, "learning_rate": 1e-3,
           "beta": 2000.0, "lora_rank": 4, "num_threads": 1, "device": "cpu"}
    _check_kill_resume("trainers.dpo", cfg, tmp_path,
                       ["loss", "implicit_acc", "margin", "grad_norm", "raw_samples_consumed"])


def test_grpo_killed_mid_run_resumes_from_checkpoint(multi_image_model, tiny_clip, prompt_pool, tmp_path):
    """The CLI's own reward (tiny CLIP, λ-Harmonic with DRS, DAR weights, KL) and held-out model selection, on a
    flow-matching policy (Flow-SDE) conditioned on the multi_ref references: the best adapter and its step also
    come out as in the uninterrupted run."""
    cfg = {"pretrained_model": multi_image_model, "prompt_pool": prompt_pool, "clip_model": tiny_clip, "num_steps": 6,
           "resolution": 16, "group_size": 3, "prompts_per_step": 2, "sample_steps": 3, "heldout_every": 2,
           "heldout_prompts": 2, "heldout_images_per_prompt": 1, "checkpoint_every": 2, "keep_checkpoints": 2,
           "seed": 0, "learning_rate": 1e-2, "kl_coef": 0.01, "lora_rank": 4, "num_threads": 1, "device": "cpu",
           "lambdas": {"t2i": 0.0, "multi_ref": 0.5}}
    out = _check_kill_resume("trainers.grpo", cfg, tmp_path,
                             ["loss", "reward_mean", "kl", "grad_norm", "heldout_lambda_harmonic"],
                             adapters=("adapter", "best_adapter"))
    for key in ("best_step", "best_heldout_lambda_harmonic"):
        assert out["result"][key] == out["straight_result"][key]
