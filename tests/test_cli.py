"""`hf-lowrank` as a new user types it, in subprocesses: what works, and one line with the right exit code for each
mistake (no traceback; the message names the bad value).

Every subprocess gets its own HF_HOME (an empty Hub cache), MPLCONFIGDIR and working folder under tmp_path, and
HF_HUB_OFFLINE=1 unless a test points HF_ENDPOINT at a closed local port to play "the Hub is unreachable".
The mistakes fail before any training, so they run a few at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what the libraries printed on every run before `hf-lowrank` dropped it (issue #13, item 5)
NOISE = ("gemm_4bit_forward", "Setting accelerator to CPU", "pin_memory", "Paged optimizers", "font cache",
         "FutureWarning", "deprecated", "Traceback")
#: and the progress bars of writing and loading the built-in model, for a model of 3 MB
BUILTIN_NOISE = (*NOISE, "Writing model shards", "Loading weights")
FAST = ("--max_length", "32", "--sample_tokens", "0")  # the smallest real run


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(home: Path, **extra: str) -> dict[str, str]:
    """The user's environment without Hub settings, offline, with its own cache folders; `extra` values of "" unset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(home / "hf"), MPLCONFIGDIR=str(home / "mpl"),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # one thread: the test runs a few at a time
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def unreachable_hub() -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, seconds: float):
        self.code, self.out, self.err, self.seconds = proc.returncode, proc.stdout, proc.stderr, seconds
        self.all = self.out + self.err

    def __repr__(self):
        return (f"exit {self.code} after {self.seconds:.0f} s\n--- stdout\n{self.out[-3000:]}\n"
                f"--- stderr\n{self.err[-3000:]}")


def hf_lowrank(*args: str, cwd: Path, home: Path | None = None, env: dict[str, str] | None = None,
               module: bool = True) -> Run:
    """`hf-lowrank ARGS` (the console script's entry point) in `cwd`; `module=False`: `python ARGS` instead."""
    cwd.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", "import sys; from hf_lowrank.cli import main; sys.exit(main())"] if module \
        else [sys.executable]
    start = time.monotonic()
    proc = subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=environment(home or cwd, **(env or {})))
    return Run(proc, time.monotonic() - start)


def assert_one_line_error(run: Run, code: int, command: str, *named: str) -> str:
    """Exit `code`, no traceback, and exactly one error line, the last of stderr, naming everything in `named`."""
    assert run.code == code, run
    assert "Traceback" not in run.all, run
    errors = [line for line in run.err.splitlines() if ": error:" in line]
    assert len(errors) == 1, run
    assert run.err.strip().splitlines()[-1] == errors[0], run
    assert errors[0].startswith(f"hf-lowrank {command}: error: " if command else "hf-lowrank: error: "), run
    for text in named:
        assert text in errors[0], (text, run)
    return errors[0]


def no_noise(run: Run, noise: tuple[str, ...] = NOISE) -> None:
    found = [n for n in noise if n in run.all]
    assert not found, (found, run)


def trained_steps(run: Run) -> int:
    m = re.search(r"^trained (\d+) steps? in ", run.out, re.M)
    assert m, run
    return int(m.group(1))


def logs(run: Run) -> list[dict]:
    """The Trainer's log lines ({'loss': '5.9', 'learning_rate': '0.003', ...})."""
    return [{k: float(v) for k, v in re.findall(r"'(\w+)': '([-0-9.e]+)'", line)}
            for line in run.out.splitlines() if line.startswith("{'loss'")]


# ---- the built-in run, and what it leaves --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    """`hf-lowrank train` on the built-in model with a few user values, in the user's own spelling: 3 steps (fewer
    than --logging_steps' default of 5), --learning_rate=1e-5 (the built-in default is 3e-3)."""
    tmp = tmp_path_factory.mktemp("builtin")
    run = hf_lowrank("train", "--max-steps", "3", "--learning_rate=1e-5", "--max_length", "32", "--sample_tokens",
                     "4", cwd=tmp / "project", env={"OMP_NUM_THREADS": ""})  # unset, as for most users
    return run, tmp / "project" / "hf-lowrank-output"


