#!/usr/bin/env bash
# Builds DEST (default .wheels/serve_site, git-ignored): the serving packages the GPU machine lacks (fastapi with
# opentelemetry-api, uvicorn, httpx, jsonargparse and their dependencies), unpacked for its Python 3.12, to put on
# PYTHONPATH there (19 MB).
# Usage (from the project root, where pip reaches PyPI): bash benchmarks/make_serve_site.sh [DEST]; then on the GPU machine
#   PYTHONPATH=$PWD/.wheels/serve_site python3 benchmarks/benchmark_server.py --random_model Mistral-7B-v0.1 --precision bf16
set -euo pipefail
dest=${1:-.wheels/serve_site}
rm -rf "$dest"; mkdir -p "$dest"
python3 -m pip install -q --no-deps --no-compile --target "$dest" --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all: \
  "fastapi>=0.110,<1" annotated-doc opentelemetry-api starlette pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection typing-extensions \
  "uvicorn>=0.30,<1" h11 click anyio sniffio idna "httpx>=0.27,<1" httpcore certifi \
  "jsonargparse[signatures]>=4.30,<5" docstring-parser typeshed-client
du -sh "$dest"
