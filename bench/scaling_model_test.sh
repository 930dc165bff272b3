#!/usr/bin/env bash
# bench/scaling_model.py --validate: exits 1 when a prediction is more than
# 20% from its measurement. Then its placement mode: spreading two hot
# experts that share a server must predict more tokens/s, and the same
# placement twice the same.
set -euo pipefail
model="$1"
/usr/bin/python3 "$model" --validate
ratio() {
  /usr/bin/python3 "$model" --shares=0.4,0.4,0.1,0.1 --batch=512 \
      --placement_before="0,1|2,3" --placement_after="$1" | grep -o 'after / before: [0-9.]*' |
      awk '{print $4}'
}
spread="$(ratio "0,2|1,3")"
same="$(ratio "0,1|2,3")"
echo "spread: after / before $spread; unchanged: $same"
awk -v r="$spread" 'BEGIN { exit !(r > 1.3) }' || { echo "spreading hot experts gains nothing"; exit 1; }
[[ "$same" == "1.00" ]] || { echo "the same placement predicts differently"; exit 1; }