def test_builtin_run_uses_the_values_given_in_any_spelling(builtin):
    run, _ = builtin
    assert run.code == 0, run
    assert trained_steps(run) == 3
    assert re.search(r"^no --model: .*\(learning rate 1e-05, 3 steps(, 1 CPU thread)?\)$", run.out, re.M), run
    [last] = logs(run)  # 3 steps < logging_steps 5: the loss is still logged, once, at the last step
    assert last["learning_rate"] == pytest.approx(1e-5 / 3, rel=1e-3)  # linear decay: lr/3 at step 3 of 3


def test_builtin_run_is_quiet_and_ends_with_a_summary(builtin):
    run, out = builtin
    assert run.code == 0, run
    no_noise(run, BUILTIN_NOISE)
    assert "hf_lowrank training summary" in run.err  # ours stays
    assert re.search(r"^trained 3 steps in \d+ s; final loss \d+\.\d{3}$", run.out, re.M), run
    size = (out / "adapter_model.safetensors").stat().st_size
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"
    assert f"adapter:   {out} (adapter_model.safetensors, {shown})" in run.out
    assert f"load it:   hf_lowrank.load(AutoModelForCausalLM, {str(out)!r})" in run.out
    assert f"push it:   hf-lowrank push {out} " in run.out
    assert re.search(r"^before: +'The baker", run.out, re.M) and re.search(r"^after: +'The baker", run.out, re.M)


def test_builtin_run_uses_one_cpu_thread_unless_told(builtin):
    """Two OpenMP threads waiting for a busy core made the built-in run 5-20× slower on a shared 2-core machine."""
    run, _ = builtin
    if __import__("torch").accelerator.is_available():
        pytest.skip("a GPU machine")
    assert "1 CPU thread)" in run.out, run


def test_loss_plot_has_the_loss_when_steps_are_fewer_than_logging_steps(builtin):
    import matplotlib.image

    run, out = builtin
    assert f"loss plot: {out / 'loss.png'}" in run.out
    pixels = matplotlib.image.imread(out / "loss.png")[..., :3]
    blue = (abs(pixels[..., 0] - 0x1F / 255) < 0.05) & (abs(pixels[..., 1] - 0x77 / 255) < 0.05) & \
        (abs(pixels[..., 2] - 0xB4 / 255) < 0.05)  # matplotlib's first line colour: the loss marker
    assert blue.sum() >= 10


def test_adapter_records_an_absolute_base_and_merges_from_elsewhere(builtin, tmp_path):
    _, out = builtin
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base) == out / "base-model" and Path(base).is_dir()
    run = hf_lowrank("merge", str(out), "--output", "merged", cwd=tmp_path / "elsewhere")
    assert run.code == 0, run
    assert "merged model written to merged" in run.out and (tmp_path / "elsewhere" / "merged" / "config.json").is_file()
    assert re.search(r"merging: 100%\|.*\| 1/1 ", run.err), run  # the progress bar, shard by shard
    assert "Traceback" not in run.all

    again = hf_lowrank("merge", str(out), "--output", "merged", "--no-drift", cwd=tmp_path / "elsewhere")
    assert_one_line_error(again, 2, "merge", "--output merged", "--overwrite")
    forced = hf_lowrank("merge", str(out), "--output", "merged", "--no-drift", "--overwrite",
                        cwd=tmp_path / "elsewhere")
    assert forced.code == 0, forced


