#!/usr/bin/env bash
# The static site: the published tree (dist/whl, a symlink to its current generation)
# copied with links resolved to <site>/whl, and a top page that leads there.
#   bash ci/site.sh [dist] [site]
set -euo pipefail
dist="${1:-dist}"
site="${2:-site}"
if [ ! -f "$dist/whl/manifest.json" ]; then
  echo "ci/site.sh: $dist/whl has no manifest.json: run publish-smoked first" >&2
  exit 1
fi
rm -rf "$site"
mkdir -p "$site"
cp -RL "$dist/whl" "$site/whl"
printf '%s\n' '<!DOCTYPE html>' \
  '<html><head><meta http-equiv="refresh" content="0; url=whl/"><title>flash-attn wheels</title></head>' \
  '<body><a href="whl/">flash-attn wheels: one pip index per variant</a></body></html>' \
  >"$site/index.html"
echo "site: $(find "$site/whl" -name '*.whl' | wc -l) wheel(s) in $site"
