"""Multi-process runs on CPU (gloo, 2 processes) through the integrations/ configs, and `hf-lowrank doctor`.

- DDP (integrations/accelerate/ddp.yaml), DeepSpeed ZeRO-2 and ZeRO-3 (deepspeed_zero2.yaml,
  deepspeed_zero3_qlora.yaml) run the two-line script tests/fixtures/dist_train.py for 6 steps, then a copy of that
  run with its last checkpoint removed resumes from step 4. Checked: both ranks train and end with equal adapters;
  only the main process writes, adapter files only; the adapter is complete and, loaded back in this process, gives
  the trained model's outputs; the resumed run runs only steps 5-6 and ends where the uninterrupted run ended.
- FSDP2 (tests/fixtures/dist_fsdp.py under torchrun): the `fully_shard`-ed QLoRA model trains with the same losses as
  the unsharded one, and its gathered adapter equals the unsharded adapter.
- doctor: every known-bad combination is refused (exit 1, reason and fix); the shipped configs pass.

`accelerate launch --multi_gpu` runs real 2-process DDP without GPUs when the script passes
`TrainingArguments(use_cpu=True)`; DeepSpeed uses its CPU accelerator and compiles its communication op on first use.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_lowrank.doctor import (
    Setup,
    check_device_map,
    check_paged_8bit_fsdp,
    check_quant_storage,
    check_reentrant,
    doctor_main,
    problems,
    setup_from_accelerate_config,
    setup_from_environment,
)

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CONFIGS = ROOT / "integrations" / "accelerate"
SETUPS = {  # setup -> (accelerate config, ZeRO stage, quant storage hf_lowrank picks)
    "ddp": ("ddp.yaml", None, "uint8"),
    "zero2": ("deepspeed_zero2.yaml", 2, "bfloat16"),
    "zero3": ("deepspeed_zero3_qlora.yaml", 3, "bfloat16"),
}
STEPS, SAVE_STEPS = 6, 2
LAUNCH_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run(cmd: list[str], log: Path, **env: str) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(**env), stdout=f, stderr=subprocess.STDOUT,
                              timeout=LAUNCH_TIMEOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-6000:]
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}; log {log}:\n{tail}")


def accelerate_launch(config: str, *script_args: str, log: Path) -> None:
    accelerate = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    _run([*accelerate, "launch", "--config_file", str(CONFIGS / config), "--main_process_port", str(_free_port()),
          str(FIXTURES / "dist_train.py"), *script_args], log)


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


def _rank_tensors(out: Path, rank: int) -> dict:
    return torch.load(out / "ranks" / f"rank{rank}.pt")


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module", params=list(SETUPS))
def run(request, tiny_llama, tmp_path_factory):
    """One uninterrupted 6-step run and one resumed from its step-4 checkpoint, for each setup."""
    setup = request.param
    config, _, _ = SETUPS[setup]
    if setup != "ddp":
        pytest.importorskip("deepspeed", reason="pip install deepspeed (see integrations/README.md)")
    base = tmp_path_factory.mktemp(setup)
    full, resumed = base / "full", base / "resumed"
    accelerate_launch(config, tiny_llama, str(full), "--steps", str(STEPS), "--save-steps", str(SAVE_STEPS),
                      log=base / "full.log")
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns(f"checkpoint-{STEPS}", "final", "ranks"))
    accelerate_launch(config, tiny_llama, str(resumed), "--steps", str(STEPS), "--save-steps", str(SAVE_STEPS),
                      "--resume", log=base / "resumed.log")
    return setup, full, resumed, tiny_llama


def test_both_ranks_train_and_end_with_equal_adapters(run):
    setup, full, _, _ = run
    _, stage, storage = SETUPS[setup]
    ranks = _ranks(full)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["world_size"] == 2
        assert r["steps_run"] == list(range(1, STEPS + 1))
        assert r["deepspeed"] is (stage is not None) and r["zero_stage"] == stage
        assert r["wrapper"] == ("DistributedDataParallel" if stage is None else "DeepSpeedEngine")
        assert r["quant_storage"] == storage  # set by hf_lowrank from the launch, not by the script
        assert len(r["losses"]) == STEPS and all(math.isfinite(x) for x in r["losses"])
    p0, p1 = _rank_tensors(full, 0)["params"], _rank_tensors(full, 1)["params"]
    assert p0.keys() == p1.keys() and len(p0) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    lora_b = [v for k, v in p0.items() if k.endswith("lora_B.weight")]
    assert all(v.abs().max() > 1e-4 for v in lora_b)  # B starts at zero: every adapter was trained


def test_only_the_main_process_writes_adapter_only_files(run):
    setup, full, _, _ = run
    r0, r1 = _ranks(full)
    expected = [str(full / f"checkpoint-{s}") for s in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS)] + [str(full / "final")]
    assert r0["written"] == expected
    assert r1["written"] == []
    full_weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    for folder in map(Path, expected):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= names, folder
        assert not names & set(full_weights), folder
    if SETUPS[setup][1] is not None:  # DeepSpeed's own checkpoint holds the adapters' module state, not the base
        states = sorted((full / f"checkpoint-{STEPS}" / f"global_step{STEPS}").glob("*model_states.pt"))
        assert states
        module = torch.load(states[0], weights_only=False)["module"]
        assert any(k.endswith("lora_A.weight") for k in module)
        frozen = [k for k in module if k.endswith(("base_layer.weight", "embed_tokens.weight", "norm.weight"))]
        assert frozen == []


def test_adapter_is_complete_and_loads_back_to_the_trained_outputs(run):
    from transformers import AutoModelForCausalLM

    import hf_lowrank

    setup, full, _, _ = run
    trained = _rank_tensors(full, 0)
    saved = _adapter(full / "final")
    assert set(saved) == {"base_model.model." + k for k in trained["params"]}
    for key, tensor in saved.items():
        assert tensor.numel() > 0 and tensor.shape == trained["params"][key.removeprefix("base_model.model.")].shape
        torch.testing.assert_close(tensor, trained["params"][key.removeprefix("base_model.model.")], rtol=0, atol=0)

    model = hf_lowrank.load(AutoModelForCausalLM, str(full / "final"))
    assert model.lowrank_config.quant_storage == SETUPS[setup][2]
    ids = _batch()
    model.eval()
    with torch.no_grad(), _precision_of(setup):
        logits = model(input_ids=ids).logits.float()
        with hf_lowrank.disabled_adapters(model):
            base = model(input_ids=ids).logits.float()
    # the base computes in bf16: one ulp at |logit| ~ 1 is 0.0078, and thread counts change the summation order
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=2e-2)
    assert (base - trained["logits"]).abs().max() > 0.2  # the adapter changes the outputs far beyond that


def _precision_of(setup: str):
    """ddp.yaml sets mixed_precision: bf16, so the ranks' forward ran under bf16 autocast."""
    if setup == "ddp":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def test_resume_runs_only_the_remaining_steps_and_ends_where_the_full_run_ended(run):
    _, full, resumed, _ = run
    for r in _ranks(resumed):
        assert r["steps_run"] == [STEPS - SAVE_STEPS + 1, STEPS]
        assert r["global_step"] == STEPS
    a, b = _adapter(full / "final"), _adapter(resumed / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    full_losses, resumed_losses = _ranks(full)[0]["losses"], _ranks(resumed)[0]["losses"]
    assert resumed_losses[-SAVE_STEPS:] == pytest.approx(full_losses[-SAVE_STEPS:], rel=1e-6)


def test_zero3_init_path_when_training_arguments_come_first(tiny_llama, tmp_path):
    """TrainingArguments before from_pretrained: transformers loads under ZeRO-3 and refuses a device_map."""
    pytest.importorskip("deepspeed", reason="pip install deepspeed (see integrations/README.md)")
    from transformers import AutoModelForCausalLM

    import hf_lowrank

    out = tmp_path / "run"
    accelerate_launch("deepspeed_zero3_qlora.yaml", tiny_llama, str(out), "--steps", "4", "--args-first",
                      log=tmp_path / "run.log")
    r0, r1 = _ranks(out)
    assert r0["zero_stage"] == 3 and r0["steps_run"] == [1, 2, 3, 4] and r1["written"] == []
    trained = _rank_tensors(out, 0)
    saved = _adapter(out / "final")
    assert len(saved) == 28 and all(t.numel() > 0 for t in saved.values())
    model = hf_lowrank.load(AutoModelForCausalLM, str(out / "final"))
    with torch.no_grad():
        logits = model(input_ids=_batch()).logits.float()
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=2e-2)