@pytest.fixture(scope="module")
def relative_base_adapter(builtin, tmp_path_factory):
    """The adapter as earlier versions wrote it: base recorded as `hf-lowrank-output/base-model`, relative."""
    _, out = builtin
    old = tmp_path_factory.mktemp("old") / "adapter"
    old.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(out / name, old / name)
    config = json.loads((old / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "hf-lowrank-output/base-model"
    (old / "adapter_config.json").write_text(json.dumps(config))
    return old


def test_load_with_an_unreachable_recorded_base_fails_at_once_naming_it(relative_base_adapter, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import hf_lowrank

    monkeypatch.chdir(tmp_path)  # not the folder it was trained in; HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(hf_lowrank.AdapterError, match=r"'hf-lowrank-output/base-model' recorded in .*adapter_config"
                                                      r"\.json .*HF_HUB_OFFLINE=1.*; pass base="):
        hf_lowrank.load(AutoModelForCausalLM, str(relative_base_adapter))


def test_merge_with_an_unreachable_recorded_base_fails_at_once(relative_base_adapter, tmp_path):
    run = hf_lowrank("merge", str(relative_base_adapter), "--output", "m", cwd=tmp_path, env=unreachable_hub())
    assert_one_line_error(run, 1, "merge", "'hf-lowrank-output/base-model'", "unreachable", "pass --base")
    assert "Retrying" not in run.all and run.seconds < 60, run
    assert not (tmp_path / "m").exists()


# ---- the other runs a user starts with ----------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", [["--max_step", "2"], ["--num_train_epochs", "1"]])  # a prefix; epochs
def test_step_flags_win_on_the_builtin_model(spelling, builtin, tmp_path):
    _, out = builtin
    work = tmp_path / "w"
    shutil.copytree(out / "base-model", work / "hf-lowrank-output" / "base-model")  # reused, not rebuilt
    run = hf_lowrank("train", *spelling, *FAST, cwd=work)
    assert run.code == 0, run
    if spelling[0] == "--num_train_epochs":
        assert logs(run)[-1]["epoch"] == 1 and trained_steps(run) < 80
    else:
        assert trained_steps(run) == 2
        assert logs(run)[-1]["learning_rate"] == pytest.approx(3e-3 / 2, rel=1e-3)  # the built-in default


def test_readme_command_with_a_model_and_a_jsonl_file(builtin, tmp_path):
    """The README's `train --model ... --data train.jsonl` command, on CPU, with small numbers: the flags it uses are
    the current ones (no deprecation warning), and with --model the learning rate is the usual 2e-4."""
    _, out = builtin
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"The baker {i} sells bread by the river."}) + "\n" for i in range(40)))
    run = hf_lowrank("train", "--model", str(out / "base-model"), "--data", "train.jsonl", "--text_field", "text",
                     "--r", "16", "--max_steps", "2", "--per_device_train_batch_size", "4",
                     "--gradient_accumulation_steps", "2", "--activation_checkpointing", "true", "--output_dir", "run",
                     *FAST, cwd=tmp_path)
    assert run.code == 0, run
    no_noise(run)
    assert trained_steps(run) == 2 and logs(run)[-1]["learning_rate"] == pytest.approx(2e-4 / 2, rel=1e-3)
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(out / "base-model")


