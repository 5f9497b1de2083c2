"""Hub: push, pull and load adapters by repo id, against real HTTP servers driven by the real huggingface_hub client.

Two servers, both on 127.0.0.1 and free ports, both stopped at the end:
  - tests/hub_server.py, a small in-memory Hub (uploads, branches, private repos, tokens);
  - olah, a self-hosted Hub mirror nobody here wrote, serving plain git repositories made in the test (pulls only).

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE into `huggingface_hub.constants` when it is
imported, which in this process (offline, by conftest) has already happened: the `online` fixture sets those
constants to what the variables would have given, and the Trainer test runs in a fresh process with the real
environment variables. Nothing of huggingface_hub or hf_lowrank is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import randomize_b, save_tiny, tokens
from hub_server import HubServer

import hf_lowrank
from hf_lowrank import AdapterError, load_adapter, save_adapter
from hf_lowrank.hub import HubError, pull_adapter, push_adapter
from hf_lowrank.state import read_adapter

ROOT = Path(__file__).resolve().parents[1]
ALICE, BOB = "hf_alice_token", "hf_bob_token"
ADAPTER = {"adapter_model.safetensors", "adapter_config.json", "README.md"}


# ---- fixtures -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub():
    server = HubServer({"alice": ALICE, "bob": BOB}).start()
    yield server
    server.stop()


@pytest.fixture
def online(hub, monkeypatch, tmp_path, tiny_llama):
    """This process as if started with HF_ENDPOINT=<test hub>, HF_HUB_OFFLINE=0, HF_TOKEN=alice's, a fresh cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-saved-tokens"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", ALICE)
    hub.tiny_base = tiny_llama  # the (local) base of the adapters these tests push
    return hub


def randomize(model, seed: int = 1, scale: float = 0.05):
    """Random B everywhere, so that the adapter changes the output (a zero B would make every comparison trivial)."""
    return randomize_b(model, seed, scale)


def cfg(**kw) -> hf_lowrank.LowRankConfig:
    return hf_lowrank.LowRankConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "quantization": None, **kw})


def adapted(base: str, seed: int = 1, **kw):
    from transformers import AutoModelForCausalLM

    return randomize(hf_lowrank.from_pretrained(AutoModelForCausalLM, base, cfg(**kw)), seed)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits.float()


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def nf4_adapter(tiny_llama, tmp_path_factory):
    """(folder, logits): a QLoRA adapter of the tiny llama saved to disk, with decoys beside it, and its output."""
    folder = tmp_path_factory.mktemp("nf4-adapter")
    model = adapted(tiny_llama, quantization="nf4")
    save_adapter(model, folder)
    for decoy in ("model.safetensors", "optimizer.pt", "notes.txt"):  # must never be uploaded
        (folder / decoy).write_bytes(b"not an adapter file")
    with hf_lowrank.disabled_adapters(model):
        base_out = logits(model)
    return folder, logits(model), base_out


# ---- push -> pull -> load ----------------------------------------------------------------------------------------


def test_push_pull_load_same_outputs(online, nf4_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, trained, base_out = nf4_adapter
    before = len(online.requests)
    info = push_adapter(folder, "alice/qlora-tiny")
    repo = online.repos["alice/qlora-tiny"]
    assert info.oid == repo.branches["main"]
    assert hub_files(online, "alice/qlora-tiny") == ADAPTER | {".gitattributes"}  # allow-list: no decoys
    assert online.commit_messages("alice/qlora-tiny") == ["initial commit", "Upload LoRA adapter with hf-lowrank"]
    commits = [r for r in online.requests[before:] if r[0] == "POST" and "/commit/" in r[1]]
    assert len(commits) == 1, commits  # one commit, whatever the number of files
    assert push_adapter(folder, "alice/qlora-tiny").oid == info.oid, "unchanged files: no empty commit"
    assert len(repo.commits) == 2

    path = pull_adapter("alice/qlora-tiny")
    assert sorted(os.listdir(path)) == sorted(ADAPTER)
    assert all((path / f).is_symlink() for f in ADAPTER), "the Hub cache's layout: links into the repo's blobs"
    local = json.loads((folder / "adapter_config.json").read_text())
    assert local["base_model_name_or_path"] == online.tiny_base  # a local path: never published
    assert json.loads((path / "adapter_config.json").read_text()) == {**local, "base_model_name_or_path": None}
    assert not any(online.tiny_base.encode() in b for b in online.files("alice/qlora-tiny").values())
    for k, t in weights(folder).items():
        assert torch.equal(weights(path)[k], t), k

    model = hf_lowrank.load(AutoModelForCausalLM, "alice/qlora-tiny", base=online.tiny_base).eval()
    assert (trained - base_out).abs().max() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(logits(model), trained, rtol=0, atol=1e-5)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules()), "load() rebuilds the NF4 base"


