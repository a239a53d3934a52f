#!/usr/bin/env bash
# Run HERE (the machine without a GPU, which reaches PyPI), from anywhere, right before the device call that runs
# benchmarks/gpu_check.sh. It
#   1. downloads into .whl/ the wheels of the Python packages that the H200 image lacks (its python3 is 3.12 with
#      torch 2.11, transformers 5.17, accelerate, peft, pytest-xdist; see /work/.library/device/KINDS.md):
#      trl 1.16.0 and its datasets (with dill and multiprocess), bitsandbytes (QLoRA tests), gguf (embedded
#      model tests); the versions are the ones the suite runs with here;
#   2. writes .whl/COMMIT: the commit being measured and the tracked files changed since (the device's copy of
#      the tree has no .git; run.py --gpu puts both in its report);
#   3. checks that the tree that travels plus .whl stays under the 60 MiB this project allows a call (the
#      device's limit is 64 MiB).
# .whl/ is git-ignored (.gitignore and .git/info/exclude); never commit it. The device call names it in `carry`.
#
# The download, as the device notes (/work/.library/device/README.md, "nvidia-h200") give it:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2 gguf==0.19.0
# (bitsandbytes 0.50.2 is a manylinux_2_24 wheel, 41 MiB; the others are pure Python, 2 MiB together.)
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2 gguf==0.19.0)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl # one version of each package: two would stop the whole install there
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
{
    git rev-parse HEAD
    git status --porcelain --untracked-files=no
} >.whl/COMMIT

count=$(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
    echo "expected ${#WHEELS[@]} wheels in .whl, found $count" >&2
    exit 1
fi
if git check-ignore -q .whl/COMMIT; then :; else
    echo ".whl is not git-ignored: add /.whl/ to .git/info/exclude" >&2
    exit 1
fi
# What travels: tracked files and untracked files git does not ignore, plus the carried .whl.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
wheel_bytes=$(du -cb .whl | tail -1 | cut -f1)
total=$((tree_bytes + wheel_bytes))
printf 'tree %.1f MiB + .whl %.1f MiB = %.1f MiB (limit 60)\n' "$(echo "$tree_bytes / 1048576" | bc -l)" \
    "$(echo "$wheel_bytes / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "too large for one device call" >&2
    exit 1
fi
ls -l .whl
echo "commit recorded: $(head -1 .whl/COMMIT) ($(($(wc -l <.whl/COMMIT) - 1)) tracked files changed)"