def test_example_script_uses_current_flags(tmp_path):
    run = hf_lowrank(str(ROOT / "examples" / "train_qlora.py"), "--max_steps", "2", cwd=tmp_path, module=False)
    assert run.code == 0, run
    assert "FutureWarning" not in run.all and "deprecated" not in run.all, run
    base = json.loads((tmp_path / "qlora-output" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == tmp_path / "qlora-output" / "base-model"


# ---- --help --------------------------------------------------------------------------------------------------------


def test_help_puts_our_options_first_with_the_defaults_that_run(tmp_path):
    builtin_help = hf_lowrank("train", "--help", cwd=tmp_path)
    model_help = hf_lowrank("train", "--model", "some/model", "--help", cwd=tmp_path)
    for run in (builtin_help, model_help):
        assert run.code == 0 and run.err == "", run
    text = builtin_help.out
    lines = text.splitlines()
    assert len(lines[0]) < 120 and lines[0].startswith("usage: hf-lowrank train")  # not 120 lines of flags
    ours, theirs = text.index("hf-lowrank options:"), text.index("TrainingArguments (")
    assert ours < theirs and text.index("--per_device_train_batch_size") > theirs
    assert text[:ours].count("\n") < 15
    for entry in re.split(r"\n  (?=-)", text[ours:theirs]):  # each option of ours: its help, one default at most
        assert entry.count("(default:") <= 1 and "(default: None)" not in entry, entry

    def default(help_text: str, flag: str) -> str:
        return re.search(rf"^  {flag} .*?\(default: ([^)]+)\)", help_text, re.M | re.S).group(1)

    assert default(text, "--learning_rate") == "0.003" and default(text, "--max_steps") == "80"
    assert default(model_help.out, "--learning_rate") == "0.0002" and default(model_help.out, "--max_steps") == "-1"


def test_every_option_of_ours_has_help():
    from hf_lowrank.train_cli import LowRankArguments, build_parser

    parser = build_parser(builtin=True, accelerator=False)
    ours = {f.name for f in dataclasses.fields(LowRankArguments)}
    helps = {a.dest: a.help for a in parser._actions if a.dest in ours}
    assert helps.keys() == ours and all(h and len(h) > 10 for h in helps.values()), helps


# ---- mistakes: one line each --------------------------------------------------------------------------------------

# (name, command line, exit code, texts the error line must contain, environment)
MISTAKES = [
    ("missing data file", ["train", "--data", "missing.jsonl"], 2, ["--data missing.jsonl", "file not found"], {}),
    ("empty jsonl", ["train", "--data", "empty.jsonl"], 2, ["--data empty.jsonl", "has no text"], {}),
    ("empty txt", ["train", "--data", "empty.txt"], 2, ["--data empty.txt", "has no text"], {}),
    ("no such model folder", ["train", "--model", "./no/such/model"], 2, ["--model ./no/such/model",
                                                                           "not a folder"], {}),
    ("model id offline", ["train", "--model", "hf-lowrank-tests/no-such-model"], 2,
     ["hf-lowrank-tests/no-such-model", "HF_HUB_OFFLINE=1"], {}),
    ("model id, Hub unreachable", ["train", "--model", "hf-lowrank-tests/no-such-model"], 2,
     ["hf-lowrank-tests/no-such-model", "unreachable"], "unreachable"),
    ("r 0", ["train", "--r", "0"], 2, ["--r 0", "positive int"], {}),
    ("quantization nf8", ["train", "--quantization", "nf8"], 2, ["--quantization", "'nf8'", "nf4"], {}),
    ("target_modules nonsense", ["train", "--target_modules", "nonsense"], 2,
     ["--target_modules nonsense", "matched no layer", "q_proj"], {}),
    ("misspelled flag", ["train", "--max_stepz", "3"], 2, ["--max_stepz", "did you mean --max_steps?"], {}),
    ("bad number", ["train", "--learning_rate", "fast"], 2, ["--learning_rate", "'fast'"], {}),
    ("bf16 on CPU", ["train", "--bf16", "true"], 2, ["--bf16", "GPU"], {}),
    ("inspect Hub id offline", ["inspect", "hf-lowrank-tests/adapter"], 1, ["'hf-lowrank-tests/adapter'",
                                                                              "HF_HUB_OFFLINE=1"], {}),
    ("merge Hub id offline", ["merge", "hf-lowrank-tests/adapter", "--output", "m"], 1,
     ["'hf-lowrank-tests/adapter'", "HF_HUB_OFFLINE=1"], {}),
    ("merge without --output", ["merge", "somewhere"], 2, ["--output"], {}),
    ("unknown command", ["trian"], 2, ["'trian'", "did you mean 'train'?"], {}),
]


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """Every command of MISTAKES, three at a time, each in its own folder (with an empty .jsonl and .txt)."""
    root = tmp_path_factory.mktemp("mistakes")

    def one(i: int):
        name, args, _, _, env = MISTAKES[i]
        cwd = root / str(i)
        cwd.mkdir()
        (cwd / "empty.jsonl").write_text("")
        (cwd / "empty.txt").write_text("\n  \n")
        return name, hf_lowrank(*args, cwd=cwd, env=unreachable_hub() if env == "unreachable" else env)

    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(one, range(len(MISTAKES))))


@pytest.mark.parametrize("name, args, code, named, env", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_is_one_line_with_exit_code(mistakes, name, args, code, named, env):
    if name == "bf16 on CPU" and __import__("torch").accelerator.is_available():
        pytest.skip("bf16 works where there is a GPU")
    run = mistakes[name]
    command = args[0] if args[0] in ("train", "inspect", "merge") else ""
    assert_one_line_error(run, code, command, *named)
    assert "Retrying" not in run.all and run.seconds < 60, run  # no network retries
    assert "'loss'" not in run.out and "Loading weights" not in run.all  # it failed before loading anything


def test_no_arguments_prints_usage_and_exits_2(tmp_path):
    run = hf_lowrank(cwd=tmp_path)
    assert run.code == 2 and run.err.startswith("usage: hf-lowrank") and "train" in run.err, run


def test_debug_shows_the_traceback(tmp_path):
    flag = hf_lowrank("--debug", "train", "--r", "0", cwd=tmp_path)
    env = hf_lowrank("train", "--r", "0", cwd=tmp_path, env={"HF_LOWRANK_DEBUG": "1"})
    for run in (flag, env):
        assert run.code == 1 and "Traceback" in run.err and "UsageError: --r 0 is not valid" in run.err, run


def test_gitignore_covers_the_output_folders():
    ignored = subprocess.run(["git", "check-ignore", "hf-lowrank-output/x", "qlora-output/x"], cwd=ROOT,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["hf-lowrank-output/x", "qlora-output/x"], ignored