def test_a_base_loaded_from_a_relative_path_is_never_published(online, tiny_llama, tmp_path, monkeypatch):
    """A base loaded as "checkpoints/tiny" (a relative folder, which reads like a Hub id "org/name") is recorded as
    the absolute folder, so a push from another working directory publishes no base and no path."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama, tmp_path / "checkpoints" / "tiny")
    model = adapted("checkpoints/tiny")
    save_adapter(model, tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tmp_path / "checkpoints" / "tiny")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    push_adapter(tmp_path / "adapter", "alice/relative-base")
    pushed = online.files("alice/relative-base")
    assert json.loads(pushed["adapter_config.json"])["base_model_name_or_path"] is None
    assert not any(b"checkpoints/tiny" in b for b in pushed.values())


def test_a_base_loaded_from_its_hub_cache_folder_is_published_by_its_repo_id(online, tiny_llama, tmp_path):
    """A base loaded by the path of its Hub cache snapshot (what `snapshot_download` returns) is recorded as that
    path; a push publishes the repo id the cache folder's name holds, and no path."""
    from huggingface_hub import HfApi, snapshot_download

    HfApi().create_repo("alice/cached-base")
    HfApi().upload_folder(repo_id="alice/cached-base", folder_path=str(tiny_llama))
    snapshot = snapshot_download("alice/cached-base")
    assert Path(snapshot).parent.parent.name == "models--alice--cached-base", "the cache's layout, which this is about"
    save_adapter(adapted(snapshot), tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == snapshot
    push_adapter(tmp_path / "adapter", "alice/from-cache")
    pushed = online.files("alice/from-cache")
    assert json.loads(pushed["adapter_config.json"])["base_model_name_or_path"] == "alice/cached-base"
    assert not any(str(tmp_path).encode() in b for b in pushed.values()), "no local path is published"


@pytest.mark.parametrize("recorded, published", [
    ("/c/hub/models--alice--tiny/snapshots/0123abcd", "alice/tiny"),
    ("/c/hub/models--alice--tiny/snapshots/0123abcd/", "alice/tiny"),
    ("rel/models--gpt2/snapshots/0123abcd", "gpt2"),  # a repo without an org
    ("alice/tiny", "alice/tiny"),  # a Hub id as it is
    ("/c/hub/models--alice--tiny/snapshots/0123abcd/sub", None),  # below the snapshot: not the repo's root
    ("/c/hub/models--alice--tiny/snapshots", None),
    ("/c/hub/datasets--alice--tiny/snapshots/0123abcd", None),  # not a model
    ("/c/data/tiny/snapshots/0123abcd", None),  # a `snapshots` folder outside the cache
    ("/c/hub/models--alice--tiny/snapshots/0123abcd/snapshots/x", None),  # the last `snapshots` counts
    ("./tiny", None), ("", None),
])
def test_published_base_of_a_recorded_path(recorded, published):
    """What a push publishes for the base an adapter records: a Hub id, the id of a Hub cache snapshot, else None."""
    from types import SimpleNamespace

    from hf_lowrank.hub import published_base

    assert published_base(SimpleNamespace(base_model=recorded)) == published


def hub_files(hub: HubServer, repo_id: str, revision: str = "main") -> set[str]:
    return set(hub.files(repo_id, revision))


def test_branches_and_commit_hashes_as_revisions(online, tiny_llama):
    first, second = adapted(tiny_llama, seed=1), adapted(tiny_llama, seed=2)
    main_info = push_adapter(first, "alice/branchy")  # a model object: saved to a temporary folder, then pushed
    dev_info = push_adapter(second, "alice/branchy", revision="dev")  # branch created from main
    repo = online.repos["alice/branchy"]
    assert set(repo.branches) == {"main", "dev"}
    assert repo.branches["main"] == main_info.oid and repo.branches["dev"] == dev_info.oid
    assert repo.commits[dev_info.oid].parent == main_info.oid

    main_w, dev_w = weights(pull_adapter("alice/branchy")), weights(pull_adapter("alice/branchy", revision="dev"))
    pinned = weights(pull_adapter("alice/branchy", revision=main_info.oid))
    key = next(k for k in main_w if ".lora_B." in k)
    assert not torch.equal(main_w[key], dev_w[key])
    assert torch.equal(pinned[key], main_w[key])

    target = load_adapter(_plain(tiny_llama), "alice/branchy", revision="dev")  # injects, then loads
    torch.testing.assert_close(logits(target), logits(second), rtol=0, atol=1e-6)


def test_model_push_to_hub_and_save_pretrained_push_adapter_only(online, tiny_llama, tmp_path):
    model = adapted(tiny_llama, quantization="nf4")
    model.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="alice/via-save")
    model.push_to_hub("alice/via-mixin")  # transformers' PushToHubMixin, around our save_pretrained
    for repo_id in ("alice/via-save", "alice/via-mixin"):
        assert online.all_paths(repo_id) == ADAPTER | {".gitattributes"}, repo_id
    assert sorted(os.listdir(tmp_path / "saved")) == sorted(ADAPTER)


