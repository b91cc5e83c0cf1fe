#!/usr/bin/env bash
# checkov, the IaC security scanner, for scanning rendered manifests, the Helm chart and the
# Containerfiles. It lives in its own virtualenv, .tools/checkov-venv, because its dependency
# pins clash with the project's. Its whole dependency tree is pinned in checkov-constraints.txt;
# to move to another checkov, install it without the constraints, then regenerate them with
# `.tools/checkov-venv/bin/pip freeze --exclude checkov`.
# Idempotent: a no-op (no Python start-up) when the pinned version's stamp is there.
set -euo pipefail

CHECKOV_VERSION=3.3.30

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=$root/.tools/checkov-venv
stamp=$venv/.brim-installed

# The shebang test catches a venv copied or moved from elsewhere (its scripts would not run).
if [ -x "$venv/bin/checkov" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$CHECKOV_VERSION" ] \
    && [ "$(head -n 1 "$venv/bin/checkov")" = "#!$venv/bin/python3" ]; then
    echo "checkov $CHECKOV_VERSION ($venv/bin/checkov)"
    exit 0
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
fail() {
    cat "$log" >&2
    echo "install-checkov.sh: $1" >&2
    exit 1
}

rm -rf "$venv"
python=${PYTHON:-python3}
"$python" -m venv "$venv" >"$log" 2>&1 || fail "could not create $venv with $python -m venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    --constraint "$here/checkov-constraints.txt" "checkov==$CHECKOV_VERSION" >>"$log" 2>&1 \
    || fail "pip install checkov==$CHECKOV_VERSION failed"

# No update check against pypi.org (the tests run checkov offline the same way).
version=$(CKV_SKIP_PACKAGE_UPDATE_CHECK=TRUE "$venv/bin/checkov" --version 2>>"$log") \
    || fail "$venv/bin/checkov --version failed"
[ "$version" = "$CHECKOV_VERSION" ] \
    || fail "checkov --version says '$version', expected $CHECKOV_VERSION"
echo "$CHECKOV_VERSION" >"$stamp"
echo "checkov $CHECKOV_VERSION ($venv/bin/checkov)"
