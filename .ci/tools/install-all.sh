#!/usr/bin/env bash
# The test suite's external tools, each installed by its own idempotent script:
#   helm        .tools/bin/helm                     install-helm.sh
#   prometheus  /usr/bin/prometheus, promtool       install-prometheus.sh (apt-get, root)
#   checkov     .tools/checkov-venv/bin/checkov     install-checkov.sh
# One line per tool with its version. A few minutes on a fresh machine, ~0.1 s when all are there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/install-helm.sh"
"$here/install-prometheus.sh"
"$here/install-checkov.sh"
