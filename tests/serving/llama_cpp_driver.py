"""Runs in llama-cpp-python's own venv (scripts/serving_envs.sh), never imported by the tests.

    python llama_cpp_driver.py SPEC.json RESULT.json

SPEC: {"base": base .gguf, "prompts": [[token id, ...], ...], "max_tokens": int,
       "jobs": [{"name": str, "lora": .gguf file or null for the base alone, "f32_cache": bool}, ...]}
(f32_cache: a float32 KV cache instead of llama.cpp's default float16 one)
RESULT: [{"name", "ok", "tokens": [[id, ...] per prompt], "logits": [[[float] * vocab per generated token] per
prompt]} or {"name", "ok": false, "error"}, ...]. Greedy decoding by argmax over llama.cpp's logits, token ids in
and out (no tokenizer involved); one model per job, the adapter applied at scale 1.
"""

import json
import sys


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    import numpy as np
    from llama_cpp import GGML_TYPE_F32, Llama

    results = []
    for job in spec["jobs"]:
        cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if job.get("f32_cache", True) else {}
        try:
            llm = Llama(model_path=spec["base"], lora_path=job["lora"], n_ctx=128, n_batch=128, logits_all=True,
                        n_threads=2, seed=0, verbose=False, **cache)
            tokens, logits = [], []
            for prompt in spec["prompts"]:
                llm.reset()
                llm.eval(prompt)
                out, rows = [], []
                for _ in range(spec["max_tokens"]):
                    row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
                    rows.append(row.tolist())
                    out.append(int(row.argmax()))
                    llm.eval([out[-1]])
                tokens.append(out)
                logits.append(rows)
            results.append({"name": job["name"], "ok": True, "tokens": tokens, "logits": logits})
            del llm
        except Exception as e:  # noqa: BLE001 (what the engine raised is the result)
            results.append({"name": job["name"], "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
