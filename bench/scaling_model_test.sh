#!/usr/bin/env bash
# bench/scaling_model.py --validate: exits 1 when a prediction is more than
# 20% from its measurement.
set -euo pipefail
exec /usr/bin/python3 "$1" --validate