def test_merge_of_an_adapter_whose_base_is_on_the_hub(online, tiny_llama, tmp_path, capsys):
    """`hf-lowrank merge` without --base downloads the recorded base into the Hub cache, where every file is a link
    into the repo's blobs: the merged folder still gets the base's tokenizer and generation files (as copies, not
    links), and nothing linked out of the snapshot."""
    from huggingface_hub import HfApi

    from hf_lowrank.export import merge_main

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    extras = {"tokenizer_config.json": b'{"model_max_length": 64}\n', "merges.txt": b"#version: 0.2\na b\n"}
    for name, data in extras.items():
        (base / name).write_bytes(data)
    HfApi().create_repo("alice/tiny-base")
    HfApi().upload_folder(repo_id="alice/tiny-base", folder_path=str(base))
    model = randomize(hf_lowrank.from_pretrained(__import__("transformers").AutoModelForCausalLM, "alice/tiny-base",
                                                 cfg()))
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "alice/tiny-base"
    snapshot = next((tmp_path / "hub-cache").glob("models--alice--tiny-base/snapshots/*"))
    os.symlink(tmp_path / "adapter" / "adapter_config.json", snapshot / "stray.json")  # a link out of the snapshot

    assert merge_main([str(tmp_path / "adapter"), "--output", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    merged = tmp_path / "merged"
    assert (snapshot / "tokenizer_config.json").is_symlink(), "the cache's layout, which this test is about"
    for name, data in extras.items():
        assert not (merged / name).is_symlink() and (merged / name).read_bytes() == data, name
    assert (merged / "generation_config.json").is_file()
    assert not (merged / "stray.json").exists() and "stray.json" in out, "a link out of the snapshot is skipped, named"
    torch.testing.assert_close(_plain(str(merged))(tokens()).logits, logits(model), rtol=0, atol=1e-4)


def _plain(base: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def test_load_adapter_checks_the_base_before_injecting(online, tiny_llama, tmp_path):
    push_adapter(adapted(tiny_llama), "alice/for-llama")
    other = save_tiny(tmp_path / "wider", "llama", hidden_size=192, intermediate_size=384, num_attention_heads=3,
                      num_key_value_heads=3)
    model = _plain(other)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(model, "alice/for-llama")
    assert not list(hf_lowrank.lora_layers(model)), "no layer injected"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "nothing loaded"


def test_private_repo_and_pull_request(online, tiny_llama):
    push_adapter(adapted(tiny_llama), "alice/secret", private=True)
    assert online.repos["alice/secret"].private
    assert sorted(os.listdir(pull_adapter("alice/secret"))) == sorted(ADAPTER)  # the owner reads it

    info = push_adapter(adapted(tiny_llama, seed=5), "alice/secret", create_pr=True, commit_message="try this")
    repo = online.repos["alice/secret"]
    assert info.pr_url and info.pr_url.endswith("/discussions/1") and info.pr_revision == "refs/pr/1"
    assert repo.prs[1] == info.oid and repo.branches["main"] != info.oid  # main untouched
    main_w, pr_w = weights(pull_adapter("alice/secret")), weights(pull_adapter("alice/secret", revision="refs/pr/1"))
    assert main_w.keys() == pr_w.keys() and any(not torch.equal(main_w[k], pr_w[k]) for k in main_w)


# ---- the model card -----------------------------------------------------------------------------------------------


def test_model_card(online, nf4_adapter, tmp_path):
    folder, _, _ = nf4_adapter
    hub_base = tmp_path / "hub-base"
    shutil.copytree(folder, hub_base)
    config = json.loads((hub_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "acme/tiny-llama"  # as when the base was loaded by its Hub id
    (hub_base / "adapter_config.json").write_text(json.dumps(config))
    (hub_base / "README.md").unlink()  # no card: one is written for the push

    push_adapter(hub_base, "alice/carded", revision="v1")
    card = online.files("alice/carded", "v1")["README.md"].decode()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert front.splitlines()[:3] == ["library_name: peft", "base_model: acme/tiny-llama", "tags:"]
    tags = [line[2:] for line in front.splitlines() if line.startswith("- ")]
    assert tags == ["lora", "hf-lowrank", "peft", "qlora", "base_model:adapter:acme/tiny-llama"]
    assert "| quantization | NF4, double quant, compute bfloat16, storage uint8 |" in body
    assert "| rank r / alpha | 4 / 8 (scaling α/r) |" in body
    assert 'hf_lowrank.load(AutoModelForCausalLM, "alice/carded", revision="v1")' in body
    assert 'PeftModel.from_pretrained(base, "alice/carded", revision="v1")' in body
    assert 'AutoModelForCausalLM.from_pretrained("acme/tiny-llama")' in body
    assert "hf-lowrank pull alice/carded --revision v1" in body
    assert not (hub_base / "README.md").exists(), "the user's folder is not modified"

    # a base loaded from a local path: no base_model in the card (the Hub rejects a path there), push accepted
    push_adapter(folder, "alice/local-base")
    local_card = online.files("alice/local-base")["README.md"].decode()
    assert "base_model:" not in local_card.split("---\n")[1] and str(folder) not in local_card.split("---\n")[1]
    assert '"alice/local-base"' in local_card

    # a card the user wrote is pushed as it is
    own = tmp_path / "own-card"
    shutil.copytree(folder, own)
    (own / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n")
    push_adapter(own, "alice/own-card")
    assert online.files("alice/own-card")["README.md"] == b"---\nlicense: mit\n---\n# My adapter\n"


# ---- errors -------------------------------------------------------------------------------------------------------


def test_repo_or_revision_not_found(online, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(HubError, match=r"'alice/nope'.*not found on .*Check the repo id"):
        pull_adapter("alice/nope", cache_dir=cache)
    push_adapter_min(online, "alice/exists")
    with pytest.raises(HubError, match=r"'alice/exists' at revision 'nope'.*no revision 'nope'.*existing branch"):
        pull_adapter("alice/exists", revision="nope", cache_dir=cache)
    assert not list(cache.glob("**/snapshots/*")), "nothing written to the cache"


def push_adapter_min(hub: HubServer, repo_id: str, token: str = ALICE, text: bytes = b"hello") -> None:
    """A repo holding only a text file (not an adapter), made with the plain client."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.url, token=token)
    api.create_repo(repo_id, exist_ok=True)
    api.create_commit(repo_id, [CommitOperationAdd("notes.txt", text)], commit_message="notes")


def test_not_an_adapter_repo(online, tmp_path):
    push_adapter_min(online, "alice/just-notes")
    with pytest.raises(HubError, match=r"'alice/just-notes'.*no adapter_config.json.*not an adapter repo"):
        pull_adapter("alice/just-notes", cache_dir=tmp_path)


def test_token_missing_or_rejected(online, nf4_adapter, monkeypatch, tmp_path):
    folder, _, _ = nf4_adapter
    monkeypatch.delenv("HF_TOKEN")
    before = len(online.requests)
    with pytest.raises(HubError, match=r"'alice/tokenless'.*no Hugging Face token.*HF_TOKEN.*hf auth login"):
        push_adapter(folder, "alice/tokenless")
    assert len(online.requests) == before, "nothing sent without a token"
    with pytest.raises(HubError, match=r"'alice/bad-token'.*rejected the token.*Invalid credentials.*new one"):
        push_adapter(folder, "alice/bad-token", token="hf_not_a_real_token")
    assert "alice/bad-token" not in online.repos
    push_adapter(folder, "alice/public", token=ALICE)
    with pytest.raises(HubError, match=r"'alice/public'.*rejected the token"):
        pull_adapter("alice/public", token="hf_not_a_real_token", cache_dir=tmp_path)
    assert sorted(os.listdir(pull_adapter("alice/public", cache_dir=tmp_path))) == sorted(ADAPTER)  # anonymous


def test_other_users_private_repo_and_namespace(online, nf4_adapter, tmp_path):
    folder, _, _ = nf4_adapter
    push_adapter(folder, "alice/private-one", private=True)
    with pytest.raises(HubError, match=r"'alice/private-one'.*not found.*private and this token cannot read it"):
        pull_adapter("alice/private-one", token=BOB, cache_dir=tmp_path)
    for repo_id in ("alice/private-one", "alice/bobs-attempt"):
        with pytest.raises(HubError, match=rf"'{repo_id}'.*may not write.*own namespace"):
            push_adapter(folder, repo_id, token=BOB)
    assert "alice/bobs-attempt" not in online.repos
    assert len(online.repos["alice/private-one"].commits) == 2, "bob's push changed nothing"


def test_server_unreachable(online, nf4_adapter, tmp_path):
    folder, _, _ = nf4_adapter
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HubError, match=r"'alice/x'.*127\.0\.0\.1.*unreachable.*HF_ENDPOINT.*HF_HUB_OFFLINE=1"):
        push_adapter(folder, "alice/x", endpoint=dead)
    with pytest.raises(HubError, match=r"'alice/x'.*unreachable"):
        pull_adapter("alice/x", endpoint=dead, cache_dir=tmp_path)
    assert not list(tmp_path.glob("**/snapshots/*"))


# ---- cache and offline --------------------------------------------------------------------------------------------


def test_cache_and_offline(online, nf4_adapter, monkeypatch):
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    folder, trained, _ = nf4_adapter
    info = push_adapter(folder, "alice/cached", revision="stable")
    first = pull_adapter("alice/cached", revision="stable")
    assert first.parent.name == "snapshots" and first.name == info.oid
    before = len(online.requests)
    assert pull_adapter("alice/cached", revision=info.oid) == first  # a commit hash in the cache: no request
    assert len(online.requests) == before

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: still honoured
    assert pull_adapter("alice/cached", revision="stable") == first
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as read at import
    assert pull_adapter("alice/cached", revision="stable") == first
    model = hf_lowrank.load(AutoModelForCausalLM, "alice/cached", revision="stable", base=online.tiny_base).eval()
    torch.testing.assert_close(logits(model), trained, rtol=0, atol=1e-5)
    assert len(online.requests) == before, "offline: not one request"
    with pytest.raises(HubError, match=r"'alice/cached' at revision 'main'.*HF_HUB_OFFLINE=1.*not in the local Hub"):
        pull_adapter("alice/cached", revision="main")


# ---- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_push_and_pull(online, nf4_adapter, tmp_path, capsys):
    from hf_lowrank.cli import main

    folder, _, _ = nf4_adapter
    assert main(["push", str(folder), "alice/cli", "--private", "--revision", "exp", "--base-model",
                 "org/tiny-llama"]) == 0
    repo = online.repos["alice/cli"]
    assert repo.private and set(repo.branches) == {"main", "exp"}
    assert capsys.readouterr().out.strip() == f"{online.url}/alice/cli/commit/{repo.branches['exp']}"
    assert hub_files(online, "alice/cli", "exp") == ADAPTER | {".gitattributes"}

    outputs = tmp_path / "outputs"
    out = outputs / "pulled"
    assert main(["pull", "alice/cli", "--revision", "exp", "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(os.listdir(out)) == sorted(ADAPTER) and not any(p.is_symlink() for p in out.iterdir())
    assert weights(out).keys() == weights(folder).keys()
    assert all(torch.equal(weights(out)[k], t) for k, t in weights(folder).items())
    pushed = json.loads((out / "adapter_config.json").read_text())
    assert pushed["base_model_name_or_path"] == "org/tiny-llama"
    card = (out / "README.md").read_text()
    assert "base_model: org/tiny-llama" in card and "base_model:adapter:org/tiny-llama" in card
    assert online.tiny_base not in card and online.tiny_base not in json.dumps(read_adapter(out).metadata)

    missing = outputs / "never"
    assert main(["pull", "alice/cli", "--revision", "nope", "--output", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-lowrank pull: error: cannot pull 'alice/cli' at revision 'nope'") and err.count("\n") == 1
    assert not missing.exists() and sorted(p.name for p in outputs.iterdir()) == ["pulled"], "nothing half-written"
    assert main(["push", str(tmp_path / "no-such-dir"), "alice/cli"]) == 1
    assert "is not a folder" in capsys.readouterr().err


# ---- the Trainer --------------------------------------------------------------------------------------------------

TRAINER_SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.modules["peft"] = None  # as on a machine without peft: `import peft` fails and find_spec finds nothing
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    import hf_lowrank

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            ids = torch.randint(1, 256, (8,), generator=torch.Generator().manual_seed(i % 8)).repeat(2)
            return {"input_ids": ids, "labels": ids}

    base, out, repo_id = sys.argv[1:4]
    hf_lowrank.enable(r=4, lora_alpha=8, lora_dropout=0.0)
    model = AutoModelForCausalLM.from_pretrained(base)
    args = TrainingArguments(output_dir=out, max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], push_to_hub=True, hub_model_id=repo_id,
                             hub_strategy="checkpoint", hub_token=os.environ["HF_TOKEN"])
    trainer = Trainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    info = trainer.push_to_hub()
    hf_lowrank.disable()
    x = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model.eval()(x).logits.float()
        pulled = hf_lowrank.load(AutoModelForCausalLM, repo_id, base=base).eval()(x).logits.float()  # via HF_ENDPOINT
        with hf_lowrank.disabled_adapters(model):
            base_out = model(x).logits.float()
    print("RESULT " + json.dumps({"oid": info.oid, "diff": (trained - pulled).abs().max().item(),
                                  "moved": (trained - base_out).abs().max().item(),
                                  "peft": sorted(m for m in sys.modules if m.startswith("peft") and sys.modules[m])}))
''')


def test_trainer_pushes_adapter_only(hub, tiny_llama, tmp_path):
    script = tmp_path / "train_push.py"
    script.write_text(TRAINER_SCRIPT)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": ALICE, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(script), tiny_llama, str(tmp_path / "out"), "alice/trained"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert result["moved"] > 1e-4, "training changed the output"
    assert result["diff"] < 1e-5, "the pushed final adapter reproduces the trained model"
    assert result["peft"] == []

    repo = hub.repos["alice/trained"]
    assert repo.branches["main"] == result["oid"]
    checkpoint = {"adapter_model.safetensors", "adapter_config.json", "README.md", "optimizer.pt", "scheduler.pt",
                  "rng_state.pth", "trainer_state.json", "training_args.bin"}
    assert hub.all_paths("alice/trained") == ({".gitattributes", "training_args.bin"} | ADAPTER
                                              | {f"last-checkpoint/{f}" for f in checkpoint})
    full = (Path(tiny_llama) / "model.safetensors").stat().st_size
    biggest = max(len(b) for c in repo.commits.values() for b in c.files.values())
    assert biggest < full / 4, f"a {biggest}-byte file left the machine; the base is {full} bytes"
    step2 = next(c for c in repo.commits.values() if c.message == "Training in progress, step 2")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(step2.files), "checkpoint pushes: adapter"

    card = hub.files("alice/trained")["README.md"].decode()
    front = card.split("---\n")[1]
    assert "library_name: peft" in front and "- hf-lowrank" in front and "- generated_from_trainer" in front
    assert "## LoRA adapter (hf-lowrank)" in card and 'hf_lowrank.load(AutoModelForCausalLM, "alice/trained")' in card
    assert "learning_rate: 0.01" in card  # the Trainer's summary is kept

    every_upload = [b for c in repo.commits.values() for b in c.files.values()]
    assert not any(ALICE.encode() in b for b in every_upload), "hub_token left the machine in training_args.bin"
    leaks = sorted(p for c in repo.commits.values() for p, b in c.files.items() if tiny_llama.encode() in b)
    assert not leaks, f"a local path was published in {leaks}"
    assert json.loads(hub.files("alice/trained")["adapter_config.json"])["base_model_name_or_path"] is None
    local_args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert type(local_args).__name__ == "TrainingArguments" and local_args.hub_token is None


@pytest.mark.parametrize("why", ["previous push still uploading", "hub_strategy end"])
def test_a_checkpoint_the_trainer_does_not_push_is_left_alone(tiny_llama, tmp_path, why):
    """Where transformers' `_push_from_checkpoint` pushes nothing (its two early returns), ours copies nothing into
    output_dir either, and the checkpoint keeps the files it was saved with (its local base path, for resuming)."""
    from concurrent.futures import Future

    from transformers import Trainer, TrainingArguments
    from transformers.utils.hub import PushInProgress

    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True,
                             hub_strategy="end" if why == "hub_strategy end" else "every_save")
    trainer = Trainer(model=adapted(tiny_llama), args=args, callbacks=[hf_lowrank.LowRankCallback()])
    checkpoint = out / "checkpoint-2"
    trainer.save_model(str(checkpoint))
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    assert json.loads(before["adapter_config.json"])["base_model_name_or_path"] == tiny_llama
    if why == "previous push still uploading":
        trainer.push_in_progress = PushInProgress([Future()])  # a pending upload
    trainer._push_from_checkpoint(str(checkpoint))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before


# ---- olah: a Hub mirror nobody here wrote, serving git repositories -------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def olah(tiny_llama, tmp_path_factory):
    """olah (offline, mirrors-path = git repos made here, upstream = a dead port) and what it serves."""
    root = tmp_path_factory.mktemp("olah")
    repo = root / "mirrors" / "models" / "acme" / "tiny-adapter"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    outputs = {}
    model = adapted(tiny_llama, seed=11)
    outputs["v1"] = logits(model)
    save_adapter(model, repo)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v1")
    git(repo, "tag", "v1.0")
    v1 = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-qb", "v2")
    model = adapted(tiny_llama, seed=12)
    outputs["v2"] = logits(model)
    save_adapter(model, repo)
    git(repo, "commit", "-qam", "v2")
    v2 = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "main")

    port = free_port()
    (root / "olah.toml").write_text(textwrap.dedent(f"""
        [basic]
        host = "127.0.0.1"
        port = {port}
        hf-scheme = "http"
        hf-netloc = "127.0.0.1:{free_port()}"
        hf-lfs-netloc = "127.0.0.1:{free_port()}"
        mirrors-path = ["{root / 'mirrors'}"]
        repos-path = "{root / 'repos'}"
        [accessibility]
        offline = true
    """))
    olah_cli = shutil.which("olah-cli") or str(Path(sys.executable).parent / "olah-cli")
    log = open(root / "olah.log", "wb")  # noqa: SIM115 (closed below, after the server)
    proc = subprocess.Popen([olah_cli, "-c", str(root / "olah.toml")], stdout=log, stderr=subprocess.STDOUT,
                            cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{url}/api/models/acme/tiny-adapter/refs", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, (root / "olah.log").read_text()[-2000:]
                time.sleep(0.05)
        else:
            pytest.fail("olah did not start: " + (root / "olah.log").read_text()[-2000:])
        yield {"url": url, "v1": v1, "v2": v2, "outputs": outputs}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize(("revision", "expect"), [("main", "v1"), ("v2", "v2"), ("v1.0", "v1"), ("@v2", "v2")])
def test_olah_pull_revisions(olah, tiny_llama, tmp_path, monkeypatch, revision, expect):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    revision = olah["v2"] if revision == "@v2" else revision
    folder = pull_adapter("acme/tiny-adapter", revision=revision, endpoint=olah["url"], cache_dir=tmp_path)
    assert sorted(os.listdir(folder)) == sorted(ADAPTER)
    assert folder.name == olah[expect]  # the snapshot of the commit the revision names
    model = load_adapter(_plain(tiny_llama), folder)
    torch.testing.assert_close(logits(model), olah["outputs"][expect], rtol=0, atol=1e-6)
    other = olah["outputs"]["v2" if expect == "v1" else "v1"]
    assert (logits(model) - other).abs().max() > 1e-3, "the two revisions differ"


def test_olah_errors(olah, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # olah answers 401 / RepoNotFound for a repo it does not have and for a revision it does not have
    with pytest.raises(HubError, match=r"'acme/missing' at revision 'main'.*not found"):
        pull_adapter("acme/missing", revision="main", endpoint=olah["url"], cache_dir=tmp_path)
    with pytest.raises(HubError, match=r"'acme/tiny-adapter' at revision 'nope'"):
        pull_adapter("acme/tiny-adapter", revision="nope", endpoint=olah["url"], cache_dir=tmp_path)
    assert not list(tmp_path.glob("**/snapshots/*"))
