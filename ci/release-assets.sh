#!/usr/bin/env bash
# Upload the published wheels and manifest.json to the GitHub release of TAG (created
# if missing), replacing assets of the same name. Needs gh and GH_TOKEN.
#   bash ci/release-assets.sh v2.9.0 dist/whl
set -euo pipefail
tag="${1:?usage: release-assets.sh TAG TREE}"
tree="${2:?usage: release-assets.sh TAG TREE}"
mapfile -t assets < <(find -L "$tree" -name '*.whl' | sort)
if [ "${#assets[@]}" -eq 0 ]; then
  echo "::error::no wheel under $tree"
  exit 1
fi
gh release view "$tag" >/dev/null 2>&1 || gh release create "$tag" --verify-tag --title "$tag" --notes "flash-attn $tag: wheels that passed the smoke gate; one pip index per variant on the project's site"
gh release upload "$tag" "${assets[@]}" "$tree/manifest.json" --clobber
echo "release $tag: ${#assets[@]} wheel(s)"