def _batch() -> torch.Tensor:
    sys.path.insert(0, str(FIXTURES))
    try:
        from dist_train import Batches
    finally:
        sys.path.remove(str(FIXTURES))
    return Batches().ids[:2]


# ---- FSDP2 --------------------------------------------------------------------------------------------------------


def test_fsdp2_sharded_qlora_matches_the_single_process_model(tiny_llama, tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          str(_free_port()), str(FIXTURES / "dist_fsdp.py"), tiny_llama, str(tmp_path)], tmp_path / "fsdp.log",
         ACCELERATE_USE_FSDP="true")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world_size"] == 2 and r["launch_kind"] == "fsdp"
        assert r["quant_storage"] == "bfloat16"  # hf_lowrank's choice under an FSDP launch
        assert r["sharded_params"] == r["params"] > 0  # every parameter, 4-bit base included, is a DTensor shard
        assert r["sharded"] == pytest.approx(r["reference"], rel=1e-5)
        assert r["reference"][-1] < r["reference"][0] - 0.1  # it trains: the compared losses are not constant
    gathered, reference = _adapter(tmp_path / "adapter"), _adapter(tmp_path / "reference")
    assert gathered.keys() == reference.keys() and len(gathered) == 28
    for k in gathered:
        assert gathered[k].numel() > 0
        torch.testing.assert_close(gathered[k], reference[k], rtol=0, atol=1e-6)


