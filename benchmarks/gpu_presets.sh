#!/usr/bin/env bash
# The paper presets and the test suite on a GPU machine (used through the workplace's device
# tool: wheels for packages the machine lacks in .whl/, the MNIST test split in .devdata/mnist).
# Prints the wall time of each preset; copies the metrics and the pca figure to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps .whl/*.whl && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
export NTKRUN_TEST_MNIST=$PWD/.devdata/mnist
timeout 300 python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/cluster -m "not cluster" \
    --deselect tests/robustness/test_resources.py 2>&1 | tail -12 | tee "$OUT/pytest.txt"
for args in "convergence" "regression" "scaling" "pca --data-dir .devdata/mnist --set data.split=test"; do
    name=${args%% *}
    start=$(date +%s.%N)
    python3 -m ntkrun $args --quiet -o /tmp/runs > "/tmp/$name.txt" 2>&1
    rc=$?
    echo "$args: exit $rc, $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
    tail -2 "/tmp/$name.txt"
    cp /tmp/runs/$name/latest/metrics.csv "$OUT/$name-metrics.csv" 2>/dev/null
    cp /tmp/runs/$name/latest/fits.csv "$OUT/$name-fits.csv" 2>/dev/null
done
cp /tmp/runs/pca/latest/figure.png "$OUT/pca-paper.png" 2>/dev/null
cp /tmp/runs/pca/latest/eigenvalues.csv "$OUT/pca-eigenvalues.csv" 2>/dev/null
