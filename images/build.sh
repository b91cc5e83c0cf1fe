#!/usr/bin/env bash
# Builds brim's two images, tagged with pyproject.toml's version (operator/settings.py's
# default images, which the chart installs):
#   ghcr.io/brim-dev/brim-runtime:<version>    images/runtime.Containerfile
#   ghcr.io/brim-dev/brim-operator:<version>   images/operator.Containerfile
# `make images` runs it. IMAGE_REPOSITORY changes the registry prefix.
#
# The engine is the first of $CONTAINER_ENGINE, docker and podman whose `info` answers: a docker
# CLI without a running engine does not count. Where there is none, it says so and exits 0
# (development machines and CI have none; tests/charts/test_images.py checks the Containerfiles).
#
# The build context is a temporary folder holding only what the images copy (pyproject.toml,
# README.md, runtime/, kernels/, operator/), not the repository with its virtualenv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
repository=${IMAGE_REPOSITORY:-ghcr.io/brim-dev}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)

engine=""
for candidate in ${CONTAINER_ENGINE:-} docker podman; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" info >/dev/null 2>&1; then
    engine=$candidate
    break
  fi
done
if [ -z "$engine" ]; then
  echo "images: no container engine here (neither docker nor podman answers \`info\`): nothing built."
  echo "images: with one, this builds $repository/brim-runtime:$version and $repository/brim-operator:$version."
  exit 0
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
tar -C "$root" --exclude=__pycache__ --exclude='*.pyc' -cf - \
  pyproject.toml README.md runtime kernels operator | tar -C "$context" -xf -

for image in runtime operator; do
  tag="$repository/brim-$image:$version"
  echo "images: building $tag with $engine"
  "$engine" build --file "$root/images/$image.Containerfile" \
    --build-arg "BRIM_VERSION=$version" --tag "$tag" "$context"
done