# ---- doctor -------------------------------------------------------------------------------------------------------


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped DeepSpeed YAMLs name their JSON relative to the repository root
    for k in list(os.environ):
        if k.startswith(("ACCELERATE_", "FSDP_")) or k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(k)


def _doctor(capsys, *argv: str) -> tuple[int, str, str]:
    code = doctor_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("config,kind,stage", [("ddp.yaml", "ddp", None), ("fsdp_qlora.yaml", "fsdp", None),
                                               ("deepspeed_zero2.yaml", "deepspeed", 2),
                                               ("deepspeed_zero3_qlora.yaml", "deepspeed", 3)])
def test_doctor_accepts_the_shipped_configs(at_root, capsys, config, kind, stage):
    setup = setup_from_accelerate_config(CONFIGS / config)
    assert (setup.kind, setup.zero_stage, setup.num_processes) == (kind, stage, 2)
    code, out, err = _doctor(capsys, "--config", str(CONFIGS / config))
    assert code == 0, err
    assert "bitsandbytes" in out and "backend:" in out and "torch" in out
    assert "REFUSED" not in out and "no known-bad combination found" in out


def test_doctor_refuses_paged_8bit_optimizer_with_fsdp(at_root, capsys):
    code, out, err = _doctor(capsys, "--config", str(CONFIGS / "fsdp_qlora.yaml"), "--optim", "paged_adamw_8bit")
    assert code == 1
    assert "paged-8bit-optimizer-with-fsdp" in err and "fix: use optim='paged_adamw_32bit'" in err
    assert check_paged_8bit_fsdp(Setup(kind="fsdp", optim="paged_adamw_32bit")) is None
    assert check_paged_8bit_fsdp(Setup(kind="ddp", optim="paged_adamw_8bit")) is None  # fine outside FSDP


