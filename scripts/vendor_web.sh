#!/usr/bin/env bash
# Refreshes the chat app's third-party browser files (committed, so a fresh machine needs no npm):
# marked (markdown), DOMPurify (sanitising), highlight.js (code colours), at pinned versions from npm.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=souverain/web/static/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm init -y >/dev/null && npm install --silent marked@18.2.1 dompurify@3.5.0 @highlightjs/cdn-assets@11.12.0)
m="$work/node_modules"
cp "$m/marked/lib/marked.umd.js" "$m/dompurify/dist/purify.min.js" "$m/@highlightjs/cdn-assets/highlight.min.js" "$dest/"
cp "$m/@highlightjs/cdn-assets/styles/github.min.css" "$dest/hljs-github.min.css"
cp "$m/@highlightjs/cdn-assets/styles/github-dark.min.css" "$dest/hljs-github-dark.min.css"
cp "$m/marked/LICENSE"* "$dest/marked.LICENSE.md"
cp "$m/dompurify/LICENSE" "$dest/dompurify.LICENSE"
cp "$m/@highlightjs/cdn-assets/LICENSE" "$dest/highlightjs.LICENSE"
echo "vendored into $dest"
