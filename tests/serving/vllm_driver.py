"""Runs in vLLM's own venv (scripts/serving_envs.sh), never imported by the tests: one engine, one job per adapter.

    python vllm_driver.py SPEC.json RESULT.json

SPEC: {"base": folder, "max_lora_rank": int, "prompts": [[token id, ...], ...], "max_tokens": int,
       "logprobs": int, "jobs": [{"name": str, "path": adapter folder or null for the base alone}, ...]}
RESULT (rewritten after every job, so a crash keeps what was done): [{"name", "ok", "tokens": [[id, ...] per
prompt], "logprobs": [[{id: logprob} per generated token] per prompt]} or {"name", "ok": false, "error"}, ...]
A job after a failed one is still tried: whether the engine survives a refused adapter is part of what is measured.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=spec["base"], enable_lora=True, max_lora_rank=spec["max_lora_rank"], max_loras=1,
              dtype="float32", max_model_len=128, seed=0, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=spec["logprobs"],
                            ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    results = []
    for i, job in enumerate(spec["jobs"]):
        try:
            request = LoRARequest(job["name"], i + 1, job["path"]) if job["path"] else None
            outs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
            tokens = [list(o.outputs[0].token_ids) for o in outs]
            logprobs = [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                        for o in outs]
            results.append({"name": job["name"], "ok": True, "tokens": tokens, "logprobs": logprobs})
        except Exception as e:  # noqa: BLE001 (what the engine raised is the result)
            import traceback

            results.append({"name": job["name"], "ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                            "traceback": traceback.format_exc()[-3000:]})
        with open(result_path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(result_path + ".tmp", result_path)


if __name__ == "__main__":
    main()