@pytest.mark.parametrize("config", ["fsdp_qlora.yaml", "deepspeed_zero3_qlora.yaml"])
def test_doctor_refuses_zero3_or_fsdp_without_float_quant_storage(at_root, capsys, config):
    code, _, err = _doctor(capsys, "--config", str(CONFIGS / config), "--quant-storage", "uint8")
    assert code == 1
    assert "quant-storage-not-model-dtype" in err and "'uint8' is not a float dtype" in err
    assert "quant_storage='bfloat16'" in err  # the fix names the model dtype
    code, _, err = _doctor(capsys, "--config", str(CONFIGS / config), "--quant-storage", "float16")
    assert code == 1 and "differs from the model dtype 'bfloat16'" in err
    # ZeRO-2 does not shard the base: uint8 storage is fine there
    assert _doctor(capsys, "--config", str(CONFIGS / "deepspeed_zero2.yaml"), "--quant-storage", "uint8")[0] == 0


def test_doctor_refuses_device_map_auto_under_ddp(at_root, capsys):
    code, _, err = _doctor(capsys, "--config", str(CONFIGS / "ddp.yaml"), "--device-map", "auto")
    assert code == 1
    assert "device-map-auto-under-ddp" in err and "device_map={'': local_rank}" in err
    assert _doctor(capsys, "--config", str(CONFIGS / "ddp.yaml"), "--device-map", '{"": 0}')[0] == 0
    assert check_device_map(Setup(kind="ddp", device_map={"model.embed": 0, "lm_head": 1})) is not None
    assert check_device_map(Setup(kind=None, device_map="auto")) is None  # one process may spread over GPUs


def test_doctor_refuses_reentrant_checkpointing_under_ddp(at_root, capsys):
    code, _, err = _doctor(capsys, "--config", str(CONFIGS / "ddp.yaml"), "--gradient-checkpointing",
                           "--use-reentrant")
    assert code == 1
    assert "reentrant-checkpointing-under-ddp" in err and "'use_reentrant': False" in err
    assert _doctor(capsys, "--config", str(CONFIGS / "ddp.yaml"), "--gradient-checkpointing",
                   "--no-use-reentrant")[0] == 0
    assert check_reentrant(Setup(kind=None, gradient_checkpointing=True, use_reentrant=True)) is None


def test_doctor_reports_every_refusal_at_once():
    bad = Setup(kind="fsdp", optim="paged_adamw_8bit", quant_storage="uint8", device_map="auto")
    assert [p.check for p in problems(bad)] == [
        "paged-8bit-optimizer-with-fsdp", "quant-storage-not-model-dtype", "device-map-auto-under-ddp"]
    assert check_quant_storage(Setup(kind="deepspeed", zero_stage=3, quant_storage="bfloat16")) is None


def test_launch_is_read_from_the_environment(at_root, monkeypatch):
    from hf_lowrank import LowRankConfig
    from hf_lowrank.launch import current_device_map, for_launch, launch_kind

    assert launch_kind() is None and for_launch(LowRankConfig()).quant_storage == "uint8"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_kind() == "ddp" and for_launch(LowRankConfig()).quant_storage == "uint8"
    if not torch.cuda.is_available():
        assert current_device_map() == {"": "cpu"}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launch_kind() == "fsdp" and for_launch(LowRankConfig()).quant_storage == "bfloat16"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "integrations" / "deepspeed" / "zero3.json"))
    setup = setup_from_environment()
    assert (setup.kind, setup.zero_stage, setup.num_processes) == ("deepspeed", 3, 2)
    assert for_launch(LowRankConfig(compute_dtype="float16")).quant_storage == "float16"
