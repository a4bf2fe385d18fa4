#!/bin/sh
# Regenerate the gallery with varprobe's own commands: one figure (.png) and one
# Markdown report (.md, the kind a pull-request comment or CI job summary shows) per
# sample model. Run from anywhere; PYTHON picks the interpreter (default: python).
set -eu
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
for name in xavier_mlp he_mlp resnet_bn; do
    "$PYTHON" -m varprobe analyze "sample_models/$name.py" --seed 0 --trials 3 \
        --png "docs/gallery/$name.png" --output "docs/gallery/$name.md" > /dev/null
    echo "docs/gallery/$name.png, docs/gallery/$name.md"
done
